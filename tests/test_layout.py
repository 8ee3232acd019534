"""The layout promise: the core packages know no experiment; experiments are found from the config."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from comm_cli.data.build import synthetic_source
from comm_cli.errors import ConfigError, DataError
from comm_cli.evaluation import metrics as M

PACKAGE = Path(__file__).resolve().parents[1] / "comm_cli"
CORE = ("compose", "data", "training", "evaluation")


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("package", CORE)
def test_core_packages_never_import_an_experiment(package):
    for path in sorted((PACKAGE / package).rglob("*.py")):
        offending = sorted(m for m in _imported_modules(path) if m.startswith("comm_cli.experiments"))
        assert not offending, f"{path.relative_to(PACKAGE)} imports {offending}"


def test_synthetic_data_is_found_by_experiment_name_or_module_path():
    by_name = synthetic_source("kv_arithmetic")
    assert by_name.__name__ == "comm_cli.experiments.kv_arithmetic.data"
    assert synthetic_source("comm_cli.experiments.kv_arithmetic.data") is by_name
    with pytest.raises(DataError, match="names no experiment package"):
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
