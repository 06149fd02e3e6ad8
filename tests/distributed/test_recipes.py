"""The field's recipe parts in one real 2-process run (tests/distributed/recipe_worker.py records
what each rank computed): MixUp/CutMix in the LR sweep and in training until augment.mix_off_epoch,
a weight EMA bitwise the same on every rank, early stopping at the same step on every rank, the
best checkpoint by the EMA's validation loss kept and written as model.pt (train.final=best), with
TrivialAugment, repeated augmentation, dropout and the BCE loss on, and an odd batch per rank."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import launch

pytestmark = pytest.mark.dist

EMA_STEP = 7  # the EMA each rank holds after this optimizer step is compared


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, mnist_small):
    out = tmp_path_factory.mktemp("recipe")
    args = [f"data.root={mnist_small}", f"run.output_dir={out}", "run.name=r", "train.epochs=4", "data.batch_size=15",
            "train.precision=no", "log.progress=false", "log.every_n_steps=5", "optim.lr=auto", "sweep.num_iter=20",
            "augment.mixup=0.4", "augment.cutmix=1.0", "augment.mix_off_epoch=1", "augment.policy=trivial",
            "train.ema=0.9", "train.ema_warmup=true", "train.early_stop.patience=1", "train.early_stop.min_delta=100",
            "checkpoint.keep_best=1", "checkpoint.monitor=ema_valid_loss", "train.final=best", "data.repeats=2",
            "model.drop_rate=0.1", "train.loss=bce"]
    done = launch(["tests/distributed/recipe_worker.py", str(out), str(EMA_STEP), *args], nproc=2)
    return out, out / "r", done.stdout


def test_every_rank_computes_the_same_ema(recipe_run):
    out, _, _ = recipe_run
    a, b = (torch.load(out / f"ema-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["updates"] == b["updates"] == EMA_STEP
    assert a["weights"].keys() == b["weights"].keys()
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), f"{key}: the ranks' EMAs differ"


def test_early_stop_at_the_same_step_on_every_rank(recipe_run):
    out, run, stdout = recipe_run
    records = [[json.loads(line) for line in (out / f"stop-rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    # each rank's own record: fed the all-reduced figure, every rank decides itself (nothing broadcast from one)
    assert records[0] == records[1]
    assert [r["stop"] for r in records[0]] == [False, True]  # min_delta 100: nothing after the first epoch improves
    epochs = json.loads((run / "results.json").read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert "early stop after epoch 1" in stdout, stdout


def test_the_sweep_and_the_epochs_before_mix_off_epoch_are_mixed(recipe_run):
    out, run, stdout = recipe_run
    assert "MixUp alpha 0.4" in stdout and "CutMix alpha 1" in stdout, stdout
    for rank in (0, 1):
        mixed = json.loads((out / f"mix-rank{rank}.json").read_text())
        sweep = mixed.count(0) - 1  # the first training step is at step 0 too
        assert sweep == json.loads((run / "lr_sweep.json").read_text())["iterations"]  # every step of the LR sweep mixed
        steps = 10  # 300 images / (15 per rank x 2 ranks)
        assert sorted(set(mixed)) == list(range(steps))  # epoch 0 mixed, epoch 1 (mix_off_epoch) clean
        assert len(mixed) == sweep + steps


def test_model_pt_holds_the_best_checkpoint_by_the_ema_valid_loss(recipe_run):
    _, run, stdout = recipe_run
    epochs = json.loads((run / "results.json").read_text())["epochs"]
    losses = [e["metrics"]["ema_valid_loss"] for e in epochs]
    best = min(range(len(losses)), key=lambda i: (losses[i], i))
    index = json.loads((run / "checkpoints" / "best" / "index.json").read_text())
    assert len(index) == 1 and index[0]["value"] == losses[best]
    shared = torch.load(run / "checkpoints" / "best" / index[0]["name"] / "shared.pt", weights_only=True)
    model = torch.load(run / "model.pt", weights_only=True)["model"]
    assert model.keys() == shared["model"].keys()
    assert all(torch.equal(model[k], shared["model"][k]) for k in model)
    header = next(line for line in stdout.splitlines() if line.startswith("epoch "))
    assert header.split() == ["epoch", "train_loss", "valid_loss", "accuracy", "ema_valid_loss", "ema_accuracy", "time"]
