"""Layer groups stated per torchvision family (and checked against the measured strides), other
group counts, the one-line error for too many, weight decay rules, freezing (freeze_to, train_bn),
differential LRs, SGDR at every step, staged configs and their errors, ImageNet weights from the
hub cache."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torchvision

from disttrain.models import build as models
from disttrain.config import ConfigError, ModelConfig, AugmentConfig, ScheduleConfig, build_config, frozen_groups, run_stages
from disttrain.models.groups import (
    SplitError, empty_model, family_of, freeze, group_lrs, layer_groups_header, param_groups, split_layer_groups,
)
from disttrain.models.build import WeightsError, build_model, fetch_imagenet_weights, imagenet_file, no_weight_decay, normalization
from disttrain.train.schedule import Schedule

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
    _each_parameter_once_in_forward_order(model, groups)
    if name.startswith("vit"):
        assert groups[0].names[:4] == ["conv_proj.weight", "conv_proj.bias", "class_token", "encoder.pos_embedding"]
        return
    # group 1 starts at the first unit whose output is at stride 16: measured with hooks on a 224 px input
    units = family_of(model).units(model)
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


def _each_parameter_once_in_forward_order(model, groups) -> None:
    names = [n for g in groups for n in g.names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each once
    by_name = dict(model.named_parameters())
    assert all(by_name[n] is p for g in groups for n, p in zip(g.names, g.params, strict=True))
    head = groups[-1].blocks[0]
    if type(model) is not torchvision.models.VisionTransformer:  # its conv_proj runs before the class token it holds
        assert names == [n for n, _ in model.named_parameters() if not n.startswith(head + ".")] + [
            n for n, _ in model.named_parameters() if n.startswith(head + ".")]


@pytest.mark.parametrize("name, n, expected", [
    ("resnet18", 2, [("conv1", "layer4")]),
    ("resnet18", 4, [("conv1", "layer2"), ("layer3", "layer3"), ("layer4", "layer4")]),  # units kept whole, sizes balanced
    ("resnet18", 6, [("conv1", "bn1"), ("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3"), ("layer4", "layer4")]),
    ("vit_b_16", 5, [("conv_proj", "encoder.layers.encoder_layer_2"),
                     ("encoder.layers.encoder_layer_3", "encoder.layers.encoder_layer_5"),
                     ("encoder.layers.encoder_layer_6", "encoder.layers.encoder_layer_8"),
                     ("encoder.layers.encoder_layer_9", "encoder.ln")]),
    ("squeezenet1_1", 3, None),  # no family: blocks balanced by parameter count, as before
])
def test_other_group_counts_cut_the_units_whole_into_balanced_groups(name, n, expected):
    model = _meta(name)
    groups = split_layer_groups(model, n, name)
    assert len(groups) == n and groups[-1].head and not any(g.head for g in groups[:-1])
    _each_parameter_once_in_forward_order(model, groups)
    header = layer_groups_header(name, model, n)
    if expected is not None:
        assert [(g.blocks[0], g.blocks[-1]) for g in groups[:-1]] == expected, [g.describe() for g in groups]
        assert ("the body | the head" if n == 2 else "units in") in header
    else:
        assert "no stated split for SqueezeNet" in header
        body = [g.size for g in groups[:-1]]
        assert min(body) > 0 and max(body) < 0.8 * sum(body), [g.describe() for g in groups]


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


@pytest.mark.parametrize("name, kept", [
    ("vit_b_16", {"class_token", "encoder.pos_embedding"}),
    ("convnext_tiny", {"features.1.0.layer_scale"}),
    ("swin_t", {"features.1.0.attn.relative_position_bias_table"}),
    ("swin_v2_t", {"features.1.0.attn.logit_scale"}),
])
def test_no_weight_decay_on_1d_parameters_tokens_position_embeddings_and_layer_scales(name, kept):
    model = _meta(name)
    named = dict(model.named_parameters())
    without = {n for n, p in named.items() if no_weight_decay(n, p)}
    assert kept <= without and all(p.ndim <= 1 for n, p in named.items() if n in without and not _a_rule_names(n))
    assert all(p.ndim > 1 and not _a_rule_names(n) for n, p in named.items() if n not in without)
    assert any("weight" in n and p.ndim > 1 for n, p in named.items() if n not in without)  # matrices and kernels decay
    by_id = {id(p): n for n, p in named.items()}
    whole = models.decay_groups(model.named_parameters(), 0.05)  # the whole model, and per layer group: one rule
    groups, _ = param_groups(split_layer_groups(model, 3, name), [1.0, 2.0, 3.0], 0.05)
    for out in (whole, groups):
        assert {by_id[id(p)] for g in out if g["weight_decay"] == 0.0 for p in g["params"]} == without
        assert {by_id[id(p)] for g in out if g["weight_decay"] == 0.05 for p in g["params"]} == set(named) - without


def _a_rule_names(name: str) -> bool:
    return any(part in name for part in ("token", "pos_embedding", "layer_scale", "relative_position_bias_table", "logit_scale"))


def test_timm_style_names_are_kept_out_of_weight_decay():
    matrix = torch.nn.Parameter(torch.zeros(1, 4, 8))
    for name in ("cls_token", "dist_token", "reg_token", "register_tokens", "pos_embed", "absolute_pos_embed",
                 "blocks.0.attn.relative_position_bias_table", "blocks.0.attn.rel_pos_h", "blocks.0.layer_scale_1", "blocks.0.ls1.gamma",
                 "stages.0.blocks.1.gamma"):
        assert no_weight_decay(name, matrix), name
    for name in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "encoder.layers.0.self_attention.in_proj_weight"):
        assert not no_weight_decay(name, matrix), name
    assert no_weight_decay("blocks.0.norm1.weight", torch.nn.Parameter(torch.zeros(8)))


@pytest.mark.parametrize("freeze_to, expected", [(0, 0), (1, 1), (2, 2), (-1, 2), (-2, 1), (3, 3)])
def test_freeze_to_follows_fastai(freeze_to, expected):
    assert frozen_groups(freeze_to, 3) == expected


@pytest.mark.parametrize("train_bn", [True, False])
def test_frozen_groups_get_no_gradient_and_norms_follow_train_bn(train_bn):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    groups = split_layer_groups(model, 3)
    fixed = freeze(model, groups, frozen_groups(-1, 3), train_bn)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    norm_params = {id(p) for m in fixed or [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)] for p in m.parameters()}
    for group in groups[:-1]:
        for p in group.params:
            is_norm = id(p) in norm_params
            assert p.requires_grad == (train_bn and is_norm)
            assert (p.grad is not None) == (train_bn and is_norm)
    assert all(p.grad is not None for p in groups[-1].params)
    assert (len(fixed) == 0) == train_bn  # without train_bn the frozen norms are returned to be kept in eval mode
    if not train_bn:
        assert len(fixed) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    freeze(model, groups, 0, train_bn)  # unfreezing makes everything trainable again
    assert all(p.requires_grad for p in model.parameters())


def test_differential_lrs_are_geometric_and_keep_the_no_decay_split_in_every_group():
    assert group_lrs(1e-3, 100, 3) == pytest.approx([1e-5, 1e-4, 1e-3], rel=1e-12)
    assert group_lrs(1e-3, 100, 1) == [1e-3]
    model = torchvision.models.resnet18(num_classes=3)
    groups = split_layer_groups(model, 3)
    freeze(model, groups, 1, train_bn=False)
    out, owner = param_groups(groups, group_lrs(1e-2, 10, 3), weight_decay=0.05)
    assert owner == [1, 1, 2, 2]  # group 0 is frozen: not in the optimizer at all
    assert [g["lr"] for g in out] == pytest.approx([1e-2 / math.sqrt(10)] * 2 + [1e-2] * 2)
    assert [g["weight_decay"] for g in out] == [0.05, 0.0, 0.05, 0.0]
    assert all(p.ndim > 1 for p in out[0]["params"]) and all(p.ndim <= 1 for p in out[1]["params"])
    assert sum(len(g["params"]) for g in out) == len(groups[1].params) + len(groups[2].params)


def test_sgdr_lr_at_every_step_restarts_on_epoch_boundaries():
    cfg = ScheduleConfig(name="sgdr", cycle_len=1, cycle_mult=2, min_lr_ratio=0.1)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [param], "lr": 2.0}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5}], lr=1.0)
    sched = Schedule(opt, cfg, total_steps=3 * 3, steps_per_epoch=3)  # 3 epochs = cycles of 1 and 2 epochs
    seen = []
    for _ in range(9):
        seen.append(sched.get_last_lr())
        sched.step()
    def cos(t, length):  # peak at the cycle's first step, 0.1 x peak at its last
        return 0.1 + 0.9 * (1 + math.cos(math.pi * t / (length - 1))) / 2
    expected = [cos(t, 3) for t in range(3)] + [cos(t, 6) for t in range(6)]
    assert [lrs[0] for lrs in seen] == pytest.approx([2.0 * f for f in expected], rel=1e-12)
    assert [lrs[1] for lrs in seen] == pytest.approx([0.5 * f for f in expected], rel=1e-12)  # the ratio between groups is kept
    assert seen[3][0] == 2.0 and seen[2][0] == pytest.approx(0.2)


def _staged(*stages, **sections):
    return build_config({**sections, "stages": list(stages)})


def test_stages_inherit_the_sections_and_overrides_reach_them():
    cfg = build_config(
        {"data": {"image_size": 64, "load_size": 72, "batch_size": 8}, "optim": {"lr": 1e-3},
         "stages": [{"name": "head", "freeze_to": -1, "epochs": 2}, {"epochs": 3, "image_size": 128, "lr": "auto",
                                                                     "schedule": {"name": "sgdr", "cycle_len": 1, "cycle_mult": 2}}]},
        ["stages.1.lr_ratio=100", "stages[0].batch_size=16"],
    )
    head, second = cfg.stages
    assert (head.epochs, head.lr, head.image_size, head.load_size, head.batch_size, head.freeze_to) == (2, 1e-3, 64, 72, 16, -1)
    assert (second.lr, second.lr_ratio, second.image_size, second.load_size, second.batch_size) == ("auto", 100, 128, 144, 8)
    assert second.schedule.name == "sgdr" and head.schedule.name == cfg.schedule.name
    plain = build_config({})
    assert plain.stages == [] and len(run_stages(plain)) == 1 and "stages" not in plain.to_dict()


@pytest.mark.parametrize(
    "stage, sections, message",
    [
        ({"freeze_to": 5}, {}, r"stages\[0\]\.freeze_to: 5 is outside the 3 layer groups \(finetune\.groups\); use 0"),
        ({"freeze_to": 3, "lr": "auto"}, {"finetune": {"train_bn": False}}, r"stages\[0\]\.freeze_to: 3 freezes every layer group .*lr: auto has nothing to sweep"),
        ({"epochs": 4, "schedule": {"name": "sgdr", "cycle_len": 1, "cycle_mult": 2}}, {},
         r"stages\[0\]\.epochs: 4 epochs do not fit whole SGDR cycles \(cycle_len 1, cycle_mult 2: 1, 3, 7 or 15 epochs\)"),
        ({"precompute": True, "freeze_to": -1}, {}, r"stages\[0\]\.precompute: .* set stages\[0\]\.augment=false"),
        ({"lr_ratio": 0.5}, {}, r"stages\[0\]\.lr_ratio: 0\.5 would give the first group a higher LR"),
        ({"freez_to": 1}, {}, r"unknown config key 'stages\[0\]\.freez_to'; did you mean 'stages\[0\]\.freeze_to'\?"),
    ],
)
def test_bad_stages_name_the_key_and_the_fix(stage, sections, message):
    with pytest.raises(ConfigError, match=message):
        _staged(stage, **sections)


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


def test_a_pretrained_file_of_another_architecture_names_the_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    with pytest.raises(WeightsError, match=r"other\.pt: only 0 of \d+ tensors fit ResNet"):
        build_model(ModelConfig(name="resnet18", pretrained=str(path)), num_classes=2)


def test_keep_bn_stats_fixes_every_batchnorm_while_unfrozen_weights_still_train():
    model = torchvision.models.resnet18(num_classes=3)
    groups = split_layer_groups(model, 3)
    fixed = freeze(model, groups, 0, train_bn=True, keep_bn_stats=True)
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert fixed == batchnorms and all(p.requires_grad for p in model.parameters())
