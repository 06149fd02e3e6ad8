"""Checkpoint files: atomic saves, the `latest` pointer, pruning, and what a killed save leaves (here an
exception in one process; tests/distributed/test_resume.py SIGKILLs a real 2-process save)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from accelerate import Accelerator

from disttrain.checkpoint import CheckpointError, find_latest, load_checkpoint, save_checkpoint, set_aside_later


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def _save(accelerator, run_dir, step, keep_last=2, value=0.0):
    shared = {"model": {"w": torch.full((3,), value)}, "history": []}
    return save_checkpoint(accelerator, run_dir, step, shared, {"augment": {}}, {"global_step": step, "world_size": 1}, keep_last)


def test_save_load_prune_and_latest(tmp_path, accelerator):
    for step, value in ((3, 1.0), (6, 2.0), (9, 3.0)):
        _save(accelerator, tmp_path, step, value=value)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000006", "step-00000009"]
    assert (root / "latest").read_text().strip() == "step-00000009"
    meta, shared, rank = load_checkpoint(find_latest(tmp_path), rank=0, world_size=1)
    assert meta["global_step"] == 9 and torch.equal(shared["model"]["w"], torch.full((3,), 3.0))
    assert "torch" in rank["rng"] and "numpy" in rank["rng"]


def test_a_killed_save_leaves_the_previous_checkpoint_valid(tmp_path, accelerator, monkeypatch):
    _save(accelerator, tmp_path, 3, value=1.0)
    real_replace = os.replace

    def crash_on_rename(src, dst):  # the process dies between writing and renaming
        if str(src).endswith(".tmp") and "step-" in str(src):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_rename)
    with pytest.raises(KeyboardInterrupt):
        _save(accelerator, tmp_path, 6, value=2.0)
    monkeypatch.setattr(os, "replace", real_replace)
    root = tmp_path / "checkpoints"
    assert (root / "step-00000006.tmp" / "meta.json").is_file()  # the half-done save, complete but for its name
    assert find_latest(tmp_path) == root / "step-00000003"
    pointer = (root / "latest").read_text()
    (root / "latest").unlink()  # the fallback (highest complete step) does not take it either
    assert find_latest(tmp_path) == root / "step-00000003"
    (root / "latest").write_text(pointer)
    meta, shared, _ = load_checkpoint(find_latest(tmp_path), rank=0, world_size=1)
    assert meta["global_step"] == 3 and torch.equal(shared["model"]["w"], torch.full((3,), 1.0))
    _save(accelerator, tmp_path, 6, value=2.0)  # the next save clears the leftover
    assert not (root / "step-00000006.tmp").exists() and find_latest(tmp_path) == root / "step-00000006"


def test_a_pointer_to_a_missing_checkpoint_falls_back_to_the_newest_complete_one(tmp_path, accelerator):
    _save(accelerator, tmp_path, 3, keep_last=5)
    _save(accelerator, tmp_path, 6, keep_last=5)
    (tmp_path / "checkpoints" / "latest").write_text("step-00000099\n")
    assert find_latest(tmp_path).name == "step-00000006"
    (tmp_path / "checkpoints" / "step-00000006" / "meta.json").unlink()  # incomplete
    assert find_latest(tmp_path).name == "step-00000003"


def test_loading_refuses_other_world_sizes_and_broken_files(tmp_path, accelerator):
    path = _save(accelerator, tmp_path, 3)
    with pytest.raises(CheckpointError, match="saved by 1 processes, this run has 2; resume with the same number"):
        load_checkpoint(path, rank=1, world_size=2)  # every rank of the 2, rank 0 included, gets this error
    with pytest.raises(CheckpointError, match="saved by 1 processes, this run has 2"):
        load_checkpoint(path, rank=0, world_size=2)
    (path / "shared.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(path, rank=0, world_size=1)
    (path / "rank0.pt").unlink()
    with pytest.raises(CheckpointError, match="no state for rank 0"):
        load_checkpoint(path, rank=0, world_size=1)
    assert json.loads((path / "meta.json").read_text())["global_step"] == 3


def test_checkpoints_of_another_timeline_are_set_aside_not_pruned_against(tmp_path, accelerator):
    for step in (10, 20):
        _save(accelerator, tmp_path, step)
    root = tmp_path / "checkpoints"
    (root / "step-00000030.tmp").mkdir()  # a killed save: not a checkpoint, left for the next save to clear
    # resuming from step 10 (an explicit path): step 20 is past it, and so is `latest`
    aside = set_aside_later(tmp_path, 10)
    assert sorted(p.name for p in aside.iterdir()) == ["latest", "step-00000020"]
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000010", "step-00000030.tmp"]
    _save(accelerator, tmp_path, 12, keep_last=1, value=5.0)  # lower than 20: kept, and found as the newest
    assert find_latest(tmp_path).name == "step-00000012"
    assert set_aside_later(tmp_path, 12) is None  # continuing from the newest moves nothing
    # a fresh start: everything complete goes
    fresh = set_aside_later(tmp_path, None)
    assert [p.name for p in fresh.glob("step-*")] == ["step-00000012"] and find_latest(tmp_path) is None
    _save(accelerator, tmp_path, 3, keep_last=1)
    assert find_latest(tmp_path).name == "step-00000003"
