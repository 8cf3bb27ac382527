"""Helpers for session tests: simulated microscope folders and the settings that match them."""

from __future__ import annotations

import json
from pathlib import Path

from tomodask.demo import settings_for_simulation

#: A small but complete acquisition: 16 tilts of 384 px, 6 frames each, recorded axis 2 degrees off.
SESSION_SPEC = dict(tilt_step_deg=8.0, recorded_tilt_axis_error_deg=2.0, dark_tilts=(13,))


def spec_fields() -> dict:
    """AcquisitionSpec overrides shared by simulator and settings in these tests."""
    return {k: v for k, v in SESSION_SPEC.items() if k != "dark_tilts"}


def make_settings(location: Path, name: str, method: str):
    """Settings matching :data:`SESSION_SPEC`."""
    return settings_for_simulation(location, size="tiny", name=name, transfer_method=method, **spec_fields())


def truth_of(location: Path, tilt_series: str) -> dict:
    """The simulator's ground truth of one tilt-series."""
    return json.loads((location / "truth" / f"{tilt_series}.json").read_text())


