"""IMOD .xf / .tlt / .xtilt / .rawtlt readers pinned against real files, and round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tomodask.io.imod import (
    alignment_from_xf,
    read_rawtlt,
    read_tlt,
    read_xf,
    read_xtilt,
    write_tlt,
    write_xf,
    xf_from_alignment,
)

REALDATA = Path(__file__).resolve().parents[2].parent / "shared" / "realdata"
TS_001 = REALDATA / "etomofiles" / "test_data" / "TS_001"
QUOLL_TLT = REALDATA / "quoll" / "data" / "L4_ts_03_sort.tlt"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real IMOD files not found at {path}")
    return path


def test_real_xf_is_a_rotation_by_minus_a_plausible_axis():
    xf = read_xf(need(TS_001) / "TS_001.xf")
    assert xf.shape == (40, 2, 3)
    np.testing.assert_allclose(xf[0, 0], [0.1020875, 0.9947760, 2.395], atol=1e-7)
    np.testing.assert_allclose(xf[0, 1], [-0.9947760, 0.1020875, -3.871], atol=1e-7)
    # Pure rotations (det 1) about 84 degrees: A = R(-a) with a CCW from Y.
    np.testing.assert_allclose(np.linalg.det(xf[:, :, :2]), 1.0, atol=2e-3)
    shifts, axis = alignment_from_xf(xf)
    assert np.all((axis > 80) & (axis < 90))
    assert abs(axis[0] - 84.14) < 0.01
    assert np.abs(shifts).max() < 200
    # Back to IMOD's numbers through tomodask's displacement convention.
    again = xf_from_alignment(shifts, axis)
    np.testing.assert_allclose(again, xf, atol=2e-3)


def test_real_tilt_files():
    tlt = read_tlt(need(TS_001) / "TS_001.tlt")
    raw = read_rawtlt(TS_001 / "TS_001.rawtlt")
    xtilt = read_xtilt(TS_001 / "TS_001.xtilt")
    assert tlt.shape == raw.shape == xtilt.shape == (40,)
    assert tlt[0] == pytest.approx(-57.12) and raw[0] == pytest.approx(-60.0)
    assert np.all(np.diff(raw) > 0)
    assert np.abs(xtilt).max() < 1.0
    # tiltalign's refined angles differ from the stage's by a near-constant offset.
    assert np.std(tlt - raw) < 0.2
    quoll = read_tlt(need(QUOLL_TLT))
    assert quoll.ndim == 1 and len(quoll) > 10 and np.all(np.abs(quoll) <= 70)


def test_real_files_round_trip(tmp_path):
    xf = read_xf(need(TS_001) / "TS_001.xf")
    tlt = read_tlt(TS_001 / "TS_001.tlt")
    np.testing.assert_allclose(read_xf(write_xf(tmp_path / "a.xf", xf)), xf, atol=1e-9)
    assert (tmp_path / "a.xf").read_text().splitlines()[0] == (TS_001 / "TS_001.xf").read_text().splitlines()[0]
    np.testing.assert_allclose(read_tlt(write_tlt(tmp_path / "a.tlt", tlt)), tlt, atol=1e-9)


def test_displacement_convention_maps_points():
    # A feature observed at raw position r (from the centre) lands at R(-a)(r - s).
    shifts = np.array([[2.0, -3.0]])  # (dy, dx)
    xf = xf_from_alignment(shifts, 30.0)
    a = np.deg2rad(30.0)
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    r = np.array([10.0, 4.0])  # (x, y)
    expected = rot @ (r - shifts[0, ::-1])
    np.testing.assert_allclose(xf[0, :, :2] @ r + xf[0, :, 2], expected, atol=1e-12)
    back, axis = alignment_from_xf(xf)
    np.testing.assert_allclose(back, shifts, atol=1e-12)
    assert axis[0] == pytest.approx(30.0)


def test_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.xf"
    bad.write_text("1 0 0 1 0\n")
    with pytest.raises(ValueError, match="bad.xf:1"):
        read_xf(bad)
    empty = tmp_path / "empty.tlt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.tlt"):
        read_tlt(empty)
