"""Fiducial-less tilt-series alignment: shifts, tilt axis, tilt-angle offset, specimen height.

Steps of :func:`align_tilt_series`, all on a stack Fourier-binned to the alignment pixel
size (about 1/128 of the field of view):

1. **Exclusion.** :func:`tomodask.kernels.tilt_exclusion.find_bad_tilts` drops dark,
   blank, drifting and CTF-failed tilts and those the user excluded. The fall of the
   median intensity with tilt gives the ice thickness and the tilt-angle offset that
   makes it symmetric (:func:`tomodask.kernels.tilt_exclusion.ice_slab_from_intensity`);
   all later steps use the offset angles.
2. **Coarse shifts** (:func:`coarse_align_shifts`). Outwards from the tilt nearest 0°,
   each tilt is cross-correlated with the sum of its nearest already-aligned neighbours,
   each stretched by ``cos(theta_j) / cos(theta_i)`` perpendicular to the axis and moved
   by its shift (IMOD ``tiltxcorr``'s cumulative correlation [1]_). The peak is searched
   in a disc around the neighbour's shift whose radius grows with ``|sin(theta)|``; a peak
   not clearly above the next best one (peak ratio) or a weak correlation marks the tilt
   as unreliable: it is not used as a reference. This chain follows the strongest layer
   of the specimen (gold on one surface), so its rotation centre sits on that layer.
3. **Tilt axis.** Common lines (:func:`refine_tilt_axis_angle`) bring the nominal axis
   within a degree or two; then the 3D-feature model (:func:`refine_with_features`, step
   5) measures the residual rotation from how strong features of the reconstruction move
   along the axis with their position across it ("local common lines"), iterated with
   secant steps (the coarse shifts are redone when the axis has moved).
4. **Neighbour pass and second chance.** Every reliable tilt is correlated once more with
   its two aligned neighbours; a tilt the chain could not place is correlated with the
   reprojection, at its angle, of the weighted back-projection of all aligned tilts
   (which holds a thick specimen's parallax), searched around its neighbours' shifts, and
   excluded with reason ``"alignment failed (...)"`` if that peak is ambiguous or weak.
5. **Global consistency** (:func:`refine_with_features`). Strong 3D features of the
   reconstruction (gold beads, compact particles; streaks of gold rejected) are followed
   through the tilts and fitted, like IMOD ``tiltalign``'s fiducials, with a shift per
   tilt, a position per feature and the axis. This corrects what neighbour correlations
   cannot see, e.g. a chain that follows gold on one side of the series and other
   structure on the other. It only looks a few pixels around each feature, so with gold
   (found when the specimen was first centred) each tilt is then placed once more by the
   beads alone (:func:`_feature_placements`): the reprojection of balls around the
   strongest features of the reconstruction, searched as widely as the chain's links.
   With gold on both surfaces of a thick specimen the chain can lock onto the other bead
   layer where beads of the two layers cross (their separation across the axis changes
   by ``dz (sin theta_i - sin theta_j)`` between tilts), and every tilt beyond follows
   that layer, off by tens of pixels but consistent with its neighbours. Such tilts are
   moved to where the beads put them, the tilts beyond take the move extrapolated in
   ``sin(theta)``, and the passes run again; a tilt still far off after the last round
   is excluded as ``"alignment failed (...)"``.
6. **Specimen geometry** (:func:`specimen_geometry`). A thick reconstruction gives the
   specimen's mid-plane: halfway between gold beads on both surfaces (their heights from
   the parallax between opposite tilts); with beads on one surface, that surface (bead
   layer plus the bead radius measured on a projection) and half the Beer-Lambert
   thickness; else where the structure is. The shifts change by ``z0 sin(theta)`` across
   the axis, which puts the rotation centre on the mid-plane; the tilt nearest 0° keeps
   zero displacement (the field the operator chose).
7. **Residuals and failure detection.** Leave-one-out reprojections give each tilt's
   correlation (and judge the tilts placed in step 4); ``residual_px`` is each tilt's
   distance from the 3D-feature model after the final pass. Without gold, each tilt's
   link to its neighbour towards 0° is checked once more: a weak one (low correlation, or
   a marginal one with an ambiguous peak) excludes that tilt and all beyond it, which
   were placed through it and which nothing else constrains across the axis. The tilts
   excluded as failed are then checked outwards, innermost first, against the
   reprojection at their angle of the kept tilts (low-passed twice as much: a thick
   specimen's parallax between tilts 3° apart keeps only coarse detail); one whose clear
   peak confirms its position is kept again, the first that fails ends the walk.
   A confident link to the wrong layer passes that check and the tilts beyond it follow
   it: when the 3D-feature model of the kept tilts moves one of them by more than about
   an alignment pixel, its corrections re-place the kept tilts, round after round (one
   still that far off after the last round is excluded). Then the 3D-feature model
   measures the axis once more on the kept tilts only (the global passes saw the
   excluded runs), taken beyond sqrt(2) standard errors (where taking an unbiased
   estimate starts to help more than it hurts).

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
from types import ModuleType

import numpy as np
import scipy.sparse

from tomodask.backend import get_array_module, scipy_ndimage, to_numpy
from tomodask.kernels.fourier import fourier_crop, frequency_grid
from tomodask.kernels.projector import backproject, backprojection_matrix, project_volume
from tomodask.kernels.reconstruct import reconstruction_filter
from tomodask.kernels.tilt_exclusion import ALIGNMENT_FAILED, find_bad_tilts, ice_slab_from_intensity

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


# --------------------------------------------------------------------------- coarse


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
    n_refinements: int = 2,
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
    n_refinements
        Finer grids (each a quarter of the step, 7 angles) around the best angle.

    Returns
    -------
    angle_deg, score
        Refined angle and its :func:`common_line_score` (the grid's best with a parabola
        through its neighbours when ``n_refinements`` is 0).
    """
    def score(a: float) -> float:
        return common_line_score(images_tyx, shifts_px=shifts_px, tilt_axis_angle_deg=a,
                                 lowpass_px=lowpass_px, highpass_px=highpass_px)

    grid = tilt_axis_angle_deg + np.arange(-search_range_deg, search_range_deg + 1e-9, step_deg)
    values = np.array([score(a) for a in grid])
    j = int(np.argmax(values))
    best = float(grid[j])
    if n_refinements == 0:
        if 0 < j < len(grid) - 1:
            den = values[j - 1] - 2 * values[j] + values[j + 1]
            if den < 0:
                best += step_deg * 0.5 * float(values[j - 1] - values[j + 1]) / float(den)
        return best, float(values[j])
    step = step_deg
    for _ in range(n_refinements):
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


# --------------------------------------------------------------------------- 3D features: shifts, tilt axis


