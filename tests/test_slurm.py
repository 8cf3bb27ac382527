"""SLURM profiles against a real SLURM (deploy/slurm-single-node.sh sets one up on one machine)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import dask.array as da
import dask.config
import numpy as np
import pytest

from tomodask.cluster import ClusterError, show_job_script, start_cluster
from tomodask.settings import ResourceSettings

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        shutil.which("sbatch") is None,
        reason="no SLURM here (sbatch not on PATH); deploy/slurm-single-node.sh installs and starts one",
    ),
]

SMALL = ResourceSettings(threads_per_task=1, memory_per_task_gb=1.0, gpus_per_task=0, max_workers=2)


def _squeue_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


@pytest.fixture
def slurm_test_config(tmp_path):
    """Job logs under tmp_path and quick adaptive decisions."""
    settings = {}
    for p in ("slurm-cpu", "slurm-gpu"):
        settings |= {f"tomodask.cluster.profiles.{p}.log-directory": str(tmp_path / "logs"),
                     f"tomodask.cluster.profiles.{p}.adaptive-interval": "0.5s",
                     f"tomodask.cluster.profiles.{p}.adaptive-wait-count": 2,
                     f"tomodask.cluster.profiles.{p}.adaptive-target-duration": "1s"}
    with dask.config.set(settings | {"tomodask.cluster.worker-timeout-s": 60}):
        yield tmp_path / "logs"


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def test_slurm_cpu_computes_on_slurm_workers_and_scales_adaptively(slurm_test_config):
    seen_jobs: set[str] = set()
    with start_cluster("slurm-cpu", resources=SMALL) as handle:
        # the first worker job was submitted and waited for by start_cluster
        jobs = handle.slurm_job_ids()
        seen_jobs |= set(jobs)
        assert len(jobs) == 1 and jobs[0] in _squeue_ids()
        workers = handle.client.scheduler_info(n_workers=-1)["workers"].values()
        assert [w["resources"] for w in workers] == [{"threads": 1.0, "memory_gb": 1.0, "GPU": 0.0}]
        assert all(w["host"] == "127.0.0.1" for w in workers)  # interface lo
        x = da.arange(200_000, chunks=20_000, dtype=np.int64)
        total = handle.client.compute((x * 2).sum(), resources=handle.task_resources(gpu_step=False))
        assert total.result(timeout=60) == 200_000 * 199_999  # sum(2 i) for i < n
        del total
        # idle: adaptive scaling cancels the job
        _wait(lambda: handle.worker_count() == 0 and not handle.slurm_job_ids(), 30, "scale down to 0")

        # work arrives: scales up to max_workers=2 jobs
        futures = handle.client.map(time.sleep, [1.0] * 8, pure=False, resources=handle.task_resources(gpu_step=False))
        peak = 0
        deadline = time.monotonic() + 60
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            peak = max(peak, handle.worker_count())
            seen_jobs |= set(handle.slurm_job_ids())
            time.sleep(0.2)
        handle.client.gather(futures)
        assert peak == 2
        del futures
        _wait(lambda: handle.worker_count() == 0 and not handle.slurm_job_ids(), 30, "scale down to 0 again")
        handle.scale(1)  # a job that close() must cancel
        _wait(lambda: handle.slurm_job_ids(), 10, "a job in squeue")
        seen_jobs |= set(handle.slurm_job_ids())
    assert len(seen_jobs) >= 4
    assert not seen_jobs & _squeue_ids()  # no job left behind
    assert list(slurm_test_config.glob("tomodask-*.err"))  # worker logs where the profile says


def test_memory_above_the_node_errors_before_submitting(slurm_test_config):
    before = _squeue_ids()
    with pytest.raises(ClusterError, match=r"asks 1048576 MiB per SLURM job .* Lower memory_per_task_gb to at most"):
        start_cluster("slurm-cpu", resources=SMALL.model_copy(update={"memory_per_task_gb": 1024.0}))
    with pytest.raises(ClusterError, match="partition 'no-such-partition' does not exist"):
        with dask.config.set({"tomodask.cluster.profiles.slurm-cpu.queue": "no-such-partition"}):
            start_cluster("slurm-cpu", resources=SMALL)
    assert _squeue_ids() <= before


def test_workers_that_never_arrive_time_out_with_squeue_state(slurm_test_config):
    with dask.config.set({"tomodask.cluster.worker-timeout-s": 3,
                          "tomodask.cluster.profiles.slurm-cpu.job-extra-directives": ["--begin=now+3600"]}):
        with pytest.raises(ClusterError, match=r"only 0 of 1 Dask worker.*PENDING BeginTime.*squeue.*sacct") as info:
            start_cluster("slurm-cpu", resources=SMALL)
    job_ids = set(re.findall(r"(\d+) PENDING", str(info.value)))
    assert job_ids and not job_ids & _squeue_ids()  # cancelled when the start failed


def test_slurm_gpu_profile_asks_for_a_gpu(slurm_test_config):
    script = show_job_script("slurm-gpu", resources=SMALL)
    assert "#SBATCH --gres=gpu:1" in script and "GPU=1" in script
    gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, check=True).stdout
    if "gpu" in gres:  # a SLURM with GPU nodes: a GPU task runs on a GPU worker
        gpu = SMALL.model_copy(update={"gpus_per_task": 1, "max_workers": 1})
        with start_cluster("slurm-gpu", resources=gpu) as handle:
            res = handle.task_resources(gpu_step=True)
            assert handle.client.submit(sum, [1, 2], resources=res).result(timeout=60) == 3
    else:  # no GPU node: a clear error instead of a job pending forever
        with pytest.raises(ClusterError, match="no node of partition .* has that many GPUs"):
            start_cluster("slurm-gpu", resources=SMALL)
