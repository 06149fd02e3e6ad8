"""`disttrain export`: a model.pt as one self-contained ONNX or TorchScript file, verified before it is
written.

    disttrain export --weights runs/finetune/model.pt --format onnx --out model.onnx [--no-dynamic-batch --batch-size 8]

The file takes uint8 RGB images at model.pt's image size, NHWC, and returns fp32 class probabilities
(`ServingModel`: permute, /255, the eval view's resample to the image size, model.pt's
normalization, the network, softmax; a multi-label model (model.pt's `task`): each tag's sigmoid),
with the class names and the rest of disttrain/use/exported.py's metadata in it (a multi-label
model's threshold too, so predict with the file writes the model.pt's tags). Its height and width are dynamic: fed disttrain's presized `load_size` squares it
resamples them exactly as the eval view does (what `disttrain predict --weights model.onnx` feeds
it, so its CSV is the model.pt's within the export's tolerance). The batch dimension is dynamic
unless `dynamic_batch` is off (ONNX only: a traced TorchScript module takes any batch).

ONNX goes through `torch.onnx.export(..., dynamo=True)`, the torch.export-based exporter (onnxscript):
the default and supported one since torch 2.9, where the TorchScript-based `dynamo=False` is
deprecated. The batch dimension is a `torch.export.Dim`, so the exporter itself proves the graph is
batch-generic (it fails if the network specializes on the batch) instead of a traced graph that may
have baked a size in; the graph is written in one file (no external weights) at the exporter's
opset. It takes longer (about 4 s for a ResNet-18 here, 10 s for MobileNetV2, against 1.5 s) and
that is paid once per export. TorchScript is `torch.jit.trace` of the same wrapper (scripting fails
on much of timm; tracing records the ops, and the check below runs it at two batch sizes).

Verification: the file is written under a temporary name beside `--out` and run on a batch of the
model's own eval views (deterministic synthetic presized squares through the eval view's resample,
rounded to uint8) and on the presized squares themselves, by onnxruntime (CPUExecutionProvider) or
`torch.jit.load`, at two batch sizes when the batch is dynamic, against the wrapper in PyTorch. The largest absolute
difference of the probabilities is printed; above the tolerance (1e-4, fp32) the export fails
(`ExportError`, exit 2) and the temporary file is removed. Only a verified file is renamed to `--out`.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from disttrain.config import ConfigError
from disttrain.use.exported import METADATA_FILE, eval_pixels, metadata, onnx_props
from disttrain.use.inference import read_model_file, saved_network
from disttrain.models.build import WeightsError
from disttrain.task import Task

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4
"""The largest absolute difference of the probabilities an export may have from PyTorch's (fp32)."""
VIEWS = 6
"""Eval views in the verification batch (checked at this size and at 1 when the batch is dynamic)."""
EXAMPLE_BATCH = 2
"""The batch the dynamic-batch graph is exported with (torch.export specializes a size of 0 or 1)."""


class ExportError(WeightsError):
    """An exported file that does not reproduce PyTorch's probabilities (exit 2, nothing written)."""


class ServingModel(nn.Module):
    """uint8 RGB images (N, S, S, 3), any square size S -> fp32 class probabilities (N, classes):
    the eval view in the same order of operations (float, /255, the resample to image_size with
    the eval view's own sampling grid and interpolation, minus mean, over std), the network, softmax
    (`multi_label`: each output's sigmoid, disttrain/task.py's probabilities).
    Fed disttrain's presized `load_size` squares it computes what `inference.outputs` does (the plain
    pass) on them; fed images already at image_size the resample samples each pixel where it is."""

    def __init__(self, network: nn.Module, mean: list[float], std: list[float], image_size: int, interpolation: str = "bilinear",
                 multi_label: bool = False):
        super().__init__()
        self.network = network
        self.interpolation = interpolation
        self.multi_label = multi_label
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        # DeviceAugment's eval grid: the identity affine over the output size; it does not depend on S
        self.register_buffer("grid", F.affine_grid(torch.eye(2, 3).unsqueeze(0), [1, 3, image_size, image_size], align_corners=False))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float().div(255.0)
        x = F.grid_sample(x, self.grid.expand(x.shape[0], -1, -1, -1), mode=self.interpolation, padding_mode="reflection",
                          align_corners=False)
        if self.interpolation == "bicubic":
            x = x.clamp(0.0, 1.0)
        logits = self.network((x - self.mean) / self.std).float()
        return logits.sigmoid() if self.multi_label else logits.softmax(dim=1)


