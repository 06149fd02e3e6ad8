"""The lesson's look at the results: which images a model gets most wrong, which classes it mixes up,
and a few images of each kind, as fastai's `ClassificationInterpretation` and lesson 1 show them.

Records: each rank keeps a few scalars per image of its batches (`SampleRecorder`, fed by the
forward pass of `disttrain evaluate`, disttrain/use/evaluate.py): input index, true label, predicted
class (the argmax of the logits, as the confusion matrix counts), the loss (cross-entropy of the
plain pass, float32; TTA does not enter), the probability of the true class, and the margin between
the two highest probabilities. They are gathered from every rank, on every rank, and ordered by
input index (`Records`): no image is kept, so a million-image folder costs a few tens of MB. Every
image is computed in the same global batch on any number of processes (disttrain/use/inputs.py), so the
records, and every file below, are the same on 1 or N processes.

Selections (pure functions of the records, positions into them): the order is always a stable sort
of the records in input order, so ties go to the earlier input and the result is deterministic.
- `top_losses`: the K highest losses, correct or not (fastai's plot_top_losses).
- `random_pick`: K correct (or incorrect) images drawn with a fixed seed, shown in input order.
- `most_correct(c)`: among the correctly predicted images of class c, the highest probability of c.
- `most_incorrect(c)`: among the images of class c predicted wrong, the lowest probability of c
  (the most confidently wrong).
- `most_uncertain`: the smallest margin between the two highest probabilities (for two classes: the
  probability closest to 0.5), whatever the true class.
- `most_confused` (disttrain/metrics.py): (actual, predicted, count) off the diagonal, count >= 1,
  by count, then names.
- `class_scores`: precision, recall, F1 and support per class; a class never predicted has
  precision 0, one without images recall 0, and F1 is 0 when both are 0 (sklearn's zero_division=0).

Files (`write_interpretation`, main process only; matplotlib's Agg backend): `top_losses.png` and
`.csv`, `most_confused.csv`, the confusion files (`confusion_matrix.png` and `.csv`, or past
disttrain.tracking.MATRIX_CLASSES classes `confusion_cells.csv` and `confusion_summary.png`: that module's writer),
`per_class.csv`, `views.csv` (every grid's images: view, rank, path, actual, predicted, loss,
probability of actual, margin) and one grid per view: `random_correct.png`, `random_incorrect.png`,
`most_uncertain.png`, `most_correct_<class>.png`, `most_incorrect_<class>.png` (class names made safe
for file names, `safe_names`). A grid with no candidates (no incorrect image, a class without
images) is not written; the summary line names it. Each tile is titled `predicted / actual / loss /
probability of actual` (2 decimals) and shows what the model saw: the image decoded and presized
again (only the selected ones, by path) and put through the eval view, its normalization undone.
Evaluate draws the random views with seed 0, a run (`train.interpret`, `interpret_run`) with run.seed.

Multi-label (a model whose model.pt says `task: multi_label`): there is no single predicted class, so
no confusion matrix, most-confused pairs or per-class grids. Each image's records are its input index,
its target tags, the float32 logits of the plain pass and its loss (binary cross-entropy with logits
averaged over the tags, no smoothing) (`TagRecords`, `TagRecorder`: C x 5 bytes per image, gathered
as above). A tag is predicted when its probability, computed in float64 as disttrain/multilabel.py
computes it, is strictly above the threshold: the same tags, the same counts as `disttrain evaluate`'s
per-class precision and recall. Files (`write_tag_interpretation`): `top_losses.csv` (rank, path,
actual tags, predicted tags, loss) and `top_losses.png` (each tile titled with the predicted tags,
the actual tags and the loss, one per line), `per_class_errors.csv` (class, false_positives,
false_negatives, support) and its bar chart `per_class_errors.png`, and `per_class.csv` (precision,
recall, F1, support and average precision per class, disttrain.multilabel.per_class_scores).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from disttrain.data.decode import load_presized
from disttrain.metrics import Confusion, most_confused
from disttrain.multilabel import per_class_scores
from disttrain.tracking import write_confusion

TITLE = "predicted / actual / loss / probability of actual"
TOP_COLUMNS = ("actual", "predicted", "loss", "probability_actual")
"""The columns of `Interpretation.top` after the image (the W&B table's)."""
TAG_TOP_COLUMNS = ("actual", "predicted", "loss")
"""... multi-label: the tags, space-separated."""
DEFAULT_K = 9
"""Images per grid (and rows of top_losses.csv), fastai's plot_top_losses(9)."""


@dataclass
class Records:
    """Per-image scalars, one entry per image that decoded, in input order (see the module docstring)."""

    index: torch.Tensor
    """int64: the image's position in the listing (its path is paths[index])."""
    label: torch.Tensor
    """int64: the true class."""
    predicted: torch.Tensor
    """int64: the argmax of the logits."""
    loss: torch.Tensor
    """float32: cross-entropy of the plain pass."""
    p_actual: torch.Tensor
    """float32: the probability of the true class."""
    margin: torch.Tensor
    """float32: the highest probability minus the second highest (1 with a single class)."""

    def __len__(self) -> int:
        return len(self.index)

    @property
    def correct(self) -> torch.Tensor:
        return self.predicted == self.label

    @classmethod
    def from_logits(cls, index, logits: torch.Tensor, labels: torch.Tensor) -> "Records":
        """The records of a batch: input indices, float logits (N, C), true labels (N)."""
        logits = logits.float()
        probs = logits.softmax(dim=1)
        top = probs.topk(min(2, probs.shape[1]), dim=1).values
        margin = top[:, 0] - top[:, 1] if top.shape[1] > 1 else torch.ones_like(top[:, 0])
        return cls(torch.as_tensor(index, dtype=torch.int64).cpu(), labels.long().cpu(), logits.argmax(dim=1).cpu(),
                   F.cross_entropy(logits, labels, reduction="none").cpu(), probs.gather(1, labels[:, None].long())[:, 0].cpu(),
                   margin.cpu())

    @classmethod
    def empty(cls) -> "Records":
        ints, floats = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float32)
        return cls(ints, ints, ints, floats, floats, floats)

    @classmethod
    def cat(cls, parts: list["Records"]) -> "Records":
        """Parts (from batches, from ranks) as one, ordered by input index."""
        if not parts:
            return cls.empty()
        names = ("index", "label", "predicted", "loss", "p_actual", "margin")
        joined = cls(*(torch.cat([getattr(part, name) for part in parts]) for name in names))
        order = torch.sort(joined.index, stable=True).indices
        return cls(*(getattr(joined, name)[order] for name in names))


