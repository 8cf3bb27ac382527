"""Benchmark: CTF estimation per tilt image, tomodask vs torch-ctf-estimation (CPU).

Both tools fit the same simulated tilt images in one run: gain-corrected sums of
simulated movies (1.5 Å/px, 300 kV, astigmatism 1000 Å, no drift, as after motion
correction) at tilts up to 60°, at the realistic 3 e-/Å² per tilt and at harder,
lower-dose and more blurred settings. The error is that of the mean defocus at the
image centre (the simulator's truth), median over the images of a case; seconds are
the median wall time per image (after one warm-up call of each tool).

Run::

    python benchmarks/movie_ctf.py [--quick | --series-only] [--json OUT.json]
        [--series-seed N] [--series-tools tomodask ...]

The full run ends with a simulated 41-tilt dose-symmetric series (:func:`series_rows`):
bias, median error and collapsed astigmatism fits of both tools (``--series-only``
runs just that; ``--quick`` leaves it out, the peer needs many minutes for it).

The peer: ``torch_ctf_estimation.estimate_ctf`` with the same fit range (30-5 Å),
defocus range (0.5-6 µm) and tile size in Å (384 px tiles at its internal 2.0 Å pixel),
a single defocus for untilted images (``defocus_model="grid"``, 1x1) and a linear
defocus gradient for tilted ones (``defocus_model="linear"``, the peer's tilt mode;
its ``defocus_0`` is the centre defocus). Torch uses its default CPU threads.
Install the peer with ``pip install torch==2.13.0`` first, then
``pip install torch-ctf-estimation``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, as a script or imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tomodask from the checkout

from _common import print_table, timed, write_json  # noqa: E402

from tomodask.kernels.ctf import estimate_ctf, estimate_ctf_from_spectra, strip_spectra  # noqa: E402
from tomodask.kernels.ctf_series import refine_series_ctf  # noqa: E402
from tomodask.simulate import simulate_single_tilt  # noqa: E402
from tomodask.simulate.microscope import dose_symmetric_order  # noqa: E402

PIXEL_ANGSTROM = 1.5
AXIS_DEG = 85.0
OPTICS = dict(voltage_kv=300.0, spherical_aberration_mm=2.7, amplitude_contrast=0.07)
FIT_RANGE_ANGSTROM = (30.0, 5.0)
DEFOCUS_RANGE_ANGSTROM = (5000.0, 60000.0)


@dataclass(frozen=True)
class Case:
    """One benchmark case: the acquisition of its images and how many are fitted."""

    name: str
    tilt_deg: float
    dose_e_per_angstrom2: float = 3.0
    bfactor_angstrom2: float = 60.0
    size_px: int = 1024
    n_images: int = 6
    quick_images: int = 3


CASES = (
    Case("tilt0", 0.0),
    Case("tilt30", 30.0),
    Case("tilt60", 60.0),
    # weak rings: one image's error is ~200 Å of noise, so the quick run needs more images
    # than three to tell the tools apart (se of a median of 3 is ~150 Å)
    Case("tilt45_B500", 45.0, bfactor_angstrom2=500.0, n_images=9, quick_images=9),
    Case("tilt-60_dose1.5_B250", -60.0, dose_e_per_angstrom2=1.5, bfactor_angstrom2=250.0),
    Case("tilt60_2048px", 60.0, size_px=2048, n_images=2),
)
#: Cases of ``--quick``, with ``Case.quick_images`` images each.
QUICK_CASES = ("tilt0", "tilt60", "tilt45_B500")


def simulate(case: Case, seed: int, size: int) -> tuple[np.ndarray, float]:
    """Gain-corrected summed movie of one simulated tilt, and its true mean defocus."""
    defocus = 18000.0 + 4000.0 * seed
    tilt = simulate_single_tilt(
        seed=seed, shape_yx=(size, size), pixel_size_angstrom=PIXEL_ANGSTROM, n_frames=8,
        dose_e_per_angstrom2=case.dose_e_per_angstrom2, tilt_angle_deg=case.tilt_deg,
        tilt_axis_angle_deg=AXIS_DEG, defocus_angstrom=defocus, astigmatism_angstrom=1000.0,
        astigmatism_angle_deg=-60.0 + 37.0 * seed, drift_total_px=0.0,
        bfactor_angstrom2=case.bfactor_angstrom2,
    )
    image = (tilt.frames.astype(np.float32) * tilt.gain).sum(0)
    return image, 0.5 * (tilt.truth.defocus_u_angstrom + tilt.truth.defocus_v_angstrom)


def ours_options(fit_range: tuple[float, float]) -> dict:
    """tomodask's ``estimate_ctf`` options in this benchmark, except the tilt angle."""
    return dict(pixel_size_angstrom=PIXEL_ANGSTROM, tilt_axis_angle_deg=AXIS_DEG,
                defocus_search_range_angstrom=DEFOCUS_RANGE_ANGSTROM, tile_size_px=512,
                resolution_range_angstrom=fit_range, **OPTICS)


