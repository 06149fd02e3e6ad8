"""MixUp / CutMix (disttrain/data/mix.py): the targets say what the pixels hold, per sample."""

import io

import numpy as np
import pytest
import torch

from disttrain.config import AugmentConfig
from disttrain.data.mix import Mixer
from disttrain.task import Task

MIXUP = dict(mixup=0.4)
CUTMIX = dict(cutmix=1.0)
MINMAX = dict(cutmix=1.0, cutmix_minmax=[0.2, 0.7])
BOTH = dict(mixup=0.4, cutmix=1.0, mix_switch_prob=0.5)


def _planes(n, size=(16, 12)):
    """Sample i is the constant plane 10 * (i + 1) on every channel: a pixel tells whose it is."""
    values = 10.0 * (torch.arange(n, dtype=torch.float32) + 1)
    return values.view(n, 1, 1, 1).expand(n, 3, *size).contiguous(), values


def _mixer(n_classes, seed=0, smoothing=0.0, multi_label=False, **cfg):
    return Mixer(AugmentConfig(**cfg), Task(multi_label, n_classes, smoothing), seed)


def _pixel_share(mixed, values, perm):
    """Each sample's share of its own pixels' value in the mix (MixUp: the blend; CutMix: the area)."""
    own, partner = values, values[torch.from_numpy(perm)]
    share = (mixed - partner.view(-1, 1, 1, 1)) / (own - partner).view(-1, 1, 1, 1)
    share[torch.from_numpy(perm) == torch.arange(len(perm))] = 1.0  # paired with itself: all its own
    return share.mean(dim=(1, 2, 3)).double()


@pytest.mark.parametrize("kind", [MIXUP, CUTMIX, MINMAX, BOTH], ids=["mixup", "cutmix", "cutmix_minmax", "both"])
@pytest.mark.parametrize("n", [7, 16])
def test_each_samples_target_weight_on_its_own_label_is_its_pixel_share(kind, n):
    mixer = _mixer(n, seed=n, **kind)
    x, values = _planes(n)
    labels = torch.arange(n)  # every sample its own class: its column reads its weight
    for _ in range(3):
        mixed, soft = mixer(x, labels)
        lam, perm = mixer.last_lam, mixer.last_perm
        assert sorted(perm) == list(range(n))
        share = _pixel_share(mixed, values, perm)
        own = soft[torch.arange(n), labels].double()
        assert torch.allclose(share, torch.from_numpy(lam), atol=1e-5)
        assert torch.allclose(own, torch.from_numpy(lam), atol=1e-6)
        partner = soft[torch.arange(n), torch.from_numpy(perm)].double()
        fixed = perm == np.arange(n)
        assert torch.allclose(partner[~fixed], 1 - torch.from_numpy(lam[~fixed]), atol=1e-6)
        assert (lam < 1).any()  # something was mixed
        if kind is CUTMIX or kind is MINMAX:  # a mask: every pixel wholly its own or its partner's
            is_own = mixed == values.view(-1, 1, 1, 1)
            is_partner = mixed == values[torch.from_numpy(perm)].view(-1, 1, 1, 1)
            assert (is_own | is_partner).all()


def test_cutmix_minmax_boxes_have_sides_within_the_range():
    mixer = _mixer(8, **MINMAX)
    x, values = _planes(8, size=(40, 50))
    for _ in range(5):
        mixed, _ = mixer(x, torch.arange(8))
        partner_pixels = mixed[:, 0] == values[torch.from_numpy(mixer.last_perm)].view(-1, 1, 1)
        for i in np.flatnonzero(mixer.last_lam < 1):
            rows = partner_pixels[i].any(dim=1).sum().item()
            cols = partner_pixels[i].any(dim=0).sum().item()
            assert 0.2 * 40 - 1 <= rows <= 0.7 * 40 and 0.2 * 50 - 1 <= cols <= 0.7 * 50
            assert partner_pixels[i].sum().item() == rows * cols  # one rectangle


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("kind", [MIXUP, CUTMIX, BOTH], ids=["mixup", "cutmix", "both"])
def test_single_label_targets_sum_to_one_with_the_smoothing_folded_in(kind, eps):
    classes = 5
    mixer = _mixer(classes, smoothing=eps, **kind)
    x = torch.randn(9, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3])
    mixed, soft = mixer(x, labels)
    assert soft.dtype == torch.float32 and soft.shape == (9, classes)
    assert torch.allclose(soft.sum(dim=1), torch.ones(9), atol=1e-6)
    assert soft.min().item() >= eps / classes - 1e-7
    lam, perm = torch.from_numpy(mixer.last_lam).float(), torch.from_numpy(mixer.last_perm)
    one_hot = torch.nn.functional.one_hot(labels, classes).float() * (1 - eps) + eps / classes
    assert torch.allclose(soft, lam[:, None] * one_hot + (1 - lam[:, None]) * one_hot[perm], atol=1e-6)


