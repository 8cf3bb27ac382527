"""Particle picking: tomodask (size-based and template matching) vs scikit-image ``blob_log``.

Every picker gets the same tomograms: simulated tilt-series at the simulator's default dose
(:func:`tomodask.simulate.simulate_tilt_series`, 3 e-/Å² per tilt, 41 tilts, ±60°, tilt axis
along Y, no shifts), 4 Å pixels, reconstructed by
:func:`tomodask.kernels.reconstruct.reconstruct_tomogram` at 8 Å voxels (plain ramp WBP, no
CTF correction), with 20 particles of radius 90 Å, 4 gold beads and a vesicle membrane
(``--quick``: two tomograms; otherwise four, plus two at half the dose). A pick matches a
particle when it lies within one particle radius (one-to-one, Hungarian:
:func:`tomodask.kernels.picking_metrics.match_picks`); the table also counts picks within one
radius of a gold bead and the RMS distance of matched picks to the true centres.

Tools
    tomodask size: :func:`tomodask.kernels.picking.pick_particles` with ``method="size"`` and
    its automatic threshold. tomodask template: ``method="template"`` with the default sphere
    template of the particle radius (spherical, so one rotation). scikit-image
    ``blob_log`` (3D): on the sign-flipped tomogram (particles bright) scaled to zero median
    and unit standard deviation, ``overlap=0.5``, ``exclude_border`` one radius; its sigma
    range (``r / sqrt(3)``, the LoG optimum for a sphere of radius ``r`` voxels, alone or
    0.8-1.2 times it in 3 scales) and its ``threshold`` (13 values, 0.2-0.8) are chosen for
    the best F1 on a separate tuning tomogram at the same dose (seed 101), never on the test
    ones.
    pytom-match-pick is GPU-only (CUDA via cupy) and this machine has no GPU, so it has no
    row; the table says so.

Run ``python benchmarks/picking.py [--quick] [--json OUT.json]``.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, as a script or imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tomodask from the checkout

from _common import print_table, timed, write_json  # noqa: E402

from tomodask.kernels.picking import pick_particles  # noqa: E402
from tomodask.kernels.picking_metrics import match_picks  # noqa: E402
from tomodask.kernels.reconstruct import reconstruct_tomogram  # noqa: E402
from tomodask.simulate import AcquisitionSpec, simulate_tilt_series  # noqa: E402

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
    """Simulate an aligned tilt-series (the default dose unless given) and reconstruct it.

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


#: ``blob_log`` sigma ranges tried in tuning: (min, max) as fractions of the LoG optimum
#: ``r / sqrt(3)`` for a sphere of radius ``r`` voxels, and the number of scales.
BLOB_LOG_SIGMAS = ((1.0, 1.0, 1), (0.8, 1.2, 3))
#: ``blob_log`` thresholds tried in tuning (on the tomogram scaled to zero median, unit std).
BLOB_LOG_THRESHOLDS = tuple(np.round(np.geomspace(0.2, 0.8, 13), 3))


def picked_coordinates(volume_zyx: np.ndarray, method: str, options: dict) -> np.ndarray:
    """``(n, 3)`` voxel coordinates tomodask's picker finds in ``volume_zyx`` with ``method``."""
    return pick_particles(volume_zyx, method=method, **options).coordinates_zyx_px


def run_blob_log(case: PickingCase, setting: tuple[float, tuple[float, float, int]]) -> np.ndarray:
    """scikit-image ``blob_log`` on the sign-flipped tomogram; returns ``(n, 3)`` zyx picks."""
    from skimage.feature import blob_log

    threshold, (lo, hi, n) = setting
    vol = -case.volume_zyx
    vol = (vol - np.median(vol)) / vol.std()
    r = case.particle_radius_angstrom / case.pixel_size_angstrom
    blobs = blob_log(vol, min_sigma=lo * r / np.sqrt(3), max_sigma=hi * r / np.sqrt(3), num_sigma=n,
                     threshold=threshold, overlap=0.5, exclude_border=int(np.ceil(r)))
    return blobs[:, :3].astype(np.float64)


