"""Tilt-series alignment and bad-tilt exclusion recover the simulator's ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from tomodask.kernels.fourier import fourier_shift
from tomodask.kernels.tilt_align import (
    TiltSeriesAlignment,
    align_tilt_series,
    apply_alignment,
    gauge_free_shift_error_px,
)
from tomodask.kernels.tilt_exclusion import find_bad_tilts
from tomodask.simulate import simulate_tilt_series

TRUE_AXIS_DEG = 85.0
NOMINAL_AXIS_DEG = 88.0  # 3 degrees off
NOISE_TILT = 30


@pytest.fixture(scope="module")
def series():
    # 256^2 at 6 A/px, 41 tilts; shifts moderate for the field (40 A + 1 A/deg std),
    # a 600 A thick specimen, one dark tilt, one tilt replaced by pure noise.
    ts = simulate_tilt_series(0, shape_yx=(256, 256), pixel_size_angstrom=6.0, tilt_axis_angle_deg=TRUE_AXIS_DEG,
                              shift_std_angstrom=40.0, shift_std_per_deg_angstrom=1.0, thickness_angstrom=600.0,
                              dark_tilt_acquisition_indices=(7,))
    images = ts.images.copy()
    rng = np.random.default_rng(1)
    images[NOISE_TILT] = rng.poisson(images[NOISE_TILT].mean(), images[NOISE_TILT].shape).astype(np.float32)
    result = align_tilt_series(images, ts.nominal_tilt_angles_deg, pixel_size_angstrom=6.0,
                               tilt_axis_angle_deg=NOMINAL_AXIS_DEG)
    return ts, result


def test_tilt_axis_from_3_degrees_off(series):
    _, res = series
    assert abs(res.tilt_axis_angle_deg - TRUE_AXIS_DEG) < 0.5
    assert res.nominal_tilt_axis_angle_deg == NOMINAL_AXIS_DEG


def test_dark_and_failed_tilts_reported(series):
    ts, res = series
    (dark,) = ts.dark_tilt_indices
    assert res.excluded[dark] and res.exclusion_reason[dark] == "dark"
    assert res.excluded[NOISE_TILT] and res.exclusion_reason[NOISE_TILT].startswith("alignment failed")
    assert np.isnan(res.shifts_px[dark]).all()
    assert res.excluded.sum() == 2


def test_shifts_match_truth(series):
    ts, res = series
    use = ~res.excluded
    bin_factor = res.alignment_pixel_size_angstrom / res.pixel_size_angstrom
    # Error after removing a common translation and the rotation-centre height term.
    err = gauge_free_shift_error_px(res.shifts_px, ts.shifts_px, ts.tilt_angles_deg,
                                    tilt_axis_angle_deg=TRUE_AXIS_DEG, use=use) / bin_factor
    # At the alignment pixel size (12 A): typical error well below a pixel, every tilt
    # (the +-60 degree ones included) within 3 px.
    assert np.median(err) < 1.0
    assert err.max() < 3.0
    assert np.isfinite(res.residual_px[use]).all() and np.isnan(res.residual_px[~use]).all()


def test_xf_and_tlt_round_trip(series, tmp_path):
    from tomodask.io.imod import alignment_from_xf, read_tlt, read_xf, write_alignment

    _, res = series
    paths = write_alignment(tmp_path, "TS_01", shifts_px=res.shifts_px, tilt_axis_angle_deg=res.tilt_axis_angle_deg,
                            tilt_angles_deg=res.tilt_angles_deg, tilt_angle_offset_deg=res.tilt_angle_offset_deg,
                            excluded=res.excluded)
    shifts, axis = alignment_from_xf(read_xf(paths["xf"]))
    use = ~res.excluded
    np.testing.assert_allclose(shifts[use], res.shifts_px[use], atol=2e-3)
    np.testing.assert_allclose(axis, res.tilt_axis_angle_deg, atol=1e-4)
    np.testing.assert_allclose(read_tlt(paths["tlt"]), res.tilt_angles_deg, atol=0.006)
    assert paths["exclude"].read_text().strip() == ",".join(str(i + 1) for i in np.flatnonzero(res.excluded))


def test_apply_alignment_undoes_shift_and_rotation():
    rng = np.random.default_rng(0)
    ideal_aligned = np.zeros((96, 96), np.float32)
    ideal_aligned[30:40, 44:52] = 1.0  # a bar, longer along the tilt axis (y)
    ideal_aligned[60:64, 20:30] = 2.0
    axis = 70.0
    shift = np.array([3.25, -5.5])
    # Raw image: the aligned one rotated by +axis about the centre, then displaced.
    rot = apply_alignment(ideal_aligned[None], shifts_px=np.zeros((1, 2)), tilt_axis_angle_deg=-axis, fill="zero")[0]
    raw = fourier_shift(rot, shift) + rng.normal(0, 1e-3, rot.shape).astype(np.float32)
    back = apply_alignment(raw[None], shifts_px=shift[None], tilt_axis_angle_deg=axis, fill="zero")[0]
    inner = (slice(16, 80), slice(16, 80))
    assert np.abs(back[inner] - ideal_aligned[inner]).mean() < 0.02
    with pytest.raises(ValueError, match="fill"):
        apply_alignment(raw[None], shifts_px=shift[None], tilt_axis_angle_deg=axis, fill="nan")


def test_find_bad_tilts_reasons():
    rng = np.random.default_rng(0)
    angles = np.arange(-30.0, 31.0, 6.0)
    level = 100.0 * np.exp(-0.4 / np.cos(np.deg2rad(angles)))
    images = rng.poisson(level[:, None, None] * np.ones((len(angles), 32, 32))).astype(np.float32)
    images[2] *= 0.05  # grid bar
    images[5] = 7.0  # constant: blank
    motion = np.zeros(len(angles))
    motion[7] = 80.0
    ctf = np.full(len(angles), 8.0)
    ctf[8] = np.nan
    reasons = find_bad_tilts(images, tilt_angles_deg=angles, motion_px=motion, ctf_fit_resolution_angstrom=ctf,
                             user_excluded=(9, 2))
    assert reasons[2] == "dark; excluded by user"
    assert reasons[5] == "blank"
    assert reasons[7] == "excessive motion"
    assert reasons[8] == "failed CTF fit"
    assert reasons[9] == "excluded by user"
    assert all(r == "" for i, r in enumerate(reasons) if i not in (2, 5, 7, 8, 9))
    with pytest.raises(ValueError, match="one value per tilt"):
        find_bad_tilts(images, motion_px=motion[:-1])


def test_result_is_frozen(series):
    _, res = series
    assert isinstance(res, TiltSeriesAlignment)
    with pytest.raises(AttributeError):
        res.tilt_axis_angle_deg = 0.0
