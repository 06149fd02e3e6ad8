"""The end of a training run with `train.interpret`: the lesson's look at the final model's results on
the run's validation images (disttrain/use/interpret.py), through the same forward pass and gather as
`disttrain evaluate`. Any folder source (class folders, a flat folder labelled by a table or by file
names); a multi-label run shows its top losses and per-class false positives and negatives at the
threshold model.pt keeps."""

from __future__ import annotations

from pathlib import Path

from disttrain.dist.jobgroup import JobGroup
from disttrain.use.evaluate import EvaluateOptions, evaluate_files
from disttrain.use.inputs import Inputs
from disttrain.use.interpret import SampleRecorder, TagRecorder, write_interpretation, write_tag_interpretation


def interpret_run(cfg, trainer, data, stage) -> None:
    """`train.interpret`, on every rank once model.pt is written: the final model (the bare module, in
    eval mode) on the run's validation images through the view the run validates with (the trainer's
    augmentation with train=False, at the last stage's sizes: `stage`, a resolved StageConfig), the
    same forward pass and gather as `disttrain evaluate`; the main process writes
    <run dir>/interpret/ and logs the grids and the top-losses Table to W&B while the other ranks
    wait (without the collective timeout). The random views are drawn with run.seed. Multi-label:
    the task with the threshold model.pt keeps (train.threshold=auto: the last validation's best).
    Without validation images (data.valid_pct=0) there is nothing to show: one line says so."""
    if not len(data.valid):
        trainer.reporter.line("interpret: no validation images (data.valid_pct=0), nothing to show")
        return
    acc = trainer.accelerator
    group = JobGroup(acc.num_processes)
    model = trainer.module.eval()
    view = trainer.augment  # called with train=False: the eval view, at the last stage's image size
    task = trainer.task.with_threshold(trainer.threshold) if trainer.task.multi_label else trainer.task
    inputs = Inputs(list(data.valid.paths), _plain(data.valid.labels), folder=str(data.valid.dir))
    recorder = TagRecorder(len(trainer.classes)) if task.multi_label else SampleRecorder()
    options = EvaluateOptions(str(cfg.run.dir / "model.pt"), batch_size=stage.batch_size * 2)
    evaluate_files(acc, group, model, view, inputs, task, stage.load_size, trainer.workers,
                   cfg.data.worker_timeout, options, progress=cfg.log.progress, recorder=recorder)
    records = recorder.gather(group)

    def write() -> None:
        folder = cfg.run.dir / "interpret"
        if task.multi_label:
            written = write_tag_interpretation(records, inputs.paths, trainer.classes, folder, cfg.train.interpret_k, stage.load_size,
                                               view, task.threshold)
        else:
            written = write_interpretation(records, inputs.paths, trainer.classes, folder, cfg.train.interpret_k, stage.load_size, view,
                                           seed=cfg.run.seed)
        for line in written.lines(trainer.classes):
            trainer.reporter.line(line)
        trainer.tracker.log_interpretation({Path(name).stem: written.folder / name for name in written.grids}, written.top,
                                           step=trainer.global_step, columns=written.columns)

    group.from_main(write)


def _plain(labels) -> list:
    """A split's labels as Python values (an int array, or multi-label tuples)."""
    return labels.tolist() if hasattr(labels, "tolist") else list(labels)
