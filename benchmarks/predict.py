"""`disttrain predict` against the plain loop a user would otherwise write, in the same run.

    python benchmarks/predict.py --weights runs/finetune/model.pt [--data ../shared/data/hymenoptera/val]
                                 [--nproc 1,2] [--precision no|bf16] [--tta] [--repeats 2]

disttrain: `disttrain launch --multi_gpu --num_processes N -m disttrain.cli predict` (N CPU
processes, or GPUs; each N of `--nproc` in turn), each rank decoding and predicting its run of the
global batches into its part file; its images/s is the one it prints (from its first batch until
every rank is done, so not counting process start, listing and model load, nor the final
concatenation); the command's whole wall time is printed beside it. Plain: one process, torchvision `ImageFolder`
(Resize to the model's presize, CenterCrop, ToTensor, Normalize with model.pt's statistics),
a DataLoader with one worker, the model in eval mode under `torch.no_grad()`, timed the same way
(first batch to last). Both at the same precision and batch size; best of `--repeats`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torchvision import transforms

from disttrain.use.inference import load_saved_model


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def disttrain_predict(args, nproc: int, out: Path) -> tuple[float, float]:
    """(images/s it reports, wall seconds of the whole command)."""
    launcher = [str(Path(sys.executable).parent / "disttrain"), "launch", "--main_process_port", str(_port())]
    launcher += ["--multi_gpu", "--num_processes", str(nproc)] if nproc > 1 else ["--num_processes", "1"]
    cmd = [*launcher, "-m", "disttrain.cli", "predict", "--weights", args.weights, "--out", str(out), "--precision", args.precision,
           "--batch-size", str(args.batch), *(["--tta"] if args.tta else []), args.data]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc))})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"disttrain predict failed:\n{proc.stderr[-3000:]}")
    rate = float(re.search(r"([\d.]+) images/s on", proc.stderr).group(1))
    return rate, wall


def plain_loop(args) -> tuple[float, int]:
    """(images/s, images) of the single-process torchvision loop."""
    saved = load_saved_model(args.weights, torch.device("cpu"))
    view = transforms.Compose([transforms.Resize(saved.load_size), transforms.CenterCrop(saved.image_size), transforms.ToTensor(),
                               transforms.Normalize(saved.mean, saved.std)])
    data = torchvision.datasets.ImageFolder(args.data, transform=view)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, num_workers=1)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" else contextlib.nullcontext
    count, start = 0, time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            with autocast():
                saved.model(x.contiguous(memory_format=torch.channels_last)).float().softmax(1)
            count += len(x)
    return count / (time.perf_counter() - start), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="a model.pt written by a training run")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/hymenoptera/val"))
    parser.add_argument("--nproc", default="2", help="comma-separated process counts, each measured (default 2)")
    parser.add_argument("--precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    counts = [int(n) for n in args.nproc.split(",")]
    scratch = Path(tempfile.mkdtemp())
    try:
        ours, walls, plain = {n: [] for n in counts}, {n: [] for n in counts}, []
        for _ in range(args.repeats):  # interleaved, best of each
            for nproc in counts:
                rate, wall = disttrain_predict(args, nproc, scratch / "p.csv")
                ours[nproc].append(rate)
                walls[nproc].append(wall)
            rate, count = plain_loop(args)
            plain.append(rate)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tta = ", TTA 5 views" if args.tta else ""
    print(f"{count} images from {args.data}, batch {args.batch}, precision {args.precision}{tta}")
    for nproc in counts:
        print(f"disttrain predict, {nproc} process(es): {max(ours[nproc]):.1f} images/s (whole command {min(walls[nproc]):.1f} s); "
              f"ratio to the plain loop {max(ours[nproc]) / max(plain):.2f}")
    print(f"plain torchvision loop, 1 process:       {max(plain):.1f} images/s")


if __name__ == "__main__":
    main()
