"""The real `train()` with one injected fault at a given global step (the number of optimizer steps
done when `Trainer.step` is called):

    fault_worker.py MODE STEP MARKERS [section.key=value ...]

Every rank writes MARKERS/pid-rank<R> (its pid) when it starts.
`raise`: rank 1 writes MARKERS/raised (its time.time()) and raises.
`kill`:  rank 1 SIGKILLs itself, on the elastic agent's first attempt only.
`hold`:  every rank writes MARKERS/held-rank<R> (its pid) and holds still until MARKERS/go exists;
         a rank named in `go` (one rank number per line: the ranks the test signalled) also waits
         until its own preemption flag is set, so the signal is in before training goes on.
`killall`: shards loader workers with one slot each (stall_hook.OneSlotPool: a worker waits for a
         free slot after every batch); once every rank is at STEP, rank 0 writes MARKERS/run.json
         (every process under the launcher as [pid, start time, parent pid, command line], and the
         /dev/shm files they have open or mapped), then SIGKILLs the launcher, the other ranks and
         itself.
`stall-train`: rank 0's train loader worker never returns its batch number STEP (stall_hook.py).
`stall-start`: the loader workers' fork server never answers (silent_server.py; STEP unused).
"""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path


import disttrain.data.setup
import disttrain.data.shards
import disttrain.data.workers
import stall_hook
from disttrain.cli import run_user_errors, train
from disttrain.models.checks import load_config
from disttrain.train.trainer import Trainer

mode, at, markers, overrides = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
real_step = Trainer.step
HOLD_LIMIT = 120  # seconds: a test that never says go fails instead of hanging


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)  # the test never reads a half-written marker


def _hold(trainer) -> None:
    rank = trainer.accelerator.process_index
    _write(markers / f"held-rank{rank}", f"{os.getpid()}\n")
    deadline = time.monotonic() + HOLD_LIMIT
    go = markers / "go"
    while not go.exists():  # the test-only hook holds this rank still until the test says go
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank}: no {go} within {HOLD_LIMIT} s")
        time.sleep(0.02)
    if str(rank) in go.read_text().split():
        while not trainer.checkpointer.flag.requested:
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank {rank}: was signalled but its preemption flag is not set")
            time.sleep(0.02)


def _stat(pid: int) -> tuple[int, int]:
    """(parent pid, start time in clock ticks since boot) from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[19])


def _tree(root: int) -> list[int]:
    """`root` and every process under it."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = _stat(int(stat.parent.name))[0]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    found, todo = [root], [root]
    while todo:
        parent = todo.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        todo += children
    return found


def _shm_files(pid: int) -> set[str]:
    """The /dev/shm files (still named: not deleted) that `pid` has open or mapped."""
    names = {line.split(maxsplit=5)[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/dev/shm/" in line}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            names.add(os.readlink(fd))
        except OSError:
            continue  # closed meanwhile
    return {name for name in names if name.startswith("/dev/shm/") and not name.endswith("(deleted)")}


def _kill_all(trainer) -> None:
    trainer.accelerator.wait_for_everyone()  # every rank is at this step, its loader workers started
    if trainer.accelerator.process_index != 0:
        threading.Event().wait()  # until rank 0 kills it
    launcher = os.getppid()
    processes, shm = [], set()
    for pid in _tree(launcher):
        try:
            parent, started = _stat(pid)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            processes.append([pid, started, parent, cmdline])
            shm |= _shm_files(pid)
        except OSError:
            continue  # gone meanwhile
    _write(markers / "run.json", json.dumps({"processes": processes, "shm": sorted(shm)}))
    ranks = [int((markers / f"pid-rank{rank}").read_text()) for rank in range(trainer.accelerator.num_processes)]
    for pid in [launcher, *ranks]:
        if pid != os.getpid():
            os.kill(pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def faulty_step(self, batches):
    if self.global_step == at:
        rank = self.accelerator.process_index
        if mode == "hold":
            _hold(self)
        elif mode == "killall":
            _kill_all(self)
        elif rank == 1 and mode == "raise":
            _write(markers / "raised", repr(time.time()))
            raise RuntimeError(f"injected failure on rank 1 at step {at}")
        elif rank == 1 and mode == "kill" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, batches)


if __name__ == "__main__":  # loader workers import this script again (disttrain/data/workers.py)
    Trainer.step = faulty_step
    if mode == "killall":
        disttrain.data.shards.SlotPool = stall_hook.OneSlotPool  # looked up there when the train loader is built
    elif mode == "stall-train":
        stall_hook.stall_rank, stall_hook.stall_split, stall_hook.stall_batch = 0, "train", at
        disttrain.data.setup.FolderDataset = stall_hook.StallingFolderDataset  # looked up there when the loaders are built
    elif mode == "stall-start":  # the fork server (started by train()) imports silent_server from here
        os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])])
        os.environ["SILENT_SERVER_PARENT"] = str(os.getpid())
        disttrain.data.workers.PRELOAD.append("silent_server")
    _write(markers / f"pid-rank{os.environ.get('RANK', '0')}", f"{os.getpid()}\n")
    sys.exit(run_user_errors(lambda: train(load_config("configs/demo.yaml", overrides))))
