"""The config checked against the model families (disttrain.models.checks): the pure build knows
no family, the checked one refuses what the family refuses, with the same messages."""

from __future__ import annotations

import pytest
import torch

from disttrain.config import ConfigError
from disttrain.config.parse import build_config_unchecked, load_config_unchecked
from disttrain.models.checks import build_config, load_config
from disttrain.models.groups import SplitError, split_layer_groups


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.name=resnet_18", r"model\.name: 'resnet_18'.*did you mean resnet18"),
        ("model.pretrained=/nonexistent.pt", r"model\.pretrained: '/nonexistent\.pt' is not a file"),
    ],
)
def test_a_model_the_family_refuses_passes_the_pure_build_and_fails_the_checked_one(override, expected):
    assert build_config_unchecked({}, [override]).model is not None
    with pytest.raises(ConfigError, match=expected):
        build_config({}, [override])


def test_the_checked_loader_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: resnet_18\n")
    assert load_config_unchecked(path).model.name == "resnet_18"
    with pytest.raises(ConfigError, match=r"c\.yaml: model\.name: 'resnet_18' is not a torchvision classification model"):
        load_config(path)


def test_too_many_groups_is_a_one_line_config_error_before_any_process_starts():
    with pytest.raises(ConfigError) as err:
        build_config({"model": {"name": "resnet18"}, "finetune": {"groups": 7}, "stages": [{"freeze_to": -1}]})
    assert str(err.value) == ("finetune.groups: 7 is too many for resnet18, whose body has 5 units to cut between "
                              "(conv1 .. layer4); use 2 to 6")
    assert len(build_config({"model": {"name": "resnet18"}, "finetune": {"groups": 6}, "stages": [{"freeze_to": -1}]}).stages) == 1
    assert build_config({"finetune": {"groups": 7}}).finetune.groups == 7  # without stages the groups are not used
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with pytest.raises(SplitError, match=r"^finetune\.groups: 4 is too many for Sequential, whose body has 1 blocks .*; use 2 to 2$"):
        split_layer_groups(model, 4)


