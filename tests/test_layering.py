"""The algorithm modules stay below the experiment layer.

They take tensors and modules and return them: no pandas, no caches, and nothing from
``lib.experiments`` (which builds on them, not the other way round). Checked on the source
with ``ast``, so a forbidden import fails here even inside a function or an ``if``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALGORITHM_FILES = sorted(
    [*REPO.glob("lib/merging/*.py"), *REPO.glob("lib/data/*.py"), *REPO.glob("lib/paper/*.py")]
    + [REPO / "lib" / f for f in ("statistics.py", "fs_merge.py", "permutation.py", "archs.py", "models.py",
                                  "functional.py", "metrics.py")]
)


def imported_modules(source: str, module: str) -> list[str]:
    """Every module a source file imports, as absolute dotted names; ``module`` is the
    file's own dotted name (relative imports are resolved against it). ``from x import y``
    yields both ``x`` and ``x.y`` (``y`` may be a submodule)."""
    package = module.split(".")[:-1]  # relative imports start at the file's package
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.append(name)
            found += [f"{name}.{alias.name}" for alias in node.names]
    return found


def forbidden(name: str) -> str | None:
    """Why an import is not allowed in an algorithm module, or None."""
    parts = name.split(".")
    if parts[0] == "pandas":
        return "pandas"
    if parts[:2] == ["lib", "experiments"]:
        return "lib.experiments"
    if "cache" in parts:
        return "a cache module"
    return None


def _dotted(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


@pytest.mark.parametrize("path", ALGORITHM_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_algorithm_modules_import_no_pandas_cache_or_experiments(path):
    assert path.exists(), path
    bad = [(name, why) for name in imported_modules(path.read_text(), _dotted(path)) if (why := forbidden(name))]
    assert not bad, f"{path.relative_to(REPO)} imports {bad}: algorithm modules take and return tensors"


@pytest.mark.parametrize("line, module", [
    ("import pandas as pd", "lib.metrics"),
    ("from pandas import DataFrame", "lib.metrics"),
    ("from lib.experiments.report import Run", "lib.metrics"),
    ("from .experiments import cache", "lib.metrics"),
    ("from ..experiments.config import X", "lib.merging.ties"),
    ("from .. import experiments", "lib.merging.ties"),
    ("from .cache import cached", "lib.data.text"),
    ("def f():\n    import lib.experiments.cache", "lib.models"),
])
def test_the_check_sees_every_form_of_a_forbidden_import(line, module):
    assert any(forbidden(name) for name in imported_modules(line, module)), line


@pytest.mark.parametrize("line, module", [
    ("import torch", "lib.metrics"),
    ("from ._common import buffer_keys", "lib.merging.ties"),
    ("from ..functional import eval_mode", "lib.merging.ties"),
    ("from .splits import split", "lib.data.text"),
])
def test_the_check_allows_ordinary_imports(line, module):
    assert not any(forbidden(name) for name in imported_modules(line, module)), line
