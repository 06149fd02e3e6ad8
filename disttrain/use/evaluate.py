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

A source without a validation folder (a flat folder labelled by data.labels or data.label_regex,
or class folders with data.valid_pct) is evaluated on its drawn validation split, listed as training
lists it (disttrain/data/source.py). `--run RUN_DIR` evaluates a run's model.pt on the run's own
validation images: its config.yaml says where they are, and a drawn split is checked against the
run's split.json (the same files, or a one-line error: the data changed); a file the table names
that is gone is counted as skipped.

A multi-label model (model.pt's `task`, disttrain/task.py) is evaluated with the task's sums
(disttrain/multilabel.py): loss, accuracy_multi, F-beta (model.pt's beta) at model.pt's threshold
(`--threshold` a number, or `auto`: the best on these images), mean average precision, and per class
precision, recall, F1, support and AP; computed from every rank's gathered rows, the same figures on
any number of processes. Its --interpret writes the top losses and the per-class false positives and
negatives (no confusion matrix: there is no single predicted class).

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
from disttrain.data.setup import build_loaders, draws_split, load_data
from disttrain.data.source import list_source
from disttrain.data.split import SPLIT_FILE, read_split
from disttrain.dist.runtime import build_runtime
from disttrain.use.inference import read_model_file, saved_network
from disttrain.models.forward import batch_outputs, eval_view
from disttrain.models.forward import evaluate as validate
from disttrain.task import Task
from disttrain.use.inputs import Inputs, batch_loader, choose_split, list_labelled, rank_batches
from disttrain.use.interpret import DEFAULT_K, SampleRecorder, TagRecorder, write_interpretation, write_tag_interpretation
from disttrain.dist.jobgroup import JobGroup
from disttrain.metrics import EvalResult, most_confused, per_class
from disttrain.multilabel import MultiLabelResult, per_class_table
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
    tta_views: str = "flips"
    """The TTA view set (disttrain/models/forward.py): `run` takes model.pt's."""
    run: str | None = None
    """A run dir: evaluate on its own validation images (its config is the one given; its split.json
    is checked)."""
    threshold: float | str | None = None
    """Multi-label: a tag is predicted above this probability; None: model.pt's; `auto`: the best
    F-beta's on the evaluated images."""


def parse_threshold(text: str | None) -> float | str | None:
    """`--threshold`: a probability strictly between 0 and 1, or `auto` (ConfigError otherwise)."""
    if text is None or text.strip().lower() == "auto":
        return None if text is None else "auto"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise ConfigError(f"--threshold {text}: give a probability between 0 and 1 (a tag is predicted above it), or auto "
                          "(the best F-beta's on the evaluated images)")
    return value


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


def targets_of(labels: list, task: Task) -> torch.Tensor:
    """What the sums take per image: the int64 labels, or (multi-label: each label a tuple of class
    indices) a uint8 (N, classes) multi-hot matrix."""
    if not task.multi_label:
        return torch.tensor(labels, dtype=torch.int64)
    hot = torch.zeros(len(labels), task.classes, dtype=torch.uint8)
    for row, tags in enumerate(labels):
        hot[row, list(tags)] = 1
    return hot


def evaluate_files(accelerator, group: JobGroup, model, view, inputs: Inputs, task: Task, load_size: int, workers: Workers,
                   worker_timeout: float, options: EvaluateOptions, progress: bool = True,
                   recorder: SampleRecorder | TagRecorder | None = None) -> tuple[EvalResult | MultiLabelResult, list[tuple[str, str]]]:
    """This rank's batches of a labelled listing, the `task`'s sums reduced (single-label) or gathered
    (multi-label) across ranks once (on `group`, which waits for the slowest rank): (result, every
    rank's undecodable files with the reason). `recorder` also keeps each image's values of the same
    forward pass (its `gather` is the caller's)."""
    from tqdm import tqdm

    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    labels = targets_of(inputs.labels, task)
    batches = rank_batches(len(inputs.paths), options.batch_size, world, rank)
    loader = batch_loader(inputs.paths, batches, options.batch_size, load_size, workers, worker_timeout, pin_memory=device.type == "cuda")
    sums = task.sums(device, tta=options.tta_n > 0)
    bad: list[tuple[str, str]] = []
    total = len(inputs.paths)
    bar = tqdm(total=total, desc="evaluate", unit="img", disable=not (progress and accelerator.is_main_process), file=sys.stderr)
    with torch.no_grad():
        for index, images, failed in watched(loader, "evaluate"):
            bad.extend((inputs.paths[i], reason) for i, reason in failed)
            if images is not None:
                logits, _, tta = batch_outputs(model, view, images.to(device, non_blocking=True), accelerator.autocast,
                                               options.tta_n, options.tta_beta, options.tta_max, options.tta_views, task=task)
                sums.add(logits, labels[index].to(device), tta)
                if recorder is not None:
                    recorder.add(index, logits, labels[index].to(device))
            bar.update(min((len(index) + len(failed)) * world, bar.total - bar.n))  # an estimate of all ranks
    bar.close()
    result = sums.result(group.sum, skipped=len(bad), gather=group.gather)
    return result, [item for part in group.gather(bad) for item in part]


def evaluate_shards(cfg, accelerator, group: JobGroup, model, view, classes: list[str], task: Task, options: EvaluateOptions,
                    workers: Workers) -> EvalResult | MultiLabelResult:
    """data.format=shards: the manifest's validation split through the training loaders."""
    data = load_data(cfg, group, ConsoleReporter(accelerator.is_main_process, progress=False).line, workers.count)
    if data.classes != classes:
        raise WeightsError(f"{options.weights}: trained on classes {classes}, but the shards in {cfg.data.root} have {data.classes}")
    check_task(task, data.multi_label, options.weights, f"the shards in {cfg.data.root}")
    _, valid_loader = build_loaders(cfg, data, accelerator, workers)
    return validate(accelerator, model, valid_loader, view, task, options.tta_n, options.tta_beta, options.tta_max, options.tta_views)


def check_task(task: Task, multi_label: bool, weights: str, where: str) -> None:
    """The data's labels are of the model's kind: one class per image, or any number of tags."""
    if task.multi_label != multi_label:
        model, data = ("multi-label", "one class per image") if task.multi_label else ("single-label", "several labels per image")
        hint = " (e.g. --run RUN_DIR: the run's own validation images)" if task.multi_label else ""
        raise DataError(f"{where}: has {data}, but {weights} is a {model} model; evaluate it on data labelled as it was trained{hint}")


@dataclass
class ValidationImages:
    """A drawn split's validation images (`split_validation`)."""

    inputs: Inputs
    set_aside: list[tuple[str, str]]
    """Validation files the listing set aside (named by the table, not on disk), with the reason: skipped."""
    how: str
    """How the split was drawn (split.json's `how`)."""
    multi_label: bool


def split_validation(cfg, classes: list[str], weights: str, split_file: Path | None) -> ValidationImages:
    """The validation part of the split the source draws (disttrain/data/source.py, as training lists
    it), labelled in `classes` (the model's: the source must give the same), checked equal to
    `split_file`'s list of validation files (a run's split.json) when given. Main process only."""
    listing = list_source(cfg.data)
    where = cfg.data.labels if cfg.data.labels is not None else str(listing.valid_dir)
    if listing.classes != classes:
        more = sorted(set(listing.classes) - set(classes))
        less = sorted(set(classes) - set(listing.classes))
        diff = "; ".join(part for part in (f"new: {', '.join(more[:10])}" if more else "",
                                           f"gone: {', '.join(less[:10])}" if less else "") if part)
        raise DataError(f"{where}: its labels are not the classes of {weights} ({diff}); the data changed since the model was trained")
    record = listing.split
    if split_file is not None:
        before = read_split(split_file)
        if before.valid != record.valid:
            raise DataError(f"{split_file}: the run validated on {len(before.valid)} file(s) ({before.how}); {cfg.data.root} now "
                            f"splits into {len(record.valid)} other ones ({record.how}): the data (files or labels) changed since "
                            f"the run; restore it, or evaluate the current split with --config {split_file.parent / 'config.yaml'}")
    if not record.valid:
        raise DataError(f"{cfg.data.root}: the split has no validation images ({record.how}); evaluate a labelled folder with --data")
    named = {str(listing.valid_dir / name) for name in record.valid}
    set_aside = [(bad.path, bad.reason) for bad in listing.bad if bad.path in named]
    inputs = Inputs([str(path) for path, _ in listing.valid], [target for _, target in listing.valid], folder=str(listing.valid_dir))
    return ValidationImages(inputs, set_aside, record.how, listing.multi_label)


def check_interpret(cfg, options: EvaluateOptions) -> None:
    """`--interpret` shows images by their paths: a folder of images, not shards (ConfigError)."""
    if options.interpret is None:
        return
    prepared = options.data is not None and (Path(options.data).expanduser() / "manifest.json").is_file()
    if prepared or (cfg.data.format == "shards" and options.data is None):
        raise ConfigError("--interpret: needs a folder of images (DIR/<class>/<images>), not shards (they hold no file paths "
                          "to show); give --data the image folder `disttrain prepare` read")


def summary_lines(result: EvalResult | MultiLabelResult, classes: list[str], options: EvaluateOptions) -> list[str]:
    """The printed summary: loss and accuracy (and top-5), with TTA, per-class accuracy."""
    if isinstance(result, MultiLabelResult):
        return multi_label_lines(result, classes, options)
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


def multi_label_lines(result: MultiLabelResult, classes: list[str], options: EvaluateOptions) -> list[str]:
    """A multi-label summary: loss, accuracy_multi (cells), F-beta at the threshold, mAP; with TTA;
    per-class F1 (the 10 lowest past 20 classes)."""
    f = f"f{result.beta:g}"
    how = "best on these images" if options.threshold == "auto" else "given" if options.threshold is not None else "model.pt's"
    lines = [f"loss {result.loss:.6f}  accuracy_multi {result.accuracy:.6f} ({result.correct}/{result.cells})  {f} {result.fbeta:.6f}  "
             f"mAP {result.mean_ap:.6f}  threshold {result.threshold:g} ({how}); {result.count} image(s)"]
    if options.tta_n:
        tta = "max" if options.tta_max else f"beta {options.tta_beta}"
        lines.append(f"with TTA ({options.tta_n} views, {tta}): loss {result.tta_loss:.6f}  accuracy_multi {result.tta_accuracy:.6f} "
                     f"({result.tta_correct}/{result.cells})  {f} {result.tta_fbeta:.6f}")
    shown = [(name, row) for name, row in per_class_table(result, classes).items() if row["support"]]
    note = ""
    if len(shown) > 20:  # the 10 lowest; all of them are in --out's JSON
        shown = sorted(shown, key=lambda item: (item[1]["f1"], item[0]))[:10]
        note = f" (the 10 lowest of {len(classes)} classes; all in --out)"
    cells = "  ".join(f"{name} {row['f1']:.3f} (support {row['support']})" for name, row in shown)
    lines.append(f"per-class F1{note}: {cells}")
    return lines


def to_json(result: EvalResult | MultiLabelResult, classes: list[str], world: int, where: str, options: EvaluateOptions) -> dict:
    if isinstance(result, MultiLabelResult):
        return multi_label_json(result, classes, world, where, options)
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


RENAMED = {"accuracy": "accuracy_multi", "tta_accuracy": "tta_accuracy_multi"}
"""MultiLabelResult's fields under the names the epoch table and W&B give them."""


def multi_label_json(result: MultiLabelResult, classes: list[str], world: int, where: str, options: EvaluateOptions) -> dict:
    """A multi-label result as JSON: every figure of MultiLabelResult (accuracy as accuracy_multi) and
    `per_class` by class name."""
    summary: dict = {"multi_label": True}
    summary.update({RENAMED.get(key, key): value for key, value in vars(result).items() if key != "per_class"})
    summary["threshold_searched"] = options.threshold == "auto"
    summary.update(world_size=world, weights=options.weights, data=where, classes=classes)
    if options.tta_n:
        summary["tta"] = {"views": options.tta_n, "beta": options.tta_beta, "max": options.tta_max}
    summary["per_class"] = per_class_table(result, classes)
    return summary


def _write_json(summary: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, path)


def check_task_options(task: Task, options: EvaluateOptions) -> None:
    """The options that only one kind of model takes (ConfigError, before any work)."""
    if options.threshold is not None and not task.multi_label:
        raise ConfigError(f"--threshold: {options.weights} is a single-label model (its prediction is the most probable class); "
                          "the threshold is a multi-label model's")
    if options.out_dir is not None and task.multi_label:
        raise ConfigError(f"--out-dir: {options.weights} is a multi-label model, which has no confusion matrix (no single predicted "
                          "class); --interpret DIR writes its per-class false positives and negatives")


def _announce(accelerator, inputs: Inputs, found: ValidationImages | None, task: Task, classes: list[str], run_dir: str | None) -> None:
    """The line saying what is evaluated, on the main process."""
    if not accelerator.is_main_process:
        return
    if found is None:
        print(f"evaluating {inputs.folder}: {len(inputs.paths)} image file(s) in {len(set(inputs.labels))} class folder(s) (model.pt has "
              f"{len(classes)} classes) on {accelerator.num_processes} process(es)", flush=True)
        return
    present = {t for tags in inputs.labels for t in tags} if task.multi_label else set(inputs.labels)
    kind = "tags" if task.multi_label else "classes"
    listed = f"{run_dir}/{SPLIT_FILE}'s" if run_dir is not None else "the"
    gone = f" (and {len(found.set_aside)} listed but not on disk)" if found.set_aside else ""
    print(f"evaluating {listed} validation split of {inputs.folder} ({found.how}): {len(inputs.paths)} image file(s){gone} with "
          f"{len(present)} of model.pt's {len(classes)} {kind} on {accelerator.num_processes} process(es)", flush=True)


def run(cfg, options: EvaluateOptions) -> dict:
    """The whole job, on every rank (the arguments are checked by the CLI before this); returns the
    JSON summary."""
    check_interpret(cfg, options)
    state = read_model_file(options.weights, need_inference_keys=False)
    options = dataclasses.replace(options, tta_views=state.get("tta_views", "flips"))
    cfg = _sized(cfg, state)
    classes = list(state["classes"])
    task = Task.from_saved(state, len(classes))
    check_task_options(task, options)
    if options.threshold is not None:
        task = task.with_threshold(options.threshold)
    runtime = build_runtime(cfg)
    accelerator, workers = runtime.accelerator, Workers.of(runtime.cores)
    group = JobGroup(accelerator.num_processes)
    model, view = _model(state, cfg, accelerator.device)
    bad: list[tuple[str, str]] = []
    records = None
    found: ValidationImages | None = None
    if options.data is not None and (Path(options.data).expanduser() / "manifest.json").is_file():  # shards written by prepare
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, format="shards", root=options.data))
        options = dataclasses.replace(options, data=None)
    if cfg.data.format == "shards" and options.data is None:
        where = str(Path(cfg.data.root).expanduser())
        result = evaluate_shards(cfg, accelerator, group, model, view, classes, task, options, workers)
    else:
        if options.data is None and draws_split(cfg.data):  # the drawn split's validation part, as training draws it
            split_file = Path(options.run).expanduser() / SPLIT_FILE if options.run is not None else None
            found = group.from_main(lambda: split_validation(cfg, classes, options.weights, split_file))
            check_task(task, found.multi_label, options.weights, found.inputs.folder)
            inputs = found.inputs
        else:
            root = options.data if options.data is not None else cfg.data.root
            split = options.split or (cfg.data.valid_dir if options.data is None and cfg.data.valid_dir != "auto" else None)
            check_task(task, False, options.weights, str(Path(root).expanduser()) + " (class folders)")
            inputs = group.from_main(lambda: list_labelled(choose_split(root, split), classes, options.weights, options.extensions))
        where = inputs.folder
        _announce(accelerator, inputs, found, task, classes, options.run)
        recorder = (TagRecorder(len(classes)) if task.multi_label else SampleRecorder()) if options.interpret else None
        result, bad = evaluate_files(accelerator, group, model, view, inputs, task, cfg.data.load_size, workers,
                                     cfg.data.worker_timeout, options, recorder=recorder)
        records = recorder.gather(group) if recorder is not None else None
        if found is not None and found.set_aside:  # named by the table, gone from the disk: skipped as an unreadable file is
            bad = found.set_aside + bad
            result = dataclasses.replace(result, skipped=result.skipped + len(found.set_aside))
    if accelerator.is_main_process:
        for path, reason in bad:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        if result.skipped:
            print(f"{result.skipped} file(s) skipped (not decodable)", file=sys.stderr, flush=True)
    if result.count == 0:
        raise DataError(f"{where}: none of its {result.skipped} image file(s) could be decoded (each is listed above with the reason)")
    summary = to_json(result, classes, accelerator.num_processes, where, options)
    if found is not None:
        summary["split"] = found.how
    if options.run is not None:
        summary["run"] = str(Path(options.run).expanduser())
    if accelerator.is_main_process:
        for line in summary_lines(result, classes, options):
            print(line, flush=True)
        if options.out:
            _write_json(summary, Path(options.out))
        if options.out_dir and isinstance(result, EvalResult) and result.confusion is not None:
            write_confusion(result.confusion, classes, Path(options.out_dir))
        if records is not None:
            if task.multi_label:
                written = write_tag_interpretation(records, inputs.paths, classes, Path(options.interpret), options.interpret_k,
                                                   cfg.data.load_size, view, result.threshold)
            else:
                written = write_interpretation(records, inputs.paths, classes, Path(options.interpret), options.interpret_k,
                                               cfg.data.load_size, view)
            for line in written.lines(classes):
                print(line, flush=True)
    accelerator.end_training()
    return summary
