"""Write simulated acquisitions to disk the way a microscope computer does.

Layout of a simulated microscope folder::

    OUT/
      gain.mrc                      gain reference (multiply raw frames by it)
      TS_01_000_0.0.tif ...         LZW TIFF movies (SerialEM naming), or
      Position_1_001[-0.00]_fractions.tiff (Tomo5 naming)
      TS_01.mrc.mdoc                SerialEM mdoc, rewritten after every tilt
      truth/TS_01.json              ground truth (never read by processing)
      truth/TS_01_phantom.mrc       the specimen at 10 Å/px

In streaming mode tilts appear at a fixed cadence in acquisition order, each movie
written in several pieces so a watcher sees it half-written.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tifffile

from tomodask.io.mdoc import format_mdoc
from tomodask.io.mrc import write_mrc
from tomodask.kernels.geometry import __doc__ as GEOMETRY_DOC
from tomodask.simulate.microscope import AcquisitionSpec, Detector, SimulatedTilt, TiltSeriesAcquisition

NAMINGS = ("serialem", "tomo5")

#: Ready-made acquisition sizes: tiny for tests, small for demos, full detector sizes for benchmarks.
SIZE_PRESETS: dict[str, dict] = {
    "tiny": dict(shape_yx=(384, 384), pixel_size_angstrom=2.5, n_frames=6, tilt_range_deg=(-60.0, 60.0),
                 tilt_step_deg=6.0, n_particles=10, thickness_angstrom=1000.0, n_gold=3),
    "small": dict(shape_yx=(1024, 1024), pixel_size_angstrom=2.0, n_frames=8, tilt_range_deg=(-60.0, 60.0),
                  tilt_step_deg=3.0, n_particles=40, thickness_angstrom=1500.0, n_gold=6),
    "4k": dict(shape_yx=(4096, 4096), pixel_size_angstrom=1.5, n_frames=40, n_particles=400, n_gold=20),
    "k3": dict(shape_yx=(4092, 5760), pixel_size_angstrom=1.5, n_frames=10, n_particles=500, n_gold=20),
}


def movie_name(naming: str, tilt_series: str, acquisition_index: int, nominal_tilt_deg: float) -> str:
    """File name of one movie.

    Parameters
    ----------
    naming
        ``"serialem"`` (``TS_01_012_-9.0.tif``) or ``"tomo5"``
        (``Position_1_013[-9.00]_fractions.tiff``, 1-based index).
    tilt_series
        Tilt-series name.
    acquisition_index
        0-based acquisition index.
    nominal_tilt_deg
        Stage tilt angle.

    Returns
    -------
    str
    """
    if naming == "serialem":
        return f"{tilt_series}_{acquisition_index:03d}_{nominal_tilt_deg:.1f}.tif"
    if naming == "tomo5":
        return f"{tilt_series}_{acquisition_index + 1:03d}[{nominal_tilt_deg:.2f}]_fractions.tiff"
    raise ValueError(f"unknown naming {naming!r}; accepted: {', '.join(NAMINGS)}")


def mdoc_name(naming: str, tilt_series: str) -> str:
    """File name of a tilt-series' mdoc (``TS_01.mrc.mdoc`` or ``Position_1.mdoc``)."""
    return f"{tilt_series}.mrc.mdoc" if naming == "serialem" else f"{tilt_series}.mdoc"


