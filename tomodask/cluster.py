"""Dask clusters for tomodask: on this machine, on its GPUs, on SLURM, or an existing scheduler.

One call, :func:`start_cluster`, turns a *profile* and the session's
:class:`~tomodask.settings.ResourceSettings` into a running cluster with a connected
:class:`distributed.Client`, wrapped in a :class:`ClusterHandle`.

Profiles live in ``dask.config`` under ``tomodask.cluster.profiles``. Their defaults ship in
``tomodask/tomodask.yaml`` and are loaded when this module is imported (as dask-jobqueue does
with ``jobqueue.yaml``), so ``~/.config/dask/*.yaml`` files and ``DASK_TOMODASK__...``
environment variables override them without code changes. Each profile has a ``kind``:

``local``
    :class:`distributed.LocalCluster` sized to the machine.
``local-cuda``
    ``dask_cuda.LocalCUDACluster`` (extra ``tomodask[gpu]``), one worker per GPU, each offering
    the worker resource ``GPU=1``.
``slurm``
    :class:`dask_jobqueue.SLURMCluster`, one job per worker, started and stopped adaptively.
``address``
    A client connected to a scheduler started elsewhere.

How per-task resources map onto workers
---------------------------------------
A worker is sized to ``tasks-per-worker`` tasks (profile key, default 1), each task needing
``threads_per_task`` threads, ``memory_per_task_gb`` GiB and ``gpus_per_task`` GPUs:

* worker threads = ``threads_per_task * tasks_per_worker`` (jobqueue ``cores``, LocalCluster
  ``threads_per_worker``);
* worker memory = ``memory_per_task_gb * tasks_per_worker`` GiB (jobqueue ``memory`` and
  ``#SBATCH --mem`` in MiB, LocalCluster ``memory_limit``); ``_gb`` means GiB, as in SLURM's
  ``--mem=4G``;
* GPUs per SLURM job: the profile's ``gpus-per-worker`` (``#SBATCH --gres=gpu:N``);
* Dask worker resources ``{"threads": ..., "memory_gb": ..., "GPU": ...}`` with those totals.

Tasks are annotated with :func:`task_resources`, so the scheduler never puts more tasks on a
worker than its threads, memory and GPUs allow, and GPU steps run only on workers offering
``GPU``.
"""

from __future__ import annotations

import getpass
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

import dask.config
import yaml
from distributed import Client, WorkerPlugin

from tomodask.settings import ResourceSettings

logger = logging.getLogger(__name__)

__all__ = [
    "PROFILE_KINDS",
    "ClusterError",
    "ClusterHandle",
    "profile_config",
    "profile_names",
    "show_job_script",
    "start_cluster",
    "task_resources",
    "worker_resources",
]

#: Accepted values of a profile's ``kind``.
PROFILE_KINDS = ("local", "local-cuda", "slurm", "address")

#: Script that installs and starts a single-node SLURM (relative to the repository root).
SLURM_SETUP_SCRIPT = "deploy/slurm-single-node.sh"

_DEFAULTS_FILE = Path(__file__).with_name("tomodask.yaml")
with _DEFAULTS_FILE.open() as _f:
    dask.config.update_defaults(yaml.safe_load(_f))
del _f

_GIB = 2**30
_MIB = 2**20


class ClusterError(RuntimeError):
    """A cluster could not be started or used; the message says what to do about it."""


# ---- configuration ------------------------------------------------------------------------
def _canon(name: object) -> str:
    """Config keys and profile names compare with ``_`` and ``-`` as the same character."""
    return str(name).replace("_", "-").lower()


def _cluster_option(name: str) -> Any:
    return dask.config.get(f"tomodask.cluster.{name}")


def profile_names() -> list[str]:
    """Names of the cluster profiles in ``dask.config`` (shipped defaults and user overrides)."""
    profiles = dask.config.get("tomodask.cluster.profiles", default={}) or {}
    return list(dict.fromkeys(_canon(k) for k in profiles))


