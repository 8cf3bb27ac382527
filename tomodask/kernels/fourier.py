"""Fourier-space helpers shared by the kernels (numpy or cupy, taken from the inputs).

Frequencies are in cycles per pixel unless a name says otherwise. Half-spectra follow
``rfft2``: shape ``(ny, nx // 2 + 1)``.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from tomodask.backend import get_array_module


def frequency_grid(
    shape_yx: tuple[int, int], *, xp: ModuleType = np, rfft: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Spatial-frequency coordinates of a 2D FFT.

    Parameters
    ----------
    shape_yx
        Real-space image shape ``(ny, nx)``.
    xp
        Array module for the result.
    rfft
        Half-spectrum (``rfft2`` layout) when True, full spectrum otherwise.

    Returns
    -------
    fy, fx
        Broadcastable arrays of frequency in cycles per pixel.
    """
    ny, nx = shape_yx
    fy = xp.fft.fftfreq(ny).astype(xp.float32)[:, None]
    fx = (xp.fft.rfftfreq(nx) if rfft else xp.fft.fftfreq(nx)).astype(xp.float32)[None, :]
    return fy, fx


def fourier_shift(image: np.ndarray, shift_yx: tuple[float, float] | np.ndarray) -> np.ndarray:
    """Move image content by a sub-pixel shift with a Fourier phase ramp (periodic).

    Parameters
    ----------
    image
        ``(..., y, x)`` real array.
    shift_yx
        Displacement ``(dy, dx)`` in pixels; the result is ``image(r - shift)``.
        For a stack, an array of shape ``(..., 2)`` gives one shift per image.

    Returns
    -------
    ndarray
        Shifted image(s), float32, on the device of ``image``.
    """
    xp = get_array_module(image)
    fy, fx = frequency_grid(image.shape[-2:], xp=xp)
    s = xp.asarray(shift_yx, dtype=xp.float32)
    dy = s[..., 0][..., None, None]
    dx = s[..., 1][..., None, None]
    phase = xp.exp(-2j * np.pi * (fy * dy + fx * dx)).astype(xp.complex64)
    return xp.fft.irfft2(xp.fft.rfft2(image.astype(xp.float32)) * phase, s=image.shape[-2:]).astype(
        xp.float32
    )


