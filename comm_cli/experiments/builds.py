"""The directory protocol every built-in experiment builds its models in, once per settings.

A build directory holds what one experiment builds for one settings hash (its world and its
models) and a ``manifest.json`` written last: ``complete`` and ``settings_hash`` in it, and every
file of ``needs`` beside it, make a complete build (``BuildDirectory.complete``). A build is
made under a host- and pid-tagged temporary name and renamed into place (``comm_cli.atomic``),
so a killed build never looks complete and the next one removes its leftovers; if another
process finishes the same build first, its copy is kept. A directory that holds anything but
this experiment's own entries is never replaced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from comm_cli.atomic import MANIFEST, building, read_manifest, remove_stale_partials, write_manifest
from comm_cli.errors import OutputDirError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildDirectory:
    """``path``: where the build lives; ``entries``: the names a build of ours writes there;
    ``needs``: the files (relative paths) a complete build has; ``what``: its name in messages."""

    path: Path
    entries: frozenset[str]
    needs: tuple[str, ...]
    what: str

    def complete(self, settings_hash: str | None = None) -> dict | None:
        """The manifest of a complete build (of ``settings_hash`` when given), else None."""
        expected = {"complete": True}
        if settings_hash is not None:
            expected["settings_hash"] = settings_hash
        return read_manifest(self.path, needs=self.needs, **expected)

    def remove_stale_partials(self) -> None:
        """Leftovers of killed builds beside this directory (this host's, their process gone)."""
        remove_stale_partials(self.path.parent)

    def check_replaceable(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise OutputDirError(f"{self.what} '{self.path}' is a file: give a directory path")
        if self.path.is_dir():
            foreign = sorted(p.name for p in self.path.iterdir() if p.name not in self.entries | {MANIFEST})
            if foreign:
                raise OutputDirError(
                    f"{self.what} '{self.path}' holds other files ({', '.join(foreign[:3])}): "
                    "give an empty or new directory"
                )

    def build(self, settings_hash: str | None, fill: Callable[[Path], dict]) -> tuple[dict, bool]:
        """Build into a temporary directory with ``fill(tmp) -> manifest`` (it writes everything
        but the manifest) and rename it into place. Returns (the manifest in place, whether it is
        this call's: False when another process finished the same build first and its copy stays)."""
        self.check_replaceable()
        kept = []

        def finished_elsewhere(final: Path) -> bool:
            if self.complete(settings_hash) is not None:
                kept.append(final)
            return bool(kept)

        with building(self.path, keep=finished_elsewhere) as tmp:
            manifest = {**fill(tmp), "complete": True, "settings_hash": settings_hash}
            write_manifest(tmp, manifest)
        if kept:
            return self.complete(settings_hash), False
        return manifest, True


def prepare_build(
    build: BuildDirectory,
    settings_hash: str | None,
    make: Callable[[], object],
    *,
    may_build: bool,
    missing: str,
    timeout_s: float = 3600.0,
) -> None:
    """What an experiment's ``prepare`` does for one build a job needs: leftovers of killed builds
    go; a complete build of these settings is used; a directory named explicitly that holds a
    complete build of *other* settings is used as it is (with a warning); otherwise the main
    process builds it with ``make()`` (``may_build``; else ``missing`` is the error) while the
    other processes wait for it."""
    import os
    import time

    from comm_cli.errors import ModelLoadError

    build.remove_stale_partials()
    if build.complete(settings_hash) is not None:
        return
    other = build.complete() if settings_hash is not None else None
    if other is not None:
        logger.warning(
            "%s %s holds a build of other settings (%s; the config describes %s): using it as it is",
            build.what,
            build.path,
            other.get("settings_hash"),
            settings_hash,
        )
        return
    if not may_build:
        raise ModelLoadError(missing)
    if os.environ.get("RANK", "0") == "0":
        make()
        return
    start = time.time()
    while build.complete(settings_hash) is None:
        if time.time() - start > timeout_s:
            raise ModelLoadError(
                f"timed out waiting for the main process to build {build.what} in {build.path}"
            )
        time.sleep(2.0)
