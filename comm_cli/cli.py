"""What `comm-train` and `comm-eval` share: where the configs live, how a user's mistake is
reported (one line, exit status 2, whether comm or Hydra found it); logging that only the main
process writes comes from ``comm_cli.logs``.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from comm_cli.errors import CommError, ConfigError, TrainingStopped
from comm_cli.logs import is_main_process, setup_logging  # noqa: F401  (re-exported for the entry points)

EXIT_USER_ERROR = 2
# Stopped on SIGTERM/SIGINT after a checkpoint (sysexits' EX_TEMPFAIL: "try again later").
EXIT_STOPPED = 75


def config_dir() -> str:
    """Absolute path of the shipped Hydra configs: ``comm_cli/conf`` inside an installed wheel,
    the top-level ``conf/`` of a checkout (editable installs included). Absolute, so the console
    scripts work from any directory."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise RuntimeError(
        f"comm's configs are missing: neither {package / 'conf'} nor {package.parent / 'conf'} exists"
    )


def command(
    program: str,
    config_name: str,
    run: Callable,
    schema: Callable[[], type],
    argv_hook=None,
    run_directory: bool = True,
):
    """The ``main()`` of a Hydra command (``comm-train``, ``comm-eval``, ...): comm's --help page,
    ``argv_hook`` (overrides the command derives from the ones given), misspelt keys refused
    before Hydra composes, then ``run(cfg)`` with every user mistake reported in one line.
    ``run_directory``: the command writes into Hydra's run directory (removed again when a start
    fails before writing anything); commands that write none (comm-generate, ...) say False."""
    import hydra

    from comm_cli.help import accepted_groups

    @hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)
    def hydra_main(cfg) -> None:
        task_started()
        resolve_output_dir(cfg)
        run_dir = cfg.output_dir if run_directory else None
        run_reporting_errors(program, lambda: run(cfg), run_dir=run_dir)

    def main() -> None:
        help_if_asked(program, sys.argv[1:])
        if argv_hook is not None:
            sys.argv[1:] = argv_hook(sys.argv[1:])
        check_override_keys(program, sys.argv[1:], schema(), accepted_groups(program))
        run_hydra(program, hydra_main)

    return main


def typed_config(cfg, check: Callable[[object], None]):
    """The typed config of a composed one, its values checked, the console quieted unless verbose."""
    typed = to_typed(cfg)
    quiet_libraries(typed.verbose)
    check(typed)
    return typed


def help_if_asked(program: str, argv: list[str]) -> None:
    """``--help`` / ``-h``: comm's own page for the command (``comm_cli.help``), then exit 0."""
    if "--help" in argv or "-h" in argv:
        from comm_cli.help import page

        print(page(program, config_dir()))
        sys.exit(0)


def quiet_libraries(verbose: bool) -> None:
    """Library progress bars (datasets' map, transformers' weight loading and saving) and their
    INFO logs only with verbose=true: the console keeps comm's own lines and its progress bar."""
    if verbose:
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


def register_configs() -> None:
    """Before a config is composed: register the experiments (built-in and plugged in), the
    schema built from them, their resolvers, and the Hydra config directories plugins ship."""
    from comm_cli import experiments, registry
    from comm_cli.schema import register_schemas

    experiments.load()
    register_schemas()
    directories = [e.config_dir for e in registry.experiments() if e.config_dir]
    if directories:
        _add_config_search_path(directories)


def _add_config_search_path(directories: list[str]) -> None:
    """Let Hydra find configs in ``directories`` too (after comm's own): an experiment that lives
    outside comm ships its ``experiment/NAME.yaml`` and presets there."""
    from hydra.core.config_search_path import ConfigSearchPath
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    class ExperimentConfigs(SearchPathPlugin):
        def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
            for directory in directories:
                path = directory if "://" in directory else f"file://{Path(directory).resolve()}"
                search_path.append(provider="comm-experiment", path=path)

    Plugins.instance().register(ExperimentConfigs)


