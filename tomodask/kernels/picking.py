"""Particle picking in tomograms: size-based (difference of Gaussians) or template matching.

:func:`pick_particles` is the entry point. Both methods share the same steps around the
score map:

1. normalise the tomogram and flip it so that particles are positive (``polarity``);
2. find gold beads (the densest compact blobs), record their centres and blank them;
3. compute a score map: a band-pass (difference of Gaussians) at the particle scale, or
   the missing-wedge-aware normalised cross-correlation with a template
   (:mod:`tomodask.kernels.template_matching`);
4. estimate the ice slab from the z-profile of the score map's local variance;
5. mask the tomogram edges, the region outside the slab and the surroundings of gold;
6. find local maxima, suppress those closer than a minimum distance (strongest first),
   and keep those above a threshold (automatic unless given).

Coordinates: ``coordinates_zyx_px`` are array indices of the tomogram (sub-voxel);
``coordinates_xyz_angstrom`` are ``(x, y, z)`` in Å relative to the tomogram centre
``(n - 1) / 2`` on each axis (RELION 5 ``rlnCenteredCoordinate{X,Y,Z}Angst``; the
simulator's specimen origin sits at that centre).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np
from scipy.spatial import cKDTree

from tomodask.backend import get_array_module, scipy_ndimage, to_numpy
from tomodask.kernels.fourier import irfftn, rfftn, squared_frequency_3d
from tomodask.kernels.template_matching import match_template, matched_filter, sphere_template

METHODS = ("size", "template")
POLARITIES = ("dark", "bright")

#: Difference-of-Gaussians scales, as fractions of the particle radius in voxels.
DOG_SIGMA_LOW_PER_RADIUS = 0.5
DOG_SIGMA_HIGH_PER_RADIUS = 1.5

#: Robust standard deviation from the median absolute deviation of a normal distribution.
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class Picks:
    """Particle positions found in one tomogram (host numpy arrays).

    Attributes
    ----------
    coordinates_zyx_px
        ``(n, 3)`` float positions in tomogram voxels (array indices, sub-voxel).
    coordinates_xyz_angstrom
        ``(n, 3)`` positions ``(x, y, z)`` in Å relative to the tomogram centre
        ``(n - 1) / 2`` (RELION 5 centred coordinates).
    scores
        ``(n,)`` peak score, strongest first: difference-of-Gaussians response in units of
        its robust noise level (``method="size"``) or normalised cross-correlation
        (``method="template"``).
    threshold_used
        Score threshold the picks passed (automatic or given).
    method
        ``"size"`` or ``"template"``.
    pixel_size_angstrom
        Voxel size of the tomogram.
    particle_radius_angstrom
        Particle radius the picker was given.
    tomogram_shape_zyx
        Shape of the tomogram.
    orientations_matrix
        ``(n, 3, 3)`` rotation matrices (acting on ``(x, y, z)`` column vectors) that map the
        template onto each pick, template mode only (else None).
    euler_angles_zyz_deg
        ``(n, 3)`` the same rotations as intrinsic ZYZ Euler angles ``(phi, theta, psi)``
        in degrees, ``R = Rz(phi) Ry(theta) Rz(psi)``; template mode only (else None).
    candidate_scores
        ``(k,)`` scores of every candidate peak after non-maximum suppression (threshold
        diagnostics for the dashboard).
    noise_sigma
        Robust standard deviation of the score map inside the mask (score units).
    slab_z_range_px
        ``(z_start, z_stop)`` of the estimated ice slab (stop exclusive); the whole
        tomogram when the slab mask is off or no slab was found.
    gold_centers_zyx_px
        ``(m, 3)`` centres of the gold beads found (no pick lies near them).
    """

    coordinates_zyx_px: np.ndarray
    coordinates_xyz_angstrom: np.ndarray
    scores: np.ndarray
    threshold_used: float
    method: str
    pixel_size_angstrom: float
    particle_radius_angstrom: float
    tomogram_shape_zyx: tuple[int, int, int]
    orientations_matrix: np.ndarray | None
    euler_angles_zyz_deg: np.ndarray | None
    candidate_scores: np.ndarray
    noise_sigma: float
    slab_z_range_px: tuple[int, int]
    gold_centers_zyx_px: np.ndarray

    def __len__(self) -> int:
        return int(len(self.scores))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}")


def robust_sigma(values: np.ndarray, *, max_samples: int = 500_000) -> float:
    """Standard deviation estimated from the median absolute deviation.

    Parameters
    ----------
    values
        Array of any shape (numpy or cupy).
    max_samples
        Use an evenly strided subset of at most this many values (speed).

    Returns
    -------
    float
        ``1.4826 * median(|v - median(v)|)``; 0 for an empty input.
    """
    xp = get_array_module(values)
    flat = values.ravel()
    if flat.size == 0:
        return 0.0
    step = max(1, flat.size // max_samples)
    sample = flat[::step].astype(xp.float32)
    med = xp.median(sample)
    return float(MAD_TO_SIGMA * xp.median(xp.abs(sample - med)))


def _gaussian_spectrum_filter(volume_zyx: np.ndarray, sigmas_px: tuple[float, ...], signs: tuple[float, ...]
                              ) -> np.ndarray:
    """Sum of Gaussian blurs ``sum_i sign_i G(sigma_i) * volume`` by one product in Fourier space."""
    xp = get_array_module(volume_zyx)
    shape = tuple(volume_zyx.shape)
    k2 = squared_frequency_3d(shape, xp=xp)
    c = np.float32(2 * np.pi**2)
    filt = sum(np.float32(sign) * xp.exp(-c * np.float32(sigma**2) * k2) for sigma, sign in zip(sigmas_px, signs))
    return irfftn(rfftn(volume_zyx.astype(xp.float32)) * filt, shape).astype(xp.float32)


def difference_of_gaussians(
    volume_zyx: np.ndarray, *, sigma_low_px: float, sigma_high_px: float
) -> np.ndarray:
    """Band-pass a volume: Gaussian blur at ``sigma_low_px`` minus blur at ``sigma_high_px``.

    Parameters
    ----------
    volume_zyx
        ``(z, y, x)`` volume (numpy or cupy).
    sigma_low_px, sigma_high_px
        Gaussian standard deviations in voxels, ``sigma_low_px < sigma_high_px``.

    Returns
    -------
    ndarray
        ``(z, y, x)`` float32 band-passed volume on the input's device.

    Notes
    -----
    Computed as one product in Fourier space, ``exp(-2 pi^2 s1^2 k^2) - exp(-2 pi^2 s2^2
    k^2)``, with periodic boundaries (mask the edges afterwards). The difference of
    Gaussians approximates the scale-normalised Laplacian of Gaussian [1]_.

    References
    ----------
    .. [1] Lindeberg, T. (1998). Feature detection with automatic scale selection.
       Int. J. Comput. Vision 30, 79-116.
    """
    if not 0 < sigma_low_px < sigma_high_px:
        raise ValueError(
            f"need 0 < sigma_low_px < sigma_high_px, got {sigma_low_px} and {sigma_high_px}"
        )
    return _gaussian_spectrum_filter(volume_zyx, (sigma_low_px, sigma_high_px), (1.0, -1.0))


def gaussian_blur_fourier(volume_zyx: np.ndarray, *, sigma_px: float) -> np.ndarray:
    """Gaussian blur of a ``(z, y, x)`` volume by a product in Fourier space (periodic).

    Parameters
    ----------
    volume_zyx
        ``(z, y, x)`` volume (numpy or cupy).
    sigma_px
        Standard deviation in voxels.

    Returns
    -------
    ndarray
        ``(z, y, x)`` float32 on the input's device.
    """
    return _gaussian_spectrum_filter(volume_zyx, (sigma_px,), (1.0,))


@dataclass(frozen=True)
class GoldBeads:
    """Gold beads found in a tomogram.

    Attributes
    ----------
    mask
        ``(z, y, x)`` bool, True on the voxels of the beads (input's device).
    centers_zyx_px
        ``(m, 3)`` numpy centres of mass of the beads.
    exclusion
        ``(z, y, x)`` bool, True within the exclusion distance of any bead voxel.
    """

    mask: np.ndarray
    centers_zyx_px: np.ndarray
    exclusion: np.ndarray


def detect_gold(
    signed_zyx: np.ndarray,
    *,
    blur_px: float = 2.0,
    gold_sigma: float = 20.0,
    gold_contrast: float = 4.0,
    exclusion_px: float = 10.0,
    min_voxels: int = 4,
) -> GoldBeads:
    """Find gold beads: compact blobs far denser than anything else in the tomogram.

    Parameters
    ----------
    signed_zyx
        ``(z, y, x)`` tomogram, zero background and density positive (as
        :func:`pick_particles` prepares it).
    blur_px
        Gaussian blur (voxels) applied before thresholding, about a third of a bead radius.
    gold_sigma
        A bead's blurred density exceeds this many robust noise levels of the blurred map...
    gold_contrast
        ...and this many times the map's 99th percentile (the density of the densest
        biological material when particles fill more than 1 % of the volume, else noise).
        Gold scatters about ten times more per voxel than protein.
    exclusion_px
        Distance around each bead voxel where picks are forbidden (reconstruction
        streaks around gold make false peaks).
    min_voxels
        Smaller connected groups of voxels above the level are noise, not beads.

    Returns
    -------
    GoldBeads

    Notes
    -----
    The bead mask is the blurred map above the detection level, so it covers the bead and
    its missing-wedge elongation but not the long reconstruction streaks (those are what
    ``exclusion_px`` is for).
    """
    xp = get_array_module(signed_zyx)
    ndi = scipy_ndimage(xp)
    smooth = gaussian_blur_fourier(signed_zyx, sigma_px=blur_px)
    noise = robust_sigma(smooth)
    step = max(1, smooth.size // 500_000)
    p99 = float(xp.percentile(smooth.ravel()[::step], 99.0))
    level = max(gold_sigma * noise, gold_contrast * p99)
    labels, n = ndi.label(smooth > level)
    mask = xp.zeros(signed_zyx.shape, dtype=bool)
    exclusion = xp.zeros(signed_zyx.shape, dtype=bool)
    centres = []
    if n:
        # Beads are few and small: work on the coordinates of their voxels on the host.
        where = xp.nonzero(labels)
        pos = np.stack([to_numpy(w) for w in where], axis=1)
        lab = to_numpy(labels[where])
        weight = to_numpy(smooth[where]).astype(np.float64)
        shape = np.array(signed_zyx.shape)
        pad = int(np.ceil(exclusion_px)) + 1
        for k in np.unique(lab):
            sel = lab == k
            if sel.sum() < min_voxels:
                continue
            p, w = pos[sel], weight[sel]
            centres.append((p * w[:, None]).sum(axis=0) / w.sum())
            lo = np.maximum(p.min(axis=0) - pad, 0)
            hi = np.minimum(p.max(axis=0) + pad + 1, shape)
            box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            bead = labels[box] == int(k)
            mask[box] |= bead
            exclusion[box] |= ndi.distance_transform_edt(~bead) <= exclusion_px
    centres = np.array(centres, dtype=float).reshape(-1, 3)
    return GoldBeads(mask=mask, centers_zyx_px=centres, exclusion=exclusion)


def estimate_slab_z_range(
    score_zyx: np.ndarray,
    *,
    valid_zyx: np.ndarray | None = None,
    margin_px: float = 0.0,
    min_contrast: float = 1.3,
    level: float = 0.2,
) -> tuple[int, int]:
    """Estimate the z-range of the ice slab from the z-profile of local variance.

    Parameters
    ----------
    score_zyx
        ``(z, y, x)`` band-passed tomogram (zero-mean), e.g. a difference of Gaussians at
        the particle scale, whose square is the local variance at that scale.
    valid_zyx
        ``(z, y, x)`` bool, voxels to include (e.g. not near gold); None for all.
    margin_px
        Widen the slab by this many voxels on each side.
    min_contrast
        When the profile's peak is below ``min_contrast`` times its floor, no slab is
        visible and the whole z-range is returned.
    level
        Fraction of the way from the profile's floor to its peak that defines the slab.

    Returns
    -------
    (int, int)
        ``(z_start, z_stop)``, stop exclusive.

    Notes
    -----
    Outside the ice there is only reconstruction noise, whose variance is nearly the same
    at every height; inside, specimen density adds variance at the particle scale. The
    profile (mean of the squared band-pass per z-slice, smoothed over a few slices) is
    compared with its floor (low percentile); the slab spans from the first to the last
    slice above ``floor + level * (peak - floor)``.
    """
    xp = get_array_module(score_zyx)
    nz = score_zyx.shape[0]
    sq = score_zyx.astype(xp.float32) ** 2
    if valid_zyx is None:
        valid_zyx = xp.ones(score_zyx.shape, dtype=bool)
    count = to_numpy(valid_zyx.sum(axis=(1, 2)))
    profile = to_numpy((sq * valid_zyx).sum(axis=(1, 2))) / np.maximum(count, 1)
    has = count > 0.05 * count.max() if count.max() > 0 else count > 0
    if has.sum() < 5:
        return 0, nz
    z = np.arange(nz)
    profile = np.interp(z, z[has], profile[has])
    kernel = np.ones(5) / 5
    smooth = np.convolve(np.pad(profile, 2, mode="edge"), kernel, mode="valid")
    floor = float(np.percentile(smooth[has], 5))
    peak = float(smooth[has].max())
    if floor <= 0 or peak < min_contrast * floor:
        return 0, nz
    above = np.flatnonzero((smooth > floor + level * (peak - floor)) & has)
    start = int(max(0, np.floor(above[0] - margin_px)))
    stop = int(min(nz, np.ceil(above[-1] + 1 + margin_px)))
    return start, stop


def local_maxima(
    score_zyx: np.ndarray,
    *,
    valid_zyx: np.ndarray,
    min_distance_px: float,
    floor: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of a score map, at least ``min_distance_px`` apart (strongest kept).

    Parameters
    ----------
    score_zyx
        ``(z, y, x)`` score map (numpy or cupy).
    valid_zyx
        ``(z, y, x)`` bool, where peaks may lie.
    min_distance_px
        Minimum Euclidean distance between two kept peaks, in voxels.
    floor
        Ignore maxima whose score is not above this.

    Returns
    -------
    coordinates_zyx, scores
        ``(k, 3)`` int voxel indices and ``(k,)`` scores, strongest first (numpy).

    Notes
    -----
    A cube maximum filter of half-width ``min_distance_px / sqrt(3)`` (inscribed in the
    sphere of that radius, so it never removes a peak the exact rule keeps) finds the
    candidates on the device; a greedy pass on the few candidates, strongest first with a
    k-d tree, then applies the exact spherical distance.
    """
    xp = get_array_module(score_zyx)
    ndi = scipy_ndimage(xp)
    half = max(1, int(np.floor(min_distance_px / np.sqrt(3.0))))
    peaks = score_zyx == ndi.maximum_filter(score_zyx, size=2 * half + 1, mode="nearest")
    peaks &= valid_zyx & (score_zyx > floor)
    coords = to_numpy(xp.stack(xp.nonzero(peaks), axis=1)).astype(np.int64)
    scores = to_numpy(score_zyx[peaks]).astype(np.float64)
    order = np.argsort(-scores, kind="stable")
    coords, scores = coords[order], scores[order]
    if len(coords) < 2:
        return coords, scores
    tree = cKDTree(coords)
    keep = np.ones(len(coords), dtype=bool)
    for i, neighbours in enumerate(tree.query_ball_point(coords, r=min_distance_px - 1e-6)):
        if keep[i]:
            for j in neighbours:
                if j > i:
                    keep[j] = False
    return coords[keep], scores[keep]


