"""What `disttrain export` writes, read back: the served model's input pixels, its metadata, and an
exported ONNX file run by onnxruntime for `disttrain predict --weights model.onnx`.

An exported file takes uint8 RGB images at model.pt's `image_size`, NHWC (batch, height, width, 3),
and returns float32 class probabilities (batch, classes); the eval view's resample to `image_size`,
normalization and softmax (a multi-label model: each tag's sigmoid) are inside. Its height and width are dynamic: disttrain's presized
`load_size` squares (the image decoded upright, its shorter side resized to `load_size`, the centre
square cut: disttrain/data/decode.py) go in as they are and are resampled inside as the eval view
does (bilinear, or bicubic for a model.pt that says so). `eval_pixels` is that resample outside the
file, rounded to uint8: the eval views at image size, which the export is verified on too.

The metadata (ONNX `metadata_props`, all strings; the TorchScript extra file `disttrain.json`) has
`classes` (a JSON list, in output order), `image_size`, `load_size`, `interpolation`, `mean` and
`std` (JSON lists, what the file applies inside), `arch`, `precision` (model.pt's training
precision; the file computes in fp32), `input_layout` (`NHWC uint8 RGB`), `batch_size` (`dynamic`
or the fixed number), `disttrain_version`, `multi_label` (JSON `true`/`false`: sigmoid or softmax
inside), and for a multi-label model `threshold` and `beta` (model.pt's `task`: the tags predict
writes are those above the threshold). A file without `multi_label` (an older export) is single-label.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from disttrain.models.forward import eval_view
from disttrain.models.build import WeightsError
from disttrain.task import Task

INPUT_LAYOUT = "NHWC uint8 RGB"
METADATA_FILE = "disttrain.json"
"""The TorchScript extra file holding the metadata."""
LIST_KEYS = ("classes", "mean", "std")
JSON_KEYS = (*LIST_KEYS, "multi_label")
"""Metadata values stored as JSON text in ONNX metadata_props."""
INT_KEYS = ("image_size", "load_size")
FLOAT_KEYS = ("threshold", "beta")


def eval_pixels(images: torch.Tensor, image_size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Presized uint8 squares (B, S, S, 3) -> an exported file's input, uint8 (B, image_size,
    image_size, 3): the eval view's resample (the same `DeviceAugment`, without normalization),
    rounded to the nearest integer; the batch itself when S is `image_size`."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"eval_pixels expects uint8 (B, S, S, 3) batches, got {images.dtype} {tuple(images.shape)}")
    if images.shape[1] == image_size and images.shape[2] == image_size:
        return images
    view = eval_view(image_size, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], channels_last=False, interpolation=interpolation)
    resized = view(images.permute(0, 3, 1, 2), train=False)  # in [0, 1]
    return resized.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def metadata(state: dict, dynamic_batch: bool, batch_size: int) -> dict:
    """The metadata of a model.pt's contents (`read_model_file`), as JSON values."""
    from disttrain import __version__

    norm = state["normalize"]
    task = Task.from_saved(state, len(state["classes"]))
    labels = {"multi_label": True, "threshold": task.threshold, "beta": task.beta} if task.multi_label else {"multi_label": False}
    return {
        "classes": [str(c) for c in state["classes"]],
        "image_size": int(state["image_size"]),
        "load_size": int(state["load_size"]),
        "interpolation": str(state.get("interpolation", "bilinear")),
        "mean": [float(v) for v in norm["mean"]],
        "std": [float(v) for v in norm["std"]],
        "arch": str(state["arch"]),
        "precision": str(state.get("precision")),
        "input_layout": INPUT_LAYOUT,
        "batch_size": "dynamic" if dynamic_batch else str(batch_size),
        "disttrain_version": __version__,
        **labels,
    }


