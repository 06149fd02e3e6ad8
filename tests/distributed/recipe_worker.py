"""The real `train()` with hooks that record what each rank computed itself, before anything is
reduced or saved:

    recipe_worker.py OUT EMA_STEP [section.key=value ...]

- OUT/ema-rank<R>.pt: this rank's weight EMA (`WeightEma.state_dict()`) right after its update at
  global step EMA_STEP (the EMA is never communicated: each rank computes its own);
- OUT/stop-rank<R>.jsonl: one line per `EarlyStopping.update` call on this rank: the global step,
  the value it was given and its decision;
- OUT/mix-rank<R>.json: the global step at each MixUp/CutMix call on this rank (the LR sweep's
  calls come before the first training step, at step 0).
"""

import json
import os
import sys
from pathlib import Path

import torch

from disttrain.cli import run_user_errors, train
from disttrain.data.mix import Mixer
from disttrain.models.checks import load_config
from disttrain.train.ema import WeightEma
from disttrain.train.monitor import EarlyStopping
from disttrain.train.trainer import Trainer

out, ema_step, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
RANK = int(os.environ.get("RANK", "0"))
real_update, real_stop, real_mix, real_step = WeightEma.update, EarlyStopping.update, Mixer.__call__, Trainer.step
state = {"step": 0, "mixed": []}


def update(self, module, step):
    updated = real_update(self, module, step)
    if step == ema_step:
        torch.save(self.state_dict(), out / f"ema-rank{RANK}.pt")
    return updated


def stop(self, value):
    decision = real_stop(self, value)
    with open(out / f"stop-rank{RANK}.jsonl", "a") as f:
        f.write(json.dumps({"step": state["step"], "value": value, "stop": decision}) + "\n")
    return decision


def mix(self, x, targets):
    state["mixed"].append(state["step"])
    return real_mix(self, x, targets)


def step(self, batches):
    state["step"] = self.global_step
    return real_step(self, batches)


if __name__ == "__main__":  # loader workers import this script again (disttrain/data/workers.py)
    WeightEma.update, EarlyStopping.update, Mixer.__call__, Trainer.step = update, stop, mix, step
    code = run_user_errors(lambda: train(load_config("configs/demo.yaml", overrides)))
    (out / f"mix-rank{RANK}.json").write_text(json.dumps(state["mixed"]))
    sys.exit(code)
