"""The synchronized learning-rate range test.

Every step the LR grows exponentially, one real training step runs (real global batch, precision and
accumulation), and the ranks' losses are all-reduced (mean) in one collective. Smoothing, the stop
decision and the four suggestion rules then run on every rank from the same floats, so every rank
stops at the same step and reaches the same suggestion; an all-gather checks it. Model, optimizer,
grad scaler, schedule and RNG states are snapshotted in memory and restored exactly afterwards.

The suggestion rules are fastai's (`valley`, `slide`, `minimum`, `steep` of
fastai.callback.schedule, re-implemented) on the curve fastai's `lr_find` gives them (with the
default `sweep.skip_start` / `skip_end`: the recorded points [num_iter // 10 : -5], cut at the first
non-finite one); tests/unit/test_lr_sweep.py checks them against fastai 2.8's own answers on a
fixture of curves. disttrain's own differences: `steep` is searched only up to the lowest smoothed
loss, an answer at the first or last point of the curve counts as no answer (the suggestion then
falls back to valley, steep, minimum, in that order, and says why), and a curve whose lowest point
is its first gets no suggestion.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from disttrain.config import SweepConfig
from disttrain.dist.runtime import rng_state, set_rng_state

RULES = ("valley", "steep", "minimum", "slide")


class SweepError(RuntimeError):
    """The sweep produced no usable suggestion; the message says why and what to do."""


class SweepInterrupted(Exception):
    """A rank was asked to stop (preemption) during the sweep: every rank raises it after the same
    step, once the trainer's state is restored."""

    def __init__(self, step: int, of: int):
        super().__init__(f"LR sweep interrupted after step {step} of {of}")
        self.step, self.of = step, of


def sweep_lrs(start: float, end: float, num_iter: int) -> list[float]:
    """start * (end/start) ** (i / (num_iter - 1)): exactly `start` first and `end` last."""
    return [start * (end / start) ** (i / (num_iter - 1)) for i in range(num_iter)]


class DebiasedEMA:
    """Exponential moving average with the (1 - beta^n) bias correction (so early values are not
    pulled toward 0)."""

    def __init__(self, beta: float):
        self.beta = beta
        self.avg = 0.0
        self.n = 0

    def update(self, value: float) -> float:
        self.n += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * value
        return self.avg / (1 - self.beta**self.n)


# ---------------------------------------------------------------------------------------------
# Suggestion rules, as fastai's (fastai.callback.schedule: valley, slide, minimum, steep), re-implemented.
# Each looks at the curve `useful_part` keeps (finite smoothed losses, fastai's trimming) and picks one
# of its points; a pick of the curve's first or last point counts as no answer (see `_pick`).

SLIDE_WINDOW = 15
"""slide's window, in points (fastai's lr_diff)."""
SLIDE_THRESHOLD = 0.005
"""slide's threshold on the change of the per-index loss gradient (fastai's thresh)."""


def _valley_index(losses: np.ndarray) -> int:
    """fastai's valley index. chain[i] is the length of the longest strictly descending (not
    necessarily contiguous) run of points ending at i, the point itself counted; the longest run
    wins (the one ending first, on ties). From start = end - chain[end] (one point before the run, so
    -1 when the run begins at point 0) the pick lies int(s) + int(s / 2) points on, with
    s = (end - start) / 3: a little past the first third of the fall. May be -1 (Python's last
    point, as fastai's `lrs[idx]` reads it)."""
    n = len(losses)
    chain = np.ones(n, dtype=np.int64)
    for i in range(1, n):
        above = chain[:i][losses[:i] > losses[i]]
        if above.size:
            chain[i] = above.max() + 1
    end = int(np.argmax(chain))
    start = end - int(chain[end])
    third = (end - start) / 3
    return start + int(third) + int(third / 2)


