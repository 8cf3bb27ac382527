"""CTF estimation of one tilt image: tile power spectra, 1D search, 2D refinement.

:func:`estimate_ctf` fits defocus U and V, the astigmatism angle and optionally a
phase shift to the Thon rings of one (tilted) image, numpy or cupy from the input.
Conventions (underfocus positive, U >= V, angle of U counter-clockwise from image X,
defocus at the image centre for the specimen mid-plane) are those of
:mod:`tomodask.kernels.geometry`.

The steps:

1. **Spectra.** The image is cut into overlapping tiles (half a tile apart), each is
   tapered at its edges and Fourier transformed; only the part of the power spectrum
   inside the fit range is kept (exact binning: no aliasing, little work later). For a
   tilted specimen, tiles are grouped into *strips* parallel to the tilt axis, each with
   a known defocus offset from the centre (:func:`~tomodask.kernels.geometry.local_defocus_angstrom`),
   and each strip keeps its own average spectrum, as in CTFFIND5's tilt mode and Warp.
2. **Cells.** Every strip spectrum is averaged into polar cells (one spectrum pixel wide
   in radius, 2.5° in angle). All fitting works on these few thousand cells per strip,
   so a batch of candidate CTFs is scored in one vectorised evaluation of
   :func:`~tomodask.kernels.ctf_model.ctf_from_polar`.
3. **1D search.** The rotational averages of the strips (divided by a smooth log-power
   background) and the CTF² models are both stripped of what a smooth cubic spline in
   frequency explains (a projection, so data and models are treated alike and the rings
   are not absorbed by the background), and correlated at every candidate defocus (and
   phase shift) of the search range, the strips jointly with their offsets; each model
   is tried with a family of ring envelopes so that noise beyond the visible rings does
   not swamp the score. A finer search around each of the three best local maxima
   follows; each gets an isotropic 2D refinement (step 6 without astigmatism) and the one
   whose model matches the most Thon-ring periods up to its fit resolution (step 7) is
   kept, the 1D order breaking ties: on dose-damaged tilts with rings only to ~20 Å the
   rotational average can prefer a wrong, far lower defocus that matches no ring.
4. **Background and envelope.** With that defocus, the cell spectra are fitted as
   ``B(k) + E(k) CTF²`` with stiff cubic splines ``B`` (in k) and ``E`` (in k²), by
   linear least squares; too flexible a ``B`` would absorb broad first rings. The
   normalised data ``(S - B) / B`` are then compared with the model ``(E / B) CTF²``:
   the ring contrast ``E / B`` weights each frequency by how well its rings are seen.
5. **Astigmatism.** For 18 angular sectors the correlation of each sector's radial
   profile with isotropic models is tabulated over defocus; every (mean defocus,
   astigmatism) candidate on a dense grid is then scored exactly (up to sector width)
   by looking its sector defoci up in the table: an exhaustive search at the cost of a
   table look-up.
6. **2D refinement.** A pattern search over (mean defocus, astigmatism as the two
   components ``half * (cos 2a, sin 2a)``, phase shift) maximises the normalised
   cross-correlation of all cells of all strips with the 2D model; background and
   envelope are refitted with the 2D model and the search polished.
7. **Fit resolution.** The cells are averaged in rings of equal CTF phase (the
   equiphase average, EPA, which also undoes the defocus offsets of the strips), and
   the correlation of EPA and model in a sliding window of two Thon-ring periods gives
   the fit resolution: the first frequency where it drops below a threshold.

References
----------
.. [1] Rohou, A. & Grigorieff, N. (2015). CTFFIND4: Fast and accurate defocus estimation
   from electron micrographs. J. Struct. Biol. 192, 216-221.
.. [2] Elferich, J., Kong, L., Zottig, X. & Grigorieff, N. (2024). CTFFIND5 provides
   improved insight into quality, tilt, and thickness of TEM samples. eLife 13, RP97227.
.. [3] Tegunov, D. & Cramer, P. (2019). Real-time cryo-electron microscopy data
   preprocessing with Warp. Nat. Methods 16, 1146-1152.
.. [4] Welch, P. (1967). The use of fast Fourier transform for the estimation of power
   spectra. IEEE Trans. Audio Electroacoust. 15, 70-73.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from tomodask.backend import get_array_module, scipy_ndimage, to_numpy
from tomodask.kernels.ctf_model import (
    astigmatism_components,
    astigmatism_from_components,
    ctf_from_polar,
    electron_wavelength_angstrom,
)
from tomodask.kernels.geometry import local_defocus_angstrom

#: Distance between neighbouring tiles as a fraction of the tile size.
TILE_STEP_FRACTION = 0.5
#: Width of the cosine taper at each tile edge as a fraction of the tile size.
TAPER_FRACTION = 0.125
#: Angular sectors of the polar cells over 180° (2.5° each).
N_SECTORS = 72
#: Coarse sectors of the astigmatism table (10° each); divides :data:`N_SECTORS`.
N_COARSE_SECTORS = 18
#: Largest number of strips a tilted image is split into.
MAX_STRIPS = 8
#: Narrowest defocus range of one strip, in Å.
MIN_STRIP_WIDTH_ANGSTROM = 400.0
#: Interior knots of the cubic spline of the background B over the fit range (uniform in k).
#: Few, so that B cannot follow the broad first Thon rings of a low defocus: with four,
#: weak rings (B-factor 500 Å², 18k Å defocus) came out 80-110 Å too low on average.
N_BACKGROUND_KNOTS = 2
#: Interior knots of the cubic spline of the ring envelope E, uniform in k² (where a
#: B-factor envelope ``exp(-B k² / 2)`` is smooth).
N_ENVELOPE_KNOTS = 2
#: Interior knots of the spline whose fit is removed from data and models as "smooth".
N_SMOOTH_KNOTS = 4
#: Envelope B-factors (Å²) of the ring models tried in the 1D search.
ENVELOPE_BFACTORS_ANGSTROM2 = (0.0, 150.0, 400.0, 1000.0, 2500.0, 6000.0)
#: Local maxima of the 1D search carried into an isotropic 2D fit, where the number of
#: Thon-ring periods each matches decides between them: on dose-damaged tilts with rings
#: only to ~20 Å the rotational average preferred a wrong 8.6k Å peak (no ring matched)
#: for a 30k Å truth (1.4 periods matched).
N_1D_CANDIDATES = 3
#: Ring periods matched by two 1D candidates that count as equal (the 1D order decides).
RING_COUNT_TIE = 0.5
#: Largest number of candidate-cell model values evaluated at once (memory bound).
MAX_BATCH_ELEMENTS = 4_000_000


@dataclass(frozen=True, eq=False)
class CTFResult:
    """The fitted CTF of one image and diagnostics for a dashboard.

    Attributes
    ----------
    defocus_u_angstrom, defocus_v_angstrom
        Defocus along U and V at the image centre, specimen mid-plane (underfocus
        positive, ``U >= V``).
    astigmatism_angle_deg
        Angle of U counter-clockwise from the image X axis, in ``(-90, 90]``.
    phase_shift_deg
        Phase shift (fitted when asked, else the fixed value given), in ``[0, 180)``.
    score
        Normalised cross-correlation of the background-subtracted spectrum and the model
        over the fit range (0 = no rings found, 1 = perfect).
    fit_resolution_angstrom
        Resolution where the EPA-to-model correlation falls below the threshold (the high
        limit of the fit range when it never does).
    n_tiles, n_strips
        Tiles averaged, and strips of different defocus they were grouped into.
    spectrum_yx
        ``(n, n)`` float32 numpy array, centred power spectrum normalised as
        ``(S - B) / B``: left half data, right half the fitted model ``(E / B) CTF²``
        (averaged over strips); zero outside the fit range. Row index increases with
        frequency along y, column index with frequency along x.
    spectrum_max_frequency_per_angstrom
        Spatial frequency (1/Å) at the edge of ``spectrum_yx`` (half its width).
    profile_frequency_per_angstrom, profile_data, profile_model
        ``(m,)`` float32 numpy arrays: equiphase average of the normalised spectrum and of
        the model, on the frequency axis of the centre defocus.
    profile_correlation
        ``(m,)`` float32 numpy array, correlation of data and model in a window of two
        Thon-ring periods around each frequency.
    """

    defocus_u_angstrom: float
    defocus_v_angstrom: float
    astigmatism_angle_deg: float
    phase_shift_deg: float
    score: float
    fit_resolution_angstrom: float
    n_tiles: int
    n_strips: int
    spectrum_yx: np.ndarray
    spectrum_max_frequency_per_angstrom: float
    profile_frequency_per_angstrom: np.ndarray
    profile_data: np.ndarray
    profile_model: np.ndarray
    profile_correlation: np.ndarray

    @property
    def defocus_angstrom(self) -> float:
        """Mean defocus ``(U + V) / 2`` in Å."""
        return 0.5 * (self.defocus_u_angstrom + self.defocus_v_angstrom)

    @property
    def astigmatism_angstrom(self) -> float:
        """Astigmatism ``U - V`` in Å (never negative)."""
        return self.defocus_u_angstrom - self.defocus_v_angstrom


@dataclass(frozen=True)
class _Optics:
    """Constants of the CTF model."""

    voltage_kv: float
    spherical_aberration_mm: float
    amplitude_contrast: float

    def ctf2(self, k2: Any, angle: Any, mean: Any, hc: Any, hs: Any, phase_deg: Any) -> Any:
        """CTF² for defocus given as mean and astigmatism components (broadcasting)."""
        xp = get_array_module(k2)
        half = xp.sqrt(hc * hc + hs * hs)
        ang = 0.5 * xp.rad2deg(xp.arctan2(hs, hc))
        ctf = ctf_from_polar(
            k2,
            angle,
            defocus_u_angstrom=mean + half,
            defocus_v_angstrom=mean - half,
            astigmatism_angle_deg=ang,
            voltage_kv=self.voltage_kv,
            spherical_aberration_mm=self.spherical_aberration_mm,
            amplitude_contrast=self.amplitude_contrast,
            phase_shift_deg=phase_deg,
        )
        return ctf * ctf


@dataclass(frozen=True)
class _Cells:
    """Strip spectra averaged into polar cells inside the fit range (xp arrays)."""

    k2: Any  # (N,) mean squared frequency of the cell, 1/Å²
    angle: Any  # (N,) mean direction, radians from X in [-pi/2, pi/2]
    rbin: Any  # (N,) radial bin index
    coarse: Any  # (N,) coarse sector index
    weight: Any  # (S, N) pixels x tiles
    spectrum: Any  # (S, N) mean power per tile, divided by the smooth background B0
    n_rbins: int
    k_rbin: np.ndarray  # (n_rbins,) mean frequency of each radial bin, 1/Å
    coarse_angle: Any  # (N_COARSE_SECTORS,) mean direction of each coarse sector
    b0: np.ndarray  # (n_rbins,) smooth background the spectra were divided by


def estimate_ctf(
    image_yx: Any,
    *,
    pixel_size_angstrom: float,
    voltage_kv: float,
    spherical_aberration_mm: float,
    amplitude_contrast: float,
    tilt_angle_deg: float = 0.0,
    tilt_axis_angle_deg: float = 0.0,
    defocus_search_range_angstrom: tuple[float, float] = (5000.0, 60000.0),
    tile_size_px: int = 512,
    resolution_range_angstrom: tuple[float, float] = (30.0, 5.0),
    fit_phase_shift: bool = False,
    phase_shift_deg: float = 0.0,
    max_astigmatism_angstrom: float = 3000.0,
    fit_resolution_threshold: float = 0.3,
    diagnostic_size_px: int = 256,
    astigmatism_fixed: tuple[float, float] | None = None,
) -> CTFResult:
    """Estimate defocus, astigmatism (and phase shift) of one image.

    Parameters
    ----------
    image_yx
        ``(y, x)`` image (numpy or cupy), e.g. a gain-corrected sum of movie frames.
        Aligned sums are best; drift blurs the Thon rings.
    pixel_size_angstrom
        Pixel size of the image.
    voltage_kv, spherical_aberration_mm, amplitude_contrast
        Microscope constants.
    tilt_angle_deg, tilt_axis_angle_deg
        Specimen tilt and tilt-axis angle (counter-clockwise from image Y), for the
        defocus gradient across a tilted image (see :mod:`tomodask.kernels.geometry`).
    defocus_search_range_angstrom
        ``(low, high)`` range of mean defocus searched exhaustively.
    tile_size_px
        Side of the square tiles whose power spectra are averaged (even, at least 64).
    resolution_range_angstrom
        ``(low, high)`` resolution range fitted, e.g. ``(30, 5)``. The high limit is
        raised to 0.95 of Nyquist when the pixel size does not reach it.
    fit_phase_shift
        Fit a phase shift (phase plate) in ``[0, 180)`` degrees.
    phase_shift_deg
        Fixed phase shift when ``fit_phase_shift`` is False.
    max_astigmatism_angstrom
        Largest astigmatism ``U - V`` searched.
    fit_resolution_threshold
        Correlation of EPA and model below which rings count as no longer fitted.
    diagnostic_size_px
        Side of the ``spectrum_yx`` diagnostic image.
    astigmatism_fixed
        ``(U - V in Å, angle of U in degrees)``: fit only the mean defocus (and phase shift)
        with this astigmatism (step 5 skipped), e.g. a tilt-series' astigmatism measured on
        its best tilts (:func:`tomodask.kernels.ctf_series.refine_series_ctf`). None fits it.

    Returns
    -------
    CTFResult
        Fitted parameters (host floats), score, fit resolution and small numpy
        diagnostics.

    Raises
    ------
    ValueError
        For an image that is not 2D, holds NaN or infinity, or is smaller than one tile,
        and for out-of-range options; the message names the fix.

    Notes
    -----
    See the module docstring for the algorithm. The score maximised is the normalised
    cross-correlation, weighted by the number of pixels and tiles behind each cell, of
    ``(S - B) / B - w / 2`` and ``w (CTF² - 1/2)`` with ``w = E / B``, the strips jointly,
    each at its own defocus offset. Work is proportional to the number of tiles (FFTs)
    plus a few hundred thousand model evaluations per candidate batch; the spectra are
    cropped to the fit range, so a 4k image costs one to two seconds on one CPU core.

    References
    ----------
    See the module docstring.
    """
    spectra = strip_spectra(image_yx, pixel_size_angstrom=pixel_size_angstrom, tilt_angle_deg=tilt_angle_deg,
                            tilt_axis_angle_deg=tilt_axis_angle_deg, tile_size_px=tile_size_px,
                            resolution_range_angstrom=resolution_range_angstrom)
    return estimate_ctf_from_spectra(
        spectra, voltage_kv=voltage_kv, spherical_aberration_mm=spherical_aberration_mm,
        amplitude_contrast=amplitude_contrast, defocus_search_range_angstrom=defocus_search_range_angstrom,
        fit_phase_shift=fit_phase_shift, phase_shift_deg=phase_shift_deg,
        max_astigmatism_angstrom=max_astigmatism_angstrom, fit_resolution_threshold=fit_resolution_threshold,
        diagnostic_size_px=diagnostic_size_px, astigmatism_fixed=astigmatism_fixed,
    )


@dataclass(frozen=True, eq=False)
class StripSpectra:
    """Tile power spectra of one image summed in strips of equal defocus offset (step 1).

    What :func:`estimate_ctf_from_spectra` fits; small enough to store with a movie's
    results (a few MB) so that a later refit (:func:`tomodask.kernels.ctf_series.refine_series_ctf`)
    needs no Fourier transform of the image.

    Attributes
    ----------
    sums
        ``(S, 2R+1, R+1)`` float32 (numpy or cupy): each strip's summed tile power spectra,
        cropped to radius ``R`` spectrum pixels, rows ``fy`` unshifted (``0..R, -R..-1``).
    strip_offsets_angstrom
        ``(S,)`` float64 numpy mean defocus offset of each strip from the image centre.
    strip_tiles
        ``(S,)`` int64 numpy number of tiles in each strip.
    tile_size_px
        Side of the square tiles.
    pixel_size_angstrom
        Pixel size of the image.
    resolution_range_angstrom
        ``(low, high)`` fit range, the high limit capped at 0.95 Nyquist.
    """

    sums: Any
    strip_offsets_angstrom: np.ndarray
    strip_tiles: np.ndarray
    tile_size_px: int
    pixel_size_angstrom: float
    resolution_range_angstrom: tuple[float, float]


def strip_spectra(
    image_yx: Any,
    *,
    pixel_size_angstrom: float,
    tilt_angle_deg: float = 0.0,
    tilt_axis_angle_deg: float = 0.0,
    tile_size_px: int = 512,
    resolution_range_angstrom: tuple[float, float] = (30.0, 5.0),
) -> StripSpectra:
    """Step 1 of :func:`estimate_ctf`: tile power spectra grouped in strips of equal defocus.

    Parameters
    ----------
    image_yx, pixel_size_angstrom, tilt_angle_deg, tilt_axis_angle_deg, tile_size_px, resolution_range_angstrom
        As for :func:`estimate_ctf`.

    Returns
    -------
    StripSpectra
        The spectra cropped to the fit range, on the input's device.

    Raises
    ------
    ValueError
        For an image that is not 2D, holds NaN or infinity, or is smaller than one tile,
        and for out-of-range options; the message names the fix.
    """
    xp = get_array_module(image_yx)
    _validate_image(image_yx, pixel_size_angstrom=pixel_size_angstrom, tile_size_px=tile_size_px,
                    resolution_range_angstrom=resolution_range_angstrom)
    px = float(pixel_size_angstrom)
    tile = int(tile_size_px)
    k_hi = min(1.0 / float(resolution_range_angstrom[1]), 0.95 * 0.5 / px)
    radius = min(int(np.ceil(k_hi * tile * px)) + 1, tile // 2)
    image = xp.asarray(image_yx, dtype=xp.float32)
    starts_y, starts_x, offsets = _tile_layout(
        image.shape, tile, px, float(tilt_angle_deg), float(tilt_axis_angle_deg)
    )
    labels, strip_offsets, strip_tiles = _strips(offsets)
    sums = _strip_spectra(image, starts_y, starts_x, labels, len(strip_offsets), tile, radius)
    return StripSpectra(sums=sums, strip_offsets_angstrom=np.asarray(strip_offsets, dtype=np.float64),
                        strip_tiles=np.asarray(strip_tiles, dtype=np.int64), tile_size_px=tile,
                        pixel_size_angstrom=px,
                        resolution_range_angstrom=(float(resolution_range_angstrom[0]), 1.0 / k_hi))


def estimate_ctf_from_spectra(
    spectra: StripSpectra,
    *,
    voltage_kv: float,
    spherical_aberration_mm: float,
    amplitude_contrast: float,
    defocus_search_range_angstrom: tuple[float, float] = (5000.0, 60000.0),
    fit_phase_shift: bool = False,
    phase_shift_deg: float = 0.0,
    max_astigmatism_angstrom: float = 3000.0,
    fit_resolution_threshold: float = 0.3,
    diagnostic_size_px: int = 256,
    astigmatism_fixed: tuple[float, float] | None = None,
) -> CTFResult:
    """Steps 2-7 of :func:`estimate_ctf` on spectra from :func:`strip_spectra`.

    Parameters
    ----------
    spectra
        Strip spectra of one image (numpy or cupy arrays inside).
    voltage_kv, spherical_aberration_mm, amplitude_contrast, defocus_search_range_angstrom, fit_phase_shift, \
