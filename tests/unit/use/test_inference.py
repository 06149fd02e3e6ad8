"""model.pt for inference (what it must hold, and the one-line errors for anything else), the TTA
views and blend, and what predict and evaluate read: input listing, labelled folders, global
batches and their shares, undecodable files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from disttrain.train.checkpoint import save_weights
from disttrain.config import ConfigError
from disttrain.models.checks import build_config
from disttrain.data.folder import DataError
from disttrain.data.loader import Workers, watched
from disttrain.use.inference import read_model_file
from disttrain.models.forward import MAX_TTA_VIEWS, check_tta, outputs, tta_view
from disttrain.data.paths import PathTable
from disttrain.use.inputs import batch_loader, choose_split, list_inputs, list_labelled, parse_extensions, rank_batches
from disttrain.models.build import WeightsError


def test_the_ten_tta_views_are_distinct_per_sample_and_in_the_documented_order():
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # no symmetry anywhere
    views = []
    for index in range(MAX_TTA_VIEWS):
        batch = tta_view(x, index)
        alone = torch.cat([tta_view(x[i:i + 1], index) for i in range(len(x))])
        assert torch.equal(batch, alone), "a sample's view must not depend on its batch"
        assert batch.shape == x.shape
        views.append(batch)
    assert MAX_TTA_VIEWS == 10
    assert all(not torch.allclose(a, b, atol=1e-3) for i, a in enumerate(views) for b in views[i + 1:]), "every pair differs"
    assert torch.equal(views[0], x.flip(-1)) and torch.equal(views[9], x)  # the flip first; the last is the plain pass
    assert all(not torch.allclose(view, x, atol=1e-3) for view in views[:9])
    for corner in range(1, 5):  # 5-8 are 1-4 mirrored
        assert torch.allclose(views[corner + 4], views[corner].flip(-1), atol=1e-5)
    # 1-4 are the top-left, top-right, bottom-left and bottom-right windows: in a 90% window resized
    # back, the image's own corner pixel stays (nearly) at its corner
    ramp = torch.arange(64.0).view(1, 1, 8, 8).expand(1, 3, 8, 8)
    corners = [tta_view(ramp, i)[0, 0] for i in range(1, 5)]
    assert corners[0][0, 0] < corners[1][0, 0] < corners[2][0, 0] < corners[3][0, 0]
    with pytest.raises(IndexError, match="there are 10 views"):
        tta_view(x, 10)


def test_tta_arguments_outside_their_ranges_are_one_line_errors():
    check_tta(1, 0.0)
    check_tta(10, 1.0)
    for n, beta, expected in [(0, 0.25, "--tta-n: must be 1 to 10"), (11, 0.25, "--tta-n: must be 1 to 10"),
                              (5, 2.0, "--tta-beta: must be in [0, 1]"), (5, -0.1, "--tta-beta: must be in [0, 1]")]:
        with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            check_tta(n, beta)
    assert build_config({"train": {"tta_n": 10}}).train.tta_n == 10 and build_config({}).train.tta_n == 5
    with pytest.raises(ConfigError, match="train.tta_n: must be 1 to 10"):
        build_config({"train": {"tta_n": 11}})


def test_tta_blend_is_fastais_lerp_toward_the_plain_pass_and_max_is_elementwise():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    x = torch.randn(6, 3, 8, 8)
    _, plain, none = outputs(model, x, torch.no_grad, tta_n=0)
    assert none is None and torch.allclose(plain.sum(1), torch.ones(6))
    _, _, blended = outputs(model, x, torch.no_grad, tta_n=3, beta=0.25)
    views = torch.stack([model(tta_view(x, i)).softmax(1) for i in range(3)])
    assert torch.allclose(blended, 0.25 * plain + 0.75 * views.mean(0), atol=1e-6)
    assert (blended >= 0).all() and torch.allclose(blended.sum(1), torch.ones(6))
    _, _, biggest = outputs(model, x, torch.no_grad, tta_n=3, use_max=True)
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


def test_inputs_keep_the_order_given_folders_are_sorted_and_filtered_by_suffix(tmp_path):
    for name in ("b/2.png", "b/1.JPG", "a/z/3.png", ".hidden/4.png", "b/.5.png", "b/notes.txt", "a/clip.mp4"):
        _write(tmp_path / "in" / name, "x")
    single = _write(tmp_path / "one.data", "x")  # a file named on the command line is taken whatever its suffix
    found = list_inputs([str(single), str(tmp_path / "in")])
    assert [p[len(str(tmp_path)) + 1:] for p in found.paths] == ["one.data", "in/a/z/3.png", "in/b/1.JPG", "in/b/2.png"]
    assert found.left_out == 2 and found.labels is None
    assert list_inputs([str(tmp_path / "in")], parse_extensions("txt,.MP4")).left_out == 3
    assert len(list_inputs([str(tmp_path / "in")], parse_extensions("*")).paths) == 5 and parse_extensions("*") is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files to predict in"):
        list_inputs([str(tmp_path / "empty")])
    _write(tmp_path / "texts" / "a.txt", "x")
    with pytest.raises(DataError, match=r"\(1 file\(s\) with other suffixes; --ext takes "):
        list_inputs([str(tmp_path / "texts")])
    with pytest.raises(DataError, match="nope: no such file or folder"):
        list_inputs([str(tmp_path / "nope")])
    with pytest.raises(DataError, match="no suffix given"):
        parse_extensions(",")


def test_a_labelled_folder_is_listed_like_predict_lists_it_with_the_models_labels(tmp_path):
    for name in ("valid/b/2.png", "valid/b/1.png", "valid/a/x/3.png", "valid/loose.png", "test/b/9.png", "train/a/0.png"):
        _write(tmp_path / name, "x")
    classes = ["b", "a", "c"]  # the model's order, not the folder's
    listing = list_labelled(choose_split(tmp_path, None), classes, "model.pt")
    assert listing.paths == list_inputs([str(tmp_path / "valid" / "a"), str(tmp_path / "valid" / "b")]).paths
    assert listing.labels == [1, 0, 0] and listing.folder == str(tmp_path / "valid")
    assert choose_split(tmp_path, "test") == tmp_path / "test" and choose_split(tmp_path / "valid", None) == tmp_path / "valid"
    with pytest.raises(DataError, match=r"--split nope: .* is not a folder \(.* holds valid, test\)"):
        choose_split(tmp_path, "nope")
    (tmp_path / "valid").rename(tmp_path / "old")
    (tmp_path / "test").rename(tmp_path / "old2")
    with pytest.raises(DataError, match="holds train/ but no valid/, val/ or test/"):
        choose_split(tmp_path, None)
    _write(tmp_path / "more" / "dog" / "1.png", "x")
    with pytest.raises(DataError, match=r"more: class folder\(s\) dog are not classes of model.pt \(b, a, c\)"):
        list_labelled(tmp_path / "more", classes, "model.pt")


@pytest.mark.parametrize("count, batch, world", [(153, 32, 2), (7, 2, 3), (2, 4, 3), (111, 16, 3), (10, 3, 1)])
def test_global_batches_are_cut_the_same_way_on_any_world_size_and_shared_in_contiguous_runs(count, batch, world):
    runs = [rank_batches(count, batch, world, rank) for rank in range(world)]
    assert [b for run in runs for b in run] == list(range(-(-count // batch)))  # every batch once, in order
    assert max(map(len, runs)) - min(map(len, runs)) <= 1


def test_an_undecodable_file_leaves_its_batch_with_the_reason_and_the_rest_keep_their_order(tmp_path):
    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((10, 12, 3), 40 * i, dtype=np.uint8)).save(path)
        paths.append(str(path))
    _write(tmp_path / "1.png", "not an image")
    (tmp_path / "3.png").write_bytes(b"")
    batches = list(batch_loader(paths, range(0, 3), 2, 8, workers=Workers(0), timeout=0))
    assert [index for index, _, _ in batches] == [[0], [2], [4]]
    assert [bad for _, _, bad in batches] == [[(1, "not an image (PIL cannot identify the format)")], [(3, "empty file (0 bytes)")], []]
    assert batches[1][1].shape == (1, 8, 8, 3) and int(batches[1][1][0, 0, 0, 0]) == 80
    # the same from a decoding worker (started by the fork server: what a share of 1,000+ images gets),
    # the listing moved to shared memory by make_loader before the worker starts (the worker maps it, no copy)
    loader = batch_loader(PathTable.from_paths(paths, tmp_path), range(0, 3), 2, 8, workers=Workers(1), timeout=60, pay_off=0)
    assert loader.num_workers == 1 and loader.multiprocessing_context.get_start_method() == "forkserver"
    assert all(t.is_shared() for t in loader.dataset.paths.tensors)
    from_worker = list(watched(loader, "predict"))
    assert [(i, b) for i, _, b in from_worker] == [(i, b) for i, _, b in batches]
    assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(batches, from_worker) if a is not None)
    assert batch_loader(paths, range(0, 3), 2, 8, workers=Workers(1), timeout=60).num_workers == 0  # 5 images: decoded here
