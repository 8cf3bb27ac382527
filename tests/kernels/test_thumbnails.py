"""Tomogram thumbnails: central slabs, contrast stretched to uint8."""

from __future__ import annotations

import numpy as np
import pytest

from tomodask.kernels.thumbnails import to_uint8, tomogram_thumbnails


def test_thumbnails_show_the_central_slabs():
    vol = np.zeros((40, 96, 120), np.float32)
    vol[18:22, 30:40, 50:70] = 1.0  # a bright block in the central z slab
    vol[0:3, 60:70, 10:20] = 5.0  # outside the central z slab: not in the XY view
    thumbs = tomogram_thumbnails(vol, slab_px=4)
    assert thumbs.xy.dtype == np.uint8 and thumbs.xy.shape == (96, 120)
    assert thumbs.xz.dtype == np.uint8 and thumbs.xz.shape == (40, 120)
    assert thumbs.xy[35, 60] == 255 and thumbs.xy[65, 15] == 0
    assert thumbs.xz[20, 60] == 0  # block is at y 30-40, outside the central y rows 46-50
    inverted = tomogram_thumbnails(vol, slab_px=4, invert=True)
    assert inverted.xy[35, 60] == 0


def test_large_views_are_shrunk_to_max_size():
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(30, 600, 900)).astype(np.float32)
    thumbs = tomogram_thumbnails(vol, max_size_px=300)
    assert thumbs.xy.shape == (200, 300)
    assert thumbs.xz.shape == (10, 300)


def test_to_uint8_percentile_stretch():
    img = np.linspace(0.0, 1.0, 10001, dtype=np.float32).reshape(1, -1)
    out = to_uint8(img, percentiles=(10.0, 90.0))
    assert out[0, 1000] == 0 and out[0, 9000] == 255 and out[0, 5000] in (127, 128)
    assert not to_uint8(np.full((4, 4), 3.0)).any()
    with pytest.raises(ValueError, match="percentiles"):
        to_uint8(img, percentiles=(50.0, 10.0))