phase_shift_deg, max_astigmatism_angstrom, fit_resolution_threshold, diagnostic_size_px, astigmatism_fixed
        As for :func:`estimate_ctf`.

    Returns
    -------
    CTFResult
        As :func:`estimate_ctf` returns it; ``n_tiles`` counts the tiles of the strips.

    Raises
    ------
    ValueError
        For out-of-range options; the message names the fix.
    """
    _validate_fit(
        defocus_search_range_angstrom=defocus_search_range_angstrom,
        max_astigmatism_angstrom=max_astigmatism_angstrom,
        diagnostic_size_px=diagnostic_size_px,
        voltage_kv=voltage_kv,
        amplitude_contrast=amplitude_contrast,
        astigmatism_fixed=astigmatism_fixed,
    )
    xp = get_array_module(spectra.sums)
    optics = _Optics(float(voltage_kv), float(spherical_aberration_mm), float(amplitude_contrast))
    px = float(spectra.pixel_size_angstrom)
    tile = int(spectra.tile_size_px)
    k_lo = 1.0 / float(spectra.resolution_range_angstrom[0])
    k_hi = 1.0 / float(spectra.resolution_range_angstrom[1])
    r_lo, r_hi = k_lo * tile * px, k_hi * tile * px  # radii in spectrum pixels
    radius = spectra.sums.shape[2] - 1
    sums, strip_offsets, strip_tiles = spectra.sums, spectra.strip_offsets_angstrom, spectra.strip_tiles

    # 2. polar cells
    cells = _make_cells(sums, strip_tiles, tile=tile, px=px, r_lo=r_lo, r_hi=r_hi)
    delta = xp.asarray(strip_offsets, dtype=xp.float32)[:, None]  # (S, 1)

    # 3. 1D search over defocus (and phase)
    lam = electron_wavelength_angstrom(voltage_kv)
    candidates = _search_1d(
        cells,
        optics,
        strip_offsets,
        defocus_range=tuple(float(d) for d in defocus_search_range_angstrom),
        phases=np.arange(0.0, 180.0, 10.0) if fit_phase_shift else np.array([float(phase_shift_deg)]),
        k_hi=k_hi,
        lam=lam,
    )

    # 4. for each 1D candidate: background and envelope, isotropic 2D refinement; the one
    # whose model matches the most Thon-ring periods (up to its fit resolution) wins, the
    # 1D order deciding ties; the winner continues from its 1D values
    hc0, hs0 = (0.0, 0.0) if astigmatism_fixed is None else astigmatism_components(*astigmatism_fixed)
    astig_step = 0.0 if astigmatism_fixed is not None else 40.0
    best_rings = -np.inf
    for mean0, phase0 in candidates:
        start = np.array([mean0, hc0, hs0, phase0])
        background, contrast = _fit_background(cells, _cell_model(cells, optics, delta, start))
        steps = np.array([40.0, 0.0, 0.0, 10.0 if fit_phase_shift else 0.0])
        cand, _ = _pattern_search(cells, optics, delta, background, contrast, start, steps,
                                  max_astigmatism_angstrom)
        freq, _, _, corr = _equiphase_profile(cells, optics, delta, background, contrast, cand, lam=lam, tile=tile, px=px)
        k_fit = 1.0 / _fit_resolution(freq, corr, fit_resolution_threshold, k_hi)
        rings = round(lam * cand[0] * (k_fit**2 - k_lo**2) / RING_COUNT_TIE)
        if rings > best_rings:
            params, best_rings = start, rings
    background, contrast = _fit_background(cells, _cell_model(cells, optics, delta, params))

    # 5. astigmatism: exhaustive search on the sector table
    if astigmatism_fixed is None:
        params = _search_astigmatism(cells, optics, delta, background, contrast, params, max_astigmatism_angstrom)

    # 6. 2D refinement, background refit, polish
    steps = np.array([40.0, astig_step, astig_step, 10.0 if fit_phase_shift else 0.0])
    params, _ = _pattern_search(cells, optics, delta, background, contrast, params, steps, max_astigmatism_angstrom)
    model = _cell_model(cells, optics, delta, params)
    background, contrast = _fit_background(cells, model)
    steps = np.array([8.0, astig_step / 5, astig_step / 5, 2.0 if fit_phase_shift else 0.0])
    params, score = _pattern_search(cells, optics, delta, background, contrast, params, steps, max_astigmatism_angstrom)

    mean, hc, hs, phase = (float(v) for v in params)
    astigmatism, angle = astigmatism_from_components(hc, hs)
    half = 0.5 * astigmatism

    # 7. EPA, fit resolution and diagnostics
    freq, epa_data, epa_model, corr = _equiphase_profile(
        cells, optics, delta, background, contrast, params, lam=lam, tile=tile, px=px
    )
    fit_res = _fit_resolution(freq, corr, fit_resolution_threshold, k_hi)
    spectrum = _diagnostic_image(
        sums, strip_tiles, cells, optics, strip_offsets, background, contrast, params,
        tile=tile, px=px, r_lo=r_lo, r_hi=r_hi, size=int(diagnostic_size_px),
    )
    return CTFResult(
        defocus_u_angstrom=mean + half,
        defocus_v_angstrom=mean - half,
        astigmatism_angle_deg=angle,
        phase_shift_deg=float(phase % 180.0),
        score=float(score),
        fit_resolution_angstrom=fit_res,
        n_tiles=int(strip_tiles.sum()),
        n_strips=int(len(strip_offsets)),
        spectrum_yx=spectrum,
        spectrum_max_frequency_per_angstrom=radius / (tile * px),
        profile_frequency_per_angstrom=freq.astype(np.float32),
        profile_data=epa_data.astype(np.float32),
        profile_model=epa_model.astype(np.float32),
        profile_correlation=corr.astype(np.float32),
    )


# ----------------------------------------------------------------------------- validation


def _validate_image(
    image_yx: Any, *, pixel_size_angstrom: float, tile_size_px: int, resolution_range_angstrom: tuple[float, float],
) -> None:
    """Raise ValueError with the fix for an image or tiling strip_spectra cannot work with."""
    xp = get_array_module(image_yx)
    ndim = getattr(image_yx, "ndim", None)
    if ndim != 2:
        raise ValueError(
            f"estimate_ctf needs one (y, x) image, got an array with ndim={ndim} "
            f"(shape {getattr(image_yx, 'shape', None)}); sum or align the frames of a "
            "movie first, e.g. estimate_ctf((frames * gain).sum(0), ...)"
        )
    if tile_size_px < 64 or tile_size_px % 2:
        raise ValueError(f"tile_size_px must be even and at least 64, e.g. 512; got {tile_size_px}")
    ny, nx = image_yx.shape
    if ny < tile_size_px or nx < tile_size_px:
        raise ValueError(
            f"image of shape {(ny, nx)} is smaller than one tile of {tile_size_px} px; "
            f"pass tile_size_px <= {min(ny, nx) - min(ny, nx) % 2} (e.g. 256)"
        )
    if not bool(xp.isfinite(image_yx).all()):
        raise ValueError(
            "image holds NaN or infinite values; replace them first, e.g. "
            "image[~np.isfinite(image)] = np.nanmean(image)"
        )
    if not pixel_size_angstrom > 0:
        raise ValueError(f"pixel_size_angstrom must be positive, e.g. 1.5; got {pixel_size_angstrom}")
    low_res, high_res = resolution_range_angstrom
    if not low_res > high_res > 0:
        raise ValueError(
            "resolution_range_angstrom must be (low, high) in Å with low > high > 0, "
            f"e.g. (30.0, 5.0); got {resolution_range_angstrom}"
        )
    k_hi = min(1.0 / high_res, 0.95 * 0.5 / pixel_size_angstrom)
    if (k_hi - 1.0 / low_res) * tile_size_px * pixel_size_angstrom < 8:
        raise ValueError(
            f"resolution_range_angstrom {resolution_range_angstrom} spans less than 8 "
            f"spectrum pixels with {tile_size_px} px tiles of {pixel_size_angstrom} Å "
            "(high limit capped at 0.95 Nyquist); widen the range or use larger tiles"
        )


def _validate_fit(
    *,
    defocus_search_range_angstrom: tuple[float, float],
    max_astigmatism_angstrom: float,
    diagnostic_size_px: int,
    voltage_kv: float,
    amplitude_contrast: float,
    astigmatism_fixed: tuple[float, float] | None,
) -> None:
    """Raise ValueError with the fix for fit options estimate_ctf cannot work with."""
    if not voltage_kv > 0:
        raise ValueError(f"voltage_kv must be positive, e.g. 300; got {voltage_kv}")
    if not 0.0 <= amplitude_contrast < 1.0:
        raise ValueError(f"amplitude_contrast must be in [0, 1), e.g. 0.07; got {amplitude_contrast}")
    lo, hi = defocus_search_range_angstrom
    if not 0.0 <= lo < hi:
        raise ValueError(
            "defocus_search_range_angstrom must be (low, high) with 0 <= low < high, "
            f"e.g. (5000, 60000); got {defocus_search_range_angstrom}"
        )
    if not max_astigmatism_angstrom >= 0:
        raise ValueError(f"max_astigmatism_angstrom must be >= 0, e.g. 3000; got {max_astigmatism_angstrom}")
    if astigmatism_fixed is not None and not (
        len(astigmatism_fixed) == 2 and 0.0 <= astigmatism_fixed[0] <= max_astigmatism_angstrom
        and np.isfinite(astigmatism_fixed[1])
    ):
        raise ValueError(
            "astigmatism_fixed must be (U - V in Å, angle in degrees) with 0 <= U - V <= "
            f"max_astigmatism_angstrom ({max_astigmatism_angstrom}), e.g. (800.0, 30.0); got {astigmatism_fixed}"
        )
    if diagnostic_size_px < 16:
        raise ValueError(f"diagnostic_size_px must be at least 16, e.g. 256; got {diagnostic_size_px}")


# ----------------------------------------------------------------------------- spectra


def _tile_layout(
    shape_yx: tuple[int, int], tile: int, px: float, tilt_deg: float, axis_deg: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tile origins (half-overlapping, centred grid) and their defocus offsets in Å."""
    ny, nx = shape_yx
    step = max(int(round(tile * TILE_STEP_FRACTION)), 1)

    def starts(n: int) -> np.ndarray:
        count = (n - tile) // step + 1
        first = (n - ((count - 1) * step + tile)) // 2
        return first + step * np.arange(count)

    sy, sx = starts(ny), starts(nx)
    yy, xx = np.meshgrid(sy, sx, indexing="ij")
    cy = yy + (tile - 1) / 2 - (ny - 1) / 2
    cx = xx + (tile - 1) / 2 - (nx - 1) / 2
    offsets = local_defocus_angstrom(
        0.0, cx, cy, pixel_size_angstrom=px, tilt_angle_deg=tilt_deg, tilt_axis_angle_deg=axis_deg
    )
    return yy.ravel(), xx.ravel(), np.asarray(offsets, dtype=np.float64).ravel()


