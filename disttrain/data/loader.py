"""Loaders: uint8 presized batches from an image folder (sharded across ranks by index) or from
shards (`disttrain.data.shards`), delivered on the device by `DeviceLoader`.

Sharding: every epoch a seeded permutation of the whole split is cut into `world_size x steps`
batches whose sizes differ by at most one; batch `step * world_size + rank` is rank `rank`'s batch
at `step`. Slices are disjoint, cover the split, and every rank takes exactly `steps` steps (a rank
that leaves the loop early would deadlock DDP). Nothing is padded or dropped, and the global batch
at each step is a contiguous run of the permutation, so 1 rank x batch 2B and 2 ranks x batch B see
(nearly) the same global batches.

Repeated augmentation (`data.repeats` k > 1, DeiT's): the epoch's permutation with each index
repeated k times in a row is dealt to the ranks round-robin (position p to rank p % world), so the
k copies of an image go to k different ranks where world >= k (on fewer ranks, some to the same
one); each copy gets its own augmentation, drawn per sample on the device. The dealt list is cut
at world x ceil(N / world), so the epoch still holds about N samples (about N / k distinct images,
a new draw every epoch), every rank ceil(N / world) of them in the same `steps` batches.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from disttrain.data.decode import decode_jpeg_batch, load_presized
from disttrain.data.folder import DataError, Split
from disttrain.data.paths import in_shared_memory
from disttrain.data.shards import PREFETCH_FACTOR, SlotRef
from disttrain.data.workers import StartTimedOut, start_deadline, worker_context, worker_init
from disttrain.dist.cores import CoreSplit

log = logging.getLogger(__name__)


class FolderDataset(Dataset):
    """Map-style dataset over a scanned split: index -> (uint8 (S, S, 3) presized image, label).

    With `cache`, each image is decoded once: its pixels go into a shared-memory array that this
    rank's loader workers (and the process itself) read from then on, so later epochs decode nothing
    (`data.cache`). `cache` is True (every image of the split: training, whose rank shares change
    every epoch) or the indices this rank reads (its fixed validation share): only those get a slot.
    The array's pages are taken as images fill them, not when it is allocated. The array is shared
    with the workers when they start; a worker that fills a slot marks it filled after writing it."""

    def __init__(self, split: Split, load_size: int, cache: bool | Sequence[int] = False):
        self.paths = split.paths
        self.labels = split.targets()  # int labels, or a uint8 (N, classes) multi-hot matrix (multi-label)
        self.load_size = load_size
        self.pixels = self.filled = self.slots = None
        if cache is False:
            return
        if cache is not True:  # a share: index -> its slot, -1 where the index has none
            self.slots = np.full(len(self.paths), -1, dtype=np.int64)
            self.slots[np.asarray(cache, dtype=np.int64)] = np.arange(len(cache))
        count = len(self.paths) if self.slots is None else len(cache)
        storage = torch.UntypedStorage._new_shared(count * load_size * load_size * 3)  # zero pages until written
        self.pixels = torch.empty(0, dtype=torch.uint8).set_(storage).view(count, load_size, load_size, 3)
        self.filled = torch.zeros(count, dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.paths)

    def share_paths(self) -> None:
        """The listing in shared memory before the loader's workers start (`make_loader`)."""
        self.paths = in_shared_memory(self.paths)

    @property
    def cache_bytes(self) -> int:
        return 0 if self.pixels is None else self.pixels.numel()

    def _slot(self, index: int) -> int | None:
        """Where `index`'s pixels are cached; None: not cached."""
        if self.pixels is None:
            return None
        if self.slots is None:
            return index
        slot = int(self.slots[index])
        return slot if slot >= 0 else None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        """The sample, or None when its file does not decode now (data.verify let it through, or it
        changed after the scan): `FolderCollate` counts it and fills or drops its place."""
        slot = self._slot(index)
        if slot is not None and self.filled[slot]:
            return self.pixels[slot], self.labels[index]
        path = self.paths[index]
        try:
            image = torch.from_numpy(load_presized(path, self.load_size, None if slot is None else self.pixels[slot].numpy()))
        except Exception as err:  # PIL raises many types; every one means "cannot train on this"
            log.warning("%s: skipped, it does not decode (%s: %s)", path, type(err).__name__, err)
            return None
        if slot is not None:
            self.filled[slot] = True
        return image, self.labels[index]