@dataclass
class ExportResult:
    path: Path
    format: str
    max_difference: float
    """The largest absolute difference of the probabilities from PyTorch's on the verification batch."""
    batch_sizes: tuple[int, ...]
    """The batch sizes the file was run at."""
    size_bytes: int
    seconds: float


def serving_model(state: dict) -> ServingModel:
    """The wrapper of a model.pt's contents (`read_model_file`), fp32, on the CPU, in eval mode."""
    network = saved_network(state, torch.device("cpu")).float()
    norm = state["normalize"]
    return ServingModel(network, list(norm["mean"]), list(norm["std"]), int(state["image_size"]),
                        state.get("interpolation", "bilinear"), Task.from_saved(state, len(state["classes"])).multi_label).eval()


def presized_squares(load_size: int, count: int = VIEWS, seed: int = 0) -> torch.Tensor:
    """`count` deterministic presized squares, uint8 (count, load_size, load_size, 3): smooth random
    colour fields with fine noise on top."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=g) * 255
    smooth = F.interpolate(coarse, size=(load_size, load_size), mode="bilinear", align_corners=False)
    noise = (torch.rand(count, 3, load_size, load_size, generator=g) - 0.5) * 64
    return (smooth + noise).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def verification_pixels(load_size: int, image_size: int, count: int = VIEWS, interpolation: str = "bilinear",
                        seed: int = 0) -> torch.Tensor:
    """`count` deterministic eval views, uint8 (count, image_size, image_size, 3): `presized_squares`
    through `eval_pixels`."""
    return eval_pixels(presized_squares(load_size, count, seed), image_size, interpolation)


def _check_packages(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: must be one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"--format onnx needs onnx, onnxruntime and onnxscript ({err.name} is missing); "
                              "pip install 'disttrain[export]'") from None


def _export_onnx(wrapper: ServingModel, example: torch.Tensor, path: Path, dynamic_batch: bool, props: dict[str, str]) -> None:
    import onnx

    sides = {1: torch.export.Dim("height", min=2), 2: torch.export.Dim("width", min=2)}
    dynamic = {"images": {0: torch.export.Dim("batch", min=1), **sides} if dynamic_batch else sides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on ops it decomposes; the check below is what counts
        program = torch.onnx.export(wrapper, (example,), None, dynamo=True, input_names=["images"], output_names=["probabilities"],
                                    dynamic_shapes=dynamic, verbose=False, optimize=True)
    model = program.model_proto
    onnx.helper.set_model_props(model, props)
    model.doc_string = "disttrain export: uint8 RGB images (batch, H, W, 3) -> class probabilities (batch, classes)"
    onnx.save(model, str(path))


def _export_torchscript(wrapper: ServingModel, example: torch.Tensor, path: Path, meta: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notes and tracer warnings; the check below is what counts
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(meta)})


def _onnx_runner(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda pixels: torch.from_numpy(session.run(None, {name: pixels.numpy()})[0])


def _torchscript_runner(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation note
        module = torch.jit.load(str(path), map_location="cpu")

    def run(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(pixels)

    return run


def verify(run, wrapper: ServingModel, pixels: torch.Tensor, batch_sizes: tuple[int, ...], what: str) -> float:
    """The largest absolute difference between `run(batch)` (the exported file) and the wrapper in
    PyTorch, over the first n images of `pixels` for each n in `batch_sizes`; ExportError when the
    file fails on a batch or returns another shape."""
    worst = 0.0
    for n in batch_sizes:
        batch = pixels[:n]
        with torch.no_grad():
            expected = wrapper(batch)
        try:
            got = run(batch)
        except Exception as err:  # onnxruntime's own exception types
            reason = " ".join(str(err).split())[:300]
            raise ExportError(f"{what} fails on a batch of {n} image(s) ({reason}); nothing written") from None
        if tuple(got.shape) != tuple(expected.shape):
            raise ExportError(f"{what} returns shape {tuple(got.shape)} for a batch of {n}, expected {tuple(expected.shape)}; "
                              "nothing written")
        worst = max(worst, (got.float() - expected).abs().max().item())
    return worst


def export(weights: str | Path, fmt: str, out: str | Path, dynamic_batch: bool = True, batch_size: int = 1,
           tolerance: float = TOLERANCE, quiet: bool = False) -> ExportResult:
    """Write `weights` (a model.pt) as `fmt` (onnx or torchscript) to `out`, verified (module
    docstring); `batch_size` is the fixed batch when `dynamic_batch` is off. ExportError (nothing
    written) when the file's probabilities differ from PyTorch's by more than `tolerance`."""
    start = time.perf_counter()
    _check_packages(fmt)
    if not dynamic_batch and fmt == "torchscript":
        raise ConfigError("--no-dynamic-batch: only for --format onnx (a traced TorchScript module takes any batch size)")
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be at least 1, got {batch_size}")
    state = read_model_file(weights)
    out = Path(out).expanduser()
    meta = metadata(state, dynamic_batch, batch_size)
    wrapper = serving_model(state)
    interpolation = meta["interpolation"]
    count = VIEWS if dynamic_batch else batch_size
    squares = presized_squares(meta["load_size"], count)
    views = eval_pixels(squares, meta["image_size"], interpolation)
    example = squares[:EXAMPLE_BATCH] if dynamic_batch else squares
    batch_sizes = (count, 1) if dynamic_batch else (batch_size,)
    name = "ONNX" if fmt == "onnx" else "TorchScript"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        try:
            if fmt == "onnx":
                _export_onnx(wrapper, example, tmp, dynamic_batch, onnx_props(meta))
            else:
                _export_torchscript(wrapper, example, tmp, meta)
        except Exception as err:  # the exporters' own error types; their tracebacks run to hundreds of lines
            reason = " ".join(str(err).split())[:300]
            other = "torchscript" if fmt == "onnx" else "onnx"
            raise ExportError(f"{weights}: the {name} exporter cannot export {meta['arch']} ({type(err).__name__}: {reason}); "
                              f"nothing written. Try --format {other}") from err
        runner, engine = (_onnx_runner(tmp), "onnxruntime (CPU)") if fmt == "onnx" else (_torchscript_runner(tmp), "torch.jit.load")
        difference = max(verify(runner, wrapper, pixels, batch_sizes, f"the exported {name} file") for pixels in (views, squares))
        sizes = " and ".join(map(str, batch_sizes))
        if not quiet:
            both = f"and as {meta['load_size']} px presized squares " if meta["load_size"] != meta["image_size"] else ""
            print(f"verified with {engine} on {count} eval views at {meta['image_size']} px {both}(batches of {sizes}): "
                  f"max abs difference of the probabilities: {difference:.3g} (tolerance {_sci(tolerance)})", flush=True)
        if not difference <= tolerance:
            raise ExportError(f"{out}: the exported {name} model's probabilities differ from PyTorch's by {difference:.3g} (tolerance "
                              f"{_sci(tolerance)}); nothing written. Try the other --format, or report the model's arch {meta['arch']}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    size = out.stat().st_size
    seconds = time.perf_counter() - start
    if not quiet:
        s = meta["image_size"]
        batch = "batch" if dynamic_batch else str(batch_size)
        print(f"exported {weights} -> {out} ({name}, {size / 1e6:.1f} MB, {seconds:.1f} s): input images uint8 ({batch}, {s}, {s}, 3) "
              f"RGB, output probabilities float32 ({batch}, {len(meta['classes'])}){_sigmoid(meta)}; classes {_short(meta['classes'])}",
              flush=True)
    return ExportResult(out, fmt, difference, batch_sizes, size, seconds)


def _sigmoid(meta: dict) -> str:
    """What the summary line adds for a multi-label model (nothing for a single-label one)."""
    return f", each tag's sigmoid (model.pt's threshold {meta['threshold']:g})" if meta["multi_label"] else ""


def _sci(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e+")


def _short(classes: list[str]) -> str:
    return ", ".join(classes[:10]) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
