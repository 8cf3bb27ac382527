"""Fiducial-less tilt-series alignment: shifts, tilt-axis angle and tilt-angle offset.

Steps of :func:`align_tilt_series` (all at a binned "alignment" pixel size, ~12 Å):

1. **Exclusion.** :func:`tomodask.kernels.tilt_exclusion.find_bad_tilts` drops dark,
   blank, drifting and CTF-failed tilts and those the user excluded.
2. **Coarse shifts.** Cross-correlation of neighbouring tilts, working outwards from the
   tilt nearest 0°, the higher tilt stretched perpendicular to the axis by
   ``cos(theta_ref) / cos(theta)`` (IMOD ``tiltxcorr``). Each tilt is compared with the
   nearest tilt that correlated well, so one failed tilt does not break the chain.
3. **Tilt-axis angle** by common lines: every projection of a single-axis tilt-series
   holds the same projection onto the tilt axis. For candidate angles, the aligned
   images are summed perpendicular to the axis, the 1D profiles are re-aligned along the
   axis, and the angle with the most consistent profiles wins (coarse grid, then a
   parabola through the best point). Steps 2-3 repeat once with the new angle.
4. **Projection matching.** The aligned stack is reconstructed by weighted
   back-projection; for every tilt the reconstruction *without that tilt* is reprojected
   at its angle and cross-correlated with it (the tilt's own back-projection is removed
   exactly with the linear projector of :mod:`tomodask.kernels.projector`). Iterated;
   the common mean of the corrections (a translation of the tomogram) is removed.
5. **Specimen centring** (before step 4). Correlation follows the strongest layer (e.g.
   gold on one surface); a thick reconstruction finds the centre height ``z0`` of the
   specimen's structure and the shifts change by ``z0 sin(theta)`` perpendicular to the
   axis, so the specimen sits in the matched slab. The tilt-angle offset is NOT estimated
   yet: ``tilt_angle_offset_deg`` is 0 and the refined angles are the given ones
   (:func:`specimen_pitch_and_height` can measure the slab slope but is not validated).
   A final common-line search of +-1 deg follows the matching.
6. **Failure detection.** A tilt whose normalised correlation with its reprojection is
   far below the others', or whose shift jumps, is excluded with reason
   ``"alignment failed (...)"`` rather than returned as junk.

Shifts follow :mod:`tomodask.kernels.geometry`: *displacements* ``(dy, dx)`` of each
image's content, in input pixels. :func:`apply_alignment` undoes them and rotates the
axis onto Y in one interpolation.

References
----------
.. [1] Mastronarde, D. N. & Held, S. R. (2017). Automated tilt series alignment and
   tomographic reconstruction in IMOD. J. Struct. Biol. 197, 102-113.
.. [2] Zheng, S. et al. (2022). AreTomo: an integrated software package for automated
   marker-free, motion-corrected cryo-electron tomographic alignment and reconstruction.
   J. Struct. Biol. X 6, 100068 (projection matching, common-line axis search).
.. [3] Dengler, J. (1989). A multi-resolution approach to the 3D reconstruction from an
   electron microscope tilt series solving the alignment problem without gold particles.
   Ultramicroscopy 30, 337-348.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from tomodask.backend import get_array_module, scipy_ndimage, to_numpy
from tomodask.kernels.fourier import fourier_crop, frequency_grid
from tomodask.kernels.projector import backproject, backprojection_matrix, project_volume
from tomodask.kernels.reconstruct import reconstruction_filter
from tomodask.kernels.tilt_exclusion import ALIGNMENT_FAILED, find_bad_tilts

FILLS = ("mean", "zero")


# --------------------------------------------------------------------------- geometry


def _rot_xy(angle_deg: float) -> np.ndarray:
    """2x2 counter-clockwise rotation acting on ``(x, y)`` column vectors."""
    a = np.deg2rad(angle_deg)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def _stretch_xy(tilt_axis_angle_deg: float, factor: float) -> np.ndarray:
    """Matrix scaling ``(x, y)`` by ``factor`` perpendicular to the axis, 1 along it."""
    r = _rot_xy(tilt_axis_angle_deg)
    return r @ np.diag([factor, 1.0]) @ r.T


def _xy_to_yx(m: np.ndarray) -> np.ndarray:
    """The same linear map written for ``(y, x)`` (row, column) vectors."""
    return m[::-1, ::-1].copy()


def _warp(image, matrix_xy: np.ndarray, shift_yx, *, output_shape_yx, order: int, cval: float):
    """``out(r') = image(M r' + s)`` with coordinates from each image's centre."""
    xp = get_array_module(image)
    ndi = scipy_ndimage(xp)
    m = _xy_to_yx(np.asarray(matrix_xy, dtype=np.float64))
    c_in = (np.asarray(image.shape, dtype=np.float64) - 1) / 2
    c_out = (np.asarray(output_shape_yx, dtype=np.float64) - 1) / 2
    offset = c_in + np.asarray(shift_yx, dtype=np.float64) - m @ c_out
    return ndi.affine_transform(image, xp.asarray(m), offset=tuple(float(o) for o in offset),
                                output_shape=tuple(int(n) for n in output_shape_yx), order=order,
                                mode="constant", cval=float(cval), prefilter=order > 1)


