"""Geometry conventions of tomodask (array axes, tilt axis, tilt sign, shifts, defocus).

The text and the functions live in :mod:`tomodask.kernels.geometry`, so kernels can
use them without importing the rest of the package; this module re-exports them.
"""

from tomodask.kernels.geometry import (
    __doc__ as GEOMETRY,
)
from tomodask.kernels.geometry import (
    image_to_axis_frame,
    local_defocus_angstrom,
    specimen_to_image,
    tilt_axis_direction,
)

__doc__ = (__doc__ or "") + "\n" + (GEOMETRY or "")

__all__ = [
    "image_to_axis_frame",
    "local_defocus_angstrom",
    "specimen_to_image",
    "tilt_axis_direction",
]
