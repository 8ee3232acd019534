"""Writing so that a reader (or a resumed run) sees the old content or the new, never a half.

Every file and directory comm keeps for later reading is written here: run configs, trainer
states, summaries, results, saved compositions, the training caches and checkpoints.

- A file is written under a temporary name beside it and renamed into place
  (``atomic_write_text``, ``atomic_write`` with a writer such as safetensors' ``save_file``).
- A directory is built under a temporary name beside it and renamed into place when complete
  (``building``); its ``manifest.json`` is written last (``write_manifest``), so a directory whose
  manifest reads back with the expected values (``read_manifest``) is a complete build of what
  the reader wants.
- Temporary names are ``.tmp-<name>-<host>-<pid>`` (``.old-...`` for a directory on its way out).
  A build killed half way leaves one behind; ``remove_stale_partials`` removes those of this host
  whose process is gone, and leaves another host's alone (on a filesystem shared by several
  machines a pid only says whether a process of *this* host still runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

MANIFEST = "manifest.json"
# No "-" in it, so that a temporary name splits back into its parts.
HOST = socket.gethostname().replace("-", "_").replace("/", "_") or "localhost"
_KINDS = (".tmp", ".old")


def temporary_path(path: str | Path, kind: str = "tmp") -> Path:
    """The name this process writes ``path`` under before renaming it into place (``kind="tmp"``),
    or moves it aside to before deleting it (``kind="old"``)."""
    path = Path(path)
    return path.with_name(f".{kind}-{path.name}-{HOST}-{os.getpid()}")


def partial_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of the process a temporary name of ours belongs to; None for any other name."""
    kind, _, rest = name.partition("-")
    parts = rest.rsplit("-", 2)
    if kind not in _KINDS or len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def remove_stale_partials(parent: str | Path) -> list[Path]:
    """Delete what killed writes left in ``parent``: temporary files and directories of this host
    whose process is gone. A running process's, another host's and every other entry stay.
    Returns what was removed."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed = []
    for entry in parent.iterdir():
        owner = partial_owner(entry.name)
        if owner is None or owner[0] != HOST or process_alive(owner[1]):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def fsync_directory(directory: str | Path) -> None:
    """Make a rename or a new entry in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], object], *, durable: bool = False) -> None:
    """Call ``write(temporary path)``, then rename what it wrote to ``path``. ``durable``: flush
    the file to disk before the rename and the rename after it (a checkpoint's files)."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_directory(path.parent)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = False) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it."""
    atomic_write(path, lambda tmp: tmp.write_text(text), durable=durable)


def replace_directory(built: str | Path, final: str | Path) -> None:
    """Rename the finished directory ``built`` to ``final``. A directory already there is first
    moved aside and deleted after, so ``final`` never holds a mix of the two."""
    built, final = Path(built), Path(final)
    old = None
    if final.exists():
        old = temporary_path(final, "old")
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(built, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard_directory(path: str | Path) -> None:
    """Delete a directory so that a kill half way leaves no directory under its name with files
    missing: it is renamed aside first (the next ``remove_stale_partials`` finishes the job)."""
    path = Path(path)
    doomed = temporary_path(path, "old")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


@contextlib.contextmanager
def building(final: str | Path, *, keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Build the directory ``final`` in the empty temporary directory this yields; when the block
    ends normally it is renamed to ``final``, replacing an older one there, unless ``keep(final)``
    says the directory now at ``final`` is to stay (another process finished the same build
    first). Left by an exception the temporary directory is removed; left by a kill, the next
    build beside it removes it. Write the manifest last, inside the block."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final.parent)
    tmp = temporary_path(final)
    shutil.rmtree(tmp, ignore_errors=True)  # a dead process of this host had our pid
    tmp.mkdir()
    try:
        yield tmp
        if keep is None or not keep(final):
            replace_directory(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(directory: str | Path, manifest: dict) -> None:
    """Write a build's manifest (sorted JSON); the last file of a build."""
    atomic_write_text(Path(directory) / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def read_manifest(directory: str | Path, *, needs: Iterable[str] = (), **expected) -> dict | None:
    """The manifest of a complete build in ``directory``: one that records every value in
    ``expected`` (``fingerprint=...``, ``version=...``, ``complete=True``), beside which every
    relative path in ``needs`` exists. None for anything short of that (no manifest, a damaged
    one, another build's): the caller builds it."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    if any(key not in manifest or manifest[key] != value for key, value in expected.items()):
        return None
    if not all((directory / name).exists() for name in needs):
        return None
    return manifest
