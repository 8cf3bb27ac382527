"""Consistency of per-tilt defocus estimates across one tilt-series (numpy).

SerialEM and Tomo5 focus every tilt to the same target, so the defocus of a tilt-series varies
by a few hundred Å about one value. Late tilts of a dose-symmetric series carry 60-120 e-/Å²
of prior dose and show one or two Thon rings at most; their fits can land thousands of Å off.
Before those values steer CTF phase flipping, estimates far from the series' low-tilt defocus
are replaced by it, and reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SeriesDefocus", "consistent_series_defocus"]


@dataclass(frozen=True)
class SeriesDefocus:
    """Per-tilt defocus after the consistency check.

    Attributes
    ----------
    defocus_angstrom
        ``(t,)`` defocus to use: the estimate, or the reference where it was replaced.
    replaced
        ``(t,)`` True where the estimate was further than the tolerance from the reference.
    reference_defocus_angstrom
        Median defocus of the low tilts (all tilts when fewer than three are low).
    """

    defocus_angstrom: np.ndarray
    replaced: np.ndarray
    reference_defocus_angstrom: float


def consistent_series_defocus(
    defocus_angstrom: np.ndarray,
    tilt_angles_deg: np.ndarray,
    *,
    reference_max_tilt_deg: float = 30.0,
    max_deviation_angstrom: float = 2500.0,
) -> SeriesDefocus:
    """Replace per-tilt defocus estimates that disagree with the series' low tilts.

    Parameters
    ----------
    defocus_angstrom
        ``(t,)`` mean defocus estimated per tilt (underfocus positive); NaN for a failed fit.
    tilt_angles_deg
        ``(t,)`` tilt angles.
    reference_max_tilt_deg
        Tilts with ``|angle|`` up to this give the reference (their rings reach furthest and
        their dose is lowest in a dose-symmetric scheme).
    max_deviation_angstrom
        Estimates further than this from the reference (or not finite) are replaced by it.
        The default allows the usual per-tilt focusing scatter (+-1000 Å) with a margin.

    Returns
    -------
    SeriesDefocus
        The defocus to use, which tilts were replaced, and the reference.

    Raises
    ------
    ValueError
        When the shapes differ, or no estimate is finite.
    """
    d = np.asarray(defocus_angstrom, dtype=np.float64).ravel()
    a = np.asarray(tilt_angles_deg, dtype=np.float64).ravel()
    if d.shape != a.shape:
        raise ValueError(f"defocus_angstrom {d.shape} and tilt_angles_deg {a.shape} must have the same shape")
    finite = np.isfinite(d)
    if not finite.any():
        raise ValueError("no finite defocus estimate in the tilt-series; check the CTF fits of its movies")
    low = finite & (np.abs(a) <= reference_max_tilt_deg)
    reference = float(np.median(d[low] if low.sum() >= 3 else d[finite]))
    replaced = ~finite | (np.abs(d - reference) > max_deviation_angstrom)
    return SeriesDefocus(defocus_angstrom=np.where(replaced, reference, d), replaced=replaced,
                         reference_defocus_angstrom=reference)
