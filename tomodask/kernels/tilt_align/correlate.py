"""Band-passed, masked, normalised cross-correlation of tilt images and the cumulative
correlation chain that gives the coarse shifts (:func:`coarse_align_shifts`, step 2 of
:mod:`tomodask.kernels.tilt_align`).
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from tomodask.backend import get_array_module, to_numpy
from tomodask.kernels.fourier import frequency_grid
from tomodask.kernels.tilt_align.warp import _stretch_xy, _warp


def _bandpass(shape_yx, *, lowpass_px: float, highpass_px: float, xp: ModuleType):
    """Gaussian band-pass (half-spectrum) passing wavelengths between the two, in px."""
    fy, fx = frequency_grid(shape_yx, xp=xp)
    f2 = fy**2 + fx**2
    lp = xp.exp(-f2 * (lowpass_px**2) / 2.0)
    hp = 1.0 - xp.exp(-f2 * (highpass_px**2) / 2.0)
    return (lp * hp).astype(xp.float32)


def _taper(shape_yx, *, fraction: float, xp: ModuleType):
    """Separable cosine edge taper, flat in the centre, falling to 0 over ``fraction``."""
    out = []
    for n in shape_yx:
        w = max(int(round(n * fraction)), 1)
        ramp = np.ones(n, dtype=np.float32)
        edge = 0.5 - 0.5 * np.cos(np.pi * (np.arange(w) + 0.5) / w)
        ramp[:w] = edge
        ramp[n - w:] = edge[::-1]
        out.append(ramp)
    return xp.asarray(out[0][:, None] * out[1][None, :])


class _Correlator:
    """Band-pass, mask and normalised cross-correlation of same-shape images (zero-padded).

    Works on single images ``(y, x)`` and on stacks ``(n, y, x)`` alike.
    """

    def __init__(self, shape_yx, *, lowpass_px: float, highpass_px: float, xp: ModuleType, mask):
        self.xp = xp
        self.shape = tuple(int(n) for n in shape_yx)
        self.pad = tuple(2 * n for n in self.shape)
        self.filt = _bandpass(self.shape, lowpass_px=lowpass_px, highpass_px=highpass_px, xp=xp)
        self.mask = mask
        self.mask_sum = float(mask.sum())
        self.exclusion_px = max(2.0 * lowpass_px, 3.0)

    def prepare(self, images):
        """Padded spectra of the filtered, masked, zero-mean, unit-norm images."""
        xp = self.xp
        f = xp.fft.irfft2(xp.fft.rfft2(images.astype(xp.float32)) * self.filt, s=self.shape)
        f = (f - (f * self.mask).sum(axis=(-2, -1), keepdims=True) / self.mask_sum) * self.mask
        norm = xp.sqrt((f * f).sum(axis=(-2, -1), keepdims=True))
        return xp.fft.rfft2(f / xp.where(norm > 0, norm, 1.0), s=self.pad)

    def match(self, moved, ref, *, centres_yx, radii_px):
        """Displacements of ``moved`` relative to ``ref`` (prepared spectra, ``(n, ...)``).

        Returns ``(n, 2)`` sub-pixel ``(dy, dx)``, ``(n,)`` normalised correlation at the
        peak and ``(n,)`` peak ratio (peak over the best value outside its neighbourhood),
        the peak searched within ``radii_px`` of ``centres_yx``.
        """
        xp = self.xp
        cc = xp.fft.irfft2(moved * xp.conj(ref), s=self.pad)
        return _peaks(cc.reshape((-1,) + self.pad), centres_yx=centres_yx, radii_px=radii_px,
                      exclusion_px=self.exclusion_px)


def _peaks(cc, *, centres_yx, radii_px, exclusion_px: float):
    """Sub-pixel peaks of circular correlation maps ``(n, y, x)`` within discs.

    Returns ``(n, 2)`` displacements ``(dy, dx)``, ``(n,)`` peak values and ``(n,)`` peak
    ratios (peak over the highest value further than ``exclusion_px`` from it, in the disc).
    """
    xp = get_array_module(cc)
    n, ny, nx = cc.shape
    centres = np.broadcast_to(np.asarray(centres_yx, dtype=np.float64).reshape(-1, 2), (n, 2))
    radii = np.maximum(np.broadcast_to(np.asarray(radii_px, dtype=np.float64).ravel(), (n,)), 1.0)
    ky = xp.asarray(np.fft.fftfreq(ny) * ny, dtype=xp.float32)
    kx = xp.asarray(np.fft.fftfreq(nx) * nx, dtype=xp.float32)

    def wrapped(k, c, size):
        d = k[None, :] - xp.asarray(c, dtype=xp.float32)[:, None]
        return (d + size / 2) % size - size / 2

    dy, dx = wrapped(ky, centres[:, 0], ny), wrapped(kx, centres[:, 1], nx)
    inside = dy[:, :, None] ** 2 + dx[:, None, :] ** 2 <= xp.asarray(radii**2, dtype=xp.float32)[:, None, None]
    work = xp.where(inside, cc, -xp.inf).reshape(n, -1)
    flat = xp.argmax(work, axis=1)
    iy, ix = flat // nx, flat % nx
    rows = xp.arange(n)
    c0 = cc[rows, iy, ix]

    def refine(cm, cp):
        den = cm - 2.0 * c0 + cp
        return xp.where(den < 0, xp.clip(0.5 * (cm - cp) / xp.where(den < 0, den, -1.0), -0.5, 0.5), 0.0)

    ddy = refine(cc[rows, (iy - 1) % ny, ix], cc[rows, (iy + 1) % ny, ix])
    ddx = refine(cc[rows, iy, (ix - 1) % nx], cc[rows, iy, (ix + 1) % nx])
    py, px = ky[iy] + ddy, kx[ix] + ddx
    ey, ex = wrapped(ky, to_numpy(py), ny), wrapped(kx, to_numpy(px), nx)
    far = ey[:, :, None] ** 2 + ex[:, None, :] ** 2 > exclusion_px**2
    c1 = xp.where(inside & far, cc, -xp.inf).reshape(n, -1).max(axis=1)
    c0n, c1n = to_numpy(c0).astype(np.float64), to_numpy(c1).astype(np.float64)
    ratio = np.where(c1n > 1e-6 * np.abs(c0n), c0n / np.where(c1n > 0, c1n, 1.0), np.inf)
    shifts = np.stack([to_numpy(py), to_numpy(px)], axis=1).astype(np.float64)
    return shifts, c0n, ratio


def _search_radius_px(tilt_angles_deg, size_px: int, max_shift_fraction: tuple[float, float]) -> np.ndarray:
    """Radius of the shift search at each tilt: ``size * (a + b |sin(theta)|)``, at most half the size."""
    a, b = max_shift_fraction
    s = np.abs(np.sin(np.deg2rad(np.asarray(tilt_angles_deg, dtype=np.float64))))
    return np.minimum(size_px * (a + b * s), 0.5 * size_px)


def _stretched_reference(images_tyx, angles: np.ndarray, i: int, sources, shifts: np.ndarray, *,
                         tilt_axis_angle_deg: float):
    """Sum of tilts ``sources``, each stretched to tilt ``i``'s view and moved by its shift."""
    xp = get_array_module(images_tyx)
    shape = tuple(images_tyx.shape[1:])
    cos_t = np.cos(np.deg2rad(angles))
    reference = xp.zeros(shape, dtype=xp.float32)
    for j in sources:
        reference += _warp(images_tyx[j].astype(xp.float32), _stretch_xy(tilt_axis_angle_deg, cos_t[j] / cos_t[i]),
                           shifts[j], output_shape_yx=shape, order=1, cval=0.0)
    return reference


