"""The pre-processing track: one Dask future per movie, one per completed tilt-series.

A movie is submitted as soon as it is in the session. A tilt-series is complete when
``collection.tilts_per_tilt_series`` tilts have arrived, when its mdoc lists every tilt that
arrived and the next tilt-series has started, or ``collection.tilt_series_timeout_s`` after
its last tilt (then it is processed with what arrived and flagged). Once every movie of a
complete tilt-series has finished, one future is submitted that takes the successful movie
futures as arguments (their metrics flow through Dask) and aligns, reconstructs and picks.

Each finished future writes its metrics to the database at once. Task keys are
``(step, session, item, settings hash)``, so a restart skips work that is done with the same
settings and redoes work whose settings changed. A failed future marks its item failed with
the traceback; the session goes on.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback as tb
from collections.abc import Callable
from pathlib import Path

from distributed import Client, Future
from sqlalchemy import delete, select

from tomodask.io.mdoc import MdocError, read_mdoc
from tomodask.session.layout import SessionLayout
from tomodask.session.store import (
    ItemState,
    MovieRow,
    RawFile,
    Store,
    TiltSeriesRow,
    TransferState,
    as_utc,
    dumps_metrics,
    utcnow,
)
from tomodask.session.transfer import TransferredFile
from tomodask.settings import SessionSettings, compile_frame_pattern
from tomodask.tasks import MovieRequest, TiltSeriesRequest, process_movie, process_tilt_series

FINISHED = (ItemState.done.value, ItemState.failed.value)


class PreprocessTrack:
    """Turn transferred movies into futures and stored results.

    Parameters
    ----------
    store, session_id, settings, layout
        The session.
    client
        A connected Dask client.
    task_resources
        Callable ``(gpu_step: bool) -> dict`` giving the resources annotation of a task.
    log
        ``log(message, level)`` for the track's persistent log.
    """

    def __init__(self, store: Store, session_id: int, settings: SessionSettings, layout: SessionLayout,
                 client: Client, *, task_resources: Callable[[bool], dict], log: Callable[..., None]) -> None:
        self.store = store
        self.session_id = session_id
        self.settings = settings
        self.layout = layout
        self.client = client
        self.task_resources = task_resources
        self.log = log
        self.pattern = compile_frame_pattern(settings.raw_data.frame_pattern)
        self.movie_hash = settings.step_hash("movie")
        self.ts_hash = settings.step_hash("tilt_series")
        self._incoming: queue.Queue[TransferredFile] = queue.Queue()
        self._finished: queue.Queue[Future] = queue.Queue()
        self._movie_futures: dict[str, Future] = {}
        self._ts_futures: dict[str, Future] = {}
        self._mdoc_frames: dict[str, tuple[str, object]] = {}

    # ---- inputs -------------------------------------------------------------------
    def add_file(self, f: TransferredFile) -> None:
        """Hand over a file the transfer track brought into the session (thread-safe)."""
        self._incoming.put(f)

    def _register_existing(self) -> None:
        for mdoc in sorted(self.layout.raw_dir.glob("*.mdoc")):
            self._index_mdoc(mdoc)
        with self.store.db() as db:
            rows = db.scalars(select(RawFile).where(RawFile.session_id == self.session_id,
                                                    RawFile.kind == "movie",
                                                    RawFile.state == TransferState.finished.value)).all()
        for r in rows:
            self._register_movie(Path(r.dest_path))

    def _index_mdoc(self, path: Path) -> None:
        try:
            mdoc = read_mdoc(path)
        except MdocError as exc:
            self.log(f"cannot read {path.name}: {exc}", "WARNING")
            return
        for sec in mdoc.sections:
            if sec.frame_name:
                self._mdoc_frames[sec.frame_name] = (str(path), sec)

    def _register_movie(self, path: Path) -> None:
        m = self.pattern.match(path.name)
        if m is None:
            return
        info = self._mdoc_frames.get(path.name)
        sec = info[1] if info else None
        angle = sec.tilt_angle_deg if sec else (float(m["angle"]) if "angle" in m.groupdict() else None)
        index = int(m["index"]) if "index" in m.groupdict() and m["index"] else None
        with self.store.db() as db:
            row = db.scalar(select(MovieRow).where(MovieRow.session_id == self.session_id,
                                                   MovieRow.name == path.stem))
            if row is None:
                db.add(MovieRow(session_id=self.session_id, tilt_series=m["tilt_series"], name=path.stem,
                                acquisition_index=index, tilt_angle_deg=angle, raw_path=str(path)))
            ts = db.scalar(select(TiltSeriesRow).where(TiltSeriesRow.session_id == self.session_id,
                                                       TiltSeriesRow.name == m["tilt_series"]))
            if ts is None:
                ts = TiltSeriesRow(session_id=self.session_id, name=m["tilt_series"],
                                   n_tilts_expected=self.settings.collection.tilts_per_tilt_series)
                db.add(ts)
            if info:
                ts.mdoc_path = info[0]
            if row is None or ts.last_tilt_at is None:
                ts.last_tilt_at = utcnow()
            db.commit()

    # ---- main loop ----------------------------------------------------------------
    def run(self, stop: threading.Event, *, poll_s: float = 0.2) -> None:
        """Submit and collect work until ``stop`` is set, then cancel what is in flight."""
        self._register_existing()
        try:
            while not stop.is_set():
                self.step()
                stop.wait(poll_s)
        finally:
            self.cancel()

    def step(self) -> None:
        """One pass: register new files, submit ready work, store finished results."""
        while True:
            try:
                f = self._incoming.get_nowait()
            except queue.Empty:
                break
            if f.kind == "mdoc":
                self._index_mdoc(f.dest_path)
            elif f.kind == "movie":
                self._register_movie(f.dest_path)
        self._collect()
        self._submit_movies()
        self._submit_tilt_series()
        self._collect()

    def _request(self, row: MovieRow, prior_dose: float | None, dose: float | None) -> MovieRequest:
        gain = None
        if self.settings.gain_reference.apply and self.settings.gain_reference.path is not None:
            gain = str(self.layout.raw_dir / Path(self.settings.gain_reference.path).name)
        return MovieRequest(movie_path=row.raw_path, movie=row.name, tilt_series=row.tilt_series,
                            gain_path=gain, zarr_path=str(self.layout.zarr_path),
                            tilt_angle_deg=row.tilt_angle_deg or 0.0, acquisition_index=row.acquisition_index,
                            dose_e_per_angstrom2=dose, prior_dose_e_per_angstrom2=prior_dose,
                            settings_json=self.settings.model_dump_json())

    def _gain_missing(self) -> bool:
        gain = self.settings.gain_reference
        return bool(gain.apply and gain.path is not None and not (self.layout.raw_dir / Path(gain.path).name).is_file())

    def _submit_movies(self) -> None:
        if self._gain_missing():  # movies wait until the gain reference is in the session
            return
        with self.store.db() as db:
            rows = db.scalars(select(MovieRow).where(MovieRow.session_id == self.session_id)).all()
            for row in rows:
                if row.name in self._movie_futures:
                    continue
                if row.state == ItemState.done.value and row.settings_hash == self.movie_hash:
                    continue
                if row.state == ItemState.failed.value and row.settings_hash == self.movie_hash:
                    continue
                info = self._mdoc_frames.get(Path(row.raw_path).name)
                sec = info[1] if info else None
                dose = sec.exposure_dose_e_per_angstrom2 if sec else None
                prior = sec.prior_record_dose_e_per_angstrom2 if sec else None
                if sec and sec.tilt_angle_deg is not None:
                    row.tilt_angle_deg = sec.tilt_angle_deg
                key = f"movie-{self.session_id}-{row.name}-{self.movie_hash}"
                fut = self.client.submit(process_movie, self._request(row, prior, dose), key=key,
                                         resources=self.task_resources(False), retries=0)
                fut.add_done_callback(self._finished.put)
                self._movie_futures[row.name] = fut
                row.state = ItemState.queued.value
                row.settings_hash = self.movie_hash
                row.error = row.traceback = ""
            db.commit()

    def _complete_reason(self, ts: TiltSeriesRow, movies: list[MovieRow], newest_other: float | None) -> str | None:
        n = len(movies)
        if n >= ts.n_tilts_expected:
            return "all tilts arrived"
        if ts.mdoc_path and newest_other is not None:
            try:
                listed = len(read_mdoc(ts.mdoc_path).sections)
            except MdocError:
                listed = -1
            if listed == n and newest_other > as_utc(ts.last_tilt_at).timestamp():
                return "mdoc complete, next tilt-series started"
        if ts.last_tilt_at is not None:
            idle = time.time() - as_utc(ts.last_tilt_at).timestamp()
            if idle > self.settings.collection.tilt_series_timeout_s:
                return "timeout after last tilt"
        return None

    def _submit_tilt_series(self) -> None:
        with self.store.db() as db:
            series = db.scalars(select(TiltSeriesRow).where(TiltSeriesRow.session_id == self.session_id)).all()
            for ts in series:
                if ts.name in self._ts_futures:
                    continue
                if ts.state in FINISHED and ts.settings_hash == self.ts_hash:
                    continue
                movies = db.scalars(select(MovieRow).where(MovieRow.session_id == self.session_id,
                                                           MovieRow.tilt_series == ts.name)).all()
                if not movies or any(m.state not in FINISHED for m in movies):
                    continue
                others = [as_utc(o.last_tilt_at).timestamp() for o in series if o.name != ts.name and o.last_tilt_at]
                reason = self._complete_reason(ts, movies, max(others) if others else None)
                if reason is None:
                    continue
                done = sorted((m for m in movies if m.state == ItemState.done.value),
                              key=lambda m: (m.acquisition_index if m.acquisition_index is not None else 0))
                inputs = [self._movie_futures.get(m.name) or dict(m.metrics, movie=m.name) for m in done]
                request = TiltSeriesRequest(
                    tilt_series=ts.name, zarr_path=str(self.layout.zarr_path),
                    tomogram_dir=str(self.layout.tomogram_dir), alignment_dir=str(self.layout.alignment_dir),
                    mdoc_path=ts.mdoc_path or None, settings_json=self.settings.model_dump_json(),
                    failed_movies=[m.name for m in movies if m.state == ItemState.failed.value])
                key = f"tilt_series-{self.session_id}-{ts.name}-{self.ts_hash}"
                fut = self.client.submit(process_tilt_series, request, *inputs, key=key,
                                         resources=self.task_resources(False), retries=0)
                fut.add_done_callback(self._finished.put)
                self._ts_futures[ts.name] = fut
                ts.state = ItemState.queued.value
                ts.settings_hash = self.ts_hash
                ts.complete_reason = reason
                ts.flagged = reason.startswith("timeout") or len(done) < len(movies)
                ts.flag_reason = "; ".join(
                    x for x in (reason if reason.startswith("timeout") else "",
                                f"{len(movies) - len(done)} movie(s) failed" if len(done) < len(movies) else "") if x)
                ts.error = ts.traceback = ""
                self.log(f"{ts.name} complete ({reason}, {len(done)} tilts): submitted")
            db.commit()

    # ---- results ------------------------------------------------------------------
    def _collect(self) -> None:
        while True:
            try:
                fut = self._finished.get_nowait()
            except queue.Empty:
                return
            key = str(fut.key)
            kind = key.split("-", 1)[0]
            futures = self._movie_futures if kind == "movie" else self._ts_futures
            name = next((n for n, f in futures.items() if f is fut), None)
            if name is None:  # cancelled and forgotten by stop()
                continue
            self._store_result(kind, name, fut)
            if kind == "tilt_series":
                del self._ts_futures[name]

    def _store_result(self, kind: str, name: str, fut: Future) -> None:
        model = MovieRow if kind == "movie" else TiltSeriesRow
        with self.store.db() as db:
            row = db.scalar(select(model).where(model.session_id == self.session_id, model.name == name))
            if row is None:
                return
            row.finished_at = utcnow()
            if fut.status == "finished":
                row.state = ItemState.done.value
                row.metrics = dumps_metrics(fut.result())
                summary, level = "done", "INFO"
                warning = "; ".join(w for w in (row.metrics.get(k) for k in ("alignment_warning", "centring_warning"))
                                    if w) if kind == "tilt_series" else ""
                if warning:
                    row.flagged = True
                    row.flag_reason = "; ".join(x for x in (row.flag_reason, warning) if x)
                    summary, level = f"done, flagged: {warning}", "WARNING"
            elif fut.status == "cancelled":
                row.state = ItemState.waiting.value
                summary, level = "cancelled", "WARNING"
            else:
                exc = fut.exception()
                row.state = ItemState.failed.value
                row.error = f"{type(exc).__name__}: {exc}"
                row.traceback = "".join(tb.format_exception(type(exc), exc, fut.traceback()))
                summary, level = f"FAILED: {row.error}", "ERROR"
            db.commit()
        self.log(f"{kind.replace('_', '-')} {name}: {summary}", level)

    def cancel(self) -> None:
        """Cancel queued and running futures and put their items back to waiting."""
        futures = list(self._movie_futures.values()) + list(self._ts_futures.values())
        if futures:
            self.client.cancel(futures)
        self._collect()
        with self.store.db() as db:
            for model in (MovieRow, TiltSeriesRow):
                for row in db.scalars(select(model).where(
                        model.session_id == self.session_id,
                        model.state.in_([ItemState.queued.value, ItemState.running.value]))).all():
                    row.state = ItemState.waiting.value
            db.commit()
        self._movie_futures.clear()
        self._ts_futures.clear()

    def idle(self) -> bool:
        """True when nothing is queued or running."""
        return not self._ts_futures and all(f.done() for f in self._movie_futures.values()) \
            and self._incoming.empty() and self._finished.empty()


def clear_results(store: Store, session_id: int, layout: SessionLayout) -> None:
    """Delete processing results and records of a session; raw data and transfers stay."""
    import shutil

    with store.db() as db:
        db.execute(delete(MovieRow).where(MovieRow.session_id == session_id))
        db.execute(delete(TiltSeriesRow).where(TiltSeriesRow.session_id == session_id))
        db.commit()
    for path in (layout.zarr_path, layout.tomogram_dir, layout.alignment_dir):
        shutil.rmtree(path, ignore_errors=True)
    layout.create()
