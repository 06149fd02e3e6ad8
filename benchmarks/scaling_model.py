"""A model of data-parallel training on 8 to 1,024 GPUs, from parts measured here and figures cited
from public sources (docs/scaling.md explains each step; every input below is named `measured` or
`cited`/`assumed`).

    python benchmarks/scaling_model.py [--data ../shared/data/hymenoptera/train]

Measured on this machine (no GPU, nothing downloaded: torchvision models built with weights=None):
- ResNet-50 and ViT-B/16: parameters, the bytes DDP all-reduces per step (fp32 gradients: the
  parameters stay fp32 under autocast and disttrain registers no compression hook), forward FLOPs
  at 224 px (torch's FlopCounterMode), DDP's buckets (torch's own bucket assignment with DDP's
  default 25 MiB cap and 1 MiB first bucket, parameters in the order their gradients become ready)
  and when each bucket is ready during a backward pass (gradient hooks, one CPU thread);
- JPEG decode per core: the CPU worker's per-sample work (`load_presized`: libjpeg-turbo decode +
  presize to 256) on the photos' bytes in memory, and the real loaders of benchmarks/data_pipeline.py
  run with no worker processes (everything on one core): folder -> uint8 batch, shards -> uint8
  batch, shards decode only;
- `disttrain prepare` output: bytes per presized sample;
- checkpoint writes: torch.save + fsync of model + SGD / AdamW state (what a rank-0 `shared.pt`
  holds) and of one rank's `rank<R>.pt` RNG states;
- disttrain's own decisions: loader workers per rank on a 112-core 8-GPU node (`data.num_workers:
  auto`, disttrain/dist/cores.py), the shard plan of every rank and worker for ImageNet's 1,281,167
  training images (disttrain/data/shards.py `plan_epoch`), the LR sweep's steps (`sweep.num_iter`).

Then the model for 8..1,024 GPUs: ring all-reduce time per step at NVLink and InfiniBand bandwidths,
whether it hides behind the backward pass, decode cores per GPU against a node's cores, shard
counts against ranks x workers, the LR sweep's cost, checkpoint time per save, global batch.
Timings here are of a 2-core machine that other jobs share: decode rates are counted in CPU seconds
of this single-threaded process (one core's rate, which other jobs on the cores do not lower; the
wall rates are printed beside them), best of --repeats; checkpoint writes are wall times.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere: benchmarks/ modules
from data_pipeline import ceiling_pipeline, epochs_of, folder_pipeline, shard_pipeline  # noqa: E402

from disttrain.config import DataConfig, OptimConfig, SweepConfig  # noqa: E402
from disttrain.config.schema import ScheduleConfig  # noqa: E402
from disttrain.data.decode import _jpeg_size, load_presized  # noqa: E402
from disttrain.data.prepare import PrepareSettings, prepare  # noqa: E402
from disttrain.data.shards import load_manifest, plan_epoch  # noqa: E402
from disttrain.dist.cores import Machine, plan  # noqa: E402
from disttrain.dist.runtime import rng_state  # noqa: E402
from disttrain.models.optim import build_optimizer  # noqa: E402

WORLDS = (8, 16, 32, 64, 128, 256, 512, 1024)
GPUS_PER_NODE = 8
MiB = 1024 * 1024

# ---------------------------------------------------------------------------------------------
# Cited (URLs in docs/scaling.md) and assumed inputs. Nothing here is measured on this machine.

RN50_A100_1GPU = 2470.0
"""cited: NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5 README, DGX A100 (8x A100 80GB), mixed
precision, 1 GPU, 256 per GPU (configs.yml DGXA100 AMP batch_size 256): 2470 img/s."""
RN50_A100_8GPU = 16621.0
"""cited: the same table, 8 GPUs: 16621 img/s (6.72x strong scaling)."""
H100_OVER_A100 = 2.0
"""assumed: an H100 trains ResNet-50 / ViT-B/16 twice as fast as an A100 (no per-GPU H100 training
images/s for these models found through the search tool)."""
VIT_OVER_RN50 = 392.99 / 1218.01
"""cited: timm results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv, training samples/s on one
RTX 3090, AMP, channels_last: vit_base_patch16_224 392.99, resnet50 1218.01. Applying this ratio to
A100/H100 is assumed."""
BACKWARD_SHARE = 2 / 3
"""assumed: backward is 2/3 of a step's compute (about twice the forward's FLOPs)."""
NVLINK4_GBPS = 450.0
"""cited: H100 fourth-generation NVLink, 900 GB/s bidirectional per GPU (NVIDIA HGX H100 blog;
MLPerf system description '18x 4th Gen NVLink, 900GB/s') -> 450 GB/s per direction."""
IB_GBITS = (100, 200, 400)
"""InfiniBand line rates (HDR100/HDR/NDR), Gb/s per port; /8 -> GB/s per direction."""
NICS_PER_NODE = (1, 8)
"""1: one NIC per 8-GPU node (assumed cluster); 8: one per GPU, as in the cited MLPerf systems of
8x H100 ('8x 400Gb Infiniband')."""
ALPHA_INTRA_S = 10e-6
"""assumed: latency of one intra-node all-reduce call (nccl-tests prints about 6 us for small
all-reduces on 2 PCIe GPUs in the cited log)."""
ALPHA_HOP_S = 5e-6
"""assumed: latency per inter-node step of a ring (2 x (nodes - 1) steps per all-reduce)."""
NODE_CORES = 112
"""cited: 2x Intel Xeon Platinum 8480C, 56 cores each, per 8-GPU H100/H200 node (MLCommons system
description of NVIDIA's 8x H200 SXM)."""
IMAGENET_TRAIN = 1_281_167
"""ImageNet-1k training images (the ILSVRC-2012 count)."""
GOYAL_MAX_BATCH = 8192
"""cited: Goyal et al. 2017 (arXiv 1706.02677): lr = 0.1 x B / 256 with 5 warmup epochs holds to
B = 8192 for ResNet-50 on ImageNet; beyond it LARS (You et al. 2017, arXiv 1708.03888, 32k) or LAMB
(You et al. 2019, arXiv 1904.00962)."""


def gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


# ---------------------------------------------------------------------------------------------
# Measured: the models.


@dataclass
class ModelFacts:
    name: str
    params: int
    fwd_gflops: float
    buckets: list[int]
    """fp32 bytes per DDP bucket, in the order their all-reduces are launched."""
    ready: list[float]
    """When each bucket's last gradient is ready, as a fraction of the backward pass (measured on CPU)."""

    @property
    def grad_bytes(self) -> int:
        return self.params * 4


def ddp_buckets(model: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """DDP's buckets after its first step: torch's own assignment (`_compute_bucket_assignment_by_size`,
    what the reducer calls when it rebuilds them) with DDP's default caps (1 MiB first bucket, then
    25 MiB), over the parameters in the order their gradients are ready (reverse definition order)."""
    params = [p for p in model.parameters() if p.requires_grad][::-1]
    indices, _ = dist._compute_bucket_assignment_by_size(params, [dist._DEFAULT_FIRST_BUCKET_BYTES, 25 * MiB])
    return [[params[i] for i in bucket] for bucket in indices]


def bucket_ready_times(model: torch.nn.Module, buckets, batch: int) -> list[float]:
    """One backward pass (fp32, one thread) with a hook on every parameter: when each bucket's last
    gradient arrives, as a fraction of the backward pass's CPU time (a CPU's profile of the
    backward stands in for a GPU's: assumed)."""
    stamps: dict[int, float] = {}
    handles = [p.register_post_accumulate_grad_hook(lambda p: stamps.__setitem__(id(p), time.process_time()))
               for p in model.parameters()]
    loss = model(torch.randn(batch, 3, 224, 224)).float().logsumexp(1).mean()
    start = time.process_time()  # CPU seconds of this one-thread process: other jobs on the cores do not count
    loss.backward()
    end = max(stamps.values())
    for h in handles:
        h.remove()
    return [max((stamps[id(p)] - start) / (end - start) for p in bucket) for bucket in buckets]


def model_facts(name: str, batch: int) -> ModelFacts:
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    buckets = ddp_buckets(model)
    ready = bucket_ready_times(model, buckets, batch)
    return ModelFacts(name, sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 1e9,
                      [sum(p.numel() * p.element_size() for p in b) for b in buckets], ready)


# ---------------------------------------------------------------------------------------------
# Measured: decoding.


def cpu_rate(run_pass, passes: int, min_cpu_s: float, repeats: int) -> tuple[float, float]:
    """(images per CPU second, images per wall second) of `run_pass(epoch)` (returns the images it
    handled), after one untimed pass, over at least `passes` passes and `min_cpu_s` CPU seconds; best of
    `repeats`. Everything runs in this process on one thread, so CPU seconds are one core's seconds:
    the per-core rate holds when other jobs share the cores (the wall rate does not)."""
    run_pass(0)
    best = (0.0, 0.0)
    for _ in range(repeats):
        n, epoch, cpu0, wall0 = 0, 1, time.process_time(), time.perf_counter()
        while epoch <= passes or time.process_time() - cpu0 < min_cpu_s:
            n += run_pass(epoch)
            epoch += 1
        rate = (n / (time.process_time() - cpu0), n / (time.perf_counter() - wall0))
        best = max(best, rate)
    return best


def loader_pass(make_iter):
    """`run_pass` over a loader of benchmarks/data_pipeline.py: the images of one epoch."""
    def run(epoch: int) -> int:
        return sum(b if isinstance(b, int) else len(b[1]) for b in make_iter(epoch))
    return run


def decode_rates(folder: Path, tmp: Path, load_size: int, seconds: float, repeats: int) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    payloads = [p.read_bytes() for p in files]
    sizes = [_jpeg_size(data) for data in payloads]
    out: dict = {"photos": len(payloads), "mean_kb": statistics.mean(len(d) for d in payloads) / 1e3,
                 "median_hw": (statistics.median(s[0] for s in sizes if s), statistics.median(s[1] for s in sizes if s))}

    def decode_all(epoch: int) -> int:
        for data in payloads:
            load_presized(data, load_size)
        return len(payloads)

    out["presized_from_bytes"] = cpu_rate(decode_all, 2, seconds, repeats)

    root = tmp / "root"
    root.mkdir()
    os.symlink(folder, root / "train")
    os.symlink(folder, root / "valid")  # prepare wants both splits; only train is read
    t0 = time.perf_counter()
    prepare(root, tmp / "shards", PrepareSettings(samples_per_shard=64, presize=load_size), workers=1, progress=False,
            log=lambda line: None)
    out["prepare_s"] = time.perf_counter() - t0
    shards = tmp / "shards"
    manifest = load_manifest(shards)
    train_bytes = sum(p.stat().st_size for p in manifest.splits["train"].paths)
    out["shard_bytes_per_sample"] = train_bytes / sum(manifest.splits["train"].counts)
    batch = 64
    for key, make in (("folder_loader", lambda: epochs_of(folder_pipeline(root, batch, 0, load_size))),
                      ("shard_loader", lambda: epochs_of(shard_pipeline(shards, batch, 0, load_size))),
                      ("shard_decode_only", lambda: ceiling_pipeline(shards, batch, 0, load_size))):
        out[key] = cpu_rate(loader_pass(make()), 2, seconds, repeats)
    return out


# ---------------------------------------------------------------------------------------------
# Measured: checkpoint writes.


def timed_save(obj, path: Path) -> tuple[float, float]:
    """(MB, seconds) of torch.save + fsync, as the checkpoint writer makes a file durable."""
    start = time.perf_counter()
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - start
    size = path.stat().st_size / 1e6
    path.unlink()
    return size, seconds


def checkpoint_writes(tmp: Path, repeats: int) -> list[tuple[str, str, float, float]]:
    rows = []
    for name in ("resnet50", "vit_b_16"):
        model = getattr(torchvision.models, name)(weights=None)
        for optim in ("sgd", "adamw"):
            optimizer = build_optimizer(OptimConfig(name=optim), model)
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            optimizer.step()  # the optimizer's state (momentum; AdamW's two moments) exists from the first step
            shared = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
            timings = [timed_save(shared, tmp / "shared.pt") for _ in range(repeats)]
            rows.append((name, optim, timings[0][0], min(t for _, t in timings)))
            del optimizer, shared
            model.zero_grad(set_to_none=True)
    buffer = io.BytesIO()
    torch.save({"rng": rng_state()}, buffer)
    rows.append(("rank<R>.pt", "RNG states (this CPU process)", buffer.tell() / 1e6, float("nan")))
    return rows


# ---------------------------------------------------------------------------------------------
# Measured: disttrain's own plans.


def auto_workers_on(cores: int, gpus: int) -> int:
    """`data.num_workers: auto` for a GPU rank of a node with `cores` cores and `gpus` ranks, pinned."""
    return plan(Machine(tuple(range(cores)), cores, None), 0, gpus, "cuda", pin="on").workers


def shard_reading(total: int, per_shard: int, world: int, workers: int, batch: int) -> tuple[float, int, int]:
    """For one training epoch of `plan_epoch` over all ranks: samples streamed / samples delivered
    (a worker reads its shard from the start up to the end of its range), workers that get batches
    per rank (the fewest), and the most workers reading one shard."""
    counts = [per_shard] * (total // per_shard) + ([total % per_shard] if total % per_shard else [])
    streamed = delivered = 0
    busy = workers
    readers = [0] * len(counts)
    for rank in range(world):
        plans = plan_epoch(counts, world, rank, workers, batch, train=True)
        busy = min(busy, sum(1 for p in plans if p.batches > 0))
        for p in plans:
            for shard, start, stop in p.pieces:
                streamed += stop
                delivered += stop - start
                readers[shard] += 1
    return streamed / delivered, busy, max(readers)


# ---------------------------------------------------------------------------------------------
# The model.


def ring_time(nbytes: float, world: int, bus_gbps: float, calls: int) -> float:
    """Ring all-reduce: 2 (N-1)/N x bytes / bandwidth, plus per call the latency of its steps."""
    nodes = max(1, world // GPUS_PER_NODE)
    alpha = ALPHA_INTRA_S + 2 * (nodes - 1) * ALPHA_HOP_S
    return 2 * (world - 1) / world * nbytes / (bus_gbps * 1e9) + calls * alpha


def bus_bandwidth(world: int, ib_gbits: float, nics: int) -> float:
    """The bottleneck bandwidth per direction (GB/s) a ring's traffic sees: NVLink inside one node;
    across nodes the node's injection bandwidth (NICs x line rate), never more than NVLink."""
    return NVLINK4_GBPS if world <= GPUS_PER_NODE else min(NVLINK4_GBPS, nics * ib_gbits / 8)


def exposed_comm(facts: ModelFacts, backward_s: float, world: int, bus_gbps: float) -> float:
    """Seconds of all-reduce left after the backward pass: buckets are reduced one after another,
    each starting when its gradients are ready (measured fractions of the backward) and the previous
    bucket's all-reduce is done."""
    end = 0.0
    for size, ready in zip(facts.buckets, facts.ready):
        end = max(end, ready * backward_s) + ring_time(size, world, bus_gbps, 1)
    return max(0.0, end - backward_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/hymenoptera/train"))
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per decode timing, at least")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--load-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256, help="per-GPU batch of the model (the cited A100 figure's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.data).expanduser().resolve()
    if not folder.is_dir():
        raise SystemExit(f"--data: {folder} is not a folder of <class>/<images>")
    started = time.perf_counter()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")

    # -- models
    models = {name: model_facts(name, batch) for name, batch in (("resnet50", 8), ("vit_b_16", 4))}
    print("\n== models (measured) ==")
    for f in models.values():
        print(f"{f.name}: {f.params:,} parameters; all-reduced per step {gb(f.grad_bytes)} as fp32 gradients "
              f"({gb(f.params * 2)} with a bf16 compression hook, which disttrain does not register); "
              f"forward {f.fwd_gflops:.2f} GFLOPs at 224 px; {len(f.buckets)} DDP buckets: "
              + ", ".join(f"{b / 1e6:.1f} MB @ {r:.2f}" for b, r in zip(f.buckets, f.ready))
              + " (ready at that fraction of the backward)")
    rn50, vit = models["resnet50"], models["vit_b_16"]
    print(f"forward FLOPs ratio resnet50/vit_b_16 {rn50.fwd_gflops / vit.fwd_gflops:.3f} (measured); "
          f"training throughput ratio vit/resnet50 {VIT_OVER_RN50:.3f} (cited, timm RTX 3090)")

    # -- decode
    with tempfile.TemporaryDirectory(prefix="scaling_model_") as tmp:
        decode = decode_rates(folder, Path(tmp), args.load_size, args.seconds, args.repeats)
    print("\n== decode, one core (measured: images per CPU second of one process on one thread; "
          "wall rates in brackets, on this 2-core machine shared with other jobs) ==")
    print(f"photos: {decode['photos']} JPEGs of {folder}, mean {decode['mean_kb']:.0f} KB, median "
          f"{decode['median_hw'][0]:.0f}x{decode['median_hw'][1]:.0f} (h x w)")

    def both(key: str) -> str:
        return f"{decode[key][0]:.0f} images/s per core ({decode[key][1]:.0f} wall)"

    print(f"decode + presize to {args.load_size} from bytes in memory (a CPU worker's per-sample work): "
          f"{both('presized_from_bytes')}")
    print(f"folder -> uint8 batch (read, decode, presize, collate): {both('folder_loader')}")
    print(f"prepare: {decode['prepare_s']:.1f} s wall for {decode['photos']} x 2 photos with 1 worker; "
          f"{decode['shard_bytes_per_sample'] / 1e3:.1f} KB per presized sample")
    print(f"shards -> uint8 batch: {both('shard_loader')}; shards, decode only: {both('shard_decode_only')}")
    per_core = {"folder": decode["folder_loader"][0], "shards": decode["shard_loader"][0]}

    # -- checkpoints
    with tempfile.TemporaryDirectory(prefix="scaling_ckpt_", dir="/tmp") as tmp:
        saves = checkpoint_writes(Path(tmp), args.repeats)
    print("\n== checkpoint writes to this machine's local disk (measured, torch.save + fsync, best of "
          f"{args.repeats}) ==")
    for name, optim, mb, s in saves:
        if s == s:
            print(f"{name} + {optim}: {mb:.1f} MB, {s:.2f} s ({mb / s:.0f} MB/s)")
        else:
            print(f"{name}, {optim}: {mb * 1e3:.1f} KB")
    save_s = {(n, o): s for n, o, _, s in saves}
    save_mb = {(n, o): mb for n, o, mb, _ in saves}

    # -- disttrain's decisions
    workers = auto_workers_on(NODE_CORES, GPUS_PER_NODE)
    sweep_steps = SweepConfig().num_iter
    print("\n== disttrain's own settings (measured by calling its code) ==")
    print(f"data.num_workers auto on a {NODE_CORES}-core node with {GPUS_PER_NODE} GPU ranks: {workers} per rank "
          f"({workers * GPUS_PER_NODE} worker cores per node); data.batch_size default {DataConfig().batch_size}; "
          f"sweep.num_iter {sweep_steps}; schedule.warmup {ScheduleConfig().warmup} of all steps; "
          f"optim.lr default {OptimConfig().lr} (not scaled with the world size)")

    # -- the model
    rates = {("A100", "resnet50"): RN50_A100_1GPU, ("H100", "resnet50"): RN50_A100_1GPU * H100_OVER_A100}
    rates[("A100", "vit_b_16")] = rates[("A100", "resnet50")] * VIT_OVER_RN50
    rates[("H100", "vit_b_16")] = rates[("H100", "resnet50")] * VIT_OVER_RN50
    b = args.batch
    print(f"\n== per-GPU compute (A100 cited, H100 assumed {H100_OVER_A100}x, ViT by the cited ratio), {b} per GPU ==")
    for (gpu, name), r in rates.items():
        step = b / r
        print(f"{gpu} {name}: {r:.0f} images/s, step {ms(step)} ms, backward {ms(step * BACKWARD_SHARE)} ms")
    print(f"(cited 8x A100 ResNet-50: {RN50_A100_8GPU:.0f} images/s = {RN50_A100_8GPU / 8:.0f} per GPU, "
          f"{RN50_A100_8GPU / 8 / RN50_A100_1GPU:.2f} of one GPU's, with real data loading)")

    print("\n== all-reduce per step, ms (ring 2(N-1)/N x bytes / bottleneck bandwidth + latency), "
          "and exposed after backward (H100, 256 per GPU) ==")
    links = [("NVLink", None, None)] + [(f"IB {g}G x{n}/node", g, n) for n in NICS_PER_NODE for g in IB_GBITS]
    for name in ("resnet50", "vit_b_16"):
        f = models[name]
        backward = b / rates[("H100", name)] * BACKWARD_SHARE
        print(f"{name} ({gb(f.grad_bytes)}, {len(f.buckets)} buckets; H100 backward {ms(backward)} ms):")
        print("  N     " + "  ".join(f"{label:>18}" for label, _, _ in links[1:]) + "   (intra-node NVLink: "
              + f"{ms(ring_time(f.grad_bytes, 8, NVLINK4_GBPS, len(f.buckets)))} ms at N=8, exposed "
              + f"{ms(exposed_comm(f, backward, 8, NVLINK4_GBPS))} ms)")
        for world in WORLDS[1:]:
            cells = []
            for _, g, n in links[1:]:
                bus = bus_bandwidth(world, g, n)
                cells.append(f"{ms(ring_time(f.grad_bytes, world, bus, len(f.buckets))):>7} / "
                             f"{ms(exposed_comm(f, backward, world, bus)):>6}")
            print(f"  {world:<5} " + "  ".join(f"{c:>18}" for c in cells))

    print("\n== does it hide? exposed all-reduce / step, ms (H100), at the cited figure's 256 per GPU and at "
          f"disttrain's default {DataConfig().batch_size} per GPU ==")
    slow, fast = (100, 1), (400, 8)
    print("  N     " + "  ".join(f"{name} {pb}/GPU {g}G x{n}".rjust(27) for name in ("R50", "ViT")
                                 for pb in (b, DataConfig().batch_size) for g, n in (slow, fast)))
    for world in WORLDS:
        cells = []
        for name in ("resnet50", "vit_b_16"):
            for per_gpu in (b, DataConfig().batch_size):
                compute = per_gpu / rates[("H100", name)]
                for g, n in (slow, fast):
                    bus = bus_bandwidth(world, g, n)
                    cells.append(f"{ms(exposed_comm(models[name], compute * BACKWARD_SHARE, world, bus))} / {ms(compute)}")
        print(f"  {world:<5} " + "  ".join(c.rjust(27) for c in cells))

    print("\n== decode cores per GPU (GPU images/s / one core's measured rate) against "
          f"{workers} worker cores per rank ({NODE_CORES}-core node, cited) ==")
    for (gpu, name), r in rates.items():
        need = {k: r / v for k, v in per_core.items()}
        verdict = ("folders keep up" if need["folder"] <= workers else
                   "shards needed" if need["shards"] <= workers else "GPU decode (nvJPEG) needed")
        print(f"{gpu} {name} at {r:.0f} images/s: {need['folder']:.1f} cores from folders, "
              f"{need['shards']:.1f} from shards per GPU -> {verdict}")

    per_shard = PrepareSettings().samples_per_shard
    print(f"\n== shards: ImageNet {IMAGENET_TRAIN:,} images at {per_shard} per shard = "
          f"{math.ceil(IMAGENET_TRAIN / per_shard):,} shards (prepare's default), {workers} workers per rank, "
          f"{b} per rank (disttrain's plan_epoch, every rank) ==")
    print("  N     ranks x workers  steps/epoch  busy workers/rank  streamed/delivered  most readers of a shard  "
          "shard size for one reader")
    for world in WORLDS:
        amplification, busy, readers = shard_reading(IMAGENET_TRAIN, per_shard, world, workers, b)
        steps = math.ceil(IMAGENET_TRAIN / (world * b))
        print(f"  {world:<5} {world * workers:>15,}  {steps:>11}  {busy:>17}  {amplification:>18.2f}  {readers:>23}  "
              f"{IMAGENET_TRAIN // (world * min(workers, steps)):>10} samples")

    print(f"\n== LR sweep ({sweep_steps} steps), checkpoints, global batch (H100 assumed, {b} per GPU, "
          "NDR 400G x8/node) ==")
    print("  N     global batch  steps/epoch  sweep s R50 / ViT  sweep epochs  Goyal lr (SGD)  "
          "R50 epoch s  save/epoch R50+SGD  ViT+AdamW")
    for world in WORLDS:
        global_batch = b * world
        steps = math.ceil(IMAGENET_TRAIN / global_batch)
        step = {}
        for name in ("resnet50", "vit_b_16"):
            f = models[name]
            compute = b / rates[("H100", name)]
            step[name] = compute + exposed_comm(f, compute * BACKWARD_SHARE, world, bus_bandwidth(world, 400, 8))
        epoch = steps * step["resnet50"]
        flag = "" if global_batch <= GOYAL_MAX_BATCH else " (> 8k)"
        sweep = f"{sweep_steps * step['resnet50']:.1f} / {sweep_steps * step['vit_b_16']:.1f}"
        print(f"  {world:<5} {global_batch:>12,}  {steps:>11}  {sweep:>17}  "
              f"{sweep_steps / steps:>12.2f}  {0.1 * global_batch / 256:>8.1f}{flag:<7}  {epoch:>11.1f}  "
              f"{save_s[('resnet50', 'sgd')] / epoch:>18.3f}  "
              f"{save_s[('vit_b_16', 'adamw')] / (steps * step['vit_b_16']):>9.3f}")
    print(f"(rank 0 writes shared.pt: {save_mb[('resnet50', 'sgd')]:.0f} MB for ResNet-50 + SGD, "
          f"{save_mb[('vit_b_16', 'adamw')]:.0f} MB for ViT-B/16 + AdamW; the others wait for it)")
    print(f"\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
