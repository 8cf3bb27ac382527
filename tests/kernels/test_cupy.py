"""The kernels run unchanged on cupy arrays and give numpy's answers (on a machine with a GPU).

Each test feeds the same simulated data to a kernel once as numpy and once as cupy arrays
and checks (1) the cupy result against the simulator's ground truth with the tolerances of
the numpy tests and (2) the two backends against each other. The kernels take their array
module from the inputs (:func:`tomodask.backend.get_array_module`), so this is the GPU path
the tasks take when ``cupy.is_available()``. Without a usable GPU (CI, the 2-core VMs) the
module is skipped with that reason; the numpy paths are tested by the other kernel tests.
"""

from __future__ import annotations

import numpy as np
import pytest

from tomodask.backend import cupy_available, get_array_module, to_numpy
from tomodask.kernels.ctf import estimate_ctf
from tomodask.kernels.gain import apply_gain, find_defect_pixels, replace_defect_pixels
from tomodask.kernels.motion import align_frames
from tomodask.kernels.reconstruct import lowpass_correlation, reconstruct_tomogram
from tomodask.kernels.tilt_align import align_tilt_series
from tomodask.simulate import simulate_single_tilt, simulate_tilt_series

pytestmark = pytest.mark.skipif(not cupy_available(),
                                reason="no usable GPU (cupy.is_available() is False): cupy paths need a GPU machine")

TRUE_AXIS_DEG = 85.0


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


def _rmse_px(a, b) -> float:
    return float(np.sqrt(((np.asarray(a) - np.asarray(b)) ** 2).sum(axis=-1).mean()))


@pytest.fixture(scope="module", params=[(0, 0.0, 6.0), (2, -60.0, 5.0)], ids=["0deg", "-60deg"])
def movie(request):
    seed, tilt_deg, drift_px = request.param
    return simulate_single_tilt(seed=seed, shape_yx=(512, 512), n_frames=10, dose_e_per_angstrom2=3.0,
                                tilt_angle_deg=tilt_deg, drift_total_px=drift_px)


def test_gain_and_defect_correction_match_numpy(cp, movie):
    out = {}
    for xp in (np, cp):
        frames = apply_gain(xp.asarray(movie.frames), xp.asarray(movie.gain))
        mask = find_defect_pixels(frames)
        fixed = replace_defect_pixels(frames, mask)
        assert get_array_module(fixed) is xp
        out[xp.__name__] = (to_numpy(mask), to_numpy(fixed))
    np.testing.assert_array_equal(out["cupy"][0], out["numpy"][0])
    np.testing.assert_allclose(out["cupy"][1], out["numpy"][1], rtol=1e-5, atol=1e-5)


def test_align_frames_recovers_the_drift_on_cupy(cp, movie):
    frames = apply_gain(movie.frames, movie.gain)
    frames = replace_defect_pixels(frames, find_defect_pixels(frames))
    dose = 0.3
    ref = align_frames(frames, pixel_size_angstrom=1.5, dose_per_frame_e_per_angstrom2=dose)
    gpu = align_frames(cp.asarray(frames), pixel_size_angstrom=1.5, dose_per_frame_e_per_angstrom2=dose)
    truth = movie.truth.frame_shifts_px
    assert _rmse_px(gpu.shifts_px, truth) <= 0.3
    assert np.abs(np.asarray(gpu.shifts_px) - ref.shifts_px).max() <= 0.02  # float32 FFTs on either side
    assert gpu.quality == ref.quality and gpu.local_motion_applied == ref.local_motion_applied
    for name in ("aligned_sum", "dose_weighted_sum", "even_sum", "odd_sum"):
        a, b = getattr(gpu, name), getattr(ref, name)
        assert get_array_module(a) is cp, f"{name} left the GPU"
        diff = np.abs(to_numpy(a) - b)
        assert diff.mean() <= 1e-3 * np.abs(b).mean(), name


@pytest.mark.parametrize(("seed", "tilt_deg", "defocus_angstrom", "tolerance_angstrom"),
                         [(0, 0.0, 18000.0, 100.0), (3, 60.0, 21000.0, 300.0)])
