"""`disttrain inspect`: a look at a data source before training, as the lesson looks at the class
counts and the image sizes before it chooses the presize.

It lists the source exactly as training does (disttrain/data/source.py's `list_source`: the same
classes, bad rows and drawn split), then reads image headers only (`PIL.Image.open(...).size`, no
pixels decoded), of every file or of a seeded sample, so it takes seconds on one process where
training's scan decodes every file. A file whose pixels are broken past a readable header is found
by that scan, not here.

The suggested `data.load_size` follows one stated rule (`suggest_load_size`): the median shorter
side rounded down to a multiple of 32 (below 32: the median itself, MNIST's 28), kept within
[data.image_size, 512]. The median, because a presize above it upsamples most images (no detail
gained, decode time and cache memory spent); rounded down, so that no more than half the images are
upsampled.
"""

from __future__ import annotations

import json
import os
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from disttrain.config import ConfigError, DataConfig
from disttrain.data.decode import ORIENTATION_TAG
from disttrain.data.folder import BadFile, FolderListing, Target
from disttrain.data.labels import flat_images
from disttrain.data.source import list_source, table_path

QUANTILES = (("min", 0.0), ("5%", 0.05), ("25%", 0.25), ("50%", 0.5), ("75%", 0.75), ("95%", 0.95), ("max", 1.0))
"""The size quantiles shown, each the smallest size that at least that fraction of the images reach
at or below (numpy's `inverted_cdf`): always the size of an actual image."""
SAMPLE_SEED = 0
"""Seed of the header sample (fixed: two looks at the same data read the same files)."""
LOAD_STEP = 32
LOAD_CAP = 512
"""The rule's multiple and its upper bound: presizing above 512 px costs decode time and cache memory
for a detail that a model's 224-384 px input does not see."""
SHOWN_CLASSES = 30
"""Up to this many classes every count is printed; beyond it the 10 rarest and the 10 most common."""
SHOWN_BAD = 20
"""Bad files printed (all of them go to --json)."""
HEADER_THREADS = 8
"""Header reads at once (files on a network filesystem wait on latency, not on a core)."""


@dataclass
class Sizes:
    """Image sizes read from headers, as training sees them (EXIF orientation applied)."""

    read: int
    """Files whose header was read."""
    of: int
    """Files listed."""
    sampled: bool
    """Whether `read` is a seeded sample (seed SAMPLE_SEED) of the `of` files rather than all of them."""
    width: dict[str, int]
    height: dict[str, int]
    shorter: dict[str, int]
    """Each image's shorter side: what data.load_size resizes."""
    shorter_sides: list[int] = field(default_factory=list)
    """Every readable header's shorter side (the histogram's data)."""


@dataclass
class TagStats:
    """Multi-label: labels per image."""

    min: int
    median: float
    max: int
    distribution: dict[str, int]
    """Images per number of tags, from `min` up (`"2"`, `"3"`, ...; a last key `"6+"` gathers 6 tags or more)."""
    untagged: int
    """Images whose row holds no tag at all."""


@dataclass
class SplitView:
    how: str
    """`folder <path>`, `valid_pct=0.2 seed=42 [stratified]`, `valid_col=...`, or `none (valid_pct=0)`."""
    train: int
    valid: int
    valid_per_class: dict[str, int] | None
    """Single-label with at most SHOWN_CLASSES classes: validation images per class."""
    no_train: list[str]
    """Single-label classes without a training image in this split (training would stop)."""


@dataclass
class LoadSize:
    suggested: int
    rule: str
    why: str
    current: int
    """data.load_size as configured now."""
    image_size: int


@dataclass
class Inspection:
    """Every figure `disttrain inspect` prints (and writes with --json)."""

    source: str
    """What the labels come from: `class folders`, `labels table <file>`, `file names (<regex>)`."""
    root: str
    images_dir: str
    multi_label: bool
    images: int
    """Files listed (rows naming a missing file and unmatched names not counted)."""
    classes: list[str]
    counts: dict[str, int]
    """Images per class (multi-label: images carrying the tag)."""
    rarest: tuple[str, int]
    most_common: tuple[str, int]
    tags: TagStats | None
    sizes: Sizes
    bad: list[BadFile]
    """Files set aside by the listing (missing rows, unmatched names) and files whose header cannot be read."""
    unreadable: int
    """Of `bad`, the files whose header cannot be read."""
    unlabelled: int
    """Images in a labels table's folder that no row names (not used)."""
    split: SplitView
    load_size: LoadSize

    def to_json(self) -> dict:
        out = asdict(self)
        out["sizes"].pop("shorter_sides")
        return out


