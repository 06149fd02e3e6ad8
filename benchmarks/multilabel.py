"""disttrain's multi-label recipe against fastai's, on the same images, split and machine, in one run.

    python benchmarks/multilabel.py [--data DIR] [--nproc N] [--repeats 1] [--json OUT] [key=value ...]
    python benchmarks/multilabel.py --no-fastai                 # disttrain alone (no peer venv)

The data: the multi-label digits sample (`disttrain demo-data DIR --multi-label`: 2,000 64x64 grey
canvases with two to four MNIST digits, labels.csv `id,tags`), written into --data when missing
(default ~/.cache/disttrain/mnist-multilabel, configs/multilabel.yaml's data.root).

disttrain: `disttrain launch <accelerate options> launch/train.py --config configs/multilabel.yaml`
(the Makefile's choice of processes: 2 CPU processes here, one per GPU on a GPU machine; --nproc
overrides), the trailing key=value overrides passed on. Its figures are the last evaluation's in the
run's metrics.jsonl: F2 (sample-averaged) and accuracy_multi at the threshold `train.threshold: auto`
found on the validation set (the best of 0.05..0.95, step 0.01); then, off the clock, `disttrain
evaluate --run RUN_DIR --threshold 0.5` scores its model.pt at fastai's default threshold.

fastai: benchmarks/peers/fastai_multilabel.py with the peer venv's python (made by
benchmarks/peers/fastai_venv.sh; --fastai-python to use another): DataBlock + MultiCategoryBlock,
resnet18 from scratch, lr_find + fit_one_cycle for as many epochs as the config trains, validated on
exactly the files of the disttrain run's split.json (IndexSplitter). Its probabilities are scored
with disttrain's rules: F2 and accuracy_multi at its best threshold on the same grid, and at
fastai's default 0.5.

Before training, the split disttrain will draw is listed here (disttrain.data.source.list_source, no
image read) and compared with the split.json each run writes: the table says whether they match.

Wall time: each tool's whole process, from its start to its exit (imports, data, lr_find for
fastai, training, validation, saving), measured here with one clock. The tools run one after the
other (disttrain first: fastai needs its split.json), --repeats times alternating, repeat i with
seed i in both (disttrain's run.seed, fastai's set_seed: weights, order; the split stays
data.split_seed's); on a machine shared with other jobs, compare the runs of one invocation only.
The ratio is fastai / disttrain.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / "benchmarks" / "peers"
DEFAULT_DATA = "~/.cache/disttrain/mnist-multilabel"


def fastai_python(given: str | None) -> Path:
    """The peer venv's interpreter (fastai_venv.sh --print-python), or `given`; exits with the fix when it is missing."""
    if given:
        path = Path(given).expanduser()
    else:
        out = subprocess.run(["bash", str(PEERS / "fastai_venv.sh"), "--print-python"], capture_output=True, text=True, check=True)
        path = Path(out.stdout.strip())
    if not os.access(path, os.X_OK):
        sys.exit(f"no fastai peer venv at {path}: run `bash benchmarks/peers/fastai_venv.sh` once (a few minutes), "
                 "or pass --fastai-python, or --no-fastai for disttrain alone")
    return path


def launch_options(nproc: int | None) -> list[str]:
    """`disttrain launch`'s accelerate options, chosen as the Makefile's demo does: 2 CPU processes
    without a GPU, one process per GPU with them; `nproc` overrides the count."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        if nproc in (None, 2):
            return ["--config_file", str(REPO / "configs/accelerate/cpu_2proc.yaml")]
        return ["--multi_gpu", "--num_processes", str(nproc)] if nproc > 1 else ["--cpu", "--num_processes", "1"]
    count = nproc or gpus
    return ["--multi_gpu", "--num_processes", str(count)] if count > 1 else ["--num_processes", "1"]


def ensure_data(data: Path) -> None:
    """The multi-label sample in `data`, written once (demo-data is a no-op when it is there)."""
    if (data / "labels.csv").exists():
        return
    print(f"writing the multi-label sample into {data}", flush=True)
    subprocess.run([sys.executable, "-m", "disttrain.cli", "demo-data", str(data), "--multi-label"], cwd=REPO, check=True)


def expected_split(config: str, overrides: list[str]) -> list[str]:
    """The validation files disttrain draws for this config (listing only: no image is read)."""
    from disttrain.data.source import list_source
    from disttrain.models.checks import load_config

    split = list_source(load_config(config, overrides).data).split
    return list(split.valid) if split is not None else []


def timed(cmd: list[str], log: Path, env: dict) -> float:
    """Run `cmd` from the repository root, its output into `log`; its wall seconds. Exits with the
    log's tail when it fails."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        sys.exit(f"failed (exit {proc.returncode}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    return seconds


