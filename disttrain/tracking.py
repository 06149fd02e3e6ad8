"""What the user sees and what is kept: the fastai-style epoch table and progress bar, a local
`metrics.jsonl`, and a Weights & Biases run. All of it on the main process only.

`Tracker.log(metrics, step)` is the one interface the trainer and the sweep use; scalars go to both
`metrics.jsonl` (one JSON object per call, flushed) and W&B (imported lazily; `log.wandb.mode`
disabled creates nothing). On other ranks every method is a no-op.

A run's records (metrics.jsonl, wandb_run_id, wandb_files) are never destroyed: a run that does not
continue them moves them to `<folder>/superseded-<UTC>/` first; a resumed run keeps the rows up to
its checkpoint through an atomic rewrite; `disttrain find-lr` keeps its own in `<run dir>/find-lr/`.

The confusion matrix (`write_confusion`) is written whole up to `MATRIX_CLASSES` classes; beyond,
every nonzero cell goes to a CSV and the plot shows what a person can read: the most confused pairs
and the lowest per-class accuracies, in a figure of bounded size.
"""

from __future__ import annotations

import csv
import json
import math
import netrc
import os
import sys
from pathlib import Path
from typing import Any, Iterable, TypeVar

from tqdm.auto import tqdm

from disttrain import durable
from disttrain.metrics import Confusion, most_confused, per_class

T = TypeVar("T")

COLUMNS = ("epoch", "train_loss", "valid_loss", "accuracy", "time")
METRICS_FILE = "metrics.jsonl"
RUN_ID_FILE = "wandb_run_id"
FILES_FILE = "wandb_files"  # one line: the folder holding this W&B run's files (under WANDB_DIR when set)
RECORDS = (METRICS_FILE, RUN_ID_FILE, FILES_FILE)
FIND_LR_DIR = "find-lr"
"""`disttrain find-lr`'s records, under the run dir: a sweep alone never takes the run's place."""
MATRIX_CLASSES = 50
"""Up to this many classes the confusion matrix is written whole: `confusion_matrix.csv`, a plot of
every cell, W&B's confusion-matrix chart. Beyond it: `confusion_cells.csv` (every nonzero cell) and
`confusion_summary.png` (the most confused pairs and the lowest per-class accuracies)."""
SHOWN = 30
"""Rows of each panel of confusion_summary.png."""
MOST_CONFUSED = 100
"""Pairs in W&B's `valid/most_confused` Table and in `disttrain evaluate`'s JSON."""


def format_time(seconds: float) -> str:
    """mm:ss (h:mm:ss past an hour), as fastai prints it."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def format_row(values: Iterable[str], columns: Iterable[str] = COLUMNS) -> str:
    return "".join(f"{v:<{max(len(c), 8) + 2}}" for c, v in zip(columns, values)).rstrip()


class ConsoleReporter:
    """Prints the table (header once, a row per epoch) and wraps iterables in a tqdm bar.

    Every method is a no-op on processes other than the main one.
    """

    def __init__(self, is_main: bool, progress: bool = True, stream=None):
        self.is_main = is_main
        self.show_progress = progress and is_main
        self.stream = stream or sys.stdout
        self._header_done: tuple | None = None  # the columns of the header printed

    def line(self, text: str) -> None:
        if self.is_main:
            print(text, file=self.stream, flush=True)

    def progress(self, iterable: Iterable[T], total: int, desc: str) -> tqdm:
        """A tqdm bar over `iterable` (it shows the ETA); disabled (a plain pass-through) off the main
        process or with log.progress=false."""
        return tqdm(
            iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr, disable=not self.show_progress
        )

    def epoch_row(self, epoch: int, train_loss: float, valid_loss: float, metrics: dict[str, float], seconds: float) -> None:
        """A row of the table: the losses, the task's metric columns (`{"accuracy": ...}`, or the
        multi-label ones), the time; the header before the first row (and again if the columns change).
        A NaN (no validation images: data.valid_pct=0) is left blank."""
        columns = ("epoch", "train_loss", "valid_loss", *metrics, "time")
        if self._header_done != columns:
            self.line(format_row(columns, columns))
            self._header_done = columns
        cells = (train_loss, valid_loss, *metrics.values())
        self.line(format_row((str(epoch), *("" if math.isnan(v) else f"{v:.6f}" for v in cells), format_time(seconds)), columns))


def has_wandb_credentials() -> bool:
    """WANDB_API_KEY, or an api.wandb.ai entry in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb(cfg, run_name: str) -> dict[str, Any]:
    """The W&B settings of a run: the standard WANDB_* environment variables win over the config."""
    env = os.environ
    mode = env.get("WANDB_MODE") or cfg.mode or ("online" if has_wandb_credentials() else "offline")
    if mode == "dryrun":
        mode = "offline"
    tags = [t for t in env["WANDB_TAGS"].split(",") if t] if env.get("WANDB_TAGS") else list(cfg.tags)
    return {
        "mode": mode,
        "project": env.get("WANDB_PROJECT") or cfg.project,
        "entity": env.get("WANDB_ENTITY") or cfg.entity,
        "name": env.get("WANDB_NAME") or cfg.name or run_name,
        "tags": tags,
        "group": env.get("WANDB_RUN_GROUP") or cfg.group,
    }


