"""Particle picking: tomodask (size-based and template matching) vs scikit-image ``blob_log``.

Every picker gets the same tomograms: simulated tilt-series at the simulator's default dose
(:func:`tomodask.simulate.simulate_tilt_series`, 3 e-/Å² per tilt, 41 tilts, ±60°, tilt axis
along Y, no shifts), 4 Å pixels, reconstructed by
:func:`tomodask.kernels.reconstruct.reconstruct_tomogram` at 8 Å voxels (plain ramp WBP, no
CTF correction), with 20 particles of radius 90 Å, gold beads and a vesicle membrane. A pick
matches a particle when it lies within one particle radius (one-to-one, Hungarian:
:func:`tomodask.kernels.picking_metrics.match_picks`).

Tools
    tomodask size: :func:`tomodask.kernels.picking.pick_particles` with ``method="size"`` and
    its automatic threshold. tomodask template: ``method="template"`` with the default sphere
    template of the particle radius (spherical, so one rotation). scikit-image
    ``blob_log`` (3D): on the sign-flipped tomogram (particles bright), sigmas from
    ``0.5 r / sqrt(3)`` to ``1.5 r / sqrt(3)`` (5 scales, ``r`` the radius in voxels),
    ``overlap=0.5``, ``exclude_border`` one radius, and its ``threshold`` chosen for the best
    F1 on a separate tuning tomogram (another seed), never on the test tomograms.
    pytom-match-pick is GPU-only (CUDA via cupy) and this machine has no GPU, so it has no
    row; the table says so.

Run ``python benchmarks/picking.py [--quick] [--json OUT.json]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from dataclasses import dataclass

import numpy as np

from tomodask.kernels.picking import pick_particles
from tomodask.kernels.picking_metrics import match_picks
from tomodask.kernels.reconstruct import reconstruct_tomogram
from tomodask.simulate import simulate_tilt_series

PYTOM_NOTE = ("pytom-match-pick: not run, it needs a CUDA GPU (cupy) and this machine has none; "
              "no row is reported for it")


@dataclass(frozen=True)
class PickingCase:
    """A reconstructed tomogram with its ground truth (voxel coordinates of the tomogram).

    Attributes
    ----------
    name
        Short description.
    volume_zyx
        ``(z, y, x)`` float32 tomogram (protein dark).
    pixel_size_angstrom
        Voxel size.
    particle_radius_angstrom
        Radius of the particles' main sphere.
    particles_zyx_px
        ``(n, 3)`` true particle centres in voxels.
    gold_zyx_px
        ``(m, 3)`` true gold-bead centres in voxels.
    tilt_range_deg
        Tilt range of the tilt-series.
    particle_orientations_xyz
        ``(n, 3)`` unit vector of each particle's side lobe (x, y, z).
    """

    name: str
    volume_zyx: np.ndarray
    pixel_size_angstrom: float
    particle_radius_angstrom: float
    particles_zyx_px: np.ndarray
    gold_zyx_px: np.ndarray
    tilt_range_deg: tuple[float, float]
    particle_orientations_xyz: np.ndarray


@functools.lru_cache(maxsize=4)
def _simulate(seed: int, size_px: int, pixel_size_angstrom: float, thickness_angstrom: float,
              particle_radius_angstrom: float, n_particles: int, n_gold: int, spec_items: tuple):
    """Aligned tilt-series (cached: tests reconstruct one series at several thicknesses)."""
    return simulate_tilt_series(seed, shape_yx=(size_px, size_px), pixel_size_angstrom=pixel_size_angstrom,
                                tilt_axis_angle_deg=0.0, shift_std_angstrom=0.0, shift_std_per_deg_angstrom=0.0,
                                thickness_angstrom=thickness_angstrom,
                                particle_radius_angstrom=particle_radius_angstrom, n_particles=n_particles,
                                n_gold=n_gold, **dict(spec_items))


def simulated_tomogram(seed: int, *, size_px: int = 384, pixel_size_angstrom: float = 4.0,
                       output_pixel_size_angstrom: float = 8.0, thickness_angstrom: float = 1000.0,
                       thickness_px: int = 160, particle_radius_angstrom: float = 90.0,
                       n_particles: int = 20, n_gold: int = 4, **spec_fields) -> PickingCase:
    """Simulate an aligned tilt-series at the default dose and reconstruct it.

    Truth positions account for the binning: Fourier cropping keeps image index 0 fixed, so
    original index ``i`` lands at binned index ``i * n_out / n_in``.
    """
    ts = _simulate(seed, size_px, pixel_size_angstrom, thickness_angstrom, particle_radius_angstrom, n_particles,
                   n_gold, tuple(sorted(spec_fields.items())))
    vol = reconstruct_tomogram(ts.images, ts.tilt_angles_deg, pixel_size_angstrom=pixel_size_angstrom,
                               thickness_px=thickness_px, output_pixel_size_angstrom=output_pixel_size_angstrom)
    ny_out = vol.shape[1]
    scale = ny_out / size_px
    px_out = pixel_size_angstrom / scale

    def to_voxels(xyz_angstrom: np.ndarray) -> np.ndarray:
        xyz = np.asarray(xyz_angstrom, dtype=np.float64).reshape(-1, 3)
        z = (thickness_px - 1) / 2 + xyz[:, 2] / px_out
        y = ((size_px - 1) / 2 + xyz[:, 1] / pixel_size_angstrom) * scale
        x = ((size_px - 1) / 2 + xyz[:, 0] / pixel_size_angstrom) * scale
        return np.stack([z, y, x], axis=1)

    ph = ts.phantom
    lo, hi = ts.spec.tilt_range_deg
    name = (f"seed {seed}: {vol.shape[2]}x{vol.shape[1]}x{vol.shape[0]} vox at {px_out:g} A, "
            f"{len(ph.particle_centers_xyz_angstrom)} particles r={particle_radius_angstrom:g} A, "
            f"{len(ph.gold_centers_xyz_angstrom)} gold, membrane")
    return PickingCase(name=name, volume_zyx=vol, pixel_size_angstrom=px_out,
                       particle_radius_angstrom=particle_radius_angstrom,
                       particles_zyx_px=to_voxels(ph.particle_centers_xyz_angstrom),
                       gold_zyx_px=to_voxels(ph.gold_centers_xyz_angstrom), tilt_range_deg=(lo, hi),
                       particle_orientations_xyz=np.asarray(ph.particle_orientations_xyz))


def blob_log_sigmas(case: PickingCase) -> tuple[float, float]:
    """Sigma range for ``blob_log`` from the particle radius (LoG optimum r / sqrt(3))."""
    r = case.particle_radius_angstrom / case.pixel_size_angstrom
    return 0.5 * r / np.sqrt(3), 1.5 * r / np.sqrt(3)


def run_blob_log(case: PickingCase, threshold: float) -> np.ndarray:
    """scikit-image ``blob_log`` on the sign-flipped tomogram; returns ``(n, 3)`` zyx picks."""
    from skimage.feature import blob_log

    vol = -case.volume_zyx
    vol = (vol - np.median(vol)) / vol.std()
    lo, hi = blob_log_sigmas(case)
    r = case.particle_radius_angstrom / case.pixel_size_angstrom
    blobs = blob_log(vol, min_sigma=lo, max_sigma=hi, num_sigma=5, threshold=threshold, overlap=0.5,
                     exclude_border=int(np.ceil(r)))
    return blobs[:, :3].astype(np.float64)


def tune_blob_log(case: PickingCase, thresholds: np.ndarray) -> tuple[float, float]:
    """Best ``blob_log`` threshold (and its F1) on a tuning tomogram."""
    r = case.particle_radius_angstrom / case.pixel_size_angstrom
    best = (float(thresholds[0]), -1.0)
    for thr in thresholds:
        f1 = match_picks(run_blob_log(case, float(thr)), case.particles_zyx_px, max_distance=r).f1
        if f1 > best[1]:
            best = (float(thr), f1)
    return best


def timed(fn, *args, **kwargs):
    """Call ``fn`` and return ``(result, seconds)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two test tomograms instead of four")
    parser.add_argument("--json", metavar="OUT.json", help="write the rows as JSON")
    args = parser.parse_args()

    test_seeds = [11, 12] if args.quick else [11, 12, 13, 14]
    tuning = simulated_tomogram(101)
    blob_thr, blob_tune_f1 = tune_blob_log(tuning, np.round(np.arange(0.02, 0.41, 0.02), 3))

    rows = []
    for seed in test_seeds:
        case = simulated_tomogram(seed)
        r = case.particle_radius_angstrom / case.pixel_size_angstrom
        common = dict(pixel_size_angstrom=case.pixel_size_angstrom,
                      particle_radius_angstrom=case.particle_radius_angstrom)
        for tool, fn in [
            ("tomodask size", lambda: pick_particles(case.volume_zyx, method="size", **common).coordinates_zyx_px),
            ("tomodask template", lambda: pick_particles(case.volume_zyx, method="template",
                                                         tilt_range_deg=case.tilt_range_deg,
                                                         **common).coordinates_zyx_px),
            ("skimage blob_log", lambda: run_blob_log(case, blob_thr)),
        ]:
            picks, seconds = timed(fn)
            s = match_picks(picks, case.particles_zyx_px, max_distance=r)
            gold_picked = int(sum(np.min(np.linalg.norm(case.gold_zyx_px - p, axis=1)) < r for p in picks)
                              ) if len(picks) and len(case.gold_zyx_px) else 0
            rows.append({"tool": tool, "step": "pick", "case": case.name, "seconds": round(seconds, 3),
                         "f1": round(s.f1, 3), "precision": round(s.precision, 3), "recall": round(s.recall, 3),
                         "n_picks": int(len(picks)), "gold_picked": gold_picked})

    print(f"machine: {platform.machine()} {platform.processor() or ''}, numpy {np.__version__}")
    print(f"blob_log threshold {blob_thr:g} tuned on seed 101 (tuning F1 {blob_tune_f1:.3f})")
    print(PYTOM_NOTE)
    header = f"{'tool':<20} {'case':<62} {'seconds':>8} {'F1':>6} {'P':>6} {'R':>6} {'gold':>5}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['tool']:<20} {row['case']:<62} {row['seconds']:>8.2f} {row['f1']:>6.3f} "
              f"{row['precision']:>6.3f} {row['recall']:>6.3f} {row['gold_picked']:>5d}")
    summary = {}
    for tool in dict.fromkeys(r["tool"] for r in rows):
        sel = [r for r in rows if r["tool"] == tool]
        summary[tool] = {"seconds": float(np.mean([r["seconds"] for r in sel])),
                         "f1": float(np.mean([r["f1"] for r in sel]))}
    ref = summary["skimage blob_log"]
    print()
    for tool, v in summary.items():
        print(f"mean {tool:<20} {v['seconds']:7.2f} s  F1 {v['f1']:.3f}   speed-up vs blob_log "
              f"{ref['seconds'] / v['seconds']:5.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"benchmark": "picking", "rows": rows, "summary": summary,
                       "blob_log_threshold": blob_thr, "blob_log_tuning_f1": blob_tune_f1,
                       "notes": [PYTOM_NOTE]}, fh, indent=2)


if __name__ == "__main__":
    main()
