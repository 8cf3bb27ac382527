"""Steps 2 to 6 of :mod:`tomodask.kernels.tilt_align` on the shared state: the tilts placed
(coarse chain, tilt axis, neighbour pass, second chance, global passes with the bead
re-placement) and the rotation centre put on the specimen.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tomodask.kernels.projector import project_volume
from tomodask.kernels.tilt_align.axis import refine_tilt_axis_angle
from tomodask.kernels.tilt_align.checks import _carried_outwards, _feature_placements, _neighbour_median, _outer_runs
from tomodask.kernels.tilt_align.correlate import _stretched_reference
from tomodask.kernels.tilt_align.state import _centre, _coarse, _fix_gauge, _height_term, _model, _State, _warn
from tomodask.kernels.tilt_align.warp import _rot_xy
from tomodask.kernels.tilt_exclusion import ALIGNMENT_FAILED


def _coarse_shifts_and_axis(s: _State, *, refine_tilt_axis: bool, tilt_axis_search_deg: float) -> None:
    """Steps 2 and 3: coarse shifts; the tilt axis by common lines, then by the 3D-feature model."""
    _coarse(s)
    if not refine_tilt_axis:
        return
    if tilt_axis_search_deg > 0:
        ok = s.use & s.reliable
        found = refine_tilt_axis_angle(s.binned[ok], shifts_px=s.shifts_b[ok], tilt_axis_angle_deg=s.axis,
                                       search_range_deg=tilt_axis_search_deg, step_deg=1.0)
        s.axis, s.axis_bracketed = found.angle_deg, found.bracketed
        _coarse(s)
    _axis_by_features(s)
    # Neighbour correlations (next) need the chain's own centre, the strongest layer.
    _coarse(s)
    s.z_total_px = 0.0


def _axis_by_features(s: _State) -> None:
    """Step 3: the axis correction the 3D-feature model measures, taken in secant steps."""
    # The feature model needs the specimen inside its slab: centre first. Coarse shifts
    # are redone (and centred) whenever the axis has moved much since they were made.
    idx = np.flatnonzero(s.use & s.reliable)
    _centre(s, idx, slope=False)
    axis_coarse = s.axis
    # The measured correction c(axis) falls with a slope (gain) below 1 when far off:
    # secant steps with the gain estimated from the last two.
    gain, last = 0.6, None
    for n in range(8):
        fit = _model(s, idx, s.angles, fit_axis=True)
        if fit.n_features < 3:
            break
        c = float(fit.axis_correction_deg)
        if last is not None and abs(s.axis - last[0]) > 0.1:
            gain = float(np.clip((last[1] - c) / (s.axis - last[0]), 0.3, 1.2))
        if n >= 2 and abs(c) < 0.02:
            break
        last = (s.axis, c)
        s.axis += float(np.clip(c / gain, -1.0, 1.0))
        s.shifts_b[idx] += s.matcher.to_raw(fit.shift_corrections_uv, s.axis)
        if abs(s.axis - axis_coarse) > 0.3:
            _coarse(s)
            idx = np.flatnonzero(s.use & s.reliable)
            s.z_total_px = 0.0
            _centre(s, idx, slope=False)
            axis_coarse = s.axis


def _neighbour_pass(s: _State) -> None:
    """Step 4: every reliable tilt once more against its two aligned neighbours; then centred.

    Stretching needs the chain's own centre, so this comes before centring.
    """
    s.ok = s.use & s.reliable
    good = np.flatnonzero(s.ok)
    start = int(good[np.argmin(np.abs(s.nominal[s.ok]))])
    corr = s.coarse_corr
    refined = s.shifts_b.copy()
    for i in good:
        sources = _either_side(good, i)
        if i == start or len(sources) == 0:
            continue
        reference = _stretched_reference(s.binned, s.angles, i, sources, s.shifts_b, tilt_axis_angle_deg=s.axis)
        d, _, _ = corr.match(corr.prepare(s.binned[i][None]), corr.prepare(reference[None]),
                             centres_yx=s.shifts_b[i][None], radii_px=s.matcher.small_radius_px)
        refined[i] = d[0]
    s.shifts_b = refined
    _centre(s, good, slope=False)


def _second_chance(s: _State, *, min_relative_correlation: float, min_bead_ratio: float) -> None:
    """Step 4: the tilts the chain could not place, against the reprojection of the aligned ones.

    The reprojection, at their angle, of all aligned tilts (which holds the parallax of a
    thick specimen) is searched around the shifts of their aligned neighbours; an
    ambiguous or weak peak fails the tilt, unless (with gold) the beads place it
    (:func:`_placed_by_beads`).
    """
    retry = np.flatnonzero(s.use & ~s.reliable)
    if len(retry) == 0:
        return
    good = np.flatnonzero(s.ok)
    placed, c, r = _searched_in_reprojection(s, retry, good)
    ncc_fit = np.full(len(s.use), np.nan)
    ncc_fit[good] = s.matcher.measure(good, s.shifts_b, s.axis, s.angles)[1]
    for k, (i, typical) in enumerate(zip(retry, _neighbour_median(ncc_fit, s.angles, retry, among=good))):
        if r[k] >= s.min_peak_ratio and c[k] >= min_relative_correlation * typical:
            s.shifts_b[i], s.ok[i] = placed[k], True
        else:
            s.failed[int(i)] = (f"{ALIGNMENT_FAILED} (correlation {c[k]:.2f} with the reprojection of the "
                                f"others, typical {typical:.2f}, peak ratio {r[k]:.2f})")
    s.placed_by_reprojection = retry[s.ok[retry]]
    unplaced = retry[np.isin(retry, list(s.failed))]
    if s.geometry.method.startswith("gold") and len(unplaced):
        _placed_by_beads(s, unplaced, min_ratio=min_bead_ratio, min_relative_correlation=min_relative_correlation)


def _searched_in_reprojection(s: _State, tilts: np.ndarray, reference: np.ndarray):
    """Each of ``tilts`` searched in the reprojection, at its angle, of the tilts ``reference``.

    The reprojection of the weighted back-projection of ``reference`` (with their current
    shifts; it holds a thick specimen's parallax) is searched around the mean shift of
    each tilt's nearest ``reference`` tilts on either side, as widely as the chain's links.

    Returns
    -------
    shifts_b, correlation, peak_ratio
        ``(n, 2)`` displacements ``(dy, dx)`` at the peaks, ``(n,)`` normalised correlations
        there and ``(n,)`` peak ratios.
    """
    reproj = project_volume(s.matcher.volume(reference, s.shifts_b, s.axis, s.angles), s.angles[tilts],
                            n_detector_px=s.matcher.shape[1])
    rot = _rot_xy(s.axis)
    centres = (_between_neighbours(s.shifts_b, tilts, reference)[:, ::-1] @ rot)[:, ::-1]
    corr = s.matcher.corr
    d, c, r = corr.match(corr.prepare(s.matcher.rotated(tilts, s.axis)), corr.prepare(reproj), centres_yx=centres,
                         radii_px=s.search_radius_px()[tilts])
    return (d[:, ::-1] @ rot.T)[:, ::-1], c, r


def _either_side(good: np.ndarray, i: int) -> np.ndarray:
    """The nearest tilts of ``good`` (sorted) below and above tilt ``i``: none, one or two."""
    return np.concatenate([good[good < i][-1:], good[good > i][:1]])


def _between_neighbours(shifts_b: np.ndarray, tilts: np.ndarray, good: np.ndarray) -> np.ndarray:
    """``(n, 2)`` mean shift of the nearest tilts of ``good`` on either side of each of ``tilts``."""
    return np.array([shifts_b[_either_side(good, i)].mean(axis=0) for i in tilts])


def _bead_placements(s: _State, idx: np.ndarray, shifts_b: np.ndarray, targets: np.ndarray | None = None):
    """Where the 10 strongest beads of the reconstruction of the tilts ``idx`` put ``targets``
    (default ``idx``): :func:`_feature_placements` with balls of 4 px, searched as widely as
    the chain's links around their ``shifts_b``."""
    return _feature_placements(s.matcher, s.angles, idx, shifts_b, s.axis, radius_px=s.search_radius_px(),
                               n_features=10, min_strength=0.1, feature_radius_px=4.0, targets=targets)


def _placed_by_beads(s: _State, tilts: np.ndarray, *, min_ratio: float, min_relative_correlation: float) -> None:
    """Step 4, with gold: the tilts the second chance failed, placed by the beads.

    Where beads of the two surfaces cross, neither the chain's stretched neighbours nor
    the reprojection of the whole volume give a clear peak (the layers' peaks compete);
    the reprojection of the balls around the beads of the aligned tilts' reconstruction
    (:func:`~tomodask.kernels.tilt_align.checks._feature_placements`) holds the crossing
    in 3D. Each of ``tilts`` is searched around its aligned neighbours' mean shift as
    widely as the chain's links. A peak at least ``min_ratio`` times the next best places
    it (no longer failed) when its correlation with the beads' reprojection is at least
    ``min_relative_correlation`` times that of the 4 aligned tilts nearest in angle (a
    few beads can also match a wrong part of an image, but not as well). The others are
    tried again with the placed ones in the reconstruction until none more is placed.
    """
    todo = np.ones(len(tilts), bool)
    while todo.any():
        good = np.flatnonzero(s.ok)
        centres = s.shifts_b.copy()
        centres[tilts[todo]] = _between_neighbours(s.shifts_b, tilts[todo], good)
        placement, c, ratio = _bead_placements(s, good, centres, targets=np.concatenate([good, tilts[todo]]))
        k = np.flatnonzero(todo)
        c_good = np.full(len(s.use), np.nan)
        c_good[good] = c[:len(good)]
        typical = _neighbour_median(c_good, s.angles, tilts[k], among=good)
        placed = (ratio[len(good):] >= min_ratio) & (c[len(good):] >= min_relative_correlation * typical)
        if not placed.any():
            return
        for n in np.flatnonzero(placed):
            s.shifts_b[tilts[k[n]]], s.ok[tilts[k[n]]] = placement[len(good) + n], True
            del s.failed[int(tilts[k[n]])]
        todo[k[placed]] = False


def _consistency_passes(s: _State, *, n_iterations: int, fit_axis: bool) -> None:
    """Step 5: rounds of the 3D-feature model on the aligned tilts.

    The model corrects what neighbour correlations cannot see (e.g. the chain following
    gold on one side of the series and other structure on the other). With the shifts
    now refined, the axis is measured once more in the same fit; a correction beyond two
    standard errors is taken, at most 1° a round (the chain's shifts, made with the axis
    still off, bias the first estimates low).
    """
    for _ in range(int(n_iterations)):
        idx = np.flatnonzero(s.ok)
        fit = _model(s, idx, s.angles, fit_axis=fit_axis)
        if fit.n_features < 3:
            break
        turn = fit.axis_correction_deg if abs(fit.axis_correction_deg) > 2 * fit.axis_standard_error_deg else 0.0
        s.axis += float(np.clip(turn, -1.0, 1.0))
        s.shifts_b[idx] += s.matcher.to_raw(fit.shift_corrections_uv, s.axis)
        if np.abs(fit.shift_corrections_uv).max() < 0.1 and turn == 0.0:
            break


def _global_passes(s: _State, *, n_iterations: int, fit_axis: bool, n_rounds: int, max_offset_px: float,
                   min_ratio: float, search_weak_tilts: Callable[[_State], bool] | None = None
                   ) -> tuple[np.ndarray, str]:
    """Step 5: the consistency passes and, with gold, the re-placement of tilts by the beads.

    With gold (found by the neighbour pass's centring), the beads of the reconstruction
    place every tilt (:func:`_feature_placements`): an outer run of tilts far from where
    they put them is re-placed, with the tilts the chain placed through them, and the
    passes run again, at most ``n_rounds`` times; still off after the last: failed.
    When such tilts lie within 15° of 0° or are more than a quarter of the tilts, the
    beads are not trusted (the alignment is broken elsewhere) and the rounds are undone.
    A tilt the second chance placed by the reprojection of the others fails when the
    beads' best peak is elsewhere (:func:`_contradicted_by_beads`). Then, with gold,
    ``search_weak_tilts(s)``
    (:func:`~tomodask.kernels.tilt_align.weak_tilts._weak_tilts_searched_again`) may move
    tilts; when it does, the passes run once more and the beads' findings are made again.

    Returns
    -------
    left, why
        Kept tilts the beads still put clearly elsewhere (these, or ones between tilts
        they place where they are) and why they were not re-placed: for
        :func:`_beads_finding` after the final centring.
    """
    gold_layers = s.geometry.method.startswith("gold")
    n_rounds = int(n_rounds) if gold_layers else 0
    before_rounds = None  # shifts and axis after the first passes, restored when the beads are not used
    left, why = np.zeros(0, int), "not an outer run of their side, which the beads re-place"
    trusted = gold_layers
    for n_round in range(1 + n_rounds):
        _consistency_passes(s, n_iterations=n_iterations, fit_axis=fit_axis)
        if not gold_layers:
            break
        idx, placement, far, agree, clear, off = _judged_by_beads(s, max_offset_px=max_offset_px, min_ratio=min_ratio)
        left = idx[clear & ~off]
        # The beads judge only when the reconstruction holds them where the tilts near 0°
        # and most others have them; else (alignment broken elsewhere) they are not used,
        # and what the rounds did is undone.
        core = np.abs(s.nominal[idx]) <= 15.0
        if off[core].any() or off.sum() > len(idx) / 4:
            if before_rounds is not None:
                s.shifts_b, s.axis = before_rounds
            left, trusted = idx[clear], False
            why = ("some within 15 degrees of 0" if off[core].any() else "more than a quarter of the tilts") + (
                ", where the beads are not trusted to re-place them")
            break
        if not off.any():
            break
        if n_round == 0:
            before_rounds = (s.shifts_b.copy(), s.axis)
        if n_round < n_rounds:
            s.shifts_b[idx] = _carried_outwards(s.shifts_b[idx], placement, off, agree,
                                                np.sin(np.deg2rad(s.angles[idx])), s.nominal[idx])
            continue
        for k in np.flatnonzero(off):
            s.failed[int(idx[k])] = (f"{ALIGNMENT_FAILED} (still {far[k] * s.px_b:.0f} Å from where the gold beads "
                                     f"of the reconstruction put it after {n_round} re-placements)")
            s.ok[idx[k]] = False
    if trusted:
        left = _contradicted_by_beads(s, idx, far, max_offset_px=max_offset_px, left=left)
    if gold_layers and search_weak_tilts is not None and search_weak_tilts(s):
        _consistency_passes(s, n_iterations=n_iterations, fit_axis=fit_axis)
        if trusted:
            # No bead rounds follow: an outer run the beads now put elsewhere is named too.
            idx, _, _, _, clear, off = _judged_by_beads(s, max_offset_px=max_offset_px, min_ratio=min_ratio)
            left = idx[clear]
            if off.any():
                why = "after the weak tilts were searched again"
    return left, why


def _beads_finding(s: _State, left: np.ndarray, why: str, *, max_offset_px: float, min_ratio: float) -> None:
    """Name the tilts ``left`` the beads put clearly elsewhere (:func:`_global_passes`).

    The global passes judged them with the slab where an earlier centring put it. When
    the final centring took the other side of a single bead layer
    (:func:`~tomodask.kernels.tilt_align.state._side_by_reprojection`), that slab was on
    the wrong side: the beads judge again at the final centre, and tilts they now put
    within ``max_offset_px`` of their shifts are not named (a 4096 Å field: -57/-54/-45°,
    right, put 40-45 px away before and within 3 px after; +57°, 38 px off with the
    weak-tilt search switched off, still put 38 px away).
    """
    if len(left) and s.other_side_taken:
        idx, _, _, agree, _, _ = _judged_by_beads(s, max_offset_px=max_offset_px, min_ratio=min_ratio)
        left = left[~np.isin(left, idx[agree])]
    if len(left):
        _warn(s, left, "the gold beads of the reconstruction put the tilts at {tilts} degrees more than "
                       f"{max_offset_px * s.px_b:.0f} Å from their shifts ({why})")


def _judged_by_beads(s: _State, *, max_offset_px: float, min_ratio: float):
    """Where the beads put the aligned tilts, and which they put clearly elsewhere.

    Returns
    -------
    idx, placement, far, agree, clear, off
        The aligned tilts; ``(n, 2)`` bead placements; their distances from the shifts;
        ``(n,)`` bool: within ``max_offset_px``; clearly elsewhere (peak ratio at least
        ``min_ratio``); clearly elsewhere in an outer run of their side (:func:`_outer_runs`).
    """
    idx = np.flatnonzero(s.ok)
    placement, _, ratio = _bead_placements(s, idx, s.shifts_b)
    far = np.hypot(*(placement - s.shifts_b[idx]).T)
    agree = far <= max_offset_px
    clear = ~agree & (ratio >= min_ratio)
    return idx, placement, far, agree, clear, _outer_runs(clear, agree, s.nominal[idx])


def _contradicted_by_beads(s: _State, idx: np.ndarray, far: np.ndarray, *, max_offset_px: float,
                           left: np.ndarray) -> np.ndarray:
    """Fail the tilts the second chance placed by the reprojection where the beads' best peak is elsewhere.

    ``far`` is how far (alignment pixels) the beads put each tilt of ``idx`` from its
    shift. Such a tilt had no reliable neighbour link, and two placements of it disagree
    by more than ``max_offset_px``, clear peak or not (on the wide-field and benchmark
    series every right one agrees within 0.3 px). Returns ``left`` without them.
    """
    wrong = np.isin(idx, s.placed_by_reprojection) & (far > max_offset_px) & s.ok[idx]
    for k in np.flatnonzero(wrong):
        s.failed[int(idx[k])] = (f"{ALIGNMENT_FAILED} (placed by the reprojection of the others, but the gold beads "
                                 f"of the reconstruction put it {far[k] * s.px_b:.0f} Å away)")
        s.ok[idx[k]] = False
    return left[~np.isin(left, idx[wrong])]


def _centre_specimen(s: _State, *, center_specimen: bool, estimate_tilt_angle_offset: bool) -> None:
    """Step 6: the rotation centre on the specimen's mid-plane, the final angles, the gauge."""
    s.offset = s.prior_offset
    if center_specimen:
        _centre(s, np.flatnonzero(s.ok), slope=estimate_tilt_angle_offset, parallax=True)
        if estimate_tilt_angle_offset:
            s.offset -= s.geometry.slope_deg
    else:
        # Matching needed the specimen centred; give back the correlation chain's centre.
        s.shifts_b = s.shifts_b - _height_term(s, s.z_total_px)
        s.z_total_px, s.geometry = 0.0, None
    s.final_angles = s.nominal + s.offset
    _fix_gauge(s, s.ok)