def fourier_crop(image: np.ndarray, shape_yx: tuple[int, int]) -> np.ndarray:
    """Downsample by keeping the central part of the spectrum (anti-aliased binning).

    Parameters
    ----------
    image
        ``(..., y, x)`` real array.
    shape_yx
        Output shape ``(ny, nx)``, each no larger than the input's.

    Returns
    -------
    ndarray
        Cropped image(s), float32, with the mean preserved.
    """
    xp = get_array_module(image)
    ny, nx = image.shape[-2:]
    oy, ox = shape_yx
    if (oy, ox) == (ny, nx):
        return image.astype(xp.float32)
    if oy > ny or ox > nx:
        raise ValueError(f"fourier_crop cannot enlarge {image.shape[-2:]} to {shape_yx}")
    spec = xp.fft.rfft2(image.astype(xp.float32))
    top = oy // 2 + oy % 2
    bottom = oy // 2
    rows = xp.concatenate([spec[..., :top, :], spec[..., ny - bottom :, :]], axis=-2) if bottom else spec[..., :top, :]
    cropped = rows[..., : ox // 2 + 1]
    out = xp.fft.irfft2(cropped, s=(oy, ox)) * (oy * ox) / (ny * nx)
    return out.astype(xp.float32)


def radial_average(
    spectrum: np.ndarray, *, n_bins: int | None = None, rfft: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Rotational average of a 2D spectrum.

    Parameters
    ----------
    spectrum
        ``(y, x)`` array in FFT layout (unshifted): half-spectrum if ``rfft`` else full.
    n_bins
        Number of radial bins from 0 to 0.5 cycles/px (default: ``ny // 2``).
    rfft
        Layout of ``spectrum``.

    Returns
    -------
    frequency, profile
        Bin centres in cycles/px and the mean of ``spectrum`` in each bin (numpy arrays).
    """
    xp = get_array_module(spectrum)
    ny = spectrum.shape[0]
    nx = (spectrum.shape[1] - 1) * 2 if rfft else spectrum.shape[1]
    fy, fx = frequency_grid((ny, nx), xp=xp, rfft=rfft)
    r = xp.sqrt(fy**2 + fx**2)
    n_bins = n_bins or ny // 2
    idx = xp.clip((r / 0.5 * n_bins).astype(xp.int64), 0, n_bins)
    sums = xp.bincount(idx.ravel(), weights=spectrum.ravel().astype(xp.float64), minlength=n_bins + 1)
    counts = xp.bincount(idx.ravel(), minlength=n_bins + 1)
    prof = sums[:n_bins] / xp.maximum(counts[:n_bins], 1)
    freq = (np.arange(n_bins) + 0.5) * 0.5 / n_bins
    from tomodask.backend import to_numpy

    return freq, to_numpy(prof)


def gaussian_bfactor_filter(
    shape_yx: tuple[int, int], bfactor_px2: float, *, xp: ModuleType = np
) -> np.ndarray:
    """Half-spectrum envelope ``exp(-B f^2 / 4)`` with f in cycles/px and B in px².

    Parameters
    ----------
    shape_yx
        Real-space shape.
    bfactor_px2
        B-factor in square pixels (``B_angstrom2 / pixel_size_angstrom**2``).
    xp
        Array module.

    Returns
    -------
    ndarray
        ``(ny, nx // 2 + 1)`` float32 filter.
    """
    fy, fx = frequency_grid(shape_yx, xp=xp)
    return xp.exp(-bfactor_px2 * (fy**2 + fx**2) / 4.0).astype(xp.float32)


def cross_correlation(a: np.ndarray, b: np.ndarray, *, filt: np.ndarray | None = None) -> np.ndarray:
    """Circular cross-correlation map of two images, zero shift at index (0, 0).

    The peak of ``cross_correlation(moved, ref)`` lies at the displacement of
    ``moved`` relative to ``ref``.

    Parameters
    ----------
    a, b
        ``(..., y, x)`` real arrays of the same shape.
    filt
        Optional half-spectrum filter multiplied into the product.

    Returns
    -------
    ndarray
        Real correlation map(s), float32.
    """
    xp = get_array_module(a, b)
    prod = xp.fft.rfft2(a.astype(xp.float32)) * xp.conj(xp.fft.rfft2(b.astype(xp.float32)))
    if filt is not None:
        prod = prod * filt
    return xp.fft.irfft2(prod, s=a.shape[-2:]).astype(xp.float32)


def subpixel_peak(cc: np.ndarray, *, max_shift_px: float | None = None) -> tuple[float, float, float]:
    """Location of the highest value of a circular correlation map, refined to sub-pixel.

    Parameters
    ----------
    cc
        ``(y, x)`` correlation map with zero shift at (0, 0) (as from
        :func:`cross_correlation`).
    max_shift_px
        Only look within this radius of zero shift.

    Returns
    -------
    dy, dx, height
        Peak position (signed, wrapped to ``[-n/2, n/2)``) refined by fitting a parabola
        through the peak and its neighbours on each axis, and the peak value.

    Notes
    -----
    A 1D parabolic fit per axis; bias below 0.05 px for peaks a few pixels wide.
    """
    xp = get_array_module(cc)
    ny, nx = cc.shape
    work = cc
    if max_shift_px is not None:
        fy, fx = frequency_grid((ny, nx), xp=xp, rfft=False)
        r2 = (fy * ny) ** 2 + (fx * nx) ** 2
        work = xp.where(r2 <= max_shift_px**2, cc, -xp.inf)
    flat = int(xp.argmax(work))
    iy, ix = divmod(flat, nx)
    c0 = float(cc[iy, ix])

    def refine(cm: float, cp: float) -> float:
        denom = cm - 2.0 * c0 + cp
        return 0.0 if denom >= 0 else 0.5 * (cm - cp) / denom

    ddy = refine(float(cc[(iy - 1) % ny, ix]), float(cc[(iy + 1) % ny, ix]))
    ddx = refine(float(cc[iy, (ix - 1) % nx]), float(cc[iy, (ix + 1) % nx]))
    dy = ((iy + ny // 2) % ny) - ny // 2 + ddy
    dx = ((ix + nx // 2) % nx) - nx // 2 + ddx
    return float(dy), float(dx), c0


def critical_exposure_e_per_angstrom2(frequency_per_angstrom: np.ndarray, *, voltage_kv: float = 300.0) -> np.ndarray:
    """Critical exposure (e-/Å²) at which the signal at a spatial frequency falls to 1/e.

    Parameters
    ----------
    frequency_per_angstrom
        Spatial frequencies in 1/Å (any shape, numpy or cupy).
    voltage_kv
        Acceleration voltage: the 300 kV fit of [1]_, scaled by 0.8 at 200 kV (as
        MotionCor2 and RELION do).

    Returns
    -------
    ndarray
        ``0.245 * k^-1.665 + 2.81`` (times 0.8 at 200 kV), same backend as the input. The
        signal amplitude after an exposure ``N`` is ``exp(-N / (2 * critical_exposure))``.

    References
    ----------
    .. [1] Grant, T. & Grigorieff, N. (2015). Measuring the optimal exposure for single
       particle cryo-EM using a 2.6 Å reconstruction of rotavirus VP6. eLife 4, e06980.
    """
    xp = get_array_module(frequency_per_angstrom)
    k = xp.maximum(xp.asarray(frequency_per_angstrom), 1e-6)
    scale = 0.8 if abs(voltage_kv - 200.0) < 1.0 else 1.0
    return scale * (0.245 * k**-1.665 + 2.81)


def rfftn(volume: np.ndarray) -> np.ndarray:
    """Real FFT over every axis, in single precision for float32 input.

    Parameters
    ----------
    volume
        Real array (numpy or cupy).

    Returns
    -------
    ndarray
        Half-spectrum (last axis ``n // 2 + 1``), on the input's device. numpy inputs go
        through ``scipy.fft`` (float32 kept, all cores), about twice as fast as ``numpy.fft``
        on large volumes; cupy inputs through ``cupy.fft``.
    """
    xp = get_array_module(volume)
    if xp is np:
        import scipy.fft

        return scipy.fft.rfftn(volume, workers=-1)
    return xp.fft.rfftn(volume)


def irfftn(spectrum: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`rfftn` back to a real array of ``shape`` (every axis).

    Parameters
    ----------
    spectrum
        Half-spectrum (numpy or cupy).
    shape
        Real-space shape.

    Returns
    -------
    ndarray
        Real array on the input's device (float32 for a complex64 spectrum).
    """
    xp = get_array_module(spectrum)
    axes = tuple(range(len(shape)))
    if xp is np:
        import scipy.fft

        return scipy.fft.irfftn(spectrum, s=shape, axes=axes, workers=-1)
    return xp.fft.irfftn(spectrum, s=shape, axes=axes)


def squared_frequency_3d(shape_zyx: tuple[int, int, int], *, xp: ModuleType = np) -> np.ndarray:
    """Squared spatial frequency ``kz^2 + ky^2 + kx^2`` (cycles/voxel²) of an ``rfftn`` spectrum.

    Parameters
    ----------
    shape_zyx
        Real-space volume shape.
    xp
        Array module of the result.

    Returns
    -------
    ndarray
        ``(z, y, x // 2 + 1)`` float32.
    """
    kz = xp.fft.fftfreq(shape_zyx[0]).astype(xp.float32)[:, None, None]
    ky = xp.fft.fftfreq(shape_zyx[1]).astype(xp.float32)[None, :, None]
    kx = xp.fft.rfftfreq(shape_zyx[2]).astype(xp.float32)[None, None, :]
    return kz**2 + ky**2 + kx**2
