"""The transfer track: move / copy / link, completeness, verification and crash recovery."""

import os
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from tomodask.session.layout import SessionLayout
from tomodask.session.store import RawFile, SessionRow, Store, TransferState
from tomodask.session.transfer import TransferTrack, copy_verified, file_checksum
from tomodask.settings import SessionSettings


def _setup(tmp_path: Path, method: str, stable_s: float = 0.0):
    src = tmp_path / "microscope"
    src.mkdir()
    store = Store(tmp_path / "root")
    s = SessionSettings()
    s.raw_data.location = src
    s.collection.transfer_method = method
    s.collection.file_stable_s = stable_s
    layout = SessionLayout(tmp_path / "root" / "sessions" / "s")
    layout.create()
    with store.db() as db:
        db.add(SessionRow(name="s", folder=str(layout.root), settings_yaml=s.to_yaml()))
        db.commit()
    got = []
    track = TransferTrack(store, 1, s, layout, on_file=got.append, log=lambda m, level="INFO": None)
    return src, store, layout, track, got


def _movie(src: Path, name: str, n: int = 200_000) -> Path:
    p = src / name
    p.write_bytes(os.urandom(n))
    return p


@pytest.mark.parametrize("method", ["move", "copy", "link"])
def test_methods(tmp_path, method):
    src, store, layout, track, got = _setup(tmp_path, method)
    movie = _movie(src, "TS_01_000_0.0.tif")
    digest = file_checksum(movie)
    _movie(src, "notes.txt")  # not ours: ignored
    track.scan()
    dest = layout.raw_dir / movie.name
    assert file_checksum(dest) == digest
    assert movie.exists() == (method != "move")
    assert dest.is_symlink() == (method == "link")
    assert [f.kind for f in got] == ["movie"]
    with store.db() as db:
        row = db.scalar(select(RawFile))
    assert row.state == TransferState.finished.value and row.bytes == 200_000
    track.scan()  # nothing is transferred twice
    assert len(got) == 1
    assert not (layout.raw_dir / "notes.txt").exists()


def test_waits_until_size_is_stable_or_mdoc_lists_it(tmp_path):
    src, store, layout, track, got = _setup(tmp_path, "move", stable_s=0.6)
    movie = _movie(src, "TS_01_000_0.0.tif")
    track.scan()
    assert got == []  # just seen: not yet stable
    with open(movie, "ab") as fh:  # the microscope is still writing
        fh.write(b"more")
    time.sleep(0.4)
    track.scan()
    assert got == []
    time.sleep(0.7)
    track.scan()
    assert [f.dest_path.name for f in got] == ["TS_01_000_0.0.tif"]
    # a movie the mdoc already lists goes at once
    _movie(src, "TS_01_001_3.0.tif")
    (src / "TS_01.mrc.mdoc").write_text(
        "PixelSpacing = 1.5\n\n[ZValue = 0]\nTiltAngle = 0\nSubFramePath = D:\\f\\TS_01_000_0.0.tif\n\n"
        "[ZValue = 1]\nTiltAngle = 3\nSubFramePath = D:\\f\\TS_01_001_3.0.tif\n\n")
    track.scan()
    assert [f.dest_path.name for f in got][1:] == ["TS_01.mrc.mdoc", "TS_01_001_3.0.tif"]
    assert (src / "TS_01.mrc.mdoc").exists()  # mdoc files are copied, never moved


def test_failed_verification_keeps_the_source(tmp_path, monkeypatch):
    src, store, layout, track, got = _setup(tmp_path, "move")
    movie = _movie(src, "TS_01_000_0.0.tif")
    import tomodask.session.transfer as transfer

    real = transfer.file_checksum
    monkeypatch.setattr(transfer, "file_checksum", lambda p: "corrupted" if p.name.endswith(".partial") else real(p))
    track.scan()
    assert movie.exists() and not (layout.raw_dir / movie.name).exists()
    with store.db() as db:
        row = db.scalar(select(RawFile))
    assert row.state == TransferState.failed.value and "does not match the source" in row.error


@pytest.mark.parametrize("crash_point", ["during_copy", "after_rename", "after_verified"])
def test_recovery_after_a_crash(tmp_path, crash_point):
    src, store, layout, track, got = _setup(tmp_path, "move")
    movie = _movie(src, "TS_01_000_0.0.tif")
    digest = file_checksum(movie)
    dest = layout.raw_dir / movie.name
    with store.db() as db:
        row = RawFile(session_id=1, source_path=str(movie), dest_path=str(dest), kind="movie",
                      state=TransferState.transferring.value)
        db.add(row)
        db.commit()
        if crash_point == "during_copy":
            Path(str(dest) + ".partial").write_bytes(movie.read_bytes()[:1000])
        else:
            copy_verified(movie, dest)
            if crash_point == "after_verified":
                row.state = TransferState.verified.value
                db.commit()
    track.recover()
    track.scan()
    assert not movie.exists()
    assert file_checksum(dest) == digest
    assert sorted(p.name for p in layout.raw_dir.iterdir()) == [movie.name]
    with store.db() as db:
        rows = db.scalars(select(RawFile)).all()
    assert len(rows) == 1 and rows[0].state == TransferState.finished.value
    assert len(got) == 1


def test_filesystem_events_wake_the_loop(tmp_path):
    src, store, layout, track, got = _setup(tmp_path, "copy")
    stop = threading.Event()
    t = threading.Thread(target=track.run, args=(stop,), kwargs={"poll_s": 30.0})
    t.start()
    try:
        time.sleep(0.5)
        _movie(src, "TS_02_000_0.0.tif")
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [f.dest_path.name for f in got] == ["TS_02_000_0.0.tif"]  # long before the 30 s poll
    finally:
        stop.set()
        track.wake()
        t.join(timeout=10)