def _volume_features(volume_zyx, *, n_max: int = 40, separation_px: int = 5,
                     border_fraction: tuple[float, float] = (0.1, 0.1), streak_px: float = 2.0,
                     streak_ratio: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Strongest local maxima of the smoothed structure energy of a volume.

    Returns ``(k, 3)`` positions ``(z, y, x)`` from the volume centre (voxels) and ``(k,)``
    energies, strongest first; maxima within ``border_fraction`` of the y and x edges are
    skipped, and so are maxima within ``streak_px`` in y of one ``streak_ratio`` times
    stronger (its back-projection streaks).
    """
    xp = get_array_module(volume_zyx)
    ndi = scipy_ndimage(xp)
    nz, ny, nx = volume_zyx.shape
    # Energy on a 2x coarser grid (block means): eight times less work, ample to place
    # the windows that measure the features.
    mz, my, mx = nz // 2, ny // 2, nx // 2
    v = volume_zyx[:2 * mz, :2 * my, :2 * mx].astype(xp.float32).reshape(mz, 2, my, 2, mx, 2).mean(axis=(1, 3, 5))
    energy = ndi.gaussian_filter(v * v, 0.75)
    half = max(int(round(separation_px / 2)), 1)
    peaks = energy == ndi.maximum_filter(energy, size=2 * half + 1)
    by, bx = int(round(border_fraction[0] * my)), int(round(border_fraction[1] * mx))
    peaks[:, :max(by, 1)] = False
    peaks[:, my - max(by, 1):] = False
    peaks[:, :, :max(bx, 1)] = False
    peaks[:, :, mx - max(bx, 1):] = False
    peaks[:1] = False
    peaks[mz - 1:] = False
    coarse = to_numpy(xp.argwhere(peaks))
    values = to_numpy(energy[peaks]).astype(np.float64)
    e = to_numpy(energy).astype(np.float64)
    where = coarse.astype(np.float64)
    for axis in range(3):
        step = np.zeros(3, int)
        step[axis] = 1
        lo, hi = e[tuple((coarse - step).T)], e[tuple((coarse + step).T)]
        den = lo - 2 * values + hi
        where[:, axis] += np.where(den < 0, np.clip(0.5 * (lo - hi) / np.where(den < 0, den, -1.0), -0.5, 0.5), 0.0)
    where = 2 * where + 0.5
    order = np.argsort(-values)
    where, values = where[order], values[order]
    # A very strong feature (gold) leaves streaks in its own y slices (back-projection along
    # the tilt directions): weaker maxima at its y are not features.
    keep = np.ones(len(values), bool)
    for j in range(min(len(values), 4 * n_max)):
        if keep[j]:
            streak = (np.abs(where[:, 1] - where[j, 1]) <= streak_px) & (values < values[j] / streak_ratio)
            keep &= ~streak
    where, values = where[keep][:n_max], values[keep][:n_max]
    centre = (np.array([nz, ny, nx], dtype=np.float64) - 1) / 2
    return where - centre, values


def _window_offsets(windows_tkyx: np.ndarray, weights_tk: np.ndarray, *, lowpass_px: float, highpass_px: float,
                    max_lag_px: float, n_iterations: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Displacement of each window from its feature's weighted mean window.

    ``windows_tkyx`` is ``(t, k, w, w)``. Returns ``(t, k, 2)`` displacements ``(dv, du)``
    and ``(t, k)`` normalised correlations with the mean (leave-self-in).
    """
    n_t, n_k, w, _ = windows_tkyx.shape
    taper = to_numpy(_taper((w, w), fraction=0.25, xp=np))
    filt = to_numpy(_bandpass((2 * w, 2 * w), lowpass_px=lowpass_px, highpass_px=highpass_px, xp=np))
    win = windows_tkyx - (windows_tkyx * taper).sum(axis=(-2, -1), keepdims=True) / taper.sum()
    spec = np.fft.rfft2(win * taper, s=(2 * w, 2 * w)) * filt
    fy, fx = frequency_grid((2 * w, 2 * w), xp=np)
    offsets = np.zeros((n_t, n_k, 2))
    ncc = np.zeros((n_t, n_k))
    norm_w = np.sqrt((np.abs(spec) ** 2).sum(axis=(-2, -1)))
    for _ in range(n_iterations):
        # Leave-one-out templates: a window's own noise would pull its peak to zero.
        phase_y = np.exp(2j * np.pi * fy[None, None, :, 0] * offsets[..., 0, None])
        phase_x = np.exp(2j * np.pi * fx[None, None, 0, :] * offsets[..., 1, None])
        moved = spec * (phase_y[..., :, None] * (phase_x * weights_tk[..., None])[..., None, :])
        template = moved.sum(axis=0)[None] - moved
        cc = np.fft.irfft2(spec * np.conj(template), s=(2 * w, 2 * w))
        shifts, peak, _ = _peaks(cc.reshape(-1, 2 * w, 2 * w), centres_yx=np.zeros(2), radii_px=max_lag_px,
                                 exclusion_px=2.0)
        offsets = shifts.reshape(n_t, n_k, 2)
        norm_t = np.sqrt((np.abs(template) ** 2).sum(axis=(-2, -1)))
        ncc = peak.reshape(n_t, n_k) * (2 * w) ** 2 / np.maximum(norm_w * norm_t, 1e-30)
    return offsets, ncc


@dataclass(frozen=True)
class FeatureFit:
    """Corrections from the 3D-feature model (:func:`refine_with_features`).

    Attributes
    ----------
    shift_corrections_uv
        ``(t, 2)`` ``(du, dv)`` to add to each tilt's displacement, in the aligned frame
        (u across the axis, v along it), pixels. Zero where a tilt had too few measured
        features.
    axis_correction_deg, axis_standard_error_deg
        Add to the tilt-axis angle that made the aligned stack.
    measured
        ``(t,)`` bool, tilts with at least two well-measured features.
    rms_px
        ``(t,)`` weighted rms of the feature residuals per tilt.
    n_features
        Features that carried weight.
    positions_zyx, strength
        ``(k, 3)`` positions of the features followed (voxels from the volume centre; the
        height from their parallax between opposite tilts where seen in both) and
        ``(k,)`` their structure energies in the volume.
    """

    shift_corrections_uv: np.ndarray
    axis_correction_deg: float
    axis_standard_error_deg: float
    measured: np.ndarray
    rms_px: np.ndarray
    n_features: int
    positions_zyx: np.ndarray
    strength: np.ndarray


def refine_with_features(
    aligned_tyx: np.ndarray,
    tilt_angles_deg: np.ndarray,
    volume_zyx: np.ndarray,
    *,
    n_features: int = 40,
    half_window_px: int = 10,
    lowpass_px: float = 1.0,
    highpass_px: float = 12.0,
    max_lag_px: float = 4.0,
    fit_axis: bool = True,
    shift_prior_px: float = 0.5,
) -> FeatureFit:
    """Shift and tilt-axis corrections from strong 3D features followed through the tilts.

    Parameters
    ----------
    aligned_tyx
        ``(t, y, x)`` tilts aligned with the current shifts and axis (axis along y).
    tilt_angles_deg
        ``(t,)`` tilt angles.
    volume_zyx
        ``(z, y, x)`` reconstruction of ``aligned_tyx`` (same pixel size, centred).
    n_features
        Strongest local maxima of the volume's structure energy followed.
    half_window_px
        Half-size of the window around each feature's projected position.
    lowpass_px, highpass_px
        Band-pass of the window correlations.
    max_lag_px
        Largest displacement of a feature from its predicted position.
    fit_axis
        Fit the tilt-axis correction (else 0).
    shift_prior_px
        Standard deviation of a zero-mean prior on each tilt's correction: it damps what
        the features barely see (a tilt where one bead is left) and nothing else.

    Returns
    -------
    FeatureFit

    Notes
    -----
    A feature at ``(x, y, z)`` projects at ``u = x cos(theta) + z sin(theta)`` across the
    axis and ``v = y`` along it; with the true axis ``e`` counter-clockwise from the one
    used, at ``(u - e v, v + e u)``. Each feature's windows are registered to their mean;
    the displacements are fitted by least squares with, per tilt, a shift ``(a_i, b_i)``,
    per feature a position correction ``(dx, dy, dz)`` and the axis correction ``e``
    (what IMOD's ``tiltalign`` does with fiducials [1]_, here with the structure's own
    strongest features, "local common lines" along the axis). Each feature is weighted by
    its own scatter (gold beads and compact particles dominate, overlapped features count
    little) and outliers are discarded. The mean feature correction is held at zero, so
    the corrections do not translate the tomogram.
    """
    xp = get_array_module(aligned_tyx)
    ndi = scipy_ndimage(xp)
    n_t, ny, nx = aligned_tyx.shape
    feats, strength = _volume_features(volume_zyx, n_max=n_features, border_fraction=(0.08, 0.08))
    empty = FeatureFit(np.zeros((n_t, 2)), 0.0, float("inf"), np.zeros(n_t, bool), np.full(n_t, np.nan), 0,
                       feats, strength)
    n_k = len(feats)
    if n_k < 3:
        return empty
    theta = np.deg2rad(np.asarray(tilt_angles_deg, dtype=np.float64))
    cos_t, sin_t = np.cos(theta), np.sin(theta)
    u = feats[None, :, 2] * cos_t[:, None] + feats[None, :, 0] * sin_t[:, None]  # (t, k)
    v = np.broadcast_to(feats[None, :, 1], u.shape)
    hw = int(half_window_px)
    margin = hw + max_lag_px + 1
    inside = (np.abs(u) < nx / 2 - margin) & (np.abs(v) < ny / 2 - margin)
    grid = np.arange(-hw, hw + 1, dtype=np.float64)
    rows = v[:, :, None, None] + grid[None, None, :, None] + (ny - 1) / 2
    cols = u[:, :, None, None] + grid[None, None, None, :] + (nx - 1) / 2
    rows, cols = np.broadcast_arrays(rows, cols)
    windows = np.empty(rows.shape)
    for i in range(n_t):
        coords = xp.asarray(np.stack([rows[i], cols[i]]), dtype=xp.float32)
        windows[i] = to_numpy(ndi.map_coordinates(aligned_tyx[i].astype(xp.float32), coords, order=1,
                                                  mode="constant", cval=0.0))
    offsets, _ = _window_offsets(windows, inside.astype(np.float64), lowpass_px=lowpass_px, highpass_px=highpass_px,
                                 max_lag_px=max_lag_px)
    t_i, k_i = np.nonzero(inside)
    m = len(t_i)
    if m < 10:
        return empty
    # Unknowns: a (t), b (t), dx (k), dy (k), dz (k), c (k), e; rows: u then v offsets.
    # c is each feature's constant offset across the axis: its template (the mean of its
    # windows) has no absolute centre, so the tilts' common shift across the axis is left
    # to the neighbour correlations.
    n_unknown = 2 * n_t + 4 * n_k + 1
    r = np.arange(m)
    rows = np.concatenate([r, r, r, r, r, m + r, m + r, m + r])
    cols = np.concatenate([t_i, 2 * n_t + k_i, 2 * n_t + 2 * n_k + k_i, 2 * n_t + 3 * n_k + k_i,
                           np.full(m, n_unknown - 1), n_t + t_i, 2 * n_t + n_k + k_i, np.full(m, n_unknown - 1)])
    vals = np.concatenate([np.ones(m), cos_t[t_i], sin_t[t_i], np.ones(m), -v[t_i, k_i] * fit_axis,
                           np.ones(m), np.ones(m), u[t_i, k_i] * fit_axis])
    design = scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(2 * m, n_unknown))
    obs = np.concatenate([offsets[t_i, k_i, 1], offsets[t_i, k_i, 0]])
    kk = np.concatenate([k_i, k_i])
    # Gauge: the features as a whole do not move (the tomogram is not translated) and the
    # tilts' mean shift across the axis does not change; a weak prior on each
    # tilt's correction damps what the features barely see.
    prior = np.zeros((n_unknown, n_unknown))
    for g in range(3):
        block = slice(2 * n_t + g * n_k, 2 * n_t + (g + 1) * n_k)
        prior[block, block] += 1e6 / n_k**2
    prior[:n_t, :n_t] += 1e6 / n_t**2
    prior[np.arange(2 * n_t), np.arange(2 * n_t)] += 1.0 / shift_prior_px**2
    if not fit_axis:
        prior[-1, -1] += 1.0
    robust = np.ones(2 * m)
    scale_k = np.ones(n_k)
    for _ in range(8):
        w2 = robust / (scale_k[kk] ** 2 + 0.03**2)
        normal = (design.T @ design.multiply(w2[:, None])).toarray() + prior
        normal[np.diag_indices(n_unknown)] += 1e-9 * float(np.trace(normal)) / n_unknown
        sol = np.linalg.solve(normal, design.T @ (w2 * obs))
        resid = obs - design @ sol
        for k in range(n_k):
            sel = kk == k
            scale_k[k] = 1.4826 * np.median(np.abs(resid[sel])) + 1e-3 if sel.sum() >= 8 else 1e3
        robust = np.clip(1.0 - (resid / (4.685 * scale_k[kk])) ** 2, 0.0, None) ** 2
    w = np.sqrt(w2)
    good_obs = (robust > 0) & (scale_k[kk] < 1.0)
    per_tilt = np.bincount(np.concatenate([t_i, t_i])[good_obs], minlength=n_t) // 2
    measured = per_tilt >= 2
    weights = w**2 * good_obs
    tt = np.concatenate([t_i, t_i])
    rms = np.sqrt(np.bincount(tt, weights * resid**2, minlength=n_t) / np.maximum(np.bincount(tt, weights, n_t),
                                                                                    1e-30))
    rms[~measured] = np.nan
    corr_uv = np.stack([sol[:n_t], sol[n_t:2 * n_t]], axis=1)
    corr_uv[~measured] = 0.0
    unit = np.zeros(n_unknown)
    unit[-1] = 1.0
    stderr = float(np.rad2deg(np.sqrt(max(np.linalg.solve(normal, unit)[-1], 0.0)))) if fit_axis else float("inf")
    n_used = int(sum(scale_k[k] < 1.0 for k in range(n_k)))
    # Heights from parallax: between tilts theta_1 and theta_2 a feature moves by
    # x (cos 1 - cos 2) + z (sin 1 - sin 2) across the axis, and its template offset and the
    # common shift cancel; pairs of opposite tilts give z to a fraction of a voxel.
    positions = feats.copy()
    off_u = offsets[..., 1] - sol[:n_t][:, None]
    for k in range(n_k):
        seen = np.flatnonzero(inside[:, k] & (np.abs(offsets[:, k, 1]) < max_lag_px - 0.5))
        num = den = 0.0
        for i in seen[theta[seen] < 0]:
            j = seen[np.argmin(np.abs(theta[seen] + theta[i]))]
            ds = sin_t[j] - sin_t[i]
            if abs(theta[j] + theta[i]) < np.deg2rad(2.0) and ds > 0.2:
                num += ds * (off_u[j, k] - off_u[i, k])
                den += ds * ds
        if den > 0:
            positions[k, 0] += num / den
    return FeatureFit(shift_corrections_uv=corr_uv, axis_correction_deg=float(np.rad2deg(sol[-1])) if fit_axis else 0.0,
                      axis_standard_error_deg=stderr, measured=measured, rms_px=rms, n_features=n_used,
                      positions_zyx=positions, strength=strength)