def inspect_data(data: DataConfig, sample: int = 2000) -> Inspection:
    """Look at the source `data` describes: the listing (training's), the headers of every file
    (`sample` 0, or no more files than `sample`) or of a seeded sample of `sample` of them."""
    if data.format != "folder":
        raise ConfigError("data.format=shards: disttrain inspect reads image files; inspect the image folder the shards "
                          "were prepared from (data.format=folder)")
    listing = list_source(data)
    files = list(listing.train) + list(listing.valid)
    classes = listing.classes
    counts = _class_counts(files, len(classes), listing.multi_label)
    rarest = min(range(len(classes)), key=lambda c: (counts[c], c))  # ties: the first in class order
    common = min(range(len(classes)), key=lambda c: (-counts[c], c))
    sizes, unreadable = read_sizes([path for path, _ in files], sample)
    return Inspection(
        source=_source_name(data),
        root=str(Path(data.root).expanduser()),
        images_dir=str(listing.train_dir),
        multi_label=listing.multi_label,
        images=len(files),
        classes=list(classes),
        counts={classes[c]: int(counts[c]) for c in range(len(classes))},
        rarest=(classes[rarest], int(counts[rarest])),
        most_common=(classes[common], int(counts[common])),
        tags=tag_stats([t for _, t in files]) if listing.multi_label else None,
        sizes=sizes,
        bad=list(listing.bad) + unreadable,
        unreadable=len(unreadable),
        unlabelled=_unlabelled(data, listing),
        split=_split_view(data, listing),
        load_size=suggest_load_size(sizes.shorter["50%"] if sizes.read else None, data.image_size, data.load_size),
    )


def _source_name(data: DataConfig) -> str:
    if data.labels is not None:
        return f"labels table {table_path(data)}"
    if data.label_regex is not None:
        return f"file names (data.label_regex {data.label_regex!r})"
    return "class folders"


def _class_counts(files: list[tuple[Path, Target]], classes: int, multi_label: bool) -> np.ndarray:
    counts = np.zeros(classes, dtype=np.int64)
    for _, target in files:
        counts[list(target) if multi_label else target] += 1
    return counts


def tag_stats(targets: list[tuple[int, ...]], last: int = 6) -> TagStats:
    """Tags per image: min, median, max, images per count (`last` and more gathered as "last+")."""
    per = np.asarray([len(t) for t in targets], dtype=np.int64)
    low, top = int(per.min()), int(per.max())
    distribution = {str(k): int((per == k).sum()) for k in range(min(low, last), min(top, last - 1) + 1)}
    if top >= last:
        distribution[f"{last}+"] = int((per >= last).sum())
    return TagStats(low, float(np.median(per)), top, distribution, int((per == 0).sum()))


def _unlabelled(data: DataConfig, listing: FolderListing) -> int:
    if data.labels is None:
        return 0
    named = {str(path.relative_to(listing.train_dir)) for path, _ in [*listing.train, *listing.valid]}
    return len(set(flat_images(listing.train_dir)) - named)


def _split_view(data: DataConfig, listing: FolderListing) -> SplitView:
    record = listing.split
    if record is None:
        how = f"the folder {listing.valid_dir}"
    elif data.valid_col is None and data.valid_pct == 0:
        how = "none (data.valid_pct=0: trains on every image)"
    else:
        how = record.how
    per_class, no_train = None, []
    if not listing.multi_label:
        names = listing.classes
        if len(names) <= SHOWN_CLASSES:
            valid = _class_counts(listing.valid, len(names), False)
            per_class = {names[c]: int(valid[c]) for c in range(len(names))}
        trained = {target for _, target in listing.train}
        no_train = [name for c, name in enumerate(names) if c not in trained]
    return SplitView(how, len(listing.train), len(listing.valid), per_class, no_train)


