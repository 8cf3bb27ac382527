"""The simulator writes what its ground truth says (checked from the files it wrote)."""

import json

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from tomodask.io.mdoc import read_mdoc
from tomodask.io.movies import read_movie
from tomodask.kernels.ctf_model import ctf_2d
from tomodask.kernels.fourier import cross_correlation, fourier_shift, radial_average, subpixel_peak
from tomodask.simulate import dose_symmetric_order, simulate_single_tilt
from tomodask.simulate.microscope import AcquisitionSpec, TiltSeriesAcquisition
from tomodask.simulate.writer import encode_tiff_lzw


@pytest.fixture(scope="module")
def truth(tiny_session_dir):
    return json.loads((tiny_session_dir / "truth" / "TS_01.json").read_text())


def test_files_match_mdoc_and_truth(tiny_session_dir, truth):
    mdoc = read_mdoc(tiny_session_dir / truth["mdoc"])
    spec = truth["spec"]
    assert not mdoc.partial
    assert mdoc.tilt_axis_angle_deg == spec["tilt_axis_angle_deg"]
    assert mdoc.pixel_size_angstrom == spec["pixel_size_angstrom"]
    assert len(mdoc.sections) == len(truth["tilts"]) == 21
    for sec, t in zip(mdoc.sections, truth["tilts"]):
        assert sec.frame_name == t["movie"]
        assert sec.tilt_angle_deg == pytest.approx(t["nominal_tilt_angle_deg"])
        assert sec.exposure_dose_e_per_angstrom2 == pytest.approx(t["dose_e_per_angstrom2"])
        assert sec.prior_record_dose_e_per_angstrom2 == pytest.approx(t["prior_dose_e_per_angstrom2"])
        assert sec.num_sub_frames == spec["n_frames"]
    movie = read_movie(tiny_session_dir / truth["tilts"][0]["movie"])
    assert movie.shape == (spec["n_frames"], *spec["shape_yx"]) and movie.dtype == np.uint8
    # realistic counting-mode exposure: well under 1 e-/px/frame at the detector
    e_per_px_frame = spec["dose_per_tilt_e_per_angstrom2"] * spec["pixel_size_angstrom"] ** 2 / spec["n_frames"]
    assert 0.3 * e_per_px_frame < movie.mean() < 1.2 * e_per_px_frame


def test_acquisition_is_dose_symmetric_and_dark_tilt_is_dark(tiny_session_dir, truth):
    angles = [t["nominal_tilt_angle_deg"] for t in truth["tilts"]]
    assert angles[:5] == [0.0, 6.0, 12.0, -6.0, -12.0]
    means = np.array([read_movie(tiny_session_dir / t["movie"]).mean() for t in truth["tilts"][15:20]])
    assert truth["tilts"][17]["dark"]
    assert means[2] < 0.1 * np.delete(means, 2).mean()
    assert list(dose_symmetric_order(np.arange(-6, 7, 3.0), group_size=1)) == [2, 3, 1, 4, 0]


