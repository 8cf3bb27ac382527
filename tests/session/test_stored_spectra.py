"""The tilt-series task's strip spectra: stored ones, and those of movies processed before they were stored."""

import numpy as np
import zarr
from zarr.storage import LocalStore

from tomodask.kernels.ctf import estimate_ctf_from_spectra, strip_spectra
from tomodask.settings import SessionSettings
from tomodask.simulate import simulate_single_tilt
from tomodask.tasks import _ctf_fit_options, _spectra_options, _StoredSpectra, _write_strip_spectra, write_array


def test_spectra_are_read_or_recomputed_from_the_aligned_sum(tmp_path):
    s = SessionSettings()
    t = simulate_single_tilt(seed=1, shape_yx=(512, 512), pixel_size_angstrom=1.5, n_frames=2,
                             dose_e_per_angstrom2=3.0, tilt_angle_deg=-30.0, tilt_axis_angle_deg=85.0,
                             defocus_angstrom=25000.0, drift_total_px=0.0)
    image = (t.frames.astype(np.float32) * t.gain).sum(0)
    options = _spectra_options(s, pixel_size_angstrom=1.5, shape_yx=image.shape)
    expected = strip_spectra(image, tilt_angle_deg=-30.0, **options)
    root = zarr.open_group(LocalStore(str(tmp_path / "results.zarr")), mode="a")
    for name in ("new", "old"):  # "old": results written before the spectra were stored
        g = root.require_group(f"movies/{name}")
        write_array(g, "aligned_sum", image, pixel_size_angstrom=1.5)
    _write_strip_spectra(root["movies/new"], expected)
    movies = [{"movie": name, "tilt_angle_deg": -30.0, "pixel_size_angstrom": 1.5} for name in ("new", "old")]
    stored = _StoredSpectra(zarr.open_group(LocalStore(str(tmp_path / "results.zarr")), mode="r"), movies, s, np)
    assert len(stored) == 2
    for spectra in (stored[0], stored[1]):
        np.testing.assert_array_equal(spectra.sums, expected.sums)
        np.testing.assert_array_equal(spectra.strip_offsets_angstrom, expected.strip_offsets_angstrom)
        assert spectra.resolution_range_angstrom == expected.resolution_range_angstrom
        # and they fit: 25000 Å at -30° within 300 Å (a 512² image of 2 frames)
        fit = estimate_ctf_from_spectra(spectra, **_ctf_fit_options(s))
        assert abs(fit.defocus_angstrom - 0.5 * (t.truth.defocus_u_angstrom + t.truth.defocus_v_angstrom)) < 300.0
