"""The real `train()` (as launch/train.py runs it; launch/slurm/train.sbatch runs this script instead
when TRAIN_SCRIPT names it) with test-only hooks that preempt the job before its first checkpoint,
at a fixed point chosen by the job's run (SLURM_RESTART_COUNT):

    run 0: in the data scan (on the main process, once the folder is scanned);
    run 1: in stage 0's precompute (rank 0, at its first batch: the loaders' workers are running);
    run 2: in stage 0's LR sweep (rank 0, at the sweep's third step);
    run 3 and later: no signal.

There, rank 0 asks SLURM to signal the batch script as SLURM does before the time limit
(`scancel --batch --signal=USR1`); the script forwards USR1 to every process of the job step. Rank 0
then waits until that signal has set its own preemption flag, and goes on.
"""

import os
import signal
import subprocess
import sys

WHERE = {0: "scan", 1: "precompute", 2: "sweep"}
LIMIT = 60  # seconds: a signal that never reaches the process fails the run instead of hanging it


def main() -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # as launch/train.py, before the imports
    import disttrain.train.checkpoint as checkpoint
    import disttrain.data.setup as setup
    import disttrain.train.lr_sweep as lr_sweep
    import disttrain.train.precompute as precompute
    from disttrain.cli import run_user_errors, train
    from disttrain.models.checks import load_config

    where = WHERE.get(int(os.environ.get("SLURM_RESTART_COUNT") or 0))
    rank0 = os.environ.get("RANK", "0") == "0"
    flags = []
    real_install, real_scan, real_precompute, real_curve = (checkpoint.PreemptionFlag.install, setup.scan_image_folder,
                                                            precompute.precompute, lr_sweep.run_curve)

    def preempt(point: str) -> None:
        if point != where or not rank0:
            return
        subprocess.run(["scancel", "--batch", "--signal=USR1", os.environ["SLURM_JOB_ID"]], check=True)
        if not flags[0].wait(LIMIT):
            raise RuntimeError(f"rank 0: SLURM was asked to signal the job in the {point}, but no signal reached this process "
                               f"within {LIMIT} s")

    def install(self):
        flags.append(self)
        return real_install(self)

    def scan(*args, **kwargs):
        data = real_scan(*args, **kwargs)
        preempt("scan")
        return data

    def precompute_and_signal(accelerator, model, head, view, *args, **kwargs):
        first = [True]

        def view_and_signal(images, train):
            if first[0]:
                first[0] = False
                preempt("precompute")
            return view(images, train=train)

        return real_precompute(accelerator, model, head, view_and_signal, *args, **kwargs)

    def curve(step, *args, **kwargs):
        def step_and_signal(i, lr):
            if i == 2:
                preempt("sweep")
            return step(i, lr)

        return real_curve(step_and_signal, *args, **kwargs)

    checkpoint.PreemptionFlag.install = install
    setup.scan_image_folder = scan  # load_data looks these up in their modules at call time
    precompute.precompute = precompute_and_signal
    lr_sweep.run_curve = curve
    config, overrides = sys.argv[2], sys.argv[3:]
    assert sys.argv[1] == "--config", sys.argv
    return run_user_errors(lambda: train(load_config(config, overrides)))


if __name__ == "__main__":  # loader workers import this script again (disttrain/data/workers.py)
    sys.exit(main())