def refine_subvoxel(score_zyx: np.ndarray, coords_zyx: np.ndarray) -> np.ndarray:
    """Refine integer peak positions with a parabola through each peak and its neighbours.

    Parameters
    ----------
    score_zyx
        ``(z, y, x)`` score map.
    coords_zyx
        ``(k, 3)`` integer peak indices.

    Returns
    -------
    ndarray
        ``(k, 3)`` float positions (numpy), each axis moved by at most half a voxel.
    """
    xp = get_array_module(score_zyx)
    out = coords_zyx.astype(np.float64).copy()
    if len(coords_zyx) == 0:
        return out
    shape = np.array(score_zyx.shape)
    c = xp.asarray(coords_zyx)
    centre = score_zyx[c[:, 0], c[:, 1], c[:, 2]]
    for axis in range(3):
        lo = c.copy()
        hi = c.copy()
        lo[:, axis] = xp.clip(c[:, axis] - 1, 0, int(shape[axis]) - 1)
        hi[:, axis] = xp.clip(c[:, axis] + 1, 0, int(shape[axis]) - 1)
        vm = score_zyx[lo[:, 0], lo[:, 1], lo[:, 2]]
        vp = score_zyx[hi[:, 0], hi[:, 1], hi[:, 2]]
        denom = vm - 2 * centre + vp
        delta = xp.where(denom < 0, 0.5 * (vm - vp) / xp.where(denom < 0, denom, -1), 0.0)
        out[:, axis] += to_numpy(xp.clip(delta, -0.5, 0.5))
    return out


