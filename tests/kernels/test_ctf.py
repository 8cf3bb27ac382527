"""CTF estimation recovers the simulator's defocus, astigmatism and phase shift.

Images are simulated tilts at a realistic dose (3 e-/Å² per tilt, 1.5 Å/px), recorded
with counting noise and gain, gain-corrected and summed as a motion-corrected sum would
be (one frame, no drift, to keep the tests fast).
"""

from __future__ import annotations

import numpy as np
import pytest

from tomodask.kernels.ctf import CTFResult, estimate_ctf
from tomodask.kernels.ctf_model import ctf_2d
from tomodask.simulate import simulate_single_tilt

OPTICS = dict(voltage_kv=300.0, spherical_aberration_mm=2.7, amplitude_contrast=0.07)
PIXEL = 1.5
AXIS = 85.0
SIZE = (1024, 1024)


def simulated(seed: int, tilt: float, defocus: float, *, astig: float = 1000.0, angle: float = 30.0):
    """Gain-corrected sum of a simulated tilt and its truth."""
    tilt_image = simulate_single_tilt(
        seed=seed, shape_yx=SIZE, pixel_size_angstrom=PIXEL, n_frames=1, dose_e_per_angstrom2=3.0,
        tilt_angle_deg=tilt, tilt_axis_angle_deg=AXIS, defocus_angstrom=defocus,
        astigmatism_angstrom=astig, astigmatism_angle_deg=angle, drift_total_px=0.0,
    )
    image = (tilt_image.frames.astype(np.float32) * tilt_image.gain).sum(0)
    return image, tilt_image.truth


def fit(image, tilt: float, **kw) -> CTFResult:
    return estimate_ctf(image, pixel_size_angstrom=PIXEL, tilt_angle_deg=tilt, tilt_axis_angle_deg=AXIS,
                        **OPTICS, **kw)


def angle_error_deg(a: float, b: float) -> float:
    """Difference of two axis directions (period 180°)."""
    return abs((a - b + 90.0) % 180.0 - 90.0)


# (seed, tilt, mean defocus, astigmatism angle) of the cases fitted once per session
CASES = [
    (0, 0.0, 18000.0, 30.0), (1, -30.0, 24000.0, -50.0), (2, 30.0, 31000.0, 75.0),
    (3, 60.0, 21000.0, 10.0), (4, -60.0, 27000.0, -35.0), (5, 60.0, 34000.0, 60.0),
]


@pytest.fixture(scope="module")
def fitted():
    out = []
    for seed, tilt, defocus, angle in CASES:
        image, truth = simulated(seed, tilt, defocus, angle=angle)
        out.append((tilt, truth, fit(image, tilt), image))
    return out


def mean_errors(fitted, pick):
    return [abs(r.defocus_angstrom - 0.5 * (t.defocus_u_angstrom + t.defocus_v_angstrom))
            for tilt, t, r, _ in fitted if pick(abs(tilt))]


def test_defocus_within_100_angstrom_up_to_30_degrees(fitted):
    errors = mean_errors(fitted, lambda t: t <= 30)
    assert len(errors) == 3
    assert np.median(errors) <= 100.0, errors


def test_defocus_within_300_angstrom_at_60_degrees(fitted):
    errors = mean_errors(fitted, lambda t: t == 60)
    assert len(errors) == 3
    assert np.median(errors) <= 300.0, errors


def test_astigmatism_angle_and_amount(fitted):
    for _, truth, result, _ in fitted:
        assert result.defocus_u_angstrom >= result.defocus_v_angstrom
        assert -90.0 < result.astigmatism_angle_deg <= 90.0
        assert angle_error_deg(result.astigmatism_angle_deg, truth.astigmatism_angle_deg) <= 10.0
        assert abs(result.astigmatism_angstrom - 1000.0) <= 250.0


