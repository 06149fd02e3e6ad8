"""Test-only data that holds a loader worker still at a fixed point of the run. It lives in a module
of its own because the worker process imports it itself (workers start from a fork server:
disttrain/data/workers.py).

- `StallingFolderDataset`: on rank `stall_rank`, the loader worker of split `stall_split` never
  returns its batch number `stall_batch` (counted by the worker from its start: with one worker and
  one process, the batch of that step of the first epoch).
- `OneSlotPool`: a shards SlotPool of one slot per worker, so that a worker waits for a free slot
  after each batch: the state of a worker ahead of a slow device, all its slots full.
"""

import os
import threading

from disttrain.data.loader import FolderDataset
from disttrain.data.shards import SlotPool

stall_rank: int | None = None  # set in the training process (run_worker.py --stall RANK, fault_worker.py stall-train)
stall_split = "valid"
stall_batch = 0


class StallingFolderDataset(FolderDataset):
    def __init__(self, split, load_size: int, cache=False):
        super().__init__(split, load_size, cache)
        # decided in the training process (where RANK is this rank's) and pickled to the worker
        stalls = split.name == stall_split and stall_rank is not None and int(os.environ.get("RANK", "0")) == stall_rank
        self.stall_at = stall_batch if stalls else None
        self.batches = 0  # counted in the worker, on its own copy

    def __getitems__(self, indices: list[int]) -> list:
        if self.batches == self.stall_at:
            threading.Event().wait()  # held until the job ends
        self.batches += 1
        return [self[index] for index in indices]


class OneSlotPool(SlotPool):
    def __init__(self, workers: int, slots: int, shape: tuple[int, ...]):
        super().__init__(workers, 1, shape)
