"""Step 5 of :mod:`tomodask.kernels.tilt_align`, with gold: kept tilts that correlate poorly with
the reconstruction of the others, searched again.

A wrong link of the correlation chain (its true place beyond the link's search, or a clearer
peak on other structure) can leave one tilt, or a few, tens of pixels off while its
neighbours are right; when the beads cannot place it either (its place beyond their search,
or their peak not clear), nothing else moves it. Gold makes every aligned tilt agree with
the reconstruction of the others, so such a tilt correlates with its leave-one-out
reprojection far below its neighbours (held-out simulated series: 0.01-0.12 where they have
0.3-0.5). It is searched in the reprojection of the other tilts and moved where it
correlates much better, provided its neighbours' leave-one-out correlations rise too: a
tilt moved to its true place adds to the reconstruction what its neighbours show. That
second test rejects the moves that only fit the one tilt better (seen where a thick
specimen's reprojection is poorly determined: 0.047 -> 0.116 with the neighbours' falling).
"""

from __future__ import annotations

import numpy as np

from tomodask.kernels.tilt_align.checks import _nearest_in_angle, _neighbour_median
from tomodask.kernels.tilt_align.placement import _searched_in_reprojection
from tomodask.kernels.tilt_align.state import _State, _warn

_CORRELATION_FLOOR = 0.02  # correlations below this count as this in the gain test (no gain on noise)


def _weak_tilts_searched_again(s: _State, *, max_relative_correlation: float, min_gain: float,
                               min_neighbour_gain: float, n_rounds: int) -> bool:
    """Move weak kept tilts to where the reprojection of the others puts them; rounds until none moves.

    Parameters
    ----------
    s
        The alignment's state after the beads' rounds of the global passes (aligned tilts ``s.ok``).
    max_relative_correlation
        A tilt whose leave-one-out correlation is below this fraction of the median of the
        4 aligned tilts nearest in angle is searched again, unless it lies beside a gap (an
        aligned neighbour more than 1.5 median steps away: there its leave-one-out
        reprojection extrapolates; the session tests' tiny series, +44° beside the dark
        +52°, found a wrong place 12 px off with its correlation 0.26 -> 0.40 and its
        neighbours' rising by 0.006).
    min_gain, min_neighbour_gain
        The tilt is moved to the peak (refined by two leave-one-out corrections) when its
        correlation there is at least ``min_gain`` times its present one and the mean
        correlation of its 4 nearest aligned tilts rises by at least ``min_neighbour_gain``.
    n_rounds
        Most rounds (each searches the tilts that are then weak). When the last round
        still moves tilts, the alignment is likely broken elsewhere (every weak tilt
        finds a better place in a wrong reconstruction): those tilts are named in
        ``s.alignment_warning``.

    Returns
    -------
    bool
        Whether any tilt moved.
    """
    any_moved, moved = False, np.zeros(0, int)
    for _ in range(int(n_rounds)):
        moved = _one_round(s, max_relative_correlation=max_relative_correlation, min_gain=min_gain,
                           min_neighbour_gain=min_neighbour_gain)
        if not len(moved):
            return any_moved
        any_moved = True
    if len(moved):
        _warn(s, moved, f"the tilts at {{tilts}} degrees still correlated much better elsewhere with the reprojection of "
                        f"the others after {int(n_rounds)} rounds of moving such tilts there: the alignment is likely "
                        "broken elsewhere")
    return any_moved


def _one_round(s: _State, *, max_relative_correlation: float, min_gain: float,
               min_neighbour_gain: float) -> np.ndarray:
    """One round of :func:`_weak_tilts_searched_again`; returns the tilts moved."""
    idx = np.flatnonzero(s.ok)
    _, c, _ = s.matcher.measure(idx, s.shifts_b, s.axis, s.angles)
    per_tilt = np.full(len(s.use), np.nan)
    per_tilt[idx] = c
    weak_k = np.flatnonzero((c < max_relative_correlation * _neighbour_median(per_tilt, s.angles, idx))
                            & ~_beside_gap(s.angles[idx]))
    if not len(weak_k):
        return np.zeros(0, int)
    weak = idx[weak_k]
    trial = s.shifts_b.copy()
    trial[weak] = _searched_in_reprojection(s, weak, idx[~np.isin(idx, weak)])[0]
    for _ in range(2):
        update, _, _ = s.matcher.measure(idx, trial, s.axis, s.angles)
        trial[weak] += s.matcher.to_raw(update[weak_k], s.axis)
    _, c_trial, _ = s.matcher.measure(idx, trial, s.axis, s.angles)
    gained = c_trial[weak_k] >= min_gain * np.maximum(c[weak_k], _CORRELATION_FLOOR)
    moved = [i for i in weak[gained]
             if _neighbour_gain(s, idx, c, i, trial[i]) >= min_neighbour_gain]
    s.shifts_b[moved] = trial[moved]
    return np.array(moved, int)


def _beside_gap(angles: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: a neighbour of each of ``angles`` (sorted) lies more than 1.5 median steps away."""
    steps = np.diff(angles)
    wide = steps > 1.5 * float(np.median(steps))
    return np.concatenate([[False], wide]) | np.concatenate([wide, [False]])


def _neighbour_gain(s: _State, idx: np.ndarray, c: np.ndarray, i: int, shift_b: np.ndarray) -> float:
    """Mean rise of the leave-one-out correlations ``c`` of the 4 tilts of ``idx`` nearest tilt
    ``i`` in angle when only ``i`` moves to ``shift_b``."""
    one = s.shifts_b.copy()
    one[i] = shift_b
    _, c_one, _ = s.matcher.measure(idx, one, s.axis, s.angles)
    near = np.searchsorted(idx, _nearest_in_angle(s.angles, idx, i))
    return float((c_one[near] - c[near]).mean())
