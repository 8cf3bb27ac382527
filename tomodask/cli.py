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
