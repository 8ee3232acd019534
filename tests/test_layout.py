"""The layout promise: the core knows no experiment, experiments are plug-ins, and imports go one
way (no cycle, no import from a higher layer) in comm_cli/ and scripts/."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from comm_cli.errors import ConfigError, DataError
from comm_cli.evaluation import metrics as M
from tests.helpers import REPO, base_args, build_workspace, cli_env

PACKAGE = REPO / "comm_cli"
CORE = (
    "comm_cli.compose",
    "comm_cli.data",
    "comm_cli.training",
    "comm_cli.evaluation",
    "comm_cli.inference",
    "comm_cli.schema",
)

# Lowest first. A module may import from its own layer or a lower one. Programs (entry points,
# demo drivers) sit on top, whatever package they live in, so an experiment's demo can live in
# its folder and still call the command-line machinery.
LAYERS = (
    ("comm_cli", "comm_cli.errors", "comm_cli.atomic", "comm_cli.registry", "comm_cli.logs"),
    ("comm_cli.losses", "comm_cli.linear_ce", "comm_cli.output_head"),
    ("comm_cli.compose",),
    ("comm_cli.data",),
    ("comm_cli.schema",),
    ("comm_cli.training",),
    ("comm_cli.evaluation",),
    ("comm_cli.inference",),
    ("comm_cli.serving",),
    ("comm_cli.experiments",),
)
PROGRAMS = (
    "comm_cli.cli",
    "comm_cli.train",
    "comm_cli.eval",
    "comm_cli.serve",
    "comm_cli.launch",
    "comm_cli.generate",
    "comm_cli.chat",
    "comm_cli.evaluation.harness_cli",
    "comm_cli.experiments.*.demo",
    "comm_cli.experiments.*.seeds",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    paths = [*PACKAGE.rglob("*.py"), *(REPO / "scripts").rglob("*.py")]
    return {module_name(p): p for p in paths if "conf" not in p.relative_to(REPO).parts}


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every comm_cli / scripts module ``name`` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if name.startswith("scripts.") and f"scripts.{target}" in known:
                target = f"scripts.{target}"  # a script imports its neighbours by bare name
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer_of(name: str) -> int:
    import fnmatch

    top = len(LAYERS)
    if name.startswith("scripts") or any(fnmatch.fnmatch(name, p) for p in PROGRAMS):
        return top + (1 if name.startswith("scripts") else 0)
    best, level = "", None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > len(best):
                best, level = prefix, index
    assert level is not None, f"{name} has no layer in tests/test_layout.py: add it to LAYERS"
    return level


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_no_module_imports_from_a_higher_layer():
    upward = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, targets in import_graph().items()
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    assert not upward, "\n".join(upward)


def test_there_is_no_import_cycle():
    graph = import_graph()
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    # a package's __init__ importing its own submodules (re-exports) is not a cycle of meaning
    real = [c for c in cycles if not all(m.startswith(c[0] + ".") or m == c[0] for m in c)]
    assert not real, f"import cycles: {real}"


def test_the_core_loads_no_experiment_even_transitively():
    """Import every module of the core packages in a fresh interpreter: nothing under
    comm_cli.experiments may end up in sys.modules."""
    import fnmatch

    core = sorted(
        name
        for name in modules()
        if name.startswith(CORE) and not any(fnmatch.fnmatch(name, p) for p in PROGRAMS)
    )
    code = (
        "import importlib, sys\n"
        f"for name in {core!r}: importlib.import_module(name)\n"
        "print([m for m in sys.modules if m.startswith('comm_cli.experiments')])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_synthetic_data_is_found_by_experiment_name_or_module_path():
    from comm_cli.data.build import synthetic_source
    from comm_cli.experiments import load

    load()
    by_name = synthetic_source("kv_arithmetic")
    assert by_name.__name__ == "comm_cli.experiments.kv_arithmetic.data"
    assert synthetic_source("comm_cli.experiments.kv_arithmetic.data") is by_name
    with pytest.raises(ConfigError, match="names no registered experiment"):
        synthetic_source("no_such_experiment")
    with pytest.raises(DataError, match="has no raw_splits"):
        synthetic_source("comm_cli.errors")


def test_an_experiment_brings_its_own_answer_reader():
    read = M.extractor("comm_cli.experiments.kv_arithmetic.tasks:answer")
    assert read("4+7-3=8") == "8"
    with pytest.raises(ConfigError, match="cannot be imported"):
        M.extractor("comm_cli.experiments.kv_arithmetic.tasks:no_such_function")
    with pytest.raises(ConfigError, match="cannot be imported"):
        M.extractor("no_such_module:answer")


# ------------------------------------------------------------------- a third experiment, as a plug-in

PLUGIN = {
    "echo_experiment/__init__.py": "",
    "echo_experiment/plugin.py": """
        from dataclasses import dataclass
        from pathlib import Path

        from comm_cli.registry import Experiment, register


        @dataclass
        class EchoConfig:
            marker: str = "${oc.env:ECHO_MARKER}"
            word: str = "${echo_upper:echo}"


        @dataclass
        class EchoData:
            examples: int = 40


        register(Experiment(
            name="echo", section="echo", section_schema=EchoConfig, data_section="echo", data_schema=EchoData,
            resolvers={"echo_upper": lambda text: text.upper()},
            data="echo_experiment.data", prepare="echo_experiment.setup:prepare",
            config_dir=str(Path(__file__).parent / "conf"),
        ))
    """,
    "echo_experiment/data.py": """
        import datasets


        def rows(cfg, n):
            return [{"prompt": f"{i}:", "completion": f"{cfg.echo.word} {i}"} for i in range(n)]


        def raw_splits(data_cfg, cfg, seed=0):
            return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(cfg, data_cfg.echo.examples))})


        def eval_rows(data_cfg, cfg, seed=0):
            return datasets.Dataset.from_list(rows(cfg, 8))
    """,
    "echo_experiment/setup.py": """
        from pathlib import Path


        def prepare(cfg):
            if getattr(cfg, "echo", None) is not None:
                Path(cfg.echo.marker).write_text(cfg.echo.word)
    """,
    "echo_experiment/conf/experiment/echo.yaml": """
        # @package _global_
        # A throwaway experiment: comm-train experiment=echo
        experiment: echo
        name: echo
        data:
          synthetic: echo
          format: prompt_completion
          data_files: null
          validation_fraction: 0.0
          echo: {examples: 32}
        echo: {}
    """,
}


def test_a_third_experiment_plugs_in_from_its_own_package(tmp_path):
    """An experiment from a package outside comm (found through COMM_EXPERIMENTS) brings its
    config sections (typed: a misspelt key is rejected), a resolver, its data generator, a
    preparation step and its own configs; comm-train runs it and no core file names it."""
    for relative, text in PLUGIN.items():
        path = tmp_path / "plugins" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    ws = build_workspace(tmp_path / "ws")
    env = cli_env()
    env["PYTHONPATH"] = f"{tmp_path / 'plugins'}:{env['PYTHONPATH']}"
    env["COMM_EXPERIMENTS"] = "echo_experiment.plugin"
    env["ECHO_MARKER"] = str(tmp_path / "prepared.txt")
    args = [a for a in base_args(ws, tmp_path / "runs", "echo") if not a.startswith(("data", "name="))]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "comm_cli.train",
            "experiment=echo",
            "name=echo",
            *args,
            "trainer.eval_every=null",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "prepared.txt").read_text() == "ECHO"
    run_dir = tmp_path / "runs" / "echo"
    saved = (run_dir / "run_config.yaml").read_text()
    assert "experiment: echo" in saved and "word: ECHO" in saved
    assert (run_dir / "composition" / "composition_model.safetensors").is_file()
    assert json.loads((run_dir / "train_summary.json").read_text())["steps"] == 12

    misspelt = subprocess.run(
        [sys.executable, "-m", "comm_cli.train", "experiment=echo", *args, "echo.wrd=x"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert misspelt.returncode == 2 and "echo.wrd" in misspelt.stderr
    core = [p for p in PACKAGE.rglob("*") if p.is_file() and p.suffix in (".py", ".yaml")]
    assert not any("echo_experiment" in p.read_text() for p in core)
