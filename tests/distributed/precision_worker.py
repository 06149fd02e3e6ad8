"""Run under torchrun by tests/distributed/test_precision_agreement.py: every rank builds the
accelerator as every disttrain command does, with its device's facts replaced by the test's (on
CPU all ranks are one machine): rank 0 reports a CPU with native bf16, rank 1 one without, or, for
the explicit case, a GPU that cannot run bf16 at all. Each rank writes what it computed, before
anything else is synced, to OUT/<case>-rank<R>.json:

    precision_worker.py OUT
"""

import json
import os
import sys
from pathlib import Path

import disttrain.dist.precision
from disttrain.config import ConfigError
from disttrain.models.checks import load_config
from disttrain.dist.precision import DeviceFacts, gpu_facts
from disttrain.dist.runtime import build_runtime

RANK = int(os.environ["RANK"])
AUTO_FACTS = [DeviceFacts("cpu", "CPU (test: native bf16)", True), DeviceFacts("cpu", "CPU (test: AVX2)", False)]
EXPLICIT_FACTS = [DeviceFacts("cpu", "CPU (test: native bf16)", True), gpu_facts("GeForce GTX 1080", (6, 1), emulated_bf16=False)]


def write(out: Path, case: str, what: dict) -> None:
    (out / f"{case}-rank{RANK}.json").write_text(json.dumps(what))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    disttrain.dist.precision.device_facts = lambda device: AUTO_FACTS[RANK]  # read at call time by the runtime
    cfg = load_config(None, ["train.precision=auto"])
    runtime = build_runtime(cfg)
    accelerator = runtime.accelerator
    write(out, "auto", {"mode": accelerator.mixed_precision, "reason": runtime.precision.reason})
    disttrain.dist.precision.device_facts = lambda device: EXPLICIT_FACTS[RANK]
    try:
        build_runtime(load_config(None, ["train.precision=bf16"]))
        write(out, "bf16", {"error": None})
    except ConfigError as err:
        write(out, "bf16", {"error": str(err)})
    accelerator.wait_for_everyone()
    accelerator.end_training()