def apply_alignment(
    images_tyx: np.ndarray,
    *,
    shifts_px: np.ndarray,
    tilt_axis_angle_deg: float,
    output_shape_yx: tuple[int, int] | None = None,
    order: int = 3,
    fill: str = "mean",
) -> np.ndarray:
    """Undo each tilt's displacement and rotate the tilt axis onto the image Y axis.

    Parameters
    ----------
    images_tyx
        ``(t, y, x)`` raw tilt images, numpy or cupy.
    shifts_px
        ``(t, 2)`` displacements ``(dy, dx)`` of each image's content in pixels of
        ``images_tyx`` (as :func:`align_tilt_series` returns them, scaled to this
        binning).
    tilt_axis_angle_deg
        Tilt-axis angle, counter-clockwise from Y.
    output_shape_yx
        Shape of the aligned images (default: the input's). Centres map to centres.
    order
        Spline order of the one interpolation (1: linear, 3: cubic).
    fill
        Value outside the raw image: ``"mean"`` (each image's mean) or ``"zero"``.

    Returns
    -------
    ndarray
        ``(t, y', x')`` float32 aligned stack: ``aligned(r') = raw(R(a) r' + s)``, so a
        specimen feature on the tilt axis appears on the central column and the stack is
        ready for :func:`tomodask.kernels.reconstruct.reconstruct_tomogram`.
    """
    if fill not in FILLS:
        raise ValueError(f"fill={fill!r} is not one of {FILLS}")
    xp = get_array_module(images_tyx)
    n_t = images_tyx.shape[0]
    shifts = np.asarray(to_numpy(shifts_px), dtype=np.float64).reshape(-1, 2)
    if len(shifts) != n_t:
        raise ValueError(f"{n_t} images but {len(shifts)} shifts; give one (dy, dx) per tilt")
    out_shape = tuple(images_tyx.shape[1:]) if output_shape_yx is None else tuple(output_shape_yx)
    rot = _rot_xy(tilt_axis_angle_deg)
    out = xp.empty((n_t,) + out_shape, dtype=xp.float32)
    for i in range(n_t):
        img = images_tyx[i].astype(xp.float32)
        cval = float(img.mean()) if fill == "mean" else 0.0
        out[i] = _warp(img, rot, shifts[i], output_shape_yx=out_shape, order=order, cval=cval)
    return out


# --------------------------------------------------------------------------- filters


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
    """Band-pass, taper and normalised cross-correlation of same-shape images (zero-padded)."""

    def __init__(self, shape_yx, *, lowpass_px: float, highpass_px: float, taper: float, xp: ModuleType,
                 mask=None):
        self.xp = xp
        self.shape = tuple(shape_yx)
        self.pad = tuple(2 * n for n in self.shape)
        self.filt = _bandpass(self.shape, lowpass_px=lowpass_px, highpass_px=highpass_px, xp=xp)
        self.mask = _taper(self.shape, fraction=taper, xp=xp) if mask is None else mask
        self.mask_sum = float(self.mask.sum())

    def prepare(self, image):
        """Padded spectrum of the filtered, masked, zero-mean, unit-norm image."""
        xp = self.xp
        f = xp.fft.irfft2(xp.fft.rfft2(image.astype(xp.float32)) * self.filt, s=self.shape)
        f = (f - float((f * self.mask).sum()) / self.mask_sum) * self.mask
        norm = float(xp.sqrt((f * f).sum())) or 1.0
        return xp.fft.rfft2(f / norm, s=self.pad)

    def peak(self, moved, ref, *, max_shift_px: float) -> tuple[float, float, float]:
        """Displacement ``(dy, dx)`` of the moved image relative to the reference, and NCC."""
        xp = self.xp
        return _peak(xp.fft.irfft2(moved * xp.conj(ref), s=self.pad), max_shift_px=max_shift_px)


