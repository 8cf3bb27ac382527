"""IMOD alignment files: ``.xf`` transforms and ``.tlt`` / ``.rawtlt`` / ``.xtilt`` angles.

``.xf``
    One line per view, ``A11 A12 A21 A22 DX DY``: the linear transform that maps a raw
    image to the aligned one, about the image centres,
    ``x' = A11 x + A12 y + DX``, ``y' = A21 x + A22 y + DY`` with ``(x, y)`` from the centre
    of the raw image and ``(x', y')`` from the centre of the aligned image, in raw
    (unbinned input-stack) pixels. For a tilt-series, ``A`` rotates by minus the
    tilt-axis angle so that the axis becomes vertical (IMOD's convention:
    ``A = [[cos a, sin a], [-sin a, cos a]]`` for the axis ``a`` degrees counter-clockwise
    from Y) and ``(DX, DY)`` is the shift correction applied after the rotation.
``.tlt`` / ``.rawtlt``
    One tilt angle (degrees) per line: ``.rawtlt`` the stage angles, ``.tlt`` the
    refined ones written by ``tiltalign``.
``.xtilt``
    One X-axis tilt (degrees) per line.

Mapping to tomodask's convention (:mod:`tomodask.kernels.geometry`): tomodask's
``shifts_px`` ``s = (dy, dx)`` are *displacements* of the image content,
``observed(r) = ideal(r - s)``, and the aligned image is the ideal one rotated so the axis
is along Y: ``aligned(r') = observed(R(a) r' + s)``. Hence an observed point ``r`` lands at
``r' = R(-a) r - R(-a) s``, so

    ``A = R(-a)``,  ``(DX, DY) = -R(-a) (dx, dy)``,  and back: ``(dx, dy) = -A^-1 (DX, DY)``.

IMOD's image y axis points up the displayed image, which is tomodask's row axis for an
MRC read as stored (no flip), so no sign change is needed between the two frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _read_columns(path: str | Path, n_columns: int, kind: str) -> np.ndarray:
    path = Path(path)
    rows = []
    with open(path, encoding="ascii", errors="strict") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != n_columns:
                raise ValueError(
                    f"{path}:{lineno}: an IMOD {kind} line needs {n_columns} numbers, found {len(parts)}: {line.strip()!r}"
                )
            try:
                rows.append([float(p) for p in parts])
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not a number in IMOD {kind} line {line.strip()!r}") from exc
    if not rows:
        raise ValueError(f"{path} holds no {kind} lines; is it an empty or truncated file?")
    return np.asarray(rows, dtype=np.float64)


def read_xf(path: str | Path) -> np.ndarray:
    """Read an IMOD ``.xf`` file.

    Parameters
    ----------
    path
        The ``.xf`` (or ``.prexf``) file.

    Returns
    -------
    ndarray
        ``(t, 2, 3)`` transforms ``[[A11, A12, DX], [A21, A22, DY]]`` in file order.

    Raises
    ------
    ValueError
        When a line does not hold six numbers (the message names the file and line).
    """
    cols = _read_columns(path, 6, ".xf")
    out = np.empty((len(cols), 2, 3))
    out[:, 0, 0], out[:, 0, 1], out[:, 1, 0], out[:, 1, 1] = cols[:, 0], cols[:, 1], cols[:, 2], cols[:, 3]
    out[:, 0, 2], out[:, 1, 2] = cols[:, 4], cols[:, 5]
    return out


def write_xf(path: str | Path, transforms: np.ndarray) -> Path:
    """Write an IMOD ``.xf`` file (IMOD's ``%12.7f`` x4 ``%12.3f`` x2 layout).

    Parameters
    ----------
    path
        File to write.
    transforms
        ``(t, 2, 3)`` transforms as returned by :func:`read_xf` or :func:`xf_from_alignment`.

    Returns
    -------
    Path
        The path written.
    """
    m = np.asarray(transforms, dtype=np.float64)
    if m.ndim != 3 or m.shape[1:] != (2, 3):
        raise ValueError(f"transforms must be (t, 2, 3); got {m.shape}")
    lines = [
        f"{a[0, 0]:12.7f}{a[0, 1]:12.7f}{a[1, 0]:12.7f}{a[1, 1]:12.7f}{a[0, 2]:12.3f}{a[1, 2]:12.3f}\n" for a in m
    ]
    path = Path(path)
    path.write_text("".join(lines), encoding="ascii")
    return path


def read_tlt(path: str | Path) -> np.ndarray:
    """Read a ``.tlt``, ``.rawtlt`` or ``.xtilt`` file: one angle in degrees per line.

    Returns
    -------
    ndarray
        ``(t,)`` angles in degrees, in file order.
    """
    return _read_columns(path, 1, "angle")[:, 0]


#: ``.xtilt`` and ``.rawtlt`` files have the ``.tlt`` layout.
read_xtilt = read_tlt
read_rawtlt = read_tlt


def write_tlt(path: str | Path, angles_deg: np.ndarray, *, decimals: int = 2) -> Path:
    """Write angles one per line as IMOD does (``.tlt``, ``.rawtlt``, ``.xtilt``).

    Parameters
    ----------
    path
        File to write.
    angles_deg
        ``(t,)`` angles in degrees.
    decimals
        Digits after the decimal point (``tiltalign`` writes 2).

    Returns
    -------
    Path
        The path written.
    """
    a = np.asarray(angles_deg, dtype=np.float64).ravel()
    path = Path(path)
    path.write_text("".join(f"{v:{7 + decimals}.{decimals}f}\n" for v in a), encoding="ascii")
    return path


def _rotation_xy(angle_deg: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def xf_from_alignment(shifts_px: np.ndarray, tilt_axis_angle_deg: float | np.ndarray) -> np.ndarray:
    """IMOD transforms from tomodask displacements and the tilt-axis angle.

    Parameters
    ----------
    shifts_px
        ``(t, 2)`` displacements ``(dy, dx)`` of each raw image's content, in raw pixels.
    tilt_axis_angle_deg
        Tilt-axis angle (one value, or one per tilt), counter-clockwise from Y.

    Returns
    -------
    ndarray
        ``(t, 2, 3)`` transforms with ``A = R(-a)`` and ``D = -R(-a) (dx, dy)``.
    """
    s = np.asarray(shifts_px, dtype=np.float64).reshape(-1, 2)
    axis = np.broadcast_to(np.asarray(tilt_axis_angle_deg, dtype=np.float64), (len(s),))
    out = np.empty((len(s), 2, 3))
    for i, (shift, a) in enumerate(zip(s, axis)):
        rot = _rotation_xy(-a)
        out[i, :, :2] = rot
        out[i, :, 2] = -rot @ shift[::-1]
    return out


def alignment_from_xf(transforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """tomodask displacements and tilt-axis angles from IMOD transforms.

    Parameters
    ----------
    transforms
        ``(t, 2, 3)`` as from :func:`read_xf`.

    Returns
    -------
    shifts_px, tilt_axis_angle_deg
        ``(t, 2)`` displacements ``(dy, dx)`` (``(dx, dy) = -A^-1 D``; exact also when
        ``A`` holds a magnification or stretch) and ``(t,)`` tilt-axis angles
        ``atan2(A12 - A21, A11 + A22)`` (the rotation part of ``A``), degrees.
    """
    m = np.asarray(transforms, dtype=np.float64)
    a_mat = m[:, :, :2]
    d = m[:, :, 2]
    shifts_xy = -np.linalg.solve(a_mat, d[:, :, None])[:, :, 0]
    angle = np.rad2deg(np.arctan2(a_mat[:, 0, 1] - a_mat[:, 1, 0], a_mat[:, 0, 0] + a_mat[:, 1, 1]))
    return shifts_xy[:, ::-1].copy(), angle


def write_alignment(directory: str | Path, name: str, *, shifts_px: np.ndarray, tilt_axis_angle_deg: float,
                    tilt_angles_deg: np.ndarray, tilt_angle_offset_deg: float,
                    excluded: np.ndarray) -> dict[str, Path]:
    """Write a tilt-series alignment as IMOD files: ``.xf``, ``.tlt``, ``.rawtlt``, ``_exclude.txt``.

    Parameters
    ----------
    directory
        Folder to write into (created if missing).
    name
        Base name of the tilt-series.
    shifts_px
        ``(t, 2)`` tomodask displacements ``(dy, dx)`` in raw-image pixels (NaN for tilts
        excluded before alignment: they get the rotation and zero shift).
    tilt_axis_angle_deg
        Refined tilt-axis angle.
    tilt_angles_deg
        ``(t,)`` refined tilt angles (``.tlt``); ``.rawtlt`` gets them minus the offset.
    tilt_angle_offset_deg
        Offset that was added to the stage angles.
    excluded
        ``(t,)`` bool; ``name_exclude.txt`` lists those views 1-based, comma-separated, as
        IMOD's ``EXCLUDELIST`` takes them.

    Returns
    -------
    dict
        Paths written, keyed by ``"xf"``, ``"tlt"``, ``"rawtlt"``, ``"exclude"``.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    angles = np.asarray(tilt_angles_deg, dtype=float)
    paths = {
        "xf": write_xf(out / f"{name}.xf", xf_from_alignment(np.nan_to_num(shifts_px), tilt_axis_angle_deg)),
        "tlt": write_tlt(out / f"{name}.tlt", angles),
        "rawtlt": write_tlt(out / f"{name}.rawtlt", angles - tilt_angle_offset_deg),
    }
    paths["exclude"] = out / f"{name}_exclude.txt"
    paths["exclude"].write_text(",".join(str(i + 1) for i in np.flatnonzero(excluded)) + "\n", encoding="ascii")
    return paths
