"""Score particle picks against known particle positions (precision, recall, F1).

Used by the picking tests and the picking benchmark, and by anyone who wants to compare a
picker with hand-picked or simulated positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from tomodask.backend import to_numpy


@dataclass(frozen=True)
class PickingScores:
    """Agreement between picked and true positions.

    Attributes
    ----------
    precision, recall, f1
        ``tp / n_picked``, ``tp / n_true`` and their harmonic mean (0 when undefined).
    n_true_positive, n_false_positive, n_false_negative
        Matched picks, unmatched picks, unmatched true positions.
    matched_pairs
        ``(tp, 2)`` int indices ``(pick, truth)`` of the matched pairs.
    match_distances
        ``(tp,)`` distances of the matched pairs, in the units of the inputs.
    """

    precision: float
    recall: float
    f1: float
    n_true_positive: int
    n_false_positive: int
    n_false_negative: int
    matched_pairs: np.ndarray
    match_distances: np.ndarray


def match_picks(
    picked: np.ndarray,
    truth: np.ndarray,
    *,
    max_distance: float,
) -> PickingScores:
    """One-to-one matching of picks to true positions within a distance (Hungarian).

    Parameters
    ----------
    picked
        ``(n, d)`` picked positions (any units, e.g. ``(z, y, x)`` px or ``(x, y, z)`` Å).
    truth
        ``(m, d)`` true positions in the same units and axis order.
    max_distance
        A pick and a true position can match only when closer than this (same units);
        one particle radius is the usual choice.

    Returns
    -------
    PickingScores

    Notes
    -----
    The assignment minimises the total distance over pairs closer than ``max_distance``
    (``scipy.optimize.linear_sum_assignment`` with a prohibitive cost for pairs farther
    apart), so a pick between two particles cannot be counted twice and the count of
    matches is the largest possible.
    """
    p = np.atleast_2d(to_numpy(picked)).astype(np.float64)
    t = np.atleast_2d(to_numpy(truth)).astype(np.float64)
    p = p.reshape(-1, t.shape[1] if t.size else p.shape[1] if p.size else 3)
    t = t.reshape(-1, p.shape[1])
    if max_distance <= 0:
        raise ValueError(f"max_distance must be positive, got {max_distance}")
    pairs = np.zeros((0, 2), dtype=int)
    dists = np.zeros(0)
    if len(p) and len(t):
        d = np.sqrt(((p[:, None, :] - t[None, :, :]) ** 2).sum(axis=-1))
        big = 1e6 * (max_distance + d.max() + 1.0)
        cost = np.where(d < max_distance, d, big)
        rows, cols = linear_sum_assignment(cost)
        keep = d[rows, cols] < max_distance
        pairs = np.stack([rows[keep], cols[keep]], axis=1)
        dists = d[rows[keep], cols[keep]]
    tp = len(pairs)
    precision = tp / len(p) if len(p) else 0.0
    recall = tp / len(t) if len(t) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return PickingScores(precision=float(precision), recall=float(recall), f1=float(f1), n_true_positive=tp,
                         n_false_positive=len(p) - tp, n_false_negative=len(t) - tp, matched_pairs=pairs,
                         match_distances=dists)