class Tracker:
    """metrics.jsonl + a W&B run, for the main process (a no-op elsewhere)."""

    def __init__(self, cfg, is_main: bool, reporter: ConsoleReporter, resume_step: int | None = None,
                 find_lr_only: bool = False):
        """`resume_step`: the global step of the checkpoint a resumed run starts from; metrics.jsonl
        keeps its rows up to that step (later ones are repeated by the resumed run; rewritten
        atomically) and the W&B run with the id in the run dir continues. Otherwise the folder's
        earlier records are moved aside (`set_aside_records`), with a line saying where.
        `find_lr_only`: the records go to <run dir>/find-lr/ (its own W&B run), leaving the run's."""
        resume = resume_step is not None
        self.is_main = is_main
        self.run_dir = cfg.run.dir
        self.folder = self.run_dir / FIND_LR_DIR if find_lr_only else self.run_dir
        """Where metrics.jsonl, wandb_run_id and wandb_files go."""
        self.reporter = reporter
        self.wandb_run = None
        self._metrics = None
        if not is_main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        metrics = self.folder / METRICS_FILE
        if resume:
            _keep_rows_up_to(metrics, resume_step)
        else:
            old_id = _read(self.folder / RUN_ID_FILE)
            aside = set_aside_records(self.folder)
            if aside is not None:
                run = f" (W&B run {old_id})" if old_id else ""
                reporter.line(f"moved the earlier records of {self.folder}{run} to {aside}: this run does not continue them")
        self._metrics = open(metrics, "a")
        settings = resolve_wandb(cfg.log.wandb, cfg.run.name)
        if settings["mode"] == "disabled":
            return
        self._start_wandb(cfg, settings, resume)

    def _start_wandb(self, cfg, settings: dict, resume: bool) -> None:
        import wandb

        id_file = self.folder / RUN_ID_FILE
        run_id = os.environ.get("WANDB_RUN_ID") or (_read(id_file) if resume else None)
        mode = settings.pop("mode")
        root = Path(os.environ.get("WANDB_DIR") or self.run_dir).expanduser()  # W&B's convention: WANDB_DIR wins
        root.mkdir(parents=True, exist_ok=True)
        if mode == "offline" and cfg.log.wandb.mode is None and not os.environ.get("WANDB_MODE"):
            self.reporter.line(
                "W&B: no credentials found, logging offline; to upload later: "
                f"wandb login && wandb sync {root / 'wandb'}/offline-run-*"
            )
        self.wandb_run = wandb.init(
            dir=str(root),
            mode=mode,
            id=run_id,
            resume="allow" if run_id else None,
            config=cfg.to_dict(),
            settings=wandb.Settings(save_code=False, disable_git=True, silent=True),
            **settings,
        )
        durable.write_text(id_file, self.wandb_run.id + "\n")
        files = Path(self.wandb_run.dir).parent  # <root>/wandb/<offline-|>run-<time>-<id>
        durable.write_text(self.folder / FILES_FILE, f"{files}\n")
        if os.environ.get("WANDB_DIR"):
            self.reporter.line(f"W&B: run {self.wandb_run.id}, files in {files} (WANDB_DIR)")
        self.wandb_run.define_metric("valid/accuracy", summary="max")
        self.wandb_run.define_metric("valid/loss", summary="min")

    def log(self, metrics: dict[str, Any], step: int, media: dict[str, Any] | None = None) -> None:
        """Scalars to metrics.jsonl and W&B at `step`; `media` (W&B objects) to W&B only."""
        if not self.is_main:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({**metrics, **(media or {})}, step=step)

    @property
    def run_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    @property
    def wandb(self):
        """The wandb module when a run is active (for building plots), else None."""
        if self.wandb_run is None:
            return None
        import wandb

        return wandb

    def log_sweep(self, result, png: Path, step: int = 0, extra: dict | None = None) -> None:
        """The LR sweep: the curve as a Table and line plot, the suggestion and every rule's value
        (`extra`: more scalars of the same row, e.g. the stage)."""
        if not self.is_main:
            return
        scalars = {"lr_sweep/suggestion": result.suggestion, **(extra or {})}
        scalars.update({f"lr_sweep/{rule}": value for rule, value in result.suggestions.items()})
        media = {}
        wandb = self.wandb
        if wandb is not None:
            rows = [[lr, loss, smooth, math.log10(lr)] for lr, loss, smooth in zip(result.lrs, result.losses, result.smoothed)]
            table = wandb.Table(columns=["lr", "loss", "smoothed", "log10_lr"], data=rows)
            media["lr_sweep/curve"] = wandb.plot.line(table, "log10_lr", "smoothed", title="LR sweep: smoothed loss vs log10(lr)")
            media["lr_sweep/table"] = table
            if png.exists():
                media["lr_sweep/plot"] = wandb.Image(str(png))
        self.log(scalars, step, media)

    def log_samples(self, images, mean: list[float], std: list[float], step: int = 0) -> None:
        """A grid of augmented training images as the model sees them (un-normalized)."""
        if not self.is_main or self.wandb is None:
            return
        import torch
        from torchvision.utils import make_grid

        x = images.detach().float().cpu()
        x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
        grid = make_grid(x.clamp(0, 1), nrow=min(8, len(x)))
        self.wandb_run.log({"train/samples": self.wandb.Image(grid, caption="augmented training batch")}, step=step)

    def log_confusion(self, confusion: Confusion, classes: list[str], step: int) -> None:
        """The confusion files in the run dir (`write_confusion`) and to W&B: up to MATRIX_CLASSES
        classes, W&B's confusion-matrix chart; beyond, the Table `valid/most_confused` (the
        MOST_CONFUSED highest off-diagonal counts) and the summary plot as `valid/confusion_summary`."""
        if not self.is_main:
            return
        written = write_confusion(confusion, classes, self.run_dir)
        wandb = self.wandb
        if wandb is None:
            return
        if confusion.classes <= MATRIX_CLASSES:  # W&B's chart, from the counts (a C x C Table)
            rows = [[classes[t], classes[p], n] for t, row in enumerate(confusion.dense().tolist()) for p, n in enumerate(row)]
            table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=rows)
            plot = wandb.plot_table("wandb/confusion_matrix/v1", table,
                                    {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
                                    {"title": "validation"})
            self.wandb_run.log({"valid/confusion_matrix": plot}, step=step)
        else:
            table = wandb.Table(columns=["actual", "predicted", "count"], data=[list(r) for r in most_confused(confusion, classes, MOST_CONFUSED)])
            self.wandb_run.log({"valid/most_confused": table, "valid/confusion_summary": wandb.Image(str(self.run_dir / written[-1]))},
                               step=step)

    def log_interpretation(self, grids: dict[str, Path], top_losses: list[tuple], step: int,
                           columns: tuple[str, ...] = ("actual", "predicted", "loss", "probability_actual")) -> None:
        """train.interpret (disttrain/use/interpret.py), to W&B only: each grid PNG as `interpret/<name>`
        and the top losses as the Table `interpret/top_losses_table` (image: what the model saw, then
        `columns`: actual, predicted, loss, probability_actual; multi-label: the tags, and no probability)."""
        wandb = self.wandb
        if not self.is_main or wandb is None:
            return
        media = {f"interpret/{name}": wandb.Image(str(path)) for name, path in grids.items()}
        rows = [[wandb.Image(image), *values] for image, *values in top_losses]
        media["interpret/top_losses_table"] = wandb.Table(columns=["image", *columns], data=rows)
        self.wandb_run.log(media, step=step)

    def finish(self, failed: bool = False) -> None:
        """Close metrics.jsonl and end the W&B run (marked failed when the run raised)."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None


def set_aside_records(folder: Path) -> Path | None:
    """Move a previous run's records in `folder` (metrics.jsonl, wandb_run_id, wandb_files) into a
    new `folder/superseded-<UTC>/`; nothing is deleted. Returns that folder, if there was anything."""
    found = [folder / name for name in RECORDS if (folder / name).is_file()]
    if not found:
        return None
    aside = durable.superseded_folder(folder)
    for path in found:
        os.replace(path, aside / path.name)
    return aside


def _keep_rows_up_to(path: Path, step: int) -> None:
    """metrics.jsonl with its rows up to `step` only, replaced atomically (a kill leaves the old file
    or the new one, never a cut one)."""
    kept = _rows_up_to(path, step) if path.exists() else []
    durable.write_text(path, "".join(kept))


def _read(path: Path) -> str | None:
    """A one-line file's text, None when missing or empty."""
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _rows_up_to(path: Path, step: int) -> list[str]:
    rows = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                rows.append(line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError):  # a line cut by a kill
            continue
    return rows


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    return value


def write_confusion(confusion: Confusion, classes: list[str], folder: Path) -> list[str]:
    """The confusion files in `folder` (row = true class, column = predicted), their names returned:
    up to MATRIX_CLASSES classes `confusion_matrix.csv` (the whole matrix) and `confusion_matrix.png`;
    beyond, `confusion_cells.csv` (actual, predicted, count of every nonzero cell: the same matrix,
    at most one row per image) and `confusion_summary.png`."""
    folder.mkdir(parents=True, exist_ok=True)
    if confusion.classes <= MATRIX_CLASSES:
        with open(folder / "confusion_matrix.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["true \\ predicted", *classes])
            writer.writerows([[cls, *row] for cls, row in zip(classes, confusion.dense().tolist())])
        plot_confusion(confusion.dense().tolist(), classes, folder / "confusion_matrix.png")
        return ["confusion_matrix.csv", "confusion_matrix.png"]
    n = confusion.classes
    with open(folder / "confusion_cells.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["actual", "predicted", "count"])
        writer.writerows([classes[cell // n], classes[cell % n], count]
                         for cell, count in zip(confusion.cells.tolist(), confusion.counts.tolist()))
    plot_summary(confusion, classes, folder / "confusion_summary.png")
    return ["confusion_cells.csv", "confusion_summary.png"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(counts: list[list[int]], classes: list[str], path: Path) -> None:
    """Every cell of a matrix of at most MATRIX_CLASSES classes (the counts written in with 20 or fewer)."""
    plt = _pyplot()
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), max(4, 0.5 * n + 2)))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        top = max(max(row) for row in counts) or 1
        for t in range(n):
            for p in range(n):
                ax.text(p, t, counts[t][p], ha="center", va="center", color="white" if counts[t][p] > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _short(name: str, width: int = 32) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def plot_summary(confusion: Confusion, classes: list[str], path: Path) -> None:
    """What a person can read of many classes, in a figure of bounded size (1600 x 1040 pixels): the
    SHOWN most confused pairs (actual -> predicted, count) and the SHOWN classes with the lowest
    accuracy (correct / images; at equal accuracy the one with more images first)."""
    plt = _pyplot()
    pairs = most_confused(confusion, classes, SHOWN)
    table = [(name, row) for name, row in per_class(confusion, classes).items() if row["count"]]
    lowest = sorted(table, key=lambda item: (item[1]["accuracy"], -item[1]["count"], item[0]))[:SHOWN]  # ties: more images first
    fig, (left, right) = plt.subplots(1, 2, figsize=(16, 0.28 * SHOWN + 2))
    left.barh(range(len(pairs)), [n for _, _, n in pairs], color="tab:red")
    left.set_yticks(range(len(pairs)), [f"{_short(a)} -> {_short(p)}" for a, p, _ in pairs], fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("images")
    left.set_title(f"most confused pairs (actual -> predicted), {len(pairs)} shown")
    right.barh(range(len(lowest)), [row["accuracy"] for _, row in lowest], color="tab:blue")
    right.set_yticks(range(len(lowest)), [f"{_short(name)} ({row['correct']}/{row['count']})" for name, row in lowest], fontsize=8)
    right.invert_yaxis()
    right.set_xlim(0, 1)
    right.set_xlabel("accuracy")
    right.set_title(f"lowest per-class accuracy, {len(lowest)} of {len(classes)} classes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
