"""`disttrain export` and `disttrain predict --weights model.onnx`, on a ResNet-18 trained briefly on
the MNIST sample, presized to 36 and seen at 32 (so the file resamples what predict feeds it).

The exported files are run by the real onnxruntime and torch.jit at two batch sizes, on the eval
views at 32 px and on the 36 px presized squares, and compared with PyTorch; their metadata is read
back with onnx and torch.jit; predict with the .onnx file is compared with predict with the
model.pt, within the export's tolerance."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import launch
from disttrain.train.checkpoint import save_weights
from disttrain.config import ModelConfig
from disttrain.data.decode import load_presized
from disttrain.use.export import ExportError, export, serving_model
from disttrain.use.exported import INPUT_LAYOUT, METADATA_FILE, eval_pixels, from_props
from disttrain.use.inference import read_model_file
from disttrain.models.forward import eval_view, outputs
from disttrain.models.build import build_model

pytestmark = pytest.mark.e2e

LOAD, SIZE = 36, 32
MEAN, STD = [0.1307] * 3, [0.3081] * 3
CLASSES = [str(c) for c in range(10)]


def _presized(paths: list[Path]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(load_presized(p, LOAD)) for p in paths])


@pytest.fixture(scope="module")
def digits(tmp_path_factory, mnist_small) -> Path:
    """40 of the valid digits (4 per class) in one folder, `<label>-<name>.png`: what predict reads."""
    root = tmp_path_factory.mktemp("digits")
    for label in CLASSES:
        for path in sorted((mnist_small / "valid" / label).glob("*.png"))[:4]:
            shutil.copy(path, root / f"{label}-{path.name}")
    return root


def _labels(digits: Path) -> torch.Tensor:
    return torch.tensor([int(p.name.split("-")[0]) for p in sorted(digits.iterdir())])


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory, digits) -> Path:
    """model.pt as a run saves it (save_weights, the keys a run writes) of a ResNet-18 fitted to the
    40 digits themselves (12 full-batch steps on their eval views, in eval mode: BatchNorm keeps its
    statistics, so the fitted model is the one predict runs): confident predictions, so the labels
    predict writes are a comparison that can fail. Not a claim of learning."""
    images, labels = _presized(sorted(digits.iterdir())), _labels(digits)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18"), num_classes=10)
    x = eval_view(SIZE, MEAN, STD)(images.permute(0, 3, 1, 2), train=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.eval()
    for _ in range(12):
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_weights(path, model.state_dict(), CLASSES, "resnet18", normalize={"mean": MEAN, "std": STD}, image_size=SIZE,
                 load_size=LOAD, precision="no")
    return path


@pytest.fixture(scope="module")
def onnx_export(model_pt, tmp_path_factory):
    """`disttrain export --format onnx` (the CLI's main, in this process): (the file, its stdout)."""
    from disttrain.cli import main

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["export", "--weights", str(model_pt), "--format", "onnx", "--out", str(out)])
    assert code == 0, stdout.getvalue()
    return out, stdout.getvalue()


def _pixels(digits: Path) -> torch.Tensor:
    """The digits' eval views at the image size, rounded to uint8 (B, 32, 32, 3)."""
    return eval_pixels(_presized(sorted(digits.iterdir())), SIZE)


def _printed_difference(stdout: str) -> float:
    line = next(l for l in stdout.splitlines() if "max abs difference of the probabilities: " in l)
    assert line.endswith("(tolerance 1e-4)"), line
    return float(line.split("probabilities: ")[1].split()[0])


