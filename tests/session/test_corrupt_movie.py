"""A corrupt movie fails that movie, not the session."""

from __future__ import annotations

import pytest
from sim_helpers import make_settings, spec_fields

from tomodask.session.api import create_session
from tomodask.simulate.writer import write_session

pytestmark = pytest.mark.slow


def test_truncated_movie_fails_alone(tmp_path, data_root):
    microscope = tmp_path / "microscope"
    write_session(microscope, n_tilt_series=1, size="tiny", **spec_fields())
    bad = microscope / "TS_01_005_20.0.tif"
    bad.write_bytes(bad.read_bytes()[:5000])  # truncated by a failed write on the microscope PC
    session = create_session(make_settings(microscope, "corrupt", "copy"), data_root=data_root)
    ok = session.run(expected_tilt_series=1, timeout_s=600)
    assert not ok  # something failed, so a script running `tomodask session run` sees it
    movies = session.movies().set_index("name")
    assert movies.loc["TS_01_005_20.0", "state"] == "failed"
    assert "TS_01_005_20.0.tif" in movies.loc["TS_01_005_20.0", "error"]
    assert "truncated or still being written" in movies.loc["TS_01_005_20.0", "error"]
    assert (movies.drop(index="TS_01_005_20.0").state == "done").all()
    ts = session.tilt_series().set_index("name").loc["TS_01"]
    assert ts.state == "done" and ts.flagged and "1 movie(s) failed" in ts.flag_reason
    assert session.tilt_series_metrics("TS_01")["n_tilts"] == 15
    assert any("FAILED" in line and "TS_01_005_20.0" in line for line in session.logs("preprocess"))
