from pathlib import Path

import pytest

from tomodask.settings import (
    FRAME_PATTERN_PRESETS,
    SessionSettings,
    SettingsError,
    compile_frame_pattern,
)


def test_yaml_and_json_round_trip(tmp_path: Path):
    s = SessionSettings()
    s.session.name = "grid3_lamella2"
    s.microscope.pixel_size_angstrom = 1.34
    s.collection.transfer_method = "copy"
    s.processing.tilt_series_alignment.exclude_tilt_indices = [3, 40]
    assert SessionSettings.from_yaml(s.to_yaml()) == s
    assert SessionSettings.from_json(s.to_json()) == s
    for suffix in (".yaml", ".json"):
        p = tmp_path / f"settings{suffix}"
        s.save(p)
        assert SessionSettings.load(p) == s


def test_bad_settings_name_each_field_and_accepted_values():
    bad = {
        "microscope": {"voltage_kv": 250, "pixel_size": 1.0},
        "collection": {"transfer_method": "mv", "tilts_per_tilt_series": 1},
        "processing": {"picking": {"method": "template"}},
    }
    with pytest.raises(SettingsError) as err:
        SessionSettings.from_dict(bad)
    lines = str(err.value).splitlines()
    assert len(lines) == 5
    text = str(err.value)
    assert "microscope.voltage_kv: Input should be 80, 100, 120, 200 or 300 (got 250)" in text
    assert "microscope.pixel_size: unknown setting" in text
    assert "collection.transfer_method: Input should be 'move', 'copy' or 'link' (got 'mv')" in text
    assert "collection.tilts_per_tilt_series" in text
    assert "template_path is required" in text


def test_load_names_the_file(tmp_path: Path):
    p = tmp_path / "s.yaml"
    p.write_text("ctf:\n  defocus_min_angstrom: 1\n")
    with pytest.raises(SettingsError, match=r"s\.yaml: invalid settings\n- ctf: unknown setting"):
        SessionSettings.load(p)


@pytest.mark.parametrize(
    ("preset", "name", "expected"),
    [
        ("serialem", "TS_01_012_-9.0.tif", ("TS_01", "012", "-9.0")),
        ("tomo5-bracket", "Position_1_001[-0.00]_fractions.tiff", ("Position_1", "001", "-0.00")),
        ("tomo5-datetime", "Position_1_001_0.0_20240115_101010_fractions.tiff", ("Position_1", "001", "0.0")),
    ],
)
def test_frame_patterns_cover_serialem_and_tomo5(preset, name, expected):
    s = SessionSettings.from_dict({"raw_data": {"frame_pattern": preset}})
    m = compile_frame_pattern(s.raw_data.frame_pattern).match(name)
    assert m is not None
    assert (m["tilt_series"], m["index"], m["angle"]) == expected
    assert s.raw_data.frame_pattern == FRAME_PATTERN_PRESETS[preset]


def test_frame_pattern_needs_tilt_series_token():
    with pytest.raises(SettingsError, match=r"raw_data.frame_pattern: .*\{tilt_series\}"):
        SessionSettings.from_dict({"raw_data": {"frame_pattern": "{index}_{angle}.tif"}})


def test_step_hash_changes_only_with_its_inputs():
    a = SessionSettings()
    b = a.model_copy(deep=True)
    b.processing.picking.particle_radius_angstrom = 120.0
    assert a.step_hash("movie") == b.step_hash("movie")
    assert a.step_hash("tilt_series") != b.step_hash("tilt_series")
    c = a.model_copy(deep=True)
    c.processing.ctf.tile_size_px = 256
    assert a.step_hash("movie") != c.step_hash("movie")
    assert a.step_hash("tilt_series") != c.step_hash("tilt_series")


def test_unsupported_single_file_tilt_series_is_refused_with_the_fix():
    with pytest.raises(SettingsError, match="raw_data.single_file_tilt_series: .*not supported yet.*one movie per tilt"):
        SessionSettings.from_dict({"raw_data": {"single_file_tilt_series": True}})
