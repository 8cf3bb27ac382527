"""The synthetic microscope: tilt schemes, movies with drift and counting noise, gain, defects.

Every quantity that a processing step should recover is recorded in a truth dataclass,
with the signs and axes of :mod:`tomodask.kernels.geometry`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from tomodask.kernels.fourier import fourier_shift
from tomodask.simulate.optics import Optics, form_image, project_phantom
from tomodask.simulate.phantom import Phantom, make_phantom

#: Relative intensity of a dark tilt (e.g. a grid bar in the beam).
DARK_TILT_INTENSITY = 0.03
#: Margin rendered around each movie frame beyond its drift, so the wrap-around ringing of the
#: Fourier shift stays outside the recorded field.
FRAME_PAD_PX = 32


@dataclass(frozen=True)
class AcquisitionSpec:
    """Everything the synthetic microscope needs to acquire one tilt-series.

    Lengths in Å unless the name says px; doses in e-/Å². Defaults are a realistic, small
    acquisition: 41 tilts of ±60° in 3° steps, dose-symmetric, 3 e-/Å² per tilt in 8 frames.
    """

    shape_yx: tuple[int, int] = (512, 512)
    pixel_size_angstrom: float = 1.5
    voltage_kv: float = 300.0
    spherical_aberration_mm: float = 2.7
    amplitude_contrast: float = 0.07
    bfactor_angstrom2: float = 60.0
    tilt_axis_angle_deg: float = 85.0
    recorded_tilt_axis_error_deg: float = 0.0
    tilt_range_deg: tuple[float, float] = (-60.0, 60.0)
    tilt_step_deg: float = 3.0
    dose_symmetric_group: int = 2
    tilt_angle_offset_deg: float = 0.0
    dose_per_tilt_e_per_angstrom2: float = 3.0
    n_frames: int = 8
    defocus_angstrom: float = 30000.0
    defocus_spread_angstrom: float = 1500.0
    astigmatism_angstrom: float = 600.0
    astigmatism_angle_deg: float = 30.0
    drift_total_px: float = 5.0
    shift_std_angstrom: float | None = None
    shift_std_per_deg_angstrom: float | None = None
    thickness_angstrom: float = 1500.0
    n_particles: int = 20
    particle_radius_angstrom: float = 80.0
    n_gold: int = 4
    gold_radius_angstrom: float = 50.0
    membrane: bool = True
    dark_tilt_acquisition_indices: tuple[int, ...] = ()
    gain_variation: float = 0.1
    n_dead_pixels: int = 20
    n_hot_pixels: int = 20

    @property
    def nominal_tilt_angles_deg(self) -> np.ndarray:
        """Stage tilt angles from the lowest to the highest."""
        lo, hi = self.tilt_range_deg
        n = int(round((hi - lo) / self.tilt_step_deg)) + 1
        return np.round(np.linspace(lo, hi, n), 3)

    def shift_std_at_angstrom(self, tilt_angles_deg: np.ndarray) -> np.ndarray:
        """Standard deviation of the tilt-series shift at each tilt.

        Unless set, it grows with the field of view as stage tracking errors do: 2 % of
        the field at 0° plus 0.1 % per degree (8 % at 60°).
        """
        fov = min(self.shape_yx) * self.pixel_size_angstrom
        base = 0.02 * fov if self.shift_std_angstrom is None else self.shift_std_angstrom
        slope = 0.001 * fov if self.shift_std_per_deg_angstrom is None else self.shift_std_per_deg_angstrom
        return base + slope * np.abs(np.asarray(tilt_angles_deg, dtype=float))

    @property
    def recorded_tilt_axis_angle_deg(self) -> float:
        """The approximate tilt-axis angle the microscope software records (true + error)."""
        return self.tilt_axis_angle_deg + self.recorded_tilt_axis_error_deg

    @property
    def optics(self) -> Optics:
        """The imaging constants as an :class:`Optics`."""
        return Optics(pixel_size_angstrom=self.pixel_size_angstrom, voltage_kv=self.voltage_kv,
                      spherical_aberration_mm=self.spherical_aberration_mm,
                      amplitude_contrast=self.amplitude_contrast, bfactor_angstrom2=self.bfactor_angstrom2)


def dose_symmetric_order(tilt_angles_deg: np.ndarray, *, group_size: int = 2) -> np.ndarray:
    """Acquisition order of a dose-symmetric (Hagen) scheme.

    Parameters
    ----------
    tilt_angles_deg
        Tilt angles, ascending.
    group_size
        Tilts acquired on one side before switching to the other.

    Returns
    -------
    ndarray
        Indices into ``tilt_angles_deg`` in acquisition order: the tilt nearest 0°, then
        groups alternating between positive and negative tilts.
    """
    angles = np.asarray(tilt_angles_deg)
    start = int(np.argmin(np.abs(angles)))
    pos = list(range(start + 1, len(angles)))
    neg = list(range(start - 1, -1, -1))
    order = [start]
    side = 0
    while pos or neg:
        src = (pos, neg)[side] if (pos, neg)[side] else (pos, neg)[1 - side]
        order.extend(src[:group_size])
        del src[:group_size]
        side = 1 - side
    return np.array(order)


@dataclass(frozen=True)
class TiltTruth:
    """Ground truth of one tilt image (conventions: :mod:`tomodask.kernels.geometry`)."""

    acquisition_index: int
    nominal_tilt_angle_deg: float
    tilt_angle_deg: float
    tilt_axis_angle_deg: float
    pixel_size_angstrom: float
    shift_yx_px: tuple[float, float]
    frame_shifts_px: np.ndarray
    defocus_u_angstrom: float
    defocus_v_angstrom: float
    astigmatism_angle_deg: float
    dose_e_per_angstrom2: float
    prior_dose_e_per_angstrom2: float
    dark: bool

    def to_dict(self) -> dict:
        """Plain-data form for JSON."""
        d = asdict(self)
        d["frame_shifts_px"] = np.asarray(self.frame_shifts_px).tolist()
        d["shift_yx_px"] = list(self.shift_yx_px)
        return d


@dataclass(frozen=True)
class SimulatedTilt:
    """One tilt as the detector recorded it.

    Attributes
    ----------
    frames
        ``(t, y, x)`` raw counts, before gain correction (uint8 movie frames; uint16 for
        the one exposure of ``with_frames=False``).
    gain
        ``(y, x)`` float32 gain reference: ``corrected = raw * gain``.
    defect_mask
        ``(y, x)`` bool, True at dead and hot pixels.
    noiseless
        ``(y, x)`` float32 expected gain-corrected electrons per pixel over the whole tilt,
        at the mean frame position.
    truth
        What processing should recover.
    """

    frames: np.ndarray
    gain: np.ndarray
    defect_mask: np.ndarray
    noiseless: np.ndarray
    truth: TiltTruth


@dataclass(frozen=True)
class Detector:
    """Per-pixel sensitivity and defects of the camera (shared by every movie of a session)."""

    sensitivity: np.ndarray
    dead_mask: np.ndarray
    hot_mask: np.ndarray

    @classmethod
    def make(cls, shape_yx: tuple[int, int], *, seed: int, gain_variation: float,
             n_dead: int, n_hot: int) -> Detector:
        """Random sensitivity around 1 and a few dead and hot pixels."""
        rng = np.random.default_rng([seed, 7919])
        sens = np.clip(rng.normal(1.0, gain_variation, size=shape_yx), 0.5, 1.5).astype(np.float32)
        flat = rng.choice(shape_yx[0] * shape_yx[1], size=n_dead + n_hot, replace=False)
        dead = np.zeros(shape_yx, bool)
        hot = np.zeros(shape_yx, bool)
        dead.flat[flat[:n_dead]] = True
        hot.flat[flat[n_dead:]] = True
        return cls(sensitivity=sens, dead_mask=dead, hot_mask=hot)

    @property
    def gain(self) -> np.ndarray:
        """The gain reference a facility would record: 1 / sensitivity (1 at defects)."""
        g = (1.0 / self.sensitivity).astype(np.float32)
        g[self.dead_mask | self.hot_mask] = 1.0
        return g

    def record(self, expected_e_per_px: np.ndarray, rng: np.random.Generator, *,
               dtype: type = np.uint8) -> np.ndarray:
        """Count electrons: Poisson noise, sensitivity, dead and hot pixels.

        ``expected_e_per_px`` is a ``(t, y, x)`` array or a sequence of ``t`` ``(y, x)``
        frames (see :meth:`record_frames`, also for ``dtype``).
        """
        return self.record_frames(expected_e_per_px.__getitem__, len(expected_e_per_px), rng, dtype=dtype)

    def record_frames(self, expected_frame: Callable[[int], np.ndarray], n_frames: int,
                      rng: np.random.Generator, *, dtype: type = np.uint8) -> np.ndarray:
        """:meth:`record` one frame at a time: ``expected_frame(i)`` gives frame ``i``'s ``(y, x)`` e-/px.

        Only one frame of counts is held besides the ``(t, y, x)`` result (a 4096² x 40
        uint8 movie needs about 1 GB instead of 15). The draws are those of one call on the
        whole stack: Poisson counts frame after frame in C order, then the hot pixels of
        every frame. Counts saturate at the largest value of ``dtype`` (255 for a movie's
        uint8 frames, as a counting detector's frames; uint16 for one exposure holding a
        whole tilt's dose).
        """
        top = np.iinfo(dtype).max
        out = np.empty((n_frames,) + self.sensitivity.shape, dtype=dtype)
        for i in range(n_frames):
            counts = rng.poisson(expected_frame(i) * self.sensitivity)
            counts[self.dead_mask] = 0
            out[i] = np.clip(counts, 0, top)
        n_hot = int(self.hot_mask.sum())
        out[:, self.hot_mask] = np.clip(rng.poisson(12.0, size=(n_frames, n_hot)), 0, top)
        return out


def drift_trajectory_px(n_frames: int, total_px: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean ``(t, 2)`` displacements: fast early drift that decays, plus small jitter."""
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction)
    t = np.arange(n_frames, dtype=float)
    decay = 1.0 - np.exp(-t / max(n_frames / 3.0, 1.0))
    path = decay[:, None] * direction[None, :]
    bend = rng.normal(size=2) * 0.15
    path += (t / max(n_frames - 1, 1))[:, None] ** 2 * bend[None, :]
    length = np.sum(np.linalg.norm(np.diff(path, axis=0), axis=1)) or 1.0
    path *= total_px / length
    path += rng.normal(0.0, 0.05, size=path.shape)
    return path - path.mean(axis=0)


