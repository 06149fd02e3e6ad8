import math

import pytest
import torch

from disttrain.config import AugmentConfig, ConfigError
from disttrain.models.checks import build_config
from disttrain.data.augment import IMAGENET_MEAN, IMAGENET_STD, DeviceAugment

OFF = dict(flip=False, crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], max_rotate=0.0, max_zoom=1.0, brightness=0.0, contrast=0.0)


def _cfg(**changes):
    return AugmentConfig(**{**OFF, **changes})


def _batch(n=16, size=12, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _unnormalize(out, cfg):
    mean = torch.tensor(cfg.mean or IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std or IMAGENET_STD).view(1, 3, 1, 1)
    return out * std + mean


def test_eval_path_is_normalize_only_at_the_same_size_whatever_the_train_settings():
    cfg = AugmentConfig()  # every augmentation on: none of it applies to eval
    images = _batch()
    out = DeviceAugment(cfg, image_size=12)(images, train=False)
    assert out.dtype == torch.float32 and tuple(out.shape) == (16, 3, 12, 12)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(_unnormalize(out, cfg), images.float() / 255, atol=1e-5, rtol=0)


def test_identity_parameters_reproduce_the_input_in_train_mode():
    cfg = _cfg()
    out = DeviceAugment(cfg, image_size=12)(_batch(), train=True)
    torch.testing.assert_close(_unnormalize(out, cfg), _batch().float() / 255, atol=1e-5, rtol=0)


def test_flip_is_drawn_per_sample_and_exact():
    cfg = _cfg(flip=True)
    images = _batch(64)
    out = _unnormalize(DeviceAugment(cfg, image_size=12, seed=3)(images, train=True), cfg)
    x = images.float() / 255
    same = [(o - i).abs().max().item() < 1e-5 for o, i in zip(out, x)]
    mirrored = [(o - i.flip(-1)).abs().max().item() < 1e-5 for o, i in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 10 < sum(mirrored) < 54, "flips should be drawn per sample, about half of them"


def test_parameters_differ_between_samples_and_follow_the_config():
    aug = DeviceAugment(AugmentConfig(p_affine=1.0, max_rotate=30, max_zoom=1.5, p_lighting=1.0), image_size=8)
    theta = aug.train_matrices(32)
    assert len({tuple(t.flatten().tolist()) for t in theta}) == 32
    scale = theta[:, :, :2].det().abs()  # area of the sampled window relative to the whole square
    assert scale.min() >= 0.35 / 1.5**2 - 1e-6 and scale.max() <= 1.0 + 1e-6
    brightness, contrast, _ = aug.lighting_params(32)
    assert brightness.abs().max() <= 0.2 and len(set(brightness.tolist())) == 32
    assert ((contrast >= 0.8) & (contrast <= 1.2)).all()


def test_crop_samples_a_window_with_one_bounded_interpolation():
    # a horizontal ramp is linear, so bilinear sampling of it is exact away from the borders
    size = 64
    ramp = torch.linspace(0, 255, size).round().to(torch.uint8).view(1, 1, 1, size).expand(8, 3, size, size).contiguous()
    cfg = _cfg(crop_scale=[0.25, 0.25])
    out = _unnormalize(DeviceAugment(cfg, image_size=32, seed=1)(ramp, train=True), cfg)[:, 0] * 255
    spans = out[:, 16, -2] - out[:, 16, 1]  # left to right across the output, inside the borders
    expected = 0.5 * 255 * (32 - 3) / 32  # a window of half the width, 29 of 32 output columns
    assert torch.allclose(spans, torch.full_like(spans, expected), atol=2.5)
    assert len({round(v, 1) for v in out[:, 16, 1].tolist()}) > 1, "windows sit at different places"


def test_brightness_is_per_sample_and_bounded():
    cfg = _cfg(brightness=0.2, p_lighting=1.0)
    grey = torch.full((32, 3, 8, 8), 128, dtype=torch.uint8)
    out = _unnormalize(DeviceAugment(cfg, image_size=8, seed=5)(grey, train=True), cfg)
    shift = out.mean(dim=(1, 2, 3)) - 128 / 255
    assert shift.abs().max() <= 0.2 + 1e-5 and shift.std() > 0.05
    assert torch.allclose(out, out[:, :1, :1, :1].expand_as(out), atol=1e-5), "a flat image stays flat"


def test_random_erasing_blanks_one_rectangle_to_the_mean():
    cfg = _cfg(erase_p=1.0)
    images = torch.full((16, 3, 32, 32), 250, dtype=torch.uint8)
    out = DeviceAugment(cfg, image_size=32, seed=2)(images, train=True)
    erased = (out == 0).all(dim=1)  # (n, H, W)
    fractions = erased.float().mean(dim=(1, 2))
    assert (fractions > 0.005).all() and (fractions < 0.4).all()
    for mask in erased:
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all(), "the erased region is one rectangle"


def test_same_seed_same_output_and_generator_state_round_trips():
    cfg = AugmentConfig(erase_p=0.5, saturation=0.3)
    a, b = DeviceAugment(cfg, 8, seed=1), DeviceAugment(cfg, 8, seed=1)
    images = _batch(32)
    torch.testing.assert_close(a(images, True), b(images, True), rtol=0, atol=0)
    state = a.state_dict()
    first = a(images, True)
    a.load_state_dict(state)
    torch.testing.assert_close(a(images, True), first, rtol=0, atol=0)
    assert not torch.equal(DeviceAugment(cfg, 8, seed=2).train_matrices(32), DeviceAugment(cfg, 8, seed=1).train_matrices(32))


def test_resize_to_image_size():
    out = DeviceAugment(AugmentConfig(), image_size=8)(_batch(4, size=16), train=False)
    assert tuple(out.shape) == (4, 3, 8, 8)


@pytest.mark.parametrize(
    "override, expected",
    [("augment.crop_scale=[0.5, 1.5]", r"augment\.crop_scale"), ("augment.max_zoom=0.5", r"augment\.max_zoom"),
     ("augment.p_affine=2", r"augment\.p_affine")],
)
def test_bad_augment_config(override, expected):
    with pytest.raises(ConfigError, match=expected):
        build_config({}, [override])
    assert math.isclose(AugmentConfig().crop_ratio[1], 4 / 3)
