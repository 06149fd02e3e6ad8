"""The ants/bees fine-tuning recipe from class folders against the same photos as a flat folder
labelled by a CSV, in one run: the accuracy a data source reaches should not depend on how it is
laid out.

    python benchmarks/csv_source.py [--seeds 0,1] [--nproc N] [--json OUT] [key=value ...]

Needs ../shared/data/hymenoptera (train/ and val/ class folders) and ../shared/weights (the recipe's
ImageNet MobileNetV2); without them it says so and exits 0.

The flat copies: every photo of train/ and val/ copied into one `train/` folder as `<id>.jpg` (the
GIF placeholder keeps its bytes under the .jpg name: disttrain decodes by content) and a `labels.csv`
(`id,label,is_valid`, ids without a suffix, `is_valid` true for the val/ photos); the ids `p0001`...
numbered in a seeded random order (neither the id nor the order tells the class), and in a second
copy in the folders' own listing order. Four sources, the recipe (configs/finetune.yaml) unchanged
otherwise, each trained with run.seed = every --seeds value:

  folders                data.root=../shared/data/hymenoptera (train/ for training, val/ for validation)
  csv-ordered+valid_col  the copy in listing order, data.labels=labels.csv data.suffix=.jpg
                         data.valid_col=is_valid: the same photos in the same order as the folders, so
                         with the same seed the run should match the folders' to the last digit (an
                         identity check of the CSV source)
  csv+valid_col          the same with the shuffled ids: the same training and validation photos, in
                         another order (another draw of the batches and of the LR sweeps' curves), so
                         the accuracy should match the folders' to the noise of the seeds
  csv+valid_pct          the shuffled copy, data.valid_pct=0.2 (data.split_seed 42, the config's
                         default): a seeded fifth of all 398 photos for validation, so the validation
                         set (80 photos) and the training set (318, not 245) both differ from the
                         folders': same recipe, another question (--vary-split draws it with
                         split_seed 42 + seed instead)

Printed: one row per run (final valid accuracy and loss of the last stage, validation images,
wall time of the launched job; a run that stops, such as a stage whose LR sweep has no suggestion,
is a row with its error line), then per source the mean and the spread (max - min) over the seeds
whose runs finished, and the difference of each source's mean from the folders'. Each run takes
1.5-2 minutes on 2 CPU processes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from multilabel import REPO, launch_options  # noqa: E402  benchmarks/multilabel.py: the same choice of processes

SHARED = REPO.parent / "shared"
PHOTOS = SHARED / "data" / "hymenoptera"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet.pt"
CONFIG = "configs/finetune.yaml"


def flat_copy(photos: Path, dest: Path, seed: int | None = 0) -> tuple[int, int]:
    """`dest/train/<id>.jpg` for every photo of `photos`' train/ and val/ class folders, and
    `dest/labels.csv` (id,label,is_valid); (train photos, val photos). The ids are numbered in a
    random order drawn with `seed`, or with None in the folders' own listing order (train/ then val/,
    classes and names sorted, as disttrain lists class folders). Written once (a marker)."""
    marker = dest / ".complete.json"
    order_name = "listing" if seed is None else f"seed {seed}"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("order") == order_name and info.get("photos") == str(photos):
            return info["train"], info["valid"]
    from disttrain.data.decode import IMAGE_EXTENSIONS

    found = []
    for part in ("train", "val"):
        for cls_dir in sorted(p for p in (photos / part).iterdir() if p.is_dir()):
            for file in sorted(cls_dir.iterdir()):
                if file.is_file() and not file.name.startswith(".") and file.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append((file, cls_dir.name, part == "val"))
    order = np.arange(len(found)) if seed is None else np.random.default_rng(seed).permutation(len(found))
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "train").mkdir(parents=True)
    rows = []
    for number, index in enumerate(order.tolist(), start=1):
        file, label, is_valid = found[index]
        ident = f"p{number:04d}"
        shutil.copyfile(file, dest / "train" / f"{ident}.jpg")
        rows.append((ident, label, "true" if is_valid else "false"))
    rows.sort()
    with (dest / "labels.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["id", "label", "is_valid"])
        writer.writerows(rows)
    counts = (sum(1 for *_, v in found if not v), sum(1 for *_, v in found if v))
    marker.write_text(json.dumps({"train": counts[0], "valid": counts[1], "order": order_name, "photos": str(photos)}))
    return counts


def sources(flat: Path, ordered: Path, vary_split: bool) -> dict[str, callable]:
    """Each source's overrides for a run.seed."""
    table = ["data.labels=labels.csv", "data.images=train", "data.suffix=.jpg"]
    return {
        "folders": lambda seed: [f"data.root={PHOTOS}"],
        "csv+valid_col": lambda seed: [f"data.root={flat}", *table, "data.valid_col=is_valid"],
        "csv-ordered+valid_col": lambda seed: [f"data.root={ordered}", *table, "data.valid_col=is_valid"],
        "csv+valid_pct": lambda seed: [f"data.root={flat}", *table, "data.valid_pct=0.2", f"data.split_seed={42 + seed if vary_split else 42}"],
    }


