"""Frame alignment of one movie: global drift, smooth local motion, aligned and dose-weighted sums.

The algorithm follows MotionCor2 [1]_ (numpy or cupy, taken from the input):

1. **Global drift.** The frames' spectra (one ``rfft2`` each, kept for the sums) are
   Fourier-cropped to a search grid of about the resolution the B-factor keeps
   (``sqrt(B / 24)`` Å/px: the filter is ``exp(-1.5)`` at its Nyquist; no aliasing). Each
   frame is cross-correlated with the sum of all *other* aligned frames (no
   self-correlation of the noise), the product multiplied by ``exp(-B k^2 / 4)`` with the
   central cross (streaks of the frame edges and static gradients) left out. The first
   passes search full correlation maps (at most 128², parabolic sub-pixel peak) until
   every shift has settled to within a pixel; then Newton steps to the maximum of the
   continuous correlation, computed from its first and second derivatives at zero (sums
   over the spectrum, no inverse FFT), refine all frames together. Each update is scaled
   by ``(t - 1) / t``, which removes the leave-one-out reference's own share of the error
   in one step. Iterations stop when no shift moves by more than ``tolerance_px``.
2. **Local motion** (``patches_yx``). The frames, Fourier-binned ``patch_bin`` times
   coarser, are cut into overlapping, edge-tapered patches (pre-moved by the integer part
   of the global drift), each patch aligned the same way (passes stop once 90 % of the
   patch-frame shifts have settled: the rest are noise-dominated patches). The grid is ``patches_yx`` at
   most, fewer where patches would be smaller than ``min_patch_px`` (as MotionCor2 users
   pick patches of a useful size rather than a fixed count). The patch shifts minus the
   global drift are fitted with MotionCor2's model, a polynomial in time (t, t², t³,
   zero-mean over the movie) times a quadratic in (x, y), by weighted least squares whose
   per-patch weights are re-estimated from the residuals (noisy or featureless patches
   count less). The spatially varying part of the model is kept only when an F-test says
   it explains the patch shifts better than chance (p < 1e-3, F corrected for the
   patches' overlap), shrunk by the James-Stein factor ``1 - 1/F``: at low dose the
   patches are mostly noise and a fitted field would only add it.
3. **Sums.** Without local motion every frame's spectrum is moved by its global shift
   (a Fourier phase ramp) and summed. With local motion the image is cut into tiles of
   ``tile_size_px`` whose borders are blended by a smooth partition of unity; each tile
   of each frame is moved by the drift plus the model's shift at the tile centre (integer
   part by indexing, fraction by a phase ramp). The even, odd and dose-weighted sums come
   out of the same spectra (weights of :func:`tomodask.kernels.dose.dose_weights`).

Shifts follow :mod:`tomodask.kernels.geometry`: ``shifts_px[i]`` is the displacement
``(dy, dx)`` of frame ``i``'s content, zero-mean over the movie; the sums are aligned to
the mean position.

References
----------
.. [1] Zheng, S. Q., Palovcak, E., Armache, J.-P., Verba, K. A., Cheng, Y. & Agard, D. A.
   (2017). MotionCor2: anisotropic correction of beam-induced motion for improved
   cryo-electron microscopy. Nature Methods 14, 331-332.
.. [2] Grant, T. & Grigorieff, N. (2015). Measuring the optimal exposure for single
   particle cryo-EM using a 2.6 Å reconstruction of rotavirus VP6. eLife 4, e06980.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from tomodask.backend import get_array_module, to_numpy
from tomodask.kernels.dose import dose_weights
from tomodask.kernels.fourier import frequency_grid, gaussian_bfactor_filter

__all__ = ["FrameAlignment", "MIN_PATCH_PX", "QUALITIES", "align_frames", "motion_metrics"]

#: Values of :attr:`FrameAlignment.quality`.
QUALITIES = ("good", "high_motion", "failed")

_TWO_PI = 2.0 * np.pi
#: Side of the Fourier-cropped grid of the full-map (coarse) passes: a pixel of precision is all they need.
_COARSE_SIZE = 128
#: Default search pixel ``sqrt(B / _SEARCH_DIV)`` Å: the B filter is ``exp(-1.5)`` at its Nyquist.
_SEARCH_DIV = 24.0
#: Default smallest local-motion patch side, in pixels of the input frames. Patches of 5 x 5 grids
#: on 512² frames are ~150 px; on simulated 512² tilts (1.5 Å/px, 3 e-/Å², 2-4 px of local motion)
#: 4 x 4 grids (~190 px patches) recovered the field as well (RMS error 0.30 / 0.24 px against
#: 0.29 / 0.25 px over 6 movies each), 3 x 3 grids (~250 px) 12 % worse.
MIN_PATCH_PX = 192
#: Patch alignment stops when this fraction of the patch-frame shifts has settled: the last ones
#: are noise-dominated patches whose Newton steps wander (they take up to 10 passes instead of 4-6;
#: the robust fit weights them down). Measured on 18 simulated local-motion movies: field error
#: and sums unchanged (within 1 %), 0.75 missed a 2 px field.
_PATCH_SETTLED_FRACTION = 0.9


@dataclass(frozen=True)
class FrameAlignment:
    """Result of :func:`align_frames`.

    Attributes
    ----------
    aligned_sum
        ``(y, x)`` float32 sum of the aligned frames (e-/px), on the input's device.
    dose_weighted_sum
        ``(y, x)`` float32 exposure-weighted sum (equal to ``aligned_sum`` at low
        frequency).
    even_sum, odd_sum
        ``(y, x)`` float32 sums of the aligned frames with even / odd index (0, 2, ... and
        1, 3, ...), for resolution estimates and denoising.
    shifts_px
        ``(t, 2)`` float64 numpy global displacements ``(dy, dx)`` of each frame's content,
        zero-mean.
    local_shifts_px
        ``(t, gy, gx, 2)`` float64 numpy displacements at the patch centres: global drift
        plus the fitted local model (equal to ``shifts_px`` everywhere when no local model
        was kept), or None when no local motion was measured (``patches_yx`` None, fewer
        than 4 frames, or frames too small for two patches of ``min_patch_px``).
    patch_shifts_px
        ``(t, gy, gx, 2)`` raw per-patch measurements the model was fitted to, or None.
    patch_centers_yx_px
        ``(gy, gx, 2)`` patch centres ``(y, x)`` in pixels of the input frames, or None.
    local_motion_applied
        True when the local model was significant and was used for the sums.
    total_motion_px, early_motion_px, late_motion_px
        Path length of the global trajectory over the whole movie, over its first
        ``early_frames`` frames, and over the rest (see :func:`motion_metrics`).
    quality
        One of :data:`QUALITIES`.
    quality_reason
        Why the quality is not ``"good"`` (empty when it is).
    cc_peak_snr
        Median over frames of the first-pass correlation peak height above the map's
        mean, in units of the map's standard deviation (alignment signal).
    n_iterations
        Global refinement passes run.
    converged
        True when the last pass moved no frame by more than the tolerance.
    search_pixel_size_angstrom
        Pixel size of the Fourier-cropped frames the global shifts were measured on.
    extra
        Diagnostics: ``local_f_statistic`` (F of the local model's spatial terms, corrected
        for patch overlap; None without patches), ``search_shape_yx`` and
        ``patch_grid_yx`` (the patch grid used, None when no local motion was measured).
    """

    aligned_sum: np.ndarray
    dose_weighted_sum: np.ndarray
    even_sum: np.ndarray
    odd_sum: np.ndarray
    shifts_px: np.ndarray
    local_shifts_px: np.ndarray | None
    patch_shifts_px: np.ndarray | None
    patch_centers_yx_px: np.ndarray | None
    local_motion_applied: bool
    total_motion_px: float
    early_motion_px: float
    late_motion_px: float
    quality: str
    quality_reason: str
    cc_peak_snr: float
    n_iterations: int
    converged: bool
    search_pixel_size_angstrom: float
    extra: dict = field(default_factory=dict, repr=False)


# --------------------------------------------------------------------------------------
# small helpers


def _fft(xp: ModuleType) -> ModuleType:
    """scipy.fft for numpy (native float32, honours ``scipy.fft.set_workers``), else xp.fft."""
    if xp is np:
        import scipy.fft

        return scipy.fft
    return xp.fft


def _shift_spectra(spec: np.ndarray, fy: np.ndarray, fx: np.ndarray, shifts: np.ndarray, xp: ModuleType) -> np.ndarray:
    """Multiply ``(..., ky, kx)`` spectra by ``exp(+2 pi i k . s)``: the images become ``image(r + s)``.

    ``shifts`` is ``(..., 2)``. The ramp is separable, so it is applied as a y factor and
    an x factor (no trigonometry and no ramp array per pixel).
    """
    s = xp.asarray(shifts, dtype=xp.float64)
    ay = fy.astype(xp.float64) * s[..., 0, None, None] * _TWO_PI  # (..., ky, 1)
    ax = fx.astype(xp.float64) * s[..., 1, None, None] * _TWO_PI  # (..., 1, kx)
    py = (xp.cos(ay) + 1j * xp.sin(ay)).astype(xp.complex64)
    px = (xp.cos(ax) + 1j * xp.sin(ax)).astype(xp.complex64)
    out = spec * py
    out *= px
    return out


def _taper(shape_yx: tuple[int, int], xp: ModuleType, fraction: float = 0.05) -> np.ndarray:
    """Separable window: 1 inside, cosine fall-off over ``fraction`` of each side."""
    out = []
    for n in shape_yx:
        w = max(1, int(round(n * fraction)))
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(w) + 0.5) / w)
        win = np.ones(n)
        win[:w] = ramp
        win[n - w:] = np.minimum(win[n - w:], ramp[::-1])
        out.append(win)
    return xp.asarray(np.outer(out[0], out[1]), dtype=xp.float32)


def _spectra(images: np.ndarray, xp: ModuleType) -> np.ndarray:
    """Mean-subtracted, edge-tapered ``rfft2`` of ``(..., y, x)`` images (complex64)."""
    win = _taper(images.shape[-2:], xp)
    centred = images - images.mean(axis=(-2, -1), keepdims=True, dtype=np.float32)
    return _fft(xp).rfft2(centred * win).astype(xp.complex64)


def _hermitian_weights(nx: int, xp: ModuleType) -> np.ndarray:
    """Column weights that turn a sum over an rfft half-spectrum into the full sum."""
    w = np.full(nx // 2 + 1, 2.0, dtype=np.float32)
    w[0] = 1.0
    if nx % 2 == 0:
        w[-1] = 1.0
    return xp.asarray(w)


def _stencil_cc(prod: np.ndarray, shape_yx: tuple[int, int], half: int, xp: ModuleType) -> np.ndarray:
    """Correlation at integer offsets ``-half..half`` from the spectrum product (a small DFT).

    ``prod`` is ``(..., ky, kx)`` = ``A conj(B)``; returns ``(..., 2h+1, 2h+1)`` real,
    ``cc[..., i, j]`` at displacement ``(i - h, j - h)`` of A relative to B.
    """
    ny, nx = shape_yx
    d = np.arange(-half, half + 1)
    ey = np.exp(2j * np.pi * np.fft.fftfreq(ny)[:, None] * d[None, :]).astype(np.complex64)  # (ky, m)
    ex = np.exp(2j * np.pi * np.fft.rfftfreq(nx)[:, None] * d[None, :]).astype(np.complex64)  # (kx, m)
    ex = xp.asarray(ex) * _hermitian_weights(nx, xp)[:, None]
    ey = xp.asarray(ey)
    batch = prod.shape[:-2]
    nb = int(np.prod(batch)) if batch else 1
    m = d.size
    tmp = (prod.reshape(nb * ny, -1) @ ex).reshape(nb, ny, m)  # one GEMM over all maps
    cc = (xp.swapaxes(tmp, -1, -2).reshape(nb * m, ny) @ ey).reshape(nb, m, m)  # [b, x, y]
    return xp.swapaxes(cc, -1, -2).real.reshape(batch + (m, m)) / xp.float32(ny * nx)


def _parabola(cm: np.ndarray, c0: np.ndarray, cp: np.ndarray, xp: ModuleType) -> np.ndarray:
    den = cm - 2.0 * c0 + cp
    off = xp.where(den < 0, 0.5 * (cm - cp) / xp.where(den < 0, den, -1.0), 0.0)
    return xp.clip(off, -0.5, 0.5)


def _stencil_peak(cc: np.ndarray, xp: ModuleType) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel peak of ``(..., m, m)`` stencils; returns ``(..., 2)`` offsets and peak values."""
    m = cc.shape[-1]
    half = m // 2
    flat = cc.reshape(cc.shape[:-2] + (m * m,))
    idx = xp.argmax(flat, axis=-1)
    iy, ix = idx // m, idx % m
    # neighbours, clamped at the stencil border (a border peak moves by whole pixels only)
    iyc, ixc = xp.clip(iy, 1, m - 2), xp.clip(ix, 1, m - 2)

    def at(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return xp.take_along_axis(flat, (a * m + b)[..., None], axis=-1)[..., 0]

    c0 = at(iy, ix)
    dy = xp.where(iy == iyc, _parabola(at(iyc - 1, ix), c0, at(iyc + 1, ix), xp), 0.0)
    dx = xp.where(ix == ixc, _parabola(at(iy, ixc - 1), c0, at(iy, ixc + 1), xp), 0.0)
    off = xp.stack([iy - half + dy, ix - half + dx], axis=-1)
    return off.astype(xp.float64), c0


def _crop_spectrum(spec: np.ndarray, shape_yx: tuple[int, int], out_yx: tuple[int, int], xp: ModuleType) -> np.ndarray:
    """Keep the low frequencies of ``(..., ny, nx // 2 + 1)`` half-spectra for an ``out_yx`` grid."""
    ny, _ = shape_yx
    oy, ox = out_yx
    if (oy, ox) == tuple(shape_yx):
        return spec
    top, bottom = oy // 2 + oy % 2, oy // 2
    rows = xp.concatenate([spec[..., :top, :], spec[..., ny - bottom:, :]], axis=-2) if bottom else spec[..., :top, :]
    return rows[..., : ox // 2 + 1]


def _coarse_peak(
    prod: np.ndarray, shape_yx: tuple[int, int], max_shift_px: float, xp: ModuleType, max_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Peak of the full correlation maps (cropped to at most ``max_size`` for speed).

    Returns ``(..., 2)`` integer-grid peak positions in pixels of ``shape_yx`` and the
    peak signal-to-noise ratio (height above the map mean in map standard deviations).
    """
    ny, nx = shape_yx
    cy, cx = min(ny, max_size), min(nx, max_size)
    cc = _fft(xp).irfft2(_crop_spectrum(prod, (ny, nx), (cy, cx), xp), s=(cy, cx))
    sy, sx = ny / cy, nx / cx
    fy, fx = frequency_grid((cy, cx), xp=xp, rfft=False)
    r2 = (fy * cy * sy) ** 2 + (fx * cx * sx) ** 2
    work = xp.where(r2 <= max_shift_px**2, cc, -xp.inf)
    flat = work.reshape(cc.shape[:-2] + (cy * cx,))
    idx = xp.argmax(flat, axis=-1)
    iy, ix = idx // cx, idx % cx
    values = cc.reshape(flat.shape)

    def at(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return xp.take_along_axis(values, ((a % cy) * cx + (b % cx))[..., None], axis=-1)[..., 0]

    peak = at(iy, ix)
    dy = _parabola(at(iy - 1, ix), peak, at(iy + 1, ix), xp)
    dx = _parabola(at(iy, ix - 1), peak, at(iy, ix + 1), xp)
    py = ((iy + cy // 2) % cy) - cy // 2 + dy
    px = ((ix + cx // 2) % cx) - cx // 2 + dx
    mean = cc.mean(axis=(-2, -1))
    std = cc.std(axis=(-2, -1))
    snr = (peak - mean) / xp.maximum(std, 1e-30)
    return xp.stack([py * sy, px * sx], axis=-1).astype(xp.float64), snr


def _derivative_sums(q: np.ndarray, shape_yx: tuple[int, int], xp: ModuleType) -> np.ndarray:
    """Weighted sums of a half-spectrum product for the correlation's derivatives at zero.

    Returns ``(..., 5)`` real: ``sum k_y Im q``, ``sum k_x Im q``, ``sum k_y^2 Re q``,
    ``sum k_x^2 Re q``, ``sum k_y k_x Re q`` over the full spectrum (Hermitian weights on
    the half-spectrum), from one matrix product over the x frequencies.
    """
    ny, nx = shape_yx
    fy, fx = frequency_grid(shape_yx, xp=xp)
    fyv, fxv = fy[:, 0], fx[0]
    w = _hermitian_weights(nx, xp)
    cols = xp.stack([w, w * fxv, w * fxv**2], axis=1).astype(xp.complex64)  # (kx, 3)
    batch = q.shape[:-2]
    rows = (q.reshape(-1, q.shape[-1]) @ cols).reshape(batch + (ny, 3))  # (..., ky, 3)
    s0 = (rows[..., 0] * fyv).sum(axis=-1)  # sum k_y q
    s1 = rows[..., 1].sum(axis=-1)  # sum k_x q
    s2 = (rows[..., 0] * fyv**2).sum(axis=-1)  # sum k_y^2 q
    s3 = rows[..., 2].sum(axis=-1)  # sum k_x^2 q
    s4 = (rows[..., 1] * fyv).sum(axis=-1)  # sum k_y k_x q
    return xp.stack([s0.imag, s1.imag, s2.real, s3.real, s4.real], axis=-1).astype(xp.float64)


def _newton_step(sums: np.ndarray, xp: ModuleType) -> tuple[np.ndarray, np.ndarray]:
    """Newton step to the maximum of the continuous correlation, from its derivatives at zero.

    With ``cc(d) = sum_k P(k) exp(2 pi i k.d)`` the gradient at 0 is ``-2 pi sum k Im P``
    and the Hessian ``-4 pi^2 sum k k^T Re P``; ``sums`` are those of
    :func:`_derivative_sums`. Returns ``(..., 2)`` steps and a ``(...)`` mask of where the
    Hessian is negative definite (a maximum is near).
    """
    gy, gx = -_TWO_PI * sums[..., 0], -_TWO_PI * sums[..., 1]
    c2 = -(_TWO_PI**2)
    hyy, hxx, hxy = c2 * sums[..., 2], c2 * sums[..., 3], c2 * sums[..., 4]
    det = hyy * hxx - hxy**2
    ok = (hyy < 0) & (det > 0)
    det = xp.where(ok, det, 1.0)
    dy = -(hxx * gy - hxy * gx) / det
    dx = -(hyy * gx - hxy * gy) / det
    return xp.stack([dy, dx], axis=-1), ok


def _recentre(shifts: np.ndarray, max_shift_px: float, xp: ModuleType) -> np.ndarray:
    """Zero-mean over frames, each displacement limited to ``max_shift_px``."""
    shifts = shifts - shifts.mean(axis=-2, keepdims=True)
    norm = xp.sqrt((shifts**2).sum(axis=-1))
    over = norm > max_shift_px
    if bool(over.any()):
        shifts = xp.where(over[..., None], shifts * (max_shift_px / xp.maximum(norm, 1e-9))[..., None], shifts)
    return shifts


def _coarse_alignment(spec, shape_yx, filt, power, shifts, *, max_passes, max_shift_px, xp):
    """Full-map passes (leave-one-out reference) until every shift has settled to within a pixel.

    Returns the shifts, the first pass's ``(..., t)`` peak SNR, the passes run and the
    B-filtered power of the aligned sum (larger is better aligned).
    """
    n_t = spec.shape[-3]
    gain = (n_t - 1) / n_t
    fy, fx = frequency_grid(shape_yx, xp=xp)
    snr = None
    passes = 0
    while passes < max_passes:
        passes += 1
        aligned = _shift_spectra(spec, fy, fx, shifts, xp)
        q = aligned * (xp.conj(aligned.sum(axis=-3, keepdims=True)) * filt)
        step, peak_snr = _coarse_peak(q - power, shape_yx, max_shift_px, xp)
        snr = peak_snr if snr is None else snr
        shifts = _recentre(shifts + step * gain, max_shift_px, xp)
        if float(xp.abs(step).max()) <= 1.0:
            break
    total = _shift_spectra(spec, fy, fx, shifts, xp).sum(axis=-3)
    objective = float(((total.real**2 + total.imag**2) * filt).sum())
    return shifts, snr, passes, objective


def _chained_shifts(spec, shape_yx, filt, max_shift_px, xp):
    """Initial trajectory from each frame's correlation with the previous one (for large drifts)."""
    q = spec[..., 1:, :, :] * xp.conj(spec[..., :-1, :, :]) * filt
    steps, _ = _coarse_peak(q, shape_yx, max_shift_px, xp)
    zero = xp.zeros(steps.shape[:-2] + (1, 2), dtype=steps.dtype)
    return xp.concatenate([zero, xp.cumsum(steps, axis=-2)], axis=-2)


def _iterative_alignment(
    spec: np.ndarray,
    shape_yx: tuple[int, int],
    filt: np.ndarray,
    *,
    initial_shifts: np.ndarray,
    max_iterations: int,
    tolerance_px: float,
    max_shift_px: float,
    coarse_first: bool,
    xp: ModuleType,
    settled_fraction: float = 1.0,
) -> tuple[np.ndarray, int, bool, np.ndarray | None]:
    """Align ``(..., t, ky, kx)`` spectra, each frame against the sum of the others.

    Returns ``(..., t, 2)`` zero-mean displacements, iterations run, convergence flag and
    (when ``coarse_first``) the first full-map pass's ``(..., t)`` peak SNR. Iterations
    stop when at least ``settled_fraction`` of the displacements moved by less than
    ``tolerance_px``.

    Notes
    -----
    With ``coarse_first`` the full-map passes start from ``initial_shifts`` and from the
    trajectory chained from neighbouring frames; the start whose aligned sum has the
    most (B-filtered) power is refined. A frame far from the others otherwise matches
    the reference at the wrong one of its several peaks.

    The product with the leave-one-out reference is ``A conj(T - A) = A conj(T) - |A|^2``
    (``T`` the sum of all aligned frames); ``|A|^2`` does not change with the shifts, so
    its derivative sums are computed once and each Newton pass costs a phase ramp, one
    product with ``conj(T)`` and one matrix product.
    """
    n_t = spec.shape[-3]
    fy, fx = frequency_grid(shape_yx, xp=xp)
    shifts = _recentre(xp.asarray(initial_shifts, dtype=xp.float64), max_shift_px, xp)
    gain = (n_t - 1) / n_t  # one-step correction: frame i's error relative to the others is n/(n-1) its own
    power = (spec.real**2 + spec.imag**2) * filt  # |A|^2 filt, independent of the shifts
    snr = None
    it = 0
    if coarse_first:  # on a small Fourier-cropped grid (_COARSE_SIZE)
        cshape = (min(shape_yx[0], _COARSE_SIZE), min(shape_yx[1], _COARSE_SIZE))
        scale = np.array([cshape[0] / shape_yx[0], cshape[1] / shape_yx[1]])
        cspec, cfilt, cpower = (_crop_spectrum(a, shape_yx, cshape, xp) for a in (spec, filt, power))
        cmax = max_shift_px * float(scale.min())
        passes = max(1, max_iterations // 2)
        coarse, snr, it, best = _coarse_alignment(cspec, cshape, cfilt, cpower, shifts * xp.asarray(scale),
                                                  max_passes=passes, max_shift_px=cmax, xp=xp)
        if n_t > 2:
            chained = _recentre(_chained_shifts(cspec, cshape, cfilt, cmax, xp), cmax, xp)
            alt, _, alt_it, objective = _coarse_alignment(cspec, cshape, cfilt, cpower, chained, max_passes=passes,
                                                          max_shift_px=cmax, xp=xp)
            if objective > best:
                coarse, it = alt, alt_it
        shifts = coarse / xp.asarray(scale)
        del cspec, cpower
    self_sums = _derivative_sums(power.astype(xp.complex64), shape_yx, xp)
    converged = False
    while it < max_iterations:
        it += 1
        aligned = _shift_spectra(spec, fy, fx, shifts, xp)
        q = aligned * (xp.conj(aligned.sum(axis=-3, keepdims=True)) * filt)
        step, ok = _newton_step(_derivative_sums(q, shape_yx, xp) - self_sums, xp)
        bad = ~ok | (xp.abs(step).max(axis=-1) > 1.0)
        if bool(bad.any()):  # far from a maximum: move to the best point of a 5 x 5 stencil
            moved, _ = _stencil_peak(_stencil_cc(q[bad] - power[bad], shape_yx, 2, xp), xp)
            step[bad] = moved
        shifts = _recentre(shifts + step * gain, max_shift_px, xp)
        if float((xp.abs(step).max(axis=-1) < tolerance_px).mean()) >= settled_fraction:
            converged = True
            break
    return shifts, it, converged, snr


def _crop_with_fill(image: np.ndarray, origin_yx: tuple[int, int], shape_yx: tuple[int, int], fill: float,
                    xp: ModuleType) -> np.ndarray:
    """``image[oy:oy+h, ox:ox+w]`` where inside, ``fill`` outside (float32)."""
    ny, nx = image.shape
    oy, ox = int(origin_yx[0]), int(origin_yx[1])
    h, w = shape_yx
    out = xp.full((h, w), fill, dtype=xp.float32)
    y0, y1 = max(oy, 0), min(oy + h, ny)
    x0, x1 = max(ox, 0), min(ox + w, nx)
    if y1 > y0 and x1 > x0:
        out[y0 - oy: y1 - oy, x0 - ox: x1 - ox] = image[y0:y1, x0:x1]
    return out


def _moved_regions(frames: np.ndarray, origin_yx: tuple[int, int], shape_yx: tuple[int, int],
                   shifts_px: np.ndarray, means: np.ndarray, xp: ModuleType) -> tuple[np.ndarray, np.ndarray]:
    """Regions of each frame moved by the integer part of ``shifts_px``; returns them and the fractions.

    Region ``i`` holds ``frame_i(r + round(s_i))`` for ``r`` in the box at ``origin_yx``.
    """
    whole = np.rint(shifts_px).astype(int)
    stack = xp.stack([_crop_with_fill(frames[i], (origin_yx[0] + whole[i, 0], origin_yx[1] + whole[i, 1]),
                                      shape_yx, float(means[i]), xp) for i in range(frames.shape[0])])
    return stack, shifts_px - whole


# --------------------------------------------------------------------------------------
# local motion model


def _time_basis(n_t: int) -> np.ndarray:
    """``(t, k)`` zero-mean powers t, t², t³ of the normalised frame time (fewer for short movies)."""
    tau = np.arange(n_t) / max(n_t - 1, 1)
    cols = [tau**p for p in range(1, min(3, n_t - 1) + 1)]
    b = np.stack(cols, axis=1) if cols else np.zeros((n_t, 0))
    return b - b.mean(axis=0)


def _space_basis(y: np.ndarray, x: np.ndarray, grid_yx: tuple[int, int]) -> np.ndarray:
    """``(n, m)`` quadratic terms (1, x, y, x², y², xy) of normalised positions, as the grid supports."""
    gy, gx = grid_yx
    cols = [np.ones_like(x)]
    if gx >= 2:
        cols.append(x)
    if gy >= 2:
        cols.append(y)
    if gx >= 3:
        cols.append(x * x)
    if gy >= 3:
        cols.append(y * y)
    if gx >= 2 and gy >= 2:
        cols.append(x * y)
    return np.stack(cols, axis=1)


@dataclass(frozen=True)
class _LocalModel:
    coef: np.ndarray  # (k_time * m_space, 2)
    grid_yx: tuple[int, int]
    shape_yx: tuple[int, int]
    n_t: int
    significant: bool
    f_statistic: float

    def evaluate(self, y_px: np.ndarray, x_px: np.ndarray) -> np.ndarray:
        """``(t, n, 2)`` local displacement at positions (pixels of the input frames)."""
        ny, nx = self.shape_yx
        yn = (np.asarray(y_px, float) - (ny - 1) / 2) / max((ny - 1) / 2, 1)
        xn = (np.asarray(x_px, float) - (nx - 1) / 2) / max((nx - 1) / 2, 1)
        tb = _time_basis(self.n_t)
        sb = _space_basis(yn, xn, self.grid_yx)
        design = np.einsum("tk,nm->tnkm", tb, sb).reshape(self.n_t, yn.size, -1)
        return design @ self.coef


def _fit_local_model(
    residual_px: np.ndarray, centers_yx: np.ndarray, shape_yx: tuple[int, int], p_value: float, overlap: float
) -> _LocalModel:
    """Robust weighted fit of MotionCor2's polynomial to ``(t, P, 2)`` patch residual shifts.

    Returns the spatially varying part of the model only (the spatially constant part is
    a noisier copy of the global drift), shrunk by the positive-part James-Stein factor
    ``1 - 1 / F`` and zeroed unless the F-test of the spatial terms is significant.
    """
    from scipy.stats import f as f_dist

    n_t, n_p, _ = residual_px.shape
    gy, gx = centers_yx.shape[:2]
    ny, nx = shape_yx
    yn = (centers_yx[..., 0].ravel() - (ny - 1) / 2) / max((ny - 1) / 2, 1)
    xn = (centers_yx[..., 1].ravel() - (nx - 1) / 2) / max((nx - 1) / 2, 1)
    tb = _time_basis(n_t)
    sb = _space_basis(yn, xn, (gy, gx))
    k, m = tb.shape[1], sb.shape[1]
    design = np.einsum("tk,pm->tpkm", tb, sb).reshape(n_t * n_p, k * m)
    data = residual_px.reshape(n_t * n_p, 2)
    empty = _LocalModel(np.zeros((k * m, 2)), (gy, gx), shape_yx, n_t, False, 0.0)
    # every patch trajectory is zero-mean in time: n_p * (n_t - 1) independent values per axis
    dof = 2 * (n_p * (n_t - 1) - k * m)
    q = 2 * k * (m - 1)
    if k == 0 or q == 0 or dof <= 0:
        return empty
    w_patch = np.ones(n_p)
    coef = np.zeros((k * m, 2))
    for _ in range(6):  # per-patch weights from the residual variance (noisy patches count less)
        w = np.tile(w_patch, n_t)
        sw = np.sqrt(w)[:, None]
        coef = np.linalg.lstsq(design * sw, data * sw, rcond=None)[0]
        res = (data - design @ coef).reshape(n_t, n_p, 2)
        var_p = (res**2).mean(axis=(0, 2))
        floor = max(float(np.median(var_p)) * 0.05, 1e-6)
        w_patch = 1.0 / np.maximum(var_p, floor)
    w = np.tile(w_patch, n_t)
    sw = np.sqrt(w)[:, None]
    rss1 = float(((data - design @ coef) ** 2 * w[:, None]).sum())
    const_design = design.reshape(n_t * n_p, k, m)[:, :, 0]  # the spatially constant terms only
    coef0 = np.linalg.lstsq(const_design * sw, data * sw, rcond=None)[0]
    rss0 = float(((data - const_design @ coef0) ** 2 * w[:, None]).sum())
    if rss1 <= 0:
        return empty
    # overlapping patches share pixels, so their noise is spatially correlated and inflates F;
    # (1 + overlap)^2 patches share each independent area
    f_stat = ((rss0 - rss1) / q) / (rss1 / dof) / (1.0 + overlap) ** 2
    significant = bool(f_stat > f_dist.ppf(1.0 - p_value, q, dof))
    spatial = coef.reshape(k, m, 2).copy()
    spatial[:, 0, :] = 0.0
    spatial *= max(0.0, 1.0 - 1.0 / f_stat) if significant else 0.0
    return _LocalModel(spatial.reshape(k * m, 2), (gy, gx), shape_yx, n_t, significant, float(f_stat))


# --------------------------------------------------------------------------------------
# sums


def _accumulate(spec: np.ndarray, frame_index: np.ndarray, weights: np.ndarray, sums: dict, xp: ModuleType) -> None:
    """Add aligned ``(c, ky, kx)`` spectra of frames ``frame_index`` into even/odd/dose-weighted sums."""
    even = xp.asarray((frame_index % 2 == 0).astype(np.float32))[:, None, None]
    for key, part in (("even", (spec * even).sum(axis=0)), ("odd", (spec * (1 - even)).sum(axis=0)),
                      ("dw", (spec * weights).sum(axis=0))):
        sums[key] = part if sums.get(key) is None else sums[key] + part


def _sums_global(spectra, shape_yx, shifts_px, weight_fn, xp, chunk: int = 4):
    """Even, odd and dose-weighted sums of whole-frame ``(t, ky, kx)`` spectra moved by their shifts.

    With equal frame exposures the dose weights are geometric in the frame index,
    ``w_i = w_0 r^i`` (:func:`tomodask.kernels.dose.dose_weights`), so the weighted sum is
    accumulated by Horner's scheme from the last frame, ``acc = acc r + A_i``, times
    ``w_0``: two weight arrays instead of one per frame.
    """
    n_t = spectra.shape[0]
    fy, fx = frequency_grid(shape_yx, xp=xp)
    w01 = weight_fn(shape_yx, np.arange(min(n_t, 2)))
    ratio = w01[1] / w01[0] if n_t > 1 else None  # w_0 >= 1/t: the least exposed frame weighs most
    sums: dict = {}
    dw = None
    for start in reversed(range(0, n_t, chunk)):
        idx = np.arange(start, min(start + chunk, n_t))
        moved = _shift_spectra(spectra[start: idx[-1] + 1], fy, fx, shifts_px[idx], xp)
        first = start % 2
        for key, part in (("even", moved[first::2].sum(axis=0)), ("odd", moved[1 - first::2].sum(axis=0))):
            sums[key] = part if sums.get(key) is None else sums[key] + part
        for a in moved[::-1]:
            if dw is None:
                dw = a.copy()
            else:
                dw *= ratio
                dw += a
    sums["dw"] = dw * w01[0]
    fft = _fft(xp)
    return {k: fft.irfft2(v, s=shape_yx).astype(xp.float32) for k, v in sums.items()}


def _tile_layout(n: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Core intervals ``[b_k, b_{k+1})`` of about ``tile`` pixels covering ``[0, n)``."""
    m = max(1, int(round(n / tile)))
    b = [int(round(i * n / m)) for i in range(m + 1)]
    return [(b[i], b[i + 1]) for i in range(m)]


def _blend_weights(n: int, cores: list[tuple[int, int]], k: int, overlap: int) -> np.ndarray:
    """1D weight of tile ``k`` on ``[0, n)``: sin² rise / cos² fall over ``overlap`` px at inner borders."""
    x = np.arange(n) + 0.5
    w = np.ones(n)
    lo, hi = cores[k]
    if k > 0:
        u = np.clip((x - (lo - overlap / 2)) / overlap, 0, 1)
        w *= np.sin(0.5 * np.pi * u) ** 2
    if k < len(cores) - 1:
        u = np.clip((x - (hi - overlap / 2)) / overlap, 0, 1)
        w *= np.cos(0.5 * np.pi * u) ** 2
    return w


def _sums_tiled(frames, shift_at, weight_fn, xp, tile_px: int, overlap_px: int = 32, margin_px: int = 16):
    """Even, odd and dose-weighted sums with a shift per tile and frame, tiles blended smoothly.

    ``shift_at(y, x)`` returns the ``(t, 2)`` displacement at a tile centre.
    """
    import scipy.fft

    n_t, ny, nx = frames.shape
    cores_y = _tile_layout(ny, tile_px, overlap_px)
    cores_x = _tile_layout(nx, tile_px, overlap_px)
    biggest = max(max(h - lo for lo, h in cores_y), max(h - lo for lo, h in cores_x))
    size = scipy.fft.next_fast_len(biggest + overlap_px + 2 * margin_px, real=True)
    ty, tx = (min(size, ny), min(size, nx)) if len(cores_y) == 1 and len(cores_x) == 1 else (size, size)
    fy, fx = frequency_grid((ty, tx), xp=xp)
    weights = weight_fn((ty, tx), np.arange(n_t))
    means = to_numpy(frames.mean(axis=(-2, -1), dtype=np.float32))
    wy = [_blend_weights(ny, cores_y, k, overlap_px) for k in range(len(cores_y))]
    wx = [_blend_weights(nx, cores_x, k, overlap_px) for k in range(len(cores_x))]
    out = {key: xp.zeros((ny, nx), dtype=xp.float32) for key in ("even", "odd", "dw")}
    fft = _fft(xp)
    index = np.arange(n_t)
    for ky, (y0, y1) in enumerate(cores_y):
        for kx, (x0, x1) in enumerate(cores_x):
            oy = (y0 + y1) // 2 - ty // 2
            ox = (x0 + x1) // 2 - tx // 2
            s = shift_at(0.5 * (y0 + y1 - 1), 0.5 * (x0 + x1 - 1))
            moved, frac = _moved_regions(frames, (oy, ox), (ty, tx), s, means, xp)
            sums: dict = {}
            _accumulate(_shift_spectra(fft.rfft2(moved), fy, fx, frac, xp), index, weights, sums, xp)
            # output rows/columns this tile contributes to (its weight is zero elsewhere)
            ry = np.nonzero(wy[ky])[0]
            rx = np.nonzero(wx[kx])[0]
            ry = ry[(ry >= oy) & (ry < oy + ty)]
            rx = rx[(rx >= ox) & (rx < ox + tx)]
            win = xp.asarray(np.outer(wy[ky][ry], wx[kx][rx]), dtype=xp.float32)
            for key, spec in sums.items():
                img = fft.irfft2(spec, s=(ty, tx))
                out[key][ry[0]: ry[-1] + 1, rx[0]: rx[-1] + 1] += win * img[ry[0] - oy: ry[-1] + 1 - oy,
                                                                          rx[0] - ox: rx[-1] + 1 - ox]
    return out


# --------------------------------------------------------------------------------------
# metrics


def motion_metrics(shifts_px: np.ndarray, *, early_frames: int | None = None) -> tuple[float, float, float]:
    """Total, early and late path length of a frame trajectory.

    Parameters
    ----------
    shifts_px
        ``(t, 2)`` displacements.
    early_frames
        Frames counted as early (default ``max(2, ceil(t / 4))``).

    Returns
    -------
    total_px, early_px, late_px
        Sum of frame-to-frame displacement lengths over the movie, over its first
        ``early_frames`` frames, and over the remaining ones (``early + late = total``).
    """
    s = np.asarray(shifts_px, dtype=float)
    n_t = s.shape[0]
    if n_t < 2:
        return 0.0, 0.0, 0.0
    steps = np.linalg.norm(np.diff(s, axis=0), axis=1)
    n_early = max(2, math.ceil(n_t / 4)) if early_frames is None else int(early_frames)
    n_seg = min(max(n_early - 1, 0), n_t - 1)
    return float(steps.sum()), float(steps[:n_seg].sum()), float(steps[n_seg:].sum())


# --------------------------------------------------------------------------------------
# public kernel


def _check_frames(frames_tyx, xp) -> None:
    if frames_tyx.ndim != 3:
        raise ValueError(f"frames_tyx must be a (t, y, x) stack of movie frames, got shape {frames_tyx.shape}; "
                         "add a leading axis for a single frame (frames[None])")
    if min(frames_tyx.shape[1:]) < 16:
        raise ValueError(f"frames of shape {frames_tyx.shape[1:]} are too small to align (need >= 16 px)")


def _check_finite(frames_tyx, spectra, xp) -> None:
    """Raise when a frame holds NaN or infinity (seen in its spectrum's DC term: one value per frame)."""
    if not bool(xp.isfinite(spectra[:, 0, 0]).all()):
        bad = int((~xp.isfinite(frames_tyx)).sum())
        raise ValueError(f"frames hold {bad} NaN or infinite values; check the movie file and the gain "
                         "reference (apply_gain) before aligning")


def align_frames(
    frames_tyx: np.ndarray,
    *,
    pixel_size_angstrom: float,
    dose_per_frame_e_per_angstrom2: float,
    pre_exposure_e_per_angstrom2: float = 0.0,
    bfactor_angstrom2: float = 150.0,
    patches_yx: tuple[int, int] | None = (5, 5),
    voltage_kv: float = 300.0,
    max_iterations: int = 10,
    tolerance_px: float = 0.01,
    search_pixel_size_angstrom: float | None = None,
    max_search_size_px: int = 1024,
    max_shift_fraction: float = 0.2,
    patch_overlap: float = 0.5,
    patch_bin: float = 1.5,
    local_motion_p_value: float = 1e-3,
    tile_size_px: int = 256,
    min_patch_px: int = MIN_PATCH_PX,
    early_frames: int | None = None,
    max_total_motion_angstrom: float = 100.0,
    min_cc_peak_snr: float = 5.0,
) -> FrameAlignment:
    """Align the frames of one movie and sum them (MotionCor2-style, numpy or cupy).

    Parameters
    ----------
    frames_tyx
        ``(t, y, x)`` gain-corrected frames with defects replaced (e-/px), numpy or cupy.
    pixel_size_angstrom
        Pixel size of the frames.
    dose_per_frame_e_per_angstrom2
        Exposure of one frame.
    pre_exposure_e_per_angstrom2
        Exposure before this movie (earlier tilts). The per-frequency weights are
        normalised over the movie's frames, so they depend only on the exposure between
        frames; the attenuation by earlier tilts is left to tilt-series dose weighting
        (:func:`tomodask.kernels.dose.exposure_filter`).
    bfactor_angstrom2
        B-factor of the ``exp(-B k^2 / 4)`` filter on the cross-correlation (k in 1/Å).
        The default 150 (RELION's) measured about 1.5x smaller shift errors than 500 on
        simulated low-dose tilts; 500 (MotionCor2's global value) is safer for data with
        strong high-frequency detector artefacts.
    patches_yx
        Largest patch grid for local motion, or None for global drift only. Fewer patches
        are used along a side where they would be smaller than ``min_patch_px`` (5 x 5 on
        1024² frames, 4 x 4 on 512², 3 x 3 on 384²); no local motion is measured when a
        single patch would remain.
    voltage_kv
        Acceleration voltage (critical-exposure curve).
    max_iterations, tolerance_px
        Global refinement passes at most, and the shift change (pixels of the search
        grid) below which they stop.
    search_pixel_size_angstrom
        Pixel size shifts are measured at (default ``sqrt(B / 24)``, where the filter has
        fallen to ``exp(-1.5)`` at Nyquist, and no finer than the frames; ``sqrt(B / 48)``
        measured 4 % smaller errors at 1.3-1.6x the time). The global
        search needs no real-space frames: the frames' spectra are cropped.
    max_search_size_px
        Bin further so that the search frames are at most this large.
    max_shift_fraction
        Largest displacement searched, as a fraction of the smaller frame side.
    patch_overlap
        Patches are ``(1 + patch_overlap)`` times the grid spacing.
    patch_bin
        Patches are measured on a grid this much coarser than the global search.
    local_motion_p_value
        Significance level of the F-test that keeps the local model.
    tile_size_px
        Tile size used to apply a local model to the sums.
    min_patch_px
        Smallest patch side (pixels of the input frames, overlap included) a grid may
        have: the grid along y is ``min(patches_yx[0], floor(y (1 + patch_overlap) /
        min_patch_px))``, along x likewise (default :data:`MIN_PATCH_PX`). Smaller patches
        hold too little signal to improve the fitted field and cost the same (the patches
        cover ``(1 + patch_overlap)²`` times the frame whatever their number).
    early_frames
        Frames counted as early motion (default ``max(2, ceil(t / 4))``).
    max_total_motion_angstrom
        Total motion above this flags ``quality="high_motion"``.
    min_cc_peak_snr
        First-pass median correlation peak SNR below this flags ``quality="failed"``
        (pure-noise movies give 3.5 to 4; simulated 1 e-/Å² tilts at 60 degrees about 6).

    Returns
    -------
    FrameAlignment
        Sums on the input's device; shifts, metrics and quality as numpy / Python values.

    Raises
    ------
    ValueError
        For a stack that is not ``(t, y, x)``, frames holding NaN or infinity, or invalid
        options (the message names the accepted values).

    Notes
    -----
    See the module docstring for the algorithm. Frames are moved by Fourier phase ramps
    (whole frames, periodic: a strip as wide as the shift at each edge shows the opposite
    edge) or, with local motion, tile by tile after integer moves (content from outside
    the frame is filled with the frame mean), so the sums are not blurred by
    interpolation. Memory: the frames' half-spectra are kept (about the size of the
    float32 frames).

    References
    ----------
    .. [1] Zheng, S. Q. et al. (2017). MotionCor2. Nature Methods 14, 331-332.
    .. [2] Grant, T. & Grigorieff, N. (2015). eLife 4, e06980.
    """
    xp = get_array_module(frames_tyx)
    frames_tyx = xp.asarray(frames_tyx)
    _check_frames(frames_tyx, xp)
    if not pixel_size_angstrom > 0:
        raise ValueError(f"pixel_size_angstrom must be positive, got {pixel_size_angstrom}")
    if bfactor_angstrom2 < 0:
        raise ValueError(f"bfactor_angstrom2 must be >= 0, got {bfactor_angstrom2}")
    if patches_yx is not None and (len(patches_yx) != 2 or min(patches_yx) < 1):
        raise ValueError(f"patches_yx must be None or two integers >= 1 such as (5, 5), got {patches_yx!r}")
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
    if not min_patch_px > 0:
        raise ValueError(f"min_patch_px must be positive, got {min_patch_px}")
    frames = frames_tyx.astype(xp.float32, copy=False)
    n_t, ny, nx = frames.shape

    def weight_fn(shape_yx, index):
        w = dose_weights(shape_yx, n_t, pixel_size_angstrom=pixel_size_angstrom,
                         dose_per_frame_e_per_angstrom2=dose_per_frame_e_per_angstrom2,
                         pre_exposure_e_per_angstrom2=pre_exposure_e_per_angstrom2, voltage_kv=voltage_kv,
                         xp=xp, frames=index)
        return w * xp.float32(n_t)

    # ---- spectra of all frames (kept for the sums) and the search grid (Fourier-cropped: no aliasing)
    fft = _fft(xp)
    spectra = xp.empty((n_t, ny, nx // 2 + 1), dtype=xp.complex64)
    for start in range(0, n_t, 8):
        spectra[start: start + 8] = fft.rfft2(frames[start: start + 8])
    _check_finite(frames, spectra, xp)
    target = search_pixel_size_angstrom or math.sqrt(max(bfactor_angstrom2, 1e-6) / _SEARCH_DIV)
    scale = max(1.0, target / pixel_size_angstrom, max(ny, nx) / max_search_size_px)
    by, bx = (min(n, max(16, 2 * int(round(n / scale / 2)))) for n in (ny, nx))
    factor = np.array([ny / by, nx / bx])  # input pixels per search pixel, along y and x
    bfilt_px2 = bfactor_angstrom2 / (pixel_size_angstrom * float(factor.mean())) ** 2
    filt = gaussian_bfactor_filter((by, bx), bfilt_px2, xp=xp)
    # the central cross holds the streaks of each frame's (fixed) edges and of static gradients: left out
    filt[0, :] = 0.0
    filt[:, 0] = 0.0
    search_spec = _crop_spectrum(spectra, (ny, nx), (by, bx), xp) * xp.float32(by * bx / (ny * nx))
    max_shift = max_shift_fraction * min(by, bx)

    # ---- global drift
    if n_t > 1:
        shifts_b, n_iter, converged, snr = _iterative_alignment(
            search_spec, (by, bx), filt, initial_shifts=np.zeros((n_t, 2)),
            max_iterations=max_iterations, tolerance_px=tolerance_px, max_shift_px=max_shift, coarse_first=True,
            xp=xp)
        shifts_px = to_numpy(shifts_b) * factor
        cc_snr = float(np.median(to_numpy(snr)))
    else:
        shifts_px, n_iter, converged, cc_snr = np.zeros((1, 2)), 0, True, float("nan")
    search_px = pixel_size_angstrom * float(factor.mean())

    # ---- local motion
    model = None
    local_shifts = patch_shifts = centers = None
    grid_yx = None if patches_yx is None or n_t <= 3 else _patch_grid((ny, nx), patches_yx, patch_overlap,
                                                                      min_patch_px)
    if grid_yx is not None:
        # patches are cut from frames Fourier-binned to a grid patch_bin coarser than the global search
        ly, lx = (min(n, max(16, 2 * int(round(m / patch_bin / 2)))) for n, m in ((ny, by), (nx, bx)))
        binned = fft.irfft2(_crop_spectrum(spectra, (ny, nx), (ly, lx), xp), s=(ly, lx)).astype(xp.float32)
        factor = np.array([ny / ly, nx / lx])
        patch_px_size = pixel_size_angstrom * float(factor.mean())
        model, patch_shifts, centers = _local_motion(
            binned, shifts_px / factor, factor, filt_bfactor_px2=bfactor_angstrom2 / patch_px_size**2,
            grid_yx=grid_yx, overlap=patch_overlap, max_iterations=max_iterations,
            tolerance_px=tolerance_px, p_value=local_motion_p_value, shape_yx=(ny, nx), xp=xp)
        gy, gx = centers.shape[:2]
        local = model.evaluate(centers[..., 0].ravel(), centers[..., 1].ravel()) if model.significant else 0.0
        local_shifts = (shifts_px[:, None, :] + np.zeros((1, gy * gx, 1)) + local).reshape(n_t, gy, gx, 2)
        del binned

    # ---- sums
    if model is not None and model.significant:
        def shift_at(y, x):
            return shifts_px + model.evaluate(np.array([y]), np.array([x]))[:, 0, :]

        sums = _sums_tiled(frames, shift_at, weight_fn, xp, tile_px=tile_size_px)
    else:
        sums = _sums_global(spectra, (ny, nx), shifts_px, weight_fn, xp)
    del spectra
    aligned = sums["even"] + sums["odd"]

    # ---- metrics and quality
    total, early, late = motion_metrics(shifts_px, early_frames=early_frames)
    quality, reason = "good", ""
    if not (np.all(np.isfinite(shifts_px)) and bool(xp.isfinite(aligned).all())):
        quality, reason = "failed", "non-finite shifts or sums"
    elif n_t > 1 and not cc_snr >= min_cc_peak_snr:
        quality, reason = "failed", (f"no alignment signal: correlation peak SNR {cc_snr:.1f} < {min_cc_peak_snr} "
                                     "(empty, dark or very low-dose frames)")
    elif total * pixel_size_angstrom > max_total_motion_angstrom:
        quality, reason = "high_motion", (f"total motion {total * pixel_size_angstrom:.0f} Å > "
                                          f"{max_total_motion_angstrom:.0f} Å")
    return FrameAlignment(
        aligned_sum=aligned, dose_weighted_sum=sums["dw"], even_sum=sums["even"], odd_sum=sums["odd"],
        shifts_px=shifts_px, local_shifts_px=local_shifts, patch_shifts_px=patch_shifts,
        patch_centers_yx_px=centers, local_motion_applied=bool(model is not None and model.significant),
        total_motion_px=total, early_motion_px=early, late_motion_px=late, quality=quality,
        quality_reason=reason, cc_peak_snr=cc_snr, n_iterations=n_iter, converged=converged,
        search_pixel_size_angstrom=search_px,
        extra={"local_f_statistic": None if model is None else model.f_statistic,
               "search_shape_yx": (by, bx), "patch_grid_yx": grid_yx})


def _patch_grid(shape_yx: tuple[int, int], patches_yx: tuple[int, int], overlap: float,
                min_patch_px: float) -> tuple[int, int] | None:
    """Largest grid up to ``patches_yx`` whose patches are at least ``min_patch_px``; None for a single patch.

    A patch is ``(1 + overlap)`` grid spacings wide, so ``g`` patches along a side of
    ``n`` pixels are ``n (1 + overlap) / g`` pixels wide.
    """
    grid = tuple(max(1, min(int(g), int(n * (1.0 + overlap) // min_patch_px))) for g, n in zip(patches_yx, shape_yx))
    return None if grid == (1, 1) else grid


def _local_motion(binned, shifts_b, factor, *, filt_bfactor_px2, grid_yx, overlap, max_iterations, tolerance_px,
                  p_value, shape_yx, xp):
    """Measure per-patch trajectories on the binned frames and fit the smooth local model."""
    n_t, by, bx = binned.shape
    gy, gx = grid_yx
    ph = min(by, 2 * int(math.ceil(by / gy * (1 + overlap) / 2)))
    pw = min(bx, 2 * int(math.ceil(bx / gx * (1 + overlap) / 2)))
    cy = np.linspace(ph / 2, by - ph / 2, gy) if gy > 1 else np.array([by / 2])
    cx = np.linspace(pw / 2, bx - pw / 2, gx) if gx > 1 else np.array([bx / 2])
    means = to_numpy(binned.mean(axis=(-2, -1), dtype=np.float32))
    regions, fracs, starts = [], [], []
    for yc in cy:
        for xc in cx:
            origin = (int(round(yc - ph / 2)), int(round(xc - pw / 2)))
            moved, frac = _moved_regions(binned, origin, (ph, pw), shifts_b, means, xp)
            regions.append(moved)
            fracs.append(frac)
            starts.append(origin)
    patches = xp.stack(regions)  # (P, t, ph, pw)
    spec = _spectra(patches, xp)
    del patches
    filt = gaussian_bfactor_filter((ph, pw), filt_bfactor_px2, xp=xp)
    filt[0, 0] = 0.0
    init = np.stack(fracs)  # (P, t, 2) fractional remainders of the global shifts
    rounded = shifts_b[None] - init
    local_b, _, _, _ = _iterative_alignment(
        spec, (ph, pw), filt, initial_shifts=init, max_iterations=max_iterations, tolerance_px=tolerance_px,
        max_shift_px=0.1 * min(ph, pw) + 1.0, coarse_first=False, xp=xp, settled_fraction=_PATCH_SETTLED_FRACTION)
    patch_b = rounded + to_numpy(local_b)  # (P, t, 2) patch displacement, binned px
    patch_b = patch_b - patch_b.mean(axis=1, keepdims=True)
    patch_px = np.transpose(patch_b, (1, 0, 2)) * factor  # (t, P, 2)
    start = np.asarray(starts, dtype=float).reshape(gy, gx, 2)
    # the Fourier-cropped search grid samples input position j * factor at search pixel j
    centers = (start + (np.array([ph, pw]) - 1) / 2) * factor
    global_px = shifts_b * factor
    model = _fit_local_model(patch_px - global_px[:, None, :], centers, shape_yx, p_value, overlap)
    return model, patch_px.reshape(n_t, gy, gx, 2), centers
