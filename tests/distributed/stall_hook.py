"""A FolderDataset whose loader worker, on one rank, never returns the validation images it is asked
for: a worker stuck at a fixed point of the run. It lives in a module of its own because the worker
process imports it itself (workers start from a fork server: disttrain/data/workers.py)."""

import os
import threading

from disttrain.data.loader import FolderDataset

stall_rank: int | None = None  # set by run_worker.py --stall RANK, in the training process


class StallingFolderDataset(FolderDataset):
    def __init__(self, split, load_size: int, cache: bool = False):
        super().__init__(split, load_size, cache)
        # decided in the training process (where RANK is this rank's) and pickled to the worker
        self.stall = split.name == "valid" and stall_rank is not None and int(os.environ.get("RANK", "0")) == stall_rank

    def __getitem__(self, index: int):
        if self.stall:
            threading.Event().wait()  # held until the job ends
        return super().__getitem__(index)
