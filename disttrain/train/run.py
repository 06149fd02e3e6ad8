"""The run's life in one place: resume or start, the stages one after another (each: freeze, param
groups, loaders and augmentation at its size, the LR sweep when its lr is auto, fit), then save
`model.pt` and `results.json`.

Checkpoints know their stage. One taken at the end of a stage's last epoch continues with the next
stage from its start; a stage with `lr: auto` saves one more right after its sweep
(`step-N-stage<i>`), so a resume never sweeps a stage again.

Preemption (SIGUSR1, SIGTERM) is caught from the first line on. Before training, the ranks check
together after the data scan, after entering each stage (its loaders, or its precompute), at every
step of an LR sweep and before fit: there every rank stops with nothing to save (the checkpoint the
run continues from, if any, holds all of it; before the first one, the requeued job starts again).
In training, the trainer saves a checkpoint first (disttrain/train/trainer.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate.utils import broadcast_object_list

from disttrain.config import Config
from disttrain.data.setup import eval_loader
from disttrain.data.workers import start_worker_server
from disttrain.dist.logs import setup_logging
from disttrain.dist.runtime import build_runtime
from disttrain.models.forward import eval_view, evaluate, tta_views_of
from disttrain.models.families import family_of
from disttrain.train.build import build_trainer
from disttrain.train.checkpoint import (
    PreemptionFlag,
    Preempted,
    Resume,
    checkpoint_root,
    clear_leftovers,
    find_latest,
    load_checkpoint,
    save_weights,
    set_aside_later,
    stop_if_preempted,
)
from disttrain.train.interpretation import interpret_run
from disttrain.train.lr_sweep import SweepInterrupted, find_lr
from disttrain.train.stages import StagePlan, describe, enter_stage, plan_stages
from disttrain.train.trainer import EpochResult, Trainer


def train(cfg: Config, find_lr_only: bool = False) -> list[EpochResult]:
    """Build everything from the config; resume from a checkpoint (checkpoint.resume); run the
    stages (sweeping the LR where a stage asks, or only the first stage's sweep with
    `find_lr_only`); save `model.pt` and `results.json` in the run dir; track in metrics.jsonl and W&B."""
    flag = PreemptionFlag().install()  # first: from here on SIGUSR1/SIGTERM stop the run at its next check point
    runtime = build_runtime(cfg)  # data.num_workers=auto and the rest resolved into runtime.cores; cfg stays as given
    accelerator = runtime.accelerator
    start_worker_server(runtime.cores.workers)
    setup_logging(accelerator.process_index, accelerator.is_main_process)
    resume_from = None if find_lr_only else _resume_path(cfg, accelerator)
    # every rank refuses another world size the same way, before building
    resume = Resume.read(resume_from, accelerator.process_index, accelerator.num_processes) if resume_from else None
    plans = plan_stages(cfg)
    first, continuing = _resume_stage(plans, resume.meta) if resume else (0, False)
    trainer, data = build_trainer(cfg, runtime, plans, resume=resume, flag=flag, stage=first, find_lr_only=find_lr_only)
    try:
        history = _run(cfg, trainer, data, plans, first, continuing, find_lr_only, resume)
    except BaseException as err:
        trainer.tracker.finish(failed=not isinstance(err, Preempted))
        raise
    trainer.tracker.finish()
    accelerator.end_training()
    return history


def _resume_path(cfg: Config, accelerator) -> Path | None:
    """checkpoint.resume: `never`, `auto` (the run dir's newest complete checkpoint, if any) or a
    path. Decided on the main process and broadcast, so every rank resumes from the same one."""
    choice: list = [None]
    if accelerator.is_main_process:
        if cfg.checkpoint.resume == "auto":
            found = find_latest(cfg.run.dir)
            choice[0] = str(found) if found else None
        elif cfg.checkpoint.resume != "never":
            choice[0] = str(Path(cfg.checkpoint.resume).expanduser())
    if accelerator.num_processes > 1:
        broadcast_object_list(choice, from_process=0)
    return Path(choice[0]) if choice[0] else None


def _resume_stage(plans: list[StagePlan], meta: dict) -> tuple[int, bool]:
    """(the stage a checkpoint continues in, whether it continues that stage's optimizer and schedule):
    a checkpoint at the end of a stage's last epoch starts the next stage afresh."""
    stage = min(meta.get("stage", 0), len(plans) - 1)
    if meta["epoch"] >= plans[stage].end_epoch and stage + 1 < len(plans):
        return stage + 1, False
    return stage, True


def _run(cfg, trainer: Trainer, data, plans, first: int, continuing: bool, find_lr_only: bool, resume: Resume | None) -> list:
    from_step = None  # the step continued from, when that checkpoint is one of this run dir's own
    if resume is not None:
        trainer.checkpointer.resumed_from(resume.path)
        meta = resume.meta
        trainer.load_state(meta, resume.shared, resume.rank_state, optimizer=continuing)
        if "lr_sweep" in meta:  # the last sweep's outcome goes on into this run's checkpoints
            trainer.checkpointer.record("lr_sweep", meta["lr_sweep"])
        if resume.path.resolve().parent == checkpoint_root(cfg.run.dir).resolve():
            from_step = meta["global_step"]
        acc = trainer.accelerator
        saved_in = meta.get("precision", acc.mixed_precision)
        changed = f"; trained in {saved_in} precision so far, continuing in {acc.mixed_precision}" if saved_in != acc.mixed_precision else ""
        where = f"{plans[first].name}, " if plans[first].staged else ""
        lr = f"peak LR {max(trainer.schedule.base_lrs):.3g}" if continuing else "starting it"
        trainer.reporter.line(
            f"resuming from {resume.path}: {where}epoch {meta['epoch']}, {meta['steps_done_in_epoch']} step(s) into it, "
            f"global step {meta['global_step']}, {lr}{changed}"
        )
    if trainer.accelerator.is_main_process and not find_lr_only:  # checkpoints this run does not continue go out of its way
        left = clear_leftovers(cfg.run.dir)
        if left:
            trainer.reporter.line(f"removed what killed saves left in {cfg.run.dir}: {', '.join(left)}")
        aside = set_aside_later(cfg.run.dir, from_step)
        if aside is not None:
            trainer.reporter.line(f"moved this run dir's checkpoints that this run does not continue to {aside}")
    if cfg.checkpoint.snapshot_cycles:
        trainer.epoch_end_hooks.append(lambda epoch: _snapshot(cfg, trainer, data, plans, epoch))
    for plan in plans[first:]:
        if trainer.stopped_early:  # train.early_stop: the stages after it do not run
            break
        if plan.index != first:
            trainer.use(enter_stage(trainer, cfg, data, plan))
        of = f" of {plan.name}" if plan.staged else ""
        _stop_if_preempted(trainer, f"during the precompute{of}" if plan.cfg.precompute else f"while setting up{of or ' the run'}")
        if (plan.index != first or not continuing) and (plan.cfg.lr == "auto" or find_lr_only):
            _sweep(cfg, trainer, plan)
            if find_lr_only:
                return []
            if plan.staged:  # the sweep is not repeated by a resume
                trainer.checkpointer.save(trainer, plan.first_epoch, 0, None, tag=f"stage{plan.index}")
            _stop_if_preempted(trainer, f"after the LR sweep{of}")
        if plan.staged:
            trainer.reporter.line(describe(trainer, plan, cfg))
        trainer.fit()
    if cfg.train.tta:
        _tta(cfg, trainer, data, plans[-1])
    _save(cfg, trainer, data, plans)
    if cfg.train.interpret:  # the lesson's look at the results, once model.pt is written
        interpret_run(cfg, trainer, data, plans[-1].cfg)
    return trainer.history


def _sweep(cfg: Config, trainer: Trainer, plan: StagePlan) -> None:
    """The synchronized LR sweep in the stage's state; its suggestion becomes the head's peak LR."""
    sweep_cfg = plan.cfg.sweep
    stem = f"lr_sweep.stage{plan.index}" if plan.staged else "lr_sweep"
    keys = (f"stages[{plan.index}].lr", f"stages[{plan.index}].sweep") if plan.staged else ("optim.lr", "sweep")
    try:
        sweep = find_lr(trainer, sweep_cfg, cfg.run.dir, trainer.reporter, stem=stem, keys=keys)
    except SweepInterrupted as stop:  # the trainer's state is as before the sweep
        of = f" of {plan.name}" if plan.staged else ""
        where = f"during the LR sweep{of} (after its step {stop.step} of {stop.of})"
        raise Preempted(trainer.checkpointer.last, saved=False, where=where) from None
    trainer.tracker.log_sweep(sweep, cfg.run.dir / f"{stem}.png", step=trainer.global_step, extra=trainer.stage_key())
    trainer.checkpointer.record("lr_sweep", {"suggestion": sweep.suggestion, "method": sweep.method,
                                             "suggestions": sweep.suggestions, "precision": sweep.precision})
    trainer.schedule.set_peak_lr(sweep.suggestion)


def _stop_if_preempted(trainer: Trainer, where: str) -> None:
    """Collective, before training: every rank raises Preempted when any rank got the signal."""
    checkpointer = trainer.checkpointer
    stop_if_preempted(checkpointer.flag, checkpointer.group, checkpointer.last, where)


def _tta(cfg: Config, trainer: Trainer, data, plan: StagePlan) -> None:
    """train.tta: the final model on the validation images, plain and with TTA (on images also
    after a precomputed last stage: TTA needs the whole model)."""
    train, acc = cfg.train, trainer.accelerator
    if plan.cfg.precompute:
        view = eval_view(plan.cfg.image_size, trainer.augment.mean, trainer.augment.std, cfg.model.channels_last,
                         trainer.augment.interpolation)
        loader = eval_loader(cfg, data.valid, acc, trainer.workers, plan.cfg.load_size, plan.cfg.batch_size * 2, name="valid (TTA)")
        result = evaluate(acc, trainer.module, loader, view, trainer.task, train.tta_n, train.tta_beta, train.tta_max,
                          tta_views_of(cfg.augment))
    else:
        result = trainer.evaluate(None, train.tta_n, train.tta_beta, train.tta_max, tta_views_of(cfg.augment))
    how = "max" if train.tta_max else f"beta {train.tta_beta}"
    if trainer.task.multi_label:  # counted in (image, tag) cells, at the plain pass's threshold
        name = f"f{result.beta:g}"
        trainer.reporter.line(
            f"TTA ({train.tta_n} views, {how}): valid_loss {result.tta_loss:.6f}  accuracy_multi {result.tta_accuracy:.6f} "
            f"({result.tta_correct}/{result.cells})  {name} {result.tta_fbeta:.6f}; without: valid_loss {result.loss:.6f}  "
            f"accuracy_multi {result.accuracy:.6f}  {name} {result.fbeta:.6f} (threshold {result.threshold:g})"
        )
        trainer.tracker.log({"valid/tta_loss": result.tta_loss, "valid/tta_accuracy_multi": result.tta_accuracy,
                             f"valid/tta_{name}": result.tta_fbeta, **trainer.stage_key()}, step=trainer.global_step)
        return
    trainer.reporter.line(
        f"TTA ({train.tta_n} views, {how}): valid_loss {result.tta_loss:.6f}  accuracy {result.tta_accuracy:.6f} "
        f"({result.tta_correct}/{result.count}); without: valid_loss {result.loss:.6f}  accuracy {result.accuracy:.6f}"
    )
    trainer.tracker.log({"valid/tta_loss": result.tta_loss, "valid/tta_accuracy": result.tta_accuracy, **trainer.stage_key()},
                        step=trainer.global_step)


def _snapshot(cfg: Config, trainer: Trainer, data, plans: list[StagePlan], epoch: int) -> None:
    """checkpoint.snapshot_cycles: at the end of an SGDR cycle, the weights as a model file of their
    own (<run dir>/snapshots/cycle-<c>.pt, or stage<i>-cycle-<c>.pt in a run with stages), for a
    snapshot ensemble (`disttrain predict --weights`)."""
    cycle = trainer.schedule.ended_cycle()
    if cycle is None:
        return
    plan = next(p for p in plans if p.first_epoch <= epoch < p.end_epoch)
    path = cfg.run.dir / "snapshots" / (f"stage{plan.index}-cycle-{cycle}.pt" if plan.staged else f"cycle-{cycle}.pt")
    if trainer.accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_model(cfg, trainer, data, plan, trainer.module.state_dict(), path)
        trainer.reporter.line(f"SGDR cycle {cycle} ended with epoch {epoch}: its weights saved as {path} (checkpoint.snapshot_cycles)")


def _final_weights(cfg: Config, trainer: Trainer) -> tuple[dict, str]:
    """train.final: the weights model.pt holds, and where they come from."""
    if cfg.train.final == "ema":
        return trainer.ema.module.state_dict(), f"the weight EMA's (decay {cfg.train.ema})"
    if cfg.train.final == "best":
        best = trainer.checkpointer.best_path()
        if best is not None:
            meta, shared, _ = load_checkpoint(best, 0, trainer.accelerator.num_processes)
            return shared["model"], f"the best epoch's by {cfg.checkpoint.monitor} ({best.name}, epoch {meta['epoch'] - 1})"
    return trainer.module.state_dict(), "the last epoch's"


def _write_model(cfg: Config, trainer: Trainer, data, plan: StagePlan, weights: dict, path: Path) -> None:
    acc, stage = trainer.accelerator, plan.cfg
    save_weights(
        path, weights, data.classes, cfg.model.name,
        normalize={"mean": trainer.augment.mean, "std": trainer.augment.std},
        image_size=stage.image_size, load_size=stage.load_size, precision=acc.mixed_precision,
        interpolation=trainer.augment.interpolation, family=family_of(cfg.model.name).name, tta_views=tta_views_of(cfg.augment),
        task=trainer.task.with_threshold(trainer.threshold).to_saved(),
    )


def _save(cfg: Config, trainer: Trainer, data, plans: list[StagePlan]) -> None:
    acc = trainer.accelerator
    if acc.is_main_process:
        weights, source = _final_weights(cfg, trainer)
        if cfg.train.final != "last":
            trainer.reporter.line(f"model.pt holds {source} weights (train.final={cfg.train.final})")
        _write_model(cfg, trainer, data, plans[-1], weights, cfg.run.dir / "model.pt")
        results = {
            "world_size": acc.num_processes,
            "precision": acc.mixed_precision,
            "peak_lr": max(trainer.schedule.base_lrs),
            "final": cfg.train.final,
            "epochs": [{k: v for k, v in vars(r).items() if k != "metrics" or v is not None} for r in trainer.history],
        }
        (cfg.run.dir / "results.json").write_text(json.dumps(results, indent=1))
    trainer.checkpointer.group.barrier()  # as a checkpoint's save: model.pt may take longer than a collective may wait

