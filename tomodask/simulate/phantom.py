"""The specimen of the synthetic microscope: an ice slab with particles, gold and a membrane.

All objects are spheres or spherical shells, so their projections at any tilt are exact
(a sphere of radius ``r`` projects to a chord length ``2 sqrt(r^2 - d^2)``) and images of
any size render quickly. Coordinates are specimen coordinates (x_s, y_s, z_s) in Å with the
origin at the specimen centre and y_s along the tilt axis (see
:mod:`tomodask.kernels.geometry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Phase shift per Å of path through protein, relative to vitreous ice (rad/Å).
PROTEIN_PHASE_PER_ANGSTROM = 0.0018
#: Phase shift per Å of path through gold, relative to ice (rad/Å).
GOLD_PHASE_PER_ANGSTROM = 0.012
#: Amplitude attenuation per Å of path through gold (1/Å), from scattering outside the aperture.
GOLD_ABSORPTION_PER_ANGSTROM = 0.012
#: Phase shift per Å of path through a lipid membrane, relative to ice (rad/Å).
MEMBRANE_PHASE_PER_ANGSTROM = 0.0012
#: Inelastic mean free path of 300 kV electrons in vitreous ice with an energy filter (Å).
ICE_MEAN_FREE_PATH_ANGSTROM = 3500.0


@dataclass(frozen=True)
class Phantom:
    """A specimen with known contents (all lengths in Å, specimen coordinates).

    Attributes
    ----------
    size_xy_angstrom
        Lateral extent ``(x, y)`` over which objects are placed.
    thickness_angstrom
        Ice-slab thickness (z_s from ``-t/2`` to ``t/2``).
    particle_centers_xyz_angstrom
        ``(n, 3)`` particle centres.
    particle_radius_angstrom
        Radius of every particle's main sphere.
    particle_orientations_xyz
        ``(n, 3)`` unit vectors; each particle carries a lobe of half its radius along it.
    gold_centers_xyz_angstrom
        ``(m, 3)`` gold bead centres.
    gold_radius_angstrom
        Gold bead radius.
    membrane_center_xyz_angstrom, membrane_radius_angstrom, membrane_thickness_angstrom
        A spherical vesicle, or None.
    """

    size_xy_angstrom: tuple[float, float]
    thickness_angstrom: float
    particle_centers_xyz_angstrom: np.ndarray
    particle_radius_angstrom: float
    particle_orientations_xyz: np.ndarray
    gold_centers_xyz_angstrom: np.ndarray
    gold_radius_angstrom: float
    membrane_center_xyz_angstrom: np.ndarray | None = None
    membrane_radius_angstrom: float = 0.0
    membrane_thickness_angstrom: float = 40.0
    spheres: list[tuple[np.ndarray, float, float, float]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spheres", self._sphere_list())

    def _sphere_list(self) -> list[tuple[np.ndarray, float, float, float]]:
        """Every sphere as ``(centres (k, 3), radius, phase per Å, absorption per Å)``.

        A vesicle is a sphere minus a smaller one (negative phase for the inner sphere).
        """
        r = self.particle_radius_angstrom
        spheres = [
            (self.particle_centers_xyz_angstrom, r, PROTEIN_PHASE_PER_ANGSTROM, 0.0),
            (
                self.particle_centers_xyz_angstrom + 0.9 * r * self.particle_orientations_xyz,
                0.5 * r,
                PROTEIN_PHASE_PER_ANGSTROM,
                0.0,
            ),
            (self.gold_centers_xyz_angstrom, self.gold_radius_angstrom, GOLD_PHASE_PER_ANGSTROM,
             GOLD_ABSORPTION_PER_ANGSTROM),
        ]
        if self.membrane_center_xyz_angstrom is not None:
            c = np.asarray(self.membrane_center_xyz_angstrom, dtype=float)[None, :]
            outer = self.membrane_radius_angstrom + self.membrane_thickness_angstrom / 2
            inner = self.membrane_radius_angstrom - self.membrane_thickness_angstrom / 2
            spheres.append((c, outer, MEMBRANE_PHASE_PER_ANGSTROM, 0.0))
            spheres.append((c, inner, -MEMBRANE_PHASE_PER_ANGSTROM, 0.0))
        return spheres

    def to_dict(self) -> dict:
        """Plain-data description for the ground-truth JSON."""
        return {
            "size_xy_angstrom": list(self.size_xy_angstrom),
            "thickness_angstrom": self.thickness_angstrom,
            "particle_centers_xyz_angstrom": self.particle_centers_xyz_angstrom.tolist(),
            "particle_radius_angstrom": self.particle_radius_angstrom,
            "particle_orientations_xyz": self.particle_orientations_xyz.tolist(),
            "gold_centers_xyz_angstrom": self.gold_centers_xyz_angstrom.tolist(),
            "gold_radius_angstrom": self.gold_radius_angstrom,
            "membrane_center_xyz_angstrom": None
            if self.membrane_center_xyz_angstrom is None
            else np.asarray(self.membrane_center_xyz_angstrom).tolist(),
            "membrane_radius_angstrom": self.membrane_radius_angstrom,
            "membrane_thickness_angstrom": self.membrane_thickness_angstrom,
        }

    def volume(self, *, pixel_size_angstrom: float, shape_zyx: tuple[int, int, int]) -> np.ndarray:
        """Voxelise the phase density (rad/Å relative to ice) on a ``(z, y, x)`` grid.

        Parameters
        ----------
        pixel_size_angstrom
            Voxel size.
        shape_zyx
            Grid shape; the grid centre ``(n - 1) / 2`` is the specimen origin, z is z_s,
            y is y_s (along the tilt axis) and x is x_s.

        Returns
        -------
        ndarray
            ``(z, y, x)`` float32 density, each voxel the mean over 2x2x2 sub-samples.
        """
        vol = np.zeros(shape_zyx, dtype=np.float32)
        sub = (np.arange(2) + 0.5) / 2 - 0.5
        axes = [
            ((np.arange(n)[:, None] + sub[None, :]).ravel() - (n - 1) / 2) * pixel_size_angstrom
            for n in shape_zyx
        ]
        fine = np.zeros(tuple(2 * n for n in shape_zyx), dtype=np.float32)
        for centres, radius, phase, _ in self.spheres:
            for c in np.atleast_2d(centres):
                lo = [np.searchsorted(ax, c[i] - radius) for i, ax in zip((2, 1, 0), axes)]
                hi = [np.searchsorted(ax, c[i] + radius) for i, ax in zip((2, 1, 0), axes)]
                if any(h <= lo_ for lo_, h in zip(lo, hi)):
                    continue
                z = axes[0][lo[0] : hi[0], None, None] - c[2]
                y = axes[1][None, lo[1] : hi[1], None] - c[1]
                x = axes[2][None, None, lo[2] : hi[2]] - c[0]
                inside = (x**2 + y**2 + z**2) <= radius**2
                fine[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] += phase * inside
        vol[:] = fine.reshape(shape_zyx[0], 2, shape_zyx[1], 2, shape_zyx[2], 2).mean(axis=(1, 3, 5))
        return vol


def make_phantom(
    seed: int,
    *,
    size_xy_angstrom: tuple[float, float],
    thickness_angstrom: float = 1500.0,
    n_particles: int = 30,
    particle_radius_angstrom: float = 80.0,
    n_gold: int = 6,
    gold_radius_angstrom: float = 50.0,
    membrane: bool = True,
) -> Phantom:
    """Place particles, gold beads and a vesicle in an ice slab, without overlaps.

    Parameters
    ----------
    seed
        Random seed; the same seed gives the same phantom.
    size_xy_angstrom
        Lateral extent ``(x, y)`` of the region where objects are placed.
    thickness_angstrom
        Ice thickness; particles sit fully inside it, gold beads on its two surfaces.
    n_particles, particle_radius_angstrom
        Number and radius of particles.
    n_gold, gold_radius_angstrom
        Number and radius of gold beads.
    membrane
        Add one spherical vesicle.

    Returns
    -------
    Phantom
    """
    rng = np.random.default_rng(seed)
    sx, sy = size_xy_angstrom
    t = thickness_angstrom
    r = particle_radius_angstrom
    placed: list[tuple[np.ndarray, float]] = []
    membrane_center = None
    membrane_radius = 0.0
    if membrane:
        membrane_radius = min(sx, sy, t) * 0.3
        membrane_center = np.array([rng.uniform(-0.25, 0.25) * sx, rng.uniform(-0.25, 0.25) * sy, 0.0])
        placed.append((membrane_center, membrane_radius + 40.0))

    def place(n: int, radius: float, z_choices: list[tuple[float, float]]) -> np.ndarray:
        out = []
        for _ in range(n * 200):
            if len(out) == n:
                break
            lo, hi = z_choices[rng.integers(len(z_choices))]
            c = np.array([rng.uniform(-sx / 2 + radius, sx / 2 - radius),
                          rng.uniform(-sy / 2 + radius, sy / 2 - radius),
                          rng.uniform(lo, hi)])
            if all(np.linalg.norm(c - p) > radius + pr + 10.0 for p, pr in placed):
                placed.append((c, radius * 1.5))
                out.append(c)
        if len(out) < n:
            raise ValueError(
                f"could not place {n} objects of radius {radius} Å in {sx}x{sy}x{t} Å; "
                "use fewer or smaller objects or a larger phantom"
            )
        return np.array(out).reshape(-1, 3)

    margin = 1.5 * r + 10.0
    particles = place(n_particles, r, [(-t / 2 + margin, t / 2 - margin)])
    gold = place(n_gold, gold_radius_angstrom,
                 [(-t / 2 + gold_radius_angstrom, -t / 2 + gold_radius_angstrom),
                  (t / 2 - gold_radius_angstrom, t / 2 - gold_radius_angstrom)])
    orient = rng.normal(size=(n_particles, 3))
    orient /= np.linalg.norm(orient, axis=1, keepdims=True)
    return Phantom(
        size_xy_angstrom=(float(sx), float(sy)),
        thickness_angstrom=float(t),
        particle_centers_xyz_angstrom=particles,
        particle_radius_angstrom=float(r),
        particle_orientations_xyz=orient,
        gold_centers_xyz_angstrom=gold,
        gold_radius_angstrom=float(gold_radius_angstrom),
        membrane_center_xyz_angstrom=membrane_center,
        membrane_radius_angstrom=float(membrane_radius),
    )
