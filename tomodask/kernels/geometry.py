"""Geometry of a tilt-series: the one place where axes and signs are defined.

Every reader, kernel, simulator and exporter in tomodask follows these conventions.
They are those of SerialEM and IMOD unless said otherwise.

Array axes
    Images are ``(y, x)`` arrays, stacks ``(t, y, x)``, volumes ``(z, y, x)``.
    Row index is y, column index is x. TIFF rows and MRC rows map to array rows as
    stored (no flip); note that IMOD's ``tif2mrc`` flips Y, so an MRC made by IMOD from
    a TIFF is the upside-down of ours.
Image coordinates
    Positions are measured from the image centre ``((ny - 1) / 2, (nx - 1) / 2)`` in
    pixels, x along columns, y along rows. Angles in the image plane are
    counter-clockwise in this (x, y) frame, as IMOD displays an MRC (y up).
Tilt-axis angle (``tilt_axis_angle_deg``)
    Angle of the tilt axis counter-clockwise from the image Y axis (SerialEM's
    ``Tilt axis angle`` in the mdoc ``[T = ...]`` line, IMOD's rotation angle). The
    axis direction in (x, y) is ``(-sin a, cos a)``.
Specimen frame and tilt
    Specimen coordinates (x_s, y_s, z_s) in Å: y_s along the tilt axis, z_s along the
    beam at zero tilt, pointing toward the electron source. Tilting by ``theta``
    (``tilt_angles_deg``) maps a point to ``u = x_s cos(theta) + z_s sin(theta)``
    (perpendicular to the axis, in the image plane), ``v = y_s`` (along the axis) and
    height ``h = -x_s sin(theta) + z_s cos(theta)`` toward the source. The image
    position is the (u, v) frame rotated by the tilt-axis angle:
    ``x = u cos(a) - v sin(a)``, ``y = u sin(a) + v cos(a)``.
Shifts
    ``shifts_px`` given by the simulator and returned by alignment kernels are
    *displacements*: the observed image is the ideal one moved by ``(dy, dx)``:
    ``observed(r) = ideal(r - shift)``. The correction applied to align is the
    negative. IMOD ``.xf`` files hold corrections (see :mod:`tomodask.io.imod`).
Defocus
    ``defocus_angstrom`` is positive for underfocus (RELION, CTFFIND). Astigmatism:
    ``defocus_u_angstrom >= defocus_v_angstrom`` and ``astigmatism_angle_deg`` is the
    angle of the U (larger defocus) direction counter-clockwise from the image X axis.
    A point at height ``h`` (toward the source) is at defocus ``defocus + h``, so in a
    tilted image the defocus at image position (x, y) of the specimen mid-plane is
    ``defocus_center - u * sin(theta) * pixel_size`` with u as above.
"""

from __future__ import annotations

import numpy as np


def tilt_axis_direction(tilt_axis_angle_deg: float) -> tuple[float, float]:
    """Unit vector of the tilt axis in image coordinates.

    Parameters
    ----------
    tilt_axis_angle_deg
        Tilt-axis angle, counter-clockwise from the image Y axis.

    Returns
    -------
    (float, float)
        ``(x, y)`` components of the axis direction.
    """
    a = np.deg2rad(tilt_axis_angle_deg)
    return float(-np.sin(a)), float(np.cos(a))


def specimen_to_image(
    points_xyz_angstrom: np.ndarray,
    tilt_angle_deg: float,
    tilt_axis_angle_deg: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project specimen points into a tilted image.

    Parameters
    ----------
    points_xyz_angstrom
        ``(n, 3)`` specimen coordinates (x_s, y_s, z_s) in Å, origin at the specimen centre.
    tilt_angle_deg
        Specimen tilt angle.
    tilt_axis_angle_deg
        Tilt-axis angle in the image, counter-clockwise from Y.

    Returns
    -------
    x_angstrom, y_angstrom, height_angstrom
        Image coordinates from the image centre, and height toward the source.
    """
    p = np.atleast_2d(np.asarray(points_xyz_angstrom, dtype=np.float64))
    t = np.deg2rad(tilt_angle_deg)
    a = np.deg2rad(tilt_axis_angle_deg)
    u = p[:, 0] * np.cos(t) + p[:, 2] * np.sin(t)
    v = p[:, 1]
    h = -p[:, 0] * np.sin(t) + p[:, 2] * np.cos(t)
    x = u * np.cos(a) - v * np.sin(a)
    y = u * np.sin(a) + v * np.cos(a)
    return x, y, h


def image_to_axis_frame(
    x: np.ndarray, y: np.ndarray, tilt_axis_angle_deg: float
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate image coordinates into the (u, v) frame of the tilt axis.

    Parameters
    ----------
    x, y
        Image coordinates from the centre (any unit).
    tilt_axis_angle_deg
        Tilt-axis angle, counter-clockwise from Y.

    Returns
    -------
    u, v
        ``u`` perpendicular to the axis, ``v`` along it (same unit as the input).
    """
    a = np.deg2rad(tilt_axis_angle_deg)
    u = x * np.cos(a) + y * np.sin(a)
    v = -x * np.sin(a) + y * np.cos(a)
    return u, v


def local_defocus_angstrom(
    defocus_center_angstrom: float,
    x_px: np.ndarray,
    y_px: np.ndarray,
    *,
    pixel_size_angstrom: float,
    tilt_angle_deg: float,
    tilt_axis_angle_deg: float,
) -> np.ndarray:
    """Defocus of the specimen mid-plane at image positions of a tilted image.

    Parameters
    ----------
    defocus_center_angstrom
        Defocus at the image centre (underfocus positive).
    x_px, y_px
        Image positions from the image centre, in pixels.
    pixel_size_angstrom
        Pixel size.
    tilt_angle_deg, tilt_axis_angle_deg
        Tilt geometry.

    Returns
    -------
    ndarray
        Defocus in Å at each position.
    """
    u, _ = image_to_axis_frame(x_px, y_px, tilt_axis_angle_deg)
    return defocus_center_angstrom - u * pixel_size_angstrom * np.sin(np.deg2rad(tilt_angle_deg))