def test_onnx_export_holds_its_metadata_takes_any_batch_and_agrees_with_pytorch(onnx_export, model_pt, digits):
    """The metadata read back with onnx; the input is uint8 (batch, height, width, 3), all three
    symbolic; onnxruntime on real digits, as 32 px eval views and as 36 px presized squares, at
    batch sizes 1 and 7, gives PyTorch's probabilities, and the wrapper is predict's forward
    (`outputs` on the eval view of the presized squares)."""
    import onnx
    import onnxruntime as ort

    path, stdout = onnx_export
    assert 0 <= _printed_difference(stdout) <= 1e-4
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"], "no temporary file, no external weights file"
    model = onnx.load(str(path))
    meta = from_props({p.key: p.value for p in model.metadata_props})
    assert meta["classes"] == CLASSES and meta["image_size"] == SIZE and meta["load_size"] == LOAD and meta["arch"] == "resnet18"
    assert meta["mean"] == pytest.approx(MEAN) and meta["std"] == pytest.approx(STD) and meta["input_layout"] == INPUT_LAYOUT
    assert meta["batch_size"] == "dynamic" and meta["disttrain_version"]
    (graph_input,) = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert all(d.dim_param for d in dims[:3]) and dims[3].dim_value == 3

    state = read_model_file(model_pt)
    wrapper = serving_model(state)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    view = eval_view(SIZE, MEAN, STD)
    for pixels in (_pixels(digits), _presized(sorted(digits.iterdir()))):
        for n in (1, 7):
            batch = pixels[:n]
            with torch.no_grad():
                expected = wrapper(batch)
                _, plain, _ = outputs(wrapper.network, view(batch.permute(0, 3, 1, 2), train=False), torch.no_grad)
            got = torch.from_numpy(session.run(None, {"images": batch.numpy()})[0])
            assert got.shape == (n, 10) and (got - expected).abs().max() <= 1e-4
            if batch.shape[1] == LOAD:
                assert torch.allclose(expected, plain, atol=1e-6, rtol=0), "the wrapper computes predict's forward"


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_holds_its_metadata_takes_any_batch_and_a_failed_check_writes_nothing(model_pt, digits, tmp_path, capsys):
    """Through the CLI in this process; the extra file read back with torch.jit.load; the module on
    batches of 1 and 7. A tolerance no file meets (the API's `tolerance`, here -1) fails the
    export: ExportError, nothing left in the folder."""
    from disttrain.cli import main

    out = tmp_path / "model.ts"
    assert main(["export", "--weights", str(model_pt), "--format", "torchscript", "--out", str(out)]) == 0
    assert _printed_difference(capsys.readouterr().out) <= 1e-4
    extra = {METADATA_FILE: ""}
    module = torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads(extra[METADATA_FILE])
    assert meta["classes"] == CLASSES and meta["image_size"] == SIZE and meta["load_size"] == LOAD and meta["mean"] == pytest.approx(MEAN)
    wrapper = serving_model(read_model_file(model_pt))
    with torch.no_grad():
        for pixels in (_pixels(digits), _presized(sorted(digits.iterdir()))):
            for n in (1, 7):
                assert (module(pixels[:n]) - wrapper(pixels[:n])).abs().max() <= 1e-4

    with pytest.raises(ExportError, match=r"bad\.ts: the exported TorchScript model's probabilities differ from PyTorch's by .* "
                                          r"\(tolerance -1e\+0\); nothing written"):
        export(model_pt, "torchscript", tmp_path / "bad.ts", tolerance=-1.0, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ts"]


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def margin_of(probs: torch.Tensor) -> torch.Tensor:
    """The best probability minus the second best, per row."""
    top2 = probs.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def test_predict_with_the_onnx_file_matches_predict_with_the_model_pt(onnx_export, model_pt, digits, tmp_path, capsys):
    """The same CSV format and rows. Both see the same presized squares (the .onnx file resamples
    them inside as the eval view does): every probability within the export's tolerance (1e-4,
    plus 1e-6 for the CSV's 6 decimals), and the same label wherever the two best probabilities are
    further apart than twice that. 2 processes write the same file as 1."""
    from disttrain.cli import main

    onnx_file = onnx_export[0]
    common = ["predict", "--precision", "no", "--workers", "0", "--batch-size", "16", str(digits)]
    assert main([*common, "--weights", str(model_pt), "--out", str(tmp_path / "pt.csv")]) == 0
    assert main([*common, "--weights", str(onnx_file), "--out", str(tmp_path / "onnx.csv")]) == 0
    err = capsys.readouterr().err
    assert "predicted 40 image(s) -> " + str(tmp_path / "onnx.csv") + ", 0 skipped (not decodable), onnxruntime (CPU); " in err
    pt, ox = _rows((tmp_path / "pt.csv").read_text()), _rows((tmp_path / "onnx.csv").read_text())
    assert list(pt[0]) == list(ox[0]) == ["path", "label", "score", *CLASSES]
    assert [r["path"] for r in pt] == [r["path"] for r in ox] == [str(p) for p in sorted(digits.iterdir())]
    p_pt = torch.tensor([[float(r[c]) for c in CLASSES] for r in pt], dtype=torch.float64)
    p_ox = torch.tensor([[float(r[c]) for c in CLASSES] for r in ox], dtype=torch.float64)
    tolerance = 1e-4 + 1e-6
    difference = (p_ox - p_pt).abs()
    print(f"predict .onnx vs .pt: max abs difference {difference.max():.3g}")
    assert difference.max() <= tolerance
    enforced = margin_of(p_pt) > 2 * tolerance  # rows whose label the tolerance cannot change
    same = torch.tensor([a["label"] == b["label"] for a, b in zip(pt, ox)])
    assert (same | ~enforced).all() and enforced.sum() >= 30, (same, enforced)

    launch(["-m", "disttrain.cli", *common, "--weights", str(onnx_file), "--out", str(tmp_path / "two.csv")], nproc=2)
    assert (tmp_path / "two.csv").read_bytes() == (tmp_path / "onnx.csv").read_bytes()


def test_bad_weights_and_arguments_exit_2_with_one_line(model_pt, onnx_export, digits, tmp_path, monkeypatch, capsys):
    """In this process; nothing is written."""
    from disttrain.cli import main

    monkeypatch.chdir(tmp_path)
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(model_pt, weights_only=True)["model"], bare)
    (tmp_path / "fake.onnx").write_bytes(model_pt.read_bytes()[:4096])
    none, weights = str(tmp_path / "none.pt"), str(model_pt)
    cases = [
        (["export", "--weights", none, "--out", "m.onnx"], f"{none}: no such file"),
        (["export", "--weights", str(bare), "--out", "m.onnx"], f"{bare}: is a bare state dict"),
        (["export", "--weights", weights, "--out", "missing/m.onnx"], "--out missing/m.onnx: the folder missing does not exist"),
        (["export", "--weights", weights, "--out", str(tmp_path)], f"--out {tmp_path}: is a folder; give a file name"),
        (["export", "--weights", weights, "--format", "torchscript", "--no-dynamic-batch", "--out", "m.ts"],
         "--no-dynamic-batch: only for --format onnx"),
        (["export", "--weights", weights, "--no-dynamic-batch", "--batch-size", "0", "--out", "m.onnx"], "--batch-size: must be at least 1"),
        (["predict", "--weights", str(onnx_export[0]), "--tta", str(digits)], "--tta: not with an exported ONNX file"),
        (["predict", "--weights", str(tmp_path / "fake.onnx"), str(digits)], "fake.onnx: onnxruntime cannot load it"),
    ]
    for args, expected in cases:
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert err.startswith("disttrain: error: ") and expected in err and err.strip().count("\n") == 0, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.pt", "fake.onnx"], "nothing written"


