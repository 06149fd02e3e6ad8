"""TrivialAugment and RandAugment on the device (issue 27 item 3): each operation against
torchvision's on the same image at a fixed magnitude, the ranges against torchvision's tables, one
batched call per operation kind present (the same result as each sample alone), draws that depend
only on the generator and come after every other draw, and `policy: none` drawing nothing."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode, RandAugment, TrivialAugmentWide

from disttrain.config import AugmentConfig, ConfigError
from disttrain.data.augment import IMAGENET_MEAN, IMAGENET_STD, DeviceAugment
from disttrain.data.policy import KERNELS, NUM_BINS, OPS, RANGES, AugmentPolicy, PolicyDraws, magnitudes

H, W = 16, 20  # not square: the geometric kernels' aspect handling is checked too
BILINEAR = InterpolationMode.BILINEAR


def _uint8(n: int = 1, h: int = H, w: int = W, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _torchvision(image: torch.Tensor, name: str, m: float) -> torch.Tensor:
    """torchvision's operation as its autoaugment applies it (interpolation bilinear, fill 0)."""
    shear = math.degrees(math.atan(m))
    return {
        "ShearX": lambda: TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=[shear, 0.0], interpolation=BILINEAR, center=[0, 0]),
        "ShearY": lambda: TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, shear], interpolation=BILINEAR, center=[0, 0]),
        "TranslateX": lambda: TF.affine(image, angle=0.0, translate=[int(m), 0], scale=1.0, shear=[0.0, 0.0], interpolation=BILINEAR),
        "TranslateY": lambda: TF.affine(image, angle=0.0, translate=[0, int(m)], scale=1.0, shear=[0.0, 0.0], interpolation=BILINEAR),
        "Rotate": lambda: TF.rotate(image, m, interpolation=BILINEAR),
        "Brightness": lambda: TF.adjust_brightness(image, 1 + m),
        "Color": lambda: TF.adjust_saturation(image, 1 + m),
        "Contrast": lambda: TF.adjust_contrast(image, 1 + m),
        "Sharpness": lambda: TF.adjust_sharpness(image, 1 + m),
        "Posterize": lambda: TF.posterize(image, int(m)),
        "Solarize": lambda: TF.solarize(image, m if image.dtype == torch.uint8 else m / 255),
        "AutoContrast": lambda: TF.autocontrast(image),
        "Equalize": lambda: TF.equalize(image),
    }[name]()


CASES = [("ShearX", 0.3), ("ShearX", -0.99), ("ShearY", 0.5), ("ShearY", -0.3), ("TranslateX", 7), ("TranslateX", -4),
         ("TranslateY", 5), ("TranslateY", -9), ("Rotate", 30.0), ("Rotate", -135.0), ("Rotate", 13.5),
         ("Brightness", 0.5), ("Brightness", -0.99), ("Color", 0.9), ("Color", -0.9), ("Contrast", 0.66), ("Contrast", -0.5),
         ("Sharpness", 0.99), ("Sharpness", -0.9), ("Posterize", 2), ("Posterize", 5), ("Posterize", 8), ("Solarize", 128.0),
         ("Solarize", 246.5), ("Solarize", 0.0), ("AutoContrast", 0.0), ("Equalize", 0.0)]


def _tolerance(name: str, m: float) -> tuple[float, float]:
    """(below, above): the bounds of mine - torchvision's, in 8-bit levels, on a uint8 image.
    Geometric: torchvision's uint8 path rounds the same bilinear value to the nearest level (0.5).
    Brightness, autocontrast: it truncates its float result toward 0 (mine is above by < 1 level).
    Color, contrast, sharpness: that truncation, plus its grey (floored) or smoothed (rounded) image
    being < 1 level off, weighted by |1 - factor| = |m|. Posterize, solarize, equalize act on the
    8-bit values as torchvision's: exact (but for float32 rounding)."""
    eps = 2e-3  # float32 rounding of the values x 255 (the worst measured 3e-4; other kernels round otherwise)
    if name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        return 0.5 + eps, 0.5 + eps
    if name in ("Brightness", "AutoContrast"):
        return eps, 1.0
    if name in ("Color", "Contrast", "Sharpness"):
        return abs(m) + eps, 1.0 + abs(m)
    return eps, eps


@pytest.mark.parametrize("name,m", CASES)
def test_each_operation_matches_torchvisions_on_a_uint8_image(name, m):
    image = _uint8(h=2 * H, w=2 * W)  # 1280 pixels: equalize's step (pixels / 255) is > 1, its rounding matters
    mine = KERNELS[name](image.float() / 255, torch.tensor([float(m)])) * 255
    difference = mine - _torchvision(image[0], name, m).float()
    below, above = _tolerance(name, m)
    assert -below <= difference.min() and difference.max() <= above, (difference.min(), difference.max())
    assert difference.abs().mean() <= 0.6 * max(below, above), "the errors spread over the bound (about half on average)"
    assert 0 <= mine.min() and mine.max() <= 255


