"""Tilt-series benchmark: alignment (tomodask vs torch-tiltxcorr / torch-refine-tilt-axis-angle)
and, when ``benchmarks/tilt_series_reconstruct.py`` is present, reconstruction.

Run ``python benchmarks/tilt_series.py [--quick] [--json OUT.json] [--cases nogold,... --seeds 0,1]``
(reconstruction rows only when every case runs).

Alignment cases (simulated with the simulator's defaults: shift spread 2 % of the field +
0.1 %/degree, 1500 Å of ice with gold on its surfaces, true axis 85°):

``default``
    41 tilts of ±60° in 3° steps, 256² at 6 Å/px (aligned at 12 Å, 1/128 of the field),
    nominal axis given 3° off (88°).
``pretilt5``
    the same with the specimen pre-tilted by 5° (tilt-angle offset), nominal axis 82°.
``tiny``
    the session tests' preset: 16 tilts of 8°, 384² at 2.5 Å/px aligned at 7.5 Å, 1000 Å
    of ice in a 960 Å field, recorded axis 2° off, one dark tilt.
``tiny_pretilt5``
    the tiny preset with a 5° pre-tilt (seed 0: gold on one surface only).
``nogold``
    ``default`` without gold beads (particles and a vesicle only).
``tiny_nogold``
    the tiny preset without gold beads.

Errors at the alignment pixel size, per tilt, max and median over the tilts each tool kept:
``offset_err`` after removing only a common offset (what a reconstruction centred on the
specimen needs); ``gauge_free_err`` after removing instead a rigid translation of the
specimen, ``X cos(theta) + Z sin(theta)`` across the axis and a constant along it (what the
projections alone fix; :func:`gauge_free_residuals_px`). The peers do not centre, so only their
gauge-free errors are comparable. The peers get the binned stack (Fourier-binned outside
their timing) and the true or nominal axis; tomodask's time includes its own binning,
exclusion, axis search, centring and failure checks. ``cpu_seconds`` is the process time
(the machine is shared; wall seconds vary with the load).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import print_table, timed, write_json  # noqa: E402

from tomodask.kernels.fourier import fourier_crop  # noqa: E402
from tomodask.kernels.tilt_align import (  # noqa: E402
    align_tilt_series,
    apply_alignment,
    gauge_free_residuals_px,
    gauge_free_shift_error_px,
)
from tomodask.simulate import simulate_tilt_series  # noqa: E402
from tomodask.simulate.writer import SIZE_PRESETS  # noqa: E402

TRUE_AXIS = 85.0
CASES = {
    "default": dict(spec=dict(shape_yx=(256, 256), pixel_size_angstrom=6.0), nominal_axis=88.0, align_px=12.0),
    "pretilt5": dict(spec=dict(shape_yx=(256, 256), pixel_size_angstrom=6.0, tilt_angle_offset_deg=5.0),
                     nominal_axis=82.0, align_px=12.0),
    "tiny": dict(spec={**SIZE_PRESETS["tiny"], "tilt_step_deg": 8.0, "dark_tilt_acquisition_indices": (13,)},
                 nominal_axis=87.0, align_px=7.5),
    "tiny_pretilt5": dict(spec={**SIZE_PRESETS["tiny"], "tilt_step_deg": 8.0, "dark_tilt_acquisition_indices": (13,),
                                "tilt_angle_offset_deg": 5.0}, nominal_axis=87.0, align_px=7.5),
    "nogold": dict(spec=dict(shape_yx=(256, 256), pixel_size_angstrom=6.0, n_gold=0), nominal_axis=88.0, align_px=12.0),
    "tiny_nogold": dict(spec={**SIZE_PRESETS["tiny"], "tilt_step_deg": 8.0, "dark_tilt_acquisition_indices": (13,),
                              "n_gold": 0}, nominal_axis=87.0, align_px=7.5),
}


def midplane_error_angstrom(shifts_px, truth_px, angles_deg, use, pixel_size_angstrom: float) -> float:
    """Height of the true mid-plane above the rotation centre the shifts imply (Å)."""
    a = np.deg2rad(TRUE_AXIS)
    across = (shifts_px[use] - truth_px[use]) @ np.array([np.sin(a), np.cos(a)])
    sin_t = np.sin(np.deg2rad(angles_deg[use]))
    coef, *_ = np.linalg.lstsq(np.stack([np.ones_like(sin_t), sin_t], axis=1), across, rcond=None)
    return float(coef[1] * pixel_size_angstrom)


def errors_px(shifts_px, truth_px, angles_deg, use) -> tuple[np.ndarray, np.ndarray]:
    """Per-tilt errors (same units as the inputs): common offset removed; and gauge-free."""
    est, true = shifts_px[use], truth_px[use]
    d = (est - est.mean(axis=0)) - (true - true.mean(axis=0))
    gauge_free = gauge_free_shift_error_px(shifts_px, truth_px, angles_deg, tilt_axis_angle_deg=TRUE_AXIS, use=use)
    return np.hypot(d[:, 0], d[:, 1]), gauge_free


def far_tilts(res, shifts_b, truth_b, angles_deg) -> dict:
    """How many aligned tilts (kept or excluded by alignment) are more than 2 px off, with
    the common offset (or the rigid translation of the specimen) fitted on the kept tilts;
    how many of those were excluded."""
    aligned = np.isfinite(shifts_b[:, 0])
    keep = ~res.excluded
    d = shifts_b - truth_b
    offset = d - d[keep].mean(axis=0)
    errors = {"offset": np.hypot(offset[:, 0], offset[:, 1]),
              "gauge_free": gauge_free_residuals_px(shifts_b, truth_b, angles_deg, tilt_axis_angle_deg=TRUE_AXIS,
                                                    fit=keep)}
    out = {}
    for tag, err in errors.items():
        far = aligned & (err > 2.0)
        out[f"n_far_{tag}"] = int(far.sum())
        out[f"n_far_{tag}_excluded"] = int((far & res.excluded).sum())
    return out


def align_rows(*, quick: bool, cases: tuple[str, ...] = tuple(CASES), seeds: tuple[int, ...] | None = None) -> list[dict]:
    import torch
    from torch_refine_tilt_axis_angle import refine_tilt_axis_angle
    from torch_tiltxcorr import tiltxcorr

    torch.set_num_threads(2)
    seeds = seeds or ((0,) if quick else (0, 1, 2, 3))
    rows = []
    for case in cases:
        cfg = CASES[case]
        for seed in seeds:
            ts = simulate_tilt_series(seed, tilt_axis_angle_deg=TRUE_AXIS, **cfg["spec"])
            px = ts.spec.pixel_size_angstrom
            n_b = 128
            bin_factor = ts.images.shape[-1] / n_b
            truth_b = (ts.shifts_px + (bin_factor - 1) / 2) / bin_factor  # displacements at the alignment pixel
            angles = ts.nominal_tilt_angles_deg
            label = f"{case}/seed{seed}"

            cpu0 = time.process_time()
            res, sec = timed(align_tilt_series, ts.images, angles, pixel_size_angstrom=px,
                             tilt_axis_angle_deg=cfg["nominal_axis"], alignment_pixel_size_angstrom=cfg["align_px"],
                             specimen_thickness_angstrom=1.5 * ts.spec.thickness_angstrom)
            cpu = time.process_time() - cpu0
            use = ~res.excluded
            off, gf = errors_px((res.shifts_px + (bin_factor - 1) / 2) / bin_factor, truth_b, ts.tilt_angles_deg, use)
            rows.append(dict(tool="tomodask", step="align", case=label, seconds=sec, cpu_seconds=cpu,
                             offset_err_max_px=float(off.max()), offset_err_median_px=float(np.median(off)),
                             gauge_free_err_max_px=float(gf.max()), gauge_free_err_median_px=float(np.median(gf)),
                             tilt_axis_error_deg=abs(res.tilt_axis_angle_deg - TRUE_AXIS),
                             tilt_angle_offset_deg=res.tilt_angle_offset_deg,
                             tilt_angle_offset_true_deg=float(ts.spec.tilt_angle_offset_deg),
                             midplane_err_angstrom=midplane_error_angstrom(res.shifts_px, ts.shifts_px,
                                                                           ts.tilt_angles_deg, use, px),
                             midplane_sigma_angstrom=res.specimen_z_uncertainty_angstrom,
                             centring=res.centring_method, centring_warning=res.centring_warning,
                             alignment_warning=res.alignment_warning,
                             n_tilts_used=int(use.sum()), n_tilts=len(angles),
                             **far_tilts(res, (res.shifts_px + (bin_factor - 1) / 2) / bin_factor, truth_b,
                                         ts.tilt_angles_deg)))

            rel = ts.images / ts.images.mean(axis=(1, 2), keepdims=True) - 1.0
            binned = fourier_crop(rel, (n_b, n_b))
            keep = np.ones(len(angles), bool)
            keep[ts.dark_tilt_indices] = False
            stack = torch.from_numpy(np.ascontiguousarray(binned[keep]))
            disp = None
            for axis_given, tag in ((TRUE_AXIS, "true axis"), (cfg["nominal_axis"], "nominal axis")):
                out, sec = timed(tiltxcorr, stack, torch.from_numpy(angles[keep]).float(), axis_given,
                                 pixel_spacing_angstroms=cfg["align_px"], lowpass_angstroms=2 * cfg["align_px"])
                # tiltxcorr returns the shift that aligns each image (a correction): negate.
                disp = np.zeros((len(angles), 2))
                disp[keep] = -out.numpy().astype(np.float64)
                off, gf = errors_px(disp, truth_b, ts.tilt_angles_deg, keep)
                rows.append(dict(tool=f"torch-tiltxcorr ({tag})", step="align", case=label, seconds=sec,
                                 offset_err_max_px=float(off.max()), offset_err_median_px=float(np.median(off)),
                                 gauge_free_err_max_px=float(gf.max()),
                                 gauge_free_err_median_px=float(np.median(gf)), n_tilts_used=int(keep.sum()),
                                 n_tilts=len(angles)))
            aligned = torch.from_numpy(apply_alignment(binned[keep], shifts_px=disp[keep], tilt_axis_angle_deg=0.0,
                                                       fill="zero"))
            axis, sec = timed(refine_tilt_axis_angle, aligned, tilt_axis_angle=cfg["nominal_axis"])
            rows.append(dict(tool="torch-refine-tilt-axis-angle", step="align", case=label, seconds=sec,
                             tilt_axis_error_deg=abs(float(axis) - TRUE_AXIS), tilt_axis_deg=float(axis)))
    return rows


def _reconstruction_rows(*, quick: bool) -> list[dict]:
    """Rows of ``benchmarks/tilt_series_reconstruct.py`` when it is present."""
    try:
        from tilt_series_reconstruct import reconstruct_rows
    except ImportError as exc:
        if getattr(exc, "name", None) != "tilt_series_reconstruct":
            raise
        print("reconstruction rows are absent (benchmarks/tilt_series_reconstruct.py not found)")
        return []
    return reconstruct_rows(quick=quick)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed per case")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--seeds", help="comma-separated seeds (default: 0 with --quick, else 0-3)")
    args = parser.parse_args(argv)
    cases = tuple(args.cases.split(","))
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None
    rows = align_rows(quick=args.quick, cases=cases, seeds=seeds)
    if set(cases) != set(CASES):
        print("reconstruction rows left out (not every alignment case ran)")
    else:
        rows += _reconstruction_rows(quick=args.quick)
    align = [r for r in rows if r.get("step") == "align"]
    print_table(align, ["tool", "case", "seconds", "cpu_seconds", "offset_err_max_px", "offset_err_median_px",
                        "gauge_free_err_max_px", "gauge_free_err_median_px", "tilt_axis_error_deg",
                        "tilt_angle_offset_deg", "midplane_err_angstrom", "midplane_sigma_angstrom", "n_tilts_used",
                        "n_far_offset", "n_far_offset_excluded", "n_far_gauge_free", "n_far_gauge_free_excluded"])
    for case in sorted({r["case"] for r in align}):
        ours = next(r for r in align if r["case"] == case and r["tool"] == "tomodask")
        for r in align:
            if r["case"] != case or r["tool"] == "tomodask":
                continue
            parts = [f"{key} {r[key] / ours[key]:.1f}x tomodask's" for key in ("gauge_free_err_max_px",
                                                                               "tilt_axis_error_deg")
                     if key in r and ours.get(key, 0) > 0]
            print(f"{case}: {r['tool']}: " + "; ".join(parts + [f"tomodask takes {ours['seconds'] / r['seconds']:.1f}x"
                                                                f" its time"]))
    for r in align:
        if r["tool"] == "tomodask":
            print(f"{r['case']}: centring {r['centring']!r}, mid-plane error {r['midplane_err_angstrom']:.0f} Å "
                  f"(stated standard error {r['midplane_sigma_angstrom']:.0f} Å){'; ' if r['centring_warning'] else ''}"
                  f"{r['centring_warning']}")
            if r["alignment_warning"]:
                print(f"{r['case']}: {r['alignment_warning']}")
    other = [r for r in rows if r.get("step") != "align"]
    if other:
        keys = sorted({k for r in other for k in r})
        print_table(other, keys)
    if args.json:
        write_json(args.json, "tilt_series", rows)


if __name__ == "__main__":
    main()
