"""The coordinator: runs the two tracks of one session in this process.

Each track runs in a thread with its own stop event; its status (stopped / starting /
running / stopping / failed) is written to the database, with this process' id and a
heartbeat, so the CLI, the API and the dashboard in other processes see it. Controls
pressed elsewhere arrive as :class:`~tomodask.session.store.ControlRequest` rows, which a
control thread carries out.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from tomodask.session.layout import SessionLayout
from tomodask.session.preprocess import PreprocessTrack, clear_results
from tomodask.session.store import (
    TRACKS,
    ControlRequest,
    RawFile,
    SessionRow,
    Store,
    TrackRow,
    TrackStatus,
    TransferSample,
    utcnow,
)
from tomodask.session.transfer import TransferTrack
from tomodask.settings import SessionSettings

ACTIONS = ("start", "stop", "restart", "clear")


def check_track(track: str) -> tuple[str, ...]:
    """Expand ``"all"`` and validate a track name."""
    if track == "all":
        return TRACKS
    if track not in TRACKS:
        raise ValueError(f"unknown track {track!r}; accepted: all, {', '.join(TRACKS)}")
    return (track,)


def _import_cluster_backend(profile: str) -> None:
    """Import dask-jobqueue now, in the calling (main) thread, for SLURM profiles.

    Importing it installs a SIGINT handler, which Python allows only in the main thread; the
    pre-processing track starts its cluster from a worker thread.
    """
    from tomodask.cluster import profile_config

    if profile_config(profile)["kind"] == "slurm":
        import dask_jobqueue  # noqa: F401


def clear_track(store: Store, session_id: int, layout: SessionLayout, track: str) -> None:
    """Delete one track's results and records; raw data in ``SESSION/raw`` stays.

    Clearing ``preprocess`` deletes movie and tilt-series records and the results zarr,
    tomograms and alignment files; clearing ``transfer`` forgets transfer records, so files
    still in the microscope folder are considered again.
    """
    if track == "preprocess":
        clear_results(store, session_id, layout)
    else:
        with store.db() as db:
            for model in (RawFile, TransferSample):
                for row in db.scalars(select(model).where(model.session_id == session_id)).all():
                    db.delete(row)
            db.commit()
    store.log(session_id, track, f"{track} track cleared")


class SessionRunner:
    """Run a session's file-transfer and pre-processing tracks.

    Parameters
    ----------
    store
        The database of the data root.
    name
        Session name.
    profile
        Cluster profile for the pre-processing track (see :mod:`tomodask.cluster`).
    address
        Scheduler address for the ``address`` profile.
    """

    def __init__(self, store: Store, name: str, *, profile: str = "local", address: str | None = None) -> None:
        self.store = store
        with store.db() as db:
            row = db.scalar(select(SessionRow).where(SessionRow.name == name))
        if row is None:
            raise KeyError(f"no session named {name!r} in {store.data_root}; `tomodask session list` shows them")
        self.session_id = row.id
        self.name = name
        self.layout = SessionLayout(Path(row.folder))
        self.profile = profile
        self.address = address
        self.cluster = None
        _import_cluster_backend(profile)
        self._threads: dict[str, threading.Thread] = {}
        self._stops: dict[str, threading.Event] = {}
        self._preprocess: PreprocessTrack | None = None
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._control = threading.Thread(target=self._control_loop, name=f"{name}-control", daemon=True)
        self._control.start()

    # ---- state ------------------------------------------------------------------------
    def settings(self) -> SessionSettings:
        """The session's current settings, from the database."""
        with self.store.db() as db:
            return SessionSettings.from_yaml(db.get(SessionRow, self.session_id).settings_yaml)

    def _set_status(self, track: str, status: TrackStatus, message: str = "") -> None:
        with self.store.db() as db:
            row = db.get(TrackRow, (self.session_id, track))
            if row is None:
                row = TrackRow(session_id=self.session_id, track=track)
                db.add(row)
            row.status = status.value
            row.pid = os.getpid() if status not in (TrackStatus.stopped, TrackStatus.failed) else None
            row.heartbeat_at = utcnow()
            row.message = message
            db.commit()
        self.log(track, f"{track} track {status.value}" + (f": {message}" if message else ""),
                 "ERROR" if status is TrackStatus.failed else "INFO")

    def status(self) -> dict[str, str]:
        """Status of each track."""
        with self.store.db() as db:
            rows = {r.track: r.status for r in db.scalars(
                select(TrackRow).where(TrackRow.session_id == self.session_id)).all()}
        return {t: rows.get(t, TrackStatus.stopped.value) for t in TRACKS}

    def log(self, track: str, message: str, level: str = "INFO") -> None:
        """Write to a track's persistent log."""
        self.store.log(self.session_id, track, message, level=level)

    def running(self, track: str) -> bool:
        """True while a track's thread is alive."""
        t = self._threads.get(track)
        return t is not None and t.is_alive()

    # ---- controls -----------------------------------------------------------------------
    def start(self, track: str = "all") -> None:
        """Start one track or both (``"all"``); a running track is left alone."""
        for t in check_track(track):
            with self._lock:
                if self.running(t):
                    continue
                self._set_status(t, TrackStatus.starting)
                stop = threading.Event()
                self._stops[t] = stop
                target = self._run_transfer if t == "transfer" else self._run_preprocess
                thread = threading.Thread(target=self._guard, args=(t, target, stop), name=f"{self.name}-{t}",
                                          daemon=True)
                self._threads[t] = thread
                thread.start()

    def stop(self, track: str = "all", *, timeout_s: float = 60.0) -> None:
        """Stop one track or both: cancel queued and running work, leave a consistent state."""
        for t in check_track(track):
            with self._lock:
                if not self.running(t):
                    if self.status()[t] != TrackStatus.stopped.value:
                        self._set_status(t, TrackStatus.stopped)
                    continue
                self._set_status(t, TrackStatus.stopping)
                self._stops[t].set()
                self._threads[t].join(timeout=timeout_s)

    def restart(self, track: str = "all") -> None:
        """Stop and start again, picking up changed settings."""
        self.stop(track)
        self.start(track)

    def clear(self, track: str = "all") -> None:
        """Delete a track's results and records (raw data stays); refused while it runs."""
        for t in check_track(track):
            if self.running(t):
                raise RuntimeError(f"stop the {t} track of session {self.name!r} before clearing it")
            clear_track(self.store, self.session_id, self.layout, t)

    # ---- track bodies ---------------------------------------------------------------------
    def _guard(self, track: str, body: Callable[[threading.Event], None], stop: threading.Event) -> None:
        try:
            body(stop)
        except Exception as exc:
            self._set_status(track, TrackStatus.failed, f"{type(exc).__name__}: {exc}")
            self.log(track, traceback.format_exc(), "ERROR")
            return
        self._set_status(track, TrackStatus.stopped)

    def _run_transfer(self, stop: threading.Event) -> None:
        settings = self.settings()
        track = TransferTrack(self.store, self.session_id, settings, self.layout, on_file=self._hand_over,
                              log=lambda m, level="INFO": self.log("transfer", m, level))
        self._set_status("transfer", TrackStatus.running)
        track.run(stop)

    def _hand_over(self, f) -> None:
        pre = self._preprocess
        if pre is not None:
            pre.add_file(f)

    def _ensure_cluster(self, settings: SessionSettings):
        from tomodask.cluster import start_cluster

        if self.cluster is None:
            self.cluster = start_cluster(self.profile, resources=settings.resources, address=self.address)
            self.log("preprocess", f"cluster {self.profile} ready (dashboard {self.cluster.dashboard_link})")
        return self.cluster

    def _run_preprocess(self, stop: threading.Event) -> None:
        settings = self.settings()
        self.layout.create()
        cluster = self._ensure_cluster(settings)
        track = PreprocessTrack(self.store, self.session_id, settings, self.layout, cluster.client,
                                task_resources=lambda gpu: cluster.task_resources(gpu_step=gpu),
                                log=lambda m, level="INFO": self.log("preprocess", m, level))
        self._preprocess = track
        self._set_status("preprocess", TrackStatus.running)
        try:
            track.run(stop)
        finally:
            self._preprocess = None

    def idle(self) -> bool:
        """True when the pre-processing track has nothing queued or running."""
        pre = self._preprocess
        return pre is None or pre.idle()

    # ---- control requests from other processes ---------------------------------------------
    def _control_loop(self) -> None:
        while not self._closed.wait(0.5):
            try:
                self._handle_requests()
                self._heartbeat()
            except Exception as exc:  # keep the loop alive; the failure goes to the log
                self.log("preprocess", f"control loop error: {type(exc).__name__}: {exc}", "ERROR")

    def _handle_requests(self) -> None:
        with self.store.db() as db:
            reqs = db.scalars(select(ControlRequest).where(ControlRequest.session_id == self.session_id,
                                                           ControlRequest.handled_at.is_(None))
                              .order_by(ControlRequest.id)).all()
            for r in reqs:
                r.handled_at = utcnow()
            db.commit()
        for r in reqs:
            try:
                getattr(self, r.action)(r.track)
            except (RuntimeError, ValueError) as exc:
                self.log(r.track if r.track in TRACKS else "preprocess", f"{r.action} refused: {exc}", "WARNING")

    def _heartbeat(self) -> None:
        with self.store.db() as db:
            for row in db.scalars(select(TrackRow).where(TrackRow.session_id == self.session_id,
                                                         TrackRow.pid == os.getpid())).all():
                row.heartbeat_at = utcnow()
            db.commit()

    def close(self) -> None:
        """Stop both tracks and the cluster this runner started."""
        self.stop("all")
        self._closed.set()
        self._control.join(timeout=5)
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    def wait(self, done: Callable[[], bool], *, timeout_s: float, poll_s: float = 0.5) -> bool:
        """Wait until ``done()`` is true, a track fails, or the timeout passes."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if done():
                return True
            if TrackStatus.failed.value in self.status().values():
                return False
            time.sleep(poll_s)
        return done()
