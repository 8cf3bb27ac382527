"""Tilt-series benchmark: alignment (tomodask vs torch-tiltxcorr / torch-refine-tilt-axis-angle)
and, when ``benchmarks/tilt_series_reconstruct.py`` is present, reconstruction.

Run ``python benchmarks/tilt_series.py [--quick] [--json OUT.json]``.

Alignment cases (simulated, 41 tilts, +-60 deg, 256^2 at 6 A/px, true axis 85 deg, nominal
axis given 3 deg off at 88 deg):

``moderate``
    shifts 40 A + 1 A/deg (std), 600 A thick specimen.
``default``
    the simulator's defaults: shifts 60 A + 3 A/deg (up to ~half the field between
    neighbouring tilts at high tilt) and a 1500 A thick specimen (as thick as the field).

Errors are at the alignment pixel size (12 A, binning 2): per-tilt shift error after
removing a common translation and the rotation-centre height term ``z0 sin(theta)`` (what
no projection data can fix), median and max over the tilts each tool kept. The peers get
the same 12 A stack (Fourier-binned outside their timing); tomodask's time includes its own
binning, exclusion, axis search and projection matching.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import print_table, timed, write_json  # noqa: E402

from tomodask.kernels.fourier import fourier_crop  # noqa: E402
from tomodask.kernels.tilt_align import (  # noqa: E402
    align_tilt_series,
    apply_alignment,
    gauge_free_shift_error_px,
)
from tomodask.simulate import simulate_tilt_series  # noqa: E402

TRUE_AXIS = 85.0
NOMINAL_AXIS = 88.0
CASES = {
    "moderate": dict(shift_std_angstrom=40.0, shift_std_per_deg_angstrom=1.0, thickness_angstrom=600.0),
    "default": {},
}


def shift_error_px(shifts_px, truth_px, angles_deg, use):
    """Gauge-free per-tilt shift error (same units as the inputs)."""
    return gauge_free_shift_error_px(shifts_px, truth_px, angles_deg, tilt_axis_angle_deg=TRUE_AXIS, use=use)


def align_rows(*, quick: bool) -> list[dict]:
    import torch
    from torch_refine_tilt_axis_angle import refine_tilt_axis_angle
    from torch_tiltxcorr import tiltxcorr

    torch.set_num_threads(2)
    seeds = (0,) if quick else (0, 1, 2)
    rows = []
    for case, spec in CASES.items():
        for seed in seeds:
            ts = simulate_tilt_series(seed, shape_yx=(256, 256), pixel_size_angstrom=6.0,
                                      tilt_axis_angle_deg=TRUE_AXIS, **spec)
            truth_b = ts.shifts_px / 2.0  # displacements at 12 A
            angles = ts.nominal_tilt_angles_deg
            label = f"{case}/seed{seed}"

            res, sec = timed(align_tilt_series, ts.images, angles, pixel_size_angstrom=6.0,
                             tilt_axis_angle_deg=NOMINAL_AXIS)
            use = ~res.excluded
            err = shift_error_px(res.shifts_px / 2.0, truth_b, ts.tilt_angles_deg, use)
            rows.append(dict(tool="tomodask", step="align", case=label, seconds=sec,
                             residual_px=float(np.median(err)), residual_max_px=float(err.max()),
                             n_tilts_used=int(use.sum())))
            rows.append(dict(tool="tomodask", step="align", case=label, seconds=sec,
                             tilt_axis_error_deg=abs(res.tilt_axis_angle_deg - TRUE_AXIS)))

            rel = ts.images / ts.images.mean(axis=(1, 2), keepdims=True) - 1.0
            binned = fourier_crop(rel, (128, 128))
            stack = torch.from_numpy(binned)
            # Peer coarse shifts with the true axis (its best case) and with the nominal one.
            for axis_given, tag in ((TRUE_AXIS, "true axis"), (NOMINAL_AXIS, "nominal axis")):
                out, sec = timed(tiltxcorr, stack, torch.from_numpy(angles).float(), axis_given,
                                 pixel_spacing_angstroms=12.0, lowpass_angstroms=24.0)
                # tiltxcorr returns the shift that aligns each image (a correction): negate.
                disp = -out.numpy().astype(np.float64)
                allt = np.ones(len(angles), bool)
                err = shift_error_px(disp, truth_b, ts.tilt_angles_deg, allt)
                rows.append(dict(tool=f"torch-tiltxcorr ({tag})", step="align", case=label, seconds=sec,
                                 residual_px=float(np.median(err)), residual_max_px=float(err.max()),
                                 n_tilts_used=len(angles)))
            aligned = torch.from_numpy(apply_alignment(binned, shifts_px=disp, tilt_axis_angle_deg=0.0, fill="zero"))
            axis, sec = timed(refine_tilt_axis_angle, aligned, tilt_axis_angle=NOMINAL_AXIS)
            rows.append(dict(tool="torch-refine-tilt-axis-angle", step="align", case=label, seconds=sec,
                             tilt_axis_error_deg=abs(float(axis) - TRUE_AXIS), tilt_axis_deg=float(axis)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed per case")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    rows = align_rows(quick=args.quick)
    try:
        from tilt_series_reconstruct import reconstruct_rows
    except ImportError as exc:
        if getattr(exc, "name", None) != "tilt_series_reconstruct":
            raise
        print("reconstruction rows are absent (benchmarks/tilt_series_reconstruct.py not found)")
    else:
        rows += reconstruct_rows(quick=args.quick)
    align = [r for r in rows if r.get("step") == "align"]
    print_table(align, ["tool", "case", "seconds", "residual_px", "residual_max_px", "tilt_axis_error_deg"])
    for case in sorted({r["case"] for r in align}):
        ours = [r for r in align if r["case"] == case and r["tool"] == "tomodask"]
        for r in align:
            if r["case"] != case or r["tool"] == "tomodask":
                continue
            for key in ("residual_px", "tilt_axis_error_deg"):
                mine = next((o[key] for o in ours if key in o), None)
                if key in r and mine is not None and mine > 0:
                    print(f"{case}: {r['tool']} {key} / tomodask = {r[key] / mine:.2f}; "
                          f"seconds tomodask / peer = {ours[0]['seconds'] / r['seconds']:.2f}")
    other = [r for r in rows if r.get("step") != "align"]
    if other:
        keys = sorted({k for r in other for k in r})
        print_table(other, keys)
    if args.json:
        write_json(args.json, "tilt_series", rows)


if __name__ == "__main__":
    main()
