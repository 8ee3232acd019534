"""comm_cli.atomic: one way to write a file or build a directory so that a reader sees the old
content or the new, never a half; killed builds recognised by host and pid; manifests read back
only when they record what the reader expects."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from comm_cli import atomic
from comm_cli.atomic import (
    HOST,
    atomic_write,
    atomic_write_text,
    building,
    partial_owner,
    read_manifest,
    remove_stale_partials,
    temporary_path,
    write_manifest,
)


def _dead_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_temporary_name_carries_host_and_pid_and_reads_back(tmp_path):
    path = temporary_path(tmp_path / "my-cache")
    assert path.parent == tmp_path
    assert path.name == f".tmp-my-cache-{HOST}-{os.getpid()}"
    assert "-" not in HOST
    assert partial_owner(path.name) == (HOST, os.getpid())
    assert partial_owner(temporary_path(tmp_path / "x", "old").name) == (HOST, os.getpid())
    # names that are not ours: a checkpoint's shared temporary name, a user's hidden files
    for name in (
        ".tmp-step_00000008",
        ".tmp-a-b",
        "tmp-a-host-12",
        ".cache",
        ".old-a-host-x12",
        "manifest.json",
    ):
        assert partial_owner(name) is None, name


def test_a_killed_build_of_this_host_is_removed_and_others_stay(tmp_path):
    dead = _dead_pid()
    killed_dir = tmp_path / f".tmp-cache-{HOST}-{dead}"
    killed_file = tmp_path / f".tmp-run_config.yaml-{HOST}-{dead}"
    killed_aside = tmp_path / f".old-composition-{HOST}-{dead}"
    running = tmp_path / f".tmp-other-{HOST}-{os.getpid()}"  # this process: still building
    other_host = tmp_path / f".tmp-cache-{HOST}x-{dead}"  # a machine sharing the filesystem
    checkpoint = tmp_path / ".tmp-step_00000008"
    users = tmp_path / "cache"
    for path in (killed_dir, killed_aside, running, other_host, checkpoint, users):
        path.mkdir()
        (path / "file").write_text("x")
    killed_file.write_text("half")
    removed = remove_stale_partials(tmp_path)
    assert sorted(removed) == sorted([killed_dir, killed_file, killed_aside])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(p.name for p in (running, other_host, checkpoint, users))
    assert remove_stale_partials(tmp_path / "missing") == []


def test_atomic_writes_leave_the_old_content_when_the_writer_fails(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_text(path, "old\n")

    def half_then_fail(tmp):
        tmp.write_text("ne")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary file left
    atomic_write_text(path, "new\n", durable=True)
    assert path.read_text() == "new\n"
    atomic_write(path, lambda tmp: tmp.write_bytes(b"\x00\x01"))
    assert path.read_bytes() == b"\x00\x01"


def test_a_build_appears_complete_or_not_at_all(tmp_path):
    final = tmp_path / "sub" / "cache"
    with pytest.raises(RuntimeError), building(final) as tmp:
        (tmp / "states.bin").write_bytes(b"12")
        raise RuntimeError("killed half way")
    assert not final.exists() and list(final.parent.iterdir()) == []

    with building(final) as tmp:
        assert tmp.parent == final.parent and partial_owner(tmp.name) == (HOST, os.getpid())
        (tmp / "states.bin").write_bytes(b"12")
        write_manifest(tmp, {"fingerprint": "a", "version": 1})
    assert read_manifest(final, fingerprint="a", version=1, needs=["states.bin"]) is not None

    # a new build replaces the old one whole; nothing of either is left beside it
    with building(final) as tmp:
        write_manifest(tmp, {"fingerprint": "b", "version": 1})
    assert read_manifest(final, fingerprint="b") is not None
    assert not (final / "states.bin").exists()
    assert [p.name for p in final.parent.iterdir()] == ["cache"]


def test_a_build_another_process_finished_first_is_kept(tmp_path):
    final = tmp_path / "cache"
    with building(final) as tmp:
        write_manifest(tmp, {"fingerprint": "a", "by": "them"})
    with building(final, keep=lambda d: read_manifest(d, fingerprint="a") is not None) as tmp:
        write_manifest(tmp, {"fingerprint": "a", "by": "us"})
    assert read_manifest(final)["by"] == "them"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_a_build_removes_the_leftovers_of_a_killed_one_beside_it(tmp_path):
    leftover = tmp_path / f".tmp-cache-{HOST}-{_dead_pid()}"
    leftover.mkdir()
    with building(tmp_path / "cache") as tmp:
        write_manifest(tmp, {})
    assert not leftover.exists()


def test_a_manifest_is_read_only_when_complete_and_matching(tmp_path):
    assert read_manifest(tmp_path) is None  # no manifest: not built
    write_manifest(tmp_path, {"fingerprint": "abc", "version": 2, "complete": True})
    assert read_manifest(tmp_path, fingerprint="abc", version=2)["complete"] is True
    assert read_manifest(tmp_path, fingerprint="abd", version=2) is None  # another build's
    assert read_manifest(tmp_path, fingerprint="abc", version=1) is None  # an older format
    assert read_manifest(tmp_path, settings_hash=None) is None  # a value it does not record
    assert read_manifest(tmp_path, needs=["world.json"]) is None  # a file the reader needs is missing
    (tmp_path / "world.json").write_text("{}")
    assert read_manifest(tmp_path, needs=["world.json"], complete=True) is not None
    text = (tmp_path / atomic.MANIFEST).read_text()
    assert json.loads(text) == {"complete": True, "fingerprint": "abc", "version": 2}
    (tmp_path / atomic.MANIFEST).write_text(text[: len(text) // 2])  # damaged
    assert read_manifest(tmp_path) is None
    (tmp_path / atomic.MANIFEST).write_text("[1, 2]")
    assert read_manifest(tmp_path) is None