def _slide_index(losses: np.ndarray, window: int, threshold: float) -> int:
    """fastai's slide index: the loss gradient per point (np.gradient: central differences, one-sided
    at the ends, no LR in it) compared at the curve's last point and `window` points before it;
    while they differ by more than `threshold` both move one point toward the start. The pick is
    the left end of the last pair that still differed (the first pair's left end when none did),
    so a curve whose slope never settles walks to its first point. Needs more than `window` points."""
    grad = np.gradient(losses)
    right = len(losses) - 1
    left = pick = right - window
    while left >= 0 and abs(grad[right] - grad[left]) > threshold:
        pick = left
        right -= 1
        left -= 1
    return pick


def _pick(rule: str, index: int, n: int, what: str = "answered") -> tuple[int | None, str | None]:
    """A rule's index, or None with the reason when it is the first or last point of the n the rule
    looked at: an edge is where a rule ends up when it found nothing (no descent, a slope that
    never settles, a curve still falling at its end), not an LR to train at."""
    index = index + n if index < 0 else index
    if index == 0:
        return None, f"{rule} {what} the first point of the curve"
    if index == n - 1:
        return None, f"{rule} {what} the last point of the curve"
    return index, None


Answer = tuple[float | None, str | None]
"""A rule's (LR, None), or (None, why it has no answer)."""


def _lr_at(rule: str, index: int, lrs: np.ndarray, what: str = "answered", divisor: float = 1.0) -> Answer:
    i, why = _pick(rule, index, len(lrs), what)
    return (None, why) if i is None else (float(lrs[i]) / divisor, None)


def _valley(lrs: np.ndarray, losses: np.ndarray) -> Answer:
    return _lr_at("valley", _valley_index(losses), lrs)


def _steep(lrs: np.ndarray, losses: np.ndarray) -> Answer:
    """fastai's forward-difference slope per log LR, but only up to the lowest smoothed loss
    (disttrain's own: past it the loss diverges, and a dip after a spike there is no place to train)."""
    lowest = int(np.argmin(losses))  # the first one, on ties
    if lowest == 0:
        return None, "steep found no descent before the lowest loss"
    slope = np.diff(losses[: lowest + 1]) / np.diff(np.log(lrs[: lowest + 1]))
    return _lr_at("steep", int(np.argmin(slope)), lrs)


def _minimum(lrs: np.ndarray, losses: np.ndarray) -> Answer:
    return _lr_at("minimum", int(np.argmin(losses)), lrs, what="found the lowest loss at", divisor=10)


def _slide(lrs: np.ndarray, losses: np.ndarray) -> Answer:
    if len(losses) <= SLIDE_WINDOW:
        return None, f"slide needs more than {SLIDE_WINDOW} points, the curve has {len(losses)}"
    return _lr_at("slide", _slide_index(losses, SLIDE_WINDOW, SLIDE_THRESHOLD), lrs)


_RULES = {"valley": _valley, "steep": _steep, "minimum": _minimum, "slide": _slide}


def rule_answers(lrs: np.ndarray, losses: np.ndarray) -> dict[str, Answer]:
    """Every rule's answer on a curve `useful_part` kept (at least 1 point)."""
    return {rule: _RULES[rule](lrs, losses) for rule in RULES}


def valley(lrs: np.ndarray, losses: np.ndarray) -> float | None:
    """fastai's valley: the LR a little past the first third of the longest strictly descending
    run of points (see `_valley_index`); None at the curve's first or last point."""
    return _valley(lrs, losses)[0] if len(losses) else None


def steep(lrs: np.ndarray, losses: np.ndarray) -> float | None:
    """fastai's steep (the left point of the steepest fall, slope = forward difference of the loss
    per log LR), searched only up to the lowest loss (disttrain's own); None at the first point."""
    return _steep(lrs, losses)[0] if len(losses) else None


def minimum(lrs: np.ndarray, losses: np.ndarray) -> float | None:
    """fastai's minimum: a tenth of the LR at the lowest loss (the first, on ties); None when that
    is the curve's first or last point."""
    return _minimum(lrs, losses)[0] if len(losses) else None


