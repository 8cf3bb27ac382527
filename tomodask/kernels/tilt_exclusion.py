"""Bad-tilt exclusion: find the tilts of a series that alignment and reconstruction must skip.

A tilt is excluded for one or more reasons, each a short fixed string so that the
dashboard, the database and the exported files can group them:

``"dark"``
    Its mean intensity is far below what its neighbours predict (a grid bar, the edge of
    a lamella, a closed valve, a beam that did not come back).
``"blank"``
    It holds no usable numbers: non-finite values, or a constant image.
``"excessive motion"``
    Frame alignment measured more drift than the limit.
``"failed CTF fit"``
    CTF estimation found no fit, or one worse than the resolution limit.
``"excluded by user"``
    Listed by the operator.

Alignment adds its own reason for tilts it cannot place (see
:func:`tomodask.kernels.tilt_align.align_tilt_series`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from tomodask.backend import get_array_module, to_numpy

DARK = "dark"
BLANK = "blank"
EXCESSIVE_MOTION = "excessive motion"
FAILED_CTF_FIT = "failed CTF fit"
EXCLUDED_BY_USER = "excluded by user"
ALIGNMENT_FAILED = "alignment failed"

#: Every reason string :func:`find_bad_tilts` and the alignment can give.
EXCLUSION_REASONS = (DARK, BLANK, EXCESSIVE_MOTION, FAILED_CTF_FIT, EXCLUDED_BY_USER, ALIGNMENT_FAILED)


def _fit_log_intensity(log_mean: np.ndarray, tilt_angles_deg: np.ndarray | None,
                       usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Robust model of each tilt's log mean intensity from the other tilts.

    With tilt angles, fit ``log I = a - b / cos(theta)`` (Beer-Lambert through a slab whose
    path grows as ``1 / cos``) by iteratively re-weighted least squares; without them, the
    median. Returns the model at every tilt and ``(a, b)`` (``b = 0`` without angles).
    """
    if tilt_angles_deg is None or usable.sum() < 4:
        return np.full_like(log_mean, np.median(log_mean[usable])), np.array([np.median(log_mean[usable]), 0.0])
    path = 1.0 / np.maximum(np.cos(np.deg2rad(np.asarray(tilt_angles_deg, dtype=np.float64))), 0.05)
    design = np.stack([np.ones_like(path), -path], axis=1)
    weights = usable.astype(np.float64)
    coef = np.zeros(2)
    for _ in range(6):
        w = np.sqrt(weights)
        coef, *_ = np.linalg.lstsq(design * w[:, None], log_mean * w, rcond=None)
        resid = log_mean - design @ coef
        scale = 1.4826 * np.median(np.abs(resid[usable])) + 1e-3
        # Tukey biweight: tilts far below the fit (dark ones) get no say in it.
        weights = usable * np.clip(1.0 - (resid / (6.0 * scale)) ** 2, 0.0, None) ** 2
        if weights.sum() < 3:
            break
    return design @ coef, coef


def _expected_log_intensity(log_mean: np.ndarray, tilt_angles_deg: np.ndarray | None,
                            usable: np.ndarray) -> np.ndarray:
    """The model of :func:`_fit_log_intensity` at every tilt."""
    return _fit_log_intensity(log_mean, tilt_angles_deg, usable)[0]


def ice_slab_from_intensity(
    images_tyx: np.ndarray,
    tilt_angles_deg: np.ndarray | Sequence[float],
    *,
    usable: np.ndarray | None = None,
    mean_free_path_angstrom: float = 3500.0,
    max_offset_deg: float = 15.0,
) -> tuple[float, float]:
    """Ice thickness and tilt-angle offset from the fall of mean intensity with tilt.

    Parameters
    ----------
    images_tyx
        ``(t, y, x)`` tilt images with the same exposure per tilt (gain-corrected sums, any
        binning, not normalised), numpy or cupy.
    tilt_angles_deg
        ``(t,)`` nominal tilt angles.
    usable
        ``(t,)`` bool, tilts to fit (default: all).
    mean_free_path_angstrom
        Inelastic mean free path of the electrons in the ice (about 3500 Å at 300 kV with an
        energy filter; it scales the thickness, not the offset).
    max_offset_deg
        Offsets searched either side of 0.

    Returns
    -------
    thickness_angstrom, tilt_angle_offset_deg
        The slab's thickness and the offset to add to the nominal angles so that the slab
        is level at 0°; NaN when the intensities do not fall with tilt (too few tilts, an
        exposure that changes with tilt).

    Notes
    -----
    A slab of thickness ``t`` transmits ``exp(-t / (mfp cos(theta + offset)))`` of the
    unscattered beam, so ``log I = a - b / cos(theta + offset)`` with ``b = t / mfp`` [1]_;
    a pre-tilted slab makes the fall steeper on one side. The offset minimises the robust
    residual of that fit (grid, then a parabola). Each tilt's median intensity is used, so
    that strong absorbers (gold) moving in and out of the field do not bias it.

    References
    ----------
    .. [1] Rice, W. J. et al. (2018). Routine determination of ice thickness for cryo-EM
       grids. J. Struct. Biol. 204, 38-44.
    """
    xp = get_array_module(images_tyx)
    n_t = images_tyx.shape[0]
    use = np.ones(n_t, bool) if usable is None else np.asarray(usable, bool).copy()
    # Median, not mean: dark gold beads entering or leaving the field would bias the fall.
    mean = to_numpy(xp.median(images_tyx.reshape(n_t, -1).astype(xp.float32), axis=1)).astype(np.float64)
    use &= np.isfinite(mean) & (mean > 0)
    nan = float("nan")
    if use.sum() < 5:
        return nan, nan
    angles = np.asarray(tilt_angles_deg, dtype=np.float64)
    log_mean = np.log(np.where(use, mean, 1.0))

    def misfit(offset: float) -> tuple[float, float]:
        model, (_, b) = _fit_log_intensity(log_mean, angles + offset, use)
        r = (log_mean - model)[use]
        return float(np.sum(np.minimum(r**2, (6 * 1.4826 * np.median(np.abs(r)) + 1e-3) ** 2))), float(b)

    grid = np.arange(-max_offset_deg, max_offset_deg + 1e-9, 0.5)
    costs = np.array([misfit(o)[0] for o in grid])
    j = int(np.argmin(costs))
    offset = float(grid[j])
    if 0 < j < len(grid) - 1:
        den = costs[j - 1] - 2 * costs[j] + costs[j + 1]
        if den > 0:
            offset += 0.25 * (costs[j - 1] - costs[j + 1]) / den
    b = misfit(offset)[1]
    if b <= 0 or j in (0, len(grid) - 1):
        return nan, nan
    return float(b * mean_free_path_angstrom), offset


