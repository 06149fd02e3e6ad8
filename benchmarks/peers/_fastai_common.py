"""Shared bits of the fastai peer benchmarks (run with the peer venv's python, not disttrain's).

Nothing here changes what fastai does: a callback that copies each epoch row fastai logs (and
times the epoch), the thread setup, version strings and the JSON writer.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from fastai.callback.core import Callback


class EpochRows(Callback):
    """Copies every row of fastai's per-epoch table (the same values the Recorder logs and the
    progress callback prints) plus the epoch's own wall time, tagged with the current phase."""

    order = 70  # after Recorder (50), which fills `recorder.log` in its after_epoch

    def __init__(self):
        self.rows: list[dict] = []
        self.phase = "fit"

    def before_epoch(self):
        self._t = time.perf_counter()

    def after_epoch(self):
        names = list(self.recorder.metric_names)
        log = list(self.recorder.log)
        row = {"phase": self.phase}
        for name, value in zip(names, log):
            row[name] = value if isinstance(value, (int, str)) else float(value)
        row["epoch_wall_s"] = round(time.perf_counter() - self._t, 3)
        self.rows.append(row)


class Phases:
    """Wall-clock seconds per named phase (perf_counter)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)
            print(f"[time] {name}: {self.seconds[name]:.1f} s", flush=True)

    def total(self) -> float:
        self.seconds["total"] = round(time.perf_counter() - self.t0, 3)
        return self.seconds["total"]


def add_common_args(p) -> None:
    """The options both peer scripts share: threads, workers, seed, where lr_find writes, outputs."""
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: os.cpu_count())")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: fastai's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="Learner.path for lr_find's temporary weights (default: temp dir)")
    p.add_argument("--lr-plot", default=None, help="save fastai's lr_find plot here (PNG)")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--bars", action="store_true",
                   help="print fastprogress's live bars even when stdout is not a terminal (the table always prints)")


def setup_threads(threads: int | None) -> int:
    """torch intra-op threads: all cores unless told otherwise (one process)."""
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    print(f"torch threads: {torch.get_num_threads()} (os.cpu_count()={os.cpu_count()}), "
          f"interop threads: {torch.get_num_interop_threads()}", flush=True)
    return torch.get_num_threads()


def loader_workers(dls) -> int:
    """The worker processes fastai's train DataLoader really uses (`dl.num_workers` is always 1 in
    the main process: it is the shard count fastai's workers use)."""
    return dls.train.fake_l.num_workers


def quiet_bars(force: bool) -> None:
    """fastprogress means to draw its live bars only on a terminal or in a notebook, but its check
    (`getattr(stdout, 'isatty', False)`, the method itself) is always true, so a log file fills with
    carriage-return bars. Off unless stdout is a terminal or `force`; the per-epoch table, which
    fastprogress writes with plain print, is printed either way."""
    import builtins

    import fastprogress.fastprogress as fp
    fp.NO_BAR = not (force or sys.stdout.isatty())
    if fp.NO_BAR:
        # ConsoleProgressBar.__init__ still prints a test fill character ('█' + CR) unconditionally.
        def _print(*args, **kwargs):
            if kwargs.get("end") != "\r":
                builtins.print(*args, **kwargs)
        fp.print = _print


def versions() -> dict:
    import fastai
    import fastcore
    import torchvision
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "fastai": fastai.__version__,
        "fastcore": fastcore.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "argv": sys.argv,
    }


def suggestions_dict(sugg) -> dict:
    """fastai's SuggestedLRs namedtuple -> {name: lr}."""
    return {name: float(getattr(sugg, name)) for name in sugg._fields}


def print_table(rows: list[dict]) -> None:
    """The epoch rows again, in fastai's table format (fastprogress prints them live too)."""
    if not rows:
        return
    keys = [k for k in rows[0] if k not in ("phase", "epoch_wall_s")]
    print("  ".join(f"{k:<10}" for k in ["phase"] + keys))
    for row in rows:
        cells = [row["phase"]] + [f"{row[k]:.6f}" if isinstance(row[k], float) and k != "epoch" else str(row[k])
                                  for k in keys]
        print("  ".join(f"{c:<10}" for c in cells))


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


def find_lr(learn, args, rows_cb, phases) -> tuple[dict, float]:
    """fastai's lr_find with its four suggestion rules (the plot to `args.lr_plot`), or `args.lr`
    when given: (the suggestions, the rate to train at: `args.suggest`'s, or `args.lr`)."""
    from fastai.vision.all import SuggestionMethod

    if args.lr is not None:
        return {}, args.lr
    rows_cb.phase = "lr_find"
    with phases("lr_find"):
        funcs = (SuggestionMethod.Valley, SuggestionMethod.Minimum, SuggestionMethod.Steep, SuggestionMethod.Slide)
        sugg = learn.lr_find(show_plot=bool(args.lr_plot), suggest_funcs=funcs)
    if args.lr_plot:
        import matplotlib.pyplot as plt
        plt.savefig(args.lr_plot, dpi=100)
        print(f"lr_find plot: {args.lr_plot}")
    lrs = suggestions_dict(sugg)
    print("lr_find suggestions: " + ", ".join(f"{k} {v:.2e}" for k, v in lrs.items()), flush=True)
    return lrs, lrs[args.suggest]
