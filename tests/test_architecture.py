"""Imports point one way (DESIGN.md): kernels and io know nothing of Dask, sessions or Panel."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tomodask"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_import_only_backend_and_kernels(path):
    ours = {m for m in _imports(path) if m.startswith("tomodask")}
    bad = {m for m in ours if not (m == "tomodask.backend" or m.startswith("tomodask.kernels"))}
    assert not bad, f"{path.name} imports {sorted(bad)}"
    assert not {m for m in _imports(path) if m.split(".")[0] in ("dask", "distributed", "zarr", "panel", "cupy")}


@pytest.mark.parametrize("path", sorted((PACKAGE / "io").glob("*.py")), ids=lambda p: p.name)
def test_io_knows_nothing_of_dask_or_sessions(path):
    mods = _imports(path)
    assert not {m for m in mods if m.split(".")[0] in ("distributed", "panel")}
    assert not {m for m in mods if m.startswith(("tomodask.session", "tomodask.tasks", "tomodask.cluster"))}


def test_no_panel_in_the_library():
    offenders = [p.name for p in PACKAGE.rglob("*.py") if any(m.split(".")[0] in ("panel", "bokeh")
                                                              for m in _imports(p))]
    assert offenders == []
