"""`disttrain predict`: class probabilities for new images from a model.pt alone, on one process or
many, for a handful of files or millions.

The main process lists the inputs once (disttrain/use/inputs.py: a `PathTable`, about 30 bytes a
file, which each rank's decoding workers map from shared memory) and sends the list to every rank with
the path of a parts folder: `<out>.parts/` beside `--out`, or without `--out` a temporary
`.disttrain-predict-*` folder in the current directory (on several machines it must be on a
filesystem they share). Each rank predicts its run of the global batches and appends its rows to
`part-<rank>` as it goes (flushed after every batch), and the files that do not decode to
`skipped-<rank>.tsv`. When every rank is done (waited for without the training collectives'
timeout, disttrain/dist/jobgroup.py), the main process writes the header and the parts in rank order,
which is input order, to `--out` (under a temporary name, then renamed) or stdout, lists the skipped
files on stderr, and removes the parts folder. A killed job leaves the parts folder with every row
its ranks had written.

Batches are global (disttrain/use/inputs.py): every image is computed in the same batch whatever the
number of processes, so the output is byte-identical on 1, 2 or 3 processes.

Output (`--format`), each with a header line, probabilities with 6 decimals:
- `csv` (the default): `path,label,score,<one probability column per class>`. A multi-label model
  (model.pt's `task`, disttrain/task.py) writes `path,labels,<one probability per tag>` instead:
  its probabilities are each tag's sigmoid, and `labels` lists, space-separated and in class order,
  the tags whose probability is strictly above the threshold (model.pt's, the one training stored
  or found, or `--threshold`), as validation counts them (disttrain/multilabel.py). It has no
  `score`: no single probability stands for a set of tags (each one's is in its own column).
- `submission` (a Kaggle submission, the dog breeds': `id,<one probability column per class>`, in
  the model's class order): the id is the file's stem (`test/0a1b.jpg` -> `0a1b`); two inputs with
  one stem are an error before any work. Multi-label: the same, one sigmoid per tag.
- `tags` (planet's submission: `image_name,tags`): the stem and the predicted tags, space-separated
  (a single-label model: its one most probable class).
- `--topk K` (with `csv` only): tab-separated `path, rank, class, probability`, K rows per image,
  ranked by probability (multi-label too: the K most probable tags).

`--out` ending in `.gz` is written gzipped, any format, with a fixed header (no file name, time 0),
so the file's bytes, too, are the same on any number of processes and in every run.

`--weights model.onnx` (a file `disttrain export` wrote; by its suffix) runs it with onnxruntime on
the CPU, one session per rank, through the same listing, batches, decoding and part files
(disttrain/use/exported.py `OnnxModel`): the presized squares go into the file as they are, which
resamples them as the eval view does. No TTA (the file holds the plain pass).

`--weights A B C` (several model.pt files) predicts with them as an ensemble
(disttrain/use/inference.py `Ensemble`): every model computes its probabilities as it would alone
(its own presize, image size, normalization and TTA views; TTA when asked), and the rows hold
their mean, written as one model's would be (a multi-label ensemble's tags: the mean sigmoid above
the threshold, the mean of the models' unless `--threshold`). The models must have the same
classes in the same order and the same task. Models of different presizes read each batch once per
presize, from one loader each, in step.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from disttrain import durable
from disttrain.config import ConfigError
from disttrain.data.decode import IMAGE_EXTENSIONS
from disttrain.data.folder import DataError
from disttrain.data.loader import Workers, watched
from disttrain.data.paths import in_shared_memory
from disttrain.use.exported import OnnxModel, is_onnx_file
from disttrain.use.inference import Ensemble, SavedModel, load_ensemble, load_saved_model
from disttrain.models.forward import batch_outputs, eval_view
from disttrain.use.inputs import Inputs, batch_loader, list_inputs, rank_batches
from disttrain.dist.jobgroup import JobGroup
from disttrain.dist.runtime import build_runtime
from disttrain.models.checks import build_config
from disttrain.task import Task

FORMATS = ("csv", "submission", "tags")
"""`--format`: the per-path CSV, a Kaggle submission (id + probabilities), planet's `image_name,tags`."""
GZIP_LEVEL = 6
"""The `.gz` output's compression level (the gzip command's default)."""


@dataclass
class PredictOptions:
    weights: str | list[str]
    """A model.pt (or an exported .onnx file); several model.pt files: an ensemble (module docstring)."""
    inputs: list[str]
    out: str | None = None
    """CSV (or top-K TSV) file, gzipped when it ends in `.gz`; None: stdout."""
    topk: int | None = None
    """Top-K rows per image instead of the CSV."""
    tta_n: int = 0
    """TTA views (0: none)."""
    tta_beta: float = 0.25
    tta_max: bool = False
    batch_size: int = 32
    """Images per batch; each batch is predicted by one process."""
    workers: int = 1
    """Decoding processes per rank (0: decode in the rank itself)."""
    precision: str = "auto"
    extensions: frozenset[str] | None = IMAGE_EXTENSIONS
    """Suffixes taken from folders (None: every file)."""
    progress: bool = True
    format: str = "csv"
    """One of `FORMATS` (module docstring)."""
    threshold: float | None = None
    """A multi-label model's threshold in place of model.pt's (None: model.pt's)."""


