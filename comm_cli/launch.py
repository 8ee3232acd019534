"""`comm-launch` and `comm-config`: comm-train on several processes, from an install, by name.

    comm-launch ddp anchor.name_or_path=A augment.name_or_path=B data.data_files=train.jsonl name=mine
    comm-launch fsdp --num_processes 4 experiment=... name=big   # accelerate's options pass through
    comm-launch cpu_2proc ...                                     # two CPU processes, no GPU needed
    accelerate launch --config_file "$(comm-config accelerate ddp)" -m comm_cli.train ...
    sbatch --nodes=2 --gpus-per-node=8 "$(comm-config slurm)" experiment=... name=...
    comm-config list

The launch configs (``conf/accelerate/*.yaml``) and the SLURM script (``conf/slurm/``) ship inside
the wheel as ``comm_cli/conf``. comm-launch runs ``accelerate launch --config_file <that config>
-m comm_cli.train ...`` in its own process, with ``num_processes`` following the GPUs present
unless given, and exits with comm-train's status (0 done, 2 a mistake to fix, 75 stopped by
SIGTERM/SIGINT: run again with resume=auto) where torchrun would exit 1: the main process of each
machine writes its status to the file COMM_EXIT_STATUS_FILE names (``comm_cli.cli``), and a
worker that failed on its own is in torchrun's report of the failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from comm_cli.cli import EXIT_STATUS_FILE, EXIT_STOPPED, EXIT_USER_ERROR, config_dir
from comm_cli.errors import CommError, ConfigError

PROGRAM = "comm-launch"
# The launch config that needs no GPU: two processes over gloo (it hides the GPUs from them).
CPU_CONFIG = "cpu_2proc"
# Accelerate configs of these kinds start one process per GPU.
PER_GPU = {"MULTI_GPU", "FSDP", "DEEPSPEED"}
# Options of `accelerate launch` that comm-launch sets itself.
RESERVED = {"--config_file", "--module", "--no_python", "--help"}
# How long torchrun lets its workers finish after passing a stop signal on before it kills them
# (its own default, 30 s, can be shorter than a step and a checkpoint); under SLURM's 300 s notice
# (--signal=TERM@300 in the SLURM script). TORCH_ELASTIC_SHUTDOWN_TIMEOUT, if set, wins.
SHUTDOWN_SECONDS = 240


# ---------------------------------------------------------------------------------------------- the files


def launch_configs() -> dict[str, Path]:
    """The shipped accelerate configs by name (``ddp``, ``fsdp``, ``cpu_2proc``, ...)."""
    return {path.stem: path for path in sorted((Path(config_dir()) / "accelerate").glob("*.yaml"))}


def slurm_script() -> Path:
    return Path(config_dir()) / "slurm" / "slurm_train.sh"


def find_config(name: str, paths: bool = True) -> Path:
    """A shipped launch config by name, or (``paths``) the path of the user's own."""
    configs = launch_configs()
    if name in configs:
        return configs[name]
    if paths and name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return Path(name).resolve()
    raise ConfigError(
        f"unknown launch config '{name}': choose one of {', '.join(configs)}"
        + (" or give the path of an accelerate config file" if paths else "")
        + " (comm-config list describes them)"
    )