class FolderCollate:
    """A folder batch from its samples, the unreadable ones (None) counted as the shard readers
    count theirs (`(images, labels, {"skipped": n})`, added up by DeviceLoader):

    - `substitute=True` (training: every rank keeps its batch size and its steps): each unreadable
      sample's place goes to a readable sample of the same batch (the first ones, in turn); a batch
      of which nothing decodes is a DataError naming the rank.
    - `substitute=False` (validation, precompute, TTA): dropped, so the figures count only what was
      decoded; a batch of which nothing decodes comes out empty (and is left out).
    """

    def __init__(self, substitute: bool):
        self.substitute = substitute

    def __call__(self, items: list) -> tuple[torch.Tensor, torch.Tensor, dict]:
        good = [item for item in items if item is not None]
        skipped = len(items) - len(good)
        if skipped and self.substitute:
            if not good:
                raise DataError(f"rank {os.environ.get('RANK', '0')}: none of the {skipped} files of a training batch decodes "
                                "(each is named in a warning above); remove or replace them, or set data.verify=full to find "
                                "them all before training")
            good += [good[i % len(good)] for i in range(skipped)]
        if not good:
            return torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), {"skipped": skipped}
        images, labels = default_collate(good)
        return images, labels, {"skipped": skipped}


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation of `count` items for `epoch` (the same on every rank)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator).numpy()


class RankBatchSampler(Sampler[list[int]]):
    """Yields this rank's batches of dataset indices for one epoch (call `set_epoch` each epoch).

    `drop_empty=False` (training) guarantees exactly `len(self)` non-empty batches on every rank;
    `drop_empty=True` (evaluation) yields only real samples, each exactly once across ranks.
    `repeats` > 1 (training): repeated augmentation (the module docstring), the same `len(self)`.
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
        repeats: int = 1,
    ):
        if num_samples <= 0:
            raise ValueError("RankBatchSampler needs at least one sample")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if repeats < 1 or (repeats > 1 and drop_empty):
            raise ValueError(f"repeats={repeats}: at least 1, and 1 for evaluation (drop_empty), which sees each sample once")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_empty = drop_empty
        self.repeats = repeats
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

    def repeated(self) -> np.ndarray:
        """This rank's samples of the epoch with repeated augmentation, in order: every index of
        `order()` `repeats` times in a row, dealt round-robin, cut at ceil(N / world) per rank
        (cycled where repeats x N falls short of world x that: fewer samples than ranks - 1)."""
        share = math.ceil(self.num_samples / self.world_size)
        dealt = np.resize(np.repeat(self.order(), self.repeats), share * self.world_size)
        return dealt[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        if self.repeats > 1:  # ceil(N / world) >= steps: no batch is empty
            chunks = np.array_split(self.repeated(), self.steps)
            for step in range(self.skip, self.steps):
                yield chunks[step].tolist()
            return
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


def loader_generator(seed: int, rank: int, name: str) -> torch.Generator:
    """A loader's own generator (make_loader's `generator`), seeded from the run's seed, the rank and
    the loader's name (train, valid, ...)."""
    return torch.Generator().manual_seed(zlib.crc32(f"loader:{seed}:{rank}:{name}".encode()))


