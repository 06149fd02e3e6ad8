"""Many ranks of the tiny model (`tiny/cnn`, 8 x 8 px, 6,418 parameters) on CPU (gloo): at each world
size, every check that must hold whatever the number of processes, and what the processes cost.

    .venv/bin/python benchmarks/scale.py [--worlds 1,4,8,16,32] [--multinode] [--root DIR] [--timeout S] [--out FILE]

Data: 277 training images in classes of 151, 37 and 89 and 43 validation images (8 x 8 PNGs), not
divisible by any world size x 2 per batch, as folders and as shards (`disttrain prepare`, 20 samples
per shard: 14 training shards, fewer than 16 or 32 readers). Each world size W runs 2 launches of
tests/distributed/many_worker.py (`disttrain launch --num_processes W`, train.threads=1,
data.num_workers=0), the commands in the same processes:

1. the run with the LR sweep (optim.lr=auto, 2 epochs, a checkpoint every 2 steps; each rank writes
   its own lr_sweep.rank<R>.json), `disttrain evaluate` and `disttrain predict` of the 1-process
   run's model.pt, then the same run again with rank W-1 SIGKILLed at training step 3;
2. the killed run resumed (checkpoint.resume=auto: from step 2), then one epoch from the shards.

Checks (PASS/FAIL per world size): `sweep` every rank's curve and suggestion bitwise equal;
`steps` / `shard steps` every rank ran the same steps in every epoch, from folders / from shards;
`evaluate` disttrain evaluate's result equal to 1 process's (world_size aside); `predict` the CSV
byte-identical to 1 process's; `kill` exactly one `disttrain:` line, naming the killed rank first;
`resume` the resumed run's epochs (losses, accuracy) and model.pt equal to the uninterrupted run's.
Figures: start-up (launch to the first step of any rank: imports, process group, scan, model;
the first step is the sweep's), the data scan (`load_data`, the slowest rank), the time per
training step (rank 0's median), peak resident memory per rank (VmHWM: the largest and the mean,
after the run, evaluate and predict), and how long the job took to end after the kill.

`--multinode`: 4 "machines" on loopback (4 `accelerate launch --num_machines 4 --machine_rank i
--main_process_ip 127.0.0.1 --num_processes 8`, 2 processes each) run the sweep and 2 epochs; they
must give every rank the same sweep file and the same epochs, to every digit, as 8 processes on one
machine; and 16 processes on one machine must agree on the sweep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKER = "tests/distributed/many_worker.py"
TRAIN = {"a": 151, "b": 37, "c": 89}
VALID = {"a": 19, "b": 11, "c": 13}
BATCH = 2
KILL_STEP = 3  # with a checkpoint every 2 steps: the resume starts from step 2
SHARED = ("lrs", "losses", "smoothed", "suggestions", "suggestion", "iterations", "stopped_early", "fallback", "method",
          "world_size", "global_batch_size")
"""The keys of lr_sweep.rank<R>.json that every rank must hold alike (`local_losses` is each rank's own)."""
COMMON = ["model.name=tiny/cnn", "data.num_workers=0", "train.threads=1", "log.progress=false", "train.precision=no",
          "log.wandb.mode=disabled"]
SWEEP = ["optim.lr=auto", "sweep.num_iter=16", "sweep.start_lr=1e-4", "sweep.end_lr=1", "sweep.save_per_rank=true"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(root: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "TMPDIR": str(root / "tmp")}


def make_data(root: Path) -> tuple[Path, Path]:
    """The folders (each class its own tint, so the model can learn) and their shards."""
    data, shards = root / "data", root / "shards"
    if not data.is_dir():
        for split, classes in (("train", TRAIN), ("valid", VALID)):
            for ci, (name, count) in enumerate(sorted(classes.items())):
                for i in range(count):
                    rng = np.random.default_rng(zlib.crc32(f"{split}/{name}/{i}".encode()))
                    pixels = rng.integers(0, 64, (8, 8, 3), dtype=np.uint8)
                    pixels[..., ci] += 160
                    path = data / split / name / f"{i:03d}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(pixels, "RGB").save(path)
    if not shards.is_dir():
        subprocess.run([str(BIN / "disttrain"), "prepare", str(data), str(shards), "--samples-per-shard", "20", "--workers", "1",
                        "--no-progress"], check=True, capture_output=True, env=environment(root))
    return data, shards


def launch_options(world: int, machines: int = 1, machine_rank: int = 0, port: int | None = None) -> list[str]:
    kind = ["--multi_gpu", "--num_processes", str(world)] if world > 1 else ["--cpu", "--num_processes", "1"]
    return [*kind, "--num_machines", str(machines), "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port or free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]


def run(root: Path, world: int, out: Path, phases: str, overrides: list[str], timeout: int) -> tuple[subprocess.CompletedProcess, float, float]:
    """One `disttrain launch` of the worker: (the finished process, launch time, end time)."""
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    proc = subprocess.run([str(BIN / "disttrain"), "launch", *launch_options(world), WORKER, str(out), phases, *COMMON, *overrides],
                          cwd=REPO, env=environment(root), capture_output=True, text=True, timeout=timeout)
    (out / f"launch-{len(list(out.glob('launch-*.log')))}.log").write_text(f"{proc.args}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc, began, time.time()


def per_rank(out: Path, stem: str, world: int) -> list[dict]:
    return [json.loads((out / f"{stem}.rank{r}.json").read_text()) for r in range(world)]


def sweep_agrees(run_dir: Path, world: int) -> tuple[bool, str]:
    try:
        ranks = [json.loads((run_dir / f"lr_sweep.rank{r}.json").read_text()) for r in range(world)]
    except FileNotFoundError as err:
        return False, str(err)
    differ = [key for key in SHARED if any(r[key] != ranks[0][key] for r in ranks)]
    if differ or ranks[0]["suggestion"] is None:
        return False, f"differ: {differ}, suggestion {ranks[0]['suggestion']}"
    return True, f"suggestion {ranks[0]['suggestion']:.3g} after {ranks[0]['iterations']} steps"


def equal_steps(out: Path, stem: str, world: int) -> tuple[bool, str]:
    try:
        epochs = [r["epochs"] for r in per_rank(out, stem, world)]
    except FileNotFoundError as err:
        return False, str(err)
    ok = all(e == epochs[0] for e in epochs) and epochs[0] and all(n > 0 for n in epochs[0].values())
    return bool(ok), f"{sorted(set(map(json.dumps, epochs)))}"


def epochs_of(run_dir: Path) -> list[tuple]:
    return [(e["epoch"], e["train_loss"], e["valid_loss"], e["accuracy"]) for e in json.loads((run_dir / "results.json").read_text())["epochs"]]


def same_weights(a: Path, b: Path) -> bool:
    import torch

    one, two = (torch.load(p, map_location="cpu", weights_only=False)["model"] for p in (a, b))
    return one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def world_size_row(root: Path, world: int, data: Path, shards: Path, timeout: int) -> dict:
    out = root / f"w{world}"
    reference = root / "w1"
    model = reference / "train" / "model.pt"
    killed_rank = world - 1
    train = [f"data.root={data}", "train.epochs=2", f"data.batch_size={BATCH}", "checkpoint.every_n_steps=2", *SWEEP]
    phases = f"train,evaluate={model}@{data},predict={model}@{data / 'valid'},kill={killed_rank}:{KILL_STEP}"
    first, launched, ended = run(root, world, out, phases, train, timeout)
    row: dict = {"world": world, "checks": {}, "notes": {}}
    try:
        seen = per_rank(out, "train", world)
        row["startup_s"] = min(s["first_step"] for s in seen) - launched
        row["scan_s"] = max(s["scan"] for s in seen)
        row["step_ms"] = 1000 * statistics.median(seen[0]["step_times"])
        rss = [int((out / f"rss.rank{r}").read_text()) / 1024 for r in range(world)]
        row["rss_max_mb"], row["rss_mean_mb"] = max(rss), statistics.mean(rss)
        phase_times = json.loads((out / "phases.rank0.json").read_text())
        row["train_s"] = phase_times["train"][1] - phase_times["train"][0]
    except (FileNotFoundError, KeyError, statistics.StatisticsError) as err:
        row["notes"]["figures"] = f"missing: {err}"
    row["checks"]["sweep"], row["notes"]["sweep"] = sweep_agrees(out / "train", world)
    row["checks"]["steps"], row["notes"]["steps"] = equal_steps(out, "train", world)
    try:
        many, one = (json.loads((d / "evaluate.json").read_text()) for d in (out, reference))
        row["checks"]["evaluate"] = (many.pop("world_size"), one.pop("world_size")) == (world, 1) and many == one
        row["notes"]["evaluate"] = f"loss {many['loss']!r} accuracy {many['accuracy']!r}"
        row["checks"]["predict"] = (out / "predict.csv").read_bytes() == (reference / "predict.csv").read_bytes()
    except (FileNotFoundError, KeyError) as err:
        row["checks"]["evaluate"] = row["checks"]["predict"] = False
        row["notes"]["evaluate"] = str(err)
    lines = [line for line in first.stderr.splitlines() if line.startswith("disttrain: ")]
    named = len(lines) == 1 and lines[0].startswith(f"disttrain: the job failed: rank {killed_rank} was killed by SIGKILL")
    row["checks"]["kill"] = named and first.returncode != 0
    row["notes"]["kill"] = lines[0][:160] if lines else f"no disttrain: line (exit {first.returncode}): {first.stderr[-300:]!r}"
    if (out / "killed").exists():
        row["kill_end_s"] = ended - float((out / "killed").read_text())

    second, _, _ = run(root, world, out, "resume,train+" + "+".join(
        [f"data.root={shards}", "data.format=shards", "run.name=shards", "optim.lr=0.01", "train.epochs=1"]), train, timeout)
    row["checks"]["shard steps"], row["notes"]["shard steps"] = equal_steps(out, "shards", world)
    try:
        resumed, whole = epochs_of(out / "kill"), epochs_of(out / "train")
        row["checks"]["resume"] = second.returncode == 0 and resumed == whole and same_weights(out / "kill" / "model.pt",
                                                                                               out / "train" / "model.pt")
        row["notes"]["resume"] = f"{len(resumed)} epochs, last {resumed[-1][1:]}"
    except FileNotFoundError as err:
        row["checks"]["resume"] = False
        row["notes"]["resume"] = f"{err}; exit {second.returncode}: {second.stderr[-300:]!r}"
    return row


def multinode(root: Path, data: Path, timeout: int, sixteen: Path | None) -> dict:
    """4 loopback machines x 2 processes against 8 processes on one machine; 16 processes' sweep."""
    train = [f"data.root={data}", "train.epochs=2", f"data.batch_size={BATCH}", *SWEEP]
    result: dict = {"checks": {}, "notes": {}}
    one = root / "mn-one8"
    run(root, 8, one, "train", train, timeout)
    four = root / "mn-four2"
    four.mkdir(parents=True, exist_ok=True)
    port = free_port()
    began = time.time()
    machines = [subprocess.Popen([str(BIN / "accelerate"), "launch", *launch_options(8, 4, rank, port), WORKER, str(four), "train",
                                  *COMMON, *train], cwd=REPO, env=environment(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for rank in range(4)]
    outputs = [m.communicate(timeout=timeout) for m in machines]
    result["four_machines_s"] = time.time() - began
    for i, (m, (stdout, stderr)) in enumerate(zip(machines, outputs)):
        (four / f"machine{i}.log").write_text(f"exit {m.returncode}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    result["checks"]["4x2 ran"] = all(m.returncode == 0 for m in machines)
    result["checks"]["4x2 sweep"], result["notes"]["4x2 sweep"] = sweep_agrees(four / "train", 8)
    try:
        a = [json.loads((four / "train" / f"lr_sweep.rank{r}.json").read_text()) for r in range(8)]
        b = [json.loads((one / "train" / f"lr_sweep.rank{r}.json").read_text()) for r in range(8)]
        result["checks"]["4x2 = 8x1 sweep"] = a == b and (four / "train" / "lr_sweep.json").read_bytes() == (
            one / "train" / "lr_sweep.json").read_bytes()
        result["checks"]["4x2 = 8x1 epochs"] = epochs_of(four / "train") == epochs_of(one / "train")
        result["notes"]["4x2 = 8x1 epochs"] = f"last epoch {epochs_of(four / 'train')[-1][1:]}"
    except FileNotFoundError as err:
        result["checks"]["4x2 = 8x1 sweep"] = result["checks"]["4x2 = 8x1 epochs"] = False
        result["notes"]["4x2 = 8x1 sweep"] = str(err)
    if sixteen is None:
        sixteen = root / "mn-one16"
        run(root, 16, sixteen, "train", train, timeout)
    result["checks"]["16x1 sweep"], result["notes"]["16x1 sweep"] = sweep_agrees(sixteen / "train", 16)
    return result


def fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(rows: list[dict]) -> str:
    checks = list(rows[0]["checks"]) if rows else []
    head = ["world", "start-up s", "scan s", "step ms", "peak RSS/rank MB (max, mean)", "end after kill s", *checks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([str(r["world"]), fmt(r.get("startup_s"), ".1f"), fmt(r.get("scan_s"), ".2f"),
                                        fmt(r.get("step_ms"), ".1f"),
                                        f"{fmt(r.get('rss_max_mb'), '.0f')}, {fmt(r.get('rss_mean_mb'), '.0f')}",
                                        fmt(r.get("kill_end_s"), ".1f"),
                                        *("PASS" if r["checks"].get(c) else "FAIL" for c in checks)]) + " |")
    return "\n".join(lines)


def highest_passing(rows: list[dict], check: str | None) -> int | None:
    """The largest world size at which `check` (None: every check) passed, and at every smaller one run."""
    highest = None
    for row in sorted(rows, key=lambda r: r["world"]):
        if not (all(row["checks"].values()) if check is None else row["checks"].get(check)):
            break
        highest = row["world"]
    return highest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="1,4,8,16,32", help="world sizes, comma-separated (1 always runs first: the reference)")
    parser.add_argument("--multinode", action="store_true", help="also 4 loopback machines x 2 against 8 on one, and 16 on one")
    parser.add_argument("--root", default="/tmp/disttrain-scale", help="data, shards and run dirs (reused: data and shards)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per launch")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    root = Path(args.root)
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    worlds = sorted({1, *(int(w) for w in args.worlds.split(","))})
    data, shards = make_data(root)
    print(f"tiny/cnn, {sum(TRAIN.values())} train / {sum(VALID.values())} valid 8x8 images, batch {BATCH} per rank, "
          f"{os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f} at start", flush=True)
    rows, report = [], {}
    for world in worlds:
        began = time.time()
        row = world_size_row(root, world, data, shards, args.timeout)
        row["wall_s"] = time.time() - began
        rows.append(row)
        print(f"world {world}: {json.dumps(row)}", flush=True)
    report["rows"] = rows
    if args.multinode:
        report["multinode"] = multinode(root, data, args.timeout, root / "w16" if 16 in worlds else None)
        print(f"multinode: {json.dumps(report['multinode'])}", flush=True)
    print()
    print(table(rows))
    print(f"\nhighest world size with every check passing (and every smaller one): {highest_passing(rows, None)}")
    for check in (rows[0]["checks"] if rows else {}):
        print(f"  {check}: passes up to world size {highest_passing(rows, check)}")
    if args.multinode:
        for name, ok in report["multinode"]["checks"].items():
            print(f"multinode {name}: {'PASS' if ok else 'FAIL'}  {report['multinode']['notes'].get(name, '')}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
