"""Particle picking recovers known particle centres in simulated tomograms.

The tomograms come from the synthetic microscope at its default dose (3 e-/Å² per tilt,
41 tilts, ±60°), 4 Å pixels, reconstructed by ``reconstruct_tomogram`` at 8 Å voxels, with
20 particles of radius 90 Å, 4 gold beads and a vesicle membrane (the benchmark's
:func:`simulated_tomogram`, loaded from ``benchmarks/picking.py``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from tomodask.kernels.picking import (
    automatic_threshold,
    otsu_threshold,
    overlay_picks,
    pick_particles,
    refine_subvoxel,
)
from tomodask.kernels.picking_metrics import match_picks
from tomodask.kernels.template_matching import (
    detect_symmetry,
    ellipsoid_template,
    euler_zyz_to_matrix,
    missing_wedge_weights,
    rotate_volume,
    rotation_set,
    sphere_template,
)
from tomodask.simulate import make_phantom

_BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "picking.py"
_spec = importlib.util.spec_from_file_location("picking_benchmark", _BENCH)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)

RADIUS_A = 90.0


@pytest.fixture(scope="module")
def case():
    return bench.simulated_tomogram(3)


@pytest.fixture(scope="module")
def size_picks(case):
    return pick_particles(case.volume_zyx, pixel_size_angstrom=case.pixel_size_angstrom,
                          particle_radius_angstrom=RADIUS_A, tilt_range_deg=case.tilt_range_deg)


def _scores(picks, case):
    r = case.particle_radius_angstrom / case.pixel_size_angstrom
    return match_picks(picks.coordinates_zyx_px, case.particles_zyx_px, max_distance=r), r


def test_size_picker_finds_particles_not_gold(case, size_picks):
    picks = size_picks
    s, r = _scores(picks, case)
    # measured: P = R = F1 = 1.0 on this tomogram (0.97-1.0 over seeds 1-6)
    assert s.f1 >= 0.9, (s.precision, s.recall)
    # positions: matched-filter refinement puts picks within a fraction of a voxel
    assert np.sqrt(np.mean(s.match_distances**2)) < 1.0
    # every gold bead is detected, and no pick lies on one
    found = picks.gold_centers_zyx_px
    assert all(np.min(np.linalg.norm(found - g, axis=1)) < 3.0 for g in case.gold_zyx_px)
    for p in picks.coordinates_zyx_px:
        assert np.min(np.linalg.norm(case.gold_zyx_px - p, axis=1)) > r
    # centred Å coordinates, x y z order, origin at the tomogram centre (n - 1) / 2
    centre = (np.array(case.volume_zyx.shape) - 1) / 2
    np.testing.assert_allclose(picks.coordinates_xyz_angstrom,
                               (picks.coordinates_zyx_px - centre)[:, ::-1] * case.pixel_size_angstrom)
    assert np.all(np.diff(picks.scores) <= 0) and np.all(picks.scores >= picks.threshold_used)
    assert picks.orientations_matrix is None and len(picks) == len(picks.scores)


def test_template_picker_with_default_sphere(case):
    picks = pick_particles(case.volume_zyx, pixel_size_angstrom=case.pixel_size_angstrom,
                           particle_radius_angstrom=RADIUS_A, method="template",
                           tilt_range_deg=case.tilt_range_deg)
    s, r = _scores(picks, case)
    # measured: F1 = 1.0 here (1.0 on seeds 1-6); correlation peaks 0.28-0.4, noise peaks < 0.1
    assert s.f1 >= 0.9, (s.precision, s.recall)
    assert np.sqrt(np.mean(s.match_distances**2)) < 1.0
    # a sphere is symmetric: one rotation searched, the identity
    assert picks.orientations_matrix.shape == (len(picks), 3, 3)
    np.testing.assert_allclose(picks.orientations_matrix, np.broadcast_to(np.eye(3), (len(picks), 3, 3)))
    for p in picks.coordinates_zyx_px:
        assert np.min(np.linalg.norm(case.gold_zyx_px - p, axis=1)) > r


def test_slab_mask_in_a_thick_tomogram():
    """A 240-slice reconstruction of a 125-slice ice slab: the empty slices are masked."""
    thick = bench.simulated_tomogram(3, thickness_px=240)
    picks = pick_particles(thick.volume_zyx, pixel_size_angstrom=thick.pixel_size_angstrom,
                           particle_radius_angstrom=RADIUS_A)
    z0, z1 = picks.slab_z_range_px
    zs = thick.particles_zyx_px[:, 0]
    assert z0 <= zs.min() and zs.max() < z1
    assert (240 - (z1 - z0)) >= 30  # at least 30 of the 115 empty slices removed (measured: 53)
    s, _ = _scores(picks, thick)
    assert s.f1 >= 0.9


def test_threshold_override_and_polarity(case, size_picks):
    kw = dict(pixel_size_angstrom=case.pixel_size_angstrom, particle_radius_angstrom=RADIUS_A)
    auto = size_picks
    none = pick_particles(case.volume_zyx, threshold=1e6, **kw)
    assert len(none) == 0 and none.threshold_used == 1e6
    assert none.coordinates_zyx_px.shape == (0, 3) and none.coordinates_xyz_angstrom.shape == (0, 3)
    few = pick_particles(case.volume_zyx, threshold=auto.threshold_used, max_picks=5, **kw)
    np.testing.assert_allclose(few.scores, auto.scores[:5])
    bright = pick_particles(-case.volume_zyx, polarity="bright", **kw)
    np.testing.assert_allclose(bright.coordinates_zyx_px, auto.coordinates_zyx_px, atol=1e-4)


def test_overlay_draws_picks(case, size_picks):
    blank = overlay_picks(case.volume_zyx, dataclasses.replace(
        size_picks, coordinates_zyx_px=np.zeros((0, 3)), gold_centers_zyx_px=np.zeros((0, 3))))
    assert blank.dtype == np.uint8 and blank.shape == case.volume_zyx.shape[1:] + (3,)
    assert np.all(blank[..., 0] == blank[..., 1])  # grey: nothing drawn
    one = dataclasses.replace(size_picks, coordinates_zyx_px=size_picks.coordinates_zyx_px[:1],
                              gold_centers_zyx_px=np.zeros((0, 3)))
    rgb = overlay_picks(case.volume_zyx, one, max_size_px=96)
    assert rgb.shape == (96, 96, 3)
    _, cy, cx = one.coordinates_zyx_px[0] / 2
    r = RADIUS_A / case.pixel_size_angstrom / 2
    red = (rgb[..., 0] == 255) & (rgb[..., 1] == 60)
    ys, xs = np.nonzero(red)
    assert len(ys) > 10 and np.allclose(np.hypot(ys - cy, xs - cx), r, atol=1.5)


def test_template_matching_recovers_orientations():
    """Particles with a side lobe, missing wedge and noise: the lobe direction is found."""
    px = 8.0
    ph = make_phantom(5, size_xy_angstrom=(640.0, 640.0), thickness_angstrom=520.0, n_particles=4,
                      particle_radius_angstrom=RADIUS_A, n_gold=0, membrane=False)
    shape = (72, 88, 88)
    vol = ph.volume(pixel_size_angstrom=px, shape_zyx=shape)
    spec = np.fft.rfftn(vol) * missing_wedge_weights(shape, (-60.0, 60.0))
    vol = np.fft.irfftn(spec, s=shape, axes=(0, 1, 2)).astype(np.float32)
    vol += np.random.default_rng(0).normal(0, 0.5 * vol.max(), shape).astype(np.float32)
    r = RADIUS_A / px
    g = np.arange(32) - 16.0
    zz, yy, xx = np.meshgrid(g, g, g, indexing="ij")
    template = ((zz**2 + yy**2 + xx**2 <= r**2).astype(np.float32)
                + ((zz - 0.9 * r) ** 2 + yy**2 + xx**2 <= (0.5 * r) ** 2))
    picks = pick_particles(vol, pixel_size_angstrom=px, particle_radius_angstrom=RADIUS_A, method="template",
                           template_zyx=template, angular_step_deg=30.0, polarity="bright", slab_mask=False)
    truth = ph.particle_centers_xyz_angstrom[:, ::-1] / px + (np.array(shape) - 1) / 2
    s = match_picks(picks.coordinates_zyx_px, truth, max_distance=r)
    assert s.f1 == 1.0
    angles = []
    for i_pick, i_true in s.matched_pairs:
        axis = picks.orientations_matrix[i_pick] @ np.array([0.0, 0.0, 1.0])
        cos = np.clip(axis @ ph.particle_orientations_xyz[i_true], -1, 1)
        angles.append(np.rad2deg(np.arccos(cos)))
    # 30° sampling: the nearest sampled direction is within ~20° of any axis (measured: all < 20°)
    assert max(angles) < 30.0, angles
    np.testing.assert_allclose(euler_zyz_to_matrix(picks.euler_angles_zyz_deg), picks.orientations_matrix,
                               atol=1e-9)


def test_rotation_sampling_and_symmetry():
    rs = rotation_set(30.0, symmetry="none")
    m = rs.matrices
    np.testing.assert_allclose(m @ np.transpose(m, (0, 2, 1)), np.broadcast_to(np.eye(3), m.shape), atol=1e-12)
    assert len(rotation_set(30.0, symmetry="axial")) == 46 and len(rs) == 46 * 12
    assert len(rotation_set(15.0, symmetry="spherical")) == 1
    # directions cover the sphere: every direction has a sampled one within ~the step
    dirs = rotation_set(20.0, symmetry="axial").matrices[:, :, 2]
    probe = np.random.default_rng(1).normal(size=(500, 3))
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    worst = np.rad2deg(np.arccos(np.clip((probe @ dirs.T).max(axis=1), -1, 1))).max()
    assert worst < 20.0
    # rotating a z-elongated ellipsoid by 90° about y lays it along x
    e = ellipsoid_template((10.0, 4.0, 4.0), box_px=32)
    turned = rotate_volume(e, euler_zyz_to_matrix(np.array([0.0, 90.0, 0.0])))
    np.testing.assert_allclose(turned, np.transpose(e, (2, 1, 0)), atol=0.05)
    assert detect_symmetry(sphere_template(8.0)) == "spherical"
    assert detect_symmetry(e) == "axial"
    assert detect_symmetry(ellipsoid_template((10.0, 4.0, 7.0))) == "none"


def test_missing_wedge_geometry():
    w = missing_wedge_weights((64, 8, 64), (-60.0, 60.0))
    # (iz, ix) -> angle atan(kz / kx) of the Fourier point from the kx axis
    assert w[5, 0, 10] == 1.0  # 26.6°
    assert w[-10, 0, 10] == 1.0  # -45°
    assert w[30, 0, 5] == 0.0 and w[-30, 0, 5] == 0.0  # ±80.5°: in the missing wedge
    assert w[0, 3, 0] == 1.0  # the ky axis is measured at every tilt
    asym = missing_wedge_weights((64, 8, 64), (-40.0, 60.0))
    assert asym[12, 0, 10] == 1.0 and asym[-12, 0, 10] == 0.0  # +50.2° sampled, -50.2° missing


def test_threshold_helpers():
    rng = np.random.default_rng(0)
    noise = rng.normal(3.0, 0.7, 400)
    particles = rng.normal(11.0, 1.0, 20)
    thr = automatic_threshold(np.concatenate([noise, particles]), noise_floor=5.0)
    assert 5.0 <= thr <= 8.5
    assert automatic_threshold(noise, noise_floor=5.0) >= 5.0
    a, b = rng.normal(2, 0.5, 100), rng.normal(9, 0.5, 100)
    cut = otsu_threshold(np.concatenate([a, b]))
    assert a.max() < cut < b.min() and abs(cut - (a.max() + b.min()) / 2) < 0.2  # middle of the gap
    few = np.array([0.425, 0.429, 0.442, 0.447])  # only particles: no noise cluster to split off
    assert automatic_threshold(few, noise_floor=0.1) == 0.1
    z, y, x = np.meshgrid(*(np.arange(16.0),) * 3, indexing="ij")
    peak = -((z - 7.3) ** 2 + (y - 8.0) ** 2 + (x - 8.6) ** 2)
    np.testing.assert_allclose(refine_subvoxel(peak, np.array([[7, 8, 9]])), [[7.3, 8.0, 8.6]], atol=1e-6)


def test_match_picks_counts():
    truth = np.array([[0.0, 0, 0], [10, 0, 0], [20, 0, 0]])
    picks = np.array([[1.0, 0, 0], [9, 0, 0], [5, 0, 0], [50, 0, 0]])
    s = match_picks(picks, truth, max_distance=3.0)
    assert (s.n_true_positive, s.n_false_positive, s.n_false_negative) == (2, 2, 1)
    assert s.precision == 0.5 and s.recall == pytest.approx(2 / 3) and s.f1 == pytest.approx(4 / 7)
    # one pick between two particles matches only one of them
    assert match_picks(np.array([[5.0, 0, 0]]), truth[:2], max_distance=6.0).n_true_positive == 1
    assert match_picks(np.zeros((0, 3)), truth, max_distance=3.0).f1 == 0.0


def test_choices_are_validated(case):
    kw = dict(pixel_size_angstrom=8.0, particle_radius_angstrom=RADIUS_A)
    with pytest.raises(ValueError, match="'size', 'template'"):
        pick_particles(case.volume_zyx, method="blob", **kw)
    with pytest.raises(ValueError, match="'dark', 'bright'"):
        pick_particles(case.volume_zyx, polarity="white", **kw)
    with pytest.raises(ValueError, match=r"\(z, y, x\)"):
        pick_particles(case.volume_zyx[0], **kw)
    with pytest.raises(ValueError, match="'none', 'axial', 'spherical'"):
        rotation_set(30.0, symmetry="cubic")
