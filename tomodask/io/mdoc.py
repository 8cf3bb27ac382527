"""Read and write SerialEM ``.mdoc`` files (tilt-series and frame-set metadata).

The reader keeps every key of every section, converts numbers, and is tolerant of CRLF
line ends and of files still being written: a final line without its newline is ignored,
and a last section without a ``TiltAngle`` is dropped (``Mdoc.partial`` tells).

Sign conventions: SerialEM writes ``Defocus`` and ``TargetDefocus`` in µm with underfocus
negative; :attr:`MdocSection.target_defocus_angstrom` converts to tomodask's underfocus
positive Å.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PureWindowsPath

_SECTION = re.compile(r"^\[\s*(ZValue|FrameSet)\s*=\s*(\d+)\s*\]$")
_TITLE = re.compile(r"^\[\s*T\s*=\s*(.*?)\s*\]$")
_TILT_AXIS = re.compile(r"Tilt\s*axis\s*angle\s*=\s*([-+]?\d+(?:\.\d+)?)", re.IGNORECASE)
_DATE_FORMATS = ("%d-%b-%y  %H:%M:%S", "%d-%b-%Y  %H:%M:%S", "%d-%b-%y %H:%M:%S", "%d-%b-%Y %H:%M:%S")


class MdocError(ValueError):
    """An mdoc file that cannot be read; the message names the file and the line."""


def _convert(value: str) -> str | float | int | list[float]:
    parts = value.split()
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        return value
    if len(nums) == 1:
        return int(nums[0]) if re.fullmatch(r"[-+]?\d+", parts[0]) else nums[0]
    return nums


@dataclass(frozen=True)
class MdocSection:
    """One ``[ZValue = n]`` (or ``[FrameSet = n]``) section: every key, numbers converted."""

    kind: str
    index: int
    values: dict[str, object]

    def _float(self, key: str) -> float | None:
        v = self.values.get(key)
        return float(v) if isinstance(v, int | float) else None

    @property
    def tilt_angle_deg(self) -> float | None:
        """Stage tilt angle."""
        return self._float("TiltAngle")

    @property
    def exposure_dose_e_per_angstrom2(self) -> float | None:
        """Exposure of this image (0 when the scope did not measure it)."""
        return self._float("ExposureDose")

    @property
    def prior_record_dose_e_per_angstrom2(self) -> float | None:
        """Exposure received before this image, when SerialEM recorded it."""
        return self._float("PriorRecordDose")

    @property
    def sub_frame_path(self) -> str | None:
        """The movie path exactly as written (often a Windows or UNC path)."""
        v = self.values.get("SubFramePath")
        return None if v is None else str(v)

    @property
    def frame_name(self) -> str | None:
        """File name of the movie, from a Windows, UNC or POSIX path."""
        p = self.sub_frame_path
        if not p:
            return None
        return PureWindowsPath(p).name if "\\" in p else Path(p).name

    @property
    def num_sub_frames(self) -> int | None:
        """Frames in the movie."""
        v = self.values.get("NumSubFrames")
        return int(v) if isinstance(v, int | float) else None

    @property
    def date_time(self) -> datetime | None:
        """Acquisition time (None when absent or in an unknown format)."""
        v = self.values.get("DateTime")
        if not isinstance(v, str):
            return None
        for fmt in _DATE_FORMATS:
            try:
                return datetime.strptime(v.strip(), fmt)
            except ValueError:
                continue
        return None

    @property
    def defocus_um(self) -> float | None:
        """SerialEM's ``Defocus`` value as written (µm, underfocus negative)."""
        return self._float("Defocus")

    @property
    def target_defocus_angstrom(self) -> float | None:
        """``TargetDefocus`` converted to Å, underfocus positive."""
        v = self._float("TargetDefocus")
        return None if v is None else -v * 1e4


