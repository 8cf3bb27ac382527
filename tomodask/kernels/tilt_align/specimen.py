"""Where the specimen slab lies in a reconstruction (:func:`specimen_geometry`, step 6 of
:mod:`tomodask.kernels.tilt_align`), and what to warn about when that is uncertain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tomodask.backend import get_array_module, scipy_ndimage, to_numpy
from tomodask.kernels.tilt_align.features import _volume_features


@dataclass(frozen=True)
class SpecimenGeometry:
    """Where the specimen slab lies in a reconstruction (voxels, from the volume centre).

    Attributes
    ----------
    z_center_px
        Height of the slab's mid-plane above the volume centre, at ``x = 0``.
    slope_deg
        Angle of the slab in the ``(x, z)`` plane: ``z = z_center_px + x tan(slope_deg)``.
    thickness_px
        Slab thickness (NaN when unknown).
    method
        How it was found: ``"gold on both surfaces"``, ``"gold on one surface, ice
        thickness from intensity"``, ``"structure"`` or, when the reconstruction shows no
        specimen slab, ``"not found (...)"`` (then ``z_center_px`` is 0: nothing moves).
    z_uncertainty_px
        Standard error of ``z_center_px`` for ``"structure"`` (the scatter of the
        features' heights over the square root of their number); 0 with gold (a fraction
        of a voxel, not estimated); infinite when not found.
    other_side_z_px
        With gold on one surface, the mid-plane had the specimen lain on the other side
        of the bead layer (the side is the one with more structure, which at coarse
        pixel sizes may be noise); NaN otherwise.
    """

    z_center_px: float
    slope_deg: float
    thickness_px: float
    method: str
    z_uncertainty_px: float = 0.0
    other_side_z_px: float = float("nan")


def _bead_radius_px(image_yx, tilt_angle_deg: float, positions_zyx: np.ndarray) -> float:
    """Radius of gold beads from their projections in an aligned image (axis along y).

    A sphere projects to a chord profile ``2 sqrt(r^2 - d^2)``, which falls to half its
    depth at ``d = r sqrt(3) / 2``: the radius is that of the disc of half depth (its area
    over pi), over ``sqrt(3) / 2``. Median over beads.
    """
    xp = get_array_module(image_yx)
    img = to_numpy(scipy_ndimage(xp).gaussian_filter(image_yx.astype(xp.float32), 1.0)).astype(np.float64)
    ny, nx = img.shape
    t = np.deg2rad(tilt_angle_deg)
    yy, xx = np.mgrid[:ny, :nx]
    radii = []
    for z, y, x in positions_zyx[:8]:
        cy, cx = y + (ny - 1) / 2, x * np.cos(t) + z * np.sin(t) + (nx - 1) / 2
        r = np.hypot(yy - cy, xx - cx)
        window = r < 0.15 * min(ny, nx)
        ring = (r >= 0.15 * min(ny, nx)) & (r < 0.2 * min(ny, nx))
        if not ring.any() or not (r < 2).any():
            continue
        depth = np.median(img[ring]) - img
        half = (depth > 0.5 * depth[r < 2].max()) & window
        labels, _ = scipy_ndimage(np).label(half)
        own = labels[min(max(int(round(cy)), 0), ny - 1), min(max(int(round(cx)), 0), nx - 1)]
        if own:
            radii.append(np.sqrt((labels == own).sum() / np.pi) / (np.sqrt(3) / 2))
    return float(np.median(radii)) if radii else 0.0


def _centroids(volume_zyx, positions_zyx: np.ndarray, *, half_px: int = 3) -> np.ndarray:
    """Energy-weighted centroids of the volume in boxes around ``positions_zyx`` (from the centre)."""
    v = to_numpy(volume_zyx)
    centre = (np.array(v.shape) - 1) / 2
    out = np.array(positions_zyx, dtype=np.float64)
    for n, p in enumerate(out):
        c = np.round(p + centre).astype(int)
        lo, hi = np.maximum(c - half_px, 0), np.minimum(c + half_px + 1, v.shape)
        box = v[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float64) ** 2
        if box.sum() > 0:
            grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
            out[n] = [float((g * box).sum() / box.sum()) for g in grids] - centre
    return out


def _layers(z: np.ndarray, *, min_gap_px: float) -> np.ndarray:
    """Label bead heights 0 (lower surface) or 1 (upper), splitting at the widest gap."""
    order = np.argsort(z)
    gaps = np.diff(z[order])
    labels = np.zeros(len(z), int)
    if len(gaps) and gaps.max() >= min_gap_px:
        j = int(np.argmax(gaps))
        labels[order[j + 1:]] = 1
    return labels


def _fit_layers(z: np.ndarray, x: np.ndarray, labels: np.ndarray, *, slope: bool,
                min_spread_px: float) -> tuple[np.ndarray, float]:
    """Heights of the bead layers at ``x = 0`` and their common slope (least squares)."""
    n_l = int(labels.max()) + 1
    design = np.zeros((len(z), n_l + 1))
    design[np.arange(len(z)), labels] = 1.0
    design[:, -1] = x
    spread = np.ptp(x - np.array([x[labels == k].mean() for k in range(n_l)])[labels]) if len(x) else 0.0
    use_slope = slope and len(z) >= n_l + 1 and spread >= min_spread_px
    cols = design if use_slope else design[:, :-1]
    keep = np.ones(len(z), bool)
    for _ in range(2):
        coef, *_ = np.linalg.lstsq(cols[keep], z[keep], rcond=None)
        resid = np.abs(z - cols @ coef)
        keep = resid <= max(3.0, 3 * np.median(resid))
        if any(not keep[labels == k].any() for k in range(n_l)):
            keep[:] = True
            break
    return coef[:n_l], (float(coef[-1]) if use_slope else 0.0)


def _structure_energy(volume_zyx, beads_zyx: np.ndarray, bead_radius_px: float) -> np.ndarray:
    """``(z, x)`` energy of the structure, clipped so that no bead dominates, beads masked."""
    xp = get_array_module(volume_zyx)
    nz, ny, nx = volume_zyx.shape
    by = max(int(0.1 * ny), 1)
    v = volume_zyx[:, by:ny - by, :].astype(xp.float32)
    v = v - xp.median(v)
    sigma = 1.4826 * float(xp.median(xp.abs(v)))
    v = xp.clip(v, -3 * sigma, 3 * sigma)
    if len(beads_zyx):
        z = xp.arange(nz, dtype=xp.float32)[:, None, None] - (nz - 1) / 2
        y = xp.arange(by, ny - by, dtype=xp.float32)[None, :, None] - (ny - 1) / 2
        x = xp.arange(nx, dtype=xp.float32)[None, None, :] - (nx - 1) / 2
        r = 2 * bead_radius_px + 2
        for bz, bypos, bx in beads_zyx:
            v = xp.where(((z - bz) / (2 * r)) ** 2 + ((y - bypos) / r) ** 2 + ((x - bx) / r) ** 2 < 1, 0.0, v)
    return to_numpy((v * v).sum(axis=1)).astype(np.float64)


def _sheared_profile(energy_zx: np.ndarray, slope_deg: float) -> np.ndarray:
    """Sum over x of the energy along lines ``z + x tan(slope)``."""
    nz, nx = energy_zx.shape
    z = np.arange(nz) - (nz - 1) / 2
    x = np.arange(nx) - (nx - 1) / 2
    tan = np.tan(np.deg2rad(slope_deg))
    out = np.zeros(nz)
    for j in range(nx):
        out += np.interp(z + x[j] * tan, z, energy_zx[:, j], left=0.0, right=0.0)
    return out


def _centre_and_spread(profile: np.ndarray) -> tuple[float, float]:
    """Centroid and standard deviation (voxels from the centre) of a height profile above its 20th percentile."""
    nz = len(profile)
    z = np.arange(nz) - (nz - 1) / 2
    w = np.clip(profile - np.percentile(profile, 20), 0.0, None)
    total = w.sum() or 1.0
    centre = float((w * z).sum() / total)
    return centre, float(np.sqrt((w * (z - centre) ** 2).sum() / total))


def specimen_geometry(
    volume_zyx: np.ndarray,
    *,
    thickness_px: float | None = None,
    estimate_slope: bool = True,
    slope_deg: float | None = None,
    image_yx: np.ndarray | None = None,
    image_tilt_angle_deg: float = 0.0,
    features: tuple[np.ndarray, np.ndarray] | None = None,
    max_slope_deg: float = 10.0,
    strong_ratio: float = 8.0,
    min_layer_gap_px: float = 10.0,
    min_slab_contrast: float = 1.25,
) -> SpecimenGeometry:
    """Height, slope and thickness of the specimen slab in a reconstruction.

    Parameters
    ----------
    volume_zyx
        ``(z, y, x)`` reconstruction (y along the tilt axis), thicker than the specimen.
    thickness_px
        Specimen thickness if known otherwise (e.g. from
        :func:`tomodask.kernels.tilt_exclusion.ice_slab_from_intensity`), in voxels.
    estimate_slope
        Fit the slab's slope (else it is level).
    slope_deg
        The slab's slope if known otherwise (e.g. from the tilt-angle offset of
        :func:`tomodask.kernels.tilt_exclusion.ice_slab_from_intensity`, ``-offset``).
    image_yx, image_tilt_angle_deg
        An aligned tilt (axis along y, the volume's pixel size and centre), best the one
        nearest 0°, and its angle: the bead radius is measured on it (without it, beads on
        one surface give no mid-plane).
    features
        ``((k, 3) positions (z, y, x), (k,) strengths)`` of the volume's strongest features
        if already measured more precisely (e.g. :attr:`~tomodask.kernels.tilt_align.FeatureFit.positions_zyx`, heights
        from the parallax over all tilts); by default its local maxima.
    max_slope_deg
        Largest slope searched when only the structure tells.
    strong_ratio
        A local maximum of the structure energy this many times the median of the 60
        strongest is a bead (gold).
    min_layer_gap_px
        Beads whose heights differ by more than this lie on different surfaces (unless,
        with ``thickness_px``, the two layers would enclose less than half of it).
    min_slab_contrast
        Without gold, the structure energy within the slab must be this many times that
        outside it, with at least five features, else the slab is ``"not found"``.

    Returns
    -------
    SpecimenGeometry

    Notes
    -----
    Gold beads sit at the air-water interfaces, so beads on both surfaces give the
    mid-plane (halfway between the two bead layers, fitted with a common slope) to a
    fraction of a voxel. Beads on one surface give that surface (layer height plus or
    minus the bead radius, measured on a projection); with a known
    thickness the mid-plane is half of it away, on the side where the rest of the
    structure is. Without beads (or a thickness) the mid-plane is the centroid of the
    structure energy of the reconstruction (clipped so that beads weigh as much as any
    other structure), sheared by the slope that makes it most compact: a weaker estimate,
    biased by where the particles happen to be; its standard error is reported, and a
    reconstruction without a slab of structure (no contrast between inside and outside)
    gives ``"not found"`` rather than a guess.
    """
    nz, ny, nx = volume_zyx.shape
    if features is None:
        feats, values = _volume_features(volume_zyx, n_max=60, separation_px=4, border_fraction=(0.1, 0.1))
    else:
        feats, values = np.asarray(features[0], dtype=np.float64), np.asarray(features[1], dtype=np.float64)
    strong = values >= strong_ratio * np.median(values) if len(values) >= 10 else np.zeros(len(values), bool)
    beads = _centroids(volume_zyx, feats[strong]) if features is None else feats[strong]
    radius = _bead_radius_px(image_yx, image_tilt_angle_deg, beads) if len(beads) and image_yx is not None else 0.0
    energy = None
    if len(beads):
        labels = _layers(beads[:, 0], min_gap_px=min_layer_gap_px)
        z_beads = beads[:, 0] - (0.0 if slope_deg is None else beads[:, 2] * np.tan(np.deg2rad(slope_deg)))
        fit_options = dict(slope=estimate_slope and slope_deg is None, min_spread_px=0.2 * nx)
        heights, slope = _fit_layers(z_beads, beads[:, 2], labels, **fit_options)
        known_thickness = thickness_px is not None and np.isfinite(thickness_px)
        if len(heights) == 2 and known_thickness and heights[1] - heights[0] + 2 * radius < 0.5 * thickness_px:
            # Two "layers" far closer than the ice is thick: one surface, a bead or two
            # off its height (a 256 x 360 field: 4 beads at 47-59 voxels in ice of 125).
            labels[:] = 0
            heights, slope = _fit_layers(z_beads, beads[:, 2], labels, **fit_options)
        if slope_deg is None:
            slope_deg = float(np.clip(np.rad2deg(np.arctan(slope)), -max_slope_deg, max_slope_deg))
        if len(heights) == 2:
            return SpecimenGeometry(z_center_px=float(heights.mean()), slope_deg=slope_deg,
                                    thickness_px=float(heights[1] - heights[0] + 2 * radius),
                                    method="gold on both surfaces")
        if known_thickness and thickness_px > 2 * radius > 0:
            energy = _structure_energy(volume_zyx, beads, radius)
            profile = _sheared_profile(energy, slope_deg)
            z = np.arange(nz) - (nz - 1) / 2
            a = float(heights[0])
            above = profile[(z > a + 2 * radius) & (z < a + thickness_px)].mean() if (z > a + 2 * radius).any() else 0
            below = profile[(z < a - 2 * radius) & (z > a - thickness_px)].mean() if (z < a - 2 * radius).any() else 0
            side = 1.0 if above >= below else -1.0
            return SpecimenGeometry(z_center_px=a + side * (thickness_px / 2 - radius), slope_deg=slope_deg,
                                    thickness_px=float(thickness_px),
                                    method="gold on one surface, ice thickness from intensity",
                                    other_side_z_px=a - side * (thickness_px / 2 - radius))
    if energy is None:
        energy = _structure_energy(volume_zyx, beads, radius)
    if slope_deg is not None or not estimate_slope:
        slope_deg = 0.0 if slope_deg is None else float(slope_deg)
    else:
        slopes = np.arange(-max_slope_deg, max_slope_deg + 1e-9, 0.5)
        spreads = np.array([_centre_and_spread(_sheared_profile(energy, s))[1] for s in slopes])
        j = int(np.argmin(spreads))
        slope_deg = float(slopes[j])
        if 0 < j < len(slopes) - 1:
            den = spreads[j - 1] - 2 * spreads[j] + spreads[j + 1]
            if den > 0:
                slope_deg += 0.5 * 0.5 * (spreads[j - 1] - spreads[j + 1]) / den
    profile = _sheared_profile(energy, slope_deg)
    centre, spread = _centre_and_spread(profile)
    thickness = float(thickness_px) if thickness_px is not None and np.isfinite(thickness_px) else 2 * np.sqrt(3) * spread
    z = np.arange(nz) - (nz - 1) / 2
    inside, outside = np.abs(z - centre) < 0.4 * thickness, np.abs(z - centre) > 0.6 * thickness
    contrast = (profile[inside].mean() / max(profile[outside].mean(), 1e-30)
                if inside.any() and outside.any() else float("nan"))
    if not contrast >= min_slab_contrast or len(feats) < 5:
        return SpecimenGeometry(z_center_px=0.0, slope_deg=slope_deg, thickness_px=float("nan"),
                                method=f"not found (slab contrast {contrast:.2f}, {len(feats)} features)",
                                z_uncertainty_px=float("inf"))
    return SpecimenGeometry(z_center_px=centre, slope_deg=slope_deg, thickness_px=thickness, method="structure",
                            z_uncertainty_px=float(np.std(feats[:, 0]) / np.sqrt(len(feats))))


def _centring_warning(geometry: SpecimenGeometry | None, pixel_size_angstrom: float, max_uncertainty_angstrom: float) -> str:
    """What :attr:`~tomodask.kernels.tilt_align.TiltSeriesAlignment.centring_warning` says about a centring step."""
    if geometry is None:
        return ""
    if geometry.method.startswith("not found"):
        return (f"specimen mid-plane {geometry.method}: the rotation centre stays on the layer the "
                "correlations followed")
    sigma = geometry.z_uncertainty_px * pixel_size_angstrom
    if sigma > max_uncertainty_angstrom:
        return (f"no gold: mid-plane from the structure alone, standard error {sigma:.0f} Å "
                f"(above {max_uncertainty_angstrom:.0f} Å)")
    return ""