@dataclass
class PredictSummary:
    images: int
    """Images predicted (rows of the CSV) on all ranks."""
    skipped: int
    """Files that did not decode."""
    left_out: int
    """Files of the folders searched that `--ext` did not take."""
    seconds: float
    world_size: int


def _rows_writer(stream, topk: int | None):
    return csv.writer(stream, delimiter="\t", lineterminator="\n") if topk else csv.writer(stream)


def header(classes: list[str], topk: int | None, fmt: str = "csv", multi_label: bool = False) -> str:
    """The output's header line (module docstring)."""
    if topk:
        names = ["path", "rank", "class", "probability"]
    elif fmt == "submission":
        names = ["id", *classes]
    elif fmt == "tags":
        names = ["image_name", "tags"]
    else:
        names = ["path", "labels", *classes] if multi_label else ["path", "label", "score", *classes]
    text = io.StringIO()
    _rows_writer(text, topk).writerow(names)
    return text.getvalue()


def file_id(path: str) -> str:
    """A submission's id of an input: its file name without the suffix."""
    return os.path.splitext(os.path.basename(path))[0]  # Path(path).stem, at a third of its cost per million inputs


def check_ids(paths: Sequence[str], fmt: str) -> None:
    """DataError naming both files when two inputs have one id (a submission has one row per id):
    the first input whose id an earlier one has, and that earlier one. Holds 8 bytes per input (a
    hash of its id), not the ids: the inputs whose hash repeats are then compared by their ids."""
    hashes = np.fromiter((_id_hash(path) for path in paths), dtype=np.uint64, count=len(paths))
    ordered = np.sort(hashes)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if not len(repeated):
        return
    seen: dict[str, str] = {}
    for i in np.flatnonzero(np.isin(hashes, repeated)).tolist():
        path = paths[i]
        first = seen.setdefault(file_id(path), path)
        if first != path:
            raise DataError(f"{first} and {path}: the same id {file_id(path)!r} (the file name without its suffix); "
                            f"--format {fmt} writes one row per id: rename one, or predict them separately")


