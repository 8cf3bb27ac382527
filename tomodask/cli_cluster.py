"""``tomodask cluster ...``: inspect cluster profiles and the SLURM job scripts they submit.

Mounted by :mod:`tomodask.cli` as ``app.add_typer(cluster_app, name="cluster")``.
"""

from __future__ import annotations

from typing import Annotated

import typer
import yaml

from tomodask.cluster import profile_config, profile_names, show_job_script
from tomodask.settings import ResourceSettings

cluster_app = typer.Typer(
    help="Cluster profiles (local, local-gpu, slurm-cpu, slurm-gpu, address) from dask.config.",
    no_args_is_help=True,
)


@cluster_app.command("profiles")
def profiles_command(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show every setting of each profile.")] = False,
) -> None:
    """List the cluster profiles and their kinds (override them in ~/.config/dask/tomodask.yaml)."""
    for name in profile_names():
        cfg = profile_config(name)
        typer.echo(f"{name}\t{cfg['kind']}")
        if verbose:
            body = {k: v for k, v in cfg.items() if k != "kind"}
            typer.echo("    " + yaml.safe_dump(body, sort_keys=False).rstrip().replace("\n", "\n    "))


@cluster_app.command("show-job-script")
def show_job_script_command(
    profile: Annotated[str, typer.Option("--profile", "-p", help="A SLURM profile.")] = "slurm-cpu",
    threads_per_task: Annotated[int, typer.Option(min=1, help="Threads of each task.")] = ResourceSettings().threads_per_task,
    memory_per_task_gb: Annotated[
        float, typer.Option(help="Memory of each task in GiB.")
    ] = ResourceSettings().memory_per_task_gb,
    gpus_per_task: Annotated[int, typer.Option(min=0, help="GPUs of each task.")] = ResourceSettings().gpus_per_task,
) -> None:
    """Print the batch script a SLURM profile submits for each worker (nothing is submitted)."""
    try:
        resources = ResourceSettings(threads_per_task=threads_per_task, memory_per_task_gb=memory_per_task_gb,
                                     gpus_per_task=gpus_per_task)
        typer.echo(show_job_script(profile, resources=resources))
    except (ValueError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