# --------------------------------------------------------------------------- reprojections


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


def _wbp(aligned_tyx, tilt_angles_deg: np.ndarray, *, thickness_px: int, radial_cutoff: float = 0.3):
    """Weighted back-projection ``(z, y, x)`` of an aligned stack (axis along y)."""
    filtered = _ramp_filtered(aligned_tyx, tilt_angles_deg, thickness_px=thickness_px, radial_cutoff=radial_cutoff)
    return backproject(filtered, tilt_angles_deg, thickness_px=thickness_px)


def _without_gauge(update_uv: np.ndarray, tilt_angles_deg: np.ndarray) -> np.ndarray:
    """Remove from ``(n, 2)`` corrections ``(du, dv)`` what only translates the tomogram.

    Along the axis: the mean (a y translation). Across it: the least-squares ``cos(theta)``
    and ``sin(theta)`` terms (x and z translations).
    """
    out = np.array(update_uv, dtype=np.float64)
    theta = np.deg2rad(np.asarray(tilt_angles_deg, dtype=np.float64))
    modes = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    if len(out) >= 3:
        coef, *_ = np.linalg.lstsq(modes, out[:, 0], rcond=None)
        out[:, 0] -= modes @ coef
    out[:, 1] -= out[:, 1].mean()
    return out


class _Matcher:
    """The binned stack, its masked correlator and slab: what the steps of the alignment share."""

    def __init__(self, binned_tyx, *, lowpass_px: float, highpass_px: float, thickness_px: int):
        self.xp = get_array_module(binned_tyx)
        self.binned = binned_tyx
        self.shape = tuple(binned_tyx.shape[1:])
        mask = _taper(self.shape, fraction=0.2, xp=self.xp) * _soft_disk(self.shape, radius_fraction=0.48, xp=self.xp)
        self.corr = _Correlator(self.shape, lowpass_px=lowpass_px, highpass_px=highpass_px, xp=self.xp, mask=mask)
        self.thickness_px = int(thickness_px)
        self.small_radius_px = max(3.0, 0.03 * min(self.shape))

    def aligned(self, idx, shifts, axis_deg: float):
        """The tilts ``idx`` undone of their shifts and rotated (axis along y)."""
        return apply_alignment(self.binned[idx], shifts_px=shifts[idx], tilt_axis_angle_deg=axis_deg, order=1,
                               fill="zero")

    def measure(self, idx, shifts, axis_deg: float, angles: np.ndarray):
        """Leave-one-out matching of the tilts ``idx``.

        Returns ``(n, 2)`` gauge-free corrections ``(du, dv)`` in the aligned frame,
        normalised correlations and peak ratios.
        """
        aligned = self.aligned(idx, shifts, axis_deg)
        reproj, _ = leave_one_out_reprojections(aligned, angles[idx], thickness_px=self.thickness_px)
        d, ncc, ratio = self.corr.match(self.corr.prepare(aligned), self.corr.prepare(reproj),
                                        centres_yx=np.zeros(2), radii_px=self.small_radius_px)
        return _without_gauge(d[:, ::-1], angles[idx]), ncc, ratio

    def to_raw(self, update_uv: np.ndarray, axis_deg: float) -> np.ndarray:
        """Aligned-frame ``(du, dv)`` to raw displacements ``(dy, dx)``."""
        return (update_uv @ _rot_xy(axis_deg).T)[:, ::-1]


# --------------------------------------------------------------------------- specimen geometry


@dataclass(frozen=True)
class SpecimenGeometry:
    """Where the specimen slab lies in a reconstruction (voxels, from the volume centre).

    Attributes
    ----------
    z_center_px
        Height of the slab's mid-plane above the volume centre, at ``x = 0``.
    slope_deg
        Angle of the slab in the ``(x, z)`` plane: ``z = z_center_px + x tan(slope_deg)``.
    thickness_px
        Slab thickness (NaN when unknown).
    method
        How it was found: ``"gold on both surfaces"``, ``"gold on one surface, ice
        thickness from intensity"``, ``"structure"`` or, when the reconstruction shows no
        specimen slab, ``"not found (...)"`` (then ``z_center_px`` is 0: nothing moves).
    z_uncertainty_px
        Standard error of ``z_center_px`` for ``"structure"`` (the scatter of the
        features' heights over the square root of their number); 0 with gold (a fraction
        of a voxel, not estimated); infinite when not found.
    """

    z_center_px: float
    slope_deg: float
    thickness_px: float
    method: str
    z_uncertainty_px: float = 0.0


def _bead_radius_px(image_yx, tilt_angle_deg: float, positions_zyx: np.ndarray) -> float:
    """Radius of gold beads from their projections in an aligned image (axis along y).

    A sphere projects to a chord profile ``2 sqrt(r^2 - d^2)``, which falls to half its
    depth at ``d = r sqrt(3) / 2``: the radius is that of the disc of half depth (its area
    over pi), over ``sqrt(3) / 2``. Median over beads.
    """
    xp = get_array_module(image_yx)
    img = to_numpy(scipy_ndimage(xp).gaussian_filter(image_yx.astype(xp.float32), 1.0)).astype(np.float64)
    ny, nx = img.shape
    t = np.deg2rad(tilt_angle_deg)
    yy, xx = np.mgrid[:ny, :nx]
    radii = []
    for z, y, x in positions_zyx[:8]:
        cy, cx = y + (ny - 1) / 2, x * np.cos(t) + z * np.sin(t) + (nx - 1) / 2
        r = np.hypot(yy - cy, xx - cx)
        window = r < 0.15 * min(ny, nx)
        ring = (r >= 0.15 * min(ny, nx)) & (r < 0.2 * min(ny, nx))
        if not ring.any() or not (r < 2).any():
            continue
        depth = np.median(img[ring]) - img
        half = (depth > 0.5 * depth[r < 2].max()) & window
        labels, _ = scipy_ndimage(np).label(half)
        own = labels[min(max(int(round(cy)), 0), ny - 1), min(max(int(round(cx)), 0), nx - 1)]
        if own:
            radii.append(np.sqrt((labels == own).sum() / np.pi) / (np.sqrt(3) / 2))
    return float(np.median(radii)) if radii else 0.0


def _centroids(volume_zyx, positions_zyx: np.ndarray, *, half_px: int = 3) -> np.ndarray:
    """Energy-weighted centroids of the volume in boxes around ``positions_zyx`` (from the centre)."""
    v = to_numpy(volume_zyx)
    centre = (np.array(v.shape) - 1) / 2
    out = np.array(positions_zyx, dtype=np.float64)
    for n, p in enumerate(out):
        c = np.round(p + centre).astype(int)
        lo, hi = np.maximum(c - half_px, 0), np.minimum(c + half_px + 1, v.shape)
        box = v[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float64) ** 2
        if box.sum() > 0:
            grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
            out[n] = [float((g * box).sum() / box.sum()) for g in grids] - centre
    return out


def _layers(z: np.ndarray, *, min_gap_px: float) -> np.ndarray:
    """Label bead heights 0 (lower surface) or 1 (upper), splitting at the widest gap."""
    order = np.argsort(z)
    gaps = np.diff(z[order])
    labels = np.zeros(len(z), int)
    if len(gaps) and gaps.max() >= min_gap_px:
        j = int(np.argmax(gaps))
        labels[order[j + 1:]] = 1
    return labels


