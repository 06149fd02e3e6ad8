"""The real `train()` (as launch/train.py runs it; launch/slurm/train.sbatch runs this script instead
when TRAIN_SCRIPT names it) with a test-only hook that preempts one node's ranks at a fixed training
step, in the job's first run only (SLURM_RESTART_COUNT unset or 0):

    PREEMPT_NODE=N PREEMPT_STEP=K: on node N (SLURM_NODEID), each rank, just before its optimizer
    step K + 1 (once K steps are done), sends SIGUSR1 to its own process and waits until that signal
    has set its preemption flag. No other rank is signalled at that step: the others learn of it only
    from the ranks' reduced flag at the next log point, where every rank saves and exits 75.
    The node's first rank then asks SLURM to signal the batch script as SLURM does before the time
    limit (`scancel --batch --signal=USR1`): the script requeues the job once its step has ended (its
    forward of USR1 reaches the other ranks at whatever step they are then; their stop is already
    decided by node N's flags).
"""

import os
import signal
import subprocess
import sys

LIMIT = 60  # seconds: a signal that never reaches the process fails the run instead of hanging it


def main() -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # as launch/train.py, before the imports
    from disttrain.cli import run_user_errors, train
    from disttrain.models.checks import load_config
    from disttrain.train.trainer import Trainer

    first_run = int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0
    on_node = os.environ.get("SLURM_NODEID") == os.environ.get("PREEMPT_NODE")
    at = int(os.environ.get("PREEMPT_STEP", "0"))
    real_step = Trainer.step

    def step(self, group):
        if first_run and on_node and at and self.global_step == at and not self.checkpointer.flag.requested:
            os.kill(os.getpid(), signal.SIGUSR1)
            if not self.checkpointer.flag.wait(LIMIT):
                raise RuntimeError(f"rank {os.environ.get('RANK')}: SIGUSR1 sent to itself at step {at} did not set its "
                                   f"preemption flag within {LIMIT} s")
            if os.environ.get("LOCAL_RANK") == "0":
                subprocess.run(["scancel", "--batch", "--signal=USR1", os.environ["SLURM_JOB_ID"]], check=True)
        return real_step(self, group)

    Trainer.step = step  # the training loop and the LR sweep call it; the sweep runs at global step 0
    config, overrides = sys.argv[2], sys.argv[3:]
    assert sys.argv[1] == "--config", sys.argv
    return run_user_errors(lambda: train(load_config(config, overrides)))


if __name__ == "__main__":  # loader workers import this script again (disttrain/data/workers.py)
    sys.exit(main())