def to_typed(cfg):
    """The typed config of a composed one. A required value left unset, a dataclass check (a
    mapping with two forms) and an interpolation that names a section nobody set (``${kv.dir}``
    in a preset of an experiment the config does not use) each end in one ConfigError."""
    from omegaconf import OmegaConf
    from omegaconf.errors import (
        InterpolationKeyError,
        InterpolationToMissingValueError,
        MissingMandatoryValue,
    )

    from comm_cli import registry

    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        hint = "give it on the command line or in a config file"
        if err.full_key in ("anchor.name_or_path", "augment.name_or_path"):
            hint = (
                "name your models (anchor.name_or_path=... augment.name_or_path=..., a hub id or a directory, "
                "or a preset such as anchor=qwen2_5_1_5b) or run a built-in experiment (experiment=kv_arithmetic)"
            )
        raise ConfigError(f"{err.full_key} is not set: {hint}") from err
    except (InterpolationKeyError, InterpolationToMissingValueError) as err:
        text = str(err).splitlines()[0]
        owners = [e for e in registry.experiments() if e.section and f"'{e.section}." in text]
        if not owners:
            hint = "set the key it names, or drop the preset that uses it"
        elif owners[0].section in cfg:
            hint = f"it belongs to the {owners[0].name} experiment: add experiment={owners[0].name} (or {owners[0].section}={{}})"
        else:  # comm-generate, comm-chat, comm-serve: no experiment sections
            where = err.full_key.rpartition(".")[0] or err.full_key
            hint = (
                f"the preset belongs to the {owners[0].name} experiment, which this command does not read: "
                f"give {where}.name_or_path=<directory or hub id> instead"
            )
        raise ConfigError(f"{err.full_key}: {text}: {hint}") from err