def summary(path: Path) -> str:
    """The first comment line of a shipped file: what it is for."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("#!"):
            return line.lstrip("# ").strip()
    return ""


# ---------------------------------------------------------------------------------------------- arguments


def _canonical(option: str) -> str:
    """``--num-processes=4`` -> ``--num_processes`` (accelerate takes either spelling)."""
    return "--" + option.split("=", 1)[0][2:].replace("-", "_")


def accelerate_options() -> dict[str, bool]:
    """Every ``--option`` of ``accelerate launch``, and whether it takes a value."""
    from accelerate.commands.launch import launch_command_parser

    actions = launch_command_parser()._option_string_actions
    return {_canonical(o): a.nargs != 0 for o, a in actions.items() if o.startswith("--")}


def split_arguments(argv: list[str], options: dict[str, bool]) -> tuple[list[str], list[str]]:
    """(accelerate launch's arguments, comm-train's): an option ``accelerate launch`` knows goes
    to it with its value (``--num_processes 4``, ``--mixed_precision=no``); everything else, and
    everything after ``--``, goes to comm-train."""
    launcher: list[str] = []
    train: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            train += argv[index + 1 :]
            break
        name = _canonical(arg) if arg.startswith("--") else None
        if name not in options:
            train.append(arg)
        elif name in RESERVED:
            raise ConfigError(
                f"{arg} is comm-launch's to set: name the launch config first (comm-launch CONFIG ...; "
                "a path to your own accelerate config works too)"
            )
        else:
            launcher.append(arg)
            if options[name] and "=" not in arg:
                if index + 1 == len(argv):
                    raise ConfigError(f"{arg} needs a value (accelerate launch {arg} VALUE)")
                launcher.append(argv[index + 1])
                index += 1
        index += 1
    return launcher, train


def option_value(arguments: list[str], option: str) -> str | None:
    """The value given to ``option`` (canonical spelling) in accelerate launch's arguments."""
    for index, arg in enumerate(arguments):
        if arg.startswith("--") and _canonical(arg) == option:
            if "=" in arg:
                return arg.split("=", 1)[1]
            return arguments[index + 1] if index + 1 < len(arguments) else None
    return None


def process_count(config: dict, name: str, launcher: list[str], gpus: int) -> list[str]:
    """What comm-launch adds to accelerate launch's arguments: ``--num_processes`` following the
    GPUs present (times the machines), unless the user gave it or the config is not one process
    per GPU. A per-GPU config on a machine without one is an error naming the CPU config."""
    if option_value(launcher, "--num_processes") is not None:
        return []
    kind = str(config.get("distributed_type", "NO")).upper()
    if name == CPU_CONFIG or kind not in PER_GPU or config.get("use_cpu"):
        return []
    if gpus == 0:
        raise ConfigError(
            f"the {name} config starts one process per GPU and this machine has none: run "
            f"`comm-launch {CPU_CONFIG} ...` for two CPU processes (or comm-train for one), or give "
            "--num_processes N"
        )
    ids = option_value(launcher, "--gpu_ids")
    if ids and ids != "all":
        gpus = len(ids.split(","))
    machines = int(option_value(launcher, "--num_machines") or config.get("num_machines") or 1)
    return ["--num_processes", str(gpus * machines)]


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def config_for_this_machine(name: str) -> Path:
    """The launch config ``name`` for plain ``accelerate launch``: the shipped file, or for a
    config with one process per GPU a copy with this machine's count filled in (under the cache,
    COMM_CACHE_DIR else ~/.cache/comm), since accelerate reads ``num_processes`` from the file.
    On a machine without a GPU the shipped file (accelerate then asks for --num_processes)."""
    import yaml

    from comm_cli.atomic import atomic_write_text

    path = find_config(name, paths=False)
    config = yaml.safe_load(path.read_text()) or {}
    gpus = gpu_count()
    added = process_count(config, name, [], gpus) if gpus and "num_processes" not in config else []
    if not added:
        return path
    count = added[1]
    cache = Path(os.environ.get("COMM_CACHE_DIR") or Path.home() / ".cache" / "comm")
    copy = cache / "accelerate" / f"{name}-{count}-processes.yaml"
    text = f"{path.read_text()}num_processes: {count}  # the GPUs of this machine (comm-config)\n"
    if not copy.is_file() or copy.read_text() != text:
        copy.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(copy, text)
    return copy


# ---------------------------------------------------------------------------------------------- comm-launch