def slide(lrs: np.ndarray, losses: np.ndarray) -> float | None:
    """fastai's slide (window 15, threshold 0.005 on the per-index gradient, see `_slide_index`);
    None on a curve of 15 points or fewer, or when it walks to the first point."""
    return _slide(lrs, losses)[0] if len(losses) else None


@dataclass
class SweepResult:
    lrs: list[float]
    losses: list[float | None]
    """All-reduced (mean over ranks) loss per step; None for a step the fp16 scaler skipped."""
    smoothed: list[float | None]
    suggestions: dict[str, float | None]
    suggestion: float | None
    method: str
    world_size: int
    global_batch_size: int
    stopped_early: bool
    iterations: int
    fallback: str | None = None
    """Why the suggestion is not `method`'s, or why there is none."""
    precision: str = "no"
    """The autocast precision the sweep's steps ran in (train.precision as resolved on this machine)."""
    local_losses: list[float | None] = field(default_factory=list)
    """This rank's own loss per step (written to the per-rank files only)."""

    def summary_line(self, agreed_by: int) -> str:
        def fmt(v: float | None) -> str:
            return "none" if v is None else f"{v:.1e}"

        others = ", ".join(f"{rule} {fmt(self.suggestions[rule])}" for rule in RULES if rule != self.method)
        head = f"LR sweep: suggestion {fmt(self.suggestion)} ({self.method}"
        head += f"; {self.fallback})" if self.fallback else ")"
        stop = f"; stopped early at step {self.iterations}" if self.stopped_early else ""
        return f"{head}, agreed by {agreed_by} ranks; {others}{stop}"

    def to_json(self, per_rank: bool = False) -> dict:
        data = asdict(self)
        if not per_rank:
            data.pop("local_losses")
        return data


def useful_part(lrs: list[float], smoothed: list[float | None], skip_start: int, skip_end: int) -> tuple[np.ndarray, np.ndarray]:
    """The curve the rules look at, cut as fastai's `lr_find` cuts it before its suggestion
    functions (`[num_it // 10 : -5]` by default: here `[skip_start : len - skip_end]`, on the
    points the sweep recorded, so an early stop loses its last `skip_end` points), then ended before
    the first non-finite smoothed loss. Steps the fp16 scaler skipped (smoothed None, no loss
    measured; fastai has no such steps) are then left out. Returns (lrs, smoothed) as float64."""
    stop = max(len(smoothed) - skip_end, 0)
    kept = list(zip(lrs[skip_start:stop], smoothed[skip_start:stop]))
    finite = next((i for i, (_, s) in enumerate(kept) if s is not None and not math.isfinite(s)), len(kept))
    pairs = [(lr, s) for lr, s in kept[:finite] if s is not None]
    return np.array([p[0] for p in pairs], dtype=np.float64), np.array([p[1] for p in pairs], dtype=np.float64)


def suggest(lrs: list[float], smoothed: list[float | None], cfg: SweepConfig) -> tuple[dict[str, float | None], float | None, str | None]:
    """All four rules on the curve's useful part (`useful_part`). Returns (every rule's value, the
    suggestion, a note or None): the note says why the suggestion is not `cfg.method`'s (the
    fallback, in the order valley, steep, minimum, and why the method had no answer) or why there
    is no suggestion at all."""
    x, y = useful_part(lrs, smoothed, cfg.skip_first, cfg.skip_end)
    if len(y) == 0:
        return {rule: None for rule in RULES}, None, (
            f"too short a curve: no point left of the {len(smoothed)} recorded after leaving out the first "
            f"{cfg.skip_first} and last {cfg.skip_end}; lower sweep.skip_start / sweep.skip_end or sweep.start_lr")
    answers = rule_answers(x, y)
    values = {rule: answers[rule][0] for rule in RULES}
    if int(np.argmin(y)) == 0:  # disttrain's own: nothing to suggest, whatever a rule found
        return values, None, "no descent: the loss never fell below its first point, so there is no suggestion"
    if values[cfg.method] is not None:
        return values, values[cfg.method], None
    rule = next((r for r in ("valley", "steep", "minimum") if values[r] is not None), None)
    if rule is None:
        return values, None, "no rule has an answer on this curve (" + "; ".join(answers[r][1] for r in RULES) + ")"
    return values, values[rule], f"fallback to {rule}: {answers[cfg.method][1]}"


