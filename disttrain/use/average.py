"""`disttrain average`: one model.pt whose weights are the arithmetic mean of several training
checkpoints' or model files' weights (the lesson's snapshots of one SGDR run, the last few epochs'
checkpoints: SWA's averaged weights). The CLI writes the result with save_weights, in the format a
run writes its model.pt in, so predict, evaluate and export take it as they take any model.pt.

Inputs: checkpoint folders (`<run dir>/checkpoints/step-N/`: the weights are shared.pt's `model`,
the raw weights a run resumes from; meta.json names the model and its classes:
disttrain/train/checkpoint.py) and model.pt files, in any mix. They must hold one architecture, one
class list in one order, and the same state-dict keys with the same shape and dtype each; the first
difference is a one-line error naming it and both files.

The mean: each floating tensor summed in float64 and divided by the number of inputs, then cast
back to its dtype (identical inputs give their weights back exactly). Integer tensors (BatchNorm's
`num_batches_tracked`) are the first input's. BatchNorm running statistics (`bn`):
- `mean` (the default): their mean, as every other floating tensor. Cheap, and close for snapshots
  of one run; the mean of the variances is not the variance the averaged weights produce.
- `recompute`: reset, then `bn_batches` batches of the training images (the config's data, in the
  order its first epoch draws them) through the averaged model, one process, on the machine's GPU
  or else the CPU. The images take the eval view (presized, resampled to model.pt's image size,
  normalized): no random augmentation is drawn. Only the BatchNorm layers are in train mode (dropout
  and drop path stay off), with momentum None, so each statistic is the plain average over the
  batches of the batch statistics, in float32.

What model.pt holds besides the weights (image size and presize, normalization, interpolation, TTA
view set, task, precision) comes from the first model.pt among the inputs; with checkpoints only,
from the model.pt of the first checkpoint's run dir (the folder above `checkpoints/` that holds
config.yaml) when it has the same architecture and classes; else from that run dir's config.yaml
(the last stage's sizes, as the run's model.pt has them; its meta.json's precision; the task its
history shows); else from `cfg` (the `--config` given).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from disttrain.config import Config, ConfigError, run_stages
from disttrain.data.folder import DataError
from disttrain.data.loader import Workers
from disttrain.data.setup import build_loaders, load_data, release_loaders
from disttrain.data.shards import load_manifest
from disttrain.data.workers import start_worker_server
from disttrain.dist.jobgroup import JobGroup
from disttrain.dist.runtime import build_runtime
from disttrain.models.build import WeightsError, interpolation, normalization
from disttrain.models.checks import load_config
from disttrain.models.families import family_of
from disttrain.models.forward import eval_view, tta_views_of
from disttrain.task import Task
from disttrain.use.inference import read_model_file, saved_network

BN_MODES = ("mean", "recompute")
"""`--bn`: the inputs' BatchNorm statistics averaged, or recomputed on training batches."""
DEFAULT_BN_BATCHES = 100
"""`--bn-batches`: training batches (data.batch_size images each) the statistics are recomputed on."""
MIN_INPUTS = 2
OWN_KEYS = ("model", "classes", "arch")
"""A model.pt's keys save_weights takes as arguments; the rest is passed on as they are."""
EXPECTED = "give checkpoint folders (<run dir>/checkpoints/step-N) or model.pt files"


@dataclass
class AverageInput:
    """One input as read: its identity and weights, and where its model.pt's other keys come from."""

    path: Path
    arch: str
    classes: list[str]
    weights: dict[str, torch.Tensor]
    info: dict | None = None
    """A model.pt's keys beyond OWN_KEYS (sizes, normalization, task, ...); None for a checkpoint."""
    meta: dict | None = None
    """A checkpoint's meta.json; None for a model.pt."""
    history: list | None = None
    """A checkpoint's epoch rows (shared.pt's `history`)."""


@dataclass
class Averaged:
    """What the CLI writes with save_weights, and says in its line."""

    weights: dict[str, torch.Tensor]
    classes: list[str]
    arch: str
    info: dict
    inputs: list[Path]
    batchnorm: str
    """How the BatchNorm statistics were made, as the printed line says it."""


def read_input(given: str | Path) -> AverageInput:
    """A checkpoint folder or a model.pt, or WeightsError saying what it is instead."""
    path = Path(given).expanduser()
    if path.is_dir():
        return _read_checkpoint(path)
    if not path.exists():
        raise WeightsError(f"{given}: no such file or folder; {EXPECTED}")
    state = read_model_file(path, need_inference_keys=False)
    return AverageInput(path, state["arch"], list(state["classes"]), state["model"],
                        info={k: v for k, v in state.items() if k not in OWN_KEYS})


