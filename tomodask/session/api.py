"""The Python API of sessions: create, open, list, copy, delete, steer and read results.

>>> import tomodask
>>> s = tomodask.create_session(settings)            # doctest: +SKIP
>>> s.start()                                         # doctest: +SKIP
>>> s.tilt_series()                                   # doctest: +SKIP  (a pandas DataFrame)
>>> s.tomogram("TS_01")                               # doctest: +SKIP  (a lazy dask array)

Controls act directly when this process runs the session, and otherwise are sent to the
process that runs it (a control request in the database), so a notebook, the CLI and the
dashboard steer the same session.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pandas as pd
from sqlalchemy import func, select

from tomodask.session.layout import SessionLayout
from tomodask.session.runner import ACTIONS, SessionRunner, check_track, clear_track
from tomodask.session.service import coordinator_pid, pid_alive
from tomodask.session.store import (
    TRACKS,
    ControlRequest,
    ItemState,
    LogRow,
    MovieRow,
    RawFile,
    SessionRow,
    Store,
    TiltSeriesRow,
    TrackRow,
    TrackStatus,
    TransferSample,
    as_utc,
    utcnow,
)
from tomodask.settings import SessionSettings

#: A track whose heartbeat is older than this belongs to a process that died.
HEARTBEAT_STALE_S = 10.0


class Session:
    """One tomography session in a data root.

    Use :func:`create_session`, :func:`open_session` or :func:`list_sessions` to get one.
    """

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        with store.db() as db:
            row = db.scalar(select(SessionRow).where(SessionRow.name == name))
        if row is None:
            known = ", ".join(list_sessions(store)) or "none yet"
            raise KeyError(f"no session named {name!r} in {store.data_root} (sessions: {known})")
        self.id = row.id
        self.name = name
        self.layout = SessionLayout(Path(row.folder))
        self.runner: SessionRunner | None = None
        self.profile = "local"
        self.address: str | None = None

    def __repr__(self) -> str:
        st = self.status()
        return f"<tomodask.Session {self.name!r} transfer={st['transfer']} preprocess={st['preprocess']}>"

    def _repr_html_(self) -> str:
        p = self.progress()
        st = self.status()
        return (f"<b>tomodask session {self.name}</b><br>transfer: {st['transfer']}, "
                f"pre-processing: {st['preprocess']}<br>movies {p['movies_done']}/{p['movies']} done "
                f"({p['movies_failed']} failed), tilt-series {p['tilt_series_done']}/{p['tilt_series']} done "
                f"({p['tilt_series_failed']} failed)")

    # ---- settings -----------------------------------------------------------------------------
    @property
    def settings(self) -> SessionSettings:
        """The saved settings (a copy; change them with :meth:`update_settings`)."""
        with self.store.db() as db:
            return SessionSettings.from_yaml(db.get(SessionRow, self.id).settings_yaml)

    def update_settings(self, settings: SessionSettings) -> None:
        """Save new settings at once; they apply to new work after the pre-processing restarts.

        The session's name cannot change here (use :meth:`copy`).
        """
        if settings.session.name != self.name:
            raise ValueError(f"settings name {settings.session.name!r} differs from the session's {self.name!r}")
        text = settings.to_yaml()
        with self.store.db() as db:
            db.get(SessionRow, self.id).settings_yaml = text
            db.commit()
        self.layout.settings_path.write_text(text)
        self.store.log(self.id, "preprocess", "settings saved; restart pre-processing to apply them")

    # ---- controls -----------------------------------------------------------------------------
    def status(self) -> dict[str, str]:
        """Status of each track; a track whose process died reads ``failed``."""
        with self.store.db() as db:
            rows = {r.track: r for r in db.scalars(select(TrackRow).where(TrackRow.session_id == self.id)).all()}
        out = {}
        for t in TRACKS:
            r = rows.get(t)
            status = r.status if r else TrackStatus.stopped.value
            if r and r.pid and status in ("starting", "running", "stopping") and not self._alive(r):
                status = TrackStatus.failed.value
            out[t] = status
        return out

    def _alive(self, row: TrackRow) -> bool:
        if self.runner is not None and row.pid == os.getpid():
            return True
        hb = as_utc(row.heartbeat_at)
        fresh = hb is not None and (utcnow() - hb).total_seconds() < HEARTBEAT_STALE_S
        return fresh and pid_alive(row.pid)

    def _remote(self) -> bool:
        """True when another live process runs this session."""
        with self.store.db() as db:
            rows = db.scalars(select(TrackRow).where(TrackRow.session_id == self.id)).all()
        return any(r.pid and r.pid != os.getpid() and self._alive(r) for r in rows)

    def send_control(self, action: str, track: str) -> None:
        """Ask the process that runs this session (or ``tomodask serve``) to carry out a control."""
        check_track(track)
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; accepted: {', '.join(ACTIONS)}")
        with self.store.db() as db:
            db.add(ControlRequest(session_id=self.id, track=track, action=action))
            db.commit()

    def _control(self, action: str, track: str) -> None:
        check_track(track)
        if self.runner is None and (self._remote() or coordinator_pid(self.store.data_root)):
            self.send_control(action, track)
            return
        if self.runner is None:
            if action in ("stop", "clear"):
                if action == "clear":
                    for t in check_track(track):
                        clear_track(self.store, self.id, self.layout, t)
                return
            self.runner = SessionRunner(self.store, self.name, profile=self.profile, address=self.address)
        getattr(self.runner, action)(track)

    def use_cluster(self, profile: str = "local", *, address: str | None = None) -> None:
        """Choose the cluster profile this process will start the pre-processing track on."""
        self.profile, self.address = profile, address

    def start(self, track: str = "all") -> None:
        """Start the transfer track, the pre-processing track, or both (``"all"``)."""
        self._control("start", track)

    def stop(self, track: str = "all") -> None:
        """Stop a track: queued and running work is cancelled, the state stays consistent."""
        self._control("stop", track)

    def restart(self, track: str = "all") -> None:
        """Stop and start a track (to apply changed settings)."""
        self._control("restart", track)

    def clear(self, track: str = "all") -> None:
        """Delete a track's results and records, keeping raw data; refused while it runs."""
        for t in check_track(track):
            if self.status()[t] in ("starting", "running", "stopping"):
                raise RuntimeError(f"stop the {t} track of session {self.name!r} before clearing it")
        self._control("clear", track)

    def task_states(self) -> dict[str, str]:
        """Live state of this session's tasks on the Dask scheduler (empty when not running here).

        Keys are the stable task keys ``movie-<session>-<movie>-<hash>`` and
        ``tilt_series-<session>-<name>-<hash>``; states are the scheduler's (``waiting``,
        ``processing``, ``memory``, ``erred``...).
        """
        if self.runner is None or self.runner.cluster is None:
            return {}
        prefix = (f"movie-{self.id}-", f"tilt_series-{self.id}-")
        return {str(k): v for k, v in self.runner.cluster.task_states().items() if str(k).startswith(prefix)}

    def close(self) -> None:
        """Stop the tracks this process runs and its cluster."""
        if self.runner is not None:
            self.runner.close()
            self.runner = None

    def run(self, *, expected_tilt_series: int | None = None, timeout_s: float = 3600.0,
            idle_s: float = 30.0) -> bool:
        """Run both tracks until every expected tilt-series is processed, then stop.

        Parameters
        ----------
        expected_tilt_series
            Stop once this many tilt-series are processed; None: once every tilt-series seen
            is processed and no file arrived for ``idle_s`` seconds.
        timeout_s
            Give up after this long.
        idle_s
            Quiet time that ends a run without ``expected_tilt_series``.

        Returns
        -------
        bool
            True when everything finished and nothing failed.
        """
        self.start("all")
        runner = self.runner

        def finished() -> bool:
            p = self.progress()
            ts_finished = p["tilt_series_done"] + p["tilt_series_failed"]
            if expected_tilt_series is not None:
                return ts_finished >= expected_tilt_series and runner.idle()
            quiet = time.time() - self._last_arrival() > idle_s
            return p["tilt_series"] > 0 and ts_finished == p["tilt_series"] and runner.idle() and quiet

        try:
            ok = runner.wait(finished, timeout_s=timeout_s)
        finally:
            self.close()
        p = self.progress()
        return ok and p["movies_failed"] == 0 and p["tilt_series_failed"] == 0

    def _last_arrival(self) -> float:
        with self.store.db() as db:
            t = db.scalar(select(func.max(MovieRow.arrived_at)).where(MovieRow.session_id == self.id))
        if t is None:
            return time.time()
        return as_utc(t).timestamp()

    # ---- results ------------------------------------------------------------------------------
    def progress(self) -> dict[str, int]:
        """Counts of movies and tilt-series, and how many are done or failed with the current settings.

        An item finished under settings that have changed since counts as neither done nor
        failed: the next run of the pre-processing track redoes it.
        """
        settings = self.settings
        out = {}
        with self.store.db() as db:
            for label, model, step in (("movies", MovieRow, "movie"), ("tilt_series", TiltSeriesRow, "tilt_series")):
                current = settings.step_hash(step)
                rows = db.execute(select(model.state, model.settings_hash == current, func.count())
                                  .where(model.session_id == self.id).group_by(model.state, model.settings_hash)).all()
                out[label] = sum(n for _, _, n in rows)
                out[f"{label}_done"] = sum(n for st, cur, n in rows if cur and st == ItemState.done.value)
                out[f"{label}_failed"] = sum(n for st, cur, n in rows if cur and st == ItemState.failed.value)
        return out

    def _frame(self, model, columns: list[str]) -> pd.DataFrame:
        with self.store.db() as db:
            rows = db.scalars(select(model).where(model.session_id == self.id).order_by(model.id)).all()
        records = []
        for r in rows:
            rec = {c: getattr(r, c) for c in columns}
            rec.update({k: v for k, v in (getattr(r, "metrics", None) or {}).items() if not isinstance(v, list | dict)})
            records.append(rec)
        return pd.DataFrame.from_records(records, columns=None if records else columns)

    def movies(self) -> pd.DataFrame:
        """One row per movie: state, tilt angle, and every scalar metric."""
        return self._frame(MovieRow, ["name", "tilt_series", "acquisition_index", "tilt_angle_deg", "state",
                                      "error", "settings_hash", "arrived_at", "finished_at"])

    def tilt_series(self) -> pd.DataFrame:
        """One row per tilt-series: state, completeness, flags, and every scalar metric."""
        return self._frame(TiltSeriesRow, ["name", "state", "complete_reason", "flagged", "flag_reason", "error",
                                           "settings_hash", "last_tilt_at", "finished_at"])

    def transfers(self) -> pd.DataFrame:
        """One row per transferred file: kind, state, bytes, seconds."""
        return self._frame(RawFile, ["source_path", "dest_path", "kind", "state", "bytes", "seconds", "checksum",
                                     "error", "finished_at"])

    def transfer_history(self) -> pd.DataFrame:
        """Transfer speed and storage utilisation over time."""
        return self._frame(TransferSample, ["time", "bytes_total", "speed_mb_per_s", "disk_total_bytes",
                                            "disk_used_bytes", "disk_free_bytes"])

    def tilt_series_metrics(self, name: str) -> dict:
        """All metrics of one tilt-series, including per-tilt lists."""
        with self.store.db() as db:
            row = db.scalar(select(TiltSeriesRow).where(TiltSeriesRow.session_id == self.id,
                                                        TiltSeriesRow.name == name))
        if row is None:
            raise KeyError(f"no tilt-series {name!r} in session {self.name!r}")
        return dict(row.metrics or {})

    def logs(self, track: str | None = None, *, limit: int = 1000) -> list[str]:
        """Log lines of one track (or all), oldest first."""
        if track is not None:
            check_track(track)
        rows: list[LogRow] = self.store.logs(self.id, track, limit=limit)
        return [f"{r.time:%Y-%m-%d %H:%M:%S} {r.level:7s} [{r.track}] {r.message}" for r in rows]

    def results(self):
        """The session's results zarr group (read-only)."""
        return self.layout.results(mode="r")

    def movie_array(self, movie: str, array: str = "aligned_sum"):
        """A per-movie result array (zarr) such as ``aligned_sum`` or ``dose_weighted_sum``."""
        return self.results()[f"{self.layout.movie_group(movie)}/{array}"]

    def tilt_series_array(self, tilt_series: str, array: str = "aligned_stack"):
        """A per-tilt-series result array (zarr) such as ``aligned_stack`` or ``thumbnail_xy``."""
        return self.results()[f"{self.layout.tilt_series_group(tilt_series)}/{array}"]

    def tomogram(self, tilt_series: str, *, level: int = 0):
        """The tomogram of a tilt-series as a lazy dask array ``(z, y, x)``."""
        import dask.array as da

        path = self.layout.tomogram_zarr(tilt_series)
        if not path.exists():
            raise KeyError(f"tilt-series {tilt_series!r} of session {self.name!r} has no tomogram yet")
        return da.from_zarr(str(path / str(level)))

    # ---- lifecycle ----------------------------------------------------------------------------
    def copy(self, new_name: str) -> Session:
        """A new session with the same settings, no data."""
        s = self.settings
        s.session.name = new_name
        s.session.session_folder = None
        with self.store.db() as db:
            group, owner = db.get(SessionRow, self.id).group, db.get(SessionRow, self.id).owner
        return create_session(s, store=self.store, owner=owner or None, group=group)

    def delete(self) -> None:
        """Delete the session's files and records; refused while a track runs."""
        running = [t for t, st in self.status().items() if st in ("starting", "running", "stopping")]
        if running:
            raise RuntimeError(
                f"session {self.name!r} is running ({', '.join(running)}): stop it before deleting it "
                f"(`tomodask session stop {self.name}`)")
        self.close()
        with self.store.db() as db:
            db.delete(db.get(SessionRow, self.id))
            db.commit()
        shutil.rmtree(self.layout.root, ignore_errors=True)


