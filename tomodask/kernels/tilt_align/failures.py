"""Step 7 of :mod:`tomodask.kernels.tilt_align` on the shared state: residuals, failure detection
against leave-one-out reprojections and, without gold, the link check, the recovery, the
re-placement by the 3D-feature model and the final axis, the warning when the signal is too
weak to check the high tilts; the warnings for kept tilts that correlate with the reconstruction
of the others far below the tilts near 0° and for kept tilts whose residuals stay large.
"""

from __future__ import annotations

import numpy as np

from tomodask.kernels.tilt_align.checks import _confirmed_by_reprojection, _neighbour_median, _weak_links
from tomodask.kernels.tilt_align.correlate import _Correlator
from tomodask.kernels.tilt_align.state import _final_model, _fix_gauge, _model, _model_residuals, _State, _warn
from tomodask.kernels.tilt_exclusion import ALIGNMENT_FAILED


def _residuals_and_failures(s: _State, *, min_relative_correlation: float) -> None:
    """Step 7: correlations with the leave-one-out reprojections, failures, residuals.

    Residuals: how far each tilt still is from where the 3D-feature model (or, without
    features, its leave-one-out reprojection) puts it.
    """
    n_t = len(s.use)
    s.ncc = np.full(n_t, np.nan)
    s.residual_b = np.full(n_t, np.nan)
    for _ in range(2):
        idx = np.flatnonzero(s.ok)
        update, c, _ = s.matcher.measure(idx, s.shifts_b, s.axis, s.final_angles)
        s.ncc[idx] = c
        s.residual_b[idx] = np.hypot(update[:, 0], update[:, 1])
        typical = _neighbour_median(s.ncc, s.final_angles, idx)
        # Only tilts the neighbour chain could not place are judged by it: a tilt at the
        # end of the series, beyond a gap, has a poor leave-one-out reprojection.
        bad = (c < 0.5 * min_relative_correlation * typical) & ~s.reliable[idx]
        if not bad.any() or len(idx) - bad.sum() < 3:
            break
        for k in np.flatnonzero(bad):
            s.failed[int(idx[k])] = (f"{ALIGNMENT_FAILED} (correlation {c[k]:.2f} with its reprojection, "
                                     f"neighbours {typical[k]:.2f})")
            s.ok[idx[k]] = False
    if s.centring_model is not None:
        # The model seen by the last centring (a change of height does not change it).
        idx, final = s.centring_model
    else:
        idx = np.flatnonzero(s.ok)
        final = _final_model(s, idx)
    _model_residuals(s, idx, final)


def _links_and_recovery(s: _State, *, min_link_peak_ratio: float,
                        min_link_relative_correlation: tuple[float, float], recovery_tolerance_angstrom: float,
                        min_recovery_peak_ratio: float) -> list[int]:
    """Step 7 without gold: weak neighbour links fail their tilts; a reprojection recovers some.

    Returns the tilts recovered.
    """
    s.failed.update(_weak_links(s.binned, s.final_angles, s.nominal, np.flatnonzero(s.ok), s.shifts_b, s.axis,
                                s.coarse_corr, radius_px=s.matcher.small_radius_px, min_peak_ratio=min_link_peak_ratio,
                                min_relative_correlation=min_link_relative_correlation))
    check = _Correlator(s.matcher.shape, lowpass_px=2.0 * s.lp_px, highpass_px=s.hp_px, xp=s.matcher.xp,
                        mask=s.matcher.corr.mask)
    recovered = _confirmed_by_reprojection(
        s.matcher, check, s.final_angles, s.nominal, s.kept(), list(s.failed), s.shifts_b, s.axis,
        radius_px=s.max_shift_fraction[0] * min(s.matcher.shape), tolerance_px=recovery_tolerance_angstrom / s.px_b,
        min_peak_ratio=min_recovery_peak_ratio)
    for i in recovered:
        del s.failed[i]
        s.ok[i] = True
    return recovered


def _replacement_rounds(s: _State, *, max_correction_angstrom: float, n_rounds: int) -> bool:
    """Step 7 without gold: the kept tilts re-placed by the unshrunk 3D-feature model.

    A confident wrong link (a clear peak on another layer of a thick specimen) passes the
    link check, and the tilts beyond it follow it, so their reprojections agree with them;
    the 3D-feature model of the kept tilts (features placed by all of them) sees such a
    run off. Its corrections re-place the kept tilts, round after round, while one of them
    exceeds the tolerance (half of it after the first round); a tilt still beyond it after
    the last round fails. Returns whether any tilt was re-placed.
    """
    kept = s.kept()
    idx = np.flatnonzero(kept)
    tolerance_px = max_correction_angstrom / s.px_b
    replaced = False
    for n in range(n_rounds + 1):
        fit = _final_model(s, idx)
        size = np.hypot(*fit.shift_corrections_uv.T)
        if fit.n_features < 3 or size.max() <= (tolerance_px if n == 0 else tolerance_px / 2):
            break
        if n == n_rounds:
            for k in np.flatnonzero(size > tolerance_px):
                s.failed[int(idx[k])] = (f"{ALIGNMENT_FAILED} (the 3D-feature model still moves it by "
                                         f"{size[k] * s.px_b:.0f} Å after {n} rounds of re-placement; no gold to "
                                         "place it)")
            break
        s.shifts_b[idx] += s.matcher.to_raw(fit.shift_corrections_uv, s.axis)
        _fix_gauge(s, kept)
        replaced = True
    return replaced


