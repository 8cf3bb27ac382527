"""GPU benchmark: seconds per movie and per tilt-series through the real task functions.

Runs :func:`tomodask.tasks.process_movie` and :func:`tomodask.tasks.process_tilt_series`
(the functions a Dask worker runs) on the array module the tasks pick
(:func:`tomodask.backend.default_array_module`: cupy where a GPU is usable, else numpy),
with their errors against the simulator's truth.

Movies
    The first movie of each of ``benchmarks/movie.py``'s cases of 1024² and more (1.5 Å/px,
    3 e-/Å², drifting Poisson frames with gain and defects), written as LZW TIFF with a gain
    MRC, as SerialEM writes them. The time of
    ``process_movie`` includes reading and decoding the TIFF, gain and defect correction,
    frame alignment with local motion, dose weighting, even/odd sums, CTF estimation and
    writing every result to zarr: the whole task, as AreTomo3's ~1.1 s per K3 movie on an
    H100 includes reading the movie. Reported beside it: the time of one ``rfft2`` over all
    frames (float32, already on the device), measured in the same run, the floor of any
    Fourier-based alignment. Median of ``--repeats`` runs after a warm-up movie.
Tilt-series
    41 tilts of ±60° (gold, 1500 Å of ice, true axis 85°, nominal axis given 3° off)
    simulated at 4x the target pixel size and Fourier-upsampled 4x (a 4096² series at 2 Å/px
    costs ~20 min of CPU to simulate directly; binned by 4 or more it is the same data), stored
    per tilt as the movie task stores it (sum, strip spectra, CTF fit), then
    ``process_tilt_series``: alignment at 16 Å (bin 8), series CTF refinement,
    reconstruction at 8 Å (bin 4) with phase flipping and dose weighting, OME-Zarr + MRC and
    thumbnails. Errors: tilt-axis angle, and per-tilt shift error at the alignment pixel
    after removing a common offset (``residual_px``: the specimen's height is part of it)
    or a rigid translation of the specimen (``residual_px_gauge_free``), over the kept tilts.

Run::

    python benchmarks/gpu.py [--quick] [--json OUT.json] [--repeats N] [--steps movie,tilt-series] [--case TEXT]

``--quick``: a 1024² x 10 movie and a 1024² series (simulated at 256²); without it a
4096² x 40 movie, a 5760 x 4092 x 10 (K3) movie and a 4096² series (simulated at 1024²).
The full-size inputs are simulated in parallel processes (a few minutes of CPU).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import benchmark_parser, print_table, write_json  # noqa: E402
from movie import CASES as MOVIE_CASES  # noqa: E402
from movie import PIXEL_ANGSTROM as MOVIE_PIXEL_ANGSTROM  # noqa: E402
from movie import Case, simulate_tilt  # noqa: E402

from tomodask.backend import default_array_module, to_device  # noqa: E402

SERIES_PIXEL_ANGSTROM = 2.0
SERIES_UPSAMPLING = 4
TRUE_AXIS_DEG = 85.0


def _sync(xp) -> None:
    if xp.__name__ == "cupy":
        xp.cuda.Device().synchronize()


def write_movie(case: Case, folder: str) -> dict:
    """Simulate a case's first movie into ``folder`` (LZW TIFF + gain MRC); return its paths and truth."""
    from tomodask.io.mrc import write_mrc
    from tomodask.simulate.writer import encode_tiff_lzw

    tilt = simulate_tilt(case, case.seeds[0])
    stem = Path(folder) / f"movie_{case.shape_yx[0]}x{case.shape_yx[1]}x{case.n_frames}"
    Path(f"{stem}.tif").write_bytes(encode_tiff_lzw(tilt.frames))
    write_mrc(f"{stem}_gain.mrc", tilt.gain, pixel_size_angstrom=MOVIE_PIXEL_ANGSTROM)
    t = tilt.truth
    return {"movie": f"{stem}.tif", "gain": f"{stem}_gain.mrc", "shifts_px": t.frame_shifts_px.tolist(),
            "defocus_angstrom": 0.5 * (t.defocus_u_angstrom + t.defocus_v_angstrom), "bytes": tilt.frames.nbytes}


