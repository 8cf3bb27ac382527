"""``tomodask session ...`` and ``tomodask demo``: sessions from the command line."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from tomodask.settings import SessionSettings, SettingsError

session_app = typer.Typer(help="Create, run, steer and inspect tomography sessions.", no_args_is_help=True)

DataRoot = Annotated[
    Path | None,
    typer.Option("--data-root", envvar="TOMODASK_DATA_ROOT",
                 help="Folder with the database and sessions (default ./tomodask-data)."),
]
Track = Annotated[str, typer.Option("--track", help="transfer, preprocess or all.")]


def _open(name: str, data_root: Path | None):
    from tomodask.session.api import open_session

    try:
        return open_session(name, data_root=data_root)
    except KeyError as exc:
        typer.echo(str(exc.args[0]), err=True)
        raise typer.Exit(2) from None


@session_app.command("create")
def create(
    settings_file: Annotated[Path, typer.Argument(help="Settings (YAML or JSON); `tomodask settings show` prints a template.")],
    name: Annotated[str | None, typer.Option(help="Session name (overrides the file's session.name).")] = None,
    owner: Annotated[str | None, typer.Option(help="Owner (default: your login name).")] = None,
    group: Annotated[str | None, typer.Option(help="Group (default: the settings' session.group).")] = None,
    data_root: DataRoot = None,
) -> None:
    """Create a session from a settings file."""
    from tomodask.session.api import create_session

    try:
        s = SessionSettings.load(settings_file)
        if name:
            s.session.name = name
        session = create_session(s, data_root=data_root, owner=owner, group=group)
    except (SettingsError, ValueError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"created session {session.name} in {session.layout.root}")


@session_app.command("list")
def list_(data_root: DataRoot = None) -> None:
    """List sessions with the status of their tracks."""
    from tomodask.session.api import list_sessions, open_session

    for name in list_sessions(data_root=data_root):
        st = open_session(name, data_root=data_root).status()
        typer.echo(f"{name:30s} transfer={st['transfer']:9s} preprocess={st['preprocess']}")


@session_app.command("show")
def show(name: str, data_root: DataRoot = None) -> None:
    """Show a session's status, progress and tilt-series."""
    s = _open(name, data_root)
    typer.echo(repr(s))
    typer.echo(" ".join(f"{k}={v}" for k, v in s.progress().items()))
    ts = s.tilt_series()
    if len(ts):
        cols = [c for c in ("name", "state", "complete_reason", "n_tilts_used", "tilt_axis_angle_deg",
                            "mean_residual_px", "n_picks", "error") if c in ts]
        typer.echo(ts[cols].to_string(index=False))


def _control(action: str, name: str, track: str, data_root: Path | None) -> None:
    s = _open(name, data_root)
    try:
        getattr(s, action)(track)
    except (RuntimeError, ValueError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


@session_app.command("start")
def start(name: str, track: Track = "all", data_root: DataRoot = None,
          profile: Annotated[str, typer.Option(help="Cluster profile.")] = "local") -> None:
    """Start tracks; the session then runs in a background process until stopped."""
    from tomodask.session.service import coordinator_pid

    s = _open(name, data_root)
    if s._remote() or coordinator_pid(s.store.data_root):
        s.send_control("start", track)
        typer.echo(f"start {track} sent to the coordinator of {name}")
        return
    env = dict(os.environ, TOMODASK_DATA_ROOT=str(s.store.data_root))
    log = s.layout.root / "coordinator.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "tomodask.cli", "session", "serve", name, "--track", track,
                                 "--profile", profile], env=env, stdout=fh, stderr=fh, start_new_session=True)
    typer.echo(f"session {name} started in process {proc.pid} (output in {log})")


@session_app.command("serve")
def serve(name: str, track: Track = "all", data_root: DataRoot = None,
          profile: Annotated[str, typer.Option(help="Cluster profile.")] = "local") -> None:
    """Run a session in this process until its tracks are stopped (used by `start`, systemd)."""
    s = _open(name, data_root)
    s.use_cluster(profile)
    s.start(track)
    stopped = threading.Event()
    try:
        while not stopped.wait(1.0):
            if not any(s.runner.running(t) for t in ("transfer", "preprocess")):
                stopped.set()
    except KeyboardInterrupt:
        pass
    finally:
        s.close()


@session_app.command("stop")
def stop(name: str, track: Track = "all", data_root: DataRoot = None) -> None:
    """Stop tracks: queued and running work is cancelled."""
    _control("stop", name, track, data_root)
    typer.echo(f"stop {track} requested for {name}")


@session_app.command("restart")
def restart(name: str, track: Track = "all", data_root: DataRoot = None) -> None:
    """Restart tracks (applies changed settings)."""
    _control("restart", name, track, data_root)
    typer.echo(f"restart {track} requested for {name}")


@session_app.command("clear")
def clear(name: str, track: Track = "all", data_root: DataRoot = None) -> None:
    """Delete a track's results and records; raw data stays."""
    _control("clear", name, track, data_root)
    typer.echo(f"cleared {track} of {name}")


@session_app.command("copy")
def copy(name: str, new_name: str, data_root: DataRoot = None) -> None:
    """Create a new session with the same settings and no data."""
    s = _open(name, data_root)
    try:
        c = s.copy(new_name)
    except (SettingsError, ValueError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"created session {c.name} with the settings of {name}")


@session_app.command("delete")
def delete(name: str, data_root: DataRoot = None) -> None:
    """Delete a session, its files and records (refused while it runs)."""
    s = _open(name, data_root)
    try:
        s.delete()
    except RuntimeError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"deleted session {name}")


@session_app.command("logs")
def logs(name: str, track: Annotated[str | None, typer.Option(help="transfer or preprocess (default both).")] = None,
         lines: Annotated[int, typer.Option(help="How many of the newest lines.")] = 200,
         data_root: DataRoot = None) -> None:
    """Print a session's persistent logs."""
    s = _open(name, data_root)
    for line in s.logs(track, limit=lines):
        typer.echo(line)


@session_app.command("run")
def run(name: str, data_root: DataRoot = None,
        tilt_series: Annotated[int | None, typer.Option(help="Stop after this many tilt-series are processed.")] = None,
        timeout_s: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 3600.0,
        idle_s: Annotated[float, typer.Option(help="Without --tilt-series: stop when nothing arrived this long.")] = 30.0,
        profile: Annotated[str, typer.Option(help="Cluster profile.")] = "local") -> None:
    """Run both tracks until every expected tilt-series is processed; exit 1 if anything failed."""
    s = _open(name, data_root)
    s.use_cluster(profile)
    ok = s.run(expected_tilt_series=tilt_series, timeout_s=timeout_s, idle_s=idle_s)
    p = s.progress()
    typer.echo(" ".join(f"{k}={v}" for k, v in p.items()))
    if not ok:
        typer.echo(f"session {name}: not everything was processed; see `tomodask session logs {name}`", err=True)
        raise typer.Exit(1)
