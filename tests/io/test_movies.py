import mrcfile
import numpy as np
import pytest
import tifffile

from tomodask.io.movies import MovieReadError, read_gain_reference, read_movie
from tomodask.simulate.eer import eer_frames_from_counts, write_eer


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


# ---- EER (Thermo Fisher electron event representation), written by tomodask.simulate.eer


@pytest.mark.parametrize("compression", [65000, 65001])
def test_eer_round_trip_is_exact(tmp_path, compression):
    rng = np.random.default_rng(3)
    events = (rng.random((7, 48, 300)) < 0.02).astype(np.uint8)
    events[1] = 0  # a frame without electrons
    events[2, 0, 0] = events[2, -1, -1] = 1  # events on the first and the last pixel
    events[3] = 0
    events[3].flat[[255, 510, 765]] = 1  # gaps of 255 and 254 px: whole multiples of the run codes (255, 127)
    events[4] = rng.random((48, 300)) < 0.6  # dense: many adjacent events
    path = write_eer(tmp_path / "m.eer", events, compression=compression)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_eer and tif.pages[0].compression == compression
    np.testing.assert_array_equal(tifffile.imread(path), events)
    out = read_movie(path, threads=2)
    assert out.shape == events.shape
    np.testing.assert_array_equal(out, events)


def test_eer_frames_are_summed_into_fractions(tmp_path):
    counts = np.random.default_rng(4).poisson(0.8, size=(5, 40, 64)).clip(0, 6)
    raw = eer_frames_from_counts(counts, 6)
    assert raw.shape == (30, 40, 64) and raw.max() == 1
    extra = np.zeros((2, 40, 64), np.uint8)
    extra[:, 5, 5] = 1  # raw frames beyond the last whole fraction are dropped
    path = write_eer(tmp_path / "m.eer", np.concatenate([raw, extra]))
    out = read_movie(path, eer_frames_per_fraction=6)
    assert out.dtype == np.uint16 and out.shape == counts.shape
    np.testing.assert_array_equal(out, counts)


def test_truncated_eer_names_the_file(tmp_path):
    events = (np.random.default_rng(5).random((20, 64, 64)) < 0.05).astype(np.uint8)
    p = write_eer(tmp_path / "TS_02_011_-30.0.eer", events)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(MovieReadError, match=r"TS_02_011_-30\.0\.eer: .*truncated or still being written"):
        read_movie(p)


def test_eer_writer_rejects_counts_above_one(tmp_path):
    with pytest.raises(ValueError, match="0/1 events"):
        write_eer(tmp_path / "m.eer", np.full((1, 8, 8), 2, np.uint8))


def test_process_movie_groups_eer_frames_into_fractions_and_aligns_them(tmp_path):
    # a simulated 40-frame tilt movie (about 0.08 e-/px per frame, clipped to one event per pixel as EER
    # records them) written as EER and grouped 4 raw frames per fraction by the session setting: 10 fractions
    # whose recovered shifts match the mean true shift of their 4 frames
    import zarr

    from tomodask.settings import SessionSettings
    from tomodask.simulate import simulate_single_tilt
    from tomodask.tasks import MovieRequest, process_movie

    tilt = simulate_single_tilt(seed=1, shape_yx=(384, 384), n_frames=40, dose_e_per_angstrom2=3.0,
                                tilt_angle_deg=20.0, drift_total_px=5.0, n_particles=8, n_dead_pixels=0,
                                n_hot_pixels=0, gain_variation=0.0)
    path = write_eer(tmp_path / "TS_01_001_20.0.eer", np.minimum(tilt.frames, 1))
    settings = SessionSettings()
    settings.processing.frame_alignment.eer_frames_per_fraction = 4
    req = MovieRequest(movie_path=str(path), movie="TS_01_001", tilt_series="TS_01", gain_path=None,
                       zarr_path=str(tmp_path / "r.zarr"), tilt_angle_deg=20.0, acquisition_index=0,
                       dose_e_per_angstrom2=3.0, prior_dose_e_per_angstrom2=0.0,
                       settings_json=settings.model_dump_json())
    metrics = process_movie(req)
    assert metrics["n_frames"] == 10 and metrics["motion_quality"] == "good"
    shifts = np.asarray(zarr.open_group(str(tmp_path / "r.zarr"), mode="r")["movies/TS_01_001/shifts_px"])
    truth = tilt.truth.frame_shifts_px.reshape(10, 4, 2).mean(axis=1)
    err = np.sqrt((((shifts - shifts.mean(0)) - (truth - truth.mean(0))) ** 2).sum(axis=1).mean())
    assert err < 0.3, f"fraction-shift RMS error {err:.3f} px"
    true_defocus = 0.5 * (tilt.truth.defocus_u_angstrom + tilt.truth.defocus_v_angstrom)
    assert metrics["defocus_angstrom"] == pytest.approx(true_defocus, abs=500.0)


def test_eer_with_fewer_frames_than_a_fraction_names_the_file_and_the_setting(tmp_path):
    path = write_eer(tmp_path / "short.eer", np.zeros((3, 16, 16), np.uint8))
    with pytest.raises(MovieReadError, match=r"short\.eer.*3 EER frames.*eer_frames_per_fraction"):
        read_movie(path, eer_frames_per_fraction=40)
