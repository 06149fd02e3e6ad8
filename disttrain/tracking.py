"""What the user sees: the fastai-style epoch table and a progress bar, on the main process only."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

COLUMNS = ("epoch", "train_loss", "valid_loss", "accuracy", "time")


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
        """A tqdm bar over `iterable`; disabled (a plain pass-through) off the main process or with
        log.progress=false."""
        return tqdm(
            iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr, disable=not self.show_progress
        )

    def epoch_row(self, epoch: int, train_loss: float, valid_loss: float, accuracy: float, seconds: float) -> None:
        if not self._header_done:
            self.line(format_row(COLUMNS))
            self._header_done = True
        self.line(format_row((str(epoch), f"{train_loss:.6f}", f"{valid_loss:.6f}", f"{accuracy:.6f}", format_time(seconds))))
