"""The run configuration's schema: one dataclass per section, every field with its docstring (the
string right below it; docs/configuration.md is generated from them). Validation lives in each
section's `__post_init__` and its messages say which key to change and how. Checks that need a model
family (does the model exist, do the layer groups fit it) are not here: disttrain.models.checks runs
them where the config and the families are both known, before any process starts.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from disttrain.errors import UserError

IMAGENET = "imagenet"  # model.pretrained: torchvision's default weights for model.name
TIMM = "timm"  # model.pretrained: timm's pretrained weights for a timm/<name> model, from the local Hugging Face cache


class ConfigError(UserError):
    """A config key or value a user must change; the message names the key and the fix."""


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; outputs go to `<output_dir>/<name>/`."""
    output_dir: str = "runs"
    """Folder that holds one sub-folder per run."""
    seed: int = 0
    """Seed for model init, the data order and augmentation (each rank derives its own stream)."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"run.name: {self.name!r} must be a non-empty name without '/'")

    @property
    def dir(self) -> Path:
        return Path(self.output_dir).expanduser() / self.name


@dataclass
class DataConfig:
    root: str = "~/.cache/disttrain/mnist"
    """Dataset root holding `<train_dir>/<class>/*` and `<valid_dir>/<class>/*` (class folders), or
    a flat folder of images (`images`) labelled by `labels` or `label_regex`."""
    train_dir: str = "train"
    """Training split folder, relative to `root`."""
    valid_dir: str = "auto"
    """Validation split folder relative to `root`; `auto` takes `valid/` or else `val/`. Not used
    when `valid_pct` or `valid_col` makes the split."""
    labels: Optional[str] = None
    """A CSV table of labels (relative to `root`, or absolute): one row per image of the flat folder
    `images`, its file name in `fname_col` and its label(s) in `label_col`; a header row is
    detected. null: the labels come from class folders (or `label_regex`)."""
    images: str = "train"
    """The flat folder of images (relative to `root`) that `labels` or `label_regex` labels."""
    fname_col: Union[int, str] = 0
    """The column of `labels` holding the file name: a header name, or a 0-based index."""
    label_col: Union[int, str] = 1
    """The column of `labels` holding the label (or the tags): a header name, or a 0-based index."""
    suffix: str = ""
    """Appended to every file name of `labels` (`.jpg` where the table holds ids without an extension)."""
    label_delim: Optional[str] = None
    """Several labels per row, split on this string (`" "`: planet's space-separated tags): a
    multi-label task (sigmoid outputs, binary cross-entropy, thresholded metrics). null: one label
    per image, unless the label column's header is `tags` (planet's `image_name,tags`: split on spaces)."""
    label_regex: Optional[str] = None
    """Labels from file names: the first group of this regular expression, searched in each file
    name of `images` (`^(.+)_\\d+\\.jpg$` for the pets' `great_pyrenees_173.jpg`)."""
    valid_pct: Optional[float] = None
    """Validation split: this fraction of the images, drawn with `split_seed` (the lesson's 0.2),
    the same on every rank, written to the run dir's split.json; 0 trains on every image (no
    validation). null: the validation folder (class folders) or `valid_col`; a source with neither
    needs it."""
    split_seed: int = 42
    """Seed of the `valid_pct` split (independent of run.seed: runs with other seeds share a split)."""
    valid_col: Union[int, str, None] = None
    """The column of `labels` that marks validation rows (true/false, 1/0, yes/no: fastai's ColSplitter)."""
    stratify: bool = False
    """Draw the `valid_pct` split per class (multi-label: per row's rarest tag), so that a class with
    two or more images has at least one in each part."""
    repeats: int = 1
    """Repeated augmentation (DeiT's): each training image drawn for an epoch appears this many times
    in it, each time with its own augmentation; the epoch is still len(train) samples long (the same
    steps), so it holds about len(train)/repeats distinct images, a new draw every epoch. Folders:
    the copies go to different ranks where there are at least `repeats` ranks. Shards: the copies
    stay in their rank's stream, mixed by its shuffle buffer. 1: off."""
    format: Literal["folder", "shards"] = "folder"
    """`folder`: `root` is an image folder. `shards`: `root` holds the tar shards and manifest.json
    written by `disttrain prepare SRC DST`."""
    decode: Literal["cpu", "gpu"] = "cpu"
    """JPEG decoding: `cpu` (PIL in the loader workers) or `gpu` (nvJPEG on CUDA, shards only)."""
    shuffle_buffer: int = 1000
    """Shards: samples each loader worker holds to shuffle the stream (undecoded bytes, ~20 KB each)."""
    load_size: int = 256
    """CPU presize: shorter side resized to this, then a centre square crop (uint8 on the wire). Not
    given, for a timm model: image_size / its pretrained_cfg's crop_pct."""
    image_size: int = 224
    """Size of the square the model sees; produced on the device from the presized square. Not
    given, for a timm model: its pretrained_cfg's input size."""
    batch_size: int = 64
    """Images per rank per step (global batch = batch_size x world size x train.grad_accum)."""
    num_workers: Union[int, Literal["auto"]] = "auto"
    """CPU data-loader worker processes per rank (0 decodes in the training process), or `auto`:
    chosen from the cores this rank may use (disttrain/dist/cores.py; the "training on" line says)."""
    cache: Literal["auto", "on", "off"] = "auto"
    """Keep each decoded, presized image of a folder in this rank's memory after its first decode,
    so later epochs decode nothing (the training split whole, of the validation split only the
    rank's own share): `auto` where those pixels for every rank of the node fit in a quarter of the
    available memory (and half of /dev/shm's free space), `on`, or `off`. Shards are never cached
    (they are for data larger than memory)."""
    bad_files: Literal["skip", "error"] = "skip"
    """Undecodable files found at scan time: `skip` (counted, listed in bad_files.txt) or `error`."""
    verify: Literal["full", "header", "off"] = "full"
    """What the scan checks of each image file before training: `full` decodes it (finds truncated
    files too), `header` reads its first bytes (empty files, other formats, HTML saved as .jpg),
    `off` lists it only. Whatever passes, the loaders still skip and count a file that fails to decode
    later. For folders of a million files: `header` (docs/scaling.md has the times)."""
    scan_cache: bool = True
    """Keep what the scan found in a cache file per folder (`.disttrain-scan.npz` in it, or under the
    run dir when the folder is read-only), so the next start or resume checks again only files whose
    size or modification time changed, and new ones."""
    worker_timeout: float = 120.0
    """Seconds a loader may deliver no batch before the run fails, with one line naming the rank, the
    loader and its worker (instead of the other ranks waiting in a collective until
    train.collective_timeout). It bounds every wait on the workers: their start (with the fork
    server's imports, where the first batch is asked for before they are done), each batch, and an
    epoch's `iter()` (after an epoch cut short, it first takes the abandoned rest's prefetches).
    Must cover decoding one batch on a busy machine."""

    def __post_init__(self) -> None:
        _choice("data.format", self.format, ("folder", "shards"))
        _choice("data.decode", self.decode, ("cpu", "gpu"))
        if self.decode == "gpu" and self.format != "shards":
            raise ConfigError("data.decode=gpu decodes the JPEG bytes of shards: set data.format=shards (see `disttrain prepare`)")
        _positive("data.shuffle_buffer", self.shuffle_buffer, allow_zero=True)
        _choice("data.bad_files", self.bad_files, ("skip", "error"))
        _choice("data.verify", self.verify, ("full", "header", "off"))
        _choice("data.cache", self.cache, ("auto", "on", "off"))
        for key in ("load_size", "image_size", "batch_size", "repeats"):
            _positive(f"data.{key}", getattr(self, key))
        if self.num_workers != "auto":
            _positive("data.num_workers", self.num_workers, allow_zero=True)
        _positive("data.worker_timeout", self.worker_timeout)
        self._check_source()
        if self.image_size > self.load_size:
            raise ConfigError(
                f"data.image_size ({self.image_size}) is larger than data.load_size ({self.load_size}): "
                "set data.load_size >= data.image_size (presizing a bit larger leaves room to crop)"
            )


    def _check_source(self) -> None:
        if self.labels is not None and self.label_regex is not None:
            raise ConfigError("data.labels and data.label_regex: both set; labels come from a table or from file names, choose one")
        if self.label_regex is not None:
            try:
                groups = re.compile(self.label_regex).groups
            except re.error as err:
                raise ConfigError(f"data.label_regex: {self.label_regex!r} is not a regular expression ({err})") from None
            if groups < 1:
                raise ConfigError(f"data.label_regex: {self.label_regex!r} has no group; put the label in parentheses, e.g. ^(.+)_\\d+\\.jpg$")
        if self.label_delim is not None and self.labels is None:
            raise ConfigError("data.label_delim: only a table of labels (data.labels) holds several labels per row; set data.labels")
        if self.label_delim == "":
            raise ConfigError("data.label_delim: an empty string cannot split labels; use \" \" for space-separated tags")
        if self.valid_col is not None and self.labels is None:
            raise ConfigError("data.valid_col: names a column of data.labels; set data.labels (or use data.valid_pct)")
        if self.valid_col is not None and self.valid_pct is not None:
            raise ConfigError("data.valid_pct and data.valid_col: both set; the split comes from one of them")
        if self.valid_pct is not None and not 0 <= self.valid_pct < 1:
            raise ConfigError(f"data.valid_pct: must be in [0, 1) (0.2: a fifth of the images for validation), got {self.valid_pct!r}")
        if self.stratify and self.valid_pct is None:
            raise ConfigError("data.stratify: stratifies the data.valid_pct split; set data.valid_pct")
        if self.format == "shards" and (self.labels or self.label_regex or self.valid_pct is not None):
            raise ConfigError("data.format=shards: shards hold their labels and split (disttrain prepare reads the labels and data.valid_pct)")

    @property
    def flat(self) -> bool:
        """Whether the images are a flat folder labelled by a table or by their names."""
        return self.labels is not None or self.label_regex is not None

@dataclass
class AugmentConfig:
    flip: bool = True
    """Random horizontal flip, drawn per sample (turn off for digits and text)."""
    vflip: bool = False
    """Random vertical flip, drawn per sample: for images without an up (satellite, microscopy, the
    lesson's transforms_top_down). A model.pt trained with it gets the dihedral TTA views."""
    dihedral: bool = False
    """One of the 8 symmetries of the square (identity, 3 rotations by 90 degrees, 4 flips), drawn
    uniformly per sample: implies horizontal and vertical flips. A model.pt trained with it gets the
    dihedral TTA views (disttrain/models/forward.py)."""
    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])
    """Random-resized-crop: range of the crop's area as a fraction of the presized square ([1, 1]: no crop)."""
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])
    """Random-resized-crop: range of the crop's aspect ratio (width / height)."""
    max_rotate: float = 10.0
    """Rotation drawn uniformly in [-max_rotate, max_rotate] degrees (with probability p_affine)."""
    max_zoom: float = 1.1
    """Zoom drawn uniformly in [1, max_zoom] (with probability p_affine)."""
    max_translate: float = 0.0
    """Shift drawn uniformly in [-max_translate, max_translate] of the image size, each axis (with p_affine)."""
    p_affine: float = 0.75
    """Probability that a sample gets rotation, zoom and translation."""
    brightness: float = 0.2
    """Brightness: add a value drawn in [-brightness, brightness] (pixels in [0, 1]), with p_lighting."""
    contrast: float = 0.2
    """Contrast: scale around the image's mean by a factor in [1 - contrast, 1 + contrast], with p_lighting."""
    saturation: float = 0.0
    """Saturation: blend with the grey image by a factor in [1 - saturation, 1 + saturation], with p_lighting."""
    p_lighting: float = 0.75
    """Probability that a sample gets the lighting changes."""
    erase_p: float = 0.0
    """Random erasing: probability that a sample gets one rectangle (2-33% of the area) set to the mean."""
    interpolation: Literal["auto", "bilinear", "bicubic"] = "auto"
    """The device resample to the model's size (training and evaluation views): `auto` is a timm
    model's pretrained_cfg's (bicubic for most), bilinear for torchvision models."""
    policy: Literal["none", "trivial", "rand"] = "none"
    """An automatic augmentation policy on the device, after the crop and flips: `trivial`
    (TrivialAugment: one operation per sample, its magnitude drawn uniformly), `rand` (RandAugment:
    `policy_ops` operations per sample at `policy_magnitude`), or `none`. Each sample draws its own
    operations; the batch runs one kernel per operation present in it (disttrain/data/policy.py;
    the operations and their ranges: docs/augmentation.md)."""
    policy_ops: int = 2
    """RandAugment: operations per sample (its N)."""
    policy_magnitude: float = 9.0
    """RandAugment: the magnitude of every operation (its M), 0 to 30 as torchvision's 31 bins."""
    mixup: float = 0.0
    """MixUp's alpha: a mixed sample is lam x image + (1 - lam) x its partner's, lam drawn per sample
    from Beta(alpha, alpha) (0.2 to 0.8 are the usual values); 0: off. The targets are mixed by the
    same lam (label smoothing folded in), so the training loss is against mixed targets."""
    cutmix: float = 0.0
    """CutMix's alpha: a mixed sample gets a box pasted from its partner, of area 1 - lam with lam
    drawn per sample from Beta(alpha, alpha) (1.0 is usual); its targets are mixed by the pixels'
    actual share (the box clipped to the image); 0: off."""
    mix_prob: float = 1.0
    """Probability that a sample is mixed (with mixup or cutmix on); the others keep their own image and target."""
    mix_switch_prob: float = 0.5
    """With both mixup and cutmix on: probability that a mixed sample takes CutMix rather than MixUp."""
    cutmix_minmax: Optional[list[float]] = None
    """CutMix's box side as [min, max] fractions of the image side, drawn uniformly per axis
    (timm's cutmix_minmax), instead of from the alpha; null: from the alpha."""
    mix_off_epoch: Optional[int] = None
    """From this epoch of the run on (0-based), nothing is mixed (timm's mixup_off_epoch): the last
    epochs train on clean images; null: mixed to the end."""
    mean: Optional[list[float]] = None
    """Per-channel mean subtracted after scaling pixels to [0, 1]; null: the pretrained weights' own
    (ImageNet's for torchvision weights; a timm model's pretrained_cfg's, pretrained or not), and
    ImageNet's (0.485, 0.456, 0.406) when training a torchvision model from scratch."""
    std: Optional[list[float]] = None
    """Per-channel standard deviation divided out after subtracting `mean`; null: as for `mean`
    (ImageNet's 0.229, 0.224, 0.225 by default)."""

    def __post_init__(self) -> None:
        _choice("augment.interpolation", self.interpolation, ("auto", "bilinear", "bicubic"))
        _choice("augment.policy", self.policy, ("none", "trivial", "rand"))
        _positive("augment.policy_ops", self.policy_ops)
        if not 0 <= self.policy_magnitude <= 30:
            raise ConfigError(f"augment.policy_magnitude: must be in [0, 30] (RandAugment's scale), got {self.policy_magnitude!r}")
        _positive("augment.mixup", self.mixup, allow_zero=True)
        _positive("augment.cutmix", self.cutmix, allow_zero=True)
        for key in ("mix_prob", "mix_switch_prob"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"augment.{key}: must be in [0, 1], got {getattr(self, key)!r}")
        if self.cutmix_minmax is not None and (len(self.cutmix_minmax) != 2 or not 0 < self.cutmix_minmax[0] <= self.cutmix_minmax[1] < 1):
            raise ConfigError(f"augment.cutmix_minmax: needs [min, max] with 0 < min <= max < 1 (fractions of the side), "
                              f"got {self.cutmix_minmax!r}")
        if self.mix_off_epoch is not None:
            _positive("augment.mix_off_epoch", self.mix_off_epoch, allow_zero=True)
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and len(value) != 3:
                raise ConfigError(f"augment.{key}: needs 3 values (R, G, B), got {value!r}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ConfigError(f"augment.std: every value must be > 0, got {self.std!r}")
        for key, top in (("crop_scale", 1.0), ("crop_ratio", None)):
            low_high = getattr(self, key)
            if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1] or (top is not None and low_high[1] > top):
                bound = f"0 < low <= high <= {top}" if top else "0 < low <= high"
                raise ConfigError(f"augment.{key}: needs [low, high] with {bound}, got {low_high!r}")
        for key in ("p_affine", "p_lighting", "erase_p", "brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"augment.{key}: must be in [0, 1], got {getattr(self, key)!r}")
        if self.max_zoom < 1:
            raise ConfigError(f"augment.max_zoom: must be >= 1 (1 = no zoom), got {self.max_zoom!r}")
        _positive("augment.max_rotate", self.max_rotate, allow_zero=True)
        _positive("augment.max_translate", self.max_translate, allow_zero=True)


@dataclass
class ModelConfig:
    name: str = "resnet18"
    """torchvision classification model name (e.g. resnet18, resnet50, convnext_tiny), or a timm model
    as `timm/<name>` (e.g. timm/convnext_tiny, timm/efficientnet_b0, timm/resnet50.a1_in1k)."""
    pretrained: Optional[str] = None
    """Starting weights: `imagenet` (torchvision's default weights for `name`, read from torch's hub
    cache `$TORCH_HOME/hub/checkpoints/`, downloaded there by the main process when missing), `timm`
    (timm's pretrained weights for a timm model, read from the local Hugging Face cache only, never
    downloaded), or the path of a local state dict (.pt/.pth, .safetensors, or a disttrain model.pt).
    The classifier is sized to the data's classes: a head of another size starts fresh."""
    channels_last: bool = True
    """Keep weights and activations in channels_last memory format (faster convs with AMP)."""
    drop_rate: Optional[float] = None
    """Dropout before the classifier, in [0, 1) (timm models: timm's `drop_rate`; torchvision's: the
    builder's `dropout` where it is the classifier's (efficientnet, mobilenet, mnasnet, vgg, alexnet,
    squeezenet, googlenet, inception), else a dropout on the final Linear layer's input that keeps
    the state dict's keys (resnet, convnext, regnet, densenet, vit, swin, ...)); null: the
    architecture's own default."""
    drop_path_rate: Optional[float] = None
    """Stochastic depth, in [0, 1): the probability that a residual block is skipped, rising linearly
    with depth to this value (timm models that take it; the torchvision families that have it:
    convnext, efficientnet and efficientnet_v2, swin and swin_v2, maxvit; for another torchvision
    family, resnet's or vit's, a ConfigError); null: the architecture's default (0 for most; 0.1-0.5
    for those torchvision families)."""
    # does `name` exist, does `pretrained` fit its family: disttrain.models.checks (it needs the families)


@dataclass
class FinetuneConfig:
    groups: int = 3
    """Layer groups the model's parameters are split into, in forward order, the head (the final
    classifier) last; a stage's `freeze_to` and `lr_ratio` count in them. 3 (fastai's): what computes
    at stride <= 8 | the stride-16 and 32 stages | the head, as stated per model family (ViT: its
    encoder halved); 2: the body | the head; more: the family's units (stem, stages, blocks) cut into
    body groups of about equal parameter counts. Models without a stated family (squeezenet, ...) are
    cut at block boundaries into groups of about equal parameter counts. The run prints the groups."""
    train_bn: bool = True
    """Normalization layers in frozen groups keep training (weights and running statistics), as in
    fastai: essential when the new data's statistics differ. false freezes them too (eval mode)."""
    freeze_bn_stats: bool = False
    """Every BatchNorm layer normalizes with its running statistics and keeps them (eval mode) in every
    stage, while its weights train wherever its group trains (Keras's advice for fine-tuning). For
    small per-rank batches, whose batch statistics are noisy, and for a head trained on the frozen
    body's precomputed (eval-mode) output, which would otherwise see other features once the body
    runs in train mode."""

    def __post_init__(self) -> None:
        if self.groups < 2:
            raise ConfigError(f"finetune.groups: at least 2 (the body and the head), got {self.groups!r}")


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    """Optimizer: `adamw` or `sgd`."""
    lr: Union[float, Literal["auto"]] = 1e-3
    """Peak learning rate (the one-cycle maximum), or `auto`: run the LR sweep first and use its suggestion."""
    weight_decay: float = 0.01
    """Decoupled weight decay; never applied to 1-d parameters (norm weights, biases), tokens, position
    embeddings and layer scales (disttrain.models.build.no_weight_decay)."""
    momentum: float = 0.9
    """SGD momentum, or AdamW's beta1."""
    nesterov: bool = False
    """Nesterov momentum (SGD only)."""
    betas2: float = 0.99
    """AdamW's beta2."""

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("adamw", "sgd"))
        if self.lr != "auto":
            _positive("optim.lr", self.lr)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum: must be in [0, 1), got {self.momentum!r}")


