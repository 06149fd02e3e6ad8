"""launch/slurm/train.sbatch across four SLURM nodes (four slurmd on this host), one CPU process per
node, with the LR sweep, preempted on one node at a fixed step, requeued and resumed; the result is
compared with the same run as 4 processes on one machine (`accelerate launch --num_processes 4`).
benchmarks/slurm_nodes.py runs the same with 2 processes per node (8 ranks), and adds the
uninterrupted 4-node job and 4 machines on loopback (too slow for the suite on 2 cores)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import launch, make_folder
from test_slurm import _failure_report, _sbatch, completed_runs

pytestmark = pytest.mark.slurm

NODES, PER_NODE = 4, 1  # 4 ranks: more than 2, so a sum's order matters (a + b = b + a, a + b + c need not)
GLOBAL_BATCH = 32  # 8 steps per epoch on the 256 training images, at any world size that divides it
PREEMPT_NODE, PREEMPT_STEP = 3, 11  # node dt4's ranks are signalled once 11 steps are done; log point 12 stops them all
RUN = ["model.name=tiny/cnn", "data.load_size=8", "data.image_size=8", "data.num_workers=0",
       "train.epochs=2", "optim.lr=auto", "sweep.num_iter=12", "sweep.start_lr=1e-3", "sweep.end_lr=1", "sweep.beta=0.5",
       "sweep.skip_start=1", "sweep.skip_end=1", "sweep.method=minimum", "sweep.save_per_rank=true", "log.every_n_steps=2",
       "log.progress=false", "log.wandb.mode=disabled", "train.precision=no", "train.threads=1", "train.pin_cores=off"]
TIMING = ("seconds", "images_per_sec")  # results.json's wall-clock figures: the rest must match to the last digit


def overrides(world: int) -> list[str]:
    """The run's overrides at `world` ranks (the same global batch)."""
    return [*RUN, f"data.batch_size={GLOBAL_BATCH // world}"]


@pytest.fixture(scope="module")
def tints(tmp_path_factory):
    """4 classes x (64 train + 16 valid) 8x8 PNGs: 8 steps of 32 images per epoch."""
    counts = {"train": {c: 64 for c in "abcd"}, "valid": {c: 16 for c in "abcd"}}
    return make_folder(tmp_path_factory.mktemp("tints") / "tints", counts, size=(8, 8))


def _epochs(run_dir):
    rows = json.loads((run_dir / "results.json").read_text())
    return rows["peak_lr"], [{k: v for k, v in row.items() if k not in TIMING} for row in rows["epochs"]]


def _weights(run_dir):
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=False)["model"]


def test_four_nodes_preempted_on_one_node_resume_to_the_result_of_4_processes_on_one_machine(slurm_four_nodes, tmp_path, tints):
    env = {**slurm_four_nodes, "CPU_PROCS_PER_NODE": str(PER_NODE), "TRAIN_SCRIPT": "tests/slurm/step_preempt_worker.py",
           "PREEMPT_NODE": str(PREEMPT_NODE), "PREEMPT_STEP": str(PREEMPT_STEP)}
    world = NODES * PER_NODE
    _, job = _sbatch(env, tmp_path, f"data.root={tints}", f"run.output_dir={tmp_path}", "run.name=nodes", *overrides(world),
                     wait=False, nodes=NODES)
    assert job, "sbatch gave no job id"
    # meanwhile, the reference: the same run as that many processes on one machine
    launch(["launch/train.py", "--config", "configs/demo.yaml", f"data.root={tints}", f"run.output_dir={tmp_path}",
            "run.name=one", *overrides(world)], nproc=world)

    log, runs = completed_runs(env, job, tmp_path, restarts=1)
    first, resumed = runs
    assert log.count(f"{NODES} node(s) x {PER_NODE} process(es)") == 2 and f"training on {world} process(es)" in first
    # every rank stopped at the log point after the signalled step, in a checkpoint of that step, and exited 75
    saved = re.findall(r"disttrain: preempted: checkpoint saved in (\S+); exiting with 75", first)
    assert len(saved) == world and set(saved) == {str(tmp_path / "nodes" / "checkpoints" / "step-00000012")}, first[-6000:]
    assert {rank: code for rank, (code, _) in _failure_report(first).items()} == dict.fromkeys(range(world), 75), first[-6000:]
    assert f"requeueing job {job}" in first and "LR sweep: suggestion" in first
    assert f"resuming from {saved[0]}: " in resumed and "LR sweep" not in resumed, resumed[-6000:]  # no second sweep

    nodes, one = tmp_path / "nodes", tmp_path / "one"
    # each rank's own sweep file (the curve that rank computed from the all-reduced losses, written by it;
    # nothing of the curve is broadcast): the same curve on every rank, and each equal to that rank's on one machine
    sweeps = [json.loads((nodes / f"lr_sweep.rank{r}.json").read_text()) for r in range(world)]
    shared = [{k: v for k, v in s.items() if k != "local_losses"} for s in sweeps]
    assert all(s == shared[0] for s in shared) and shared[0]["suggestion"] is not None and shared[0]["world_size"] == world
    assert len({json.dumps(s["local_losses"]) for s in sweeps}) == world  # each rank swept on its own share
    assert sweeps == [json.loads((one / f"lr_sweep.rank{r}.json").read_text()) for r in range(world)]
    # the same epochs, every digit, and the same weights, bit for bit
    assert _epochs(nodes) == _epochs(one) and len(_epochs(nodes)[1]) == 2
    a, b = _weights(nodes), _weights(one)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (nodes / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(2, 17, 2))  # every log point once
