"""The state the stages of :func:`~tomodask.kernels.tilt_align.align_tilt_series` share, how step 1
makes it (exclusion, binning, the slab from the intensity), and the moves several stages make on it:
the coarse chain, the 3D-feature model, centring on the specimen and the gauge.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace

import numpy as np

from tomodask.backend import get_array_module, to_numpy
from tomodask.kernels.fourier import fourier_crop
from tomodask.kernels.tilt_align.correlate import _Correlator, _search_radius_px, _taper, coarse_align_shifts
from tomodask.kernels.tilt_align.features import FeatureFit, refine_with_features
from tomodask.kernels.tilt_align.reprojection import _Matcher, _wbp
from tomodask.kernels.tilt_align.specimen import SpecimenGeometry, specimen_geometry
from tomodask.kernels.tilt_exclusion import find_bad_tilts, ice_slab_from_intensity

# A prior on each tilt's correction too weak to shrink it: the 3D-feature model's own corrections.
_UNSHRUNK_PRIOR_PX = 100.0
_SIDE_CORRELATION_RATIO = 2.0  # a single bead layer's other side is taken when its reprojections correlate this much better


@dataclass
class _State:
    """What the stages of the alignment share and update.

    Lengths are in alignment pixels; the stages are those of
    :func:`~tomodask.kernels.tilt_align.align_tilt_series`.

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
        The options of :func:`~tomodask.kernels.tilt_align.align_tilt_series` of that name.
    matcher, coarse_corr
        The leave-one-out matcher and the correlation chain's correlator.
    axis, axis_bracketed
        Current tilt-axis angle (degrees); False when the common lines' search did not
        bracket their maximum (step 3).
    shifts_b, reliable, ok
        ``(t, 2)`` current displacements ``(dy, dx)``; ``(t,)`` bool, tilts the chain placed
        reliably; tilts aligned (not failed).
    failed
        ``{tilt: reason}``, tilts excluded as failed.
    z_total_px, geometry, centring_model, other_side_taken
        Height the centring moved the rotation centre by, the last specimen geometry,
        ``(tilts, fit)`` of the 3D-feature model of the final centring (None before), and
        whether that centring took the other side of a single bead layer than the
        structure did (:func:`_side_by_reprojection`).
    offset, final_angles
        Tilt-angle offset and ``(t,)`` angles after centring.
    ncc, residual_b
        ``(t,)`` correlations with the leave-one-out reprojections and residuals.
    alignment_warning
        Non-empty when a check found tilts it could neither confirm nor re-place.
    placed_by_reprojection
        Tilts the second chance placed by the reprojection of the others (step 4).
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
    axis_bracketed: bool = True
    shifts_b: np.ndarray | None = None
    reliable: np.ndarray | None = None
    ok: np.ndarray | None = None
    failed: dict[int, str] = field(default_factory=dict)
    z_total_px: float = 0.0
    geometry: SpecimenGeometry | None = None
    centring_model: tuple[np.ndarray, FeatureFit] | None = None
    other_side_taken: bool = False
    offset: float = 0.0
    final_angles: np.ndarray | None = None
    ncc: np.ndarray | None = None
    residual_b: np.ndarray | None = None
    alignment_warning: str = ""
    placed_by_reprojection: np.ndarray = field(default_factory=lambda: np.zeros(0, int))

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


def _started(prepared: _State, axis_deg: float) -> _State:
    """A fresh state for steps 2-7: ``prepared``'s step-1 fields, the axis at ``axis_deg``.

    The binned stack and the other step-1 arrays are shared (no later step changes them);
    the exclusion reasons are copied (the result fills in the failures); every later
    field starts at its default.
    """
    step_1 = {f.name: getattr(prepared, f.name) for f in fields(_State)
              if f.default is MISSING and f.default_factory is MISSING}
    return _State(**{**step_1, "reasons": list(prepared.reasons), "axis": float(axis_deg)})


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
    is level when the intensity gave the tilt-angle offset); ``parallax`` (the final
    centring): the features' heights come from the unshrunk 3D-feature model (kept as
    ``centring_model``), and a single bead layer's side is checked by the reprojections
    (:func:`_side_by_reprojection`).
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
    if parallax:
        checked = _side_by_reprojection(s, idx, s.geometry)
        s.other_side_taken = checked.z_center_px != s.geometry.z_center_px
        s.geometry = checked
    s.z_total_px += s.geometry.z_center_px
    s.shifts_b = s.shifts_b + _height_term(s, s.geometry.z_center_px)


