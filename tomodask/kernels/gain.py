"""Gain correction, defect pixels and Fourier binning of movie frames (numpy or cupy).

Orientation of the gain reference follows :mod:`tomodask.kernels.geometry`: angles are
counter-clockwise in the (x, y) frame with y up, as IMOD displays an MRC. That is the
convention of MotionCor2's ``-RotGain`` (RELION's ``--gain_rot``, which its own display
calls clockwise because it draws row 0 at the top).
"""

from __future__ import annotations

import numpy as np

from tomodask.backend import get_array_module
from tomodask.kernels.fourier import fourier_crop

__all__ = [
    "apply_gain",
    "find_defect_pixels",
    "fourier_crop_to_pixel_size",
    "orient_gain",
    "replace_defect_pixels",
]

ROTATIONS_DEG = (0, 90, 180, 270)
FLIPS = ("none", "x", "y")


def orient_gain(gain_yx: np.ndarray, *, rotation_deg: int = 0, flip: str = "none") -> np.ndarray:
    """Rotate, then flip, a gain reference as the session settings say.

    Parameters
    ----------
    gain_yx
        ``(y, x)`` gain reference as stored in its file.
    rotation_deg
        Counter-clockwise rotation (y up, as IMOD displays; MotionCor2 ``-RotGain``
        times 90): one of 0, 90, 180, 270. 90 maps the image's +x axis onto +y; on the
        array (row 0 first) it is ``numpy.rot90(gain, k=-1)``.
    flip
        Mirror applied after the rotation: ``"none"``; ``"x"`` mirrors across the X axis
        (upside down: rows reversed, MotionCor2 ``-FlipGain 1``); ``"y"`` mirrors across
        the Y axis (left-right: columns reversed, ``-FlipGain 2``).

    Returns
    -------
    ndarray
        The oriented gain, shape ``(x, y)`` of the input for 90 and 270 degrees (a view
        where possible).

    Raises
    ------
    ValueError
        For an unknown rotation or flip, or a gain that is not 2D.
    """
    if rotation_deg not in ROTATIONS_DEG:
        raise ValueError(f"rotation_deg must be one of {ROTATIONS_DEG}, got {rotation_deg!r}")
    if flip not in FLIPS:
        raise ValueError(f"flip must be one of {FLIPS}, got {flip!r}")
    xp = get_array_module(gain_yx)
    if gain_yx.ndim != 2:
        raise ValueError(f"a gain reference must be a 2D (y, x) image, got shape {gain_yx.shape}")
    g = xp.rot90(gain_yx, k=-(rotation_deg // 90))
    if flip == "x":
        g = g[::-1, :]
    elif flip == "y":
        g = g[:, ::-1]
    return g


def apply_gain(
    frames_tyx: np.ndarray, gain_yx: np.ndarray, *, rotation_deg: int = 0, flip: str = "none"
) -> np.ndarray:
    """Gain-correct movie frames: multiply by the oriented gain reference.

    Parameters
    ----------
    frames_tyx
        ``(t, y, x)`` raw counts (any real dtype), or one ``(y, x)`` frame.
    gain_yx
        ``(y, x)`` multiplicative gain reference as stored (``corrected = raw * gain``).
    rotation_deg, flip
        Orientation of the gain onto the frames, see :func:`orient_gain`.

    Returns
    -------
    ndarray
        Float32 corrected frames, same shape and device as ``frames_tyx``.

    Raises
    ------
    ValueError
        When the oriented gain does not match the frame shape (the message says which
        rotation would fit), or the gain holds NaN / infinite values.
    """
    xp = get_array_module(frames_tyx, gain_yx)
    frames_tyx = xp.asarray(frames_tyx)
    g = orient_gain(xp.asarray(gain_yx), rotation_deg=rotation_deg, flip=flip)
    if frames_tyx.ndim not in (2, 3):
        raise ValueError(f"frames must be (t, y, x) or (y, x), got shape {frames_tyx.shape}")
    if g.shape != frames_tyx.shape[-2:]:
        hint = ("; the transposed shape matches, so rotate by 90 or 270 degrees instead of "
                f"{rotation_deg}" if g.shape[::-1] == frames_tyx.shape[-2:] else "")
        raise ValueError(f"gain reference of shape {tuple(gain_yx.shape)} oriented by rotation_deg={rotation_deg}, "
                         f"flip={flip!r} has shape {tuple(g.shape)} but frames are {tuple(frames_tyx.shape[-2:])}"
                         f"{hint}")
    if not bool(xp.isfinite(g).all()):
        raise ValueError("the gain reference holds NaN or infinite values; fix or re-record it")
    out = frames_tyx.astype(xp.float32)  # a new array: multiplied in place (one movie-sized buffer)
    out *= g.astype(xp.float32)
    return out


def _neighbour_mean(image_yx: np.ndarray, good_yx: np.ndarray, size: int) -> np.ndarray:
    """Mean of the good pixels in a ``size`` x ``size`` box around each pixel, itself excluded."""
    from tomodask.backend import scipy_ndimage

    xp = get_array_module(image_yx)
    nd = scipy_ndimage(xp)
    w = good_yx.astype(xp.float32)
    v = image_yx.astype(xp.float32) * w
    area = float(size * size)
    s = nd.uniform_filter(v, size=size, mode="reflect") * area - v
    c = nd.uniform_filter(w, size=size, mode="reflect") * area - w
    fallback = v.sum() / max(float(w.sum()), 1.0)
    return xp.where(c > 0.5, s / xp.maximum(c, 1.0), fallback)


def find_defect_pixels(
    frames: np.ndarray,
    *,
    hot_threshold_sigma: float = 8.0,
    dead_false_positives: float = 0.05,
    box_px: int = 7,
) -> np.ndarray:
    """Find dead and hot pixels in a movie (or its sum).

    Parameters
    ----------
    frames
        ``(t, y, x)`` gain-corrected frames, or their ``(y, x)`` sum (counts per pixel).
    hot_threshold_sigma
        A pixel is hot when its total exceeds the mean of its good neighbours by this many
        robust standard deviations (Poisson-aware, see Notes).
    dead_false_positives
        A pixel is dead when it never counts although its neighbours make that improbable:
        ``exp(-expected) * n_pixels < dead_false_positives`` (expected number of good
        pixels wrongly called dead in the image). At low exposure (a few counts per pixel)
        dead pixels cannot be told from chance and none are reported.
    box_px
        Side of the neighbourhood box (odd).

    Returns
    -------
    ndarray
        ``(y, x)`` bool mask, True at defects (same device as the input).

    Notes
    -----
    The expected total ``m`` of a pixel is the mean of its good neighbours (two passes:
    gross outliers are left out of the second). The residual ``total - m`` is scaled by
    ``sqrt(max(m, 1) * s2)``, where ``s2`` is the median over the image of
    ``(total - m)**2 / max(m, 1)`` divided by 0.455 (the median of a chi-square with one
    degree of freedom): Poisson scaling with an image-wide robust correction for the
    gain (a gain-corrected count is not a unit-variance Poisson count).
    """
    xp = get_array_module(frames)
    if frames.ndim == 3:
        total = frames.sum(axis=0, dtype=xp.float32)
    elif frames.ndim == 2:
        total = frames.astype(xp.float32)
    else:
        raise ValueError(f"frames must be (t, y, x) or their (y, x) sum, got shape {frames.shape}")
    if not bool(xp.isfinite(total).all()):
        raise ValueError("frames hold NaN or infinite values; check the movie and the gain reference")
    if box_px < 3 or box_px % 2 == 0:
        raise ValueError(f"box_px must be an odd number >= 3, got {box_px}")
    good = xp.ones(total.shape, dtype=bool)
    defects = xp.zeros(total.shape, dtype=bool)
    for threshold in (4.0 * hot_threshold_sigma, hot_threshold_sigma):
        m = _neighbour_mean(total, good, box_px)
        mp = xp.maximum(m, 1.0)
        r = total - m
        s2 = float(xp.median((r[good] ** 2) / mp[good])) / 0.455 if bool(good.any()) else 1.0
        z = r / xp.sqrt(mp * max(s2, 1e-6))
        hot = z > threshold
        dead = (total <= 0) & (xp.exp(-m) * total.size < dead_false_positives)
        defects = hot | dead
        good = ~defects
    return defects


def replace_defect_pixels(frames: np.ndarray, mask_yx: np.ndarray, *, box_px: int = 5) -> np.ndarray:
    """Replace defect pixels by the mean of the good pixels around them, frame by frame.

    Parameters
    ----------
    frames
        ``(t, y, x)`` frames or one ``(y, x)`` image.
    mask_yx
        ``(y, x)`` bool, True at pixels to replace.
    box_px
        Side of the neighbourhood box (odd). A defect with no good pixel in its box gets
        the frame's mean over good pixels.

    Returns
    -------
    ndarray
        Float32 copy of ``frames`` with defects replaced (same device).

    Notes
    -----
    Only the defect neighbourhoods are gathered (``n_defects * box_px**2`` values per
    frame), so the cost does not grow with the frame size.
    """
    xp = get_array_module(frames, mask_yx)
    out = xp.array(frames, dtype=xp.float32, copy=True)
    mask = xp.asarray(mask_yx, dtype=bool)
    if out.ndim not in (2, 3):
        raise ValueError(f"frames must be (t, y, x) or (y, x), got shape {frames.shape}")
    if mask.shape != out.shape[-2:]:
        raise ValueError(f"mask shape {mask.shape} does not match frames {out.shape[-2:]}")
    if box_px < 3 or box_px % 2 == 0:
        raise ValueError(f"box_px must be an odd number >= 3, got {box_px}")
    iy, ix = xp.nonzero(mask)
    if iy.size == 0:
        return out
    stack = out if out.ndim == 3 else out[None]
    ny, nx = mask.shape
    h = box_px // 2
    off = xp.arange(-h, h + 1)
    yy = xp.clip(iy[:, None, None] + off[None, :, None], 0, ny - 1)
    xx = xp.clip(ix[:, None, None] + off[None, None, :], 0, nx - 1)
    yy, xx = xp.broadcast_arrays(yy, xx)
    w = (~mask[yy, xx]).astype(xp.float32)  # (n, box, box); clipped duplicates only re-count edge pixels
    vals = stack[:, yy, xx]  # (t, n, box, box)
    count = w.sum(axis=(-2, -1))
    n_good = max(mask.size - int(iy.size), 1)
    good_mean = (stack.sum(axis=(-2, -1)) - stack[:, iy, ix].sum(axis=-1)) / n_good  # (t,)
    local = (vals * w).sum(axis=(-2, -1)) / xp.maximum(count, 1.0)
    stack[:, iy, ix] = xp.where(count[None] > 0, local, good_mean[:, None])
    return out


def fourier_crop_to_pixel_size(
    image: np.ndarray, *, pixel_size_angstrom: float, target_pixel_size_angstrom: float
) -> tuple[np.ndarray, tuple[float, float]]:
    """Fourier-crop (bin) images to about a target pixel size.

    Parameters
    ----------
    image
        ``(..., y, x)`` image(s).
    pixel_size_angstrom
        Pixel size of ``image``.
    target_pixel_size_angstrom
        Wanted pixel size; no larger than the input's is returned unchanged.

    Returns
    -------
    cropped, pixel_size_yx_angstrom
        Float32 image(s) of even shape ``round(n * pixel / target)`` per axis (mean
        preserved), and the pixel size reached along y and x (``pixel * n / n_out``).
    """
    if not (pixel_size_angstrom > 0 and target_pixel_size_angstrom > 0):
        raise ValueError("pixel sizes must be positive, got "
                         f"{pixel_size_angstrom} and {target_pixel_size_angstrom}")
    ny, nx = image.shape[-2:]
    if target_pixel_size_angstrom <= pixel_size_angstrom:
        xp = get_array_module(image)
        return image.astype(xp.float32), (float(pixel_size_angstrom), float(pixel_size_angstrom))
    scale = pixel_size_angstrom / target_pixel_size_angstrom
    shape = tuple(min(n, max(2, int(round(n * scale / 2.0)) * 2)) for n in (ny, nx))
    out = fourier_crop(image, shape)
    return out, (pixel_size_angstrom * ny / shape[0], pixel_size_angstrom * nx / shape[1])
