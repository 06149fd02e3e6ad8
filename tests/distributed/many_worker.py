"""Run by test_many_ranks.py and benchmarks/scale.py under a real launcher: several commands in the
same processes (16 or 32 processes each importing torch cost more than the commands themselves on a
few cores), each rank writing what it saw to files of its own:

    many_worker.py OUT PHASES [section.key=value ...]

PHASES, comma-separated, run in this order, each with overrides of its own after `+`
(`train+data.format=shards+run.name=shards`):
- `train`: the real run (disttrain.train.run.train) as OUT/<run.name> (run.name=train unless the
  phase says, run.output_dir=OUT, with the overrides); every rank writes OUT/<run.name>.rank<R>.json:
  the steps of each epoch it ran, the wall time of each training step, when its first step began
  (a sweep step or a training step) and how long its data scan took (`load_data`);
- `evaluate=WEIGHTS@DATA`: `disttrain evaluate --weights WEIGHTS --data DATA --out OUT/evaluate.json`;
- `predict=WEIGHTS@FOLDER`: `disttrain predict --weights WEIGHTS --out OUT/predict.csv FOLDER`;
- `kill=R:S`: the run again as OUT/kill; rank R writes OUT/killed (its time.time()) and SIGKILLs
  itself when it is about to take training step S (S steps done), on the launcher's first attempt;
- `resume`: the run again as OUT/kill, resuming from its newest checkpoint (checkpoint.resume=auto);
  `kill` and `resume` write OUT/kill.rank<R>.json and OUT/resume.rank<R>.json as `train` does.

Every rank writes OUT/rss.rank<R> (its peak resident memory, VmHWM, in kB) after the phases before
`kill`, and OUT/phases.rank<R>.json (each phase's start and end, time.time()).
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # loader workers import this script again (disttrain/data/workers.py): keep it light
    from accelerate import Accelerator

    import disttrain.train.build as build
    from disttrain.cli import main, run_user_errors
    from disttrain.models.checks import load_config
    from disttrain.train.run import train
    from disttrain.train.trainer import Trainer

    out, phases, overrides = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]
    rank = int(os.environ.get("RANK", "0"))
    seen = {"epochs": {}, "step_times": [], "first_step": None, "scan": None}
    kill_at = [None]  # (rank, step) while the kill phase runs
    real_step, real_epoch, real_load = Trainer.step, Trainer.train_epoch, build.load_data
    in_epoch = [False]

    def write(path: Path, text: str) -> None:
        part = path.with_name(path.name + ".part")
        part.write_text(text)
        os.replace(part, path)  # the reader never sees half a file

    def peak_rss() -> str:
        """This process's peak resident memory so far (VmHWM), in kB."""
        return next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))

    def step(self, batches):
        if seen["first_step"] is None:
            seen["first_step"] = time.time()
        if kill_at[0] is not None and in_epoch[0] and (rank, self.global_step) == kill_at[0] \
                and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            write(out / "killed", repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        began = time.perf_counter()
        result = real_step(self, batches)
        if in_epoch[0]:
            seen["step_times"].append(time.perf_counter() - began)
        return result

    def epoch(self, index: int, skip_steps: int = 0):
        before = self.global_step
        in_epoch[0] = True
        try:
            return real_epoch(self, index, skip_steps)
        finally:
            in_epoch[0] = False
            seen["epochs"][index] = seen["epochs"].get(index, 0) + self.global_step - before

    def load_data(*args, **kwargs):
        began = time.perf_counter()
        data = real_load(*args, **kwargs)
        seen["scan"] = time.perf_counter() - began
        return data

    Trainer.step, Trainer.train_epoch, build.load_data = step, epoch, load_data
    end_training = Accelerator.end_training
    Accelerator.end_training = lambda self: None  # the process group lives on for the next phase
    base = [*overrides, f"run.output_dir={out}"]
    times = {}
    for phase in phases:
        head, *extra = phase.split("+")  # a phase's own overrides come last: they win
        name, _, arg = head.partition("=")
        began, label = time.time(), name
        seen.update(epochs={}, step_times=[], first_step=None, scan=None)
        if name in ("train", "kill", "resume"):
            run = "train" if name == "train" else "kill"
            if name == "kill":
                write(out / f"rss.rank{rank}", peak_rss())
                kill_at[0] = tuple(int(x) for x in arg.split(":"))
            cfg = [*base, f"run.name={run}", *(["checkpoint.resume=auto"] if name != "train" else []), *extra]
            code = run_user_errors(lambda: train(load_config(None, cfg)))
            label = label if name != "train" else next(word.split("=", 1)[1] for word in reversed(cfg) if word.startswith("run.name="))
            write(out / f"{label}.rank{rank}.json", json.dumps(seen))
        elif name == "evaluate":
            weights, data = arg.split("@")
            code = main(["evaluate", "--weights", weights, "--data", data, "--out", str(out / "evaluate.json"), *overrides, *extra])
        elif name == "predict":
            weights, folder = arg.split("@")
            code = main(["predict", "--weights", weights, "--out", str(out / "predict.csv"), "--workers", "0", "--precision", "no",
                         folder])
        else:
            raise SystemExit(f"many_worker.py: unknown phase {phase!r}")
        times[label] = [began, time.time()]
        write(out / f"phases.rank{rank}.json", json.dumps(times))
        if code:
            sys.exit(code)
    if "kill" not in [p.partition("=")[0] for p in phases]:
        write(out / f"rss.rank{rank}", peak_rss())
    end_training(Accelerator())
