import numpy as np
import pytest

from tomodask.kernels.ctf import estimate_ctf, estimate_ctf_from_spectra, strip_spectra
from tomodask.kernels.ctf_series import refine_series_ctf
from tomodask.simulate import simulate_single_tilt

SPECTRA = dict(pixel_size_angstrom=1.5, tilt_axis_angle_deg=85.0, tile_size_px=512, resolution_range_angstrom=(50.0, 5.0))
FIT = dict(voltage_kv=300.0, spherical_aberration_mm=2.7, amplitude_contrast=0.07,
           defocus_search_range_angstrom=(5000.0, 60000.0))
#: (tilt, exposure received before it in e-/Å², defocus) of a short dose-symmetric series: three
#: low tilts with rings to ~5 Å and a late tilt with 111 e-/Å² received (rings to ~15-20 Å)
TILTS = ((0.0, 0.0, 30200.0), (-3.0, 3.0, 29600.0), (3.0, 6.0, 30900.0), (57.0, 111.0, 30400.0))
ASTIGMATISM = (900.0, 35.0)  # U - V (Å) and angle, the same for every tilt


@pytest.fixture(scope="module")
def series():
    """Images of TILTS (1024², 3 e-/Å²), their strip spectra, first per-tilt fits and true defocus."""
    images, spectra, fits, truth = [], [], [], []
    for tilt, prior, defocus in TILTS:
        t = simulate_single_tilt(seed=3, shape_yx=(1024, 1024), pixel_size_angstrom=1.5, n_frames=2,
                                 dose_e_per_angstrom2=3.0, tilt_angle_deg=tilt, tilt_axis_angle_deg=85.0,
                                 defocus_angstrom=defocus, astigmatism_angstrom=ASTIGMATISM[0],
                                 astigmatism_angle_deg=ASTIGMATISM[1], drift_total_px=0.0,
                                 prior_dose_e_per_angstrom2=prior)
        images.append((t.frames.astype(np.float32) * t.gain).sum(0))
        spectra.append(strip_spectra(images[-1], tilt_angle_deg=tilt, **SPECTRA))
        fits.append(estimate_ctf_from_spectra(spectra[-1], **FIT))
        truth.append(0.5 * (t.truth.defocus_u_angstrom + t.truth.defocus_v_angstrom))
    return images, spectra, fits, np.array(truth)


def _first_fits(fits):
    return [np.array([getattr(f, k) for f in fits]) for k in
            ("defocus_u_angstrom", "defocus_v_angstrom", "astigmatism_angle_deg", "fit_resolution_angstrom")]


def test_weak_tilts_are_refitted_with_the_series_astigmatism(series):
    _, spectra, fits, truth = series
    u, v, a, res = _first_fits(fits)
    # the late tilt's first fit in a wrong low-defocus basin at the astigmatism limit, as
    # ring-less tilts were fitted before (8.6k Å for a 30k Å truth)
    u[3], v[3], a[3], res[3] = 10100.0, 7100.0, -12.0, 6.0
    angles = np.array([t[0] for t in TILTS])
    out = refine_series_ctf(spectra, angles, u, v, a, res, fit_options=FIT)
    np.testing.assert_array_equal(out.reference, [True, True, True, False])
    np.testing.assert_array_equal(out.refitted, ~out.reference)
    # the series' astigmatism from the three low tilts: amount within 150 Å, angle within 10°
    assert abs(out.astigmatism_angstrom - ASTIGMATISM[0]) < 150.0
    assert abs((out.astigmatism_angle_deg_series - ASTIGMATISM[1] + 90.0) % 180.0 - 90.0) < 10.0
    assert abs(out.reference_defocus_angstrom - np.median(truth[:3])) < 300.0
    # references keep their own fits; refitted tilts carry the series' astigmatism exactly
    np.testing.assert_array_equal(out.defocus_u_angstrom[:3], u[:3])
    np.testing.assert_allclose(out.defocus_u_angstrom[3:] - out.defocus_v_angstrom[3:], out.astigmatism_angstrom,
                               atol=1e-6)
    # the late tilt lands in the right basin: a wrong one is 5-25k Å off, while the noise of one
    # such tilt alone is about 2300 Å (sd over 10 Poisson draws of a 60° tilt, 114 e-/Å² received)
    assert abs(out.defocus_angstrom[3] - truth[3]) < 5000.0


def test_spectra_fit_and_fixed_astigmatism_and_bad_values_named(series):
    images, spectra, fits, truth = series
    # the same fit from the image and from its stored spectra
    direct = estimate_ctf(images[0], tilt_angle_deg=0.0, **SPECTRA, **FIT)
    assert direct.defocus_u_angstrom == fits[0].defocus_u_angstrom and direct.n_tiles == fits[0].n_tiles == 9
    r = estimate_ctf_from_spectra(spectra[0], **FIT, astigmatism_fixed=(700.0, -20.0))
    assert abs(r.astigmatism_angstrom - 700.0) < 1e-6 and abs(r.astigmatism_angle_deg + 20.0) < 1e-6
    # the mean defocus is still fitted (the free fit's error is a few tens of Å)
    assert abs(r.defocus_angstrom - truth[0]) < 150.0
    with pytest.raises(ValueError, match="astigmatism_fixed"):
        estimate_ctf(images[0], tilt_angle_deg=0.0, **SPECTRA, **FIT, astigmatism_fixed=(5000.0, 0.0))
    with pytest.raises(ValueError, match="per-tilt arrays"):
        refine_series_ctf(spectra, np.zeros(4), *(x[:3] for x in _first_fits(fits)), fit_options=FIT)