def resolve_output_dir(cfg) -> None:
    """``output_dir: null`` means Hydra's run directory (``outputs/<name>``, or the sweep job's)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    if cfg.output_dir is None:
        with open_dict(cfg):
            cfg.output_dir = HydraConfig.get().runtime.output_dir


def remove_if_unused(run_dir: str | Path | None) -> None:
    """Remove a run directory that a failed start left empty (Hydra makes it before the job runs;
    a lock file alone holds nothing either), so a mistyped command leaves no trace."""
    if not run_dir or not is_main_process():
        return
    path = Path(run_dir)
    try:
        entries = list(path.iterdir())
        if all(entry.name == ".lock" and entry.is_file() for entry in entries):
            for entry in entries:
                entry.unlink()
            path.rmdir()
    except OSError:
        pass  # not there, or not empty after all: leave it


def run_reporting_errors(program: str, fn: Callable[[], object], run_dir=None) -> object:
    """Run ``fn``; a CommError becomes one line on stderr and exit status 2; a requested stop
    (SIGTERM/SIGINT, checkpoint written) one line and exit status 75. A ``run_dir`` that the failed
    start left empty is removed. Under several processes a stop, and an error every process
    raised alike (``comm_cli.training.ranks.agree``), is printed by the main process only. The
    status is also written to COMM_EXIT_STATUS_FILE when a launcher asks for it."""
    try:
        result = fn()
    except CommError as err:
        remove_if_unused(run_dir)
        if is_main_process() or not getattr(err, "every_process", False):
            print(f"{program}: error: {err}", file=sys.stderr, flush=True)
        exit_with(EXIT_USER_ERROR)
    except TrainingStopped as stop:
        remove_if_unused(run_dir)
        if is_main_process():  # every process stops at once, at the same step once training runs
            print(f"{program}: {stop}", file=sys.stderr, flush=True)
        exit_with(EXIT_STOPPED)
    except SystemExit as exit_:
        record_exit_status(0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1)
        raise
    except BaseException as err:
        remove_if_unused(run_dir)
        record_exit_status(130 if isinstance(err, KeyboardInterrupt) else 1)
        raise
    record_exit_status(0)
    return result


# A launcher (comm-launch, the SLURM script) names a file here; the main process of each machine
# writes its exit status into it, which the launcher then exits with instead of its own.
EXIT_STATUS_FILE = "COMM_EXIT_STATUS_FILE"


def record_exit_status(status: int) -> None:
    """Write ``status`` to COMM_EXIT_STATUS_FILE, if set, from the main process of this machine."""
    path = os.environ.get(EXIT_STATUS_FILE)
    if not path or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    from comm_cli.atomic import atomic_write_text

    try:
        atomic_write_text(path, f"{status}\n")
    except OSError:
        pass  # a launcher that cannot read it falls back on its own status


def exit_with(status: int) -> None:
    record_exit_status(status)
    sys.exit(status)


_task = {"started": False}


def task_started() -> None:
    """Called first thing in a ``@hydra.main`` function: from here on, an exception is the job's
    own (a bug keeps its traceback), not a config Hydra could not compose."""
    _task["started"] = True


def run_hydra(program: str, hydra_main: Callable[[], None]) -> None:
    """Run a ``@hydra.main`` function so that the config errors Hydra finds itself (a value of
    the wrong type, an unknown option of a config group, an override it cannot parse) end like
    every other user error: one line naming the key, exit status 2. Hydra would print several
    lines and exit 1. With HYDRA_FULL_ERROR=1 set by the user, Hydra's own report stands."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        hydra_main()
        return
    _task["started"] = False
    os.environ["HYDRA_FULL_ERROR"] = "1"  # makes Hydra raise instead of printing and exiting 1
    try:
        hydra_main()
    except Exception as err:
        if _task["started"]:
            raise
        message = hydra_error_line(err, program)
        print(f"{program}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


def hydra_error_line(err: BaseException, program: str) -> str:
    """One line for an error Hydra or OmegaConf raised while composing the config."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    hint = f"`{program} --cfg job` prints every key and its value"
    if "Unexpected type for root: NoneType" in str(err.__cause__ or err):
        # OmegaConf cannot set a.b=x where a is null: an experiment's section nobody turned on
        sections = ", ".join(f"{e.section} ({e.name})" for e in _experiment_sections())
        return (
            "an override sets a key inside a section that is null in this config (experiment sections: "
            f"{sections or 'none'}): choose the experiment or suite that uses it (experiment=NAME, suite=NAME), "
            f"or set the whole section (e.g. kv={{dir: /path}}); {hint}"
        )
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, option = str(err.missing_cfg_file).rpartition("/")
        if group and err.options:
            return f"unknown {group} option '{option}': choose one of {', '.join(sorted(err.options))}"
        return f"config '{err.missing_cfg_file}' not found: {_first_line(err)}"
    cause = err
    if isinstance(err, ConfigCompositionException):
        cause = err.__cause__ or err.__context__ or err
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        what = _first_line(cause)
        where = ""
        if cause is not err and str(err).startswith("In '"):
            where = f" in {str(err).split(':', 1)[0][3:]}"  # "In 'experiment/mine': ..." -> the file
        if isinstance(cause, ConfigKeyError):
            return f"unknown config key '{key or what}'{where}: check its spelling; {hint}"
        if key:
            return f"{key}{where}: {what}: give {key} a value of the right type ({hint})"
        return f"{what}{where} ({hint})"
    if isinstance(err, OverrideParseException):
        return f"cannot parse the override '{err.override}': {_all_lines(err)}"
    return f"the config cannot be composed: {_all_lines(err)} ({hint})"


def _experiment_sections():
    from comm_cli import registry

    return [e for e in registry.experiments() if e.section]


def _first_line(err: BaseException) -> str:
    text = str(getattr(err, "msg", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _all_lines(err: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    text = text or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _dataclass_of(annotation):
    """The dataclass inside an annotation such as ``ModelSpec`` or ``ModelSpec | None``."""
    import dataclasses
    import typing

    if dataclasses.is_dataclass(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def schema_keys(schema: type, prefix: str = "") -> tuple[set[str], set[str]]:
    """(every dotted key of a dataclass schema, the keys that are free-form dicts)."""
    import dataclasses
    import typing

    keys, free = set(), set()
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        full = f"{prefix}{f.name}"
        keys.add(full)
        annotation = hints[f.name]
        child = _dataclass_of(annotation)
        if typing.get_origin(annotation) in (dict, list):
            free.add(full)  # free keys / indices: Hydra and the schema judge what is below
        elif child is not None:
            sub_keys, sub_free = schema_keys(child, f"{full}.")
            keys |= sub_keys
            free |= sub_free
        elif annotation is typing.Any:
            free.add(full)
    return keys, free


def check_override_keys(program: str, argv: list[str], schema: type, groups: set[str]) -> None:
    """Reject a misspelt key (``optimizer.lrr=1``) with a one-line message and a suggestion,
    before Hydra composes anything. Group choices (``anchor=...``), appends (``+key``), deletions
    (``~key``) and ``hydra.*`` keys are left to Hydra."""
    known, free = schema_keys(schema)
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0]
        if key.startswith(("+", "~", "hydra.", "hydra/")) or "@" in key or "/" in key:
            continue
        if key in groups or key in known or any(key.startswith(f"{p}.") for p in free):
            continue
        suggestion = difflib.get_close_matches(key, sorted(known | groups), n=1)
        hint = f" (did you mean '{suggestion[0]}'?)" if suggestion else ""
        print(
            f"{program}: error: unknown config key '{key}'{hint}: check its spelling; "
            f"`{program} --cfg job` prints every key",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(EXIT_USER_ERROR)