def refine_peaks(map_zyx: np.ndarray, coords_zyx: np.ndarray, *, search_radius_px: float) -> np.ndarray:
    """Move each peak to the maximum of another map within a radius, then to sub-voxel.

    Parameters
    ----------
    map_zyx
        ``(z, y, x)`` map whose maxima locate particles precisely (e.g. a matched filter).
    coords_zyx
        ``(k, 3)`` starting positions in voxels.
    search_radius_px
        Search radius around each start.

    Returns
    -------
    ndarray
        ``(k, 3)`` float positions (numpy), refined with :func:`refine_subvoxel`.
    """
    xp = get_array_module(map_zyx)
    if len(coords_zyx) == 0:
        return np.zeros((0, 3))
    r = int(np.ceil(search_radius_px))
    g = np.arange(-r, r + 1)
    offsets = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
    offsets = offsets[(offsets**2).sum(axis=1) <= search_radius_px**2]
    start = np.round(np.asarray(coords_zyx, dtype=np.float64)).astype(np.int64)
    idx = np.clip(start[:, None, :] + offsets[None], 0, np.array(map_zyx.shape) - 1)
    idx_dev = xp.asarray(idx)
    values = map_zyx[idx_dev[..., 0], idx_dev[..., 1], idx_dev[..., 2]]
    best = idx[np.arange(len(idx)), to_numpy(xp.argmax(values, axis=1))]
    return refine_subvoxel(map_zyx, best)