class TiltSeriesAcquisition:
    """Acquire a tilt-series tilt by tilt, in acquisition order.

    Parameters
    ----------
    spec
        The acquisition.
    seed
        Random seed: the same seed and spec give the same data.
    phantom, detector
        Reuse a specimen or camera (a session shares one camera across tilt-series).
    """

    def __init__(self, spec: AcquisitionSpec, *, seed: int, phantom: Phantom | None = None,
                 detector: Detector | None = None) -> None:
        self.spec = spec
        self.seed = seed
        ny, nx = spec.shape_yx
        fov = (nx * spec.pixel_size_angstrom * 0.9, ny * spec.pixel_size_angstrom * 0.9)
        self.phantom = phantom or make_phantom(
            seed, size_xy_angstrom=fov, thickness_angstrom=spec.thickness_angstrom,
            n_particles=spec.n_particles, particle_radius_angstrom=spec.particle_radius_angstrom,
            n_gold=spec.n_gold, gold_radius_angstrom=spec.gold_radius_angstrom, membrane=spec.membrane)
        self.detector = detector or Detector.make(
            spec.shape_yx, seed=seed, gain_variation=spec.gain_variation,
            n_dead=spec.n_dead_pixels, n_hot=spec.n_hot_pixels)
        self.nominal_angles_deg = spec.nominal_tilt_angles_deg
        self.order = dose_symmetric_order(self.nominal_angles_deg, group_size=spec.dose_symmetric_group)
        rng = np.random.default_rng([seed, 104729])
        n = len(self.nominal_angles_deg)
        sd = spec.shift_std_at_angstrom(self.nominal_angles_deg)
        self.shifts_px = rng.normal(size=(n, 2)) * (sd / spec.pixel_size_angstrom)[:, None]
        self.shifts_px[self.order[0]] = 0.0
        self.defocus_angstrom = spec.defocus_angstrom + rng.uniform(-1, 1, n) * spec.defocus_spread_angstrom / 2

    def __len__(self) -> int:
        return len(self.order)

    def tilts(self, *, with_frames: bool = True) -> Iterator[SimulatedTilt]:
        """Yield every tilt in acquisition order (see :meth:`tilt`)."""
        for acq in range(len(self.order)):
            yield self.tilt(acq, with_frames=with_frames)

    def tilt(self, acquisition_index: int, *, with_frames: bool = True) -> SimulatedTilt:
        """Acquire one tilt.

        Parameters
        ----------
        acquisition_index
            Position in the acquisition order (0 = first tilt taken).
        with_frames
            Record a movie (``frames``) when True; otherwise ``frames`` holds one frame with
            the whole dose (faster, for tilt-series tests).

        Returns
        -------
        SimulatedTilt
        """
        spec = self.spec
        i = int(self.order[acquisition_index])
        rng = np.random.default_rng([self.seed, 15485863, acquisition_index])
        nominal = float(self.nominal_angles_deg[i])
        tilt = nominal + spec.tilt_angle_offset_deg
        dark = acquisition_index in spec.dark_tilt_acquisition_indices
        n_frames = spec.n_frames if with_frames else 1
        frame_shifts = (drift_trajectory_px(spec.n_frames, spec.drift_total_px, rng) if with_frames
                        else np.zeros((1, 2)))
        pad = int(np.ceil(np.abs(frame_shifts).max())) + FRAME_PAD_PX if with_frames else 0
        ny, nx = spec.shape_yx
        padded = (ny + 2 * pad, nx + 2 * pad)
        shift = (float(self.shifts_px[i, 0]), float(self.shifts_px[i, 1]))
        phase, absorb = project_phantom(self.phantom, shape_yx=padded, pixel_size_angstrom=spec.pixel_size_angstrom,
                                        tilt_angle_deg=tilt, tilt_axis_angle_deg=spec.tilt_axis_angle_deg,
                                        shift_yx_px=shift)
        half_astig = spec.astigmatism_angstrom / 2
        df = float(self.defocus_angstrom[i])
        prior = acquisition_index * spec.dose_per_tilt_e_per_angstrom2
        intensity = form_image(phase, absorb, optics=spec.optics, defocus_u_angstrom=df + half_astig,
                               defocus_v_angstrom=df - half_astig, astigmatism_angle_deg=spec.astigmatism_angle_deg,
                               tilt_angle_deg=tilt, tilt_axis_angle_deg=spec.tilt_axis_angle_deg,
                               thickness_angstrom=spec.thickness_angstrom,
                               prior_dose_e_per_angstrom2=prior + spec.dose_per_tilt_e_per_angstrom2 / 2, rng=rng)
        if dark:
            intensity *= DARK_TILT_INTENSITY
        e_per_px_tilt = spec.dose_per_tilt_e_per_angstrom2 * spec.pixel_size_angstrom**2
        crop = (slice(pad, pad + ny), slice(pad, pad + nx))
        expected = intensity * (e_per_px_tilt / n_frames)
        if with_frames:  # frame by frame: one padded frame in memory at a time
            expected32 = expected.astype(np.float32)
            shifts32 = frame_shifts.astype(np.float32)
            frames = self.detector.record_frames(
                lambda f: np.clip(fourier_shift(expected32, shifts32[f])[crop], 0.0, None), n_frames, rng)
        else:
            # the whole tilt's dose in one exposure stands for a movie's sum: it does not
            # saturate at a frame's 255 counts (768 e-/px at 16 A/px and 3 e-/A2)
            frames = self.detector.record(expected[crop][None], rng, dtype=np.uint16)
        truth = TiltTruth(
            acquisition_index=acquisition_index, nominal_tilt_angle_deg=nominal, tilt_angle_deg=tilt,
            tilt_axis_angle_deg=spec.tilt_axis_angle_deg, pixel_size_angstrom=spec.pixel_size_angstrom,
            shift_yx_px=shift, frame_shifts_px=frame_shifts, defocus_u_angstrom=df + half_astig,
            defocus_v_angstrom=df - half_astig, astigmatism_angle_deg=spec.astigmatism_angle_deg,
            dose_e_per_angstrom2=spec.dose_per_tilt_e_per_angstrom2, prior_dose_e_per_angstrom2=prior, dark=dark)
        return SimulatedTilt(frames=frames, gain=self.detector.gain,
                             defect_mask=self.detector.dead_mask | self.detector.hot_mask,
                             noiseless=(expected[crop] * n_frames).astype(np.float32), truth=truth)


