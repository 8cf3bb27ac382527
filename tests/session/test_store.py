import sqlite3

from sqlalchemy import select

from tomodask.session.store import SCHEMA_VERSION, SessionRow, Store, TiltSeriesRow


def test_wal_mode_and_fresh_schema(tmp_path):
    store = Store(tmp_path)
    assert store.schema_version() == SCHEMA_VERSION
    con = sqlite3.connect(store.path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_upgrade_keeps_old_sessions(tmp_path):
    store = Store(tmp_path)
    with store.db() as db:
        db.add(SessionRow(name="old", folder=str(tmp_path / "old"), settings_yaml="{}"))
        db.commit()
    store.engine.dispose()
    # turn the database into a version-1 one: no flag_reason column yet
    con = sqlite3.connect(store.path)
    con.execute("ALTER TABLE tilt_series DROP COLUMN flag_reason")
    con.execute("UPDATE schema_version SET version = 1")
    con.commit()
    con.close()
    upgraded = Store(tmp_path)
    assert upgraded.schema_version() == SCHEMA_VERSION
    with upgraded.db() as db:
        s = db.scalar(select(SessionRow).where(SessionRow.name == "old"))
        assert s is not None
        db.add(TiltSeriesRow(session_id=s.id, name="TS_01", flag_reason="timeout after last tilt"))
        db.commit()
        assert db.scalar(select(TiltSeriesRow.flag_reason)) == "timeout after last tilt"


def test_logs_are_persistent(tmp_path):
    store = Store(tmp_path)
    with store.db() as db:
        db.add(SessionRow(name="s", folder=str(tmp_path / "s"), settings_yaml="{}"))
        db.commit()
    for i in range(3):
        store.log(1, "transfer", f"line {i}")
    store.log(1, "preprocess", "other")
    again = Store(tmp_path)
    assert [r.message for r in again.logs(1, "transfer")] == ["line 0", "line 1", "line 2"]
    assert [r.message for r in again.logs(1, limit=2)] == ["line 2", "other"]