def _final_axis(s: _State, *, refine_tilt_axis: bool, recovered: list[int], replaced: bool) -> None:
    """Step 7 without gold: the axis once more on the kept tilts; what moved is measured again.

    The global passes measured the axis with tilts since excluded (runs placed wrongly).
    The correction is taken when it is more likely to help than to hurt: for an unbiased
    estimate c of an error e with standard error s, taking it leaves s^2 instead of e^2,
    and E[c^2] = e^2 + s^2, so beyond sqrt(2) s.
    """
    kept = s.kept()
    idx = np.flatnonzero(kept)
    fit = _model(s, idx, s.final_angles, fit_axis=True) if refine_tilt_axis else None
    turn = (fit is not None and fit.n_features >= 3
            and abs(fit.axis_correction_deg) > np.sqrt(2.0) * fit.axis_standard_error_deg)
    if turn:
        s.axis += float(np.clip(fit.axis_correction_deg, -1.0, 1.0))
        s.shifts_b[idx] += s.matcher.to_raw(fit.shift_corrections_uv, s.axis)
        _fix_gauge(s, kept)
    if recovered or turn or replaced:
        update, c, _ = s.matcher.measure(idx, s.shifts_b, s.axis, s.final_angles)
        redo = np.isin(idx, recovered) | turn | replaced
        s.ncc[idx[redo]] = c[redo]
        s.residual_b[idx[redo]] = np.hypot(update[redo, 0], update[redo, 1])
    if turn or replaced:
        _model_residuals(s, idx, _final_model(s, idx))


def _low_signal_warning(s: _State, *, min_correlation: float, central_deg: float) -> None:
    """Without gold: warn when the signal is too weak to check the alignment.

    When the kept tilts correlate with their leave-one-out reprojections at a median below
    ``min_correlation``, neither the link check, nor the recovery, nor the 3D-feature model
    can tell a tilt placed on the right layer of a thick specimen from one several pixels
    off (the peaks those checks rely on are no clearer than the noise), and the tilt axis
    is as uncertain; the kept tilts beyond ``central_deg``, which stand on the longest
    stretches of the correlation chain, are named.
    """
    kept = s.kept()
    median = float(np.nanmedian(s.ncc[kept]))
    if median >= min_correlation:
        return
    high = np.flatnonzero(kept & (np.abs(s.nominal) > central_deg))
    finding = (f"without gold, the tilts correlate with the reprojection of the others at {median:.2f} (median; "
               f"below {min_correlation:.2f}), too little signal to check the tilt axis and the shifts")
    _warn(s, high, finding + (", least of all those of the tilts at {tilts} degrees" if len(high) else ""))


def _weak_gold_series_warning(s: _State, *, min_correlation: float) -> None:
    """With gold: warn when the kept tilts correlate with their reprojections as if unaligned.

    Gold beads make every aligned tilt agree with the reconstruction of the others: on
    simulated gold series that align, the kept tilts' leave-one-out correlations have a
    median of 0.28-0.62 (2048 A fields 0.45-0.62; 0.28 for a 3072 A field at 24 A whose
    specimen slab was not found). A median below ``min_correlation``
    means the reconstruction does not hold the beads where the tilts show them, whatever
    the per-tilt checks found: the whole series is reported.
    """
    median = float(np.nanmedian(s.ncc[s.kept()]))
    if median < min_correlation:
        _warn(s, np.zeros(0, int), f"with gold, the tilts correlate with the reprojection of the others at only "
                                   f"{median:.2f} (median; below {min_correlation:.2f}): the beads are not where "
                                   "the reconstruction puts them, the alignment is likely broken")


def _far_below_centre_warning(s: _State, *, min_relative_correlation: float, min_tilts: int,
                              central_deg: float) -> None:
    """Name the kept tilts that correlate with the reconstruction of the others far below the
    tilts near 0°, when there are at least ``min_tilts`` of them.

    A run of tilts the chain placed on wrong structure correlates with its leave-one-out
    reprojection at a fraction of what the tilts within ``central_deg`` of 0° have, yet
    no neighbour check sees it: its neighbours are as weak. Below
    ``min_relative_correlation`` times their median is rare for one right tilt and was
    never seen for several (held-out simulated series).
    """
    kept = s.kept()
    central = kept & (np.abs(s.nominal) <= central_deg)
    if central.sum() < 3:
        return
    typical = float(np.nanmedian(s.ncc[central]))
    low = np.flatnonzero(kept & (np.nan_to_num(s.ncc) < min_relative_correlation * typical))
    if len(low) >= min_tilts:
        _warn(s, low, f"the tilts at {{tilts}} degrees correlate with the reprojection of the others at "
                      f"{float(np.nanmax(s.ncc[low])):.2f} or less, below {min_relative_correlation:g} of the "
                      f"{typical:.2f} (median) of the tilts within {central_deg:g}° of 0°: likely placed on "
                      "wrong structure")


def _residual_warning(s: _State, *, max_residual_px: float) -> None:
    """Name in ``s.alignment_warning`` the kept tilts whose residual exceeds ``max_residual_px``.

    A kept tilt more than about an alignment pixel from where the 3D-feature model puts
    it is not aligned to the accuracy the reconstruction needs (a wrong axis, or a run of
    tilts on another layer of the specimen, leaves such residuals), though no check
    could show which tilts are wrong or re-place them.
    """
    high = np.flatnonzero(s.kept() & (np.nan_to_num(s.residual_b) > max_residual_px))
    if len(high):
        _warn(s, high, f"the tilts at {{tilts}} degrees are up to {s.residual_b[high].max() * s.px_b:.0f} Å from where "
                       f"the 3D-feature model puts them (more than {max_residual_px * s.px_b:.0f} Å)")
