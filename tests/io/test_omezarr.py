"""OME-Zarr and MRC volumes round-trip values, voxel size and pyramid levels."""

from __future__ import annotations

import json

import dask.array as da
import mrcfile
import numpy as np
import pytest

from tomodask.io.mrc import read_mrc, write_mrc
from tomodask.io.omezarr import downsample_2x, read_ome_zarr, write_ome_zarr


@pytest.fixture
def volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal(size=(40, 130, 150)).astype(np.float32)


def test_ome_zarr_round_trip_values_pixel_size_and_levels(tmp_path, volume):
    path = write_ome_zarr(tmp_path / "tomo.ome.zarr", volume, pixel_size_angstrom=7.5, chunks_zyx=(16, 64, 64))
    opened = read_ome_zarr(path)
    # default pyramid: halve while y, x >= 32 and z >= 4: 130x150 -> 65x75 -> 32x37, then 16 < 32
    assert [lvl.shape for lvl in opened.levels] == [(40, 130, 150), (20, 65, 75), (10, 32, 37)]
    assert all(isinstance(lvl, da.Array) for lvl in opened.levels)  # lazy
    np.testing.assert_array_equal(opened.levels[0].compute(), volume)  # lossless
    np.testing.assert_allclose(opened.levels[1].compute(), downsample_2x(volume), rtol=0, atol=0)
    np.testing.assert_allclose(opened.levels[2].compute(), downsample_2x(downsample_2x(volume)), atol=1e-6)
    assert opened.pixel_size_angstrom == 7.5
    assert opened.voxel_sizes_angstrom == [(7.5,) * 3, (15.0,) * 3, (30.0,) * 3]
    # a 2x2x2 mean sits half a fine voxel beyond the first fine voxel's centre, per doubling
    assert opened.translations_angstrom == [(0.0,) * 3, (3.75,) * 3, (11.25,) * 3]


def test_ome_zarr_metadata_follows_ngff_0_5(tmp_path, volume):
    path = write_ome_zarr(tmp_path / "tomo.ome.zarr", volume, pixel_size_angstrom=(10.0, 8.0, 8.0), n_levels=2,
                          name="ts_001", metadata={"tilt_series": "ts_001"})
    meta = json.loads((path / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["node_type"] == "group"
    ome = meta["attributes"]["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert ms["axes"] == [{"name": a, "type": "space", "unit": "angstrom"} for a in "zyx"]
    assert [d["path"] for d in ms["datasets"]] == ["0", "1"]
    assert ms["datasets"][1]["coordinateTransformations"][0] == {"type": "scale", "scale": [20.0, 16.0, 16.0]}
    assert ms["metadata"] == {"tilt_series": "ts_001"}
    level = json.loads((path / "0" / "zarr.json").read_text())
    assert level["zarr_format"] == 3 and level["dimension_names"] == ["z", "y", "x"]
    assert any(c["name"] == "blosc" for c in level["codecs"])


def test_ome_zarr_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"\(z, y, x\)"):
        write_ome_zarr(tmp_path / "a.ome.zarr", np.zeros((4, 4)), pixel_size_angstrom=1.0)
    with pytest.raises(ValueError, match="positive"):
        write_ome_zarr(tmp_path / "b.ome.zarr", np.zeros((4, 4, 4)), pixel_size_angstrom=0.0)
    with pytest.raises(FileNotFoundError):
        read_ome_zarr(tmp_path / "missing.ome.zarr")


def test_mrc_round_trip_with_voxel_size(tmp_path, volume):
    path = write_mrc(tmp_path / "tomo.mrc", volume.astype(np.float64), pixel_size_angstrom=7.5)
    data, px = read_mrc(path)
    assert data.dtype == np.float32 and px == pytest.approx(7.5)
    np.testing.assert_array_equal(data, volume)
    with mrcfile.open(path) as mrc:
        assert mrc.is_volume() and mrc.header.nx == 150 and mrc.header.nz == 40
    stack_path = write_mrc(tmp_path / "ts.mrc", volume[:5], pixel_size_angstrom=2.0, stack=True)
    with mrcfile.open(stack_path) as mrc:
        assert mrc.is_image_stack()
    with pytest.raises(TypeError, match="MRC cannot store"):
        write_mrc(tmp_path / "bad.mrc", np.zeros((3, 3), dtype=np.int64), pixel_size_angstrom=1.0)
