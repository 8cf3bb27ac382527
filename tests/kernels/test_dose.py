"""Exposure weighting: weights sum to one per frequency, the filter matches the critical exposure."""

from __future__ import annotations

import numpy as np
import pytest

from tomodask.kernels.dose import (
    dose_weight_frames,
    dose_weights,
    exposure_filter,
    frame_exposures_e_per_angstrom2,
)
from tomodask.kernels.fourier import critical_exposure_e_per_angstrom2, frequency_grid


@pytest.mark.parametrize("pre_exposure", [0.0, 60.0, 400.0])
def test_weights_sum_to_one_per_frequency(pre_exposure):
    w = dose_weights((96, 80), 12, pixel_size_angstrom=1.5, dose_per_frame_e_per_angstrom2=2.0,
                     pre_exposure_e_per_angstrom2=pre_exposure)
    assert w.shape == (12, 96, 41) and w.dtype == np.float32
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-5)
    assert np.all(w >= 0)
    np.testing.assert_allclose(w[:, 0, 0], 1.0 / 12, atol=1e-6)  # DC: every frame keeps its signal
    # at Nyquist (1/3 Å^-1) early frames count more, monotonically
    assert np.all(np.diff(w[:, 48, 0]) < 0)
    assert w[0, 48, 0] > 5 * w[-1, 48, 0]


def test_weights_are_the_normalised_exposure_filter():
    shape, n, d = (64, 64), 8, 1.5
    w = dose_weights(shape, n, pixel_size_angstrom=2.0, dose_per_frame_e_per_angstrom2=d,
                     pre_exposure_e_per_angstrom2=9)
    q = exposure_filter(shape, frame_exposures_e_per_angstrom2(n, dose_per_frame_e_per_angstrom2=d,
                                                                pre_exposure_e_per_angstrom2=9),
                        pixel_size_angstrom=2.0)
    np.testing.assert_allclose(w, q / q.sum(axis=0), rtol=1e-4, atol=1e-7)
    # a chunk of frames gets the same weights as in the whole set
    np.testing.assert_allclose(dose_weights(shape, n, pixel_size_angstrom=2.0, dose_per_frame_e_per_angstrom2=d,
                                            frames=[2, 5]), w[[2, 5]], rtol=1e-5, atol=1e-8)


def test_exposure_filter_is_one_over_root_e_at_the_critical_exposure():
    shape, px = (128, 128), 1.2
    fy, fx = frequency_grid(shape)
    k = np.sqrt(fy**2 + fx**2) / px
    iy, ix = 20, 7
    crit = float(critical_exposure_e_per_angstrom2(k[iy, ix]))
    f = exposure_filter(shape, crit, pixel_size_angstrom=px)
    assert f.shape == (128, 65)
    assert f[iy, ix] == pytest.approx(np.exp(-0.5), rel=1e-4)
    assert f[0, 0] == pytest.approx(1.0, abs=1e-5)
    stack = exposure_filter(shape, [0.0, crit, 2 * crit], pixel_size_angstrom=px)
    assert stack.shape == (3, 128, 65)
    np.testing.assert_allclose(stack[:, iy, ix], np.exp([-0.0, -0.5, -1.0]), rtol=1e-4)
    f200 = exposure_filter(shape, crit, pixel_size_angstrom=px, voltage_kv=200)
    assert f200[iy, ix] < f[iy, ix]  # damage is faster at 200 kV


def test_dose_weighted_sum_of_identical_frames_is_their_sum():
    rng = np.random.default_rng(0)
    frame = rng.normal(5.0, 1.0, size=(48, 40)).astype(np.float32)
    out = dose_weight_frames(np.broadcast_to(frame, (6, 48, 40)), pixel_size_angstrom=1.0,
                             dose_per_frame_e_per_angstrom2=3.0)
    np.testing.assert_allclose(out, 6 * frame, rtol=1e-4, atol=1e-3)


def test_dose_weighting_keeps_low_and_damps_late_high_frequencies():
    rng = np.random.default_rng(1)
    frames = np.zeros((10, 64, 64), np.float32)
    frames[-1] = rng.normal(0.0, 1.0, size=(64, 64))  # only the most exposed frame holds anything
    dw = dose_weight_frames(frames, pixel_size_angstrom=1.0, dose_per_frame_e_per_angstrom2=5.0)
    ratio = np.abs(np.fft.rfft2(dw)) / np.abs(np.fft.rfft2(frames[-1]))
    w = dose_weights((64, 64), 10, pixel_size_angstrom=1.0, dose_per_frame_e_per_angstrom2=5.0)
    np.testing.assert_allclose(ratio, 10 * w[-1], rtol=1e-3, atol=1e-5)
    assert ratio[1, 0] > 0.9  # 1/64 Å: kept
    assert ratio[32, 0] < 0.01  # Nyquist, 1/2 Å: the last frame's damaged signal is weighted out


def test_invalid_exposures_raise():
    with pytest.raises(ValueError, match="must be >= 0"):
        dose_weights((8, 8), 3, pixel_size_angstrom=1.0, dose_per_frame_e_per_angstrom2=-1.0)
    with pytest.raises(ValueError, match="finite"):
        exposure_filter((8, 8), float("nan"), pixel_size_angstrom=1.0)
    with pytest.raises(ValueError, match="pixel_size_angstrom"):
        exposure_filter((8, 8), 1.0, pixel_size_angstrom=0.0)
    with pytest.raises(ValueError, match=r"\(t, y, x\)"):
        dose_weight_frames(np.zeros((8, 8)), pixel_size_angstrom=1.0, dose_per_frame_e_per_angstrom2=1.0)
