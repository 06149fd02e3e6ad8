"""checkpoint.keep_best: the N best epoch-end checkpoints by checkpoint.monitor in
checkpoints/best/, on real checkpoint files (one process: the job group's barriers return at once),
beside keep_last's pruning and find_latest, across a resume, and what start-up clears and sets aside."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from disttrain.dist.jobgroup import JobGroup
from disttrain.train.checkpoint import (Checkpointer, CheckpointError, clear_leftovers, find_latest, load_checkpoint, save_checkpoint,
                                        set_aside_later)

SERIES = [0.9, 0.5, 0.7, 0.4, 0.6]  # epochs 1..5, saved at steps 10..50


@pytest.fixture(scope="module")
def group():
    return JobGroup(1)


def _checkpointer(run_dir, group, keep_best=2, monitor="valid_loss", keep_last=2):
    return Checkpointer(run_dir, None, keep_last, {"classes": ["a", "b"]}, group, keep_best=keep_best, monitor=monitor)


def _epoch_end(ckpt: Checkpointer, epoch: int, value: float) -> Path | None:
    """What the trainer does at an epoch end: the checkpoint (its weights hold the epoch), then save_best."""
    step = 10 * epoch
    shared = {"model": {"w": torch.full((4,), float(epoch))}}
    path = save_checkpoint(ckpt.group, ckpt.run_dir, step, shared, {"augment": {}}, {"global_step": step, "epoch": epoch, "world_size": 1},
                           ckpt.keep_last)
    return ckpt.save_best(path, epoch, value)


def _index(run_dir) -> list[dict]:
    return json.loads((run_dir / "checkpoints" / "best" / "index.json").read_text())


def _folders(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints" / "best").iterdir() if p.is_dir())


def _weights_epoch(path: Path) -> float:
    _, shared, _ = load_checkpoint(path, rank=0, world_size=1)
    return float(shared["model"]["w"][0])


def test_the_two_lowest_losses_are_kept_by_value_and_by_name(tmp_path, group):
    ckpt = _checkpointer(tmp_path, group)
    kept = [_epoch_end(ckpt, epoch, v) for epoch, v in enumerate(SERIES, start=1)]
    assert [p.name if p else None for p in kept] == ["step-00000010", "step-00000020", "step-00000030", "step-00000040", None]
    assert _index(tmp_path) == [
        {"name": "step-00000040", "epoch": 4, "monitor": "valid_loss", "value": 0.4},
        {"name": "step-00000020", "epoch": 2, "monitor": "valid_loss", "value": 0.5},
    ]
    assert _folders(tmp_path) == ["step-00000020", "step-00000040"]  # 0.9's and 0.7's copies went as they dropped out
    assert ckpt.best_path() == tmp_path / "checkpoints" / "best" / "step-00000040"
    assert _weights_epoch(ckpt.best_path()) == 4.0 and _weights_epoch(tmp_path / "checkpoints" / "best" / "step-00000020") == 2.0


def test_keep_last_pruning_leaves_best_alone_and_find_latest_takes_the_newest_regular_one(tmp_path, group):
    ckpt = _checkpointer(tmp_path, group, keep_last=1)
    for epoch, v in enumerate(SERIES, start=1):
        _epoch_end(ckpt, epoch, v)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["best", "latest", "step-00000050"]
    assert find_latest(tmp_path) == root / "step-00000050"
    (root / "latest").unlink()  # the fallback scan does not look into best/ either
    assert find_latest(tmp_path) == root / "step-00000050"
    assert _folders(tmp_path) == ["step-00000020", "step-00000040"]
    assert (root / "best" / "step-00000040" / "meta.json").is_file()  # complete, its original long pruned
    assert set_aside_later(tmp_path, 50) is None


def test_the_copies_are_hard_links_where_the_filesystem_allows(tmp_path, group):
    ckpt = _checkpointer(tmp_path, group, keep_last=5)
    path = _epoch_end(ckpt, 1, 0.3)
    regular = tmp_path / "checkpoints" / "step-00000010"
    for name in ("shared.pt", "rank0.pt", "meta.json"):
        assert os.stat(path / name).st_ino == os.stat(regular / name).st_ino


def test_copies_where_the_best_folder_is_on_another_filesystem(tmp_path, group):
    """checkpoints/best links to a folder in /dev/shm (tmpfs): a hard link across filesystems fails
    (EXDEV) and the files are copied."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's tmp_path")
    other = shm / f"disttrain-test-best-{os.getpid()}"
    other.mkdir()
    try:
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "best").symlink_to(other)
        ckpt = _checkpointer(tmp_path, group)
        path = _epoch_end(ckpt, 1, 0.3)
        assert os.stat(path / "shared.pt").st_dev == os.stat(other).st_dev
        assert _weights_epoch(path) == 1.0 and _index(tmp_path)[0]["name"] == "step-00000010"
    finally:
        shutil.rmtree(other)


def test_accuracy_is_kept_highest_first_and_a_tie_keeps_the_earlier(tmp_path, group):
    ckpt = _checkpointer(tmp_path, group, monitor="accuracy")
    for epoch, v in enumerate([0.80, 0.90, 0.85, 0.90, 0.70], start=1):
        _epoch_end(ckpt, epoch, v)
    assert [(e["name"], e["value"]) for e in _index(tmp_path)] == [("step-00000020", 0.90), ("step-00000040", 0.90)]
    _epoch_end(ckpt, 6, 0.90)  # a third 0.90 ranks after both
    assert [e["epoch"] for e in _index(tmp_path)] == [2, 4] and _folders(tmp_path) == ["step-00000020", "step-00000040"]
    ckpt = _checkpointer(tmp_path / "ties", group, monitor="valid_loss", keep_best=1)
    _epoch_end(ckpt, 1, 0.5)
    assert _epoch_end(ckpt, 2, 0.5) is None and ckpt.best_path().name == "step-00000010"


