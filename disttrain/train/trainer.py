"""fit / train_epoch / evaluate. Metrics are exact across ranks: sums and counts, all-reduced.

The trainer knows nothing about where results go; it hands rows to a reporter. `.item()` (a device
sync) happens only at progress-bar updates and epoch ends, never per step. What a logged row holds
(the window since the last log point, train/* and valid/*, the samples shown once) is
disttrain/train/step_log.py's.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from accelerate import Accelerator
from torch import nn

from disttrain.data.augment import DeviceAugment
from disttrain.data.mix import Mixer
from disttrain.data.loader import DeviceLoader, Workers
from disttrain.data.setup import release_loaders
from disttrain.dist.cores import CoreSplit
from disttrain.dist.runtime import set_rng_state
from disttrain.metrics import EvalResult
from disttrain.models.forward import evaluate
from disttrain.task import Task
from disttrain.tracking import ConsoleReporter, Tracker
from disttrain.train.buckets import settle_buckets
from disttrain.train.checkpoint import Checkpointer, Preempted
from disttrain.train.ema import WeightEma
from disttrain.train.monitor import EarlyStopping
from disttrain.train.schedule import Schedule
from disttrain.train.step_log import LogWindow, SampleLog, epoch_metrics, train_metrics


def epoch_batches(loader_batches: int, grad_accum: int, max_steps_per_epoch: int | None) -> int:
    """Micro-batches per epoch: the loader's, capped at `max_steps_per_epoch` optimizer steps."""
    if max_steps_per_epoch is None:
        return loader_batches
    return min(loader_batches, max_steps_per_epoch * grad_accum)


def epoch_steps(loader_batches: int, grad_accum: int, max_steps_per_epoch: int | None) -> int:
    """Optimizer steps per epoch (a shorter last accumulation group still makes a step)."""
    return math.ceil(epoch_batches(loader_batches, grad_accum, max_steps_per_epoch) / grad_accum)


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    valid_loss: float
    accuracy: float
    seconds: float
    images_per_sec: float
    stage: int | None = None
    """The stage the epoch belongs to (runs with `stages`)."""
    metrics: dict | None = None
    """The table's metric columns where they are more than the accuracy (multi-label: accuracy_multi,
    F-beta, threshold; with train.ema: ema_valid_loss and the EMA's own metric columns)."""

    def columns(self) -> dict[str, float]:
        """The table's metric columns of this epoch."""
        return self.metrics or {"accuracy": self.accuracy}


@dataclass
class StageSetup:
    """What one stage trains (disttrain/train/stages.py builds it from the unwrapped model); the Trainer
    takes it whole (`Trainer.use`)."""

    model: nn.Module
    """The prepared (DDP-wrapped) module that trains: the whole model, or its head on precomputed inputs."""
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    train_loader: DeviceLoader
    valid_loader: DeviceLoader
    transform: Callable[..., torch.Tensor]
    """(loader output, train) -> model input: the augmentation, the eval view, or identity."""
    first_epoch: int
    end_epoch: int
    """The run's epoch numbers this stage covers: [first_epoch, end_epoch)."""
    index: int | None = None
    """The stage's index in runs with `stages`."""
    fixed_norms: list[nn.Module] = field(default_factory=list)
    """Normalization layers kept in eval mode while training (frozen groups' with train_bn false, or
    every BatchNorm with freeze_bn_stats)."""
    lr_owner: list[int] | None = None
    """The layer group of each param group (logging); None: one LR."""
    images: bool = True
    """The model's input is an image batch (shown once in W&B as train/samples)."""
    inputs: str = "augmented"
    """What the model is fed, for the stage's line (augmented, no augmentation, precomputed activations ...)."""
    compiled: nn.Module | None = None
    """`torch.compile(model)` (train.compile): what the training steps call; evaluation runs `model` unwrapped, eagerly."""
    target: str = ""
    """The submodule of the bare model that `model` wraps ("": the whole model; a precompute stage: its head)."""
    mix: bool = False
    """MixUp/CutMix mix this stage's training batches (and its LR sweep's), while the mixer is enabled."""
    ema: bool = False
    """The weight EMA is updated after this stage's optimizer steps."""
    ema_restart: bool = False
    """The EMA starts again from the weights as they are when the stage starts (the stage before
    it did not update the EMA: its weights moved without it)."""


