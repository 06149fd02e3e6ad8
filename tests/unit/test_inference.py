"""model.pt for inference (what it must hold, and the one-line errors for anything else), the TTA
views and blend, and predict's input listing and sharding."""

from __future__ import annotations

import pytest
import torch

from disttrain.checkpoint import save_weights
from disttrain.data.folder import DataError
from disttrain.inference import predict_probs, read_model_file, tta_view
from disttrain.models import WeightsError
from disttrain.predict import list_inputs, share


def test_tta_views_are_per_sample_never_the_plain_pass_and_the_first_is_an_exact_flip():
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tta_view(x, 0), x.flip(-1))
    seen = []
    for index in range(8):
        batch = tta_view(x, index)
        alone = torch.cat([tta_view(x[i:i + 1], index) for i in range(len(x))])
        assert torch.equal(batch, alone), "a sample's view must not depend on its batch"
        assert batch.shape == x.shape and not torch.allclose(batch, x)
        seen.append(batch)
    assert all(not torch.allclose(a, b) for i, a in enumerate(seen) for b in seen[i + 1:])
    assert torch.allclose(tta_view(x, 2), tta_view(x, 1).flip(-1), atol=1e-5)  # a corner and its mirror


def test_tta_blend_is_fastais_lerp_toward_the_plain_pass_and_max_is_elementwise():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    x = torch.randn(6, 3, 8, 8)
    plain, none = predict_probs(model, x, torch.no_grad, tta_n=0)
    assert none is None and torch.allclose(plain.sum(1), torch.ones(6))
    _, blended = predict_probs(model, x, torch.no_grad, tta_n=3, beta=0.25)
    views = torch.stack([model(tta_view(x, i)).softmax(1) for i in range(3)])
    assert torch.allclose(blended, 0.25 * plain + 0.75 * views.mean(0), atol=1e-6)
    _, biggest = predict_probs(model, x, torch.no_grad, tta_n=3, use_max=True)
    assert torch.equal(biggest, torch.maximum(views.max(0).values, plain))


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _model_pt(path, **info):
    state = {"w": torch.zeros(2)}
    return save_weights(path, state, ["a", "b"], "resnet18", **info)


def test_a_model_pt_holds_what_inference_needs(tmp_path):
    info = dict(image_size=32, load_size=36, normalize={"mean": [0.5] * 3, "std": [0.2] * 3}, precision="no")
    state = read_model_file(_model_pt(tmp_path / "model.pt", **info))
    assert state["classes"] == ["a", "b"] and state["arch"] == "resnet18" and state["image_size"] == 32


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: _write(p / "step-00000010" / "meta.json", "{}").parent, "is a training checkpoint directory, not a weights file; expected the model.pt a training run writes"),
        (lambda p: torch.save({"fc.weight": torch.zeros(2, 2)}, p / "sd.pt") or p / "sd.pt",
         "is a bare state dict (tensors only, no class names or image size); expected the model.pt"),
        (lambda p: _write(p / "notes.txt", "hello\n"), "is not a torch file (not a zip archive"),
        (lambda p: _model_pt(p / "old.pt"), "written by an older disttrain without image_size, load_size, normalize"),
        (lambda p: p / "missing.pt", "no such file"),
    ],
)
def test_anything_else_is_one_line_saying_what_it_is(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(WeightsError) as err:
        read_model_file(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value) and "\n" not in str(err.value)


def test_inputs_keep_the_order_given_and_folders_are_sorted_recursively(tmp_path):
    for name in ("b/2.png", "b/1.png", "a/z/3.png", ".hidden/4.png", "b/.5.png"):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"x")
    single = tmp_path / "one.jpg"
    single.write_bytes(b"x")
    files = list_inputs([str(single), str(tmp_path / "in")])
    assert [str(p.relative_to(tmp_path)) for p in files] == ["one.jpg", "in/a/z/3.png", "in/b/1.png", "in/b/2.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files to predict in"):
        list_inputs([str(tmp_path / "empty")])
    with pytest.raises(DataError, match="nope: no such file or folder"):
        list_inputs([str(tmp_path / "nope")])


@pytest.mark.parametrize("count, world", [(153, 2), (7, 3), (2, 3), (10, 1)])
def test_shares_are_contiguous_cover_everything_once_and_differ_by_at_most_one(count, world):
    parts = [share(count, world, rank) for rank in range(world)]
    assert [i for part in parts for i in part] == list(range(count))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
