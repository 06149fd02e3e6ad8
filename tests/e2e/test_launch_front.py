"""`disttrain launch`: the config checked before any worker starts, one line and exit 2 for a user
error on every rank, exit 75 for a preempted run (where `accelerate launch` says 1 after a traceback)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import BIN, REPO, free_port, kill_job, launch, run_env

pytestmark = pytest.mark.e2e


def test_a_config_typo_is_one_line_and_exit_2_before_any_worker(tmp_path):
    proc = launch(["launch/train.py", "--config", "configs/demo.yaml", "optim.lrr=1", f"run.output_dir={tmp_path}"],
                  launcher="disttrain", check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "disttrain: error: configs/demo.yaml: unknown config key 'optim.lrr'; did you mean 'optim.lr'?"
    assert proc.stdout == "" and not any(tmp_path.iterdir()), "no worker started"


def test_an_unknown_section_names_the_sections(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("finetune:\n  groups: 3\n")
    proc = launch(["launch/train.py", "--config", str(config)], launcher="disttrain", check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"disttrain: error: {config}: unknown config section 'finetune'; the sections are run, data, augment, model, "
        "optim, schedule, sweep, train, log, checkpoint"
    )


def test_a_data_error_on_every_rank_is_one_line_and_exit_2(tmp_path):
    proc = launch(["launch/train.py", "data.root=/definitely/missing", f"run.output_dir={tmp_path}", "train.precision=no"],
                  launcher="disttrain", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("disttrain: error:")]
    assert errors == ["disttrain: error: data.root: /definitely/missing is not a folder (it should hold train/<class>/ and valid/<class>/)"]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr


def test_a_preempted_run_exits_75_with_one_line(tmp_path, mnist_small):
    cmd = [str(BIN / "disttrain"), "launch", "--main_process_port", str(free_port()), "--multi_gpu", "--num_processes", "2",
           "launch/train.py", "--config", "configs/demo.yaml", f"data.root={mnist_small}", f"run.output_dir={tmp_path}",
           "run.name=p", "train.precision=no", "train.epochs=3", "data.batch_size=16", "data.num_workers=0",
           "log.progress=false", "log.every_n_steps=2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        metrics = tmp_path / "p" / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.exists() and "train/loss" in metrics.read_text()):  # polling: training has started
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        for pid in workers:
            os.kill(int(pid), signal.SIGUSR1)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert proc.returncode == 75, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("disttrain:")]
    assert len(lines) == 1 and lines[0].startswith("disttrain: preempted: checkpoint saved in ") and "exiting with 75" in lines[0]
    latest = (tmp_path / "p" / "checkpoints" / "latest").read_text().strip()
    assert latest in lines[0] and "Traceback" not in err
    assert json.loads((tmp_path / "p" / "checkpoints" / latest / "meta.json").read_text())["precision"] == "no"
