"""torchvision's family: the layer groups stated per model class (checked against the measured
strides), its name and weights checks, and ImageNet weights from the hub cache."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision

from group_checks import each_parameter_once_in_forward_order

from disttrain.config import AugmentConfig, ConfigError, ModelConfig
from disttrain.models.build import WeightsError, build_model, empty_model, normalization
from disttrain.models.families import family_of, family_of_model
from disttrain.models.groups import layer_groups_header, split_layer_groups, split_rule
from disttrain.models.torchvision import FAMILY, fetch_imagenet_weights, imagenet_file

STATED = {  # one model per family (both MobileNetV3s: they reach stride 16 at other blocks) -> (first, last) block per group, source
    "resnet18": ([("conv1", "layer2"), ("layer3", "layer4"), ("fc", "fc")], "fastai's resnet split"),
    "densenet121": ([("features.conv0", "features.denseblock2"), ("features.transition2", "features.norm5"), ("classifier", "classifier")],
                    "fastai's densenet split"),
    "vgg16_bn": ([("features.0", "features.21"), ("features.24", "features.41"), ("classifier", "classifier")], "fastai's vgg16_bn split"),
    "mobilenet_v2": ([("features.0", "features.6"), ("features.7", "features.18"), ("classifier", "classifier")],
                     "stated split for mobilenet_v2"),
    "mobilenet_v3_small": ([("features.0", "features.3"), ("features.4", "features.12"), ("classifier", "classifier")], "stated split"),
    "mobilenet_v3_large": ([("features.0", "features.6"), ("features.7", "features.16"), ("classifier", "classifier")], "stated split"),
    "efficientnet_b0": ([("features.0", "features.3"), ("features.4", "features.8"), ("classifier", "classifier")], "stated split"),
    "convnext_tiny": ([("features.0", "features.3"), ("features.4", "features.7"), ("classifier", "classifier")], "stated split"),
    "regnet_y_400mf": ([("stem", "trunk_output.block2"), ("trunk_output.block3", "trunk_output.block4"), ("fc", "fc")], "stated split"),
    "swin_t": ([("features.0", "features.3"), ("features.4", "norm"), ("head", "head")], "stated split"),
    "vit_b_16": ([("conv_proj", "encoder.layers.encoder_layer_5"), ("encoder.layers.encoder_layer_6", "encoder.ln"), ("heads", "heads")],
                 "the encoder's first half | its second half | head, disttrain's stated split for vit_b_16"),
}




@functools.cache
def _meta(name: str) -> torch.nn.Module:
    """Shapes only (no memory, no init cost); splitting does not change the model, so tests share it."""
    return empty_model(name, num_classes=7)


@pytest.mark.parametrize("name", sorted(STATED))
def test_three_groups_are_each_familys_stated_split_at_the_measured_stride_16(name):
    model = _meta(name)
    groups = split_layer_groups(model, 3, name)
    expected, source = STATED[name]
    assert [(g.blocks[0], g.blocks[-1]) for g in groups] == expected, [g.describe() for g in groups]
    assert [g.head for g in groups] == [False, False, True] and [g.index for g in groups] == [0, 1, 2]
    header = layer_groups_header(name, model, 3)
    assert header.startswith(f"layer groups of {name} (finetune.groups=3: ") and source in header, header
    each_parameter_once_in_forward_order(model, groups)
    if name.startswith("vit"):
        assert groups[0].names[:4] == ["conv_proj.weight", "conv_proj.bias", "class_token", "encoder.pos_embedding"]
        return
    # group 1 starts at the first unit whose output is at stride 16: measured with hooks on a 224 px input
    units = split_rule(model).units(model)
    modules = dict(model.named_modules())
    starts = {unit[0]: i for i, unit in enumerate(units)}
    seen_at: dict[int, int] = {}
    hooks = [modules[unit[0]].register_forward_pre_hook(lambda m, args, i=i: seen_at.update({i: _stride(args[0])}))
             for i, unit in enumerate(units)]  # (a pre-hook returning something would replace the input)
    with torch.no_grad():
        model(torch.empty(1, 3, 224, 224, device="meta"))
    for hook in hooks:
        hook.remove()
    output = [seen_at[i + 1] for i in range(len(units) - 1)]  # what the next unit is given
    first_at_16 = next(i for i, stride in enumerate(output) if stride >= 16)
    assert starts[groups[1].blocks[0]] == first_at_16 and max(output[:first_at_16]) <= 8, output


def _stride(images: torch.Tensor) -> int:
    height = images.shape[2] if images.shape[2] == images.shape[3] else images.shape[1]  # NCHW, or Swin's NHWC
    return 224 // height


def test_names_without_a_prefix_and_torchvisions_networks_are_the_torchvision_family():
    assert family_of("resnet18") is FAMILY and family_of("no_such_model") is FAMILY and family_of("timm/resnet18") is not FAMILY
    assert family_of_model(torchvision.models.resnet18()) is FAMILY
    assert family_of_model(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None


@pytest.mark.parametrize("model, message", [
    (ModelConfig(name="resnet_18"), r"^model\.name: 'resnet_18' is not a torchvision classification model \(did you mean resnet18"),
    (ModelConfig(name="resnet18", pretrained="/nonexistent.pt"), r"^model\.pretrained: '/nonexistent\.pt' is not a file; give the path"),
    (ModelConfig(name="resnet18", pretrained="timm"), r"^model\.pretrained: `timm` is for timm models"),
])
def test_the_family_checks_the_name_and_the_weights(model, message):
    with pytest.raises(ConfigError, match=message):
        FAMILY.check(model)
    FAMILY.check(ModelConfig(name="resnet18", pretrained="imagenet"))


def test_missing_imagenet_weights_without_network_name_the_file_url_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    path, url = imagenet_file("mobilenet_v2")
    assert path.parent == tmp_path / "hub" / "checkpoints" and url.endswith(path.name)
    with pytest.raises(WeightsError) as err:
        fetch_imagenet_weights("mobilenet_v2", progress=False)
    message = str(err.value)
    assert path.name in message and url in message and str(path.parent) in message and "\n" not in message
    assert not path.exists()


def _no_network(*args, **kwargs):
    raise OSError("[Errno -3] Temporary failure in name resolution")


def test_imagenet_weights_in_the_hub_cache_load_with_a_fresh_head_and_their_normalization(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, _ = imagenet_file("resnet18")
    path.parent.mkdir(parents=True)
    torch.manual_seed(1)
    saved = torchvision.models.resnet18().state_dict()
    torch.save(saved, path)
    assert fetch_imagenet_weights("resnet18") == path
    model = build_model(ModelConfig(name="resnet18", pretrained="imagenet"), num_classes=4)
    state = model.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in state if not k.startswith("fc."))
    assert state["fc.weight"].shape == (4, 512)
    mean, std, source = normalization(ModelConfig(name="resnet18", pretrained="imagenet"), AugmentConfig())
    assert mean == pytest.approx([0.485, 0.456, 0.406]) and std == pytest.approx([0.229, 0.224, 0.225])
    mean, _, source = normalization(ModelConfig(name="resnet18", pretrained="imagenet"), AugmentConfig(mean=[0.5] * 3, std=[0.2] * 3))
    assert mean == [0.5] * 3 and "augment" in source


