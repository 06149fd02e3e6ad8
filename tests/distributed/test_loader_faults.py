"""Data-loader workers on real processes: they start from a fork server (never forked from a
training process whose other threads may hold locks: disttrain/data/workers.py), many runs in a row
in the same processes finish, and a worker that delivers nothing ends the job within
`data.worker_timeout` with one line naming the rank, the loader and the worker."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from conftest import launch

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def folder_with_bad_files(tmp_path_factory, mnist_small) -> Path:
    """The MNIST sample with three undecodable files: an empty and a truncated PNG in train, a text
    file named .jpg in valid (the issue's failing case)."""
    root = tmp_path_factory.mktemp("bad") / "mnist"
    shutil.copytree(mnist_small, root)
    (root / "train" / "3" / "empty.png").write_bytes(b"")
    first = sorted((root / "train" / "5").iterdir())[0]
    (root / "train" / "5" / "cut.png").write_bytes(first.read_bytes()[:60])
    (root / "valid" / "7" / "notes.jpg").write_text("not an image\n")
    return root


def _demo(root: Path, out: Path) -> list[str]:
    return ["configs/demo.yaml", f"data.root={root}", f"run.output_dir={out}", "train.epochs=1", "data.num_workers=1",
            "data.batch_size=32", "train.precision=no", "log.progress=true", "checkpoint.resume=never"]


RUNS = 3


def test_many_runs_in_a_row_start_their_loader_workers_and_finish(tmp_path, folder_with_bad_files):
    """The failing case of the issue (2 processes, the demo config, a small folder with undecodable
    files, 1 epoch, a loader worker each for training and validation, W&B offline, progress bars),
    RUNS times in the same processes: 2 x 2 x RUNS worker starts with every thread of the earlier
    runs alive. A stuck worker would end it within data.worker_timeout with its one line."""
    done = launch(["tests/distributed/repeat_worker.py", str(RUNS), *_demo(folder_with_bad_files, tmp_path),
                   "data.worker_timeout=60"], nproc=2, env={"WANDB_MODE": "offline"}, timeout=900)
    assert [line for line in done.stdout.splitlines() if line.startswith("run ")] == [f"run {i}: exit 0" for i in range(RUNS)]
    assert done.stdout.count("3 undecodable file(s) skipped") == RUNS
    for i in range(RUNS):
        rows = (tmp_path / f"run{i}" / "results.json").read_text()
        assert '"accuracy"' in rows


def test_a_worker_that_delivers_nothing_ends_the_job_with_one_line(tmp_path, folder_with_bad_files):
    """Rank 1's validation worker holds still at its first image (a test-only dataset, imported by the
    worker itself): within data.worker_timeout rank 1 stops the job with one line naming the rank,
    the loader and the worker, instead of rank 0 waiting in evaluate's all-reduce until
    train.collective_timeout (300 s)."""
    args = _demo(folder_with_bad_files, tmp_path) + ["run.name=stall", "train.max_steps_per_epoch=2", "data.worker_timeout=12",
                                                    "log.progress=false", "log.wandb.mode=disabled"]
    done = launch(["tests/distributed/run_worker.py", args[0], "--stall", "1", *args[1:]], nproc=2, launcher="disttrain",
                  check=False, timeout=240)
    lines = [line for line in done.stderr.splitlines() if line.startswith("disttrain: ")]
    stalled = [line for line in lines if "delivered no batch" in line]
    assert len(stalled) == 1, done.stderr[-4000:]
    assert re.fullmatch(r"disttrain: error: rank 1: the valid loader's worker 0 \(pid \d+, alive: stuck\) delivered no batch for "
                        r"12 s \(data\.worker_timeout\); stopping the job instead of leaving the other ranks waiting in a collective",
                        stalled[0]), stalled[0]
    # rank 0, waiting in evaluate's all-reduce, fails too once rank 1 has left (its gloo connection
    # closes) or the launcher stops it: either way within seconds of rank 1's line
    assert re.search(r"disttrain: the job failed: .*rank 1 exited with code 1", done.stderr), done.stderr[-4000:]
    assert done.returncode == 1
    assert not (tmp_path / "stall" / "results.json").exists()
