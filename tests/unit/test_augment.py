import torch

from disttrain.config import AugmentConfig
from disttrain.data.augment import DeviceAugment


def _batch(n=16, size=12, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _unnormalize(out, cfg):
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return out * std + mean


def test_eval_path_is_normalize_only_at_the_same_size():
    cfg = AugmentConfig()
    aug = DeviceAugment(cfg, image_size=12)
    images = _batch()
    out = aug(images, train=False)
    assert out.dtype == torch.float32 and tuple(out.shape) == (16, 3, 12, 12)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(_unnormalize(out, cfg), images.float() / 255, atol=1e-5, rtol=0)


def test_flip_is_drawn_per_sample_and_exact():
    cfg = AugmentConfig(flip=True)
    aug = DeviceAugment(cfg, image_size=12, seed=3)
    images = _batch(64)
    out = _unnormalize(aug(images, train=True), cfg)
    x = images.float() / 255
    same = [(o - i).abs().max().item() < 1e-5 for o, i in zip(out, x)]
    mirrored = [(o - i.flip(-1)).abs().max().item() < 1e-5 for o, i in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 10 < sum(mirrored) < 54, "flips should be drawn per sample, about half of them"


def test_no_flip_when_disabled():
    cfg = AugmentConfig(flip=False)
    out = DeviceAugment(cfg, image_size=12)(_batch(), train=True)
    torch.testing.assert_close(_unnormalize(out, cfg), _batch().float() / 255, atol=1e-5, rtol=0)


def test_same_seed_same_output_and_generator_state_round_trips():
    cfg = AugmentConfig()
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
