"""Small helpers shared by the benchmarks: timing, a text table with ratios, JSON output.

Every benchmark is one script run as ``python benchmarks/NAME.py [--quick] [--json OUT.json]``
(:func:`benchmark_arguments`). Rows are flat dicts such as
``{"tool": "tomodask", "step": "motion", "case": "...", "seconds": 0.4, "shift_rmse_px": 0.1}``;
:func:`add_ratios` compares every row with the tomodask row of the same case,
:func:`print_table` prints them and :func:`write_json` writes
``{"benchmark": NAME, "rows": [...], "machine": {...}}``.

Typical use::

    from _common import add_ratios, benchmark_parser, print_table, timed, write_json

    args = benchmark_parser(__doc__).parse_args()
    result, seconds = timed(fn, data)                  # one call
    result, seconds = best_of(3, fn, data)             # fastest of three calls
    rows = add_ratios(rows, metrics=("seconds",))      # adds "seconds_vs_tomodask"
    print_table(rows, ["tool", "case", "seconds", "seconds_vs_tomodask"])
    if args.json:
        write_json(args.json, "movie", rows)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Run ``fn(*args, **kwargs)`` once; return its result and the wall-clock seconds."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def best_of(n: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Run ``fn`` ``n`` times; return the last result and the fewest seconds of one call."""
    best, out = float("inf"), None
    for _ in range(max(1, n)):
        out, seconds = timed(fn, *args, **kwargs)
        best = min(best, seconds)
    return out, best


def add_ratios(
    rows: list[dict],
    *,
    metrics: Sequence[str] = ("seconds",),
    baseline: str = "tomodask",
    group_by: Sequence[str] = ("case",),
    tool_key: str = "tool",
) -> list[dict]:
    """Add ``<metric>_vs_<baseline>`` = row value / baseline value to every row.

    Parameters
    ----------
    rows
        Result rows (not modified; copies are returned).
    metrics
        Numeric columns to compare (for seconds, a ratio of 3 means the row took 3x as
        long as the baseline; for an error, 3x its error).
    baseline
        Value of ``tool_key`` of the reference rows.
    group_by
        Columns that must match between a row and its baseline (e.g. case, step).
    tool_key
        Column naming the tool.

    Returns
    -------
    list of dict
        Copies of ``rows`` with the ratio columns (None where either value is missing or
        the baseline value is zero).
    """
    ref = {tuple(r.get(k) for k in group_by): r for r in rows if r.get(tool_key) == baseline}
    out = []
    for r in rows:
        r = dict(r)
        b = ref.get(tuple(r.get(k) for k in group_by))
        for m in metrics:
            v, bv = r.get(m), None if b is None else b.get(m)
            ok = isinstance(v, (int, float)) and isinstance(bv, (int, float)) and bv != 0
            r[f"{m}_vs_{baseline}"] = float(v) / float(bv) if ok else None
        out.append(r)
    return out


def print_table(rows: list[dict], columns: list[str], *, title: str | None = None) -> None:
    """Print rows as a fixed-width table (missing values blank, floats to 3 significant digits)."""
    if title:
        print(f"\n{title}")
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) if rows else len(c) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def machine() -> dict:
    """Where the numbers were measured: CPU count, platform, Python and library versions, date."""
    info = {"date": date.today().isoformat(), "platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version()}
    for mod in ("numpy", "scipy", "torch", "cupy"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            continue
    return info


def write_json(path: str | Path, benchmark: str, rows: list[dict], *, extra: dict | None = None) -> None:
    """Write ``{"benchmark": name, "rows": rows, "machine": machine(), **extra}`` (indented JSON)."""
    payload = {"benchmark": benchmark, "rows": rows, "machine": machine(), **(extra or {})}
    Path(path).write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):  # numpy scalars and arrays
        return v.tolist()
    return str(v)


def benchmark_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Argument parser with the common options ``--quick`` and ``--json OUT.json``.

    Add a benchmark's own options to it, then call ``parse_args()``.
    """
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small cases only (minutes on a laptop CPU)")
    parser.add_argument("--json", type=Path, metavar="OUT.json", help="also write the rows as JSON")
    return parser
