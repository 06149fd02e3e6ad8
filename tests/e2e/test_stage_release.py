"""A stage change lets go of the previous stage's loaders before the next stage builds its own: their
workers have exited, and the decoded images they cached and the activations precomputed for it are
freed (data.cache=auto then measures the memory really left)."""

from __future__ import annotations

import json

import yaml

from conftest import launch, make_folder

STAGES_RUN = r"""
import json, os, sys, weakref
from pathlib import Path

import disttrain.train.precompute
import disttrain.train.stages as stage
from disttrain.train.build import build_trainer
from disttrain.models.checks import load_config
from disttrain.dist.runtime import build_runtime

cfg = load_config(sys.argv[1], [])
trainer, data = build_trainer(cfg, build_runtime(cfg))
plans = stage.plan_stages(cfg)
pids, alive = [], []  # loader workers started so far; what was still there when a stage built its loaders
held = {}  # weak references to what a stage holds


def running(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def workers_of(*loaders):
    pids.extend(w.pid for loader in loaders for w in loader.loader._iterator._workers)


def building(what, real):
    def build(*args, **kwargs):
        alive.append({"building": what, "workers": [p for p in pids if running(p)],
                      "held": sorted(k for k, r in held.items() if r() is not None)})
        return real(*args, **kwargs)
    return build


stage.build_loaders = building("loaders", stage.build_loaders)
stage.eval_loader = building("precompute loaders", stage.eval_loader)
real_precompute = disttrain.train.precompute.precompute


def precompute(accelerator, model, head, view, train_share, valid_share, *rest):
    result = real_precompute(accelerator, model, head, view, train_share, valid_share, *rest)
    workers_of(train_share, valid_share)
    return result


disttrain.train.precompute.precompute = precompute

trainer.fit()  # stage 0 on images: 2 steps (the epoch cut short) and the validation pass
workers_of(trainer.train_loader, trainer.valid_loader)
held.update({"stage 0 train cache": weakref.ref(trainer.train_loader.loader.dataset.pixels),
             "stage 0 valid cache": weakref.ref(trainer.valid_loader.loader.dataset.pixels)})
trainer.use(stage.enter_stage(trainer, cfg, data, plans[1]))  # precomputed activations
held["stage 1 activations"] = weakref.ref(trainer.train_loader.features)
trainer.fit()
trainer.use(stage.enter_stage(trainer, cfg, data, plans[2]))  # images again
next(iter(trainer.train_loader))
print("ALIVE " + json.dumps({"checks": alive, "workers": len(pids)}))
"""


def test_a_stage_change_releases_the_previous_stages_workers_cache_and_activations(tmp_path):
    """Three stages in one real process (each trained for 2 steps and validated), loaders with 1
    worker each and data.cache on: images, then the head on precomputed activations, then images again. When stage 1 builds its precompute
    loaders, stage 0's 2 workers have exited and its caches are freed; when stage 2 builds its
    loaders, stage 1's activations are freed and its precompute loaders' workers have exited.
    (Before, the trainer kept the previous stage's loaders until the new stage was in place.)"""
    make_folder(tmp_path / "data", {"train": {"a": 8, "b": 8}, "valid": {"a": 5, "b": 5}})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"name": "s", "output_dir": str(tmp_path / "runs")},
        "data": {"root": str(tmp_path / "data"), "load_size": 20, "image_size": 16, "batch_size": 4, "num_workers": 1, "cache": "on"},
        "model": {"name": "resnet18", "pretrained": None},
        "finetune": {"groups": 3},
        "train": {"precision": "no", "max_steps_per_epoch": 2},
        "log": {"progress": False, "wandb": {"mode": "disabled"}},
        "checkpoint": {"every_n_steps": None},
        "stages": [{"name": "body", "epochs": 1, "freeze_to": -1, "lr": 1.0e-3},
                   {"name": "head", "epochs": 1, "freeze_to": -1, "lr": 1.0e-3, "augment": False, "precompute": True},
                   {"name": "all", "epochs": 1, "freeze_to": 0, "lr": 1.0e-3, "load_size": 24}],
    }))
    done = launch(["-c", STAGES_RUN, str(config)], launcher="python")
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("ALIVE "))[len("ALIVE "):])
    assert result["workers"] == 4, result  # stage 0's train and valid loaders', stage 1's two precompute loaders'
    assert [check["building"] for check in result["checks"]] == ["precompute loaders", "precompute loaders", "loaders"], result
    for check in result["checks"]:
        assert check["workers"] == [] and check["held"] == [], result