def last_evaluation(run_dir: Path) -> dict:
    """The run's last valid/* row of metrics.jsonl and its results.json's peak LR."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    valid = [r for r in rows if "valid/loss" in r]
    if not valid or "valid/accuracy_multi" not in valid[-1]:
        sys.exit(f"{run_dir}/metrics.jsonl: no multi-label evaluation row (valid/accuracy_multi); is data.label_delim set?")
    row = valid[-1]
    fbeta = next(k for k in row if k.startswith("valid/f") and k[len("valid/f"):].replace(".", "").isdigit())
    results = json.loads((run_dir / "results.json").read_text())
    return {"fbeta": row[fbeta], "fbeta_key": fbeta, "accuracy_multi": row["valid/accuracy_multi"],
            "threshold": row.get("valid/threshold"), "valid_loss": row["valid/loss"], "mAP": row.get("valid/mAP"),
            "peak_lr": results.get("peak_lr"), "precision": results.get("precision"), "world_size": results.get("world_size")}


def run_disttrain(args, data: Path, out: Path, i: int, env: dict) -> dict:
    name = f"multilabel-bench-{i}"
    cmd = [sys.executable, "-m", "disttrain.cli", "launch", *launch_options(args.nproc), "launch/train.py",
           "--config", args.config, f"data.root={data}", f"run.output_dir={out}", f"run.name={name}", "log.progress=false",
           f"run.seed={i}", *args.overrides]
    print(f"[disttrain] {' '.join(cmd)}", flush=True)
    seconds = timed(cmd, out / f"{name}.log", env)
    run_dir = out / name
    result = {"tool": "disttrain", "wall_s": seconds, "run_dir": str(run_dir), **last_evaluation(run_dir)}
    result["split"] = json.loads((run_dir / "split.json").read_text())["valid"]
    # model.pt at fastai's default threshold too (after the clock: not part of the recipe's wall time)
    at_half = out / f"{name}-eval-0.5.json"
    timed([sys.executable, "-m", "disttrain.cli", "evaluate", "--run", str(run_dir), "--threshold", "0.5", "--out", str(at_half)],
          out / f"{name}-eval-0.5.log", env)
    evaluated = json.loads(at_half.read_text())
    result["fbeta_at_0.5"], result["accuracy_multi_at_0.5"] = evaluated["fbeta"], evaluated["accuracy_multi"]
    print(f"[disttrain] {seconds:.1f} s: {result['fbeta_key'][len('valid/'):].upper()} {result['fbeta']:.4f} at "
          f"{result['threshold']}, accuracy_multi {result['accuracy_multi']:.4f}; at 0.5 (disttrain evaluate): F2 "
          f"{result['fbeta_at_0.5']:.4f}, accuracy_multi {result['accuracy_multi_at_0.5']:.4f}  (log {out / f'{name}.log'})", flush=True)
    return result


def run_fastai(args, python: Path, data: Path, split: Path, epochs: int, out: Path, i: int, env: dict) -> dict:
    jsonfile = out / f"fastai-{i}.json"
    cmd = [str(python), str(PEERS / "fastai_multilabel.py"), str(data), "--valid", str(split), "--epochs", str(epochs),
           "--seed", str(i), "--json", str(jsonfile), *args.fastai_args]
    print(f"[fastai] {' '.join(cmd)}", flush=True)
    seconds = timed(cmd, out / f"fastai-{i}.log", env)
    r = json.loads(jsonfile.read_text())
    print(f"[fastai] {seconds:.1f} s: F2 {r['fbeta_at_best']:.4f} at {r['best_threshold']}, accuracy_multi "
          f"{r['accuracy_multi_at_best']:.4f}; at 0.5: F2 {r['fbeta_at_0.5']:.4f}, accuracy_multi {r['accuracy_multi_at_0.5']:.4f} "
          f"(lr_find valley {r['lr']:.2e})  (log {out / f'fastai-{i}.log'})", flush=True)
    return {"tool": "fastai", "wall_s": seconds, "fbeta": r["fbeta_at_best"], "accuracy_multi": r["accuracy_multi_at_best"],
            "threshold": r["best_threshold"], "fbeta_at_0.5": r["fbeta_at_0.5"], "accuracy_multi_at_0.5": r["accuracy_multi_at_0.5"],
            "valid_loss": r["valid_loss"], "peak_lr": r["lr"], "seconds": r["seconds"], "n_valid": r["config"]["n_valid"]}


def table(runs: list[dict]) -> None:
    """One row per run, then the means per tool when repeated; the ratio is each fastai run's wall
    over the disttrain run before it."""
    print(f"\n{'tool':<11}{'F2':>8}{'accuracy_multi':>16}{'threshold':>11}{'F2 @0.5':>9}{'wall s':>9}{'fastai/disttrain':>18}")
    last = None
    for r in runs:
        ratio = f"{r['wall_s'] / last['wall_s']:.2f}" if r["tool"] == "fastai" and last else ""
        at_half = f"{r['fbeta_at_0.5']:.4f}"
        print(f"{r['tool']:<11}{r['fbeta']:>8.4f}{r['accuracy_multi']:>16.4f}{r['threshold']:>11.2f}{at_half:>9}"
              f"{r['wall_s']:>9.1f}{ratio:>18}")
        last = r if r["tool"] == "disttrain" else last
    tools = {t: [r for r in runs if r["tool"] == t] for t in ("disttrain", "fastai")}
    if all(len(v) > 1 for v in tools.values()) or (len(tools["disttrain"]) > 1 and not tools["fastai"]):
        print("means:")
        for tool, rows in tools.items():
            if rows:
                spread = lambda key: statistics.stdev(r[key] for r in rows)  # noqa: E731
                print(f"{tool:<11}{statistics.mean(r['fbeta'] for r in rows):>8.4f}{statistics.mean(r['accuracy_multi'] for r in rows):>16.4f}"
                      f"{'':>11}{'':>9}{statistics.mean(r['wall_s'] for r in rows):>9.1f}   (sd F2 {spread('fbeta'):.4f}, wall {spread('wall_s'):.1f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help=f"the multi-label sample (written when missing; default {DEFAULT_DATA})")
    p.add_argument("--config", default="configs/multilabel.yaml")
    p.add_argument("--nproc", type=int, default=None, help="disttrain's processes (default: 2 on CPU, one per GPU)")
    p.add_argument("--repeats", type=int, default=1, help="disttrain then fastai, this many times (repeat i: seed i)")
    p.add_argument("--fastai-python", default=None, help="the peer venv's python (default: fastai_venv.sh --print-python)")
    p.add_argument("--fastai-epochs", type=int, default=None, help="default: the config's train.epochs")
    p.add_argument("--fastai-arg", dest="fastai_args", action="append", default=[],
                   help="passed on to fastai_multilabel.py (repeat: --fastai-arg=--bs --fastai-arg=32)")
    p.add_argument("--no-fastai", action="store_true", help="disttrain alone")
    p.add_argument("--out", default=None, help="run dirs and logs (default: a temp dir, removed unless a run failed)")
    p.add_argument("--json", default=None, help="write every run's figures here")
    p.add_argument("overrides", nargs="*", help="config overrides for disttrain (key=value)")
    args = p.parse_intermixed_args()

    from disttrain.config import run_stages
    from disttrain.models.checks import load_config

    config = Path(args.config)
    if not config.is_absolute() and not config.exists():
        config = REPO / config  # the repository's configs/, from any working directory
    args.config = str(config)
    python = None if args.no_fastai else fastai_python(args.fastai_python)
    data = Path(args.data).expanduser()
    ensure_data(data)
    overrides = [f"data.root={data}", *args.overrides]
    cfg = load_config(args.config, overrides)
    epochs = args.fastai_epochs or sum(stage.epochs for stage in run_stages(cfg))
    expected = expected_split(args.config, overrides)
    out = Path(args.out).expanduser() if args.out else Path(tempfile.mkdtemp(prefix="multilabel-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("WANDB_MODE", "offline")
    print(f"data {data}: {len(expected)} validation images drawn by {args.config}; machine: {os.cpu_count()} cores; "
          f"fastai: {'skipped' if args.no_fastai else f'{epochs} epochs'}", flush=True)

    runs = []
    for i in range(args.repeats):
        ours = run_disttrain(args, data, out, i, env)
        ours["split_matches_listing"] = ours.pop("split") == expected
        runs.append(ours)
        if python is not None:
            runs.append(run_fastai(args, python, data, Path(ours["run_dir"]) / "split.json", epochs, out, i, env))

    table(runs)
    print(f"split: every disttrain run's split.json {'equals' if all(r.get('split_matches_listing', True) for r in runs) else 'DIFFERS FROM'} "
          f"the listing's {len(expected)} validation files; fastai validated on "
          f"{', '.join(str(r['n_valid']) for r in runs if r['tool'] == 'fastai') or '-'} of them (its IndexSplitter)")
    if args.json:
        Path(args.json).expanduser().write_text(json.dumps(runs, indent=1) + "\n")
        print(f"wrote {args.json}")
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
