"""`disttrain prepare SRC DST [data.key=value ...]`: any image source -> webdataset tar shards + `manifest.json`.

The source is listed as training lists it (disttrain/data/source.py's `list_source`, the same
`data.*` keys): a class-folder tree, or a flat folder labelled by a CSV table (`data.labels`) or
by its file names (`data.label_regex`), its validation part drawn (`data.valid_pct`) or read from a
column (`data.valid_col`). Each split (`train`, and `valid`) is shuffled once (seeded, so every
shard mixes the classes), cut into shards whose sizes differ by at most one sample, and written by
worker processes. A sample is three tar members sharing a key: `KEY.jpg` (the image, shorter side
reduced to `presize`, RGB JPEG), `KEY.cls` (the label index as ASCII) and `KEY.path` (its path
under the split folder, or the images folder). Any webdataset reader can stream them.

Multi-label data (`data.label_delim`): the manifest says `"multi_label": true` (absent: false) and
each sample's labels are a `KEY.tags` member in place of `KEY.cls`: its class indices, ascending,
space-separated as ASCII (empty for an image without any). A drawn split is recorded in the
manifest as `split` (how it was drawn, the training count, the validation files, its digest:
split.json's fields), so a run from the shards knows which files it validates on. A class-folder
tree with its validation folder writes neither key: its shards and manifest (fingerprint included)
are what they were before other sources could be read.
Files the listing sets aside (a table row naming a missing file, a name `data.label_regex` does not
match) are listed with the undecodable ones in the split's `bad_files`.

Crash safety: a shard is written as `NAME.tar.tmp`, flushed, then renamed; the parent records each
finished shard in `.prepare-progress.jsonl`; `manifest.json` is written last (also by rename). An
interrupted run leaves no shard that looks complete but is not, and re-running finishes only the
missing shards. Re-running over a finished output with the same source and settings is a no-op.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset import TarWriter

from disttrain.config import DataConfig
from disttrain.data.decode import open_image
from disttrain.data.folder import DataError, FolderListing, Target, list_image_folder
from disttrain.data.source import check_flat_usable, list_source

MANIFEST = "manifest.json"
PROGRESS = ".prepare-progress.jsonl"
FORMAT = "disttrain-shards/1"
SOURCE_KEYS = ("labels", "images", "fname_col", "label_col", "suffix", "label_delim", "label_regex", "valid_pct", "split_seed",
               "valid_col", "stratify")
"""The data.* keys that describe a source beyond a class-folder tree (`disttrain prepare` takes them
as `data.key=value`, as training does; data.train_dir / data.valid_dir are its --train-dir / --valid-dir)."""


@dataclass(frozen=True)
class PrepareSettings:
    samples_per_shard: int = 1000
    """Target samples per shard (shards of a split differ by at most one sample)."""
    presize: int = 256
    """Shorter side of the stored JPEGs (larger images are reduced, smaller ones enlarged)."""
    quality: int = 90
    """JPEG quality of re-encoded images."""
    seed: int = 0
    """Seed of the one-time shuffle that decides which sample goes into which shard."""
    train_dir: str = "train"
    """Training split folder under SRC."""
    valid_dir: str = "auto"
    """Validation split folder under SRC; `auto` takes `valid/` or else `val/`."""

    def check(self) -> None:
        for key in ("samples_per_shard", "presize"):
            if getattr(self, key) < 1:
                raise DataError(f"--{key.replace('_', '-')}: must be >= 1, got {getattr(self, key)}")
        if not 1 <= self.quality <= 100:
            raise DataError(f"--quality: must be in 1..100, got {self.quality}")


@dataclass
class ShardTask:
    split: str
    name: str
    files: list[tuple[str, Target]]  # (absolute path, label or, multi-label, the tuple of class indices)
    split_dir: str
    first_key: int


def encode_sample(path: str, presize: int, quality: int) -> bytes:
    """The stored JPEG, shorter side exactly `presize` (small images are enlarged here, once, so the
    reader never resizes when `data.load_size` equals the presize). The original bytes are kept when
    they already are an RGB/grey JPEG of that size (no second lossy pass)."""
    raw = Path(path).read_bytes()
    if not raw:
        raise ValueError("empty file (0 bytes)")
    img = open_image(raw, draft_size=presize)
    w, h = img.size
    if min(w, h) == presize:
        with Image.open(io.BytesIO(raw)) as original:
            if original.format == "JPEG" and original.mode in ("RGB", "L") and original.size == (w, h):
                return raw
    else:
        scale = presize / min(w, h)
        img = img.resize((max(presize, round(w * scale)), max(presize, round(h * scale))), Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _reason(err: Exception) -> str:
    """Why a file was skipped, the same on every run: PIL names the buffer it read by its memory
    address (`<_io.BytesIO object at 0x7f...>`), which would make two manifests of one source differ."""
    return re.sub(r" at 0x[0-9a-f]+>", ">", f"{type(err).__name__}: {err}".strip())


def label_member(label: Target) -> dict[str, bytes]:
    """A sample's label member: `cls` (the class index) or, multi-label, `tags` (the class indices,
    space-separated; see the module docstring)."""
    if isinstance(label, tuple):
        return {"tags": " ".join(str(t) for t in label).encode()}
    return {"cls": str(label).encode()}


def write_shard(task: ShardTask, out_dir: str, presize: int, quality: int) -> dict:
    """Write one shard (temporary name, then rename); returns its progress record.

    webdataset's `TarWriter` writes the members (sorted by extension: `.cls`, `.jpg`, `.path`) as a
    plain POSIX tar; `mtime=0` and fixed owner names make the same input give the same bytes, and
    `encoder=False` stores our bytes as they are (its default encoder would re-encode images).
    Its `ShardWriter` is not used: it cuts shards by count in one process and writes final names,
    while here a split is cut into shards of equal size (+-1) up front, written by a process pool,
    each under a temporary name and recorded for resuming."""
    final = Path(out_dir) / task.name
    tmp = final.with_name(final.name + ".tmp")
    bad, samples = [], 0
    with open(tmp, "wb") as fh:
        with TarWriter(fh, user="disttrain", group="disttrain", mode=0o444, mtime=0, encoder=False) as sink:
            for i, (path, label) in enumerate(task.files):
                try:
                    jpeg = encode_sample(path, presize, quality)
                except Exception as err:  # any decode failure means "cannot train on this file"
                    bad.append({"path": path, "reason": _reason(err)})
                    continue
                sink.write({
                    "__key__": f"{task.first_key + i:08d}",
                    **label_member(label),
                    "jpg": jpeg,
                    "path": os.path.relpath(path, task.split_dir).encode(),
                })
                samples += 1
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return {"split": task.split, "name": task.name, "samples": samples, "bytes": final.stat().st_size, "bad_files": bad}


def source_config(src: str | Path, settings: PrepareSettings, source: DataConfig | None = None) -> DataConfig:
    """The data.* settings that list SRC: `source`'s source keys (None: a class-folder tree), with
    SRC as the root and the settings' split folders."""
    return replace(source or DataConfig(), root=str(src), train_dir=settings.train_dir, valid_dir=settings.valid_dir)