def read_header(path: Path) -> tuple[int, int] | str:
    """(width, height) as training sees the image (EXIF orientation 5-8 swaps them), from the header
    alone, or the reason it cannot be read. A PNG's EXIF is read only when it precedes the pixels
    (PIL would decode the image to find a later one)."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(ORIENTATION_TAG, 1) if img.format != "PNG" or "exif" in img.info else 1
    except Exception as err:  # PIL raises many types; every one means "no size to read"
        return f"header unreadable: {type(err).__name__}: {err}".strip()
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def sample_indices(count: int, sample: int) -> np.ndarray:
    """Which of `count` files have their header read: all (`sample` 0 or >= count), else a seeded
    draw of `sample` of them, in listing order."""
    if sample <= 0 or sample >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(SAMPLE_SEED).choice(count, size=sample, replace=False))


def quantiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    found = np.quantile(np.asarray(values), [q for _, q in QUANTILES], method="inverted_cdf")
    return {name: int(v) for (name, _), v in zip(QUANTILES, found)}


def read_sizes(paths: list[Path], sample: int) -> tuple[Sizes, list[BadFile]]:
    """The size quantiles of the headers read (see `sample_indices`) and the files whose header cannot be read."""
    chosen = [paths[i] for i in sample_indices(len(paths), sample)]
    with ThreadPoolExecutor(max_workers=HEADER_THREADS) as pool:
        found = list(pool.map(read_header, chosen))
    sizes = [f for f in found if isinstance(f, tuple)]
    bad = [BadFile(str(path), f) for path, f in zip(chosen, found) if isinstance(f, str)]
    shorter = [min(w, h) for w, h in sizes]
    return Sizes(len(chosen), len(paths), len(chosen) < len(paths), quantiles([w for w, _ in sizes]),
                 quantiles([h for _, h in sizes]), quantiles(shorter), shorter), bad


def suggest_load_size(median_shorter: int | None, image_size: int, current: int) -> LoadSize:
    """The module docstring's rule: the median shorter side rounded down to a multiple of LOAD_STEP
    (a median below LOAD_STEP as it is), at least data.image_size (the smallest load_size a config
    allows) and at most LOAD_CAP (unless image_size is larger)."""
    rule = (f"the median shorter side rounded down to a multiple of {LOAD_STEP} (below {LOAD_STEP}: the median itself), "
            f"kept within [data.image_size ({image_size}), {LOAD_CAP}]")
    if median_shorter is None:
        return LoadSize(max(image_size, current), rule, "no image header could be read: nothing to suggest from; "
                        "data.load_size left as configured", current, image_size)
    rounded = median_shorter // LOAD_STEP * LOAD_STEP if median_shorter >= LOAD_STEP else median_shorter
    suggested = max(image_size, min(rounded, LOAD_CAP))
    if suggested == image_size and rounded < image_size:
        why = (f"the median shorter side {median_shorter} px rounds down to {rounded}, below data.image_size: load_size "
               f"cannot be smaller than the model's input")
        if median_shorter < image_size:
            why += f"; at least half the images are upsampled: a data.image_size of at most {median_shorter} would not"
    elif rounded > suggested:
        why = (f"the median shorter side {median_shorter} px rounds down to {rounded}, capped at {suggested}: larger presizes "
               f"cost decode time and cache memory for detail an input of {image_size} px does not see")
    else:
        why = (f"the median shorter side is {median_shorter} px: at most half the images are upsampled to {suggested}, "
               "and a presize above the median upsamples most of them, which adds no detail")
    return LoadSize(suggested, rule, why, current, image_size)


def _table(rows: list[tuple[str, int]]) -> list[str]:
    width = max(len(name) for name, _ in rows)
    return [f"  {name:<{width}}  {count:>7}" for name, count in rows]


def describe(found: Inspection) -> list[str]:
    """The lines `disttrain inspect` prints."""
    lines = [f"source: {found.source}, images in {found.images_dir}"
             + (" (multi-label: several tags per image)" if found.multi_label else " (one label per image)")]
    kind = "tags" if found.multi_label else "classes"
    lines.append(f"images: {found.images} in {len(found.classes)} {kind}")
    counts = list(found.counts.items())
    if len(counts) <= SHOWN_CLASSES:
        lines.append(f"images per {'tag' if found.multi_label else 'class'}:")
        lines += _table(counts)
    else:
        place = {name: i for i, name in enumerate(found.classes)}  # ties: in class order
        lines.append(f"images per {'tag' if found.multi_label else 'class'}: the 10 rarest of {len(counts)}")
        lines += _table(sorted(counts, key=lambda item: (item[1], place[item[0]]))[:10])
        lines.append("  and the 10 most common")
        lines += _table(sorted(counts, key=lambda item: (-item[1], place[item[0]]))[:10])
    if found.rarest[1] == found.most_common[1]:
        lines.append(f"rarest and most common: every {'tag' if found.multi_label else 'class'} has {found.rarest[1]} images")
    else:
        lines.append(f"rarest: {found.rarest[0]} ({found.rarest[1]} images); most common: {found.most_common[0]} "
                     f"({found.most_common[1]} images)")
    if found.tags is not None:
        t = found.tags
        spread = ", ".join(f"{k}: {n}" for k, n in t.distribution.items())
        lines.append(f"tags per image: min {t.min}, median {t.median:g}, max {t.max} (images per tag count: {spread}); "
                     f"images without any tag: {t.untagged}")
    if found.unlabelled:
        lines.append(f"unlabelled: {found.unlabelled} image(s) in {found.images_dir} that no row of the table names (not used)")
    lines += _describe_sizes(found.sizes)
    lines += _describe_bad(found)
    lines += _describe_split(found.split)
    ls = found.load_size
    lines.append(f"suggested data.load_size: {ls.suggested} (now {ls.current}; data.image_size {ls.image_size})")
    lines.append(f"  rule: {ls.rule}")
    lines.append(f"  why: {ls.why}")
    return lines


def _describe_sizes(sizes: Sizes) -> list[str]:
    which = (f"headers of a seeded sample of {sizes.read} of the {sizes.of} files (seed {SAMPLE_SEED}; --sample 0 reads all)"
             if sizes.sampled else f"headers of all {sizes.read} files")
    if not sizes.shorter:
        return [f"image sizes: none readable ({which})"]
    lines = [f"image sizes in pixels ({which}):", "  " + " " * 8 + "".join(f"{name:>7}" for name, _ in QUANTILES)]
    for label, values in (("width", sizes.width), ("height", sizes.height), ("shorter", sizes.shorter)):
        lines.append(f"  {label:<8}" + "".join(f"{values[name]:>7}" for name, _ in QUANTILES))
    return lines


def _describe_bad(found: Inspection) -> list[str]:
    if not found.bad:
        return ["bad files: none found (headers only: training's scan decodes every file and sets aside what fails; data.bad_files)"]
    listed = len(found.bad) - found.unreadable
    lines = [f"bad files: {len(found.bad)} ({listed} set aside by the listing, {found.unreadable} with an unreadable header; "
             "headers only: training's scan decodes every file and sets aside what fails, data.bad_files)"]
    lines += [f"  {b.path}: {b.reason}" for b in found.bad[:SHOWN_BAD]]
    if len(found.bad) > SHOWN_BAD:
        lines.append(f"  ... and {len(found.bad) - SHOWN_BAD} more (all of them with --json)")
    return lines


def _describe_split(split: SplitView) -> list[str]:
    lines = [f"split: {split.train} train / {split.valid} valid images ({split.how})"]
    if split.valid_per_class is not None and split.valid:
        text = ", ".join(f"{name}: {n}" for name, n in split.valid_per_class.items())
        lines += textwrap.wrap(f"valid per class: {text}", width=110, initial_indent="  ", subsequent_indent="    ")
    if split.no_train:
        shown = ", ".join(split.no_train[:10]) + (f" and {len(split.no_train) - 10} more" if len(split.no_train) > 10 else "")
        lines.append(f"  warning: class(es) {shown} have no training image in this split (training stops); "
                     "set data.stratify=true, or add images")
    return lines


def write_json(found: Inspection, path: Path) -> Path:
    path.write_text(json.dumps(found.to_json(), indent=1) + "\n")
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display (as disttrain/tracking.py's figures)
    import matplotlib.pyplot as plt

    return plt


def plot_inspection(found: Inspection, out_dir: Path) -> list[Path]:
    """`shorter_sides.png` (a histogram of the shorter sides read, the median and the suggested
    load_size marked) and `class_counts.png` (images per class, most common first) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    sides = found.sizes.shorter_sides
    if sides:
        ax.hist(sides, bins=min(50, max(1, len(set(sides)))), color="tab:blue")
        ax.axvline(found.sizes.shorter["50%"], color="black", linestyle="--", label=f"median {found.sizes.shorter['50%']} px")
        ax.axvline(found.load_size.suggested, color="tab:red", label=f"suggested data.load_size {found.load_size.suggested}")
        ax.legend()
    ax.set_xlabel("shorter side (pixels)")
    ax.set_ylabel("images")
    ax.set_title(f"shorter sides of {len(sides)} images" + (" (a seeded sample)" if found.sizes.sampled else ""))
    fig.tight_layout()
    written.append(out_dir / "shorter_sides.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    ranked = sorted(found.counts.items(), key=lambda item: -item[1])
    n = len(ranked)
    fig, ax = plt.subplots(figsize=(min(20, max(6, 0.25 * n + 2)), 4.5))
    ax.bar(range(n), [count for _, count in ranked], color="tab:blue")
    if n <= 100:
        ax.set_xticks(range(n), [name for name, _ in ranked], rotation=90, fontsize=8 if n <= 40 else 6)
    ax.set_ylabel("images")
    ax.set_title(f"images per {'tag' if found.multi_label else 'class'}, {n} {'tags' if found.multi_label else 'classes'}")
    fig.tight_layout()
    written.append(out_dir / "class_counts.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written