def run_curve(
    step: Callable[[int, float], tuple[torch.Tensor, torch.Tensor]],
    reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    world_size: int,
    cfg: SweepConfig,
    stop: Callable[[], bool] = lambda: False,
) -> tuple[list[float], list[float | None], list[float | None], list[float | None], bool]:
    """The sweep loop. `step(i, lr)` runs one training step at `lr` and returns this rank's (mean
    loss, skipped flag) as float64 device tensors; `reduce_sum` all-reduces a tensor (sum); `stop()`:
    this rank was asked to stop (preemption), reduced with the loss: SweepInterrupted on every rank.

    Returns (lrs, mean losses, smoothed, local losses, stopped_early) for the steps run."""
    schedule = sweep_lrs(cfg.start_lr, cfg.end_lr, cfg.num_iter)
    ema = DebiasedEMA(cfg.beta)
    best = math.inf
    lrs, losses, smoothed, local = [], [], [], []
    for i, lr in enumerate(schedule):
        loss, skip = step(i, lr)
        mine = torch.stack([loss, skip, skip.new_tensor(float(stop()))])  # this rank's (mean loss, skipped flag, stop flag)
        total = reduce_sum(mine)  # the one collective per step
        own_loss, own_skipped, _, loss_sum, skipped, stops = torch.cat([mine, total]).tolist()  # one device sync
        if stops > 0:
            raise SweepInterrupted(i + 1, cfg.num_iter)
        lrs.append(lr)
        local.append(None if own_skipped else own_loss)
        if skipped > 0:  # the fp16 scaler skipped this step (on every rank): no loss to record
            losses.append(None)
            smoothed.append(None)
            continue
        loss = loss_sum / world_size
        losses.append(loss)
        value = ema.update(loss) if math.isfinite(loss) else math.nan
        smoothed.append(value)
        if not math.isfinite(value) or value > cfg.divergence * best:
            return lrs, losses, smoothed, local, i < cfg.num_iter - 1
        best = min(best, value)
    return lrs, losses, smoothed, local, False


# ---------------------------------------------------------------------------------------------
# Snapshot / restore of everything a training step touches.


def snapshot(trainer) -> dict:
    """In-memory copies (CPU) of model, optimizer, scaler, schedule, augmentation (and MixUp/CutMix) and RNG states.
    The model's and the optimizer's tensors are copied into one buffer per dtype (`packed_copy`)."""
    scaler = trainer.accelerator.scaler
    return {
        "model": packed_copy(trainer.module.state_dict()),
        "optimizer": packed_copy(trainer.optimizer.state_dict()),
        "scaler": copy.deepcopy(scaler.state_dict()) if scaler is not None else None,
        "schedule": copy.deepcopy(trainer.schedule.state_dict()),
        "augment": trainer.augment.state_dict(),
        "mixer": trainer.mixer.state_dict() if trainer.mixer is not None else None,
        "rng": rng_state(),
        "sampler_epoch": trainer.train_loader.epoch,
    }