def run_logged(cmd: list[str], log: Path, env: dict, label: str) -> tuple[int, float, str]:
    """Run `cmd` from the repository root with its output in `log`: (exit code, seconds, the error
    line of a failed run: its last `disttrain: error:` line, else its last line), printed when it failed."""
    start = time.perf_counter()
    with log.open("w") as sink:
        code = subprocess.run(cmd, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - start
    error = ""
    if code != 0:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        error = next((line for line in reversed(lines) if line.startswith("disttrain: error:")), lines[-1] if lines else "")
        print(f"[{label}] FAILED (exit {code}) after {seconds:.1f} s: {error}  (log {log})", flush=True)
    return code, seconds, error


def run_one(name: str, overrides: list[str], seed: int, out: Path, nproc: int | None, extra: list[str], env: dict) -> dict:
    run_name = f"{name.replace('+', '-')}-seed{seed}"
    cmd = [sys.executable, "-m", "disttrain.cli", "launch", *launch_options(nproc), "launch/train.py", "--config", CONFIG,
           *overrides, f"run.seed={seed}", f"run.output_dir={out}", f"run.name={run_name}", "log.progress=false", *extra]
    print(f"[{name} seed {seed}] {' '.join(cmd)}", flush=True)
    code, seconds, error = run_logged(cmd, out / f"{run_name}.log", env, f"{name} seed {seed}")
    run_dir = out / run_name
    if code != 0:  # a run that stops (a sweep without a suggestion: exit 2) is a row of the table, not the end of it
        return {"source": name, "seed": seed, "accuracy": None, "valid_loss": None, "valid_images": None, "wall_s": seconds,
                "failed": f"exit {code}: {error}", "run_dir": str(run_dir)}
    last = json.loads((run_dir / "results.json").read_text())["epochs"][-1]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    split = run_dir / "split.json"
    valid = len(json.loads(split.read_text())["valid"]) if split.exists() else sum(1 for _ in PHOTOS.glob("val/*/*"))
    result = {"source": name, "seed": seed, "accuracy": last["accuracy"], "valid_loss": last["valid_loss"], "valid_images": valid,
              "wall_s": seconds, "evaluations": sum(1 for r in rows if "valid/loss" in r), "run_dir": str(run_dir)}
    print(f"[{name} seed {seed}] accuracy {result['accuracy']:.4f}, valid loss {result['valid_loss']:.4f}, "
          f"{valid} validation images, {seconds:.1f} s", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1", help="run.seed values, each source trained once per seed")
    p.add_argument("--sources", default="folders,csv-ordered+valid_col,csv+valid_col,csv+valid_pct",
                   help="which sources to run, comma-separated")
    p.add_argument("--vary-split", action="store_true", help="csv+valid_pct: data.split_seed = 42 + seed (default: 42 for every seed)")
    p.add_argument("--nproc", type=int, default=None, help="processes per run (default: 2 on CPU, one per GPU)")
    p.add_argument("--flat", default=None, help="where the flat copy is written once (default: a temp folder)")
    p.add_argument("--out", default=None, help="run dirs and logs (default: a temp dir, removed at the end; kept when a run fails)")
    p.add_argument("--json", default=None, help="write every run's figures here")
    p.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    args = p.parse_intermixed_args()

    missing = [str(path) for path in (PHOTOS / "train", PHOTOS / "val", WEIGHTS) if not path.exists()]
    if missing:
        print(f"skipped: the ants/bees recipe needs {', '.join(missing)} (../shared beside the repository)")
        return
    scratch = Path(tempfile.mkdtemp(prefix="csv-source-"))
    flat = Path(args.flat).expanduser() if args.flat else scratch / "antsbees-csv"
    out = Path(args.out).expanduser() if args.out else scratch / "runs"
    out.mkdir(parents=True, exist_ok=True)
    ordered = flat.with_name(flat.name + "-ordered")
    chosen = args.sources.split(",")
    n_train, n_valid = flat_copy(PHOTOS, flat)
    if "csv-ordered+valid_col" in chosen:
        flat_copy(PHOTOS, ordered, seed=None)
    print(f"flat copy: {flat}/train ({n_train} train + {n_valid} val photos as <id>.jpg) and labels.csv (id,label,is_valid); "
          f"machine: {os.cpu_count()} cores", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("WANDB_MODE", "offline")

    seeds = [int(s) for s in args.seeds.split(",")]
    table = sources(flat, ordered, args.vary_split)
    unknown = [s for s in chosen if s not in table]
    if unknown:
        sys.exit(f"--sources: unknown {unknown}; choose from {list(table)}")
    runs = []
    for seed in seeds:  # seed by seed, every source: a drift of the machine's speed touches all sources alike
        for name in chosen:
            runs.append(run_one(name, table[name](seed), seed, out, args.nproc, args.overrides, env))

    print(f"\n{'source':<24}{'seed':>5}{'accuracy':>10}{'valid loss':>12}{'valid imgs':>12}{'wall s':>9}")
    for r in runs:
        if r.get("failed"):
            print(f"{r['source']:<24}{r['seed']:>5}  failed after {r['wall_s']:.1f} s: {r['failed']}")
            continue
        print(f"{r['source']:<24}{r['seed']:>5}{r['accuracy']:>10.4f}{r['valid_loss']:>12.4f}{r['valid_images']:>12}{r['wall_s']:>9.1f}")
    print(f"\n{'source':<24}{'runs':>5}{'mean accuracy':>14}{'spread':>9}{'mean loss':>11}{'vs folders':>12}{'mean wall s':>13}")
    means = {}
    for name in chosen:
        rows = [r for r in runs if r["source"] == name and not r.get("failed")]
        if not rows:
            print(f"{name:<24}{0:>5}  (every run failed)")
            continue
        acc = [r["accuracy"] for r in rows]
        means[name] = statistics.mean(acc)
        diff = f"{means[name] - means['folders']:+.4f}" if "folders" in means and name != "folders" else ""
        print(f"{name:<24}{len(rows):>5}{means[name]:>14.4f}{max(acc) - min(acc):>9.4f}{statistics.mean(r['valid_loss'] for r in rows):>11.4f}"
              f"{diff:>12}{statistics.mean(r['wall_s'] for r in rows):>13.1f}")
    print("(spread: max - min over the seeds; one validation image is "
          f"{1 / n_valid:.4f} of the folders' accuracy)")
    if args.json:
        Path(args.json).expanduser().write_text(json.dumps(runs, indent=1) + "\n")
        print(f"wrote {args.json}")
    shutil.rmtree(scratch, ignore_errors=True)  # what it holds (the flat copy, the runs) was not asked for by --flat or --out


if __name__ == "__main__":
    main()