@dataclass(frozen=True)
class SimulatedTiltSeries:
    """A whole tilt-series, sorted by tilt angle, with its ground truth.

    Attributes
    ----------
    images
        ``(t, y, x)`` float32 gain-corrected summed tilt images (noisy), ascending tilt angle.
    tilts
        Per-tilt truth in the same order.
    phantom
        The specimen.
    spec
        The acquisition.
    """

    images: np.ndarray
    tilts: list[TiltTruth]
    phantom: Phantom
    spec: AcquisitionSpec
    defect_mask: np.ndarray = field(repr=False, default=None)

    @property
    def tilt_angles_deg(self) -> np.ndarray:
        """True tilt angles (nominal plus the specimen's tilt-angle offset)."""
        return np.array([t.tilt_angle_deg for t in self.tilts])

    @property
    def nominal_tilt_angles_deg(self) -> np.ndarray:
        """Stage tilt angles as the mdoc records them."""
        return np.array([t.nominal_tilt_angle_deg for t in self.tilts])

    @property
    def shifts_px(self) -> np.ndarray:
        """``(t, 2)`` displacement ``(dy, dx)`` of each tilt image's content."""
        return np.array([t.shift_yx_px for t in self.tilts])

    @property
    def dark_tilt_indices(self) -> np.ndarray:
        """Indices (in this angle-sorted order) of the dark tilts."""
        return np.array([i for i, t in enumerate(self.tilts) if t.dark], dtype=int)

    def phantom_volume(self, *, pixel_size_angstrom: float, shape_zyx: tuple[int, int, int]) -> np.ndarray:
        """The specimen's phase density on a ``(z, y, x)`` grid in the tilt-axis frame."""
        return self.phantom.volume(pixel_size_angstrom=pixel_size_angstrom, shape_zyx=shape_zyx)