def profile_config(profile: str) -> dict[str, Any]:
    """The settings of one profile, with dashed keys (``tasks-per-worker``).

    Parameters
    ----------
    profile
        A profile name from :func:`profile_names`; ``_`` and ``-`` are interchangeable.

    Raises
    ------
    ValueError
        Unknown profile (the message lists the known ones) or unknown ``kind``.
    """
    profiles = dask.config.get("tomodask.cluster.profiles", default={}) or {}
    merged: dict[str, Any] = {}
    found = False
    for name, cfg in profiles.items():
        if _canon(name) == _canon(profile):
            found = True
            merged.update({_canon(k): v for k, v in (cfg or {}).items()})
    if not found:
        raise ValueError(
            f"unknown cluster profile {profile!r}; known profiles: {', '.join(profile_names())}. "
            "Add your own under tomodask.cluster.profiles in ~/.config/dask/tomodask.yaml."
        )
    kind = merged.get("kind")
    if kind not in PROFILE_KINDS:
        raise ValueError(
            f"cluster profile {profile!r} has kind {kind!r}; accepted kinds: {', '.join(PROFILE_KINDS)}"
        )
    return merged


def _positive_int(cfg: dict[str, Any], key: str, profile: str, *, minimum: int = 1) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"cluster profile {profile!r}: {key} must be an integer >= {minimum} (got {value!r})")
    return value


# ---- resources ----------------------------------------------------------------------------
def worker_resources(
    resources: ResourceSettings, *, tasks_per_worker: int = 1, gpus_per_worker: int = 0
) -> dict[str, float]:
    """Dask worker resources of a worker sized to ``tasks_per_worker`` tasks.

    Parameters
    ----------
    resources
        Per-task threads, memory (GiB) and GPUs.
    tasks_per_worker
        How many such tasks one worker runs at once.
    gpus_per_worker
        GPUs the worker owns (its ``GPU`` resource).

    Returns
    -------
    dict
        ``{"threads": ..., "memory_gb": ..., "GPU": ...}``, totals for the worker.
    """
    return {
        "threads": float(resources.threads_per_task * tasks_per_worker),
        "memory_gb": float(resources.memory_per_task_gb * tasks_per_worker),
        "GPU": float(gpus_per_worker),
    }


def task_resources(resources: ResourceSettings, *, gpu_step: bool) -> dict[str, float]:
    """Resource annotation of one task, for ``dask.annotate(resources=...)`` or ``submit``.

    Parameters
    ----------
    resources
        Per-task threads, memory (GiB) and GPUs.
    gpu_step
        True for steps with a GPU implementation (frame alignment, CTF, reconstruction...).
        They ask for ``gpus_per_task`` GPUs, so they go only to workers offering ``GPU``; with
        ``gpus_per_task == 0`` they run on CPU workers like every other step.

    Returns
    -------
    dict
        ``{"threads": ..., "memory_gb": ...}`` plus ``"GPU"`` for GPU steps that use GPUs.
    """
    out = {"threads": float(resources.threads_per_task), "memory_gb": float(resources.memory_per_task_gb)}
    if gpu_step and resources.gpus_per_task > 0:
        out["GPU"] = float(resources.gpus_per_task)
    return out


def _gpu_profiles() -> list[str]:
    out = []
    for name in profile_names():
        cfg = profile_config(name)
        if cfg["kind"] == "local-cuda" or (cfg["kind"] == "slurm" and (cfg.get("gpus-per-worker") or 0) > 0):
            out.append(name)
    return out


def _check_gpu_request(profile: str, resources: ResourceSettings, gpus_per_worker: int) -> None:
    if resources.gpus_per_task > gpus_per_worker:
        raise ClusterError(
            f"gpus_per_task={resources.gpus_per_task} but workers of profile {profile!r} have "
            f"{gpus_per_worker} GPU(s), so GPU steps would wait forever. Use a GPU profile "
            f"({', '.join(_gpu_profiles()) or 'none configured'}), raise the profile's gpus-per-worker, "
            "or set gpus_per_task=0 to run every step on CPUs."
        )


