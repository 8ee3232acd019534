"""User-facing errors.

Every failure a user can cause (a bad config, a missing file, a wrong layer index, tokenizers
that disagree, a NaN loss) is raised as a ``CommError`` whose message names the problem and
the fix in one line. The CLIs catch ``CommError``, print that line and exit non-zero; library
users get an ordinary exception (``CommError`` subclasses ``ValueError``).
"""

from __future__ import annotations


class CommError(ValueError):
    """A problem the user can fix. ``str(err)`` is the whole message: what is wrong and how to fix it."""


class ConfigError(CommError):
    """A config value is invalid (unknown key, wrong type, impossible combination)."""


class MappingError(ConfigError):
    """A layer mapping cannot be resolved against the models' depths."""


class ModelLoadError(CommError):
    """A base model or a saved composition cannot be found or loaded."""


class UnsupportedModelError(CommError):
    """comm cannot find the decoder blocks of a model class."""


class TokenizerMismatchError(CommError):
    """Anchor and augmenting tokenizers do not produce the same ids for the same text."""


class DataError(CommError):
    """A dataset is missing, empty, or lacks a configured field."""


class OutputDirError(CommError):
    """The output directory holds a different run."""


class NonFiniteLossError(CommError):
    """Training produced a NaN or infinite loss."""


class CheckpointError(CommError):
    """A checkpoint cannot be used (missing, truncated, corrupt) or cannot be written (disk full)."""


class TrainingStopped(Exception):
    """Training stopped on request (SIGTERM, SIGINT) after writing a checkpoint at a step boundary.

    Not an error: the CLI prints ``str(err)`` and exits with ``EXIT_STOPPED`` (75, sysexits'
    EX_TEMPFAIL: "try again later"), so a scheduler's wrapper can tell "preempted, resume me"
    from success (0), a user error (2) and a crash (1)."""
