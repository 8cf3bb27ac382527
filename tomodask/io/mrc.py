"""Small MRC helpers: write and read volumes and stacks with the voxel size in the header.

Arrays are stored as they are in memory, ``(z, y, x)`` or ``(t, y, x)`` with row index y
(no flip; see :mod:`tomodask.kernels.geometry`). The voxel size goes to the header's
``voxel_size`` (Å), which IMOD, RELION and napari-mrcfile read. Image stacks are flagged
as stacks (``ispg = 0``), volumes as volumes (``ispg = 1``).
"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np

_MRC_DTYPES = (np.int8, np.int16, np.uint16, np.float32, np.complex64, np.float16, np.uint8)


def write_mrc(
    path: str | Path,
    data: np.ndarray,
    *,
    pixel_size_angstrom: float | tuple[float, float, float],
    stack: bool = False,
    overwrite: bool = True,
) -> Path:
    """Write a 2D image, a ``(t, y, x)`` stack or a ``(z, y, x)`` volume as MRC.

    Parameters
    ----------
    path
        Output file.
    data
        Array (numpy or cupy); float64 is stored as float32, other types MRC cannot hold
        raise ``TypeError``.
    pixel_size_angstrom
        Voxel size, one value or ``(x, y, z)`` as mrcfile orders it.
    stack
        Flag a 3D array as an image stack (tilt-series, movie) instead of a volume.
    overwrite
        Replace an existing file.

    Returns
    -------
    Path
        ``path``.
    """
    from tomodask.backend import to_numpy

    path = Path(path)
    arr = to_numpy(data)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    if arr.dtype.type not in _MRC_DTYPES:
        raise TypeError(f"MRC cannot store {arr.dtype}; convert to one of "
                        f"{[np.dtype(t).name for t in _MRC_DTYPES]} first")
    if arr.ndim not in (2, 3):
        raise ValueError(f"write_mrc takes a 2D or 3D array, got shape {arr.shape}")
    with mrcfile.new(path, overwrite=overwrite) as mrc:
        mrc.set_data(np.ascontiguousarray(arr))
        if arr.ndim == 3:
            if stack:
                mrc.set_image_stack()
            else:
                mrc.set_volume()
        mrc.voxel_size = pixel_size_angstrom
        mrc.update_header_stats()
    return path


def read_mrc(path: str | Path) -> tuple[np.ndarray, float]:
    """Read an MRC file and its pixel size.

    Parameters
    ----------
    path
        MRC file.

    Returns
    -------
    data, pixel_size_angstrom
        The array as stored (``(y, x)``, ``(t, y, x)`` or ``(z, y, x)``) and the voxel size
        along x in Å (0.0 when the header holds none).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no MRC file at {path}")
    with mrcfile.open(path, mode="r", permissive=False) as mrc:
        return np.array(mrc.data), float(mrc.voxel_size.x)