def list_prepare_source(data: DataConfig) -> FolderListing:
    """The listing to shard: a class-folder tree with its validation folder as `list_image_folder`
    reads it (its errors word for word, as before sources), any other source as training lists it."""
    if data.flat or data.valid_pct is not None:
        return list_source(data)
    return list_image_folder(data.root, data.train_dir, data.valid_dir)


def _empty_part(split: str, split_dir: Path, listing: FolderListing) -> DataError:
    if listing.split is None:
        return DataError(f"{split_dir}: no image files in any class folder")
    if split == "valid":
        return DataError(f"{split_dir}: the split ({listing.split.how}) leaves no validation images; shards need both parts: "
                         "set data.valid_pct above 0 (0.2: a fifth of the images), or mark rows in data.valid_col")
    return DataError(f"{split_dir}: the split ({listing.split.how}) leaves no training images; "
                     "lower data.valid_pct or mark fewer rows valid")


def _listed_bad(listing: FolderListing) -> dict[str, list[dict]]:
    """The files the listing set aside, per part: a drawn validation file in `valid`, others in `train`."""
    drawn_valid = set(listing.split.valid) if listing.split is not None else set()
    out: dict[str, list[dict]] = {"train": [], "valid": []}
    for bad in listing.bad:
        part = "valid" if os.path.relpath(bad.path, listing.valid_dir) in drawn_valid else "train"
        out[part].append({"path": bad.path, "reason": bad.reason})
    return out