def onnx_props(meta: dict) -> dict[str, str]:
    """`metadata` as ONNX metadata_props (strings; lists as JSON)."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in meta.items()}


def from_props(props: dict[str, str]) -> dict:
    """ONNX metadata_props -> `metadata`'s values (lists and sizes parsed back)."""
    meta = dict(props)
    for key in JSON_KEYS:
        if key in meta:
            meta[key] = json.loads(meta[key])
    for key in INT_KEYS:
        if key in meta:
            meta[key] = int(meta[key])
    for key in FLOAT_KEYS:
        if key in meta:
            meta[key] = float(meta[key])
    return meta


def task_of(meta: dict) -> Task:
    """The task of an exported file's metadata (`metadata`, or `from_props`'s): single-label without `multi_label`."""
    if not meta.get("multi_label", False):
        return Task(classes=len(meta["classes"]))
    return Task(True, len(meta["classes"]), threshold=float(meta.get("threshold", 0.5)), beta=float(meta.get("beta", 2.0)))


def is_onnx_file(path: str | Path) -> bool:
    """Whether `path` names an ONNX file (by its suffix, `.onnx`): what predict runs with onnxruntime."""
    return str(path).lower().endswith(".onnx")


class OnnxModel:
    """An exported ONNX file under onnxruntime (CPU), with what predict needs of a model: `classes`,
    `image_size`, `load_size`, `task` (from the metadata: multi-label and its threshold) and
    `probabilities(presized uint8 batch)`."""

    def __init__(self, path: str | Path, threads: int | None = None):
        """`threads`: onnxruntime's intra-op threads (`disttrain predict` gives the compute threads
        disttrain/dist/cores.py planned, its share of the cores less its decoding workers'; default:
        every core this process may run on; never onnxruntime's own default, a thread per physical core of the
        machine, each pinned to its core, which two processes on one machine would share)."""
        path = Path(path).expanduser()
        expected = "expected an ONNX file written by `disttrain export --format onnx`"
        if not path.is_file():
            raise WeightsError(f"{path}: no such file; {expected}")
        try:
            import onnxruntime as ort
        except ImportError:
            raise WeightsError(f"{path}: running an ONNX file needs onnxruntime; pip install 'disttrain[export]'") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            reason = " ".join(str(err).split())[:200]
            raise WeightsError(f"{path}: onnxruntime cannot load it ({reason}); {expected}") from None
        props = self.session.get_modelmeta().custom_metadata_map
        missing = [key for key in ("classes", *INT_KEYS) if key not in props]
        if missing:
            raise WeightsError(f"{path}: an ONNX file without disttrain's metadata ({', '.join(missing)}); {expected}")
        self.path = path
        self.meta = from_props(props)
        self.classes: list[str] = list(self.meta["classes"])
        self.image_size: int = self.meta["image_size"]
        self.load_size: int = self.meta["load_size"]
        self.task: Task = task_of(self.meta)
        self.input_name = self.session.get_inputs()[0].name
        batch = self.session.get_inputs()[0].shape[0]
        self.fixed_batch: int | None = batch if isinstance(batch, int) else None

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, load_size, load_size, 3) presized batch -> float32 (B, classes) probabilities
        (the file resamples the squares to its image size itself, as the eval view does)."""
        pixels = images.cpu().numpy()
        if self.fixed_batch is None:
            return torch.from_numpy(self.session.run(None, {self.input_name: pixels})[0])
        chunks = []  # a fixed-batch file: full batches, the last one padded with its own first image
        for start in range(0, len(pixels), self.fixed_batch):
            chunk = pixels[start:start + self.fixed_batch]
            padded = chunk if len(chunk) == self.fixed_batch else _pad(chunk, self.fixed_batch)
            chunks.append(torch.from_numpy(self.session.run(None, {self.input_name: padded})[0][:len(chunk)]))
        return torch.cat(chunks)


def _pad(chunk, size: int):
    import numpy as np

    return np.concatenate([chunk, np.repeat(chunk[:1], size - len(chunk), axis=0)])
