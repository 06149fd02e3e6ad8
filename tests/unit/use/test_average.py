"""`disttrain average` (disttrain/use/average.py): the mean of three state dicts is their arithmetic
mean (and identical inputs give their weights back exactly); integer buffers are the first's;
BatchNorm statistics averaged (`--bn mean`) or recomputed as a cumulative average with only the
BatchNorm layers in train mode; checkpoint folders and model.pt files read alike, the model.pt keys
taken from the right place; every mismatch a one-line exit 2 naming both files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from disttrain.cli import main
from disttrain.models.checks import build_config
from disttrain.train.checkpoint import save_weights
from disttrain.use.average import average_models, info_from_config, mean_weights, read_input, recompute_batchnorm

CLASSES = ["ant", "bee", "wasp"]
INFO = {"normalize": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}, "image_size": 24, "load_size": 28, "precision": "no",
        "interpolation": "bilinear", "family": "torchvision", "tta_views": "flips", "task": {"multi_label": False, "threshold": 0.5, "beta": 2.0}}


def _state(seed: int, batches: int = 7) -> dict[str, torch.Tensor]:
    """A small state dict as a conv + BatchNorm + linear model has it: float32 weights and running
    statistics, an int64 num_batches_tracked."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "bn.weight": torch.rand(4, generator=g) + 0.5,
        "bn.bias": torch.randn(4, generator=g),
        "bn.running_mean": torch.randn(4, generator=g),
        "bn.running_var": torch.rand(4, generator=g) + 0.1,
        "bn.num_batches_tracked": torch.tensor(batches + seed, dtype=torch.int64),
        "fc.weight": torch.randn(3, 4, generator=g) * 1e-3,
        "fc.bias": torch.randn(3, generator=g),
    }


def _model_file(path: Path, state: dict, classes=CLASSES, arch: str = "resnet18", **info) -> Path:
    return save_weights(path, state, classes, arch, **{**INFO, **info})


def _checkpoint(folder: Path, state: dict, classes=CLASSES, arch: str = "resnet18", **meta) -> Path:
    """A checkpoint folder as save_checkpoint writes it (the parts average reads: shared.pt, meta.json)."""
    folder.mkdir(parents=True)
    history = meta.pop("history", [])
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "schedule": {}, "scaler": None, "history": history},
               folder / "shared.pt")
    (folder / "meta.json").write_text(json.dumps({"classes": classes, "model": arch, "global_step": 4, "epoch": 1,
                                                  "world_size": 1, "precision": "no", **meta}))
    return folder


def test_the_mean_of_three_state_dicts_is_their_arithmetic_mean():
    states = [_state(seed) for seed in range(3)]
    mean = mean_weights(states)
    assert list(mean) == list(states[0])
    for key, value in mean.items():
        a, b, c = (s[key] for s in states)
        assert value.dtype == a.dtype and value.shape == a.shape
        if not a.is_floating_point():
            assert torch.equal(value, a), "integer buffers: the first input's"
            continue
        # The float32 reference (a + b + c) / 3 rounds three times, each within half an ulp (2^-24
        # relative, 6e-8) of its operands' sum: a few ulp at most apart from the float64 mean rounded
        # once; rtol 1e-6 (about 8 ulp) holds that and fails any other weighting by far.
        assert torch.allclose(value, (a + b + c) / 3, rtol=1e-6, atol=1e-12)
        assert torch.equal(value, ((a.double() + b.double() + c.double()) / 3).float()), "float64 sums, cast back once"
        assert not torch.allclose(value, a, rtol=1e-3), "a real mean, not the first input"


def test_identical_inputs_give_their_weights_back_exactly():
    state = _state(5)
    mean = mean_weights([state, {k: v.clone() for k, v in state.items()}, state])
    assert all(torch.equal(mean[key], state[key]) for key in state)