def simulate_tilt_series(seed: int = 0, *, with_frames: bool = False, **spec_fields) -> SimulatedTiltSeries:
    """Acquire a whole tilt-series in memory.

    Parameters
    ----------
    seed
        Random seed.
    with_frames
        Simulate movies and sum them after gain correction (slower) instead of recording
        each tilt's dose in one exposure.
    **spec_fields
        Fields of :class:`AcquisitionSpec`.

    Returns
    -------
    SimulatedTiltSeries
    """
    acq = TiltSeriesAcquisition(AcquisitionSpec(**spec_fields), seed=seed)
    tilts = list(acq.tilts(with_frames=with_frames))
    tilts.sort(key=lambda t: t.truth.nominal_tilt_angle_deg)
    images = np.stack([(t.frames.astype(np.float32) * t.gain).sum(axis=0) for t in tilts])
    return SimulatedTiltSeries(images=images, tilts=[t.truth for t in tilts], phantom=acq.phantom,
                               spec=acq.spec, defect_mask=tilts[0].defect_mask)


def simulate_single_tilt(
    seed: int = 0,
    *,
    shape_yx: tuple[int, int] = (512, 512),
    pixel_size_angstrom: float = 1.5,
    n_frames: int = 10,
    dose_e_per_angstrom2: float = 3.0,
    tilt_angle_deg: float = 0.0,
    tilt_axis_angle_deg: float = 85.0,
    defocus_angstrom: float = 30000.0,
    astigmatism_angstrom: float = 500.0,
    astigmatism_angle_deg: float = 30.0,
    drift_total_px: float = 6.0,
    prior_dose_e_per_angstrom2: float = 0.0,
    **spec_fields,
) -> SimulatedTilt:
    """Record one movie of one tilt with known drift, defocus and astigmatism.

    Parameters
    ----------
    seed
        Random seed.
    shape_yx, pixel_size_angstrom, n_frames
        Detector size, pixel size and frames.
    dose_e_per_angstrom2
        Exposure of this tilt.
    tilt_angle_deg, tilt_axis_angle_deg
        Geometry.
    defocus_angstrom, astigmatism_angstrom, astigmatism_angle_deg
        Mean defocus at the image centre, U - V, and the angle of U from X.
    drift_total_px
        Length of the drift path over the movie.
    prior_dose_e_per_angstrom2
        Exposure already received (radiation damage).
    **spec_fields
        Other :class:`AcquisitionSpec` fields (particles, thickness, gain variation...).

    Returns
    -------
    SimulatedTilt
    """
    dose_tilts = int(round(prior_dose_e_per_angstrom2 / dose_e_per_angstrom2)) if dose_e_per_angstrom2 else 0
    spec = AcquisitionSpec(
        shape_yx=shape_yx, pixel_size_angstrom=pixel_size_angstrom, n_frames=n_frames,
        dose_per_tilt_e_per_angstrom2=dose_e_per_angstrom2, tilt_range_deg=(tilt_angle_deg, tilt_angle_deg),
        tilt_axis_angle_deg=tilt_axis_angle_deg, defocus_angstrom=defocus_angstrom, defocus_spread_angstrom=0.0,
        astigmatism_angstrom=astigmatism_angstrom, astigmatism_angle_deg=astigmatism_angle_deg,
        drift_total_px=drift_total_px, shift_std_angstrom=0.0, shift_std_per_deg_angstrom=0.0, **spec_fields)
    acq = TiltSeriesAcquisition(spec, seed=seed)
    acq.order = np.zeros(dose_tilts + 1, dtype=int)
    return acq.tilt(dose_tilts)
