"""`disttrain evaluate`: exact evaluation of a model.pt on any labelled folder, on however many
processes run it.

The folder is `<class>/<images>`, or holds valid/, val/ or test/ (`--split` picks one; by default
valid, else val, else test); without `--data`, `data.root`'s (`data.valid_dir`'s) folder, as a
training run validates. Only that folder is listed (once, on the main process) and decoded: no
train/ is needed. Labels come from the class folder names, mapped to model.pt's classes. The
images go through the same global batches, decoding and forward pass as `disttrain predict`
(disttrain/use/inputs.py), so the accuracy counted from predict's CSV is evaluate's exactly. Metrics
are sums reduced once across ranks (disttrain/metrics.py): loss, accuracy, top-5 (5 classes or
more), per-class accuracy and the confusion matrix (row = true class), plain and with TTA.
The JSON holds the whole matrix (`confusion`) up to disttrain.tracking.MATRIX_CLASSES classes, and
always the most confused pairs (`most_confused`, 100); `--out-dir` writes every nonzero cell.

`data.format=shards` (or `--data` naming a folder `disttrain prepare` wrote) evaluates the shards'
validation split through the training loaders.

Nothing is written anywhere unless asked: `--out FILE.json` (the result), `--out-dir DIR`
(`confusion_matrix.png` and `.csv`; with more classes, `confusion_cells.csv` and
`confusion_summary.png`: disttrain/tracking.py), `--interpret DIR` (top losses, most confused, per-class scores
and the lesson's grids: disttrain/use/interpret.py; folders only). Files that do not decode are listed
on stderr and counted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from disttrain.config import ConfigError
from disttrain.data.decode import IMAGE_EXTENSIONS
from disttrain.data.folder import DataError
from disttrain.data.loader import Workers, watched
from disttrain.data.setup import build_loaders, load_data
from disttrain.dist.runtime import build_runtime
from disttrain.use.inference import read_model_file, saved_network
from disttrain.models.forward import batch_outputs, eval_view
from disttrain.models.forward import evaluate as validate
from disttrain.use.inputs import Inputs, batch_loader, choose_split, list_labelled, rank_batches
from disttrain.use.interpret import DEFAULT_K, SampleRecorder, write_interpretation
from disttrain.dist.jobgroup import JobGroup
from disttrain.metrics import EvalResult, EvalSums, most_confused, per_class
from disttrain.models.build import WeightsError, normalization
from disttrain.tracking import MATRIX_CLASSES, MOST_CONFUSED, ConsoleReporter, write_confusion


@dataclass
class EvaluateOptions:
    weights: str
    data: str | None = None
    """The labelled folder; None: data.root (and data.valid_dir) of the config."""
    split: str | None = None
    out: str | None = None
    """JSON result file."""
    out_dir: str | None = None
    """Folder for the confusion files (disttrain/tracking.py's write_confusion)."""
    tta_n: int = 0
    tta_beta: float = 0.25
    tta_max: bool = False
    batch_size: int = 32
    """Images per batch (each batch on one process), as predict's --batch-size."""
    extensions: frozenset[str] | None = IMAGE_EXTENSIONS
    interpret: str | None = None
    """Folder for the interpretation files (disttrain/use/interpret.py)."""
    interpret_k: int = DEFAULT_K
    """Images per interpretation grid (and rows of top_losses.csv)."""


def _sized(cfg, state: dict):
    """The config with model.pt's image size and presize (the config's only for an older model.pt)."""
    data = dataclasses.replace(cfg.data, image_size=state.get("image_size", cfg.data.image_size),
                               load_size=state.get("load_size", cfg.data.load_size))
    return dataclasses.replace(cfg, data=data)


def _model(state: dict, cfg, device: torch.device):
    """The model and its eval view; the normalization from model.pt, or (an older model.pt without
    it) what the config resolves to."""
    model = saved_network(state, device)
    saved = state.get("normalize")  # what the weights were trained with, else what the config resolves to
    mean, std, _ = (saved["mean"], saved["std"], "") if saved else normalization(cfg.model, cfg.augment)
    return model, eval_view(cfg.data.image_size, mean, std, cfg.model.channels_last, state.get("interpolation", "bilinear"))


def evaluate_files(accelerator, group: JobGroup, model, view, inputs: Inputs, num_classes: int, load_size: int, workers: Workers,
                   worker_timeout: float, options: EvaluateOptions, progress: bool = True,
                   recorder: SampleRecorder | None = None) -> tuple[EvalResult, list[tuple[str, str]]]:
    """This rank's batches of a labelled listing, the sums reduced across ranks once (on `group`,
    which waits for the slowest rank): (result, every rank's undecodable files with the reason).
    `recorder` also keeps each image's scalars of the same forward pass (its `gather` is the caller's)."""
    from tqdm import tqdm

    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    labels = torch.tensor(inputs.labels)
    batches = rank_batches(len(inputs.paths), options.batch_size, world, rank)
    loader = batch_loader(inputs.paths, batches, options.batch_size, load_size, workers, worker_timeout, pin_memory=device.type == "cuda")
    sums = EvalSums(num_classes, device, tta=options.tta_n > 0)
    bad: list[tuple[str, str]] = []
    total = len(inputs.paths)
    bar = tqdm(total=total, desc="evaluate", unit="img", disable=not (progress and accelerator.is_main_process), file=sys.stderr)
    with torch.no_grad():
        for index, images, failed in watched(loader, "evaluate"):
            bad.extend((inputs.paths[i], reason) for i, reason in failed)
            if images is not None:
                logits, _, tta = batch_outputs(model, view, images.to(device, non_blocking=True), accelerator.autocast,
                                               options.tta_n, options.tta_beta, options.tta_max)
                sums.add(logits, labels[index].to(device), tta)
                if recorder is not None:
                    recorder.add(index, logits, labels[index].to(device))
            bar.update(min((len(index) + len(failed)) * world, bar.total - bar.n))  # an estimate of all ranks
    bar.close()
    result = sums.result(group.sum, skipped=len(bad), gather=group.gather)
    return result, [item for part in group.gather(bad) for item in part]


def evaluate_shards(cfg, accelerator, group: JobGroup, model, view, classes: list[str], weights: str, options: EvaluateOptions,
                    workers: Workers) -> EvalResult:
    """data.format=shards: the manifest's validation split through the training loaders."""
    data = load_data(cfg, group, ConsoleReporter(accelerator.is_main_process, progress=False).line, workers.count)
    if data.classes != classes:
        raise WeightsError(f"{weights}: trained on classes {classes}, but the shards in {cfg.data.root} have {data.classes}")
    _, valid_loader = build_loaders(cfg, data, accelerator, workers)
    return validate(accelerator, model, valid_loader, view, len(classes), options.tta_n, options.tta_beta, options.tta_max)


def check_interpret(cfg, options: EvaluateOptions) -> None:
    """`--interpret` shows images by their paths: a folder of images, not shards (ConfigError)."""
    if options.interpret is None:
        return
    prepared = options.data is not None and (Path(options.data).expanduser() / "manifest.json").is_file()
    if prepared or (cfg.data.format == "shards" and options.data is None):
        raise ConfigError("--interpret: needs a folder of images (DIR/<class>/<images>), not shards (they hold no file paths "
                          "to show); give --data the image folder `disttrain prepare` read")


def summary_lines(result: EvalResult, classes: list[str], options: EvaluateOptions) -> list[str]:
    """The printed summary: loss and accuracy (and top-5), with TTA, per-class accuracy."""
    top5 = f"  top-5 {result.top5:.6f}" if result.top5 is not None else ""
    lines = [f"loss {result.loss:.6f}  accuracy {result.accuracy:.6f} ({result.correct}/{result.count}){top5}"]
    if options.tta_n:
        how = "max" if options.tta_max else f"beta {options.tta_beta}"
        lines.append(f"with TTA ({options.tta_n} views, {how}): loss {result.tta_loss:.6f}  accuracy {result.tta_accuracy:.6f} "
                     f"({result.tta_correct}/{result.count})")
    if result.confusion is not None:
        table = per_class(result.confusion, classes)
        shown = [(name, row) for name, row in table.items() if row["count"]]
        note = ""
        if len(shown) > 20:  # the 10 lowest; all of them are in --out's JSON
            shown = sorted(shown, key=lambda item: (item[1]["accuracy"], item[0]))[:10]
            note = f" (the 10 lowest of {len(table)} classes; all in --out)"
        cells = "  ".join(f"{name} {row['accuracy']:.3f} ({row['correct']}/{row['count']})" for name, row in shown)
        lines.append(f"per-class accuracy{note}: {cells}")
    return lines


def to_json(result: EvalResult, classes: list[str], world: int, where: str, options: EvaluateOptions) -> dict:
    summary = {key: value for key, value in vars(result).items() if key != "confusion"}
    summary.update(world_size=world, weights=options.weights, data=where, classes=classes)
    if options.tta_n:
        summary["tta"] = {"views": options.tta_n, "beta": options.tta_beta, "max": options.tta_max}
    if result.confusion is not None:
        summary["per_class"] = per_class(result.confusion, classes)
        summary["most_confused"] = [list(cell) for cell in most_confused(result.confusion, classes, MOST_CONFUSED)]
        if result.confusion.classes <= MATRIX_CLASSES:  # beyond, C x C is too many cells: --out-dir has every nonzero one
            summary["confusion"] = result.confusion.dense().tolist()
    return summary


def _write_json(summary: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, path)


def run(cfg, options: EvaluateOptions) -> dict:
    """The whole job, on every rank (the arguments are checked by the CLI before this); returns the
    JSON summary."""
    check_interpret(cfg, options)
    state = read_model_file(options.weights, need_inference_keys=False)
    cfg = _sized(cfg, state)
    classes = list(state["classes"])
    runtime = build_runtime(cfg)
    accelerator, workers = runtime.accelerator, Workers.of(runtime.cores)
    group = JobGroup(accelerator.num_processes)
    model, view = _model(state, cfg, accelerator.device)
    bad: list[tuple[str, str]] = []
    records = None
    if options.data is not None and (Path(options.data).expanduser() / "manifest.json").is_file():  # shards written by prepare
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, format="shards", root=options.data))
        options = dataclasses.replace(options, data=None)
    if cfg.data.format == "shards" and options.data is None:
        where = str(Path(cfg.data.root).expanduser())
        result = evaluate_shards(cfg, accelerator, group, model, view, classes, options.weights, options, workers)
    else:
        root = options.data if options.data is not None else cfg.data.root
        split = options.split or (cfg.data.valid_dir if options.data is None and cfg.data.valid_dir != "auto" else None)
        inputs = group.from_main(lambda: list_labelled(choose_split(root, split), classes, options.weights, options.extensions))
        where = inputs.folder
        if accelerator.is_main_process:
            print(f"evaluating {where}: {len(inputs.paths)} image file(s) in {len(set(inputs.labels))} class folder(s) (model.pt has "
                  f"{len(classes)} classes) on {accelerator.num_processes} process(es)", flush=True)
        recorder = SampleRecorder() if options.interpret else None
        result, bad = evaluate_files(accelerator, group, model, view, inputs, len(classes), cfg.data.load_size, workers,
                                     cfg.data.worker_timeout, options, recorder=recorder)
        records = recorder.gather(group) if recorder is not None else None
    if accelerator.is_main_process:
        for path, reason in bad:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        if result.skipped:
            print(f"{result.skipped} file(s) skipped (not decodable)", file=sys.stderr, flush=True)
    if result.count == 0:
        raise DataError(f"{where}: none of its {result.skipped} image file(s) could be decoded (each is listed above with the reason)")
    summary = to_json(result, classes, accelerator.num_processes, where, options)
    if accelerator.is_main_process:
        for line in summary_lines(result, classes, options):
            print(line, flush=True)
        if options.out:
            _write_json(summary, Path(options.out))
        if options.out_dir and result.confusion is not None:
            write_confusion(result.confusion, classes, Path(options.out_dir))
        if records is not None:
            written = write_interpretation(records, inputs.paths, classes, Path(options.interpret), options.interpret_k,
                                           cfg.data.load_size, view)
            for line in written.lines(classes):
                print(line, flush=True)
    accelerator.end_training()
    return summary