@dataclass
class ScheduleConfig:
    name: Literal["onecycle", "cosine", "constant", "sgdr"] = "onecycle"
    """LR schedule over all optimizer steps: `onecycle`, `cosine` (with warmup), `constant`, or `sgdr`
    (cosine annealing with warm restarts: a cosine from the peak to min_lr_ratio x peak per cycle)."""
    warmup: float = 0.25
    """Fraction of all steps spent warming up (one-cycle: rising to the peak LR)."""
    div_factor: float = 25.0
    """One-cycle: the starting LR is lr / div_factor."""
    final_div_factor: float = 1e5
    """One-cycle: the final LR is lr / div_factor / final_div_factor."""
    min_lr_ratio: float = 0.0
    """Cosine and SGDR: the LR decays to lr x min_lr_ratio."""
    cycle_len: int = 1
    """SGDR: epochs of the first cycle."""
    cycle_mult: int = 1
    """SGDR: each next cycle is this many times longer (epochs must fit whole cycles: with cycle_len 1
    and cycle_mult 2, 1, 3, 7, 15, ... epochs)."""

    def __post_init__(self) -> None:
        _choice("schedule.name", self.name, ("onecycle", "cosine", "constant", "sgdr"))
        _positive("schedule.cycle_len", self.cycle_len)
        _positive("schedule.cycle_mult", self.cycle_mult)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"schedule.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio!r}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"schedule.warmup: a fraction of the steps in [0, 1), got {self.warmup!r}")
        _positive("schedule.div_factor", self.div_factor)
        _positive("schedule.final_div_factor", self.final_div_factor)


