"""Gain orientation and correction, defect pixels, Fourier binning to a pixel size."""

from __future__ import annotations

import numpy as np
import pytest

from tomodask.kernels.gain import (
    apply_gain,
    find_defect_pixels,
    fourier_crop_to_pixel_size,
    orient_gain,
    replace_defect_pixels,
)
from tomodask.simulate import simulate_single_tilt


def _marker_gain(ny: int = 9, nx: int = 9) -> np.ndarray:
    """Gain of ones with a marker 3 px along +x from the centre and a weaker one 2 px along +y."""
    g = np.ones((ny, nx), np.float32)
    cy, cx = ny // 2, nx // 2
    g[cy, cx + 3] = 5.0
    g[cy + 2, cx] = 3.0
    return g


@pytest.mark.parametrize(
    ("rotation_deg", "flip", "x_marker_yx", "y_marker_yx"),
    [
        (0, "none", (0, 3), (2, 0)),
        (90, "none", (3, 0), (0, -2)),  # counter-clockwise (y up): +x -> +y, +y -> -x
        (180, "none", (0, -3), (-2, 0)),
        (270, "none", (-3, 0), (0, 2)),
        (0, "x", (0, 3), (-2, 0)),  # mirror across the X axis: y -> -y
        (0, "y", (0, -3), (2, 0)),  # mirror across the Y axis: x -> -x
        (90, "x", (-3, 0), (0, -2)),  # rotation first, then the flip
    ],
)
def test_orient_gain_moves_markers_as_documented(rotation_deg, flip, x_marker_yx, y_marker_yx):
    g = orient_gain(_marker_gain(), rotation_deg=rotation_deg, flip=flip)
    c = np.array([4, 4])
    assert g[tuple(c + x_marker_yx)] == 5.0
    assert g[tuple(c + y_marker_yx)] == 3.0


def test_orient_gain_matches_motioncor2_rotation_of_a_rectangular_gain():
    g = np.arange(12, dtype=np.float32).reshape(3, 4)
    r = orient_gain(g, rotation_deg=90)
    assert r.shape == (4, 3)
    np.testing.assert_array_equal(r, np.rot90(g, k=-1))  # clockwise as numpy displays (row 0 on top)


def test_apply_gain_multiplies_and_checks_the_shape():
    rng = np.random.default_rng(0)
    frames = rng.poisson(2.0, size=(3, 6, 8)).astype(np.uint8)
    gain = rng.uniform(0.8, 1.2, size=(8, 6)).astype(np.float32)  # stored transposed: needs a rotation
    out = apply_gain(frames, gain, rotation_deg=270, flip="none")
    assert out.dtype == np.float32 and out.shape == frames.shape
    np.testing.assert_allclose(out, frames * np.rot90(gain, k=1), rtol=1e-6)
    with pytest.raises(ValueError, match="rotate by 90 or 270"):
        apply_gain(frames, gain)
    with pytest.raises(ValueError, match=r"rotation_deg must be one of \(0, 90, 180, 270\)"):
        apply_gain(frames, gain, rotation_deg=45)
    with pytest.raises(ValueError, match=r"flip must be one of \('none', 'x', 'y'\)"):
        apply_gain(frames, gain, rotation_deg=90, flip="xy")
    bad = gain.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        apply_gain(frames, bad, rotation_deg=90)


def test_simulated_gain_correction_restores_flat_field():
    tilt = simulate_single_tilt(seed=1, shape_yx=(128, 128), n_frames=4, dose_e_per_angstrom2=200.0,
                                gain_variation=0.15, n_particles=0, n_gold=0, membrane=False)
    raw = tilt.frames.astype(np.float32).sum(axis=0)
    corrected = apply_gain(tilt.frames, tilt.gain).sum(axis=0)
    good = ~tilt.defect_mask
    # relative pixel-to-pixel spread: Poisson (~1/sqrt(counts)) plus the gain variation when uncorrected
    mean = corrected[good].mean()
    assert np.std(corrected[good] / tilt.noiseless[good]) < 0.6 * np.std(raw[good] / tilt.noiseless[good])
    assert mean == pytest.approx(tilt.noiseless[good].mean(), rel=0.02)


