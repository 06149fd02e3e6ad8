"""The end of a training run with `train.interpret`: the lesson's look at the final model's results on
the run's validation images (disttrain/use/interpret.py), through the same forward pass and gather as
`disttrain evaluate`."""

from __future__ import annotations

from pathlib import Path

from disttrain.dist.jobgroup import JobGroup
from disttrain.use.evaluate import EvaluateOptions, evaluate_files
from disttrain.use.inputs import Inputs
from disttrain.use.interpret import SampleRecorder, write_interpretation


def interpret_run(cfg, trainer, data, stage) -> None:
    """`train.interpret`, on every rank once model.pt is written: the final model (the bare module, in
    eval mode) on the run's validation images through the view the run validates with (the trainer's
    augmentation with train=False, at the last stage's sizes: `stage`, a resolved StageConfig), the
    same forward pass and gather as `disttrain evaluate`; the main process writes
    <run dir>/interpret/ and logs the grids and the top-losses Table to W&B while the other ranks
    wait (without the collective timeout). The random views are drawn with run.seed."""
    acc = trainer.accelerator
    group = JobGroup(acc.num_processes)
    model = trainer.module.eval()
    view = trainer.augment  # called with train=False: the eval view, at the last stage's image size
    inputs = Inputs(list(data.valid.paths), list(data.valid.labels), folder=str(data.valid.dir))
    recorder = SampleRecorder()
    options = EvaluateOptions(str(cfg.run.dir / "model.pt"), batch_size=stage.batch_size * 2)
    evaluate_files(acc, group, model, view, inputs, len(trainer.classes), stage.load_size, trainer.workers,
                   cfg.data.worker_timeout, options, progress=cfg.log.progress, recorder=recorder)
    records = recorder.gather(group)

    def write() -> None:
        written = write_interpretation(records, inputs.paths, trainer.classes, cfg.run.dir / "interpret", cfg.train.interpret_k,
                                       stage.load_size, view, seed=cfg.run.seed)
        for line in written.lines(trainer.classes):
            trainer.reporter.line(line)
        trainer.tracker.log_interpretation({Path(name).stem: written.folder / name for name in written.grids}, written.top,
                                           step=trainer.global_step)

    group.from_main(write)
