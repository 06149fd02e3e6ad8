"""16 real processes (gloo on CPU, 2 cores) of the tiny model (`tiny/cnn`, 8 x 8 px) in one launch
(tests/distributed/many_worker.py: the commands run one after another in the same processes):
the LR sweep and one epoch on uneven data, `disttrain evaluate` and `disttrain predict` of the
run's model.pt, then a run in which rank 1 is SIGKILLed at a fixed step. Each rank writes what it
saw to files of its own. The same evaluate and predict on 1 process are the reference.
benchmarks/scale.py runs these checks and more (shards, the resume, 32 processes, timings)."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

from conftest import launch, make_folder

pytestmark = pytest.mark.dist

RANKS = 16
KILLED_RANK, KILL_STEP = 1, 2
SHARED = ("lrs", "losses", "smoothed", "suggestions", "suggestion", "iterations", "stopped_early", "fallback", "method",
          "world_size", "global_batch_size")
"""What every rank's lr_sweep.rank<R>.json must hold bitwise alike (`local_losses` is each rank's own)."""


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """77 train images in classes of 41, 13 and 23 (16 ranks x 2 per batch: 3 steps, the last one
    short, ranks padded unevenly), 18 validation images (fewer than the ranks' batches)."""
    root = tmp_path_factory.mktemp("many")
    data = make_folder(root / "data", {"train": {"a": 41, "b": 13, "c": 23}, "valid": {"a": 7, "b": 5, "c": 6}}, size=(8, 8))
    out, alone = root / "out", root / "alone"
    out.mkdir()
    alone.mkdir()
    common = ["model.name=tiny/cnn", "data.num_workers=0", "train.threads=1", "log.progress=false", "train.precision=no",
              "log.wandb.mode=disabled"]
    model, valid = out / "train" / "model.pt", data / "valid"
    phases = f"train,evaluate={model}@{data},predict={model}@{valid},kill={KILLED_RANK}:{KILL_STEP}"
    proc = launch(["tests/distributed/many_worker.py", str(out), phases, *common, f"data.root={data}", "train.epochs=1",
                   "data.batch_size=2", "optim.lr=auto", "sweep.num_iter=16", "sweep.start_lr=1e-4", "sweep.end_lr=1",
                   "sweep.save_per_rank=true"], nproc=RANKS, launcher="disttrain", check=False, timeout=600)
    ended = time.time()
    launch(["tests/distributed/many_worker.py", str(alone), f"evaluate={model}@{data},predict={model}@{valid}", *common],
           launcher="python", timeout=180)
    return {"proc": proc, "ended": ended, "out": out, "alone": alone}


def test_every_rank_computes_the_same_sweep_curve_and_suggestion(job):
    ranks = [json.loads((job["out"] / "train" / f"lr_sweep.rank{r}.json").read_text()) for r in range(RANKS)]
    assert ranks[0]["suggestion"] is not None and ranks[0]["world_size"] == RANKS, ranks[0]
    for key in SHARED:
        assert all(r[key] == ranks[0][key] for r in ranks), f"{key} differs between ranks"
    assert len({json.dumps(r["local_losses"]) for r in ranks}) > 1, "the ranks saw the same batches"
    # the shared curve is built from every rank's own loss (each rank's file, before the all-reduce):
    # the all-reduced (float64) mean of 16 values, against their mean summed in another order
    own = np.asarray([r["local_losses"] for r in ranks], dtype=np.float64)
    np.testing.assert_allclose(ranks[0]["losses"], own.mean(axis=0), rtol=1e-12, atol=0)
    assert f"agreed by {RANKS} ranks" in job["proc"].stdout


def test_every_rank_takes_the_same_steps_on_uneven_data(job):
    seen = [json.loads((job["out"] / f"train.rank{r}.json").read_text()) for r in range(RANKS)]
    assert [s["epochs"] for s in seen] == [{"0": 3}] * RANKS  # ceil(77 / 16) = 5 images per rank, 2 per batch
    assert "global batch 32 = 2 per rank x 16 rank(s) x 1 accumulation, 3 steps per epoch" in job["proc"].stdout


def test_evaluate_and_predict_on_16_processes_equal_1_process(job):
    many, one = (json.loads((job[k] / "evaluate.json").read_text()) for k in ("out", "alone"))
    assert (many.pop("world_size"), one.pop("world_size")) == (RANKS, 1)
    assert many == one and many["count"] == 18
    assert (job["out"] / "predict.csv").read_bytes() == (job["alone"] / "predict.csv").read_bytes()


def test_a_rank_killed_at_a_fixed_step_ends_the_job_with_one_line_naming_it(job):
    proc = job["proc"]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("disttrain: ")]
    assert len(lines) == 1, proc.stderr[-4000:]
    assert re.match(rf"disttrain: the job failed: rank {KILLED_RANK} was killed by SIGKILL, ", lines[0]), lines[0]
    assert proc.returncode == 128 + 9
    waited = job["ended"] - float((job["out"] / "killed").read_text())
    assert waited < 60, f"the job ended {waited:.0f} s after rank {KILLED_RANK} died"  # 2 cores, 16 ranks, other jobs
    assert not (job["out"] / "kill" / "results.json").exists()