def test_diagnostics(fitted):
    _, _, r, _ = fitted[0]
    assert r.spectrum_yx.shape == (256, 256) and r.spectrum_yx.dtype == np.float32
    assert np.isfinite(r.spectrum_yx).all()
    left, right = r.spectrum_yx[:, :128], r.spectrum_yx[:, 128:]
    # data (left) and model (right) halves agree: mirror the model across the centre
    assert np.corrcoef(left[1:, 1:].ravel(), right[::-1, ::-1][:-1, :-1].ravel())[0, 1] > 0.3
    n = len(r.profile_frequency_per_angstrom)
    assert n > 50
    for a in (r.profile_data, r.profile_model, r.profile_correlation):
        assert a.shape == (n,) and a.dtype == np.float32
    assert np.all(np.diff(r.profile_frequency_per_angstrom) > 0)
    assert 1 / 30.0 - 0.01 <= r.profile_frequency_per_angstrom[0] < r.profile_frequency_per_angstrom[-1] <= 0.2
    assert np.corrcoef(r.profile_data, r.profile_model)[0, 1] > 0.8
    assert 0.2 < r.score <= 1.0
    assert 5.0 <= r.fit_resolution_angstrom <= 8.0  # rings reach Nyquist of the fit range
    assert r.n_tiles == 9 and r.n_strips == 1
    assert r.spectrum_max_frequency_per_angstrom >= 0.2
    tilted = [res for tilt, _, res, _ in fitted if tilt == 60.0][0]
    assert tilted.n_strips > 1


def test_wrong_tilt_sign_fits_worse(fitted):
    """Pins the defocus-gradient convention: the mirrored gradient explains the data less well."""
    for tilt, _, result, image in fitted:
        if abs(tilt) == 60.0:
            flipped = fit(image, -tilt)
            assert flipped.score < result.score - 0.01


def test_larger_defocus_gives_larger_estimate():
    estimates = []
    for defocus in (15000.0, 15600.0):
        image, _ = simulated(7, 0.0, defocus, astig=0.0)
        estimates.append(fit(image, 0.0).defocus_angstrom)
    assert estimates[1] - estimates[0] == pytest.approx(600.0, abs=100.0)


def synthetic_spectrum_image(*, defocus: float, phase_deg: float, bfactor: float, seed: int,
                             shape=(1024, 1024)) -> np.ndarray:
    """Noise whose power spectrum is ``1 + 4 CTF² envelope`` (no specimen needed)."""
    rng = np.random.default_rng(seed)
    ctf = ctf_2d(shape, pixel_size_angstrom=PIXEL, defocus_u_angstrom=defocus + 300,
                 defocus_v_angstrom=defocus - 300, astigmatism_angle_deg=20.0,
                 phase_shift_deg=phase_deg, **OPTICS).astype(np.float64)
    fy = np.fft.fftfreq(shape[0])[:, None] / PIXEL
    fx = np.fft.rfftfreq(shape[1])[None, :] / PIXEL
    env = np.exp(-bfactor * (fx**2 + fy**2) / 4)
    signal = np.fft.irfft2(np.fft.rfft2(rng.normal(size=shape)) * ctf * env * 2.0, s=shape)
    return (signal + rng.normal(size=shape)).astype(np.float32)


def test_phase_shift_is_recovered():
    image = synthetic_spectrum_image(defocus=8000.0, phase_deg=70.0, bfactor=100.0, seed=1)
    r = fit(image, 0.0, fit_phase_shift=True, defocus_search_range_angstrom=(3000.0, 20000.0))
    assert angle_error_deg(r.phase_shift_deg, 70.0) <= 10.0
    assert abs(r.defocus_angstrom - 8000.0) <= 200.0


def test_fit_resolution_follows_the_rings():
    sharp = fit(synthetic_spectrum_image(defocus=20000.0, phase_deg=0.0, bfactor=50.0, seed=2), 0.0)
    blurred = fit(synthetic_spectrum_image(defocus=20000.0, phase_deg=0.0, bfactor=2500.0, seed=2), 0.0)
    assert sharp.fit_resolution_angstrom < 6.0
    assert blurred.fit_resolution_angstrom > 9.0
    assert abs(blurred.defocus_angstrom - 20000.0) <= 300.0


