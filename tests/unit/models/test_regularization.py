"""model.drop_rate and model.drop_path_rate: the modules really hold the dropout and stochastic
depth asked for, at the rate asked for; the state dict's keys do not change (weights and
checkpoints of the model without them load); eval mode is unchanged and train mode is not; a
torchvision family without stochastic depth is a ConfigError at config check time."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import StochasticDepth

from disttrain.config import ConfigError, ModelConfig
from disttrain.models.build import build_model, load_pretrained
from disttrain.models.checks import build_config
from disttrain.models.groups import split_layer_groups
from disttrain.models.torchvision import FAMILY, DropoutLinear


def _meta(name: str, **rates) -> nn.Module:
    """torchvision's `name` built by the family on the meta device (module structure only; RegNet,
    which computes its widths with tensors, on the CPU)."""
    try:
        with torch.device("meta"):
            return FAMILY.create(name, 5, None, **rates)
    except NotImplementedError:
        return FAMILY.create(name, 5, None, **rates)


def _dropouts(model: nn.Module) -> dict[str, float]:
    return {name: module.p for name, module in model.named_modules() if isinstance(module, nn.Dropout)}


def _depths(model: nn.Module) -> list[float]:
    return [module.p for module in model.modules() if isinstance(module, StochasticDepth)]


@pytest.mark.parametrize("name, where", [
    ("resnet18", "fc"), ("regnet_y_400mf", "fc"), ("densenet121", "classifier"), ("convnext_tiny", "classifier.2"),
    ("vit_b_16", "heads.head"), ("swin_t", "head"), ("maxvit_t", "classifier.5"), ("shufflenet_v2_x0_5", "fc"),
])
def test_torchvision_families_without_a_classifier_dropout_get_one_on_the_final_linear(name, where):
    plain, dropped = _meta(name), _meta(name, drop_rate=0.3)
    layer = dropped.get_submodule(where)
    assert isinstance(layer, DropoutLinear) and layer.drop.p == 0.3
    assert set(_dropouts(dropped)) - set(_dropouts(plain)) == {f"{where}.drop"}  # nothing else changed
    assert list(plain.state_dict()) == list(dropped.state_dict())
    assert [(k, v.shape) for k, v in plain.named_parameters()] == [(k, v.shape) for k, v in dropped.named_parameters()]
    assert [g.names for g in split_layer_groups(dropped, 3, name)] == [g.names for g in split_layer_groups(plain, 3, name)]


@pytest.mark.parametrize("name, where, default", [
    ("efficientnet_b0", "classifier.0", 0.2), ("efficientnet_v2_s", "classifier.0", 0.2), ("mobilenet_v2", "classifier.0", 0.2),
    ("mobilenet_v3_small", "classifier.2", 0.2), ("mnasnet0_5", "classifier.0", 0.2), ("vgg11", "classifier.2", 0.5),
    ("alexnet", "classifier.0", 0.5), ("squeezenet1_1", "classifier.0", 0.5),
])
def test_torchvision_families_with_a_classifier_dropout_take_the_rate_through_their_builder(name, where, default):
    assert _dropouts(_meta(name))[where] == default  # null: the architecture's own
    dropped = _meta(name, drop_rate=0.35)
    assert _dropouts(dropped)[where] == 0.35
    assert not any(isinstance(m, DropoutLinear) for m in dropped.modules())
    assert list(dropped.state_dict()) == list(_meta(name).state_dict())


def test_stochastic_depth_through_the_builder_and_rescaled_is_torchvisions_own_schedule():
    # convnext and efficientnet take the rate through their builder: their own classes' schedules
    assert _depths(_meta("convnext_tiny")) == pytest.approx([0.1 * i / 17 for i in range(18)])  # the builder's 0.1
    assert _depths(_meta("convnext_tiny", drop_path_rate=0.3)) == pytest.approx([0.3 * i / 17 for i in range(18)])
    assert _depths(_meta("efficientnet_b0", drop_path_rate=0.3)) == pytest.approx([0.3 * i / 16 for i in range(16)])
    assert max(_depths(_meta("efficientnet_v2_s", drop_path_rate=0.3))) < 0.3
    # swin and maxvit fix their rate in the builder: rescaled, the same as their classes built with the rate
    with torch.device("meta"):
        swin = torchvision.models.SwinTransformer([4, 4], 96, [2, 2, 6, 2], [3, 6, 12, 24], [7, 7], stochastic_depth_prob=0.35)
        maxvit = torchvision.models.MaxVit(input_size=(224, 224), stem_channels=64, partition_size=7, block_channels=[64, 128, 256, 512],
                                           block_layers=[2, 2, 5, 2], head_dim=32, stochastic_depth_prob=0.35)
    assert _depths(_meta("swin_t", drop_path_rate=0.35)) == pytest.approx(_depths(swin))
    assert _depths(_meta("swin_v2_t", drop_path_rate=0.35))[-1] == pytest.approx(0.35)
    rescaled = _meta("maxvit_t", drop_path_rate=0.35)
    assert len(_depths(rescaled)) == len(_depths(maxvit)) and _depths(rescaled) == pytest.approx(_depths(maxvit))
    assert _depths(_meta("swin_t", drop_path_rate=0.0)) == [0.0] * 12
    assert list(rescaled.state_dict()) == list(_meta("maxvit_t").state_dict())


@pytest.mark.parametrize("name", ["resnet18", "vit_b_16", "mobilenet_v3_small", "regnet_y_400mf"])
def test_drop_path_for_a_torchvision_family_without_stochastic_depth_is_a_config_error(name):
    with pytest.raises(ConfigError) as err:
        build_config({"model": {"name": name, "drop_path_rate": 0.1}})
    message = str(err.value)
    assert message.startswith(f"model.drop_path_rate: torchvision's {name} (family ") and "has no stochastic depth" in message
    for supported in ("convnext_*", "efficientnet_b*", "efficientnet_v2_*", "swin_*", "maxvit_t", "timm/<name>"):
        assert supported in message, message
    assert build_config({"model": {"name": name, "drop_path_rate": 0}}).model.drop_path_rate == 0  # none asked: fine
    assert build_config({"model": {"name": "swin_t", "drop_path_rate": 0.1}}).model.drop_path_rate == 0.1


@pytest.mark.parametrize("key, value", [("drop_rate", 1.0), ("drop_rate", -0.1), ("drop_path_rate", 1.5)])
def test_rates_outside_zero_to_one_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=rf"model.{key}: a probability in \[0, 1\) or null"):
        build_config({"model": {"name": "convnext_tiny", key: value}})


def test_a_timm_model_without_the_keyword_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"model.drop_path_rate: timm's vgg11 does not take drop_path_rate"):
        build_config({"model": {"name": "timm/vgg11", "drop_path_rate": 0.1}})


def test_timm_models_take_both_rates_in_their_modules():
    from timm.layers import DropPath

    model = build_model(ModelConfig(name="timm/test_convnext", drop_rate=0.25, drop_path_rate=0.2, channels_last=False), 3)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout) and m.p] == [0.25]  # the head's (its MLPs' are 0)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.2) and rates == sorted(rates)
    resnet = build_model(ModelConfig(name="timm/test_resnet", drop_rate=0.25, drop_path_rate=0.2, channels_last=False), 3)
    assert resnet.drop_rate == 0.25 and max(m.drop_prob for m in resnet.modules() if isinstance(m, DropPath)) == pytest.approx(0.2)
    plain = build_model(ModelConfig(name="timm/test_convnext", channels_last=False), 3)
    assert not any(isinstance(m, DropPath) for m in plain.modules()) and list(plain.state_dict()) == list(model.state_dict())


def _pair(name: str, **rates) -> tuple[nn.Module, nn.Module]:
    """(the model without the rates, with them), the same weights."""
    torch.manual_seed(0)
    plain = build_model(ModelConfig(name=name, channels_last=False), 3)
    regularized = build_model(ModelConfig(name=name, channels_last=False, **rates), 3)
    regularized.load_state_dict(plain.state_dict())  # strict: the same keys
    return plain, regularized


@pytest.mark.parametrize("name, rates", [
    ("resnet18", {"drop_rate": 0.5}), ("efficientnet_b0", {"drop_rate": 0.5, "drop_path_rate": 0.5}),
    ("timm/test_resnet", {"drop_rate": 0.5}), ("timm/test_convnext", {"drop_rate": 0.5, "drop_path_rate": 0.5}),
])
def test_eval_output_is_unchanged_and_train_output_differs(name, rates):
    plain, regularized = _pair(name, **rates)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(plain.eval()(images), regularized.eval()(images))
        plain.train(), regularized.train()
        torch.manual_seed(2)
        reference = plain(images)
        torch.manual_seed(2)
        trained = regularized(images)
        torch.manual_seed(2)
        assert torch.equal(regularized(images), trained), "not reproducible with the seed"
    assert not torch.allclose(reference, trained), "train mode is not regularized"


def test_weights_and_checkpoints_load_across_the_rates(tmp_path):
    """A state dict of resnet18 loads into resnet18 with drop_rate (every tensor), and back."""
    torch.manual_seed(0)
    plain = build_model(ModelConfig(name="resnet18", channels_last=False), 3)
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    regularized = build_model(ModelConfig(name="resnet18", pretrained=str(tmp_path / "plain.pt"), drop_rate=0.4), 3)
    assert isinstance(regularized.fc, DropoutLinear) and regularized.fc.drop.p == 0.4
    assert all(torch.equal(v, regularized.state_dict()[k]) for k, v in plain.state_dict().items())
    torch.save({"model": regularized.state_dict()}, tmp_path / "checkpoint.pt")  # a checkpoint of the run with it
    fresh = build_model(ModelConfig(name="resnet18", channels_last=False), 3)
    assert load_pretrained(fresh, tmp_path / "checkpoint.pt") == []
    fresh.load_state_dict(regularized.state_dict())  # strict