@dataclass(frozen=True)
class Workers:
    """How a rank's loaders decode, as the run planned it (disttrain/dist/cores.py, resolved once):
    `count` worker processes (0: in the training process), moved to `cores` (empty: they stay where
    they start)."""

    count: int = 0
    cores: tuple[int, ...] = ()

    @classmethod
    def of(cls, split: CoreSplit | None) -> "Workers":
        """A split's loader workers (None, no split: decoding in the training process)."""
        return cls() if split is None else cls(split.workers, split.loader_cores())


def make_loader(dataset: Dataset, num_workers: int, pin_memory: bool, sampler: Sampler | None = None,
                timeout: float = 0.0, collate_fn=None, generator: torch.Generator | None = None,
                worker_cores: tuple[int, ...] = ()) -> DataLoader:
    """A DataLoader over a map-style dataset with a batch sampler (`RankBatchSampler`, ...), or (no
    sampler) over an iterable dataset that yields whole batches itself. Its workers start from a
    fork server (disttrain/data/workers.py) and move to `worker_cores` (empty: where they start).
    `timeout`: seconds without a batch from the workers before it raises (0: wait forever;
    `watched` turns it into `LoaderStalled`).

    Every `iter()` of a DataLoader draws its workers' base seed from `generator` (workers or not):
    from torch's global generator when it is None, which would shift the training process's random
    stream (dropout, stochastic depth) by one draw per iterator, so a resumed run, whose iterators
    start at other points of that stream, would train differently. A loader therefore always has a
    generator of its own (`loader_generator`; a fixed-seed one when none is given)."""
    if num_workers > 0 and hasattr(dataset, "share_paths"):  # workers get handles to the listing, not a copy each
        dataset.share_paths()
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        batch_size=1 if sampler is not None else None,  # the sampler or the dataset makes the batches
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=PREFETCH_FACTOR if num_workers > 0 else None,
        worker_init_fn=functools.partial(worker_init, cores=worker_cores),
        timeout=timeout if num_workers > 0 else 0.0,
        multiprocessing_context=worker_context() if num_workers > 0 else None,
        generator=generator if generator is not None else torch.Generator(),
    )


class LoaderStalled(RuntimeError):
    """A loader's workers delivered no batch for `data.worker_timeout` seconds; the message names the
    rank, the loader and the worker the next batch was waiting for."""


def watched(loader: DataLoader, name: str):
    """The DataLoader's batches, every wait on its workers bounded by its timeout (data.worker_timeout):
    starting them (`start_deadline`), `iter()` (with persistent workers it first takes what they
    still owe of the previous epoch, cut short by train.max_steps_per_epoch or the LR sweep) and each
    batch. A wait that runs out becomes a LoaderStalled naming the rank, the loader (`name`: train,
    valid, predict, ...) and the worker it waited for."""
    iterator = _waiting(loader, name, lambda: _iterate(loader))
    while (batch := _waiting(loader, name, lambda: next(iterator, _END), iterator)) is not _END:
        yield batch


_END = object()


def _iterate(loader: DataLoader):
    """`iter(loader)`; where it starts workers (the first of persistent ones, or every one of others),
    within the loader's timeout."""
    starting = loader.num_workers > 0 and getattr(loader, "_iterator", None) is None
    with start_deadline(loader.timeout if starting else 0):
        return iter(loader)


def _waiting(loader: DataLoader, name: str, wait: Callable, iterator=None):
    """`wait()` on `iterator` (None: on `iter()`; persistent workers' iterator is the loader's own);
    the loader's timeout running out there becomes LoaderStalled."""
    try:
        return wait()
    except StartTimedOut as err:
        raise _stalled(name, _unstarted(err), loader.timeout) from None
    except RuntimeError as err:
        if loader.timeout and str(err).startswith("DataLoader timed out"):
            raise _stalled(name, _awaited(iterator or getattr(loader, "_iterator", None)), loader.timeout) from None
        raise


def _stalled(name: str, worker: str, timeout: float) -> LoaderStalled:
    rank = os.environ.get("RANK", "0")
    return LoaderStalled(
        f"rank {rank}: the {name} loader's worker {worker} delivered no batch for {timeout:g} s (data.worker_timeout); "
        "stopping the job instead of leaving the other ranks waiting in a collective"
    )


