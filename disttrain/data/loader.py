"""Loaders: uint8 presized batches from an image folder (sharded across ranks by index) or from
shards (`disttrain.data.shards`), delivered on the device by `DeviceLoader`.

Sharding: every epoch a seeded permutation of the whole split is cut into `world_size x steps`
batches whose sizes differ by at most one; batch `step * world_size + rank` is rank `rank`'s batch
at `step`. Slices are disjoint, cover the split, and every rank takes exactly `steps` steps (a rank
that leaves the loop early would deadlock DDP). Nothing is padded or dropped, and the global batch
at each step is a contiguous run of the permutation, so 1 rank x batch 2B and 2 ranks x batch B see
(nearly) the same global batches.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from disttrain.cores import worker_cores
from disttrain.data.decode import load_presized
from disttrain.data.folder import DataError, Split
from disttrain.data.shards import PREFETCH_FACTOR, SlotRef
from disttrain.data.workers import worker_context, worker_init


class FolderDataset(Dataset):
    """Map-style dataset over a scanned split: index -> (uint8 (S, S, 3) presized image, label).

    With `cache`, each image is decoded once: its pixels go into a shared-memory array that this
    rank's loader workers (and the process itself) read from then on, so later epochs decode nothing
    (`data.cache`). The array is shared with the workers when they start; a worker that fills a
    slot marks it filled after writing it."""

    def __init__(self, split: Split, load_size: int, cache: bool = False):
        self.paths = split.paths
        self.labels = split.labels
        self.load_size = load_size
        self.pixels = self.filled = None
        if cache:
            self.pixels = torch.empty((len(self.paths), load_size, load_size, 3), dtype=torch.uint8).share_memory_()
            self.filled = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def cache_bytes(self) -> int:
        return 0 if self.pixels is None else self.pixels.numel()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.filled is not None and self.filled[index]:
            return self.pixels[index], self.labels[index]
        path = self.paths[index]
        try:
            image = torch.from_numpy(load_presized(path, self.load_size, None if self.pixels is None else self.pixels[index].numpy()))
        except Exception as err:
            raise DataError(f"{path}: could not be decoded during training ({err}); was it changed after the scan?") from err
        if self.filled is not None:
            self.filled[index] = True
        return image, self.labels[index]


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation of `count` items for `epoch` (the same on every rank)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator).numpy()


class RankBatchSampler(Sampler[list[int]]):
    """Yields this rank's batches of dataset indices for one epoch (call `set_epoch` each epoch).

    `drop_empty=False` (training) guarantees exactly `len(self)` non-empty batches on every rank;
    `drop_empty=True` (evaluation) yields only real samples, each exactly once across ranks.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_empty: bool = False,
    ):
        if num_samples <= 0:
            raise ValueError("RankBatchSampler needs at least one sample")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_empty = drop_empty
        self.epoch = 0
        self.skip = 0
        self.steps = math.ceil(num_samples / (world_size * batch_size))

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order; `skip` leaves out its first batches (resuming mid-epoch)."""
        self.epoch, self.skip = epoch, skip

    def order(self) -> np.ndarray:
        """This epoch's permutation of all indices (identical on every rank)."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        return epoch_order(self.num_samples, self.seed, self.epoch)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        chunks = np.array_split(order, self.world_size * self.steps)
        for step in range(self.skip, self.steps):
            index = step * self.world_size + self.rank
            batch = chunks[index]
            if len(batch) == 0:
                if self.drop_empty:
                    continue
                batch = order[index % self.num_samples : index % self.num_samples + 1]
            yield batch.tolist()

    def __len__(self) -> int:
        return self.steps


class ShareBatchSampler(Sampler[list[int]]):
    """This rank's training batches drawn from its own fixed share of the samples, for data each
    rank holds only its part of (precomputed activations): positions into that share, exactly
    `steps` non-empty batches per epoch (the same count on every rank, as RankBatchSampler's), a
    seeded new order every epoch. With one rank the batches are exactly RankBatchSampler's."""

    def __init__(self, share: int, steps: int, seed: int = 0):
        if share <= 0:
            raise ValueError("ShareBatchSampler needs at least one sample")
        self.share, self.steps, self.seed = share, steps, seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.share, self.seed, self.epoch)
        chunks = np.array_split(order, self.steps)
        for step in range(self.skip, self.steps):
            batch = chunks[step]
            if len(batch) == 0:  # a share smaller than the step count: repeat a sample
                batch = order[step % self.share : step % self.share + 1]
            yield batch.tolist()

    def __len__(self) -> int:
        return self.steps


def make_loader(dataset: Dataset, num_workers: int, pin_memory: bool, sampler: Sampler | None = None,
                timeout: float = 0.0, collate_fn=None) -> DataLoader:
    """A DataLoader over a map-style dataset with a batch sampler (`RankBatchSampler`, ...), or (no
    sampler) over an iterable dataset that yields whole batches itself. Its workers start from a
    fork server (disttrain/data/workers.py). `timeout`: seconds without a batch from the workers
    before it raises (0: wait forever; `watched` turns it into `LoaderStalled`)."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        batch_size=1 if sampler is not None else None,  # the sampler or the dataset makes the batches
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=PREFETCH_FACTOR if num_workers > 0 else None,
        worker_init_fn=functools.partial(worker_init, cores=worker_cores()),
        timeout=timeout if num_workers > 0 else 0.0,
        multiprocessing_context=worker_context() if num_workers > 0 else None,
    )


class LoaderStalled(RuntimeError):
    """A loader's workers delivered no batch for `data.worker_timeout` seconds; the message names the
    rank, the loader and the worker the next batch was waiting for."""


def watched(loader: DataLoader, name: str):
    """The DataLoader's batches; its timeout (data.worker_timeout) becomes a LoaderStalled naming the
    rank, the loader (`name`: train, valid, predict, ...) and the worker the next batch waits for."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError as err:
            if loader.timeout and str(err).startswith("DataLoader timed out"):
                raise _stalled(name, iterator, loader.timeout) from None
            raise
        yield batch