@dataclass
class SweepConfig:
    start_lr: float = 1e-7
    """First learning rate of the range test."""
    end_lr: float = 10.0
    """Last learning rate; the LR grows exponentially from start_lr to end_lr over num_iter steps."""
    num_iter: int = 100
    """Training steps in the sweep (the loader is cycled when it has fewer batches)."""
    beta: float = 0.98
    """Smoothing of the debiased exponential moving average of the loss."""
    divergence: float = 4.0
    """Stop when the smoothed loss exceeds divergence x its best value so far."""
    method: Literal["valley", "steep", "minimum", "slide"] = "valley"
    """The rule whose suggestion is used (all four are reported); fastai's rules, on fastai's
    trimmed curve: `valley` (a little past the first third of the longest descending run),
    `slide` (where the per-step loss gradient settles, window 15, threshold 0.005), `minimum` (a
    tenth of the LR at the lowest loss) and `steep` (steepest fall per log LR; disttrain searches
    it only up to the lowest loss). A rule that lands on the curve's first or last point has no
    answer; the suggestion then falls back to valley, steep, minimum, in that order."""
    skip_start: Optional[int] = None
    """Points left out at the start of the curve before the rules look at it; null: num_iter // 10,
    as fastai's lr_find."""
    skip_end: int = 5
    """Points left out at the end of the recorded curve (of an early stop, too) before the rules
    look at it; 5, as fastai's lr_find."""
    save_per_rank: bool = False
    """Each rank also writes lr_sweep.rank<R>.json with the curve and suggestion it computed."""

    def __post_init__(self) -> None:
        _positive("sweep.start_lr", self.start_lr)
        if self.start_lr >= self.end_lr:
            raise ConfigError(
                f"sweep.start_lr ({self.start_lr}) must be below sweep.end_lr ({self.end_lr}): the LR grows from start to end"
            )
        if self.num_iter < 10:
            raise ConfigError(f"sweep.num_iter: {self.num_iter} is too few points for a curve; use at least 10 (default 100)")
        if not 0 <= self.beta < 1:
            raise ConfigError(f"sweep.beta: must be in [0, 1), got {self.beta!r}")
        if self.divergence <= 1:
            raise ConfigError(f"sweep.divergence: must be > 1 (a multiple of the best loss), got {self.divergence!r}")
        _choice("sweep.method", self.method, ("valley", "steep", "minimum", "slide"))
        if self.skip_start is not None:
            _positive("sweep.skip_start", self.skip_start, allow_zero=True)
        _positive("sweep.skip_end", self.skip_end, allow_zero=True)
        if self.skip_first + self.skip_end >= self.num_iter - 2:
            raise ConfigError(
                f"sweep.skip_start + sweep.skip_end ({self.skip_first} + {self.skip_end}) leave no curve of "
                f"sweep.num_iter={self.num_iter} points; lower them or raise num_iter"
            )

    @property
    def skip_first(self) -> int:
        """skip_start as a number: num_iter // 10 when it is null."""
        return self.num_iter // 10 if self.skip_start is None else self.skip_start


