"""Affine warps of tilt images: the rotation and stretch matrices, and :func:`apply_alignment`,
which undoes each tilt's displacement and rotates the tilt axis onto Y in one interpolation.

Shifts follow :mod:`tomodask.kernels.geometry`: *displacements* ``(dy, dx)`` of each image's
content.
"""

from __future__ import annotations

import numpy as np

from tomodask.backend import get_array_module, scipy_ndimage, to_numpy

FILLS = ("mean", "zero")


def _rot_xy(angle_deg: float) -> np.ndarray:
    """2x2 counter-clockwise rotation acting on ``(x, y)`` column vectors."""
    a = np.deg2rad(angle_deg)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def _stretch_xy(tilt_axis_angle_deg: float, factor: float) -> np.ndarray:
    """Matrix scaling ``(x, y)`` by ``factor`` perpendicular to the axis, 1 along it."""
    r = _rot_xy(tilt_axis_angle_deg)
    return r @ np.diag([factor, 1.0]) @ r.T


def _xy_to_yx(m: np.ndarray) -> np.ndarray:
    """The same linear map written for ``(y, x)`` (row, column) vectors."""
    return m[::-1, ::-1].copy()


def _warp(image, matrix_xy: np.ndarray, shift_yx, *, output_shape_yx, order: int, cval: float):
    """``out(r') = image(M r' + s)`` with coordinates from each image's centre."""
    xp = get_array_module(image)
    ndi = scipy_ndimage(xp)
    m = _xy_to_yx(np.asarray(matrix_xy, dtype=np.float64))
    c_in = (np.asarray(image.shape, dtype=np.float64) - 1) / 2
    c_out = (np.asarray(output_shape_yx, dtype=np.float64) - 1) / 2
    offset = c_in + np.asarray(shift_yx, dtype=np.float64) - m @ c_out
    return ndi.affine_transform(image, xp.asarray(m), offset=tuple(float(o) for o in offset),
                                output_shape=tuple(int(n) for n in output_shape_yx), order=order,
                                mode="constant", cval=float(cval), prefilter=order > 1)


def apply_alignment(
    images_tyx: np.ndarray,
    *,
    shifts_px: np.ndarray,
    tilt_axis_angle_deg: float,
    output_shape_yx: tuple[int, int] | None = None,
    order: int = 3,
    fill: str = "mean",
) -> np.ndarray:
    """Undo each tilt's displacement and rotate the tilt axis onto the image Y axis.

    Parameters
    ----------
    images_tyx
        ``(t, y, x)`` raw tilt images, numpy or cupy.
    shifts_px
        ``(t, 2)`` displacements ``(dy, dx)`` of each image's content in pixels of
        ``images_tyx`` (as :func:`~tomodask.kernels.tilt_align.align_tilt_series` returns them, scaled to this
        binning).
    tilt_axis_angle_deg
        Tilt-axis angle, counter-clockwise from Y.
    output_shape_yx
        Shape of the aligned images (default: the input's). Centres map to centres.
    order
        Spline order of the one interpolation (1: linear, 3: cubic).
    fill
        Value outside the raw image: ``"mean"`` (each image's mean) or ``"zero"``.

    Returns
    -------
    ndarray
        ``(t, y', x')`` float32 aligned stack: ``aligned(r') = raw(R(a) r' + s)``, so a
        specimen feature on the tilt axis appears on the central column and the stack is
        ready for :func:`tomodask.kernels.reconstruct.reconstruct_tomogram`.
    """
    if fill not in FILLS:
        raise ValueError(f"fill={fill!r} is not one of {FILLS}")
    xp = get_array_module(images_tyx)
    n_t = images_tyx.shape[0]
    shifts = np.asarray(to_numpy(shifts_px), dtype=np.float64).reshape(-1, 2)
    if len(shifts) != n_t:
        raise ValueError(f"{n_t} images but {len(shifts)} shifts; give one (dy, dx) per tilt")
    out_shape = tuple(images_tyx.shape[1:]) if output_shape_yx is None else tuple(output_shape_yx)
    rot = _rot_xy(tilt_axis_angle_deg)
    out = xp.empty((n_t,) + out_shape, dtype=xp.float32)
    for i in range(n_t):
        img = images_tyx[i].astype(xp.float32)
        cval = float(img.mean()) if fill == "mean" else 0.0
        out[i] = _warp(img, rot, shifts[i], output_shape_yx=out_shape, order=order, cval=cval)
    return out
