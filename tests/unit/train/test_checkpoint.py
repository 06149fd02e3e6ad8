"""Checkpoint files: atomic saves, the `latest` pointer, pruning, what a killed save leaves (here an
exception in one process; tests/distributed/test_resume.py SIGKILLs a real 2-process save) and its
clearing at start-up, and the fsyncs before and after each rename."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from disttrain.train.checkpoint import (CheckpointError, atomic_save, clear_leftovers, find_latest, load_checkpoint, save_checkpoint,
                                  set_aside_later)
from disttrain.dist.jobgroup import JobGroup


@pytest.fixture(scope="module")
def accelerator():
    """The job's group of this one process (no process group: its barriers return at once)."""
    return JobGroup(1)


def _save(accelerator, run_dir, step, keep_last=2, value=0.0, tag=None):
    shared = {"model": {"w": torch.full((3,), value)}, "history": []}
    return save_checkpoint(accelerator, run_dir, step, shared, {"augment": {}}, {"global_step": step, "world_size": 1}, keep_last, tag)


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


def test_start_up_clears_what_killed_saves_left_off_cycle_ones_too(tmp_path, accelerator):
    _save(accelerator, tmp_path, 10)
    root = tmp_path / "checkpoints"
    left = [root / "step-00000012.tmp", root / "step-00000010-stage1.tmp"]  # a periodic save and a stage's (after its sweep)
    for folder in left:
        folder.mkdir()
        (folder / "rank0.pt").write_bytes(b"half")
    (root / "latest.tmp").write_text("step-00000012\n")  # the pointer's, killed before its rename
    (tmp_path / ".model.pt.tmp4242").write_bytes(b"half")  # atomic_save's, of model.pt
    (tmp_path / "config.yaml").write_text("run: {}\n")
    (tmp_path / ".result.json.tmp-7").write_text("{}")  # not a save's: another command's, left alone
    assert clear_leftovers(tmp_path) == [".model.pt.tmp4242", "checkpoints/latest.tmp", "checkpoints/step-00000010-stage1.tmp",
                                         "checkpoints/step-00000012.tmp"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000010"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".result.json.tmp-7", "checkpoints", "config.yaml"]
    assert find_latest(tmp_path).name == "step-00000010" and clear_leftovers(tmp_path) == []
    assert clear_leftovers(tmp_path / "new") == []  # a run dir not made yet


def test_every_file_and_rename_is_synced(tmp_path, accelerator, monkeypatch):
    """What os.fsync was given, by path (/proc/self/fd): a spy that calls the real fsync."""
    synced, real_fsync = [], os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    final = _save(accelerator, tmp_path, 3, tag="stage1")
    tmp, root = str(final) + ".tmp", str(tmp_path / "checkpoints")
    # every file of the checkpoint and its directory before the rename, the pointer, then the folder of both renames
    assert synced == [f"{tmp}/{name}" for name in sorted(os.listdir(final), key=lambda n: synced.index(f"{tmp}/{n}"))] + [
        tmp, f"{root}/latest.tmp", root]
    assert sorted(os.listdir(final)) == ["meta.json", "rank0.pt", "shared.pt"]
    synced.clear()
    atomic_save({"x": 1}, tmp_path / "model.pt")
    assert synced == [f"{tmp_path}/.model.pt.tmp{os.getpid()}", str(tmp_path)]


def test_the_preemption_flag_overrides_an_inherited_ignore_and_keeps_usr1_from_child_processes(tmp_path):
    """In a process of its own (the flag changes the process's signal handling for good): USR1
    ignored as the sbatch script's launcher leaves it and blocked as launch/train.py does before its
    imports, sent once then (while the modules load), the flag installed, a child process started,
    then USR1 sent to the child. The flag is set by the signal that came before it was installed;
    the child has USR1 blocked (pending, not delivered: SLURM's signal to the whole step must not kill
    a loader worker) and exits normally."""
    script = textwrap.dedent("""
        import os, signal, subprocess, sys
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # as inherited from the launcher
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # as launch/train.py, first
        os.kill(os.getpid(), signal.SIGUSR1)
        from disttrain.train.checkpoint import PreemptionFlag
        flag = PreemptionFlag().install()
        assert flag.wait(60) and flag.signal_name == "SIGUSR1"
        child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        os.kill(child.pid, signal.SIGUSR1)
        status = dict(line.split(":", 1) for line in open(f"/proc/{child.pid}/status").read().splitlines())
        bit = 1 << (signal.SIGUSR1 - 1)
        print("blocked", bool(int(status["SigBlk"], 16) & bit), "pending", bool(int(status["ShdPnd"], 16) & bit))
        child.stdin.close()
        print("child exit", child.wait())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["blocked True pending True", "child exit 0"], done.stdout
