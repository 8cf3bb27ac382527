import numpy as np
import pytest

from tomodask.kernels.ctf_series import consistent_series_defocus


def _series(seed):
    # a dose-symmetric 41-tilt series focused to 30000 Å with +-750 Å of per-tilt scatter (as the
    # simulator draws it) and estimates within 150 Å of the truth
    rng = np.random.default_rng(seed)
    angles = np.arange(-60.0, 61.0, 3.0)
    truth = 30000.0 + rng.uniform(-750.0, 750.0, angles.size)
    return angles, truth, truth + rng.normal(0.0, 150.0, angles.size)


@pytest.mark.parametrize("seed", [0, 1])
def test_late_tilt_failures_are_replaced_and_good_fits_kept(seed):
    angles, truth, est = _series(seed)
    bad = np.flatnonzero(np.abs(angles) >= 48.0)[::2]  # failed fits of ring-less late tilts
    est[bad] += np.array([-21700.0, 5400.0, -3000.0, 7000.0, 4000.0, -6000.0][: bad.size])
    est[np.flatnonzero(angles == 57.0)] = np.nan
    out = consistent_series_defocus(est, angles)
    expected = np.zeros(angles.size, bool)
    expected[bad] = True
    expected[angles == 57.0] = True
    np.testing.assert_array_equal(out.replaced, expected)
    assert abs(out.reference_defocus_angstrom - 30000.0) < 300.0
    # every tilt's defocus is now within the focusing scatter plus the estimation noise of the truth
    assert np.abs(out.defocus_angstrom - truth).max() < 1300.0
    np.testing.assert_array_equal(out.defocus_angstrom[~expected], est[~expected])


def test_a_consistent_series_is_left_alone():
    angles, _, est = _series(2)
    out = consistent_series_defocus(est, angles)
    assert not out.replaced.any()
    np.testing.assert_array_equal(out.defocus_angstrom, est)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="same shape"):
        consistent_series_defocus(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="no finite defocus"):
        consistent_series_defocus(np.full(3, np.nan), np.zeros(3))
