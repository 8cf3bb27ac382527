"""Session benchmark: a simulated acquisition at a fixed cadence, processed live.

Reports, per tilt-series, the latency from its last tilt being written to its tomogram and
picks being stored; the sustained movies per second; and the keep-up ratio (processing rate
over acquisition rate; above 1 means tomodask keeps up with the microscope).

The acquisition is simulated before the clock starts and then played into the watched folder
at the cadence (movies written in pieces, the mdoc appended per tilt), so the simulator's own
computing does not compete with the session for the machine's cores.

    python benchmarks/session.py --quick --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from tomodask.demo import settings_for_simulation
from tomodask.io.mrc import write_mrc
from tomodask.session.api import create_session
from tomodask.simulate.microscope import AcquisitionSpec, Detector, TiltSeriesAcquisition
from tomodask.simulate.writer import SIZE_PRESETS, mdoc_name, write_in_pieces, write_tilt_series


def render(out: Path, spec: AcquisitionSpec, n_tilt_series: int) -> list[tuple[str, list[Path]]]:
    """Simulate the whole acquisition into ``out`` ahead of time (not on the session's clock).

    Returns, per tilt-series, its name and its movies in acquisition order.
    """
    detector = Detector.make(spec.shape_yx, seed=0, gain_variation=spec.gain_variation,
                             n_dead=spec.n_dead_pixels, n_hot=spec.n_hot_pixels)
    write_mrc(out / "gain.mrc", detector.gain, pixel_size_angstrom=spec.pixel_size_angstrom)
    series = []
    for k in range(n_tilt_series):
        name = f"TS_{k + 1:02d}"
        truth = json.loads(write_tilt_series(TiltSeriesAcquisition(spec, seed=k, detector=detector), out,
                                             name=name).read_text())
        order = sorted(truth["tilts"], key=lambda t: t["acquisition_index"])
        series.append((name, [out / t["movie"] for t in order]))
    return series


def mdoc_pieces(text: str) -> list[str]:
    """Split mdoc text into the header plus first section, then one piece per further section."""
    starts = [m.start() for m in re.finditer(r"^\[ZValue = \d+\]", text, flags=re.MULTILINE)]
    cuts = [0, *starts[1:], len(text)]
    return [text[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def replay(rendered: Path, out: Path, series: list[tuple[str, list[Path]]], seconds_per_tilt: float,
           last_tilt_at: dict[str, float], first_tilt_at: list[float]) -> None:
    """Play a rendered acquisition into the watched folder at the cadence, as SerialEM writes it.

    Each movie is written in 4 appends over half the cadence, then its mdoc section is
    appended; the time of each tilt-series' last tilt is recorded.
    """
    shutil.copy2(rendered / "gain.mrc", out / "gain.mrc")
    for name, movies in series:
        mdoc = mdoc_name("serialem", name)
        with open(rendered / mdoc, newline="") as fh:
            pieces = mdoc_pieces(fh.read())
        for movie, mdoc_piece in zip(movies, pieces, strict=True):
            t0 = time.monotonic()
            write_in_pieces(out / movie.name, movie.read_bytes(), pieces=4, pause_s=seconds_per_tilt / 8)
            with open(out / mdoc, "a", newline="") as fh:
                fh.write(mdoc_piece)
            if not first_tilt_at:
                first_tilt_at.append(time.time())
            time.sleep(max(0.0, seconds_per_tilt - (time.monotonic() - t0)))
        last_tilt_at[name] = time.time()


def run(size: str, n_tilt_series: int, seconds_per_tilt: float, spec_fields: dict) -> dict:
    """Run one simulated acquisition and return its measurements."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        microscope, rendered = tmp / "microscope", tmp / "rendered"
        microscope.mkdir()
        rendered.mkdir()
        spec = AcquisitionSpec(**{**SIZE_PRESETS[size], **spec_fields})
        series = render(rendered, spec, n_tilt_series)
        session = create_session(settings_for_simulation(microscope, size=size, name="bench", **spec_fields),
                                 data_root=tmp / "root")
        last, first = {}, []
        writer = threading.Thread(target=replay, args=(rendered, microscope, series, seconds_per_tilt, last, first))
        t0 = time.time()
        writer.start()
        ok = session.run(expected_tilt_series=n_tilt_series, timeout_s=3600)
        writer.join()
        movies = session.movies()
        series = session.tilt_series()
        latencies = [row.finished_at.timestamp() - last[row.name] for row in series.itertuples()]
        done = [m.finished_at.timestamp() for m in movies.itertuples()]
        n_movies = len(movies)
        acquisition_s = max(last.values()) - first[0]
        processing_s = max(done) - first[0]
        return {
            "ok": ok,
            "case": f"{size}, {n_tilt_series} x {len(spec.nominal_tilt_angles_deg)} tilts, "
                    f"{seconds_per_tilt:g} s/tilt",
            "tilt_series_latency_s": latencies,
            "latency_s_median": float(np.median(latencies)),
            "movies_per_second": n_movies / processing_s,
            "acquisition_movies_per_second": n_movies / acquisition_s,
            "keep_up_ratio": (n_movies / processing_s) / (n_movies / acquisition_s) if processing_s > 0 else None,
            "movie_seconds_median": float(movies["seconds"].median()),
            "tilt_series_seconds_median": float(series["seconds"].median()),
            "wall_s": time.time() - t0,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny tilt-series (seconds); otherwise 'small' ones")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--seconds-per-tilt", type=float, default=1.0, help="cadence of the tiny case (default 1 s)")
    args = ap.parse_args()
    cases = [("tiny", 2, args.seconds_per_tilt, dict(tilt_step_deg=8.0))]
    if not args.quick:
        cases.append(("small", 1, 5.0, {}))
    rows = []
    for size, n, cadence, fields in cases:
        r = run(size, n, cadence, fields)
        rows.append({"tool": "tomodask", "step": "session", **r})
    print(f"{'case':45s} {'latency s':>10s} {'movies/s':>9s} {'acq/s':>7s} {'keep-up':>8s}")
    for r in rows:
        print(f"{r['case']:45s} {r['latency_s_median']:10.1f} {r['movies_per_second']:9.2f} "
              f"{r['acquisition_movies_per_second']:7.2f} {r['keep_up_ratio']:8.2f}")
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "session", "machine": platform.platform(),
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