# ---- SLURM --------------------------------------------------------------------------------
def _require_slurm() -> None:
    if shutil.which("sbatch") is None:
        raise ClusterError(
            "SLURM profiles need the SLURM client commands (sbatch, squeue, scancel, sinfo), and "
            "`sbatch` is not on PATH. On a SLURM cluster, run tomodask on a login node (or `module "
            "load slurm`); on a single machine, install and start SLURM as root with "
            f"{SLURM_SETUP_SCRIPT} (see deploy/README.md), then export SLURM_CONF as it prints."
        )


def _run_slurm(args: list[str], *, timeout_s: float = 30.0) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise ClusterError(
            f"`{shlex.join(args)}` did not answer within {timeout_s:.0f} s: is slurmctld running? "
            "Check `scontrol ping` and SLURM_CONF."
        ) from None
    if proc.returncode != 0:
        raise ClusterError(
            f"`{shlex.join(args)}` failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}. "
            f"Is slurmctld running (`scontrol ping`) and SLURM_CONF set? On a single machine, "
            f"{SLURM_SETUP_SCRIPT} starts it."
        )
    return proc.stdout


def _slurm_partition_limits(queue: str | None) -> dict[str, Any] | None:
    """Largest node memory (MiB), CPUs and GPUs of a partition, from ``sinfo``/``scontrol``."""
    rows = []
    for line in _run_slurm(["sinfo", "-h", "-N", "-o", "%P|%m|%c|%G"]).splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4:
            continue
        part, mem, cpus, gres = parts
        gpus = sum(int(n) for n in re.findall(r"gpu(?::[^:(,]+)?:(\d+)", gres))
        rows.append((part, int(re.match(r"\d+", mem).group()) if re.match(r"\d+", mem) else 0,
                     int(re.match(r"\d+", cpus).group()) if re.match(r"\d+", cpus) else 0, gpus))
    names = {p.rstrip("*") for p, *_ in rows}
    if queue is None:
        defaults = {p.rstrip("*") for p, *_ in rows if p.endswith("*")}
        if not defaults:
            return None
        queue = defaults.pop()
    elif queue not in names:
        raise ClusterError(
            f"SLURM partition {queue!r} does not exist; partitions: {', '.join(sorted(names)) or '(none)'}. "
            "Set the profile's queue key."
        )
    nodes = [r for r in rows if r[0].rstrip("*") == queue]
    limits = {
        "partition": queue,
        "memory_mib": max(r[1] for r in nodes),
        "cpus": max(r[2] for r in nodes),
        "gpus": max(r[3] for r in nodes),
    }
    text = _run_slurm(["scontrol", "show", "partition", "-o", queue])
    m = re.search(r"MaxMemPerNode=(\d+)", text)
    if m:
        limits["memory_mib"] = min(limits["memory_mib"], int(m.group(1)))
    return limits


def _slurm_plan(profile: str, cfg: dict[str, Any], resources: ResourceSettings) -> dict[str, Any]:
    """Job sizes, worker resources and SLURMCluster/SLURMJob keyword arguments of a profile."""
    k = _positive_int(cfg, "tasks-per-worker", profile)
    gpus = cfg.get("gpus-per-worker") or 0
    if not isinstance(gpus, int) or gpus < 0:
        raise ValueError(f"cluster profile {profile!r}: gpus-per-worker must be an integer >= 0 (got {gpus!r})")
    _check_gpu_request(profile, resources, gpus)
    cores = resources.threads_per_task * k
    memory_mib = math.ceil(resources.memory_per_task_gb * k * 1024)
    wres = worker_resources(resources, tasks_per_worker=k, gpus_per_worker=gpus)
    extra = list(cfg.get("job-extra-directives") or [])
    if gpus:
        extra.append(f"--gres=gpu:{gpus}")
    log_dir = cfg.get("log-directory")
    job_name = f"tomodask-{uuid.uuid4().hex[:8]}"
    job = {
        "cores": cores,
        "processes": 1,
        "memory": f"{memory_mib}MiB",
        "job_mem": f"{memory_mib}M",
        "queue": cfg.get("queue"),
        "account": cfg.get("account"),
        "walltime": cfg.get("walltime"),
        "job_name": job_name,
        "job_extra_directives": extra,
        "job_script_prologue": list(cfg.get("job-script-prologue") or []),
        "log_directory": str(Path(os.path.expandvars(log_dir)).expanduser()) if log_dir else None,
        "local_directory": cfg.get("local-directory"),
        "death_timeout": cfg.get("death-timeout"),
        "python": cfg.get("python"),
        "worker_extra_args": ["--resources", ",".join(f"{n}={v:g}" for n, v in wres.items())],
    }
    return {
        "tasks_per_worker": k,
        "cores": cores,
        "memory_mib": memory_mib,
        "gpus": gpus,
        "worker_resources": wres,
        "job_name": job_name,
        "job_kwargs": {key: v for key, v in job.items() if v is not None},
        "interface": cfg.get("interface"),
        "dashboard_address": cfg.get("dashboard-address"),
    }


