"""Two "machines" on one host: two `accelerate launch --num_machines 2 --machine_rank 0|1` over
loopback, two processes each (4 ranks: a sum over more than 2 ranks depends on its order), run the
LR sweep and train the tiny model together, and agree to every digit with 4 processes on one
machine. benchmarks/scale.py --multinode runs 4 machines x 2 processes against 8 on one."""

import json
import subprocess

import pytest

from conftest import BIN, REPO, free_port, launch, make_folder, run_env

pytestmark = pytest.mark.dist

MACHINES, PER_MACHINE = 2, 2
WORLD = MACHINES * PER_MACHINE


def test_two_machines_of_two_processes_on_loopback_sweep_train_and_agree_with_one_machine(tmp_path):
    data = make_folder(tmp_path / "data", {"train": {"a": 29, "b": 9, "c": 17}, "valid": {"a": 5, "b": 4, "c": 4}}, size=(8, 8))
    run = ["launch/train.py", "model.name=tiny/cnn", f"data.root={data}", "train.epochs=2", "data.batch_size=2",
           "data.num_workers=0", "log.progress=false", "checkpoint.every_n_steps=2", "train.precision=no", "train.threads=1",
           "optim.lr=auto", "sweep.num_iter=12", "sweep.start_lr=1e-4", "sweep.end_lr=1", "sweep.save_per_rank=true",
           f"run.output_dir={tmp_path}"]
    port = str(free_port())
    machines = [
        subprocess.Popen(
            [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_machines", str(MACHINES), "--machine_rank", str(rank),
             "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--num_processes", str(WORLD),
             "--mixed_precision", "no", "--dynamo_backend", "no", *run, "run.name=two"],
            cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(MACHINES)
    ]
    outputs = [m.communicate(timeout=400) for m in machines]
    for machine, (out, err) in zip(machines, outputs):
        assert machine.returncode == 0, err[-3000:]
    assert f"training on {WORLD} process(es)" in outputs[0][0] and all(out.strip() == "" for out, _ in outputs[1:])
    launch(run + ["run.name=one"], nproc=WORLD, timeout=400)

    two, one = tmp_path / "two", tmp_path / "one"
    sweeps = [[json.loads((d / f"lr_sweep.rank{r}.json").read_text()) for r in range(WORLD)] for d in (two, one)]
    assert sweeps[0] == sweeps[1], "a rank's sweep (its own losses too) differs between 2 machines and 1"
    shared = {k: v for k, v in sweeps[0][0].items() if k != "local_losses"}
    assert shared["suggestion"] is not None and all({k: v for k, v in s.items() if k != "local_losses"} == shared for s in sweeps[0])
    assert (two / "lr_sweep.json").read_bytes() == (one / "lr_sweep.json").read_bytes()
    epochs = [[(e["train_loss"], e["valid_loss"], e["accuracy"]) for e in json.loads((d / "results.json").read_text())["epochs"]]
              for d in (two, one)]
    assert len(epochs[0]) == 2 and epochs[0] == epochs[1]
    step = two / "checkpoints" / (two / "checkpoints" / "latest").read_text().strip()  # every rank, on every machine, wrote its part
    assert sorted(p.name for p in step.iterdir()) == ["meta.json", *(f"rank{r}.pt" for r in range(WORLD)), "shared.pt"]