def tune_blob_log(case: PickingCase) -> tuple[tuple[float, tuple[float, float, int]], float]:
    """Best ``blob_log`` (threshold, sigma range) and its F1 on a tuning tomogram."""
    r = case.particle_radius_angstrom / case.pixel_size_angstrom
    best = ((BLOB_LOG_THRESHOLDS[0], BLOB_LOG_SIGMAS[0]), -1.0)
    for sigmas in BLOB_LOG_SIGMAS:
        for thr in BLOB_LOG_THRESHOLDS:
            setting = (float(thr), sigmas)
            f1 = match_picks(run_blob_log(case, setting), case.particles_zyx_px, max_distance=r).f1
            if f1 > best[1]:
                best = (setting, f1)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="two tomograms at the default dose (else four, plus two at half dose)")
    parser.add_argument("--json", metavar="OUT.json", help="write the rows as JSON")
    args = parser.parse_args()

    default_dose = AcquisitionSpec().dose_per_tilt_e_per_angstrom2
    cases = [(seed, default_dose) for seed in ([11, 12] if args.quick else [11, 12, 13, 14])]
    if not args.quick:
        cases += [(seed, default_dose / 2) for seed in (15, 16)]
    blob_settings = {}
    for dose in dict.fromkeys(d for _, d in cases):
        tuning = simulated_tomogram(101, dose_per_tilt_e_per_angstrom2=dose)
        blob_settings[dose] = tune_blob_log(tuning)

    rows = []
    for seed, dose in cases:
        case = simulated_tomogram(seed, dose_per_tilt_e_per_angstrom2=dose)
        label = f"seed {seed}, {dose:g} e/A2/tilt"
        r = case.particle_radius_angstrom / case.pixel_size_angstrom
        common = dict(pixel_size_angstrom=case.pixel_size_angstrom,
                      particle_radius_angstrom=case.particle_radius_angstrom, tilt_range_deg=case.tilt_range_deg)
        for tool, fn in [
            ("tomodask size", functools.partial(picked_coordinates, case.volume_zyx, "size", common)),
            ("tomodask template", functools.partial(picked_coordinates, case.volume_zyx, "template", common)),
            ("skimage blob_log", functools.partial(run_blob_log, case, blob_settings[dose][0])),
        ]:
            picks, seconds = timed(fn)
            s = match_picks(picks, case.particles_zyx_px, max_distance=r)
            on_gold = sum(bool(np.min(np.linalg.norm(case.gold_zyx_px - p, axis=1)) < r) for p in picks
                          ) if len(case.gold_zyx_px) else 0
            rows.append({"tool": tool, "step": "pick", "case": label, "seconds": round(seconds, 3),
                         "f1": round(s.f1, 3), "precision": round(s.precision, 3), "recall": round(s.recall, 3),
                         "n_picks": int(len(picks)), "picks_on_gold": int(on_gold),
                         "position_rms_px": round(float(np.sqrt(np.mean(s.match_distances**2))), 2)
                         if s.n_true_positive else None})
    blob_seconds = {r["case"]: r["seconds"] for r in rows if r["tool"] == "skimage blob_log"}
    for row in rows:
        row["speedup_vs_blob_log"] = round(blob_seconds[row["case"]] / row["seconds"], 2)
    summary = []
    for tool in dict.fromkeys(r["tool"] for r in rows):
        sel = [r for r in rows if r["tool"] == tool]
        summary.append({"tool": tool, "case": "mean", "seconds": float(np.mean([r["seconds"] for r in sel])),
                        "f1": float(np.mean([r["f1"] for r in sel])),
                        "speedup_vs_blob_log": float(np.mean([r["speedup_vs_blob_log"] for r in sel]))})

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}")
    print("tomograms:", simulated_tomogram.__doc__.splitlines()[0])
    for dose, ((thr, (lo, hi, n)), f1) in blob_settings.items():
        print(f"blob_log at {dose:g} e/A2/tilt: threshold {thr:g}, sigma {lo:g}-{hi:g} x r/sqrt(3) in {n} "
              f"scale(s), tuned on seed 101 (tuning F1 {f1:.3f})")
    print(PYTOM_NOTE)
    print_table(rows, ["tool", "case", "seconds", "speedup_vs_blob_log", "f1", "precision", "recall",
                       "picks_on_gold", "position_rms_px"])
    print()
    print_table(summary, ["tool", "case", "seconds", "speedup_vs_blob_log", "f1"])
    if args.json:
        write_json(args.json, "picking", rows)


if __name__ == "__main__":
    main()