def ours(image: np.ndarray, tilt_deg: float, fit_range: tuple[float, float] = FIT_RANGE_ANGSTROM) -> tuple[float, float]:
    """tomodask's mean defocus at the image centre and astigmatism U - V (Å)."""
    r = estimate_ctf(image, tilt_angle_deg=tilt_deg, **ours_options(fit_range))
    return r.defocus_angstrom, r.astigmatism_angstrom


def _install_torchvision_stand_in() -> None:
    """Put a minimal ``torchvision.transforms.functional.gaussian_blur`` into sys.modules.

    torch-ctf-estimation imports torchvision only for this one Gaussian blur (its 2D
    background), and the PyPI torchvision wheel fails to import beside the CPU build of
    torch (``operator torchvision::nms does not exist``). This stand-in, used by this
    benchmark only, implements the blur with torch ops: a separable normalised Gaussian
    kernel with reflect padding, as torchvision's own implementation does.
    """
    if "torchvision.transforms.functional" in sys.modules:
        return
    import torch

    def gaussian_blur(img, kernel_size, sigma=None):
        ks = [kernel_size] * 2 if isinstance(kernel_size, int) else list(kernel_size)
        if sigma is None:
            sigma = [0.3 * ((k - 1) * 0.5 - 1) + 0.8 for k in ks]
        sg = [float(sigma)] * 2 if isinstance(sigma, (int, float)) else [float(s) for s in sigma]

        def kernel(k: int, s: float) -> torch.Tensor:
            x = torch.arange(k, dtype=img.dtype, device=img.device) - (k - 1) / 2
            w = torch.exp(-0.5 * (x / s) ** 2)
            return w / w.sum()

        kx, ky = ks
        shape = img.shape
        t = img.reshape(-1, 1, shape[-2], shape[-1])
        t = torch.nn.functional.pad(t, [kx // 2, kx // 2, ky // 2, ky // 2], mode="reflect")
        t = torch.nn.functional.conv2d(t, kernel(kx, sg[0]).view(1, 1, 1, kx))
        t = torch.nn.functional.conv2d(t, kernel(ky, sg[1]).view(1, 1, ky, 1))
        return t.reshape(shape)

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.gaussian_blur = gaussian_blur
    transforms.functional = functional
    tv.transforms = transforms
    sys.modules.update({
        "torchvision": tv,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
    })


def peer(image: np.ndarray, tilt_deg: float, fit_range: tuple[float, float] = FIT_RANGE_ANGSTROM) -> tuple[float, float]:
    """torch-ctf-estimation's mean defocus at the image centre and astigmatism (Å), on the CPU."""
    _install_torchvision_stand_in()
    import torch
    import torch_ctf_estimation as tce

    optical = tce.OpticalParams(
        pixel_spacing_angstroms=PIXEL_ANGSTROM, voltage_kev=OPTICS["voltage_kv"],
        spherical_aberration_mm=OPTICS["spherical_aberration_mm"],
        amplitude_contrast_fraction=OPTICS["amplitude_contrast"], target_pixel_spacing_angstroms=2.0,
    )
    tilted = tilt_deg != 0.0
    fitting = tce.CTFFittingParams(
        defocus_grid_resolution=(1, 2, 2) if tilted else (1, 1, 1),
        defocus_model="linear" if tilted else "grid",
        frequency_fit_range_angstroms=fit_range,
        defocus_range_microns=tuple(d / 1e4 for d in DEFOCUS_RANGE_ANGSTROM),
        patch_sidelength=384,
    )
    _, _, result2d = tce.estimate_ctf(torch.as_tensor(image), optical, fitting, device=torch.device("cpu"))
    u, v = float(result2d.defocus_u) * 1e4, float(result2d.defocus_v) * 1e4
    return 0.5 * (u + v), abs(u - v)


TOOLS = {"tomodask": ours, "torch-ctf-estimation": peer}


def ctf_rows(*, quick: bool) -> list[dict]:
    """Fit every case's images with both tools; one row per (tool, case).

    Parameters
    ----------
    quick
        Three cases, 3-9 1024² images each (a few minutes, nearly all of it the
        peer's); otherwise every case of :data:`CASES` (about 15 minutes).

    Returns
    -------
    list of dict
        ``tool``, ``step`` ("ctf"), ``case``, ``seconds`` (median per image),
        ``defocus_error_angstrom_median`` (median absolute error of the mean defocus),
        ``defocus_error_angstrom_rms``, ``defocus_errors_angstrom`` (each image),
        ``n_images``, ``image_size_px``.
    """
    cases = [c for c in CASES if c.name in QUICK_CASES] if quick else list(CASES)
    warm, _ = simulate(cases[0], 99, 1024)
    for fn in TOOLS.values():  # imports, first-call set-up
        fn(warm, cases[0].tilt_deg)
    rows = []
    for case in cases:
        n_images = case.quick_images if quick else case.n_images
        images = [simulate(case, seed, case.size_px) for seed in range(n_images)]
        for tool, fn in TOOLS.items():
            seconds, errors = [], []
            for image, truth in images:
                (estimate, _), elapsed = timed(fn, image, case.tilt_deg)
                seconds.append(elapsed)
                errors.append(estimate - truth)
            rows.append({
                "tool": tool, "step": "ctf", "case": case.name,
                "seconds": statistics.median(seconds),
                "defocus_error_angstrom_median": statistics.median(abs(e) for e in errors),
                "defocus_error_angstrom_rms": float(np.sqrt(np.mean(np.square(errors)))),
                "defocus_errors_angstrom": [round(e, 1) for e in errors],
                "n_images": len(images), "image_size_px": case.size_px,
            })
    return rows


#: The tilt-series case: 41 tilts of ±60° in 3° steps, acquired dose-symmetrically.
SERIES_TILTS_DEG = np.arange(-60.0, 60.5, 3.0)
#: Image side of the tilt-series case (full run and ``--series-only``).
SERIES_SIZE_PX = 1024
#: Fitted astigmatism below this (Å) while the truth is >= 500 Å counts as collapsed.
COLLAPSED_ASTIGMATISM_ANGSTROM = 100.0
#: Defocus error (Å) counted as a gross failure in the tilt-series case.
GROSS_ERROR_ANGSTROM = 2000.0
#: tomodask's default astigmatism search limit (Å); fits within 3% of it count as at the limit.
SERIES_MAX_ASTIGMATISM_ANGSTROM = 3000.0
#: Fit range of the tilt-series case (Å): after ~100 e-/Å² of prior exposure the Thon
#: rings of the last tilts are gone beyond ~20 Å, so both tools fit from 50 Å.
SERIES_FIT_RANGE_ANGSTROM = (50.0, 5.0)


def simulate_series(seed: int, *, size: int) -> list[tuple[np.ndarray, float, float, float]]:
    """Tilts of one simulated dose-symmetric series: image, tilt, true mean defocus and astigmatism.

    Each tilt is a gain-corrected 8-frame sum of :func:`simulate_single_tilt` at 3 e-/Å²
    with the exposure received before it in a dose-symmetric (Hagen, groups of 2) order
    (radiation damage), the same specimen, a defocus drawn per tilt (3 µm ± 0.15 µm), and
    one astigmatism (500-1500 Å) and astigmatism angle for the whole series (the objective
    lens' astigmatism does not change during the minutes of a tilt-series), all from ``seed``.
    """
    n = len(SERIES_TILTS_DEG)
    rng = np.random.default_rng(seed)
    defocus = 30000.0 + rng.normal(0.0, 1500.0, n)
    astig = np.full(n, rng.uniform(500.0, 1500.0))
    angle = np.full(n, rng.uniform(-90.0, 90.0))
    prior = np.empty(n)
    prior[dose_symmetric_order(SERIES_TILTS_DEG)] = 3.0 * np.arange(n)
    out = []
    for i in range(n):
        tilt = simulate_single_tilt(
            seed=seed, shape_yx=(size, size), pixel_size_angstrom=PIXEL_ANGSTROM, n_frames=8,
            dose_e_per_angstrom2=3.0, tilt_angle_deg=float(SERIES_TILTS_DEG[i]), tilt_axis_angle_deg=AXIS_DEG,
            defocus_angstrom=float(defocus[i]), astigmatism_angstrom=float(astig[i]),
            astigmatism_angle_deg=float(angle[i]), drift_total_px=0.0, prior_dose_e_per_angstrom2=float(prior[i]),
        )
        image = (tilt.frames.astype(np.float32) * tilt.gain).sum(0)
        t = tilt.truth
        out.append((image, float(SERIES_TILTS_DEG[i]), 0.5 * (t.defocus_u_angstrom + t.defocus_v_angstrom),
                    t.defocus_u_angstrom - t.defocus_v_angstrom))
    return out


def series_rows(*, seed: int = 0, tools: tuple[str, ...] = tuple(TOOLS)) -> list[dict]:
    """Fit every tilt of a simulated 41-tilt series with both tools; one row per tool.

    Parameters
    ----------
    seed
        Seed of the series.
    tools
        Names in :data:`TOOLS` to run (the peer takes minutes per series).

    Returns
    -------
    list of dict
        One per tool, and for tomodask a second after :func:`refine_series_ctf`:
        ``tool``, ``step`` ("ctf_series"), ``case``, ``seconds`` (median per tilt; for the
        refinement row the mean per tilt of first fits plus refinement),
        ``defocus_bias_angstrom`` (mean signed error), ``defocus_error_angstrom_median``
        (median absolute error), ``defocus_error_angstrom_rms``, ``n_astigmatism_collapsed``
        (fits below :data:`COLLAPSED_ASTIGMATISM_ANGSTROM`, all truths being >= 500 Å),
        ``defocus_errors_angstrom``, ``astigmatism_fitted_angstrom``, ``n_images``.
    """
    tilts = simulate_series(seed, size=SERIES_SIZE_PX)
    truths = [t[2] for t in tilts]
    rows = []
    for tool in tools:
        if tool == "tomodask":
            rows += _ours_series_rows(tilts)
            continue
        fn = TOOLS[tool]
        seconds, estimates, astigs = [], [], []
        for image, tilt_deg, _, _ in tilts:
            (estimate, astig), elapsed = timed(fn, image, tilt_deg, SERIES_FIT_RANGE_ANGSTROM)
            seconds.append(elapsed)
            estimates.append(estimate)
            astigs.append(astig)
        rows.append(_series_row(tool, statistics.median(seconds), estimates, astigs, truths))
    return rows


def _ours_series_rows(tilts: list[tuple[np.ndarray, float, float, float]]) -> list[dict]:
    """tomodask per tilt, and after :func:`refine_series_ctf` (its seconds spread over the tilts)."""
    options = ours_options(SERIES_FIT_RANGE_ANGSTROM)
    spectra_options = {k: options[k] for k in ("pixel_size_angstrom", "tilt_axis_angle_deg", "tile_size_px",
                                               "resolution_range_angstrom")}
    fit_options = {k: v for k, v in options.items() if k not in spectra_options}
    spectra, fits, seconds = [], [], []
    for image, tilt_deg, _, _ in tilts:
        (s, fit), elapsed = timed(_spectra_and_fit, image, tilt_deg, spectra_options, fit_options)
        spectra.append(s)
        fits.append(fit)
        seconds.append(elapsed)
    truths = [t[2] for t in tilts]
    row = _series_row("tomodask", statistics.median(seconds), [f.defocus_angstrom for f in fits],
                      [f.astigmatism_angstrom for f in fits], truths)
    refined, elapsed = timed(
        refine_series_ctf, spectra, np.array([t[1] for t in tilts]),
        *(np.array([getattr(f, name) for f in fits]) for name in
          ("defocus_u_angstrom", "defocus_v_angstrom", "astigmatism_angle_deg", "fit_resolution_angstrom")),
        fit_options=fit_options)
    per_tilt = (sum(seconds) + elapsed) / len(tilts)
    series = _series_row("tomodask + series refinement", per_tilt, list(refined.defocus_angstrom),
                         list(refined.defocus_u_angstrom - refined.defocus_v_angstrom), truths)
    series.update(n_refitted=int(refined.refitted.sum()), series_astigmatism_angstrom=refined.astigmatism_angstrom,
                  series_astigmatism_error_angstrom=refined.astigmatism_angstrom - tilts[0][3],
                  refinement_seconds=elapsed)
    return [row, series]


def _spectra_and_fit(image: np.ndarray, tilt_deg: float, spectra_options: dict, fit_options: dict) -> tuple:
    """What ``estimate_ctf`` does, keeping the strip spectra for the series refinement."""
    spectra = strip_spectra(image, tilt_angle_deg=tilt_deg, **spectra_options)
    return spectra, estimate_ctf_from_spectra(spectra, **fit_options)


def _series_row(tool: str, seconds: float, estimates: list[float], astigs: list[float],
                truths: list[float]) -> dict:
    """The series row of one tool from its per-tilt mean defocus and astigmatism (Å)."""
    errors = [e - t for e, t in zip(estimates, truths)]
    return {
        "tool": tool, "step": "ctf_series", "case": f"series41_{SERIES_SIZE_PX}px",
        "seconds": seconds,
        "defocus_bias_angstrom": float(np.mean(errors)),
        "defocus_error_angstrom_median": statistics.median(abs(e) for e in errors),
        "defocus_error_angstrom_rms": float(np.sqrt(np.mean(np.square(errors)))),
        "n_astigmatism_collapsed": int(sum(a < COLLAPSED_ASTIGMATISM_ANGSTROM for a in astigs)),
        "n_gross_errors": int(sum(abs(e) > GROSS_ERROR_ANGSTROM for e in errors)),
        "n_astigmatism_at_limit": int(sum(a >= 0.97 * SERIES_MAX_ASTIGMATISM_ANGSTROM for a in astigs)),
        "defocus_errors_angstrom": [round(float(e), 1) for e in errors],
        "astigmatism_fitted_angstrom": [round(float(a), 1) for a in astigs],
        "n_images": len(errors), "image_size_px": SERIES_SIZE_PX,
    }


def display_rows(rows: list[dict]) -> list[dict]:
    """Rows for the printed table, with the peer's time and median error as ratios to ours."""
    ours_by_case = {r["case"]: r for r in rows if r["tool"] == "tomodask"}
    out = []
    for r in rows:
        d = {k: r[k] for k in ("case", "tool", "seconds", "defocus_error_angstrom_median",
                                "defocus_error_angstrom_rms", "n_images")}
        o = ours_by_case.get(r["case"])
        if r["tool"] != "tomodask" and o is not None:
            d["time_ratio_peer_over_ours"] = r["seconds"] / max(o["seconds"], 1e-9)
            d["error_ratio_peer_over_ours"] = r["defocus_error_angstrom_median"] / max(
                o["defocus_error_angstrom_median"], 1e-9)
        out.append(d)
    return out


SERIES_COLUMNS = ["case", "tool", "n_images", "seconds", "defocus_bias_angstrom", "defocus_error_angstrom_median",
                  "defocus_error_angstrom_rms", "n_astigmatism_collapsed",
                  "n_gross_errors", "n_astigmatism_at_limit", "series_astigmatism_error_angstrom"]
TABLE_COLUMNS = ["case", "tool", "n_images", "seconds", "defocus_error_angstrom_median",
                 "defocus_error_angstrom_rms", "time_ratio_peer_over_ours", "error_ratio_peer_over_ours"]


def main(argv: list[str] | None = None) -> None:
    """Command line: run, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller images")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--series-only", action="store_true",
                        help="only the 41-tilt series case (part of the full run; too slow for --quick)")
    parser.add_argument("--series-seed", type=int, default=0, help="seed of the 41-tilt series")
    parser.add_argument("--series-tools", nargs="+", choices=tuple(TOOLS), default=tuple(TOOLS),
                        help="tools run on the series (default: all)")
    args = parser.parse_args(argv)
    rows = [] if args.series_only else ctf_rows(quick=args.quick)
    if rows:
        print_table(display_rows(rows), TABLE_COLUMNS)
    if args.series_only or not args.quick:
        series = series_rows(seed=args.series_seed, tools=tuple(args.series_tools))
        print_table(series, SERIES_COLUMNS)
        rows += series
    if args.json is not None:
        write_json(args.json, "movie_ctf", rows)


if __name__ == "__main__":
    main()
