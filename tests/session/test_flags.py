"""A tilt-series whose alignment or centring reports a warning is done, but flagged with it."""

from __future__ import annotations

from distributed import Client, LocalCluster, wait
from sim_helpers import make_settings
from sqlalchemy import select

from tomodask.session.layout import SessionLayout
from tomodask.session.preprocess import PreprocessTrack
from tomodask.session.store import SessionRow, Store, TiltSeriesRow

WARNING = ("alignment uncertain: the gold beads of the reconstruction put the tilts at -9, -6 degrees more than "
           "48 Å from their shifts")


def test_alignment_warning_flags_the_tilt_series(tmp_path):
    store = Store(tmp_path / "data-root")
    with store.db() as db:
        session = SessionRow(name="s", folder=str(tmp_path / "s"), settings_yaml="{}")
        db.add(session)
        db.commit()
        db.add_all([TiltSeriesRow(session_id=session.id, name=name) for name in ("TS_01", "TS_02")])
        db.commit()
        session_id = session.id
    logs: list[tuple[str, str]] = []
    # A worker process, not a thread: an in-process worker registers distributed's GC
    # diagnosis callback in this process, and a full collection running while it starts or
    # stops leaves that callback a "stop" without a "start" (an AssertionError pytest
    # reports in a later test).
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        track = PreprocessTrack(store, session_id, make_settings(tmp_path / "microscope", "s", "copy"),
                                SessionLayout(tmp_path / "s"), client, task_resources=lambda gpu: {},
                                log=lambda message, level="INFO": logs.append((level, message)))
        # real task results from the cluster: the metrics records of two finished tilt-series
        warned = client.submit(dict, alignment_warning=WARNING, centring_warning="", pure=False)
        fine = client.submit(dict, alignment_warning="", centring_warning="", pure=False)
        wait([warned, fine])
        track._store_result("tilt_series", "TS_01", warned)
        track._store_result("tilt_series", "TS_02", fine)
    with store.db() as db:
        rows = {r.name: r for r in db.scalars(select(TiltSeriesRow))}
        assert rows["TS_01"].state == rows["TS_02"].state == "done"
        assert rows["TS_01"].flagged and rows["TS_01"].flag_reason == WARNING
        assert not rows["TS_02"].flagged and not rows["TS_02"].flag_reason
    assert ("WARNING", f"tilt-series TS_01: done, flagged: {WARNING}") in logs
