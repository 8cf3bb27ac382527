"""The whole alignment, :func:`align_tilt_series`: the steps of :mod:`tomodask.kernels.tilt_align`
in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tomodask.backend import get_array_module, to_numpy
from tomodask.kernels.fourier import fourier_crop
from tomodask.kernels.projector import project_volume
from tomodask.kernels.tilt_align.axis import refine_tilt_axis_angle
from tomodask.kernels.tilt_align.checks import (
    _carried_outwards,
    _confirmed_by_reprojection,
    _feature_placements,
    _neighbour_median,
    _outer_runs,
    _weak_links,
)
from tomodask.kernels.tilt_align.correlate import (
    _Correlator,
    _search_radius_px,
    _stretched_reference,
    _taper,
    coarse_align_shifts,
)
from tomodask.kernels.tilt_align.features import FeatureFit, refine_with_features
from tomodask.kernels.tilt_align.reprojection import _Matcher, _wbp
from tomodask.kernels.tilt_align.result import TiltSeriesAlignment
from tomodask.kernels.tilt_align.specimen import SpecimenGeometry, _centring_warning, specimen_geometry
from tomodask.kernels.tilt_align.warp import _rot_xy
from tomodask.kernels.tilt_exclusion import ALIGNMENT_FAILED, find_bad_tilts, ice_slab_from_intensity


def align_tilt_series(
    images_tyx: np.ndarray,
    tilt_angles_deg: np.ndarray,
    *,
    pixel_size_angstrom: float,
    tilt_axis_angle_deg: float,
    alignment_pixel_size_angstrom: float = 12.0,
    specimen_thickness_angstrom: float = 2000.0,
    motion_px: np.ndarray | None = None,
    ctf_fit_resolution_angstrom: np.ndarray | None = None,
    user_excluded: tuple[int, ...] = (),
    refine_tilt_axis: bool = True,
    tilt_axis_search_deg: float = 6.0,
    n_projection_matching_iterations: int = 4,
    center_specimen: bool = True,
    estimate_tilt_angle_offset: bool = True,
    lowpass_angstrom: float = 18.0,
    highpass_angstrom: float = 240.0,
    min_relative_correlation: float = 0.5,
    min_peak_ratio: float = 1.2,
    max_shift_fraction: tuple[float, float] = (0.1, 0.3),
    ice_mean_free_path_angstrom: float = 3500.0,
    max_centring_uncertainty_angstrom: float = 50.0,
    min_link_peak_ratio: float = 1.5,
    min_link_relative_correlation: tuple[float, float] = (0.55, 0.75),
    recovery_tolerance_angstrom: float = 18.0,
    min_recovery_peak_ratio: float = 3.0,
    max_feature_correction_angstrom: float = 12.0,
    n_replacement_rounds: int = 4,
    max_feature_placement_offset_px: float = 3.0,
    min_feature_placement_peak_ratio: float = 2.0,
    n_feature_placement_rounds: int = 4,
) -> TiltSeriesAlignment:
    """Align a tilt-series without fiducials (see the module docstring for the steps).

    Parameters
    ----------
    images_tyx
        ``(t, y, x)`` tilt images (gain-corrected sums, same exposure per tilt), numpy or
        cupy, sorted by tilt angle.
    tilt_angles_deg
        ``(t,)`` nominal (stage) tilt angles.
    pixel_size_angstrom
        Pixel size of ``images_tyx``.
    tilt_axis_angle_deg
        Nominal tilt-axis angle (the mdoc's), counter-clockwise from Y.
    alignment_pixel_size_angstrom
        Pixel size alignment works at (Fourier binning; no binning if smaller than the
        input's). About 1/128 of the field of view is a good choice.
    specimen_thickness_angstrom
        Thickness of the slab reconstructed for the feature model and the leave-one-out
        reprojections (at least the specimen's; capped at 1.5 image widths); centring
        looks at twice that.
    motion_px, ctf_fit_resolution_angstrom, user_excluded
        Passed to :func:`tomodask.kernels.tilt_exclusion.find_bad_tilts`.
    refine_tilt_axis
        Refine the tilt-axis angle (common lines over ``tilt_axis_search_deg`` either
        side of the nominal one, then :func:`~tomodask.kernels.tilt_align.refine_with_features`); else keep it.
    n_projection_matching_iterations
        Most rounds of the global 3D-feature consistency step (fewer when its corrections
        are below 0.1 px; one usually suffices; 0: neighbour correlations only).
    center_specimen
        Move the rotation centre to the specimen's mid-plane (:func:`~tomodask.kernels.tilt_align.specimen_geometry`).
    estimate_tilt_angle_offset
        Offset the angles so that the specimen is level (from the intensity fall with
        tilt, else with ``center_specimen`` from the slope of the bead layers or of the
        structure).
    lowpass_angstrom, highpass_angstrom
        Band-pass of the correlations (wavelengths kept between them).
    min_relative_correlation
        A tilt whose correlation with its aligned neighbours (or, for one the neighbour
        chain could not place, with the reprojection of the others) is below this
        fraction of theirs is reported as ``"alignment failed (...)"`` and excluded; so is
        such a tilt whose correlation with its leave-one-out reprojection ends below half
        this fraction of its neighbours'.
    min_peak_ratio
        A tilt whose correlation peak is less than this many times the next best one is
        excluded the same way.
    max_shift_fraction
        ``(a, b)``: shifts are searched within ``size * (a + b |sin(theta)|)`` of the
        neighbouring tilt's shift.
    ice_mean_free_path_angstrom
        Inelastic mean free path for the ice thickness used in centring when gold is on
        one surface only (:func:`tomodask.kernels.tilt_exclusion.ice_slab_from_intensity`).
    max_centring_uncertainty_angstrom
        Without gold, a mid-plane whose standard error exceeds this is still used but
        reported in ``centring_warning``.
    min_link_peak_ratio, min_link_relative_correlation
        Without gold (the mid-plane not found from gold beads), nothing but its
        neighbours places a tilt across the axis: each kept tilt is correlated once more
        with its aligned neighbour towards 0°. With ``min_link_relative_correlation =
        (a, b)``, a link whose correlation is below ``a`` times the median link's, or below
        ``b`` times it with a peak ratio below ``min_link_peak_ratio``, is weak (a clear
        peak with a low correlation is often another structure). That tilt and every tilt
        beyond it (placed through it) are reported as ``"alignment failed (...)"`` and
        excluded.
    recovery_tolerance_angstrom, min_recovery_peak_ratio
        Without gold, tilts excluded as ``"alignment failed"`` get one more check,
        outwards from 0° on each side: correlated (low-pass twice ``lowpass_angstrom``)
        with the reprojection at their angle of the kept tilts (and of those recovered
        before them), a tilt whose best peak within ``max_shift_fraction[0]`` of the field
        lies within ``recovery_tolerance_angstrom`` of its shift and is at least
        ``min_recovery_peak_ratio`` times the next best is kept at its shift; the first
        one that fails ends the walk on its side.
    max_feature_correction_angstrom, n_replacement_rounds
        Without gold, after the link check and the recovery: when the 3D-feature model
        of the kept tilts (:func:`~tomodask.kernels.tilt_align.refine_with_features`, unshrunk) moves one of them by
        more than ``max_feature_correction_angstrom``, its corrections are applied to the
        kept tilts and it is fitted again, up to ``n_replacement_rounds`` times, until
        none moves by more than half that (a confident link to the wrong layer of a thick
        specimen, and the tilts placed through it, are re-placed by the features). A
        tilt still moved by more than ``max_feature_correction_angstrom`` after the last
        round is reported as ``"alignment failed (...)"`` and excluded.
    max_feature_placement_offset_px, min_feature_placement_peak_ratio, n_feature_placement_rounds
        With gold (found when the specimen is first centred), after the global passes
        each kept tilt is correlated with the reprojection, at its angle, of the balls
        around the strongest features (beads) of the reconstruction
        (:func:`~tomodask.kernels.tilt_align.checks._feature_placements`), searched as widely as the chain's links. A clear
        peak (at least ``min_feature_placement_peak_ratio`` times the next best) more
        than ``max_feature_placement_offset_px`` alignment pixels from the tilt's shift
        re-places it there, and the tilts beyond it on its side take the move
        extrapolated linearly in ``sin(theta)``; the global passes then run again, up to
        ``n_feature_placement_rounds`` times. A tilt still that far off after the last
        round is reported as ``"alignment failed (...)"`` and excluded.

    Returns
    -------
    TiltSeriesAlignment

    Raises
    ------
    ValueError
        With fewer than three usable tilts, or mismatched per-tilt arrays.
    """
    s = _prepared(images_tyx, tilt_angles_deg, pixel_size_angstrom=pixel_size_angstrom,
                  tilt_axis_angle_deg=tilt_axis_angle_deg, alignment_pixel_size_angstrom=alignment_pixel_size_angstrom,
                  specimen_thickness_angstrom=specimen_thickness_angstrom, motion_px=motion_px,
                  ctf_fit_resolution_angstrom=ctf_fit_resolution_angstrom, user_excluded=user_excluded,
                  estimate_tilt_angle_offset=estimate_tilt_angle_offset, lowpass_angstrom=lowpass_angstrom,
                  highpass_angstrom=highpass_angstrom, ice_mean_free_path_angstrom=ice_mean_free_path_angstrom,
                  max_shift_fraction=max_shift_fraction, min_peak_ratio=min_peak_ratio)
    _coarse_shifts_and_axis(s, refine_tilt_axis=refine_tilt_axis, tilt_axis_search_deg=tilt_axis_search_deg)
    _neighbour_pass(s)
    _second_chance(s, min_relative_correlation=min_relative_correlation)
    _global_passes(s, n_iterations=n_projection_matching_iterations, fit_axis=refine_tilt_axis,
                   n_rounds=n_feature_placement_rounds, max_offset_px=max_feature_placement_offset_px,
                   min_ratio=min_feature_placement_peak_ratio)
    _centre_specimen(s, center_specimen=center_specimen, estimate_tilt_angle_offset=estimate_tilt_angle_offset)
    _residuals_and_failures(s, min_relative_correlation=min_relative_correlation)
    if s.geometry is None or not s.geometry.method.startswith("gold"):
        recovered = _links_and_recovery(s, min_link_peak_ratio=min_link_peak_ratio,
                                        min_link_relative_correlation=min_link_relative_correlation,
                                        recovery_tolerance_angstrom=recovery_tolerance_angstrom,
                                        min_recovery_peak_ratio=min_recovery_peak_ratio)
        replaced = _replacement_rounds(s, max_correction_angstrom=max_feature_correction_angstrom,
                                       n_rounds=n_replacement_rounds)
        _final_axis(s, refine_tilt_axis=refine_tilt_axis, recovered=recovered, replaced=replaced)
    return _assembled(s, pixel_size_angstrom=pixel_size_angstrom, tilt_axis_angle_deg=tilt_axis_angle_deg,
                      max_centring_uncertainty_angstrom=max_centring_uncertainty_angstrom)


# A prior on each tilt's correction too weak to shrink it: the 3D-feature model's own corrections.
_UNSHRUNK_PRIOR_PX = 100.0


@dataclass
class _State:
    """What the stages of :func:`align_tilt_series` share and update (lengths in alignment pixels).

    Attributes
    ----------
    binned
        ``(t, y, x)`` stack Fourier-binned to the alignment pixel size, zero-mean contrast
        (zeros for the tilts excluded before alignment).
    reasons
        ``(t,)`` exclusion reasons (``""``: kept), updated with the failures at the end.
    use
        ``(t,)`` bool, tilts not excluded before alignment.
    nominal, angles, sin_t
        ``(t,)`` given tilt angles; the angles the stages work with (plus the offset that
        levels the slab by its intensity); ``sin`` of the latter.
    prior_offset
        That offset (0 when not estimated).
    bin_yx, px_b
        Binning factors ``(y, x)`` and the alignment pixel size (Å).
    lp_px, hp_px
        Band-pass of the correlations.
    nz, thick_nz, ice_px
        Slab of the 3D-feature model and reprojections; slab of the centring; ice thickness
        from the intensity (None: unknown).
    max_shift_fraction, min_peak_ratio
        The options of :func:`align_tilt_series` of that name.
    matcher, coarse_corr
        The leave-one-out matcher and the correlation chain's correlator.
    axis
        Current tilt-axis angle (degrees).
    shifts_b, reliable, ok
        ``(t, 2)`` current displacements ``(dy, dx)``; ``(t,)`` bool, tilts the chain placed
        reliably; tilts aligned (not failed).
    failed
        ``{tilt: reason}``, tilts excluded as failed.
    z_total_px, geometry, centring_model
        Height the centring moved the rotation centre by, the last specimen geometry, and
        ``(tilts, fit)`` of the 3D-feature model of the final centring (None before).
    offset, final_angles
        Tilt-angle offset and ``(t,)`` angles after centring.
    ncc, residual_b
        ``(t,)`` correlations with the leave-one-out reprojections and residuals.
    """

    binned: object
    reasons: list[str]
    use: np.ndarray
    nominal: np.ndarray
    angles: np.ndarray
    sin_t: np.ndarray
    prior_offset: float
    bin_yx: np.ndarray
    px_b: float
    lp_px: float
    hp_px: float
    nz: int
    thick_nz: int
    ice_px: float | None
    max_shift_fraction: tuple[float, float]
    min_peak_ratio: float
    matcher: _Matcher
    coarse_corr: _Correlator
    axis: float
    shifts_b: np.ndarray | None = None
    reliable: np.ndarray | None = None
    ok: np.ndarray | None = None
    failed: dict[int, str] = field(default_factory=dict)
    z_total_px: float = 0.0
    geometry: SpecimenGeometry | None = None
    centring_model: tuple[np.ndarray, FeatureFit] | None = None
    offset: float = 0.0
    final_angles: np.ndarray | None = None
    ncc: np.ndarray | None = None
    residual_b: np.ndarray | None = None

    def search_radius_px(self) -> np.ndarray:
        """``(t,)`` radius of the chain's shift search at each tilt."""
        return _search_radius_px(self.angles, min(self.binned.shape[1:]), self.max_shift_fraction)

    def kept(self) -> np.ndarray:
        """``(t,)`` bool, aligned tilts not (yet) excluded as failed."""
        return self.ok & ~np.isin(np.arange(len(self.ok)), list(self.failed))


def _prepared(images_tyx, tilt_angles_deg, *, pixel_size_angstrom: float, tilt_axis_angle_deg: float,
              alignment_pixel_size_angstrom: float, specimen_thickness_angstrom: float, motion_px,
              ctf_fit_resolution_angstrom, user_excluded: tuple[int, ...], estimate_tilt_angle_offset: bool,
              lowpass_angstrom: float, highpass_angstrom: float, ice_mean_free_path_angstrom: float,
              max_shift_fraction: tuple[float, float], min_peak_ratio: float) -> _State:
    """Step 1: exclusion, the stack binned to the alignment pixel size, the slab from the intensity."""
    xp = get_array_module(images_tyx)
    n_t, ny, nx = images_tyx.shape
    angles = np.asarray(to_numpy(tilt_angles_deg), dtype=np.float64).ravel()
    if angles.shape != (n_t,):
        raise ValueError(f"{n_t} images but {angles.shape[0]} tilt angles; give one angle per tilt")
    reasons = list(find_bad_tilts(images_tyx, tilt_angles_deg=angles, motion_px=motion_px,
                                  ctf_fit_resolution_angstrom=ctf_fit_resolution_angstrom,
                                  user_excluded=user_excluded))
    use = np.array([r == "" for r in reasons])
    if use.sum() < 3:
        raise ValueError(f"only {int(use.sum())} usable tilts ({reasons}); alignment needs at least 3")

    # Bin to the alignment pixel size (even sizes; per-axis factors b = n / n_binned).
    factor = min(1.0, pixel_size_angstrom / alignment_pixel_size_angstrom)
    by_, bx_ = max(2, 2 * int(round(ny * factor / 2))), max(2, 2 * int(round(nx * factor / 2)))
    px_b = float(pixel_size_angstrom * nx / bx_)
    binned = xp.zeros((n_t, by_, bx_), dtype=xp.float32)
    for i in np.flatnonzero(use):
        img = images_tyx[i].astype(xp.float32)
        binned[i] = fourier_crop(img / img.mean() - 1.0, (by_, bx_))
    lp_px, hp_px = max(lowpass_angstrom / px_b, 1.0), highpass_angstrom / px_b
    nz = int(np.clip(round(specimen_thickness_angstrom / px_b), 16, 1.5 * max(by_, bx_))) // 2 * 2
    ice_angstrom, intensity_offset_deg = ice_slab_from_intensity(
        images_tyx, angles, usable=use, mean_free_path_angstrom=ice_mean_free_path_angstrom)
    # Work with the angles that level the slab from the start (stretching and matching
    # are exact only with the true angles).
    prior_offset = intensity_offset_deg if estimate_tilt_angle_offset and np.isfinite(intensity_offset_deg) else 0.0
    return _State(
        binned=binned, reasons=reasons, use=use, nominal=angles, angles=angles + prior_offset,
        sin_t=np.sin(np.deg2rad(angles + prior_offset)), prior_offset=prior_offset,
        bin_yx=np.array([ny / by_, nx / bx_]), px_b=px_b, lp_px=lp_px, hp_px=hp_px, nz=nz,
        thick_nz=int(min(2 * nz, 2 * max(by_, bx_))),
        ice_px=ice_angstrom / px_b if np.isfinite(ice_angstrom) else None,
        max_shift_fraction=max_shift_fraction, min_peak_ratio=min_peak_ratio,
        matcher=_Matcher(binned, lowpass_px=lp_px, highpass_px=hp_px, thickness_px=nz),
        coarse_corr=_Correlator((by_, bx_), lowpass_px=lp_px, highpass_px=hp_px, xp=xp,
                                mask=_taper((by_, bx_), fraction=0.1, xp=xp)),
        axis=float(tilt_axis_angle_deg))


def _model(s: _State, idx: np.ndarray, angles: np.ndarray, *, fit_axis: bool, aligned=None, **options) -> FeatureFit:
    """The 3D-feature model (:func:`refine_with_features`) of the tilts ``idx`` at ``angles[idx]``.

    ``aligned``: those tilts already aligned with the current shifts and axis.
    """
    if aligned is None:
        aligned = s.matcher.aligned(idx, s.shifts_b, s.axis)
    return refine_with_features(aligned, angles[idx], _wbp(aligned, angles[idx], thickness_px=s.nz),
                                fit_axis=fit_axis, **options)


def _final_model(s: _State, idx: np.ndarray) -> FeatureFit:
    """The unshrunk 3D-feature model of the tilts ``idx`` at the final angles, axis kept."""
    return _model(s, idx, s.final_angles, fit_axis=False, shift_prior_px=_UNSHRUNK_PRIOR_PX)


def _height_term(s: _State, z_px: float) -> np.ndarray:
    """``(t, 2)`` displacements that raise the rotation centre by ``z_px``: ``z sin(theta)`` across the axis."""
    a = np.deg2rad(s.axis)
    return z_px * s.sin_t[:, None] * np.array([np.sin(a), np.cos(a)])[None, :]


def _centre(s: _State, idx: np.ndarray, *, slope: bool, parallax: bool = False) -> None:
    """Move the rotation centre to the mid-plane (:func:`specimen_geometry`) of the tilts ``idx``.

    Correlation follows the strongest layer. ``slope``: the slab's slope is estimated (it
    is level when the intensity gave the tilt-angle offset); ``parallax``: the features'
    heights come from the unshrunk 3D-feature model (kept as ``centring_model``).
    """
    aligned = s.matcher.aligned(idx, s.shifts_b, s.axis)
    volume = _wbp(aligned, s.angles[idx], thickness_px=s.thick_nz)
    known = 0.0 if slope and s.prior_offset != 0.0 else None
    k0 = int(np.argmin(np.abs(s.angles[idx])))
    found = None
    if parallax:
        fit = _model(s, idx, s.angles, fit_axis=False, aligned=aligned, shift_prior_px=_UNSHRUNK_PRIOR_PX)
        found = (fit.positions_zyx, fit.strength) if len(fit.strength) >= 10 else None
        s.centring_model = (idx, fit)
    s.geometry = specimen_geometry(volume, thickness_px=s.ice_px, estimate_slope=slope, slope_deg=known,
                                   image_yx=aligned[k0], image_tilt_angle_deg=float(s.angles[idx][k0]),
                                   features=found)
    s.z_total_px += s.geometry.z_center_px
    s.shifts_b = s.shifts_b + _height_term(s, s.geometry.z_center_px)


def _coarse(s: _State) -> None:
    """Step 2: the correlation chain's shifts with the current axis (:func:`coarse_align_shifts`)."""
    s.shifts_b, _, _, s.reliable = coarse_align_shifts(
        s.binned, s.angles, tilt_axis_angle_deg=s.axis, usable=s.use, lowpass_px=s.lp_px, highpass_px=s.hp_px,
        max_shift_fraction=s.max_shift_fraction, min_peak_ratio=s.min_peak_ratio)


def _coarse_shifts_and_axis(s: _State, *, refine_tilt_axis: bool, tilt_axis_search_deg: float) -> None:
    """Steps 2 and 3: coarse shifts; the tilt axis by common lines, then by the 3D-feature model."""
    _coarse(s)
    if not refine_tilt_axis:
        return
    if tilt_axis_search_deg > 0:
        ok = s.use & s.reliable
        s.axis, _ = refine_tilt_axis_angle(s.binned[ok], shifts_px=s.shifts_b[ok], tilt_axis_angle_deg=s.axis,
                                           search_range_deg=tilt_axis_search_deg, step_deg=1.0)
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
        sources = np.concatenate([good[good < i][-1:], good[good > i][:1]])
        if i == start or len(sources) == 0:
            continue
        reference = _stretched_reference(s.binned, s.angles, i, sources, s.shifts_b, tilt_axis_angle_deg=s.axis)
        d, _, _ = corr.match(corr.prepare(s.binned[i][None]), corr.prepare(reference[None]),
                             centres_yx=s.shifts_b[i][None], radii_px=s.matcher.small_radius_px)
        refined[i] = d[0]
    s.shifts_b = refined
    _centre(s, good, slope=False)


def _second_chance(s: _State, *, min_relative_correlation: float) -> None:
    """Step 4: the tilts the chain could not place, against the reprojection of the aligned ones.

    The reprojection, at their angle, of all aligned tilts (which holds the parallax of a
    thick specimen) is searched around the shifts of their aligned neighbours; an
    ambiguous or weak peak fails the tilt.
    """
    retry = np.flatnonzero(s.use & ~s.reliable)
    if len(retry) == 0:
        return
    good = np.flatnonzero(s.ok)
    radius = s.search_radius_px()
    reproj = project_volume(s.matcher.volume(good, s.shifts_b, s.axis, s.angles), s.angles[retry],
                            n_detector_px=s.matcher.shape[1])
    rotated = s.matcher.rotated(retry, s.axis)
    rot = _rot_xy(s.axis)
    centres = []
    for i in retry:
        nearest = np.concatenate([good[good < i][-1:], good[good > i][:1]])
        centres.append((rot.T @ s.shifts_b[nearest].mean(axis=0)[::-1])[::-1])
    ncc_fit = s.matcher.measure(good, s.shifts_b, s.axis, s.angles)[1]
    corr = s.matcher.corr
    d, c, r = corr.match(corr.prepare(rotated), corr.prepare(reproj), centres_yx=np.array(centres),
                         radii_px=radius[retry])
    for k, i in enumerate(retry):
        near = good[np.argsort(np.abs(s.angles[good] - s.angles[i]))[:4]]
        typical = float(np.median(ncc_fit[np.searchsorted(good, near)]))
        if r[k] >= s.min_peak_ratio and c[k] >= min_relative_correlation * typical:
            s.shifts_b[i], s.ok[i] = (rot @ d[k][::-1])[::-1], True
        else:
            s.failed[int(i)] = (f"{ALIGNMENT_FAILED} (correlation {c[k]:.2f} with the reprojection of the "
                                f"others, typical {typical:.2f}, peak ratio {r[k]:.2f})")


def _consistency_passes(s: _State, *, n_iterations: int, fit_axis: bool) -> None:
    """Step 5: rounds of the 3D-feature model on the aligned tilts.

    The model corrects what neighbour correlations cannot see (e.g. the chain following
    gold on one side of the series and other structure on the other). With the shifts
    now refined, the axis is measured once more in the same fit; a correction beyond two
    standard errors is taken (the chain's shifts, made with the axis still off, bias the
    first estimates low).
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
                   min_ratio: float) -> None:
    """Step 5: the consistency passes and, with gold, the re-placement of tilts by the beads.

    With gold (found by the neighbour pass's centring), the beads of the reconstruction
    place every tilt (:func:`_feature_placements`): an outer run of tilts far from where
    they put them is re-placed, with the tilts the chain placed through them, and the
    passes run again, at most ``n_rounds`` times; still off after the last: failed.
    """
    gold_layers = s.geometry.method.startswith("gold")
    n_rounds = int(n_rounds) if gold_layers else 0
    before_rounds = None  # shifts and axis after the first passes, restored when the beads are not used
    for n_round in range(1 + n_rounds):
        _consistency_passes(s, n_iterations=n_iterations, fit_axis=fit_axis)
        if not gold_layers:
            break
        idx = np.flatnonzero(s.ok)
        placement, ratio = _feature_placements(s.matcher, s.angles, idx, s.shifts_b, s.axis,
                                               radius_px=s.search_radius_px(), n_features=10, min_strength=0.1,
                                               feature_radius_px=4.0)
        far = np.hypot(*(placement - s.shifts_b[idx]).T)
        agree = far <= max_offset_px
        off = _outer_runs(~agree & (ratio >= min_ratio), agree, s.nominal[idx])
        # The beads judge only when the reconstruction holds them where the tilts near 0°
        # and most others have them; else (alignment broken elsewhere) they are not used,
        # and what the rounds did is undone.
        core = np.abs(s.nominal[idx]) <= 15.0
        if off[core].any() or off.sum() > len(idx) / 4:
            if before_rounds is not None:
                s.shifts_b, s.axis = before_rounds
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


def _fix_gauge(s: _State, kept: np.ndarray) -> None:
    """The tilt of ``kept`` nearest 0° keeps zero displacement (the field the operator chose).

    The x translation of the tomogram (``cos``) and its y translation restore it.
    """
    a = np.deg2rad(s.axis)
    across, along = np.array([np.sin(a), np.cos(a)]), np.array([np.cos(a), -np.sin(a)])
    start = int(np.flatnonzero(kept)[np.argmin(np.abs(s.nominal[kept]))])
    cos_f = np.cos(np.deg2rad(s.final_angles))
    s.shifts_b = (s.shifts_b - (s.shifts_b[start] @ across) * (cos_f / cos_f[start])[:, None] * across[None, :]
                  - (s.shifts_b[start] @ along) * along[None, :])


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


def _model_residuals(s: _State, idx: np.ndarray, fit: FeatureFit) -> None:
    """Residuals of the tilts ``idx`` the 3D-feature model ``fit`` measured: its correction and scatter."""
    if fit.n_features >= 3:
        model = np.sqrt((fit.shift_corrections_uv**2).sum(axis=1) + np.nan_to_num(fit.rms_px) ** 2)
        s.residual_b[idx] = np.where(fit.measured, model, s.residual_b[idx])


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


def _assembled(s: _State, *, pixel_size_angstrom: float, tilt_axis_angle_deg: float,
               max_centring_uncertainty_angstrom: float) -> TiltSeriesAlignment:
    """The result: failures into the reasons, shifts scaled back to the input pixels."""
    reasons = s.reasons
    for i, why in s.failed.items():
        reasons[i] = why
    s.ok &= np.array([r == "" for r in reasons])
    s.ncc[~s.ok] = np.nan
    s.residual_b[~s.ok] = np.nan
    bin_yx, px_b, geometry = s.bin_yx, s.px_b, s.geometry
    shifts = s.shifts_b * bin_yx[None, :] - (bin_yx[None, :] - 1.0) / 2.0
    shifts[~s.use] = np.nan
    excluded = np.array([r != "" for r in reasons])
    return TiltSeriesAlignment(
        shifts_px=shifts, tilt_axis_angle_deg=float(s.axis), tilt_angles_deg=s.final_angles,
        tilt_angle_offset_deg=float(s.offset), residual_px=s.residual_b * float(bin_yx.mean()), correlation=s.ncc,
        excluded=excluded, exclusion_reason=tuple(reasons), pixel_size_angstrom=float(pixel_size_angstrom),
        alignment_pixel_size_angstrom=px_b, nominal_tilt_axis_angle_deg=float(tilt_axis_angle_deg),
        specimen_z_offset_angstrom=float(s.z_total_px * px_b),
        specimen_thickness_angstrom=float(geometry.thickness_px * px_b) if geometry is not None else float("nan"),
        centring_method=geometry.method if geometry is not None else "",
        specimen_z_uncertainty_angstrom=float(geometry.z_uncertainty_px * px_b) if geometry is not None else float("nan"),
        centring_warning=_centring_warning(geometry, px_b, max_centring_uncertainty_angstrom),
    )
