"""Weights files written atomically (temp file + rename): a crash never leaves a half-written file
under the final name."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from disttrain.models import WeightsError


def atomic_save(obj: object, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def save_weights(path: str | Path, model_state: dict, classes: list[str], arch: str) -> Path:
    """`model.pt`: the state dict plus what is needed to use it (class names, architecture)."""
    return atomic_save({"model": model_state, "classes": list(classes), "arch": arch}, path)


def load_weights(path: str | Path) -> dict:
    """Read a file written by `save_weights` (tensors, strings and lists only: weights_only=True)."""
    try:
        state = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path}: not a loadable weights file ({err})") from err
    if not isinstance(state, dict) or "model" not in state or "classes" not in state:
        raise WeightsError(f"{path}: not a disttrain weights file (expected keys 'model' and 'classes')")
    return state