def _strips(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group tiles by defocus offset: labels, mean offset and tile count of each strip."""
    lo, hi = float(offsets.min()), float(offsets.max())
    n = int(np.clip(np.ceil((hi - lo) / MIN_STRIP_WIDTH_ANGSTROM), 1, MAX_STRIPS))
    raw = np.clip(((offsets - lo) / max(hi - lo, 1e-9) * n).astype(int), 0, n - 1)
    used, labels = np.unique(raw, return_inverse=True)
    counts = np.bincount(labels, minlength=len(used))
    means = np.bincount(labels, weights=offsets, minlength=len(used)) / counts
    return labels, means, counts


def _taper(tile: int, xp: ModuleType) -> Any:
    """Separable Tukey window (cosine edges over 1/8 of the tile on each side)."""
    n = np.arange(tile)
    edge = max(int(tile * TAPER_FRACTION), 1)
    ramp = np.ones(tile)
    t = 0.5 - 0.5 * np.cos(np.pi * (n[:edge] + 0.5) / edge)
    ramp[:edge] = t
    ramp[-edge:] = t[::-1]
    return xp.asarray(np.outer(ramp, ramp), dtype=xp.float32)


def _rfft2(x: Any) -> Any:
    """rfft2 over the last two axes: scipy.fft on the CPU (several times numpy's speed)."""
    xp = get_array_module(x)
    if xp is np:
        import scipy.fft

        return scipy.fft.rfft2(x)
    return xp.fft.rfft2(x)


def _strip_spectra(
    image: Any, starts_y: np.ndarray, starts_x: np.ndarray, labels: np.ndarray,
    n_strips: int, tile: int, radius: int,
) -> Any:
    """Summed power spectra of each strip, cropped to ``radius``: (S, 2R+1, R+1), fy unshifted."""
    xp = get_array_module(image)
    window = _taper(tile, xp)
    rows = xp.asarray(np.r_[0 : radius + 1, tile - radius : tile])
    sums = xp.zeros((n_strips, 2 * radius + 1, radius + 1), dtype=xp.float32)
    order = np.argsort(starts_y, kind="stable")
    for y0 in np.unique(starts_y):  # one batch of tiles per tile row
        sel = order[starts_y[order] == y0]
        band = image[int(y0) : int(y0) + tile]
        tiles = xp.stack([band[:, int(x0) : int(x0) + tile] for x0 in starts_x[sel]])
        tiles = tiles - tiles.mean(axis=(1, 2), keepdims=True)
        spec = _rfft2(tiles * window)[:, rows, : radius + 1]
        power = (spec.real**2 + spec.imag**2).astype(xp.float32)
        onehot = np.zeros((n_strips, len(sel)), dtype=np.float32)
        onehot[labels[sel], np.arange(len(sel))] = 1.0
        sums += (xp.asarray(onehot) @ power.reshape(len(sel), -1)).reshape(sums.shape)
    return sums


def _pixel_polar(radius: int, xp: ModuleType) -> tuple[Any, Any]:
    """Radius (spectrum px) and direction (rad) of every pixel of a cropped half spectrum."""
    fy = xp.asarray(np.r_[0 : radius + 1, -radius:0], dtype=xp.float32)[:, None]
    fx = xp.arange(radius + 1, dtype=xp.float32)[None, :]
    r = xp.sqrt(fy * fy + fx * fx)
    return r, xp.arctan2(fy, fx)


def _group_sum(values: Any, index: Any, n_groups: int) -> Any:
    """Sum ``(S, N)`` values into ``(S, n_groups)`` groups given an ``(N,)`` index."""
    xp = get_array_module(values)
    s = values.shape[0]
    idx = (xp.arange(s)[:, None] * n_groups + index[None, :]).ravel()
    out = xp.bincount(idx, weights=values.ravel().astype(xp.float64), minlength=s * n_groups)
    return out.reshape(s, n_groups)


def _make_cells(
    sums: Any, strip_tiles: np.ndarray, *, tile: int, px: float, r_lo: float, r_hi: float
) -> _Cells:
    """Average the strip spectra into polar cells inside the fit annulus."""
    xp = get_array_module(sums)
    n_strips, _, width = sums.shape
    radius = width - 1
    r, angle = _pixel_polar(radius, xp)
    inside = ((r >= r_lo) & (r < r_hi)).ravel()
    rbin = xp.floor(r - r_lo).astype(xp.int64).ravel()
    n_rbins = int(rbin[inside].max()) + 1
    rbin = xp.clip(rbin, 0, n_rbins - 1)
    sector = xp.clip(
        xp.floor((angle + np.pi / 2) / np.pi * N_SECTORS), 0, N_SECTORS - 1
    ).astype(xp.int64).ravel()
    cell = xp.where(inside, rbin * N_SECTORS + sector, n_rbins * N_SECTORS)  # last = outside
    n_all = n_rbins * N_SECTORS + 1
    count = xp.bincount(cell, minlength=n_all)[:-1]
    keep = xp.nonzero(count > 0)[0]
    count = count[keep].astype(xp.float64)
    k = (r / (tile * px)).ravel().astype(xp.float64)
    k2 = xp.bincount(cell, weights=k * k, minlength=n_all)[:-1][keep] / count
    ang = xp.bincount(cell, weights=angle.ravel().astype(xp.float64), minlength=n_all)[:-1][keep] / count
    spec = _group_sum(sums.reshape(n_strips, -1), cell, n_all)[:, :-1][:, keep] / count
    tiles = xp.asarray(strip_tiles, dtype=xp.float64)[:, None]
    spec = spec / tiles
    weight = count[None, :] * tiles
    cell_rbin = keep // N_SECTORS
    cell_coarse = (keep % N_SECTORS) // (N_SECTORS // N_COARSE_SECTORS)
    k_rbin = to_numpy(
        xp.sqrt(xp.bincount(cell_rbin, weights=k2 * count, minlength=n_rbins)
                / xp.maximum(xp.bincount(cell_rbin, weights=count, minlength=n_rbins), 1e-12))
    )
    coarse_angle = xp.bincount(cell_coarse, weights=ang * count, minlength=N_COARSE_SECTORS) / xp.maximum(
        xp.bincount(cell_coarse, weights=count, minlength=N_COARSE_SECTORS), 1e-12
    )
    # divide by a smooth log-power background (quadratic in k) so that all frequencies count
    profile = to_numpy(_group_sum(spec * weight, cell_rbin, n_rbins).sum(0)) / np.maximum(
        to_numpy(_group_sum(weight, cell_rbin, n_rbins).sum(0)), 1e-12
    )
    valid = (profile > 0) & (k_rbin > 0)
    kk = (k_rbin - k_rbin.mean()) / max(np.ptp(k_rbin), 1e-12)
    coef = np.polyfit(kk[valid], np.log(profile[valid]), deg=min(2, int(valid.sum()) - 1))
    b0 = np.exp(np.polyval(coef, kk))
    spec = spec / xp.asarray(b0)[cell_rbin][None, :]
    cells = _Cells(
        k2=k2.astype(xp.float32),
        angle=ang.astype(xp.float32),
        rbin=cell_rbin,
        coarse=cell_coarse,
        weight=weight.astype(xp.float32),
        spectrum=spec.astype(xp.float32),
        n_rbins=n_rbins,
        k_rbin=k_rbin,
        coarse_angle=coarse_angle.astype(xp.float32),
        b0=b0,
    )
    return cells


# ----------------------------------------------------------------------------- 1D search


def _search_1d(
    cells: _Cells,
    optics: _Optics,
    strip_offsets: np.ndarray,
    *,
    defocus_range: tuple[float, float],
    phases: np.ndarray,
    k_hi: float,
    lam: float,
) -> list[tuple[float, float]]:
    """Exhaustive search of mean defocus (and phase) on the strips' rotational averages.

    Returns the (defocus, phase) of the :data:`N_1D_CANDIDATES` best local maxima at least
    10% of defocus apart, best first, each refined on a finer grid.
    """
    xp = get_array_module(cells.spectrum)
    n_r = cells.n_rbins
    wsum = _group_sum(cells.weight, cells.rbin, n_r)  # (S, n_r)
    profile = _group_sum(cells.weight * cells.spectrum, cells.rbin, n_r) / xp.maximum(wsum, 1e-12)
    wts = wsum.astype(xp.float32)
    # remove what a smooth background can explain, from data and models alike
    proj = xp.asarray(_smooth_complement(cells.k_rbin, to_numpy(wsum.sum(0))), dtype=xp.float32)
    data = profile.astype(xp.float32) @ proj.T
    data_norm = float(xp.sqrt((wts * data * data).sum()))
    k2 = xp.asarray(cells.k_rbin**2, dtype=xp.float32)[None, None, :]
    delta = xp.asarray(strip_offsets, dtype=xp.float32)[None, :, None]

    # ring envelopes exp(-B k^2 / 4) tried with every candidate: the NCC picks the one
    # matching how far the rings reach, so noise beyond them does not swamp the search
    env = xp.asarray(np.exp(-np.asarray(ENVELOPE_BFACTORS_ANGSTROM2)[:, None] * cells.k_rbin[None, :] ** 2 / 4.0),
                     dtype=xp.float32)[None, :, None, :]  # (1, B, 1, r)

    def scores(defoci: np.ndarray, phase_values: np.ndarray) -> np.ndarray:
        dd, pp = np.meshgrid(defoci, phase_values, indexing="ij")
        dd, pp = dd.ravel(), pp.ravel()
        out = np.empty(len(dd))
        per = max(1, MAX_BATCH_ELEMENTS // (env.shape[1] * delta.shape[1] * n_r))
        for i in range(0, len(dd), per):
            d = xp.asarray(dd[i : i + per], dtype=xp.float32)[:, None, None]
            p = xp.asarray(pp[i : i + per], dtype=xp.float32)[:, None, None]
            m = optics.ctf2(k2, xp.zeros_like(k2), d + delta, xp.zeros_like(d), xp.zeros_like(d), p)
            m = (env * m[:, None]) @ proj.T  # (C, B, S, r)
            num = (wts * data * m).sum(axis=(2, 3))
            den = xp.sqrt((wts * m * m).sum(axis=(2, 3))) * data_norm
            out[i : i + per] = to_numpy((num / xp.maximum(den, 1e-30)).max(axis=1))
        return out.reshape(len(defoci), len(phase_values))

    lo, hi = defocus_range
    step = float(np.clip(0.25 / (lam * k_hi**2), 20.0, 2000.0))
    step = max(step, (hi - lo) / 2000.0)
    grid = np.arange(lo, hi + 0.5 * step, step)
    table = scores(grid, phases)
    best = table.max(axis=1)
    # local maxima over defocus, best first, at least 10% of defocus apart
    peaks = [i for i in np.argsort(best)[::-1]
             if (i == 0 or best[i] >= best[i - 1]) and (i == len(best) - 1 or best[i] >= best[i + 1])]
    chosen: list[int] = []
    for i in peaks:
        if all(abs(grid[i] - grid[c]) > 0.1 * max(grid[c], grid[i]) for c in chosen):
            chosen.append(i)
        if len(chosen) == N_1D_CANDIDATES:
            break
    out = []
    for i in chosen:
        j = int(np.argmax(table[i]))
        fine = grid[i] + np.linspace(-step, step, 21)
        fine = fine[fine >= 0]
        phase_fine = phases if len(phases) == 1 else phases[j] + np.linspace(-10.0, 10.0, 11)
        fine_table = scores(fine, phase_fine)
        a, b = np.unravel_index(int(np.argmax(fine_table)), fine_table.shape)
        out.append((float(fine[a]), float(phase_fine[b] % 180.0)))
    return out


# ----------------------------------------------------------------------------- 2D fitting


def _cell_model(cells: _Cells, optics: _Optics, delta: Any, params: np.ndarray) -> Any:
    """CTF² of every cell of every strip for one parameter set: (S, N)."""
    xp = get_array_module(cells.k2)
    mean, hc, hs, phase = (xp.asarray(float(v), dtype=xp.float32) for v in params)
    return optics.ctf2(cells.k2[None, :], cells.angle[None, :], mean + delta, hc, hs, phase)


def _bspline_basis(x: np.ndarray, n_interior: int) -> np.ndarray:
    """Cubic B-spline design matrix over the range of ``x`` (uniform interior knots)."""
    from scipy.interpolate import BSpline

    lo, hi = float(x.min()), float(x.max())
    inner = np.linspace(lo, hi, n_interior + 2)[1:-1]
    knots = np.r_[[lo] * 4, inner, [hi] * 4]
    return BSpline.design_matrix(np.clip(x, lo, hi), knots, 3).toarray()


def _smooth_complement(k: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Matrix removing the weighted least-squares spline fit: ``I - P (P^T W P)^-1 P^T W``."""
    phi = _bspline_basis(k, N_SMOOTH_KNOTS)
    w = np.maximum(weights, 0.0)
    gram = phi.T @ (w[:, None] * phi)
    gram += 1e-9 * np.trace(gram) * np.eye(len(gram))
    return np.eye(len(k)) - phi @ np.linalg.solve(gram, phi.T * w[None, :])


def _fit_background(cells: _Cells, model: Any) -> tuple[Any, Any]:
    """Fit the cell spectra as ``B(k) + E(k) * model`` with cubic splines B and E.

    Returns
    -------
    background, contrast
        ``(n_rbins,)`` arrays on the cells' device: B, and the ring contrast
        ``max(E, 0) / B``.
    """
    xp = get_array_module(cells.spectrum)
    n_r = cells.n_rbins
    w, s, m = cells.weight, cells.spectrum, model
    sums = [to_numpy(_group_sum(v, cells.rbin, n_r).sum(0)) for v in (w, w * m, w * m * m, w * s, w * m * s)]
    a0, a1, a2, y0, y1 = sums
    pb = _bspline_basis(cells.k_rbin, N_BACKGROUND_KNOTS)
    pe = _bspline_basis(cells.k_rbin**2, N_ENVELOPE_KNOTS)
    nb, n = pb.shape[1], pb.shape[1] + pe.shape[1]
    ata = np.block([[pb.T @ (a0[:, None] * pb), pb.T @ (a1[:, None] * pe)],
                    [pe.T @ (a1[:, None] * pb), pe.T @ (a2[:, None] * pe)]])
    atb = np.r_[pb.T @ y0, pe.T @ y1]
    db, de = np.diff(np.eye(nb), 2, axis=0), np.diff(np.eye(n - nb), 2, axis=0)
    penalty = np.block([[db.T @ db, np.zeros((nb, n - nb))], [np.zeros((n - nb, nb)), de.T @ de]])
    ridge = 1e-3 * np.trace(ata) / n
    beta = np.linalg.solve(ata + ridge * penalty + 1e-9 * np.trace(ata) * np.eye(n), atb)
    bg = pb @ beta[:nb]
    env = pe @ beta[nb:]
    bg = np.maximum(bg, 0.05 * max(float(np.median(bg)), 1e-12))
    contrast = np.maximum(env, 0.0) / bg
    if not np.any(contrast > 0):  # no rings at all: weight all frequencies alike
        contrast = np.full_like(bg, 1e-3)
    return xp.asarray(bg, dtype=xp.float32), xp.asarray(contrast, dtype=xp.float32)


def _normalised(cells: _Cells, background: Any, contrast: Any) -> Any:
    """Data ``(S - B) / B - w / 2`` of every cell: (S, N)."""
    b = background[cells.rbin][None, :]
    return (cells.spectrum - b) / b - 0.5 * contrast[cells.rbin][None, :]


@dataclass(frozen=True)
class _RadialSmoother:
    """Weighted radial profiles of cell arrays and their smooth (spline) part."""

    bounds: Any  # (n_rbins + 1,) cell index where each radial bin starts (cells sorted by bin)
    wsum: Any  # (S, n_rbins) weight per strip and radial bin
    smooth: Any  # (n_rbins, n_rbins) maps a radial profile to its weighted spline fit

    @classmethod
    def of(cls, cells: _Cells) -> _RadialSmoother:
        xp = get_array_module(cells.weight)
        rbin = to_numpy(cells.rbin)
        bounds = np.searchsorted(rbin, np.arange(cells.n_rbins + 1))
        wsum = _group_sum(cells.weight, cells.rbin, cells.n_rbins).astype(xp.float32)
        comp = _smooth_complement(cells.k_rbin, to_numpy(wsum.sum(0)))
        return cls(xp.asarray(bounds), wsum, xp.asarray(np.eye(cells.n_rbins) - comp, dtype=xp.float32))

    def profile(self, weighted: Any) -> Any:
        """Radial means of an ``(..., S, N)`` array already multiplied by the weights."""
        xp = get_array_module(weighted)
        cs = xp.cumsum(weighted, axis=-1)
        cs = xp.concatenate([xp.zeros(cs.shape[:-1] + (1,), dtype=cs.dtype), cs], axis=-1)
        return (cs[..., self.bounds[1:]] - cs[..., self.bounds[:-1]]) / xp.maximum(self.wsum, 1e-30)

    def remove(self, values: Any, weights: Any, rbin: Any) -> Any:
        """``values`` minus the smooth spline fit of its radial profile."""
        prof = self.profile(weights * values)
        return values - (prof @ self.smooth.T)[..., rbin]


def _score_batch(
    cells: _Cells, optics: _Optics, delta: Any, contrast: Any, data: Any, data_norm: float,
    params: np.ndarray, smoother: _RadialSmoother,
) -> np.ndarray:
    """Weighted NCC of the normalised data with the 2D model for each parameter row.

    ``data`` must be free of smooth radial components (:meth:`_RadialSmoother.remove`); the
    models' smooth radial parts are removed inside the norm, so a background error that
    varies slowly with frequency cannot pull the fit.
    """
    xp = get_array_module(data)
    n_strips, n_cells = data.shape
    per = max(1, MAX_BATCH_ELEMENTS // (n_strips * n_cells))
    wc = contrast[cells.rbin][None, None, :]
    wd = (cells.weight * data)[None]
    ww = cells.weight[None]
    out = np.empty(len(params))
    for i in range(0, len(params), per):
        p = xp.asarray(params[i : i + per], dtype=xp.float32)
        col = [p[:, j][:, None, None] for j in range(4)]
        m = wc * (optics.ctf2(cells.k2[None, None, :], cells.angle[None, None, :],
                              col[0] + delta[None], col[1], col[2], col[3]) - 0.5)
        num = (wd * m).sum(axis=(1, 2))
        wm = ww * m
        prof = smoother.profile(wm)
        smooth = prof @ smoother.smooth.T
        norm2 = (wm * m).sum(axis=(1, 2)) - (smoother.wsum * (2 * prof - smooth) * smooth).sum(axis=(1, 2))
        den = xp.sqrt(xp.maximum(norm2, 1e-30)) * data_norm
        out[i : i + per] = to_numpy(num / den)
    return out


def _search_astigmatism(
    cells: _Cells, optics: _Optics, delta: Any, background: Any, contrast: Any,
    params: np.ndarray, max_astigmatism: float,
) -> np.ndarray:
    """Exhaustive (mean, astigmatism) search through a table of sector correlations."""
    xp = get_array_module(cells.spectrum)
    mean0, _, _, phase = (float(v) for v in params)
    data = _normalised(cells, background, contrast)
    n_r, n_c = cells.n_rbins, N_COARSE_SECTORS
    group = cells.rbin * n_c + cells.coarse
    wd = _group_sum(cells.weight * data, group, n_r * n_c).reshape(-1, n_r, n_c)  # (S, r, j)
    ww = _group_sum(cells.weight, group, n_r * n_c).reshape(-1, n_r, n_c)
    half_max = 0.5 * max_astigmatism
    span = half_max + 600.0
    step = 10.0
    table_defoci = mean0 + np.arange(-span, span + step / 2, step)
    k2 = xp.asarray(cells.k_rbin**2, dtype=xp.float32)[None, None, :]
    d = xp.asarray(table_defoci, dtype=xp.float32)[:, None, None] + delta[None]
    zero = xp.zeros((1, 1, 1), dtype=xp.float32)
    m = contrast[None, None, :] * (optics.ctf2(k2, zero, d, zero, zero, phase) - 0.5)  # (C, S, r)
    n_t = len(table_defoci)
    m2 = m.reshape(n_t, -1).astype(xp.float64)
    num = m2 @ wd.reshape(-1, n_c)  # (C, j)
    den = (m2 * m2) @ ww.reshape(-1, n_c)
    # candidates: mean offsets x astigmatism components on a disc
    comp = np.arange(-half_max, half_max + 25.0, 50.0) if half_max > 0 else np.zeros(1)
    hc, hs = np.meshgrid(comp, comp, indexing="ij")
    disc = hc**2 + hs**2 <= half_max**2 + 1e-6
    hc, hs = hc[disc], hs[disc]
    means = np.arange(-400.0, 401.0, 20.0)
    a = to_numpy(cells.coarse_angle).astype(np.float64)
    best, best_score = None, -np.inf
    c2, s2 = xp.asarray(np.cos(2 * a)), xp.asarray(np.sin(2 * a))
    hc_x, hs_x = xp.asarray(hc)[:, None], xp.asarray(hs)[:, None]
    cols = xp.arange(n_c)[None, :]
    for dm in means:  # one batch per mean offset: (astigmatism candidates, sectors)
        pos = (dm + hc_x * c2 + hs_x * s2 + span) / step
        pos = xp.clip(pos, 0, n_t - 1 - 1e-6)
        i0 = pos.astype(xp.int64)
        f = pos - i0
        nsum = ((1 - f) * num[i0, cols] + f * num[i0 + 1, cols]).sum(1)
        dsum = ((1 - f) * den[i0, cols] + f * den[i0 + 1, cols]).sum(1)
        sc = nsum / xp.sqrt(xp.maximum(dsum, 1e-30))
        i = int(xp.argmax(sc))
        v = float(sc[i])
        if v > best_score:
            best_score, best = v, (mean0 + dm, hc[i], hs[i])
    return np.array([best[0], best[1], best[2], phase])


def _pattern_search(
    cells: _Cells, optics: _Optics, delta: Any, background: Any, contrast: Any,
    params: np.ndarray, steps: np.ndarray, max_astigmatism: float, *, min_step: float = 4.0,
) -> tuple[np.ndarray, float]:
    """Maximise the 2D NCC by a compass search on a full 3^d stencil, halving steps.

    When the defocus step is down to ``min_step`` and the centre is best, a quadratic
    fitted to the stencil's scores gives the final sub-step position.
    """
    xp = get_array_module(cells.spectrum)
    smoother = _RadialSmoother.of(cells)
    data = smoother.remove(_normalised(cells, background, contrast), cells.weight, cells.rbin)
    data_norm = float(xp.sqrt((cells.weight * data * data).sum()))
    active = np.nonzero(steps > 0)[0]
    grids = np.meshgrid(*([np.array([-1.0, 0.0, 1.0])] * len(active)), indexing="ij")
    stencil = np.zeros((3 ** len(active), 4))
    for col, g in zip(active, grids):
        stencil[:, col] = g.ravel()
    centre = int(np.nonzero((stencil == 0).all(axis=1))[0][0])
    steps = steps.astype(np.float64).copy()
    best = params.astype(np.float64).copy()

    def clamp(cand: np.ndarray) -> np.ndarray:
        half = np.hypot(cand[:, 1], cand[:, 2])
        limit = 0.5 * max_astigmatism
        cand[:, 1:3] *= np.where(half > limit, limit / np.maximum(half, 1e-9), 1.0)[:, None]
        return cand

    def score_of(cand: np.ndarray) -> np.ndarray:
        return _score_batch(cells, optics, delta, contrast, data, data_norm, cand, smoother)

    score = -np.inf
    for _ in range(40):
        sc = score_of(clamp(best[None, :] + stencil * steps[None, :]))
        i = int(np.argmax(sc))
        if sc[i] > sc[centre] + 1e-7:
            best, score = clamp(best[None, :] + stencil[i : i + 1] * steps[None, :])[0], float(sc[i])
            continue
        score = float(sc[centre])
        if steps[0] <= min_step:
            offset = _quadratic_peak(stencil[:, active], sc)
            if offset is not None:
                trial = best.copy()
                trial[active] += offset * steps[active]
                trial = clamp(trial[None, :])
                s_trial = float(score_of(trial)[0])
                if s_trial > score:
                    best, score = trial[0], s_trial
            break
        steps *= 0.5
    return best, score


def _quadratic_peak(points: np.ndarray, values: np.ndarray) -> np.ndarray | None:
    """Maximum of a quadratic least-squares fit to values on a 3^d stencil, in stencil units."""
    d = points.shape[1]
    cols = [np.ones(len(points))] + [points[:, i] for i in range(d)]
    pairs = [(i, j) for i in range(d) for j in range(i, d)]
    cols += [points[:, i] * points[:, j] for i, j in pairs]
    coef, *_ = np.linalg.lstsq(np.stack(cols, axis=1), values, rcond=None)
    grad = coef[1 : d + 1]
    hess = np.zeros((d, d))
    for c, (i, j) in zip(coef[d + 1 :], pairs):
        hess[i, j] += c if i != j else 2 * c
        if i != j:
            hess[j, i] += c
    if np.any(np.linalg.eigvalsh(hess) >= 0):
        return None
    return np.clip(-np.linalg.solve(hess, grad), -1.0, 1.0)


# ----------------------------------------------------------------------------- diagnostics


def _equiphase_profile(
    cells: _Cells, optics: _Optics, delta: Any, background: Any, contrast: Any,
    params: np.ndarray, *, lam: float, tile: int, px: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Equiphase averages of data and model, and their windowed correlation (numpy)."""
    xp = get_array_module(cells.spectrum)
    mean, hc, hs, phase = (float(v) for v in params)
    data = _normalised(cells, background, contrast)
    model = contrast[cells.rbin][None, :] * (_cell_model(cells, optics, delta, params) - 0.5)
    # defocus of each cell, mapped to the frequency of equal phase at the centre defocus
    local = mean + delta + hc * xp.cos(2 * cells.angle)[None, :] + hs * xp.sin(2 * cells.angle)[None, :]
    a_cs = 0.5 * np.pi * optics.spherical_aberration_mm * 1e7 * lam**3
    x = cells.k2[None, :].astype(xp.float64)
    chi = np.pi * lam * local * x - a_cs * x * x
    a0 = np.pi * lam * mean
    disc = xp.sqrt(xp.maximum(a0 * a0 - 4 * a_cs * chi, 0.0))
    k_eq = xp.sqrt(xp.maximum(2 * chi / (a0 + disc), 0.0))
    step = 1.0 / (tile * px)
    k_lo = float(cells.k_rbin[0]) - 0.5 * step
    n_bins = cells.n_rbins
    idx = xp.clip(((k_eq - k_lo) / step).astype(xp.int64), 0, n_bins - 1)
    flat = idx.ravel()
    w = cells.weight.ravel().astype(xp.float64)
    wsum = xp.bincount(flat, weights=w, minlength=n_bins)
    half_w = 0.5 * contrast.astype(xp.float64)
    epa_d = xp.bincount(flat, weights=w * data.ravel(), minlength=n_bins)
    epa_m = xp.bincount(flat, weights=w * model.ravel(), minlength=n_bins)
    wsum_n = to_numpy(wsum)
    ok = wsum_n > 0
    d = np.where(ok, to_numpy(epa_d) / np.maximum(wsum_n, 1e-30), 0.0)
    m = np.where(ok, to_numpy(epa_m) / np.maximum(wsum_n, 1e-30), 0.0)
    freq = k_lo + (np.arange(n_bins) + 0.5) * step
    # correlation in a window of two ring periods: dk = 1 / (2 lam df k) per period
    period_bins = 1.0 / (2.0 * lam * max(mean, 1.0) * freq) / step
    half_window = np.clip(np.round(period_bins), 2, n_bins // 2).astype(int)
    cw = np.concatenate([[0.0], np.cumsum(wsum_n)])
    sums = {}
    for name, v in (("d", d), ("m", m), ("dd", d * d), ("mm", m * m), ("dm", d * m)):
        sums[name] = np.concatenate([[0.0], np.cumsum(wsum_n * v)])
    i = np.arange(n_bins)
    lo = np.clip(i - half_window, 0, n_bins)
    hi = np.clip(i + half_window + 1, 0, n_bins)
    n = np.maximum(cw[hi] - cw[lo], 1e-30)
    mu_d = (sums["d"][hi] - sums["d"][lo]) / n
    mu_m = (sums["m"][hi] - sums["m"][lo]) / n
    var_d = (sums["dd"][hi] - sums["dd"][lo]) / n - mu_d**2
    var_m = (sums["mm"][hi] - sums["mm"][lo]) / n - mu_m**2
    cov = (sums["dm"][hi] - sums["dm"][lo]) / n - mu_d * mu_m
    corr = cov / np.sqrt(np.maximum(var_d * var_m, 1e-30))
    corr = np.where((var_d > 0) & (var_m > 0), corr, 0.0)
    ring = to_numpy(half_w)
    return freq, d + ring, m + ring, corr


def _fit_resolution(freq: np.ndarray, corr: np.ndarray, threshold: float, k_hi: float) -> float:
    """Resolution (Å) of the first frequency whose correlation falls below ``threshold``."""
    below = np.nonzero(corr < threshold)[0]
    if len(below) == 0:
        return float(1.0 / k_hi)
    return float(1.0 / freq[below[0]])


def _diagnostic_image(
    sums: Any, strip_tiles: np.ndarray, cells: _Cells, optics: _Optics, strip_offsets: np.ndarray,
    background: Any, contrast: Any, params: np.ndarray, *,
    tile: int, px: float, r_lo: float, r_hi: float, size: int,
) -> np.ndarray:
    """Centred spectrum, left half data, right half model, resampled to ``(size, size)``."""
    xp = get_array_module(sums)
    radius = sums.shape[2] - 1
    r, angle = _pixel_polar(radius, xp)
    k = r / (tile * px)
    inside = (r >= r_lo) & (r < r_hi)
    k_r = xp.asarray(cells.k_rbin, dtype=xp.float32)
    total = sums.sum(0) / float(strip_tiles.sum())
    b_pix = xp.interp(k, k_r, background)
    w_pix = xp.interp(k, k_r, contrast)
    b0_pix = xp.interp(k, k_r, xp.asarray(cells.b0, dtype=xp.float32))
    data = xp.where(inside, (total / b0_pix - b_pix) / b_pix, 0.0)
    mean, hc, hs, phase = (xp.asarray(float(v), dtype=xp.float32) for v in params)
    weights = xp.asarray(strip_tiles / strip_tiles.sum(), dtype=xp.float32)[:, None, None]
    dl = xp.asarray(strip_offsets, dtype=xp.float32)[:, None, None]
    model = (weights * optics.ctf2((k * k)[None], angle[None], mean + dl, hc, hs, phase)).sum(0)
    model = xp.where(inside, w_pix * model, 0.0)
    data_full = _centred_full(data)
    model_full = _centred_full(model)
    image = xp.concatenate([data_full[:, :radius], model_full[:, radius:]], axis=1)
    zoom = size / image.shape[0]
    out = scipy_ndimage(xp).zoom(image.astype(xp.float32), zoom, order=1, grid_mode=True, mode="nearest")
    return to_numpy(out[:size, :size]).astype(np.float32)


def _centred_full(half: Any) -> Any:
    """Full centred ``(2R+1, 2R+1)`` spectrum from a cropped rfft half (rows fy unshifted)."""
    xp = get_array_module(half)
    radius = half.shape[1] - 1
    shifted = xp.concatenate([half[radius + 1 :], half[: radius + 1]], axis=0)  # fy = -R..R
    left = shifted[::-1, 1:][:, ::-1]  # fx = -R..-1 from Hermitian symmetry
    return xp.concatenate([left, shifted], axis=1)
