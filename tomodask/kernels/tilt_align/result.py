"""The result of :func:`tomodask.kernels.tilt_align.align_tilt_series`, and the per-tilt error
of its shifts against a known truth once what no projection can fix is removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TiltSeriesAlignment:
    """Result of :func:`~tomodask.kernels.tilt_align.align_tilt_series` (conventions: :mod:`tomodask.kernels.geometry`).

    Attributes
    ----------
    shifts_px
        ``(t, 2)`` displacements ``(dy, dx)`` of each tilt's content, input pixels (NaN
        for tilts excluded before alignment). The rotation centre they imply is the
        specimen's mid-plane (see ``specimen_z_offset_angstrom``).
    tilt_axis_angle_deg
        Refined tilt-axis angle, counter-clockwise from Y.
    tilt_angles_deg
        ``(t,)`` refined tilt angles: the given ones plus ``tilt_angle_offset_deg``.
    tilt_angle_offset_deg
        Offset added to the given angles so that the specimen slab is level (0 when not
        estimated).
    residual_px
        ``(t,)`` after the final pass, how far (input pixels) each tilt still is from
        the 3D-feature model of :func:`~tomodask.kernels.tilt_align.refine_with_features`: the correction a further
        round would make (unshrunk) and the rms scatter of its features about the model,
        added in quadrature (IMOD ``tiltalign``'s residual, for patches of structure);
        for a tilt where no feature was measured, the distance to the correlation peak
        with its leave-one-out reprojection. A consistency measure: it does not see
        errors that keep the series consistent (e.g. a wrong specimen height). NaN for
        excluded tilts.
    correlation
        ``(t,)`` normalised correlation of each tilt with its leave-one-out reprojection.
    excluded
        ``(t,)`` bool, True for tilts to leave out of reconstruction.
    exclusion_reason
        ``(t,)`` reasons (``""`` for kept tilts), see
        :data:`tomodask.kernels.tilt_exclusion.EXCLUSION_REASONS`.
    pixel_size_angstrom, alignment_pixel_size_angstrom
        Input pixel size and the binned pixel size alignment worked at.
    nominal_tilt_axis_angle_deg
        The starting tilt-axis angle.
    specimen_z_offset_angstrom
        Height of the specimen's mid-plane above the rotation centre of the aligned
        correlation chain, before centring (the shifts include the correction).
    specimen_thickness_angstrom
        Thickness of the specimen as the centring step saw it (NaN: unknown).
    centring_method
        How the mid-plane was found (:class:`~tomodask.kernels.tilt_align.SpecimenGeometry` ``method``; ``""`` when
        centring was off).
    specimen_z_uncertainty_angstrom
        Standard error of the mid-plane (0 with gold, where it is a fraction of a voxel;
        infinite when not found; NaN when centring was off).
    centring_warning
        Non-empty when the volume may not be centred on the specimen: the mid-plane was
        not found (the rotation centre stays on the correlation chain's, the strongest
        layer), or found from the structure alone with a standard error above
        ``max_centring_uncertainty_angstrom``.
    alignment_warning
        Non-empty when tilts may be placed wrongly but were kept (names them): with gold,
        the beads of the reconstruction put them elsewhere, where the beads could not be
        trusted to re-place them; or their residuals exceed ``max_residual_px``; or,
        without gold, the signal was too weak to check the high tilts
        (``min_check_correlation``).
    """

    shifts_px: np.ndarray
    tilt_axis_angle_deg: float
    tilt_angles_deg: np.ndarray
    tilt_angle_offset_deg: float
    residual_px: np.ndarray
    correlation: np.ndarray
    excluded: np.ndarray
    exclusion_reason: tuple[str, ...]
    pixel_size_angstrom: float
    alignment_pixel_size_angstrom: float
    nominal_tilt_axis_angle_deg: float
    specimen_z_offset_angstrom: float = 0.0
    specimen_thickness_angstrom: float = float("nan")
    centring_method: str = ""
    specimen_z_uncertainty_angstrom: float = float("nan")
    centring_warning: str = ""
    alignment_warning: str = ""


def gauge_free_residuals_px(
    shifts_px: np.ndarray,
    truth_px: np.ndarray,
    tilt_angles_deg: np.ndarray,
    *,
    tilt_axis_angle_deg: float,
    fit: np.ndarray | None = None,
) -> np.ndarray:
    """Per-tilt shift error once a rigid translation of the specimen, fitted on some tilts, is removed.

    Parameters
    ----------
    shifts_px, truth_px
        ``(t, 2)`` estimated and true displacements ``(dy, dx)``.
    tilt_angles_deg
        ``(t,)`` true tilt angles.
    tilt_axis_angle_deg
        True tilt-axis angle.
    fit
        ``(t,)`` bool, tilts the translation is fitted on (default: all).

    Returns
    -------
    ndarray
        ``(t,)`` error lengths of every tilt after the least-squares fit on ``fit`` of what
        no projection data can fix: a translation ``(X, Y, Z)`` of the specimen, which
        moves tilt ``theta``'s image by ``Y`` along the axis and ``X cos(theta) + Z
        sin(theta)`` across it (``Z`` is the height of the rotation centre, ``X`` and
        ``Y`` move the tomogram in its plane). A shift common to all tilts across the axis
        is not of that form (it misplaces the rotation axis) and stays in the error.
    """
    d = np.asarray(shifts_px, dtype=np.float64) - np.asarray(truth_px, dtype=np.float64)
    n = len(d)
    fit = np.ones(n, bool) if fit is None else np.asarray(fit, bool)
    a = np.deg2rad(tilt_axis_angle_deg)
    across = np.array([np.sin(a), np.cos(a)])  # (dy, dx) unit vector across the axis
    along = np.array([np.cos(a), -np.sin(a)])
    theta = np.deg2rad(np.asarray(tilt_angles_deg, dtype=np.float64))
    design = np.stack([np.broadcast_to(along, (n, 2)), np.cos(theta)[:, None] * across,
                       np.sin(theta)[:, None] * across], axis=-1)  # (t, 2, 3)
    coef, *_ = np.linalg.lstsq(design[fit].reshape(-1, 3), d[fit].ravel(), rcond=None)
    r = d - design @ coef
    return np.hypot(r[:, 0], r[:, 1])


def gauge_free_shift_error_px(
    shifts_px: np.ndarray,
    truth_px: np.ndarray,
    tilt_angles_deg: np.ndarray,
    *,
    tilt_axis_angle_deg: float,
    use: np.ndarray | None = None,
) -> np.ndarray:
    """Per-tilt shift error of some tilts once the parts no projection data can fix are removed.

    Parameters
    ----------
    shifts_px, truth_px, tilt_angles_deg, tilt_axis_angle_deg
        As in :func:`gauge_free_residuals_px`.
    use
        ``(t,)`` bool, tilts to compare and to fit on (default: all).

    Returns
    -------
    ndarray
        ``(n_used,)`` error lengths of the ``use`` tilts after removing the rigid
        translation of the specimen fitted on them (:func:`gauge_free_residuals_px`).
    """
    use = np.ones(len(shifts_px), bool) if use is None else np.asarray(use, bool)
    return gauge_free_residuals_px(shifts_px, truth_px, tilt_angles_deg, tilt_axis_angle_deg=tilt_axis_angle_deg,
                                   fit=use)[use]