@pytest.mark.parametrize(
    ("image", "kwargs", "message"),
    [
        (np.zeros((2, 600, 600), np.float32), {}, "ndim=3"),
        (np.full((600, 600), np.nan, np.float32), {}, "NaN"),
        (np.zeros((300, 600), np.float32), {}, "smaller than one tile"),
        (np.zeros((600, 600), np.float32), {"tile_size_px": 100.5}, "tile_size_px"),
        (np.zeros((600, 600), np.float32), {"defocus_search_range_angstrom": (9000, 5000)}, "low < high"),
        (np.zeros((600, 600), np.float32), {"resolution_range_angstrom": (5.0, 30.0)}, "low > high"),
    ],
)
def test_bad_input_is_refused_with_the_fix(image, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit(image, 0.0, **kwargs)



def weak_ring_tilt(seed: int, tilt: float, defocus: float, *, astig: float, angle: float, bfactor: float):
    """Noise-free expected counts of a simulated tilt with the given envelope B-factor, and truth."""
    t = simulate_single_tilt(
        seed=seed, shape_yx=SIZE, pixel_size_angstrom=PIXEL, n_frames=1, dose_e_per_angstrom2=3.0,
        tilt_angle_deg=tilt, tilt_axis_angle_deg=AXIS, defocus_angstrom=defocus, astigmatism_angstrom=astig,
        astigmatism_angle_deg=angle, drift_total_px=0.0, bfactor_angstrom2=bfactor,
    )
    return t.noiseless, t.truth


def test_weak_rings_are_not_biased():
    """Mean signed defocus error over repeated counting noise on weak rings (B 500 Å²).

    Before the background spline was stiffened, this image came out 108 ± 45 Å too low
    on average (30 noise draws); the bound is about two standard errors of 6 draws.
    """
    expected, _ = weak_ring_tilt(0, 0.0, 18000.0, astig=1000.0, angle=-60.0, bfactor=500.0)
    rng = np.random.default_rng(12345)
    errors = [fit(rng.poisson(expected).astype(np.float32), 0.0).defocus_angstrom - 18000.0 for _ in range(6)]
    assert abs(np.mean(errors)) <= 180.0, errors


@pytest.mark.parametrize(("seed", "tilt", "bfactor"), [(11, 0.0, 60.0), (12, 45.0, 60.0), (13, -30.0, 250.0)])
def test_astigmatism_of_500_angstrom_does_not_collapse(seed, tilt, bfactor):
    """500 Å of astigmatism is found (AreTomo3 collapses some such fits to zero).

    Realistic rings (B 60 Å²): amount within 250 Å and angle within 20°; weaker rings
    (B 250 Å²): at least 100 Å, the threshold at which a fit counts as collapsed.
    """
    rng = np.random.default_rng(seed)
    expected, truth = weak_ring_tilt(seed, tilt, 25000.0, astig=500.0, angle=-40.0 + 25.0 * seed, bfactor=bfactor)
    r = fit(rng.poisson(expected).astype(np.float32), tilt)
    assert r.astigmatism_angstrom >= 100.0
    if bfactor == 60.0:
        assert abs(r.astigmatism_angstrom - 500.0) <= 250.0, r.astigmatism_angstrom
        assert angle_error_deg(r.astigmatism_angle_deg, truth.astigmatism_angle_deg) <= 20.0


def test_dose_damaged_last_tilt_avoids_the_wrong_low_defocus_basin():
    """Last tilt (-60°) of the benchmark's 41-tilt dose-symmetric series (seed 0, 120 e-/Å² received).

    Its rings are gone beyond ~20 Å; the rotational average alone preferred a wrong 8.6k Å
    basin (21.7k Å too low). The error left (~5.4k Å) is the noise of a nearly ring-less
    image, so the tolerance only separates the basins: within 6000 Å of the truth, and the
    astigmatism (truth 822 Å) not at the 3000 Å search limit.
    """
    rng = np.random.default_rng(0)  # the per-tilt draws of series seed 0 of benchmarks/movie_ctf.py (8b56fc5)
    defocus = 30000.0 + rng.normal(0.0, 1500.0, 41)[0]
    astig = rng.uniform(500.0, 1500.0, 41)[0]
    angle = rng.uniform(-90.0, 90.0, 41)[0]
    tilt = simulate_single_tilt(
        seed=0, shape_yx=SIZE, pixel_size_angstrom=PIXEL, n_frames=8, dose_e_per_angstrom2=3.0,
        tilt_angle_deg=-60.0, tilt_axis_angle_deg=AXIS, defocus_angstrom=float(defocus),
        astigmatism_angstrom=float(astig), astigmatism_angle_deg=float(angle), drift_total_px=0.0,
        prior_dose_e_per_angstrom2=120.0,
    )
    image = (tilt.frames.astype(np.float32) * tilt.gain).sum(0)
    result = fit(image, -60.0, resolution_range_angstrom=(50.0, 5.0), max_astigmatism_angstrom=3000.0)
    truth = 0.5 * (tilt.truth.defocus_u_angstrom + tilt.truth.defocus_v_angstrom)
    assert abs(result.defocus_angstrom - truth) <= 6000.0
    assert result.astigmatism_angstrom < 2900.0
