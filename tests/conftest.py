"""Shared fixtures: paths to the real reference files and small simulated sessions."""

from __future__ import annotations

from pathlib import Path

import pytest

#: Real SerialEM / IMOD / RELION / AreTomo files beside the checkout (never copied in).
REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The real reference files; tests using it skip cleanly when the folder is absent."""
    if not REALDATA.is_dir():
        pytest.skip(f"real reference files not found at {REALDATA}")
    return REALDATA


@pytest.fixture(scope="session")
def tiny_session_dir(tmp_path_factory) -> Path:
    """A simulated microscope folder with one tiny tilt-series (read-only for tests)."""
    from tomodask.simulate.writer import write_session

    out = tmp_path_factory.mktemp("microscope")
    write_session(out, n_tilt_series=1, size="tiny", seed=3, dark_tilts=(17,))
    return out


@pytest.fixture(autouse=True, scope="session")
def _free_dashboard_port():
    """Clusters started by tests pick a free dashboard port (several may run at once)."""
    import os

    import dask.config

    os.environ.setdefault("DASK_TOMODASK__CLUSTER__PROFILES__LOCAL__DASHBOARD_ADDRESS", ":0")
    with dask.config.set({"tomodask.cluster.profiles.local.dashboard-address": ":0"}):
        yield