def _check_slurm_fits(profile: str, plan: dict[str, Any], resources: ResourceSettings) -> None:
    limits = _slurm_partition_limits(plan["job_kwargs"].get("queue"))
    if limits is None:
        return
    k, part = plan["tasks_per_worker"], limits["partition"]
    if plan["memory_mib"] > limits["memory_mib"]:
        raise ClusterError(
            f"profile {profile!r} asks {plan['memory_mib']} MiB per SLURM job (memory_per_task_gb="
            f"{resources.memory_per_task_gb:g} x tasks-per-worker={k}), but nodes of partition {part!r} "
            f"offer at most {limits['memory_mib']} MiB (sinfo/scontrol show partition); sbatch would refuse "
            f"the job. Lower memory_per_task_gb to at most {limits['memory_mib'] / 1024 / k:.1f}, or choose "
            "a partition with bigger nodes (the profile's queue key)."
        )
    if plan["cores"] > limits["cpus"]:
        raise ClusterError(
            f"profile {profile!r} asks {plan['cores']} CPUs per SLURM job (threads_per_task="
            f"{resources.threads_per_task} x tasks-per-worker={k}), but nodes of partition {part!r} have at "
            f"most {limits['cpus']}. Lower threads_per_task or tasks-per-worker."
        )
    if plan["gpus"] > limits["gpus"]:
        raise ClusterError(
            f"profile {profile!r} asks {plan['gpus']} GPU(s) per SLURM job (--gres=gpu:{plan['gpus']}), but "
            f"no node of partition {part!r} has that many GPUs in its Gres (sinfo -o %G). Choose a GPU "
            "partition (the profile's queue key) or a CPU profile (slurm-cpu)."
        )


def show_job_script(profile: str = "slurm-cpu", *, resources: ResourceSettings | None = None) -> str:
    """The batch script a SLURM profile would submit for one worker (a dry run).

    Nothing is submitted and no scheduler is started; ``sbatch`` need not be installed (only
    the log directory is created). The scheduler address in the script is a placeholder.

    Parameters
    ----------
    profile
        A profile of kind ``slurm``.
    resources
        Per-task resources; default :class:`~tomodask.settings.ResourceSettings`.

    Returns
    -------
    str
        The ``#!/usr/bin/env bash`` script with its ``#SBATCH`` header.
    """
    cfg = profile_config(profile)
    if cfg["kind"] != "slurm":
        slurm = [p for p in profile_names() if profile_config(p)["kind"] == "slurm"]
        raise ValueError(
            f"profile {profile!r} is of kind {cfg['kind']!r}; job scripts exist only for SLURM profiles: "
            + ", ".join(slurm)
        )
    from dask_jobqueue.slurm import SLURMJob

    plan = _slurm_plan(profile, cfg, resources or ResourceSettings())
    job = SLURMJob(scheduler="tcp://SCHEDULER-ADDRESS:PORT", name="tomodask-worker", interface=plan["interface"],
                   **plan["job_kwargs"])
    return job.job_script()


