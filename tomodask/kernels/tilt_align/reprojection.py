"""Weighted back-projection of aligned tilts, leave-one-out reprojections, and the matcher
that correlates each tilt with its reprojection (what the later steps of
:mod:`tomodask.kernels.tilt_align` share).
"""

from __future__ import annotations

import numpy as np

from tomodask.backend import get_array_module
from tomodask.kernels.projector import backproject, backprojection_matrix, project_volume
from tomodask.kernels.reconstruct import reconstruction_filter
from tomodask.kernels.tilt_align.correlate import _Correlator, _soft_disk, _taper
from tomodask.kernels.tilt_align.warp import _rot_xy, apply_alignment


def _ramp_filtered(aligned_tyx, tilt_angles_deg: np.ndarray, *, thickness_px: int, radial_cutoff: float):
    """Rows weighted for back-projection (ramp x angular interval, Gaussian roll-off)."""
    xp = get_array_module(aligned_tyx)
    n_t, ny, nx = aligned_tyx.shape
    n_pad = 2 * nx
    filt = reconstruction_filter(tilt_angles_deg, n_pad, weighting="ramp", thickness_px=thickness_px,
                                 radial_cutoff=radial_cutoff, radial_falloff=0.05, xp=xp)
    spec = xp.fft.rfft(aligned_tyx.astype(xp.float32), n=n_pad, axis=2)
    return xp.fft.irfft(spec * filt[:, None, :], n=n_pad, axis=2)[:, :, :nx].astype(xp.float32)


def leave_one_out_reprojections(
    aligned_tyx: np.ndarray,
    tilt_angles_deg: np.ndarray,
    *,
    thickness_px: int,
    radial_cutoff: float = 0.3,
    z_offset_px: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Reproject, at each tilt's angle, the reconstruction made from all other tilts.

    Parameters
    ----------
    aligned_tyx
        ``(t, y, x)`` aligned tilts (axis along y), zero-mean contrast.
    tilt_angles_deg
        ``(t,)`` tilt angles.
    thickness_px
        Thickness of the reconstructed slab, in pixels.
    radial_cutoff
        Low-pass of the weighting filter (cycles/px).
    z_offset_px
        Height of the slab centre above the rotation centre.

    Returns
    -------
    reprojections, volume
        ``(t, y, x)`` leave-one-out reprojections and the ``(z, y, x)`` reconstruction
        from all tilts.

    Notes
    -----
    With the back-projector ``B = [B_1 ... B_t]`` and filtered projections ``p_j``, the
    reprojection of tilt i from the others is ``B_i^T (B p - B_i p_i)``; the self-term
    ``B_i^T B_i p_i`` is a small banded ``(x, x)`` matrix per tilt.
    """
    xp = get_array_module(aligned_tyx)
    n_t, ny, nx = aligned_tyx.shape
    filtered = _ramp_filtered(aligned_tyx, tilt_angles_deg, thickness_px=thickness_px,
                              radial_cutoff=radial_cutoff)
    volume = backproject(filtered, tilt_angles_deg, thickness_px=thickness_px, z_offset_px=z_offset_px)
    reproj = project_volume(volume, tilt_angles_deg, n_detector_px=nx, z_offset_px=z_offset_px)
    mat = backprojection_matrix(tilt_angles_deg, n_detector_px=nx, shape_zx=(thickness_px, nx),
                                z_offset_px=z_offset_px, xp=xp)
    mat_csc = mat.tocsc()
    for i in range(n_t):
        block = mat_csc[:, i * nx:(i + 1) * nx]
        gram = (block.T @ block).tocsr()
        reproj[i] -= (gram @ filtered[i].T).T
    return reproj, volume


def _wbp(aligned_tyx, tilt_angles_deg: np.ndarray, *, thickness_px: int, radial_cutoff: float = 0.3):
    """Weighted back-projection ``(z, y, x)`` of an aligned stack (axis along y)."""
    filtered = _ramp_filtered(aligned_tyx, tilt_angles_deg, thickness_px=thickness_px, radial_cutoff=radial_cutoff)
    return backproject(filtered, tilt_angles_deg, thickness_px=thickness_px)


def _without_gauge(update_uv: np.ndarray, tilt_angles_deg: np.ndarray) -> np.ndarray:
    """Remove from ``(n, 2)`` corrections ``(du, dv)`` what only translates the tomogram.

    Along the axis: the mean (a y translation). Across it: the least-squares ``cos(theta)``
    and ``sin(theta)`` terms (x and z translations).
    """
    out = np.array(update_uv, dtype=np.float64)
    theta = np.deg2rad(np.asarray(tilt_angles_deg, dtype=np.float64))
    modes = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    if len(out) >= 3:
        coef, *_ = np.linalg.lstsq(modes, out[:, 0], rcond=None)
        out[:, 0] -= modes @ coef
    out[:, 1] -= out[:, 1].mean()
    return out


class _Matcher:
    """The binned stack, its masked correlator and slab: what the steps of the alignment share."""

    def __init__(self, binned_tyx, *, lowpass_px: float, highpass_px: float, thickness_px: int):
        self.xp = get_array_module(binned_tyx)
        self.binned = binned_tyx
        self.shape = tuple(binned_tyx.shape[1:])
        mask = _taper(self.shape, fraction=0.2, xp=self.xp) * _soft_disk(self.shape, radius_fraction=0.48, xp=self.xp)
        self.corr = _Correlator(self.shape, lowpass_px=lowpass_px, highpass_px=highpass_px, xp=self.xp, mask=mask)
        self.thickness_px = int(thickness_px)
        self.small_radius_px = max(3.0, 0.03 * min(self.shape))

    def aligned(self, idx, shifts, axis_deg: float):
        """The tilts ``idx`` undone of their shifts and rotated (axis along y)."""
        return apply_alignment(self.binned[idx], shifts_px=shifts[idx], tilt_axis_angle_deg=axis_deg, order=1,
                               fill="zero")

    def rotated(self, idx, axis_deg: float):
        """The tilts ``idx`` rotated (axis along y), their shifts not undone."""
        return apply_alignment(self.binned[idx], shifts_px=np.zeros((len(idx), 2)), tilt_axis_angle_deg=axis_deg,
                               order=1, fill="zero")

    def volume(self, idx, shifts, axis_deg: float, angles: np.ndarray):
        """Weighted back-projection ``(z, y, x)`` (this slab) of the tilts ``idx`` aligned with ``shifts``."""
        return _wbp(self.aligned(idx, shifts, axis_deg), angles[idx], thickness_px=self.thickness_px)

    def measure(self, idx, shifts, axis_deg: float, angles: np.ndarray):
        """Leave-one-out matching of the tilts ``idx``.

        Returns ``(n, 2)`` gauge-free corrections ``(du, dv)`` in the aligned frame,
        normalised correlations and peak ratios.
        """
        aligned = self.aligned(idx, shifts, axis_deg)
        reproj, _ = leave_one_out_reprojections(aligned, angles[idx], thickness_px=self.thickness_px)
        d, ncc, ratio = self.corr.match(self.corr.prepare(aligned), self.corr.prepare(reproj),
                                        centres_yx=np.zeros(2), radii_px=self.small_radius_px)
        return _without_gauge(d[:, ::-1], angles[idx]), ncc, ratio

    def to_raw(self, update_uv: np.ndarray, axis_deg: float) -> np.ndarray:
        """Aligned-frame ``(du, dv)`` to raw displacements ``(dy, dx)``."""
        return (update_uv @ _rot_xy(axis_deg).T)[:, ::-1]