@dataclass(frozen=True)
class Mdoc:
    """A parsed mdoc file.

    Attributes
    ----------
    path
        Where it was read from (None for text).
    header
        Global keys before the first section (PixelSpacing, Voltage, ImageSize, ...).
    titles
        The ``[T = ...]`` lines.
    sections
        ``[ZValue]`` sections in file order (frame-set mdocs: ``[FrameSet]`` sections).
    partial
        True when a last, incomplete section or line was dropped.
    """

    path: Path | None
    header: dict[str, object]
    titles: list[str]
    sections: list[MdocSection]
    partial: bool = False
    frame_sets: list[MdocSection] = field(default_factory=list)

    @property
    def tilt_axis_angle_deg(self) -> float | None:
        """Tilt-axis angle from the ``[T = Tilt axis angle = ...]`` title, if any."""
        for t in self.titles:
            m = _TILT_AXIS.search(t)
            if m:
                return float(m.group(1))
        return None

    @property
    def pixel_size_angstrom(self) -> float | None:
        """Header ``PixelSpacing`` (else the first section's)."""
        v = self.header.get("PixelSpacing")
        if v is None and self.sections:
            v = self.sections[0].values.get("PixelSpacing")
        return float(v) if isinstance(v, int | float) else None

    @property
    def voltage_kv(self) -> float | None:
        """Header ``Voltage``."""
        v = self.header.get("Voltage")
        return float(v) if isinstance(v, int | float) else None

    @property
    def image_size_xy(self) -> tuple[int, int] | None:
        """Header ``ImageSize`` as ``(nx, ny)``."""
        v = self.header.get("ImageSize")
        return (int(v[0]), int(v[1])) if isinstance(v, list) and len(v) == 2 else None

    @property
    def tilt_angles_deg(self) -> list[float]:
        """Tilt angle of every section, in file order."""
        return [s.tilt_angle_deg for s in self.sections]

    @property
    def frame_names(self) -> list[str | None]:
        """Movie file name of every section, in file order."""
        return [s.frame_name for s in self.sections]


def parse_mdoc(text: str, *, path: Path | None = None) -> Mdoc:
    """Parse mdoc text.

    Parameters
    ----------
    text
        File content (LF or CRLF).
    path
        Where it came from, for error messages.

    Returns
    -------
    Mdoc
    """
    partial = False
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1].strip():
        lines = lines[:-1]  # no newline after it yet: the writer may still be on this line
        partial = True
    header: dict[str, object] = {}
    titles: list[str] = []
    raw_sections: list[tuple[str, int, dict[str, object]]] = []
    current: dict[str, object] | None = None
    for lineno, line in enumerate(lines, 1):
        s = line.strip()
        if not s:
            continue
        m = _SECTION.match(s)
        if m:
            current = {}
            raw_sections.append((m.group(1), int(m.group(2)), current))
            continue
        m = _TITLE.match(s)
        if m:
            titles.append(m.group(1))
            continue
        if "=" not in s:
            raise MdocError(f"{path or '<mdoc text>'}:{lineno}: expected 'Key = value' or a [section], got {s!r}")
        key, _, value = s.partition("=")
        target = header if current is None else current
        target[key.strip()] = _convert(value.strip())
    sections = [MdocSection(k, i, v) for k, i, v in raw_sections if k == "ZValue"]
    frame_sets = [MdocSection(k, i, v) for k, i, v in raw_sections if k == "FrameSet"]
    if sections and sections[-1].tilt_angle_deg is None:
        sections = sections[:-1]
        partial = True
    return Mdoc(path=path, header=header, titles=titles, sections=sections, partial=partial, frame_sets=frame_sets)


def read_mdoc(path: str | Path) -> Mdoc:
    """Read an mdoc file (see :func:`parse_mdoc`).

    Raises
    ------
    MdocError
        When the file is not an mdoc; the message names the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise MdocError(f"cannot read mdoc {path}: {exc.strerror}") from exc
    return parse_mdoc(text, path=path)


def format_mdoc(header: dict[str, object], titles: list[str], sections: list[dict[str, object]]) -> str:
    """Write mdoc text as SerialEM does (CRLF line ends, ``Key = value``, ``[ZValue = n]``).

    Parameters
    ----------
    header
        Global keys.
    titles
        ``[T = ...]`` contents.
    sections
        One dict per ``[ZValue]``, in acquisition order.

    Returns
    -------
    str
    """

    def fmt(v: object) -> str:
        if isinstance(v, list | tuple):
            return " ".join(fmt(x) for x in v)
        if isinstance(v, float):
            return f"{v:g}"
        return str(v)

    out = [f"{k} = {fmt(v)}" for k, v in header.items()]
    for t in titles:
        out += ["", f"[T = {t}]"]
    for i, sec in enumerate(sections):
        out += ["", f"[ZValue = {i}]"] + [f"{k} = {fmt(v)}" for k, v in sec.items()]
    return "\r\n".join(out) + "\r\n\r\n"