def test_nan_is_never_kept(tmp_path, group):
    ckpt = _checkpointer(tmp_path, group, keep_best=3)
    assert _epoch_end(ckpt, 1, math.nan) is None and ckpt.best_path() is None
    _epoch_end(ckpt, 2, 0.7)
    _epoch_end(ckpt, 3, math.nan)
    assert [e["epoch"] for e in _index(tmp_path)] == [2] and _folders(tmp_path) == ["step-00000020"]


def test_keep_best_zero_keeps_nothing(tmp_path, group):
    ckpt = _checkpointer(tmp_path, group, keep_best=0)
    assert _epoch_end(ckpt, 1, 0.1) is None and ckpt.best_path() is None
    assert not (tmp_path / "checkpoints" / "best").exists()


def test_a_resumed_run_continues_the_list(tmp_path, group):
    first = _checkpointer(tmp_path, group)
    for epoch, v in enumerate(SERIES[:3], start=1):  # 0.9, 0.5, 0.7: keeps epochs 2, 3
        _epoch_end(first, epoch, v)
    assert [e["epoch"] for e in _index(tmp_path)] == [2, 3]
    resumed = _checkpointer(tmp_path, group)  # a new process on the same run dir
    assert set_aside_later(tmp_path, 30) is None  # what run.train does at start: nothing later than step 30
    assert resumed.best_path().name == "step-00000020"
    for epoch, v in enumerate(SERIES[3:], start=4):  # 0.4, 0.6: 0.4 and 0.5 are the best two
        _epoch_end(resumed, epoch, v)
    assert [e["epoch"] for e in _index(tmp_path)] == [4, 2] and _folders(tmp_path) == ["step-00000020", "step-00000040"]


def test_a_run_that_does_not_continue_them_sets_the_later_best_ones_aside(tmp_path, group):
    ckpt = _checkpointer(tmp_path, group, keep_best=3, keep_last=5)
    for epoch, v in enumerate(SERIES, start=1):  # kept: epochs 4, 2, 5
        _epoch_end(ckpt, epoch, v)
    aside = set_aside_later(tmp_path, 30)  # a resume from step 30: epochs 4 and 5 belong to another timeline
    assert sorted(p.name for p in (aside / "best").iterdir()) == ["index.json", "step-00000040", "step-00000050"]
    assert [e["epoch"] for e in json.loads((aside / "best" / "index.json").read_text())] == [4, 5]
    assert [e["epoch"] for e in _index(tmp_path)] == [2] and _folders(tmp_path) == ["step-00000020"]
    resumed = _checkpointer(tmp_path, group, keep_best=3, keep_last=5)
    _epoch_end(resumed, 4, 0.8)
    assert [e["epoch"] for e in _index(tmp_path)] == [2, 4]
    aside = set_aside_later(tmp_path, None)  # a fresh start: all of them
    assert _index(tmp_path) == [] and _folders(tmp_path) == [] and len(json.loads((aside / "best" / "index.json").read_text())) == 2


def test_a_list_ranked_by_another_monitor_is_set_aside_not_continued(tmp_path, group):
    ckpt = _checkpointer(tmp_path, group)
    _epoch_end(ckpt, 1, 0.3)
    other = _checkpointer(tmp_path, group, monitor="accuracy")
    assert other.best_path() is None
    _epoch_end(other, 2, 0.9)
    assert _index(tmp_path) == [{"name": "step-00000020", "epoch": 2, "monitor": "accuracy", "value": 0.9}]
    aside = [p for p in (tmp_path / "checkpoints").glob("superseded-*/best")]
    assert len(aside) == 1 and (aside[0] / "step-00000010" / "meta.json").is_file()


def test_start_up_clears_what_a_killed_save_best_left(tmp_path, group):
    ckpt = _checkpointer(tmp_path, group)
    for epoch, v in enumerate(SERIES[:2], start=1):
        _epoch_end(ckpt, epoch, v)
    best = tmp_path / "checkpoints" / "best"
    (best / "step-00000030.tmp").mkdir()  # killed while copying
    (best / ".index.json.tmp").write_text("[")  # killed while writing the index
    (best / "step-00000005").mkdir()  # copied, killed before the index named it
    (best / "step-00000005" / "meta.json").write_text("{}")
    assert clear_leftovers(tmp_path) == ["checkpoints/best/.index.json.tmp", "checkpoints/best/step-00000005",
                                         "checkpoints/best/step-00000030.tmp"]
    assert _folders(tmp_path) == ["step-00000010", "step-00000020"]


def test_a_damaged_index_is_refused_naming_it(tmp_path, group):
    ckpt = _checkpointer(tmp_path, group)
    _epoch_end(ckpt, 1, 0.3)
    (tmp_path / "checkpoints" / "best" / "index.json").write_text('[{"name": "x"}]')
    with pytest.raises(CheckpointError, match=r"best/index.json: not a list of best checkpoints .* move the folder"):
        _checkpointer(tmp_path, group).best_path()
