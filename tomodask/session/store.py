"""The state of record: an embedded SQLite database (WAL mode) under the data root.

One database holds every session of a data root: users and groups, sessions and their
settings, transferred files, movies, tilt-series, metrics, track states, control requests,
logs, saved filters and exports. Item states are explicit enums, never the presence of a
file. Large arrays live in zarr under each session folder (:mod:`tomodask.session.layout`).

Schema changes are migrations: :data:`MIGRATIONS` maps a version to the SQL that upgrades
the previous one, so opening an old database upgrades it in place and keeps its sessions.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

#: Environment variable that chooses the data root.
DATA_ROOT_ENV = "TOMODASK_DATA_ROOT"


def default_data_root() -> Path:
    """``$TOMODASK_DATA_ROOT``, else ``./tomodask-data`` in the working directory."""
    return Path(os.environ.get(DATA_ROOT_ENV) or Path.cwd() / "tomodask-data").resolve()


def utcnow() -> datetime:
    """Timezone-aware current time in UTC."""
    return datetime.now(UTC)


def as_utc(dt: datetime | None) -> datetime | None:
    """A stored time as timezone-aware UTC (SQLite hands datetimes back without a zone)."""
    return dt if dt is None or dt.tzinfo else dt.replace(tzinfo=UTC)


class TrackStatus(str, Enum):
    """Status of a session track."""

    stopped = "stopped"
    starting = "starting"
    running = "running"
    stopping = "stopping"
    failed = "failed"


class ItemState(str, Enum):
    """Processing state of a movie or a tilt-series."""

    waiting = "waiting"
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


class TransferState(str, Enum):
    """Transfer state of one raw file."""

    waiting = "waiting"
    transferring = "transferring"
    verified = "verified"
    finished = "finished"
    failed = "failed"


TRACKS = ("transfer", "preprocess")


class Base(DeclarativeBase):
    """Declarative base of the tomodask schema."""


class SchemaVersion(Base):
    """The schema version of this database (one row)."""

    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)


class Group(Base):
    """A group of users owning sessions."""

    __tablename__ = "groups"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)


class User(Base):
    """A user of the facility."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    group_id: Mapped[int | None] = mapped_column(ForeignKey("groups.id"))


class SessionRow(Base):
    """A tomography session."""

    __tablename__ = "sessions"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    group: Mapped[str] = mapped_column(String(100), default="default")
    owner: Mapped[str] = mapped_column(String(100), default="")
    folder: Mapped[str] = mapped_column(Text)
    settings_yaml: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TrackRow(Base):
    """Status of one track of one session, and the process running it."""

    __tablename__ = "tracks"
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True)
    track: Mapped[str] = mapped_column(String(20), primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default=TrackStatus.stopped.value)
    pid: Mapped[int | None] = mapped_column(Integer)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    message: Mapped[str] = mapped_column(Text, default="")


class ControlRequest(Base):
    """A Start/Stop/Restart/Clear press waiting for the coordinator to carry it out."""

    __tablename__ = "control_requests"
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    track: Mapped[str] = mapped_column(String(20))
    action: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    handled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class RawFile(Base):
    """One file seen in the raw-data location and its transfer."""

    __tablename__ = "raw_files"
    __table_args__ = (UniqueConstraint("session_id", "source_path"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    source_path: Mapped[str] = mapped_column(Text)
    dest_path: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(20), default=TransferState.waiting.value)
    bytes: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    checksum: Mapped[str] = mapped_column(String(64), default="")
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str] = mapped_column(Text, default="")


class TransferSample(Base):
    """Transfer speed and storage utilisation at one moment."""

    __tablename__ = "transfer_samples"
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    bytes_total: Mapped[int] = mapped_column(Integer)
    speed_mb_per_s: Mapped[float] = mapped_column(Float)
    disk_total_bytes: Mapped[int] = mapped_column(Integer)
    disk_used_bytes: Mapped[int] = mapped_column(Integer)
    disk_free_bytes: Mapped[int] = mapped_column(Integer)