def _read_checkpoint(path: Path) -> AverageInput:
    if not (path / "meta.json").is_file() or not (path / "shared.pt").is_file():
        raise WeightsError(f"{path}: not a complete training checkpoint (no meta.json or shared.pt in it); {EXPECTED}")
    try:
        meta = json.loads((path / "meta.json").read_text())
        shared = torch.load(path / "shared.pt", map_location="cpu", weights_only=True, mmap=True)  # the optimizer stays on disk
    except Exception as err:
        raise WeightsError(f"{path}: its meta.json or shared.pt cannot be read ({type(err).__name__}); {EXPECTED}") from err
    if not isinstance(shared, dict) or not isinstance(shared.get("model"), dict) or not {"model", "classes"} <= set(meta):
        raise WeightsError(f"{path}: not a disttrain training checkpoint (no weights, model name or classes); {EXPECTED}")
    return AverageInput(path, meta["model"], list(meta["classes"]), shared["model"], meta=meta, history=shared.get("history") or [])


def difference(a: AverageInput, b: AverageInput) -> str | None:
    """The first way `b` cannot be averaged with `a`, in words; None when it can."""
    if a.arch != b.arch:
        return f"different architectures ({a.arch} and {b.arch})"
    if a.classes != b.classes:
        if sorted(a.classes) == sorted(b.classes):
            return "the same classes in another order"
        return f"different classes ({_listed(a.classes)} and {_listed(b.classes)})"
    for key in a.weights:
        if key not in b.weights:
            return f"{key} is in the first only"
    for key in b.weights:
        if key not in a.weights:
            return f"{key} is in the second only"
    for key, tensor in a.weights.items():
        other = b.weights[key]
        if tensor.shape != other.shape or tensor.dtype != other.dtype:
            return f"{key} is {_described(tensor)} in one and {_described(other)} in the other"
    if a.info is not None and b.info is not None:
        one, two = (bool((x.info.get("task") or {}).get("multi_label", False)) for x in (a, b))
        if one != two:
            return "one is a single-label model, the other multi-label"
    return None


def _listed(classes: list[str], most: int = 5) -> str:
    shown = ", ".join(classes[:most])
    return f"{len(classes)}: {shown}{', ...' if len(classes) > most else ''}"