@pytest.mark.parametrize("name,m", [case for case in CASES if case[0] not in ("Posterize", "Equalize")])
def test_the_float_operations_are_torchvisions_float_ones(name, m):
    """Where torchvision's float path is the same formula (all but the two 8-bit ones), the results
    agree to float rounding."""
    x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(KERNELS[name](x, torch.tensor([float(m)])), _torchvision(x[0], name, m)[None], atol=1e-5, rtol=0)


def test_the_operations_and_their_ranges_are_torchvisions_at_every_bin():
    for policy, reference in (("trivial", TrivialAugmentWide()._augmentation_space(NUM_BINS)),
                              ("rand", RandAugment()._augmentation_space(NUM_BINS, (H, W)))):
        assert OPS == tuple(reference), "the same 14 operations in the same order"
        for name, (values, signed) in reference.items():
            assert RANGES[policy][name].signed == signed, (policy, name)
            ops = torch.full((NUM_BINS,), OPS.index(name))
            mine = magnitudes(policy, ops, torch.arange(NUM_BINS), (H, W))
            expected = values.double().expand(NUM_BINS) if values.ndim else torch.zeros(NUM_BINS, dtype=torch.float64)
            torch.testing.assert_close(mine, expected, atol=1e-5, rtol=0, msg=f"{policy} {name}")


def _counting(calls: Counter, sizes: list) -> dict:
    def wrap(name, kernel):
        def counted(x, m):
            calls[name] += 1
            sizes.append((name, len(x)))
            return kernel(x, m)
        return counted
    return {name: wrap(name, kernel) for name, kernel in KERNELS.items()}


def test_a_batch_runs_one_call_per_kind_present_and_equals_each_sample_alone():
    policy = AugmentPolicy("trivial")
    x = torch.rand(64, 3, H, W, generator=torch.Generator().manual_seed(2))
    draws = policy.draw(len(x), (H, W), torch.Generator().manual_seed(2))
    assert torch.bincount(draws.ops[:, 0], minlength=len(OPS)).min() >= 2, "every kind, on several samples"
    present = set(OPS) - {"Identity"}
    calls, sizes = Counter(), []
    batched = policy.apply_(x.clone(), draws, _counting(calls, sizes))
    assert calls == Counter(present), "one call per kind present, none for the others"
    assert dict(sizes) == {name: int((draws.ops == OPS.index(name)).sum()) for name in present}, "each call gets all its samples"
    alone = torch.cat([policy.apply_(x[i:i + 1].clone(), draws.select(slice(i, i + 1))) for i in range(len(x))])
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=0)
    assert 0 <= batched.min() and batched.max() <= 1
    identity = (draws.ops[:, 0] == 0).nonzero().squeeze(1)
    assert torch.equal(batched[identity], x[identity])
    changed = (batched - x).abs().flatten(1).amax(1) > 0
    assert changed.sum() >= len(x) - len(identity) - 4, "the others changed (but a few mild ones)"


def test_handmade_draws_call_exactly_the_kinds_they_name():
    policy = AugmentPolicy("trivial")
    ops = torch.tensor([[1], [6], [1], [0], [13], [6], [6]])
    draws = PolicyDraws(ops, torch.tensor([[0.2], [0.5], [-0.3], [0.0], [0.0], [-0.4], [0.1]], dtype=torch.float64))
    calls, sizes = Counter(), []
    out = policy.apply_(torch.rand(7, 3, H, W, generator=torch.Generator().manual_seed(4)), draws, _counting(calls, sizes))
    assert calls == Counter({"ShearX": 1, "Brightness": 1, "Equalize": 1})
    assert sorted(sizes) == [("Brightness", 3), ("Equalize", 1), ("ShearX", 2)]
    assert out.shape == (7, 3, H, W)
    with pytest.raises(ValueError, match="draws for"):
        policy.apply_(torch.rand(6, 3, H, W), draws)


def test_randaugment_applies_policy_ops_operations_per_sample_in_turn():
    policy = AugmentPolicy("rand", num_ops=3, magnitude=9)
    x = torch.rand(32, 3, H, W, generator=torch.Generator().manual_seed(5))
    draws = policy.draw(len(x), (H, W), torch.Generator().manual_seed(6))
    assert draws.ops.shape == draws.magnitudes.shape == (32, 3)
    calls, sizes = Counter(), []
    out = policy.apply_(x.clone(), draws, _counting(calls, sizes))
    identities = int((draws.ops == 0).sum())
    assert sum(size for _, size in sizes) + identities == 32 * 3, "every sample gets its 3 operations"
    assert sum(calls.values()) == sum(len(set(draws.ops[:, j].tolist()) - {0}) for j in range(3)), "one call per kind per slot"
    # the same as three single-operation passes in order
    one = AugmentPolicy("rand", num_ops=1, magnitude=9)
    step = x.clone()
    for j in range(3):
        step = one.apply_(step, draws.select((slice(None), slice(j, j + 1))))
    torch.testing.assert_close(out, step, atol=0, rtol=0)
    # every magnitude is the one of bin 9, signed where the operation is
    rotations = draws.magnitudes[draws.ops == OPS.index("Rotate")]
    assert set(rotations.abs().tolist()) <= {9.0} and len(rotations) > 0
    translations = draws.magnitudes[draws.ops == OPS.index("TranslateX")].abs()
    assert set(translations.tolist()) <= {float(int(150 / 331 * W * 9 / 30))}, "whole pixels, truncated as torchvision's int()"
    assert set(draws.magnitudes[draws.ops == OPS.index("Posterize")].tolist()) <= {7.0}


