"""Exposure (dose) weighting: the signal a spatial frequency keeps after an exposure.

Radiation damage destroys high-resolution signal first. Grant & Grigorieff measured the
*critical exposure* ``N_e(k)`` at which the signal power at spatial frequency ``k`` has
fallen to ``1/e`` (:func:`tomodask.kernels.fourier.critical_exposure_e_per_angstrom2`);
the amplitude left after an accumulated exposure ``N`` is ``exp(-N / (2 N_e(k)))``
(:func:`exposure_filter`). Movie frames are combined with per-frequency weights
proportional to that amplitude (:func:`dose_weights`), the optimal (matched-filter)
weighting for frames of equal noise; tilt images of a tilt-series are attenuated with
the same filter for their accumulated exposure.

All functions take and return numpy or cupy arrays (``xp`` argument or the inputs);
spectra are half-spectra in ``rfft2`` layout ``(ny, nx // 2 + 1)``.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from tomodask.backend import get_array_module
from tomodask.kernels.fourier import critical_exposure_e_per_angstrom2, frequency_grid

__all__ = [
    "critical_exposure_e_per_angstrom2",
    "dose_weight_frames",
    "dose_weights",
    "exposure_filter",
    "frame_exposures_e_per_angstrom2",
]


def _spatial_frequency_per_angstrom(
    shape_yx: tuple[int, int], pixel_size_angstrom: float, xp: ModuleType
) -> np.ndarray:
    if not pixel_size_angstrom > 0:
        raise ValueError(f"pixel_size_angstrom must be positive, got {pixel_size_angstrom}")
    fy, fx = frequency_grid(tuple(shape_yx), xp=xp)
    return xp.sqrt(fy**2 + fx**2) / xp.float32(pixel_size_angstrom)


def exposure_filter(
    shape_yx: tuple[int, int],
    exposure_e_per_angstrom2: float | np.ndarray,
    *,
    pixel_size_angstrom: float,
    voltage_kv: float = 300.0,
    xp: ModuleType = np,
) -> np.ndarray:
    """Fraction of the signal amplitude left at each frequency after an exposure.

    Parameters
    ----------
    shape_yx
        Real-space image shape ``(ny, nx)``.
    exposure_e_per_angstrom2
        Accumulated exposure ``N`` (e-/Å²): a scalar, or an ``(n,)`` array for a stack.
    pixel_size_angstrom
        Pixel size of the image.
    voltage_kv
        Acceleration voltage (300 kV curve; scaled by 0.8 at 200 kV).
    xp
        Array module of the result.

    Returns
    -------
    ndarray
        ``(ny, nx // 2 + 1)`` float32 half-spectrum ``exp(-N / (2 N_e(k)))``, or
        ``(n, ny, nx // 2 + 1)`` for an array of exposures. Multiply an ``rfft2`` by it
        to dose-weight a tilt image with its accumulated exposure.

    Notes
    -----
    The amplitude (not power) attenuation of Grant & Grigorieff [1]_, the filter the
    tilt-series reconstruction and the frame weighting share.

    References
    ----------
    .. [1] Grant, T. & Grigorieff, N. (2015). Measuring the optimal exposure for single
       particle cryo-EM using a 2.6 Å reconstruction of rotavirus VP6. eLife 4, e06980.
    """
    k = _spatial_frequency_per_angstrom(shape_yx, pixel_size_angstrom, xp)
    crit = critical_exposure_e_per_angstrom2(k, voltage_kv=voltage_kv).astype(xp.float32)
    n = np.asarray(exposure_e_per_angstrom2, dtype=np.float32)
    if n.ndim > 1:
        raise ValueError(f"exposure_e_per_angstrom2 must be a scalar or 1D, got shape {n.shape}")
    if not np.all(np.isfinite(n)) or np.any(n < 0):
        raise ValueError(f"exposure_e_per_angstrom2 must be finite and >= 0, got {n}")
    dose = xp.asarray(n).reshape(n.shape + (1, 1)) if n.ndim else xp.float32(n)
    return xp.exp(-dose / (2.0 * crit)).astype(xp.float32)


def frame_exposures_e_per_angstrom2(
    n_frames: int, *, dose_per_frame_e_per_angstrom2: float, pre_exposure_e_per_angstrom2: float = 0.0
) -> np.ndarray:
    """Exposure each frame's signal has received, taken at the middle of the frame.

    Parameters
    ----------
    n_frames
        Frames in the movie.
    dose_per_frame_e_per_angstrom2
        Exposure of one frame.
    pre_exposure_e_per_angstrom2
        Exposure before the first frame (earlier tilts of a tilt-series).

    Returns
    -------
    ndarray
        ``(t,)`` float64 ``pre + (i + 0.5) * dose_per_frame``.
    """
    if dose_per_frame_e_per_angstrom2 < 0 or pre_exposure_e_per_angstrom2 < 0:
        raise ValueError("dose_per_frame_e_per_angstrom2 and pre_exposure_e_per_angstrom2 must be >= 0, got "
                         f"{dose_per_frame_e_per_angstrom2} and {pre_exposure_e_per_angstrom2}")
    return pre_exposure_e_per_angstrom2 + (np.arange(n_frames) + 0.5) * dose_per_frame_e_per_angstrom2


def dose_weights(
    shape_yx: tuple[int, int],
    n_frames: int,
    *,
    pixel_size_angstrom: float,
    dose_per_frame_e_per_angstrom2: float,
    pre_exposure_e_per_angstrom2: float = 0.0,
    voltage_kv: float = 300.0,
    xp: ModuleType = np,
    frames: np.ndarray | None = None,
) -> np.ndarray:
    """Per-frame, per-frequency weights for a dose-weighted sum; they sum to 1 over frames.

    Parameters
    ----------
    shape_yx
        Real-space frame shape ``(ny, nx)``.
    n_frames
        Frames in the movie.
    pixel_size_angstrom
        Pixel size of the frames.
    dose_per_frame_e_per_angstrom2, pre_exposure_e_per_angstrom2
        Exposure of one frame and before the first frame.
    voltage_kv
        Acceleration voltage.
    xp
        Array module of the result.
    frames
        Indices of the frames to return weights for (default: all), so a large movie can
        be weighted chunk by chunk; the normalisation is always over all ``n_frames``.

    Returns
    -------
    ndarray
        ``(t, ny, nx // 2 + 1)`` float32 weights ``q_i(k) / sum_j q_j(k)`` with
        ``q_i = exp(-N_i / (2 N_e(k)))`` at each frame's mid-frame exposure ``N_i``
        (``t`` = ``len(frames)``).

    Notes
    -----
    Frames of equal noise combine with the best signal-to-noise ratio when weighted in
    proportion to the signal amplitude they keep [1]_. Normalising the weights to sum to
    one per frequency makes ``n_frames * sum_i w_i F_i`` equal the plain sum at low
    frequency (where every frame keeps its signal) and keeps the exposure-weighted
    average at high frequency, where fewer frames contribute (so the noise there is
    higher than in the plain sum, the signal-to-noise ratio better). With equal frame
    exposures ``q_i / q_0 = r**i``, ``r = exp(-d / (2 N_e))``, and the normaliser is the
    geometric sum ``(1 - r**n) / (1 - r)``: no 0/0 even where a large pre-exposure leaves
    no signal.

    References
    ----------
    .. [1] Grant, T. & Grigorieff, N. (2015). eLife 4, e06980.
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    frame_exposures_e_per_angstrom2(n_frames, dose_per_frame_e_per_angstrom2=dose_per_frame_e_per_angstrom2,
                                    pre_exposure_e_per_angstrom2=pre_exposure_e_per_angstrom2)  # validates
    index = np.arange(n_frames) if frames is None else np.asarray(frames, dtype=int).ravel()
    if index.size and (index.min() < 0 or index.max() >= n_frames):
        raise ValueError(f"frames must index 0..{n_frames - 1}, got {index}")
    k = _spatial_frequency_per_angstrom(shape_yx, pixel_size_angstrom, xp)
    crit = critical_exposure_e_per_angstrom2(k, voltage_kv=voltage_kv).astype(xp.float32)
    a = xp.float32(dose_per_frame_e_per_angstrom2) / (2.0 * crit)  # -log r, >= 0
    n = xp.float32(n_frames)
    tiny = a < 1e-6
    safe = xp.where(tiny, xp.float32(1.0), a)
    first = xp.where(tiny, 1.0 / n, xp.expm1(-safe) / xp.expm1(-n * safe))  # w_0 = (1 - r) / (1 - r**n)
    i = xp.asarray(index.astype(np.float32)).reshape(-1, 1, 1)
    return (first * xp.exp(-a * i)).astype(xp.float32)


def dose_weight_frames(
    frames_tyx: np.ndarray,
    *,
    pixel_size_angstrom: float,
    dose_per_frame_e_per_angstrom2: float,
    pre_exposure_e_per_angstrom2: float = 0.0,
    voltage_kv: float = 300.0,
) -> np.ndarray:
    """Dose-weighted sum of already aligned frames.

    Parameters
    ----------
    frames_tyx
        ``(t, y, x)`` aligned frames (e-/px), numpy or cupy.
    pixel_size_angstrom, dose_per_frame_e_per_angstrom2, pre_exposure_e_per_angstrom2, voltage_kv
        As in :func:`dose_weights`.

    Returns
    -------
    ndarray
        ``(y, x)`` float32 ``n_frames * irfft2(sum_i w_i(k) F_i(k))``: the plain sum at low
        frequency, exposure-weighted at high frequency (same device as the input).
    """
    xp = get_array_module(frames_tyx)
    if frames_tyx.ndim != 3:
        raise ValueError(f"frames_tyx must be a (t, y, x) stack, got shape {frames_tyx.shape}")
    n_t, ny, nx = frames_tyx.shape
    w = dose_weights((ny, nx), n_t, pixel_size_angstrom=pixel_size_angstrom,
                     dose_per_frame_e_per_angstrom2=dose_per_frame_e_per_angstrom2,
                     pre_exposure_e_per_angstrom2=pre_exposure_e_per_angstrom2, voltage_kv=voltage_kv, xp=xp)
    spec = (xp.fft.rfft2(frames_tyx.astype(xp.float32)) * w).sum(axis=0)
    return (xp.fft.irfft2(spec, s=(ny, nx)) * n_t).astype(xp.float32)