class Trainer:
    """Trains one stage at a time (`use` a StageSetup, then `fit`), keeping what spans stages: the
    bare model, augmentation, history, step count, log window, checkpointer and tracker."""

    def __init__(
        self,
        accelerator: Accelerator,
        module: nn.Module,
        augment: DeviceAugment,
        reporter: ConsoleReporter,
        total_epochs: int,
        grad_accum: int = 1,
        clip_grad: float | None = None,
        task: Task | None = None,
        max_steps_per_epoch: int | None = None,
        classes: list[str] | None = None,
        tracker: Tracker | None = None,
        log_every: int = 10,
        checkpointer: Checkpointer | None = None,
        precision_reason: str = "",
        layer_groups: list | None = None,
        cores: CoreSplit | None = None,
        mixer: Mixer | None = None,
        ema: WeightEma | None = None,
        early_stop: EarlyStopping | None = None,
    ):
        self.accelerator = accelerator
        self.module = module  # the whole bare model (checkpoints, sweep snapshots)
        self.augment = augment
        self.reporter = reporter
        self.total_epochs = total_epochs  # epochs of the whole run (`epochs` is where the current stage ends)
        self.grad_accum = grad_accum
        self.clip_grad = clip_grad
        self.task = task or Task(classes=len(classes or []))  # single- or multi-label (disttrain/task.py): the loss, the validation sums, the columns
        self.threshold = self.task.threshold  # multi-label: the threshold the last validation used (model.pt keeps it)
        self.max_steps_per_epoch = max_steps_per_epoch
        self.classes = classes or []
        self.tracker = tracker
        self.log_every = log_every
        self.checkpointer = checkpointer
        self.precision_reason = precision_reason  # why this precision (train.precision=auto: agreed by every rank from its device)
        self.layer_groups = layer_groups or []  # finetune.groups of a staged run (disttrain/models/groups.py)
        self.cores = cores  # this rank's split (disttrain/dist/cores.py, from build_runtime): the loaders' workers, the line
        self.mixer = mixer  # augment.mixup / augment.cutmix (disttrain/data/mix.py): this rank's own draws
        self.ema = ema  # train.ema (disttrain/train/ema.py): identical on every rank, no communication
        self.early_stop = early_stop  # train.early_stop (disttrain/train/monitor.py), fed the all-reduced figure
        self.stopped_early = False  # train.early_stop ended the run
        self.epoch_end_hooks: list[Callable[[int], None]] = []  # called on every rank after an epoch's checkpoint (SGDR snapshots)
        self.history: list[EpochResult] = []
        self.global_step = 0  # optimizer steps of training (the sweep's do not count)
        self.last_grad_norm: torch.Tensor | None = None
        self._samples = SampleLog(tracker, augment.mean, augment.std)
        self._window = LogWindow(accelerator.device)  # loss and images since the last log point
        self._step_observer: Callable[[float], None] | None = None
        self.start = (0, 0)  # (epoch, optimizer steps of it already done): where fit() begins
        self._resumed_sums: dict | None = None
        self._settle = False  # the next step rehearses one first (disttrain/train/buckets.py)
        self._history_shown = False
        self.model: nn.Module | None = None  # the stage's (see StageSetup for these)
        self.optimizer = self.schedule = self.train_loader = self.valid_loader = self.transform = None
        self.epochs = total_epochs
        self.stage: int | None = None
        self.fixed_norms: list[nn.Module] = []
        self.lr_owner: list[int] | None = None
        self.images = True
        self.inputs = ""
        self.compiled: nn.Module | None = None
        self.compile_seconds = 0.0  # the steps that compiled (train.compile), all stages
        self.target = ""
        self.mix_stage = self.ema_stage = self.ema_restart = False
        self.first_epoch = 0
        self._mixing = False  # this epoch's (and a sweep's) batches are mixed

    def use(self, setup: StageSetup) -> None:
        """Train `setup`'s stage from its first epoch on."""
        self.model, self.optimizer, self.schedule = setup.model, setup.optimizer, setup.schedule
        self.train_loader, self.valid_loader, self.transform = setup.train_loader, setup.valid_loader, setup.transform
        self.start, self.epochs, self.stage = (setup.first_epoch, 0), setup.end_epoch, setup.index
        self.fixed_norms, self.lr_owner, self.images, self.inputs = setup.fixed_norms, setup.lr_owner, setup.images, setup.inputs
        self.compiled = setup.compiled
        self.target, self.mix_stage, self.first_epoch = setup.target, setup.mix, setup.first_epoch
        self.ema_stage, self.ema_restart = self.ema is not None and setup.ema, setup.ema_restart
        self._mixing = self._mixes(setup.first_epoch)  # the stage's LR sweep mixes as its first epoch will
        self.train_mode()

    def _mixes(self, epoch: int) -> bool:
        return self.mixer is not None and self.mix_stage and self.mixer.enabled(epoch)

    def release_stage(self) -> None:
        """Let go of the stage in use: drop its wrapper and optimizer (Accelerate's references too) and
        give the bare module back its own forward; stop its loaders' workers and drop the loaders, with
        the decoded images they cache or the activations precomputed for it, before the next stage
        builds its own (and data.cache=auto measures the memory left for them)."""
        acc = self.accelerator
        if self.model is not None:
            bare = acc.unwrap_model(self.model, keep_fp32_wrapper=False)
            bare.__dict__.pop("_is_accelerate_prepared", None)
        release_loaders(self.train_loader, self.valid_loader)
        self.model = self.optimizer = self.schedule = self.compiled = None
        self.train_loader = self.valid_loader = None
        acc.free_memory()
        gc.collect()  # the old DDP reducer removes its autograd hooks when it is destroyed

    @property
    def workers(self) -> Workers:
        """How this rank's loaders decode: the split's worker count and cores (no workers without one)."""
        return Workers.of(self.cores)

    def observe_steps(self, observer: Callable[[float], None] | None) -> None:
        """Call `observer(seconds)` after every optimizer step (`step`, in training and in the LR
        sweep) with the seconds it took; None: stop. For benchmarks that time the steps."""
        self._step_observer = observer

    def train_mode(self) -> None:
        """Training mode, with the normalization layers of frozen groups (train_bn=false) in eval mode."""
        self.model.train()
        for module in self.fixed_norms:
            module.eval()

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches each rank runs per epoch (identical on every rank)."""
        return epoch_batches(len(self.train_loader), self.grad_accum, self.max_steps_per_epoch)

    @property
    def optimizer_steps_per_epoch(self) -> int:
        return epoch_steps(len(self.train_loader), self.grad_accum, self.max_steps_per_epoch)

    def fit(self) -> list[EpochResult]:
        world = self.accelerator.num_processes
        self.reporter.line(self.training_line())
        images_total, train_seconds = 0, 0.0
        if not self._history_shown:
            for row in self.history:  # epochs done before a resume
                self.reporter.epoch_row(row.epoch, row.train_loss, row.valid_loss, row.columns(), row.seconds)
            self._history_shown = True
        start_epoch, start_steps = self.start
        self._settle = self.start != (self.first_epoch, 0)  # resumed inside the stage: disttrain/train/buckets.py
        if self.stopped_early:  # resumed after train.early_stop ended the run
            return self.history
        if self.ema_stage and self.ema_restart and self.start == (self.first_epoch, 0):
            self.ema.restart(self.module, self.global_step)
            self.reporter.line(f"weight EMA: starts again from the weights at this stage's start (decay {self.ema.decay})")
        result = None
        for epoch in range(start_epoch, self.epochs):
            t0 = time.perf_counter()
            train_loss, images, preempt = self.train_epoch(epoch, skip_steps=start_steps if epoch == start_epoch else 0)
            t1 = time.perf_counter()
            result = self.evaluate()  # syncs the ranks' BatchNorm statistics (rank 0's) before it runs
            if self.ema_stage:
                self.ema.take_buffers(self.module)
            ema_result = self._evaluate_ema()
            seconds = time.perf_counter() - t0
            images_total += images
            train_seconds += t1 - t0
            if self.task.multi_label:
                self.threshold = result.threshold  # train.threshold=auto: this validation's best
            columns = {**self.task.row(result), **self._ema_columns(ema_result)}
            row = EpochResult(epoch, train_loss, result.loss, result.accuracy, seconds, images / (t1 - t0), self.stage,
                              columns if self.task.multi_label or self.ema is not None else None)
            self.history.append(row)
            self.reporter.epoch_row(epoch, train_loss, result.loss, columns, seconds)
            self._log_epoch(epoch, result, seconds, ema_result)
            figures = {"valid_loss": result.loss, **columns}  # all-reduced: the same on every rank
            if self.early_stop is not None and epoch + 1 < self.total_epochs and self._judge(self.early_stop.monitor, figures):
                self.stopped_early = self.early_stop.update(figures[self.early_stop.monitor])  # saved in the
                # checkpoint below: a resumed run stops here too
            if self.checkpointer is not None:
                path = self.checkpointer.save(self, epoch + 1, 0, None)
                if self.checkpointer.keep_best and self._judge(self.checkpointer.monitor, figures):
                    self.checkpointer.save_best(path, epoch + 1, figures[self.checkpointer.monitor])
                for hook in self.epoch_end_hooks:
                    hook(epoch)
                if preempt and epoch + 1 < self.total_epochs and not self.stopped_early:
                    raise Preempted(path)
            if self.stopped_early:
                self.reporter.line(f"early stop after epoch {epoch}: {self.early_stop.describe()} (train.early_stop); "
                                   "every rank stops here")
                break
        if result is None:  # resumed after the last epoch: nothing left to train
            return self.history
        if self.tracker is not None and getattr(result, "confusion", None) is not None and self.epochs == self.total_epochs:
            self.tracker.log_confusion(result.confusion, self.classes, step=self.global_step)
        self.reporter.line(
            f"{images_total} training images in {train_seconds:.1f} s of training: "
            f"{images_total / max(train_seconds, 1e-9):.1f} images/s (world size {world}, all ranks together)"
        )
        return self.history

    @staticmethod
    def _judge(monitor: str, figures: dict[str, float]) -> bool:
        """`monitor`'s figure counts this epoch (NaN: the EMA of a stage that does not update it)."""
        return not math.isnan(figures[monitor])

    def _evaluate_ema(self):
        """The EMA weights on the validation set (None without train.ema; NaN figures in a stage that
        does not update it, as a precompute stage by default)."""
        if self.ema is None:
            return None
        if not self.ema_stage:
            return evaluate(self.accelerator, self.ema.module, None, self.transform, self.task)
        return evaluate(self.accelerator, self.ema.module.get_submodule(self.target), self.valid_loader, self.transform, self.task)

    def _ema_columns(self, ema_result) -> dict[str, float]:
        """ema_valid_loss and the EMA's metric columns (ema_accuracy; multi-label: ema_accuracy_multi,
        ema_f<beta>, at the EMA's own threshold)."""
        if ema_result is None:
            return {}
        scores = {f"ema_{k}": v for k, v in self.task.row(ema_result).items() if k != "threshold"}
        return {"ema_valid_loss": ema_result.loss, **scores}

    def training_line(self) -> str:
        """The "training on" line: processes, device, precision, each rank's cores, the batch."""
        acc = self.accelerator
        world, per_rank = acc.num_processes, self.train_loader.batch_size
        where = f"; per rank {self.cores.describe()}" if self.cores is not None else ""
        cached = sum(getattr(loader, "cache_bytes", 0) for loader in (self.train_loader, self.valid_loader))  # 0: precomputed
        if cached:
            where += f"; images decoded once, then read from memory ({cached / 2**20:.0f} MB per rank: data.cache)"
        extras = ""
        if self.mixer is not None and self.mix_stage:
            extras += f"; {self.mixer.describe()} (train_loss is against the mixed targets)"
        if self.ema_stage:
            extras += f"; weight EMA decay {self.ema.decay}{' with warmup' if self.ema.warmup else ''}, every {self.ema.every} step(s)"
        return (
            f"training on {world} process(es) ({acc.device.type}, {acc.mixed_precision} precision"
            f"{'; ' + self.precision_reason if self.precision_reason else ''}{where}): "
            f"global batch {per_rank * world * self.grad_accum} = {per_rank} per rank x {world} rank(s)"
            f" x {self.grad_accum} accumulation, {self.optimizer_steps_per_epoch} steps per epoch{extras}"
        )

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, int]:
        """One optimizer step over the micro-batches (uint8 images and labels already on the device,
        as the DeviceLoader delivers them) of an accumulation group: forward and backward
        each (gradients all-reduced only on the last), clip, step. Returns this rank's loss sum (a
        device tensor: no device sync) and sample count. The schedule is the caller's business."""
        acc, model = self.accelerator, self.model
        started = time.perf_counter() if self._step_observer is not None else 0.0
        forward = model if self.compiled is None else self.compiled
        if self.compiled is not None:
            graphs, t0 = compiled_graphs(), time.perf_counter()
        for j, (images, labels) in enumerate(batches):
            x = self.transform(images, train=True)
            if self._mixing:  # MixUp/CutMix: soft (N, classes) targets from here on
                x, labels = self.mixer(x, labels)
            if self.compiled is not None:  # batches differ in size by one (the sampler): one graph for both
                torch._dynamo.maybe_mark_dynamic(x, 0)
            if self._settle:  # a resumed run's first step: DDP's buckets as the uninterrupted run's
                self._settle = False
                settle_buckets(acc, model, forward, x, labels, self.task.loss)
            if self.images:
                self._samples.show(x, self.global_step)
            last = j == len(batches) - 1
            with contextlib.nullcontext() if last else acc.no_sync(model):
                with acc.autocast():
                    logits = forward(x)
                loss = self.task.loss(logits.float(), labels)
                acc.backward(loss / len(batches))
            batch_loss = loss.detach().double() * len(labels)
            loss_sum = batch_loss if j == 0 else loss_sum + batch_loss
        if self.clip_grad is not None:
            self.last_grad_norm = acc.clip_grad_norm_(model.parameters(), self.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.compiled is not None and compiled_graphs() != graphs:
            self._compiled(compiled_graphs() - graphs, time.perf_counter() - t0, x.shape)
        if self._step_observer is not None:
            self._step_observer(time.perf_counter() - started)
        return loss_sum, sum(len(labels) for _, labels in batches)

    def _compiled(self, graphs: int, seconds: float, shape) -> None:
        """One line per step that compiled (the first of a stage, a new input shape): train.compile's cost."""
        self.compile_seconds += seconds
        where = f" ({self.inputs}, stage {self.stage})" if self.stage is not None else ""
        self.reporter.line(
            f"torch.compile: {graphs} graph(s) compiled for input {'x'.join(map(str, shape))}{where} in a step of {seconds:.1f} s "
            f"(compiling so far: {self.compile_seconds:.1f} s)"
        )

    def groups(self, loader_iter, n_batches: int):
        """Cut `n_batches` micro-batches from `loader_iter` into accumulation groups of grad_accum
        (the last group of an epoch may be shorter)."""
        for start in range(0, n_batches, self.grad_accum):
            yield list(itertools.islice(loader_iter, min(self.grad_accum, n_batches - start)))

    def train_epoch(self, epoch: int, skip_steps: int = 0) -> tuple[float, int, bool]:
        """One epoch on every rank (without its first `skip_steps` optimizer steps when resuming);
        returns (mean train loss over all ranks' samples, images seen, preemption requested).
        Every `log_every` optimizer steps the ranks reduce the loss since the last log point and the
        preemption flag (the only device syncs of the loop); the main process logs train/*."""
        self.train_mode()
        self._mixing = self._mixes(epoch)  # augment.mix_off_epoch: clean images from that epoch on
        self.train_loader.set_epoch(epoch, skip=skip_steps * self.grad_accum)
        n_batches, steps = self.batches_per_epoch - skip_steps * self.grad_accum, self.optimizer_steps_per_epoch
        loss_total = torch.zeros((), device=self.device, dtype=torch.float64)
        count = 0
        if skip_steps and self._resumed_sums is not None:
            loss_total += self._resumed_sums["loss_total"].to(self.device)
            count = self._resumed_sums["count"]
        self._resumed_sums = None
        window = self._window
        window.resume()
        bar = self.reporter.progress(self.groups(iter(self.train_loader), n_batches), total=steps, desc=f"epoch {epoch}")
        bar.update(skip_steps)
        for i, group in enumerate(bar, start=skip_steps):
            loss_sum, samples = self.step(group)
            loss_total += loss_sum
            count += samples
            window.add(loss_sum, samples)
            self.schedule.step()
            self.global_step += 1
            if self.ema_stage:  # after the optimizer step, on the device; every rank the same (identical weights)
                self.ema.update(self.module, self.global_step)
            last = i + 1 == steps
            if self.global_step % self.log_every == 0:
                if self._log_train(window, epoch + (i + 1) / steps, bar) and not last:
                    path = self.checkpointer.save(self, epoch, i + 1, {"loss_total": loss_total, "count": count})
                    raise Preempted(path)
            if self.checkpointer is not None and self.checkpointer.due(self.global_step) and not last:
                self.checkpointer.save(self, epoch, i + 1, {"loss_total": loss_total, "count": count})
        bar.close()
        window.pause()  # evaluation time does not count towards train/images_per_sec
        local = torch.stack([loss_total, loss_total.new_tensor(count), loss_total.new_tensor(self.train_loader.take_skipped()),
                             loss_total.new_tensor(float(self.stop_requested()))])
        loss_sum, images, skipped, stops = self.accelerator.reduce(local, reduction="sum").tolist()  # one sync
        mean_loss = loss_sum / images
        self._report_skipped(f"epoch {epoch}: {{}} unreadable training sample(s) skipped and replaced by others", skipped)
        if not math.isfinite(mean_loss):  # the same value on every rank, so every rank stops here
            raise FloatingPointError(
                f"epoch {epoch}: the training loss is {mean_loss}; lower optim.lr, set train.clip_grad, "
                "or use train.precision=bf16 or no"
            )
        return mean_loss, int(images), stops > 0

    def stop_requested(self) -> bool:
        """This rank got a preemption signal (reduced across ranks where it is read)."""
        return self.checkpointer is not None and self.checkpointer.flag.requested

    # -- checkpoint state --------------------------------------------------------------------

    def shared_state(self) -> dict:
        """What every rank holds identically: model, optimizer, schedule, grad scaler, history."""
        scaler = self.accelerator.scaler
        return {
            "model": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "history": [vars(r) for r in self.history],
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "early_stop": {**self.early_stop.state_dict(), "stopped": self.stopped_early} if self.early_stop is not None else None,
        }

    def rank_state(self, partial: dict | None) -> dict:
        """This rank's own: augmentation generator, the unfinished epoch's sums, the log window."""
        state = {
            "augment": self.augment.state_dict(),
            "window": self._window.state_dict(),
            "mixer": self.mixer.state_dict() if self.mixer is not None else None,
        }
        if partial is not None:
            state["partial"] = {"loss_total": partial["loss_total"].detach().cpu(), "count": partial["count"]}
        return state

    def load_state(self, meta: dict, shared: dict, rank_state: dict, optimizer: bool = True) -> None:
        """Continue from a checkpoint whose weights are in the model already (they must be there
        before the stage is entered: build_trainer); `optimizer=False` when it ended the previous
        stage (this stage's optimizer and schedule start fresh)."""
        if optimizer:
            self.optimizer.load_state_dict(shared["optimizer"])
            self.schedule.load_state_dict(shared["schedule"])
        if shared["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(shared["scaler"])
        self.history = [EpochResult(**row) for row in shared["history"]]
        if self.ema is not None and shared.get("ema") is not None:
            self.ema.load_state_dict(shared["ema"])
        elif self.ema is not None:  # a checkpoint of a run without train.ema: the average starts here
            self.ema.restart(self.module, meta["global_step"])
            self.reporter.line("weight EMA: the checkpoint has none (trained without train.ema); it starts from its weights")
        if self.early_stop is not None and shared.get("early_stop") is not None:
            self.early_stop.load_state_dict(shared["early_stop"])
            self.stopped_early = bool(shared["early_stop"].get("stopped", False))
        self.augment.load_state_dict(rank_state["augment"])
        if self.mixer is not None and rank_state.get("mixer") is not None:
            self.mixer.load_state_dict(rank_state["mixer"])
        self._window.load_state_dict(rank_state["window"])
        self._resumed_sums = rank_state.get("partial")
        set_rng_state(rank_state["rng"])
        self.global_step = meta["global_step"]
        self.start = (meta["epoch"], meta["steps_done_in_epoch"])
        self._samples.done()

    def _log_train(self, window: LogWindow, epoch: float, bar) -> bool:
        """Log train/* at this step; returns whether any rank was asked to stop (preemption)."""
        loss, images, seconds, stop = window.take(self.accelerator, self.stop_requested())
        lrs = self.schedule.get_last_lr()
        if self.tracker is not None:
            metrics = train_metrics(loss, images, seconds, epoch, lrs, self.lr_owner, self.last_grad_norm, self.stage_key())
            self.tracker.log(metrics, step=self.global_step)
        if not bar.disable:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{max(lrs):.2e}", img_s=f"{images / seconds:.0f}")
        return stop

    def _log_epoch(self, epoch: int, result: EvalResult, seconds: float, ema_result=None) -> None:
        if self.tracker is not None:
            self.tracker.log(epoch_metrics(result, seconds, epoch, self.stage_key(), ema_result), step=self.global_step)

    def stage_key(self) -> dict:
        """`{"stage": index}` in a run with stages (what every logged row of it carries), else empty."""
        return {"stage": self.stage} if self.stage is not None else {}

    def evaluate(self, loader: DeviceLoader | None = None, tta_n: int = 0, tta_beta: float = 0.25, tta_max: bool = False,
                 tta_views: str = "flips") -> EvalResult:
        result = evaluate(self.accelerator, self.model, loader or self.valid_loader, self.transform, self.task,
                          tta_n, tta_beta, tta_max, tta_views)
        self._report_skipped("validation: {} unreadable sample(s) skipped", result.skipped)
        self.train_mode()
        return result

    def _report_skipped(self, template: str, count) -> None:
        count = int(count)
        if count:
            self.reporter.line(template.format(count))


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (dynamo's own count)."""
    from torch._dynamo.utils import counters  # lazily: importing dynamo costs every process that never compiles

    return counters["stats"]["unique_graphs"]
