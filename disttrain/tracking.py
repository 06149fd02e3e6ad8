"""What the user sees and what is kept: the fastai-style epoch table and progress bar, a local
`metrics.jsonl`, and a Weights & Biases run. All of it on the main process only.

`Tracker.log(metrics, step)` is the one interface the trainer and the sweep use; scalars go to both
`metrics.jsonl` (one JSON object per call, flushed) and W&B (imported lazily; `log.wandb.mode`
disabled creates nothing). On other ranks every method is a no-op.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import netrc
import os
import sys
from pathlib import Path
from typing import Any, Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

COLUMNS = ("epoch", "train_loss", "valid_loss", "accuracy", "time")
RUN_ID_FILE = "wandb_run_id"
FILES_FILE = "wandb_files"  # one line: the folder holding this W&B run's files (under WANDB_DIR when set)


def format_time(seconds: float) -> str:
    """mm:ss (h:mm:ss past an hour), as fastai prints it."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def format_row(values: Iterable[str]) -> str:
    return "".join(f"{v:<{max(len(c), 8) + 2}}" for c, v in zip(COLUMNS, values)).rstrip()


class ConsoleReporter:
    """Prints the table (header once, a row per epoch) and wraps iterables in a tqdm bar.

    Every method is a no-op on processes other than the main one.
    """

    def __init__(self, is_main: bool, progress: bool = True, stream=None):
        self.is_main = is_main
        self.show_progress = progress and is_main
        self.stream = stream or sys.stdout
        self._header_done = False

    def line(self, text: str) -> None:
        if self.is_main:
            print(text, file=self.stream, flush=True)

    def progress(self, iterable: Iterable[T], total: int, desc: str) -> tqdm:
        """A tqdm bar over `iterable` (it shows the ETA); disabled (a plain pass-through) off the main
        process or with log.progress=false."""
        return tqdm(
            iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr, disable=not self.show_progress
        )

    def epoch_row(self, epoch: int, train_loss: float, valid_loss: float, accuracy: float, seconds: float) -> None:
        if not self._header_done:
            self.line(format_row(COLUMNS))
            self._header_done = True
        self.line(format_row((str(epoch), f"{train_loss:.6f}", f"{valid_loss:.6f}", f"{accuracy:.6f}", format_time(seconds))))


def setup_logging(rank: int, is_main: bool) -> None:
    """Warnings and errors only, each line carrying the rank (other ranks print nothing else)."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s", force=True)
    logging.captureWarnings(True)


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

    def __init__(self, cfg, is_main: bool, reporter: ConsoleReporter, resume_step: int | None = None):
        """`resume_step`: the global step of the checkpoint a resumed run starts from; metrics.jsonl
        keeps its rows up to that step (later ones are repeated by the resumed run) and the W&B run
        with the id in the run dir continues."""
        resume = resume_step is not None
        self.is_main = is_main
        self.run_dir = cfg.run.dir
        self.reporter = reporter
        self.wandb_run = None
        self._metrics = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / "metrics.jsonl"
        kept = _rows_up_to(metrics, resume_step) if resume and metrics.exists() else []
        self._metrics = open(metrics, "w")
        self._metrics.writelines(kept)
        self._metrics.flush()
        settings = resolve_wandb(cfg.log.wandb, cfg.run.name)
        if settings["mode"] == "disabled":
            return
        self._start_wandb(cfg, settings, resume)

    def _start_wandb(self, cfg, settings: dict, resume: bool) -> None:
        import wandb

        id_file = self.run_dir / RUN_ID_FILE
        run_id = os.environ.get("WANDB_RUN_ID") or (id_file.read_text().strip() if resume and id_file.exists() else None)
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
        id_file.write_text(self.wandb_run.id + "\n")
        files = Path(self.wandb_run.dir).parent  # <root>/wandb/<offline-|>run-<time>-<id>
        (self.run_dir / FILES_FILE).write_text(f"{files}\n")
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

    def log_confusion(self, matrix, classes: list[str], step: int) -> None:
        """`confusion_matrix.csv` and `.png` in the run dir, and W&B's confusion-matrix plot."""
        if not self.is_main:
            return
        counts = [[int(v) for v in row] for row in matrix.tolist()]
        write_confusion(counts, classes, self.run_dir)
        wandb = self.wandb
        if wandb is not None:
            truth = [t for t, row in enumerate(counts) for p, n in enumerate(row) for _ in range(n)]
            preds = [p for t, row in enumerate(counts) for p, n in enumerate(row) for _ in range(n)]
            plot = wandb.plot.confusion_matrix(y_true=truth, preds=preds, class_names=classes, title="validation")
            self.wandb_run.log({"valid/confusion_matrix": plot}, step=step)

    def log_interpretation(self, grids: dict[str, Path], top_losses: list[tuple], step: int) -> None:
        """train.interpret (disttrain/interpret.py), to W&B only: each grid PNG as `interpret/<name>`
        and the top losses as the Table `interpret/top_losses_table` (image: what the model saw,
        actual, predicted, loss, probability_actual)."""
        wandb = self.wandb
        if not self.is_main or wandb is None:
            return
        media = {f"interpret/{name}": wandb.Image(str(path)) for name, path in grids.items()}
        rows = [[wandb.Image(image), actual, predicted, loss, p] for image, actual, predicted, loss, p in top_losses]
        media["interpret/top_losses_table"] = wandb.Table(columns=["image", "actual", "predicted", "loss", "probability_actual"], data=rows)
        self.wandb_run.log(media, step=step)

    def finish(self, failed: bool = False) -> None:
        """Close metrics.jsonl and end the W&B run (marked failed when the run raised)."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None


def _rows_up_to(path: Path, step: int) -> list[str]:
    rows = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                rows.append(line)
        except (json.JSONDecodeError, KeyError):  # a line cut by a kill
            continue
    return rows


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    return value


def write_confusion(counts: list[list[int]], classes: list[str], folder: Path) -> None:
    """`confusion_matrix.csv` (row = true class, column = predicted) and `confusion_matrix.png` in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "confusion_matrix.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["true \\ predicted", *classes])
        writer.writerows([[cls, *row] for cls, row in zip(classes, counts)])
    plot_confusion(counts, classes, folder / "confusion_matrix.png")


def plot_confusion(counts: list[list[int]], classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