def encode_tiff_lzw(frames: np.ndarray) -> bytes:
    """Encode ``(t, y, x)`` frames as a multi-page LZW TIFF in memory."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, frames, compression="lzw", photometric="minisblack")
    return buf.getvalue()


def write_in_pieces(path: Path, data: bytes, *, pieces: int, pause_s: float) -> None:
    """Write ``data`` to ``path`` in ``pieces`` appends with a pause between them."""
    step = max(1, -(-len(data) // pieces))
    with open(path, "wb") as fh:
        for start in range(0, len(data), step):
            fh.write(data[start : start + step])
            fh.flush()
            if pause_s and start + step < len(data):
                time.sleep(pause_s)


def _mdoc_section(tilt: SimulatedTilt, spec: AcquisitionSpec, name: str, start: float) -> dict:
    t = tilt.truth
    stamp = time.strftime("%d-%b-%y  %H:%M:%S", time.gmtime(start + 60.0 * t.acquisition_index))
    return {
        "TiltAngle": round(t.nominal_tilt_angle_deg, 4),
        "ExposureDose": t.dose_e_per_angstrom2,
        "PriorRecordDose": t.prior_dose_e_per_angstrom2,
        "PixelSpacing": spec.pixel_size_angstrom,
        "Defocus": round(-0.5 * (t.defocus_u_angstrom + t.defocus_v_angstrom) / 1e4, 4),
        "TargetDefocus": round(-spec.defocus_angstrom / 1e4, 2),
        "ExposureTime": 1.0,
        "SubFramePath": "D:\\DATA\\tomodask-sim\\frames\\" + name,
        "NumSubFrames": tilt.frames.shape[0],
        "DateTime": stamp,
    }


def write_tilt_series(
    acquisition: TiltSeriesAcquisition,
    out_dir: str | Path,
    *,
    name: str,
    naming: str = "serialem",
    seconds_per_tilt: float = 0.0,
    pieces: int = 4,
    on_tilt: Callable[[int], None] | None = None,
) -> Path:
    """Acquire and write one tilt-series: movies, mdoc after each tilt, then the truth.

    Parameters
    ----------
    acquisition
        The tilt-series to acquire.
    out_dir
        Microscope folder.
    name
        Tilt-series name (``TS_01``, ``Position_1``).
    naming
        ``"serialem"`` or ``"tomo5"`` file names.
    seconds_per_tilt
        Cadence; 0 writes as fast as possible.
    pieces
        Each movie is written in this many appends (spread over half the cadence).
    on_tilt
        Called with the acquisition index after each tilt is complete.

    Returns
    -------
    Path
        The ground-truth JSON.
    """
    if naming not in NAMINGS:
        raise ValueError(f"unknown naming {naming!r}; accepted: {', '.join(NAMINGS)}")
    out = Path(out_dir)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    spec = acquisition.spec
    header = {
        "PixelSpacing": spec.pixel_size_angstrom,
        "Voltage": int(spec.voltage_kv),
        "ImageFile": f"{name}.mrc",
        "ImageSize": [spec.shape_yx[1], spec.shape_yx[0]],
        "DataMode": 1,
    }
    titles = ["SerialEM: tomodask simulated microscope",
              f"Tilt axis angle = {spec.recorded_tilt_axis_angle_deg:g}, binning = 1  spot = 8  camera = 0"]
    sections: list[dict] = []
    mdoc_text = ""
    (out / mdoc_name(naming, name)).unlink(missing_ok=True)
    truths = []
    start = time.time()
    for tilt in acquisition.tilts(with_frames=True):
        t0 = time.monotonic()
        fname = movie_name(naming, name, tilt.truth.acquisition_index, tilt.truth.nominal_tilt_angle_deg)
        write_in_pieces(out / fname, encode_tiff_lzw(tilt.frames), pieces=pieces,
                        pause_s=seconds_per_tilt / (2 * pieces))
        sections.append(_mdoc_section(tilt, spec, fname, start))
        text = format_mdoc(header, titles, sections)
        with open(out / mdoc_name(naming, name), "a", newline="") as fh:  # SerialEM appends each section
            fh.write(text[len(mdoc_text):])
        mdoc_text = text
        truths.append({**tilt.truth.to_dict(), "movie": fname})
        if on_tilt:
            on_tilt(tilt.truth.acquisition_index)
        if seconds_per_tilt:
            time.sleep(max(0.0, seconds_per_tilt - (time.monotonic() - t0)))
    phantom_px = 10.0
    shape = (int(np.ceil(spec.thickness_angstrom * 1.2 / phantom_px)),
             int(np.ceil(spec.shape_yx[0] * spec.pixel_size_angstrom / phantom_px)),
             int(np.ceil(spec.shape_yx[1] * spec.pixel_size_angstrom / phantom_px)))
    write_mrc(out / "truth" / f"{name}_phantom.mrc",
              acquisition.phantom.volume(pixel_size_angstrom=phantom_px, shape_zyx=shape), pixel_size_angstrom=phantom_px)
    truth_path = out / "truth" / f"{name}.json"
    truth_path.write_text(json.dumps({
        "tilt_series": name,
        "conventions": GEOMETRY_DOC,
        "spec": asdict(spec),
        "seed": acquisition.seed,
        "mdoc": mdoc_name(naming, name),
        "phantom": acquisition.phantom.to_dict(),
        "phantom_mrc": f"{name}_phantom.mrc",
        "phantom_pixel_size_angstrom": phantom_px,
        "tilts": truths,
    }, indent=1))
    return truth_path


def write_session(
    out_dir: str | Path,
    *,
    n_tilt_series: int = 2,
    size: str = "tiny",
    seed: int = 0,
    naming: str = "serialem",
    seconds_per_tilt: float = 0.0,
    dark_tilts: tuple[int, ...] = (),
    **spec_fields,
) -> list[Path]:
    """Simulate a whole collection session into a microscope folder.

    Parameters
    ----------
    out_dir
        Folder to write into (created).
    n_tilt_series
        Tilt-series to acquire, one after the other.
    size
        A key of :data:`SIZE_PRESETS`.
    seed
        Random seed; tilt-series ``k`` uses ``seed + k``.
    naming
        ``"serialem"`` or ``"tomo5"``.
    seconds_per_tilt
        Streaming cadence (0 = as fast as possible).
    dark_tilts
        Acquisition indices made dark in every tilt-series.
    **spec_fields
        Overrides of :class:`AcquisitionSpec` fields.

    Returns
    -------
    list of Path
        Ground-truth JSON files, one per tilt-series.
    """
    if size not in SIZE_PRESETS:
        raise ValueError(f"unknown size {size!r}; accepted: {', '.join(SIZE_PRESETS)}")
    spec = AcquisitionSpec(**{**SIZE_PRESETS[size], "dark_tilt_acquisition_indices": tuple(dark_tilts), **spec_fields})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    detector = Detector.make(spec.shape_yx, seed=seed, gain_variation=spec.gain_variation,
                             n_dead=spec.n_dead_pixels, n_hot=spec.n_hot_pixels)
    write_mrc(out / "gain.mrc", detector.gain, pixel_size_angstrom=spec.pixel_size_angstrom)
    truths = []
    for k in range(n_tilt_series):
        name = f"TS_{k + 1:02d}" if naming == "serialem" else f"Position_{k + 1}"
        acq = TiltSeriesAcquisition(spec, seed=seed + k, detector=detector)
        truths.append(write_tilt_series(acq, out, name=name, naming=naming, seconds_per_tilt=seconds_per_tilt))
    return truths