def test_a_half_precision_tensor_keeps_its_dtype():
    states = [{"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16) * k} for k in (1, 2, 4)]
    mean = mean_weights(states)["w"]
    assert mean.dtype == torch.bfloat16 and torch.equal(mean, torch.tensor([7 / 3, 14 / 3]).to(torch.bfloat16))


def test_model_files_average_with_batchnorm_statistics_their_mean(tmp_path, capsys):
    files = [_model_file(tmp_path / f"m{i}.pt", _state(i)) for i in range(3)]
    out = tmp_path / "avg.pt"
    assert main(["average", "--out", str(out), *map(str, files)]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"averaged 3 checkpoints ({', '.join(map(str, files))}) -> {out}; BatchNorm statistics: the mean of theirs"
    saved = torch.load(out, weights_only=True)
    states = [_state(i) for i in range(3)]
    assert saved["classes"] == CLASSES and saved["arch"] == "resnet18"
    assert {k: v for k, v in saved.items() if k not in ("model", "classes", "arch")} == INFO
    for key in ("bn.running_mean", "bn.running_var"):
        assert torch.equal(saved["model"][key], sum(s[key].double() for s in states).div(3).float())
    assert saved["model"]["bn.num_batches_tracked"].item() == 7


def test_checkpoints_take_the_model_keys_from_their_runs_model_pt_else_its_config(tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  image_size: 24\n  load_size: 28\naugment:\n  dihedral: true\n")
    steps = [_checkpoint(run / "checkpoints" / f"step-{i:08d}", _state(i)) for i in (1, 2)]
    from_config = average_models([str(p) for p in steps])
    assert from_config.info["image_size"] == 24 and from_config.info["load_size"] == 28 and from_config.info["tta_views"] == "dihedral"
    assert from_config.info["precision"] == "no" and from_config.info["task"]["multi_label"] is False
    _model_file(run / "model.pt", _state(9), image_size=20, load_size=22)
    assert average_models([str(p) for p in steps]).info["image_size"] == 20, "the run's own model.pt first"
    other = _model_file(tmp_path / "other.pt", _state(3), image_size=18)
    assert average_models([str(steps[0]), str(other)]).info["image_size"] == 18, "a model.pt among the inputs first"


def test_a_checkpoint_of_a_multi_label_run_keeps_its_threshold(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  image_size: 24\n  load_size: 28\n")
    rows = [{"epoch": 0, "train_loss": 1.0, "valid_loss": 1.0, "accuracy": 0.9, "seconds": 1.0, "images_per_sec": 1.0,
             "metrics": {"accuracy_multi": 0.9, "f2": 0.5, "threshold": 0.3}}]
    ckpt = _checkpoint(run / "checkpoints" / "step-00000004", _state(0), history=rows)
    task = info_from_config(build_config({}), read_input(ckpt))["task"]
    assert task == {"multi_label": True, "threshold": 0.3, "beta": 2.0}


def test_recompute_gives_the_cumulative_average_of_the_batch_statistics_with_only_batchnorm_training():
    torch.manual_seed(0)

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.modes: list[bool] = []

        def forward(self, x):
            self.modes.append(self.training)
            return x

    spy = Spy()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.1), spy, nn.Dropout(0.5), nn.Flatten())
    model[1].running_mean.fill_(5.0)
    batches = [torch.randn(n, 3, 8, 8) * (1 + i) + i for i, n in enumerate((6, 6, 3))]
    with torch.no_grad():
        features = [model[0](x) for x in batches]
    seen = recompute_batchnorm(model, batches)
    assert seen == (3, 15)
    bn = model[1]
    expected_mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in features]).mean(0)
    expected_var = torch.stack([f.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for f in features]).mean(0)
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-5) and torch.allclose(bn.running_var, expected_var, rtol=1e-4)
    assert spy.modes == [False] * 3, "only the BatchNorm layers train: dropout and the rest stay in eval mode"
    assert bn.momentum == 0.1 and not model.training and not bn.training
    assert bn.num_batches_tracked.item() == 3


def _error(capsys, args: list[str]) -> str:
    assert main(["average", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("disttrain: error: ") and "\n" not in err, err
    return err


def test_mismatches_and_missing_inputs_are_one_line_errors_naming_both_files(tmp_path, capsys):
    base = _model_file(tmp_path / "base.pt", _state(0))
    out = str(tmp_path / "avg.pt")
    arch = _model_file(tmp_path / "arch.pt", _state(1), arch="resnet34")
    assert f"{base} and {arch}: different architectures (resnet18 and resnet34)" in _error(capsys, ["--out", out, str(base), str(arch)])
    order = _model_file(tmp_path / "order.pt", _state(1), classes=["bee", "ant", "wasp"])
    assert f"{base} and {order}: the same classes in another order" in _error(capsys, ["--out", out, str(base), str(order)])
    fewer = _model_file(tmp_path / "fewer.pt", _state(1), classes=["ant", "bee"])
    assert "different classes (3: ant, bee, wasp and 2: ant, bee)" in _error(capsys, ["--out", out, str(base), str(fewer)])
    extra = _model_file(tmp_path / "extra.pt", {**_state(1), "head.weight": torch.zeros(2)})
    assert f"{base} and {extra}: head.weight is in the second only" in _error(capsys, ["--out", out, str(base), str(extra)])
    shape = _model_file(tmp_path / "shape.pt", {**_state(1), "fc.bias": torch.zeros(4)})
    assert f"{base} and {shape}: fc.bias is (3,) float32 in one and (4,) float32 in the other" in _error(
        capsys, ["--out", out, str(base), str(shape)])
    multi = _model_file(tmp_path / "multi.pt", _state(1), task={"multi_label": True, "threshold": 0.5, "beta": 2.0})
    assert "the other multi-label" in _error(capsys, ["--out", out, str(base), str(multi)])
    ckpt = _checkpoint(tmp_path / "ck" / "step-00000001", _state(1), arch="resnet34")
    assert f"{base} and {ckpt}: different architectures" in _error(capsys, ["--out", out, str(base), str(ckpt)]), "a checkpoint alike"
    assert "needs at least 2 checkpoints or model files to average, got 1" in _error(capsys, ["--out", out, str(base)])
    assert f"{tmp_path / 'gone.pt'}: no such file or folder" in _error(capsys, ["--out", out, str(base), str(tmp_path / "gone.pt")])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"{empty}: not a complete training checkpoint" in _error(capsys, ["--out", out, str(base), str(empty)])
    assert "needs --config" in _error(capsys, ["--out", out, "--bn", "recompute", str(base), str(base)])
    assert "--bn-batches 5: only with --bn recompute" in _error(capsys, ["--out", out, "--bn-batches", "5", str(base), str(base)])
    assert "the folder" in _error(capsys, ["--out", str(tmp_path / "no" / "avg.pt"), str(base), str(base)])
    assert not Path(out).exists(), "nothing written on an error"