def test_trivialaugment_draws_one_operation_per_sample_uniformly_with_its_own_magnitude_and_sign():
    draws = AugmentPolicy("trivial").draw(14 * 200, (224, 224), torch.Generator().manual_seed(7))
    counts = torch.bincount(draws.ops[:, 0], minlength=len(OPS))
    assert counts.min() > 140 and counts.max() < 260, counts
    rotations = draws.magnitudes[draws.ops == OPS.index("Rotate")]
    assert rotations.min() < -100 and rotations.max() > 100 and (rotations.abs() <= 135).all()
    assert len(set(rotations.abs().tolist())) > 20, "magnitudes from the 31 bins"
    assert set(draws.magnitudes[draws.ops == OPS.index("Posterize")].tolist()) == {2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}


def _cfg(**changes) -> AugmentConfig:
    return AugmentConfig(**{"p_lighting": 1.0, "erase_p": 0.5, **changes})


def test_the_draws_depend_only_on_the_generator():
    images = _uint8(12, 24, 24, seed=8)
    cfg = _cfg(policy="trivial")
    first = DeviceAugment(cfg, image_size=16, seed=3)(images, train=True)
    assert torch.equal(first, DeviceAugment(cfg, image_size=16, seed=3)(images, train=True))
    assert not torch.equal(first, DeviceAugment(cfg, image_size=16, seed=4)(images, train=True))
    aug = DeviceAugment(cfg, image_size=16, seed=3)
    state = aug.state_dict()
    aug(images, train=True)
    aug.load_state_dict(state)  # a resume replays the same batch
    assert torch.equal(first, aug(images, train=True))


def test_policy_none_draws_nothing_and_the_policy_draws_after_every_other_draw():
    images = _uint8(10, 24, 24, seed=9)
    off = DeviceAugment(_cfg(), image_size=16, seed=5)
    off(images, train=True)
    existing = DeviceAugment(_cfg(), image_size=16, seed=5)  # the draws that existed before the policy, in order
    existing.train_matrices(10), existing.lighting_params(10), existing.erase_boxes(10)
    assert torch.equal(off.generator.get_state(), existing.generator.get_state()), "policy none draws nothing more"
    for name in ("trivial", "rand"):
        on = DeviceAugment(_cfg(policy=name), image_size=16, seed=5)
        out = on(images, train=True)
        # the same crop, lighting and erasing as without the policy, then the policy's own draws
        ref = DeviceAugment(_cfg(), image_size=16, seed=5)
        theta, lighting, boxes = ref.train_matrices(10), ref.lighting_params(10), ref.erase_boxes(10)
        draws = on.policy.draw(10, (16, 16), ref.generator)
        assert torch.equal(on.generator.get_state(), ref.generator.get_state()), "the policy's draws come last"
        x = on.policy.apply_(ref._resample(images.float() / 255, theta), draws)
        x = (ref._lighting(x, lighting) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        torch.testing.assert_close(out, ref._erase(x, boxes), atol=1e-5, rtol=0)
    evaluation = DeviceAugment(_cfg(policy="trivial"), image_size=16, seed=5)
    before = evaluation.generator.get_state()
    evaluation(images, train=False)
    assert torch.equal(evaluation.generator.get_state(), before), "evaluation draws nothing"


def _unnormalize(out: torch.Tensor) -> torch.Tensor:
    return out * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


@pytest.mark.parametrize("name", ["trivial", "rand"])
def test_the_policy_runs_after_the_resample_and_before_normalization(name):
    """Lighting and erasing off: the output with the policy is the policy applied to the output
    without it (same seed), with the draws the generator gives next."""
    images = _uint8(16, 24, 24, seed=10)
    cfg = dict(p_lighting=0.0, erase_p=0.0)
    off = DeviceAugment(AugmentConfig(**cfg), image_size=16, seed=6)
    plain = _unnormalize(off(images, train=True)).clamp(0, 1)
    on = DeviceAugment(AugmentConfig(**cfg, policy=name, policy_ops=2, policy_magnitude=12), image_size=16, seed=6)
    expected = on.policy.apply_(plain.contiguous(), on.policy.draw(16, (16, 16), off.generator))
    torch.testing.assert_close(_unnormalize(on(images, train=True)), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, plain, atol=1e-3)


def test_policy_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="augment.policy"):
        AugmentConfig(policy="auto")
    with pytest.raises(ConfigError, match="augment.policy_magnitude"):
        AugmentConfig(policy="rand", policy_magnitude=31)
    with pytest.raises(ValueError, match="augment.policy"):
        AugmentPolicy("none")
