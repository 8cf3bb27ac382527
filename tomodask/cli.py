"""The ``tomodask`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tomodask._version import __version__

app = typer.Typer(
    name="tomodask",
    help="On-the-fly pre-processing of cryo-electron tomography on Dask.\n\n"
    "Watch a microscope folder, transfer movies, align frames, estimate CTF, align tilt-series, "
    "reconstruct tomograms and pick particles while the data is being collected.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
settings_app = typer.Typer(help="Show and check session settings files.", no_args_is_help=True)
app.add_typer(settings_app, name="settings")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tomodask {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """On-the-fly pre-processing of cryo-electron tomography on Dask."""


@app.command()
def simulate(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the simulated microscope data into.")],
    tilt_series: Annotated[int, typer.Option(help="Number of tilt-series to acquire.")] = 2,
    size: Annotated[str, typer.Option(help="Acquisition size: tiny, small, 4k or k3.")] = "tiny",
    naming: Annotated[str, typer.Option(help="File naming: serialem or tomo5.")] = "serialem",
    seconds_per_tilt: Annotated[float, typer.Option(help="Streaming cadence; 0 writes as fast as possible.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same data).")] = 0,
    dark_tilt: Annotated[list[int] | None, typer.Option(help="Acquisition index to make dark (repeatable).")] = None,
) -> None:
    """Simulate a microscope session with known ground truth (movies, mdoc, gain, truth JSON)."""
    from tomodask.simulate.writer import write_session

    try:
        truths = write_session(out, n_tilt_series=tilt_series, size=size, seed=seed, naming=naming,
                               seconds_per_tilt=seconds_per_tilt, dark_tilts=tuple(dark_tilt or ()))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    for t in truths:
        typer.echo(f"wrote {t.stem} (truth: {t})")


@app.command()
def demo(
    data_root: Annotated[Path, typer.Option("--data-root", envvar="TOMODASK_DATA_ROOT",
                                            help="Where the demo session and its microscope folder go.")] = Path(
        "tomodask-data"),
    tilt_series: Annotated[int, typer.Option(help="Tilt-series to stream.")] = 2,
    size: Annotated[str, typer.Option(help="Acquisition size: tiny, small, 4k or k3.")] = "tiny",
    seconds_per_tilt: Annotated[float, typer.Option(help="Microscope cadence.")] = 0.5,
    transfer: Annotated[str, typer.Option(help="Raw data transfer: move, copy or link.")] = "move",
) -> None:
    """Stream a simulated microscope session while tomodask processes it, then report."""
    from tomodask.demo import run_demo

    report = run_demo(data_root, n_tilt_series=tilt_series, size=size, seconds_per_tilt=seconds_per_tilt,
                      transfer_method=transfer)
    typer.echo(f"session {report['session']} in {report['folder']}: {report['movies_done']}/{report['movies']} "
               f"movies and {report['tilt_series_done']}/{len(report['tilt_series'])} tilt-series processed")
    for name, r in report["tilt_series"].items():
        typer.echo(f"  {name}: {r['state']}; tilt axis {_fmt(r['tilt_axis_angle_deg'], '.2f')} deg (true "
                   f"{r['true_tilt_axis_angle_deg']:.2f}); mean residual {_fmt(r['mean_residual_px'], '.2f')} px; "
                   f"{r['n_picks']} picks ({r['true_particles']} particles simulated); median defocus error "
                   f"{_fmt(r['defocus_error_angstrom_median'], '.0f')} A; {_fmt(r['seconds'], '.1f')} s")
    if not report["ok"]:
        raise typer.Exit(1)


@app.command()
def serve(
    data_root: Annotated[Path | None, typer.Option("--data-root", envvar="TOMODASK_DATA_ROOT",
                                                   help="Data root whose sessions to run.")] = None,
    profile: Annotated[str, typer.Option(help="Cluster profile for pre-processing.")] = "local",
) -> None:
    """Run the coordinator service: carry out session controls and resume started sessions."""
    import signal
    import threading

    from tomodask.session.service import Coordinator
    from tomodask.session.store import Store

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        Coordinator(Store(data_root), profile=profile).run(stop)
    except KeyboardInterrupt:
        stop.set()


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


@settings_app.command("show")
def settings_show(
    path: Annotated[Path | None, typer.Argument(help="Settings file (YAML/JSON); default settings if omitted.")] = None,
) -> None:
    """Print settings as YAML (the defaults when no file is given)."""
    from tomodask.settings import SessionSettings, SettingsError

    try:
        s = SessionSettings.load(path) if path else SessionSettings()
    except SettingsError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(s.to_yaml())


@settings_app.command("check")
def settings_check(path: Annotated[Path, typer.Argument(help="Settings file (YAML/JSON).")]) -> None:
    """Validate a settings file; print one line per problem."""
    from tomodask.settings import SessionSettings, SettingsError

    try:
        SessionSettings.load(path)
    except SettingsError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{path}: valid")


def _mount_optional_apps() -> None:
    from tomodask.cli_session import session_app

    app.add_typer(session_app, name="session")
    try:
        from tomodask.cli_cluster import cluster_app
    except ImportError:
        return
    app.add_typer(cluster_app, name="cluster", help="Cluster profiles and SLURM job scripts.")


_mount_optional_apps()


if __name__ == "__main__":
    app()
