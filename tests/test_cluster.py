"""Cluster profiles, resource mapping and start errors (no SLURM needed; see test_slurm.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import dask
import dask.config
import pytest
from distributed import Event, LocalCluster, get_worker
from typer.testing import CliRunner

from tomodask.cli_cluster import cluster_app
from tomodask.cluster import (
    ClusterError,
    profile_config,
    profile_names,
    show_job_script,
    start_cluster,
    task_resources,
    worker_resources,
)
from tomodask.settings import ResourceSettings

SHIPPED_PROFILES = ["local", "local-gpu", "slurm-cpu", "slurm-gpu", "address"]


_RELEASE = "tomodask-test-release"  # a cluster-wide distributed.Event


def _wait_for_release(timeout_s: float) -> bool:
    return Event(_RELEASE).wait(timeout_s)


def _record_span(seconds: float) -> tuple[str, float, float]:
    start = time.monotonic()
    time.sleep(seconds)
    return get_worker().address, start, time.monotonic()


def test_shipped_profiles_and_kinds():
    assert profile_names()[: len(SHIPPED_PROFILES)] == SHIPPED_PROFILES
    kinds = {p: profile_config(p)["kind"] for p in SHIPPED_PROFILES}
    assert kinds == {"local": "local", "local-gpu": "local-cuda", "slurm-cpu": "slurm",
                     "slurm-gpu": "slurm", "address": "address"}
    assert profile_config("slurm_cpu") == profile_config("slurm-cpu")  # _ and - are the same


def test_local_profile_runs_tasks_within_worker_resources():
    """Two 1-thread workers; tasks asking a whole worker's resources never overlap on it."""
    res = ResourceSettings(threads_per_task=1, memory_per_task_gb=1.0, gpus_per_task=0, max_workers=2)
    with start_cluster("local", resources=res) as handle:
        assert handle.worker_count() == 2
        infos = handle.client.scheduler_info(n_workers=-1)["workers"].values()
        assert [w["resources"] for w in infos] == [{"threads": 1.0, "memory_gb": 1.0, "GPU": 0.0}] * 2
        assert all(w["memory_limit"] == 2**30 for w in infos)
        futures = handle.client.map(_record_span, [0.3] * 6, pure=False,
                                    resources=handle.task_resources(gpu_step=False))
        spans = handle.client.gather(futures)
        states = handle.task_states(f.key for f in futures)
        assert set(states.values()) == {"memory"} and set(states) == {f.key for f in futures}
        assert set(handle.task_states()) >= set(states)
        assert handle.dashboard_link.startswith("http://127.0.0.1:")
    by_worker: dict[str, list[tuple[float, float]]] = {}
    for addr, t0, t1 in spans:
        by_worker.setdefault(addr, []).append((t0, t1))
    assert len(by_worker) == 2  # both workers used
    for intervals in by_worker.values():
        intervals.sort()
        assert all(b[0] >= a[1] - 1e-3 for a, b in zip(intervals, intervals[1:]))  # one at a time


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ValueError, match="unknown cluster profile 'slurm-big'") as info:
        start_cluster("slurm-big")
    for name in SHIPPED_PROFILES:
        assert name in str(info.value)


def test_resource_mapping_to_workers_tasks_and_jobs():
    res = ResourceSettings(threads_per_task=4, memory_per_task_gb=8.0, gpus_per_task=1, max_workers=3)
    assert worker_resources(res, tasks_per_worker=2, gpus_per_worker=2) == {
        "threads": 8.0, "memory_gb": 16.0, "GPU": 2.0}
    assert task_resources(res, gpu_step=False) == {"threads": 4.0, "memory_gb": 8.0}
    assert task_resources(res, gpu_step=True) == {"threads": 4.0, "memory_gb": 8.0, "GPU": 1.0}
    cpu_only = res.model_copy(update={"gpus_per_task": 0})
    assert "GPU" not in task_resources(cpu_only, gpu_step=True)  # no GPUs asked: runs on CPU workers

    with dask.config.set({"tomodask.cluster.profiles.slurm-gpu.tasks-per-worker": 2,
                          "tomodask.cluster.profiles.slurm-gpu.gpus-per-worker": 2}):
        script = show_job_script("slurm-gpu", resources=res)
    assert "#SBATCH --cpus-per-task=8" in script
    assert "#SBATCH --mem=16384M" in script  # 2 x 8 GiB, in MiB as SLURM counts
    assert "#SBATCH --gres=gpu:2" in script
    assert "--nthreads 8" in script and "--memory-limit 16.00GiB" in script
    assert "--resources threads=8,memory_gb=16,GPU=2" in script
    assert "--interface lo" in script


def test_show_job_script_of_shipped_profiles():
    gpu = show_job_script("slurm-gpu")
    assert "#SBATCH --gres=gpu:1" in gpu and "GPU=1" in gpu
    cpu = show_job_script("slurm-cpu")
    assert "--gres" not in cpu and "GPU=0" in cpu
    with pytest.raises(ValueError, match="only for SLURM profiles: slurm-cpu, slurm-gpu"):
        show_job_script("local")


