"""Session lifecycle through the Python API and the CLI (no processing)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tomodask.cli import app
from tomodask.session.api import create_session, list_sessions, open_session
from tomodask.session.store import ControlRequest, Store, TrackRow
from tomodask.settings import SessionSettings


def _settings(tmp_path, name="grid1"):
    s = SessionSettings()
    s.session.name = name
    s.raw_data.location = tmp_path / "microscope"
    return s


def test_create_open_list_copy_delete(tmp_path, data_root):
    s = create_session(_settings(tmp_path), data_root=data_root, owner="alice", group="lab-a")
    assert list_sessions(data_root=data_root) == ["grid1"]
    assert s.layout.raw_dir.is_dir() and s.layout.settings_path.read_text() == s.settings.to_yaml()
    assert Store(data_root).users() == {"alice": "lab-a"}
    with pytest.raises(ValueError, match="a session named 'grid1' exists"):
        create_session(_settings(tmp_path), data_root=data_root)
    c = s.copy("grid2")
    assert c.settings.microscope == s.settings.microscope and c.settings.session.name == "grid2"
    assert c.layout.root != s.layout.root and c.progress()["movies"] == 0
    with pytest.raises(KeyError, match="no session named 'nope'.*sessions: grid1, grid2"):
        open_session("nope", data_root=data_root)
    c.delete()
    assert list_sessions(data_root=data_root) == ["grid1"] and not c.layout.root.exists()


def test_settings_change_is_saved_at_once(tmp_path, data_root):
    s = create_session(_settings(tmp_path), data_root=data_root)
    new = s.settings
    new.processing.picking.particle_radius_angstrom = 123.0
    s.update_settings(new)
    again = open_session("grid1", data_root=data_root)
    assert again.settings.processing.picking.particle_radius_angstrom == 123.0
    assert "123.0" in again.layout.settings_path.read_text()
    assert any("settings saved" in line for line in again.logs("preprocess"))


def test_delete_refused_while_running_and_remote_controls(tmp_path, data_root):
    s = create_session(_settings(tmp_path), data_root=data_root)
    store = Store(data_root)
    import subprocess
    import sys

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from tomodask.session.store import utcnow

        with store.db() as db:  # another live process runs the transfer track
            db.add(TrackRow(session_id=s.id, track="transfer", status="running", pid=sleeper.pid,
                            heartbeat_at=utcnow()))
            db.commit()
        assert s.status()["transfer"] == "running"
        with pytest.raises(RuntimeError, match="is running \\(transfer\\): stop it before deleting it"):
            s.delete()
        r = CliRunner().invoke(app, ["session", "stop", "grid1", "--data-root", str(data_root)])
        assert r.exit_code == 0, r.output
        with store.db() as db:  # the stop went to the process that runs it
            assert [(c.action, c.track) for c in db.query(ControlRequest).all()] == [("stop", "all")]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert s.status()["transfer"] == "failed"  # its process is gone without stopping


def test_cli_create_list_show_logs(tmp_path, data_root):
    p = tmp_path / "s.yaml"
    _settings(tmp_path, "cli1").save(p)
    runner = CliRunner()
    r = runner.invoke(app, ["session", "create", str(p), "--data-root", str(data_root), "--owner", "bob"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["session", "list", "--data-root", str(data_root)])
    assert "cli1" in r.output and "transfer=stopped" in r.output
    r = runner.invoke(app, ["session", "show", "cli1", "--data-root", str(data_root)])
    assert r.exit_code == 0 and "movies=0" in r.output
    r = runner.invoke(app, ["session", "clear", "cli1", "--data-root", str(data_root)])
    assert r.exit_code == 0
    r = runner.invoke(app, ["session", "logs", "cli1", "--data-root", str(data_root)])
    assert "preprocess track cleared" in r.output and "transfer track cleared" in r.output
    r = runner.invoke(app, ["session", "show", "missing", "--data-root", str(data_root)])
    assert r.exit_code == 2 and "no session named 'missing'" in r.output
