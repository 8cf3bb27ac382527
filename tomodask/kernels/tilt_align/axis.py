"""Tilt-axis angle by common lines: how well the projections of the tilts onto a candidate
axis agree (step 3 of :mod:`tomodask.kernels.tilt_align`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from tomodask.backend import get_array_module
from tomodask.kernels.tilt_align.correlate import _soft_disk
from tomodask.kernels.tilt_align.warp import apply_alignment


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


class AxisSearch(NamedTuple):
    """What :func:`refine_tilt_axis_angle` found.

    Attributes
    ----------
    angle_deg
        Refined tilt-axis angle.
    score
        Its :func:`common_line_score`.
    bracketed
        False when the best angle of the coarse grid lay on the grid's edge: the score
        still rose towards the end of the search, so the maximum was not bracketed and
        the angle is no better than a guess.
    """

    angle_deg: float
    score: float
    bracketed: bool


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
    AxisSearch
        Refined angle, its :func:`common_line_score` (the grid's best with a parabola
        through its neighbours when ``n_refinements`` is 0) and whether the grid's best
        lay inside the grid.
    """
    def score(a: float) -> float:
        return common_line_score(images_tyx, shifts_px=shifts_px, tilt_axis_angle_deg=a,
                                 lowpass_px=lowpass_px, highpass_px=highpass_px)

    grid = tilt_axis_angle_deg + np.arange(-search_range_deg, search_range_deg + 1e-9, step_deg)
    values = np.array([score(a) for a in grid])
    j = int(np.argmax(values))
    best = float(grid[j])
    bracketed = 0 < j < len(grid) - 1
    if n_refinements == 0:
        if bracketed:
            den = values[j - 1] - 2 * values[j] + values[j + 1]
            if den < 0:
                best += step_deg * 0.5 * float(values[j - 1] - values[j + 1]) / float(den)
        return AxisSearch(best, float(values[j]), bracketed)
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
    return AxisSearch(best, score(best), bracketed)
