"""Data sources are one seam: a class-folder tree, a flat folder labelled by a CSV table or by its file
names, each with its validation split (a folder, a drawn fraction, or a column), all listed as one
`FolderListing` (classes, the candidate files of each part with their targets, the files set aside,
the drawn split) that disttrain/data/folder.py's `scan_listing` decodes the same way. Shards are the
other source (disttrain/data/shards.py: `disttrain prepare` writes them from any listing here).

| source              | keys                                       | validation                          |
|---------------------|--------------------------------------------|-------------------------------------|
| class folders       | train_dir, valid_dir                       | valid_dir, or valid_pct of train    |
| labels table (CSV)  | labels, images, fname_col, label_col,      | valid_pct (split_seed, stratify)    |
|                     | suffix, label_delim                        | or valid_col                        |
| file names          | label_regex, images                        | valid_pct (split_seed, stratify)    |

Multi-label (several labels per image) is decided here, once: `data.label_delim` is set.
Listing reads directories and the table, no image bytes: every rank can list and draw the split
itself (disttrain/data/setup.py compares the ranks' digests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from disttrain.config import DataConfig
from disttrain.data.folder import BadFile, DataError, FolderListing, Target, list_image_folder
from disttrain.data.paths import Files, PathTable, targets_array
from disttrain.data.labels import LabelledFiles, labels_from_names, read_label_table
from disttrain.data.split import SplitRecord, draw_split, rarest_tag_strata, split_digest


def table_path(data: DataConfig) -> Path:
    """data.labels, relative to data.root unless absolute."""
    path = Path(data.labels).expanduser()
    return path if path.is_absolute() else Path(data.root).expanduser() / path


def read_labelled(data: DataConfig) -> tuple[LabelledFiles, list[BadFile]]:
    """A flat source's labelled files and the ones set aside (missing rows, unmatched names)."""
    folder = Path(data.root).expanduser() / data.images
    if data.labels is not None:
        found = read_label_table(table_path(data), folder, data.fname_col, data.label_col, data.suffix, data.label_delim,
                                 data.valid_col)
        return found, list(found.missing or [])
    return labels_from_names(folder, data.label_regex)


def _how(data: DataConfig) -> str:
    if data.valid_col is not None:
        return f"valid_col={data.valid_col}"
    return f"valid_pct={data.valid_pct} seed={data.split_seed}" + (" stratified" if data.stratify else "")


def _draw(data: DataConfig, files: list[str], targets: list[Target], classes: int, fixed: list[bool] | None) -> tuple[np.ndarray, SplitRecord]:
    if fixed is not None:
        valid = np.asarray(fixed, dtype=bool)
    else:
        strata = rarest_tag_strata(targets, classes) if data.stratify else None
        valid = draw_split(len(files), data.valid_pct, data.split_seed, strata)
    record = SplitRecord(_how(data), int((~valid).sum()), [f for f, v in zip(files, valid.tolist()) if v],
                         split_digest(files, targets, valid))
    return valid, record


def list_source(data: DataConfig) -> FolderListing:
    """The listing of the source `data` describes (see the module docstring); DataError for what a
    user must fix (a layout, a table, a missing split)."""
    root = Path(data.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root: {root} is not a folder")
    if not data.flat:
        if data.valid_pct is None:
            return list_image_folder(root, data.train_dir, data.valid_dir)
        tree = list_image_folder(root, data.train_dir, None)
        valid, record = _draw(data, list(tree.train.paths.names()), tree.train.labels(), len(tree.classes), None)
        return _parts(tree.classes, tree.train_dir, tree.train_dir, tree.train, valid, False, [], record)

    if data.valid_pct is None and data.valid_col is None:
        raise DataError(f"{root}: a flat folder of images has no validation folder; set data.valid_pct=0.2 (a seeded fifth of the "
                        "images, the lesson's) or data.valid_col (a column of data.labels marking validation rows)")
    found, bad = read_labelled(data)
    classes = found.classes
    if not classes:
        raise DataError(f"{table_path(data) if data.labels else found.folder}: no labels at all; every row's labels are empty")
    index = {name: i for i, name in enumerate(classes)}
    if found.multi_label:
        targets: list[Target] = [tuple(index[t] for t in tags) for tags in found.tags]
    else:
        targets = [index[tags[0]] for tags in found.tags]
    valid, record = _draw(data, found.files, targets, len(classes), found.valid)
    missing = {b.path for b in bad}
    candidates = Files(PathTable.from_names(found.folder, found.files), targets_array(targets))
    keep = np.asarray([str(found.folder / name) not in missing for name in found.files], dtype=bool)
    return _parts(classes, found.folder, found.folder, candidates, valid, found.multi_label, bad, record, keep)


def _parts(classes, train_dir, valid_dir, candidates: Files, valid: np.ndarray, multi_label: bool, bad, record,
           keep=None) -> FolderListing:
    keep = np.ones(len(candidates), dtype=bool) if keep is None else keep
    return FolderListing(classes, train_dir, valid_dir, candidates.take(keep & ~valid), candidates.take(keep & valid),
                         multi_label, bad, record)


def check_flat_usable(listing: FolderListing, train_labels: list[Target], where: str) -> None:
    """A single-label class must have a training image (a random split can put a rare class's only
    images in validation); multi-label tags may be absent from training (their outputs stay low)."""
    if listing.multi_label:
        return
    present = set(train_labels)
    empty = [c for i, c in enumerate(listing.classes) if i not in present]
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise DataError(f"{where}: class(es) {shown} have no usable training image in this split; "
                        "set data.stratify=true (each class in both parts), or add images")