@dataclass
class EarlyStopConfig:
    monitor: str = "valid_loss"
    """The epoch table's column to watch: valid_loss, accuracy (multi-label: accuracy_multi, f2 or
    the f-beta in use), or the EMA's ema_valid_loss, ema_accuracy. Losses must fall, the rest rise."""
    patience: Optional[int] = None
    """Stop after this many epochs without improvement (every rank at the same epoch end, from the
    same all-reduced validation); null: never stop early."""
    min_delta: float = 0.0
    """An improvement must be larger than this."""

    def __post_init__(self) -> None:
        if self.patience is not None:
            _positive("train.early_stop.patience", self.patience)
        _positive("train.early_stop.min_delta", self.min_delta, allow_zero=True)


@dataclass
class TrainConfig:
    epochs: int = 3
    """Number of passes over the training data."""
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast precision: `auto` (CUDA: bf16 where the GPU supports it, else fp16; CPU: bf16 only
    where the CPU has native bf16 instructions, else fp32), `no` (fp32), `bf16`, or `fp16` (CUDA
    only; uses a grad scaler). The run prints what `auto` chose and why."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    clip_grad: Optional[float] = None
    """Clip the global gradient norm to this value; null disables clipping."""
    label_smoothing: float = 0.0
    """Label smoothing of the loss: cross-entropy's, or for multi-label data the binary targets'
    (a tag's 1 becomes 1 - eps + eps/C, a 0 becomes eps/C)."""
    threshold: Union[float, Literal["auto"]] = 0.5
    """Multi-label data: a tag is predicted when its sigmoid probability is above this; `auto`:
    the threshold (0.05 to 0.95, step 0.01) that maximizes F-beta on the validation set at each
    evaluation (the lesson's opt_th); the last one is stored in model.pt."""
    fbeta: float = 2.0
    """Multi-label data: beta of the F-beta score (2: planet's F2, recall weighted above precision),
    sample-averaged."""
    loss: Literal["ce", "bce"] = "ce"
    """Single-label data: `ce` (softmax cross-entropy) or `bce` (binary cross-entropy on the one-hot,
    smoothed or mixed targets, as the ResNet-strikes-back A1-A3 recipes train). Multi-label data
    always trains with binary cross-entropy."""
    ema: Optional[float] = None
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999; timm's
    model_ema_decay), updated on every rank on the device after the optimizer steps, evaluated next
    to the raw weights every epoch (the ema_valid_loss, ema_accuracy columns); null: off."""
    ema_warmup: bool = False
    """Warm the EMA decay up as timm's ModelEmaV3: min(ema, 1 - (1 + s)^(-2/3)) with s the optimizer
    steps before this one (0 at the first: the first update copies the weights), so the average
    follows the weights closely at first; counted from the stage where the EMA (re)starts."""
    ema_every: int = 1
    """Update the EMA every this many optimizer steps (the decay applies per update)."""
    final: Literal["last", "ema", "best"] = "last"
    """What model.pt holds: the `last` weights, the `ema` weights (needs train.ema), or the `best`
    checkpoint's weights by checkpoint.monitor (needs checkpoint.keep_best)."""
    early_stop: EarlyStopConfig = field(default_factory=lambda: EarlyStopConfig())
    """Stop when a validation metric has not improved for some epochs."""
    max_steps_per_epoch: Optional[int] = None
    """Cap the optimizer steps of each epoch (quick smoke runs); null trains on all the data."""
    threads: Union[int, Literal["auto"]] = "auto"
    """torch intra-op threads per rank, or `auto`: this rank's share of the node's cores less its
    loader workers' (disttrain/dist/cores.py), whatever OMP_NUM_THREADS the launcher set."""
    pin_cores: Literal["auto", "on", "off"] = "auto"
    """Keep each rank's threads on its own slice of the node's cores (and its loader workers on the
    slice's last cores): `auto` only where the job owns the cores it would pin (a scheduler's
    allocation: the process's CPU affinity is narrower than the machine, as SLURM's binding, a
    cgroup cpuset or `taskset` sets it, or SLURM allocated the job every core of the node), `on`
    wherever each rank has a core (the job owns the node), `off` never. Unpinned, threads and
    workers are still sized from the rank's share of the cores. The "training on" line says which and why."""
    deterministic: bool = False
    """CUDA: cuDNN's deterministic algorithms only, none picked by timing (torch.backends.cudnn
    deterministic on, benchmark off). A run resumed from a checkpoint on GPUs repeats the
    uninterrupted run bitwise only with this on (cuDNN's default choices may add in another order
    each run); it costs some speed. The CPU path is deterministic without it."""
    compile: bool = False
    """torch.compile the model (inductor; the first steps compile, once per stage shape: freezing,
    unfreezing and a new image size compile again, and the run says so)."""
    collective_timeout: float = 300.0
    """Seconds a collective may wait for another rank before the run fails (a dead or stuck rank
    then ends the job instead of hanging it; torch's default is 30 minutes)."""
    tta: bool = False
    """After the last epoch, evaluate the final model with test-time augmentation too: one more line
    under the table, `valid/tta_loss` and `valid/tta_accuracy` in W&B and metrics.jsonl."""
    tta_n: int = 5
    """TTA views besides the plain pass, 1 to 10: the whole image flipped, the four corners, the
    corners flipped, the whole image (see disttrain/models/forward.py); 5 takes the flip and the corners.
    With augment.vflip or augment.dihedral: the 7 symmetries of the square other than the identity,
    the centre, the centre flipped about the diagonal, the whole image; 5 takes both flips and the 3 rotations."""
    tta_beta: float = 0.25
    """Weight of the plain pass in the TTA blend (fastai's beta), in [0, 1]: beta x plain + (1 - beta) x views."""
    tta_max: bool = False
    """Combine the plain pass and the views by their element-wise maximum instead of the blend."""
    interpret: bool = False
    """After model.pt is written, the lesson's look at the results on the validation folder, into
    <run dir>/interpret/ (as `disttrain evaluate --interpret`: top losses, most confused, per-class
    scores, the confusion matrix and image grids); with W&B, the grids and a Table of the top losses.
    Needs data.format=folder."""
    interpret_k: int = 9
    """Images per train.interpret grid (and rows of top_losses.csv)."""

    def __post_init__(self) -> None:
        _choice("train.precision", self.precision, ("auto", "no", "bf16", "fp16"))
        if self.threads != "auto":
            _positive("train.threads", self.threads)
        _choice("train.pin_cores", self.pin_cores, ("auto", "on", "off"))
        if self.threshold != "auto" and not 0 < self.threshold < 1:
            raise ConfigError(f"train.threshold: must be in (0, 1) (a probability) or auto, got {self.threshold!r}")
        _positive("train.fbeta", self.fbeta)
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing: must be in [0, 1), got {self.label_smoothing!r}")
        if not 1 <= self.tta_n <= 10:  # disttrain.use.inference.MAX_TTA_VIEWS (not imported: inference imports config)
            raise ConfigError(f"train.tta_n: must be 1 to 10 (the flips of the whole image and of its four corners), got {self.tta_n!r}")
        if not 0 <= self.tta_beta <= 1:
            raise ConfigError(f"train.tta_beta: must be in [0, 1] (the plain pass's weight), got {self.tta_beta!r}")
        _positive("train.epochs", self.epochs)
        _positive("train.grad_accum", self.grad_accum)
        if self.clip_grad is not None:
            _positive("train.clip_grad", self.clip_grad)
        if self.max_steps_per_epoch is not None:
            _positive("train.max_steps_per_epoch", self.max_steps_per_epoch)
        _positive("train.collective_timeout", self.collective_timeout)
        _choice("train.loss", self.loss, ("ce", "bce"))
        if self.ema is not None and not 0 < self.ema < 1:
            raise ConfigError(f"train.ema: the decay must be in (0, 1) (e.g. 0.999), or null for no EMA; got {self.ema!r}")
        _positive("train.ema_every", self.ema_every)
        _choice("train.final", self.final, ("last", "ema", "best"))
        if self.final == "ema" and self.ema is None:
            raise ConfigError("train.final: ema needs train.ema (a decay such as 0.999)")
        _positive("train.interpret_k", self.interpret_k)


