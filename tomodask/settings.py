"""Settings of a tomography session: pydantic models with units in every field name.

Every model forbids unknown fields, so a typo fails loudly with the field's name instead of
being ignored. :class:`SessionSettings` round-trips through YAML and JSON and is saved with
each session. Geometry conventions follow :mod:`tomodask.kernels.geometry`.
"""

from __future__ import annotations

import hashlib
import json
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SettingsError(ValueError):
    """Raised when settings are invalid; the message lists one line per problem."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class TransferMethod(str, Enum):
    """How raw files reach ``SESSION/raw/``."""

    move = "move"
    copy = "copy"
    link = "link"


class SessionInfo(_Model):
    """Who and where: the session's name, its group and optional folder override."""

    name: Annotated[str, Field(min_length=1, max_length=100)] = "session"
    group: str = "default"
    session_folder: Path | None = Field(
        default=None, description="Folder for this session's data; default DATA_ROOT/sessions/NAME."
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError(
                "must start with a letter or digit and use only letters, digits, '_', '.', '-' "
                f"(got {v!r})"
            )
        return v


#: Tokens a frame pattern may contain, and the regular expression each one matches.
FRAME_PATTERN_TOKENS: dict[str, str] = {
    "{tilt_series}": r"(?P<tilt_series>.+?)",
    "{index}": r"(?P<index>\d+)",
    "{angle}": r"(?P<angle>[-+]?\d+(?:\.\d+)?)",
    "{date}": r"(?P<date>[A-Za-z0-9.-]+)",
    "{time}": r"(?P<time>[0-9.:-]+)",
    "{any}": r"(?:.*?)",
}

#: Ready-made patterns for common acquisition software.
FRAME_PATTERN_PRESETS: dict[str, str] = {
    "serialem": "{tilt_series}_{index}_{angle}.tif",
    "tomo5-bracket": "{tilt_series}_{index}[{angle}]_fractions.tiff",
    "tomo5-datetime": "{tilt_series}_{index}_{angle}_{date}_{time}_fractions.tiff",
}


def compile_frame_pattern(pattern: str) -> re.Pattern[str]:
    """Turn a frame pattern with ``{tokens}`` into a regular expression.

    Parameters
    ----------
    pattern
        A file name pattern such as ``{tilt_series}_{index}_{angle}.tif``. Accepted tokens:
        ``{tilt_series}``, ``{index}``, ``{angle}``, ``{date}``, ``{time}``, ``{any}``; ``*``
        matches anything. Everything else is literal.

    Returns
    -------
    re.Pattern
        Anchored pattern with named groups ``tilt_series``, ``index`` and ``angle``.
    """
    out = []
    pos = 0
    for m in re.finditer(r"\{[^}]*\}|\*", pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        tok = m.group(0)
        if tok == "*":
            out.append(".*?")
        elif tok in FRAME_PATTERN_TOKENS:
            out.append(FRAME_PATTERN_TOKENS[tok])
        else:
            raise ValueError(
                f"unknown token {tok} in frame pattern {pattern!r}; accepted: "
                + ", ".join(FRAME_PATTERN_TOKENS)
            )
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("^" + "".join(out) + "$")


class RawDataSettings(_Model):
    """Where the microscope writes and how its files are named."""

    location: Path | None = Field(default=None, description="Folder the microscope writes into.")
    single_file_tilt_series: bool = Field(
        default=False, description="Each tilt-series is one stack file instead of one movie per tilt."
    )
    frame_pattern: str = Field(
        default=FRAME_PATTERN_PRESETS["serialem"],
        description="Movie file-name pattern with {tilt_series}, {index}, {angle} tokens, "
        "or a preset name: " + ", ".join(FRAME_PATTERN_PRESETS),
    )
    use_mdoc: bool = Field(default=True, description="Read tilt angles, doses and completeness from .mdoc files.")

    @field_validator("single_file_tilt_series")
    @classmethod
    def _single_file(cls, v: bool) -> bool:
        if v:
            raise ValueError("single-file tilt-series are not supported yet; set it to false and let the "
                             "microscope save one movie per tilt (SerialEM 'Save frames')")
        return v

    @field_validator("frame_pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        v = FRAME_PATTERN_PRESETS.get(v, v)
        rx = compile_frame_pattern(v)
        if "tilt_series" not in rx.groupindex:
            raise ValueError("must contain {tilt_series} so movies can be grouped into tilt-series")
        if "index" not in rx.groupindex and "angle" not in rx.groupindex:
            raise ValueError("must contain {index} or {angle} so tilts can be told apart")
        return v


class GainReferenceSettings(_Model):
    """The gain reference and how to orient it onto the movie frames."""

    apply: bool = True
    path: Path | None = Field(default=None, description="Gain reference (MRC or TIFF); multiplied into frames.")
    rotation_deg: Literal[0, 90, 180, 270] = Field(
        default=0, description="Counter-clockwise rotation applied to the gain before use."
    )
    flip: Literal["none", "x", "y"] = Field(
        default="none", description="Flip applied to the gain after rotation: mirror across X or Y."
    )


class MicroscopeSettings(_Model):
    """Optics and exposure of the acquisition."""

    pixel_size_angstrom: Annotated[float, Field(gt=0.1, lt=50.0)] = 1.5
    voltage_kv: Literal[80, 100, 120, 200, 300] = 300
    spherical_aberration_mm: Annotated[float, Field(ge=0.0, le=10.0)] = 2.7
    amplitude_contrast: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.07
    tilt_axis_angle_deg: Annotated[float, Field(ge=-180.0, le=180.0)] = Field(
        default=85.0, description="Approximate tilt-axis angle, CCW from image Y (SerialEM/IMOD)."
    )
    dose_per_tilt_e_per_angstrom2: Annotated[float, Field(gt=0.0, le=50.0)] = Field(
        default=3.0, description="Exposure per tilt, used when no mdoc gives it."
    )


class CollectionSettings(_Model):
    """When a tilt-series is complete and how raw data is transferred."""

    tilts_per_tilt_series: Annotated[int, Field(ge=2, le=500)] = 41
    tilt_series_timeout_s: Annotated[float, Field(gt=0.0)] = Field(
        default=600.0, description="Process a tilt-series this long after its last tilt, even if incomplete."
    )
    transfer_method: TransferMethod = TransferMethod.move
    file_stable_s: Annotated[float, Field(ge=0.0)] = Field(
        default=2.0, description="A file is complete when its size and mtime are unchanged this long."
    )


class FrameAlignmentSettings(_Model):
    """Gain correction, frame alignment and dose weighting of each movie."""

    output_pixel_size_angstrom: Annotated[float, Field(gt=0.0)] | None = Field(
        default=None, description="Fourier-crop aligned sums to this pixel size; None keeps the raw one."
    )
    bfactor_angstrom2: Annotated[float, Field(ge=0.0)] = 150.0
    patches_yx: tuple[Annotated[int, Field(ge=1, le=20)], Annotated[int, Field(ge=1, le=20)]] | None = Field(
        default=(5, 5), description="Largest local-motion patch grid (y, x); fewer patches are used where they "
        "would be smaller than 192 px (tomodask.kernels.motion.MIN_PATCH_PX): 4 x 4 on 512² frames. None: "
        "global drift only."
    )
    max_iterations: Annotated[int, Field(ge=1, le=50)] = 10
    dose_weighting: bool = True
    eer_frames_per_fraction: Annotated[int, Field(ge=1, le=10000)] = Field(
        default=40, description="EER movies: sum this many raw EER frames into one fraction before alignment "
        "(RELION's --eer_grouping); trailing frames that do not fill a fraction are dropped."
    )
    max_total_motion_angstrom: Annotated[float, Field(gt=0.0)] = Field(
        default=100.0, description="Tilts with more total motion are flagged for exclusion."
    )


class CTFSettings(_Model):
    """CTF estimation of each tilt image."""

    defocus_min_angstrom: Annotated[float, Field(gt=0.0)] = 5000.0
    defocus_max_angstrom: Annotated[float, Field(gt=0.0)] = 60000.0
    resolution_low_angstrom: Annotated[float, Field(gt=0.0)] = 30.0
    resolution_high_angstrom: Annotated[float, Field(gt=0.0)] = 5.0
    tile_size_px: Annotated[int, Field(ge=64, le=2048)] = 512
    fit_phase_shift: bool = False
    @model_validator(mode="after")
    def _ranges(self) -> CTFSettings:
        if self.defocus_min_angstrom >= self.defocus_max_angstrom:
            raise ValueError("defocus_min_angstrom must be below defocus_max_angstrom")
        if self.resolution_high_angstrom >= self.resolution_low_angstrom:
            raise ValueError("resolution_high_angstrom must be below resolution_low_angstrom")
        return self


class TiltSeriesAlignmentSettings(_Model):
    """Bad-tilt exclusion and fiducial-less tilt-series alignment."""

    alignment_pixel_size_angstrom: Annotated[float, Field(gt=0.0)] = 10.0
    refine_tilt_axis: bool = True
    refine_tilt_angle_offset: bool = True
    refinement_iterations: Annotated[int, Field(ge=0, le=20)] = 3
    exclude_tilt_indices: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, description="Acquisition indices the user excludes by hand."
    )


class ReconstructionSettings(_Model):
    """Tomogram reconstruction."""

    pixel_size_angstrom: Annotated[float, Field(gt=0.0)] = 10.0
    thickness_angstrom: Annotated[float, Field(gt=0.0)] = 3000.0
    weighting: Literal["ramp", "exact"] = "exact"
    sirt_like_iterations: Annotated[int, Field(ge=0, le=160)] | Literal["auto"] = Field(
        default="auto", description="Equivalent SIRT iterations of the SIRT-like filter; 0 = plain WBP; "
        "'auto' chooses them per tilt-series by two-fold cross-validation over the tilts."
    )
    ctf_phase_flip: bool = True
    dose_weighting: bool = True


class PickingSettings(_Model):
    """Particle picking in each tomogram."""

    enabled: bool = True
    method: Literal["size", "template"] = "size"
    particle_radius_angstrom: Annotated[float, Field(gt=0.0)] = 80.0
    min_distance_angstrom: Annotated[float, Field(gt=0.0)] | None = Field(
        default=None, description="Minimum distance between picks; default twice the radius."
    )
    threshold: float | None = Field(default=None, description="Score threshold; None picks it automatically.")
    mask_outside_slab: bool = Field(
        default=False, description="Drop picks outside the ice slab estimated from the tomogram "
        "(off by default: the estimate is unreliable on thin, featureless ice).")
    template_path: Path | None = None
    angular_step_deg: Annotated[float, Field(gt=0.0, le=90.0)] = 15.0

    @model_validator(mode="after")
    def _template(self) -> PickingSettings:
        if self.method == "template" and self.template_path is None:
            raise ValueError("template_path is required when method is 'template'")
        return self


class ProcessingSettings(_Model):
    """Processing parameters of every step, with defaults a microscopist would accept."""

    frame_alignment: FrameAlignmentSettings = Field(default_factory=FrameAlignmentSettings)
    ctf: CTFSettings = Field(default_factory=CTFSettings)
    tilt_series_alignment: TiltSeriesAlignmentSettings = Field(default_factory=TiltSeriesAlignmentSettings)
    reconstruction: ReconstructionSettings = Field(default_factory=ReconstructionSettings)
    picking: PickingSettings = Field(default_factory=PickingSettings)


class ResourceSettings(_Model):
    """Compute resources of each task; they become Dask worker resources and jobqueue sizes."""

    threads_per_task: Annotated[int, Field(ge=1, le=256)] = 1
    memory_per_task_gb: Annotated[float, Field(gt=0.0, le=4096.0)] = 4.0
    gpus_per_task: Annotated[int, Field(ge=0, le=16)] = 0
    max_workers: Annotated[int, Field(ge=1, le=10000)] = 4


class SessionSettings(_Model):
    """Every setting of a tomography session."""

    session: SessionInfo = Field(default_factory=SessionInfo)
    raw_data: RawDataSettings = Field(default_factory=RawDataSettings)
    gain_reference: GainReferenceSettings = Field(default_factory=GainReferenceSettings)
    microscope: MicroscopeSettings = Field(default_factory=MicroscopeSettings)
    collection: CollectionSettings = Field(default_factory=CollectionSettings)
    processing: ProcessingSettings = Field(default_factory=ProcessingSettings)
    resources: ResourceSettings = Field(default_factory=ResourceSettings)

    # ---- serialisation -------------------------------------------------------------
    def to_yaml(self) -> str:
        """Return the settings as YAML text."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> SessionSettings:
        """Parse settings from YAML text; raises :class:`SettingsError` listing every problem."""
        return cls.from_dict(yaml.safe_load(text) or {})

    def to_json(self) -> str:
        """Return the settings as JSON text."""
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> SessionSettings:
        """Parse settings from JSON text; raises :class:`SettingsError` listing every problem."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict) -> SessionSettings:
        """Validate a plain dictionary; raises :class:`SettingsError` listing every problem."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SettingsError(format_validation_error(exc)) from None

    @classmethod
    def load(cls, path: str | Path) -> SessionSettings:
        """Read settings from a ``.yaml``/``.yml`` or ``.json`` file."""
        path = Path(path)
        text = path.read_text()
        try:
            return cls.from_json(text) if path.suffix == ".json" else cls.from_yaml(text)
        except SettingsError as exc:
            raise SettingsError(f"{path}: invalid settings\n{exc}") from None

    def save(self, path: str | Path) -> None:
        """Write settings to ``path`` (YAML unless the suffix is ``.json``)."""
        path = Path(path)
        path.write_text(self.to_json() if path.suffix == ".json" else self.to_yaml())

    def step_hash(self, step: str) -> str:
        """Short hash of the settings that affect one processing step.

        Parameters
        ----------
        step
            ``"movie"`` or ``"tilt_series"``.

        Returns
        -------
        str
            12 hex digits; changes exactly when a setting that step depends on changes.
        """
        return hashlib.sha256(json.dumps(self.step_inputs(step), sort_keys=True).encode()).hexdigest()[:12]

    def step_inputs(self, step: str) -> dict:
        """The settings one processing step depends on, as plain data."""
        d = self.model_dump(mode="json")
        p = d["processing"]
        movie = {"gain": d["gain_reference"], "microscope": d["microscope"],
                 "frame_alignment": p["frame_alignment"], "ctf": p["ctf"]}
        if step == "movie":
            return movie
        if step == "tilt_series":
            return {"movie": movie, "tilt_series_alignment": p["tilt_series_alignment"],
                    "reconstruction": p["reconstruction"], "picking": p["picking"]}
        raise ValueError(f"unknown step {step!r}; accepted: 'movie', 'tilt_series'")


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: the dotted field name, what is wrong, and what is accepted."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(settings)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; see `tomodask settings show` for the accepted names)"
        elif err["type"] in ("literal_error", "enum"):
            msg = f"{msg} (got {err.get('input')!r})"
        lines.append(f"- {loc}: {msg}")
    return "\n".join(lines)