def test_a_timm_model_exports_with_a_fixed_batch_and_predict_pads_the_last_batch(digits, tmp_path, capsys):
    """timm's tiny test_resnet (`timm/<name>`, bicubic eval view) with --no-dynamic-batch
    --batch-size 3: the input's batch is 3, the metadata says so, and predict in batches of 4 (a
    full file batch and a padded one each) writes the wrapper's probabilities of the presized
    squares (resampled bicubic inside), in input order."""
    import onnx

    from disttrain.cli import main

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="timm/test_resnet"), num_classes=10)
    with torch.no_grad():
        model.get_classifier().weight.mul_(30)  # spread the untrained outputs: each image its own probabilities
    weights = save_weights(tmp_path / "timm.pt", model.state_dict(), CLASSES, "timm/test_resnet", normalize={"mean": MEAN, "std": STD},
                           image_size=SIZE, load_size=LOAD, precision="no", interpolation="bicubic")
    out = tmp_path / "timm.onnx"
    assert main(["export", "--weights", str(weights), "--no-dynamic-batch", "--batch-size", "3", "--out", str(out)]) == 0
    assert "(batches of 3): max abs difference" in capsys.readouterr().out
    exported = onnx.load(str(out))
    meta = from_props({p.key: p.value for p in exported.metadata_props})
    assert meta["batch_size"] == "3" and meta["arch"] == "timm/test_resnet" and meta["interpolation"] == "bicubic"
    dims = exported.graph.input[0].type.tensor_type.shape.dim
    assert (dims[0].dim_value, dims[3].dim_value) == (3, 3) and dims[1].dim_param and dims[2].dim_param

    assert main(["predict", "--weights", str(out), "--batch-size", "4", "--workers", "0", "--out", str(tmp_path / "p.csv"), str(digits)]) == 0
    rows = _rows((tmp_path / "p.csv").read_text())
    assert [r["path"] for r in rows] == [str(p) for p in sorted(digits.iterdir())]
    got = torch.tensor([[float(r[c]) for c in CLASSES] for r in rows], dtype=torch.float64)
    with torch.no_grad():
        expected = serving_model(read_model_file(weights))(_presized(sorted(digits.iterdir()))).double()
    assert (got - expected).abs().max() <= 1e-4 + 1e-6
    assert (expected[:-1] - expected[1:]).abs().max(dim=1).values.min() > 1e-3, "neighbours differ: an order slip would show"