def packed_copy(tree):
    """A copy of `tree` (dicts, lists and tuples of tensors and plain values) on the CPU whose tensors
    are views of one buffer per dtype, each with its original strides (channels_last stays so) and
    64-byte aligned.

    Hundreds of separately allocated copies held through the sweep (a state dict copied tensor by
    tensor) left the allocator so that every training step of the sweep ran 1.2-1.3x slower than the
    same step without them (ResNet-18 on the CPU, benchmarks/sweep_cost.py); one buffer per dtype
    does not."""
    tensors: dict[int, torch.Tensor] = {}  # by id: a tensor met twice is copied once
    _tree_map(tree, lambda tensor: tensors.setdefault(id(tensor), tensor))

    def span(tensor: torch.Tensor) -> int:  # its elements, rounded up so every copy starts 64-byte aligned
        step = max(1, 64 // tensor.element_size())
        return -(-tensor.numel() // step) * step

    sizes: dict[torch.dtype, int] = {}
    for tensor in tensors.values():
        sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + span(tensor)
    buffers = {dtype: torch.empty(n, dtype=dtype) for dtype, n in sizes.items()}
    offsets = dict.fromkeys(sizes, 0)
    copies: dict[int, torch.Tensor] = {}
    for key, tensor in tensors.items():
        start, flat = offsets[tensor.dtype], buffers[tensor.dtype]
        offsets[tensor.dtype] += span(tensor)
        dense = tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last))
        view = flat.as_strided(tensor.shape, tensor.stride(), start) if dense else flat[start:start + tensor.numel()].view(tensor.shape)
        copies[key] = view.copy_(tensor.detach())
    return _tree_map(tree, lambda tensor: copies[id(tensor)])


def _tree_map(node, fn):
    """`node` rebuilt (dicts, lists, tuples) with `fn(tensor)` for each tensor and copies of the other values."""
    if isinstance(node, torch.Tensor):
        return fn(node)
    if isinstance(node, dict):
        return {key: _tree_map(value, fn) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_tree_map(value, fn) for value in node)
    return copy.deepcopy(node)


def restore(trainer, state: dict) -> None:
    trainer.module.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    for param_state in trainer.optimizer.state.values():  # own tensors again, not views of the snapshot's buffer
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                param_state[key] = value.clone(memory_format=torch.preserve_format)
    trainer.optimizer.zero_grad(set_to_none=True)
    if state["scaler"] is not None:
        trainer.accelerator.scaler.load_state_dict(state["scaler"])
    trainer.schedule.load_state_dict(state["schedule"])
    trainer.augment.load_state_dict(state["augment"])
    if state["mixer"] is not None:
        trainer.mixer.load_state_dict(state["mixer"])
    set_rng_state(state["rng"])
    trainer.train_loader.set_epoch(state["sampler_epoch"])
    trainer.train_loader.take_skipped()  # unreadable samples met by the sweep were logged as warnings already


# ---------------------------------------------------------------------------------------------


def _cycling_groups(trainer):
    """Accumulation groups from the train loader, forever: a new epoch order whenever it runs out."""
    epoch = 0
    while True:
        trainer.train_loader.set_epoch(epoch)
        n = len(trainer.train_loader)
        yield from trainer.groups(iter(trainer.train_loader), n)
        epoch += 1


