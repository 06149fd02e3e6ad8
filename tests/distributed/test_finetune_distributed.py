"""Staged fine-tuning on real processes: a frozen stage then an unfrozen one keeps every rank's
parameters, buffers and optimizer state bitwise identical (DDP is rebuilt per stage, so the weights
unfrozen later are all-reduced too), frozen weights stay the pretrained file's bitwise, and a run
killed in stage 2 resumes there (without sweeping again) and ends bitwise equal to an uninterrupted
run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from conftest import launch
from test_resume import Job, _wait_for

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A resnet18 state dict with a 1000-class head (the shape of torchvision's ImageNet file), its
    own seeded weights: what matters here is that every rank starts from the same file."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def _config(tmp_path: Path, mnist: Path, pretrained: Path, train_bn: bool, second_lr="2.0e-3", periodic=False,
            bn_stats=False) -> Path:
    cfg = {
        "run": {"name": "ft", "output_dir": str(tmp_path), "seed": 0},
        "data": {"root": str(mnist), "load_size": 28, "image_size": 28, "batch_size": 8, "num_workers": 0},
        "augment": {"max_rotate": 0.0},
        "model": {"name": "resnet18", "pretrained": str(pretrained)},
        "finetune": {"groups": 3, "train_bn": train_bn, "freeze_bn_stats": bn_stats},
        "optim": {"name": "adamw", "weight_decay": 0.1},
        "train": {"precision": "no", "max_steps_per_epoch": 4},
        "log": {"progress": False, "every_n_steps": 2},
        "checkpoint": {"every_n_steps": 3} if periodic else {},
        "sweep": {"start_lr": 1.0e-5, "end_lr": 1.0, "num_iter": 30, "beta": 0.7, "skip_start": 2, "skip_end": 1},
        "stages": [
            {"name": "head", "epochs": 1, "freeze_to": -1, "lr": 1.0e-2},
            {"name": "all", "epochs": 2, "freeze_to": 0, "lr": second_lr, "lr_ratio": 10,
             "schedule": {"name": "sgdr", "cycle_len": 1, "cycle_mult": 1}},
        ],
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _equal(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs between ranks"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def swept_two_ranks(tmp_path_factory, mnist_small, pretrained):
    """The 2-process run (stage 2 at `lr: auto`, periodic checkpoints) through stage_worker.py, which
    trains exactly as launch/train.py does and dumps every rank's state at each stage end: the
    bitwise test's 2-process case and the resume test's uninterrupted reference. (dir, stdout)"""
    out = tmp_path_factory.mktemp("swept")
    config = _config(out, mnist_small, pretrained, True, second_lr="auto", periodic=True)
    done = launch(["tests/distributed/stage_worker.py", str(out), str(config)], nproc=2)
    return out, done.stdout


@pytest.mark.parametrize("nproc, train_bn, bn_stats", [(2, True, False), (3, False, True)])
def test_every_rank_bitwise_identical_across_a_frozen_then_unfrozen_stage(tmp_path, mnist_small, pretrained, nproc, train_bn, bn_stats,
                                                                          request):
    if nproc == 2:
        tmp_path, stdout = request.getfixturevalue("swept_two_ranks")
        lrs = re.search(r"all \(2/2\): epochs 1-2, nothing frozen, swept peak LR (\S+) / (\S+) / (\S+) \(group 0 \.\. head\), "
                        r"sgdr \(cycle_len 1, cycle_mult 1\)", stdout)
        assert lrs, stdout
        first, middle, head = map(float, lrs.groups())
        assert head / first == pytest.approx(10, rel=1e-2) and middle == pytest.approx((first * head) ** 0.5, rel=1e-2)
    else:
        config = _config(tmp_path, mnist_small, pretrained, train_bn, bn_stats=bn_stats)
        stdout = launch(["tests/distributed/stage_worker.py", str(tmp_path), str(config)], nproc=nproc).stdout
        assert re.search(r"all \(2/2\): epochs 1-2, nothing frozen, BatchNorm running statistics kept, peak LR 2\.00e-04 / "
                         r"6\.32e-04 / 2\.00e-03 \(group 0 \.\. head\), sgdr \(cycle_len 1, cycle_mult 1\)", stdout), stdout
    assert re.search(r"head \(1/2\): epoch 0, groups 0-1 frozen.*one-cycle", stdout), stdout
    file = torch.load(pretrained, weights_only=True)
    for stage in (0, 1):
        states = [torch.load(tmp_path / f"stage{stage}-rank{r}.pt", weights_only=True) for r in range(nproc)]
        for rank, other in enumerate(states[1:], 1):
            _equal(states[0], other, f"stage {stage}, rank {rank}")
        params, buffers = states[0]["params"], states[0]["buffers"]
        assert not torch.equal(params["fc.weight"][:10], file["fc.weight"][:10]) and params["fc.weight"].shape == (10, 512)
        body = [k for k in params if not k.startswith("fc.")]
        norms = {k for k in body if k.startswith("bn") or ".bn" in k or "downsample.1" in k}
        if stage == 0:  # groups 0-1 frozen: every frozen weight is the file's, bitwise
            kept = [k for k in body if k not in norms] + ([] if train_bn else sorted(norms) + list(buffers))
            for key in kept:
                assert torch.equal((params | buffers)[key], file[key]), f"{key} changed while frozen"
            trained_norms = [k for k in norms if not torch.equal(params[k], file[k])]
            assert bool(trained_norms) == train_bn, "train_bn decides whether frozen groups' norms train"
            assert set(states[0]["trainable"]) == {"fc.weight", "fc.bias"} | (norms if train_bn else set())
        else:  # unfrozen: the body moved (with DDP kept from stage 0, the ranks would differ here)
            assert not torch.equal(params["conv1.weight"], file["conv1.weight"])
            assert not torch.equal(params["layer4.1.conv2.weight"], file["layer4.1.conv2.weight"])
            assert len(states[0]["trainable"]) == len(params)
            kept = [k for k in buffers if torch.equal(buffers[k], file[k])]
            assert (len(kept) == len(buffers)) == bn_stats, "freeze_bn_stats keeps every running statistic"
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows if "valid/loss" in r] == [0, 1, 1]
    assert [r["epoch"] for r in rows if "valid/loss" in r] == [1, 2, 3]
    lrs = {k for r in rows if r.get("stage") == 1 for k in r if k.startswith("train/lr/group")}
    assert lrs == {"train/lr/group0", "train/lr/group1", "train/lr/group2"}


def test_killed_in_stage_two_resumes_there_without_sweeping_and_equals_uninterrupted(tmp_path, mnist_small, pretrained, swept_two_ranks):
    def args(out: Path) -> list[str]:
        return ["launch/train.py", "--config", str(_config(out, mnist_small, pretrained, True, second_lr="auto", periodic=True))]

    reference, stdout = swept_two_ranks
    assert stdout.count("LR sweep: suggestion") == 1, stdout
    out = tmp_path / "b"
    with Job(args(out), tmp_path / "logs") as job:
        _wait_for(out / "ft" / "checkpoints" / "step-00000009", job)  # stage 2 (steps 5-12), mid-epoch
    assert not (out / "ft" / "results.json").exists()
    resumed = launch(args(out), nproc=2)
    assert re.search(r"resuming from \S+/step-0000000[5-9](-stage1)?: all, epoch [12]", resumed.stdout), resumed.stdout
    assert "LR sweep" not in resumed.stdout and "head (1/2)" not in resumed.stdout
    wa = torch.load(reference / "ft" / "model.pt", weights_only=True)["model"]
    wb = torch.load(out / "ft" / "model.pt", weights_only=True)["model"]
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs after resume"
    ra = json.loads((reference / "ft" / "results.json").read_text())
    rb = json.loads((out / "ft" / "results.json").read_text())
    assert ra["epochs"] and [(e["train_loss"], e["valid_loss"], e["accuracy"], e["stage"]) for e in ra["epochs"]] == \
        [(e["train_loss"], e["valid_loss"], e["accuracy"], e["stage"]) for e in rb["epochs"]]
    assert ra["peak_lr"] == rb["peak_lr"]


def test_a_precomputed_head_stage_gives_the_validation_of_the_same_stage_on_images(tmp_path, mnist_small, pretrained):
    """train_bn: false and no augmentation: the head sees the same frozen features either way, so
    the two runs differ only by float rounding (the body runs in other batch compositions)."""
    results = {}
    for precompute in (False, True):
        out = tmp_path / str(precompute)
        config = _config(out, mnist_small, pretrained, train_bn=False)
        done = launch(["launch/train.py", "--config", str(config), "stages.0.augment=false", f"stages.0.precompute={precompute}",
                       "stages.0.epochs=2", "stages.1.epochs=1", "stages.1.freeze_to=-1", "stages.1.augment=false",
                       f"stages.1.precompute={precompute}", "stages.1.schedule.name=constant"], nproc=2)
        assert ("precomputed the frozen body's output for 300 train + 110 valid images" in done.stdout) == precompute
        results[precompute] = json.loads((out / "ft" / "results.json").read_text())["epochs"]
    for on_images, on_features in zip(results[False], results[True], strict=True):
        assert on_images["valid_loss"] == pytest.approx(on_features["valid_loss"], rel=1e-3)
        assert on_images["train_loss"] == pytest.approx(on_features["train_loss"], rel=1e-3)
        assert abs(on_images["accuracy"] - on_features["accuracy"]) <= 1 / 110 + 1e-9
    assert len(results[True]) == 3 and results[True][0]["valid_loss"] != results[True][1]["valid_loss"]  # the head trained
