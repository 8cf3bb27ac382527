"""Benchmark: per-movie processing, tomodask vs torch-motion-correction (and CTF rows).

Motion: every tool aligns the same simulated tilt movies in one run
(:func:`tomodask.simulate.simulate_single_tilt`: 1.5 Å/px, 10 frames of 0.2-0.45 e-/px,
tilted specimens, several pixels of decaying drift plus jitter, Poisson counts, gain and
dead/hot pixels). Every tool gets the same gain-corrected frames with defects replaced
(:mod:`tomodask.kernels.gain`). The score is the RMS over frames (and movies of a case) of
the error of the zero-mean global frame displacements against the simulator's truth
``truth.frame_shifts_px``; seconds are the median wall time per movie, or with ``--cpu-time``
the median single-threaded CPU time (below).

Tools
    tomodask: :func:`tomodask.kernels.motion.align_frames` with its defaults (B = 150 Å²,
    at most 5 x 5 patches of at least 192 px for local motion: 4 x 4 at 512²), without local motion (``patches_yx=None``, the
    counterpart of the peer's global and patch modes), with B = 500 Å² (MotionCor2's global
    value) and with 5 x 5 patches whatever the frame size (``min_patch_px=1``, the default
    before patches had a smallest size);
    its time includes the aligned, even/odd and dose-weighted sums. numpy's BLAS runs
    single-threaded as in a Dask worker; FFTs use all cores (``scipy.fft.set_workers``),
    as torch does by default.
    torch-motion-correction 0.6.0 (CPU, torch's default threads), estimation only:
    ``estimate_global_motion`` (whole frames, middle frame as reference, integer peaks);
    ``estimate_motion_cross_correlation_patches`` started from it (patches of a quarter of
    the frame side but at least 256 px, 50 % overlap, leave-one-out reference, sub-pixel peaks, temporal smoothing,
    outlier rejection); and its most accurate mode, ``estimate_local_motion`` started from
    the global field (Adam, 100 iterations, MSE loss, lr = 0.1 Å: the default 0.01 Å moves
    the field by at most ~1 Å in 100 steps; patches as above, a (t, 2, 2) field).
    The peers' global displacement per frame is their field averaged over an 8 x 8 grid.

Run::

    python benchmarks/movie.py [--quick] [--json OUT.json] [--skip-peers] [--skip-ctf] [--case TEXT] [--tools TEXT]
                               [--cpu-time] [--repeats N]

``--cpu-time`` measures CPU seconds instead of wall seconds, independent of the machine's load:
every tool runs single-threaded (torch 1 thread, scipy.fft 1 worker, numpy's BLAS 1 thread through
threadpoolctl when installed, else the environment variables set before numpy loads), each movie
``--repeats`` times (default 3), tools interleaved, and ``time.process_time`` is taken; the
median per movie, then over the case's movies, is reported. The load average is printed and
stored in the JSON.

``--quick`` runs the 512² and 1024² cases; without it the full detector sizes are added
(4096² x 40 frames and 5760 x 4092 x 10 frames: minutes to simulate (~4 min and 2 GB for the
4096² movie); the peer's local optimizer would take ~25 min per 4096² movie on 2 cores, leave it
out with ``--tools "tomodask,global,xc patches"``).
The CTF rows come from ``benchmarks/movie_ctf.py`` (``ctf_rows``) when that module exists.
Install the peer with ``pip install torch==2.13.0`` first, then
``pip install torch-motion-correction``.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# As in a Dask worker (distributed's nanny pre-spawn environment): single-threaded BLAS for numpy.
# Set before numpy loads. torch keeps its own default threads; tomodask's FFTs get the same cores
# through scipy.fft.set_workers below.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, as a script or imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tomodask from the checkout

from _common import add_ratios, benchmark_parser, print_table, write_json  # noqa: E402

from tomodask.kernels.gain import apply_gain, find_defect_pixels, replace_defect_pixels  # noqa: E402
from tomodask.kernels.motion import align_frames  # noqa: E402
from tomodask.simulate import simulate_single_tilt  # noqa: E402

PIXEL_ANGSTROM = 1.5


@dataclass(frozen=True)
class Case:
    """Acquisition of the movies of one benchmark case."""

    name: str
    shape_yx: tuple[int, int]
    tilt_deg: float
    dose_e_per_angstrom2: float = 3.0
    n_frames: int = 10
    drift_px: float = 6.0
    seeds: tuple[int, ...] = (0, 1)
    quick: bool = True


CASES = (
    Case("512² 0° 3 e/Å² drift 6 px", (512, 512), 0.0),
    Case("512² 45° 3 e/Å² drift 8 px", (512, 512), 45.0, drift_px=8.0),
    Case("512² -60° 2 e/Å² drift 5 px (low dose)", (512, 512), -60.0, dose_e_per_angstrom2=2.0, drift_px=5.0),
    Case("1024² 30° 3 e/Å² drift 10 px", (1024, 1024), 30.0, drift_px=10.0, seeds=(0,)),
    Case("4096² 20° 40 frames drift 15 px", (4096, 4096), 20.0, n_frames=40, drift_px=15.0, seeds=(0,), quick=False),
    Case("5760x4092 (K3) 40° 10 frames drift 12 px", (4092, 5760), 40.0, drift_px=12.0, seeds=(0,), quick=False),
)


@dataclass(frozen=True)
class Movie:
    frames_tyx: np.ndarray  # gain-corrected, defects replaced
    truth_shifts_px: np.ndarray
    dose_per_frame: float


def simulate_tilt(case: Case, seed: int):
    """One movie of a case as the camera records it (raw counts, gain, truth)."""
    n_particles = int(20 * case.shape_yx[0] * case.shape_yx[1] / 512**2)  # the simulator's density at 512²
    return simulate_single_tilt(seed=seed, shape_yx=case.shape_yx, pixel_size_angstrom=PIXEL_ANGSTROM,
                                n_frames=case.n_frames, dose_e_per_angstrom2=case.dose_e_per_angstrom2,
                                tilt_angle_deg=case.tilt_deg, drift_total_px=case.drift_px,
                                n_particles=min(n_particles, 200))


def simulate(case: Case, seed: int) -> Movie:
    """One movie of a case, corrected the way the movie task corrects it."""
    tilt = simulate_tilt(case, seed)
    frames = apply_gain(tilt.frames, tilt.gain)
    frames = replace_defect_pixels(frames, find_defect_pixels(frames))
    return Movie(frames, np.asarray(tilt.truth.frame_shifts_px), case.dose_e_per_angstrom2 / case.n_frames)


# ---------------------------------------------------------------------------------------
# tools: each returns (t, 2) zero-mean displacements in pixels


def tomodask_tool(**options) -> Callable[[Movie], np.ndarray]:
    """align_frames with ``options`` on top of its defaults (sums included in the time)."""
    def run(movie: Movie) -> np.ndarray:
        al = align_frames(movie.frames_tyx, pixel_size_angstrom=PIXEL_ANGSTROM,
                          dose_per_frame_e_per_angstrom2=movie.dose_per_frame, **options)
        return al.shifts_px
    return run


def _peer_patch_shape(movie: Movie) -> tuple[int, int]:
    """Peer patches: a quarter of the frame side, at least 256 px (its example uses 1024 px on 4k frames)."""
    return tuple(min(n, max(256, n // 4 // 2 * 2)) for n in movie.frames_tyx.shape[1:])


def _field_shifts_px(field, n_frames: int) -> np.ndarray:
    """Per-frame displacement (px) of a torch-motion-correction field: mean over an 8 x 8 grid."""
    s = np.array([field.evaluate_at_t(i / max(n_frames - 1, 1), (8, 8)).mean(dim=(-2, -1)).detach().cpu().numpy()
                  for i in range(n_frames)]) / PIXEL_ANGSTROM
    return s - s.mean(axis=0)


def peer_tools() -> dict[str, Callable[[Movie], np.ndarray]]:
    """The torch-motion-correction modes (ImportError when the peer is not installed)."""
    import torch
    from torch_motion_correction import (
        OptimizationConfig,
        PatchSamplingConfig,
        estimate_global_motion,
        estimate_local_motion,
        estimate_motion_cross_correlation_patches,
    )

    def tensor(movie: Movie):
        return torch.from_numpy(np.ascontiguousarray(movie.frames_tyx, dtype=np.float32))

    def global_mode(movie: Movie) -> np.ndarray:
        return _field_shifts_px(estimate_global_motion(tensor(movie), pixel_spacing=PIXEL_ANGSTROM),
                                movie.frames_tyx.shape[0])

    def xc_patches(movie: Movie) -> np.ndarray:
        image = tensor(movie)
        start = estimate_global_motion(image, pixel_spacing=PIXEL_ANGSTROM)
        field, _ = estimate_motion_cross_correlation_patches(
            image, pixel_spacing=PIXEL_ANGSTROM,
            patch_sampling=PatchSamplingConfig(patch_shape=_peer_patch_shape(movie)), initial_deformation_field=start)
        return _field_shifts_px(field, image.shape[0])

    def local_optimizer(movie: Movie) -> np.ndarray:
        image = tensor(movie)
        start = estimate_global_motion(image, pixel_spacing=PIXEL_ANGSTROM)
        field, _ = estimate_local_motion(
            image, pixel_spacing=PIXEL_ANGSTROM, deformation_field_resolution=(image.shape[0], 2, 2),
            patch_sampling=PatchSamplingConfig(patch_shape=_peer_patch_shape(movie)), initial_deformation_field=start,
            optimization=OptimizationConfig(max_iterations=100, optimizer_type="adam", loss_type="mse",
                                            optimizer_kwargs={"lr": 0.1}),
            trajectory_kwargs={"sample_every_n_steps": 100})
        return _field_shifts_px(field, image.shape[0])

    return {
        "torch-motion-correction global": global_mode,
        "torch-motion-correction xc patches": xc_patches,
        "torch-motion-correction local (optimizer)": local_optimizer,
    }


# ---------------------------------------------------------------------------------------


def _blas_single_thread():
    """numpy's BLAS limited to one thread (threadpoolctl when installed; else the variables set above)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def motion_rows(*, quick: bool, peers: bool = True, only: str | None = None,
                tools_only: list[str] | None = None, cpu_time: bool = False, repeats: int = 1) -> list[dict]:
    """Align every case's movies with every tool; one row per (tool, case).

    ``only`` keeps the cases whose name contains it (e.g. ``"5760"``); ``tools_only`` keeps
    the tools whose name contains one of its texts (e.g. ``["tomodask", "global"]``).
    ``cpu_time`` times single-threaded CPU seconds (``time.process_time``) instead of wall
    seconds; every movie runs ``repeats`` times, the tools interleaved, and the median is kept.
    """
    import scipy.fft

    tools: dict[str, Callable[[Movie], np.ndarray]] = {
        "tomodask": tomodask_tool(),
        "tomodask global only": tomodask_tool(patches_yx=None),
        "tomodask B=500": tomodask_tool(bfactor_angstrom2=500.0),
        "tomodask 5x5 patches at any size": tomodask_tool(min_patch_px=1),
    }
    if peers:
        tools.update(peer_tools())
        if cpu_time:
            import torch

            torch.set_num_threads(1)
    if tools_only:
        tools = {name: fn for name, fn in tools.items() if any(text in name for text in tools_only)}
    cases = [c for c in CASES if (c.quick or not quick) and (only is None or only in c.name)]
    clock = time.process_time if cpu_time else time.perf_counter
    # wall time: the same cores torch uses by default; CPU time: one thread for every tool
    workers = 1 if cpu_time else os.cpu_count() or 1
    warm = simulate(Case("warm-up", (512, 512), 0.0, seeds=(99,)), 99)
    with scipy.fft.set_workers(workers), _blas_single_thread():
        for fn in tools.values():
            fn(warm)
        rows = []
        for case in cases:
            movies = [simulate(case, seed) for seed in case.seeds]
            seconds = {tool: [[] for _ in movies] for tool in tools}
            shifts = {}
            for _ in range(max(1, repeats)):
                for m, movie in enumerate(movies):
                    for tool, fn in tools.items():
                        start = clock()
                        shifts[tool, m] = np.asarray(fn(movie))
                        seconds[tool][m].append(clock() - start)
            for tool in tools:
                sq = [((shifts[tool, m] - movie.truth_shifts_px) ** 2).sum(axis=1) for m, movie in enumerate(movies)]
                rows.append({
                    "tool": tool, "step": "motion", "case": case.name,
                    "seconds": statistics.median(statistics.median(s) for s in seconds[tool]),
                    "clock": "cpu, 1 thread" if cpu_time else "wall", "repeats": max(1, repeats),
                    "shift_rmse_px": float(np.sqrt(np.mean(np.concatenate(sq)))),
                    "shift_rmse_px_per_movie": [round(float(np.sqrt(e.mean())), 4) for e in sq],
                    "n_movies": len(movies), "n_frames": case.n_frames,
                    "shape_yx": list(case.shape_yx),
                })
                print(f"  {case.name}: {tool} {rows[-1]['seconds']:.3f} s, "
                      f"RMSE {rows[-1]['shift_rmse_px']:.3f} px", flush=True)
    return rows


