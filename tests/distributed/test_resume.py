"""Checkpoints and exact resume on 2 real processes: a run SIGKILLed mid-epoch and resumed ends with
the weights and per-epoch losses of an uninterrupted run; a preemption signal saves and exits 75."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import BIN, REPO, free_port, launch, run_env

pytestmark = pytest.mark.dist


def _args(mnist, out, name, *extra):
    return ["launch/train.py", "--config", "configs/demo.yaml", f"data.root={mnist}", f"run.output_dir={out}",
            f"run.name={name}", "train.epochs=2", "data.batch_size=16", "data.num_workers=0", "log.progress=false",
            "checkpoint.every_n_steps=3", "log.every_n_steps=2", *extra]


def _popen(args):
    cmd = [str(BIN / "accelerate"), "launch", "--main_process_port", str(free_port()), "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(path, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while not path.exists():  # polling for a file the run writes, not timing the run
        assert proc.poll() is None, f"the run ended before {path} appeared:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def mnist_shards(tmp_path_factory, mnist_small):
    out = tmp_path_factory.mktemp("shards") / "mnist"
    subprocess.run([str(BIN / "disttrain"), "prepare", str(mnist_small), str(out), "--presize", "28", "--samples-per-shard", "100",
                    "--workers", "1", "--no-progress"], env=run_env(), check=True, capture_output=True)
    return out


@pytest.mark.parametrize("fmt", ["folder", "shards"])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, mnist_small, fmt, request):
    data = [] if fmt == "folder" else [f"data.root={request.getfixturevalue('mnist_shards')}", "data.format=shards", "data.num_workers=2"]
    launch(_args(mnist_small, tmp_path, "a", *data), nproc=2)
    proc = _popen(_args(mnist_small, tmp_path, "b", *data))
    _wait_for(tmp_path / "b" / "checkpoints" / "step-00000006", proc)  # mid-epoch 0 (10 steps per epoch)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "results.json").exists()
    resumed = launch(_args(mnist_small, tmp_path, "b", *data), nproc=2)
    assert "resuming from" in resumed.stdout and "LR sweep" not in resumed.stdout

    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    epochs_a = json.loads((tmp_path / "a" / "results.json").read_text())["epochs"]
    epochs_b = json.loads((tmp_path / "b" / "results.json").read_text())["epochs"]
    for ea, eb in zip(epochs_a, epochs_b, strict=True):
        assert (ea["train_loss"], ea["valid_loss"], ea["accuracy"]) == (eb["train_loss"], eb["valid_loss"], eb["accuracy"])
    kept = sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("step-*"))
    assert kept == ["step-00000018", "step-00000020"]  # keep_last=2: the last mid-epoch one and the final epoch end
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step-00000020"


def test_preemption_signal_saves_and_exits_75_then_resume_finishes(tmp_path, mnist_small):
    proc = _popen(_args(mnist_small, tmp_path, "p", "train.epochs=3"))
    _wait_for(tmp_path / "p" / "checkpoints" / "step-00000003", proc)
    for line in subprocess.run(["pgrep", "-f", f"run.output_dir={tmp_path}"], capture_output=True, text=True).stdout.split():
        if int(line) != proc.pid:
            os.kill(int(line), signal.SIGUSR1)  # the training processes, as the SLURM script forwards it
    out, err = proc.communicate(timeout=240)
    assert "exiting with 75" in err, err[-3000:]
    latest = (tmp_path / "p" / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((tmp_path / "p" / "checkpoints" / latest / "meta.json").read_text())
    assert meta["global_step"] % 2 == 0 or meta["steps_done_in_epoch"] == 0  # at a log point or an epoch end
    done = launch(_args(mnist_small, tmp_path, "p", "train.epochs=3"), nproc=2)
    assert f"global step {meta['global_step']}" in done.stdout
    assert len(json.loads((tmp_path / "p" / "results.json").read_text())["epochs"]) == 3


def _fault_run(mnist, out, mode, at, *launcher):
    cmd = [str(BIN / "accelerate"), "launch", "--main_process_port", str(free_port()), "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *launcher,
           "tests/distributed/fault_worker.py", mode, str(at), *_args(mnist, out, mode)[3:]]
    return cmd


def test_a_rank_that_raises_ends_the_job_quickly(tmp_path, mnist_small):
    # a hang would run into the 30-minute default collective timeout; the bound here is 60 s
    proc = subprocess.run(_fault_run(mnist_small, tmp_path, "raise", 4), cwd=REPO, env=run_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert "injected failure on rank 1 at step 4" in proc.stderr
    assert not (tmp_path / "raise" / "results.json").exists()



def test_a_killed_rank_is_restarted_and_resumes_with_the_exact_step_count(tmp_path, mnist_small):
    proc = subprocess.run(_fault_run(mnist_small, tmp_path, "kill", 7, "--max_restarts", "1", "--monitor_interval", "1"),
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming from" in proc.stdout and "step-00000006" in proc.stdout
    assert len(json.loads((tmp_path / "kill" / "results.json").read_text())["epochs"]) == 2
    rows = [json.loads(line) for line in (tmp_path / "kill" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(2, 21, 2))  # none lost or logged twice
    assert [r["epoch"] for r in rows if "valid/loss" in r] == [1, 2]
    latest = (tmp_path / "kill" / "checkpoints" / "latest").read_text().strip()
    assert json.loads((tmp_path / "kill" / "checkpoints" / latest / "meta.json").read_text())["global_step"] == 20


def test_a_checkpoint_of_other_classes_is_refused(tmp_path, mnist_small):
    from conftest import make_folder

    run = ["launch/train.py", f"run.output_dir={tmp_path}", "run.name=c", "data.load_size=36", "data.image_size=32",
           "data.batch_size=8", "train.epochs=1", "train.max_steps_per_epoch=2", "data.num_workers=0", "log.progress=false",
           "log.wandb.mode=disabled"]
    launch(run + [f"data.root={mnist_small}", "train.epochs=2"], launcher="python")  # checkpoints at steps 2 and 4
    other = make_folder(tmp_path / "abc", {"train": {"a": 4, "b": 4, "c": 4}, "valid": {"a": 2, "b": 2, "c": 2}}, size=(36, 36))
    refused = launch(run + [f"data.root={other}"], launcher="python", check=False)
    assert refused.returncode == 2
    assert "saved for model resnet18 with classes ['0', '1'" in refused.stderr and "checkpoint.resume=never" in refused.stderr
    fresh = launch(run + [f"data.root={other}", "checkpoint.resume=never", "checkpoint.keep_last=1"], launcher="python")
    assert "resuming" not in fresh.stdout and "moved this run dir's checkpoints" in fresh.stdout
    # the old run's checkpoints are set aside, not mixed with (or pruned against) the new run's
    root = tmp_path / "c" / "checkpoints"
    aside = next(root.glob("superseded-*"))
    assert sorted(p.name for p in aside.iterdir()) == ["latest", "step-00000002", "step-00000004"]
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000002"]
    assert json.loads((root / "step-00000002" / "meta.json").read_text())["classes"] == ["a", "b", "c"]
    assert (root / "latest").read_text().strip() == "step-00000002"
