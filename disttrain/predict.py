"""`disttrain predict`: class probabilities for new images from a model.pt alone, on one process or
many. Each rank decodes and predicts its own contiguous share of the inputs; the main process
gathers the rows and writes them in input order (files as given, a folder's files sorted by path),
so the CSV is the same whatever the number of processes."""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from disttrain.data.decode import load_presized
from disttrain.data.folder import DataError
from disttrain.inference import SavedModel, eval_view, load_saved_model, predict_probs


def list_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, folders searched recursively (sorted paths; hidden files left out)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{item}: no such file or folder")
    if not files:
        raise DataError(f"no files to predict in {', '.join(inputs)}")
    return files


def share(count: int, world: int, rank: int) -> range:
    """This rank's contiguous part of `count` items (sizes differ by at most one)."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class _Images(Dataset):
    def __init__(self, paths: list[Path], indices: range, load_size: int):
        self.paths, self.indices, self.load_size = paths, indices, load_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        try:
            return index, torch.from_numpy(load_presized(self.paths[index], self.load_size)), ""
        except Exception as err:  # any decoder error means "not an image we can read"
            reason = f"{type(err).__name__}: {err}".strip() if str(err) else type(err).__name__
            return index, None, reason


def _collate(items):
    good = [(i, img) for i, img, _ in items if img is not None]
    bad = [(i, reason) for i, img, reason in items if img is None]
    images = torch.stack([img for _, img in good]).permute(0, 3, 1, 2).contiguous() if good else None
    return [i for i, _ in good], images, bad


@dataclass
class Prediction:
    rows: list[tuple[int, list[float]]]
    """(input index, class probabilities) for every image predicted, in input order."""
    bad: list[tuple[int, str]]
    """(input index, reason) for every file that could not be decoded."""
    seconds: float


def predict(accelerator, saved: SavedModel, paths: list[Path], batch_size: int = 32, workers: int = 1, tta_n: int = 0,
            tta_beta: float = 0.25, tta_max: bool = False, progress: bool = True) -> Prediction:
    """Every rank predicts its share; the main process gets all rows (others get theirs only)."""
    from accelerate.utils import gather_object
    from tqdm import tqdm

    indices = share(len(paths), accelerator.num_processes, accelerator.process_index)
    loader = DataLoader(_Images(paths, indices, saved.load_size), batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    view = eval_view(saved.image_size, saved.mean, saved.std)
    rows, bad = [], []
    start = time.perf_counter()
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not (progress and accelerator.is_main_process), file=sys.stderr)
    with torch.no_grad():
        for index, images, failed in loader:
            bad.extend(failed)
            if images is not None:
                x = view(images.to(accelerator.device), train=False)
                plain, tta = predict_probs(saved.model, x, accelerator.autocast, tta_n, tta_beta, tta_max)
                rows.extend(zip(index, (tta if tta is not None else plain).cpu().tolist()))
            bar.update(min((len(index) + len(failed)) * accelerator.num_processes, bar.total - bar.n))  # an estimate of all ranks
    bar.close()
    if accelerator.num_processes > 1:
        rows, bad = gather_object(rows), gather_object(bad)
    seconds = time.perf_counter() - start
    return Prediction(sorted(rows), sorted(bad), seconds)


def write_csv(stream, paths: list[Path], classes: list[str], rows: list[tuple[int, list[float]]]) -> None:
    """`path, label, score, <one probability column per class>`, one row per predicted image."""
    writer = csv.writer(stream)
    writer.writerow(["path", "label", "score", *classes])
    for index, probs in rows:
        best = max(range(len(probs)), key=probs.__getitem__)
        writer.writerow([str(paths[index]), classes[best], f"{probs[best]:.6f}", *(f"{p:.6f}" for p in probs)])


def run(weights: str, inputs: list[str], out: str | None, topk: int, tta_n: int, tta_beta: float, tta_max: bool,
        batch_size: int, workers: int, precision: str) -> Prediction:
    from disttrain.config import build_config
    from disttrain.runtime import build_accelerator

    accelerator = build_accelerator(build_config({"train": {"precision": precision}}))
    saved = load_saved_model(weights, accelerator.device)
    paths = list_inputs(inputs)
    result = predict(accelerator, saved, paths, batch_size, workers, tta_n, tta_beta, tta_max)
    if accelerator.is_main_process:
        for index, reason in result.bad:
            print(f"skipped {paths[index]}: {reason}", file=sys.stderr)
        if out:
            with open(out, "w", newline="") as stream:
                write_csv(stream, paths, saved.classes, result.rows)
        elif len(paths) == 1 and result.rows:
            probs = result.rows[0][1]
            for c in sorted(range(len(probs)), key=lambda c: (-probs[c], c))[:topk]:
                print(f"{saved.classes[c]}\t{probs[c]:.4f}")
        else:
            write_csv(sys.stdout, paths, saved.classes, result.rows)
        tta = f", TTA {tta_n} views" if tta_n else ""
        where = f" -> {out}" if out else ""
        print(f"predicted {len(result.rows)} image(s){where}, {len(result.bad)} skipped (not decodable){tta}; "
              f"{len(result.rows) / max(result.seconds, 1e-9):.1f} images/s on {accelerator.num_processes} process(es)",
              file=sys.stderr)
    accelerator.end_training()
    return result