def _id_hash(path: str) -> int:
    return int.from_bytes(hashlib.blake2b(file_id(path).encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


def write_rows(writer, paths: Sequence[str], probs: torch.Tensor, classes: list[str], topk: int | None, fmt: str = "csv",
               task: Task | None = None) -> None:
    """The rows of a batch in format `fmt` (module docstring): per image one row, or `topk` rows
    (`path, rank, class, probability`); probabilities with 6 decimals, ties to the lower class
    index. A multi-label `task`'s tags are those whose probability is strictly above its threshold,
    compared in float32 as validation compares them."""
    multi_label = task is not None and task.multi_label
    order = torch.sort(probs, dim=1, descending=True, stable=True).indices.tolist()
    above = (probs > task.threshold).tolist() if multi_label else None
    for i, (path, p, ranked) in enumerate(zip(paths, probs.tolist(), order)):
        if topk:
            writer.writerows([path, r + 1, classes[c], f"{p[c]:.6f}"] for r, c in enumerate(ranked[:topk]))
            continue
        values = [f"{v:.6f}" for v in p]
        tags = " ".join(c for c, on in zip(classes, above[i]) if on) if multi_label else classes[ranked[0]]
        if fmt == "submission":
            writer.writerow([file_id(path), *values])
        elif fmt == "tags":
            writer.writerow([file_id(path), tags])
        elif multi_label:
            writer.writerow([path, tags, *values])
        else:
            writer.writerow([path, tags, values[ranked[0]], *values])


def _make_parts(out: str | None) -> str:
    """The parts folder (made empty) on the main process: `<out>.parts`, or a temporary one here."""
    where = f"{out}.parts" if out else "a .disttrain-predict-* folder here"
    try:
        if out:
            folder = Path(f"{out}.parts")
            if folder.is_dir():  # left by a killed run
                shutil.rmtree(folder)
            folder.mkdir()
        else:
            folder = Path(tempfile.mkdtemp(prefix=".disttrain-predict-", dir="."))
    except OSError as err:
        raise DataError(f"{where}: cannot make the folder for the ranks' parts ({err.strerror or err}); "
                        "give --out in a folder you can write") from None
    return str(folder.resolve())


def _part(parts: Path, rank: int, topk: int | None) -> Path:
    return parts / f"part-{rank:05d}.{'tsv' if topk else 'csv'}"


def _skipped(parts: Path, rank: int) -> Path:
    return parts / f"skipped-{rank:05d}.tsv"


def _forward(accelerator, saved: SavedModel | OnnxModel | Ensemble, options: PredictOptions):
    """The probabilities written for a presized uint8 (B, S, S, 3) batch, on the CPU: an exported
    ONNX file's under onnxruntime, or the model.pt's forward (plain or TTA) on the device; the
    task's (softmax, or each tag's sigmoid). An ensemble's: the mean of its models' (each given the
    batch at its presize: a list of batches, one per `Ensemble.load_sizes`)."""
    if isinstance(saved, OnnxModel):
        return saved.probabilities
    if isinstance(saved, Ensemble):
        each = [_forward(accelerator, member, options) for member in saved.members]
        where = [saved.load_sizes.index(member.load_size) for member in saved.members]

        def mean(batches: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([forward(batches[i]) for forward, i in zip(each, where)]).mean(dim=0)

        return mean
    device = accelerator.device
    view = eval_view(saved.image_size, saved.mean, saved.std, interpolation=saved.interpolation)

    def probabilities(images: torch.Tensor) -> torch.Tensor:
        _, plain, tta = batch_outputs(saved.model, view, images.to(device, non_blocking=True), accelerator.autocast,
                                      options.tta_n, options.tta_beta, options.tta_max, saved.tta_views, saved.task)
        return (tta if tta is not None else plain).cpu()

    return probabilities


def predict_share(accelerator, saved: SavedModel | OnnxModel | Ensemble, inputs: Inputs, parts: Path, options: PredictOptions,
                  worker_timeout: float, workers: Workers, task: Task | None = None) -> tuple[int, int]:
    """This rank's batches -> its part files; returns (images predicted, files skipped). `task`:
    the model's, with the threshold the tags are written at (default: `saved.task`)."""
    from tqdm import tqdm

    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if workers.count:  # one shared copy for every loader's workers (an ensemble has a loader per presize)
        inputs.paths = in_shared_memory(inputs.paths)
    paths = inputs.paths
    batches = rank_batches(len(paths), options.batch_size, world, rank)
    sizes = saved.load_sizes if isinstance(saved, Ensemble) else [saved.load_size]
    loaders = [batch_loader(paths, batches, options.batch_size, size, workers, worker_timeout, pin_memory=device.type == "cuda")
               for size in sizes]
    probabilities = _forward(accelerator, saved, options)
    done = skipped = 0
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not (options.progress and accelerator.is_main_process), file=sys.stderr)
    with open(_part(parts, rank, options.topk), "w", newline="") as rows, open(_skipped(parts, rank), "w", newline="") as bad:
        row_writer, bad_writer = _rows_writer(rows, options.topk), csv.writer(bad, delimiter="\t", lineterminator="\n")
        with torch.no_grad():
            for index, images, failed in _in_step(loaders, isinstance(saved, Ensemble)):
                bad_writer.writerows([paths[i], reason] for i, reason in failed)
                skipped += len(failed)
                if images is not None:
                    write_rows(row_writer, [paths[i] for i in index], probabilities(images), saved.classes, options.topk,
                               options.format, task or saved.task)
                    done += len(index)
                rows.flush()
                bad.flush()
                bar.update(min((len(index) + len(failed)) * world, bar.total - bar.n))  # an estimate of all ranks
    bar.close()
    return done, skipped


def _in_step(loaders: list, several: bool):
    """The batches of one loader as they come; with `several` (an ensemble's, one per presize, over
    the same batches): each batch's images from every loader (a list), only those that every
    loader decoded, and the files any one could not decode."""
    if not several:
        yield from watched(loaders[0], "predict")
        return
    for parts in zip(*(watched(loader, "predict") for loader in loaders)):
        failed: dict[int, str] = {}
        for _, _, bad in parts:
            for i, reason in bad:
                failed.setdefault(i, reason)
        index = [i for i in parts[0][0] if i not in failed]
        images = [part[1] if part[0] == index else part[1][[part[0].index(i) for i in index]] for part in parts] if index else None
        yield index, images, sorted(failed.items())


def _open_out(tmp: Path, gzipped: bool):
    """The output file, written as text (the part files' encoding); through gzip when `gzipped`, with
    no file name and time 0 in its header, so equal text gives equal bytes."""
    if not gzipped:
        return open(tmp, "w", newline="")
    raw = open(tmp, "wb")
    try:
        return io.TextIOWrapper(_ClosingGzip(raw), newline="")
    except BaseException:
        raw.close()
        raise


class _ClosingGzip(gzip.GzipFile):
    """A deterministic GzipFile over an open file that closes that file too."""

    def __init__(self, raw):
        super().__init__(filename="", mode="wb", compresslevel=GZIP_LEVEL, fileobj=raw, mtime=0)
        self.raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.raw.close()


def _concatenate(parts: Path, world: int, head: str, out: str | None, topk: int | None) -> None:
    """The header and every rank's part, in rank order, to `out` (temporary name, then renamed;
    gzipped when it ends in `.gz`) or stdout."""
    names = [_part(parts, rank, topk) for rank in range(world)]
    missing = [name for name in names if not name.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: written by its rank but not visible to the main process; the parts folder "
                        f"{parts} must be on a filesystem every rank shares (give --out on one)")
    target = Path(out) if out else None
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}") if target else None
    stream = _open_out(tmp, target.name.endswith(".gz")) if tmp else sys.stdout
    try:
        stream.write(head)
        for name in names:
            with open(name, newline="") as part:
                shutil.copyfileobj(part, stream)
    finally:
        if tmp:
            stream.close()
        else:
            stream.flush()
    if tmp:
        durable.replace(tmp, target)  # on disk before it has its name


def _print_skipped(parts: Path, world: int) -> None:
    for rank in range(world):
        name = _skipped(parts, rank)
        if name.is_file():
            with open(name, newline="") as stream:
                for path, reason in csv.reader(stream, delimiter="\t"):
                    print(f"skipped {path}: {reason}", file=sys.stderr)


def run(options: PredictOptions) -> PredictSummary:
    """The whole job, on every rank (the arguments are checked by the CLI before this)."""
    if options.format not in FORMATS:
        raise ConfigError(f"--format {options.format}: must be one of {', '.join(FORMATS)}")
    files = [options.weights] if isinstance(options.weights, str) else list(options.weights)
    exported = [f for f in files if is_onnx_file(f)]
    if len(files) > 1 and exported:
        raise ConfigError(f"--weights {exported[0]}: an ensemble takes model.pt files only (not an exported ONNX file); "
                          "give the model.pt it was exported from")
    onnx = bool(exported)
    if onnx and options.tta_n:
        raise ConfigError(f"--tta: not with an exported ONNX file ({files[0]} computes the plain pass only); "
                          "predict with the model.pt for TTA")
    # an ONNX file computes in fp32, on the CPU: its threads are planned as a CPU rank's, beside --workers decoders
    cfg = build_config({"train": {"precision": "no" if onnx else options.precision}, "data": {"num_workers": options.workers}})
    runtime = build_runtime(cfg, compute="cpu" if onnx else None)
    accelerator = runtime.accelerator
    group = JobGroup(accelerator.num_processes)
    if len(files) > 1:
        saved = load_ensemble(files, accelerator.device)
    else:
        saved = OnnxModel(files[0], runtime.cores.threads) if onnx else load_saved_model(files[0], accelerator.device)
    task = saved.task
    if options.threshold is not None:
        if not task.multi_label:
            raise ConfigError(f"--threshold: only for a multi-label model; {' '.join(files)} is single-label (its label is the "
                              "most probable class)")
        task = task.with_threshold(options.threshold)

    def listing():
        found = list_inputs(options.inputs, options.extensions)
        if options.format != "csv":
            check_ids(found.paths, options.format)
        return found, _make_parts(options.out)

    inputs, parts = group.from_main(listing)
    parts = Path(parts)
    start = time.perf_counter()
    done, skipped = predict_share(accelerator, saved, inputs, parts, options, cfg.data.worker_timeout, Workers.of(runtime.cores), task)
    images, skipped = (int(v) for v in group.sum(torch.tensor([done, skipped], dtype=torch.float64)).tolist())  # every rank done
    seconds = time.perf_counter() - start
    world = accelerator.num_processes
    if accelerator.is_main_process:
        _print_skipped(parts, world)
        if images:
            _concatenate(parts, world, header(saved.classes, options.topk, options.format, task.multi_label), options.out, options.topk)
        shutil.rmtree(parts, ignore_errors=True)
    if not images:
        raise DataError(f"none of the {len(inputs.paths)} input file(s) could be read as an image (each is listed above with "
                        "the reason); nothing written")
    if accelerator.is_main_process:
        where = f" -> {options.out}" if options.out else ""
        left = f", {inputs.left_out} left out by their suffix (--ext)" if inputs.left_out else ""
        tta = f", TTA {options.tta_n} views" if options.tta_n else ", onnxruntime (CPU)" if onnx else ""
        if isinstance(saved, Ensemble):
            tta += f", an ensemble of {len(files)} models (the mean of their probabilities)"
        print(f"predicted {images} image(s){where}, {skipped} skipped (not decodable){left}{tta}; "
              f"{images / max(seconds, 1e-9):.1f} images/s on {world} process(es)", file=sys.stderr, flush=True)
    accelerator.end_training()
    return PredictSummary(images, skipped, inputs.left_out, seconds, world)
