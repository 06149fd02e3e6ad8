"""Using a trained model: read a self-contained `model.pt` and build its network (the eval view and
test-time augmentation are disttrain/models/forward.py's, shared with training's validation); or
several, as an ensemble whose probabilities are averaged."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from disttrain.config import ModelConfig
from disttrain.models.build import WeightsError, build_model
from disttrain.task import Task

INFERENCE_KEYS = ("image_size", "load_size", "normalize")


@dataclass
class SavedModel:
    """A model.pt: the model in eval mode and what inference needs to feed it."""

    model: nn.Module
    classes: list[str]
    arch: str
    image_size: int
    load_size: int
    mean: list[float]
    std: list[float]
    precision: str | None
    interpolation: str = "bilinear"
    tta_views: str = "flips"
    """The TTA view set (disttrain/models/forward.py): `dihedral` for a model trained with
    augment.vflip or augment.dihedral (images without an up); `flips` for an older model.pt."""
    task: Task = Task()
    """Single- or multi-label (disttrain/task.py; model.pt's `task`, absent: single-label): softmax
    or sigmoid probabilities, and a multi-label model's threshold."""


def read_model_file(path: str | Path, need_inference_keys: bool = True) -> dict:
    """The contents of a disttrain model.pt, or WeightsError saying what the file is instead
    (`need_inference_keys` False: an older model.pt without sizes and normalization is fine)."""
    path = Path(path).expanduser()
    expected = "expected the model.pt a training run writes in its run dir"
    if path.is_dir():
        what = "a training checkpoint directory" if (path / "meta.json").is_file() or (path / "shared.pt").is_file() else "a directory"
        raise WeightsError(f"{path}: is {what}, not a weights file; {expected}")
    if not path.is_file():
        raise WeightsError(f"{path}: no such file; {expected}")
    if not zipfile.is_zipfile(path):
        raise WeightsError(f"{path}: is not a torch file (not a zip archive saved by torch.save); {expected}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path}: torch cannot read it as plain tensors and lists ({type(err).__name__}); {expected}") from err
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: is a bare state dict (tensors only, no class names or image size); {expected}")
    if not isinstance(state, dict) or not {"model", "classes", "arch"} <= set(state):
        raise WeightsError(f"{path}: is not a disttrain model.pt (no 'model', 'classes' and 'arch'); {expected}")
    missing = [key for key in INFERENCE_KEYS if key not in state]
    if missing and need_inference_keys:
        raise WeightsError(f"{path}: written by an older disttrain without {', '.join(missing)}; retrain, or evaluate it "
                           "with --config (the run's config gives the sizes)")
    return state


def saved_network(state: dict, device: torch.device) -> nn.Module:
    """The model of a model.pt's contents (`read_model_file`), on `device`, in eval mode."""
    model = build_model(ModelConfig(name=state["arch"]), num_classes=len(state["classes"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def load_saved_model(path: str | Path, device: torch.device) -> SavedModel:
    return saved_model(read_model_file(path), device)


def saved_model(state: dict, device: torch.device) -> SavedModel:
    """The SavedModel of a model.pt's contents (`read_model_file`), its network on `device`."""
    norm = state["normalize"]
    return SavedModel(saved_network(state, device), list(state["classes"]), state["arch"], int(state["image_size"]),
                      int(state["load_size"]), list(norm["mean"]), list(norm["std"]), state.get("precision"),
                      state.get("interpolation", "bilinear"), state.get("tta_views", "flips"), Task.from_saved(state, len(state["classes"])))


@dataclass
class Ensemble:
    """Several model.pt files predicting together (`disttrain predict --weights A B C`): each model
    computes its own probabilities (softmax, or each tag's sigmoid) from its own presize, image
    size, normalization, interpolation and TTA views; the ensemble's are their mean. The models
    have the same classes in the same order and the same task (`load_ensemble` checks)."""

    members: list[SavedModel]
    paths: list[str]

    @property
    def classes(self) -> list[str]:
        return self.members[0].classes

    @property
    def task(self) -> Task:
        """The members' task; a multi-label ensemble's threshold is the mean of theirs (one number
        when they agree, as snapshots of one run with a fixed train.threshold do)."""
        first = self.members[0].task
        if not first.multi_label:
            return first
        return first.with_threshold(sum(float(m.task.threshold) for m in self.members) / len(self.members))

    @property
    def load_sizes(self) -> list[int]:
        """The members' presizes, each once, in the order of the members: the inputs are decoded
        once per presize."""
        return list(dict.fromkeys(m.load_size for m in self.members))


def load_ensemble(paths: list[str], device: torch.device) -> Ensemble:
    """The model.pt files `paths` as an Ensemble, or WeightsError naming the first file and the
    first one whose classes (names or order) or task (single- or multi-label) differ from its."""
    states = [read_model_file(path) for path in paths]
    first = states[0]
    for path, state in zip(paths[1:], states[1:]):
        why = None
        if list(state["classes"]) != list(first["classes"]):
            same = sorted(state["classes"]) == sorted(first["classes"])
            why = "the same classes in another order" if same else f"different classes ({len(first['classes'])} and {len(state['classes'])})"
        elif Task.from_saved(state, 0).multi_label != Task.from_saved(first, 0).multi_label:
            why = "one is a single-label model, the other multi-label"
        if why is not None:
            raise WeightsError(f"{paths[0]} and {path}: {why}; an ensemble averages the probabilities of models with the same "
                               "classes in the same order and the same task")
    return Ensemble([saved_model(state, device) for state in states], list(paths))
