"""Kill the coordinator mid-transfer and mid-processing; change settings and restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sim_helpers import make_settings, spec_fields
from sqlalchemy import select

from tomodask.session.api import create_session, open_session
from tomodask.session.store import MovieRow
from tomodask.session.transfer import file_checksum
from tomodask.simulate.writer import write_session

pytestmark = pytest.mark.slow


def _start(name: str, data_root) -> subprocess.Popen:
    env = dict(os.environ, TOMODASK_DATA_ROOT=str(data_root))
    log = open(data_root / f"coordinator-{time.monotonic_ns()}.log", "wb")  # closed by _finish
    proc = subprocess.Popen([sys.executable, "-m", "tomodask.cli", "session", "run", name, "--tilt-series", "1",
                             "--timeout-s", "600"], env=env, start_new_session=True, stdout=log, stderr=log)
    proc.log = log
    return proc


def _finish(proc: subprocess.Popen) -> str:
    proc.log.close()
    return Path(proc.log.name).read_text()


def _kill_when(proc: subprocess.Popen, condition, timeout_s: float = 300.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and proc.poll() is None:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)  # the coordinator and the workers it started
            proc.wait()
            _finish(proc)
            return
        time.sleep(0.005)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    pytest.fail(f"condition never met before the coordinator ended:\n{_finish(proc)}")


def _done_movies(session) -> dict[str, object]:
    with session.store.db() as db:
        rows = db.scalars(select(MovieRow).where(MovieRow.session_id == session.id, MovieRow.state == "done")).all()
    return {r.name: r.finished_at for r in rows}


def test_kill_during_move_and_processing_loses_nothing_and_redoes_nothing(tmp_path, data_root):
    microscope = tmp_path / "microscope"
    write_session(microscope, n_tilt_series=1, size="tiny", **spec_fields())
    sums = {p.name: file_checksum(p) for p in microscope.glob("TS_*.tif")}
    assert len(sums) == 16
    session = create_session(make_settings(microscope, "crash", "move"), data_root=data_root)
    raw = session.layout.raw_dir

    proc = _start("crash", data_root)  # 1: killed while moving files
    _kill_when(proc, lambda: len(list(raw.glob("TS_*.tif"))) >= 4)
    assert 0 < len(list(microscope.glob("TS_*.tif"))) < 16

    proc = _start("crash", data_root)  # 2: killed while movies are being processed
    _kill_when(proc, lambda: 2 <= len(_done_movies(session)) < 16)
    done_before = _done_movies(session)

    proc = _start("crash", data_root)  # 3: to the end
    proc.wait(timeout=600)
    out = _finish(proc)
    assert proc.returncode == 0, out

    in_session = {p.name: file_checksum(p) for p in raw.glob("TS_*.tif")}
    assert in_session == sums  # every source exactly once, intact
    assert list(microscope.glob("TS_*.tif")) == [] and list(raw.glob("*.partial")) == []
    after = _done_movies(session)
    assert len(after) == 16
    assert {n: after[n] for n in done_before} == done_before  # nothing finished was redone
    assert open_session("crash", data_root=data_root).progress()["tilt_series_done"] == 1


def test_settings_change_redoes_exactly_the_affected_steps(tmp_path, data_root):
    microscope = tmp_path / "microscope"
    write_session(microscope, n_tilt_series=1, size="tiny", **spec_fields())
    session = create_session(make_settings(microscope, "redo", "copy"), data_root=data_root)
    assert session.run(expected_tilt_series=1, timeout_s=600), "\n".join(session.logs())
    movies_1 = _done_movies(session)
    ts_1 = session.tilt_series().set_index("name").loc["TS_01"]

    s = session.settings
    s.processing.picking.particle_radius_angstrom = 100.0  # affects the tilt-series step only
    session.update_settings(s)
    assert session.progress()["tilt_series_done"] == 0 and session.progress()["movies_done"] == 16
    assert session.run(expected_tilt_series=1, timeout_s=600), "\n".join(session.logs())
    assert _done_movies(session) == movies_1  # no movie redone
    ts_2 = session.tilt_series().set_index("name").loc["TS_01"]
    assert ts_2.finished_at > ts_1.finished_at and ts_2.settings_hash != ts_1.settings_hash

    s = session.settings
    s.processing.ctf.resolution_low_angstrom = 40.0  # affects movies and therefore the tilt-series
    session.update_settings(s)
    assert session.run(expected_tilt_series=1, timeout_s=600), "\n".join(session.logs())
    movies_3 = _done_movies(session)
    assert all(movies_3[n] > movies_1[n] for n in movies_1)
    assert session.tilt_series().set_index("name").loc["TS_01"].finished_at > ts_2.finished_at
