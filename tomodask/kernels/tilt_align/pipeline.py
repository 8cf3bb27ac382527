"""The whole alignment, :func:`align_tilt_series`: the steps of :mod:`tomodask.kernels.tilt_align`
in order.
"""

from __future__ import annotations

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
from tomodask.kernels.tilt_align.specimen import _centring_warning, specimen_geometry
from tomodask.kernels.tilt_align.warp import _rot_xy, apply_alignment
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
    bin_yx = np.array([ny / by_, nx / bx_])
    px_b = float(pixel_size_angstrom * nx / bx_)
    binned = xp.zeros((n_t, by_, bx_), dtype=xp.float32)
    for i in np.flatnonzero(use):
        img = images_tyx[i].astype(xp.float32)
        binned[i] = fourier_crop(img / img.mean() - 1.0, (by_, bx_))
    lp_px, hp_px = max(lowpass_angstrom / px_b, 1.0), highpass_angstrom / px_b
    nz = int(np.clip(round(specimen_thickness_angstrom / px_b), 16, 1.5 * max(by_, bx_))) // 2 * 2
    ice_angstrom, intensity_offset_deg = ice_slab_from_intensity(
        images_tyx, angles, usable=use, mean_free_path_angstrom=ice_mean_free_path_angstrom)
    ice_px = ice_angstrom / px_b if np.isfinite(ice_angstrom) else None
    # Work with the angles that level the slab from the start (stretching and matching
    # are exact only with the true angles).
    nominal = angles
    prior_offset = intensity_offset_deg if estimate_tilt_angle_offset and np.isfinite(intensity_offset_deg) else 0.0
    angles = nominal + prior_offset
    sin_t = np.sin(np.deg2rad(angles))

    # Coarse shifts; tilt axis by common lines, then by the 3D-feature model.
    axis = float(tilt_axis_angle_deg)
    coarse_corr = _Correlator((by_, bx_), lowpass_px=lp_px, highpass_px=hp_px, xp=xp,
                              mask=_taper((by_, bx_), fraction=0.1, xp=xp))
    matcher = _Matcher(binned, lowpass_px=lp_px, highpass_px=hp_px, thickness_px=nz)
    thick_nz = int(min(2 * nz, 2 * max(by_, bx_)))

    def coarse(axis_deg: float):
        return coarse_align_shifts(binned, angles, tilt_axis_angle_deg=axis_deg, usable=use, lowpass_px=lp_px,
                                   highpass_px=hp_px, max_shift_fraction=max_shift_fraction,
                                   min_peak_ratio=min_peak_ratio)

    def features(idx: np.ndarray, shifts: np.ndarray, axis_deg: float, angles_used: np.ndarray,
                 *, fit_axis: bool) -> FeatureFit:
        aligned = matcher.aligned(idx, shifts, axis_deg)
        return refine_with_features(aligned, angles_used[idx], _wbp(aligned, angles_used[idx], thickness_px=nz),
                                    fit_axis=fit_axis)

    z_total_px = 0.0
    geometry = None
    model_fits: list[tuple[np.ndarray, FeatureFit]] = []

    def centre(idx: np.ndarray, *, slope: bool, parallax: bool = False) -> None:
        # Correlation follows the strongest layer: move the rotation centre to the mid-plane.
        nonlocal shifts_b, z_total_px, geometry
        aligned = matcher.aligned(idx, shifts_b, axis)
        volume = _wbp(aligned, angles[idx], thickness_px=thick_nz)
        known = 0.0 if slope and prior_offset != 0.0 else None
        k0 = int(np.argmin(np.abs(angles[idx])))
        found = None
        if parallax:
            fit = refine_with_features(aligned, angles[idx], _wbp(aligned, angles[idx], thickness_px=nz),
                                       fit_axis=False, shift_prior_px=100.0)
            found = (fit.positions_zyx, fit.strength) if len(fit.strength) >= 10 else None
            model_fits.append((idx, fit))
        geometry = specimen_geometry(volume, thickness_px=ice_px, estimate_slope=slope, slope_deg=known,
                                     image_yx=aligned[k0], image_tilt_angle_deg=float(angles[idx][k0]),
                                     features=found)
        z_total_px += geometry.z_center_px
        a = np.deg2rad(axis)
        shifts_b = shifts_b + geometry.z_center_px * sin_t[:, None] * np.array([np.sin(a), np.cos(a)])[None, :]

    shifts_b, coarse_ncc, _, reliable = coarse(axis)
    if refine_tilt_axis:
        if tilt_axis_search_deg > 0:
            ok = use & reliable
            axis, _ = refine_tilt_axis_angle(binned[ok], shifts_px=shifts_b[ok], tilt_axis_angle_deg=axis,
                                             search_range_deg=tilt_axis_search_deg, step_deg=1.0)
            shifts_b, coarse_ncc, _, reliable = coarse(axis)
        # The feature model needs the specimen inside its slab: centre first. Coarse shifts
        # are redone (and centred) whenever the axis has moved much since they were made.
        idx = np.flatnonzero(use & reliable)
        centre(idx, slope=False)
        axis_coarse = axis
        # The measured correction c(axis) falls with a slope (gain) below 1 when far off:
        # secant steps with the gain estimated from the last two.
        gain, last = 0.6, None
        for n in range(8):
            fit = features(idx, shifts_b, axis, angles, fit_axis=True)
            if fit.n_features < 3:
                break
            c = float(fit.axis_correction_deg)
            if last is not None and abs(axis - last[0]) > 0.1:
                gain = float(np.clip((last[1] - c) / (axis - last[0]), 0.3, 1.2))
            if n >= 2 and abs(c) < 0.02:
                break
            last = (axis, c)
            axis += float(np.clip(c / gain, -1.0, 1.0))
            shifts_b[idx] += matcher.to_raw(fit.shift_corrections_uv, axis)
            if abs(axis - axis_coarse) > 0.3:
                shifts_b, coarse_ncc, _, reliable = coarse(axis)
                idx = np.flatnonzero(use & reliable)
                z_total_px = 0.0
                centre(idx, slope=False)
                axis_coarse = axis
        # Neighbour correlations (next) need the chain's own centre, the strongest layer.
        shifts_b, coarse_ncc, _, reliable = coarse(axis)
        z_total_px = 0.0

    # Every reliable tilt once more against its two aligned neighbours (stretched, which
    # needs the chain's own centre).
    failed: dict[int, str] = {}
    ok = use & reliable
    start = int(np.flatnonzero(ok)[np.argmin(np.abs(nominal[ok]))])
    refined = shifts_b.copy()
    for i in np.flatnonzero(ok):
        good = np.flatnonzero(ok)
        sources = np.concatenate([good[good < i][-1:], good[good > i][:1]])
        if i == start or len(sources) == 0:
            continue
        reference = _stretched_reference(binned, angles, i, sources, shifts_b, tilt_axis_angle_deg=axis)
        d, _, _ = coarse_corr.match(coarse_corr.prepare(binned[i][None]), coarse_corr.prepare(reference[None]),
                                    centres_yx=shifts_b[i][None], radii_px=matcher.small_radius_px)
        refined[i] = d[0]
    shifts_b = refined
    centre(np.flatnonzero(ok), slope=False)
    gold_layers = geometry.method.startswith("gold")

    # Second chance for tilts the chain could not place: the reprojection, at their angle,
    # of all aligned tilts (which holds the parallax of a thick specimen) is the reference,
    # searched around the shifts of their aligned neighbours.
    retry = np.flatnonzero(use & ~reliable)
    if len(retry):
        good = np.flatnonzero(ok)
        radius = _search_radius_px(angles, min(by_, bx_), max_shift_fraction)
        volume = _wbp(matcher.aligned(good, shifts_b, axis), angles[good], thickness_px=nz)
        reproj = project_volume(volume, angles[retry], n_detector_px=bx_)
        rotated = apply_alignment(binned[retry], shifts_px=np.zeros((len(retry), 2)), tilt_axis_angle_deg=axis,
                                  order=1, fill="zero")
        rot = _rot_xy(axis)
        centres = []
        for i in retry:
            nearest = np.concatenate([good[good < i][-1:], good[good > i][:1]])
            centres.append((rot.T @ shifts_b[nearest].mean(axis=0)[::-1])[::-1])
        ncc_fit = matcher.measure(good, shifts_b, axis, angles)[1]
        d, c, r = matcher.corr.match(matcher.corr.prepare(rotated), matcher.corr.prepare(reproj),
                                     centres_yx=np.array(centres), radii_px=radius[retry])
        for k, i in enumerate(retry):
            near = good[np.argsort(np.abs(angles[good] - angles[i]))[:4]]
            typical = float(np.median(ncc_fit[np.searchsorted(good, near)]))
            if r[k] >= min_peak_ratio and c[k] >= min_relative_correlation * typical:
                shifts_b[i], ok[i] = (rot @ d[k][::-1])[::-1], True
            else:
                failed[int(i)] = (f"{ALIGNMENT_FAILED} (correlation {c[k]:.2f} with the reprojection of the "
                                  f"others, typical {typical:.2f}, peak ratio {r[k]:.2f})")

    # Global consistency: the 3D-feature model corrects what neighbour correlations cannot
    # see (e.g. the chain following gold on one side of the series and other structure on
    # the other).
    # With the shifts now refined, the axis is measured once more in the same fit; a
    # correction beyond two standard errors is taken (the chain's shifts, made with
    # the axis still off, bias the first estimates low).
    # With gold, the beads of the reconstruction place every tilt (step 5 of the module
    # docstring): tilts far from where they put them are re-placed, with the tilts the
    # chain placed through them, and the passes run again.
    n_rounds = int(n_feature_placement_rounds) if gold_layers else 0
    before_rounds = None  # shifts and axis after the first passes, restored when the beads are not used
    for n_round in range(1 + n_rounds):
        for _ in range(int(n_projection_matching_iterations)):
            idx = np.flatnonzero(ok)
            fit = features(idx, shifts_b, axis, angles, fit_axis=refine_tilt_axis)
            if fit.n_features < 3:
                break
            turn = fit.axis_correction_deg if abs(fit.axis_correction_deg) > 2 * fit.axis_standard_error_deg else 0.0
            axis += float(np.clip(turn, -1.0, 1.0))
            shifts_b[idx] += matcher.to_raw(fit.shift_corrections_uv, axis)
            if np.abs(fit.shift_corrections_uv).max() < 0.1 and turn == 0.0:
                break
        if not gold_layers:
            break
        idx = np.flatnonzero(ok)
        placement, ratio = _feature_placements(
            matcher, angles, idx, shifts_b, axis, radius_px=_search_radius_px(angles, min(by_, bx_), max_shift_fraction),
            n_features=10, min_strength=0.1, feature_radius_px=4.0)
        far = np.hypot(*(placement - shifts_b[idx]).T)
        agree = far <= max_feature_placement_offset_px
        off = _outer_runs(~agree & (ratio >= min_feature_placement_peak_ratio), agree, nominal[idx])
        # The beads judge only when the reconstruction holds them where the tilts near 0°
        # and most others have them; else (alignment broken elsewhere) they are not used,
        # and what the rounds did is undone.
        core = np.abs(nominal[idx]) <= 15.0
        if off[core].any() or off.sum() > len(idx) / 4:
            if before_rounds is not None:
                shifts_b, axis = before_rounds
            break
        if not off.any():
            break
        if n_round == 0:
            before_rounds = (shifts_b.copy(), axis)
        if n_round < n_rounds:
            shifts_b[idx] = _carried_outwards(shifts_b[idx], placement, off, agree, np.sin(np.deg2rad(angles[idx])),
                                              nominal[idx])
            continue
        for k in np.flatnonzero(off):
            failed[int(idx[k])] = (f"{ALIGNMENT_FAILED} (still {far[k] * px_b:.0f} Å from where the gold beads of "
                                   f"the reconstruction put it after {n_round} re-placements)")
            ok[idx[k]] = False

    offset = prior_offset
    if center_specimen:
        centre(np.flatnonzero(ok), slope=estimate_tilt_angle_offset, parallax=True)
        if estimate_tilt_angle_offset:
            offset -= geometry.slope_deg
    else:
        # Matching needed the specimen centred; give back the correlation chain's centre.
        a = np.deg2rad(axis)
        shifts_b = shifts_b - z_total_px * sin_t[:, None] * np.array([np.sin(a), np.cos(a)])[None, :]
        z_total_px, geometry = 0.0, None
    final_angles = nominal + offset

    def fix_gauge(kept: np.ndarray) -> None:
        # Gauge: the tilt nearest 0 degrees keeps zero displacement (the field the operator
        # chose); the x translation of the tomogram (cos) and its y translation restore it.
        nonlocal shifts_b
        a = np.deg2rad(axis)
        across, along = np.array([np.sin(a), np.cos(a)]), np.array([np.cos(a), -np.sin(a)])
        start = int(np.flatnonzero(kept)[np.argmin(np.abs(nominal[kept]))])
        cos_f = np.cos(np.deg2rad(final_angles))
        shifts_b = (shifts_b - (shifts_b[start] @ across) * (cos_f / cos_f[start])[:, None] * across[None, :]
                    - (shifts_b[start] @ along) * along[None, :])

    def final_model(idx: np.ndarray) -> FeatureFit:
        aligned = matcher.aligned(idx, shifts_b, axis)
        return refine_with_features(aligned, final_angles[idx], _wbp(aligned, final_angles[idx], thickness_px=nz),
                                    fit_axis=False, shift_prior_px=100.0)

    fix_gauge(ok)

    # Failure detection against leave-one-out reprojections; residuals: how far each tilt
    # still is from where the 3D-feature model (or, without features, its leave-one-out
    # reprojection) puts it.
    ncc = np.full(n_t, np.nan)
    residual_b = np.full(n_t, np.nan)
    for _ in range(2):
        idx = np.flatnonzero(ok)
        update, c, _ = matcher.measure(idx, shifts_b, axis, final_angles)
        ncc[idx] = c
        residual_b[idx] = np.hypot(update[:, 0], update[:, 1])
        typical = _neighbour_median(ncc, final_angles, idx)
        # Only tilts the neighbour chain could not place are judged by it: a tilt at the
        # end of the series, beyond a gap, has a poor leave-one-out reprojection.
        bad = (c < 0.5 * min_relative_correlation * typical) & ~reliable[idx]
        if not bad.any() or len(idx) - bad.sum() < 3:
            break
        for k in np.flatnonzero(bad):
            failed[int(idx[k])] = (f"{ALIGNMENT_FAILED} (correlation {c[k]:.2f} with its reprojection, "
                                   f"neighbours {typical[k]:.2f})")
            ok[idx[k]] = False
    if model_fits:
        # The model seen by the last centring (a change of height does not change it).
        idx, final = model_fits[-1]
    else:
        idx = np.flatnonzero(ok)
        final = final_model(idx)

    def model_residuals(idx: np.ndarray, fit: FeatureFit) -> None:
        if fit.n_features >= 3:
            model = np.sqrt((fit.shift_corrections_uv**2).sum(axis=1) + np.nan_to_num(fit.rms_px) ** 2)
            residual_b[idx] = np.where(fit.measured, model, residual_b[idx])

    model_residuals(idx, final)
    if geometry is None or not geometry.method.startswith("gold"):
        failed.update(_weak_links(binned, final_angles, nominal, np.flatnonzero(ok), shifts_b, axis, coarse_corr,
                                  radius_px=matcher.small_radius_px, min_peak_ratio=min_link_peak_ratio,
                                  min_relative_correlation=min_link_relative_correlation))
        check = _Correlator((by_, bx_), lowpass_px=2.0 * lp_px, highpass_px=hp_px, xp=xp, mask=matcher.corr.mask)
        recovered = _confirmed_by_reprojection(
            matcher, check, final_angles, nominal, ok & ~np.isin(np.arange(n_t), list(failed)), list(failed),
            shifts_b, axis, radius_px=max_shift_fraction[0] * min(by_, bx_),
            tolerance_px=recovery_tolerance_angstrom / px_b, min_peak_ratio=min_recovery_peak_ratio)
        for i in recovered:
            del failed[i]
            ok[i] = True
        # A confident wrong link (a clear peak on another layer of a thick specimen)
        # passes the link check, and the tilts beyond it follow it, so their
        # reprojections agree with them; the 3D-feature model of the kept tilts (features
        # placed by all of them) sees such a run off. Its unshrunk corrections re-place the
        # kept tilts, round after round, while one of them exceeds the tolerance (half of it
        # after the first round); a tilt still beyond it after the last round is excluded.
        kept = ok & ~np.isin(np.arange(n_t), list(failed))
        idx = np.flatnonzero(kept)
        tolerance_px = max_feature_correction_angstrom / px_b
        replaced = False
        for n in range(n_replacement_rounds + 1):
            fit = final_model(idx)
            size = np.hypot(*fit.shift_corrections_uv.T)
            if fit.n_features < 3 or size.max() <= (tolerance_px if n == 0 else tolerance_px / 2):
                break
            if n == n_replacement_rounds:
                for k in np.flatnonzero(size > tolerance_px):
                    failed[int(idx[k])] = (f"{ALIGNMENT_FAILED} (the 3D-feature model still moves it by "
                                           f"{size[k] * px_b:.0f} Å after {n} rounds of re-placement; no gold to "
                                           "place it)")
                break
            shifts_b[idx] += matcher.to_raw(fit.shift_corrections_uv, axis)
            fix_gauge(kept)
            replaced = True
        # The global passes measured the axis with tilts since excluded (runs placed
        # wrongly): once more on the kept tilts. Taken when it is more likely to help than
        # to hurt: for an unbiased estimate c of an error e with standard error s, taking
        # it leaves s^2 instead of e^2, and E[c^2] = e^2 + s^2, so beyond sqrt(2) s.
        kept = ok & ~np.isin(np.arange(n_t), list(failed))
        idx = np.flatnonzero(kept)
        fit = features(idx, shifts_b, axis, final_angles, fit_axis=True) if refine_tilt_axis else None
        turn = (fit is not None and fit.n_features >= 3
                and abs(fit.axis_correction_deg) > np.sqrt(2.0) * fit.axis_standard_error_deg)
        if turn:
            axis += float(np.clip(fit.axis_correction_deg, -1.0, 1.0))
            shifts_b[idx] += matcher.to_raw(fit.shift_corrections_uv, axis)
            fix_gauge(kept)
        if recovered or turn or replaced:
            update, c, _ = matcher.measure(idx, shifts_b, axis, final_angles)
            redo = np.isin(idx, recovered) | turn | replaced
            ncc[idx[redo]] = c[redo]
            residual_b[idx[redo]] = np.hypot(update[redo, 0], update[redo, 1])
        if turn or replaced:
            model_residuals(idx, final_model(idx))
    for i, why in failed.items():
        reasons[i] = why
    ok &= np.array([r == "" for r in reasons])
    ncc[~ok] = np.nan
    residual_b[~ok] = np.nan

    shifts = shifts_b * bin_yx[None, :] - (bin_yx[None, :] - 1.0) / 2.0
    shifts[~use] = np.nan
    excluded = np.array([r != "" for r in reasons])
    return TiltSeriesAlignment(
        shifts_px=shifts, tilt_axis_angle_deg=float(axis), tilt_angles_deg=final_angles,
        tilt_angle_offset_deg=float(offset), residual_px=residual_b * float(bin_yx.mean()), correlation=ncc,
        excluded=excluded, exclusion_reason=tuple(reasons), pixel_size_angstrom=float(pixel_size_angstrom),
        alignment_pixel_size_angstrom=px_b, nominal_tilt_axis_angle_deg=float(tilt_axis_angle_deg),
        specimen_z_offset_angstrom=float(z_total_px * px_b),
        specimen_thickness_angstrom=float(geometry.thickness_px * px_b) if geometry is not None else float("nan"),
        centring_method=geometry.method if geometry is not None else "",
        specimen_z_uncertainty_angstrom=float(geometry.z_uncertainty_px * px_b) if geometry is not None else float("nan"),
        centring_warning=_centring_warning(geometry, px_b, max_centring_uncertainty_angstrom),
    )
