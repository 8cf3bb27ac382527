"""The file-transfer track: microscope folder -> ``SESSION/raw/`` by move, copy or link.

A file is transferred once it is complete: its size and mtime have not changed for
``collection.file_stable_s`` seconds, or the tilt-series' mdoc already lists it (SerialEM
writes the mdoc section after the movie). Movies matching the frame pattern and the gain
reference are transferred; mdoc files are always *copied* (SerialEM keeps appending to
them) and copied again whenever they change.

Crash safety of a move: copy to ``NAME.partial`` while hashing, fsync, re-read and compare
size and checksum, rename to ``NAME`` (atomic), record ``verified`` in the database, and
only then delete the source and record ``finished``. After a crash, :meth:`TransferTrack.recover`
finishes what was verified, discards partial copies and starts those again, so every
source file ends in the session exactly once and nothing finished is transferred again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from tomodask.io.mdoc import read_mdoc
from tomodask.io.movies import MOVIE_SUFFIXES
from tomodask.session.layout import SessionLayout
from tomodask.session.store import RawFile, Store, TransferSample, TransferState, utcnow
from tomodask.settings import SessionSettings, TransferMethod, compile_frame_pattern

CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class TransferredFile:
    """A file that has reached the session, handed to the pre-processing track."""

    kind: str
    source_path: Path
    dest_path: Path


def file_checksum(path: Path) -> str:
    """BLAKE2b hex digest of a file's content."""
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_verified(src: Path, dst: Path) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` through ``dst.partial``, fsynced and verified.

    Returns
    -------
    bytes, checksum
        Size and BLAKE2b digest of the verified copy.

    Raises
    ------
    OSError
        When the copy does not match the source (size or checksum); ``dst`` is not created.
    """
    partial = dst.with_name(dst.name + ".partial")
    h = hashlib.blake2b(digest_size=32)
    with open(src, "rb") as fin, open(partial, "wb") as fout:
        while chunk := fin.read(CHUNK_BYTES):
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    digest = h.hexdigest()
    size = src.stat().st_size
    if partial.stat().st_size != size or file_checksum(partial) != digest:
        partial.unlink(missing_ok=True)
        raise OSError(f"copy of {src} to {dst} does not match the source (size or checksum); the source is kept")
    os.replace(partial, dst)
    _fsync_dir(dst.parent)
    return size, digest


class TransferTrack:
    """Watch the raw-data location and bring complete files into the session.

    Parameters
    ----------
    store
        The database.
    session_id
        The session's id.
    settings
        The session's settings (location, frame pattern, method, stability time).
    layout
        The session's folders.
    on_file
        Called with each file once it is in the session (and again for an mdoc that changed).
    log
        ``log(message, level)`` for the track's persistent log.
    """

    def __init__(self, store: Store, session_id: int, settings: SessionSettings, layout: SessionLayout,
                 *, on_file: Callable[[TransferredFile], None], log: Callable[..., None]) -> None:
        if settings.raw_data.location is None:
            raise ValueError("raw_data.location is not set: set it to the folder the microscope writes into")
        self.store = store
        self.session_id = session_id
        self.settings = settings
        self.layout = layout
        self.location = Path(settings.raw_data.location)
        self.method = TransferMethod(settings.collection.transfer_method)
        self.pattern = compile_frame_pattern(settings.raw_data.frame_pattern)
        self.on_file = on_file
        self.log = log
        self._seen: dict[Path, tuple[int, float, float]] = {}
        self._mdoc_stamps: dict[Path, tuple[int, float]] = {}
        self._mdoc_frames: set[str] = set()
        self._wake = threading.Event()
        self._bytes_total = 0
        self._last_sample = (time.monotonic(), 0)

    # ---- classification -----------------------------------------------------------
    def classify(self, path: Path) -> str | None:
        """``"movie"``, ``"mdoc"``, ``"gain"`` or None (not ours) for a file in the location."""
        name = path.name
        if name.endswith(".partial"):
            return None
        gain = self.settings.gain_reference.path
        if gain is not None and path.resolve() == Path(gain).resolve():
            return "gain"
        if name.lower().endswith(".mdoc"):
            return "mdoc"
        if path.suffix.lower() in MOVIE_SUFFIXES and self.pattern.match(name):
            return "movie"
        return None

    def _candidates(self) -> list[Path]:
        if not self.location.is_dir():
            raise FileNotFoundError(
                f"raw-data location {self.location} does not exist: create it or fix raw_data.location"
            )
        found = [p for p in self.location.rglob("*") if p.is_file() and self.classify(p)]
        gain = self.settings.gain_reference.path
        if gain is not None and Path(gain).is_file() and Path(gain) not in found:
            found.append(Path(gain))
        return found

    # ---- main loop ----------------------------------------------------------------
    def wake(self) -> None:
        """Ask for a scan now (called by filesystem events)."""
        self._wake.set()

    def run(self, stop: threading.Event, *, poll_s: float = 0.5) -> None:
        """Scan until ``stop`` is set; filesystem events wake the loop early."""
        observer = self._start_observer()
        try:
            self.recover()
            while not stop.is_set():
                self.scan()
                self._wake.wait(timeout=poll_s)
                self._wake.clear()
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)

    def _start_observer(self):
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:  # polling alone still works
            return None
        track = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                track.wake()

        observer = Observer()
        observer.schedule(_Handler(), str(self.location), recursive=True)
        observer.daemon = True
        observer.start()
        return observer

    def scan(self) -> int:
        """One pass over the location: transfer every file that is complete.

        Returns
        -------
        int
            Files transferred in this pass.
        """
        now = time.monotonic()
        done = 0
        paths = self._candidates()
        order = {"gain": 0, "mdoc": 1, "movie": 2}  # gain and mdoc first: movies need them
        for path in sorted(paths, key=lambda p: (order[self.classify(p)], p.name)):
            kind = self.classify(path)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if kind == "mdoc":
                done += self._sync_mdoc(path, st)
                continue
            row = self._row(path)
            if row is not None and row.state == TransferState.finished.value:
                continue
            size, mtime, since = self._seen.get(path, (-1, -1.0, now))
            if (st.st_size, st.st_mtime) != (size, mtime):
                self._seen[path] = (st.st_size, st.st_mtime, now)
                since = now
            stable = now - since >= self.settings.collection.file_stable_s
            listed = path.name in self._mdoc_frames and st.st_size > 0
            if st.st_size > 0 and (stable or listed):
                if self.transfer(path, kind):
                    done += 1
        self._sample()
        return done

    def _sync_mdoc(self, path: Path, st: os.stat_result) -> int:
        stamp = (st.st_size, st.st_mtime)
        if self._mdoc_stamps.get(path) == stamp:
            return 0
        dest = self.layout.raw_dir / path.name
        try:
            size, _ = copy_verified(path, dest)
        except OSError as exc:
            self.log(f"mdoc {path} not copied yet: {exc}", "WARNING")
            return 0
        self._mdoc_stamps[path] = stamp
        try:
            self._mdoc_frames.update(n for n in read_mdoc(dest).frame_names if n)
        except ValueError as exc:
            self.log(f"mdoc {path} unreadable: {exc}", "WARNING")
        self._bytes_total += size
        self.on_file(TransferredFile("mdoc", path, dest))
        return 1

    def _row(self, path: Path) -> RawFile | None:
        with self.store.db() as db:
            return db.scalar(select(RawFile).where(RawFile.session_id == self.session_id,
                                                   RawFile.source_path == str(path)))

    # ---- one file -----------------------------------------------------------------
    def transfer(self, src: Path, kind: str) -> bool:
        """Move, copy or link one complete file into ``SESSION/raw/`` and record it.

        Returns
        -------
        bool
            True when the file is now in the session.
        """
        dest = self.layout.raw_dir / src.name
        t0 = time.monotonic()
        with self.store.db() as db:
            row = db.scalar(select(RawFile).where(RawFile.session_id == self.session_id,
                                                  RawFile.source_path == str(src)))
            if row is None:
                row = RawFile(session_id=self.session_id, source_path=str(src), dest_path=str(dest), kind=kind)
                db.add(row)
            row.state = TransferState.transferring.value
            row.started_at = utcnow()
            row.error = ""
            db.commit()
            method = self.method if kind == "movie" else TransferMethod.copy
            try:
                if method is TransferMethod.link:
                    if dest.is_symlink() or dest.exists():
                        dest.unlink()
                    dest.symlink_to(src.resolve())
                    size, digest = src.stat().st_size, ""
                else:
                    size, digest = copy_verified(src, dest)
            except OSError as exc:
                row.state = TransferState.failed.value
                row.error = str(exc)
                db.commit()
                self.log(f"transfer of {src} failed: {exc}", "ERROR")
                return False
            row.bytes, row.checksum = size, digest
            row.state = TransferState.verified.value
            db.commit()
            if method is TransferMethod.move:
                src.unlink()
            row.state = TransferState.finished.value
            row.seconds = time.monotonic() - t0
            row.finished_at = utcnow()
            db.commit()
        self._bytes_total += size
        self.log(f"{method.value} {src.name} ({size / 1e6:.1f} MB in {time.monotonic() - t0:.2f} s)")
        self.on_file(TransferredFile(kind, src, dest))
        return True

    def recover(self) -> None:
        """Finish or redo transfers a crash interrupted (see the module docstring)."""
        with self.store.db() as db:
            rows = db.scalars(select(RawFile).where(
                RawFile.session_id == self.session_id,
                RawFile.state.in_([TransferState.transferring.value, TransferState.verified.value]))).all()
            for row in rows:
                src, dest = Path(row.source_path), Path(row.dest_path)
                dest.with_name(dest.name + ".partial").unlink(missing_ok=True)
                verified = row.state == TransferState.verified.value
                if not verified and dest.is_file() and src.is_file() and not dest.is_symlink():
                    verified = file_checksum(src) == file_checksum(dest)  # renamed, not yet recorded
                if verified and dest.is_file():
                    if self.method is TransferMethod.move and row.kind == "movie" and src.exists():
                        src.unlink()
                    row.state = TransferState.finished.value
                    row.finished_at = utcnow()
                    self.log(f"recovered {dest.name}: verified copy kept, transfer finished")
                    db.commit()
                    self.on_file(TransferredFile(row.kind, src, dest))
                else:
                    row.state = TransferState.waiting.value
                    db.commit()
                    self.log(f"recovered {src.name}: interrupted copy discarded, will transfer again")

    def _sample(self) -> None:
        t, b = self._last_sample
        now = time.monotonic()
        if now - t < 1.0:
            return
        usage = shutil.disk_usage(self.layout.root)
        speed = (self._bytes_total - b) / (now - t) / 1e6
        with self.store.db() as db:
            db.add(TransferSample(session_id=self.session_id, bytes_total=self._bytes_total, speed_mb_per_s=speed,
                                  disk_total_bytes=usage.total, disk_used_bytes=usage.used,
                                  disk_free_bytes=usage.free))
            db.commit()
        self._last_sample = (now, self._bytes_total)
