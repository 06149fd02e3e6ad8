"""The optimizer and its parameter groups: which parameters get no weight decay, for any family."""

from __future__ import annotations

import functools

import pytest
import torch

from disttrain.config import ModelConfig, OptimConfig
from disttrain.models.build import build_model, empty_model
from disttrain.models.groups import param_groups, split_layer_groups
from disttrain.models.optim import build_optimizer, decay_groups, no_weight_decay


@functools.cache
def _meta(name: str) -> torch.nn.Module:
    return empty_model(name, num_classes=7)


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
    whole = decay_groups(model.named_parameters(), 0.05)  # the whole model, and per layer group: one rule
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



def test_no_weight_decay_on_norm_and_bias():
    model = build_model(ModelConfig(name="resnet18", channels_last=False), num_classes=3)
    decay, no_decay = decay_groups(model.named_parameters(), 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.bn1.weight) in ids and id(model.fc.bias) in ids and id(model.fc.weight) not in ids
    sgd = build_optimizer(OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True), model)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]
    assert isinstance(build_optimizer(OptimConfig(), model), torch.optim.AdamW)
