"""build_runtime (disttrain/dist/runtime.py) resolves the cores, loader workers and precision once and
returns them as one value; the config it was given stays as the user wrote it."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, run_env

RUN = (
    "import json; from disttrain.models.checks import load_config; from disttrain.dist.runtime import build_runtime; "
    "cfg = load_config(None, ['train.precision=auto', 'log.wandb.mode=disabled']); "
    "before = (cfg.data.num_workers, cfg.train.threads, cfg.train.precision); "
    "runtime = build_runtime(cfg); "
    "print(json.dumps({'before': before, 'after': (cfg.data.num_workers, cfg.train.threads, cfg.train.precision), "
    "'workers': runtime.cores.workers, 'threads': runtime.cores.threads, 'mode': runtime.precision.mode, "
    "'accelerator': runtime.accelerator.mixed_precision}))"
)


def test_build_runtime_leaves_the_config_as_given_and_returns_what_it_resolved():
    """In a process of its own (build_runtime sets up this process's cores and distributed state)."""
    done = subprocess.run([sys.executable, "-c", RUN], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["before"] == seen["after"] == ["auto", "auto", "auto"], "the config is not rewritten"
    assert isinstance(seen["workers"], int) and seen["threads"] >= 1
    assert seen["mode"] == seen["accelerator"], "the Accelerator runs in the precision the runtime hands down"