class MovieRow(Base):
    """One movie (one tilt) and its per-movie processing."""

    __tablename__ = "movies"
    __table_args__ = (UniqueConstraint("session_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    tilt_series: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(300))
    acquisition_index: Mapped[int | None] = mapped_column(Integer)
    tilt_angle_deg: Mapped[float | None] = mapped_column(Float)
    raw_path: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(20), default=ItemState.waiting.value)
    settings_hash: Mapped[str] = mapped_column(String(32), default="")
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    error: Mapped[str] = mapped_column(Text, default="")
    traceback: Mapped[str] = mapped_column(Text, default="")
    arrived_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TiltSeriesRow(Base):
    """One tilt-series and its per-tilt-series processing."""

    __tablename__ = "tilt_series"
    __table_args__ = (UniqueConstraint("session_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    mdoc_path: Mapped[str] = mapped_column(Text, default="")
    n_tilts_expected: Mapped[int] = mapped_column(Integer, default=0)
    complete_reason: Mapped[str] = mapped_column(String(40), default="")
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    flag_reason: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[str] = mapped_column(String(20), default=ItemState.waiting.value)
    settings_hash: Mapped[str] = mapped_column(String(32), default="")
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    error: Mapped[str] = mapped_column(Text, default="")
    traceback: Mapped[str] = mapped_column(Text, default="")
    last_tilt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class LogRow(Base):
    """One log line of one track."""

    __tablename__ = "logs"
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    track: Mapped[str] = mapped_column(String(20))
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    level: Mapped[str] = mapped_column(String(10), default="INFO")
    message: Mapped[str] = mapped_column(Text)


class SavedFilter(Base):
    """A named filter over tilt-series metrics."""

    __tablename__ = "filters"
    __table_args__ = (UniqueConstraint("session_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    criteria: Mapped[dict] = mapped_column(JSON, default=dict)


class ExportRow(Base):
    """An export job (STAR, IMOD, MRC, OME-Zarr) of a filtered set of tilt-series."""

    __tablename__ = "exports"
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    filter_name: Mapped[str] = mapped_column(String(100), default="")
    state: Mapped[str] = mapped_column(String(20), default=ItemState.waiting.value)
    path: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


#: SQL that upgrades a database from version ``v - 1`` to ``v``.
MIGRATIONS: dict[int, list[str]] = {
    2: ["ALTER TABLE tilt_series ADD COLUMN flag_reason TEXT NOT NULL DEFAULT ''"],
}
#: The schema version this code writes.
SCHEMA_VERSION = 2


class Store:
    """Open (creating or upgrading) the database of a data root.

    Parameters
    ----------
    data_root
        Folder holding ``tomodask.sqlite`` and, by default, the session folders.
    """

    def __init__(self, data_root: str | Path | None = None) -> None:
        self.data_root = Path(data_root).resolve() if data_root else default_data_root()
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.path = self.data_root / "tomodask.sqlite"
        self.engine = create_engine(f"sqlite:///{self.path}", connect_args={"timeout": 60})
        event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessionmaker = sessionmaker(self.engine, expire_on_commit=False)
        self._migrate()

    def _migrate(self) -> None:
        with self.engine.begin() as conn:
            has_version = conn.execute(
                text("SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'")
            ).first()
            if not has_version:
                Base.metadata.create_all(conn)
                conn.execute(text("INSERT INTO schema_version (version) VALUES (:v)"), {"v": SCHEMA_VERSION})
                return
            version = conn.execute(text("SELECT max(version) FROM schema_version")).scalar_one()
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} was written by a newer tomodask (schema {version} > {SCHEMA_VERSION}); "
                    "upgrade tomodask to open it"
                )
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for stmt in MIGRATIONS[v]:
                    conn.execute(text(stmt))
                conn.execute(text("UPDATE schema_version SET version = :v"), {"v": v})
            Base.metadata.create_all(conn)  # tables added since (CREATE IF NOT EXISTS)

    def schema_version(self) -> int:
        """The database's schema version."""
        with self.engine.connect() as conn:
            return int(conn.execute(text("SELECT max(version) FROM schema_version")).scalar_one())

    def db(self) -> Session:
        """A new ORM session (use as a context manager; commit explicitly)."""
        return self._sessionmaker()

    def ensure_user(self, name: str, group: str) -> None:
        """Record a user and their group (created when new; an existing user keeps theirs)."""
        with self.db() as db:
            g = db.scalar(select(Group).where(Group.name == group))
            if g is None:
                g = Group(name=group)
                db.add(g)
                db.flush()
            if db.scalar(select(User).where(User.name == name)) is None:
                db.add(User(name=name, group_id=g.id))
            db.commit()

    def users(self) -> dict[str, str]:
        """Every user and the name of their group."""
        with self.db() as db:
            rows = db.execute(select(User.name, Group.name).join(Group, User.group_id == Group.id, isouter=True)).all()
        return {u: g for u, g in rows}

    def log(self, session_id: int, track: str, message: str, *, level: str = "INFO") -> None:
        """Append one line to a track's persistent log."""
        with self.db() as db:
            db.add(LogRow(session_id=session_id, track=track, message=message, level=level))
            db.commit()

    def logs(self, session_id: int, track: str | None = None, *, limit: int = 1000) -> list[LogRow]:
        """The newest ``limit`` log lines of a session (one track or all), oldest first."""
        with self.db() as db:
            q = select(LogRow).where(LogRow.session_id == session_id)
            if track:
                q = q.where(LogRow.track == track)
            rows = db.scalars(q.order_by(LogRow.id.desc()).limit(limit)).all()
        return list(reversed(rows))


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.close()


def dumps_metrics(metrics: dict) -> dict:
    """Make a metrics record JSON-safe (numpy scalars and arrays become Python values)."""
    return json.loads(json.dumps(metrics, default=_json_default))


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Enum):
        return obj.value
    raise TypeError(f"cannot store {type(obj).__name__} in metrics")