def _fit_layers(z: np.ndarray, x: np.ndarray, labels: np.ndarray, *, slope: bool,
                min_spread_px: float) -> tuple[np.ndarray, float]:
    """Heights of the bead layers at ``x = 0`` and their common slope (least squares)."""
    n_l = int(labels.max()) + 1
    design = np.zeros((len(z), n_l + 1))
    design[np.arange(len(z)), labels] = 1.0
    design[:, -1] = x
    spread = np.ptp(x - np.array([x[labels == k].mean() for k in range(n_l)])[labels]) if len(x) else 0.0
    use_slope = slope and len(z) >= n_l + 1 and spread >= min_spread_px
    cols = design if use_slope else design[:, :-1]
    keep = np.ones(len(z), bool)
    for _ in range(2):
        coef, *_ = np.linalg.lstsq(cols[keep], z[keep], rcond=None)
        resid = np.abs(z - cols @ coef)
        keep = resid <= max(3.0, 3 * np.median(resid))
        if any(not keep[labels == k].any() for k in range(n_l)):
            keep[:] = True
            break
    return coef[:n_l], (float(coef[-1]) if use_slope else 0.0)


def _structure_energy(volume_zyx, beads_zyx: np.ndarray, bead_radius_px: float) -> np.ndarray:
    """``(z, x)`` energy of the structure, clipped so that no bead dominates, beads masked."""
    xp = get_array_module(volume_zyx)
    nz, ny, nx = volume_zyx.shape
    by = max(int(0.1 * ny), 1)
    v = volume_zyx[:, by:ny - by, :].astype(xp.float32)
    v = v - xp.median(v)
    sigma = 1.4826 * float(xp.median(xp.abs(v)))
    v = xp.clip(v, -3 * sigma, 3 * sigma)
    if len(beads_zyx):
        z = xp.arange(nz, dtype=xp.float32)[:, None, None] - (nz - 1) / 2
        y = xp.arange(by, ny - by, dtype=xp.float32)[None, :, None] - (ny - 1) / 2
        x = xp.arange(nx, dtype=xp.float32)[None, None, :] - (nx - 1) / 2
        r = 2 * bead_radius_px + 2
        for bz, bypos, bx in beads_zyx:
            v = xp.where(((z - bz) / (2 * r)) ** 2 + ((y - bypos) / r) ** 2 + ((x - bx) / r) ** 2 < 1, 0.0, v)
    return to_numpy((v * v).sum(axis=1)).astype(np.float64)


def _sheared_profile(energy_zx: np.ndarray, slope_deg: float) -> np.ndarray:
    """Sum over x of the energy along lines ``z + x tan(slope)``."""
    nz, nx = energy_zx.shape
    z = np.arange(nz) - (nz - 1) / 2
    x = np.arange(nx) - (nx - 1) / 2
    tan = np.tan(np.deg2rad(slope_deg))
    out = np.zeros(nz)
    for j in range(nx):
        out += np.interp(z + x[j] * tan, z, energy_zx[:, j], left=0.0, right=0.0)
    return out


def _centre_and_spread(profile: np.ndarray) -> tuple[float, float]:
    nz = len(profile)
    z = np.arange(nz) - (nz - 1) / 2
    w = np.clip(profile - np.percentile(profile, 20), 0.0, None)
    total = w.sum() or 1.0
    centre = float((w * z).sum() / total)
    return centre, float(np.sqrt((w * (z - centre) ** 2).sum() / total))


def specimen_geometry(
    volume_zyx: np.ndarray,
    *,
    thickness_px: float | None = None,
    estimate_slope: bool = True,
    slope_deg: float | None = None,
    image_yx: np.ndarray | None = None,
    image_tilt_angle_deg: float = 0.0,
    features: tuple[np.ndarray, np.ndarray] | None = None,
    max_slope_deg: float = 10.0,
    strong_ratio: float = 8.0,
    min_layer_gap_px: float = 10.0,
    min_slab_contrast: float = 1.25,
) -> SpecimenGeometry:
    """Height, slope and thickness of the specimen slab in a reconstruction.

    Parameters
    ----------
    volume_zyx
        ``(z, y, x)`` reconstruction (y along the tilt axis), thicker than the specimen.
    thickness_px
        Specimen thickness if known otherwise (e.g. from
        :func:`tomodask.kernels.tilt_exclusion.ice_slab_from_intensity`), in voxels.
    estimate_slope
        Fit the slab's slope (else it is level).
    slope_deg
        The slab's slope if known otherwise (e.g. from the tilt-angle offset of
        :func:`tomodask.kernels.tilt_exclusion.ice_slab_from_intensity`, ``-offset``).
    image_yx, image_tilt_angle_deg
        An aligned tilt (axis along y, the volume's pixel size and centre), best the one
        nearest 0°, and its angle: the bead radius is measured on it (without it, beads on
        one surface give no mid-plane).
    features
        ``((k, 3) positions (z, y, x), (k,) strengths)`` of the volume's strongest features
        if already measured more precisely (e.g. :attr:`FeatureFit.positions_zyx`, heights
        from the parallax over all tilts); by default its local maxima.
    max_slope_deg
        Largest slope searched when only the structure tells.
    strong_ratio
        A local maximum of the structure energy this many times the median of the 60
        strongest is a bead (gold).
    min_layer_gap_px
        Beads whose heights differ by more than this lie on different surfaces.
    min_slab_contrast
        Without gold, the structure energy within the slab must be this many times that
        outside it, with at least five features, else the slab is ``"not found"``.

    Returns
    -------
    SpecimenGeometry

    Notes
    -----
    Gold beads sit at the air-water interfaces, so beads on both surfaces give the
    mid-plane (halfway between the two bead layers, fitted with a common slope) to a
    fraction of a voxel. Beads on one surface give that surface (layer height plus or
    minus the bead radius, measured on a projection); with a known
    thickness the mid-plane is half of it away, on the side where the rest of the
    structure is. Without beads (or a thickness) the mid-plane is the centroid of the
    structure energy of the reconstruction (clipped so that beads weigh as much as any
    other structure), sheared by the slope that makes it most compact: a weaker estimate,
    biased by where the particles happen to be; its standard error is reported, and a
    reconstruction without a slab of structure (no contrast between inside and outside)
    gives ``"not found"`` rather than a guess.
    """
    nz, ny, nx = volume_zyx.shape
    if features is None:
        feats, values = _volume_features(volume_zyx, n_max=60, separation_px=4, border_fraction=(0.1, 0.1))
    else:
        feats, values = np.asarray(features[0], dtype=np.float64), np.asarray(features[1], dtype=np.float64)
    strong = values >= strong_ratio * np.median(values) if len(values) >= 10 else np.zeros(len(values), bool)
    beads = _centroids(volume_zyx, feats[strong]) if features is None else feats[strong]
    radius = _bead_radius_px(image_yx, image_tilt_angle_deg, beads) if len(beads) and image_yx is not None else 0.0
    energy = None
    if len(beads):
        labels = _layers(beads[:, 0], min_gap_px=min_layer_gap_px)
        z_beads = beads[:, 0] - (0.0 if slope_deg is None else beads[:, 2] * np.tan(np.deg2rad(slope_deg)))
        heights, slope = _fit_layers(z_beads, beads[:, 2], labels, slope=estimate_slope and slope_deg is None,
                                     min_spread_px=0.2 * nx)
        if slope_deg is None:
            slope_deg = float(np.clip(np.rad2deg(np.arctan(slope)), -max_slope_deg, max_slope_deg))
        if len(heights) == 2:
            return SpecimenGeometry(z_center_px=float(heights.mean()), slope_deg=slope_deg,
                                    thickness_px=float(heights[1] - heights[0] + 2 * radius),
                                    method="gold on both surfaces")
        if thickness_px is not None and np.isfinite(thickness_px) and thickness_px > 2 * radius > 0:
            energy = _structure_energy(volume_zyx, beads, radius)
            profile = _sheared_profile(energy, slope_deg)
            z = np.arange(nz) - (nz - 1) / 2
            a = float(heights[0])
            above = profile[(z > a + 2 * radius) & (z < a + thickness_px)].mean() if (z > a + 2 * radius).any() else 0
            below = profile[(z < a - 2 * radius) & (z > a - thickness_px)].mean() if (z < a - 2 * radius).any() else 0
            side = 1.0 if above >= below else -1.0
            return SpecimenGeometry(z_center_px=a + side * (thickness_px / 2 - radius), slope_deg=slope_deg,
                                    thickness_px=float(thickness_px),
                                    method="gold on one surface, ice thickness from intensity")
    if energy is None:
        energy = _structure_energy(volume_zyx, beads, radius)
    if slope_deg is not None or not estimate_slope:
        slope_deg = 0.0 if slope_deg is None else float(slope_deg)
    else:
        slopes = np.arange(-max_slope_deg, max_slope_deg + 1e-9, 0.5)
        spreads = np.array([_centre_and_spread(_sheared_profile(energy, s))[1] for s in slopes])
        j = int(np.argmin(spreads))
        slope_deg = float(slopes[j])
        if 0 < j < len(slopes) - 1:
            den = spreads[j - 1] - 2 * spreads[j] + spreads[j + 1]
            if den > 0:
                slope_deg += 0.5 * 0.5 * (spreads[j - 1] - spreads[j + 1]) / den
    profile = _sheared_profile(energy, slope_deg)
    centre, spread = _centre_and_spread(profile)
    thickness = float(thickness_px) if thickness_px is not None and np.isfinite(thickness_px) else 2 * np.sqrt(3) * spread
    z = np.arange(nz) - (nz - 1) / 2
    inside, outside = np.abs(z - centre) < 0.4 * thickness, np.abs(z - centre) > 0.6 * thickness
    contrast = (profile[inside].mean() / max(profile[outside].mean(), 1e-30)
                if inside.any() and outside.any() else float("nan"))
    if not contrast >= min_slab_contrast or len(feats) < 5:
        return SpecimenGeometry(z_center_px=0.0, slope_deg=slope_deg, thickness_px=float("nan"),
                                method=f"not found (slab contrast {contrast:.2f}, {len(feats)} features)",
                                z_uncertainty_px=float("inf"))
    return SpecimenGeometry(z_center_px=centre, slope_deg=slope_deg, thickness_px=thickness, method="structure",
                            z_uncertainty_px=float(np.std(feats[:, 0]) / np.sqrt(len(feats))))