HELP = f"""{PROGRAM}: run comm-train on several processes (the GPUs of this machine, several machines)
with a launch config that ships with comm, from any directory.

Usage: {PROGRAM} CONFIG [accelerate launch options] [comm-train overrides] [-- comm-train arguments]

Examples:
  # one process per GPU of this machine
  {PROGRAM} ddp anchor.name_or_path=ANCHOR augment.name_or_path=AUGMENT data.data_files=train.jsonl name=mine
  # FSDP on 4 GPUs (options of accelerate launch pass through)
  {PROGRAM} fsdp --num_processes 4 anchor=... augment=... data.data_files=train.jsonl name=big
  # two CPU processes, no GPU needed
  {PROGRAM} {CPU_CONFIG} anchor.name_or_path=ANCHOR augment.name_or_path=AUGMENT data.data_files=train.jsonl
  # after a stop (exit status 75): continue from the newest checkpoint
  {PROGRAM} ddp ... resume=auto

Launch configs (CONFIG; or the path of your own accelerate config file):
{{configs}}

num_processes follows the GPUs present unless given. An option that `accelerate launch` knows
(--num_processes, --main_process_port, --mixed_precision, ...) goes to it; the rest to comm-train.
Exit status: comm-train's (0 done, 2 a mistake to fix, 75 stopped by SIGTERM/SIGINT after a
checkpoint: run again with resume=auto; 1 a crash). Under SLURM: sbatch "$(comm-config slurm)" ...
Plain accelerate: accelerate launch --config_file "$(comm-config accelerate ddp)" -m comm_cli.train ...
"""


def help_page() -> str:
    configs = launch_configs()
    width = max(len(name) for name in configs)
    lines = "\n".join(f"  {name:<{width}}  {summary(path)}" for name, path in configs.items())
    return HELP.replace("{configs}", lines)


def main() -> None:
    """``comm-launch``: exits with comm-train's status."""
    status = launch(sys.argv[1:])
    given = os.environ.get(EXIT_STATUS_FILE)
    if given:  # the SLURM script reads what comm-launch concluded
        _write_status(Path(given), status)
    sys.exit(status)


