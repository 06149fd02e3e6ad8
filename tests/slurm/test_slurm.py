"""launch/slurm/train.sbatch on a real single-host SLURM cluster (munge + slurmctld + slurmd,
started by tests/slurm/cluster.sh and stopped by PID afterwards; fixtures in tests/conftest.py)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.slurm

def _sbatch(env, out_dir, *args, wait: bool, nodes: int = 1):
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", f"--output={out_dir}/%x-%j.out", *(["--wait"] if wait else []),
           "launch/slurm/train.sbatch", "--config", "configs/demo.yaml", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    return proc, proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else None


def _common(mnist, out, name):
    return [f"data.root={mnist}", f"run.output_dir={out}", f"run.name={name}", "data.batch_size=16",
            "data.num_workers=0", "log.progress=false", "log.wandb.mode=disabled"]


def _wait_until(condition, what, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():  # polling the cluster's state, not timing the job
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_sbatch_trains_one_node_two_cpu_processes(slurm, tmp_path, mnist_small):
    proc, job = _sbatch({**slurm, "CPU_PROCS_PER_NODE": "2"}, tmp_path, *_common(mnist_small, tmp_path, "one"), "train.epochs=1",
                        wait=True)
    log = next(tmp_path.glob("*.out")).read_text()
    assert proc.returncode == 0, log[-4000:]
    assert "1 node(s) x 2 process(es)" in log and "training on 2 process(es)" in log
    assert len(json.loads((tmp_path / "one" / "results.json").read_text())["epochs"]) == 1


def test_usr1_checkpoints_requeues_and_the_requeued_job_resumes(slurm, tmp_path, mnist_small):
    env = {**slurm, "CPU_PROCS_PER_NODE": "2"}
    _, job = _sbatch(env, tmp_path, *_common(mnist_small, tmp_path, "pre"), "train.epochs=3", "checkpoint.every_n_steps=3",
                     "log.every_n_steps=2", wait=False)
    first = tmp_path / "pre" / "checkpoints" / "step-00000003"
    _wait_until(first.exists, "the first checkpoint")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)

    def finished():
        state = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True).stdout.strip()
        return state == "" and (tmp_path / "pre" / "results.json").exists()

    _wait_until(finished, "the requeued job to finish", timeout=400)
    log = next(tmp_path.glob("*.out")).read_text()
    assert "USR1 received" in log and f"requeueing job {job}" in log
    assert "restart 1:" in log and "resuming from" in log, log[-4000:]
    restarts = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts or restarts == ""  # the record may already be purged
    latest = (tmp_path / "pre" / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((tmp_path / "pre" / "checkpoints" / latest / "meta.json").read_text())
    assert meta["global_step"] == 30 and meta["epoch"] == 3  # 3 epochs x 10 steps: nothing lost or repeated
    assert len(json.loads((tmp_path / "pre" / "results.json").read_text())["epochs"]) == 3