def _described(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


def check_same(inputs: list[AverageInput]) -> None:
    """WeightsError naming the first difference and both files (each input against the first)."""
    first = inputs[0]
    for other in inputs[1:]:
        found = difference(first, other)
        if found is not None:
            raise WeightsError(f"{first.path} and {other.path}: {found}; average checkpoints or model files of one model "
                               "(the same architecture, classes and layers)")


def mean_weights(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The arithmetic mean of state dicts of the same keys, shapes and dtypes: a floating tensor's
    sum in float64 divided by their number, cast back to its dtype; any other tensor (an integer
    buffer such as num_batches_tracked) the first's. In the first's key order."""
    out: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        total = torch.zeros(first.shape, dtype=torch.float64)
        for state in states:
            total += state[key].to(torch.float64)
        out[key] = (total / len(states)).to(first.dtype)
    return out


def has_batchnorm(weights: dict[str, torch.Tensor]) -> bool:
    """Whether the state dict holds running statistics (BatchNorm layers')."""
    return any(key.endswith("running_var") for key in weights)


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that keep running statistics, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches) -> tuple[int, int]:
    """The BatchNorm layers' running statistics recomputed on `batches` (model input tensors):
    reset, then every batch forward with only those layers in train mode and momentum None (each
    statistic the plain average over the batches of its batch statistic). The model ends in eval
    mode with its momenta as they were. Returns (batches, images) seen."""
    norms = list(batchnorm_layers(model).values())
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    count = images = 0
    try:
        for x in batches:
            model(x)
            count, images = count + 1, images + len(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            m.eval()
    return count, images


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run dir a checkpoint folder lies in: the nearest folder above it holding config.yaml
    (`<run dir>/checkpoints/step-N`, or one level deeper)."""
    for folder in list(checkpoint.resolve().parents)[:3]:
        if (folder / "config.yaml").is_file():
            return folder
    return None


def model_info(inputs: list[AverageInput], cfg: Config | None = None) -> dict:
    """What the averaged model.pt holds besides its weights (module docstring: where it comes from)."""
    for found in inputs:
        if found.info is not None:
            return dict(found.info)
    first = inputs[0]
    run_dir = run_dir_of(first.path)
    if run_dir is not None and (run_dir / "model.pt").is_file():
        try:
            state = read_model_file(run_dir / "model.pt")
        except WeightsError:
            state = None
        if state is not None and state["arch"] == first.arch and list(state["classes"]) == first.classes:
            return {k: v for k, v in state.items() if k not in OWN_KEYS}
    if run_dir is not None:
        return info_from_config(load_config(run_dir / "config.yaml"), first)
    if cfg is not None:
        return info_from_config(cfg, first)
    raise ConfigError(f"{first.path}: not inside a run dir (no config.yaml above it), so its image size and normalization are "
                      "unknown; add a model.pt of the run to the inputs, or give --config (the run's config.yaml)")


def info_from_config(cfg: Config, checkpoint: AverageInput) -> dict:
    """A model.pt's keys as a run with `cfg` writes them (its last stage's sizes), for the weights
    of `checkpoint` (its precision; single- or multi-label, and the threshold, as its history
    shows, else as the config says)."""
    meta = checkpoint.meta or {}
    stage = run_stages(cfg)[-1]
    mean, std, _ = normalization(cfg.model, cfg.augment)
    resample, _ = interpolation(cfg.model, cfg.augment)
    return {"normalize": {"mean": mean, "std": std}, "image_size": stage.image_size, "load_size": stage.load_size,
            "precision": meta.get("precision"), "interpolation": resample, "family": family_of(cfg.model.name).name,
            "tta_views": tta_views_of(cfg.augment), "task": _task(cfg, checkpoint).to_saved()}


def _task(cfg: Config, checkpoint: AverageInput) -> Task:
    rows = [row for row in checkpoint.history or [] if isinstance(row, dict)]
    metrics = (rows[-1].get("metrics") or {}) if rows else {}
    classes = len(checkpoint.classes)
    if rows:
        multi = "accuracy_multi" in metrics
    elif cfg.data.format == "shards":
        multi = bool(load_manifest(Path(cfg.data.root).expanduser()).multi_label)
    else:
        multi = cfg.data.label_delim is not None
    threshold = metrics.get("threshold", cfg.train.threshold)
    return Task(multi, classes, 0.0, threshold, cfg.train.fbeta)


def recompute_on_training_data(weights: dict[str, torch.Tensor], arch: str, classes: list[str], info: dict, cfg: Config,
                               batches: int) -> str:
    """`weights`' BatchNorm statistics recomputed in place on `batches` batches of `cfg`'s training
    images (module docstring); returns how, in words. The data is listed as a run lists it, with
    anything a run writes (split.json, bad_files.txt) going to a temporary folder."""
    runtime = build_runtime(cfg)
    device = runtime.accelerator.device
    start_worker_server(runtime.cores.workers)
    model = saved_network({"arch": arch, "classes": classes, "model": weights}, device)
    norm = info["normalize"]
    view = eval_view(int(info["image_size"]), list(norm["mean"]), list(norm["std"]), interpolation=info.get("interpolation", "bilinear"))
    with tempfile.TemporaryDirectory(prefix=".disttrain-average-") as scratch:
        scratch_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=scratch))
        data = load_data(scratch_cfg, JobGroup(1), lambda line: None, runtime.cores.workers)
        if list(data.classes) != list(classes):
            raise ConfigError(f"{cfg.data.root}: its classes ({_listed(list(data.classes))}) are not the averaged model's "
                              f"({_listed(classes)}); give --config the run's own config.yaml")
        train, valid = build_loaders(scratch_cfg, data, runtime.accelerator, Workers.of(runtime.cores), int(info["load_size"]),
                                     cfg.data.batch_size)
        train.set_epoch(0)
        try:
            seen, images = recompute_batchnorm(model, (view(x, train=False) for x, _ in islice(train, batches)))
        finally:
            release_loaders(train, valid)
    if not images:
        raise DataError(f"{cfg.data.root}: no training image could be read to recompute the BatchNorm statistics")
    for name, layer in batchnorm_layers(model).items():  # only the statistics change (no optimizer touched the weights)
        weights[f"{name}.running_mean"] = layer.running_mean.detach().cpu().clone()
        weights[f"{name}.running_var"] = layer.running_var.detach().cpu().clone()
    return (f"recomputed on {images} training images ({seen} batches of {cfg.data.root}, the eval view: no augmentation; "
            f"BatchNorm layers in train mode, cumulative average) on {device}")


def average_models(paths: list[str], bn: str = "mean", cfg: Config | None = None, bn_batches: int = DEFAULT_BN_BATCHES) -> Averaged:
    """The mean of the given checkpoints' and model files' weights (module docstring); `cfg`: the
    run's config, for `bn="recompute"` (and for the model.pt keys where nothing else gives them)."""
    if bn not in BN_MODES:
        raise ConfigError(f"--bn {bn}: must be one of {', '.join(BN_MODES)}")
    if len(paths) < MIN_INPUTS:
        raise ConfigError(f"disttrain average: needs at least {MIN_INPUTS} checkpoints or model files to average, got {len(paths)}")
    missing = [p for p in paths if not Path(p).expanduser().exists()]
    if missing:
        raise WeightsError(f"{missing[0]}: no such file or folder; {EXPECTED}")
    inputs = [read_input(p) for p in paths]
    check_same(inputs)
    first = inputs[0]
    weights = mean_weights([found.weights for found in inputs])
    info = model_info(inputs, cfg)
    if not has_batchnorm(weights):
        how = "none (the model has no BatchNorm layers)"
    elif bn == "mean":
        how = "the mean of theirs"
    else:
        if cfg is None:
            raise ConfigError("--bn recompute: needs --config (the run's config.yaml: its training images)")
        how = recompute_on_training_data(weights, first.arch, first.classes, info, cfg, bn_batches)
    return Averaged(weights, first.classes, first.arch, info, [found.path for found in inputs], how)
