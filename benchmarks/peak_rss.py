"""Each rank's peak resident memory (VmHWM) over a whole training run.

    disttrain launch --multi_gpu --num_processes 2 benchmarks/peak_rss.py --config configs/finetune.yaml [overrides]

Runs launch/train.py's `main` in each rank and, when the rank exits, prints one line to stderr:
`peak_rss rank R: VmHWM <MB> MB (<MB> MB after start-up, <MB> MB of it shared memory at the end)`.
With PEAK_RSS_STAGES=1 it also prints the rank's resident and shared memory each time a stage has
built its image loaders (disttrain.train.stages.build_loaders returned): what the previous stage still
holds then shows there (its decoded-image cache is shared memory).
The start-up figure is the process's peak once torch, accelerate and disttrain are imported, before
any data or model: the run's own memory is the difference. The rank's loader workers are separate
processes and not counted (the decoded-image cache they share is: a rank reads it too).
"""

from __future__ import annotations

import atexit
import os
import runpy
import sys
from pathlib import Path


def _status(key: str) -> float:
    """A /proc/self/status field in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    import accelerate  # noqa: F401  the imports every run makes, counted in the start-up figure
    import torch  # noqa: F401

    import disttrain.cli  # noqa: F401

    start = _status("VmHWM")
    rank = os.environ.get("RANK", "0")
    print(f"peak_rss rank {rank}: disttrain from {Path(disttrain.cli.__file__).parent}", file=sys.stderr, flush=True)

    def report() -> None:
        print(f"peak_rss rank {rank}: VmHWM {_status('VmHWM'):.0f} MB ({start:.0f} MB after start-up, "
              f"{_status('RssShmem'):.0f} MB of it shared memory at the end)", file=sys.stderr, flush=True)

    atexit.register(report)
    if os.environ.get("PEAK_RSS_STAGES") == "1":
        import disttrain.train.stages

        build = disttrain.train.stages.build_loaders

        def build_loaders(*args, **kwargs):
            loaders = build(*args, **kwargs)
            print(f"peak_rss rank {rank}: a stage built its loaders: VmRSS {_status('VmRSS'):.0f} MB, "
                  f"{_status('RssShmem'):.0f} MB of it shared memory", file=sys.stderr, flush=True)
            return loaders

        disttrain.train.stages.build_loaders = build_loaders
    script = Path(__file__).resolve().parents[1] / "launch" / "train.py"
    sys.argv = [str(script), *sys.argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
