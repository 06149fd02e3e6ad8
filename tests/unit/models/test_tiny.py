"""The tiny family (`model.name: tiny/cnn`): a few thousand parameters, any input size, 8 x 8 px
by default, no pretrained weights, its 3 layer groups, and a real one-process training run."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import launch, make_folder
from disttrain.config import ConfigError
from disttrain.models.build import build_model, empty_model
from disttrain.models.checks import build_config
from disttrain.models.families import family_of, family_of_model
from disttrain.models.family import parameter_count
from disttrain.models.groups import split_layer_groups
from disttrain.models.tiny import FAMILY
from disttrain.use.inference import load_saved_model


def test_tiny_cnn_has_a_few_thousand_parameters_and_takes_any_input_size():
    cfg = build_config({"model": {"name": "tiny/cnn"}})
    assert (cfg.data.image_size, cfg.data.load_size) == (8, 8)
    model = build_model(cfg.model, num_classes=10)
    assert family_of("tiny/cnn") is FAMILY and family_of_model(model) is FAMILY
    assert parameter_count(model) == 6418  # 216 + 1,152 + 4,608 conv, 112 BN, 330 fc
    model.eval()
    for size in (8, 13, 32):
        assert model(torch.rand(2, 3, size, size)).shape == (2, 10)
    assert parameter_count(empty_model("tiny/cnn", 3)) == parameter_count(build_model(cfg.model, 3))


@pytest.mark.parametrize("overrides, message", [
    (["model.name=tiny/cn"], r"model.name: 'cn' is not a tiny model \(did you mean tiny/cnn\?\)"),
    (["model.pretrained=imagenet"], r"model.pretrained: tiny/cnn has no pretrained weights \(`imagenet` names another"),
    (["model.pretrained=tiny"], r"model.pretrained: tiny/cnn has no pretrained weights and 'tiny' is not a file"),
    (["model.drop_path_rate=0.1"], r"model.drop_path_rate: tiny/cnn has no stochastic depth"),
])
def test_what_the_tiny_family_refuses_is_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"model": {"name": "tiny/cnn"}}, overrides)


def test_tiny_cnn_splits_into_its_stages_and_the_head():
    groups = split_layer_groups(build_model(build_config({"model": {"name": "tiny/cnn"}}).model, 4), 3, "tiny/cnn")
    assert [g.blocks for g in groups] == [["stem", "stage1"], ["stage2"], ["fc"]] and groups[-1].head


def test_tiny_cnn_trains_through_the_normal_path_and_its_model_pt_loads(tmp_path):
    data = make_folder(tmp_path / "data", {"train": {"a": 12, "b": 7}, "valid": {"a": 3, "b": 2}}, size=(8, 8))
    launch(["launch/train.py", "model.name=tiny/cnn", f"data.root={data}", f"run.output_dir={tmp_path}", "run.name=t",
            "train.epochs=2", "data.batch_size=4", "data.num_workers=0", "log.progress=false", "train.precision=no",
            "optim.lr=1e-2"], nproc=1, launcher="python", timeout=120)
    epochs = json.loads((tmp_path / "t" / "results.json").read_text())["epochs"]
    assert len(epochs) == 2 and all(e["train_loss"] > 0 for e in epochs)
    saved = load_saved_model(tmp_path / "t" / "model.pt", torch.device("cpu"))
    assert family_of_model(saved.model) is FAMILY and saved.classes == ["a", "b"] and saved.image_size == 8
