import mrcfile
import numpy as np
import pytest
import tifffile

from tomodask.io.movies import MovieReadError, read_gain_reference, read_movie


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_lzw_tiff_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    frames = rng.poisson(0.7, size=(6, 64, 80)).astype(dtype)
    p = tmp_path / "m.tif"
    tifffile.imwrite(p, frames, compression="lzw")
    out = read_movie(p, threads=2)
    assert out.dtype == dtype and out.shape == (6, 64, 80)
    np.testing.assert_array_equal(out, frames)


def test_mrc_stack(tmp_path):
    frames = np.arange(3 * 8 * 10, dtype=np.float32).reshape(3, 8, 10)
    p = tmp_path / "m.mrc"
    with mrcfile.new(p) as m:
        m.set_data(frames)
    np.testing.assert_array_equal(read_movie(p), frames)


def test_truncated_tiff_names_the_file(tmp_path):
    frames = np.random.default_rng(1).poisson(1.0, size=(5, 64, 64)).astype(np.uint8)
    p = tmp_path / "TS_01_003_6.0.tif"
    tifffile.imwrite(p, frames, compression="lzw")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(MovieReadError, match=r"TS_01_003_6\.0\.tif: .*truncated or still being written"):
        read_movie(p)


def test_unknown_format(tmp_path):
    p = tmp_path / "movie.dm4"
    p.write_bytes(b"x")
    with pytest.raises(MovieReadError, match=r"movie\.dm4: unsupported movie format '.dm4'; accepted"):
        read_movie(p)


def test_gain_reference_mrc_and_errors(tmp_path):
    gain = np.random.default_rng(2).uniform(0.8, 1.2, size=(16, 24)).astype(np.float32)
    p = tmp_path / "gain.mrc"
    with mrcfile.new(p) as m:
        m.set_data(gain)
    np.testing.assert_array_equal(read_gain_reference(p), gain)
    tif = tmp_path / "gain.tif"
    tifffile.imwrite(tif, gain)
    np.testing.assert_array_equal(read_gain_reference(tif), gain)
    with pytest.raises(MovieReadError, match=r"missing\.mrc: cannot read the gain reference.*gain_reference.apply"):
        read_gain_reference(tmp_path / "missing.mrc")
