"""Read the shards written by `disttrain prepare`: split by rank, then by dataloader worker, with
exactly the same number of batches on every rank.

Splitting: each epoch the shards are put in a seeded order (the same on every rank) and seen as one
sequence of N samples. Rank r takes the r-th of `world` contiguous ranges (sizes differ by at most
one); its range is cut again between its dataloader workers. A range boundary may fall inside a
shard: both neighbours then stream that shard and each keeps its own part (reading the other part's
bytes, decoding none of them). So the split is exact whatever the number of shards, even with fewer
shards than ranks x workers, and nobody waits for a shard.

Training: every rank runs `steps = ceil(N / (world x batch_size))` full batches per epoch, split
between its workers; a worker's range is sized to its share of those batches, so it never holds more
samples than it must deliver, and tops up the few it lacks (and any it could not read) by drawing
again from its own range. Every sample is seen at least once per epoch. Within a worker, a seeded
shuffle buffer mixes the stream (the shards were already shuffled once when written).

Repeated augmentation (`data.repeats` k > 1, training): each worker keeps a seeded draw of
ceil(quota / k) of its range's samples (at most all of them) and puts each into its stream k times
in a row, before the shuffle buffer, which spreads the copies; each copy is decoded on its own and
gets its own augmentation on the device. The batch counts, and the bytes read, are those of k = 1;
the decoding too (the quota's samples). Unlike the folder sampler's, the copies stay on their rank:
a shard range is read by one rank only.

Validation: every readable sample exactly once across all ranks, in batches of at most batch_size;
evaluation reduces sums at the end, so ranks may run different numbers of batches.

Labels: a sample's `.cls` member holds its class index (ASCII). A multi-label manifest
(`"multi_label": true`) stores each sample's labels in a `.tags` member instead: its class indices,
space-separated, ascending (empty for an image without any), so a webdataset reader that decodes
`.cls` as one integer never misreads them; such a dataset yields a uint8 multi-hot row per sample
(batches (B, C) uint8) where a single-label one yields int64 labels.

Corrupt data (a truncated shard, a payload that is not an image, a sample without its `.cls` or
`.tags`) is skipped, counted and reported with each batch; training batch counts do not change.

webdataset reads the tar members and groups them into samples (`tar_file_expander`,
`group_by_keys`); the split, the counting and the batches are ours, because webdataset's would not
give every rank the same batch count nor count what is skipped (docs/design.md, "Shards").
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import random
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from disttrain.data.decode import load_presized
from disttrain.data.folder import DataError
from disttrain.data.workers import worker_context

MANIFEST = "manifest.json"
PREFETCH_FACTOR = 4  # batches each loader worker may have ready ahead of the trainer
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
log = logging.getLogger("disttrain.data")


@dataclass
class ShardSplit:
    paths: list[Path]
    counts: list[int]

    @property
    def samples(self) -> int:
        return sum(self.counts)


@dataclass
class Manifest:
    root: Path
    classes: list[str]
    presize: int
    splits: dict[str, ShardSplit]
    bad_files: list[dict] = field(default_factory=list)
    multi_label: bool = False
    """Several labels per image (the manifest's `multi_label`): `.tags` members, multi-hot targets."""
    split: dict | None = None
    """The validation split `disttrain prepare` drew (disttrain/data/split.py's SplitRecord as a dict:
    how, train, valid, digest), or None where the source had a validation folder."""


def load_manifest(root: str | Path) -> Manifest:
    """Parse `<root>/manifest.json` and check that every shard it lists is there."""
    root = Path(root).expanduser()
    path = root / MANIFEST
    if not path.is_file():
        hint = (
            "it looks like an image folder: set data.format=folder, or make shards with `disttrain prepare "
            f"{root} {root}-shards`" if (root / "train").is_dir() else "make shards with `disttrain prepare SRC_FOLDER DIR`"
        )
        raise DataError(f"data.root: {path} does not exist; {hint}")
    try:
        raw = json.loads(path.read_text())
        splits = {}
        for name in ("train", "valid"):
            info = raw["splits"][name]
            splits[name] = ShardSplit([root / s["name"] for s in info["shards"]], [int(s["samples"]) for s in info["shards"]])
        multi_label = raw.get("multi_label", False)
        if not isinstance(multi_label, bool):
            raise ValueError(f"multi_label is {multi_label!r}, not true or false")
        manifest = Manifest(root, list(raw["classes"]), int(raw["presize"]), splits,
                            [b for s in raw["splits"].values() for b in s.get("bad_files", [])], multi_label, raw.get("split"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: not a disttrain shard manifest ({type(err).__name__}: {err}); rerun `disttrain prepare --force`") from err
    missing = [str(p) for split in splits.values() for p in split.paths if not p.is_file()]
    if missing:
        raise DataError(f"{path}: lists shard(s) that do not exist: {', '.join(missing[:5])}; rerun `disttrain prepare`")
    return manifest


# ------------------------------------------------------------------------------------------------
# Who reads what: a pure function of (shard sizes, world, rank, workers, batch size, epoch, seed).


@dataclass
class WorkerPlan:
    pieces: list[tuple[int, int, int]]
    """(shard index, first sample, end sample) ranges this worker reads, in order."""
    samples: int
    """Samples in those ranges."""
    batches: int
    """Batches this worker yields (training: exact; validation: if every sample is readable)."""


def train_steps(total: int, world: int, batch_size: int) -> int:
    """Batches per rank per epoch when training from shards (the same on every rank)."""
    return math.ceil(total / (world * batch_size))


def shard_order(num_shards: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


def _pieces(order: list[int], counts: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """The [start, stop) range of the sequence `order` of shards as per-shard pieces."""
    pieces, offset = [], 0
    for shard in order:
        lo, hi = max(start, offset), min(stop, offset + counts[shard])
        if lo < hi:
            pieces.append((shard, lo - offset, hi - offset))
        offset += counts[shard]
    return pieces


def plan_epoch(
    counts: list[int], world: int, rank: int, workers: int, batch_size: int, train: bool, epoch: int = 0, seed: int = 0
) -> list[WorkerPlan]:
    """This rank's plan, one entry per dataloader worker (1 entry for num_workers=0)."""
    workers = max(1, workers)
    order = shard_order(len(counts), epoch, seed, shuffle=train)
    total = sum(counts)
    lo, hi = total * rank // world, total * (rank + 1) // world
    n = hi - lo
    if train:
        steps = train_steps(total, world, batch_size)
        quotas = [steps // workers + (w < steps % workers) for w in range(workers)]
        cumulative = [sum(quotas[:w]) for w in range(workers + 1)]
        bounds = [lo + n * c // steps for c in cumulative]  # a worker holds <= quota x batch_size samples
    else:
        bounds = [lo + n * w // workers for w in range(workers + 1)]
    plans = []
    for w in range(workers):
        size = bounds[w + 1] - bounds[w]
        batches = quotas[w] if train else math.ceil(size / batch_size)
        plans.append(WorkerPlan(_pieces(order, counts, bounds[w], bounds[w + 1]), size, batches))
    return plans


# ------------------------------------------------------------------------------------------------
# Streaming a shard.


@dataclass
class RawSample:
    key: str
    image: bytes
    label: int | tuple[int, ...]
    """The class index, or (multi-label) the class indices."""
    copy: int = 0
    """Which copy of the sample this is under repeated augmentation (0: the first, or the only one)."""


def _parse_tags(raw: bytes, num_classes: int) -> tuple[int, ...] | None:
    """A `.tags` member's class indices, or None when one is not an index into the classes."""
    try:
        tags = tuple(int(t) for t in raw.decode().split())
    except ValueError:
        return None
    return tags if all(0 <= t < num_classes for t in tags) else None


def _check_sample(path: Path, sample: dict, skipped: dict[str, int], num_classes: int, multi_label: bool = False) -> RawSample | None:
    """A grouped sample (webdataset's dict: `__key__` and one entry per extension) as a RawSample,
    or None (counted in `skipped` by reason) when it has no image, no label or a label out of range."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    member = "tags" if multi_label else "cls"
    reason = None
    if ext is None:
        reason = "no image member"
    elif member not in sample:
        reason = f"no .{member} member"
    elif multi_label:
        label = _parse_tags(sample["tags"], num_classes)
        if label is None:
            reason = "bad label"
    else:
        try:
            label = int(sample["cls"].decode().strip())
        except ValueError:
            label = -1
        if not 0 <= label < num_classes:
            reason = "bad label"
    if reason:
        skipped[reason] = skipped.get(reason, 0) + 1
        log.warning("%s: sample %s skipped (%s)", path, sample["__key__"], reason)
        return None
    return RawSample(sample["__key__"], sample[ext], label)


def _keep_first(err: Exception) -> bool:
    """webdataset handler for a member name repeated within a sample: keep the first, go on."""
    log.warning("%s", err.args[0] if err.args else err)
    return True


def read_range(path: Path, start: int, stop: int, skipped: dict[str, int], num_classes: int,
               multi_label: bool = False) -> Iterator[RawSample]:
    """Samples `start..stop-1` of one shard, streamed: webdataset reads the tar's members
    (`tar_file_expander`) and groups them by key (`group_by_keys`, the webdataset convention
    `dir/KEY.ext`); samples are counted by those groups. Unusable samples and the samples a
    truncated shard no longer holds are counted in `skipped` (by reason). A sample is complete when
    the next one's first member has been read (webdataset's grouping), so a shard cut inside a
    sample's first member also loses the sample before it."""
    seen = 0  # complete samples of this shard read so far
    try:
        with open(path, "rb") as fh:
            members = tar_file_expander([{"url": str(path), "stream": fh}], eof_value=None)
            for sample in group_by_keys(members, handler=_keep_first):
                seen += 1
                if seen > start:
                    usable = _check_sample(path, sample, skipped, num_classes, multi_label)
                    if usable is not None:
                        yield usable
                if seen >= stop:
                    return
    except (tarfile.TarError, EOFError, OSError) as err:
        reason = str(err.args[0]).partition(" @ ")[0] if err.args else repr(err)  # webdataset appends " @ <file>"
        log.warning("%s: unreadable after sample %d (%s); the rest of this shard's range is skipped", path, seen, reason)
    lost = stop - max(start, seen)
    if lost > 0:
        skipped["truncated shard"] = skipped.get("truncated shard", 0) + lost


def decode_sample(sample: RawSample, load_size: int, skipped: dict[str, int], out: np.ndarray | None = None) -> np.ndarray | None:
    """Decode and presize into `out` (a batch slot); None (counted in `skipped`) if undecodable."""
    try:
        return load_presized(sample.image, load_size, out)
    except Exception as err:  # noqa: BLE001 - any decoder failure means "not an image"
        skipped["undecodable"] = skipped.get("undecodable", 0) + 1
        log.warning("sample %s skipped (undecodable: %s)", sample.key, err)
        return None


def shuffle_buffer(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Streaming shuffle: keep `size` items, emit a random one as each new item arrives."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


# ------------------------------------------------------------------------------------------------


class ShardDataset(IterableDataset):
    """Yields this rank's batches for the current epoch: `(uint8 images (B,S,S,3), labels, info)`, the
    labels as int64 numpy (B,) or, for a multi-label manifest, a uint8 numpy multi-hot (B, classes),
    where `info = {"skipped": samples skipped since the previous batch, "keys": sample keys}`. In a
    loader worker the images stay in the SlotPool and a `SlotRef` stands in for them
    (`DeviceLoader` copies them out).
    With `raw=True` the images are left undecoded (a list of JPEG byte strings) for the GPU decoder.

    `set_epoch` is seen by persistent workers too (the epoch lives in shared memory).
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        batch_size: int,
        load_size: int,
        world: int = 1,
        rank: int = 0,
        num_workers: int = 0,
        train: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        raw: bool = False,
        repeats: int = 1,
    ):
        if repeats < 1 or (repeats > 1 and not train):
            raise ValueError(f"repeats={repeats}: at least 1, and 1 for validation, which reads each sample once")
        self.repeats = repeats
        self.manifest = manifest
        self.split = manifest.splits[split]
        self.batch_size = batch_size
        self.load_size = load_size
        self.world, self.rank, self.num_workers = world, rank, num_workers
        self.train = train
        self.seed = seed
        self.buffer_size = shuffle_buffer if train else 0
        self.raw = raw
        shared = worker_context() if num_workers > 0 else multiprocessing  # what its loader workers see
        self._epoch = shared.Value("q", 0, lock=False)
        self._skip = shared.Value("q", 0, lock=False)
        self.pool = None
        if train and num_workers > 0 and not raw:  # validation is a small share of the work: no pool
            self.pool = SlotPool(num_workers, PREFETCH_FACTOR + 2, (batch_size, load_size, load_size, 3))
        if train and self.split.samples < world:
            raise DataError(f"{manifest.root}: {self.split.samples} training samples cannot be shared by {world} ranks")

    def _tags_width(self) -> int | None:
        """The multi-hot width (the number of classes) for a multi-label manifest; None: int labels."""
        return len(self.manifest.classes) if self.manifest.multi_label else None

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch; `skip` leaves out this rank's first batches of it (resuming mid-epoch:
        they are still decoded, so the rest of the stream is exactly the uninterrupted one)."""
        self._epoch.value = epoch
        self._skip.value = skip

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def plans(self, epoch: int | None = None) -> list[WorkerPlan]:
        return plan_epoch(self.split.counts, self.world, self.rank, self.num_workers, self.batch_size, self.train,
                          self.epoch if epoch is None else epoch, self.seed)

    def __len__(self) -> int:
        return sum(p.batches for p in self.plans())

    def _stream(self, pieces, skipped) -> Iterator[RawSample]:
        for shard, start, stop in pieces:
            yield from read_range(self.split.paths[shard], start, stop, skipped, len(self.manifest.classes), self.manifest.multi_label)

    def _repeated(self, stream: Iterator[RawSample], plan: WorkerPlan, quota: int, epoch: int, role: int) -> Iterator[RawSample]:
        """Repeated augmentation: a seeded draw of ceil(quota / repeats) of the stream's positions
        (the plan's samples; at most all of them), each sample there `repeats` times in a row."""
        draw = random.Random(f"repeats:{self.seed}:{epoch}:{self.rank}:{role}")
        keep = set(draw.sample(range(plan.samples), min(plan.samples, -(-quota // self.repeats))))
        for position, sample in enumerate(stream):
            if position in keep:
                yield sample
                for copy in range(1, self.repeats):
                    yield replace(sample, copy=copy)

    def _add(self, batch: _BatchBuilder, sample: RawSample, skipped: dict[str, int]) -> bool:
        """Decode `sample` into the batch's next slot; False (and counted, for its first copy only)
        if it is unusable."""
        if self.raw:
            batch.raw.append(sample.image)  # bytes: pickled by value, decoded as a batch on the GPU
        elif decode_sample(sample, self.load_size, skipped if sample.copy == 0 else {}, out=batch.next_slot()) is None:
            return False
        batch.commit(sample.label, sample.key)
        return True

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0  # physical: owns its SlotPool slots
        epoch = self.epoch
        plans = self.plans(epoch)
        skips, first = resume_layout([p.batches for p in plans], int(self._skip.value))
        role = (worker + first) % len(plans)  # logical: which part of the rank's range it reads
        plan, skip = plans[role], skips[role]
        rng = random.Random(f"buffer:{self.seed}:{epoch}:{self.rank}:{role}")
        skipped: dict[str, int] = {}
        if self.pool is not None:
            self.pool.start_epoch(worker)
        batch = _BatchBuilder(self.batch_size, self.load_size, self.raw, self.pool if info is not None else None, worker,
                              self._tags_width())
        stream = self._stream(plan.pieces, skipped)
        quota = plan.batches * self.batch_size if self.train else None
        emitted = plan.samples
        if self.repeats > 1:
            stream = self._repeated(stream, plan, quota, epoch, role)
            emitted = min(plan.samples, -(-quota // self.repeats)) * self.repeats
        if self.buffer_size > 1:
            stream = shuffle_buffer(stream, self.buffer_size, rng)
        spare_cap = (quota - min(quota, emitted) + self.batch_size) if self.train else 0
        spares: list[RawSample] = []
        produced = 0
        for sample in stream:
            if not self._add(batch, sample, skipped):
                continue
            if len(spares) < spare_cap:
                spares.append(sample)
            produced += 1
            if batch.full:
                out = batch.take(skipped)
                if skip:
                    skip -= 1
                    self._drop(out, worker)
                else:
                    yield out
            if produced == quota:  # never more than the rank's share (cannot happen by construction)
                break
        if self.train and produced < quota:
            for out in self._top_up(quota - produced, spares, plans, batch, skipped, rng):
                if skip:
                    skip -= 1
                    self._drop(out, worker)
                else:
                    yield out
        elif len(batch) or skipped:  # an empty batch still carries the count of skipped samples
            yield batch.take(skipped)

    def _drop(self, batch, worker: int) -> None:
        """A batch skipped on resume: never sent, so its slot is free again at once."""
        if isinstance(batch[0], SlotRef):
            self.pool.free[worker].release()

    def _top_up(self, missing, spares, plans, batch, skipped, rng):
        """Fill the training quota by drawing again from samples this worker read successfully (from
        anywhere in the rank's range if it had none)."""
        if not spares:
            spares = [s for s in self._stream([p for w in plans for p in w.pieces], {}) if decode_sample(s, self.load_size, {}) is not None]
            spares = spares[: missing + self.batch_size]
        if not spares:
            ranges = ", ".join(f"{self.split.paths[s].name}[{a}:{b}]" for w in plans for s, a, b in w.pieces)
            raise DataError(f"rank {self.rank}: no readable sample in its shard range(s) {ranges}; rerun `disttrain prepare --force`")
        order = []
        while len(order) < missing:
            cycle = list(range(len(spares)))
            rng.shuffle(cycle)
            order += cycle
        for i in order[:missing]:
            self._add(batch, spares[i], {})
            if batch.full:
                yield batch.take(skipped)


def resume_layout(batches: list[int], skip: int) -> tuple[list[int], int]:
    """Resuming after the rank's first `skip` batches: how many batches each (logical) worker
    drops, and which logical worker goes first. The DataLoader takes one batch from each worker in
    turn (passing over workers that are done) and always starts with worker 0, so physical worker w
    plays logical worker (w + first) % W: the resumed stream is then exactly the uninterrupted one."""
    left, skips, w, n = list(batches), [0] * len(batches), 0, len(batches)
    while skip > 0 and any(left):
        if left[w]:
            skips[w] += 1
            left[w] -= 1
            skip -= 1
        w = (w + 1) % n
    for _ in range(n):
        if left[w]:
            break
        w = (w + 1) % n
    return skips, w


def _shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


@dataclass(frozen=True)
class SlotRef:
    """What a worker sends instead of the pixels: where in the SlotPool its batch is."""

    worker: int
    slot: int
    size: int


class SlotPool:
    """Shared-memory batch buffers, `slots` per loader worker, allocated once and reused.

    A fresh shared-memory batch per step costs more than the copy it saves (allocating, faulting in
    and tearing down 12 MB of pages; measured: the reader at 0.62 of the decode-only ceiling, 0.9-1.1
    with reuse). So a worker decodes into its next free slot and sends a `SlotRef`; the main process
    copies the batch out (into pinned memory on CUDA, on its way to the device) and frees the slot.
    A worker holds at most `prefetch_factor` unconsumed batches plus the one it builds, so with
    `slots = prefetch_factor + 2` it never waits. Batches of an abandoned epoch are never copied;
    each worker therefore marks all its slots free when it starts an epoch (by then the main
    process has moved on to the new epoch and reads none of the old slots).
    """

    def __init__(self, workers: int, slots: int, shape: tuple[int, ...]):
        ctx = worker_context()  # the loader workers' own: its semaphores travel to them
        self.slots = slots
        self.buffers = [[_shared_uint8(shape) for _ in range(slots)] for _ in range(workers)]
        self.free = [ctx.Semaphore(slots) for _ in range(workers)]
        self._next = 0  # the next slot of this (worker) process

    def start_epoch(self, worker: int) -> None:
        free = self.free[worker]
        while free.acquire(block=False):
            pass
        for _ in range(self.slots):
            free.release()
        self._next = 0

    def acquire(self, worker: int) -> tuple[int, torch.Tensor]:
        """In a worker: the next slot, once the main process has copied what it held."""
        self.free[worker].acquire()
        slot, self._next = self._next, (self._next + 1) % self.slots
        return slot, self.buffers[worker][slot]

    def take(self, ref: SlotRef, copy) -> torch.Tensor:
        """In the main process: `copy(view of the batch)`, then the slot is free for its worker."""
        try:
            return copy(self.buffers[ref.worker][ref.slot][: ref.size])
        finally:
            self.free[ref.worker].release()


class _BatchBuilder:
    """Samples decoded straight into a uint8 (B, S, S, 3) batch: a SlotPool slot in a loader worker,
    a plain tensor in the main process; or raw JPEG tensors for the GPU decoder. `tags_width`: the
    number of classes of multi-label labels (a uint8 multi-hot row each); None: int64 labels."""

    def __init__(self, batch_size: int, load_size: int, raw: bool, pool: SlotPool | None = None, worker: int = 0,
                 tags_width: int | None = None):
        self.batch_size, self.load_size, self.is_raw = batch_size, load_size, raw
        self.pool, self.worker, self.tags_width = pool, worker, tags_width
        self._reset()

    def _reset(self) -> None:
        self.raw: list[bytes] = []
        self.images: torch.Tensor | None = None
        self.slot: int | None = None
        self.labels, self.keys = [], []

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def full(self) -> bool:
        return len(self.labels) == self.batch_size

    def next_slot(self) -> np.ndarray:
        if self.images is None:  # the first sample of a batch claims its buffer
            if self.pool is not None:
                self.slot, self.images = self.pool.acquire(self.worker)
            else:
                self.images = torch.empty((self.batch_size, self.load_size, self.load_size, 3), dtype=torch.uint8)
        return self.images[len(self.labels)].numpy()

    def commit(self, label: int | tuple[int, ...], key: str) -> None:
        self.labels.append(label)
        self.keys.append(key)

    def take(self, skipped: dict[str, int]):
        n = len(self.labels)
        if self.is_raw:
            images = self.raw
        elif self.slot is not None:
            images = SlotRef(self.worker, self.slot, n)
        elif self.images is not None:
            images = self.images[:n]
        else:  # nothing decoded (a batch that only carries skip counts)
            images = torch.empty((0, self.load_size, self.load_size, 3), dtype=torch.uint8)
        # labels as numpy: pickled by value (a torch tensor would cost a shared-memory file per batch)
        out = (images, self._label_array(), {"skipped": sum(skipped.values()), "keys": self.keys})
        skipped.clear()
        self._reset()
        return out

    def _label_array(self) -> np.ndarray:
        if self.tags_width is None:
            return np.asarray(self.labels, dtype=np.int64)
        hot = np.zeros((len(self.labels), self.tags_width), dtype=np.uint8)
        for row, tags in enumerate(self.labels):
            hot[row, list(tags)] = 1
        return hot
