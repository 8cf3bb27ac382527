"""Read movies (multi-page TIFF, MRC stacks, EER) and gain references.

Arrays come back as stored: ``(t, y, x)`` with row 0 the first row of the file (see
:mod:`tomodask.kernels.geometry`). A file that cannot be decoded raises
:class:`MovieReadError` naming the file and what to do, so a corrupt movie fails that movie
and nothing else.
"""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np
import tifffile

MOVIE_SUFFIXES = (".tif", ".tiff", ".mrc", ".mrcs", ".eer")


class MovieReadError(OSError):
    """A movie or gain reference that cannot be read."""


def _fail(path: Path, what: str, exc: BaseException | None = None) -> MovieReadError:
    detail = f": {exc}" if exc is not None else ""
    return MovieReadError(
        f"{path}: {what}{detail}. The file may be truncated or still being written; "
        "check that the transfer finished and that the microscope wrote it completely, "
        "then restart processing of this movie."
    )


def read_movie(path: str | Path, *, threads: int | None = None, eer_frames_per_fraction: int = 1) -> np.ndarray:
    """Read all frames of a movie.

    Parameters
    ----------
    path
        ``.tif``/``.tiff`` (any tifffile codec, e.g. LZW; pages read in parallel threads),
        ``.mrc``/``.mrcs`` stack, or ``.eer`` (decoded by imagecodecs).
    threads
        Decoder threads for TIFF and EER (default: one per CPU, at most 16; pages or
        strips decode in parallel, the decoders release the GIL).
    eer_frames_per_fraction
        For EER, sum this many raw frames into one output frame.

    Returns
    -------
    ndarray
        ``(t, y, x)`` frames in their stored dtype (uint8/uint16/float32...).

    Raises
    ------
    MovieReadError
        Unknown suffix, or a file that is corrupt or truncated.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    threads = threads or min(16, os.cpu_count() or 1)
    if suffix not in MOVIE_SUFFIXES:
        raise MovieReadError(
            f"{path}: unsupported movie format {suffix!r}; accepted: {', '.join(MOVIE_SUFFIXES)}"
        )
    try:
        if suffix in (".mrc", ".mrcs"):
            with mrcfile.open(path, permissive=False, mode="r") as mrc:
                data = np.asarray(mrc.data)
        else:
            with tifffile.TiffFile(path) as tif:
                data = tif.asarray(key=range(len(tif.pages)), maxworkers=threads)
            if suffix == ".eer" and eer_frames_per_fraction > 1:
                if data.shape[0] < eer_frames_per_fraction:
                    raise MovieReadError(f"{path}: has {data.shape[0]} EER frames, fewer than one fraction of "
                                         f"{eer_frames_per_fraction}; lower the setting "
                                         "processing.frame_alignment.eer_frames_per_fraction")
                n = data.shape[0] // eer_frames_per_fraction * eer_frames_per_fraction
                data = data[:n].reshape(-1, eer_frames_per_fraction, *data.shape[1:]).sum(axis=1, dtype=np.uint16)
    except MovieReadError:
        raise
    except Exception as exc:  # tifffile/mrcfile/imagecodecs raise many types for broken files
        raise _fail(path, "cannot decode movie", exc) from exc
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3 or min(data.shape) == 0:
        raise _fail(path, f"expected a (frames, y, x) stack, found shape {data.shape}")
    return data


def read_gain_reference(path: str | Path) -> np.ndarray:
    """Read a gain reference (MRC or TIFF) as a ``(y, x)`` float32 array, as stored.

    Rotation and flip from the settings are applied by :func:`tomodask.kernels.gain.apply_gain`.

    Raises
    ------
    MovieReadError
        When the file is missing, corrupt, or not a single image.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".mrc", ".mrcs"):
            with mrcfile.open(path, permissive=False, mode="r") as mrc:
                gain = np.asarray(mrc.data, dtype=np.float32)
        else:
            gain = tifffile.imread(path).astype(np.float32)
    except Exception as exc:
        raise MovieReadError(
            f"{path}: cannot read the gain reference: {exc}. Set gain_reference.path to an MRC or "
            "TIFF gain image (convert .dm4 with IMOD's dm2mrc), or gain_reference.apply to false."
        ) from exc
    if gain.ndim == 3 and gain.shape[0] == 1:
        gain = gain[0]
    if gain.ndim != 2:
        raise MovieReadError(f"{path}: a gain reference must be one 2D image, found shape {gain.shape}")
    if not np.all(np.isfinite(gain)):
        raise MovieReadError(f"{path}: the gain reference contains NaN or infinite values")
    return gain
