"""The timm path against the torchvision path on the same weights: the shared ImageNet mobilenet_v2
(torchvision layout) remapped to timm's `mobilenetv2_100`, then the lesson's recipe on ants/bees
through both (`configs/finetune.yaml` and `configs/finetune_timm.yaml`), side by side.

    python benchmarks/timm_path.py --weights-only              # write the remapped file, check it, exit
    python benchmarks/timm_path.py [--runs 2] [--nproc 2]      # and train both recipes, alternating

The remap: timm's mobilenetv2_100 and torchvision's mobilenet_v2 are the same network (ReLU6,
symmetric padding, the same 314 state dict entries in the same order and shapes), so the tensors
map one to one by position; the script checks the shapes pair by pair and that both networks give
the same logits on the same input (max abs difference printed). Written to
`runs/weights/mobilenetv2_100_from_torchvision.safetensors`, the file configs/finetune_timm.yaml
starts from. With network, timm's own weights do instead: `hf download timm/mobilenetv2_100.ra_in1k`,
then `model.pretrained=timm`.

Both recipes run with the same preprocessing (`augment.interpolation=bilinear`: the weights are
torchvision's; the timm config alone would take timm's bicubic). Printed per run: the wall time,
the final validation accuracy and loss, and the training throughput of each stage as the run
reports it ("N training images in X s of training"), from which the step time ratio
timm / torchvision. Skips (exit 0) without ../shared.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SOURCE = SHARED / "weights" / "mobilenet_v2_imagenet.pt"
TARGET = REPO / "runs" / "weights" / "mobilenetv2_100_from_torchvision.safetensors"


def remap(source: Path, target: Path) -> float:
    """Write torchvision mobilenet_v2 `source` as timm mobilenetv2_100 `target`; returns the max abs
    difference of the two networks' logits on one random batch."""
    import timm
    import torchvision
    from safetensors.torch import save_file

    tv_state = torch.load(source, map_location="cpu", weights_only=True)
    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(tv_state)
    tm = timm.create_model("mobilenetv2_100")
    names = list(tm.state_dict())
    if len(names) != len(tv_state):
        raise SystemExit(f"{source}: {len(tv_state)} tensors, timm's mobilenetv2_100 has {len(names)}")
    mapped = {}
    for (tv_name, tensor), name in zip(tv_state.items(), names):
        if tensor.shape != tm.state_dict()[name].shape:
            raise SystemExit(f"{tv_name} {tuple(tensor.shape)} does not fit {name} {tuple(tm.state_dict()[name].shape)}")
        mapped[name] = tensor.contiguous()
    tm.load_state_dict(mapped)
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (tv.eval()(x) - tm.eval()(x)).abs().max().item()
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(mapped, str(target))
    return diff


def train(config: str, nproc: int, name: str) -> dict:
    cmd = [str(Path(sys.executable).parent / "disttrain"), "launch", "--multi_gpu" if nproc > 1 else "--cpu", "--num_processes", str(nproc),
           "launch/train.py", "--config", config, f"run.name={name}", "augment.interpolation=bilinear", "log.progress=false",
           "checkpoint.resume=never"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}\n{done.stderr[-3000:]}")
    rows = re.findall(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+\d\d:\d\d", done.stdout, re.M)
    speeds = [float(v) for v in re.findall(r"training: ([\d.]+) images/s", done.stdout)]
    return {"wall": wall, "valid_loss": float(rows[-1][2]), "accuracy": float(rows[-1][3]), "images_per_s": speeds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights-only", action="store_true", help="write and check the remapped weights, then exit")
    parser.add_argument("--runs", type=int, default=2, help="runs of each recipe, alternating (default 2)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per run (default 2)")
    args = parser.parse_args()
    if not SOURCE.is_file() or not (SHARED / "data" / "hymenoptera").is_dir():
        print(f"skipped: {SOURCE} or ../shared/data/hymenoptera is not present")
        return
    diff = remap(SOURCE, TARGET)
    print(f"remapped {SOURCE.name} -> {TARGET.relative_to(REPO)}: max abs difference of the logits, torchvision vs timm: {diff:.3g}")
    if args.weights_only:
        return
    results: dict[str, list[dict]] = {"torchvision": [], "timm": []}
    for run in range(args.runs):
        for path, config in (("torchvision", "configs/finetune.yaml"), ("timm", "configs/finetune_timm.yaml")):
            result = train(config, args.nproc, f"bench-{path}")
            results[path].append(result)
            print(f"run {run + 1} {path:11s}: wall {result['wall']:.1f} s, accuracy {result['accuracy']:.4f}, valid loss "
                  f"{result['valid_loss']:.4f}, images/s per stage {', '.join(f'{v:.1f}' for v in result['images_per_s'])}", flush=True)
    print(f"\n{'path':12s} {'wall s (mean)':>14s} {'accuracy (each run)':>22s} {'head img/s':>11s} {'unfrozen img/s':>15s}")
    means = {}
    for path, runs in results.items():
        head = statistics.mean(r["images_per_s"][0] for r in runs)
        body = statistics.mean(r["images_per_s"][-1] for r in runs)
        means[path] = (head, body)
        accuracies = " / ".join(f"{r['accuracy']:.3f}" for r in runs)
        print(f"{path:12s} {statistics.mean(r['wall'] for r in runs):14.1f} {accuracies:>22s} "
              f"{head:11.1f} {body:15.1f}")
    print(f"step time timm / torchvision: head stage {means['torchvision'][0] / means['timm'][0]:.3f}, "
          f"unfrozen stage {means['torchvision'][1] / means['timm'][1]:.3f} (throughput ratios inverted)")


if __name__ == "__main__":
    main()