def _side_by_reprojection(s: _State, idx: np.ndarray, geometry: SpecimenGeometry) -> SpecimenGeometry:
    """With gold on one surface, the side of the bead layer whose slab the tilts ``idx`` agree with.

    The structure that tells the side can be too faint to see (a 4096 Å field at 32 Å:
    the two sides' energies within 10 %, the wrong one taken, the volume centred 1390 Å
    off). The slab of the leave-one-out reprojections holds the specimen only on the
    right side: there the tilts correlate with them far better (median 0.52 against 0.12
    there). The other side is taken when its median correlation is at least
    :data:`_SIDE_CORRELATION_RATIO` times this side's. (Measured once the alignment is
    done: while it is crude, the comparison misleads; where the slab of the
    reprojections is thick enough to hold much of the specimen either way, the two
    differ by a few per cent and the structure decides: 0.41 against 0.43 on the tiny
    preset, where the structure chose right.)
    """
    if not np.isfinite(geometry.other_side_z_px):
        return geometry
    medians = []
    for z in (geometry.z_center_px, geometry.other_side_z_px):
        _, c, _ = s.matcher.measure(idx, s.shifts_b + _height_term(s, z), s.axis, s.angles)
        medians.append(float(np.median(c)))
    if medians[1] < _SIDE_CORRELATION_RATIO * medians[0]:
        return geometry
    return replace(geometry, z_center_px=geometry.other_side_z_px, other_side_z_px=geometry.z_center_px)


def _self_agreement(s: _State) -> float:
    """Median correlation of every usable tilt with its leave-one-out reprojection.

    Taken over all usable tilts (the failed ones at their last shifts), so alignments
    that keep different tilts are compared on the same tilts.
    """
    idx = np.flatnonzero(s.use & np.isfinite(s.shifts_b).all(axis=1))
    return float(np.median(s.matcher.measure(idx, s.shifts_b, s.axis, s.final_angles)[1]))


def _coarse(s: _State) -> None:
    """Step 2: the correlation chain's shifts with the current axis (:func:`coarse_align_shifts`)."""
    s.shifts_b, _, _, s.reliable = coarse_align_shifts(
        s.binned, s.angles, tilt_axis_angle_deg=s.axis, usable=s.use, lowpass_px=s.lp_px, highpass_px=s.hp_px,
        max_shift_fraction=s.max_shift_fraction, min_peak_ratio=s.min_peak_ratio)


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


def _warn(s: _State, tilts: np.ndarray, finding: str) -> None:
    """Add to ``s.alignment_warning`` that ``tilts`` may be placed wrongly.

    ``finding`` says why, with ``{tilts}`` where their nominal angles are listed (without
    it, the finding is about the whole tilt-series).
    """
    named = "{tilts}" in finding
    advice = "check the tomogram" + (", or exclude those tilts by hand and process the tilt-series again" if named
                                     else "")
    warning = f"alignment uncertain: {finding.format(tilts=', '.join(f'{a:+.0f}' for a in s.nominal[tilts]))}; {advice}"
    s.alignment_warning = "; ".join(w for w in (s.alignment_warning, warning) if w)


def _model_residuals(s: _State, idx: np.ndarray, fit: FeatureFit) -> None:
    """Residuals of the tilts ``idx`` the 3D-feature model ``fit`` measured: its correction and scatter."""
    if fit.n_features >= 3:
        model = np.sqrt((fit.shift_corrections_uv**2).sum(axis=1) + np.nan_to_num(fit.rms_px) ** 2)
        s.residual_b[idx] = np.where(fit.measured, model, s.residual_b[idx])