def launch(argv: list[str]) -> int:
    """Run comm-train under ``accelerate launch``; the exit status to end with."""
    try:
        return _launch(argv)
    except CommError as err:
        print(f"{PROGRAM}: error: {err}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


def _launch(argv: list[str]) -> int:
    before_separator = argv[: argv.index("--")] if "--" in argv else argv
    if not argv or {"-h", "--help"} & set(before_separator):
        print(help_page())
        return 0
    name, rest = argv[0], argv[1:]
    if name.startswith("-"):
        raise ConfigError(
            f"name the launch config first: {PROGRAM} CONFIG ... ({', '.join(launch_configs())})"
        )
    path = find_config(name)
    import yaml
    from accelerate.commands.launch import launch_command_parser

    launcher, train = split_arguments(rest, accelerate_options())
    config = yaml.safe_load(path.read_text()) or {}
    launcher = process_count(config, name, launcher, gpu_count()) + launcher
    if name == CPU_CONFIG:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    parser = launch_command_parser()

    def refuse(message: str):
        raise ConfigError(f"accelerate launch: {message}")

    parser.error = refuse
    args = parser.parse_args(["--config_file", str(path), *launcher, "--module", "comm_cli.train", *train])
    with _status_file() as status_file:
        return _run_launcher(args, status_file)


@contextlib.contextmanager
def _status_file() -> Iterator[Path]:
    """The file comm-train's main process writes its exit status to: the caller's (the SLURM
    script's), or a temporary one."""
    given = os.environ.get(EXIT_STATUS_FILE)
    if given:
        Path(given).unlink(missing_ok=True)
        yield Path(given)
        return
    handle, name = tempfile.mkstemp(prefix="comm-exit-status-")
    os.close(handle)
    os.unlink(name)
    os.environ[EXIT_STATUS_FILE] = name
    try:
        yield Path(name)
    finally:
        os.environ.pop(EXIT_STATUS_FILE, None)
        Path(name).unlink(missing_ok=True)


def _write_status(path: Path, status: int) -> None:
    from comm_cli.atomic import atomic_write_text

    with contextlib.suppress(OSError):
        atomic_write_text(path, f"{status}\n")


def _written_status(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _exit_code(code: int) -> int:
    """A process's exit status as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - code if code < 0 else code


def _run_launcher(args, status_file: Path) -> int:
    from accelerate.commands.launch import launch_command
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    _quiet_launcher_logs()
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_SECONDS))
    try:
        with _forwarding_signals():  # to accelerate's one-process launcher (torchrun has its own)
            launch_command(args)
    except SignalException as stop:
        # torchrun passed the signal on to every worker and waited for them: comm-train's status
        written = _written_status(status_file)
        return written if written is not None else 128 + int(stop.sigval)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        return _report_failure(rank, _exit_code(failure.exitcode))
    except subprocess.CalledProcessError as failed:  # accelerate's one-process launcher
        return _report_failure(0, _exit_code(failed.returncode))
    except ValueError as err:  # accelerate refusing the options or the config
        raise ConfigError(f"accelerate launch: {' '.join(str(err).split())}") from err
    return 0


def _report_failure(rank: int, status: int) -> int:
    """comm-train printed its own line for a mistake (2) and a stop (75); a crash gets one here."""
    if status not in (EXIT_USER_ERROR, EXIT_STOPPED):
        print(
            f"{PROGRAM}: comm-train process {rank} failed with exit status {status}; its output above says why",
            file=sys.stderr,
            flush=True,
        )
    return status


@contextlib.contextmanager
def _forwarding_signals() -> Iterator[None]:
    """SIGTERM/SIGINT to comm-launch reach the comm-train process accelerate's one-process
    launcher waits on (torchrun installs its own handlers, which pass them to every worker)."""
    import psutil

    def forward(signum, frame) -> None:
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _LauncherChatter:
    """Drops torchrun's log lines about a stop it passes on and a worker's exit status: comm-train
    prints its own line for those (and comm-launch one for a crash)."""

    PATTERNS = ("death signal", "closing signal", "failed (exitcode")

    def filter(self, record) -> bool:
        return not any(pattern in str(record.msg) for pattern in self.PATTERNS)


def _quiet_launcher_logs() -> None:
    import logging

    for name in (
        "torch.distributed.elastic.agent.server.api",
        "torch.distributed.elastic.multiprocessing.api",
    ):
        logging.getLogger(name).addFilter(_LauncherChatter())


# ---------------------------------------------------------------------------------------------- comm-train


def refuse_launch_overrides(argv: list[str]) -> list[str]:
    """comm-train's argv hook: ``accelerate=ddp`` (a launch config given as an override, a common
    mistake) ends in one line naming comm-launch."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == "accelerate":
            print(
                f"comm-train: error: {arg} is not a comm-train setting: several processes are started by a "
                f"launcher: `comm-launch {value or 'ddp'} <the same overrides>` (comm-config list shows the "
                "launch configs)",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(EXIT_USER_ERROR)
    return argv


# ---------------------------------------------------------------------------------------------- comm-config


CONFIG_HELP = """comm-config: where the launch files that ship with comm are.

  comm-config list                 the launch configs and the SLURM script, with their paths
  comm-config accelerate NAME      the path of a launch config (one process per GPU: a copy with this
                                   machine's GPU count as num_processes), for
                                   accelerate launch --config_file "$(comm-config accelerate NAME)" -m comm_cli.train ...
  comm-config slurm                the path of the SLURM script, for
                                   sbatch --nodes=2 --gpus-per-node=8 "$(comm-config slurm)" experiment=... name=..."""


def listing() -> str:
    configs = launch_configs()
    width = max(len(name) for name in [*configs, "slurm"])
    lines = ["Launch configs (comm-launch NAME ..., or comm-config accelerate NAME):"]
    lines += [
        f"  {name:<{width}}  {summary(path)}\n  {'':<{width}}  {path}" for name, path in configs.items()
    ]
    script = slurm_script()
    lines += ['SLURM script (sbatch "$(comm-config slurm)" ...):', f"  {'slurm':<{width}}  {summary(script)}"]
    lines += [f"  {'':<{width}}  {script}"]
    return "\n".join(lines)


def config_main() -> None:
    """``comm-config``: print where a shipped launch file is."""
    argv = sys.argv[1:]
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(CONFIG_HELP)
        elif argv == ["list"]:
            print(listing())
        elif argv[0] == "accelerate" and len(argv) == 2:
            print(config_for_this_machine(argv[1]))
        elif argv == ["slurm"]:
            print(slurm_script())
        else:
            raise ConfigError(
                f"cannot read '{' '.join(argv)}': use comm-config list | accelerate NAME | slurm"
            )
    except CommError as err:
        print(f"comm-config: error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