def test_estimate_ctf_on_cupy(cp, seed, tilt_deg, defocus_angstrom, tolerance_angstrom):
    sim = simulate_single_tilt(seed=seed, shape_yx=(1024, 1024), pixel_size_angstrom=1.5, n_frames=1,
                               dose_e_per_angstrom2=3.0, tilt_angle_deg=tilt_deg, tilt_axis_angle_deg=TRUE_AXIS_DEG,
                               defocus_angstrom=defocus_angstrom, astigmatism_angstrom=1000.0,
                               astigmatism_angle_deg=30.0, drift_total_px=0.0)
    image = (sim.frames.astype(np.float32) * sim.gain).sum(0)
    kw = dict(pixel_size_angstrom=1.5, tilt_angle_deg=tilt_deg, tilt_axis_angle_deg=TRUE_AXIS_DEG, voltage_kv=300.0,
              spherical_aberration_mm=2.7, amplitude_contrast=0.07)
    ref = estimate_ctf(image, **kw)
    gpu = estimate_ctf(cp.asarray(image), **kw)
    truth = 0.5 * (sim.truth.defocus_u_angstrom + sim.truth.defocus_v_angstrom)
    assert abs(gpu.defocus_angstrom - truth) <= tolerance_angstrom
    assert abs(gpu.defocus_u_angstrom - ref.defocus_u_angstrom) <= 20.0
    assert abs(gpu.defocus_v_angstrom - ref.defocus_v_angstrom) <= 20.0
    assert abs((gpu.astigmatism_angle_deg - ref.astigmatism_angle_deg + 90) % 180 - 90) <= 2.0
    assert isinstance(gpu.spectrum_yx, np.ndarray) and gpu.spectrum_yx.shape == ref.spectrum_yx.shape


def test_align_tilt_series_on_cupy(cp):
    ts = simulate_tilt_series(0, shape_yx=(256, 256), pixel_size_angstrom=6.0, tilt_axis_angle_deg=TRUE_AXIS_DEG,
                              dark_tilt_acquisition_indices=(7,))
    kw = dict(pixel_size_angstrom=6.0, tilt_axis_angle_deg=TRUE_AXIS_DEG + 3.0)
    ref = align_tilt_series(ts.images, ts.nominal_tilt_angles_deg, **kw)
    gpu = align_tilt_series(cp.asarray(ts.images), ts.nominal_tilt_angles_deg, **kw)
    assert abs(gpu.tilt_axis_angle_deg - TRUE_AXIS_DEG) < 0.2
    np.testing.assert_array_equal(gpu.excluded, ref.excluded)
    assert gpu.exclusion_reason[ts.dark_tilt_indices[0]] == "dark"
    use = ~np.asarray(gpu.excluded)
    est, true = np.asarray(gpu.shifts_px)[use], ts.shifts_px[use]
    err = np.hypot(*((est - est.mean(0)) - (true - true.mean(0))).T) * 6.0 / gpu.alignment_pixel_size_angstrom
    assert err.max() <= 1.0
    assert np.abs(np.asarray(gpu.shifts_px)[use] - np.asarray(ref.shifts_px)[use]).max() <= 0.1
    assert abs(gpu.tilt_axis_angle_deg - ref.tilt_axis_angle_deg) <= 0.02


def test_reconstruct_tomogram_on_cupy(cp):
    ts = simulate_tilt_series(0, shape_yx=(128, 128), pixel_size_angstrom=12.0, tilt_axis_angle_deg=0.0,
                              shift_std_angstrom=0.0, shift_std_per_deg_angstrom=0.0, dose_per_tilt_e_per_angstrom2=3.0)
    nz = int(np.ceil(ts.spec.thickness_angstrom / 12.0)) + 8
    phantom = ts.phantom_volume(pixel_size_angstrom=12.0, shape_zyx=(nz, 128, 128))
    kw = dict(pixel_size_angstrom=12.0, thickness_px=nz, invert_contrast=True, weighting="exact",
              sirt_like_iterations="auto")
    ref = reconstruct_tomogram(ts.images, ts.tilt_angles_deg, **kw)
    gpu = reconstruct_tomogram(cp.asarray(ts.images), ts.tilt_angles_deg, **kw)
    assert get_array_module(gpu) is cp and gpu.dtype == np.float32 and gpu.shape == ref.shape
    r_ref = lowpass_correlation(ref, phantom, lowpass_sigma_px=1.0)
    r_gpu = lowpass_correlation(to_numpy(gpu), phantom, lowpass_sigma_px=1.0)
    assert r_gpu >= 0.60 and abs(r_gpu - r_ref) <= 2e-3
