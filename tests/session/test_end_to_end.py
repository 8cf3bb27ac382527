"""A simulated microscope streams two tilt-series while a session transfers and processes them."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from sim_helpers import SESSION_SPEC, make_settings, spec_fields, truth_of

from tomodask.kernels.picking_metrics import match_picks
from tomodask.kernels.tilt_align import gauge_free_shift_error_px
from tomodask.session.api import create_session
from tomodask.simulate.writer import write_session

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("method", "n_tilt_series"), [("move", 2), ("copy", 1), ("link", 1)])
def test_stream_transfer_and_process(tmp_path, data_root, method, n_tilt_series):
    microscope = tmp_path / "microscope"
    microscope.mkdir()
    session = create_session(make_settings(microscope, f"e2e-{method}", method), data_root=data_root)
    writer = threading.Thread(target=write_session, args=(microscope,), daemon=True, kwargs=dict(
        n_tilt_series=n_tilt_series, size="tiny", seconds_per_tilt=0.05, dark_tilts=SESSION_SPEC["dark_tilts"], **spec_fields()))
    writer.start()
    ok = session.run(expected_tilt_series=n_tilt_series, timeout_s=900)
    writer.join(timeout=60)
    logs = "\n".join(session.logs())
    assert ok, logs

    movies = session.movies()
    names = [f"TS_{k + 1:02d}" for k in range(n_tilt_series)]
    assert len(movies) == 16 * n_tilt_series and set(movies.state) == {"done"}
    series = session.tilt_series()
    assert sorted(series.name) == names and set(series.state) == {"done"}
    assert set(series.complete_reason) == {"all tilts arrived"}

    # sources: moved away, copied, or linked
    sources = sorted(microscope.glob("TS_*.tif"))
    raw = sorted(session.layout.raw_dir.glob("TS_*.tif"))
    assert len(raw) == 16 * n_tilt_series
    assert len(sources) == (0 if method == "move" else 16 * n_tilt_series)
    assert all(p.is_symlink() for p in raw) == (method == "link")

    # ground truth recovered within the kernels' tolerances
    for ts in names:
        truth = truth_of(microscope, ts)
        m = session.tilt_series_metrics(ts)
        assert abs(m["tilt_axis_angle_deg"] - truth["spec"]["tilt_axis_angle_deg"]) < 0.5
        # gold on the surfaces: the volume is centred on the specimen without a warning or a flag
        assert m["centring_warning"] == "" and m["specimen_z_uncertainty_angstrom"] == 0.0
        assert m["alignment_warning"] == ""
        assert not series.set_index("name").loc[ts, "flagged"]
        by_movie = {t["movie"].rsplit(".", 1)[0]: t for t in truth["tilts"]}
        excluded = {mv for mv, e in zip(m["movies"], m["excluded"]) if e}
        dark = {mv for mv, t in by_movie.items() if t["dark"]}
        assert dark <= excluded
        # per-tilt shifts against the truth at the alignment pixel size, within the alignment
        # kernel's tolerance (tests/kernels/test_tilt_align.py): the common translation and the
        # rotation-centre height term are left out, as projections cannot fix them
        used = np.array([not e for e in m["excluded"]])
        true_shifts = np.array([by_movie[mv]["shift_yx_px"] for mv in m["movies"]])
        true_angles = np.array([by_movie[mv]["tilt_angle_deg"] for mv in m["movies"]])
        scale = truth["spec"]["pixel_size_angstrom"] / m["alignment_pixel_size_angstrom"]
        err = gauge_free_shift_error_px(np.array(m["shifts_px"]) * scale, true_shifts * scale, true_angles,
                                        tilt_axis_angle_deg=truth["spec"]["tilt_axis_angle_deg"], use=used)
        assert np.median(err) < 1.0 and err.max() < 3.0, err
        assert used.sum() >= len(used) - 3  # the dark tilt and at most two others left out
        mv = movies[movies.tilt_series == ts].set_index("name")
        defocus_err = [abs(mv.loc[n, "defocus_angstrom"] - 0.5 * (t["defocus_u_angstrom"] + t["defocus_v_angstrom"]))
                       for n, t in by_movie.items() if not t["dark"] and abs(t["tilt_angle_deg"]) <= 30]
        assert np.median(defocus_err) <= 500.0
        # the series-level CTF (low tilts give the astigmatism, the others are refitted with it):
        # every tilt that phase flipping uses in the right basin, the median as good as per tilt
        series_err = np.array([abs(0.5 * (u + v) - 0.5 * (by_movie[mv]["defocus_u_angstrom"]
                                                         + by_movie[mv]["defocus_v_angstrom"]))
                               for mv, u, v in zip(m["movies"], m["ctf_defocus_u_angstrom"], m["ctf_defocus_v_angstrom"])
                               if not by_movie[mv]["dark"]])
        assert np.median(series_err) <= 500.0 and series_err.max() < 5000.0, series_err
        assert sum(m["ctf_reference_tilt"]) >= 3 and not any(r and f for r, f in zip(m["ctf_reference_tilt"],
                                                                                     m["ctf_refitted"]))
        picks = match_picks(np.array(m["picks_xyz_angstrom"]).reshape(-1, 3),
                            np.array(truth["phantom"]["particle_centers_xyz_angstrom"]),
                            max_distance=truth["spec"]["particle_radius_angstrom"])
        assert picks.f1 >= 0.6, picks  # 16 tilts of 384 px; the picking kernel's 0.9 is for 41 tilts
        assert session.tilt_series_array(ts, "thumbnail_picks_rgb").shape[-1] == 3
        tomo = session.tomogram(ts)
        assert tomo.ndim == 3 and np.isfinite(tomo[tomo.shape[0] // 2].compute()).all()
        assert session.movie_array(m["movies"][0], "aligned_sum").shape == (384, 384)
