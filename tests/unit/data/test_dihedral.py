"""Images without an up (issue 26 item 5): augment.vflip / augment.dihedral drawn per sample inside
the one affine resample, the draws of a run without them unchanged, and the matching `dihedral`
TTA views (exact symmetries, batch independent) that a model.pt trained with them selects."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from disttrain.config import AugmentConfig, ConfigError, ModelConfig
from disttrain.config.reference import config_keys
from disttrain.data.augment import IMAGENET_MEAN, IMAGENET_STD, SYMMETRIES, DeviceAugment, apply_symmetry
from disttrain.models.build import build_model
from disttrain.models.checks import build_config
from disttrain.models.forward import MAX_TTA_VIEWS, TTA_VIEWS, check_tta, outputs, tta_view, tta_views_of
from disttrain.train.checkpoint import save_weights
from disttrain.use.inference import load_saved_model

# every other augmentation off: each output is one exact symmetry of the input
EXACT = dict(flip=False, crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], p_affine=0.0, p_lighting=0.0)
TOLERANCE = 1e-5  # grid_sample at exact pixel centres: float rounding of the coordinates only


def _image(n: int = 1, size: int = 9, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size) noise: no symmetry of the square maps it to itself."""
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _symmetries_drawn(cfg: AugmentConfig, images: torch.Tensor, seed: int = 1) -> list[int]:
    """For each augmented sample, the one index k of SYMMETRIES with output == symmetry k of the input."""
    aug = DeviceAugment(cfg, image_size=images.shape[-1], seed=seed, channels_last=False)
    plain = aug(images, train=False)  # normalized, not resampled (same size)
    out = aug(images, train=True)
    drawn = []
    for o, x in zip(out, plain):
        matches = [k for k in range(len(SYMMETRIES)) if (o - apply_symmetry(x, k)).abs().max() < TOLERANCE]
        assert len(matches) == 1, f"each output is exactly one symmetry of its input, got {matches}"
        drawn.append(matches[0])
    return drawn


def test_the_symmetry_table_and_its_exact_transforms_agree_and_are_torchs_rot90_and_flips():
    x = torch.rand(2, 3, 7, 7, generator=torch.Generator().manual_seed(0))
    expected = [x, torch.rot90(x, 1, (-2, -1)), torch.rot90(x, 2, (-2, -1)), torch.rot90(x, 3, (-2, -1)),
                x.flip(-1), x.flip(-2), x.transpose(-2, -1), torch.rot90(x, 1, (-2, -1)).flip(-1)]
    for k, matrix in enumerate(SYMMETRIES):
        assert torch.equal(apply_symmetry(x, k), expected[k])
        theta = torch.cat([matrix, torch.zeros(2, 1, dtype=matrix.dtype)], dim=1).float().expand(2, 2, 3)
        resampled = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
        torch.testing.assert_close(resampled, expected[k], atol=TOLERANCE, rtol=0)
    assert len({tuple(m.flatten().tolist()) for m in SYMMETRIES}) == 8
    with pytest.raises(ValueError, match="needs square images"):
        apply_symmetry(torch.zeros(1, 3, 4, 5), 1)


def test_dihedral_draws_each_of_the_8_symmetries_uniformly_per_sample():
    images = _image(1).expand(400, 3, 9, 9).contiguous()
    drawn = _symmetries_drawn(AugmentConfig(**{**EXACT, "dihedral": True}), images)
    counts = [drawn.count(k) for k in range(8)]
    assert all(25 <= c <= 80 for c in counts), f"uniform over the 8 symmetries (50 each expected): {counts}"
    assert len(set(drawn[:16])) > 3, "drawn per sample: one batch holds several symmetries"
    # with the horizontal flip on as well, the composition is still uniform over the group
    both = _symmetries_drawn(AugmentConfig(**{**EXACT, "dihedral": True, "flip": True}), images, seed=2)
    assert set(both) == set(range(8))


def test_vflip_alone_draws_only_the_identity_and_the_vertical_flip_and_with_flip_the_four_of_them():
    images = _image(1).expand(200, 3, 9, 9).contiguous()
    drawn = _symmetries_drawn(AugmentConfig(**{**EXACT, "vflip": True}), images)
    assert set(drawn) == {0, 5} and 60 < drawn.count(5) < 140
    assert len(set(drawn[:16])) == 2, "drawn per sample"
    with_flip = _symmetries_drawn(AugmentConfig(**{**EXACT, "vflip": True, "flip": True}), images, seed=3)
    assert set(with_flip) == {0, 2, 4, 5}  # identity, rotation by 180 = both flips, horizontal, vertical


def test_the_symmetry_joins_the_one_affine_matrix_after_the_draws_of_a_run_without_it():
    """Same seed, every other augmentation on: each matrix with dihedral is the one without it times
    a symmetry (drawn after everything else, so the earlier draws are unchanged)."""
    base = dict(p_affine=1.0, max_rotate=30, max_zoom=1.5, max_translate=0.1)
    off = DeviceAugment(AugmentConfig(**base), image_size=16, seed=4).train_matrices(64).double()
    on = DeviceAugment(AugmentConfig(**base, dihedral=True), image_size=16, seed=4).train_matrices(64).double()
    assert torch.equal(on[:, :, 2], off[:, :, 2])
    symmetry = torch.linalg.solve(off[:, :, :2], on[:, :, :2])  # off @ S = on
    index = [[k for k, m in enumerate(SYMMETRIES) if torch.allclose(s, m, atol=1e-5)] for s in symmetry]
    assert all(len(k) == 1 for k in index) and len({k[0] for k in index}) == 8


