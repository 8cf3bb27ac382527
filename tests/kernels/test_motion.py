"""Frame alignment recovers known drift and local motion on simulated movies (numpy)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from tomodask.kernels.fourier import fourier_shift
from tomodask.kernels.gain import apply_gain, find_defect_pixels, replace_defect_pixels
from tomodask.kernels.motion import QUALITIES, FrameAlignment, align_frames, motion_metrics
from tomodask.simulate import simulate_single_tilt


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((np.asarray(a) - np.asarray(b)) ** 2).sum(axis=-1).mean()))


def _corrected(tilt) -> np.ndarray:
    frames = apply_gain(tilt.frames, tilt.gain)
    return replace_defect_pixels(frames, find_defect_pixels(frames))


@pytest.mark.parametrize(
    "case",
    [
        dict(seed=0, tilt_angle_deg=0.0, dose_e_per_angstrom2=3.0, drift_total_px=6.0),
        dict(seed=1, tilt_angle_deg=45.0, dose_e_per_angstrom2=3.0, drift_total_px=8.0),
        dict(seed=2, tilt_angle_deg=-60.0, dose_e_per_angstrom2=3.0, drift_total_px=5.0),
    ],
    ids=["0deg", "45deg", "-60deg"],
)
def test_drift_of_simulated_tilt_movies_is_recovered(case):
    # 10 frames of 0.25-0.45 e-/px each at 1.5 Å/px (less at high tilt: thicker ice), raw counts with gain and
    # defects, gain-corrected and defects replaced as the movie task does
    tilt = simulate_single_tilt(shape_yx=(512, 512), n_frames=10, **case)
    frames = _corrected(tilt)
    assert 0.25 < frames.mean() < 0.45
    al = align_frames(frames, pixel_size_angstrom=1.5, dose_per_frame_e_per_angstrom2=case["dose_e_per_angstrom2"] / 10,
                      patches_yx=(5, 5))
    assert isinstance(al, FrameAlignment)
    truth = tilt.truth.frame_shifts_px
    assert al.shifts_px.shape == (10, 2)
    np.testing.assert_allclose(al.shifts_px.mean(axis=0), 0.0, atol=1e-9)
    err = _rmse(al.shifts_px, truth)
    assert err <= 0.3, f"frame-shift RMS error {err:.3f} px"
    assert al.quality == "good" and al.quality_reason == ""
    assert al.converged and al.cc_peak_snr > 8
    assert not al.local_motion_applied  # the simulator has global drift only
    # 5 x 5 patches asked for; on 512² frames patches of at least MIN_PATCH_PX (192) px leave a 4 x 4 grid
    assert al.extra["patch_grid_yx"] == (4, 4)
    np.testing.assert_allclose(al.local_shifts_px, np.broadcast_to(al.shifts_px[:, None, None], (10, 4, 4, 2)))
    assert al.patch_shifts_px.shape == (10, 4, 4, 2) and al.patch_centers_yx_px.shape == (4, 4, 2)
    # motion metrics describe the true path
    true_total, _, _ = motion_metrics(truth)
    assert al.total_motion_px == pytest.approx(true_total, rel=0.15)
    assert al.early_motion_px + al.late_motion_px == pytest.approx(al.total_motion_px)
    # the aligned sum is the noiseless image plus Poisson noise; the unaligned sum is blurred on top
    crop = (slice(16, -16), slice(16, -16))
    aligned_err = np.mean((al.aligned_sum - tilt.noiseless)[crop] ** 2)
    unaligned_err = np.mean((frames.sum(axis=0) - tilt.noiseless)[crop] ** 2)
    noise = np.mean((tilt.noiseless * tilt.gain)[crop])  # variance of gain-corrected Poisson counts
    assert aligned_err < 1.02 * noise and unaligned_err > 1.03 * noise
    np.testing.assert_allclose(al.even_sum + al.odd_sum, al.aligned_sum, atol=1e-3)
    assert al.even_sum.mean() == pytest.approx(frames[0::2].sum(axis=0).mean(), rel=1e-3)
    assert al.dose_weighted_sum.mean() == pytest.approx(al.aligned_sum.mean(), rel=1e-3)


def test_shift_sign_and_sub_pixel_accuracy_on_a_noiseless_texture():
    rng = np.random.default_rng(5)
    ideal = ndimage.gaussian_filter(rng.normal(size=(256, 256)), 2.0).astype(np.float32) + 5.0
    known = np.array([[-3.2, 1.7], [-1.1, 0.6], [0.4, -0.2], [1.3, -0.9], [2.6, -1.2]])
    frames = fourier_shift(np.broadcast_to(ideal, (5, 256, 256)), known.astype(np.float32))  # content moved by known
    al = align_frames(frames, pixel_size_angstrom=2.0, dose_per_frame_e_per_angstrom2=1.0, patches_yx=None)
    np.testing.assert_allclose(al.shifts_px, known - known.mean(axis=0), atol=0.02)
    assert al.local_shifts_px is None and al.patch_shifts_px is None
    # frames moved back onto the mean position add up to 5 x the ideal image moved by the mean shift
    expected = 5 * fourier_shift(ideal, known.mean(axis=0))
    np.testing.assert_allclose(al.aligned_sum[8:-8, 8:-8], expected[8:-8, 8:-8], atol=0.05)


def test_dose_weighted_sum_is_the_weighted_sum_of_the_moved_frames():
    # the kernel accumulates sum_i w_i(k) F_i(k) by Horner's scheme (w_i = w_0 r^i); compare with the explicit sum
    from tomodask.kernels.dose import dose_weights

    rng = np.random.default_rng(7)
    frames = rng.poisson(2.0, size=(7, 96, 80)).astype(np.float32)
    al = align_frames(frames, pixel_size_angstrom=1.0, dose_per_frame_e_per_angstrom2=4.0,
                      pre_exposure_e_per_angstrom2=10.0, patches_yx=None)
    w = dose_weights((96, 80), 7, pixel_size_angstrom=1.0, dose_per_frame_e_per_angstrom2=4.0,
                     pre_exposure_e_per_angstrom2=10.0)
    fy = np.fft.fftfreq(96)[:, None]
    fx = np.fft.rfftfreq(80)[None, :]
    s = al.shifts_px
    ramp = np.exp(2j * np.pi * (fy * s[:, 0, None, None] + fx * s[:, 1, None, None]))  # frame i -> frame_i(r + s_i)
    expected = np.fft.irfft2((7 * w * np.fft.rfft2(frames) * ramp).sum(axis=0), s=(96, 80))
    np.testing.assert_allclose(al.dose_weighted_sum, expected, atol=2e-4 * np.abs(expected).max())
    plain = np.fft.irfft2((np.fft.rfft2(frames) * ramp).sum(axis=0), s=(96, 80))
    np.testing.assert_allclose(al.aligned_sum, plain, atol=2e-4 * np.abs(plain).max())


def _local_motion_movie(seed: int, amplitude_px: float, dose: float):
    """Movie whose content follows global drift plus a smooth field reaching ``amplitude_px`` in the corners."""
    tilt = simulate_single_tilt(seed=seed, shape_yx=(384, 384), n_frames=10, dose_e_per_angstrom2=dose,
                                drift_total_px=5.0, n_particles=10, n_dead_pixels=0, n_hot_pixels=0,
                                gain_variation=0.0)
    n, pad = 384, 16
    base = np.pad(tilt.noiseless / 10, pad, mode="reflect")
    yy, xx = np.mgrid[0:n, 0:n].astype(float)
    yn, xn = (yy - (n - 1) / 2) / ((n - 1) / 2), (xx - (n - 1) / 2) / ((n - 1) / 2)
    tau = np.linspace(0, 1, 10) ** 1.5
    tau -= tau.mean()
    field = np.stack([0.5 * xn + 0.3 * yn * yn, -0.5 * yn + 0.3 * xn * yn], axis=-1) * amplitude_px
    disp = tilt.truth.frame_shifts_px[:, None, None, :] + tau[:, None, None, None] * field[None]
    rng = np.random.default_rng(seed)
    frames = np.stack([rng.poisson(np.clip(ndimage.map_coordinates(
        base, [yy - d[..., 0] + pad, xx - d[..., 1] + pad], order=3, mode="reflect"), 0, None)) for d in disp])
    return frames.astype(np.float32), disp, tilt


def _patch_centre_errors(al: FrameAlignment, disp: np.ndarray) -> tuple[float, float]:
    """RMS error at the patch centres of the local shifts and of the global drift alone."""
    c = np.rint(al.patch_centers_yx_px).astype(int)
    truth = disp[:, c[..., 0], c[..., 1], :]
    truth = truth - truth.mean(axis=0)
    return _rmse(al.local_shifts_px, truth), _rmse(al.shifts_px[:, None, None, :], truth)


def _sum_mse(al: FrameAlignment, tilt) -> float:
    crop = (slice(24, -24), slice(24, -24))
    return float(np.mean((al.aligned_sum - tilt.noiseless)[crop] ** 2))


def test_local_motion_is_fitted_and_applied():
    frames, disp, tilt = _local_motion_movie(seed=3, amplitude_px=4.0, dose=10.0)
    local = align_frames(frames, pixel_size_angstrom=1.5, dose_per_frame_e_per_angstrom2=1.0, patches_yx=(4, 4))
    glob = align_frames(frames, pixel_size_angstrom=1.5, dose_per_frame_e_per_angstrom2=1.0, patches_yx=None)
    assert local.local_motion_applied
    err_local, err_global = _patch_centre_errors(local, disp)
    assert err_local < 0.3 < err_global, (err_local, err_global)
    assert _sum_mse(local, tilt) < _sum_mse(glob, tilt)  # the tiled local correction gives a sharper sum than drift alone


def test_adaptive_patch_grid_recovers_local_motion():
    # 5 x 5 patches asked for on 384² frames would be ~115 px; patches of at least 192 px leave a 3 x 3 grid,
    # which still recovers 3 px of local motion (patch-centre RMS error 0.145 px; 5 x 5 gave 0.180 px)
    frames, disp, tilt = _local_motion_movie(seed=5, amplitude_px=3.0, dose=10.0)
    al = align_frames(frames, pixel_size_angstrom=1.5, dose_per_frame_e_per_angstrom2=1.0)
    glob = align_frames(frames, pixel_size_angstrom=1.5, dose_per_frame_e_per_angstrom2=1.0, patches_yx=None)
    assert al.extra["patch_grid_yx"] == (3, 3) and al.local_shifts_px.shape == (10, 3, 3, 2)
    assert al.local_motion_applied
    err_local, err_global = _patch_centre_errors(al, disp)
    assert err_local < 0.2 and err_local < 0.6 * err_global, (err_local, err_global)
    assert _sum_mse(al, tilt) < _sum_mse(glob, tilt)


def test_patch_grid_follows_the_smallest_patch_size():
    frames = np.random.default_rng(2).poisson(2.0, size=(4, 96, 400)).astype(np.float32)
    kw = dict(pixel_size_angstrom=1.0, dose_per_frame_e_per_angstrom2=2.0)
    # patches are 1.5 grid spacings: y 96 * 1.5 / 64 -> 2 patches, x 400 * 1.5 / 64 -> 9, capped at 5
    al = align_frames(frames, min_patch_px=64, **kw)
    assert al.extra["patch_grid_yx"] == (2, 5) and al.patch_shifts_px.shape == (4, 2, 5, 2)
    assert align_frames(frames, patches_yx=(3, 3), min_patch_px=64, **kw).extra["patch_grid_yx"] == (2, 3)
    # 96² frames hold a single patch of the default 192 px: no local motion is measured
    al = align_frames(frames[:, :, :96], **kw)
    assert al.extra["patch_grid_yx"] is None and al.local_shifts_px is None and al.patch_centers_yx_px is None
    with pytest.raises(ValueError, match="min_patch_px"):
        align_frames(frames, min_patch_px=0, **kw)


def test_no_local_motion_is_applied_to_noise():
    frames, _, _ = _local_motion_movie(seed=4, amplitude_px=0.0, dose=3.0)
    al = align_frames(frames, pixel_size_angstrom=1.5, dose_per_frame_e_per_angstrom2=0.3, patches_yx=(5, 5))
    assert not al.local_motion_applied and al.extra["local_f_statistic"] < 2.0


def test_quality_flags():
    rng = np.random.default_rng(0)
    noise = rng.poisson(0.5, size=(10, 256, 256)).astype(np.float32)
    al = align_frames(noise, pixel_size_angstrom=1.5, dose_per_frame_e_per_angstrom2=0.3, patches_yx=None)
    assert al.quality == "failed" and "no alignment signal" in al.quality_reason
    assert al.quality in QUALITIES
    ideal = ndimage.gaussian_filter(rng.normal(size=(128, 128)), 1.5).astype(np.float32) + 3.0
    path = np.cumsum(np.full((8, 2), 4.0), axis=0)
    frames = fourier_shift(np.broadcast_to(ideal, (8, 128, 128)), path.astype(np.float32))
    al = align_frames(frames, pixel_size_angstrom=2.0, dose_per_frame_e_per_angstrom2=1.0, patches_yx=None,
                      max_total_motion_angstrom=50.0)
    assert al.total_motion_px == pytest.approx(7 * 4 * np.sqrt(2), rel=0.02)
    assert al.quality == "high_motion" and "total motion" in al.quality_reason


def test_single_frame_movie_passes_through():
    frame = np.random.default_rng(1).poisson(3.0, size=(1, 64, 64)).astype(np.float32)
    al = align_frames(frame, pixel_size_angstrom=1.0, dose_per_frame_e_per_angstrom2=3.0)
    np.testing.assert_allclose(al.aligned_sum, frame[0], atol=1e-4)
    np.testing.assert_allclose(al.dose_weighted_sum, frame[0], atol=1e-4)
    assert al.shifts_px.tolist() == [[0.0, 0.0]] and al.total_motion_px == 0.0


def test_motion_metrics():
    path = np.array([[0, 0], [3, 4], [3, 4], [6, 8], [6, 9]], dtype=float)
    assert motion_metrics(path) == (pytest.approx(11.0), pytest.approx(5.0), pytest.approx(6.0))
    assert motion_metrics(path, early_frames=4) == (pytest.approx(11.0), pytest.approx(10.0), pytest.approx(1.0))


def test_corrupt_input_raises_a_clear_error():
    frames = np.ones((4, 64, 64), np.float32)
    frames[1, 3, 3] = np.nan
    with pytest.raises(ValueError, match="1 NaN or infinite values"):
        align_frames(frames, pixel_size_angstrom=1.0, dose_per_frame_e_per_angstrom2=1.0)
    with pytest.raises(ValueError, match=r"\(t, y, x\) stack"):
        align_frames(np.ones((64, 64), np.float32), pixel_size_angstrom=1.0, dose_per_frame_e_per_angstrom2=1.0)
    with pytest.raises(ValueError, match="patches_yx"):
        align_frames(np.ones((4, 64, 64)), pixel_size_angstrom=1.0, dose_per_frame_e_per_angstrom2=1.0,
                     patches_yx=(0, 3))
    with pytest.raises(ValueError, match="pixel_size_angstrom"):
        align_frames(np.ones((4, 64, 64)), pixel_size_angstrom=0.0, dose_per_frame_e_per_angstrom2=1.0)