@dataclass
class CheckpointConfig:
    every_n_steps: Optional[int] = None
    """Also save every this many optimizer steps (a checkpoint is always saved at each epoch end)."""
    keep_last: int = 2
    """Complete checkpoints kept in <run dir>/checkpoints; older ones are deleted after a new one is complete."""
    keep_best: int = 0
    """Also keep the N best epoch-end checkpoints by `monitor` in <run dir>/checkpoints/best/
    (the keep_last ones are deleted as usual; a best one stays until N better ones replace it); 0: none."""
    monitor: str = "valid_loss"
    """What `keep_best` and train.final=best rank by: valid_loss, accuracy (multi-label: accuracy_multi,
    the f-beta column), or ema_valid_loss, ema_accuracy. Losses lower is better, the rest higher."""
    snapshot_cycles: bool = False
    """SGDR: keep the weights at the end of every cycle as <run dir>/snapshots/cycle-<k>.pt (the
    lesson's cycle_save_name), a model file each, for `disttrain predict --weights` (a snapshot ensemble)."""
    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint of the run dir if there is one; `never`:
    start fresh; or the path of a checkpoint directory to resume from. Checkpoints of the run dir that
    the run does not continue are moved to <run dir>/checkpoints/superseded-<UTC time>/, never deleted."""

    def __post_init__(self) -> None:
        if self.every_n_steps is not None:
            _positive("checkpoint.every_n_steps", self.every_n_steps)
        _positive("checkpoint.keep_last", self.keep_last)
        _positive("checkpoint.keep_best", self.keep_best, allow_zero=True)
        if self.resume not in ("auto", "never") and not Path(self.resume).expanduser().is_dir():
            raise ConfigError(
                f"checkpoint.resume: {self.resume!r} is not a checkpoint directory; use auto, never, "
                "or a path like runs/<name>/checkpoints/step-00000120"
            )


@dataclass
class WandbConfig:
    mode: Optional[Literal["online", "offline", "disabled"]] = None
    """`online`, `offline` (sync later with `wandb sync`) or `disabled`; null: online when W&B
    credentials are present (WANDB_API_KEY or `wandb login`), else offline. WANDB_MODE wins."""
    project: str = "disttrain"
    """W&B project (WANDB_PROJECT wins)."""
    entity: Optional[str] = None
    """W&B team or user; null: your default entity (WANDB_ENTITY wins)."""
    name: Optional[str] = None
    """Run name shown in W&B; null: run.name (WANDB_NAME wins)."""
    tags: list[str] = field(default_factory=list)
    """Tags of the W&B run (WANDB_TAGS, comma-separated, wins)."""
    group: Optional[str] = None
    """Group runs together in W&B, e.g. the runs of one experiment (WANDB_RUN_GROUP wins)."""

    def __post_init__(self) -> None:
        if self.mode is not None:
            _choice("log.wandb.mode", self.mode, ("online", "offline", "disabled"))
        if not self.project:
            raise ConfigError("log.wandb.project: must not be empty")


@dataclass
class LogConfig:
    progress: bool = True
    """Show a tqdm progress bar on the main process (turn off for SLURM log files)."""
    every_n_steps: int = 10
    """Optimizer steps between two logged points of the train/* series (W&B and metrics.jsonl)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases tracking (main process only)."""

    def __post_init__(self) -> None:
        _positive("log.every_n_steps", self.every_n_steps)


@dataclass
class StageConfig:
    """One stage of a staged run (`stages:`): its keys left out take the run's own value."""

    name: Optional[str] = None
    """Shown in the stage's first line; null: `stage <i>`."""
    epochs: Optional[int] = None
    """Epochs of this stage; null: train.epochs. Epoch numbers continue across stages."""
    freeze_to: int = 0
    """Freeze layer groups [0, freeze_to) (fastai's semantics): 0 trains everything, -1 everything
    but the head, N the groups from N on (see finetune.groups)."""
    lr: Union[float, Literal["auto"], None] = None
    """Peak LR of the head group, or `auto`: the synchronized sweep runs at the start of this stage, in
    its frozen state and with its ratios; null: optim.lr."""
    lr_ratio: float = 1.0
    """Differential learning rates: the groups' peak LRs spread geometrically from lr / lr_ratio (first
    group) to lr (head), like fastai's slice(lr / lr_ratio, lr); 1: one LR for every group."""
    image_size: Optional[int] = None
    """Square side the model sees in this stage (progressive resizing); null: data.image_size."""
    load_size: Optional[int] = None
    """CPU presize of this stage; null: data.load_size (raised to image_size when smaller)."""
    batch_size: Optional[int] = None
    """Images per rank per step in this stage; null: data.batch_size."""
    augment: bool = True
    """Train on augmented views (the augment section); false: on the plain validation view."""
    mix: Optional[bool] = None
    """MixUp/CutMix (augment.mixup, augment.cutmix) in this stage; null: when the stage augments
    its images (never on precomputed activations)."""
    ema: Optional[bool] = None
    """Update the weight EMA (train.ema) in this stage; null: yes, except in a precompute stage."""
    precompute: bool = False
    """Compute the frozen body's output once per image (each rank its share, kept in memory) and train,
    and sweep, the head on it: for a stage with freeze_to -1 and augment false. The body runs in eval
    mode (its normalization statistics stay as loaded)."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """This stage's LR schedule; keys left out take the schedule section's values."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """This stage's LR sweep settings (lr: auto); keys left out take the sweep section's values."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Name, output folder and seed."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the images are and how they are loaded."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """On-device augmentation and normalization."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture and starting weights."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Layer groups and frozen normalization layers (used by `stages`)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """The synchronized learning-rate range test (`--find-lr`, `optim.lr=auto`)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Epochs, precision, accumulation."""
    log: LogConfig = field(default_factory=LogConfig)
    """What the user sees."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resuming."""
    stages: list[StageConfig] = field(default_factory=list)
    """Stages run one after another in one launch (fine-tuning: head first, then everything); empty:
    one stage made of the run's own train/optim/schedule/data settings."""

    def __post_init__(self) -> None:
        if self.train.final == "best" and not self.checkpoint.keep_best:
            raise ConfigError("train.final: best needs checkpoint.keep_best >= 1 (the best epoch-end checkpoints are kept there)")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if not self.stages:
            data.pop("stages")
        return data
