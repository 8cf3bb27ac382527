"""The 3D-feature model: strong features of a reconstruction followed through the tilts and
fitted with a shift per tilt, a position per feature and the tilt axis
(:func:`refine_with_features`, steps 3 and 5 of :mod:`tomodask.kernels.tilt_align`).

References
----------
.. [1] Mastronarde, D. N. & Held, S. R. (2017). Automated tilt series alignment and
   tomographic reconstruction in IMOD. J. Struct. Biol. 197, 102-113.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse

from tomodask.backend import get_array_module, scipy_ndimage, to_numpy
from tomodask.kernels.fourier import frequency_grid
from tomodask.kernels.tilt_align.correlate import _bandpass, _peaks, _taper


def _block_mean_2x(volume_zyx):
    """float32 means of 2 x 2 x 2 blocks (an odd last row, column or slice is dropped)."""
    xp = get_array_module(volume_zyx)
    mz, my, mx = (n // 2 for n in volume_zyx.shape)
    return volume_zyx[:2 * mz, :2 * my, :2 * mx].astype(xp.float32).reshape(mz, 2, my, 2, mx, 2).mean(axis=(1, 3, 5))


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
    v = _block_mean_2x(volume_zyx)
    mz, my, mx = v.shape
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
    n_t = aligned_tyx.shape[0]
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
    windows, inside = _feature_windows(aligned_tyx, u, v, half_window_px=half_window_px, max_lag_px=max_lag_px)
    offsets, _ = _window_offsets(windows, inside.astype(np.float64), lowpass_px=lowpass_px, highpass_px=highpass_px,
                                 max_lag_px=max_lag_px)
    t_i, k_i = np.nonzero(inside)
    if len(t_i) < 10:
        return empty
    design = _feature_design(t_i, k_i, u, v, cos_t, sin_t, n_t=n_t, n_k=n_k, fit_axis=fit_axis)
    n_unknown = design.shape[1]
    obs = np.concatenate([offsets[t_i, k_i, 1], offsets[t_i, k_i, 0]])
    kk = np.concatenate([k_i, k_i])
    prior = _gauge_prior(n_t, n_k, n_unknown, shift_prior_px=shift_prior_px, fit_axis=fit_axis)
    sol, normal, resid, robust, scale_k, w2 = _robust_solution(design, obs, kk, prior, n_k=n_k)
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
    positions = _parallax_heights(feats, offsets, inside, theta, sin_t, sol[:n_t], max_lag_px=max_lag_px)
    return FeatureFit(shift_corrections_uv=corr_uv, axis_correction_deg=float(np.rad2deg(sol[-1])) if fit_axis else 0.0,
                      axis_standard_error_deg=stderr, measured=measured, rms_px=rms, n_features=n_used,
                      positions_zyx=positions, strength=strength)


def _feature_windows(aligned_tyx, u: np.ndarray, v: np.ndarray, *, half_window_px: int,
                     max_lag_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Windows of the aligned tilts around the features' projections.

    ``u``, ``v`` are ``(t, k)`` positions across and along the axis (pixels from the
    centre). Returns ``(t, k, w, w)`` windows (linear interpolation, 0 outside) and
    ``(t, k)`` bool, the windows inside the image with room for ``max_lag_px``.
    """
    xp = get_array_module(aligned_tyx)
    ndi = scipy_ndimage(xp)
    n_t, ny, nx = aligned_tyx.shape
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
    return windows, inside


def _feature_design(t_i: np.ndarray, k_i: np.ndarray, u: np.ndarray, v: np.ndarray, cos_t: np.ndarray,
                    sin_t: np.ndarray, *, n_t: int, n_k: int, fit_axis: bool):
    """Sparse design matrix of the 3D-feature model for the windows ``(t_i, k_i)``.

    Unknowns: a (t), b (t), dx (k), dy (k), dz (k), c (k), e; rows: the u then the v
    offsets. c is each feature's constant offset across the axis: its template (the mean
    of its windows) has no absolute centre, so the tilts' common shift across the axis is
    left to the neighbour correlations.
    """
    m = len(t_i)
    n_unknown = 2 * n_t + 4 * n_k + 1
    r = np.arange(m)
    rows = np.concatenate([r, r, r, r, r, m + r, m + r, m + r])
    cols = np.concatenate([t_i, 2 * n_t + k_i, 2 * n_t + 2 * n_k + k_i, 2 * n_t + 3 * n_k + k_i,
                           np.full(m, n_unknown - 1), n_t + t_i, 2 * n_t + n_k + k_i, np.full(m, n_unknown - 1)])
    vals = np.concatenate([np.ones(m), cos_t[t_i], sin_t[t_i], np.ones(m), -v[t_i, k_i] * fit_axis,
                           np.ones(m), np.ones(m), u[t_i, k_i] * fit_axis])
    return scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(2 * m, n_unknown))


def _gauge_prior(n_t: int, n_k: int, n_unknown: int, *, shift_prior_px: float, fit_axis: bool) -> np.ndarray:
    """Prior ``(n_unknown, n_unknown)`` added to the normal equations of the 3D-feature model.

    Gauge: the features as a whole do not move (the tomogram is not translated) and the
    tilts' mean shift across the axis does not change; a weak prior on each tilt's
    correction damps what the features barely see.
    """
    prior = np.zeros((n_unknown, n_unknown))
    for g in range(3):
        block = slice(2 * n_t + g * n_k, 2 * n_t + (g + 1) * n_k)
        prior[block, block] += 1e6 / n_k**2
    prior[:n_t, :n_t] += 1e6 / n_t**2
    prior[np.arange(2 * n_t), np.arange(2 * n_t)] += 1.0 / shift_prior_px**2
    if not fit_axis:
        prior[-1, -1] += 1.0
    return prior


def _robust_solution(design, obs: np.ndarray, kk: np.ndarray, prior: np.ndarray, *, n_k: int):
    """Iteratively reweighted least squares: each feature weighted by its own scatter, outliers dropped.

    ``kk`` gives each observation's feature. Returns the solution, the normal matrix, the
    residuals, the robust (Tukey biweight) weights, the features' scatters and the
    observations' weights of the last iteration.
    """
    n_unknown = design.shape[1]
    robust = np.ones(len(obs))
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
    return sol, normal, resid, robust, scale_k, w2


def _parallax_heights(feats: np.ndarray, offsets: np.ndarray, inside: np.ndarray, theta: np.ndarray,
                      sin_t: np.ndarray, shifts_u: np.ndarray, *, max_lag_px: float) -> np.ndarray:
    """``(k, 3)`` feature positions with the heights corrected from their parallax.

    Between tilts theta_1 and theta_2 a feature moves by x (cos 1 - cos 2) + z (sin 1 -
    sin 2) across the axis, and its template offset and the common shift cancel; pairs of
    opposite tilts give z to a fraction of a voxel. ``offsets`` are the ``(t, k, 2)``
    window displacements, ``shifts_u`` the tilts' fitted shifts across the axis.
    """
    positions = feats.copy()
    off_u = offsets[..., 1] - shifts_u[:, None]
    for k in range(len(feats)):
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
    return positions
