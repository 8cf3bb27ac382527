import math

import pytest

from tomodask.io.mdoc import MdocError, format_mdoc, parse_mdoc, read_mdoc


def _real_mdocs(realdata):
    files = sorted(realdata.rglob("*.mdoc"))
    assert len(files) >= 6
    return files


def test_every_real_mdoc_agrees_with_mdocfile(realdata):
    mdocfile = pytest.importorskip("mdocfile")
    for path in _real_mdocs(realdata):
        ours = read_mdoc(path)
        df = mdocfile.read(path)
        theirs = df[df["ZValue"].notna()] if "ZValue" in df else df.iloc[0:0]
        assert len(ours.sections) == len(theirs), path
        assert not ours.partial
        for sec, (_, row) in zip(ours.sections, theirs.iterrows()):
            assert sec.tilt_angle_deg == pytest.approx(row["TiltAngle"]), path
            dose = row.get("ExposureDose")
            if dose is not None and not (isinstance(dose, float) and math.isnan(dose)):
                assert sec.exposure_dose_e_per_angstrom2 == pytest.approx(dose), path
            frame = row.get("SubFramePath")
            if isinstance(frame, str) or (frame is not None and str(frame) not in ("nan", "None")):
                assert sec.frame_name == frame.name, path
        if "FrameSet" in df:
            sets = df[df["FrameSet"].notna()]
            assert [s.frame_name for s in ours.frame_sets] == [p.name for p in sets["SubFramePath"]]


def test_header_and_tilt_axis_from_real_file(realdata):
    m = read_mdoc(realdata / "tomo_preprocessing/test_data/mdoc/TS_01.mrc.mdoc")  # CRLF
    assert m.tilt_axis_angle_deg == 85.3
    assert m.pixel_size_angstrom == 5.4
    assert m.image_size_xy == (924, 958)
    assert len(m.sections) == 41
    assert m.sections[0].frame_name == "TS_01_000_0.0.mrc"
    assert m.sections[0].target_defocus_angstrom == 40000.0
    assert m.sections[0].num_sub_frames == 8
    assert m.sections[0].date_time.year == 2015


def test_unc_paths(realdata):
    m = read_mdoc(realdata / "python-murfey/tests/util/test_1.mdoc")
    assert m.tilt_axis_angle_deg == 83.8 and m.voltage_kv == 300
    assert m.sections[0].sub_frame_path.startswith("\\\\192.168.10.81\\")
    assert m.sections[0].frame_name == "chrom_07_ts_010_167_000_-0.0.mrc"


def test_file_still_being_written_drops_the_partial_section():
    full = format_mdoc({"PixelSpacing": 1.5}, ["Tilt axis angle = 85, binning = 1"],
                       [{"TiltAngle": 0.0, "ExposureDose": 3.0, "SubFramePath": "D:\\f\\a.tif"},
                        {"TiltAngle": 3.0, "ExposureDose": 3.0, "SubFramePath": "D:\\f\\b.tif"}])
    cut = full[: full.index("[ZValue = 1]") + len("[ZValue = 1]\r\nTiltAng")]
    m = parse_mdoc(cut)
    assert m.partial
    assert m.tilt_angles_deg == [0.0]
    whole = parse_mdoc(full)
    assert not whole.partial and whole.tilt_angles_deg == [0.0, 3.0] and whole.frame_names == ["a.tif", "b.tif"]


def test_garbage_names_file_and_line(tmp_path):
    p = tmp_path / "bad.mdoc"
    p.write_text("PixelSpacing = 1\nthis is not an mdoc\n")
    with pytest.raises(MdocError, match=r"bad\.mdoc:2: expected 'Key = value'"):
        read_mdoc(p)