def _tile_spectrum(image, tile=128):
    acc = 0
    for y in range(0, image.shape[0] - tile + 1, tile // 2):
        for x in range(0, image.shape[1] - tile + 1, tile // 2):
            t = image[y : y + tile, x : x + tile]
            acc = acc + np.abs(np.fft.rfft2(t - t.mean())) ** 2
    return acc


def test_thon_rings_sit_where_the_recorded_defocus_puts_them(tmp_path):
    tilt = simulate_single_tilt(2, shape_yx=(768, 768), pixel_size_angstrom=2.0, astigmatism_angstrom=0.0,
                                defocus_angstrom=25000.0, n_frames=6)
    path = tmp_path / "TS_01_000_0.0.tif"
    path.write_bytes(encode_tiff_lzw(tilt.frames))
    frames = read_movie(path).astype(np.float32) * tilt.gain
    frames[:, tilt.defect_mask] = frames[:, ~tilt.defect_mask].mean()
    image = fourier_shift(frames, -tilt.truth.frame_shifts_px.astype(np.float32)).sum(axis=0)
    freq, profile = radial_average(_tile_spectrum(image))
    band = (freq > 0.08) & (freq < 0.3)
    data = profile / gaussian_filter(profile, 6)  # only the ring modulation is left

    def score(defocus):
        ctf = ctf_2d((128, 128), pixel_size_angstrom=2.0, defocus_u_angstrom=defocus, defocus_v_angstrom=defocus,
                     astigmatism_angle_deg=0.0, voltage_kv=300.0, spherical_aberration_mm=2.7,
                     amplitude_contrast=0.07)
        _, model = radial_average(ctf**2)
        return np.corrcoef(data[band], model[band])[0, 1]

    recorded = tilt.truth.defocus_u_angstrom
    candidates = recorded + np.arange(-6000, 6001, 250.0)
    scores = [score(d) for d in candidates]
    assert abs(candidates[int(np.argmax(scores))] - recorded) <= 500.0
    assert max(scores) > 0.3


def test_frames_shifted_back_by_recorded_drift_line_up():
    tilt = simulate_single_tilt(5, shape_yx=(256, 256), n_frames=8, drift_total_px=12.0, dose_e_per_angstrom2=4.0,
                                n_particles=4, n_gold=2)
    frames = tilt.frames.astype(np.float32) * tilt.gain
    frames[:, tilt.defect_mask] = frames[:, ~tilt.defect_mask].mean()
    aligned = fourier_shift(frames, -tilt.truth.frame_shifts_px.astype(np.float32))

    def offset(a, b):
        dy, dx, _ = subpixel_peak(cross_correlation(gaussian_filter(a, 1.5), gaussian_filter(b, 1.5)))
        return np.hypot(dy, dx)

    first, last = slice(0, 4), slice(4, 8)
    assert offset(aligned[first].sum(0), aligned[last].sum(0)) < 0.5
    shifts = tilt.truth.frame_shifts_px
    drift_between_halves = shifts[first].mean(axis=0) - shifts[last].mean(axis=0)
    # unaligned half-sums are each smeared by the drift within the half, so their offset
    # matches the difference of mean displacements only to about a pixel
    assert offset(frames[first].sum(0), frames[last].sum(0)) == pytest.approx(
        np.hypot(*drift_between_halves), abs=1.0)
    assert np.hypot(*drift_between_halves) > 3.0


def test_same_seed_same_data():
    a = simulate_single_tilt(11, shape_yx=(192, 192), n_frames=2, n_particles=1, n_gold=0, membrane=False)
    b = simulate_single_tilt(11, shape_yx=(192, 192), n_frames=2, n_particles=1, n_gold=0, membrane=False)
    np.testing.assert_array_equal(a.frames, b.frames)
    assert a.truth.defocus_u_angstrom - a.truth.defocus_v_angstrom == pytest.approx(500.0)


def test_streaming_writes_movies_in_pieces_and_grows_the_mdoc(tmp_path):
    import threading
    import time

    from tomodask.io.mdoc import read_mdoc
    from tomodask.simulate.writer import write_session

    t = threading.Thread(target=write_session, args=(tmp_path,), kwargs=dict(
        n_tilt_series=1, size="tiny", seconds_per_tilt=0.4, tilt_step_deg=30.0))
    t.start()
    sizes: dict[str, set[int]] = {}
    sections: list[int] = []
    while t.is_alive():
        for p in tmp_path.glob("TS_01_*.tif"):
            sizes.setdefault(p.name, set()).add(p.stat().st_size)
        mdoc = tmp_path / "TS_01.mrc.mdoc"
        if mdoc.exists():
            sections.append(len(read_mdoc(mdoc).sections))
        time.sleep(0.01)
    t.join()
    assert len(sizes) == 5
    assert any(len(s) > 1 for s in sizes.values())  # a watcher saw a movie half-written
    assert sections == sorted(sections) and sections[0] < 5 and sections[-1] == 5  # mdoc grew tilt by tilt


def test_one_exposure_tilt_holds_the_whole_dose_at_coarse_pixels():
    # 3 e-/A2 at 16 A/px is 768 e-/px: the one exposure that stands for a movie's sum
    # records it (a frame's 255-count ceiling clipped such tilts flat before).
    spec = AcquisitionSpec(shape_yx=(64, 64), pixel_size_angstrom=16.0, tilt_range_deg=(-3.0, 3.0),
                           tilt_step_deg=3.0, n_dead_pixels=0, n_hot_pixels=0)
    tilt = TiltSeriesAcquisition(spec, seed=0).tilt(0, with_frames=False)
    recorded = tilt.frames.astype(np.float64) * tilt.gain
    assert tilt.frames.max() > 255
    assert recorded.mean() == pytest.approx(tilt.noiseless.mean(), rel=0.01)
    assert np.corrcoef(recorded.ravel(), tilt.noiseless.ravel())[0, 1] > 0.5
