"""Thumbnails of a tomogram: a central XY slab and a central XZ slab, as uint8 images.

Each thumbnail is the mean over a slab of slices around the volume centre (averaging
raises the contrast of a noisy tomogram), shrunk by Fourier cropping to at most
``max_size_px`` on its longer side, and mapped to 0-255 between two percentiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tomodask.backend import get_array_module
from tomodask.kernels.fourier import fourier_crop


@dataclass(frozen=True)
class TomogramThumbnails:
    """XY and XZ views of a volume.

    Attributes
    ----------
    xy
        ``(y, x)`` uint8, mean of the central ``slab_px`` z slices.
    xz
        ``(z, x)`` uint8, mean of the central ``slab_px`` y rows.
    """

    xy: np.ndarray
    xz: np.ndarray


def to_uint8(image: np.ndarray, *, percentiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """Map an image linearly to uint8 so that the given percentiles span 0-255.

    Parameters
    ----------
    image
        ``(y, x)`` real image.
    percentiles
        Lower and upper percentile mapped to 0 and 255 (values beyond are clipped).

    Returns
    -------
    ndarray
        ``(y, x)`` uint8 on the device of ``image`` (all zeros for a constant image).
    """
    xp = get_array_module(image)
    lo_p, hi_p = percentiles
    if not 0.0 <= lo_p < hi_p <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    img = image.astype(xp.float32)
    lo, hi = (float(v) for v in xp.percentile(img, xp.asarray([lo_p, hi_p], dtype=xp.float32)))
    if not hi > lo:
        return xp.zeros(img.shape, dtype=xp.uint8)
    scaled = (img - lo) * (255.0 / (hi - lo))
    return xp.clip(xp.rint(scaled), 0, 255).astype(xp.uint8)


def _shrink(image: np.ndarray, max_size_px: int) -> np.ndarray:
    n = max(image.shape)
    if n <= max_size_px:
        return image
    factor = max_size_px / n
    shape = tuple(max(2, int(round(s * factor))) for s in image.shape)
    return fourier_crop(image, shape)


def tomogram_thumbnails(
    volume_zyx: np.ndarray,
    *,
    slab_px: int = 10,
    max_size_px: int = 512,
    percentiles: tuple[float, float] = (1.0, 99.0),
    invert: bool = False,
) -> TomogramThumbnails:
    """XY and XZ thumbnails of a tomogram.

    Parameters
    ----------
    volume_zyx
        ``(z, y, x)`` volume.
    slab_px
        Number of central slices averaged (clipped to the volume's extent).
    max_size_px
        Longest side of a thumbnail (larger views are Fourier-cropped).
    percentiles
        Contrast range (see :func:`to_uint8`).
    invert
        Negate before mapping (to show dark protein as bright).

    Returns
    -------
    TomogramThumbnails
        ``xy`` ``(y', x')`` and ``xz`` ``(z', x')`` uint8, on the device of the volume.
    """
    if volume_zyx.ndim != 3:
        raise ValueError(f"tomogram_thumbnails needs a (z, y, x) volume, got shape {volume_zyx.shape}")
    if slab_px < 1:
        raise ValueError(f"slab_px must be at least 1, got {slab_px}")
    xp = get_array_module(volume_zyx)
    nz, ny, _ = volume_zyx.shape
    sign = -1.0 if invert else 1.0

    def central(n: int) -> slice:
        k = min(slab_px, n)
        start = (n - k) // 2
        return slice(start, start + k)

    xy = volume_zyx[central(nz)].mean(axis=0, dtype=xp.float32) * sign
    xz = volume_zyx[:, central(ny)].mean(axis=1, dtype=xp.float32) * sign
    return TomogramThumbnails(
        xy=to_uint8(_shrink(xy, max_size_px), percentiles=percentiles),
        xz=to_uint8(_shrink(xz, max_size_px), percentiles=percentiles),
    )
