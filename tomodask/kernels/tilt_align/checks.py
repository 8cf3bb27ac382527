"""Failure checks and re-placement of tilts (steps 5 and 7 of :mod:`tomodask.kernels.tilt_align`):
weak neighbour links, confirmation by a reprojection, placement by the gold beads of the
reconstruction and the moves carried outwards from re-placed tilts.
"""

from __future__ import annotations

import numpy as np

from tomodask.kernels.projector import project_volume
from tomodask.kernels.tilt_align.correlate import _Correlator, _stretched_reference
from tomodask.kernels.tilt_align.features import _volume_features
from tomodask.kernels.tilt_align.reprojection import _Matcher
from tomodask.kernels.tilt_align.warp import _rot_xy
from tomodask.kernels.tilt_exclusion import ALIGNMENT_FAILED


def _neighbour_median(values: np.ndarray, angles: np.ndarray, idx: np.ndarray, k: int = 4,
                      among: np.ndarray | None = None) -> np.ndarray:
    """For each of ``idx``, the median of ``values`` (one per tilt) over the ``k`` tilts of
    ``among`` (default ``idx``) nearest it in angle, itself excluded."""
    among = idx if among is None else among
    out = np.empty(len(idx))
    for n, i in enumerate(idx):
        near = _nearest_in_angle(angles, among, int(i), k)
        out[n] = np.median(values[near]) if len(near) else values[i]
    return out


def _nearest_in_angle(angles: np.ndarray, among: np.ndarray, i: int, k: int = 4) -> np.ndarray:
    """The ``k`` tilts of ``among`` (tilt indices) nearest tilt ``i`` in angle, ``i`` excluded."""
    others = among[among != i]
    return others[np.argsort(np.abs(angles[others] - angles[i]))[:k]]


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
            reproj = project_volume(matcher.volume(ref, shifts, axis_deg, angles), angles[[i]],
                                    n_detector_px=matcher.shape[1])
            rotated = matcher.rotated([i], axis_deg)
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
                        feature_radius_px: float, targets: np.ndarray | None = None):
    """Where the strongest 3D features of the reconstruction of the tilts ``idx`` put ``targets``.

    The weighted back-projection of the tilts ``idx`` is masked to balls of
    ``feature_radius_px`` around its ``n_features`` strongest features (those at least
    ``min_strength`` times the strongest's structure energy) and reprojected at the angle
    of each tilt of ``targets`` (default ``idx``); each is correlated with its
    reprojection within ``radius_px`` of its shift in ``shifts``.

    Returns
    -------
    placements, correlation, ratio
        ``(n, 2)`` displacements ``(dy, dx)``, ``(n,)`` normalised correlations at the
        peaks and ``(n,)`` peak ratios, one per target.

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
    volume = matcher.volume(idx, shifts, axis_deg, angles)
    feats, strength = _volume_features(volume, n_max=n_features, border_fraction=(0.05, 0.05))
    feats = feats[strength >= min_strength * strength.max()] if len(strength) else feats
    nz, ny, nx = volume.shape
    grid = np.ogrid[:nz, :ny, :nx]
    mask = np.zeros((nz, ny, nx), bool)
    centre = (np.array([nz, ny, nx]) - 1) / 2
    for f in feats + centre:
        mask |= sum((g - c) ** 2 for g, c in zip(grid, f)) <= feature_radius_px**2
    targets = idx if targets is None else targets
    reproj = project_volume(volume * xp.asarray(mask), angles[targets], n_detector_px=matcher.shape[1])
    rotated = matcher.rotated(targets, axis_deg)
    rot = _rot_xy(axis_deg)
    centres = (shifts[targets][:, ::-1] @ rot)[:, ::-1]
    d, c, r = matcher.corr.match(matcher.corr.prepare(rotated), matcher.corr.prepare(reproj), centres_yx=centres,
                                 radii_px=radius_px[targets])
    return (d[:, ::-1] @ rot.T)[:, ::-1], c, r


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
