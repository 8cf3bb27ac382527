"""Write Thermo Fisher EER movies (electron event representation), for tests of the EER reader.

An EER movie is a BigTIFF whose pages are single frames of detected electrons, each page
one strip compressed with scheme 65000 (8-bit run lengths) or 65001 (7-bit run lengths),
and whose first page carries an XML ``<metadata>`` block in tag 65001 [1]_.

The strip is a little-endian bit stream (least significant bit first) of codes. Each code
starts with a run length ``skip`` of ``skipbits`` bits: the number of pixels without an
electron before the next event, in raster order. A ``skip`` of all ones (``2**skipbits -
1``) is a run with no event after it (longer gaps chain such codes). Any other ``skip`` is
followed by the event's sub-pixel position, 2 horizontal then 2 vertical bits, stored
XOR 2 (so 0 encodes sub-pixel 2), and the next run starts at the pixel after the event.
The stream ends with the run that reaches the last pixel exactly; a pixel holds at most
one event per frame, so frames are 0/1 images.

References
----------
.. [1] EER file format documentation 3.0, Section 4 (M. Leichsenring, Thermo Fisher
   Scientific, March 2023), as implemented by imagecodecs' ``eer_decode``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["EER_COMPRESSIONS", "eer_frames_from_counts", "encode_eer_frame", "write_eer"]

#: Compression tag value -> run-length bits (sub-pixel bits are 2 + 2 for both).
EER_COMPRESSIONS = {65000: 8, 65001: 7}
_SUBPIXEL_BITS = 2


def encode_eer_frame(events_yx: np.ndarray, *, compression: int = 65001,
                     subpixel_yx: np.ndarray | None = None) -> bytes:
    """Encode one ``(y, x)`` frame of 0/1 electron events as an EER strip.

    Parameters
    ----------
    events_yx
        ``(y, x)`` array of 0 or 1 (at most one event per pixel and frame).
    compression
        65000 (8-bit runs) or 65001 (7-bit runs).
    subpixel_yx
        Optional ``(n_events, 2)`` sub-pixel positions ``(v, h)`` in 0..3 of the events in
        raster order (default 0); the reader ignores them unless asked for super-resolution.

    Returns
    -------
    bytes
        The strip, padded with zero bytes to an even length (the decoder requires it).
    """
    if compression not in EER_COMPRESSIONS:
        raise ValueError(f"compression must be one of {sorted(EER_COMPRESSIONS)}, got {compression!r}")
    events = np.asarray(events_yx)
    if events.ndim != 2 or (events.size and (events.min() < 0 or events.max() > 1)):
        raise ValueError("events_yx must be a (y, x) frame of 0/1 events (one electron per pixel at most)")
    skipbits = EER_COMPRESSIONS[compression]
    mask = (1 << skipbits) - 1
    event_bits = skipbits + 2 * _SUBPIXEL_BITS
    n_pixels = events.size
    where = np.flatnonzero(events.ravel())
    sub = np.zeros((where.size, 2), dtype=np.int64) if subpixel_yx is None else np.asarray(subpixel_yx, np.int64)
    if sub.shape != (where.size, 2) or (sub.size and (sub.min() < 0 or sub.max() > 3)):
        raise ValueError(f"subpixel_yx must be ({where.size}, 2) values in 0..3, got shape {sub.shape}")
    gaps = np.diff(np.concatenate([[-1], where])) - 1  # pixels without an event before each event
    tail = n_pixels - (where[-1] + 1 if where.size else 0)  # the final run must land on n_pixels exactly
    # codes per event: gap // mask full runs, then the event code with the remainder
    n_full = gaps // mask
    n_tail_full = max(0, (tail - 1) // mask)
    event_codes = ((gaps % mask) | ((sub[:, 1] ^ 2) << skipbits) | ((sub[:, 0] ^ 2) << (skipbits + 2)))
    counts = n_full + 1
    order = np.repeat(np.arange(where.size), counts)  # which event each code belongs to
    last = np.cumsum(counts) - 1  # the event code closes each event's group
    values = np.full(order.size, mask, dtype=np.int64)
    widths = np.full(order.size, skipbits, dtype=np.int64)
    values[last] = event_codes
    widths[last] = event_bits
    values = np.concatenate([values, np.full(n_tail_full, mask), [tail - n_tail_full * mask]]).astype(np.int64)
    widths = np.concatenate([widths, np.full(n_tail_full + 1, skipbits)]).astype(np.int64)
    starts = np.cumsum(widths) - widths
    code_of_bit = np.repeat(np.arange(values.size), widths)
    bit_in_code = np.arange(int(widths.sum())) - starts[code_of_bit]
    bits = ((values[code_of_bit] >> bit_in_code) & 1).astype(np.uint8)
    stream = np.packbits(bits, bitorder="little").tobytes() + b"\0\0\0"
    return stream + b"\0" * (len(stream) % 2)


def eer_frames_from_counts(counts_tyx: np.ndarray, frames_per_fraction: int) -> np.ndarray:
    """Spread integer counts over raw 0/1 EER frames that sum back to them.

    Fraction ``i`` with count ``c`` at a pixel becomes ``frames_per_fraction`` raw frames
    of which the first ``c`` hold an event there, so reading the EER movie with
    ``eer_frames_per_fraction=frames_per_fraction`` returns ``counts_tyx``.

    Parameters
    ----------
    counts_tyx
        ``(t, y, x)`` non-negative integer counts, each at most ``frames_per_fraction``.
    frames_per_fraction
        Raw EER frames per fraction.

    Returns
    -------
    ndarray
        ``(t * frames_per_fraction, y, x)`` uint8 0/1 frames.
    """
    counts = np.asarray(counts_tyx)
    if counts.ndim != 3 or (counts.size and (counts.min() < 0 or counts.max() > frames_per_fraction)):
        raise ValueError(f"counts_tyx must be (t, y, x) counts in 0..{frames_per_fraction} (frames_per_fraction)")
    j = np.arange(frames_per_fraction)[None, :, None, None]
    raw = (counts[:, None] > j).astype(np.uint8)
    return raw.reshape(-1, *counts.shape[1:])


def write_eer(path: str | Path, frames_tyx: np.ndarray, *, compression: int = 65001) -> Path:
    """Write ``(t, y, x)`` 0/1 event frames as an EER movie (BigTIFF, one page per frame).

    Parameters
    ----------
    path
        Output file (``.eer``).
    frames_tyx
        ``(t, y, x)`` 0/1 frames (see :func:`eer_frames_from_counts`).
    compression
        65000 or 65001 (see :data:`EER_COMPRESSIONS`).

    Returns
    -------
    Path
        ``path``.
    """
    import tifffile

    frames = np.asarray(frames_tyx)
    if frames.ndim != 3:
        raise ValueError(f"frames_tyx must be (t, y, x), got shape {frames.shape}")
    n_t, ny, nx = frames.shape
    metadata = (f"<metadata><item name=\"numberOfFrames\">{n_t}</item>"
                f"<item name=\"sensorImageWidth\">{nx}</item><item name=\"sensorImageHeight\">{ny}</item>"
                "</metadata>").encode()
    path = Path(path)
    # tifffile has no EER encoder: the strips are written as pre-compressed "zlib" bytes, then the
    # Compression tag of every page is overwritten in place with the EER scheme
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i in range(n_t):
            tif.write(iter([encode_eer_frame(frames[i], compression=compression)]), shape=(ny, nx), dtype=np.uint8,
                      compression="zlib", rowsperstrip=ny, photometric="minisblack", metadata=None,
                      extratags=[(65001, 7, None, metadata, True)] if i == 0 else [])
    with tifffile.TiffFile(path, mode="r+") as tif:
        for page in tif.pages:
            page.tags["Compression"].overwrite(compression)
    return path
