"""Fixtures for session tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def data_root(tmp_path, monkeypatch) -> Path:
    """An empty data root, also exported as TOMODASK_DATA_ROOT."""
    root = tmp_path / "data-root"
    monkeypatch.setenv("TOMODASK_DATA_ROOT", str(root))
    return root