def test_multi_label_rows_are_mixed_the_same_way():
    n, tags = 7, 6
    hot = (torch.rand(n, tags, generator=torch.Generator().manual_seed(2)) < 0.5).to(torch.uint8)
    mixer = _mixer(tags, multi_label=True, **BOTH)
    x, values = _planes(n)
    mixed, soft = mixer(x, hot)
    lam, perm = torch.from_numpy(mixer.last_lam).float(), torch.from_numpy(mixer.last_perm)
    assert soft.dtype == torch.float32 and soft.shape == (n, tags)
    assert soft.min() >= 0 and soft.max() <= 1
    assert torch.allclose(soft, lam[:, None] * hot.float() + (1 - lam[:, None]) * hot[perm].float(), atol=1e-6)
    assert torch.allclose(_pixel_share(mixed, values, mixer.last_perm), lam.double(), atol=1e-5)


def test_an_odd_batch_pairs_by_a_permutation_and_a_sample_paired_with_itself_is_unchanged():
    n = 7
    x, values = _planes(n)
    labels = torch.arange(n)
    seen_fixed = False
    for seed in range(40):
        mixer = _mixer(n, seed=seed, **BOTH)
        mixed, soft = mixer(x, labels)
        perm = mixer.last_perm
        assert sorted(perm) == list(range(n))
        for i in np.flatnonzero(perm == np.arange(n)):
            seen_fixed = True
            assert mixer.last_lam[i] == 1.0
            assert torch.equal(mixed[i], x[i])
            assert torch.equal(soft[i], torch.nn.functional.one_hot(labels[i], n).float())
    assert seen_fixed  # the seeds above do pair some sample with itself


def test_mix_prob_zero_leaves_every_sample_as_it_was():
    mixer = _mixer(5, mix_prob=0.0, **BOTH)
    x = torch.randn(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    mixed, soft = mixer(x, labels)
    assert torch.equal(mixed, x)
    assert torch.equal(soft, torch.nn.functional.one_hot(labels, 5).float())
    assert (mixer.last_lam == 1).all()


def test_mix_prob_mixes_about_that_share_of_the_samples():
    mixer = _mixer(5, mix_prob=0.3, **MIXUP)
    x, labels = torch.randn(400, 1, 2, 2), torch.zeros(400, dtype=torch.int64)
    mixer(x, labels)
    assert 0.2 < (mixer.last_lam < 1).mean() < 0.4


def test_same_seed_same_mix_and_the_state_dict_resumes_it_exactly():
    x = torch.randn(7, 3, 10, 10)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    a, b = _mixer(3, seed=5, **BOTH), _mixer(3, seed=5, **BOTH)
    for _ in range(2):
        (xa, sa), (xb, sb) = a(x, labels), b(x, labels)
        assert torch.equal(xa, xb) and torch.equal(sa, sb)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    resumed = _mixer(3, seed=99, **BOTH)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(3):
        (xa, sa), (xr, sr) = a(x, labels), resumed(x, labels)
        assert torch.equal(xa, xr) and torch.equal(sa, sr)
    other = _mixer(3, seed=6, **BOTH)
    assert not torch.equal(other(x, labels)[0], _mixer(3, seed=5, **BOTH)(x, labels)[0])


def test_a_channels_last_batch_stays_channels_last():
    x = torch.randn(5, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    for kind in (MIXUP, CUTMIX):
        mixed, _ = _mixer(3, **kind)(x, torch.tensor([0, 1, 2, 0, 1]))
        assert mixed.is_contiguous(memory_format=torch.channels_last)
        assert not mixed.is_contiguous()
    contiguous = torch.randn(5, 3, 8, 8)
    assert _mixer(3, **CUTMIX)(contiguous, torch.tensor([0, 1, 2, 0, 1]))[0].is_contiguous()


def test_enabled_until_mix_off_epoch_and_never_when_both_are_off():
    assert _mixer(3, **MIXUP).enabled(100)
    off_at_3 = _mixer(3, mix_off_epoch=3, **CUTMIX)
    assert [off_at_3.enabled(e) for e in range(5)] == [True, True, True, False, False]
    assert not _mixer(3).enabled(0)
    assert not _mixer(3, mix_off_epoch=0, **BOTH).enabled(0)


def test_describe_names_what_is_on():
    text = _mixer(3, mixup=0.2, cutmix=1.0, mix_switch_prob=0.5, mix_off_epoch=8).describe()
    assert text == "MixUp alpha 0.2 / CutMix alpha 1.0, switch 0.5, p 1.0, off from epoch 8"
    assert _mixer(3, **MINMAX).describe() == "CutMix box 0.2-0.7 of the side, p 1.0"
    assert _mixer(3).describe() == "off"
