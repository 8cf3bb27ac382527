"""Minimal helpers shared by the benchmarks: timing, a text table with ratios, JSON output."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Run ``fn(*args, **kwargs)`` once; return its result and the wall-clock seconds."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print rows as a fixed-width table (missing values blank)."""
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def write_json(path: str | Path, benchmark: str, rows: list[dict]) -> None:
    """Write ``{"benchmark": name, "rows": rows}``."""
    Path(path).write_text(json.dumps({"benchmark": benchmark, "rows": rows}, indent=2) + "\n")