def _soft_disk(shape_yx, *, radius_fraction: float, xp: ModuleType):
    """Soft-edged disc ``(y, x)``: 1 out to 0.85 of ``radius_fraction`` times the smaller side, 0 beyond it."""
    ny, nx = shape_yx
    y = np.arange(ny)[:, None] - (ny - 1) / 2
    x = np.arange(nx)[None, :] - (nx - 1) / 2
    r = np.sqrt(x**2 + y**2) / (radius_fraction * min(ny, nx))
    return xp.asarray(np.clip((1.0 - r) / 0.15, 0.0, 1.0).astype(np.float32))


def coarse_align_shifts(
    images_tyx: np.ndarray,
    tilt_angles_deg: np.ndarray,
    *,
    tilt_axis_angle_deg: float,
    usable: np.ndarray | None = None,
    lowpass_px: float = 2.5,
    highpass_px: float = 30.0,
    max_shift_fraction: tuple[float, float] = (0.1, 0.3),
    n_references: int = 2,
    min_peak_ratio: float = 1.2,
    min_relative_correlation: float = 0.3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shifts from cumulative stretched cross-correlation, outwards from the tilt nearest 0°.

    Parameters
    ----------
    images_tyx
        ``(t, y, x)`` tilt images (binned to the alignment pixel size, zero-mean contrast),
        sorted by tilt angle.
    tilt_angles_deg
        ``(t,)`` tilt angles.
    tilt_axis_angle_deg
        Tilt-axis angle, counter-clockwise from Y.
    usable
        ``(t,)`` bool; unusable tilts are skipped (their shifts are NaN).
    lowpass_px, highpass_px
        Gaussian band-pass: wavelengths kept between these, in pixels.
    max_shift_fraction
        ``(a, b)``: the peak of tilt ``theta`` is searched within
        ``size * (a + b |sin(theta)|)`` of its aligned neighbour's shift (stage errors grow
        with tilt).
    n_references
        The reference of each tilt is the sum of this many nearest aligned reliable tilts,
        each stretched and moved to look like it: it holds more of the specimen than one
        image, so a large shift is still found.
    min_peak_ratio, min_relative_correlation
        A tilt whose peak is less than ``min_peak_ratio`` times the next best value, or
        whose correlation is below this fraction of the recent ones, is unreliable: it is
        not used as a reference.

    Returns
    -------
    shifts_px, correlation, peak_ratio, reliable
        ``(t, 2)`` displacements ``(dy, dx)`` relative to the tilt nearest 0°, ``(t,)``
        normalised correlation with the reference, ``(t,)`` peak ratio and ``(t,)`` bool.

    Notes
    -----
    With ``S`` the stretch from tilt ``i`` to tilt ``j`` (factor ``cos(theta_j) /
    cos(theta_i)`` perpendicular to the axis), ``image_j(S r + s_j)`` is tilt ``i``'s view
    of a thin specimen without its shift, so the correlation peak of ``image_i`` against
    the sum of these is ``s_i`` itself.
    """
    xp = get_array_module(images_tyx)
    n_t = images_tyx.shape[0]
    angles = np.asarray(tilt_angles_deg, dtype=np.float64)
    usable = np.ones(n_t, bool) if usable is None else np.asarray(usable, bool)
    shape = tuple(images_tyx.shape[1:])
    corr = _Correlator(shape, lowpass_px=lowpass_px, highpass_px=highpass_px, xp=xp,
                       mask=_taper(shape, fraction=0.1, xp=xp))
    radius = _search_radius_px(angles, min(shape), max_shift_fraction)
    shifts = np.full((n_t, 2), np.nan)
    ncc = np.full(n_t, np.nan)
    ratio = np.full(n_t, np.nan)
    reliable = np.zeros(n_t, bool)
    idx = np.flatnonzero(usable)
    if len(idx) == 0:
        return shifts, ncc, ratio, reliable
    start = int(idx[np.argmin(np.abs(angles[idx]))])
    shifts[start], ncc[start], ratio[start], reliable[start] = 0.0, 1.0, np.inf, True
    for direction in (1, -1):
        chain = [start]
        history: list[float] = []
        for i in range(start + direction, n_t if direction > 0 else -1, direction):
            if not usable[i]:
                continue
            reference = _stretched_reference(images_tyx, angles, i, chain[-n_references:], shifts,
                                             tilt_axis_angle_deg=tilt_axis_angle_deg)
            d, c, r = corr.match(corr.prepare(images_tyx[i][None]), corr.prepare(reference[None]),
                                 centres_yx=shifts[chain[-1]][None], radii_px=radius[i])
            shifts[i], ncc[i], ratio[i] = d[0], c[0], r[0]
            typical = float(np.median(history)) if history else c[0]
            if r[0] >= min_peak_ratio and c[0] >= min_relative_correlation * typical:
                reliable[i] = True
                chain.append(i)
                history = (history + [float(c[0])])[-5:]
    return shifts, ncc, ratio, reliable
