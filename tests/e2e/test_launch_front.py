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


def test_an_unknown_section_names_the_closest_section(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("finetuning:\n  groups: 3\n")
    proc = launch(["launch/train.py", "--config", str(config)], launcher="disttrain", check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"disttrain: error: {config}: unknown config section 'finetuning'; did you mean 'finetune'?")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stages.0.freeze_to=7"], "stages[0].freeze_to: 7 is outside the 3 layer groups (finetune.groups); use 0 (train "
         "everything), -1 (everything but the head) or 1 to 2"),
        (["stages.1.epochs=4"], "stages[1].epochs: 4 epochs do not fit whole SGDR cycles (cycle_len 1, cycle_mult 2: 1, 3, 7 "
         "or 15 epochs); change the epochs or the cycles"),
    ],
)
def test_a_bad_stage_is_one_line_and_exit_2_before_any_worker(tmp_path, overrides, message):
    # model.pretrained=null: the config's weights file is in ../shared, which a clone elsewhere lacks
    proc = launch(["launch/train.py", "--config", "configs/finetune.yaml", f"run.output_dir={tmp_path}", "model.pretrained=null", *overrides],
                  launcher="disttrain", check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"disttrain: error: configs/finetune.yaml: {message}"
    assert proc.stdout == "" and not any(tmp_path.iterdir()), "no worker started"


def _one_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = {line for line in proc.stderr.splitlines() if line.startswith("disttrain: error:")}
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    return errors.pop()


def test_imagenet_weights_that_cannot_be_downloaded_end_every_rank_with_exit_2_naming_file_url_and_folder(tmp_path, mnist_small):
    hub = tmp_path / "torch"
    # a proxy nobody listens on: the download fails at once here and on a machine with network alike
    env = {"TORCH_HOME": str(hub), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    start = time.monotonic()
    proc = launch(["launch/train.py", f"data.root={mnist_small}", f"run.output_dir={tmp_path}", "model.name=mobilenet_v2",
                   "model.pretrained=imagenet", "train.precision=no"], launcher="disttrain", check=False, timeout=120, env=env)
    error = _one_error(proc)
    folder = hub / "hub" / "checkpoints"
    assert "mobilenet_v2-7ebf99e0.pth" in error and "https://download.pytorch.org/models/mobilenet_v2-7ebf99e0.pth" in error
    assert str(folder) in error and not any(folder.glob("*.pth"))
    assert time.monotonic() - start < 60, "no hang: the ranks that wait for the download are told it failed"


def test_a_pretrained_file_of_another_architecture_is_one_line_and_exit_2(tmp_path, mnist_small):
    import torch
    import torchvision

    weights = tmp_path / "mnv3.pt"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), weights)
    proc = launch(["launch/train.py", f"data.root={mnist_small}", f"run.output_dir={tmp_path}", "model.name=resnet18",
                   f"model.pretrained={weights}", "train.precision=no"], launcher="disttrain", check=False, timeout=120)
    assert f"{weights}: only 0 of" in _one_error(proc) and "is it a state dict of model.name's architecture?" in proc.stderr


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


def test_timm_weights_missing_from_the_cache_are_one_line_naming_the_file_and_the_fetch(tmp_path):
    """model.pretrained=timm never downloads: with an empty Hugging Face cache the launch stops
    before any worker, with one line naming the model, the file looked for and how to fetch it."""
    proc = launch(["launch/train.py", "model.name=timm/test_resnet", "model.pretrained=timm", f"run.output_dir={tmp_path / 'runs'}"],
                  launcher="disttrain", check=False, timeout=120, env={"HF_HOME": str(tmp_path / "hf")})
    line = _one_error(proc)
    assert line == (f"disttrain: error: model.pretrained=timm: timm's weights of test_resnet are not in the local cache (looked for "
                    f"{tmp_path}/hf/hub/models--timm--test_resnet.r160_in1k/snapshots/*/model.safetensors and {tmp_path}/hf/hub/"
                    "models--timm--test_resnet.r160_in1k/snapshots/*/pytorch_model.bin); on a machine with network run "
                    "`hf download timm/test_resnet.r160_in1k` and copy the cache folder here (HF_HOME), or give the "
                    "weights file's path")
    assert proc.stdout == "" and not (tmp_path / "runs").exists(), "no worker started"
