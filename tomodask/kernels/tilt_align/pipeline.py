"""The whole alignment, :func:`align_tilt_series`: the stages of :mod:`.state`, :mod:`.placement`
and :mod:`.failures` in the order of the steps of :mod:`tomodask.kernels.tilt_align`, and the
result assembled from their state.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from tomodask.kernels.tilt_align.failures import (
    _far_below_centre_warning,
    _final_axis,
    _links_and_recovery,
    _low_signal_warning,
    _replacement_rounds,
    _residual_warning,
    _residuals_and_failures,
    _weak_gold_series_warning,
)
from tomodask.kernels.tilt_align.placement import (
    _beads_finding,
    _centre_specimen,
    _coarse_shifts_and_axis,
    _global_passes,
    _neighbour_pass,
    _second_chance,
)
from tomodask.kernels.tilt_align.result import TiltSeriesAlignment
from tomodask.kernels.tilt_align.sides import _sides_at_one_height
from tomodask.kernels.tilt_align.specimen import _centring_warning
from tomodask.kernels.tilt_align.state import _centre, _prepared, _self_agreement, _started, _State
from tomodask.kernels.tilt_align.weak_tilts import _weak_tilts_searched_again


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
    min_side_height_offset_px: float = 4.0,
    max_side_zero_fraction: float = 0.25,
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
    max_weak_relative_correlation: float = 0.75,
    min_weak_correlation_gain: float = 1.5,
    min_neighbour_correlation_gain: float = 0.005,
    n_weak_search_rounds: int = 3,
    max_residual_px: float = 1.0,
    min_check_correlation: float = 0.15,
    checked_tilt_deg: float = 30.0,
    min_gold_check_correlation: float = 0.25,
    min_central_relative_correlation: float = 0.2,
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
        When the common lines' best angle lies on the edge of their search, the whole
        alignment is made again from the nominal axis and from half the search either
        side of it (without common lines), and of the four the one whose usable tilts
        correlate best with their leave-one-out reprojections is kept (on 88 held-out
        simulated series it ran on 4: two kept tilts 3.7 and 37.7 px off, the latter
        silently, and one 0.9 px off came out within 1.5 px, the axis within 0.26°; the
        fourth stays broken and reported).
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
    min_side_height_offset_px, max_side_zero_fraction
        After the neighbour pass, the tilts below the one nearest 0° are moved by
        ``dz sin(theta)`` across the axis when the features of their reconstruction lie
        ``dz`` (at least ``min_side_height_offset_px`` alignment pixels) away in height
        from those of the tilts above it and the z-correlation of the two
        reconstructions' energies at zero offset is below ``max_side_zero_fraction`` of
        its peak (:mod:`~tomodask.kernels.tilt_align.sides`: each side's chain locked onto
        another bead layer). Measured on simulated series: -0.06 to 0.00 where the sides
        had locked onto different layers, 0.95-1.0 on right gold series, 0.59-0.82 without
        gold (offsets of 8-18 px from the structure, not applied).
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
        round is reported as ``"alignment failed (...)"`` and excluded; so is a tilt the
        second chance placed by the reprojection of the others when the beads' best peak
        (clear or not) is more than ``max_feature_placement_offset_px`` away. Before the
        global passes, the tilts that neither the chain nor the reprojection of the
        others could place are searched the same way (around their neighbours' shifts):
        a peak at least ``min_feature_placement_peak_ratio`` times the next best places
        them.
    max_weak_relative_correlation, min_weak_correlation_gain, min_neighbour_correlation_gain, n_weak_search_rounds
        With gold, after the bead re-placement rounds of the global passes (before the
        beads' findings are reported): a kept tilt whose leave-one-out correlation is
        below ``max_weak_relative_correlation`` times the median of the 4 aligned tilts
        nearest in angle (and which is not beside a gap of more than 1.5 steps) is searched
        in the reprojection of the others, as widely as the chain's links, and moved there
        when its correlation rises at least ``min_weak_correlation_gain`` times and its 4
        nearest tilts' correlations by at least ``min_neighbour_correlation_gain`` on
        average (:mod:`~tomodask.kernels.tilt_align.weak_tilts`); rounds, at most
        ``n_weak_search_rounds``, until none moves, then the consistency passes once more
        and the beads judge again.
        Tilts still moved in the last round are named in ``alignment_warning``. Measured on
        held-out simulated gold series: wrong tilts 0.01-0.12 (their neighbours 0.3-0.5)
        rise to 0.18-0.43 with their neighbours' by 0.006-0.036; moves that fit only the one
        tilt better change the neighbours' by -0.015 to +0.002 (and by +0.006 beside a gap,
        where no tilt is searched).
    max_residual_px
        Kept tilts whose residual (``residual_px``) exceeds this many alignment pixels
        are named in ``alignment_warning`` (kept: no check could say they are wrong).
    min_check_correlation, checked_tilt_deg
        Without gold, when the kept tilts correlate with their leave-one-out
        reprojections at a median below ``min_check_correlation``, ``alignment_warning``
        says that the alignment could not be checked and names the kept tilts beyond
        ``checked_tilt_deg`` (the tiny simulated preset without gold, 384² at 2.5 Å
        aligned at 7.5 Å, 1000 Å of ice, correlates at 0.09-0.11, its axis ends 0.1-1.5°
        off and 6 of 12 seeds keep tilts 3-12 px off, mostly beyond 30°; 41-tilt series
        without gold at 12 Å correlate at 0.21-0.23, with gold at 0.39-0.55).
    min_gold_check_correlation
        With gold, a median leave-one-out correlation of the kept tilts below this is
        reported in ``alignment_warning`` as a likely broken alignment (simulated gold
        series that align: 0.28-0.62, the lowest a 3072 Å field at 24 Å whose slab was
        not found; broken ones seen at 0.17-0.21).
    min_central_relative_correlation
        When at least 3 kept tilts correlate with their leave-one-out reprojections below
        this fraction of the median of the kept tilts within 15° of 0°, ``alignment_warning``
        names them (held-out simulated series: at most one right tilt below 0.2 in a
        series; broken ones had 3-13 wrong tilts below it, one with no other finding).

    Returns
    -------
    TiltSeriesAlignment

    Raises
    ------
    ValueError
        With fewer than three usable tilts, or mismatched per-tilt arrays.
    """
    prepared = _prepared(images_tyx, tilt_angles_deg, pixel_size_angstrom=pixel_size_angstrom,
                         tilt_axis_angle_deg=tilt_axis_angle_deg,
                         alignment_pixel_size_angstrom=alignment_pixel_size_angstrom,
                         specimen_thickness_angstrom=specimen_thickness_angstrom, motion_px=motion_px,
                         ctf_fit_resolution_angstrom=ctf_fit_resolution_angstrom, user_excluded=user_excluded,
                         estimate_tilt_angle_offset=estimate_tilt_angle_offset, lowpass_angstrom=lowpass_angstrom,
                         highpass_angstrom=highpass_angstrom, ice_mean_free_path_angstrom=ice_mean_free_path_angstrom,
                         max_shift_fraction=max_shift_fraction, min_peak_ratio=min_peak_ratio)
    search_weak_tilts = partial(_weak_tilts_searched_again, max_relative_correlation=max_weak_relative_correlation,
                                min_gain=min_weak_correlation_gain, min_neighbour_gain=min_neighbour_correlation_gain,
                                n_rounds=n_weak_search_rounds)

    def aligned_from(start_deg: float, search_deg: float) -> _State:
        """Steps 2-7 on a fresh state from step 1's, the axis starting at ``start_deg``."""
        s = _started(prepared, start_deg)
        _coarse_shifts_and_axis(s, refine_tilt_axis=refine_tilt_axis, tilt_axis_search_deg=search_deg)
        _neighbour_pass(s)
        if _sides_at_one_height(s, np.flatnonzero(s.ok), min_offset_px=min_side_height_offset_px,
                                max_zero_fraction=max_side_zero_fraction):
            _centre(s, np.flatnonzero(s.ok), slope=False)
        _second_chance(s, min_relative_correlation=min_relative_correlation,
                       min_bead_ratio=min_feature_placement_peak_ratio)
        left, why = _global_passes(s, n_iterations=n_projection_matching_iterations, fit_axis=refine_tilt_axis,
                                   n_rounds=n_feature_placement_rounds, max_offset_px=max_feature_placement_offset_px,
                                   min_ratio=min_feature_placement_peak_ratio, search_weak_tilts=search_weak_tilts)
        _centre_specimen(s, center_specimen=center_specimen, estimate_tilt_angle_offset=estimate_tilt_angle_offset)
        _beads_finding(s, left, why, max_offset_px=max_feature_placement_offset_px,
                       min_ratio=min_feature_placement_peak_ratio)
        _residuals_and_failures(s, min_relative_correlation=min_relative_correlation)
        if s.geometry is None or not s.geometry.method.startswith("gold"):
            recovered = _links_and_recovery(s, min_link_peak_ratio=min_link_peak_ratio,
                                            min_link_relative_correlation=min_link_relative_correlation,
                                            recovery_tolerance_angstrom=recovery_tolerance_angstrom,
                                            min_recovery_peak_ratio=min_recovery_peak_ratio)
            replaced = _replacement_rounds(s, max_correction_angstrom=max_feature_correction_angstrom,
                                           n_rounds=n_replacement_rounds)
            _final_axis(s, refine_tilt_axis=refine_tilt_axis, recovered=recovered, replaced=replaced)
            _low_signal_warning(s, min_correlation=min_check_correlation, central_deg=checked_tilt_deg)
        else:
            _weak_gold_series_warning(s, min_correlation=min_gold_check_correlation)
        _far_below_centre_warning(s, min_relative_correlation=min_central_relative_correlation, min_tilts=3,
                                  central_deg=15.0)
        _residual_warning(s, max_residual_px=max_residual_px)
        return s

    s = aligned_from(tilt_axis_angle_deg, tilt_axis_search_deg)
    if refine_tilt_axis and not s.axis_bracketed:
        # The common lines did not bracket their maximum: align again from three starting
        # axes over the search range and keep what agrees best with itself.
        starts = tilt_axis_angle_deg + 0.5 * tilt_axis_search_deg * np.array([-1.0, 0.0, 1.0])
        s = max([s, *(aligned_from(a, 0.0) for a in starts)], key=_self_agreement)
    return _assembled(s, pixel_size_angstrom=pixel_size_angstrom, tilt_axis_angle_deg=tilt_axis_angle_deg,
                      max_centring_uncertainty_angstrom=max_centring_uncertainty_angstrom)


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
        alignment_warning=s.alignment_warning,
    )
