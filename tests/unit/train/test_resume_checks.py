"""What exact resume rests on besides the checkpoint's own contents: the data loaders leave the process's
global random stream alone (dropout draws from it), a resume on data that changed is refused before
training, and train.deterministic turns on cuDNN's deterministic mode."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

from conftest import REPO, make_folder, run_env
from disttrain.train.build import data_identity
from disttrain.train.checkpoint import CheckpointError, Resume
from disttrain.data.folder import scan_image_folder
from disttrain.data.loader import RankBatchSampler, loader_generator, make_loader
from disttrain.data.prepare import PrepareSettings, prepare
from disttrain.data.shards import load_manifest


def test_iterating_a_loader_draws_nothing_from_the_global_random_stream():
    """A DataLoader iterator draws its workers' base seed when it starts (with no workers too): from
    torch's global generator unless the loader has its own. A resumed run starts its iterators at
    other points of that stream than the uninterrupted run did, so every draw there would shift the
    dropout masks that follow."""
    dataset = TensorDataset(torch.arange(10))
    for loader in (make_loader(dataset, 0, False, RankBatchSampler(10, 4, seed=0)),
                   make_loader(dataset, 0, False, RankBatchSampler(10, 4, seed=0), generator=loader_generator(0, 1, "train"))):
        torch.manual_seed(3)
        before = torch.get_rng_state()
        for epoch in range(2):
            loader.batch_sampler.set_epoch(epoch)
            assert sum(len(values) for (values,) in loader) == 10
        assert torch.equal(torch.get_rng_state(), before), "iterating the loader moved the global random stream"
    assert loader_generator(0, 1, "train").initial_seed() not in {loader_generator(0, 0, "train").initial_seed(),
                                                                  loader_generator(0, 1, "valid").initial_seed(),
                                                                  loader_generator(1, 1, "train").initial_seed()}


def _resume(meta: dict) -> Resume:
    return Resume(REPO / "runs" / "r" / "checkpoints" / "step-00000006", meta, {}, {})


def test_a_resume_on_data_that_changed_is_refused_with_one_line(tmp_path):
    root = make_folder(tmp_path / "data", {"train": {"a": 5, "b": 4}, "valid": {"a": 2, "b": 2}})
    saved = scan_image_folder(root, "train", "auto")
    meta = {"classes": saved.classes, "model": "resnet18", "samples": data_identity(saved)}
    assert meta["samples"] == {"train": 9, "valid": 4}
    _resume(meta).check("resnet18", saved.classes, data_identity(scan_image_folder(root, "train", "auto")))  # the same data

    (root / "train" / "b" / "001.png").unlink()
    now = scan_image_folder(root, "train", "auto")
    with pytest.raises(CheckpointError) as err:
        _resume(meta).check("resnet18", now.classes, data_identity(now))
    assert str(err.value) == (
        f"{_resume(meta).path}: the data changed since this checkpoint: its train split had 9 samples then and has 8 now; "
        "resume on the data it was saved with, or start fresh with checkpoint.resume=never"
    )
    (root / "valid" / "a" / "002.png").write_bytes((root / "valid" / "a" / "001.png").read_bytes())
    (root / "train" / "b" / "001.png").write_bytes((root / "train" / "b" / "002.png").read_bytes())
    now = scan_image_folder(root, "train", "auto")
    with pytest.raises(CheckpointError, match=r"its valid split had 4 samples then and has 5 now"):
        _resume(meta).check("resnet18", now.classes, data_identity(now))
    # a checkpoint saved before the counts were recorded is resumed as before
    _resume({k: v for k, v in meta.items() if k != "samples"}).check("resnet18", now.classes, data_identity(now))


def test_shards_are_counted_from_their_manifest(tmp_path):
    src = make_folder(tmp_path / "src", {"train": {"a": 3, "b": 2}, "valid": {"a": 1, "b": 1}})
    prepare(src, tmp_path / "shards", PrepareSettings(samples_per_shard=2, presize=16), workers=1, progress=False, log=lambda _: None)
    assert data_identity(load_manifest(tmp_path / "shards")) == {"train": 5, "valid": 2}


def test_train_deterministic_sets_cudnn_deterministic_mode():
    """In a process of its own (build_runtime sets up this process's cores and distributed state)."""
    code = (
        "import torch; from disttrain.models.checks import load_config; from disttrain.dist.runtime import build_runtime; "
        "torch.backends.cudnn.benchmark = True; "
        "build_runtime(load_config(None, ['train.deterministic=true'])); "
        "print(torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["True", "False"]