def ctf_rows_if_present(*, quick: bool) -> list[dict]:
    """Rows of ``benchmarks/movie_ctf.py`` (another engineer's), or none when that module is absent."""
    try:
        import movie_ctf
    except ModuleNotFoundError as exc:
        if exc.name != "movie_ctf":
            raise
        print("CTF rows absent: benchmarks/movie_ctf.py (ctf_rows) is not there yet")
        return []
    return movie_ctf.ctf_rows(quick=quick)


MOTION_COLUMNS = ["case", "tool", "seconds", "shift_rmse_px", "seconds_vs_tomodask", "shift_rmse_px_vs_tomodask"]


def main(argv: list[str] | None = None) -> None:
    """Command line: run, print the tables, optionally write JSON."""
    parser = benchmark_parser(__doc__)
    parser.add_argument("--skip-peers", action="store_true", help="tomodask rows only")
    parser.add_argument("--skip-ctf", action="store_true", help="no CTF rows")
    parser.add_argument("--case", default=None, help="only the motion cases whose name contains this text")
    parser.add_argument("--tools", default=None,
                        help="comma-separated texts: only the tools whose name contains one of them "
                             "(e.g. 'tomodask,global,xc patches' leaves out the peer's local optimizer)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="single-threaded CPU seconds (time.process_time) instead of wall seconds")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs of every movie, tools interleaved; the median is kept (default 3 with "
                             "--cpu-time, else 1)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)
    rows = motion_rows(quick=args.quick, peers=not args.skip_peers, only=args.case,
                       tools_only=args.tools.split(",") if args.tools else None, cpu_time=args.cpu_time,
                       repeats=args.repeats if args.repeats is not None else 3 if args.cpu_time else 1)
    load_after = os.getloadavg()
    clock = "single-thread CPU seconds" if args.cpu_time else "wall seconds"
    print_table(add_ratios(rows, metrics=("seconds", "shift_rmse_px"), group_by=("step", "case")), MOTION_COLUMNS,
                title=f"Motion, {clock} (ratios: row / tomodask; > 1 means slower or less accurate than tomodask)")
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if not args.skip_ctf:
        ctf = ctf_rows_if_present(quick=args.quick)
        if ctf:
            columns = ["case", "tool", "seconds", "defocus_error_angstrom_median", "seconds_vs_tomodask",
                       "defocus_error_angstrom_median_vs_tomodask"]
            print_table(add_ratios(ctf, metrics=("seconds", "defocus_error_angstrom_median"),
                                   group_by=("step", "case")), columns, title="CTF")
        rows += ctf
    if args.json is not None:
        write_json(args.json, "movie", rows, extra={"load_average_before": load_before, "load_average_after": load_after,
                                                    "clock": clock})


if __name__ == "__main__":
    main()
