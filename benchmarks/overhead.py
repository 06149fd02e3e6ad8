"""disttrain's training loop against a bare DDP loop on in-memory tensors, in one run.

    python benchmarks/overhead.py [--case demo|finetune|all] [--nproc 2] [--epochs 4] [--compile] [--parts [LIST]]
    python benchmarks/overhead.py --case resnet50 --nproc 1 --folder DIR --shards DIR   # the GPU check

Each case runs one launched job (`accelerate launch`, `--nproc` processes) per input (the image
folder, webdataset shards). In the job's processes disttrain's real Trainer and a bare DDP loop take
turns, epoch by epoch, so both see the same threads, cores and moment of the machine. The bare loop
is the ceiling of the same code path: the same model (built by disttrain), batch, optimizer,
precision, memory format, BatchNorm mode and world size, DDP over gloo/NCCL, on one random batch
already on the device per rank (no decode, no augmentation, no logging, no schedule). disttrain runs
train_epoch: its loaders, DeviceAugment, the schedule, train/* logging (metrics.jsonl; W&B as the
config or WANDB_MODE says), no checkpoints, no evaluation.

Cases: `demo` is configs/demo.yaml (resnet18, 28 px, 64 per rank, AdamW); `finetune` is the
unfrozen stage of configs/finetune.yaml (mobilenet_v2 from ../shared's ImageNet weights, 224 px
from 256, 16 per rank, augmentation, three LR groups, BatchNorm statistics fixed) on ../shared's
ants/bees photos at its swept LR; `resnet50` (for GPUs) is ResNet-50 at 224 px, 256 per rank, bf16.

Printed per job: images/s of each loop over the steady state (the epochs after the first: disttrain's
first epoch decodes every image, later ones read them from memory where data.cache allows) and over
the first epoch, the step time distribution (p50, p90, max) so stalls show, and the ratio disttrain /
bare. With --compile each case also runs with train.compile=true (torch.compile in the bare loop):
disttrain's compile time and the speed-up over eager. Every step's time is taken at its end (on CUDA
after a synchronize, in both loops alike).

With --parts (all of PARTS, or a comma-separated list of them) each eager job also measures the
training recipes' parts (docs/recipes.md), each on its own over the case's config: `mix`
(augment.mixup=0.2 augment.cutmix=1.0), `ema` (train.ema=0.999), `trivial` (augment.policy=trivial),
`rand` (augment.policy=rand), `repeats` (data.repeats=2) and `all` (mix + ema + trivial). Each part
is one more Trainer, built in the same processes by build_trainer from the case's config with the
part's overrides, exactly as a run with those keys builds it (its own loaders, DeviceAugment,
Mixer, WeightEma and its own run folder); the parts are not toggled on one trainer, since the
policy lives in DeviceAugment and repeats in the sampler. Every epoch runs the bare loop, the
parts-off trainer (the comparison above), then every part's train_epoch (their order rotated each
epoch), so all see the same moment of the machine. Printed per part, over the steady state: the
median step, the ms it adds per step over the parts-off median and that as % of the parts-off
step, images/s, and the ratio to the bare loop. A step's time runs from the previous step's end
to its own, so it holds the EMA update after the previous optimizer step (the epoch's first step
holds none, its batch wait instead). In a job with --parts each trainer logs to its own W&B run
(WANDB_REINIT=create_new, unless set), as separate runs would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CASES = {
    # config, overrides, the stage measured, its peak LR (None: the config's), classes
    "demo": {"config": "configs/demo.yaml", "overrides": [], "stage": 0, "lr": None},
    "finetune": {"config": "configs/finetune.yaml", "overrides": [], "stage": 1, "lr": 4.9e-4},  # the unfrozen stage, its swept LR
    # the GPU check's (benchmarks/gpu_check.sh): ResNet-50 at 224 from a 256 presize, default augmentation, bf16, channels_last
    "resnet50": {"config": None, "overrides": ["model.name=resnet50", "data.batch_size=256", "train.precision=bf16"],
                 "stage": 0, "lr": None},
}
MIX = ["augment.mixup=0.2", "augment.cutmix=1.0"]
PARTS = {  # --parts: the recipes' parts (docs/recipes.md), each a Trainer of the case's config with these overrides
    "mix": MIX,
    "ema": ["train.ema=0.999"],
    "trivial": ["augment.policy=trivial"],
    "rand": ["augment.policy=rand"],
    "repeats": ["data.repeats=2"],
    "all": [*MIX, "train.ema=0.999", "augment.policy=trivial"],
}


# -- the launched jobs ------------------------------------------------------------------------


def _config(case: str, data: str, source: str, extra: list[str]):
    from disttrain.models.checks import load_config

    overrides = [f"data.root={data}", f"data.format={source}", "log.progress=false", "checkpoint.every_n_steps=null",
                 "run.output_dir=" + tempfile.mkdtemp(prefix="overhead-"), *CASES[case]["overrides"], *extra]
    if source == "shards" and case == "finetune":
        overrides.append("stages.0.precompute=false")  # precompute indexes a folder's images; stage 0 is not measured
    config = CASES[case]["config"]
    return load_config(str(REPO / config) if config else None, overrides)


def _stamp(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class BareLoop:
    """DDP over one in-memory batch per rank: forward, loss, backward, step, zero_grad; nothing else.
    The same model (disttrain's build_model), batch, optimizer (make_optimizer), precision, memory
    format and BatchNorm mode as the measured stage."""

    def __init__(self, cfg, acc, stage, classes: int, norms_fixed: bool, compiled: bool):
        import torch
        from torch import nn
        from torch.nn.parallel import DistributedDataParallel as DDP

        from disttrain.models.build import build_model
        from disttrain.models.optim import decay_groups, make_optimizer

        self.device, self.torch = acc.device, torch
        model = build_model(cfg.model, num_classes=classes).to(self.device)
        ddp = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None) if acc.num_processes > 1 else model
        self.model = torch.compile(ddp) if compiled else ddp
        self.optimizer = make_optimizer(cfg.optim, decay_groups(model.named_parameters(), cfg.optim.weight_decay), 1e-4)
        memory = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.x = torch.randn(stage.batch_size, 3, stage.image_size, stage.image_size, device=self.device).contiguous(memory_format=memory)
        self.y = torch.randint(0, classes, (stage.batch_size,), device=self.device)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision)
        self.norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if norms_fixed else []

    def run(self, steps: int) -> list[float]:
        torch = self.torch
        self.model.train()
        for module in self.norms:
            module.eval()
        times, last = [], _stamp(self.device)
        for _ in range(steps):
            with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                logits = self.model(self.x)
            loss = torch.nn.functional.cross_entropy(logits.float(), self.y)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            now = _stamp(self.device)
            times.append(now - last)
            last = now
        return times


class StepClock:
    """A trainer's steps, each stamped at its end from the previous one's end (observe_steps)."""

    def __init__(self, trainer, device):
        self.trainer, self.device, self.times, self.last = trainer, device, [], 0.0
        trainer.observe_steps(self.stamped)

    def stamped(self, _seconds: float) -> None:
        now = _stamp(self.device)
        self.times.append(now - self.last)
        self.last = now

    def epoch(self, epoch: int) -> list[float]:
        """The trainer's train_epoch(epoch): its steps' times."""
        self.times = []
        self.last = _stamp(self.device)  # an epoch's first step waits for its first batch: counted
        self.trainer.train_epoch(epoch)
        return self.times


def part_trainers(args, runtime, case: dict) -> dict:
    """--parts: one more Trainer per part, built as a run with the part's overrides builds it
    (its own loaders, augmentation, mixer, EMA and run folder), at the case's stage and LR."""
    from disttrain.train.build import build_trainer

    trainers = {}
    for name in args.parts.split(","):
        trainer, _ = build_trainer(_config(args.case, args.data, args.source, [*args.overrides, *PARTS[name]]), runtime,
                                   stage=case["stage"])
        if case["lr"] is not None:
            trainer.schedule.set_peak_lr(case["lr"])
        trainers[name] = trainer
    return trainers


def run_job(args) -> dict:
    """disttrain's Trainer (train_epoch: its loaders, DeviceAugment, schedule, train/* logging; no
    evaluation, no checkpoints) and the bare loop, alternating epoch by epoch in the same processes
    (same threads and cores, same moment of the machine), each step's end stamped; with --parts,
    each part's trainer after them in every epoch."""
    import torch

    from disttrain.train.build import build_trainer
    from disttrain.dist.runtime import build_runtime
    from disttrain.config import run_stages

    case = CASES[args.case]
    cfg = _config(args.case, args.data, args.source, args.overrides)
    runtime = build_runtime(cfg)
    acc = runtime.accelerator
    trainer, data = build_trainer(cfg, runtime, stage=case["stage"])
    if case["lr"] is not None:
        trainer.schedule.set_peak_lr(case["lr"])
    stage = run_stages(cfg)[case["stage"]]
    bare = BareLoop(cfg, acc, stage, len(data.classes), bool(trainer.fixed_norms), args.compile)
    ours = StepClock(trainer, acc.device)
    parts = {name: StepClock(t, acc.device) for name, t in part_trainers(args, runtime, case).items()} if args.parts else {}
    per_epoch = trainer.optimizer_steps_per_epoch
    result = {"bare": [], "disttrain": []}
    names, timed = list(parts), {name: [] for name in parts}
    for epoch in range(args.epochs):
        result["bare"].append(bare.run(per_epoch))
        result["disttrain"].append(ours.epoch(epoch))
        for name in names[epoch % len(names):] + names[:epoch % len(names)] if names else []:  # rotated each epoch
            timed[name].append(parts[name].epoch(epoch))
    global_batch = stage.batch_size * acc.num_processes
    out = {
        "global_batch": global_batch, "world": acc.num_processes, "device": str(acc.device), "precision": acc.mixed_precision,
        "threads": torch.get_num_threads(), "line": trainer.training_line(), "compile_seconds": trainer.compile_seconds,
        "epochs": result,
    }
    if parts:
        out["parts"] = {name: {"epochs": timed[name]} for name in parts}
    return out


def job(args) -> None:
    if args.parts:
        os.environ.setdefault("WANDB_REINIT", "create_new")  # each part's trainer its own W&B run, as a run of its own
    result = run_job(args)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(args.json).write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


# -- the parent: launches, collects, prints -----------------------------------------------------


def launch(nproc: int, case: str, data: str, source: str, compiled: bool, epochs: int, overrides: list[str],
           parts: str | None = None) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        gpus = torch.cuda.device_count()
        where = ["--multi_gpu"] if nproc > 1 else ([] if gpus else ["--cpu"])
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *where, "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               __file__, "--job", "--case", case, "--data", data, "--source", source, "--epochs", str(epochs), "--json", str(out)]
        cmd += (["--compile", "train.compile=true"] if compiled else []) + (["--parts", parts] if parts else []) + overrides
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            sys.exit(f"{case} ({source}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return json.loads(out.read_text())


def stats(epochs: list[list[float]], global_batch: int) -> dict:
    times = sorted(t for epoch in epochs for t in epoch)
    return {"images_per_sec": global_batch * len(times) / sum(times), "p50": times[len(times) // 2],
            "p90": times[min(len(times) - 1, int(0.9 * len(times)))], "max": times[-1], "steps": len(times)}


def row(name: str, r: dict, bare: dict | None = None) -> str:
    ratio = f"   ratio {r['images_per_sec'] / bare['images_per_sec']:.3f}" if bare else ""
    return (f"  {name:<34} {r['images_per_sec']:7.1f} img/s   step p50 {r['p50'] * 1e3:7.1f} ms  p90 {r['p90'] * 1e3:7.1f} ms"
            f"  max {r['max'] * 1e3:7.1f} ms  ({r['steps']} steps){ratio}")


def part_rows(r: dict, off: dict, bare: dict, source: str) -> None:
    """--parts: each part's steady-state step against the parts-off trainer's and the bare loop's."""
    print(f"  the recipes' parts (disttrain, {source}; each its own trainer, alternating with the parts-off one "
          "epoch by epoch; steady state):", flush=True)
    print(f"    {'part':<8} {'step p50':>10} {'added':>11} {'of step':>8} {'img/s':>8} {'/ bare':>7}  overrides")
    print(f"    {'off':<8} {off['p50'] * 1e3:7.1f} ms {'':>11} {'':>8} {off['images_per_sec']:8.1f} "
          f"{off['images_per_sec'] / bare['images_per_sec']:7.3f}")
    for name, part in r["parts"].items():
        s = stats(part["epochs"][1:], r["global_batch"])
        added = s["p50"] - off["p50"]
        print(f"    {name:<8} {s['p50'] * 1e3:7.1f} ms {added * 1e3:+8.1f} ms {100 * added / off['p50']:+7.1f}% "
              f"{s['images_per_sec']:8.1f} {s['images_per_sec'] / bare['images_per_sec']:7.3f}  {' '.join(PARTS[name])}",
              flush=True)


def prepare_data(case: str, cache: Path, folder: str | None, shards: str | None) -> tuple[str, str]:
    """(the case's image folder, its shards: written once into `cache` unless given)."""
    from disttrain.data.demo import write_demo_data

    if folder is None and case == "demo":
        folder = str(Path("~/.cache/disttrain/mnist").expanduser())
        write_demo_data(folder)
    elif folder is None:
        folder = str(SHARED / "data" / "hymenoptera")
        if not Path(folder).is_dir():
            sys.exit(f"the {case} case needs {folder} (../shared's ants/bees photos) or --folder")
    if shards is None:
        shards = str(cache / f"{case}-shards")
        if not (Path(shards) / "manifest.json").exists():
            presize = 28 if case == "demo" else 256
            subprocess.run([sys.executable, "-m", "disttrain.cli", "prepare", folder, shards, "--presize", str(presize),
                            "--quality", "95", "--no-progress"], check=True, cwd=REPO, capture_output=True)
    return folder, shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=[*CASES, "all"], default="all", help="all: demo and finetune")
    parser.add_argument("--nproc", type=int, default=2, help="processes per job (default 2)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each loop, alternating; the first is reported apart")
    parser.add_argument("--sources", default="folder,shards", help="disttrain's inputs to measure: folder, shards or both")
    parser.add_argument("--compile", action="store_true", help="also measure train.compile=true / torch.compile")
    parser.add_argument("--parts", nargs="?", const=",".join(PARTS),
                        help=f"also measure the recipes' parts, each on its own (eager jobs): alone, every part; "
                             f"or some of {','.join(PARTS)}")
    parser.add_argument("--folder", help="the image folder to train from (default: the case's own)")
    parser.add_argument("--shards", help="its shards from `disttrain prepare` (default: written once into --cache)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "disttrain-overhead"), help="where shards are written once")
    parser.add_argument("--job", action="store_true", help=argparse.SUPPRESS)  # one launched job (what the parent runs)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--source", default="folder", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides for every job (key=value)")
    args = parser.parse_intermixed_args()
    unknown = [name for name in (args.parts or "").split(",") if args.parts and name not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(unknown)}; choose from {','.join(PARTS)} (or give --parts "
                     "alone, after the config overrides, for all)")
    if args.job:
        return job(args)

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for case in ["demo", "finetune"] if args.case == "all" else [args.case]:
        folder, shards = prepare_data(case, cache, args.folder, args.shards)
        print(f"\n== {case}: {CASES[case]['config'] or 'defaults'} {' '.join(CASES[case]['overrides'])}"
              f"{' (the unfrozen stage)' if CASES[case]['stage'] else ''}, {args.nproc} process(es), {args.epochs} epochs of each"
              " loop alternating; steady state = after the first epoch", flush=True)
        eager = {}
        for compiled in ([False, True] if args.compile else [False]):
            tag = "compiled " if compiled else ""
            for source in args.sources.split(","):
                data = folder if source == "folder" else shards
                r = launch(args.nproc, case, data, source, compiled, args.epochs, args.overrides, None if compiled else args.parts)
                batch = r["global_batch"]
                bare, ours = stats(r["epochs"]["bare"][1:], batch), stats(r["epochs"]["disttrain"][1:], batch)
                first_bare, first = stats(r["epochs"]["bare"][:1], batch), stats(r["epochs"]["disttrain"][:1], batch)
                print(f"  {r['line']}")
                print(row(f"{tag}bare DDP loop", bare), flush=True)
                print(row(f"{tag}disttrain ({source})", ours, bare), flush=True)
                print(row("  first epoch: bare", first_bare), flush=True)
                print(row(f"  first epoch: disttrain ({source})", first, first_bare), flush=True)
                if compiled:
                    print(f"    compiling (disttrain, in its steps): {r['compile_seconds']:.1f} s; compiled/eager images/s: bare "
                          f"{bare['images_per_sec'] / eager[source][0]['images_per_sec']:.2f}x, disttrain "
                          f"{ours['images_per_sec'] / eager[source][1]['images_per_sec']:.2f}x", flush=True)
                else:
                    eager[source] = (bare, ours)
                if "parts" in r:
                    part_rows(r, ours, bare, source)
        print(f"  ({r['device']}, {r['precision']} precision, {r['threads']} intra-op thread(s) per rank)", flush=True)


if __name__ == "__main__":
    main()