def _awaited(iterator) -> str:
    """Which worker the iterator waited for, and whether its process still runs (torch's private
    bookkeeping, read defensively): the one owing the next batch or, while `iter()` waits for the
    workers to finish the previous epoch (which one is late is not recorded), each of them."""
    try:
        info = iterator._task_info.get(iterator._rcvd_idx)
        candidates = [info[0]] if info else range(len(iterator._workers))
        described = []
        for i in candidates:
            process = iterator._workers[i]
            described.append(f"{i} (pid {process.pid}, {'alive: stuck' if process.is_alive() else 'gone'})")
        return " or ".join(described) or "?"
    except (AttributeError, IndexError, KeyError, TypeError):
        return "?"


def _unstarted(err: StartTimedOut) -> str:
    """The worker `iter()` was starting when its deadline ran out: as many as the DataLoader
    iterator (a `self` in the traceback) had started already."""
    tb, started = err.__traceback__, "?"
    while tb is not None:
        workers = getattr(tb.tb_frame.f_locals.get("self"), "_workers", None)
        if isinstance(workers, list):
            started = str(len(workers))
            break
        tb = tb.tb_next
    return f"{started} (not started)"


class DecodeOnDevice:
    """DeviceLoader's `finish` for `data.decode=gpu`: a batch's JPEG payloads and labels (on the
    device) -> (presized uint8 images on the device, their labels, how many payloads did not decode).
    Every image keeps its own label:

    - `substitute=False` (validation): an undecodable sample is dropped with its label, so the
      figures count only what was decoded, and the skip is counted ("N unreadable sample(s) skipped");
      a batch of which nothing decoded comes out empty.
    - `substitute=True` (training: every rank must take its steps, none with an empty batch): its
      place goes to a decoded (image, label) pair of the same batch, the batch keeps its size, and
      the epoch line counts it ("skipped and replaced by others", as the CPU readers replace one);
      when nothing of the batch decoded, every place goes to the last pair this loader decoded. A
      batch with nothing decodable before this loader decoded anything (nothing to take its place:
      the run's, or a resumed run's, first batch) is a DataError.
    """

    def __init__(self, load_size: int, substitute: bool):
        self.load_size = load_size
        self.substitute = substitute
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None  # training: the last decoded (image, label)

    def __call__(self, payloads: list, labels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        images, decoded = decode_jpeg_batch(payloads, self.load_size, device)
        failed = len(labels) - len(decoded)
        if failed:
            labels = labels[torch.tensor(decoded, dtype=torch.long, device=labels.device)]
        if not self.substitute:
            return images, labels, failed
        if not decoded:
            if self._spare is None:
                raise DataError(
                    f"rank {os.environ.get('RANK', '0')}: none of the {failed} JPEG payloads of a training batch could be decoded "
                    "(data.decode=gpu), and this process has decoded no sample yet to take their place; check the shards "
                    "(`disttrain prepare --force` rewrites them), or set data.decode=cpu (its readers skip such samples)"
                )
            image, label = self._spare
            return image.expand(failed, -1, -1, -1).contiguous(), label.expand(failed).contiguous(), failed
        self._spare = images[-1:].clone(), labels[-1:].clone()
        if failed:
            row = {position: r for r, position in enumerate(decoded)}  # a failed position takes row position % decoded
            take = torch.tensor([row.get(p, p % len(decoded)) for p in range(len(decoded) + failed)], device=images.device)
            images, labels = images[take], labels[take]
        return images, labels, failed


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
        finish: Callable[[object, torch.Tensor, torch.device], tuple[torch.Tensor, torch.Tensor, int]] | None = None,
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
        if self.finish is not None:  # (images, labels) -> decoded images, each with its own label (DecodeOnDevice)
            images, labels, failed = self.finish(images, labels, self.device)
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