# ---- the handle ---------------------------------------------------------------------------
def _scheduler_task_states(dask_scheduler, keys=None):  # runs on the scheduler
    tasks = dask_scheduler.tasks
    if keys is None:
        return [(k, ts.state) for k, ts in tasks.items()]
    return [(k, tasks[k].state) for k in keys if k in tasks]


def _as_key(key: Any) -> Hashable:
    return tuple(_as_key(k) for k in key) if isinstance(key, list) else key


class _NoGCDiagnosis(WorkerPlugin):
    """Switch off distributed's GC diagnosis on each worker of a cluster tomodask starts.

    It only logs how long full collections take, from a callback run inside every full
    collection; there it has failed with a "stop" without a "start" and hung a worker
    (main thread parked in the callback while a task thread started a thread: the single-
    node SLURM test, 2026-11-25).
    """

    name = "tomodask-no-gc-diagnosis"

    def setup(self, worker) -> None:
        from distributed.gc import disable_gc_diagnosis

        disable_gc_diagnosis(force=True)


class ClusterHandle:
    """A running cluster and the client connected to it.

    Use it as a context manager, or call :meth:`close`. Built by :func:`start_cluster`.

    Attributes
    ----------
    client
        The connected :class:`distributed.Client`.
    cluster
        The cluster object (``LocalCluster``, ``LocalCUDACluster``, ``SLURMCluster``), or None
        for a scheduler started elsewhere.
    profile, kind
        The profile's name and kind.
    resources
        The per-task resources the workers were sized for.
    worker_resources
        Resources each worker offers (None for kind ``address``).
    """

    def __init__(
        self,
        client: Client,
        cluster: Any | None,
        *,
        profile: str,
        kind: str,
        resources: ResourceSettings,
        worker_resources: dict[str, float] | None,
        adaptive_options: dict[str, Any] | None = None,
        slurm_job_name: str | None = None,
        log_directory: str | None = None,
    ) -> None:
        self.client = client
        self.cluster = cluster
        self.profile = profile
        self.kind = kind
        self.resources = resources
        self.worker_resources = worker_resources
        self._adaptive_options = adaptive_options or {}
        self._slurm_job_name = slurm_job_name
        self._log_directory = log_directory
        self._closed = False

    def __repr__(self) -> str:
        return (f"<ClusterHandle profile={self.profile!r} kind={self.kind!r} workers={self.worker_count()} "
                f"dashboard={self.dashboard_link!r}>") if not self._closed else \
            f"<ClusterHandle profile={self.profile!r} closed>"

    def __enter__(self) -> ClusterHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- information -------------------------------------------------------------------
    @property
    def dashboard_link(self) -> str | None:
        """URL of the Dask dashboard, or None when the scheduler runs without one."""
        try:
            return self.client.dashboard_link
        except (KeyError, AttributeError):
            return None

    @property
    def scheduler_address(self) -> str:
        """Address workers and clients use to reach the scheduler."""
        return self.client.scheduler.address

    def worker_count(self) -> int:
        """Number of workers connected to the scheduler now."""
        return len(self.client.nthreads())

    def task_resources(self, *, gpu_step: bool) -> dict[str, float]:
        """Annotation for one task of this cluster's size; see :func:`task_resources`."""
        return task_resources(self.resources, gpu_step=gpu_step)

    def task_states(self, keys: Iterable[Hashable] | None = None) -> dict[Hashable, str]:
        """Live state of tasks on the scheduler.

        Parameters
        ----------
        keys
            Task keys to ask about; None for every task the scheduler knows.

        Returns
        -------
        dict
            Key -> scheduler state (``"released"``, ``"waiting"``, ``"no-worker"``,
            ``"queued"``, ``"processing"``, ``"memory"``, ``"erred"``, ``"forgotten"``).
            Keys the scheduler does not know (never submitted, or released and forgotten) are
            absent.
        """
        keys_list = None if keys is None else list(keys)
        pairs = self.client.run_on_scheduler(_scheduler_task_states, keys=keys_list)
        return {_as_key(k): state for k, state in pairs}

    def slurm_job_ids(self) -> list[str]:
        """IDs of this cluster's SLURM jobs still in ``squeue`` (empty for other kinds)."""
        if self._slurm_job_name is None:
            return []
        out = _run_slurm(["squeue", "-h", "-n", self._slurm_job_name, "-o", "%i"])
        return [line.strip() for line in out.splitlines() if line.strip()]

    # -- scaling -----------------------------------------------------------------------
    def _own_cluster(self, action: str) -> Any:
        if self.cluster is None:
            raise ClusterError(
                f"cannot {action}: profile {self.profile!r} connects to a scheduler tomodask did not start; "
                "scale it where it was started"
            )
        return self.cluster

    def scale(self, n_workers: int) -> None:
        """Ask for exactly ``n_workers`` workers (stops adaptive scaling)."""
        self._own_cluster("scale").scale(n_workers)

    def scale_adaptive(self, minimum: int = 0, maximum: int | None = None) -> None:
        """Start workers when work arrives and stop them when idle.

        Parameters
        ----------
        minimum
            Workers kept even when idle (0 frees every SLURM job).
        maximum
            Most workers; default the session's ``max_workers``.
        """
        cluster = self._own_cluster("scale adaptively")
        maximum = self.resources.max_workers if maximum is None else maximum
        if not 0 <= minimum <= maximum:
            raise ValueError(f"need 0 <= minimum <= maximum (got minimum={minimum}, maximum={maximum})")
        cluster.adapt(minimum=minimum, maximum=maximum, **self._adaptive_options)

    def wait_for_workers(self, n_workers: int = 1, *, timeout_s: float | None = None) -> None:
        """Block until ``n_workers`` workers are connected.

        Raises
        ------
        ClusterError
            When they have not arrived within ``timeout_s`` (default
            ``tomodask.cluster.worker-timeout-s``); the message says where to look.
        """
        timeout_s = float(_cluster_option("worker-timeout-s") if timeout_s is None else timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.worker_count() < n_workers:
            if time.monotonic() > deadline:
                raise ClusterError(self._workers_missing_message(n_workers, timeout_s))
            time.sleep(0.2)

    def _workers_missing_message(self, n_workers: int, timeout_s: float) -> str:
        have = self.worker_count()
        msg = f"only {have} of {n_workers} Dask worker(s) of profile {self.profile!r} arrived within {timeout_s:g} s."
        if self.kind != "slurm":
            return msg + " Check the worker logs (silence_logs) and the machine's free memory."
        try:
            jobs = _run_slurm(["squeue", "-h", "-n", self._slurm_job_name or "", "-o", "%i %T %r"]).strip()
        except ClusterError as exc:
            jobs = f"(squeue failed: {exc})"
        return (
            f"{msg} SLURM jobs (id state reason): {jobs or 'none in squeue'}. Check `squeue --me` for the "
            "pending reason, `sacct -j <id>` for failed jobs, and the job logs in "
            f"{self._log_directory or 'the submit directory (slurm-<id>.out)'}; the script is printed by "
            f"`tomodask cluster show-job-script --profile {self.profile}`. If the queue is only slow, raise "
            "tomodask.cluster.worker-timeout-s."
        )

    # -- shutdown ----------------------------------------------------------------------
    def close(self, *, timeout_s: float = 30.0) -> None:
        """Close the client and the cluster; for SLURM, wait until its jobs have left ``squeue``."""
        if self._closed:
            return
        self._closed = True
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()
            if self._slurm_job_name is not None:
                self._wait_slurm_jobs_gone(timeout_s)

    def _wait_slurm_jobs_gone(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        cancelled = False
        while ids := self.slurm_job_ids():
            if not cancelled:  # jobs jobqueue lost track of (a failed start, a lost worker)
                _run_slurm(["scancel", "-n", self._slurm_job_name, "-u", getpass.getuser()])
                cancelled = True
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"SLURM jobs {', '.join(ids)} are still in squeue {timeout_s:g} s after scancel; "
                    "check `squeue` and the slurmd log"
                )
            time.sleep(0.25)


# ---- starting -----------------------------------------------------------------------------
def _local_plan(profile: str, cfg: dict[str, Any], resources: ResourceSettings, *, cuda: bool) -> dict[str, Any]:
    from dask.system import CPU_COUNT
    from distributed.system import MEMORY_LIMIT

    k = _positive_int(cfg, "tasks-per-worker", profile)
    if cuda and resources.gpus_per_task > 1:
        raise ClusterError(
            f"profile {profile!r} gives each worker one GPU, but gpus_per_task={resources.gpus_per_task}; "
            "set gpus_per_task to 0 or 1"
        )
    _check_gpu_request(profile, resources, 1 if cuda else 0)
    threads = resources.threads_per_task * k
    memory_bytes = int(resources.memory_per_task_gb * k * _GIB)
    if memory_bytes > MEMORY_LIMIT:
        raise ClusterError(
            f"profile {profile!r}: a worker needs {memory_bytes / _GIB:.1f} GiB (memory_per_task_gb="
            f"{resources.memory_per_task_gb:g} x tasks-per-worker={k}) but this machine has "
            f"{MEMORY_LIMIT / _GIB:.1f} GiB. Lower memory_per_task_gb."
        )
    n_workers = cfg.get("n-workers")
    if n_workers is None and not cuda:
        n_workers = max(1, min(resources.max_workers, CPU_COUNT // threads, MEMORY_LIMIT // memory_bytes))
    elif n_workers is not None:
        n_workers = _positive_int(cfg, "n-workers", profile)
    return {
        "n_workers": n_workers,
        "threads": threads,
        "memory_bytes": memory_bytes,
        "worker_resources": worker_resources(resources, tasks_per_worker=k, gpus_per_worker=1 if cuda else 0),
    }


def _start_local(profile: str, cfg: dict[str, Any], resources: ResourceSettings, *, cuda: bool) -> ClusterHandle:
    plan = _local_plan(profile, cfg, resources, cuda=cuda)
    kwargs: dict[str, Any] = {
        "n_workers": plan["n_workers"],
        "threads_per_worker": plan["threads"],
        "memory_limit": plan["memory_bytes"],
        "resources": plan["worker_resources"],
        "dashboard_address": cfg.get("dashboard-address"),
        "host": cfg.get("host"),
        "silence_logs": logging.WARNING,
    }
    if cfg.get("local-directory"):
        kwargs["local_directory"] = cfg["local-directory"]
    if cuda:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as exc:
            raise ClusterError(
                f"profile {profile!r} needs dask-cuda and cupy: pip install 'tomodask[gpu]' ({exc})"
            ) from None
        if cfg.get("cuda-visible-devices") is not None:
            kwargs["CUDA_VISIBLE_DEVICES"] = cfg["cuda-visible-devices"]
        if cfg.get("device-memory-limit") is not None:
            kwargs["device_memory_limit"] = cfg["device-memory-limit"]
        cluster = LocalCUDACluster(**kwargs)
    else:
        from distributed import LocalCluster

        cluster = LocalCluster(processes=bool(cfg.get("processes", True)), **kwargs)
    try:
        client = Client(cluster)
        client.register_plugin(_NoGCDiagnosis())
    except BaseException:
        cluster.close()
        raise
    return ClusterHandle(client, cluster, profile=profile, kind=cfg["kind"], resources=resources,
                         worker_resources=plan["worker_resources"],
                         adaptive_options={"interval": "1s", "wait_count": 3})


def _start_slurm(profile: str, cfg: dict[str, Any], resources: ResourceSettings) -> ClusterHandle:
    _require_slurm()
    plan = _slurm_plan(profile, cfg, resources)
    _check_slurm_fits(profile, plan, resources)
    from dask_jobqueue import SLURMCluster

    scheduler_options = {}
    if plan["dashboard_address"] is not None:
        scheduler_options["dashboard_address"] = plan["dashboard_address"]
    cluster = SLURMCluster(interface=plan["interface"], scheduler_options=scheduler_options,
                           silence_logs="error", **plan["job_kwargs"])
    adaptive_options = {"interval": cfg.get("adaptive-interval") or "2s",
                        "wait_count": int(cfg.get("adaptive-wait-count") or 3),
                        "target_duration": cfg.get("adaptive-target-duration") or "5s"}
    handle = ClusterHandle(
        Client(cluster), cluster, profile=profile, kind="slurm", resources=resources,
        worker_resources=plan["worker_resources"], adaptive_options=adaptive_options,
        slurm_job_name=plan["job_name"], log_directory=plan["job_kwargs"].get("log_directory"),
    )
    try:
        handle.client.register_plugin(_NoGCDiagnosis())
        initial = min(int(cfg.get("initial-workers") or 0), resources.max_workers)
        if initial:
            handle.scale(initial)
            handle.wait_for_workers(initial)
        if cfg.get("adaptive", True):
            handle.scale_adaptive(int(cfg.get("adaptive-minimum") or 0), resources.max_workers)
    except BaseException:
        handle.close()
        raise
    return handle


def _connect(profile: str, cfg: dict[str, Any], resources: ResourceSettings, address: str | None) -> ClusterHandle:
    address = address or cfg.get("address")
    if not address:
        raise ClusterError(
            f"profile {profile!r} connects to a running scheduler and needs its address: "
            f"start_cluster({profile!r}, address='tcp://HOST:8786') or set "
            f"tomodask.cluster.profiles.{profile}.address in ~/.config/dask/tomodask.yaml"
        )
    timeout_s = float(_cluster_option("connect-timeout-s"))
    try:
        client = Client(address, timeout=timeout_s)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(
            f"could not reach the Dask scheduler at {address} within {timeout_s:g} s ({exc}). Is "
            "`dask scheduler` running there, and can this machine reach its port?"
        ) from None
    return ClusterHandle(client, None, profile=profile, kind="address", resources=resources, worker_resources=None)


def start_cluster(
    profile: str = "local", *, resources: ResourceSettings | None = None, address: str | None = None
) -> ClusterHandle:
    """Start (or connect to) a Dask cluster and return its :class:`ClusterHandle`.

    Parameters
    ----------
    profile
        A profile from ``tomodask.cluster.profiles`` (see :func:`profile_names`): ``local``,
        ``local-gpu``, ``slurm-cpu``, ``slurm-gpu``, ``address`` or one added by the admin.
    resources
        Per-task threads, memory (GiB), GPUs and the most workers; default
        :class:`~tomodask.settings.ResourceSettings`.
    address
        Scheduler address for a profile of kind ``address`` (overrides its ``address`` key).

    Returns
    -------
    ClusterHandle
        Owns the client and the cluster; close it (or use ``with``) to stop workers and jobs.

    Raises
    ------
    ValueError
        Unknown profile (the message lists the known ones), or ``address`` given to a profile
        that starts its own cluster.
    ClusterError
        The request cannot be met: no SLURM on this machine, more memory / CPUs / GPUs than
        the partition's nodes have, GPU tasks on a profile without GPUs, missing dask-cuda,
        an unreachable scheduler, or SLURM workers that did not arrive within
        ``tomodask.cluster.worker-timeout-s`` (with their ``squeue`` state).

    Notes
    -----
    SLURM profiles submit ``initial-workers`` jobs and wait for them, so a broken setup fails
    here rather than hanging later, then scale adaptively between ``adaptive-minimum`` and
    ``max_workers`` workers; idle jobs are cancelled.
    """
    cfg = profile_config(profile)
    name = _canon(profile)
    resources = resources or ResourceSettings()
    kind = cfg["kind"]
    if address is not None and kind != "address":
        with_address = [p for p in profile_names() if profile_config(p)["kind"] == "address"]
        raise ValueError(
            f"address= connects to a running scheduler, but profile {name!r} starts its own ({kind}); "
            f"use a profile of kind 'address' ({', '.join(with_address)})"
        )
    if kind == "local":
        return _start_local(name, cfg, resources, cuda=False)
    if kind == "local-cuda":
        return _start_local(name, cfg, resources, cuda=True)
    if kind == "slurm":
        return _start_slurm(name, cfg, resources)
    return _connect(name, cfg, resources, address)
