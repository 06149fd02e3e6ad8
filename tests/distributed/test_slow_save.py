"""Checkpoint saves on real processes: a save that outlasts `train.collective_timeout` does not fail
the job (the ranks wait for it on the job's own group), and what killed saves left in the run dir is
cleared when the next run starts."""

from __future__ import annotations

import json
import re

import pytest

from conftest import launch

pytestmark = pytest.mark.dist

TIMEOUT = 10  # train.collective_timeout here; the main process's part of the save takes 1.5 x as long


def test_a_save_longer_than_the_collective_timeout_does_not_fail_the_job(tmp_path, mnist_small):
    run_dir, markers = tmp_path / "slow", tmp_path / "markers"
    markers.mkdir()
    # what killed saves of an earlier run left: a stage's checkpoint after its sweep, the pointer, model.pt's
    leftovers = [run_dir / "checkpoints" / "step-00000001-stage1.tmp", run_dir / "checkpoints" / "latest.tmp",
                 run_dir / ".model.pt.tmp4242"]
    leftovers[0].mkdir(parents=True)
    (leftovers[0] / "rank0.pt").write_bytes(b"half")
    for path in leftovers[1:]:
        path.write_text("half")
    done = launch(["tests/distributed/slow_save_worker.py", "2", str(markers), f"data.root={mnist_small}",
                   f"run.output_dir={tmp_path}", "run.name=slow", "train.epochs=1", "train.max_steps_per_epoch=2",
                   "data.batch_size=16", "data.num_workers=0", "log.progress=false", "train.precision=no",
                   f"train.collective_timeout={TIMEOUT}"], nproc=2)
    assert (markers / "rank1-saved").is_file()  # the hook held rank 0's save, with rank 1 in the barrier
    assert re.search(r"^\s*0\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\d\d:\d\d", done.stdout, flags=re.M), done.stdout  # the epoch row
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]
    assert json.loads((root / "step-00000002" / "meta.json").read_text())["global_step"] == 2
    assert (run_dir / "model.pt").is_file() and len(json.loads((run_dir / "results.json").read_text())["epochs"]) == 1
    assert not any(path.exists() for path in leftovers)
    assert (f"removed what killed saves left in {run_dir}: .model.pt.tmp4242, checkpoints/latest.tmp, "
            "checkpoints/step-00000001-stage1.tmp") in done.stdout, done.stdout