def plan_shards(
    src: str | Path, settings: PrepareSettings, source: DataConfig | None = None
) -> tuple[FolderListing, dict[str, list[ShardTask]], dict]:
    """The listing, the shard tasks of each split, and the source description (with a fingerprint of
    every file's path, label, size and mtime and of the source keys, so a changed source is never
    mistaken for a finished one; a class-folder tree's is the same as before sources existed)."""
    data = source_config(src, settings, source)
    listing = list_prepare_source(data)
    if listing.split is not None:  # a drawn split: a single-label class must keep a training file, as training requires
        check_flat_usable(listing, [label for _, label in listing.train], str(listing.train_dir))
    digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    if listing.split is not None or data.flat:
        digest.update(json.dumps({key: getattr(data, key) for key in SOURCE_KEYS}, sort_keys=True).encode())
    tasks: dict[str, list[ShardTask]] = {}
    for split, split_dir, files in (("train", listing.train_dir, listing.train), ("valid", listing.valid_dir, listing.valid)):
        if not files:
            raise _empty_part(split, split_dir, listing)
        order = np.random.default_rng(settings.seed).permutation(len(files))
        chunks = np.array_split(order, -(-len(files) // settings.samples_per_shard))
        tasks[split], first = [], 0
        for n, chunk in enumerate(chunks):
            chunk_files = [(str(files[i][0]), files[i][1]) for i in chunk]
            tasks[split].append(ShardTask(split, f"{split}-{n:06d}.tar", chunk_files, str(split_dir), first))
            first += len(chunk)
        for path, label in files:
            stat = path.stat()
            digest.update(f"{split}\0{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    source = {
        "root": str(Path(src).expanduser().resolve()),
        "train_dir": listing.train_dir.name,
        "valid_dir": listing.valid_dir.name,
        "fingerprint": digest.hexdigest(),
    }
    return listing, tasks, source


def _read_progress(out: Path, fingerprint: str) -> dict[str, dict]:
    """Finished shards of this plan: recorded in the progress file and present with their size."""
    done = {}
    path = out / PROGRESS
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        shard = out / record.get("name", "")
        if record.get("fingerprint") == fingerprint and shard.is_file() and shard.stat().st_size == record["bytes"]:
            done[record["name"]] = record
    return done


def _clear(out: Path) -> None:
    for pattern in ("*.tar", "*.tar.tmp", MANIFEST, PROGRESS):
        for path in out.glob(pattern):
            path.unlink()


def load_finished_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err}); rerun with --force to rewrite the shards") from err


