"""Template matching in tomograms: missing-wedge-aware fast local normalised cross-correlation.

Conventions: volumes and templates are ``(z, y, x)`` arrays with the tilt axis along y
(as :func:`tomodask.kernels.reconstruct.reconstruct_tomogram` returns them), density
positive. Rotations are 3x3 matrices acting on ``(x, y, z)`` column vectors about the
template's box centre, voxel ``n // 2`` on each axis (RELION's convention for boxes); a
rotation ``R`` places the template point ``p`` at ``R p``. Euler angles are intrinsic ZYZ,
``R = Rz(phi) Ry(theta) Rz(psi)``, in degrees.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from tomodask.backend import get_array_module, scipy_ndimage
from tomodask.kernels.fourier import irfftn, rfftn, squared_frequency_3d

SYMMETRIES = ("auto", "none", "axial", "spherical")


@dataclass(frozen=True)
class RotationSet:
    """A set of rotations sampled for template matching.

    Attributes
    ----------
    matrices
        ``(n, 3, 3)`` rotation matrices acting on ``(x, y, z)`` vectors (numpy).
    euler_angles_zyz_deg
        ``(n, 3)`` intrinsic ZYZ Euler angles ``(phi, theta, psi)`` in degrees.
    symmetry
        ``"none"``, ``"axial"`` (psi not sampled) or ``"spherical"`` (identity only).
    """

    matrices: np.ndarray
    euler_angles_zyz_deg: np.ndarray
    symmetry: str

    def __len__(self) -> int:
        return int(len(self.matrices))


@dataclass(frozen=True)
class TemplateMatchResult:
    """Best normalised cross-correlation over rotations at every voxel.

    Attributes
    ----------
    scores_zyx
        ``(z, y, x)`` float32 best local normalised cross-correlation (input's device).
    best_rotation_index_zyx
        ``(z, y, x)`` int32 index into ``rotations`` of the best rotation.
    rotations
        The rotations searched.
    """

    scores_zyx: np.ndarray
    best_rotation_index_zyx: np.ndarray
    rotations: RotationSet


def euler_zyz_to_matrix(euler_angles_zyz_deg: np.ndarray) -> np.ndarray:
    """Rotation matrices ``Rz(phi) Ry(theta) Rz(psi)`` from intrinsic ZYZ Euler angles.

    Parameters
    ----------
    euler_angles_zyz_deg
        ``(n, 3)`` or ``(3,)`` angles ``(phi, theta, psi)`` in degrees.

    Returns
    -------
    ndarray
        ``(n, 3, 3)`` (or ``(3, 3)``) matrices acting on ``(x, y, z)`` column vectors.
    """
    a = np.deg2rad(np.asarray(euler_angles_zyz_deg, dtype=np.float64))
    single = a.ndim == 1
    a = np.atleast_2d(a)

    def rz(t: np.ndarray) -> np.ndarray:
        c, s = np.cos(t), np.sin(t)
        z, o = np.zeros_like(t), np.ones_like(t)
        return np.stack([np.stack([c, -s, z], -1), np.stack([s, c, z], -1), np.stack([z, z, o], -1)], -2)

    def ry(t: np.ndarray) -> np.ndarray:
        c, s = np.cos(t), np.sin(t)
        z, o = np.zeros_like(t), np.ones_like(t)
        return np.stack([np.stack([c, z, s], -1), np.stack([z, o, z], -1), np.stack([-s, z, c], -1)], -2)

    m = rz(a[:, 0]) @ ry(a[:, 1]) @ rz(a[:, 2])
    return m[0] if single else m


def rotation_set(angular_step_deg: float, *, symmetry: str = "none") -> RotationSet:
    """Near-uniform rotations about ``angular_step_deg`` apart.

    Parameters
    ----------
    angular_step_deg
        Spacing of the axis directions on the sphere and of the in-plane angle psi.
    symmetry
        ``"none"``: directions times psi steps; ``"axial"``: the template is symmetric
        about its z axis, so only directions; ``"spherical"``: only the identity.

    Returns
    -------
    RotationSet

    Notes
    -----
    Directions of the template's z axis lie on a Fibonacci spiral of
    ``ceil(4 pi / step^2)`` points (one point per ``step^2`` steradians), so the
    direction spacing is close to the step everywhere (no crowding at the poles).
    """
    if symmetry not in SYMMETRIES[1:]:
        raise ValueError(f"symmetry={symmetry!r} is not one of {', '.join(map(repr, SYMMETRIES[1:]))}")
    if not 0 < angular_step_deg <= 180:
        raise ValueError(f"angular_step_deg must be in (0, 180], got {angular_step_deg}")
    if symmetry == "spherical":
        eulers = np.zeros((1, 3))
    else:
        step = np.deg2rad(angular_step_deg)
        n_dir = max(2, int(np.ceil(4 * np.pi / step**2)))
        i = np.arange(n_dir) + 0.5
        theta = np.rad2deg(np.arccos(1 - 2 * i / n_dir))
        phi = np.rad2deg(np.mod(np.pi * (1 + 5**0.5) * i, 2 * np.pi))
        psis = [0.0] if symmetry == "axial" else np.arange(0.0, 360.0 - 1e-9, angular_step_deg)
        eulers = np.array([(p, t, s) for p, t in zip(phi, theta) for s in psis])
    return RotationSet(matrices=euler_zyz_to_matrix(eulers), euler_angles_zyz_deg=eulers, symmetry=symmetry)


def ellipsoid_template(
    semi_axes_zyx_px: tuple[float, float, float],
    *,
    box_px: int | None = None,
    xp: ModuleType = np,
) -> np.ndarray:
    """A solid ellipsoid of unit density with a one-voxel soft edge.

    Parameters
    ----------
    semi_axes_zyx_px
        Semi-axes along z, y and x in voxels.
    box_px
        Cubic box edge (default: the smallest even box holding the ellipsoid plus 4 voxels).
    xp
        Array module of the result.

    Returns
    -------
    ndarray
        ``(b, b, b)`` float32 template, centred at voxel ``b // 2``.
    """
    axes = np.asarray(semi_axes_zyx_px, dtype=np.float64)
    if axes.shape != (3,) or np.any(axes <= 0):
        raise ValueError(f"semi_axes_zyx_px must be three positive lengths, got {semi_axes_zyx_px}")
    b = box_px or int(2 * np.ceil(axes.max() + 2))
    c = b // 2
    g = xp.arange(b, dtype=xp.float32) - np.float32(c)
    r = xp.sqrt((g[:, None, None] / axes[0]) ** 2 + (g[None, :, None] / axes[1]) ** 2
                + (g[None, None, :] / axes[2]) ** 2)
    # distance outside the surface, approximately in voxels along the smallest axis
    return xp.clip(0.5 - (r - 1.0) * np.float32(axes.min()), 0.0, 1.0).astype(xp.float32)


def sphere_template(radius_px: float, *, box_px: int | None = None, xp: ModuleType = np) -> np.ndarray:
    """A solid sphere of unit density (see :func:`ellipsoid_template`).

    Parameters
    ----------
    radius_px
        Radius in voxels.
    box_px
        Cubic box edge (default: just large enough).
    xp
        Array module of the result.

    Returns
    -------
    ndarray
        ``(b, b, b)`` float32 template.
    """
    return ellipsoid_template((radius_px, radius_px, radius_px), box_px=box_px, xp=xp)


def spherical_mask(box_shape_zyx: tuple[int, int, int], radius_px: float, *, xp: ModuleType = np) -> np.ndarray:
    """Binary sphere of ``radius_px`` about the box centre, voxel ``n // 2`` on each axis.

    Parameters
    ----------
    box_shape_zyx
        Box shape.
    radius_px
        Radius in voxels.
    xp
        Array module of the result.

    Returns
    -------
    ndarray
        ``(d, h, w)`` float32 mask of zeros and ones.
    """
    grids = [xp.arange(n, dtype=xp.float32) - np.float32(n // 2) for n in box_shape_zyx]
    r2 = grids[0][:, None, None] ** 2 + grids[1][None, :, None] ** 2 + grids[2][None, None, :] ** 2
    return (r2 <= np.float32(radius_px**2)).astype(xp.float32)


def rotate_volume(volume_zyx: np.ndarray, matrix_xyz: np.ndarray, *, order: int = 1) -> np.ndarray:
    """Rotate a box about its centre voxel ``n // 2``: the result at ``R p`` is the input at ``p``.

    Parameters
    ----------
    volume_zyx
        ``(d, h, w)`` box.
    matrix_xyz
        ``(3, 3)`` rotation acting on ``(x, y, z)`` vectors.
    order
        Spline interpolation order (1: linear).

    Returns
    -------
    ndarray
        ``(d, h, w)`` float32 rotated box, zero outside the input.
    """
    xp = get_array_module(volume_zyx)
    ndi = scipy_ndimage(xp)
    flip = np.eye(3)[::-1]
    inverse_zyx = flip @ np.asarray(matrix_xyz, dtype=np.float64).T @ flip
    centre = (np.array(volume_zyx.shape) // 2).astype(np.float64)
    offset = centre - inverse_zyx @ centre
    return ndi.affine_transform(volume_zyx.astype(xp.float32), xp.asarray(inverse_zyx),
                                offset=tuple(float(o) for o in offset), order=order, mode="constant", cval=0.0)


def detect_symmetry(template_zyx: np.ndarray, *, tolerance: float = 0.05) -> str:
    """Tell whether a template is spherically or axially (about z) symmetric.

    Parameters
    ----------
    template_zyx
        ``(d, h, w)`` template.
    tolerance
        Largest relative root-mean-square difference between two rotated copies for a
        symmetry to count.

    Returns
    -------
    str
        ``"spherical"``, ``"axial"`` or ``"none"``.

    Notes
    -----
    The template is blurred by one voxel, then copies turned by +a and -a (a = 37 and
    71 degrees) about z are compared; equal copies mean axial symmetry. Copies tilted
    by +a and -a about x are then compared for spherical symmetry. Comparing two rotated
    copies (not one with the original) gives both the same interpolation blur.
    """
    xp = get_array_module(template_zyx)
    ndi = scipy_ndimage(xp)
    t = ndi.gaussian_filter(template_zyx.astype(xp.float32), 1.0)

    def symmetric(axis_eulers: list[tuple[float, float, float]]) -> bool:
        for e in axis_eulers:
            plus = rotate_volume(t, euler_zyz_to_matrix(np.array(e)))
            minus = rotate_volume(t, euler_zyz_to_matrix(-np.array(e)[::-1]))
            norm = float(xp.sqrt((plus**2).sum())) or 1.0
            if float(xp.sqrt(((plus - minus) ** 2).sum())) > tolerance * norm:
                return False
        return True

    if not symmetric([(37.0, 0.0, 0.0), (71.0, 0.0, 0.0)]):
        return "none"
    if not symmetric([(-90.0, 37.0, 90.0), (-90.0, 71.0, 90.0)]):
        return "axial"
    return "spherical"


def missing_wedge_weights(
    shape_zyx: tuple[int, int, int], tilt_range_deg: tuple[float, float], *, xp: ModuleType = np
) -> np.ndarray:
    """Binary Fourier weights of the region a tilt-series samples (tilt axis along y).

    Parameters
    ----------
    shape_zyx
        Real-space shape of the volume.
    tilt_range_deg
        ``(min, max)`` tilt angles.
    xp
        Array module.

    Returns
    -------
    ndarray
        ``(z, y, x // 2 + 1)`` float32 weights in ``rfftn`` layout: 1 where the angle of
        ``(kx, kz)`` from the kx axis lies within the tilt range (and on the ky axis), 0
        in the missing wedge.

    Notes
    -----
    A projection at tilt ``theta`` measures ``u = x cos(theta) + z sin(theta)``
    (:mod:`tomodask.kernels.geometry`), so by the central-slice theorem it samples the
    Fourier plane spanned by ky and ``(cos(theta), sin(theta))`` in ``(kx, kz)``.
    """
    lo, hi = sorted(float(a) for a in tilt_range_deg)
    kz = xp.fft.fftfreq(shape_zyx[0]).astype(xp.float32)[:, None, None]
    kx = xp.fft.rfftfreq(shape_zyx[2]).astype(xp.float32)[None, None, :]
    angle = xp.rad2deg(xp.arctan2(kz, kx))  # kx >= 0 in the half-spectrum: angle in [-90, 90]
    inside = (angle >= lo - 1e-6) & (angle <= hi + 1e-6)
    on_axis = (kz == 0) & (kx == 0)
    w = (inside | on_axis).astype(xp.float32)
    return xp.broadcast_to(w, (shape_zyx[0], shape_zyx[1], shape_zyx[2] // 2 + 1))


def _pad_to_origin(box_zyx: np.ndarray, shape_zyx: tuple[int, ...]) -> np.ndarray:
    """Embed a box in a zero volume with the box centre ``n // 2`` at index (0, 0, 0) (wrapped)."""
    xp = get_array_module(box_zyx)
    out = xp.zeros(shape_zyx, dtype=xp.float32)
    d = box_zyx.shape
    if any(b > n for b, n in zip(d, shape_zyx)):
        raise ValueError(f"template box {d} is larger than the tomogram {shape_zyx}; crop the template")
    out[: d[0], : d[1], : d[2]] = box_zyx
    return xp.roll(out, tuple(-(b // 2) for b in d), axis=(0, 1, 2))


def _prepare_template(
    template_zyx: np.ndarray, mask_zyx: np.ndarray, wedge_box: np.ndarray | None, lowpass_sigma_px: float
) -> np.ndarray:
    """Wedge and low-pass the template, then zero-mean unit-variance inside the mask."""
    xp = get_array_module(template_zyx)
    t = template_zyx
    if wedge_box is not None or lowpass_sigma_px > 0:
        spec = rfftn(t)
        if wedge_box is not None:
            spec = spec * wedge_box
        if lowpass_sigma_px > 0:
            k2 = squared_frequency_3d(t.shape, xp=xp)
            spec = spec * xp.exp(np.float32(-2 * np.pi**2 * lowpass_sigma_px**2) * k2)
        t = irfftn(spec, t.shape).astype(xp.float32)
    n = float(mask_zyx.sum())
    mean = float((t * mask_zyx).sum()) / n
    centred = (t - np.float32(mean)) * mask_zyx
    std = float(xp.sqrt((centred**2).sum() / n))
    if std == 0:
        raise ValueError("the template is constant inside its mask; give a template with structure")
    return centred / np.float32(std)


def _correlate(f_vol: np.ndarray, box_zyx: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``sum_r box(r) V(x + r)`` for every x, from the volume's spectrum ``f_vol``."""
    xp = get_array_module(f_vol)
    f_box = xp.conj(rfftn(_pad_to_origin(box_zyx, shape)))
    return irfftn(f_vol * f_box, shape).astype(xp.float32)


def matched_filter(
    volume_zyx: np.ndarray,
    template_zyx: np.ndarray,
    *,
    tilt_range_deg: tuple[float, float] | None = (-60.0, 60.0),
    lowpass_sigma_px: float = 1.0,
) -> np.ndarray:
    """Cross-correlate a volume with one template (wedged, zero-mean, unit-variance).

    Parameters
    ----------
    volume_zyx
        ``(z, y, x)`` tomogram, density positive.
    template_zyx
        ``(d, h, w)`` template centred on voxel ``n // 2``.
    tilt_range_deg
        Missing wedge given to the template (None: none).
    lowpass_sigma_px
        Gaussian blur of the template in voxels.

    Returns
    -------
    ndarray
        ``(z, y, x)`` float32 correlation (not locally normalised: cheaper than
        :func:`match_template`, for refining positions found by another detector).
    """
    xp = get_array_module(volume_zyx)
    template = xp.asarray(template_zyx, dtype=xp.float32)
    mask = spherical_mask(template.shape, min(template.shape) / 2 - 1, xp=xp)
    wedge = missing_wedge_weights(template.shape, tilt_range_deg, xp=xp) if tilt_range_deg is not None else None
    t_norm = _prepare_template(template, mask, wedge, lowpass_sigma_px)
    shape = tuple(int(n) for n in volume_zyx.shape)
    return _correlate(rfftn(volume_zyx.astype(xp.float32)), t_norm, shape)


def match_template(
    volume_zyx: np.ndarray,
    template_zyx: np.ndarray,
    *,
    mask_zyx: np.ndarray | None = None,
    angular_step_deg: float = 15.0,
    tilt_range_deg: tuple[float, float] | None = (-60.0, 60.0),
    symmetry: str = "auto",
    lowpass_sigma_px: float = 1.0,
) -> TemplateMatchResult:
    """Search a tomogram for a template over rotations: the best local NCC at every voxel.

    Parameters
    ----------
    volume_zyx
        ``(z, y, x)`` tomogram, density positive (numpy or cupy).
    template_zyx
        ``(d, h, w)`` template at the tomogram's voxel size, density positive, centred
        on voxel ``n // 2`` of each axis.
    mask_zyx
        ``(d, h, w)`` mask of the template (default: a sphere of radius ``min(d, h, w) / 2
        - 1``, which makes the local statistics rotation-invariant).
    angular_step_deg
        Rotation sampling (see :func:`rotation_set`).
    tilt_range_deg
        ``(min, max)`` tilt range; the template is given the same missing wedge. None:
        no wedge.
    symmetry
        ``"auto"`` (:func:`detect_symmetry`), ``"none"``, ``"axial"`` or ``"spherical"``.
    lowpass_sigma_px
        Gaussian blur of the template (voxels), close to the reconstruction's roll-off.

    Returns
    -------
    TemplateMatchResult

    Notes
    -----
    Fast local correlation [1]_: the template ``T`` is normalised to zero mean and unit
    variance under its mask ``M`` (``N`` voxels), and the score at ``x`` is
    ``sum_r T(r) V(x + r) / (N sigma_M(x))``, with the local standard deviation
    ``sigma_M`` of the tomogram under the mask computed by FFT convolutions of ``V`` and
    ``V^2`` with ``M``. Each rotation costs one forward and one inverse FFT of the volume
    (two more per rotation for a user mask, whose statistics are recomputed as it
    turns). The template gets the missing wedge of the tilt range before normalisation,
    so elongation along z in the tomogram is expected, not penalised [2]_.

    References
    ----------
    .. [1] Roseman, A. M. (2003). Particle finding in electron micrographs using a fast
       local correlation algorithm. Ultramicroscopy 94, 225-236.
    .. [2] Förster, F., Han, B.-G. & Beck, M. (2010). Visual proteomics. Methods
       Enzymol. 483, 215-243.
    """
    if symmetry not in SYMMETRIES:
        raise ValueError(f"symmetry={symmetry!r} is not one of {', '.join(map(repr, SYMMETRIES))}")
    if volume_zyx.ndim != 3 or template_zyx.ndim != 3:
        raise ValueError("volume_zyx and template_zyx must both be (z, y, x) volumes")
    xp = get_array_module(volume_zyx)
    shape = tuple(int(n) for n in volume_zyx.shape)
    template = xp.asarray(template_zyx, dtype=xp.float32)
    user_mask = mask_zyx is not None
    mask = (xp.asarray(mask_zyx, dtype=xp.float32) if user_mask
            else spherical_mask(template.shape, min(template.shape) / 2 - 1, xp=xp))
    if symmetry == "auto":
        symmetry = detect_symmetry(template)
        if user_mask and symmetry != "none" and detect_symmetry(mask) == "none":
            symmetry = "none"
    rotations = rotation_set(angular_step_deg, symmetry=symmetry)
    wedge_box = (missing_wedge_weights(template.shape, tilt_range_deg, xp=xp)
                 if tilt_range_deg is not None else None)

    vol = volume_zyx.astype(xp.float32)
    f_vol = rfftn(vol)
    f_vol2 = rfftn(vol * vol)

    def local_sigma(mask_box: np.ndarray) -> tuple[np.ndarray, float]:
        n = float(mask_box.sum())
        f_mask = xp.conj(rfftn(_pad_to_origin(mask_box, shape)))
        mean = irfftn(f_vol * f_mask, shape) / np.float32(n)
        sq = irfftn(f_vol2 * f_mask, shape) / np.float32(n)
        var = xp.maximum(sq - mean * mean, 0)
        floor = np.float32(1e-6 * float(xp.median(var.ravel()[:: max(1, var.size // 1_000_000)])) + 1e-30)
        return xp.sqrt(xp.maximum(var, floor)).astype(xp.float32), n

    sigma, n_mask = local_sigma(mask)
    best = xp.full(shape, -xp.inf, dtype=xp.float32)
    best_index = xp.zeros(shape, dtype=xp.int32)
    for i, matrix in enumerate(rotations.matrices):
        rotated = rotate_volume(template, matrix)
        rot_mask = mask
        if user_mask:
            rot_mask = (rotate_volume(mask, matrix) > 0.5).astype(xp.float32)
            sigma, n_mask = local_sigma(rot_mask)
        t_norm = _prepare_template(rotated, rot_mask, wedge_box, lowpass_sigma_px)
        ncc = _correlate(f_vol, t_norm, shape) / (np.float32(n_mask) * sigma)
        better = ncc > best
        best = xp.where(better, ncc, best)
        best_index = xp.where(better, np.int32(i), best_index)
    return TemplateMatchResult(scores_zyx=best, best_rotation_index_zyx=best_index, rotations=rotations)
