"""What the training recipes' parts (issue 27: MixUp/CutMix, weight EMA, TrivialAugment) give on a
task, over seeds: valid loss and accuracy of the last epoch, mean and spread, per variant.

    python benchmarks/recipes.py --case mnist|finetune [--seeds 0,1,2] [--variants a,b] [--nproc 2]
                                 [--json OUT] [key=value ...]

Each run is the real training as a user launches it, one run after the other (never two at once):
`accelerate launch --multi_gpu --num_processes N --main_process_port <free> launch/train.py --config
CONFIG run.seed=S run.output_dir=<tmp> log.progress=false <variant's overrides> <trailing overrides>`,
with WANDB_MODE=disabled and OMP_NUM_THREADS=1. Its figures are read from the run's results.json,
the last epoch (the last stage's in a staged run): valid_loss, accuracy and, with train.ema on,
metrics.ema_valid_loss and metrics.ema_accuracy (the EMA's weights evaluated on the same validation
set). Wall time: the launched job's, start to exit (imports, data, LR sweeps, training, saving).

Cases:
  mnist     configs/demo.yaml (ResNet-18 from scratch on the MNIST sample, written with `disttrain
            demo-data` when missing) at train.epochs=4 and the config's fixed optim.lr: a task where
            regularization can matter. Variants: base, mixup (augment.mixup=0.2), cutmix
            (augment.cutmix=1.0), mix (both, mix_switch_prob 0.5), ema (train.ema=0.99 with warmup),
            trivial (augment.policy=trivial), all (mixup + cutmix + ema + trivial).
  finetune  configs/finetune.yaml (ants/bees, ImageNet MobileNetV2, two stages with LR sweeps; needs
            ../shared/data/hymenoptera and ../shared/weights, else it says so and exits 0). Variants:
            base (the shipped recipe as is), ema (train.ema=0.99 with warmup), mix (mixup 0.2 +
            cutmix 1.0 at mix_prob 0.5). Issue 27 item 6: base must end at >= 0.95 on every seed.

Printed: one row per run (a run that fails is a row with its error line), then per variant the
mean and the spread (max - min) over the seeds whose runs finished. The MixUp/CutMix variants'
train loss is against the mixed targets and is not shown; validation is never mixed. The figures
are one machine's (the CPU model, core count and torch version are printed first): compare the
variants of one invocation, not figures from another machine. With --json every run's figures are
written there, after each run (a cut-short invocation keeps what it finished).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from csv_source import run_logged  # noqa: E402  benchmarks/csv_source.py: a launched run, logged to a file
from multilabel import REPO  # noqa: E402  benchmarks/multilabel.py: the repository root

MNIST = Path("~/.cache/disttrain/mnist").expanduser()
SHARED = REPO.parent / "shared"
EMA = ["train.ema=0.99", "train.ema_warmup=true"]
MIXUP, CUTMIX, TRIVIAL = ["augment.mixup=0.2"], ["augment.cutmix=1.0"], ["augment.policy=trivial"]

CASES = {
    "mnist": {
        "config": "configs/demo.yaml",
        "fixed": ["train.epochs=4"],
        "needs": [],
        "variants": {
            "base": [],
            "mixup": MIXUP,
            "cutmix": CUTMIX,
            "mix": [*MIXUP, *CUTMIX, "augment.mix_switch_prob=0.5"],
            "ema": EMA,
            "trivial": TRIVIAL,
            "all": [*MIXUP, *CUTMIX, *EMA, *TRIVIAL],
        },
    },
    "finetune": {
        "config": "configs/finetune.yaml",
        "fixed": [],
        "needs": [SHARED / "data" / "hymenoptera" / "train", SHARED / "data" / "hymenoptera" / "val",
                  SHARED / "weights" / "mobilenet_v2_imagenet.pt"],
        "variants": {
            "base": [],
            "ema": EMA,
            "mix": [*MIXUP, *CUTMIX, "augment.mix_prob=0.5"],
        },
    },
}


def free_port() -> int:
    """A TCP port nothing listens on now, for the run's rendezvous (runs of other jobs may hold 29500)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(nproc: int) -> list[str]:
    """`accelerate launch` with N processes: torchrun's launcher (--multi_gpu), which disttrain runs
    on gloo when there is no GPU, as configs/accelerate/cpu_2proc.yaml does."""
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        accelerate = REPO / ".venv" / "bin" / "accelerate"
    procs = ["--multi_gpu", "--num_processes", str(nproc)] if nproc > 1 else ["--num_processes", "1"]
    return [str(accelerate), "launch", *procs, "--main_process_port", str(free_port())]


def machine() -> str:
    """The CPU model (lscpu's), the core count and torch's version: the figures are this machine's."""
    import torch

    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def last_epoch(run_dir: Path) -> dict:
    """The last epoch's figures from results.json: valid loss, accuracy and, with an EMA, the EMA's."""
    last = json.loads((run_dir / "results.json").read_text())["epochs"][-1]
    metrics = last.get("metrics") or {}
    return {"valid_loss": last["valid_loss"], "accuracy": last["accuracy"],
            "ema_valid_loss": metrics.get("ema_valid_loss"), "ema_accuracy": metrics.get("ema_accuracy")}


