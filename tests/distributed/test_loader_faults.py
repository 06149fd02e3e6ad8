"""Data-loader workers on real processes: they start from a fork server (never forked from a
training process whose other threads may hold locks: disttrain/data/workers.py), many runs in a row
in the same processes finish, a worker that delivers nothing (or does not start) ends the job within
`data.worker_timeout` with one line naming the rank, the loader and the worker, and nothing of a job
whose ranks are SIGKILLed remains: no process, no file in /dev/shm."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, LAUNCH_TIMEOUT, REPO, free_port, launch, run_env

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def folder_with_bad_files(tmp_path_factory, mnist_small) -> Path:
    """The MNIST sample with three undecodable files: an empty and a truncated PNG in train, a text
    file named .jpg in valid (the issue's failing case)."""
    root = tmp_path_factory.mktemp("bad") / "mnist"
    shutil.copytree(mnist_small, root)
    (root / "train" / "3" / "empty.png").write_bytes(b"")
    first = sorted((root / "train" / "5").iterdir())[0]
    (root / "train" / "5" / "cut.png").write_bytes(first.read_bytes()[:60])
    (root / "valid" / "7" / "notes.jpg").write_text("not an image\n")
    return root


def _demo(root: Path, out: Path) -> list[str]:
    return ["configs/demo.yaml", f"data.root={root}", f"run.output_dir={out}", "train.epochs=1", "data.num_workers=1",
            "data.batch_size=32", "train.precision=no", "log.progress=true", "checkpoint.resume=never"]


RUNS = 2


def test_many_runs_in_a_row_start_their_loader_workers_and_finish(tmp_path, folder_with_bad_files):
    """The failing case of the issue (2 processes, the demo config, a small folder with undecodable
    files, 1 epoch, a loader worker each for training and validation, W&B offline, progress bars),
    RUNS times in the same processes: 2 x 2 x RUNS worker starts with every thread of the earlier
    runs alive. A stuck worker would end it within data.worker_timeout with its one line."""
    done = launch(["tests/distributed/repeat_worker.py", str(RUNS), *_demo(folder_with_bad_files, tmp_path),
                   "data.worker_timeout=60"], nproc=2, env={"WANDB_MODE": "offline"}, timeout=900)
    assert [line for line in done.stdout.splitlines() if line.startswith("run ")] == [f"run {i}: exit 0" for i in range(RUNS)]
    assert done.stdout.count("3 undecodable file(s) skipped") == RUNS
    for i in range(RUNS):
        rows = (tmp_path / f"run{i}" / "results.json").read_text()
        assert '"accuracy"' in rows


def test_a_worker_that_delivers_nothing_ends_the_job_with_one_line(tmp_path, folder_with_bad_files):
    """Rank 1's validation worker holds still at its first image (a test-only dataset, imported by the
    worker itself): within data.worker_timeout rank 1 stops the job with one line naming the rank,
    the loader and the worker, instead of rank 0 waiting in evaluate's all-reduce until
    train.collective_timeout (300 s)."""
    args = _demo(folder_with_bad_files, tmp_path) + ["run.name=stall", "train.max_steps_per_epoch=2", "data.worker_timeout=12",
                                                    "log.progress=false", "log.wandb.mode=disabled"]
    done = launch(["tests/distributed/run_worker.py", args[0], "--stall", "1", *args[1:]], nproc=2, launcher="disttrain",
                  check=False, timeout=240)
    lines = [line for line in done.stderr.splitlines() if line.startswith("disttrain: ")]
    stalled = [line for line in lines if "delivered no batch" in line]
    assert len(stalled) == 1, done.stderr[-4000:]
    assert re.fullmatch(r"disttrain: error: rank 1: the valid loader's worker 0 \(pid \d+, alive: stuck\) delivered no batch for "
                        r"12 s \(data\.worker_timeout\); stopping the job instead of leaving the other ranks waiting in a collective",
                        stalled[0]), stalled[0]
    # rank 0, waiting in evaluate's all-reduce, fails too once rank 1 has left (its gloo connection
    # closes) or the launcher stops it: either way within seconds of rank 1's line
    assert re.search(r"disttrain: the job failed: .*rank 1 exited with code 1", done.stderr), done.stderr[-4000:]
    assert done.returncode == 1
    assert not (tmp_path / "stall" / "results.json").exists()


STALL_TIMEOUT = 10  # data.worker_timeout: more than a worker needs to start and decode a batch on a busy machine
STALLS = {
    # where: (fault_worker.py mode and step, overrides, the worker the line names)
    "mid-epoch": ("stall-train", 1, ["train.epochs=1"], r"0 \(pid \d+, alive: stuck\)"),
    # epoch 0 stops after 2 of its 10 batches; the worker stalls on batch 2, a prefetch of the abandoned
    # rest that epoch 1's iter() waits for before its first batch
    "iter-after-a-cut-short-epoch": ("stall-train", 2, ["train.epochs=2", "train.max_steps_per_epoch=2"], r"0 \(pid \d+, alive: stuck\)"),
    "worker-start": ("stall-start", 0, ["train.epochs=1"], r"0 \(not started\)"),
}


@pytest.mark.parametrize("where", STALLS)
def test_a_train_loader_stalled_anywhere_ends_the_run_with_one_line(tmp_path, mnist_small, where):
    """One process, one loader worker: its train loader stalls mid-epoch (the worker never returns
    the batch of step 1), in `iter()` after an epoch cut short by train.max_steps_per_epoch (the
    persistent worker stalls on a prefetched batch of the abandoned part, which the next epoch's
    `iter()` waits for), or at worker start (the fork server never answers). Each ends the run with
    the one line and exit code 1 (instead of a traceback, or a hang)."""
    mode, step, extra, worker = STALLS[where]
    markers = tmp_path / "markers"
    markers.mkdir()
    args = [f"data.root={mnist_small}", f"run.output_dir={tmp_path}", "run.name=s", "data.num_workers=1", "data.batch_size=32",
            "train.precision=no", "log.progress=false", "log.wandb.mode=disabled", f"data.worker_timeout={STALL_TIMEOUT}", *extra]
    done = launch(["tests/distributed/fault_worker.py", mode, str(step), str(markers), *args], launcher="python", check=False, timeout=180)
    lines = [line for line in done.stderr.splitlines() if line.startswith("disttrain: ")]
    assert len(lines) == 1, done.stderr[-4000:]
    assert re.fullmatch(rf"disttrain: error: rank 0: the train loader's worker {worker} delivered no batch for {STALL_TIMEOUT} s "
                        r"\(data\.worker_timeout\); stopping the job instead of leaving the other ranks waiting in a collective",
                        lines[0]), lines[0]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    assert done.returncode == 1
    if where == "iter-after-a-cut-short-epoch":
        assert re.search(r"^0\s{2,}\d+\.\d{6}", done.stdout, re.M), done.stdout  # epoch 0 finished: the stall was in epoch 1's iter()


def _alive(pid: int, started: int) -> bool:
    """Whether process `pid` that started at `started` (clock ticks since boot) still runs (a zombie
    does not: it is gone but for its exit status)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return int(fields[19]) == started and fields[0] != "Z"


LEFTOVER_DEADLINE = 10  # seconds from the kill: the bound for the last process of the job to go


def test_nothing_of_a_job_remains_after_its_ranks_are_killed(tmp_path, mnist_small):
    """2 processes training from shards, a loader worker each with a single slot
    (stall_hook.OneSlotPool), so that it waits for a free slot after every batch, as workers ahead of
    a slow device do: once the ranks are gone, no slot is ever freed. At step 3 rank 0 records every
    process under the launcher and the /dev/shm files they hold, then SIGKILLs the launcher, the
    other rank and itself. Within 10 s no process of the job runs (fork servers, loader workers,
    resource trackers) and none of those /dev/shm files exists (old code: the workers wait for good,
    and the resource trackers, which remove the semaphores, wait for them)."""
    shards = tmp_path / "shards"
    subprocess.run([str(BIN / "disttrain"), "prepare", str(mnist_small), str(shards), "--samples-per-shard", "1000",
                    "--workers", "1", "--no-progress"], env=run_env(), check=True, capture_output=True)
    markers = tmp_path / "markers"
    markers.mkdir()
    cmd = [str(BIN / "accelerate"), "launch", "--main_process_port", str(free_port()), "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "tests/distributed/fault_worker.py", "killall", "3", str(markers), f"data.root={shards}", "data.format=shards",
           f"run.output_dir={tmp_path}", "run.name=k", "data.num_workers=1", "data.batch_size=16", "train.precision=no",
           "log.progress=false", "log.wandb.mode=disabled"]
    log = tmp_path / "job.log"
    processes = []
    with log.open("w") as out:  # files, not pipes: a leftover holding a pipe would keep the test waiting for its end
        job = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        job.wait(timeout=LAUNCH_TIMEOUT)
        deadline = time.monotonic() + LEFTOVER_DEADLINE  # the launcher is the first process rank 0 kills
        assert (markers / "run.json").is_file(), log.read_text()[-4000:]
        run = json.loads((markers / "run.json").read_text())
        processes = run["processes"]
        servers = {pid for pid, _, _, cmdline in processes if "multiprocessing.forkserver" in cmdline}
        assert len([pid for pid, _, parent, _ in processes if parent in servers]) >= 2, processes  # a loader worker per rank
        assert run["shm"], "the job had no /dev/shm file: nothing to check"
        while (left := [p for p in processes if _alive(p[0], p[1])]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"still running {LEFTOVER_DEADLINE} s after the kill: {[(pid, cmdline[:120]) for pid, _, _, cmdline in left]}"
        while (kept := [name for name in run["shm"] if os.path.exists(name)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not kept, f"left in /dev/shm: {kept}"
    finally:
        _end_leftovers(processes)
        if job.poll() is None:
            job.kill()
            job.wait()


def _end_leftovers(processes: list) -> None:
    """SIGKILL what outlived the kill (the test has failed then), resource trackers last: a tracker
    removes the job's semaphores from /dev/shm once every other process holding them is gone."""
    trackers = [p for p in processes if "multiprocessing.resource_tracker" in p[3]]
    for pid, started, _, _ in [p for p in processes if p not in trackers]:
        if _alive(pid, started):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + LEFTOVER_DEADLINE
    while [p for p in trackers if _alive(p[0], p[1])] and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid, started, _, _ in trackers:
        if _alive(pid, started):
            os.kill(pid, signal.SIGKILL)