def simulate_series(shape_yx: tuple[int, int], pixel_size_angstrom: float, folder: str, seed: int = 0) -> dict:
    """Simulate a 41-tilt series at ``shape_yx`` (saved as .npy in ``folder``); return its truth."""
    from tomodask.simulate import simulate_tilt_series

    ts = simulate_tilt_series(seed, shape_yx=shape_yx, pixel_size_angstrom=pixel_size_angstrom,
                              tilt_axis_angle_deg=TRUE_AXIS_DEG)
    path = str(Path(folder) / f"series_{shape_yx[0]}.npy")
    np.save(path, ts.images)
    return {"images": path, "tilt_angles_deg": ts.nominal_tilt_angles_deg.tolist(), "shifts_px": ts.shifts_px.tolist(),
            "acquisition_index": [t.acquisition_index for t in ts.tilts],
            "dose_e_per_angstrom2": float(ts.spec.dose_per_tilt_e_per_angstrom2)}


def _settings(**processing):
    from tomodask.settings import SessionSettings

    s = SessionSettings()
    s.microscope.pixel_size_angstrom = MOVIE_PIXEL_ANGSTROM
    s.microscope.tilt_axis_angle_deg = TRUE_AXIS_DEG + 3.0
    for section, values in processing.items():
        for key, value in values.items():
            setattr(getattr(s.processing, section), key, value)
    return s


