"""Two "machines" on one host: two `accelerate launch --num_machines 2 --machine_rank 0|1` over
loopback, one process each, train together and agree with a 2-process run on one machine."""

import json
import subprocess

import pytest

from conftest import BIN, REPO, free_port, launch, run_env

pytestmark = pytest.mark.dist


def test_two_machines_on_loopback_train_and_agree(tmp_path, mnist_small):
    run = ["launch/train.py", "--config", "configs/demo.yaml", f"data.root={mnist_small}", "train.epochs=1",
           "data.batch_size=16", "data.num_workers=0", "log.progress=false", "checkpoint.every_n_steps=4", "train.precision=no",
           "train.threads=1"]  # each "machine" would take both cores (one rank per machine): the same threads as the 2-process run
    port = str(free_port())
    machines = [
        subprocess.Popen(
            [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
             "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--num_processes", "2",
             "--mixed_precision", "no", "--dynamo_backend", "no", *run, f"run.output_dir={tmp_path}", "run.name=two"],
            cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outputs = [m.communicate(timeout=300) for m in machines]
    for machine, (out, err) in zip(machines, outputs):
        assert machine.returncode == 0, err[-3000:]
    assert "training on 2 process(es)" in outputs[0][0] and outputs[1][0].strip() == ""  # machine 1 prints nothing
    launch(run + [f"run.output_dir={tmp_path}", "run.name=one"], nproc=2)
    two = json.loads((tmp_path / "two" / "results.json").read_text())["epochs"][0]
    one = json.loads((tmp_path / "one" / "results.json").read_text())["epochs"][0]
    assert (two["train_loss"], two["valid_loss"], two["accuracy"]) == (one["train_loss"], one["valid_loss"], one["accuracy"])
    step = tmp_path / "two" / "checkpoints" / "step-00000010"  # every rank wrote its part
    assert sorted(p.name for p in step.iterdir()) == ["meta.json", "rank0.pt", "rank1.pt", "shared.pt"]