def _store(store: Store | None, data_root: str | Path | None) -> Store:
    return store if store is not None else Store(data_root)


def create_session(settings: SessionSettings, *, data_root: str | Path | None = None, store: Store | None = None,
                   owner: str | None = None, group: str | None = None) -> Session:
    """Create a session from settings and return it.

    Parameters
    ----------
    settings
        Its settings; ``settings.session.name`` names it.
    data_root, store
        Where the database lives (default: :func:`~tomodask.session.store.default_data_root`).
    owner, group
        Owner (default: the login name) and group (default: ``settings.session.group``).

    Raises
    ------
    ValueError
        When a session of that name exists.
    """
    store = _store(store, data_root)
    name = settings.session.name
    folder = Path(settings.session.session_folder or store.data_root / "sessions" / name).resolve()
    with store.db() as db:
        if db.scalar(select(SessionRow).where(SessionRow.name == name)) is not None:
            raise ValueError(f"a session named {name!r} exists in {store.data_root}; choose another name")
        group = group or settings.session.group
        owner = owner or _login()
        store.ensure_user(owner, group)
        db.add(SessionRow(name=name, group=group, owner=owner, folder=str(folder), settings_yaml=settings.to_yaml()))
        db.commit()
    layout = SessionLayout(folder)
    layout.create()
    layout.settings_path.write_text(settings.to_yaml())
    return Session(store, name)


def _login() -> str:
    try:
        return os.getlogin()
    except OSError:
        return os.environ.get("USER", "unknown")


def open_session(name: str, *, data_root: str | Path | None = None, store: Store | None = None) -> Session:
    """Open an existing session by name."""
    return Session(_store(store, data_root), name)


def list_sessions(store: Store | None = None, *, data_root: str | Path | None = None) -> list[str]:
    """Names of all sessions in a data root, oldest first."""
    store = _store(store, data_root)
    with store.db() as db:
        return list(db.scalars(select(SessionRow.name).order_by(SessionRow.id)).all())


__all__ = ["ACTIONS", "Session", "create_session", "list_sessions", "open_session"]
