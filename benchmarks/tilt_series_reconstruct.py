"""Tomogram reconstruction: tomodask vs astra-toolbox (CPU) and torch-tomogram.

Every tool reconstructs the same aligned, simulated tilt-series (tilt axis along Y, no
shifts; :func:`tomodask.simulate.simulate_tilt_series`) and is scored against the
ground-truth phantom: Pearson correlation over the reconstructed slab after a Gaussian
low-pass of ``LOWPASS_SIGMA_PX`` voxels on both volumes (the reconstructions carry little
signal beyond that; see :func:`correlation_with_phantom`). Each tool gets the same input,
each tilt turned into relative contrast and sign-inverted (``1 - I / mean(I)``) so that
protein is positive like the phantom's phase density.

Tools
    tomodask WBP / SIRT-like: :func:`tomodask.kernels.reconstruct.reconstruct_tomogram`,
    all y slices at once ("auto": cross-validated SIRT-like iterations, with the
    coarse-grid SIRT correction where the cross-validation takes it and its
    missing-wedge part always; "no coarse SIRT": the filter alone). astra FBP (ram-lak), SIRT and SART with the ``linear`` 2D
    projector on the CPU, slice by slice along the tilt axis. torch-tomogram
    (Fourier-space back-projection of sub-volumes), CPU.

Timing: wall-clock seconds on the CPU, cold (the projector's sparse matrix is rebuilt for
every run, as for every new tilt-series), fastest of up to three runs for the quick tools.

Run ``python benchmarks/tilt_series_reconstruct.py [--quick] [--json OUT.json]``; ``--seeds 2 3``
simulates other series for the central-slice cases (default seeds 0 and 1) and
``--central-only`` skips the whole volumes (and torch-tomogram), e.g. to check a change on
series it was not developed on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import benchmark_parser, machine, timed, write_json  # noqa: E402

from tomodask.kernels.projector import clear_projector_cache  # noqa: E402
from tomodask.kernels.reconstruct import lowpass_correlation, reconstruct_tomogram, sirt_refine  # noqa: E402
from tomodask.simulate import simulate_tilt_series  # noqa: E402

#: Gaussian low-pass (voxels) applied to reconstruction and phantom before correlating.
LOWPASS_SIGMA_PX = 1.0
#: Runs faster than this many seconds are repeated up to this many times; the fastest counts.
REPEATS_BELOW_SECONDS = (3.0, 3)


@dataclass(frozen=True)
class Case:
    """One aligned tilt-series and its ground truth."""

    name: str
    contrast_tyx: np.ndarray
    tilt_angles_deg: np.ndarray
    pixel_size_angstrom: float
    phantom_zyx: np.ndarray

    @property
    def thickness_px(self) -> int:
        return self.phantom_zyx.shape[0]


def correlation_with_phantom(volume_zyx: np.ndarray, phantom_zyx: np.ndarray) -> float:
    """Pearson r with the phantom after a Gaussian low-pass of ``LOWPASS_SIGMA_PX`` voxels."""
    return lowpass_correlation(np.asarray(volume_zyx), phantom_zyx, lowpass_sigma_px=LOWPASS_SIGMA_PX)


def make_case(*, size_px: int, pixel_size_angstrom: float, dose_per_tilt: float, seed: int = 0,
              n_slices: int | None = None) -> Case:
    """Simulate an aligned tilt-series (optionally only the central ``n_slices`` rows)."""
    ts = simulate_tilt_series(seed, shape_yx=(size_px, size_px), pixel_size_angstrom=pixel_size_angstrom,
                              tilt_axis_angle_deg=0.0, shift_std_angstrom=0.0, shift_std_per_deg_angstrom=0.0,
                              dose_per_tilt_e_per_angstrom2=dose_per_tilt)
    nz = int(np.ceil(ts.spec.thickness_angstrom / pixel_size_angstrom)) + 8
    phantom = ts.phantom_volume(pixel_size_angstrom=pixel_size_angstrom, shape_zyx=(nz, size_px, size_px))
    images = ts.images.astype(np.float32)
    contrast = 1.0 - images / images.mean(axis=(1, 2), keepdims=True)
    rows = slice(None)
    if n_slices is not None:
        y0 = (size_px - n_slices) // 2
        rows = slice(y0, y0 + n_slices)
    name = (f"{size_px}x{size_px}, {len(ts.tilts)} tilts, {pixel_size_angstrom:g} A/px, {dose_per_tilt:g} e/A2/tilt,"
            f" seed {seed}")
    if n_slices is not None:
        name += f", {n_slices} slices"
    return Case(name=name, contrast_tyx=np.ascontiguousarray(contrast[:, rows]),
                tilt_angles_deg=ts.tilt_angles_deg, pixel_size_angstrom=pixel_size_angstrom,
                phantom_zyx=np.ascontiguousarray(phantom[:, rows]))


def tomodask_reconstruct(case: Case, **options) -> np.ndarray:
    """tomodask WBP on the (already normalised, sign-inverted) contrast stack."""
    return reconstruct_tomogram(case.contrast_tyx, case.tilt_angles_deg, pixel_size_angstrom=case.pixel_size_angstrom,
                                thickness_px=case.thickness_px, normalize=False, **options)


def tomodask_sirt_from_zero(case: Case, n_iterations: int) -> np.ndarray:
    """Plain SIRT with tomodask's projector pair, started from zero (as astra's SIRT)."""
    n_t, ny, nx = case.contrast_tyx.shape
    start = np.zeros((case.thickness_px, ny, nx), dtype=np.float32)
    return sirt_refine(start, case.contrast_tyx, case.tilt_angles_deg, n_iterations=n_iterations)


def astra_reconstruct(case: Case, algorithm: str, iterations: int = 1) -> np.ndarray:
    """astra-toolbox 2D CPU reconstruction, slice by slice along the tilt axis.

    astra's parallel-beam angle is the negative of tomodask's tilt angle for the same
    ``(z, x)`` slice layout (checked against :func:`tomodask.kernels.projector.project_volume`).
    """
    import astra

    n_t, ny, nx = case.contrast_tyx.shape
    nz = case.thickness_px
    vol_geom = astra.create_vol_geom(nz, nx)
    proj_geom = astra.create_proj_geom("parallel", 1.0, nx, -np.deg2rad(case.tilt_angles_deg))
    projector = astra.create_projector("linear", proj_geom, vol_geom)
    out = np.empty((nz, ny, nx), dtype=np.float32)
    sino_id = astra.data2d.create("-sino", proj_geom)
    rec_id = astra.data2d.create("-vol", vol_geom)
    cfg = astra.astra_dict(algorithm)
    cfg["ProjectorId"] = projector
    cfg["ProjectionDataId"] = sino_id
    cfg["ReconstructionDataId"] = rec_id
    alg_id = astra.algorithm.create(cfg)
    try:
        for y in range(ny):
            astra.data2d.store(sino_id, case.contrast_tyx[:, y, :])
            astra.data2d.store(rec_id, 0.0)
            astra.algorithm.run(alg_id, iterations)
            out[:, y, :] = astra.data2d.get(rec_id)
    finally:
        astra.algorithm.delete(alg_id)
        astra.data2d.delete([sino_id, rec_id])
        astra.projector.delete(projector)
    return out


def torch_tomogram_reconstruct(case: Case) -> np.ndarray:
    """torch-tomogram (Fourier-space back-projection of tiled sub-volumes), CPU."""
    import torch
    from torch_tomogram import Tomogram

    n_t, ny, nx = case.contrast_tyx.shape
    tomo = Tomogram(tilt_angles=torch.as_tensor(case.tilt_angles_deg, dtype=torch.float32),
                    tilt_axis_angle=torch.zeros(n_t), sample_translations=torch.zeros(n_t, 2),
                    images=torch.as_tensor(case.contrast_tyx))
    with torch.no_grad():
        vol = tomo.reconstruct_tomogram((case.thickness_px, ny, nx), sidelength=64)
    return vol.numpy()


def _ours() -> list[tuple[str, Callable[[Case], np.ndarray]]]:
    return [
        ("tomodask WBP ramp", lambda c: tomodask_reconstruct(c)),
        ("tomodask WBP exact", lambda c: tomodask_reconstruct(c, weighting="exact")),
        ("tomodask SIRT-like 10", lambda c: tomodask_reconstruct(c, sirt_like_iterations=10)),
        ("tomodask SIRT-like auto exact", lambda c: tomodask_reconstruct(c, weighting="exact",
                                                                         sirt_like_iterations="auto")),
        ("tomodask SIRT-like auto exact, no coarse SIRT", lambda c: tomodask_reconstruct(
            c, weighting="exact", sirt_like_iterations="auto", coarse_sirt_binning=0)),
        ("tomodask SIRT-like auto exact + 3 SIRT", lambda c: tomodask_reconstruct(
            c, weighting="exact", sirt_like_iterations="auto", sirt_iterations=3)),
    ]


def _iterative_peers() -> list[tuple[str, Callable[[Case], np.ndarray]]]:
    return [
        ("tomodask SIRT 50 from zero", lambda c: tomodask_sirt_from_zero(c, 50)),
        *[(f"astra SIRT {n} (CPU)", lambda c, n=n: astra_reconstruct(c, "SIRT", n)) for n in (5, 10, 20, 50)],
        ("astra SART 1 epoch (CPU)", lambda c: astra_reconstruct(c, "SART", len(c.tilt_angles_deg))),
        ("astra SART 5 epochs (CPU)", lambda c: astra_reconstruct(c, "SART", 5 * len(c.tilt_angles_deg))),
    ]


def reconstruct_rows(*, quick: bool, seeds: tuple[int, ...] = (0, 1), central_only: bool = False) -> list[dict]:
    """Run every tool on the benchmark cases; one row per (tool, case).

    Quick: 128 px at 12 A/px. Full: 256 px at 8 A/px, plus a full-size tilt-series, a
    4096 px detector at 1.5 A/px binned 8x (512 px at 12 A/px), simulated directly at the
    binned pixel size. Whole volumes: every tomodask setting, astra FBP (and
    torch-tomogram on the smaller one; seed 0), and astra's iterative methods on the quick
    one (too slow for the full-size ones); central slices of each of ``seeds`` at 3 and
    1 e-/A2 per tilt (and 16 of the full-size one, seed 0): astra's iterative methods too.
    ``central_only``: no whole volumes.
    """
    size, px, n_slices = (128, 12.0, 16) if quick else (256, 8.0, 32)
    subsets = [make_case(size_px=size, pixel_size_angstrom=px, dose_per_tilt=dose, seed=seed, n_slices=n_slices)
               for seed in seeds for dose in (3.0, 1.0)]
    if not quick and 0 in seeds:
        subsets.append(make_case(size_px=512, pixel_size_angstrom=12.0, dose_per_tilt=3.0, n_slices=16))
    if central_only:
        return run_all(case_runs([], subsets))
    full = make_case(size_px=size, pixel_size_angstrom=px, dose_per_tilt=3.0)
    wholes = [full] if quick else [full, make_case(size_px=512, pixel_size_angstrom=12.0, dose_per_tilt=3.0)]
    runs = case_runs(wholes, subsets, iterative_wholes=quick)
    runs.append(("torch-tomogram (CPU)", full, torch_tomogram_reconstruct))
    return run_all(runs)


def case_runs(wholes: list[Case], subsets: list[Case], *,
              iterative_wholes: bool = False) -> list[tuple[str, Case, Callable[[Case], np.ndarray]]]:
    """(tool, case, function) for every tomodask setting and astra FBP on all cases, and
    astra's iterative methods on the (central-slice) ``subsets`` and, if
    ``iterative_wholes``, on the ``wholes`` too."""
    runs: list[tuple[str, Case, Callable[[Case], np.ndarray]]] = []
    for case in wholes + subsets:
        runs += [(tool, case, fn) for tool, fn in _ours()]
        runs.append(("astra FBP ram-lak (CPU)", case, lambda c: astra_reconstruct(c, "FBP")))
    for case in (wholes if iterative_wholes else []) + subsets:
        runs += [(tool, case, fn) for tool, fn in _iterative_peers()]
    return runs


def run_all(runs: list[tuple[str, Case, Callable[[Case], np.ndarray]]]) -> list[dict]:
    """Time and score each run: cold projector cache, fastest of up to three quick runs."""
    rows = []
    for tool, case, fn in runs:
        seconds = float("inf")
        for _ in range(REPEATS_BELOW_SECONDS[1]):
            clear_projector_cache()  # every tilt-series has its own angles: time the cold path
            vol, once = timed(fn, case)
            seconds = min(seconds, once)
            if once > REPEATS_BELOW_SECONDS[0]:
                break
        rows.append({"tool": tool, "step": "reconstruct", "case": case.name, "seconds": round(seconds, 4),
                     "correlation": round(correlation_with_phantom(vol, case.phantom_zyx), 4)})
    return rows


def _table(rows: list[dict]) -> str:
    """Per case: seconds, speed relative to astra FBP, r, and r minus astra's best iterative r."""
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows):
        sel = [r for r in rows if r["case"] == case]
        ref = next((r["seconds"] for r in sel if r["tool"].startswith("astra FBP")), None)
        iterative = [r["correlation"] for r in sel if r["tool"].startswith(("astra SIRT", "astra SART"))]
        best = max(iterative) if iterative else None
        lines.append(f"\n{case}" + (f" (astra best iterative r = {best:.4f})" if best is not None else ""))
        lines.append(f"  {'tool':46s} {'seconds':>9s} {'speed vs astra FBP':>19s} {'corr':>7s} {'- astra best':>12s}")
        for r in sel:
            ratio = f"{ref / r['seconds']:.2f}" if ref else "-"
            diff = f"{r['correlation'] - best:+.4f}" if best is not None else "-"
            lines.append(f"  {r['tool']:46s} {r['seconds']:9.3f} {ratio:>19s} {r['correlation']:7.4f} {diff:>12s}")
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="simulation seeds of the central-slice cases (default: 0 1)")
    parser.add_argument("--central-only", action="store_true", help="central-slice cases only, no whole volumes")
    args = parser.parse_args()
    rows = reconstruct_rows(quick=args.quick, seeds=tuple(args.seeds), central_only=args.central_only)
    info = machine()
    print(f"machine: {info['machine']}, {info['cpus']} CPUs, python {info['python']}, {info['date']}")
    print(_table(rows))
    if args.json:
        write_json(args.json, "tilt_series_reconstruct", rows)


if __name__ == "__main__":
    main()
