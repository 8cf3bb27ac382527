"""The two sides of the tilt range put at one height (step 4 of :mod:`tomodask.kernels.tilt_align`).

The correlation chain runs outwards from the tilt nearest 0° on each side separately and
follows the strongest layer of the specimen. With gold on both surfaces of a thick
specimen, the layers' peaks merge near 0° (the chain cannot place those tilts) and further
out each side locks onto one layer: the two sides may take different layers. Each side is
then a consistent rigid view of the specimen, but about a different rotation centre: the
tilts of one side are off by ``dz sin(theta)`` across the axis, ``dz`` the distance between
the layers, tens of pixels at high tilt, with low residuals, and the 3D-feature model only
looks a few pixels around each feature.

A reconstruction of one side alone (a 60° fan of rays through every point) holds each
compact feature where its rays converge, at its height as that side's rotation centre
sees it. The energy (smoothed square) of the two one-sided reconstructions, correlated
along z only, peaks at the height difference of the two sides' centres.
"""

from __future__ import annotations

import numpy as np

from tomodask.backend import get_array_module, scipy_ndimage, to_numpy
from tomodask.kernels.tilt_align.features import _block_mean_2x
from tomodask.kernels.tilt_align.reprojection import _wbp
from tomodask.kernels.tilt_align.state import _height_term, _State


def _energy(volume_zyx, *, border_fraction: float = 0.1):
    """Smoothed squared volume on a 2x coarser grid, less its mean along z in each column.

    The edges in y and x (``border_fraction``) are left out; subtracting each column's
    mean removes the back-projection streaks that run through the whole slab.
    """
    xp = get_array_module(volume_zyx)
    nz, ny, nx = volume_zyx.shape
    by, bx = int(ny * border_fraction), int(nx * border_fraction)
    v = _block_mean_2x(volume_zyx[:, by:ny - by, bx:nx - bx])
    e = scipy_ndimage(xp).gaussian_filter(v * v, 0.5)
    return e - e.mean(axis=0, keepdims=True)


def side_height_offset_px(s: _State, lower: np.ndarray, upper: np.ndarray) -> tuple[float, float, float]:
    """How much higher the features of the tilts ``lower`` lie than those of ``upper``.

    Parameters
    ----------
    s
        The alignment state (shifts, axis, angles, binned stack, the slabs).
    lower, upper
        Indices of the aligned tilts of each side (the tilt nearest 0° in both).

    Returns
    -------
    offset_px, peak, at_zero
        Height offset (alignment pixels; ±1 px, the energy is on a 2x coarser grid) at
        which the z-correlation of the two one-sided reconstructions' energies (in the
        centring slab) peaks, searched up to the thickness of the 3D-feature model's slab
        (1.5 times the specimen's) either way; NaN when the highest value is at the edge of
        that search (no peak). Then the correlation there and at zero offset.
    """
    xp = get_array_module(s.binned)
    energies = [_energy(_wbp(s.matcher.aligned(idx, s.shifts_b, s.axis), s.angles[idx], thickness_px=s.thick_nz))
                for idx in (upper, lower)]
    mz = energies[0].shape[0]
    spectra = [xp.fft.rfft(e, n=2 * mz, axis=0) for e in energies]
    corr = to_numpy(xp.fft.irfft((xp.conj(spectra[0]) * spectra[1]).sum(axis=(1, 2)), n=2 * mz))
    lags = np.rint(np.fft.fftfreq(2 * mz) * 2 * mz).astype(int)
    max_lag = max(min(s.nz // 2, mz - 1), 1)
    search = np.flatnonzero(np.abs(lags) <= max_lag)
    best = int(search[np.argmax(corr[search])])
    offset_px = 2.0 * float(lags[best]) if abs(lags[best]) < max_lag else float("nan")
    return offset_px, float(corr[best]), float(corr[0])


def _sides_at_one_height(s: _State, good: np.ndarray, *, min_offset_px: float, max_zero_fraction: float) -> bool:
    """Raise the rotation centre of the lower side's tilts of ``good`` to that of the upper side's.

    The tilts of ``good`` below the one nearest 0° move by ``dz sin(theta)`` across the
    axis when the one-sided reconstructions' features differ in height by ``dz``
    (:func:`side_height_offset_px`, a peak inside its search) of at least
    ``min_offset_px`` and the energies' correlation at zero offset is below
    ``max_zero_fraction`` of its peak. Returns whether they moved.
    """
    start = int(good[np.argmin(np.abs(s.nominal[good]))])
    lower, upper = good[s.angles[good] <= s.angles[start]], good[s.angles[good] >= s.angles[start]]
    if min(len(lower), len(upper)) < 3:
        return False
    offset_px, peak, at_zero = side_height_offset_px(s, lower, upper)
    if not abs(offset_px) >= min_offset_px or peak <= 0 or at_zero > max_zero_fraction * peak:
        return False
    moved = lower[lower != start]
    s.shifts_b[moved] += _height_term(s, offset_px)[moved]
    return True