def _stalled(name: str, iterator, timeout: float) -> LoaderStalled:
    """What the DataLoader iterator knows of the batch it waited for: which worker owes it, and
    whether that worker process still runs (torch's private bookkeeping, read defensively)."""
    rank = os.environ.get("RANK", "0")
    worker = "?"
    try:
        info = iterator._task_info.get(iterator._rcvd_idx)
        if info:
            process = iterator._workers[info[0]]
            state = "alive: stuck" if process.is_alive() else "gone"
            worker = f"{info[0]} (pid {process.pid}, {state})"
    except (AttributeError, IndexError, KeyError, TypeError):
        pass
    return LoaderStalled(
        f"rank {rank}: the {name} loader's worker {worker} delivered no batch for {timeout:g} s (data.worker_timeout); "
        "stopping the job instead of leaving the other ranks waiting in a collective"
    )


class EpochSource(Protocol):
    epoch: int

    def set_epoch(self, epoch: int, skip: int = 0) -> None: ...


class DeviceLoader:
    """What the trainer iterates: `(images, labels)` on the device, one epoch per `iter()`.

    Batches arrive as pinned uint8 NHWC (CUDA) and are copied with `non_blocking=True` on a side stream:
    the next batch is already on its way while the current one trains. `finish` runs on the device
    copy (the GPU JPEG decoder when `data.decode=gpu`). Samples the readers skipped are counted in
    `skipped` (the caller takes and resets it with `take_skipped`).
    """

    def __init__(
        self,
        loader: DataLoader,
        source: EpochSource,
        batch_size: int,
        device: torch.device,
        finish: Callable[[object, torch.device], tuple[torch.Tensor, int]] | None = None,
        name: str = "data",
    ):
        self.loader = loader
        self.name = name  # which loader, in a LoaderStalled message (train, valid, ...)
        self.source = source
        self.batch_size = batch_size
        self.device = device
        self.finish = finish
        self.skipped = 0
        self._buffers: list[tuple[torch.Tensor, int]] = []  # CPU copies out of worker slots, reused

    @property
    def epoch(self) -> int:
        return self.source.epoch

    @property
    def cache_bytes(self) -> int:
        """Decoded pixels this loader keeps in memory (data.cache; 0 for shards and uncached folders)."""
        return getattr(self.loader.dataset, "cache_bytes", 0)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next `iter()` runs `epoch`, without its first `skip` batches (resuming mid-epoch)."""
        self.source.set_epoch(epoch, skip)

    def __len__(self) -> int:
        return len(self.loader)

    def take_skipped(self) -> int:
        skipped, self.skipped = self.skipped, 0
        return skipped

    def _counted(self, batches):
        """Batches with at least one sample; the readers' skip counts (shards) are added up."""
        for batch in batches:
            if len(batch) > 2:
                self.skipped += batch[2]["skipped"]
            if len(batch[1]):
                yield batch

    def _transfer(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, S, S, 3) on the wire -> (B, 3, S, S) on the device, a channels_last view (no copy)."""
        images, labels = batch[0], batch[1]
        if isinstance(images, SlotRef):  # pixels in a worker's shared slot: copy out, free the slot
            cuda = self.device.type == "cuda"
            images = self.source.pool.take(images, torch.Tensor.pin_memory if cuda else self._copy_out)
        labels = torch.as_tensor(labels).to(self.device, non_blocking=True)
        if self.finish is not None:
            images, failed = self.finish(images, self.device)
            self.skipped += failed
            return images, labels
        return images.to(self.device, non_blocking=True).permute(0, 3, 1, 2), labels

    def _copy_out(self, view: torch.Tensor) -> torch.Tensor:
        """A CPU copy of a slot's batch, into one of a few buffers this loader keeps when nothing
        else references it any more (a fresh 12 MB tensor per step costs twice the copy in page
        faults); otherwise into a new one."""
        for buffer, idle_refs in self._buffers:
            if buffer.shape == view.shape and _storage_refs(buffer) <= idle_refs:
                return buffer.copy_(view)
        buffer = view.clone()
        if len(self._buffers) < 4:
            self._buffers.append((buffer, _storage_refs(buffer)))
        return buffer

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._counted(watched(self.loader, self.name))
        if self.device.type != "cuda":
            for batch in batches:
                yield self._transfer(batch)
            return
        stream = torch.cuda.Stream(self.device)

        def start_next():
            batch = next(batches, None)
            if batch is None:
                return None
            with torch.cuda.stream(stream):
                return self._transfer(batch)

        upcoming = start_next()
        while upcoming is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(stream)
            for tensor in upcoming:
                tensor.record_stream(current)  # allocated on the side stream, used on this one
            ready, upcoming = upcoming, start_next()
            yield ready


def _storage_refs(tensor: torch.Tensor) -> int:
    """How many tensors (views included) share `tensor`'s memory."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)