class SampleRecorder:
    """One rank's records, batch by batch (a few scalars per image, on the CPU)."""

    def __init__(self):
        self.parts: list[Records] = []

    def add(self, index, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.parts.append(Records.from_logits(index, logits.detach(), labels))

    def gather(self, group) -> Records:
        """Every rank's records, in input order, on every rank (`group`: a disttrain.dist.jobgroup.JobGroup,
        which waits for the slowest rank)."""
        return Records.cat(group.gather(Records.cat(self.parts)))


# -- selections: positions into the records --------------------------------------------------------


def _ranked(values: torch.Tensor, mask: torch.Tensor, descending: bool, k: int) -> list[int]:
    """The positions where `mask` holds, by `values` (ties: input order), the first `k`."""
    positions = mask.nonzero().flatten()
    order = torch.sort(values[positions], descending=descending, stable=True).indices[:k]
    return positions[order].tolist()


def top_losses(records: Records, k: int) -> list[int]:
    """The `k` highest losses, highest first."""
    return _ranked(records.loss, torch.ones(len(records), dtype=torch.bool), True, k)


def most_uncertain(records: Records, k: int) -> list[int]:
    """The `k` smallest margins between the two highest probabilities, smallest first."""
    return _ranked(records.margin, torch.ones(len(records), dtype=torch.bool), False, k)


def most_correct(records: Records, label: int, k: int) -> list[int]:
    """Class `label`'s correctly predicted images, highest probability of the class first."""
    return _ranked(records.p_actual, (records.label == label) & records.correct, True, k)


def most_incorrect(records: Records, label: int, k: int) -> list[int]:
    """Class `label`'s images predicted as another class, lowest probability of `label` first."""
    return _ranked(records.p_actual, (records.label == label) & ~records.correct, False, k)


def random_pick(records: Records, correct: bool, k: int, seed: int = 0) -> list[int]:
    """`k` of the correctly (or incorrectly) predicted images, drawn with `seed`, in input order."""
    positions = (records.correct == correct).nonzero().flatten()
    drawn = torch.randperm(len(positions), generator=torch.Generator().manual_seed(seed))[:k]
    return sorted(positions[drawn].tolist())


def confusion(records: Records, num_classes: int) -> Confusion:
    """The confusion matrix of the records (row = true class, column = predicted), as its nonzero cells."""
    return Confusion.from_labels(records.label, records.predicted, num_classes)


@dataclass
class ClassScore:
    name: str
    precision: float
    recall: float
    f1: float
    support: int


def class_scores(matrix: Confusion, classes: list[str]) -> list[ClassScore]:
    """Precision, recall, F1 and support (images of the class) per class; 0 where a denominator is 0
    (a class never predicted: precision 0; without images: recall 0; both 0: F1 0)."""
    scores = []
    columns = zip(matrix.correct().tolist(), matrix.support().tolist(), matrix.predictions().tolist())
    for name, (hit, support, predicted) in zip(classes, columns):
        precision = hit / predicted if predicted else 0.0
        recall = hit / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores.append(ClassScore(name, precision, recall, f1, support))
    return scores


def safe_names(classes: list[str]) -> list[str]:
    """A file-name-safe form of each class name (letters, digits, `.`, `_`, `-`), unique (a name
    that two classes would share gets the class index appended)."""
    safe = [re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "class" for name in classes]
    seen: dict[str, int] = {}
    for name in safe:
        seen[name] = seen.get(name, 0) + 1
    return [f"{name}_{i}" if seen[name] > 1 else name for i, name in enumerate(safe)]


@dataclass
class View:
    """One grid: its file stem, heading, the selected positions (grid order) and, for the summary,
    what it shows (`kind`, and the class for the per-class views)."""

    name: str
    heading: str
    rows: list[int]
    kind: str
    label: int | None = None


def select_views(records: Records, classes: list[str], k: int, seed: int = 0) -> list[View]:
    """Every grid, in the order they are written: top losses, random correct and incorrect, most
    uncertain, then the most correct and most incorrect of each class."""
    views = [
        View("top_losses", f"top losses: {TITLE}", top_losses(records, k), "top_losses"),
        View("random_correct", f"correct, at random: {TITLE}", random_pick(records, True, k, seed), "random_correct"),
        View("random_incorrect", f"incorrect, at random: {TITLE}", random_pick(records, False, k, seed), "random_incorrect"),
        View("most_uncertain", f"most uncertain (smallest top-2 margin): {TITLE}", most_uncertain(records, k), "most_uncertain"),
    ]
    names = safe_names(classes)
    for label, (name, safe) in enumerate(zip(classes, names)):
        views.append(View(f"most_correct_{safe}", f"most correct {name}: {TITLE}", most_correct(records, label, k), "most_correct", label))
    for label, (name, safe) in enumerate(zip(classes, names)):
        views.append(View(f"most_incorrect_{safe}", f"most incorrect {name} (most confidently wrong): {TITLE}",
                          most_incorrect(records, label, k), "most_incorrect", label))
    return views


# -- files ---------------------------------------------------------------------------------------


@dataclass
class Interpretation:
    """What `write_interpretation` wrote into `folder`."""

    folder: Path
    files: list[str] = field(default_factory=list)
    empty: list[View] = field(default_factory=list)
    """Views with no candidates (not written)."""
    grids: list[str] = field(default_factory=list)
    """The grid PNGs written (file names), top_losses.png first."""
    top: list[tuple] = field(default_factory=list)
    """The top losses: (what the model saw, actual, predicted, loss, probability of actual); multi-label
    (what the model saw, actual tags, predicted tags, loss)."""
    columns: tuple[str, ...] = TOP_COLUMNS
    """The names of `top`'s values after the image (W&B's table columns)."""

    def lines(self, classes: list[str]) -> list[str]:
        """The summary: what was written where, and which views had no candidates."""
        per_class = {"most_correct": 0, "most_incorrect": 0}
        shown = []
        for name in self.files:
            kind = next((k for k in per_class if name.startswith(k + "_")), None)
            if kind is None:
                shown.append(name)
            else:
                per_class[kind] += 1
        shown += [f"{kind}_<class>.png for {n} of {len(classes)} classes" for kind, n in per_class.items() if n]
        lines = [f"interpret: {len(self.files)} file(s) in {self.folder}: {', '.join(shown)}"]
        if self.empty:
            empty = [f"{v.name}.png" for v in self.empty if v.label is None]
            for kind in per_class:
                names = [classes[v.label] for v in self.empty if v.kind == kind]
                if names:
                    more = f", ... ({len(names)} in all)" if len(names) > 10 else ""
                    empty.append(f"{kind}_<class>.png of {', '.join(names[:10])}{more}")
            lines.append(f"interpret: no images to show, not written: {'; '.join(empty)}")
        return lines


def _number(value: float) -> str:
    return f"{value:.6f}"


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def seen_images(paths: list[str], load_size: int, view) -> tuple[np.ndarray, list[bool]]:
    """What the model saw of each file: decoded and presized to `load_size` as the loader does, then
    the eval `view` (a DeviceAugment: its resample, `view(x, train=False)`), its normalization undone;
    uint8 (N, S, S, 3) on the CPU, and whether each file still decoded (one that no longer does is a
    grey square)."""
    arrays, ok = [], []
    for path in paths:
        try:
            arrays.append(load_presized(path, load_size))
            ok.append(True)
        except Exception:  # changed or removed since it was evaluated
            arrays.append(np.full((load_size, load_size, 3), 128, dtype=np.uint8))
            ok.append(False)
    if not arrays:
        return np.zeros((0, view.image_size, view.image_size, 3), dtype=np.uint8), ok
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    with torch.no_grad():
        x = view(batch, train=False).float().cpu()
        x = x * torch.tensor(view.std).view(1, 3, 1, 1) + torch.tensor(view.mean).view(1, 3, 1, 1)
    return x.mul_(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy(), ok


def plot_grid(images: np.ndarray, titles: list[str], heading: str, path: Path) -> None:
    """`images` (uint8 N, S, S, 3) in a near-square grid, each under its title, the heading on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image)
        ax.set_title(title, fontsize=8)
    fig.suptitle(heading, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_interpretation(records: Records, paths: list[str], classes: list[str], folder: Path, k: int, load_size: int,
                         view, seed: int = 0) -> Interpretation:
    """Every file of the module docstring into `folder` (made if missing), from the gathered records
    (`paths`: the listing the records' indices point into; `load_size` and `view`: the presize and
    eval view the model saw them through; `seed`: the random views'). Call on the main process only."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    out = Interpretation(folder)

    def row(pos: int) -> list:
        return [paths[int(records.index[pos])], classes[int(records.label[pos])], classes[int(records.predicted[pos])],
                _number(float(records.loss[pos])), _number(float(records.p_actual[pos]))]

    views = select_views(records, classes, k, seed)
    top = views[0]
    _write_csv(folder / "top_losses.csv", ["rank", "path", "actual", "predicted", "loss", "probability_actual"],
               ([rank + 1, *row(pos)] for rank, pos in enumerate(top.rows)))
    matrix = confusion(records, len(classes))
    _write_csv(folder / "most_confused.csv", ["actual", "predicted", "count"], most_confused(matrix, classes))
    matrix_files = write_confusion(matrix, classes, folder)
    _write_csv(folder / "per_class.csv", ["class", "precision", "recall", "f1", "support"],
               ([s.name, _number(s.precision), _number(s.recall), _number(s.f1), s.support] for s in class_scores(matrix, classes)))
    _write_csv(folder / "views.csv", ["view", "rank", "path", "actual", "predicted", "loss", "probability_actual", "margin"],
               ([grid.name, rank + 1, *row(pos), _number(float(records.margin[pos]))]
                for grid in views for rank, pos in enumerate(grid.rows)))
    out.files += ["top_losses.csv", "most_confused.csv", *matrix_files, "per_class.csv", "views.csv"]
    for grid in views:
        if not grid.rows:
            out.empty.append(grid)
            continue
        images, ok = seen_images([paths[int(records.index[pos])] for pos in grid.rows], load_size, view)
        shown = [(classes[int(records.label[pos])], classes[int(records.predicted[pos])], float(records.loss[pos]),
                  float(records.p_actual[pos])) for pos in grid.rows]
        titles = [f"{predicted} / {actual} / {loss:.2f} / {p:.2f}" + ("" if fine else " (unreadable now)")
                  for (actual, predicted, loss, p), fine in zip(shown, ok)]
        name = f"{grid.name}.png"
        plot_grid(images, titles, grid.heading, folder / name)
        out.files.append(name)
        out.grids.append(name)
        if grid is top:
            out.top = [(image, *values) for image, values in zip(images, shown)]
    return out


# -- multi-label ---------------------------------------------------------------------------------

TAG_TITLE = "predicted tags / actual tags / loss, one per line"
BAR_CLASSES = 50
"""Classes shown in per_class_errors.png: all up to this many, else the ones with the most errors."""


@dataclass
class TagRecords:
    """Per-image values of a multi-label evaluation, one entry per image that decoded, in input order."""

    index: torch.Tensor
    """int64 (N): the image's position in the listing."""
    target: torch.Tensor
    """bool (N, C): its true tags."""
    logits: torch.Tensor
    """float32 (N, C): the plain pass."""
    loss: torch.Tensor
    """float32 (N): binary cross-entropy with logits, averaged over the C tags."""

    def __len__(self) -> int:
        return len(self.index)

    @classmethod
    def from_logits(cls, index, logits: torch.Tensor, targets: torch.Tensor) -> "TagRecords":
        """The records of a batch: input indices, float logits (N, C), multi-hot targets (N, C; any dtype)."""
        logits = logits.float()
        loss = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none").mean(dim=1)
        return cls(torch.as_tensor(index, dtype=torch.int64).cpu(), (targets != 0).cpu(), logits.cpu(), loss.cpu())

    @classmethod
    def cat(cls, parts: list["TagRecords"], classes: int) -> "TagRecords":
        """Parts (from batches, from ranks) as one, ordered by input index."""
        if not parts:
            return cls(torch.zeros(0, dtype=torch.int64), torch.zeros(0, classes, dtype=torch.bool), torch.zeros(0, classes),
                       torch.zeros(0))
        names = ("index", "target", "logits", "loss")
        joined = cls(*(torch.cat([getattr(part, name) for part in parts]) for name in names))
        order = torch.sort(joined.index, stable=True).indices
        return cls(*(getattr(joined, name)[order] for name in names))

    def probabilities(self) -> np.ndarray:
        """float64 (N, C) sigmoid of the logits, computed as disttrain.multilabel.MultiLabelSums computes
        them (so a tag is above the threshold here exactly where it is there)."""
        with np.errstate(over="ignore"):  # exp(-logit) is inf below logit -709: the probability is 0
            return 1 / (1 + np.exp(-self.logits.numpy().astype(np.float64)))

    def predicted(self, threshold: float) -> np.ndarray:
        """bool (N, C): the tags whose probability is strictly above `threshold`."""
        return self.probabilities() > threshold


class TagRecorder:
    """One rank's multi-label records, batch by batch (on the CPU), as `SampleRecorder`."""

    def __init__(self, classes: int):
        self.classes = classes
        self.parts: list[TagRecords] = []

    def add(self, index, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.parts.append(TagRecords.from_logits(index, logits.detach(), targets))

    def gather(self, group) -> TagRecords:
        """Every rank's records, in input order, on every rank (`group`: a JobGroup)."""
        return TagRecords.cat(group.gather(TagRecords.cat(self.parts, self.classes)), self.classes)


@dataclass
class TagErrors:
    """One class's mistakes at the threshold."""

    name: str
    false_positives: int
    """Images predicted to have the tag that do not."""
    false_negatives: int
    """Images that have the tag, not predicted."""
    support: int
    """Images that have the tag."""


def tag_errors(records: TagRecords, classes: list[str], threshold: float) -> list[TagErrors]:
    """Per class, in class order: false positives, false negatives and support at `threshold`."""
    predicted, true = records.predicted(threshold), records.target.numpy()
    fp, fn, support = (predicted & ~true).sum(axis=0), (~predicted & true).sum(axis=0), true.sum(axis=0)
    return [TagErrors(name, int(fp[c]), int(fn[c]), int(support[c])) for c, name in enumerate(classes)]


def tag_names(row: np.ndarray, classes: list[str]) -> str:
    """The tags of a bool row, space-separated in class order (as predict's `labels` column)."""
    return " ".join(classes[c] for c in np.flatnonzero(row))


def plot_tag_errors(errors: list[TagErrors], threshold: float, path: Path) -> None:
    """Bars of each class's false positives and false negatives at `threshold` (up to BAR_CLASSES classes: beyond,
    the ones with the most errors, the title says so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown, note = errors, ""
    if len(errors) > BAR_CLASSES:
        ranked = sorted(range(len(errors)), key=lambda c: (-(errors[c].false_positives + errors[c].false_negatives), c))
        shown = [errors[c] for c in sorted(ranked[:BAR_CLASSES])]
        note = f" (the {BAR_CLASSES} of {len(errors)} classes with the most errors)"
    x = np.arange(len(shown))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(shown) + 1.5), 3.8))
    ax.bar(x - 0.2, [e.false_positives for e in shown], 0.4, label="false positives")
    ax.bar(x + 0.2, [e.false_negatives for e in shown], 0.4, label="false negatives")
    ax.set_xticks(x, [e.name for e in shown], rotation=90 if len(shown) > 12 else 0, fontsize=8)
    ax.set_ylabel("images")
    ax.set_title(f"per-class errors at threshold {threshold:g}{note}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_tag_interpretation(records: TagRecords, paths: list[str], classes: list[str], folder: Path, k: int, load_size: int,
                             view, threshold: float) -> Interpretation:
    """The multi-label files of the module docstring into `folder` (made if missing), from the
    gathered records at `threshold` (the one evaluate reports); main process only."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    out = Interpretation(folder, columns=TAG_TOP_COLUMNS)
    predicted, true = records.predicted(threshold), records.target.numpy()
    rows = top_losses(records, k)

    def shown(pos: int) -> tuple[str, str, str, float]:
        return (paths[int(records.index[pos])], tag_names(true[pos], classes), tag_names(predicted[pos], classes),
                float(records.loss[pos]))

    top = [shown(pos) for pos in rows]
    _write_csv(folder / "top_losses.csv", ["rank", "path", "actual", "predicted", "loss"],
               ([rank + 1, path, actual, guess, _number(loss)] for rank, (path, actual, guess, loss) in enumerate(top)))
    errors = tag_errors(records, classes, threshold)
    _write_csv(folder / "per_class_errors.csv", ["class", "false_positives", "false_negatives", "support"],
               ([e.name, e.false_positives, e.false_negatives, e.support] for e in errors))
    plot_tag_errors(errors, threshold, folder / "per_class_errors.png")
    scores = per_class_scores(records.probabilities(), true, threshold)
    _write_csv(folder / "per_class.csv", ["class", "precision", "recall", "f1", "support", "ap"],
               ([name, _number(s["precision"]), _number(s["recall"]), _number(s["f1"]), s["support"],
                 "" if s["ap"] is None else _number(s["ap"])] for name, s in zip(classes, scores)))
    out.files += ["top_losses.csv", "per_class_errors.csv", "per_class_errors.png", "per_class.csv"]
    if not rows:
        out.empty.append(View("top_losses", "", [], "top_losses"))
        return out
    images, ok = seen_images([path for path, *_ in top], load_size, view)
    titles = [f"{guess or '(none)'}\n{actual or '(none)'}\n{loss:.2f}" + ("" if fine else " (unreadable now)")
              for (_, actual, guess, loss), fine in zip(top, ok)]
    plot_grid(images, titles, f"top losses (binary cross-entropy per image): {TAG_TITLE}", folder / "top_losses.png")
    out.files.append("top_losses.png")
    out.grids.append("top_losses.png")
    out.top = [(image, actual, guess, loss) for image, (_, actual, guess, loss) in zip(images, top)]
    return out