def movie_rows(sims: list[tuple[Case, dict]], work: Path, repeats: int) -> list[dict]:
    """Time ``process_movie`` and one rfft2 over the frames for every simulated movie."""
    import zarr

    from tomodask.io.movies import read_movie
    from tomodask.tasks import MovieRequest, process_movie

    xp = default_array_module()
    settings_json = _settings().model_dump_json()
    rows = []
    for n, (case, sim) in enumerate(sims):
        req = MovieRequest(movie_path=sim["movie"], movie=f"m{n}", tilt_series="ts", gain_path=sim["gain"],
                           zarr_path=str(work / "movies.zarr"), tilt_angle_deg=case.tilt_deg, acquisition_index=0,
                           dose_e_per_angstrom2=case.dose_e_per_angstrom2, prior_dose_e_per_angstrom2=0.0,
                           settings_json=settings_json)
        process_movie(req)  # warm-up: kernels compiled, plans cached, files in the page cache
        records = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            rec = process_movie(req)
            records.append((time.perf_counter() - t0, rec))
        frames = to_device(read_movie(sim["movie"]), xp).astype(xp.float32)
        fft_s = []
        for _ in range(max(5, repeats)):
            _sync(xp)
            t0 = time.perf_counter()
            xp.fft.rfft2(frames)
            _sync(xp)
            fft_s.append(time.perf_counter() - t0)
        del frames
        seconds, rec = sorted(records, key=lambda r: r[0])[len(records) // 2]
        shifts = np.asarray(zarr.open_group(str(work / "movies.zarr"), mode="r")[f"movies/m{n}/shifts_px"])
        truth = np.asarray(sim["shifts_px"])
        err = ((shifts - shifts.mean(0)) - (truth - truth.mean(0)))
        rows.append({
            "tool": "tomodask process_movie", "step": "movie", "case": case.name, "backend": rec["backend"],
            "seconds": seconds, "seconds_read": rec["seconds_read"], "seconds_motion": rec["seconds_motion"],
            "seconds_ctf": rec["seconds_ctf"],
            "seconds_write": seconds - rec["seconds_read"] - rec["seconds_motion"] - rec["seconds_ctf"],
            "seconds_one_rfft2": statistics.median(fft_s),
            "seconds_vs_one_rfft2": seconds / statistics.median(fft_s),
            "shift_rmse_px": float(np.sqrt((err ** 2).sum(axis=1).mean())),
            "defocus_error_angstrom": float(rec["defocus_angstrom"] - sim["defocus_angstrom"]),
            "movie_megabytes": sim["bytes"] / 1e6, "repeats": repeats,
        })
        print(f"  movie {case.name}: {seconds:.3f} s ({rec['backend']}), rfft2 {statistics.median(fft_s):.4f} s, "
              f"shift RMSE {rows[-1]['shift_rmse_px']:.3f} px", flush=True)
    return rows


def _upsample(image, factor: int):
    """Fourier-pad a 2D image ``factor`` times larger (band-limited interpolation)."""
    xp = default_array_module()
    ny, nx = image.shape
    spec = xp.fft.rfft2(image)
    out = xp.zeros((ny * factor, nx * factor // 2 + 1), dtype=spec.dtype)
    h = ny // 2
    out[:h, : nx // 2 + 1] = spec[:h]
    out[-h:, : nx // 2 + 1] = spec[-h:]
    return (xp.fft.irfft2(out, s=(ny * factor, nx * factor)) * factor**2).astype(xp.float32)


def store_series(sim: dict, work: Path, settings) -> list[dict]:
    """Upsample the simulated tilts and store them as the movie task would; return the movie records."""
    import zarr
    from zarr.storage import LocalStore

    from tomodask.kernels.ctf import estimate_ctf_from_spectra, strip_spectra
    from tomodask.tasks import _ctf_fit_options, _spectra_options, _write_strip_spectra, write_array

    xp = default_array_module()
    images = np.load(sim["images"])
    root = zarr.open_group(LocalStore(str(work / "series.zarr")), mode="a")
    records = []
    for i, angle in enumerate(sim["tilt_angles_deg"]):
        image = _upsample(to_device(images[i], xp), SERIES_UPSAMPLING)
        g = root.require_group(f"movies/t{i:02d}")
        write_array(g, "aligned_sum", image, pixel_size_angstrom=SERIES_PIXEL_ANGSTROM)
        spectra = strip_spectra(image, tilt_angle_deg=angle, **_spectra_options(
            settings, pixel_size_angstrom=SERIES_PIXEL_ANGSTROM, shape_yx=image.shape))
        _write_strip_spectra(g, spectra)
        ctf = estimate_ctf_from_spectra(spectra, **_ctf_fit_options(settings))
        acq = int(sim["acquisition_index"][i])
        dose = sim["dose_e_per_angstrom2"]
        records.append({"movie": f"t{i:02d}", "tilt_angle_deg": float(angle), "acquisition_index": acq,
                        "pixel_size_angstrom": SERIES_PIXEL_ANGSTROM, "total_motion_px": 1.0,
                        "dose_e_per_angstrom2": dose, "prior_dose_e_per_angstrom2": acq * dose,
                        "defocus_u_angstrom": ctf.defocus_u_angstrom, "defocus_v_angstrom": ctf.defocus_v_angstrom,
                        "astigmatism_angle_deg": ctf.astigmatism_angle_deg,
                        "ctf_fit_resolution_angstrom": ctf.fit_resolution_angstrom})
    return records


def series_rows(sim: dict, work: Path, name: str, repeats: int) -> list[dict]:
    """Time ``process_tilt_series`` on a stored series."""
    from tomodask.kernels.tilt_align import gauge_free_shift_error_px
    from tomodask.tasks import TiltSeriesRequest, process_tilt_series

    settings = _settings(frame_alignment={"dose_weighting": False},
                         tilt_series_alignment={"alignment_pixel_size_angstrom": 16.0},
                         reconstruction={"pixel_size_angstrom": 8.0, "thickness_angstrom": 2000.0})
    settings.microscope.pixel_size_angstrom = SERIES_PIXEL_ANGSTROM
    t0 = time.perf_counter()
    records = store_series(sim, work, settings)
    store_s = time.perf_counter() - t0
    req = TiltSeriesRequest(tilt_series="ts", zarr_path=str(work / "series.zarr"), tomogram_dir=str(work / "tomograms"),
                            alignment_dir=str(work / "alignment"), mdoc_path=None,
                            settings_json=settings.model_dump_json())
    runs = []
    for _ in range(1 + repeats):  # the first run compiles the kernels
        t0 = time.perf_counter()
        m = process_tilt_series(req, *records)
        runs.append((time.perf_counter() - t0, m))
    cold_s = runs[0][0]
    seconds, m = sorted(runs[1:], key=lambda r: r[0])[len(runs[1:]) // 2]
    use = ~np.asarray(m["excluded"])
    est = np.asarray(m["shifts_px"])[use]
    true = np.asarray(sim["shifts_px"])[use] * SERIES_UPSAMPLING
    to_alignment_px = SERIES_PIXEL_ANGSTROM / 16.0
    err = np.hypot(*((est - est.mean(0)) - (true - true.mean(0))).T) * to_alignment_px
    gauge_free = gauge_free_shift_error_px(est, true, np.asarray(sim["tilt_angles_deg"])[use],
                                           tilt_axis_angle_deg=TRUE_AXIS_DEG) * to_alignment_px
    row = {"tool": "tomodask process_tilt_series", "step": "tilt-series", "case": name, "backend": m["backend"],
           "seconds": seconds, "seconds_first_run": cold_s, "seconds_read": m["seconds_read"],
           "seconds_alignment": m["seconds_alignment"],
           "seconds_ctf_refinement": m["seconds_ctf_refinement"], "seconds_reconstruction": m["seconds_reconstruction"],
           "seconds_storing_inputs": store_s, "n_tilts_used": m["n_tilts_used"],
           "tilt_axis_error_deg": abs(m["tilt_axis_angle_deg"] - TRUE_AXIS_DEG),
           "residual_px": float(err.max()), "residual_px_median": float(np.median(err)),
           "residual_px_gauge_free": float(gauge_free.max()),
           "tomogram_shape_zyx": m["tomogram_shape_zyx"], "repeats": repeats}
    print(f"  series {name}: {seconds:.2f} s ({m['backend']}; first run {cold_s:.2f} s), axis error "
          f"{row['tilt_axis_error_deg']:.3f}°, max shift error {row['residual_px']:.2f} px", flush=True)
    return [row]


def main(argv: list[str] | None = None) -> None:
    """Command line: simulate, run, print the tables, optionally write JSON."""
    parser = benchmark_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each input (median kept)")
    parser.add_argument("--steps", default="movie,tilt-series", help="comma-separated: movie, tilt-series")
    parser.add_argument("--case", default="", help="only the movies whose name contains this text (e.g. K3)")
    args = parser.parse_args(argv)
    steps = set(args.steps.split(","))
    if steps - {"movie", "tilt-series"}:
        parser.error(f"unknown steps {sorted(steps - {'movie', 'tilt-series'})}; choose from movie, tilt-series")
    # the movie benchmark's cases of 1024² and more (benchmarks/movie.py)
    cases = [c for c in MOVIE_CASES if min(c.shape_yx) >= 1024 and c.quick == args.quick and "movie" in steps
             and args.case in c.name]
    series_px = SERIES_PIXEL_ANGSTROM * SERIES_UPSAMPLING
    series_shape = (256, 256) if args.quick else (1024, 1024)
    series_name = f"{series_shape[0] * SERIES_UPSAMPLING}² x 41 tilts at {SERIES_PIXEL_ANGSTROM} Å/px"
    with tempfile.TemporaryDirectory(prefix="tomodask-gpu-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=len(cases) + 1, mp_context=get_context("spawn")) as pool:
            series_future = (pool.submit(simulate_series, series_shape, series_px, tmp) if "tilt-series" in steps
                             else None)
            movie_futures = [pool.submit(write_movie, c, tmp) for c in cases]
            sims = [(c, f.result()) for c, f in zip(cases, movie_futures)]
            series_sim = series_future.result() if series_future else None
        print(f"simulated the inputs in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = movie_rows(sims, work, args.repeats)
        if series_sim is not None:
            rows += series_rows(series_sim, work, series_name, args.repeats)
    tables = {
        "movie": (["case", "backend", "seconds", "seconds_read", "seconds_motion", "seconds_ctf", "seconds_write",
                   "seconds_one_rfft2", "seconds_vs_one_rfft2", "shift_rmse_px", "defocus_error_angstrom"],
                  "process_movie (read + correct + align + CTF + write zarr), median seconds"),
        "tilt-series": (["case", "backend", "seconds", "seconds_first_run", "seconds_read", "seconds_alignment",
                         "seconds_ctf_refinement", "seconds_reconstruction", "tilt_axis_error_deg", "residual_px",
                         "residual_px_gauge_free",
                         "n_tilts_used"],
                        "process_tilt_series (align + CTF refinement + reconstruct + write), median seconds"),
    }
    for step, (columns, title) in tables.items():
        if step in steps:
            print_table([r for r in rows if r["step"] == step], columns, title=title)
    if args.json is not None:
        write_json(args.json, "gpu", rows, extra={"device": _device_name()})
    print(json.dumps({"device": _device_name()}))


def _device_name() -> str:
    xp = default_array_module()
    if xp.__name__ != "cupy":
        return "cpu (numpy)"
    return xp.cuda.runtime.getDeviceProperties(0)["name"].decode()


if __name__ == "__main__":
    main()
