"""``tomodask serve``: one coordinator process for every session of a data root.

It carries out Start/Stop/Restart/Clear requests pressed in the CLI, the API or the
dashboard, and resumes, after a crash or a reboot, the tracks that were running. Its process
id is kept in ``DATA_ROOT/coordinator.pid`` so other processes send it their requests.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from sqlalchemy import select

from tomodask.session.runner import SessionRunner
from tomodask.session.store import ControlRequest, SessionRow, Store, TrackRow, TrackStatus

ACTIVE = (TrackStatus.starting.value, TrackStatus.running.value, TrackStatus.stopping.value)


def pid_alive(pid: int | None) -> bool:
    """True when a process with this id exists."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def coordinator_pid(data_root: Path) -> int | None:
    """The process id of the live ``tomodask serve`` of a data root, if any."""
    try:
        pid = int((Path(data_root) / "coordinator.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid_alive(pid) else None


class Coordinator:
    """Run every session of a data root that is started, in this process.

    Parameters
    ----------
    store
        The data root's database.
    profile
        Cluster profile for the sessions' pre-processing.
    """

    def __init__(self, store: Store, *, profile: str = "local") -> None:
        self.store = store
        self.profile = profile
        self.runners: dict[int, SessionRunner] = {}

    def step(self) -> None:
        """Adopt sessions with pending requests or orphaned running tracks; release idle ones."""
        me = os.getpid()
        with self.store.db() as db:
            wanted = set(db.scalars(select(ControlRequest.session_id).where(ControlRequest.handled_at.is_(None))))
            orphans: dict[int, list[str]] = {}
            for row in db.scalars(select(TrackRow).where(TrackRow.status.in_(ACTIVE))).all():
                if row.pid != me and not pid_alive(row.pid):
                    orphans.setdefault(row.session_id, []).append(row.track)
            names = dict(db.execute(select(SessionRow.id, SessionRow.name)).all())
        for sid in wanted | set(orphans):
            if sid not in self.runners and sid in names:
                self.runners[sid] = SessionRunner(self.store, names[sid], profile=self.profile)
            for track in orphans.get(sid, []):
                self.runners[sid].log(track, f"resuming the {track} track after its process ended")
                self.runners[sid].start(track)
        for sid, runner in list(self.runners.items()):
            if sid not in wanted and not any(runner.running(t) for t in ("transfer", "preprocess")):
                runner.close()
                del self.runners[sid]

    def run(self, stop: threading.Event, *, poll_s: float = 1.0) -> None:
        """Serve until ``stop`` is set, then stop every track this process runs."""
        pid_file = self.store.data_root / "coordinator.pid"
        pid_file.write_text(str(os.getpid()))
        try:
            while not stop.is_set():
                self.step()
                stop.wait(poll_s)
        finally:
            for runner in self.runners.values():
                runner.close()
            self.runners.clear()
            pid_file.unlink(missing_ok=True)
