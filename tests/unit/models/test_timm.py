"""timm backbones (`model.name: timm/<name>`): names, sizes and preprocessing from pretrained_cfg,
weights from a local file or the Hugging Face cache (made here: no network), layer groups from
timm's group_matcher, and a model.pt that rebuilds the timm model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from disttrain.train.checkpoint import save_weights
from disttrain.config import AugmentConfig, ConfigError, ModelConfig
from disttrain.config.parse import build_config_unchecked
from disttrain.data.augment import DeviceAugment
from disttrain.models.build import build_model, empty_model, interpolation, normalization
from disttrain.models.checks import build_config, load_config
from disttrain.models.families import family_of, family_of_model
from disttrain.models.groups import freeze, layer_groups_header, split_layer_groups
from disttrain.models.timm import FAMILY
from disttrain.use.inference import load_saved_model


def _config(**model):
    return build_config({"model": {"name": "timm/test_resnet", **model}})


def test_a_timm_name_is_checked_with_the_closest_names_as_a_hint():
    with pytest.raises(ConfigError, match=r"model.name: 'convnxt_tiny' is not a timm model \(did you mean timm/convnext_tiny"):
        _config(name="timm/convnxt_tiny")
    assert _config(name="timm/resnet50.a1_in1k").model.name == "timm/resnet50.a1_in1k"  # a pretrained tag is a name too


def test_a_timm_name_is_the_timm_family_and_its_sizes_come_only_with_the_family():
    assert family_of("timm/test_resnet") is FAMILY and family_of_model(empty_model("timm/test_resnet")) is FAMILY
    pure = build_config_unchecked({"model": {"name": "timm/test_convnext"}})  # no family: the config's own defaults
    assert (pure.data.image_size, pure.data.load_size) == (224, 256)
    assert build_config_unchecked({"model": {"name": "timm/convnxt_tiny"}}).model.name == "timm/convnxt_tiny"


@pytest.mark.parametrize("name, pretrained, message", [
    ("timm/test_resnet", "imagenet", "`imagenet` is torchvision's weights; for timm/test_resnet use `timm`"),
    ("resnet18", "timm", "`timm` is for timm models (model.name: timm/<name>); for torchvision's resnet18 use `imagenet`"),
])
def test_the_weights_keyword_of_the_other_zoo_is_refused(name, pretrained, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(name=name, pretrained=pretrained)


def test_input_size_presize_normalization_and_interpolation_come_from_pretrained_cfg():
    cfg = _config(name="timm/test_convnext")  # input 160, crop_pct 0.95, bicubic, mean/std 0.5
    assert (cfg.data.image_size, cfg.data.load_size) == (160, 168)
    assert normalization(cfg.model, cfg.augment) == ([0.5] * 3, [0.5] * 3, "timm's pretrained_cfg of test_convnext")
    assert interpolation(cfg.model, cfg.augment) == ("bicubic", "timm's pretrained_cfg of test_convnext")
    given = build_config({"model": {"name": "timm/test_convnext"}, "data": {"image_size": 64},
                          "augment": {"interpolation": "bilinear", "mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]}})
    assert (given.data.image_size, given.data.load_size) == (64, 67)  # floor(64 / 0.95)
    assert normalization(given.model, given.augment)[2] == "augment.mean/std"
    assert interpolation(given.model, given.augment) == ("bilinear", "augment.interpolation")
    tv = build_config({})
    assert (tv.data.image_size, tv.data.load_size) == (224, 256) and interpolation(tv.model, tv.augment)[0] == "bilinear"
    with pytest.raises(ConfigError, match=r"data.image_size \(160\) is larger than data.load_size \(100\)"):
        build_config({"model": {"name": "timm/test_convnext"}, "data": {"load_size": 100}})


def test_bicubic_resampling_stays_in_the_pixel_range_and_differs_from_bilinear():
    images = (torch.rand(2, 3, 40, 40) > 0.5).to(torch.uint8) * 255  # hard edges: bicubic overshoots them
    views = {mode: DeviceAugment(AugmentConfig(), 24, channels_last=False, mean=[0, 0, 0], std=[1, 1, 1], interpolation=mode)(images, train=False)
             for mode in ("bilinear", "bicubic")}
    assert views["bicubic"].min() >= 0 and views["bicubic"].max() <= 1
    assert not torch.allclose(views["bicubic"], views["bilinear"], atol=1e-3)


def _timm_file(path, seed: int = 3) -> dict[str, torch.Tensor]:
    """A test_resnet state dict with timm's 1000-class head, seeded weights: the shape of timm's own file."""
    import timm

    torch.manual_seed(seed)
    state = timm.create_model("test_resnet").state_dict()
    save_file(state, str(path))
    return state


def test_a_local_safetensors_file_loads_with_a_fresh_head(tmp_path):
    state = _timm_file(tmp_path / "w.safetensors")
    model = build_model(ModelConfig(name="timm/test_resnet", pretrained=str(tmp_path / "w.safetensors")), num_classes=3)
    own = model.state_dict()
    assert own["fc.weight"].shape == (3, state["fc.weight"].shape[1])
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("fc."))


def test_a_fresh_head_on_pretrained_weights_is_timms_reset_classifier_not_its_from_scratch_init(tmp_path):
    """EfficientNet's from-scratch init draws the classifier from U(+-1/sqrt(classes)): +-0.71 for
    2 classes, logits in the tens on pretrained features. On pretrained weights the head is
    `reset_classifier`'s (PyTorch's Linear init, +-1/sqrt(features)), as timm does for its own weights."""
    import timm

    torch.manual_seed(0)
    save_file(timm.create_model("test_efficientnet").state_dict(), str(tmp_path / "w.safetensors"))
    scratch = build_model(ModelConfig(name="timm/test_efficientnet"), num_classes=2).get_classifier()
    tuned = build_model(ModelConfig(name="timm/test_efficientnet", pretrained=str(tmp_path / "w.safetensors")), num_classes=2).get_classifier()
    bound = 1 / tuned.in_features ** 0.5
    assert tuned.weight.abs().max() <= bound < scratch.weight.abs().max()


def _hf_cache(home, state_path) -> None:
    """`home`/hub laid out as huggingface_hub keeps timm/test_resnet.r160_in1k: a snapshot and refs/main."""
    repo = home / "hub" / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    state_path.rename(snapshot / "model.safetensors")


def test_timm_weights_come_from_the_hugging_face_cache_and_the_classifier_is_reset(tmp_path, monkeypatch):
    from huggingface_hub import constants

    state = _timm_file(tmp_path / "w.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "missing" / "hub"))
    with pytest.raises(ConfigError) as missing:
        _config(pretrained="timm")
    assert str(missing.value) == (
        f"model.pretrained=timm: timm's weights of test_resnet are not in the local cache (looked for {tmp_path}/missing/hub/"
        "models--timm--test_resnet.r160_in1k/snapshots/*/model.safetensors and "
        f"{tmp_path}/missing/hub/models--timm--test_resnet.r160_in1k/snapshots/*/pytorch_model.bin); on a machine with network "
        "run `hf download timm/test_resnet.r160_in1k` and copy the cache folder here (HF_HOME), or give the weights file's path")
    _hf_cache(tmp_path / "hf", tmp_path / "w.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    cfg = _config(pretrained="timm")
    model = build_model(cfg.model, num_classes=4)
    own = model.state_dict()
    assert model.get_classifier().out_features == 4
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("fc."))


@pytest.mark.parametrize("name, group0_last, group1_first, head", [
    ("timm/test_resnet", "layer2", "layer3", "fc"),
    ("timm/test_convnext", "stages.1", "stages.2", "head.fc"),
    ("timm/test_efficientnet", "blocks.2", "blocks.3", "classifier"),
    ("timm/convnext_tiny", "stages.1", "stages.2", "head.fc"),
    ("timm/efficientnet_b0", "blocks.2", "blocks.3", "classifier"),
    ("timm/mobilenetv2_100", "blocks.2", "blocks.3", "classifier"),
    ("timm/vit_small_patch16_224", "blocks.5", "blocks.6", "head"),  # isotropic: the stem and 6 of 12 blocks
])
def test_three_layer_groups_cut_timm_stages_after_stride_8(name, group0_last, group1_first, head):
    model = empty_model(name, num_classes=5)
    groups = split_layer_groups(model, 3, name)
    assert groups[0].blocks[-1] == group0_last and groups[1].blocks[0] == group1_first
    assert groups[2].head and groups[2].blocks == [head]
    assert sum(len(g.params) for g in groups) == len(list(model.parameters()))
    assert "timm's group_matcher stages, cut by its feature_info" in layer_groups_header(name, model, 3)
    assert ("the stem and the first half of the blocks" in layer_groups_header(name, model, 3)) == name.startswith("timm/vit")


def test_more_groups_cut_the_stages_and_the_final_norm_joins_the_last_stage():
    model = empty_model("timm/test_convnext")
    groups = split_layer_groups(model, 6, "timm/test_convnext")
    assert [g.blocks for g in groups] == [["stem"], ["stages.0"], ["stages.1"], ["stages.2"], ["stages.3", "head.norm"], ["head.fc"]]
    with pytest.raises(ConfigError, match=r"finetune.groups: 7 is too many for timm/test_convnext, whose body has 5 units"):
        split_layer_groups(model, 7, "timm/test_convnext")


def test_freezing_a_timm_model_leaves_the_head_and_the_norms_training():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="timm/test_resnet"), num_classes=2)
    groups = split_layer_groups(model, 3)
    freeze(model, groups, frozen=2, train_bn=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"fc.weight", "fc.bias", "bn1.weight", "layer1.0.bn1.weight"} <= trainable
    assert not trainable & {"conv1.0.weight", "layer3.0.conv1.weight"}


def test_a_timm_model_pt_rebuilds_the_same_network(tmp_path):
    torch.manual_seed(1)
    model = build_model(ModelConfig(name="timm/test_efficientnet"), num_classes=3).eval()  # channels_last, as saved_network builds it
    save_weights(tmp_path / "model.pt", model.state_dict(), ["a", "b", "c"], "timm/test_efficientnet", family="timm",
                 normalize={"mean": [0.5] * 3, "std": [0.5] * 3}, image_size=32, load_size=36, interpolation="bicubic")
    saved = load_saved_model(tmp_path / "model.pt", torch.device("cpu"))
    assert (saved.arch, saved.interpolation, type(saved.model).__name__) == ("timm/test_efficientnet", "bicubic", "EfficientNet")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(saved.model(x), model(x))


def test_the_timm_recipe_config_takes_its_sizes_from_the_model():
    cfg = load_config("configs/finetune_timm.yaml", ["model.pretrained=null"])  # its weights file is made from ../shared
    assert (cfg.model.name, cfg.data.image_size, cfg.data.load_size) == ("timm/mobilenetv2_100", 224, 256)
    assert [s.name for s in cfg.stages] == ["head", "unfreeze"] and cfg.stages[0].precompute