def test_without_the_new_keys_the_draws_are_those_recorded_before_they_existed():
    """Recorded with the code before vflip / dihedral existed (seed 7, three samples, the defaults):
    the matrices, and the generator's next draws (so no extra draw was made)."""
    aug = DeviceAugment(AugmentConfig(vflip=False, dihedral=False), image_size=16, seed=7)
    recorded = [[[-0.748885989189148, -0.0912998840212822, -0.09741947799921036], [-0.08342905342578888, 0.6843255758285522, 0.15718534588813782]],
                [[0.7355726361274719, 0.12620821595191956, 0.02180182747542858], [-0.09897079318761826, 0.5768262147903442, -0.3116470277309418]],
                [[-0.9041363000869751, -0.14315661787986755, 0.0], [-0.12387844920158386, 0.7823808789253235, -0.1191634088754654]]]
    torch.testing.assert_close(aug.train_matrices(3), torch.tensor(recorded), atol=1e-7, rtol=0)
    assert torch.rand(2, generator=aug.generator, dtype=torch.float64).tolist() == [0.9923102701916022, 0.7706986450429401]


def _batch(n: int = 5, size: int = 12) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)


def test_dihedral_tta_views_are_the_exact_symmetries_then_the_centre_and_do_not_depend_on_the_batch():
    x = _batch()
    exact = [x.flip(-1), x.flip(-2), torch.rot90(x, 2, (-2, -1)), torch.rot90(x, 1, (-2, -1)), torch.rot90(x, 3, (-2, -1)),
             x.transpose(-2, -1), x.flip(-2, -1).transpose(-2, -1)]
    views = [tta_view(x, index, "dihedral") for index in range(MAX_TTA_VIEWS)]
    for index, view in enumerate(views):
        alone = torch.cat([tta_view(x[i:i + 1], index, "dihedral") for i in range(len(x))])
        assert torch.equal(view, alone), "a sample's view must not depend on its batch"
        assert view.shape == x.shape
        assert index in (7, 8) or view.is_contiguous(memory_format=torch.channels_last), "exact views keep the memory format"
    for index, expected in enumerate(exact):
        assert torch.equal(views[index], expected), f"view {index} is an exact symmetry"
    assert torch.equal(views[9], x)
    torch.testing.assert_close(views[8], views[7].transpose(-2, -1), atol=1e-5, rtol=0)  # the centre, flipped about the diagonal
    assert all(not torch.allclose(a, b, atol=1e-3) for i, a in enumerate(views) for b in views[i + 1:]), "every pair differs"
    assert len(TTA_VIEWS["dihedral"]) == len(TTA_VIEWS["flips"]) == MAX_TTA_VIEWS == 10
    with pytest.raises(IndexError, match="there are 10 views"):
        tta_view(x, 10, "dihedral")
    with pytest.raises(ValueError, match="must be one of flips, dihedral"):
        tta_view(x, 0, "rotations")


def test_dihedral_tta_outputs_do_not_depend_on_the_batch_and_blend_the_dihedral_views():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 10 * 10, 3)).eval()
    x = _batch(6)
    for tta_n in (5, 10):
        _, plain, tta = outputs(model, x, torch.no_grad, tta_n=tta_n, views="dihedral")
        alone = torch.cat([outputs(model, x[i:i + 1], torch.no_grad, tta_n=tta_n, views="dihedral")[2] for i in range(len(x))])
        torch.testing.assert_close(tta, alone, atol=1e-6, rtol=0)
        with torch.no_grad():
            views = torch.stack([model(tta_view(x, i, "dihedral")).softmax(1) for i in range(tta_n)])
        torch.testing.assert_close(tta, 0.25 * plain + 0.75 * views.mean(0), atol=1e-6, rtol=0)
    flips = outputs(model, x, torch.no_grad, tta_n=5)[2]
    assert not torch.allclose(flips, outputs(model, x, torch.no_grad, tta_n=5, views="dihedral")[2], atol=1e-4)


def test_check_tta_counts_the_views_of_the_set():
    check_tta(10, 0.25, views="dihedral")
    with pytest.raises(ConfigError, match=r"--tta-n: must be 1 to 10 \(the symmetries of the whole image and its centre\), got 11"):
        check_tta(11, 0.25, views="dihedral")
    with pytest.raises(ConfigError, match=r"must be 1 to 10 \(the flips of the whole image and of its four corners\)"):
        check_tta(0, 0.25)


def test_the_config_keys_are_documented_off_by_default_and_select_the_dihedral_views():
    keys = config_keys()
    assert "images without an up" in keys["augment.vflip"].doc and "8 symmetries" in keys["augment.dihedral"].doc
    assert keys["augment.vflip"].default == keys["augment.dihedral"].default == "false"
    cfg = build_config({"augment": {"dihedral": True}})
    assert cfg.augment.dihedral and not cfg.augment.vflip
    assert tta_views_of(build_config({}).augment) == "flips"
    assert tta_views_of(cfg.augment) == tta_views_of(AugmentConfig(vflip=True)) == "dihedral"


def test_a_model_pt_says_its_views_and_an_older_one_means_flips(tmp_path):
    network = build_model(ModelConfig(name="resnet18"), num_classes=2)
    info = dict(image_size=32, load_size=36, normalize={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}, precision="no")
    save_weights(tmp_path / "new.pt", network.state_dict(), ["a", "b"], "resnet18", tta_views="dihedral", **info)
    save_weights(tmp_path / "old.pt", network.state_dict(), ["a", "b"], "resnet18", **info)
    assert load_saved_model(tmp_path / "new.pt", torch.device("cpu")).tta_views == "dihedral"
    assert load_saved_model(tmp_path / "old.pt", torch.device("cpu")).tta_views == "flips"