def _peak(cc, *, max_shift_px: float) -> tuple[float, float, float]:
    """Sub-pixel peak of a circular correlation map within a radius of zero shift."""
    xp = get_array_module(cc)
    ny, nx = cc.shape
    fy, fx = frequency_grid((ny, nx), xp=xp, rfft=False)
    r2 = (fy * ny) ** 2 + (fx * nx) ** 2
    work = xp.where(r2 <= max_shift_px**2, cc, -xp.inf)
    iy, ix = divmod(int(xp.argmax(work)), nx)
    c0 = float(cc[iy, ix])

    def refine(cm: float, cp: float) -> float:
        denom = cm - 2.0 * c0 + cp
        return 0.0 if denom >= 0 else float(np.clip(0.5 * (cm - cp) / denom, -0.5, 0.5))

    ddy = refine(float(cc[(iy - 1) % ny, ix]), float(cc[(iy + 1) % ny, ix]))
    ddx = refine(float(cc[iy, (ix - 1) % nx]), float(cc[iy, (ix + 1) % nx]))
    dy = ((iy + ny // 2) % ny) - ny // 2 + ddy
    dx = ((ix + nx // 2) % nx) - nx // 2 + ddx
    return float(dy), float(dx), c0


# --------------------------------------------------------------------------- coarse


def coarse_align_shifts(
    images_tyx: np.ndarray,
    tilt_angles_deg: np.ndarray,
    *,
    tilt_axis_angle_deg: float,
    usable: np.ndarray | None = None,
    lowpass_px: float = 2.5,
    highpass_px: float = 30.0,
    max_shift_fraction: float = 0.6,
    min_relative_correlation: float = 0.3,
    n_references: int = 3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shifts from cross-correlating neighbouring tilts with cosine stretching.

    Parameters
    ----------
    images_tyx
        ``(t, y, x)`` tilt images (binned to the alignment pixel size, zero-mean contrast).
    tilt_angles_deg
        ``(t,)`` tilt angles.
    tilt_axis_angle_deg
        Tilt-axis angle, counter-clockwise from Y.
    usable
        ``(t,)`` bool; unusable tilts are skipped (their shifts are NaN).
    lowpass_px, highpass_px
        Gaussian band-pass: wavelengths kept between these, in pixels.
    max_shift_fraction
        Largest relative shift searched, as a fraction of the image size.
    min_relative_correlation
        A pair whose normalised correlation is below this fraction of the running median
        marks the tilt as failed; the next tilt is compared with the last good one.
    n_references
        The reference of each tilt is the sum of this many previously aligned good tilts
        (each stretched and shifted to look like the nearest one): it holds more of the
        specimen than one image, so a large shift is still found.

    Returns
    -------
    shifts_px, correlation, failed
        ``(t, 2)`` displacements ``(dy, dx)`` relative to the tilt nearest 0°, ``(t,)``
        normalised correlation with the reference tilt, ``(t,)`` bool failures.

    Notes
    -----
    If ``S`` stretches the higher tilt (``cur``) onto the frame of ``ref`` (factor
    ``k = cos(theta_ref) / cos(theta)`` perpendicular to the axis), the correlation peak
    ``d`` of ``cur(S^-1 r)`` against ``ref`` gives ``s_cur = S^-1 (s_ref + d)``.
    """
    xp = get_array_module(images_tyx)
    n_t = images_tyx.shape[0]
    angles = np.asarray(tilt_angles_deg, dtype=np.float64)
    usable = np.ones(n_t, bool) if usable is None else np.asarray(usable, bool)
    shape = images_tyx.shape[1:]
    corr = _Correlator(shape, lowpass_px=lowpass_px, highpass_px=highpass_px, taper=0.1, xp=xp)
    max_shift = max_shift_fraction * min(shape)
    shifts = np.full((n_t, 2), np.nan)
    ncc = np.full(n_t, np.nan)
    failed = np.zeros(n_t, bool)
    idx = np.flatnonzero(usable)
    if len(idx) == 0:
        return shifts, ncc, failed
    start = int(idx[np.argmin(np.abs(angles[idx]))])
    shifts[start] = 0.0
    ncc[start] = 1.0
    cos_t = np.cos(np.deg2rad(angles))
    for direction in (1, -1):
        chain = [start]
        history: list[float] = []
        i = start + direction
        while 0 <= i < n_t:
            if usable[i]:
                ref = chain[-1]
                # Reference: the last good tilts, each warped to look like `ref` at its shift.
                reference = None
                for j in chain[-n_references:]:
                    m_j = _stretch_xy(tilt_axis_angle_deg, cos_t[j] / cos_t[ref])
                    off = shifts[j] - (m_j @ shifts[ref][::-1])[::-1]
                    warped = _warp(images_tyx[j].astype(xp.float32), m_j, off, output_shape_yx=shape, order=1,
                                   cval=0.0)
                    reference = warped if reference is None else reference + warped
                s_inv = np.linalg.inv(_stretch_xy(tilt_axis_angle_deg, cos_t[ref] / cos_t[i]))
                stretched = _warp(images_tyx[i].astype(xp.float32), s_inv, (0.0, 0.0), output_shape_yx=shape,
                                  order=1, cval=0.0)
                dy, dx, c = corr.peak(corr.prepare(stretched), corr.prepare(reference), max_shift_px=max_shift)
                shifts[i] = (s_inv @ (shifts[ref][::-1] + np.array([dx, dy])))[::-1]
                ncc[i] = c
                typical = float(np.median(history)) if history else c
                if c < min_relative_correlation * typical:
                    failed[i] = True
                else:
                    history = (history + [c])[-5:]
                    chain.append(i)
            i += direction
    return shifts, ncc, failed
    start = int(idx[np.argmin(np.abs(angles[idx]))])
    shifts[start] = 0.0
    ncc[start] = 1.0
    for direction in (1, -1):
        ref = start
        ref_spec = corr.prepare(images_tyx[start])
        history: list[float] = []
        i = start + direction
        while 0 <= i < n_t:
            if usable[i]:
                k = np.cos(np.deg2rad(angles[ref])) / np.cos(np.deg2rad(angles[i]))
                s_mat = _stretch_xy(tilt_axis_angle_deg, k)
                s_inv = np.linalg.inv(s_mat)
                stretched = _warp(images_tyx[i].astype(xp.float32), s_inv, (0.0, 0.0), output_shape_yx=shape,
                                  order=1, cval=0.0)
                dy, dx, c = corr.peak(corr.prepare(stretched), ref_spec, max_shift_px=max_shift)
                s_xy = s_inv @ (shifts[ref][::-1] + np.array([dx, dy]))
                shifts[i] = s_xy[::-1]
                ncc[i] = c
                typical = float(np.median(history)) if history else c
                if c < min_relative_correlation * typical:
                    failed[i] = True
                else:
                    history.append(c)
                    history = history[-5:]
                    ref = i
                    ref_spec = corr.prepare(images_tyx[i])
            i += direction
    return shifts, ncc, failed


# --------------------------------------------------------------------------- tilt axis


def _soft_disk(shape_yx, *, radius_fraction: float, xp: ModuleType):
    ny, nx = shape_yx
    y = np.arange(ny)[:, None] - (ny - 1) / 2
    x = np.arange(nx)[None, :] - (nx - 1) / 2
    r = np.sqrt(x**2 + y**2) / (radius_fraction * min(ny, nx))
    return xp.asarray(np.clip((1.0 - r) / 0.15, 0.0, 1.0).astype(np.float32))


def _profile_consistency(profiles) -> float:
    """Mean correlation of 1D profiles with the mean of the others, after 1D re-alignment."""
    xp = get_array_module(profiles)
    n_t, n = profiles.shape
    f = xp.fft.rfftfreq(2 * n).astype(xp.float32)
    p = profiles - profiles.mean(axis=1, keepdims=True)
    spec = xp.fft.rfft(p, n=2 * n)
    for _ in range(2):
        total = spec.sum(axis=0)
        cc = xp.fft.irfft((total[None] - spec) * xp.conj(spec), n=2 * n)
        lim = n // 4
        window = xp.concatenate([cc[:, : lim + 1], cc[:, -lim:]], axis=1)
        j = xp.argmax(window, axis=1)
        lag = xp.where(j <= lim, j, j - (2 * lim + 1)).astype(xp.float32)
        jj = xp.where(j <= lim, j, 2 * n - (2 * lim + 1) + j)
        rows = xp.arange(n_t)
        c0 = cc[rows, jj % (2 * n)]
        cm = cc[rows, (jj - 1) % (2 * n)]
        cp = cc[rows, (jj + 1) % (2 * n)]
        den = cm - 2 * c0 + cp
        frac = xp.where(den < 0, 0.5 * (cm - cp) / xp.where(den < 0, den, -1.0), 0.0)
        lag = lag + xp.clip(frac, -0.5, 0.5)
        # cc peaks at -(displacement of profile i) relative to the others: move it back.
        spec = spec * xp.exp(2j * np.pi * f[None, :] * lag[:, None]).astype(xp.complex64) ** -1
    total = spec.sum(axis=0)
    others = total[None] - spec
    num = xp.real((others * xp.conj(spec)).sum(axis=1))
    den = xp.sqrt(xp.real((others * xp.conj(others)).sum(axis=1)) * xp.real((spec * xp.conj(spec)).sum(axis=1)))
    return float((num / xp.maximum(den, 1e-20)).mean())


def common_line_score(
    images_tyx: np.ndarray,
    *,
    shifts_px: np.ndarray,
    tilt_axis_angle_deg: float,
    lowpass_px: float = 1.5,
    highpass_px: float = 30.0,
) -> float:
    """How well the projections onto a candidate tilt axis agree across tilts.

    Parameters
    ----------
    images_tyx
        ``(t, y, x)`` usable tilt images (zero-mean contrast, alignment pixel size).
    shifts_px
        ``(t, 2)`` current displacements ``(dy, dx)``.
    tilt_axis_angle_deg
        Candidate tilt-axis angle.
    lowpass_px, highpass_px
        1D band-pass of the profiles (wavelengths in pixels).

    Returns
    -------
    float
        Mean normalised correlation of each tilt's profile along the axis with the sum of
        the others' after re-aligning them along the axis; highest at the true angle.
    """
    xp = get_array_module(images_tyx)
    shape = images_tyx.shape[1:]
    aligned = apply_alignment(images_tyx, shifts_px=shifts_px, tilt_axis_angle_deg=tilt_axis_angle_deg,
                              order=1, fill="zero")
    disk = _soft_disk(shape, radius_fraction=0.45, xp=xp)
    prof = (aligned * disk[None]).sum(axis=2)
    n = prof.shape[1]
    f = xp.fft.rfftfreq(n).astype(xp.float32)
    filt = xp.exp(-(f**2) * lowpass_px**2 / 2) * (1 - xp.exp(-(f**2) * highpass_px**2 / 2))
    prof = xp.fft.irfft(xp.fft.rfft(prof, axis=1) * filt[None], n=n, axis=1)
    return _profile_consistency(prof.astype(xp.float32))


def refine_tilt_axis_angle(
    images_tyx: np.ndarray,
    *,
    shifts_px: np.ndarray,
    tilt_axis_angle_deg: float,
    search_range_deg: float = 6.0,
    step_deg: float = 1.0,
    lowpass_px: float = 1.5,
    highpass_px: float = 30.0,
) -> tuple[float, float]:
    """Refine the tilt-axis angle by common lines from a nominal value.

    Parameters
    ----------
    images_tyx
        ``(t, y, x)`` usable tilt images (zero-mean contrast, alignment pixel size).
    shifts_px
        ``(t, 2)`` displacements ``(dy, dx)`` (coarse alignment is enough: errors along
        the axis are re-fitted per candidate, errors across it do not matter).
    tilt_axis_angle_deg
        Starting (nominal) angle.
    search_range_deg, step_deg
        Grid searched around the start; then a finer grid and a parabola around the best.
    lowpass_px, highpass_px
        Band-pass of the profiles.

    Returns
    -------
    angle_deg, score
        Refined angle and its :func:`common_line_score`.
    """
    def score(a: float) -> float:
        return common_line_score(images_tyx, shifts_px=shifts_px, tilt_axis_angle_deg=a,
                                 lowpass_px=lowpass_px, highpass_px=highpass_px)

    grid = tilt_axis_angle_deg + np.arange(-search_range_deg, search_range_deg + 1e-9, step_deg)
    values = np.array([score(a) for a in grid])
    best = float(grid[int(np.argmax(values))])
    step = step_deg
    for _ in range(2):
        step /= 4.0
        fine = best + step * np.arange(-3, 4)
        fvals = np.array([score(a) for a in fine])
        j = int(np.argmax(fvals))
        best = float(fine[j])
        if 0 < j < len(fine) - 1:
            den = fvals[j - 1] - 2 * fvals[j] + fvals[j + 1]
            if den < 0:
                best = float(fine[j] + step * 0.5 * (fvals[j - 1] - fvals[j + 1]) / den)
    return best, score(best)


# --------------------------------------------------------------------------- projection matching


def _ramp_filtered(aligned_tyx, tilt_angles_deg: np.ndarray, *, thickness_px: int, radial_cutoff: float):
    """Rows weighted for back-projection (ramp x angular interval, Gaussian roll-off)."""
    xp = get_array_module(aligned_tyx)
    n_t, ny, nx = aligned_tyx.shape
    n_pad = 2 * nx
    filt = reconstruction_filter(tilt_angles_deg, n_pad, weighting="ramp", thickness_px=thickness_px,
                                 radial_cutoff=radial_cutoff, radial_falloff=0.05, xp=xp)
    spec = xp.fft.rfft(aligned_tyx.astype(xp.float32), n=n_pad, axis=2)
    return xp.fft.irfft(spec * filt[:, None, :], n=n_pad, axis=2)[:, :, :nx].astype(xp.float32)


def leave_one_out_reprojections(
    aligned_tyx: np.ndarray,
    tilt_angles_deg: np.ndarray,
    *,
    thickness_px: int,
    radial_cutoff: float = 0.3,
    z_offset_px: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Reproject, at each tilt's angle, the reconstruction made from all other tilts.

    Parameters
    ----------
    aligned_tyx
        ``(t, y, x)`` aligned tilts (axis along y), zero-mean contrast.
    tilt_angles_deg
        ``(t,)`` tilt angles.
    thickness_px
        Thickness of the reconstructed slab, in pixels.
    radial_cutoff
        Low-pass of the weighting filter (cycles/px).
    z_offset_px
        Height of the slab centre above the rotation centre.

    Returns
    -------
    reprojections, volume
        ``(t, y, x)`` leave-one-out reprojections and the ``(z, y, x)`` reconstruction
        from all tilts.

    Notes
    -----
    With the back-projector ``B = [B_1 ... B_t]`` and filtered projections ``p_j``, the
    reprojection of tilt i from the others is ``B_i^T (B p - B_i p_i)``; the self-term
    ``B_i^T B_i p_i`` is a small banded ``(x, x)`` matrix per tilt.
    """
    xp = get_array_module(aligned_tyx)
    n_t, ny, nx = aligned_tyx.shape
    filtered = _ramp_filtered(aligned_tyx, tilt_angles_deg, thickness_px=thickness_px,
                              radial_cutoff=radial_cutoff)
    volume = backproject(filtered, tilt_angles_deg, thickness_px=thickness_px, z_offset_px=z_offset_px)
    reproj = project_volume(volume, tilt_angles_deg, n_detector_px=nx, z_offset_px=z_offset_px)
    mat = backprojection_matrix(tilt_angles_deg, n_detector_px=nx, shape_zx=(thickness_px, nx),
                                z_offset_px=z_offset_px, xp=xp)
    mat_csc = mat.tocsc()
    for i in range(n_t):
        block = mat_csc[:, i * nx:(i + 1) * nx]
        gram = (block.T @ block).tocsr()
        reproj[i] -= (gram @ filtered[i].T).T
    return reproj, volume


def _projection_matching(binned, angles, *, axis_deg: float, shifts_bin: np.ndarray, use: np.ndarray,
                         thickness_px: int, n_iterations: int, lowpass_px: float, highpass_px: float):
    """Iterated leave-one-out projection matching; returns shifts, last correction and NCC."""
    xp = get_array_module(binned)
    shape = binned.shape[1:]
    idx = np.flatnonzero(use)
    mask = _taper(shape, fraction=0.2, xp=xp) * _soft_disk(shape, radius_fraction=0.48, xp=xp)
    corr = _Correlator(shape, lowpass_px=lowpass_px, highpass_px=highpass_px, taper=0.2, xp=xp, mask=mask)
    rot = _rot_xy(axis_deg)
    shifts = shifts_bin.copy()
    last = np.zeros(len(angles))
    ncc = np.full(len(angles), np.nan)
    max_shift = 0.15 * min(shape)
    for _ in range(n_iterations):
        aligned = apply_alignment(binned[idx], shifts_px=shifts[idx], tilt_axis_angle_deg=axis_deg, order=1,
                                  fill="zero")
        reproj, _ = leave_one_out_reprojections(aligned, angles[idx], thickness_px=thickness_px)
        update = np.zeros((len(idx), 2))
        for k, i in enumerate(idx):
            dv, du, c = corr.peak(corr.prepare(aligned[k]), corr.prepare(reproj[k]), max_shift_px=max_shift)
            update[k] = (rot @ np.array([du, dv]))[::-1]
            ncc[i] = c
        update -= np.median(update, axis=0)
        shifts[idx] += update
        last[idx] = np.hypot(update[:, 0], update[:, 1])
    return shifts, last, ncc



# --------------------------------------------------------------------------- specimen geometry


def specimen_pitch_and_height(volume_zyx: np.ndarray, *, max_pitch_deg: float = 10.0,
                              step_deg: float = 0.5) -> tuple[float, float]:
    """Slope and centre height of the specimen slab in a reconstruction.

    Parameters
    ----------
    volume_zyx
        ``(z, y, x)`` reconstruction (any contrast), y along the tilt axis.
    max_pitch_deg, step_deg
        Slopes searched.

    Returns
    -------
    pitch_deg, z_center_px
        Angle of the slab in the ``(x, z)`` plane (``z = x tan(pitch) + z0``, counter-
        clockwise from +x toward +z) and ``z0``, the height of its centre above the
        volume centre, in voxels.

    Notes
    -----
    The structure energy ``E(z, x) = sum_y V^2`` is sheared by each candidate slope and
    summed over x; the slope whose z-profile is most compact (smallest second moment
    above the noise floor) is the slab's.
    """
    xp = get_array_module(volume_zyx)
    v = volume_zyx - volume_zyx.mean(axis=(1, 2), keepdims=True)
    energy = to_numpy((v * v).sum(axis=1)).astype(np.float64)  # (z, x)
    nz, nx = energy.shape
    z = np.arange(nz) - (nz - 1) / 2
    x = np.arange(nx) - (nx - 1) / 2

    def profile(pitch: float) -> np.ndarray:
        tan = np.tan(np.deg2rad(pitch))
        out = np.zeros(nz)
        for j in range(nx):
            out += np.interp(z + x[j] * tan, z, energy[:, j], left=0.0, right=0.0)
        return out

    def spread(p: np.ndarray) -> tuple[float, float]:
        w = np.clip(p - np.percentile(p, 10), 0.0, None)
        total = w.sum() or 1.0
        centre = float((w * z).sum() / total)
        return float(np.sqrt((w * (z - centre) ** 2).sum() / total)), centre

    pitches = np.arange(-max_pitch_deg, max_pitch_deg + 1e-9, step_deg)
    spreads = np.array([spread(profile(p))[0] for p in pitches])
    j = int(np.argmin(spreads))
    best = float(pitches[j])
    if 0 < j < len(pitches) - 1:
        den = spreads[j - 1] - 2 * spreads[j] + spreads[j + 1]
        if den > 0:
            best += step_deg * 0.5 * (spreads[j - 1] - spreads[j + 1]) / den
    _, centre = spread(profile(best))
    del xp
    return best, centre


# --------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class TiltSeriesAlignment:
    """Result of :func:`align_tilt_series` (conventions: :mod:`tomodask.kernels.geometry`).

    Attributes
    ----------
    shifts_px
        ``(t, 2)`` displacements ``(dy, dx)`` of each tilt's content, input pixels (NaN
        for tilts excluded before alignment).
    tilt_axis_angle_deg
        Refined tilt-axis angle, counter-clockwise from Y.
    tilt_angles_deg
        ``(t,)`` refined tilt angles: the given ones plus ``tilt_angle_offset_deg``.
    tilt_angle_offset_deg
        Offset added to the given angles (0: not estimated yet).
    residual_px
        ``(t,)`` size of the last projection-matching correction, input pixels (how far
        the tilt still moved when alignment stopped; NaN for excluded tilts).
    correlation
        ``(t,)`` normalised correlation of each tilt with its leave-one-out reprojection.
    excluded
        ``(t,)`` bool, True for tilts to leave out of reconstruction.
    exclusion_reason
        ``(t,)`` reasons (``""`` for kept tilts), see
        :data:`tomodask.kernels.tilt_exclusion.EXCLUSION_REASONS`.
    pixel_size_angstrom, alignment_pixel_size_angstrom
        Input pixel size and the binned pixel size alignment worked at.
    nominal_tilt_axis_angle_deg
        The starting tilt-axis angle.
    specimen_z_offset_angstrom
        Height of the specimen centre above the rotation centre found before centring
        (the shifts include the correction).
    """

    shifts_px: np.ndarray
    tilt_axis_angle_deg: float
    tilt_angles_deg: np.ndarray
    tilt_angle_offset_deg: float
    residual_px: np.ndarray
    correlation: np.ndarray
    excluded: np.ndarray
    exclusion_reason: tuple[str, ...]
    pixel_size_angstrom: float
    alignment_pixel_size_angstrom: float
    nominal_tilt_axis_angle_deg: float
    specimen_z_offset_angstrom: float = 0.0

    def xf_transforms(self) -> np.ndarray:
        """``(t, 2, 3)`` IMOD ``.xf`` transforms (raw -> aligned, input pixels).

        Excluded tilts without a shift get the rotation and zero shift.
        """
        from tomodask.io.imod import xf_from_alignment

        return xf_from_alignment(np.nan_to_num(self.shifts_px), self.tilt_axis_angle_deg)

    def write_imod(self, directory: str | Path, name: str) -> dict[str, Path]:
        """Write ``name.xf``, ``name.tlt`` and ``name.rawtlt`` (and ``name_exclude.txt``).

        Parameters
        ----------
        directory
            Folder to write into (created if missing).
        name
            Base name of the tilt-series.

        Returns
        -------
        dict
            Paths written, keyed by ``"xf"``, ``"tlt"``, ``"rawtlt"``, ``"exclude"``.
            ``name_exclude.txt`` lists the excluded views 1-based, comma-separated, as
            IMOD's ``EXCLUDELIST`` takes them.
        """
        from tomodask.io.imod import write_tlt, write_xf

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "xf": write_xf(out / f"{name}.xf", self.xf_transforms()),
            "tlt": write_tlt(out / f"{name}.tlt", self.tilt_angles_deg),
            "rawtlt": write_tlt(out / f"{name}.rawtlt", self.tilt_angles_deg - self.tilt_angle_offset_deg),
        }
        views = ",".join(str(i + 1) for i in np.flatnonzero(self.excluded))
        paths["exclude"] = out / f"{name}_exclude.txt"
        paths["exclude"].write_text(views + "\n", encoding="ascii")
        return paths


def _robust_low(values: np.ndarray, keep: np.ndarray, fraction: float) -> np.ndarray:
    """Tilts whose value is below ``fraction`` of the median of the kept ones."""
    ref = float(np.median(values[keep])) if keep.any() else 0.0
    return keep & ~(values >= fraction * ref)


def align_tilt_series(
    images_tyx: np.ndarray,
    tilt_angles_deg: np.ndarray,
    *,
    pixel_size_angstrom: float,
    tilt_axis_angle_deg: float,
    alignment_pixel_size_angstrom: float = 12.0,
    specimen_thickness_angstrom: float = 2000.0,
    motion_px: np.ndarray | None = None,
    ctf_fit_resolution_angstrom: np.ndarray | None = None,
    user_excluded: tuple[int, ...] = (),
    refine_tilt_axis: bool = True,
    tilt_axis_search_deg: float = 6.0,
    n_projection_matching_iterations: int = 4,
    center_specimen: bool = True,
    lowpass_angstrom: float = 18.0,
    highpass_angstrom: float = 240.0,
    min_relative_correlation: float = 0.5,
) -> TiltSeriesAlignment:
    """Align a tilt-series without fiducials (see the module docstring for the steps).

    Parameters
    ----------
    images_tyx
        ``(t, y, x)`` tilt images (gain-corrected sums), numpy or cupy.
    tilt_angles_deg
        ``(t,)`` nominal (stage) tilt angles.
    pixel_size_angstrom
        Pixel size of ``images_tyx``.
    tilt_axis_angle_deg
        Nominal tilt-axis angle (the mdoc's), counter-clockwise from Y.
    alignment_pixel_size_angstrom
        Pixel size alignment works at (Fourier binning; no binning if smaller than the
        input's).
    specimen_thickness_angstrom
        Thickness of the slab reconstructed for projection matching (capped at the image
        width).
    motion_px, ctf_fit_resolution_angstrom, user_excluded
        Passed to :func:`tomodask.kernels.tilt_exclusion.find_bad_tilts`.
    refine_tilt_axis
        Refine the tilt-axis angle by common lines (searching ``tilt_axis_search_deg``
        either side of the nominal one); else keep the nominal angle.
    n_projection_matching_iterations
        Rounds of leave-one-out projection matching (0: coarse shifts only).
    center_specimen
        Move the rotation centre to the centre height of the specimen.
    lowpass_angstrom, highpass_angstrom
        Band-pass of the correlations (wavelengths kept between them).
    min_relative_correlation
        A tilt whose correlation with its reprojection is below this fraction of the
        median is reported as ``"alignment failed (...)"`` and excluded.

    Returns
    -------
    TiltSeriesAlignment

    Raises
    ------
    ValueError
        With fewer than three usable tilts, or mismatched per-tilt arrays.
    """
    xp = get_array_module(images_tyx)
    n_t, ny, nx = images_tyx.shape
    angles = np.asarray(to_numpy(tilt_angles_deg), dtype=np.float64).ravel()
    if angles.shape != (n_t,):
        raise ValueError(f"{n_t} images but {angles.shape[0]} tilt angles; give one angle per tilt")
    reasons = list(find_bad_tilts(images_tyx, tilt_angles_deg=angles, motion_px=motion_px,
                                  ctf_fit_resolution_angstrom=ctf_fit_resolution_angstrom,
                                  user_excluded=user_excluded))
    use = np.array([r == "" for r in reasons])
    if use.sum() < 3:
        raise ValueError(f"only {int(use.sum())} usable tilts ({reasons}); alignment needs at least 3")

    # Bin to the alignment pixel size (even sizes; per-axis factors b = n / n_binned).
    factor = min(1.0, pixel_size_angstrom / alignment_pixel_size_angstrom)
    by_, bx_ = max(2, 2 * int(round(ny * factor / 2))), max(2, 2 * int(round(nx * factor / 2)))
    bin_yx = np.array([ny / by_, nx / bx_])
    px_b = float(pixel_size_angstrom * nx / bx_)
    binned = xp.zeros((n_t, by_, bx_), dtype=xp.float32)
    for i in np.flatnonzero(use):
        img = images_tyx[i].astype(xp.float32)
        binned[i] = fourier_crop(img / img.mean() - 1.0, (by_, bx_))
    lp_px, hp_px = max(lowpass_angstrom / px_b, 1.0), highpass_angstrom / px_b
    nz = int(np.clip(round(specimen_thickness_angstrom / px_b), 16, max(by_, bx_)))

    # Coarse shifts and the tilt axis.
    axis = float(tilt_axis_angle_deg)
    shifts_b, _, failed = coarse_align_shifts(binned, angles, tilt_axis_angle_deg=axis, usable=use,
                                              lowpass_px=lp_px, highpass_px=hp_px)
    if refine_tilt_axis:
        for search, step in ((tilt_axis_search_deg, 1.0), (1.0, 0.25)):
            ok = use & ~failed
            axis, _ = refine_tilt_axis_angle(binned[ok], shifts_px=shifts_b[ok], tilt_axis_angle_deg=axis,
                                             search_range_deg=search, step_deg=step)
            shifts_b, _, failed = coarse_align_shifts(binned, angles, tilt_axis_angle_deg=axis, usable=use,
                                                      lowpass_px=lp_px, highpass_px=hp_px)

    a_rad = np.deg2rad(axis)
    u_hat_yx = np.array([np.sin(a_rad), np.cos(a_rad)])
    ok = use & ~failed
    z0_px = 0.0
    if center_specimen:
        # Correlation follows the strongest layer (e.g. gold on one surface): put the
        # centre of the specimen's structure on the rotation centre before matching.
        aligned = apply_alignment(binned[ok], shifts_px=shifts_b[ok], tilt_axis_angle_deg=axis, order=1, fill="zero")
        _, volume = leave_one_out_reprojections(aligned, angles[ok], thickness_px=int(2 * max(by_, bx_)))
        _, z0_px = specimen_pitch_and_height(volume, max_pitch_deg=0.0)
        shifts_b = shifts_b + z0_px * np.sin(np.deg2rad(angles))[:, None] * u_hat_yx[None, :]

    # Projection matching, dropping tilts that do not match their reprojection.
    last = np.zeros(n_t)
    ncc = np.full(n_t, np.nan)

    def match(n_iter: int) -> None:
        nonlocal shifts_b
        shifts_b, last_i, ncc_i = _projection_matching(binned, angles, axis_deg=axis, shifts_bin=shifts_b, use=ok,
                                                       thickness_px=nz, n_iterations=n_iter, lowpass_px=lp_px,
                                                       highpass_px=hp_px)
        last[ok], ncc[ok] = last_i[ok], ncc_i[ok]

    if n_projection_matching_iterations > 0:
        match(n_projection_matching_iterations)
        if refine_tilt_axis:
            axis, _ = refine_tilt_axis_angle(binned[ok], shifts_px=shifts_b[ok], tilt_axis_angle_deg=axis,
                                             search_range_deg=1.0, step_deg=0.25)
            match(2)
        bad = _robust_low(ncc, ok, min_relative_correlation)
        if bad.any():
            failed |= bad
            ok &= ~bad
            match(2)
    median_ncc = float(np.median(ncc[ok])) if np.isfinite(ncc[ok]).any() else float("nan")
    for i in np.flatnonzero(use & failed):
        reasons[i] = f"{ALIGNMENT_FAILED} (correlation {ncc[i]:.2f}, median {median_ncc:.2f})" if np.isfinite(
            ncc[i]) else f"{ALIGNMENT_FAILED} (no correlation peak with its neighbours)"
    offset = 0.0

    shifts = shifts_b * bin_yx[None, :] - (bin_yx[None, :] - 1.0) / 2.0
    shifts[~use] = np.nan
    residual = last * float(bin_yx.mean())
    residual[~ok] = np.nan
    excluded = np.array([r != "" for r in reasons])
    return TiltSeriesAlignment(
        shifts_px=shifts, tilt_axis_angle_deg=float(axis), tilt_angles_deg=angles + offset,
        tilt_angle_offset_deg=float(offset), residual_px=residual, correlation=ncc, excluded=excluded,
        exclusion_reason=tuple(reasons), pixel_size_angstrom=float(pixel_size_angstrom),
        alignment_pixel_size_angstrom=px_b, nominal_tilt_axis_angle_deg=float(tilt_axis_angle_deg),
        specimen_z_offset_angstrom=float(z0_px * px_b),
    )


def gauge_free_shift_error_px(
    shifts_px: np.ndarray,
    truth_px: np.ndarray,
    tilt_angles_deg: np.ndarray,
    *,
    tilt_axis_angle_deg: float,
    use: np.ndarray | None = None,
) -> np.ndarray:
    """Per-tilt shift error once the parts no projection data can fix are removed.

    Parameters
    ----------
    shifts_px, truth_px
        ``(t, 2)`` estimated and true displacements ``(dy, dx)``.
    tilt_angles_deg
        ``(t,)`` true tilt angles.
    tilt_axis_angle_deg
        True tilt-axis angle.
    use
        ``(t,)`` bool, tilts to compare (default: all).

    Returns
    -------
    ndarray
        ``(n_used,)`` error lengths after a least-squares fit and removal of a common
        translation and of ``z0 sin(theta)`` perpendicular to the axis (the height of the
        rotation centre: changing it only moves the tomogram along z).
    """
    d = np.asarray(shifts_px, dtype=np.float64) - np.asarray(truth_px, dtype=np.float64)
    n = len(d)
    use = np.ones(n, bool) if use is None else np.asarray(use, bool)
    a = np.deg2rad(tilt_axis_angle_deg)
    u_hat = np.array([np.sin(a), np.cos(a)])
    design = np.stack([np.tile([1.0, 0.0], n), np.tile([0.0, 1.0], n),
                       (np.sin(np.deg2rad(tilt_angles_deg))[:, None] * u_hat).ravel()], axis=1)
    rows = np.repeat(use, 2)
    coef, *_ = np.linalg.lstsq(design[rows], d.ravel()[rows], rcond=None)
    r = (d.ravel() - design @ coef).reshape(n, 2)
    return np.hypot(r[:, 0], r[:, 1])[use]