def find_bad_tilts(
    images_tyx: np.ndarray,
    *,
    tilt_angles_deg: np.ndarray | Sequence[float] | None = None,
    motion_px: np.ndarray | Sequence[float] | None = None,
    ctf_fit_resolution_angstrom: np.ndarray | Sequence[float] | None = None,
    user_excluded: Iterable[int] = (),
    dark_fraction: float = 0.3,
    max_motion_px: float = 40.0,
    max_ctf_fit_resolution_angstrom: float = 30.0,
) -> tuple[str, ...]:
    """Say which tilts to exclude before alignment, and why.

    Parameters
    ----------
    images_tyx
        ``(t, y, x)`` tilt images (gain-corrected sums, any binning), numpy or cupy.
    tilt_angles_deg
        ``(t,)`` tilt angles; used to model the fall of intensity with tilt
        (``exp(-thickness / (mfp cos theta))``), so a dark tilt at high tilt is told from
        a thick one. Without them, tilts are compared to the median.
    motion_px
        ``(t,)`` total drift per tilt from frame alignment, in the input pixels (NaN:
        unknown, not excluded).
    ctf_fit_resolution_angstrom
        ``(t,)`` resolution to which each tilt's CTF fit holds; NaN or infinite means the
        fit failed.
    user_excluded
        Indices the operator excluded.
    dark_fraction
        A tilt is ``"dark"`` when its mean intensity is below this fraction of what the
        other tilts predict for its angle.
    max_motion_px
        Drift above this is ``"excessive motion"``.
    max_ctf_fit_resolution_angstrom
        A fit resolution worse (larger) than this, or a failed fit, is ``"failed CTF fit"``.

    Returns
    -------
    tuple of str
        One entry per tilt: ``""`` for a usable tilt, else the reasons joined by ``"; "``
        (from :data:`EXCLUSION_REASONS`).

    Raises
    ------
    ValueError
        When a per-tilt array does not have one value per tilt, or a user index is out of
        range.
    """
    xp = get_array_module(images_tyx)
    if images_tyx.ndim != 3:
        raise ValueError(f"images_tyx must be (t, y, x); got shape {images_tyx.shape}")
    n_t = images_tyx.shape[0]

    def per_tilt(values, name: str) -> np.ndarray | None:
        if values is None:
            return None
        arr = np.asarray(to_numpy(values), dtype=np.float64).ravel()
        if arr.shape != (n_t,):
            raise ValueError(f"{name} needs one value per tilt ({n_t}); got {arr.shape[0]}")
        return arr

    angles = per_tilt(tilt_angles_deg, "tilt_angles_deg")
    motion = per_tilt(motion_px, "motion_px")
    ctf_res = per_tilt(ctf_fit_resolution_angstrom, "ctf_fit_resolution_angstrom")
    reasons: list[list[str]] = [[] for _ in range(n_t)]

    flat = images_tyx.reshape(n_t, -1).astype(xp.float32)
    finite = to_numpy(xp.isfinite(flat).all(axis=1))
    safe = xp.where(xp.isfinite(flat), flat, 0.0)
    mean = to_numpy(safe.mean(axis=1)).astype(np.float64)
    std = to_numpy(safe.std(axis=1)).astype(np.float64)
    blank = ~finite | (std <= 1e-6 * np.maximum(np.abs(mean), 1e-12))
    for i in np.flatnonzero(blank):
        reasons[i].append(BLANK)

    usable = ~blank & (mean > 0)
    if usable.sum() >= 2:
        log_mean = np.log(np.maximum(mean, 1e-30))
        expected = _expected_log_intensity(log_mean, angles, usable)
        dark = ~blank & (log_mean < expected + np.log(dark_fraction))
        for i in np.flatnonzero(dark):
            reasons[i].append(DARK)

    if motion is not None:
        for i in np.flatnonzero(np.isfinite(motion) & (motion > max_motion_px)):
            reasons[i].append(EXCESSIVE_MOTION)
    if ctf_res is not None:
        failed = ~np.isfinite(ctf_res) | (ctf_res > max_ctf_fit_resolution_angstrom)
        for i in np.flatnonzero(failed):
            reasons[i].append(FAILED_CTF_FIT)
    for i in user_excluded:
        if not -n_t <= int(i) < n_t:
            raise ValueError(f"user_excluded index {i} is out of range for {n_t} tilts")
        if EXCLUDED_BY_USER not in reasons[int(i)]:
            reasons[int(i)].append(EXCLUDED_BY_USER)
    return tuple("; ".join(r) for r in reasons)