def run_one(case: dict, variant: str, seed: int, out: Path, nproc: int, extra: list[str], env: dict) -> dict:
    """One launched training; its row (figures, or the error line of a failed run)."""
    run_name = f"{variant}-seed{seed}"
    cmd = [*launcher(nproc), "launch/train.py", "--config", case["config"], *case["fixed"], f"run.seed={seed}",
           f"run.output_dir={out}", f"run.name={run_name}", "log.progress=false", *case["variants"][variant], *extra]
    print(f"[{variant} seed {seed}] {' '.join(cmd)}", flush=True)
    log = out / f"{run_name}.log"
    code, seconds, error = run_logged(cmd, log, env, f"{variant} seed {seed}")
    row = {"variant": variant, "seed": seed, "wall_s": round(seconds, 1), "log": str(log)}
    if code != 0:
        return {**row, "failed": f"exit {code}: {error}"}
    row.update(last_epoch(out / run_name))
    ema = f", EMA loss {row['ema_valid_loss']:.4f} accuracy {row['ema_accuracy']:.4f}" if row["ema_valid_loss"] is not None else ""
    print(f"[{variant} seed {seed}] valid loss {row['valid_loss']:.4f}, accuracy {row['accuracy']:.4f}{ema}, {seconds:.1f} s", flush=True)
    return row


def cell(value: float | None, width: int) -> str:
    return f"{value:>{width}.4f}" if value is not None else f"{'-':>{width}}"


def print_tables(runs: list[dict], variants: list[str]) -> None:
    print(f"\n{'variant':<9}{'seed':>5}{'valid loss':>12}{'accuracy':>10}{'ema loss':>10}{'ema acc':>9}{'wall s':>8}")
    for r in runs:
        if r.get("failed"):
            print(f"{r['variant']:<9}{r['seed']:>5}  failed after {r['wall_s']:.1f} s: {r['failed']}")
            continue
        print(f"{r['variant']:<9}{r['seed']:>5}{cell(r['valid_loss'], 12)}{cell(r['accuracy'], 10)}"
              f"{cell(r['ema_valid_loss'], 10)}{cell(r['ema_accuracy'], 9)}{r['wall_s']:>8.1f}")
    print(f"\n{'variant':<9}{'runs':>5}{'loss mean':>11}{'spread':>8}{'acc mean':>10}{'spread':>8}"
          f"{'ema loss':>10}{'spread':>8}{'ema acc':>9}{'spread':>8}{'min acc':>9}{'wall s':>8}")
    for name in variants:
        rows = [r for r in runs if r["variant"] == name and not r.get("failed")]
        if not rows:
            ran = sum(1 for r in runs if r["variant"] == name)
            print(f"{name:<9}{0:>5}  ({'every run failed' if ran else 'not run'})")
            continue
        stats = ""
        for key, width in (("valid_loss", 11), ("accuracy", 10), ("ema_valid_loss", 10), ("ema_accuracy", 9)):
            values = [r[key] for r in rows if r[key] is not None]
            stats += (cell(statistics.mean(values), width) + cell(max(values) - min(values), 8)) if values else f"{'-':>{width}}{'-':>8}"
        print(f"{name:<9}{len(rows):>5}{stats}{min(r['accuracy'] for r in rows):>9.4f}"
              f"{statistics.mean(r['wall_s'] for r in rows):>8.1f}")
    print("(last epoch; spread: max - min over the seeds; ema: the EMA's weights on the same validation set)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", required=True, choices=sorted(CASES))
    p.add_argument("--seeds", default="0,1,2", help="run.seed values, every variant trained once per seed")
    p.add_argument("--variants", default=None, help="which variants, comma-separated (default: all of the case's)")
    p.add_argument("--nproc", type=int, default=2, help="processes per run (default 2)")
    p.add_argument("--out", default=None, help="run dirs and logs (default: a temp dir, removed at the end unless a run failed)")
    p.add_argument("--json", default=None, help="write every run's figures here (rewritten after each run)")
    p.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    args = p.parse_intermixed_args()

    case = CASES[args.case]
    variants = args.variants.split(",") if args.variants else list(case["variants"])
    unknown = [v for v in variants if v not in case["variants"]]
    if unknown:
        sys.exit(f"--variants: unknown {unknown} for --case {args.case}; choose from {list(case['variants'])}")
    missing = [str(path) for path in case["needs"] if not path.exists()]
    if missing:
        print(f"skipped: --case {args.case} needs {', '.join(missing)} (../shared beside the repository)")
        return
    if args.case == "mnist" and not (MNIST / ".complete.json").exists():
        subprocess.run([str(Path(sys.executable).parent / "disttrain"), "demo-data", str(MNIST)], cwd=REPO, check=True)

    out = Path(args.out).expanduser() if args.out else Path(tempfile.mkdtemp(prefix=f"recipes-{args.case}-"))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    print(f"case {args.case}: {case['config']} {' '.join(case['fixed'])}; {args.nproc} processes; machine: {machine()}", flush=True)

    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):  # seed by seed, every variant: a drift of the machine touches all alike
        for name in variants:
            runs.append(run_one(case, name, seed, out, args.nproc, args.overrides, env))
            if args.json:
                Path(args.json).expanduser().write_text(json.dumps(runs, indent=1) + "\n")
    print_tables(runs, variants)
    if args.json:
        print(f"wrote {args.json}")
    if not args.out and not any(r.get("failed") for r in runs):
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