def otsu_threshold(values: np.ndarray, *, n_bins: int = 128) -> float:
    """Otsu's threshold: the cut that maximises the between-class variance of a 1D sample.

    Parameters
    ----------
    values
        ``(k,)`` numpy sample (e.g. candidate peak scores).
    n_bins
        Histogram bins.

    Returns
    -------
    float
        The threshold (the value itself for fewer than two distinct values).

    References
    ----------
    .. [1] Otsu, N. (1979). A threshold selection method from gray-level histograms.
       IEEE Trans. Syst. Man Cybern. 9, 62-66.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2 or v.min() == v.max():
        return float(v.max()) if v.size else 0.0
    hist, edges = np.histogram(v, bins=n_bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = (w0 * w1 * (mu0 - mu1) ** 2)[:-1]
    # An empty gap between two classes gives a plateau of equal values: cut in its middle.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(0.5 * (edges[1:][best[0]] + edges[1:][best[-1]]))


def automatic_threshold(candidate_scores: np.ndarray, *, noise_floor: float) -> float:
    """Threshold on candidate peak scores separating particles from noise peaks.

    Parameters
    ----------
    candidate_scores
        ``(k,)`` scores of the local maxima after non-maximum suppression.
    noise_floor
        No threshold below this (scores of pure-noise maxima rarely exceed it).

    Returns
    -------
    float

    Notes
    -----
    Noise maxima form a dense cluster of low scores and particles a sparse tail of high
    ones; Otsu's method on the candidate scores splits the two, and ``noise_floor`` keeps
    the split out of the noise cluster when there are few or no particles. The candidates
    should include noise maxima (collect them down to a fraction of the floor); when
    every candidate is above the floor there is no noise cluster to split off, all are
    particles, and the floor is the threshold.
    """
    s = np.asarray(candidate_scores, dtype=np.float64)
    if s.size < 2:
        return float(noise_floor)
    if s.min() >= noise_floor:
        return float(noise_floor)  # no noise maxima among the candidates: all are particles
    return float(max(noise_floor, otsu_threshold(s)))


def _normalise(tomogram_zyx: np.ndarray, polarity: str) -> np.ndarray:
    """Zero median, unit robust standard deviation, density positive."""
    xp = get_array_module(tomogram_zyx)
    vol = tomogram_zyx.astype(xp.float32)
    step = max(1, vol.size // 500_000)
    vol = vol - xp.median(vol.ravel()[::step])
    if polarity == "dark":
        vol = -vol
    sigma = robust_sigma(vol)
    if sigma <= 0:
        raise ValueError("the tomogram is constant; nothing can be picked")
    return vol / np.float32(sigma)


def _interior_mask(shape: tuple[int, int, int], edge_px: float, xp: ModuleType) -> np.ndarray:
    """True farther than ``edge_px`` voxels from every face of the volume."""
    valid = xp.ones(shape, dtype=bool)
    e = int(np.ceil(edge_px))
    for axis, n in enumerate(shape):
        idx = [slice(None)] * 3
        idx[axis] = slice(0, min(e, n))
        valid[tuple(idx)] = False
        idx[axis] = slice(max(n - e, 0), n)
        valid[tuple(idx)] = False
    return valid


def pick_particles(
    tomogram_zyx: np.ndarray,
    *,
    pixel_size_angstrom: float,
    particle_radius_angstrom: float,
    method: str = "size",
    min_distance_angstrom: float | None = None,
    threshold: float | None = None,
    template_zyx: np.ndarray | None = None,
    template_mask_zyx: np.ndarray | None = None,
    angular_step_deg: float = 15.0,
    tilt_range_deg: tuple[float, float] | None = (-60.0, 60.0),
    polarity: str = "dark",
    slab_mask: bool = True,
    gold_mask: bool = True,
    gold_sigma: float = 20.0,
    gold_exclusion_angstrom: float | None = None,
    edge_margin_angstrom: float | None = None,
    noise_floor_sigma: float | None = None,
    max_picks: int | None = None,
    refine_positions: bool = True,
) -> Picks:
    """Find particles of a known size in a tomogram.

    Parameters
    ----------
    tomogram_zyx
        ``(z, y, x)`` reconstructed tomogram (numpy or cupy), tilt axis along y.
    pixel_size_angstrom
        Voxel size in Å.
    particle_radius_angstrom
        Approximate particle radius in Å (sets the band-pass scale, the default minimum
        distance, the default sphere template and the edge margin).
    method
        ``"size"``: difference of Gaussians at the particle scale; ``"template"``:
        missing-wedge-aware normalised cross-correlation with ``template_zyx`` (a sphere of
        the particle radius when None) over rotations ``angular_step_deg`` apart.
    min_distance_angstrom
        Minimum distance between picks (default: the particle diameter).
    threshold
        Score threshold; None chooses one automatically (see :func:`automatic_threshold`).
    template_zyx
        ``(d, h, w)`` template at the tomogram's voxel size, centred on voxel ``n // 2``,
        with protein positive whatever ``polarity`` says about the tomogram; template
        mode only.
    template_mask_zyx
        ``(d, h, w)`` mask of the template (default: a sphere enclosing it).
    angular_step_deg
        Angular sampling of template rotations (:func:`~tomodask.kernels.template_matching.rotation_set`):
        about ``4 pi / step^2`` axis directions times ``360 / step`` in-plane angles, fewer
        for templates found to be axially or spherically symmetric. Each rotation costs
        two FFTs of the tomogram.
    tilt_range_deg
        ``(min, max)`` tilt range of the tilt-series, for the missing wedge applied to the
        template (template mode and position refinement); None for no wedge. The default
        is the usual ±60°.
    polarity
        ``"dark"``: particles are darker than the ice (tomograms reconstructed from
        intensity images, the usual case); ``"bright"``: density is positive.
    slab_mask
        Only pick inside the ice slab estimated from the z-profile of local variance.
    gold_mask
        Detect gold beads and forbid picks near them.
    gold_sigma
        Gold detection level in noise standard deviations (see :func:`detect_gold`).
    gold_exclusion_angstrom
        Forbidden distance around gold voxels (default: one particle radius).
    edge_margin_angstrom
        No picks closer than this to the tomogram faces (default: one particle radius).
    noise_floor_sigma
        Lowest automatic threshold, in robust noise levels of the score map (default 5 for
        the size method, 6 for template matching, which searches many more hypotheses).
    max_picks
        Keep at most this many picks (the strongest).
    refine_positions
        Size method: move each pick to the peak of a matched filter (a sphere of the
        particle radius with the missing wedge of ``tilt_range_deg``) within half a radius.
        The difference of Gaussians finds particles reliably but its broad peak places
        them only to a few voxels; the matched filter places them to a fraction of one.

    Returns
    -------
    Picks

    Notes
    -----
    The difference of Gaussians uses ``sigma_low = 0.5 r`` and ``sigma_high = 1.5 r``
    (``r`` the radius in voxels): close to the scale-normalised Laplacian-of-Gaussian
    optimum ``r / sqrt(3)`` for a solid sphere [1]_, wide enough to average the noise of a
    low-dose tomogram. Its score is expressed in units of the map's robust noise level
    (median absolute deviation inside the mask). Template matching follows the fast local
    normalised cross-correlation of Roseman [2]_ with the missing wedge applied to the
    template as in STOPGAP / pytom-match-pick [3]_.

    References
    ----------
    .. [1] Lindeberg, T. (1998). Feature detection with automatic scale selection.
       Int. J. Comput. Vision 30, 79-116.
    .. [2] Roseman, A. M. (2003). Particle finding in electron micrographs using a fast
       local correlation algorithm. Ultramicroscopy 94, 225-236.
    .. [3] Chaillet, M. L. et al. (2023). Extensive angular sampling enables the sensitive
       localization of macromolecules in electron tomograms. Int. J. Mol. Sci. 24, 13375.
    """
    _check_choice("method", method, METHODS)
    _check_choice("polarity", polarity, POLARITIES)
    if tomogram_zyx.ndim != 3:
        raise ValueError(f"tomogram_zyx must be a (z, y, x) volume, got shape {tomogram_zyx.shape}")
    if pixel_size_angstrom <= 0 or particle_radius_angstrom <= 0:
        raise ValueError("pixel_size_angstrom and particle_radius_angstrom must be positive, e.g. "
                         "pick_particles(tomo, pixel_size_angstrom=10.0, particle_radius_angstrom=90.0)")
    xp = get_array_module(tomogram_zyx)
    shape = tuple(int(n) for n in tomogram_zyx.shape)
    r_px = particle_radius_angstrom / pixel_size_angstrom
    min_dist_px = (min_distance_angstrom if min_distance_angstrom is not None
                   else 2.0 * particle_radius_angstrom) / pixel_size_angstrom
    edge_px = (edge_margin_angstrom if edge_margin_angstrom is not None
               else particle_radius_angstrom) / pixel_size_angstrom
    excl_px = (gold_exclusion_angstrom if gold_exclusion_angstrom is not None
               else particle_radius_angstrom) / pixel_size_angstrom

    vol = _normalise(tomogram_zyx, polarity)
    if gold_mask:
        gold = detect_gold(vol, blur_px=max(1.0, 0.2 * r_px), gold_sigma=gold_sigma, exclusion_px=excl_px)
        vol = xp.where(gold.mask, np.float32(0.0), vol)
        near_gold = gold.exclusion
        gold_centres = gold.centers_zyx_px
    else:
        near_gold = xp.zeros(shape, dtype=bool)
        gold_centres = np.zeros((0, 3))

    rotations = None
    best_rotation = None
    band = None
    if method == "size" or slab_mask:
        band = difference_of_gaussians(vol, sigma_low_px=DOG_SIGMA_LOW_PER_RADIUS * r_px,
                                       sigma_high_px=DOG_SIGMA_HIGH_PER_RADIUS * r_px)
    if method == "size":
        score = band
        floor_sigma = 5.0 if noise_floor_sigma is None else noise_floor_sigma
    else:
        if template_zyx is None:
            template_zyx = sphere_template(radius_px=r_px, xp=xp)
        result = match_template(vol, xp.asarray(template_zyx), mask_zyx=template_mask_zyx,
                                angular_step_deg=angular_step_deg, tilt_range_deg=tilt_range_deg)
        score, best_rotation, rotations = result.scores_zyx, result.best_rotation_index_zyx, result.rotations
        floor_sigma = 6.0 if noise_floor_sigma is None else noise_floor_sigma

    valid = _interior_mask(shape, edge_px, xp) & ~near_gold
    slab = (0, shape[0])
    if slab_mask:
        slab = estimate_slab_z_range(band, valid_zyx=valid, margin_px=r_px)
        valid[: slab[0]] = False
        valid[slab[1]:] = False

    noise = robust_sigma(score[valid]) if bool(valid.any()) else 0.0
    if noise <= 0:
        noise = robust_sigma(score) or 1.0
    # Size scores are reported in noise units; template scores stay correlation values.
    if method == "size":
        score = score / np.float32(noise)
        noise_in_score_units = 1.0
    else:
        noise_in_score_units = noise
    floor = floor_sigma * noise_in_score_units
    coords, cand_scores = local_maxima(score, valid_zyx=valid, min_distance_px=min_dist_px,
                                       floor=0.4 * floor)
    thr = automatic_threshold(cand_scores, noise_floor=floor) if threshold is None else float(threshold)
    keep = cand_scores >= thr
    if max_picks is not None:
        keep &= np.arange(len(keep)) < max_picks
    sel, sel_scores = coords[keep], cand_scores[keep]
    if method == "size" and refine_positions:
        fine = matched_filter(vol, sphere_template(r_px, xp=xp), tilt_range_deg=tilt_range_deg)
        zyx = refine_peaks(fine, sel, search_radius_px=0.5 * r_px)
    else:
        zyx = refine_subvoxel(score, sel)
    centre = (np.array(shape, dtype=np.float64) - 1.0) / 2.0
    xyz_a = (zyx - centre)[:, ::-1] * pixel_size_angstrom
    matrices = eulers = None
    if rotations is not None:
        idx = to_numpy(best_rotation[tuple(xp.asarray(sel).T)]) if len(sel) else np.zeros(0, int)
        matrices = rotations.matrices[idx]
        eulers = rotations.euler_angles_zyz_deg[idx]
    return Picks(
        coordinates_zyx_px=zyx,
        coordinates_xyz_angstrom=xyz_a,
        scores=sel_scores,
        threshold_used=float(thr),
        method=method,
        pixel_size_angstrom=float(pixel_size_angstrom),
        particle_radius_angstrom=float(particle_radius_angstrom),
        tomogram_shape_zyx=shape,
        orientations_matrix=matrices,
        euler_angles_zyz_deg=eulers,
        candidate_scores=cand_scores,
        noise_sigma=float(noise_in_score_units),
        slab_z_range_px=(int(slab[0]), int(slab[1])),
        gold_centers_zyx_px=np.asarray(gold_centres, dtype=float).reshape(-1, 3),
    )


def overlay_picks(
    tomogram_zyx: np.ndarray,
    picks: Picks,
    *,
    z_range_px: tuple[int, int] | None = None,
    max_size_px: int = 512,
    pick_rgb: tuple[int, int, int] = (255, 60, 60),
    gold_rgb: tuple[int, int, int] = (255, 210, 0),
) -> np.ndarray:
    """Thumbnail of a tomogram with its picks drawn as circles, for the dashboard.

    Parameters
    ----------
    tomogram_zyx
        ``(z, y, x)`` tomogram the picks came from (numpy or cupy).
    picks
        Result of :func:`pick_particles` on it.
    z_range_px
        ``(start, stop)`` slices averaged into the thumbnail (default: the picks' slab).
    max_size_px
        Longest side of the thumbnail; larger tomograms are block-averaged down.
    pick_rgb, gold_rgb
        Colours of the pick circles (particle radius) and of gold-bead markers.

    Returns
    -------
    ndarray
        ``(h, w, 3)`` uint8 RGB image on the host, y down the rows, x along the columns.
    """
    xp = get_array_module(tomogram_zyx)
    z0, z1 = z_range_px if z_range_px is not None else picks.slab_z_range_px
    ny, nx = tomogram_zyx.shape[1:]
    image = to_numpy(tomogram_zyx[int(z0):int(z1)].astype(xp.float32).mean(axis=0)).astype(np.float64)
    factor = max(1, int(np.ceil(max(ny, nx) / max_size_px)))
    h, w = ny // factor, nx // factor
    image = image[: h * factor, : w * factor].reshape(h, factor, w, factor).mean(axis=(1, 3))
    lo, hi = np.percentile(image, [1, 99])
    grey = np.clip((image - lo) / max(hi - lo, 1e-12), 0, 1)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    yy, xx = np.mgrid[0:h, 0:w]
    ring = max(0.6, 1.0 / factor + 0.4)

    def draw(centres_zyx: np.ndarray, radius: float, colour: tuple[int, int, int]) -> None:
        for _, cy, cx in np.asarray(centres_zyx, dtype=np.float64).reshape(-1, 3):
            d = np.hypot(yy - cy / factor, xx - cx / factor)
            rgb[np.abs(d - radius) <= ring] = colour

    r = picks.particle_radius_angstrom / picks.pixel_size_angstrom / factor
    draw(picks.coordinates_zyx_px, r, pick_rgb)
    draw(picks.gold_centers_zyx_px, max(2.0, 0.4 * r), gold_rgb)
    return rgb