def prepare(
    src: str | Path,
    dst: str | Path,
    settings: PrepareSettings = PrepareSettings(),
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
    log=print,
    source: DataConfig | None = None,
) -> dict:
    """Write the shards and manifest; returns the manifest. See the module docstring. `source`: the
    data.* keys of a source other than a class-folder tree (its root and split folders are SRC and
    the settings')."""
    settings.check()
    out = Path(dst).expanduser()
    listing, tasks, source = plan_shards(src, settings, source)
    fingerprint = source["fingerprint"]
    out.mkdir(parents=True, exist_ok=True)

    finished = load_finished_manifest(out)
    if finished is not None and not force:
        if finished.get("source", {}).get("fingerprint") != fingerprint:
            raise DataError(
                f"{out}: holds shards made from another source or with other settings "
                f"({finished.get('source', {}).get('root')}); use --force to rewrite them, or another DST"
            )
        missing = [s["name"] for split in finished["splits"].values() for s in split["shards"] if not (out / s["name"]).is_file()]
        if missing:
            raise DataError(f"{out}: shard(s) {', '.join(missing[:5])} are missing; rerun with --force")
        log(f"{out}: up to date ({finished['splits']['train']['samples']} train / {finished['splits']['valid']['samples']} valid samples); nothing to do")
        return finished
    if force:
        _clear(out)

    started = time.time()
    done = _read_progress(out, fingerprint)
    todo = [t for split_tasks in tasks.values() for t in split_tasks if t.name not in done]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    total = sum(len(t.files) for t in todo)
    if done:
        log(f"{out}: resuming, {len(done)} shard(s) already written, {len(todo)} to go")
    _run_tasks(todo, out, settings, workers, total, fingerprint, done, progress)

    manifest = {
        "format": FORMAT,
        "classes": listing.classes,
        **({"multi_label": True} if listing.multi_label else {}),
        "presize": settings.presize,
        "quality": settings.quality,
        "samples_per_shard": settings.samples_per_shard,
        "seed": settings.seed,
        "source": source,
        **({"split": asdict(listing.split)} if listing.split is not None else {}),
        "made": {"workers": workers, "seconds": round(time.time() - started, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "splits": {},
    }
    listed_bad = _listed_bad(listing)
    for split, split_tasks in tasks.items():
        records = [done[t.name] for t in split_tasks]
        manifest["splits"][split] = {
            "samples": sum(r["samples"] for r in records),
            "shards": [{"name": r["name"], "samples": r["samples"], "bytes": r["bytes"]} for r in records],
            "bad_files": listed_bad[split] + [b for r in records for b in r["bad_files"]],
        }
    _check_manifest_usable(manifest, out)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    (out / PROGRESS).unlink(missing_ok=True)
    bad = sum(len(s["bad_files"]) for s in manifest["splits"].values()) - len(listing.bad)
    log(
        f"{out}: {manifest['splits']['train']['samples']} train / {manifest['splits']['valid']['samples']} valid samples in "
        f"{sum(len(s['shards']) for s in manifest['splits'].values())} shards"
        + (f"; {bad} undecodable file(s) skipped, listed in {MANIFEST}" if bad else "")
        + (f"; {len(listing.bad)} listed file(s) set aside (missing or unlabelled), listed in {MANIFEST}" if listing.bad else "")
    )
    return manifest


def _check_manifest_usable(manifest: dict, out: Path) -> None:
    for split, info in manifest["splits"].items():
        if info["samples"] == 0:
            raise DataError(f"{out}: no decodable images in the {split} split (see bad_files in the progress records)")


def _run_tasks(todo, out, settings, workers, total, fingerprint, done, progress) -> None:
    from tqdm.auto import tqdm

    if not todo:
        return
    with open(out / PROGRESS, "a") as log_file, tqdm(total=total, unit="img", desc="prepare", disable=not progress) as bar:

        def record(result: dict) -> None:
            result["fingerprint"] = fingerprint
            log_file.write(json.dumps(result) + "\n")
            log_file.flush()
            os.fsync(log_file.fileno())
            done[result["name"]] = result
            bar.update(result["samples"] + len(result["bad_files"]))

        if workers == 1:
            for task in todo:
                record(write_shard(task, str(out), settings.presize, settings.quality))
            return
        # spawn: workers start clean (no inherited threads or CUDA state)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            pending = {pool.submit(write_shard, t, str(out), settings.presize, settings.quality) for t in todo}
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    record(future.result())
