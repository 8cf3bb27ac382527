import json

from typer.testing import CliRunner

from tomodask import __version__
from tomodask.cli import app

runner = CliRunner()


def test_version_and_help():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"tomodask {__version__}"
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    assert "simulate" in r.output and "settings" in r.output


def test_simulate_writes_a_readable_session(tmp_path):
    r = runner.invoke(app, ["simulate", "--out", str(tmp_path), "--tilt-series", "1", "--naming", "tomo5"])
    assert r.exit_code == 0, r.output
    truth = json.loads((tmp_path / "truth" / "Position_1.json").read_text())
    assert len(truth["tilts"]) == 21
    assert (tmp_path / truth["tilts"][0]["movie"]).name == "Position_1_001[0.00]_fractions.tiff"
    assert (tmp_path / "Position_1.mdoc").is_file() and (tmp_path / "gain.mrc").is_file()


def test_settings_check_reports_problems(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("collection:\n  transfer_method: teleport\n")
    r = runner.invoke(app, ["settings", "check", str(p)])
    assert r.exit_code == 2
    assert "collection.transfer_method" in r.output and "'move', 'copy' or 'link'" in r.output