def lr_sweep(trainer, cfg: SweepConfig) -> SweepResult:
    """Run the range test on `trainer`'s real setup and restore it afterwards; every rank returns
    the identical result (checked). A curve with no usable suggestion comes back with
    `suggestion=None` and the reason in `fallback` (`find_lr` turns that into a SweepError). A
    preemption signal on any rank ends it after the step it came in (SweepInterrupted, state restored)."""
    acc = trainer.accelerator
    world = acc.num_processes
    state = snapshot(trainer)
    ratios = [lr / max(trainer.schedule.base_lrs) for lr in trainer.schedule.base_lrs]
    groups = _cycling_groups(trainer)
    trainer.train_mode()

    def step(i: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        for ratio, group in zip(ratios, trainer.optimizer.param_groups):
            group["lr"] = lr * ratio
        loss_sum, count = trainer.step(next(groups))
        skipped = 1.0 if acc.optimizer_step_was_skipped else 0.0
        return loss_sum / count, torch.tensor(skipped, device=acc.device, dtype=torch.float64)

    try:
        lrs, losses, smoothed, local, stopped = run_curve(step, lambda t: acc.reduce(t, reduction="sum"), world, cfg,
                                                          stop=trainer.stop_requested)
    finally:
        groups.close()
        restore(trainer, state)
    suggestions, suggestion, fallback = suggest(lrs, smoothed, cfg)
    first = next((s for s in smoothed if s is not None), None)
    if first is None:
        fallback = "the fp16 grad scaler skipped every step: no loss was measured; try train.precision=bf16"
        suggestion = None
    elif not math.isfinite(first):
        fallback = f"the loss is not finite from the first step (lr {lrs[0]:.1e}): check the data, model and precision"
        suggestion = None
    result = SweepResult(
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        suggestions=suggestions,
        suggestion=suggestion,
        method=cfg.method,
        world_size=world,
        global_batch_size=trainer.train_loader.batch_size * world * trainer.grad_accum,
        stopped_early=stopped,
        iterations=len(lrs),
        fallback=fallback,
        precision=acc.mixed_precision,
        local_losses=local,
    )
    check_agreement(acc, result)
    return result


def check_agreement(accelerator, result: SweepResult) -> None:
    """All-gather (suggestion, steps run, last smoothed loss); any difference between ranks is a bug."""
    if accelerator.num_processes == 1:
        return
    last = next((s for s in reversed(result.smoothed) if s is not None), math.nan)
    mine = torch.tensor(
        [math.nan if result.suggestion is None else result.suggestion, result.iterations, last],
        device=accelerator.device,
        dtype=torch.float64,
    )
    everyone = accelerator.gather(mine.unsqueeze(0)).cpu()
    if not all(torch.equal(row.nan_to_num(-1.0), mine.cpu().nan_to_num(-1.0)) for row in everyone):
        raise RuntimeError(f"LR sweep: ranks disagree (suggestion, steps, last smoothed loss per rank: {everyone.tolist()}); this is a bug")


def save_outputs(result: SweepResult, run_dir: Path, rank: int, is_main: bool, per_rank: bool, stem: str = "lr_sweep") -> None:
    """<stem>.json + <stem>.png from the main process; <stem>.rank<R>.json from every rank."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if per_rank:
        (run_dir / f"{stem}.rank{rank}.json").write_text(json.dumps(result.to_json(per_rank=True), indent=1))
    if is_main:
        (run_dir / f"{stem}.json").write_text(json.dumps(result.to_json(), indent=1))
        plot(result, run_dir / f"{stem}.png")


def plot(result: SweepResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    pairs = [(lr, l, s) for lr, l, s in zip(result.lrs, result.losses, result.smoothed) if l is not None]
    if pairs:
        ax.plot([p[0] for p in pairs], [p[1] for p in pairs], color="0.75", lw=1, label="loss (mean over ranks)")
        ax.plot([p[0] for p in pairs], [p[2] for p in pairs], color="C0", lw=2, label="smoothed")
    for k, rule in enumerate(RULES):
        lr = result.suggestions.get(rule)
        if lr is not None:
            style = "-" if lr == result.suggestion else ":"
            ax.axvline(lr, color=f"C{k + 1}", ls=style, lw=1.5, label=f"{rule} {lr:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    finite = [p[2] for p in pairs if p[2] is not None and math.isfinite(p[2])]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), finite[0] * 2.5) * 1.05)
    ax.set_title(f"LR sweep: {result.world_size} rank(s), global batch {result.global_batch_size}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def find_lr(
    trainer, cfg: SweepConfig, run_dir: Path, reporter, stem: str = "lr_sweep", keys: tuple[str, str] = ("optim.lr", "sweep")
) -> SweepResult:
    """Sweep, save the outputs (`<stem>.json`, `<stem>.png`), print the summary line; raise
    SweepError (after saving the curve) when there is no suggestion to train with. `keys`: the
    config keys the error names (the LR and the sweep section; a stage's own in a staged run)."""
    acc = trainer.accelerator
    result = lr_sweep(trainer, cfg)
    save_outputs(result, run_dir, acc.process_index, acc.is_main_process, cfg.save_per_rank, stem)
    reporter.line(result.summary_line(agreed_by=acc.num_processes))
    if result.suggestion is None:
        raise SweepError(
            f"the LR sweep has no suggestion ({result.fallback}); the curve is in {run_dir / (stem + '.png')}. "
            f"Set {keys[0]} to a number, or change {keys[1]}.start_lr / {keys[1]}.end_lr"
        )
    return result
