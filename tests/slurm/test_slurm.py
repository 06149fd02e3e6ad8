"""launch/slurm/train.sbatch on a real single-host SLURM cluster (munge + slurmctld + slurmd,
started by tests/slurm/cluster.sh and stopped by PID afterwards; fixtures in tests/conftest.py)."""

from __future__ import annotations

import json
import re
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
            "data.num_workers=0", "log.progress=false", "log.wandb.mode=disabled", "train.precision=no"]


def _wait_until(condition, what, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():  # polling the cluster's state, not timing the job
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _job_record(env, job) -> dict[str, str]:
    """`scontrol show job JOB` as key -> value ({} once slurmctld has purged it)."""
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _failure_report(log: str) -> dict[int, tuple[int, int]]:
    """rank -> (exit code, pid) from torch elastic's failure report in the job log."""
    found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\n\s*exitcode\s*: (-?\d+) \(pid: (\d+)\)", log)
    return {int(rank): (int(code), int(pid)) for rank, code, pid in found}


def test_usr1_checkpoints_requeues_and_the_requeued_job_resumes(slurm, tmp_path, mnist_small):
    env = {**slurm, "CPU_PROCS_PER_NODE": "2"}
    # no checkpoint.every_n_steps: before the first epoch end (step 10) only the signal makes a checkpoint
    _, job = _sbatch(env, tmp_path, *_common(mnist_small, tmp_path, "pre"), "train.epochs=3", "log.every_n_steps=2", wait=False)
    metrics = tmp_path / "pre" / "metrics.jsonl"
    _wait_until(lambda: metrics.exists() and "train/loss" in metrics.read_text(), "the first log point (step 2)")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)

    seen = []  # (JobState, Restarts) of every poll

    def finished():
        record = _job_record(env, job)
        seen.append((record.get("JobState"), record.get("Restarts")))
        assert record, f"slurmctld has no record of job {job} (cluster.sh sets MinJobAge=3600)"
        assert not (record["JobState"] == "COMPLETED" and record["Restarts"] == "0"), "the job completed without a requeue"
        return record["JobState"] == "COMPLETED"

    _wait_until(finished, "the requeued job to finish", timeout=400)
    log = next(tmp_path.glob("*.out")).read_text()
    # the requeued job was seen waiting or running as restart 1, and ended as it
    assert ("PENDING", "1") in seen or ("RUNNING", "1") in seen, seen
    final = _job_record(env, job)
    assert (final["JobState"], final["Restarts"], final["ExitCode"]) == ("COMPLETED", "1", "0:0"), final
    assert "USR1 received" in log and f"requeueing job {job}" in log
    assert "1 node(s) x 2 process(es)" in log and "training on 2 process(es)" in log  # the sbatch script's one-node launch
    # the signal (not a periodic or final save) made the checkpoint the requeued job resumed from
    saved = re.findall(r"disttrain: preempted: checkpoint saved in (\S+); exiting with 75", log)
    assert len(saved) == 2 and saved[0] == saved[1], log[-4000:]  # both ranks
    assert "restart 1:" in log and f"resuming from {saved[0]}: " in log, log[-4000:]
    report = _failure_report(log)
    assert sorted(report) == [0, 1], log[-4000:]
    assert {rank: code for rank, (code, _) in report.items()} == {0: 75, 1: 75}, log[-4000:]  # every rank saved and exited 75
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(2, 31, 2))  # every log point once
    assert [r["epoch"] for r in rows if "valid/loss" in r] == [1, 2, 3]
    latest = (tmp_path / "pre" / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((tmp_path / "pre" / "checkpoints" / latest / "meta.json").read_text())
    assert meta["global_step"] == 30 and meta["epoch"] == 3  # 3 epochs x 10 steps: nothing lost or repeated
    assert len(json.loads((tmp_path / "pre" / "results.json").read_text())["epochs"]) == 3
