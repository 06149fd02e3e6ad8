"""launch/slurm/train.sbatch on a real single-host SLURM cluster (munge + slurmctld + slurmd,
started by tests/slurm/cluster.sh and stopped by PID afterwards; fixtures in tests/conftest.py)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slurm


def _sbatch(env, out_dir, *args, wait: bool, nodes: int = 1, config: str = "configs/demo.yaml"):
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", f"--output={out_dir}/%x-%j.out", *(["--wait"] if wait else []),
           "launch/slurm/train.sbatch", "--config", config, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    return proc, proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else None


def _common(mnist, out, name):
    return [f"data.root={mnist}", f"run.output_dir={out}", f"run.name={name}", "data.batch_size=16",
            "data.num_workers=0", "log.progress=false", "log.wandb.mode=disabled", "train.precision=no"]


def completed_runs(env: dict, job: str, out, restarts: int) -> tuple[str, list[str]]:
    """Wait for `job` to end; it must have COMPLETED after exactly `restarts` requeues. Its log (in
    `out`) and the log of each of its runs (split at the batch script's restart lines)."""
    def finished():
        record = _job_record(env, job)
        assert record, f"slurmctld has no record of job {job} (cluster.sh sets MinJobAge=3600)"
        return record["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")

    _wait_until(finished, "the job to finish", timeout=480)
    log = next(Path(out).glob("*.out")).read_text()
    final = _job_record(env, job)
    assert (final["JobState"], final["Restarts"], final["ExitCode"]) == ("COMPLETED", str(restarts), "0:0"), (final, log[-6000:])
    runs = re.split(rf"^disttrain: job {job} restart \d+: .*$", log, flags=re.M)[1:]
    assert len(runs) == restarts + 1, log[-6000:]
    return log, runs


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


def test_usr1_before_the_first_checkpoint_requeues_a_job_that_starts_again(slurm, tmp_path, mnist_small):
    """USR1 (as SLURM sends it before the time limit, to the batch script) at three points before any
    checkpoint exists, one per run of the same job (tests/slurm/preempt_worker.py): in the data scan,
    in stage 0's precompute (its loader workers running: they get the signal too) and in stage 0's LR
    sweep. Each time every rank stops with one line and exit 75, the script requeues the job, and
    the fourth run trains to the end."""
    stages = [
        {"name": "head", "epochs": 1, "freeze_to": -1, "lr": "auto", "augment": False, "precompute": True},
        {"name": "all", "epochs": 1, "freeze_to": 0, "lr": 1.0e-3},
    ]
    config = tmp_path / "staged.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"load_size": 28, "image_size": 28}, "model": {"name": "resnet18"}, "finetune": {"groups": 3}, "stages": stages,
        "sweep": {"start_lr": 1.0e-5, "end_lr": 1.0, "num_iter": 12, "beta": 0.7, "skip_start": 1, "skip_end": 1},
        "train": {"max_steps_per_epoch": 2},
    }))
    env = {**slurm, "CPU_PROCS_PER_NODE": "2", "TRAIN_SCRIPT": "tests/slurm/preempt_worker.py"}
    common = [o for o in _common(mnist_small, tmp_path, "early") if o != "data.num_workers=0"] + ["data.num_workers=1"]
    _, job = _sbatch(env, tmp_path, *common, wait=False, config=str(config))

    log, runs = completed_runs(env, job, tmp_path, restarts=3)
    then = "; exiting with 75 so the job can be requeued and start again"
    stops = ["during the data scan", "during the precompute of head", r"during the LR sweep of head \(after its step 3 of 12\)"]
    for run, where in zip(runs, stops):
        line = rf"disttrain: preempted {where}, before the first checkpoint: nothing to save yet{re.escape(then)}"
        assert len(re.findall(line, run)) == 2, run[-4000:]  # one line from each rank
        assert {code for code, _ in _failure_report(run).values()} == {75}, run[-4000:]  # every rank exits 75
        assert f"requeueing job {job}" in run and "training on" not in run and "checkpoint saved" not in run, run[-4000:]
    scan, precompute, sweep, last = runs
    assert "precomputed the frozen body's output" not in scan and "precomputed the frozen body's output" in precompute
    assert "LR sweep: suggestion" not in precompute + sweep
    # the last run: from the start, nothing resumed (there was nothing to resume from), both stages to the end
    assert "resuming from" not in last and "LR sweep: suggestion" in last, last[-4000:]
    assert re.search(r"^\s*0\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\d\d:\d\d", last, flags=re.M), last[-4000:]  # the epoch table
    assert re.search(r"^\s*1\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\d\d:\d\d", last, flags=re.M), last[-4000:]
    assert [r["stage"] for r in json.loads((tmp_path / "early" / "results.json").read_text())["epochs"]] == [0, 1]
