"""A whole simulated session processed on SLURMCluster workers (real single-node SLURM)."""

from __future__ import annotations

import shutil
import subprocess
import time

import dask.config
import pytest
from sim_helpers import make_settings, spec_fields

from tomodask.session.api import create_session
from tomodask.simulate.writer import write_session

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("sbatch") is None,
                       reason="no SLURM here (sbatch not on PATH); deploy/slurm-single-node.sh installs and starts one"),
]


def _squeue() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def test_session_runs_on_slurm_workers_and_leaves_no_job(tmp_path, data_root):
    microscope = tmp_path / "microscope"
    write_session(microscope, n_tilt_series=1, size="tiny", **spec_fields())
    settings = make_settings(microscope, "slurm-session", "copy")
    settings.resources.memory_per_task_gb = 2.0
    settings.resources.max_workers = 2
    session = create_session(settings, data_root=data_root)
    session.use_cluster("slurm-cpu")
    config = {"tomodask.cluster.profiles.slurm-cpu.log-directory": str(tmp_path / "slurm-logs"),
              "tomodask.cluster.profiles.slurm-cpu.adaptive-interval": "0.5s"}
    with dask.config.set(config):
        session.start()
        try:
            deadline = time.monotonic() + 600
            jobs_seen: set[str] = set()
            workers_seen: set[str] = set()
            while session.progress()["tilt_series_done"] < 1 and time.monotonic() < deadline:
                cluster = session.runner.cluster
                if cluster is not None:
                    jobs_seen |= set(cluster.slurm_job_ids())
                    workers_seen |= set(cluster.client.scheduler_info()["workers"])
                assert "failed" not in session.status().values(), "\n".join(session.logs())
                time.sleep(0.5)
            assert cluster.kind == "slurm"
        finally:
            session.close()
    assert session.progress() == {"movies": 16, "movies_done": 16, "movies_failed": 0,
                                  "tilt_series": 1, "tilt_series_done": 1, "tilt_series_failed": 0}
    assert jobs_seen, "no SLURM job ran the work"
    assert workers_seen
    assert not any("dask-worker" in line or line.split()[0] in jobs_seen for line in _squeue())
