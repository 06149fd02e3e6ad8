"""Layer groups written once against the families: other group counts, models without a stated
split, freezing (freeze_to, train_bn), differential LRs with the decay split, SGDR at every step,
staged configs and their errors. (Each family's own split: test_torchvision.py, test_timm.py.)"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torchvision

from group_checks import each_parameter_once_in_forward_order

from disttrain.config import ConfigError, ScheduleConfig, frozen_groups, run_stages
from disttrain.models.build import empty_model
from disttrain.models.checks import build_config
from disttrain.models.groups import freeze, group_lrs, layer_groups_header, param_groups, split_layer_groups
from disttrain.train.schedule import Schedule

@functools.cache
def _meta(name: str) -> torch.nn.Module:
    """Shapes only (no memory, no init cost); splitting does not change the model, so tests share it."""
    return empty_model(name, num_classes=7)


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
    each_parameter_once_in_forward_order(model, groups)
    header = layer_groups_header(name, model, n)
    if expected is not None:
        assert [(g.blocks[0], g.blocks[-1]) for g in groups[:-1]] == expected, [g.describe() for g in groups]
        assert ("the body | the head" if n == 2 else "units in") in header
    else:
        assert "no stated split for SqueezeNet" in header
        body = [g.size for g in groups[:-1]]
        assert min(body) > 0 and max(body) < 0.8 * sum(body), [g.describe() for g in groups]


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


def test_keep_bn_stats_fixes_every_batchnorm_while_unfrozen_weights_still_train():
    model = torchvision.models.resnet18(num_classes=3)
    groups = split_layer_groups(model, 3)
    fixed = freeze(model, groups, 0, train_bn=True, keep_bn_stats=True)
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert fixed == batchnorms and all(p.requires_grad for p in model.parameters())
