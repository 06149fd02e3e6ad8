"""Run under torchrun by tests/distributed/test_cores_side_by_side.py: builds the accelerator as
every disttrain command does (disttrain/dist/runtime.py: the cores planned and applied), then writes
OUT/<JOB>-rank<R>.json: the CPU affinity of every thread of this process, as the kernel reports it
(/proc/self/task/*/status), and the "training on" line's words for its cores.

    cores_worker.py OUT JOB [section.key=value ...]
"""

import json
import os
import sys
from pathlib import Path

from disttrain.models.checks import load_config
from disttrain.dist.runtime import build_runtime


def allowed(task: str) -> str:
    for line in Path(f"/proc/self/task/{task}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for thread {task}")


if __name__ == "__main__":
    out, job, words = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    runtime = build_runtime(load_config(None, words))
    accelerator = runtime.accelerator
    threads = {task: allowed(task) for task in os.listdir("/proc/self/task")}
    report = {"threads": threads, "cores": runtime.cores.describe()}
    (out / f"{job}-rank{accelerator.process_index}.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()
    accelerator.end_training()