@pytest.mark.parametrize("dose", [3.0, 15.0])
def test_defects_found_and_replaced(dose):
    tilt = simulate_single_tilt(seed=2, shape_yx=(256, 256), n_frames=10, dose_e_per_angstrom2=dose,
                                n_dead_pixels=15, n_hot_pixels=15, n_particles=5)
    frames = apply_gain(tilt.frames, tilt.gain)
    mask = find_defect_pixels(frames)
    hot = tilt.defect_mask & (tilt.frames.sum(axis=0) > 0)
    dead = tilt.defect_mask & ~hot
    assert np.all(mask[hot]), "every hot pixel is found"
    assert int((mask & ~tilt.defect_mask).sum()) <= 1, "at most one false positive"
    # a pixel that never counts is certainly dead where it should have counted >= ln(n_px / 0.05) e-
    # (~15: everywhere at 15 e-/Å² except under gold beads; nowhere at 3 e-/Å², ~7 e-/px)
    detectable = dead & (tilt.noiseless > np.log(frames[0].size / 0.05) + 2)
    assert np.all(mask[detectable])
    assert detectable.sum() >= (10 if dose >= 15.0 else 0)
    fixed = replace_defect_pixels(frames, mask)
    np.testing.assert_array_equal(fixed[:, ~mask], frames[:, ~mask])
    sums = fixed.sum(axis=0)
    expected = tilt.noiseless[mask]
    # replaced totals are local means: within Poisson noise of the expected counts (not 0, not 12/frame)
    assert np.all(np.abs(sums[mask] - expected) < 4 * np.sqrt(expected) + 2)
    # the sum of a single frame works too
    assert find_defect_pixels(frames.sum(axis=0))[hot].all()


def test_replace_defect_pixels_uses_good_neighbours_only():
    img = np.full((7, 7), 2.0, np.float32)
    img[3, 3] = 100.0
    img[3, 4] = 50.0
    mask = np.zeros((7, 7), bool)
    mask[3, 3] = mask[3, 4] = True
    out = replace_defect_pixels(img, mask, box_px=3)
    assert out[3, 3] == pytest.approx(2.0) and out[3, 4] == pytest.approx(2.0)
    whole = np.zeros((5, 5), bool)
    whole[:] = True
    whole[0, 0] = False
    out = replace_defect_pixels(np.arange(25, dtype=np.float32).reshape(5, 5), whole, box_px=3)
    assert out[4, 4] == pytest.approx(0.0)  # no good neighbour in its box: the mean of good pixels
    with pytest.raises(ValueError, match="does not match"):
        replace_defect_pixels(img, mask[:5])


def test_defect_search_rejects_corrupt_input():
    with pytest.raises(ValueError, match="NaN"):
        find_defect_pixels(np.full((2, 8, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"\(t, y, x\)"):
        find_defect_pixels(np.zeros((2, 2, 8, 8), np.float32))


def test_fourier_crop_to_pixel_size():
    rng = np.random.default_rng(3)
    img = rng.normal(10.0, 1.0, size=(2, 200, 300)).astype(np.float32)
    out, (py, px) = fourier_crop_to_pixel_size(img, pixel_size_angstrom=1.0, target_pixel_size_angstrom=2.5)
    assert out.shape == (2, 80, 120)
    assert (py, px) == pytest.approx((2.5, 2.5))
    np.testing.assert_allclose(out.mean(axis=(-2, -1)), img.mean(axis=(-2, -1)), rtol=1e-5)
    same, size = fourier_crop_to_pixel_size(img, pixel_size_angstrom=1.0, target_pixel_size_angstrom=0.8)
    assert same.shape == img.shape and size == (1.0, 1.0)
    odd, (py, px) = fourier_crop_to_pixel_size(img[0, :101], pixel_size_angstrom=1.0, target_pixel_size_angstrom=3.0)
    assert odd.shape == (34, 100) and py == pytest.approx(101 / 34) and px == pytest.approx(3.0)