def test_config_override_by_environment_and_user_file(monkeypatch, tmp_path):
    (tmp_path / "tomodask.yaml").write_text(
        "tomodask:\n  cluster:\n    profiles:\n      slurm-bigmem:\n        kind: slurm\n"
        "        queue: bigmem\n        tasks-per-worker: 1\n        walltime: '1-00:00:00'\n"
    )
    monkeypatch.setenv("DASK_TOMODASK__CLUSTER__PROFILES__SLURM_CPU__WALLTIME", "04:00:00")
    monkeypatch.setenv("DASK_TOMODASK__CLUSTER__PROFILES__SLURM_CPU__ACCOUNT", "cryoem")
    try:
        dask.config.refresh(paths=[str(tmp_path)])
        script = show_job_script("slurm-cpu")
        assert "#SBATCH -t 04:00:00" in script and "#SBATCH -A cryoem" in script
        assert profile_config("slurm-cpu")["interface"] == "lo"  # shipped default still there
        assert "slurm-bigmem" in profile_names()
        assert "#SBATCH -p bigmem" in show_job_script("slurm-bigmem")
    finally:
        monkeypatch.undo()
        dask.config.refresh()
    assert "#SBATCH -t 08:00:00" in show_job_script("slurm-cpu")
    assert "slurm-bigmem" not in profile_names()


def test_clear_errors_at_start(monkeypatch, tmp_path):
    with pytest.raises(ClusterError, match="gpus_per_task=1 but workers of profile 'local' have 0 GPU"):
        start_cluster("local", resources=ResourceSettings(gpus_per_task=1))
    with pytest.raises(ClusterError, match="Lower memory_per_task_gb"):
        start_cluster("local", resources=ResourceSettings(memory_per_task_gb=4000.0))
    with pytest.raises(ValueError, match="use a profile of kind 'address'"):
        start_cluster("local", address="tcp://127.0.0.1:8786")
    with pytest.raises(ClusterError, match="needs its address"):
        start_cluster("address")
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # as if dask-cuda were not installed
    with pytest.raises(ClusterError, match=r"pip install 'tomodask\[gpu\]'"):
        start_cluster("local-gpu")
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without SLURM
    with pytest.raises(ClusterError, match="deploy/slurm-single-node.sh"):
        start_cluster("slurm-cpu")


def test_address_profile_connects_and_reads_task_states():
    # A worker process: an in-process worker would register distributed's GC diagnosis in
    # the test process, where a collection racing its start fails a later test.
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None,
                      resources={"threads": 1, "memory_gb": 4, "GPU": 0}) as cluster:
        with start_cluster("address", address=cluster.scheduler_address) as handle:
            assert handle.cluster is None and handle.worker_count() == 1
            release = Event(_RELEASE, client=handle.client)
            fut = handle.client.submit(_wait_for_release, 30, key=("movie", "ts01_001", "abc123"),
                                       resources=handle.task_resources(gpu_step=False))
            deadline = time.monotonic() + 10
            while handle.task_states([fut.key]).get(fut.key) != "processing" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert handle.task_states([fut.key]) == {("movie", "ts01_001", "abc123"): "processing"}
            release.set()
            assert fut.result() is True
            assert handle.task_states([fut.key, "never-submitted"]) == {fut.key: "memory"}
            with pytest.raises(ClusterError, match="tomodask did not start"):
                handle.scale_adaptive(0, 2)
        assert cluster.status.name == "running"  # closing the handle leaves a foreign cluster alone


def test_unreachable_scheduler_errors_quickly():
    with dask.config.set({"tomodask.cluster.connect-timeout-s": 1}):
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match="could not reach the Dask scheduler at tcp://127.0.0.1:9"):
            start_cluster("address", address="tcp://127.0.0.1:9")
    assert time.monotonic() - t0 < 10


def test_cli_profiles_and_job_script():
    runner = CliRunner()
    out = runner.invoke(cluster_app, ["profiles"])
    assert out.exit_code == 0 and "slurm-gpu\tslurm" in out.output and "local-gpu\tlocal-cuda" in out.output
    out = runner.invoke(cluster_app, ["show-job-script", "--profile", "slurm-gpu", "--memory-per-task-gb", "2"])
    assert out.exit_code == 0 and "#SBATCH --gres=gpu:1" in out.output and "#SBATCH --mem=2048M" in out.output
    out = runner.invoke(cluster_app, ["show-job-script", "--profile", "nope"])
    assert out.exit_code == 2 and "known profiles: local" in out.output


# tomodask.service (`tomodask serve ...`) joins this list once the `serve` command exists.
@pytest.mark.parametrize("unit", ["tomodask-session@.service", "tomodask.service"])
def test_systemd_unit_runs_an_existing_command(unit):
    from tomodask.cli import app

    text = (Path(__file__).parents[1] / "deploy" / unit).read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    words = exec_start.removeprefix("ExecStart=").split()
    assert words[0].endswith("/tomodask")
    commands = [w for w in words[1:] if not w.startswith(("-", "$", "%"))][:2]
    options = [w for w in words if w.startswith("--")]
    out = CliRunner().invoke(app, [*commands, "--help"])
    assert out.exit_code == 0, out.output
    assert all(opt in out.output for opt in options), (options, out.output)


def _gc_diagnosis_on() -> bool:
    import gc

    return any("GCDiagnosis" in repr(cb) for cb in gc.callbacks)


def test_started_workers_run_without_the_gc_diagnosis():
    res = ResourceSettings(threads_per_task=1, memory_per_task_gb=1.0, gpus_per_task=0, max_workers=1)
    with start_cluster("local", resources=res) as handle:
        assert handle.client.run(_gc_diagnosis_on) == {w: False for w in handle.client.scheduler_info()["workers"]}
