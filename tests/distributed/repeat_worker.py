"""Run by test_loader_faults.py under a real launcher: the real `train()` N times in the same
processes, each time a new run (its own run dir) of one config, so every run starts its training and
validation loaders' workers anew while the threads of the runs before (gloo's, tqdm's monitor,
W&B's, the queue feeders) are alive:

    repeat_worker.py N CONFIG [section.key=value ...]

The main process prints one `run <i>: exit <code>` line per run.
"""

import os
import sys

if __name__ == "__main__":  # loader workers import this script again (disttrain/data/workers.py): keep it light
    from accelerate import Accelerator

    from disttrain.cli import run_user_errors
    from disttrain.models.checks import load_config
    from disttrain.train.run import train

    count, config, overrides = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    end_training = Accelerator.end_training
    Accelerator.end_training = lambda self: None  # the process group lives on for the next run
    for i in range(count):
        code = run_user_errors(lambda: train(load_config(config, [*overrides, f"run.name=run{i}"])))
        if os.environ.get("RANK", "0") == "0":
            print(f"run {i}: exit {code}", flush=True)
        if code:
            sys.exit(code)
    end_training(Accelerator())
