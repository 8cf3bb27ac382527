"""Linear-interpolation back-projector and its exact adjoint, the forward projector.

The tilt axis is along the image Y axis (an aligned stack, see
:mod:`tomodask.kernels.geometry`), so every y row of every tilt image is a 1D projection
of the ``(z, x)`` slice of the volume at that y. A voxel at ``(z, x)`` (from the volume
centre ``(n - 1) / 2``) projects in the tilt at ``theta`` to the detector coordinate

    u = x cos(theta) + z sin(theta)

(``u`` from the detector centre). Back-projection samples each filtered projection at
``u`` by linear interpolation. For all tilts this is one sparse matrix ``B`` of shape
``(nz * nx, t * nu)`` with two entries per voxel and tilt; the same matrix serves every
y slice, so back-projection of a whole stack is the sparse-times-dense product
``B @ P`` with ``P`` of shape ``(t * nu, ny)``: each voxel adds two contiguous rows of
``ny`` values, which is fast on a CPU. The forward projection is ``B.T @ V``, the exact
adjoint, so the pair is suitable for iterative reconstruction and projection matching.

The matrix is built on the CPU (cached for repeated calls with the same geometry) and,
for cupy inputs, moved to the GPU as a ``cupyx.scipy.sparse`` matrix.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType

import numpy as np
import scipy.sparse

from tomodask.backend import get_array_module

#: y rows back-projected per sparse product (bounds the temporary memory).
_Y_CHUNK = 64


def _sparse_module(xp: ModuleType) -> ModuleType:
    """``scipy.sparse`` or ``cupyx.scipy.sparse`` to match the array module ``xp``."""
    if xp is np:
        return scipy.sparse
    import cupyx.scipy.sparse

    return cupyx.scipy.sparse


@lru_cache(maxsize=2)
def _backprojection_matrix_cached(
    tilt_angles_deg: tuple[float, ...],
    n_detector_px: int,
    shape_zx: tuple[int, int],
    z_offset_px: float,
) -> scipy.sparse.csr_matrix:
    nz, nx = shape_zx
    n_t = len(tilt_angles_deg)
    theta = np.deg2rad(np.asarray(tilt_angles_deg, dtype=np.float64))
    z = (np.arange(nz, dtype=np.float32) - np.float32((nz - 1) / 2 - z_offset_px))[:, None, None]
    x = (np.arange(nx, dtype=np.float32) - np.float32((nx - 1) / 2))[None, :, None]
    cos_t = np.cos(theta).astype(np.float32)[None, None, :]
    sin_t = np.sin(theta).astype(np.float32)[None, None, :]
    u = x * cos_t + z * sin_t + np.float32((n_detector_px - 1) / 2)  # (nz, nx, t)
    i0 = np.floor(u)
    w = u - i0
    i0 = i0.astype(np.int32)
    # each row (voxel) holds, tilt by tilt, the two detector pixels around u (tilt-major
    # columns, so indices are sorted within a row); pixels off the detector get weight 0
    col = np.empty((nz, nx, n_t, 2), dtype=np.int32)
    col[..., 0] = i0
    col[..., 1] = i0 + 1
    data = np.empty((nz, nx, n_t, 2), dtype=np.float32)
    data[..., 0] = 1.0 - w
    data[..., 1] = w
    off = (col < 0) | (col >= n_detector_px)
    data[off] = 0.0
    np.clip(col, 0, n_detector_px - 1, out=col)
    col += (np.arange(n_t, dtype=np.int32) * n_detector_px)[:, None]
    per_row = 2 * n_t
    indptr = np.arange(0, nz * nx * per_row + 1, per_row, dtype=np.int64)
    if indptr[-1] < np.iinfo(np.int32).max:
        indptr = indptr.astype(np.int32)
    mat = scipy.sparse.csr_matrix((data.ravel(), col.ravel(), indptr), shape=(nz * nx, n_t * n_detector_px))
    mat.has_sorted_indices = True
    mat.eliminate_zeros()
    return mat


@lru_cache(maxsize=2)
def _projection_matrix_cached(
    tilt_angles_deg: tuple[float, ...],
    n_detector_px: int,
    shape_zx: tuple[int, int],
    z_offset_px: float,
) -> scipy.sparse.csr_matrix:
    return _backprojection_matrix_cached(tilt_angles_deg, n_detector_px, shape_zx, z_offset_px).T.tocsr()


def _apply_along_y(mat, src_ayb, out_shape: tuple[int, int, int]):
    """Apply a ``(c * d, a * b)`` slice operator to every y of ``(a, y, b)``, giving ``(c, y, d)``."""
    xp = get_array_module(src_ayb)
    n_a, ny, n_b = src_ayb.shape
    n_c, _, n_d = out_shape
    src = src_ayb.astype(xp.float32)
    out = xp.empty(out_shape, dtype=xp.float32)
    for y0 in range(0, ny, _Y_CHUNK):
        y1 = min(y0 + _Y_CHUNK, ny)
        block = xp.ascontiguousarray(xp.transpose(src[:, y0:y1, :], (0, 2, 1))).reshape(n_a * n_b, y1 - y0)
        res = mat @ block
        out[:, y0:y1, :] = xp.transpose(res.reshape(n_c, n_d, y1 - y0), (0, 2, 1))
    return out


def clear_projector_cache() -> None:
    """Forget the cached projection matrices (to time the cold path, or free memory)."""
    _backprojection_matrix_cached.cache_clear()
    _projection_matrix_cached.cache_clear()


def backprojection_matrix(
    tilt_angles_deg: np.ndarray,
    *,
    n_detector_px: int,
    shape_zx: tuple[int, int],
    z_offset_px: float = 0.0,
    transpose: bool = False,
    xp: ModuleType = np,
):
    """Sparse linear-interpolation back-projection operator of one ``(z, x)`` slice.

    Parameters
    ----------
    tilt_angles_deg
        ``(t,)`` tilt angles.
    n_detector_px
        Length ``nu`` of each 1D projection (the image width).
    shape_zx
        ``(nz, nx)`` shape of the slice.
    z_offset_px
        Height of the slice centre above the specimen origin (moves the reconstructed
        slab along z).
    transpose
        Return the forward-projection matrix ``B.T`` (as CSR) instead.
    xp
        Array module of the result (numpy gives a ``scipy.sparse`` CSR matrix, cupy a
        ``cupyx.scipy.sparse`` one).

    Returns
    -------
    csr_matrix
        ``(nz * nx, t * nu)`` float32 matrix ``B``; ``B @ p`` back-projects the
        concatenated projections ``p`` (tilt-major) into the raveled ``(z, x)`` slice.
    """
    key = tuple(float(a) for a in np.asarray(tilt_angles_deg, dtype=np.float64).ravel())
    build = _projection_matrix_cached if transpose else _backprojection_matrix_cached
    mat = build(key, int(n_detector_px), tuple(int(n) for n in shape_zx), float(z_offset_px))
    if xp is np:
        return mat
    return _sparse_module(xp).csr_matrix(mat)


def backproject(
    projections_tyx: np.ndarray,
    tilt_angles_deg: np.ndarray,
    *,
    thickness_px: int,
    width_px: int | None = None,
    z_offset_px: float = 0.0,
) -> np.ndarray:
    """Back-project a stack of (filtered) projections into a volume.

    Parameters
    ----------
    projections_tyx
        ``(t, y, x)`` projections, tilt axis along y.
    tilt_angles_deg
        ``(t,)`` tilt angles.
    thickness_px
        Number of z slices ``nz`` of the volume.
    width_px
        Width ``nx`` of the volume (default: the image width).
    z_offset_px
        Height of the volume centre above the specimen origin.

    Returns
    -------
    ndarray
        ``(z, y, x)`` float32 sum over tilts of each projection sampled (linear
        interpolation) at ``u = x cos(theta) + z sin(theta)``; zero where ``u`` falls
        outside the detector.
    """
    xp = get_array_module(projections_tyx)
    n_t, ny, nu = projections_tyx.shape
    nx = nu if width_px is None else int(width_px)
    nz = int(thickness_px)
    mat = backprojection_matrix(tilt_angles_deg, n_detector_px=nu, shape_zx=(nz, nx),
                                z_offset_px=z_offset_px, xp=xp)
    if mat.shape[1] != n_t * nu:
        raise ValueError(f"{n_t} projections but {len(tilt_angles_deg)} tilt angles; give one angle per tilt")
    return _apply_along_y(mat, projections_tyx, (nz, ny, nx))


def project_volume(
    volume_zyx: np.ndarray,
    tilt_angles_deg: np.ndarray,
    *,
    n_detector_px: int | None = None,
    z_offset_px: float = 0.0,
) -> np.ndarray:
    """Forward-project a volume into a tilt-series (tilt axis along y).

    Parameters
    ----------
    volume_zyx
        ``(z, y, x)`` volume, voxel size equal to the detector pixel size.
    tilt_angles_deg
        ``(t,)`` tilt angles.
    n_detector_px
        Width ``nu`` of the projections (default: the volume width).
    z_offset_px
        Height of the volume centre above the specimen origin (as in :func:`backproject`).

    Returns
    -------
    ndarray
        ``(t, y, x)`` float32 projections: line integrals (in voxel lengths) of the
        volume, each voxel spread over its two nearest detector pixels.

    Notes
    -----
    This is the exact adjoint (transpose) of :func:`backproject`:
    ``<backproject(p), v> == <p, project_volume(v)>``.
    """
    xp = get_array_module(volume_zyx)
    nz, ny, nx = volume_zyx.shape
    nu = nx if n_detector_px is None else int(n_detector_px)
    n_t = len(np.atleast_1d(tilt_angles_deg))
    mat_t = backprojection_matrix(tilt_angles_deg, n_detector_px=nu, shape_zx=(nz, nx),
                                  z_offset_px=z_offset_px, transpose=True, xp=xp)
    return _apply_along_y(mat_t, volume_zyx, (n_t, ny, nu))
