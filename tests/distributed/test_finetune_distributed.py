"""Staged fine-tuning on real processes.

One 3-stage run (frozen body with training norms; the head on precomputed activations after its own
LR sweep; everything unfrozen at another image size and batch size after another sweep) is made
uninterrupted once on 2 processes. It is the reference of:
- ranks: after every stage's last training step, before anything syncs them, every rank's
  parameters and optimizer state are bitwise identical (DDP is rebuilt per stage, so the weights
  unfrozen later are all-reduced too); frozen weights stay the pretrained file's bitwise;
- the same on a timm model (timm/test_resnet, its weights in a Hugging Face cache made here, the
  layer groups from timm's group_matcher), on 2 and on 3 processes;
- resume: the same run killed (by a hook, at fixed checkpoints) at a stage boundary, inside the
  precompute stage and right after the last stage's sweep, and resumed each time, writes bitwise the
  same checkpoints, weights and epoch table.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from conftest import launch

pytestmark = pytest.mark.dist

WORKER = "tests/distributed/run_worker.py"


@pytest.fixture(scope="module")
def timm_home(tmp_path_factory) -> Path:
    """An HF_HOME whose hub cache holds timm/test_resnet.r160_in1k's model.safetensors as
    huggingface_hub lays it out (refs/main -> a snapshot), with seeded weights and timm's
    1000-class head: `model.pretrained=timm` finds it there, as it would timm's real file."""
    import timm
    from safetensors.torch import save_file

    home = tmp_path_factory.mktemp("hf")
    repo = home / "hub" / "models--timm--test_resnet.r160_in1k"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(321)
    save_file(timm.create_model("test_resnet").state_dict(), str(snapshot / "model.safetensors"))
    return home


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A resnet18 state dict with a 1000-class head (the shape of torchvision's ImageNet file), its
    own seeded weights: what matters here is that every rank starts from the same file."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def _config(out: Path, mnist: Path, pretrained: Path | None, stages: list[dict], train_bn=True, bn_stats=False, model="resnet18",
            size=28) -> Path:
    cfg = {
        "run": {"name": "ft", "output_dir": str(out), "seed": 0},
        "data": {"root": str(mnist), "load_size": size, "image_size": size, "batch_size": 8, "num_workers": 0},
        "augment": {"max_rotate": 0.0},
        "model": {"name": model, "pretrained": str(pretrained) if pretrained else None},
        "finetune": {"groups": 3, "train_bn": train_bn, "freeze_bn_stats": bn_stats},
        "optim": {"name": "adamw", "weight_decay": 0.1},
        "train": {"precision": "no", "max_steps_per_epoch": 4},
        "log": {"progress": False, "every_n_steps": 2},
        "checkpoint": {"every_n_steps": 3, "keep_last": 100},
        "sweep": {"start_lr": 1.0e-5, "end_lr": 1.0, "num_iter": 20, "beta": 0.7, "skip_start": 2, "skip_end": 1},
        "stages": stages,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# Steps: stage 0 is steps 1-4 (checkpoints 3 and 4, its end); stage 1 sweeps (checkpoint 4-stage1) and
# trains steps 5-12 on precomputed activations (6, 8 its first epoch's end, 9, 12); stage 2 sweeps at
# 32 px from 36 with 12 per rank (12-stage2) and trains steps 13-16 (15, 16).
THREE_STAGES = [
    {"name": "norms", "epochs": 1, "freeze_to": -1, "lr": 1.0e-2},
    {"name": "head", "epochs": 2, "freeze_to": -1, "lr": "auto", "augment": False, "precompute": True},
    {"name": "all", "epochs": 1, "freeze_to": 0, "lr": "auto", "lr_ratio": 10, "image_size": 32, "load_size": 36, "batch_size": 12,
     "schedule": {"name": "sgdr", "cycle_len": 1, "cycle_mult": 1}},
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_small, pretrained):
    """The uninterrupted 3-stage run on 2 processes, every rank's state dumped at each stage's end:
    (out dir, stdout)."""
    out = tmp_path_factory.mktemp("reference")
    done = launch([WORKER, str(_config(out, mnist_small, pretrained, THREE_STAGES)), "--dump", str(out)], nproc=2)
    return out, done.stdout


def _equal(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
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


def _states(out: Path, stage: int, nproc: int) -> list[dict]:
    return [torch.load(out / f"stage{stage}-rank{r}.pt", weights_only=True) for r in range(nproc)]


def _norms(params) -> set[str]:
    return {k for k in params if not k.startswith("fc.") and (k.startswith("bn") or ".bn" in k or "downsample.1" in k)}


def test_three_stages_on_2_ranks_every_rank_computes_bitwise_the_same_weights(reference, pretrained):
    out, stdout = reference
    assert re.search(r"norms \(1/3\): epoch 0, groups 0-1 frozen; their normalization layers train, peak LR 1\.00e-02", stdout), stdout
    assert re.search(r"head: precomputed the frozen body's output for 300 train \+ 110 valid images in [\d.]+ s \(512 per image, "
                     r"each rank keeps its own share as fp16\)", stdout), stdout
    assert re.search(r"head \(2/3\): epochs 1-2, groups 0-1 frozen, swept peak LR \S+ \(every group\), one-cycle, 28 px from 28 "
                     r"\(precomputed activations, 0\.\d\d MB of fp16 per rank\), batch 8 per rank", stdout), stdout
    lrs = re.search(r"all \(3/3\): epoch 3, nothing frozen, swept peak LR (\S+) / (\S+) / (\S+) \(group 0 \.\. head\), "
                    r"sgdr \(cycle_len 1, cycle_mult 1\), 32 px from 36 \(augmented\), batch 12 per rank", stdout)
    assert lrs, stdout
    first, middle, head = map(float, lrs.groups())
    assert head / first == pytest.approx(10, rel=1e-2) and middle == pytest.approx((first * head) ** 0.5, rel=1e-2)
    assert stdout.count("LR sweep: suggestion") == 2
    file = torch.load(pretrained, weights_only=True)
    stages = [_states(out, stage, 2) for stage in range(3)]
    for stage, (rank0, rank1) in enumerate(stages):
        _equal({k: rank0[k] for k in ("params", "optimizer", "lrs", "trainable")},
               {k: rank1[k] for k in ("params", "optimizer", "lrs", "trainable")}, f"stage {stage}, rank 1 vs 0:")
    params, norms = stages[0][0]["params"], _norms(stages[0][0]["params"])
    body = [k for k in params if not k.startswith("fc.")]
    # stage 0: the body frozen but its norms; each rank's BatchNorm statistics are its own batches' (DDP takes
    # rank 0's at the next forward, evaluation too): they differ here, so nothing synced them before the dump
    for key in (k for k in body if k not in norms):
        assert torch.equal(params[key], file[key]), f"{key} changed while frozen"
    assert all(not torch.equal(params[k], file[k]) for k in norms if k.endswith(".weight"))
    assert set(stages[0][0]["trainable"]) == {"fc.weight", "fc.bias"} | norms
    assert not torch.equal(stages[0][0]["buffers"]["bn1.running_mean"], stages[0][1]["buffers"]["bn1.running_mean"])
    # stage 1, the head on precomputed activations: the body is exactly stage 0's (nothing of it trains)
    assert stages[1][0]["trainable"] == ["fc.bias", "fc.weight"]
    for key in body:
        assert torch.equal(stages[1][0]["params"][key], params[key]), key
    assert not torch.equal(stages[1][0]["params"]["fc.weight"], params["fc.weight"])
    # stage 2, unfrozen: the body moved, on both ranks alike
    last = stages[2][0]["params"]
    assert len(stages[2][0]["trainable"]) == len(last)
    assert not torch.equal(last["conv1.weight"], file["conv1.weight"]) and not torch.equal(last["layer4.1.conv2.weight"], params["layer4.1.conv2.weight"])
    rows = [json.loads(line) for line in (out / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows if "valid/loss" in r] == [(0, 1), (1, 2), (1, 3), (2, 4)]
    assert {k for r in rows if r.get("stage") == 2 for k in r if k.startswith("train/lr/group")} == {f"train/lr/group{g}" for g in range(3)}


def test_a_timm_model_in_three_stages_on_2_ranks_every_rank_computes_bitwise_the_same_weights(tmp_path, mnist_small, timm_home):
    """The 3 stages on timm/test_resnet, pretrained=timm from the Hugging Face cache (HF_HOME): the
    groups are timm's stages cut after stride 8; every rank's parameters and optimizer state are
    bitwise equal after each stage; the frozen body is the cached file's, the head trains on
    precomputed activations, then everything moves."""
    file = _read(next((timm_home / "hub").rglob("model.safetensors")))
    config = _config(tmp_path, mnist_small, None, THREE_STAGES, model="timm/test_resnet")
    stdout = launch([WORKER, str(config), "--dump", str(tmp_path), "model.pretrained=timm", "checkpoint.every_n_steps=null"], nproc=2,
                    env={"HF_HOME": str(timm_home)}).stdout
    assert re.search(r"pretrained: timm's weights of test_resnet from \S+/models--timm--test_resnet\.r160_in1k/snapshots/0+/model\.safetensors",
                     stdout), stdout
    assert "normalization: mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5) (timm's pretrained_cfg of test_resnet)" in stdout, stdout
    assert "layer groups of timm/test_resnet (finetune.groups=3: stride <= 8 | stride 16 and 32 | head, timm's group_matcher stages" in stdout
    assert re.search(r"group 0: conv1 \.\. layer2 .*\n.*group 1: layer3 \.\. layer4 .*\n.*group 2 \(head\): fc ", stdout), stdout
    assert re.search(r"head: precomputed the frozen body's output for 300 train \+ 110 valid images", stdout), stdout
    stages = [_states(tmp_path, stage, 2) for stage in range(3)]
    for stage, (rank0, rank1) in enumerate(stages):
        _equal({k: rank0[k] for k in ("params", "optimizer", "lrs", "trainable")},
               {k: rank1[k] for k in ("params", "optimizer", "lrs", "trainable")}, f"stage {stage}, rank 1 vs 0:")
    params, trainable = stages[0][0]["params"], set(stages[0][0]["trainable"])
    frozen = [k for k in params if k not in trainable]
    assert "conv1.0.weight" in frozen and "layer4.0.conv1.weight" in frozen and {"fc.weight", "bn1.weight", "layer3.0.bn2.bias"} <= trainable
    assert all(torch.equal(params[k], file[k]) for k in frozen)
    assert stages[1][0]["trainable"] == ["fc.bias", "fc.weight"]
    assert all(torch.equal(stages[1][0]["params"][k], params[k]) for k in params if not k.startswith("fc."))
    last = stages[2][0]["params"]
    assert len(stages[2][0]["trainable"]) == len(last) and not torch.equal(last["conv1.0.weight"], file["conv1.0.weight"])
    # model.pt alone rebuilds the timm model: evaluate with TTA, and predict's CSV counts evaluate's correct images exactly
    # (each its own process, as a user runs them: this process's Accelerator state is other tests' to set)
    weights, result = str(tmp_path / "ft" / "model.pt"), tmp_path / "eval.json"
    launch(["-m", "disttrain.cli", "evaluate", "--weights", weights, "--data", str(mnist_small), "--tta", "--tta-n", "3", "--out", str(result)],
           launcher="python")
    evaluated = json.loads(result.read_text())
    assert evaluated["count"] == 110 and evaluated["tta_accuracy"] is not None
    launch(["-m", "disttrain.cli", "predict", "--weights", weights, "--out", str(tmp_path / "p.csv"),
            str(mnist_small / "valid")], launcher="python")
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 110 and sum(Path(r["path"]).parent.name == r["label"] for r in rows) == evaluated["correct"]


@pytest.mark.parametrize("model", ["resnet18"])  # a timm model's stages: test_a_timm_model_in_three_stages_...
def test_frozen_then_unfrozen_on_3_ranks_without_train_bn_keeps_every_statistic(tmp_path, mnist_small, pretrained, timm_home, model):
    """train_bn false: frozen groups' norms and statistics are the file's; freeze_bn_stats keeps every
    running statistic through the unfrozen stage too, on every rank (no sync can have made it so:
    no rank's statistics ever moved). For timm, the weights are a local safetensors file."""
    if model.startswith("timm/"):
        pretrained = next((timm_home / "hub").rglob("model.safetensors"))
    stages = [{"name": "head", "epochs": 1, "freeze_to": -1, "lr": 1.0e-2},
              {"name": "all", "epochs": 1, "freeze_to": 0, "lr": 2.0e-3, "lr_ratio": 10}]
    config = _config(tmp_path, mnist_small, pretrained, stages, train_bn=False, bn_stats=True, model=model)
    stdout = launch([WORKER, str(config), "--dump", str(tmp_path), "checkpoint.every_n_steps=null"], nproc=3).stdout
    assert re.search(r"all \(2/2\): epoch 1, nothing frozen, BatchNorm running statistics kept, peak LR 2\.00e-04 / "
                     r"6\.32e-04 / 2\.00e-03 \(group 0 \.\. head\), one-cycle", stdout), stdout
    file = _read(pretrained)
    conv = "conv1.0.weight" if model.startswith("timm/") else "conv1.weight"
    for stage in (0, 1):
        states = _states(tmp_path, stage, 3)
        for rank, other in enumerate(states[1:], 1):
            _equal(states[0], other, f"stage {stage}, rank {rank} vs 0:")  # buffers included
        for key, value in states[0]["buffers"].items():
            if not key.endswith("num_batches_tracked"):
                assert torch.equal(value, file[key]), f"{key} moved"
        params = states[0]["params"]
        if stage == 0:
            assert states[0]["trainable"] == ["fc.bias", "fc.weight"]
            assert all(torch.equal(params[k], file[k]) for k in params if not k.startswith("fc."))
        else:
            assert not torch.equal(params[conv], file[conv])


def _checkpoint(path: Path) -> dict:
    """A checkpoint's contents without what a clock or a process decides (times, ids, paths)."""
    shared = torch.load(path / "shared.pt", weights_only=True)
    for row in shared["history"]:
        row.pop("seconds"), row.pop("images_per_sec")
    ranks = [torch.load(path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for state in ranks:
        state["window"].pop("seconds")
    meta = json.loads((path / "meta.json").read_text())
    meta.pop("wandb_run_id")
    return {"shared": shared, "ranks": ranks, "meta": meta}


def test_killed_at_a_boundary_inside_precompute_and_after_a_sweep_resumes_bitwise(tmp_path, mnist_small, pretrained, reference):
    """Killed (every rank SIGKILLs itself once the named checkpoint is complete) and resumed three
    times: from the end of stage 0 (the resumed run enters the precompute stage: its activations must
    come from the checkpoint's body, whose norms stage 0 trained, and it sweeps), from inside that
    stage (step 6, mid-epoch: activations again from the checkpoint's body), from the post-sweep
    checkpoint of the last stage (another image size and batch size; no sweep again). Every checkpoint
    each part writes, the final weights and the epoch table equal the uninterrupted run's bitwise."""
    ref, _ = reference
    config = str(_config(tmp_path, mnist_small, pretrained, THREE_STAGES))
    root = tmp_path / "ft" / "checkpoints"
    resumed_from = [None, "step-00000004", "step-00000006", "step-00000012-stage2"]
    for part, kill in enumerate(["step-00000004", "step-00000006", "step-00000012-stage2", None]):
        done = launch([WORKER, config, *(["--kill-after", kill] if kill else [])], nproc=2, check=kill is None)
        if kill:
            assert done.returncode != 0 and (root / "latest").read_text().strip() == kill, done.stderr[-3000:]
            assert not (tmp_path / "ft" / "results.json").exists()
        if part:
            assert re.search(rf"resuming from {root / resumed_from[part]}: ", done.stdout), done.stdout
        assert done.stdout.count("LR sweep: suggestion") == [0, 1, 1, 0][part], done.stdout
        assert ("precomputed the frozen body's output" in done.stdout) == (part in (1, 2)), done.stdout
    written = sorted(p.name for p in root.glob("step-*"))
    assert written == sorted(p.name for p in (ref / "ft" / "checkpoints").glob("step-*"))
    assert "step-00000004-stage1" in written and "step-00000012-stage2" in written
    for name in written:
        _equal(_checkpoint(ref / "ft" / "checkpoints" / name), _checkpoint(root / name), name)
    wa = torch.load(ref / "ft" / "model.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "ft" / "model.pt", weights_only=True)["model"]
    _equal(wa, wb, "model.pt")
    ra, rb = (json.loads((d / "ft" / "results.json").read_text()) for d in (ref, tmp_path))
    assert [(e["train_loss"], e["valid_loss"], e["accuracy"], e["stage"]) for e in ra["epochs"]] == \
        [(e["train_loss"], e["valid_loss"], e["accuracy"], e["stage"]) for e in rb["epochs"]]
    assert len(ra["epochs"]) == 4 and ra["peak_lr"] == rb["peak_lr"]


def test_a_precomputed_head_stage_gives_the_losses_of_the_same_stage_on_images(tmp_path, mnist_small, pretrained):
    """One process (where the activations' batches are exactly the image path's), train_bn false and
    no augmentation: the head sees the same frozen features either way, stored as fp16 against
    float32 on the fly, and the body runs in other batch compositions: the same losses to 1e-3."""
    results = {}
    stages = [{"name": "head", "epochs": 2, "freeze_to": -1, "lr": 1.0e-2, "augment": False},
              {"name": "more", "epochs": 1, "freeze_to": -1, "lr": 1.0e-3, "augment": False, "schedule": {"name": "constant"}}]
    for precompute in (False, True):
        out = tmp_path / str(precompute)
        config = _config(out, mnist_small, pretrained, stages, train_bn=False)
        done = launch(["launch/train.py", "--config", str(config), f"stages.0.precompute={precompute}",
                       f"stages.1.precompute={precompute}", "checkpoint.every_n_steps=null"], launcher="python")
        assert ("precomputed the frozen body's output for 300 train + 110 valid images" in done.stdout) == precompute
        results[precompute] = json.loads((out / "ft" / "results.json").read_text())["epochs"]
    for on_images, on_features in zip(results[False], results[True], strict=True):
        assert on_images["valid_loss"] == pytest.approx(on_features["valid_loss"], rel=1e-3)
        assert on_images["train_loss"] == pytest.approx(on_features["train_loss"], rel=1e-3)
        assert abs(on_images["accuracy"] - on_features["accuracy"]) <= 1 / 110 + 1e-9
    assert len(results[True]) == 3 and results[True][0]["valid_loss"] != results[True][1]["valid_loss"]  # the head trained


def test_a_convnext_head_trains_on_its_4d_precomputed_activations_with_wandb_logging(tmp_path, mnist_small):
    """ConvNeXt's head takes (N, 768, 1, 1) activations. On 2 processes with W&B logging offline
    (the default without credentials), the head trains on them; the W&B run has the training series
    and no `train/samples` (those are images); each rank holds only its share: 150 train + 55 valid
    images x 768 values x 2 bytes = 0.30 MB (the whole set would be 0.60 MB)."""
    from wandb_records import history, read_records

    stages = [{"name": "head", "epochs": 1, "freeze_to": -1, "lr": 1.0e-3, "augment": False, "precompute": True}]
    config = _config(tmp_path, mnist_small, None, stages, model="convnext_tiny", size=32)
    done = launch(["launch/train.py", "--config", str(config), "checkpoint.every_n_steps=null"], nproc=2, env={"WANDB_MODE": "offline"})
    assert "head: precomputed the frozen body's output for 300 train + 110 valid images" in done.stdout, done.stdout
    assert "(768x1x1 per image, each rank keeps its own share as fp16)" in done.stdout, done.stdout
    assert "(precomputed activations, 0.30 MB of fp16 per rank), batch 8 per rank" in done.stdout, done.stdout
    run = next((tmp_path / "ft" / "wandb").glob("offline-run-*"))
    rows = history(read_records(next(run.glob("run-*.wandb"))))
    assert [r["_step"] for r in rows if "train/loss" in r] == [2, 4] and any("valid/accuracy" in r for r in rows)
    assert not any("train/samples" in r for r in rows)
