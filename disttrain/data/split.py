"""The validation split of a source without a validation folder: a seeded random fraction of the
images (`data.valid_pct`, `data.split_seed`; per class with `data.stratify`) or a column of the label
table (`data.valid_col`).

The split is a function of the listed file names, their labels and the settings only (not of which
files later fail to decode, not of the rank or the number of processes): every rank draws it
itself, and the ranks' digests are compared before anything is broadcast. It is written to the run
dir as `split.json` (its `valid` list: the validation files) for a resume, which refuses to go on
when its data would split otherwise, and for `disttrain evaluate --run`.

The draw uses numpy's PCG64 generator (`numpy.random.default_rng(split_seed)`), whose stream numpy
keeps stable, so a split is the same on any machine: the lesson's `get_cv_idxs(n, val_pct, seed)`
drew a permutation the same way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from disttrain import durable
from disttrain.data.folder import DataError

SPLIT_FILE = "split.json"


def draw_split(count: int, valid_pct: float, seed: int, strata: list[int] | None = None) -> np.ndarray:
    """A bool mask over `count` items: True for the validation ones. `round(valid_pct x count)` of
    them drawn at random; with `strata` (a group per item) the draw is made per group, each group
    giving round(valid_pct x its size) but at least one to each part when it has two items or more."""
    valid = np.zeros(count, dtype=bool)
    if valid_pct == 0 or count == 0:
        return valid
    rng = np.random.default_rng(seed)
    if strata is None:
        take = int(round(valid_pct * count))
        valid[rng.permutation(count)[:take]] = True
        return valid
    groups = np.asarray(strata, dtype=np.int64)
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        take = int(round(valid_pct * len(members)))
        if len(members) >= 2:
            take = min(max(take, 1), len(members) - 1)
        valid[members[rng.permutation(len(members))[:take]]] = True
    return valid


def rarest_tag_strata(labels: list, classes: int) -> list[int]:
    """Stratum of each item: its label (single-label) or, of its labels, the one fewest items carry
    (multi-label; `classes` for an item without any)."""
    if not labels or isinstance(labels[0], int):
        return list(labels)
    counts = np.zeros(classes + 1, dtype=np.int64)
    for tags in labels:
        counts[list(tags)] += 1
    return [min(tags, key=lambda t: (counts[t], t)) if tags else classes for tags in labels]


@dataclass
class SplitRecord:
    """What split.json holds."""

    how: str
    """`valid_pct=0.2 seed=42` (and `stratified`), or `valid_col=is_valid`."""
    train: int
    """Training files (listed, before any is found undecodable)."""
    valid: list[str]
    """The validation files, relative to the images folder, in listing order."""
    digest: str
    """sha256 of the listing's files with their labels and parts: equal digests, equal splits."""


def split_digest(files: list[str], labels: list, valid: np.ndarray) -> str:
    """A digest of every (file, labels, part): two ranks (or a run and its resume) with equal
    digests train and validate on the same files with the same labels."""
    h = hashlib.sha256()
    for name, label, is_valid in zip(files, labels, valid.tolist()):
        h.update(f"{name}\t{label}\t{int(is_valid)}\n".encode())
    return h.hexdigest()


def write_split(record: SplitRecord, run_dir: Path) -> Path:
    path = run_dir / SPLIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_text(path, json.dumps(asdict(record), indent=1) + "\n")  # a resume trusts it: never half written
    return path


def read_split(path: Path) -> SplitRecord:
    try:
        raw = json.loads(path.read_text())
        return SplitRecord(raw["how"], int(raw["train"]), list(raw["valid"]), raw["digest"])
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; a run with data.valid_pct or data.valid_col writes it in its run dir") from None
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: is not a split.json disttrain wrote ({type(err).__name__}: {err})") from None