# --------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class TiltSeriesAlignment:
    """Result of :func:`align_tilt_series` (conventions: :mod:`tomodask.kernels.geometry`).

    Attributes
    ----------
    shifts_px
        ``(t, 2)`` displacements ``(dy, dx)`` of each tilt's content, input pixels (NaN
        for tilts excluded before alignment). The rotation centre they imply is the
        specimen's mid-plane (see ``specimen_z_offset_angstrom``).
    tilt_axis_angle_deg
        Refined tilt-axis angle, counter-clockwise from Y.
    tilt_angles_deg
        ``(t,)`` refined tilt angles: the given ones plus ``tilt_angle_offset_deg``.
    tilt_angle_offset_deg
        Offset added to the given angles so that the specimen slab is level (0 when not
        estimated).
    residual_px
        ``(t,)`` after the final pass, how far (input pixels) each tilt still is from
        the 3D-feature model of :func:`refine_with_features`: the correction a further
        round would make (unshrunk) and the rms scatter of its features about the model,
        added in quadrature (IMOD ``tiltalign``'s residual, for patches of structure);
        for a tilt where no feature was measured, the distance to the correlation peak
        with its leave-one-out reprojection. A consistency measure: it does not see
        errors that keep the series consistent (e.g. a wrong specimen height). NaN for
        excluded tilts.
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
        Height of the specimen's mid-plane above the rotation centre of the aligned
        correlation chain, before centring (the shifts include the correction).
    specimen_thickness_angstrom
        Thickness of the specimen as the centring step saw it (NaN: unknown).
    centring_method
        How the mid-plane was found (:class:`SpecimenGeometry` ``method``; ``""`` when
        centring was off).
    specimen_z_uncertainty_angstrom
        Standard error of the mid-plane (0 with gold, where it is a fraction of a voxel;
        infinite when not found; NaN when centring was off).
    centring_warning
        Non-empty when the volume may not be centred on the specimen: the mid-plane was
        not found (the rotation centre stays on the correlation chain's, the strongest
        layer), or found from the structure alone with a standard error above
        ``max_centring_uncertainty_angstrom``.
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
    specimen_thickness_angstrom: float = float("nan")
    centring_method: str = ""
    specimen_z_uncertainty_angstrom: float = float("nan")
    centring_warning: str = ""


def _neighbour_median(values: np.ndarray, angles: np.ndarray, idx: np.ndarray, k: int = 4) -> np.ndarray:
    """For each of ``idx``, the median of ``values`` over its ``k`` nearest others in angle."""
    out = np.empty(len(idx))
    for n, i in enumerate(idx):
        others = idx[idx != i]
        near = others[np.argsort(np.abs(angles[others] - angles[i]))[:k]]
        out[n] = np.median(values[near]) if len(near) else values[i]
    return out


def _weak_links(binned_tyx, angles: np.ndarray, nominal: np.ndarray, idx: np.ndarray, shifts: np.ndarray,
                axis_deg: float, corr: _Correlator, *, radius_px: float, min_peak_ratio: float,
                min_relative_correlation: tuple[float, float]) -> dict[int, str]:
    """Tilts placed through a weak neighbour link: ``{tilt: reason}``.

    Each of the tilts ``idx`` (but the one nearest 0°) is correlated with its neighbour
    towards 0° in ``idx``, stretched to its view and moved by its shift; walking outwards
    on each side, the first weak link (correlation below ``min_relative_correlation[0]``
    times the median link's, or below ``min_relative_correlation[1]`` times it with a peak
    ratio below ``min_peak_ratio``), and all tilts beyond it, are returned.
    """
    start = int(idx[np.argmin(np.abs(nominal[idx]))])
    outward = [idx[idx < start][::-1], idx[idx > start]]
    pairs = [(int(i), int(j)) for side in outward for i, j in zip(side, np.concatenate([[start], side[:-1]]))]
    if len(pairs) < 3:
        return {}
    refs = corr.xp.stack([_stretched_reference(binned_tyx, angles, i, [j], shifts, tilt_axis_angle_deg=axis_deg)
                          for i, j in pairs])
    tilts = np.array([i for i, _ in pairs])
    _, c, r = corr.match(corr.prepare(binned_tyx[tilts]), corr.prepare(refs), centres_yx=shifts[tilts],
                         radii_px=radius_px)
    typical = float(np.median(c))
    low, marginal = min_relative_correlation
    weak = (c < low * typical) | ((r < min_peak_ratio) & (c < marginal * typical))
    out: dict[int, str] = {}
    for side in outward:
        k = np.flatnonzero(weak[np.isin(tilts, side)])
        if len(k) == 0:
            continue
        first = int(side[k[0]])
        n = int(np.flatnonzero(tilts == first)[0])
        for i in side[k[0]:]:
            out[int(i)] = (f"{ALIGNMENT_FAILED} (not placed reliably: the link of the {angles[first]:.1f} degree tilt to "
                           f"its neighbour towards 0 has peak ratio {r[n]:.2f} and correlation {c[n]:.2f}, median "
                           f"{typical:.2f}; no gold to check it)")
    return out


def _confirmed_by_reprojection(matcher: _Matcher, corr: _Correlator, angles: np.ndarray, nominal: np.ndarray,
                               kept: np.ndarray, candidates, shifts: np.ndarray, axis_deg: float, *,
                               radius_px: float, tolerance_px: float, min_peak_ratio: float) -> list[int]:
    """Of the excluded tilts ``candidates``, those whose position a reprojection confirms.

    Walking outwards on each side of the kept tilt nearest 0°, innermost first, each
    candidate is correlated (``corr``, a stronger low-pass than the chain's) with the
    reprojection, at its angle, of the weighted back-projection of the ``kept`` tilts and
    of those confirmed before it (never of the other excluded ones). It is confirmed when
    the best peak within ``radius_px`` of its shift is within ``tolerance_px`` of it and
    at least ``min_peak_ratio`` times the next best: two independent placements agree.
    The first candidate not confirmed ends the walk on its side (those beyond it were
    placed through it). Positions are never moved: the reprojection of a one-sided set
    of tilts of a thick specimen is a check, not a precise reference.
    """
    core = kept.copy()
    start = int(np.flatnonzero(core)[np.argmin(np.abs(nominal[core]))])
    rot = _rot_xy(axis_deg)
    confirmed: list[int] = []
    for side in (-1, 1):
        for i in sorted((int(c) for c in candidates if (c - start) * side > 0), key=lambda c: abs(c - start)):
            ref = np.flatnonzero(core)
            volume = _wbp(matcher.aligned(ref, shifts, axis_deg), angles[ref], thickness_px=matcher.thickness_px)
            reproj = project_volume(volume, angles[[i]], n_detector_px=matcher.shape[1])
            rotated = apply_alignment(matcher.binned[[i]], shifts_px=np.zeros((1, 2)), tilt_axis_angle_deg=axis_deg,
                                      order=1, fill="zero")
            centre = (rot.T @ shifts[i][::-1])[::-1]
            d, _, r = corr.match(corr.prepare(rotated), corr.prepare(reproj), centres_yx=centre[None],
                                 radii_px=radius_px)
            if np.hypot(*(d[0] - centre)) > tolerance_px or r[0] < min_peak_ratio:
                break
            core[i] = True
            confirmed.append(i)
    return confirmed


def _feature_placements(matcher: _Matcher, angles: np.ndarray, idx: np.ndarray, shifts: np.ndarray,
                        axis_deg: float, *, radius_px: np.ndarray, n_features: int, min_strength: float,
                        feature_radius_px: float):
    """Where the strongest 3D features of the reconstruction put each of the tilts ``idx``.

    The weighted back-projection of the tilts ``idx`` is masked to balls of
    ``feature_radius_px`` around its ``n_features`` strongest features (those at least
    ``min_strength`` times the strongest's structure energy) and reprojected at each
    tilt's angle; each tilt is correlated with its reprojection within ``radius_px`` of
    its shift.

    Returns
    -------
    placements, ratio
        ``(n, 2)`` displacements ``(dy, dx)`` and ``(n,)`` peak ratios.

    Notes
    -----
    Gold beads make compact, strong features whose positions a reconstruction from all
    tilts fixes in 3D, so the projection of the balls around them is right at every
    angle, far tilts included, and a tilt placed far off (e.g. a correlation chain that
    locked onto the other bead layer of a thick specimen) still finds the whole
    constellation; a reprojection of the whole volume from the tilts on one side of a
    tilt is weak and biased there, and the 3D-feature model only looks a few pixels
    around each feature.
    """
    xp = matcher.xp
    aligned = matcher.aligned(idx, shifts, axis_deg)
    volume = _wbp(aligned, angles[idx], thickness_px=matcher.thickness_px)
    feats, strength = _volume_features(volume, n_max=n_features, border_fraction=(0.05, 0.05))
    feats = feats[strength >= min_strength * strength.max()] if len(strength) else feats
    nz, ny, nx = volume.shape
    grid = np.ogrid[:nz, :ny, :nx]
    mask = np.zeros((nz, ny, nx), bool)
    centre = (np.array([nz, ny, nx]) - 1) / 2
    for f in feats + centre:
        mask |= sum((g - c) ** 2 for g, c in zip(grid, f)) <= feature_radius_px**2
    reproj = project_volume(volume * xp.asarray(mask), angles[idx], n_detector_px=matcher.shape[1])
    rotated = apply_alignment(matcher.binned[idx], shifts_px=np.zeros((len(idx), 2)), tilt_axis_angle_deg=axis_deg,
                              order=1, fill="zero")
    rot = _rot_xy(axis_deg)
    centres = (shifts[idx][:, ::-1] @ rot)[:, ::-1]
    d, _, r = matcher.corr.match(matcher.corr.prepare(rotated), matcher.corr.prepare(reproj), centres_yx=centres,
                                 radii_px=radius_px[idx])
    return (d[:, ::-1] @ rot.T)[:, ::-1], r


def _outer_runs(off: np.ndarray, agree: np.ndarray, nominal: np.ndarray) -> np.ndarray:
    """The tilts of ``off`` that start or lie in an outer run of their side of 0°.

    ``(n,)`` bool, bool and nominal angles of tilts sorted by angle. On each side, the
    tilts of ``off`` from the first one outwards, when no tilt beyond it is in ``agree``:
    the signature of a correlation chain gone wrong at one link (an isolated tilt off
    between agreeing ones is more likely a wrong placement by the features).
    """
    out = np.zeros(len(off), bool)
    start = int(np.argmin(np.abs(nominal)))
    for side in (np.arange(start, -1, -1), np.arange(start, len(off))):
        first = np.flatnonzero(off[side])
        if len(first) and not agree[side[first[0]:]].any():
            out[side[first[0]:]] = off[side[first[0]:]]
    return out


def _carried_outwards(shifts: np.ndarray, placement: np.ndarray, moved: np.ndarray, agree: np.ndarray,
                      sin_t: np.ndarray, nominal: np.ndarray) -> np.ndarray:
    """Move the tilts ``moved`` to their ``placement`` and carry the moves outwards.

    ``(n, 2)`` shifts, placements and ``(n,)`` bool, bool, ``sin(theta)`` and nominal
    angles of tilts sorted by angle. A tilt neither moved nor in ``agree`` (placed where
    its own placement puts it) that lies beyond a moved one on its side of 0° (placed
    through it by the correlation chain) takes the move extrapolated from the last two
    moved tilts before it, linear in ``sin(theta)`` (the form of a chain that follows
    another layer of a thick specimen), or the last one's move; a tilt in ``agree`` ends
    the run.
    """
    out = shifts.copy()
    out[moved] = placement[moved]
    delta = placement - shifts
    start = int(np.argmin(np.abs(nominal)))
    for side in (np.arange(start, -1, -1), np.arange(start, len(shifts))):
        seen: list[int] = []
        for i in side:
            if moved[i]:
                seen.append(int(i))
            elif agree[i]:
                seen = []
            elif seen:
                if len(seen) >= 2 and abs(sin_t[seen[-1]] - sin_t[seen[-2]]) > 1e-3:
                    j, k = seen[-2], seen[-1]
                    out[i] = shifts[i] + delta[k] + (delta[k] - delta[j]) * (sin_t[i] - sin_t[k]) / (sin_t[k] - sin_t[j])
                else:
                    out[i] = shifts[i] + delta[seen[-1]]
    return out


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
    estimate_tilt_angle_offset: bool = True,
    lowpass_angstrom: float = 18.0,
    highpass_angstrom: float = 240.0,
    min_relative_correlation: float = 0.5,
    min_peak_ratio: float = 1.2,
    max_shift_fraction: tuple[float, float] = (0.1, 0.3),
    ice_mean_free_path_angstrom: float = 3500.0,
    max_centring_uncertainty_angstrom: float = 50.0,
    min_link_peak_ratio: float = 1.5,
    min_link_relative_correlation: tuple[float, float] = (0.55, 0.75),
    recovery_tolerance_angstrom: float = 18.0,
    min_recovery_peak_ratio: float = 3.0,
    max_feature_correction_angstrom: float = 12.0,
    n_replacement_rounds: int = 4,
    max_feature_placement_offset_px: float = 3.0,
    min_feature_placement_peak_ratio: float = 2.0,
    n_feature_placement_rounds: int = 4,
) -> TiltSeriesAlignment:
    """Align a tilt-series without fiducials (see the module docstring for the steps).

    Parameters
    ----------
    images_tyx
        ``(t, y, x)`` tilt images (gain-corrected sums, same exposure per tilt), numpy or
        cupy, sorted by tilt angle.
    tilt_angles_deg
        ``(t,)`` nominal (stage) tilt angles.
    pixel_size_angstrom
        Pixel size of ``images_tyx``.
    tilt_axis_angle_deg
        Nominal tilt-axis angle (the mdoc's), counter-clockwise from Y.
    alignment_pixel_size_angstrom
        Pixel size alignment works at (Fourier binning; no binning if smaller than the
        input's). About 1/128 of the field of view is a good choice.
    specimen_thickness_angstrom
        Thickness of the slab reconstructed for the feature model and the leave-one-out
        reprojections (at least the specimen's; capped at 1.5 image widths); centring
        looks at twice that.
    motion_px, ctf_fit_resolution_angstrom, user_excluded
        Passed to :func:`tomodask.kernels.tilt_exclusion.find_bad_tilts`.
    refine_tilt_axis
        Refine the tilt-axis angle (common lines over ``tilt_axis_search_deg`` either
        side of the nominal one, then :func:`refine_with_features`); else keep it.
    n_projection_matching_iterations
        Most rounds of the global 3D-feature consistency step (fewer when its corrections
        are below 0.1 px; one usually suffices; 0: neighbour correlations only).
    center_specimen
        Move the rotation centre to the specimen's mid-plane (:func:`specimen_geometry`).
    estimate_tilt_angle_offset
        Offset the angles so that the specimen is level (from the intensity fall with
        tilt, else with ``center_specimen`` from the slope of the bead layers or of the
        structure).
    lowpass_angstrom, highpass_angstrom
        Band-pass of the correlations (wavelengths kept between them).
    min_relative_correlation
        A tilt whose correlation with its aligned neighbours (or, for one the neighbour
        chain could not place, with the reprojection of the others) is below this
        fraction of theirs is reported as ``"alignment failed (...)"`` and excluded; so is
        such a tilt whose correlation with its leave-one-out reprojection ends below half
        this fraction of its neighbours'.
    min_peak_ratio
        A tilt whose correlation peak is less than this many times the next best one is
        excluded the same way.
    max_shift_fraction
        ``(a, b)``: shifts are searched within ``size * (a + b |sin(theta)|)`` of the
        neighbouring tilt's shift.
    ice_mean_free_path_angstrom
        Inelastic mean free path for the ice thickness used in centring when gold is on
        one surface only (:func:`tomodask.kernels.tilt_exclusion.ice_slab_from_intensity`).
    max_centring_uncertainty_angstrom
        Without gold, a mid-plane whose standard error exceeds this is still used but
        reported in ``centring_warning``.
    min_link_peak_ratio, min_link_relative_correlation
        Without gold (the mid-plane not found from gold beads), nothing but its
        neighbours places a tilt across the axis: each kept tilt is correlated once more
        with its aligned neighbour towards 0°. With ``min_link_relative_correlation =
        (a, b)``, a link whose correlation is below ``a`` times the median link's, or below
        ``b`` times it with a peak ratio below ``min_link_peak_ratio``, is weak (a clear
        peak with a low correlation is often another structure). That tilt and every tilt
        beyond it (placed through it) are reported as ``"alignment failed (...)"`` and
        excluded.
    recovery_tolerance_angstrom, min_recovery_peak_ratio
        Without gold, tilts excluded as ``"alignment failed"`` get one more check,
        outwards from 0° on each side: correlated (low-pass twice ``lowpass_angstrom``)
        with the reprojection at their angle of the kept tilts (and of those recovered
        before them), a tilt whose best peak within ``max_shift_fraction[0]`` of the field
        lies within ``recovery_tolerance_angstrom`` of its shift and is at least
        ``min_recovery_peak_ratio`` times the next best is kept at its shift; the first
        one that fails ends the walk on its side.
    max_feature_correction_angstrom, n_replacement_rounds
        Without gold, after the link check and the recovery: when the 3D-feature model
        of the kept tilts (:func:`refine_with_features`, unshrunk) moves one of them by
        more than ``max_feature_correction_angstrom``, its corrections are applied to the
        kept tilts and it is fitted again, up to ``n_replacement_rounds`` times, until
        none moves by more than half that (a confident link to the wrong layer of a thick
        specimen, and the tilts placed through it, are re-placed by the features). A
        tilt still moved by more than ``max_feature_correction_angstrom`` after the last
        round is reported as ``"alignment failed (...)"`` and excluded.
    max_feature_placement_offset_px, min_feature_placement_peak_ratio, n_feature_placement_rounds
        With gold (found when the specimen is first centred), after the global passes
        each kept tilt is correlated with the reprojection, at its angle, of the balls
        around the strongest features (beads) of the reconstruction
        (:func:`_feature_placements`), searched as widely as the chain's links. A clear
        peak (at least ``min_feature_placement_peak_ratio`` times the next best) more
        than ``max_feature_placement_offset_px`` alignment pixels from the tilt's shift
        re-places it there, and the tilts beyond it on its side take the move
        extrapolated linearly in ``sin(theta)``; the global passes then run again, up to
        ``n_feature_placement_rounds`` times. A tilt still that far off after the last
        round is reported as ``"alignment failed (...)"`` and excluded.

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
    nz = int(np.clip(round(specimen_thickness_angstrom / px_b), 16, 1.5 * max(by_, bx_))) // 2 * 2
    ice_angstrom, intensity_offset_deg = ice_slab_from_intensity(
        images_tyx, angles, usable=use, mean_free_path_angstrom=ice_mean_free_path_angstrom)
    ice_px = ice_angstrom / px_b if np.isfinite(ice_angstrom) else None
    # Work with the angles that level the slab from the start (stretching and matching
    # are exact only with the true angles).
    nominal = angles
    prior_offset = intensity_offset_deg if estimate_tilt_angle_offset and np.isfinite(intensity_offset_deg) else 0.0
    angles = nominal + prior_offset
    sin_t = np.sin(np.deg2rad(angles))

    # Coarse shifts; tilt axis by common lines, then by the 3D-feature model.
    axis = float(tilt_axis_angle_deg)
    coarse_corr = _Correlator((by_, bx_), lowpass_px=lp_px, highpass_px=hp_px, xp=xp,
                              mask=_taper((by_, bx_), fraction=0.1, xp=xp))
    matcher = _Matcher(binned, lowpass_px=lp_px, highpass_px=hp_px, thickness_px=nz)
    thick_nz = int(min(2 * nz, 2 * max(by_, bx_)))

    def coarse(axis_deg: float):
        return coarse_align_shifts(binned, angles, tilt_axis_angle_deg=axis_deg, usable=use, lowpass_px=lp_px,
                                   highpass_px=hp_px, max_shift_fraction=max_shift_fraction,
                                   min_peak_ratio=min_peak_ratio)

    def features(idx: np.ndarray, shifts: np.ndarray, axis_deg: float, angles_used: np.ndarray,
                 *, fit_axis: bool) -> FeatureFit:
        aligned = matcher.aligned(idx, shifts, axis_deg)
        return refine_with_features(aligned, angles_used[idx], _wbp(aligned, angles_used[idx], thickness_px=nz),
                                    fit_axis=fit_axis)

    z_total_px = 0.0
    geometry = None
    model_fits: list[tuple[np.ndarray, FeatureFit]] = []

    def centre(idx: np.ndarray, *, slope: bool, parallax: bool = False) -> None:
        # Correlation follows the strongest layer: move the rotation centre to the mid-plane.
        nonlocal shifts_b, z_total_px, geometry
        aligned = matcher.aligned(idx, shifts_b, axis)
        volume = _wbp(aligned, angles[idx], thickness_px=thick_nz)
        known = 0.0 if slope and prior_offset != 0.0 else None
        k0 = int(np.argmin(np.abs(angles[idx])))
        found = None
        if parallax:
            fit = refine_with_features(aligned, angles[idx], _wbp(aligned, angles[idx], thickness_px=nz),
                                       fit_axis=False, shift_prior_px=100.0)
            found = (fit.positions_zyx, fit.strength) if len(fit.strength) >= 10 else None
            model_fits.append((idx, fit))
        geometry = specimen_geometry(volume, thickness_px=ice_px, estimate_slope=slope, slope_deg=known,
                                     image_yx=aligned[k0], image_tilt_angle_deg=float(angles[idx][k0]),
                                     features=found)
        z_total_px += geometry.z_center_px
        a = np.deg2rad(axis)
        shifts_b = shifts_b + geometry.z_center_px * sin_t[:, None] * np.array([np.sin(a), np.cos(a)])[None, :]

    shifts_b, coarse_ncc, _, reliable = coarse(axis)
    if refine_tilt_axis:
        if tilt_axis_search_deg > 0:
            ok = use & reliable
            axis, _ = refine_tilt_axis_angle(binned[ok], shifts_px=shifts_b[ok], tilt_axis_angle_deg=axis,
                                             search_range_deg=tilt_axis_search_deg, step_deg=1.0)
            shifts_b, coarse_ncc, _, reliable = coarse(axis)
        # The feature model needs the specimen inside its slab: centre first. Coarse shifts
        # are redone (and centred) whenever the axis has moved much since they were made.
        idx = np.flatnonzero(use & reliable)
        centre(idx, slope=False)
        axis_coarse = axis
        # The measured correction c(axis) falls with a slope (gain) below 1 when far off:
        # secant steps with the gain estimated from the last two.
        gain, last = 0.6, None
        for n in range(8):
            fit = features(idx, shifts_b, axis, angles, fit_axis=True)
            if fit.n_features < 3:
                break
            c = float(fit.axis_correction_deg)
            if last is not None and abs(axis - last[0]) > 0.1:
                gain = float(np.clip((last[1] - c) / (axis - last[0]), 0.3, 1.2))
            if n >= 2 and abs(c) < 0.02:
                break
            last = (axis, c)
            axis += float(np.clip(c / gain, -1.0, 1.0))
            shifts_b[idx] += matcher.to_raw(fit.shift_corrections_uv, axis)
            if abs(axis - axis_coarse) > 0.3:
                shifts_b, coarse_ncc, _, reliable = coarse(axis)
                idx = np.flatnonzero(use & reliable)
                z_total_px = 0.0
                centre(idx, slope=False)
                axis_coarse = axis
        # Neighbour correlations (next) need the chain's own centre, the strongest layer.
        shifts_b, coarse_ncc, _, reliable = coarse(axis)
        z_total_px = 0.0

    # Every reliable tilt once more against its two aligned neighbours (stretched, which
    # needs the chain's own centre).
    failed: dict[int, str] = {}
    ok = use & reliable
    start = int(np.flatnonzero(ok)[np.argmin(np.abs(nominal[ok]))])
    refined = shifts_b.copy()
    for i in np.flatnonzero(ok):
        good = np.flatnonzero(ok)
        sources = np.concatenate([good[good < i][-1:], good[good > i][:1]])
        if i == start or len(sources) == 0:
            continue
        reference = _stretched_reference(binned, angles, i, sources, shifts_b, tilt_axis_angle_deg=axis)
        d, _, _ = coarse_corr.match(coarse_corr.prepare(binned[i][None]), coarse_corr.prepare(reference[None]),
                                    centres_yx=shifts_b[i][None], radii_px=matcher.small_radius_px)
        refined[i] = d[0]
    shifts_b = refined
    centre(np.flatnonzero(ok), slope=False)
    gold_layers = geometry.method.startswith("gold")

    # Second chance for tilts the chain could not place: the reprojection, at their angle,
    # of all aligned tilts (which holds the parallax of a thick specimen) is the reference,
    # searched around the shifts of their aligned neighbours.
    retry = np.flatnonzero(use & ~reliable)
    if len(retry):
        good = np.flatnonzero(ok)
        radius = _search_radius_px(angles, min(by_, bx_), max_shift_fraction)
        volume = _wbp(matcher.aligned(good, shifts_b, axis), angles[good], thickness_px=nz)
        reproj = project_volume(volume, angles[retry], n_detector_px=bx_)
        rotated = apply_alignment(binned[retry], shifts_px=np.zeros((len(retry), 2)), tilt_axis_angle_deg=axis,
                                  order=1, fill="zero")
        rot = _rot_xy(axis)
        centres = []
        for i in retry:
            nearest = np.concatenate([good[good < i][-1:], good[good > i][:1]])
            centres.append((rot.T @ shifts_b[nearest].mean(axis=0)[::-1])[::-1])
        ncc_fit = matcher.measure(good, shifts_b, axis, angles)[1]
        d, c, r = matcher.corr.match(matcher.corr.prepare(rotated), matcher.corr.prepare(reproj),
                                     centres_yx=np.array(centres), radii_px=radius[retry])
        for k, i in enumerate(retry):
            near = good[np.argsort(np.abs(angles[good] - angles[i]))[:4]]
            typical = float(np.median(ncc_fit[np.searchsorted(good, near)]))
            if r[k] >= min_peak_ratio and c[k] >= min_relative_correlation * typical:
                shifts_b[i], ok[i] = (rot @ d[k][::-1])[::-1], True
            else:
                failed[int(i)] = (f"{ALIGNMENT_FAILED} (correlation {c[k]:.2f} with the reprojection of the "
                                  f"others, typical {typical:.2f}, peak ratio {r[k]:.2f})")

    # Global consistency: the 3D-feature model corrects what neighbour correlations cannot
    # see (e.g. the chain following gold on one side of the series and other structure on
    # the other).
    # With the shifts now refined, the axis is measured once more in the same fit; a
    # correction beyond two standard errors is taken (the chain's shifts, made with
    # the axis still off, bias the first estimates low).
    # With gold, the beads of the reconstruction place every tilt (step 5 of the module
    # docstring): tilts far from where they put them are re-placed, with the tilts the
    # chain placed through them, and the passes run again.
    n_rounds = int(n_feature_placement_rounds) if gold_layers else 0
    before_rounds = None  # shifts and axis after the first passes, restored when the beads are not used
    for n_round in range(1 + n_rounds):
        for _ in range(int(n_projection_matching_iterations)):
            idx = np.flatnonzero(ok)
            fit = features(idx, shifts_b, axis, angles, fit_axis=refine_tilt_axis)
            if fit.n_features < 3:
                break
            turn = fit.axis_correction_deg if abs(fit.axis_correction_deg) > 2 * fit.axis_standard_error_deg else 0.0
            axis += float(np.clip(turn, -1.0, 1.0))
            shifts_b[idx] += matcher.to_raw(fit.shift_corrections_uv, axis)
            if np.abs(fit.shift_corrections_uv).max() < 0.1 and turn == 0.0:
                break
        if not gold_layers:
            break
        idx = np.flatnonzero(ok)
        placement, ratio = _feature_placements(
            matcher, angles, idx, shifts_b, axis, radius_px=_search_radius_px(angles, min(by_, bx_), max_shift_fraction),
            n_features=10, min_strength=0.1, feature_radius_px=4.0)
        far = np.hypot(*(placement - shifts_b[idx]).T)
        agree = far <= max_feature_placement_offset_px
        off = _outer_runs(~agree & (ratio >= min_feature_placement_peak_ratio), agree, nominal[idx])
        # The beads judge only when the reconstruction holds them where the tilts near 0°
        # and most others have them; else (alignment broken elsewhere) they are not used,
        # and what the rounds did is undone.
        core = np.abs(nominal[idx]) <= 15.0
        if off[core].any() or off.sum() > len(idx) / 4:
            if before_rounds is not None:
                shifts_b, axis = before_rounds
            break
        if not off.any():
            break
        if n_round == 0:
            before_rounds = (shifts_b.copy(), axis)
        if n_round < n_rounds:
            shifts_b[idx] = _carried_outwards(shifts_b[idx], placement, off, agree, np.sin(np.deg2rad(angles[idx])),
                                              nominal[idx])
            continue
        for k in np.flatnonzero(off):
            failed[int(idx[k])] = (f"{ALIGNMENT_FAILED} (still {far[k] * px_b:.0f} Å from where the gold beads of "
                                   f"the reconstruction put it after {n_round} re-placements)")
            ok[idx[k]] = False

    offset = prior_offset
    if center_specimen:
        centre(np.flatnonzero(ok), slope=estimate_tilt_angle_offset, parallax=True)
        if estimate_tilt_angle_offset:
            offset -= geometry.slope_deg
    else:
        # Matching needed the specimen centred; give back the correlation chain's centre.
        a = np.deg2rad(axis)
        shifts_b = shifts_b - z_total_px * sin_t[:, None] * np.array([np.sin(a), np.cos(a)])[None, :]
        z_total_px, geometry = 0.0, None
    final_angles = nominal + offset

    def fix_gauge(kept: np.ndarray) -> None:
        # Gauge: the tilt nearest 0 degrees keeps zero displacement (the field the operator
        # chose); the x translation of the tomogram (cos) and its y translation restore it.
        nonlocal shifts_b
        a = np.deg2rad(axis)
        across, along = np.array([np.sin(a), np.cos(a)]), np.array([np.cos(a), -np.sin(a)])
        start = int(np.flatnonzero(kept)[np.argmin(np.abs(nominal[kept]))])
        cos_f = np.cos(np.deg2rad(final_angles))
        shifts_b = (shifts_b - (shifts_b[start] @ across) * (cos_f / cos_f[start])[:, None] * across[None, :]
                    - (shifts_b[start] @ along) * along[None, :])

    def final_model(idx: np.ndarray) -> FeatureFit:
        aligned = matcher.aligned(idx, shifts_b, axis)
        return refine_with_features(aligned, final_angles[idx], _wbp(aligned, final_angles[idx], thickness_px=nz),
                                    fit_axis=False, shift_prior_px=100.0)

    fix_gauge(ok)

    # Failure detection against leave-one-out reprojections; residuals: how far each tilt
    # still is from where the 3D-feature model (or, without features, its leave-one-out
    # reprojection) puts it.
    ncc = np.full(n_t, np.nan)
    residual_b = np.full(n_t, np.nan)
    for _ in range(2):
        idx = np.flatnonzero(ok)
        update, c, _ = matcher.measure(idx, shifts_b, axis, final_angles)
        ncc[idx] = c
        residual_b[idx] = np.hypot(update[:, 0], update[:, 1])
        typical = _neighbour_median(ncc, final_angles, idx)
        # Only tilts the neighbour chain could not place are judged by it: a tilt at the
        # end of the series, beyond a gap, has a poor leave-one-out reprojection.
        bad = (c < 0.5 * min_relative_correlation * typical) & ~reliable[idx]
        if not bad.any() or len(idx) - bad.sum() < 3:
            break
        for k in np.flatnonzero(bad):
            failed[int(idx[k])] = (f"{ALIGNMENT_FAILED} (correlation {c[k]:.2f} with its reprojection, "
                                   f"neighbours {typical[k]:.2f})")
            ok[idx[k]] = False
    if model_fits:
        # The model seen by the last centring (a change of height does not change it).
        idx, final = model_fits[-1]
    else:
        idx = np.flatnonzero(ok)
        final = final_model(idx)

    def model_residuals(idx: np.ndarray, fit: FeatureFit) -> None:
        if fit.n_features >= 3:
            model = np.sqrt((fit.shift_corrections_uv**2).sum(axis=1) + np.nan_to_num(fit.rms_px) ** 2)
            residual_b[idx] = np.where(fit.measured, model, residual_b[idx])

    model_residuals(idx, final)
    if geometry is None or not geometry.method.startswith("gold"):
        failed.update(_weak_links(binned, final_angles, nominal, np.flatnonzero(ok), shifts_b, axis, coarse_corr,
                                  radius_px=matcher.small_radius_px, min_peak_ratio=min_link_peak_ratio,
                                  min_relative_correlation=min_link_relative_correlation))
        check = _Correlator((by_, bx_), lowpass_px=2.0 * lp_px, highpass_px=hp_px, xp=xp, mask=matcher.corr.mask)
        recovered = _confirmed_by_reprojection(
            matcher, check, final_angles, nominal, ok & ~np.isin(np.arange(n_t), list(failed)), list(failed),
            shifts_b, axis, radius_px=max_shift_fraction[0] * min(by_, bx_),
            tolerance_px=recovery_tolerance_angstrom / px_b, min_peak_ratio=min_recovery_peak_ratio)
        for i in recovered:
            del failed[i]
            ok[i] = True
        # A confident wrong link (a clear peak on another layer of a thick specimen)
        # passes the link check, and the tilts beyond it follow it, so their
        # reprojections agree with them; the 3D-feature model of the kept tilts (features
        # placed by all of them) sees such a run off. Its unshrunk corrections re-place the
        # kept tilts, round after round, while one of them exceeds the tolerance (half of it
        # after the first round); a tilt still beyond it after the last round is excluded.
        kept = ok & ~np.isin(np.arange(n_t), list(failed))
        idx = np.flatnonzero(kept)
        tolerance_px = max_feature_correction_angstrom / px_b
        replaced = False
        for n in range(n_replacement_rounds + 1):
            fit = final_model(idx)
            size = np.hypot(*fit.shift_corrections_uv.T)
            if fit.n_features < 3 or size.max() <= (tolerance_px if n == 0 else tolerance_px / 2):
                break
            if n == n_replacement_rounds:
                for k in np.flatnonzero(size > tolerance_px):
                    failed[int(idx[k])] = (f"{ALIGNMENT_FAILED} (the 3D-feature model still moves it by "
                                           f"{size[k] * px_b:.0f} Å after {n} rounds of re-placement; no gold to "
                                           "place it)")
                break
            shifts_b[idx] += matcher.to_raw(fit.shift_corrections_uv, axis)
            fix_gauge(kept)
            replaced = True
        # The global passes measured the axis with tilts since excluded (runs placed
        # wrongly): once more on the kept tilts. Taken when it is more likely to help than
        # to hurt: for an unbiased estimate c of an error e with standard error s, taking
        # it leaves s^2 instead of e^2, and E[c^2] = e^2 + s^2, so beyond sqrt(2) s.
        kept = ok & ~np.isin(np.arange(n_t), list(failed))
        idx = np.flatnonzero(kept)
        fit = features(idx, shifts_b, axis, final_angles, fit_axis=True) if refine_tilt_axis else None
        turn = (fit is not None and fit.n_features >= 3
                and abs(fit.axis_correction_deg) > np.sqrt(2.0) * fit.axis_standard_error_deg)
        if turn:
            axis += float(np.clip(fit.axis_correction_deg, -1.0, 1.0))
            shifts_b[idx] += matcher.to_raw(fit.shift_corrections_uv, axis)
            fix_gauge(kept)
        if recovered or turn or replaced:
            update, c, _ = matcher.measure(idx, shifts_b, axis, final_angles)
            redo = np.isin(idx, recovered) | turn | replaced
            ncc[idx[redo]] = c[redo]
            residual_b[idx[redo]] = np.hypot(update[redo, 0], update[redo, 1])
        if turn or replaced:
            model_residuals(idx, final_model(idx))
    for i, why in failed.items():
        reasons[i] = why
    ok &= np.array([r == "" for r in reasons])
    ncc[~ok] = np.nan
    residual_b[~ok] = np.nan

    shifts = shifts_b * bin_yx[None, :] - (bin_yx[None, :] - 1.0) / 2.0
    shifts[~use] = np.nan
    excluded = np.array([r != "" for r in reasons])
    return TiltSeriesAlignment(
        shifts_px=shifts, tilt_axis_angle_deg=float(axis), tilt_angles_deg=final_angles,
        tilt_angle_offset_deg=float(offset), residual_px=residual_b * float(bin_yx.mean()), correlation=ncc,
        excluded=excluded, exclusion_reason=tuple(reasons), pixel_size_angstrom=float(pixel_size_angstrom),
        alignment_pixel_size_angstrom=px_b, nominal_tilt_axis_angle_deg=float(tilt_axis_angle_deg),
        specimen_z_offset_angstrom=float(z_total_px * px_b),
        specimen_thickness_angstrom=float(geometry.thickness_px * px_b) if geometry is not None else float("nan"),
        centring_method=geometry.method if geometry is not None else "",
        specimen_z_uncertainty_angstrom=float(geometry.z_uncertainty_px * px_b) if geometry is not None else float("nan"),
        centring_warning=_centring_warning(geometry, px_b, max_centring_uncertainty_angstrom),
    )


def _centring_warning(geometry: SpecimenGeometry | None, pixel_size_angstrom: float, max_uncertainty_angstrom: float) -> str:
    """What :attr:`TiltSeriesAlignment.centring_warning` says about a centring step."""
    if geometry is None:
        return ""
    if geometry.method.startswith("not found"):
        return (f"specimen mid-plane {geometry.method}: the rotation centre stays on the layer the "
                "correlations followed")
    sigma = geometry.z_uncertainty_px * pixel_size_angstrom
    if sigma > max_uncertainty_angstrom:
        return (f"no gold: mid-plane from the structure alone, standard error {sigma:.0f} Å "
                f"(above {max_uncertainty_angstrom:.0f} Å)")
    return ""


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
