"""CTF of a whole tilt-series: the weak tilts refitted with the astigmatism of the best ones.

SerialEM and Tomo5 focus every tilt to the same target, so the defocus of a tilt-series varies
by a few hundred to a thousand Å about one value, and the objective lens' astigmatism does not
change during the minutes a series takes. Late tilts of a dose-symmetric series carry
60-120 e-/Å² of prior dose and show one or two Thon rings at most: fitted alone, their
astigmatism runs to the search limit and their defocus can land thousands of Å off, or in a
wrong basin tens of thousands off.

:func:`refine_series_ctf` measures the series' astigmatism and defocus on its best tilts (the
most Thon-ring periods matched) and refits every other tilt with that astigmatism fixed and
its mean defocus searched only near the series' defocus, as Warp and AreTomo fit
astigmatism once per tilt-series, before those values steer CTF phase flipping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tomodask.kernels.ctf import StripSpectra, estimate_ctf_from_spectra
from tomodask.kernels.ctf_model import (
    astigmatism_components,
    astigmatism_from_components,
    electron_wavelength_angstrom,
)

__all__ = ["SeriesCTF", "refine_series_ctf"]

#: Tilts whose fits match at least this fraction of the best tilt's Thon-ring periods give
#: the series' astigmatism and defocus (on a simulated 41-tilt dose-symmetric series, the
#: tilts within about ±12°, 0-24 e-/Å² received).
REFERENCE_RING_FRACTION = 0.5
#: Fewest reference tilts (the tilts matching the most ring periods when fewer pass).
MIN_REFERENCE_TILTS = 3
#: :func:`~tomodask.kernels.ctf.estimate_ctf_from_spectra` options the refinement sets for each tilt.
_SET_PER_TILT = ("defocus_search_range_angstrom", "astigmatism_fixed")


@dataclass(frozen=True)
class SeriesCTF:
    """Per-tilt CTF after the series-level refinement.

    Attributes
    ----------
    defocus_u_angstrom, defocus_v_angstrom, astigmatism_angle_deg
        ``(t,)`` defocus U, V (U >= V, underfocus positive) and angle of U
        counter-clockwise from image X: the refit for refitted tilts, else the first fit.
    fit_resolution_angstrom
        ``(t,)`` fit resolution of the values returned.
    reference
        ``(t,)`` True for the tilts that gave the series' astigmatism and defocus.
    refitted
        ``(t,)`` True for the tilts refitted with the series' astigmatism.
    astigmatism_angstrom, astigmatism_angle_deg_series
        The series' astigmatism ``U - V`` and its angle (mean over the reference tilts).
    reference_defocus_angstrom
        Median mean defocus of the reference tilts.
    """

    defocus_u_angstrom: np.ndarray
    defocus_v_angstrom: np.ndarray
    astigmatism_angle_deg: np.ndarray
    fit_resolution_angstrom: np.ndarray
    reference: np.ndarray
    refitted: np.ndarray
    astigmatism_angstrom: float
    astigmatism_angle_deg_series: float
    reference_defocus_angstrom: float

    @property
    def defocus_angstrom(self) -> np.ndarray:
        """``(t,)`` mean defocus ``(U + V) / 2`` in Å."""
        return 0.5 * (self.defocus_u_angstrom + self.defocus_v_angstrom)


def refine_series_ctf(
    spectra: Sequence[StripSpectra],
    tilt_angles_deg: np.ndarray,
    defocus_u_angstrom: np.ndarray,
    defocus_v_angstrom: np.ndarray,
    astigmatism_angle_deg: np.ndarray,
    fit_resolution_angstrom: np.ndarray,
    *,
    fit_options: Mapping[str, Any],
    defocus_window_angstrom: float = 5000.0,
) -> SeriesCTF:
    """Refit the weak tilts of a tilt-series with the astigmatism of its best tilts.

    Parameters
    ----------
    spectra
        Indexable: ``spectra[i]`` holds the strip spectra of tilt ``i`` that its first fit
        used (:func:`~tomodask.kernels.ctf.strip_spectra`); only refitted tilts are read, so
        a lazy sequence saves reading the others, and no image is Fourier transformed again.
    tilt_angles_deg
        ``(t,)`` tilt angles.
    defocus_u_angstrom, defocus_v_angstrom, astigmatism_angle_deg, fit_resolution_angstrom
        ``(t,)`` first fits of every tilt (:func:`~tomodask.kernels.ctf.estimate_ctf`);
        NaN for a failed fit (never a reference, always refitted).
    fit_options
        Keyword arguments of the first fits'
        :func:`~tomodask.kernels.ctf.estimate_ctf_from_spectra` calls: optics and
        phase-shift options (``voltage_kv`` is required). ``defocus_search_range_angstrom``
        and ``astigmatism_fixed`` are set per tilt here (given ones are ignored).
    defocus_window_angstrom
        Refitted tilts' mean defocus is searched within this distance of the reference
        defocus. The default covers focusing scatter of up to about ±1500 Å (1 sd) with a
        margin and excludes the wrong basins of ring-less tilts (5-20k Å off).

    Returns
    -------
    SeriesCTF
        Per-tilt values, which tilts were references and which were refitted, and the
        series' astigmatism and defocus.

    Raises
    ------
    ValueError
        When the per-tilt arrays differ in length from ``tilt_angles_deg`` or no first fit
        is finite.

    Notes
    -----
    The quality of a fit is the number of Thon-ring periods its model matches,
    ``λ Δf (k_fit² − k_lo²)`` with ``k_fit`` the inverse fit resolution and ``k_lo`` the low
    end of the fit range. The series' astigmatism is the mean of the reference tilts'
    astigmatism vectors ``(U − V)/2 · (cos 2a, sin 2a)`` (so that noisy amounts do not add up
    and angles average correctly across ±90°).
    """
    angles = np.asarray(tilt_angles_deg, dtype=np.float64).ravel()
    u, v, a, res = (np.asarray(x, dtype=np.float64).ravel() for x in
                    (defocus_u_angstrom, defocus_v_angstrom, astigmatism_angle_deg, fit_resolution_angstrom))
    if not all(x.shape == angles.shape for x in (u, v, a, res)):
        raise ValueError(f"per-tilt arrays must all have {len(angles)} values like tilt_angles_deg, got "
                         f"{[len(x) for x in (u, v, a, res)]}")
    mean = 0.5 * (u + v)
    finite = np.isfinite(mean) & np.isfinite(u - v) & np.isfinite(a) & np.isfinite(res)
    if not finite.any():
        raise ValueError("no finite CTF fit in the tilt-series; check the CTF fits of its movies")
    lam = electron_wavelength_angstrom(float(fit_options["voltage_kv"]))
    k_lo = 1.0 / float(spectra[int(np.argmax(finite))].resolution_range_angstrom[0])
    rings = np.where(finite, lam * mean * (1.0 / np.where(finite, res, 1.0) ** 2 - k_lo**2), -np.inf)
    reference = finite & (rings >= REFERENCE_RING_FRACTION * rings[finite].max())
    if reference.sum() < min(MIN_REFERENCE_TILTS, finite.sum()):
        reference = np.zeros_like(finite)
        reference[np.argsort(rings)[::-1][: min(MIN_REFERENCE_TILTS, int(finite.sum()))]] = True
    hc, hs = astigmatism_components((u - v)[reference], a[reference])
    astig, astig_angle = astigmatism_from_components(float(np.mean(hc)), float(np.mean(hs)))
    reference_defocus = float(np.median(mean[reference]))
    out_u, out_v, out_a, out_res = u.copy(), v.copy(), a.copy(), res.copy()
    low = max(reference_defocus - float(defocus_window_angstrom), 0.0)
    options = {k: val for k, val in fit_options.items() if k not in _SET_PER_TILT}
    refit = ~reference
    for i in np.nonzero(refit)[0]:
        r = estimate_ctf_from_spectra(
            spectra[i], **options, astigmatism_fixed=(astig, astig_angle),
            defocus_search_range_angstrom=(low, reference_defocus + float(defocus_window_angstrom)))
        out_u[i], out_v[i], out_a[i], out_res[i] = (r.defocus_u_angstrom, r.defocus_v_angstrom,
                                                    r.astigmatism_angle_deg, r.fit_resolution_angstrom)
    return SeriesCTF(defocus_u_angstrom=out_u, defocus_v_angstrom=out_v, astigmatism_angle_deg=out_a,
                     fit_resolution_angstrom=out_res, reference=reference, refitted=refit,
                     astigmatism_angstrom=astig, astigmatism_angle_deg_series=astig_angle,
                     reference_defocus_angstrom=reference_defocus)
