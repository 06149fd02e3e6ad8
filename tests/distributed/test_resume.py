"""Checkpoints and exact resume on 2 real processes: a run SIGKILLed mid-epoch, or in the middle of
a checkpoint save, and resumed ends with the weights and per-epoch losses of an uninterrupted run;
a preemption signal saves a checkpoint at the next log point and every rank exits 75; a rank that
raises ends the job within seconds; a SIGKILLed rank is restarted and resumes."""

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
import torch

from conftest import BIN, REPO, free_port, launch, run_env
from disttrain.train.checkpoint import find_latest, load_checkpoint

pytestmark = pytest.mark.dist


def _args(mnist, out, name, *extra, periodic=True):
    """The run every test here uses: 2 epochs of 10 steps (300 images, 16 per rank x 2 ranks), a log
    point every 2 steps and (`periodic`) a checkpoint every 3 steps, fp32. The model has dropout
    (mobilenet_v3_small's classifier: it draws from the process's global CPU random stream every
    step) and each loader one worker: a resumed run repeats the uninterrupted one bitwise only if
    nothing else draws from that stream (a DataLoader iterator takes its workers' seed from it
    unless the loader has a generator of its own: disttrain/data/loader.py make_loader). MixUp/CutMix
    (each rank's own generator, in its checkpoint) and a weight EMA (in the shared state) resume to
    the bit too."""
    return ["launch/train.py", "--config", "configs/demo.yaml", f"data.root={mnist}", f"run.output_dir={out}",
            f"run.name={name}", "train.epochs=2", "data.batch_size=16", "model.name=mobilenet_v3_small", "data.num_workers=1",
            "log.progress=false", "train.precision=no", "log.every_n_steps=2", *(["checkpoint.every_n_steps=3"] if periodic else []),
            "augment.mixup=0.4", "augment.cutmix=1.0", "train.ema=0.95", *extra]


def _children() -> dict[int, list[int]]:
    """ppid -> pids of every process on this machine (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    return children


def _descendants(pid: int) -> set[int]:
    children, found, todo = _children(), set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


class Job:
    """`accelerate launch --multi_gpu --num_processes 2 ARGS` in its own session, its output in files.
    `kill()` (also when leaving the `with` block) SIGKILLs the launcher and every process under it.
    Killing the launcher's process group is not enough: torch elastic starts each rank in a session
    of its own, and a rank outlives its launcher (it keeps training and writing checkpoints)."""

    def __init__(self, args, logs: Path, launcher=()):
        logs.mkdir(parents=True, exist_ok=True)
        self.out, self.err = logs / "stdout", logs / "stderr"
        cmd = [str(BIN / "accelerate"), "launch", "--main_process_port", str(free_port()), "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *launcher, *args]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=out, stderr=err, start_new_session=True)

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def wait(self, timeout: float) -> float:
        """Wait for the launcher to exit; returns when it did (time.time())."""
        self.proc.wait(timeout=timeout)
        return time.time()

    def kill(self) -> None:
        """SIGSTOP the launcher and all its descendants (until no new one appears: stopped processes
        start none), then SIGKILL them all: the whole job dies at one point of its work."""
        stopped: set[int] = set()
        while self.proc.poll() is None:
            new = ({self.proc.pid} | _descendants(self.proc.pid)) - stopped
            if not new:
                break
            for pid in new:
                _signal(pid, signal.SIGSTOP)
            stopped |= new
        for pid in stopped:
            _signal(pid, signal.SIGKILL)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in the launcher's own group
        except ProcessLookupError:
            pass
        self.proc.wait()

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _ends(pid: int, within: float = 10.0) -> bool:
    """Whether process `pid`, already sent SIGKILL, is gone within `within` seconds (a large
    process takes a moment to tear down its memory after the signal)."""
    deadline = time.monotonic() + within
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended


def _wait_for(path: Path, job: Job, timeout=240):
    deadline = time.monotonic() + timeout
    while not path.exists():  # polling for a file the run writes, not timing the run
        assert job.proc.poll() is None, f"the run ended before {path} appeared:\n{job.stderr()[-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)["model"]


def _assert_same_run(a: Path, b: Path) -> None:
    """Bitwise the same final weights and weight EMA, and the same train loss, valid loss and accuracy
    (and the EMA's) every epoch."""
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs after resume"
    ea, eb = (load_checkpoint(find_latest(run), rank=0, world_size=2)[1]["ema"] for run in (a, b))
    assert ea["updates"] == eb["updates"] == 20
    for key in ea["weights"]:
        assert torch.equal(ea["weights"][key], eb["weights"][key]), f"the EMA's {key} differs after resume"
    epochs_a = json.loads((a / "results.json").read_text())["epochs"]
    epochs_b = json.loads((b / "results.json").read_text())["epochs"]
    assert len(epochs_a) == 2
    for ea, eb in zip(epochs_a, epochs_b, strict=True):
        assert (ea["train_loss"], ea["valid_loss"], ea["accuracy"], ea["metrics"]) == (eb["train_loss"], eb["valid_loss"],
                                                                                      eb["accuracy"], eb["metrics"])


def _logged_steps(run_dir: Path) -> tuple[list, list]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train/loss" in r], [r["epoch"] for r in rows if "valid/loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mnist_small):
    """The run dir of an uninterrupted run of `_args` (made once per module). A run killed mid-epoch
    and resumed is compared with it by the kill-during-save tests (resumed from step 3); shards
    resume their exact stream in tests/unit/test_shards.py; the staged kill chain is in
    tests/distributed/test_finetune_distributed.py."""
    out = tmp_path_factory.mktemp("uninterrupted")
    launch(_args(mnist_small, out, "a"), nproc=2)
    return out / "a"


@pytest.mark.parametrize("where", ["files", "rename"])
def test_a_job_killed_during_a_save_keeps_the_previous_checkpoint_and_resumes_exactly(tmp_path, mnist_small, uninterrupted, where):
    """SIGKILL of the whole 2-process job while the save of step 6 is half-way: `files`, after the
    main process wrote shared.pt into step-00000006.tmp/ (no meta.json yet); `rename`, with every
    file of step-00000006.tmp/ written and synced, just before its rename."""
    marker = tmp_path / "held"
    args = _args(mnist_small, tmp_path, "b")
    with Job(["tests/distributed/save_kill_worker.py", where, "6", str(marker), *args[3:]], tmp_path / "logs") as job:
        _wait_for(marker, job)
        job.kill()
    assert _ends(int(marker.read_text())), "the main process outlived the kill"
    root = tmp_path / "b" / "checkpoints"
    half = root / "step-00000006.tmp"
    assert (half / "rank0.pt").is_file() and (half / "shared.pt").is_file()  # the save was under way ...
    assert (half / "meta.json").is_file() == (where == "rename")  # ... and, in `rename`, looks complete but for its name
    assert not (root / "step-00000006").exists()
    assert (root / "latest").read_text().strip() == "step-00000003"
    assert find_latest(tmp_path / "b") == root / "step-00000003"
    # without the pointer too, the half-written save is not taken for the newest checkpoint
    other = tmp_path / "no-pointer"
    shutil.copytree(root, other / "checkpoints", copy_function=os.link)
    (other / "checkpoints" / "latest").unlink()
    assert find_latest(other) == other / "checkpoints" / "step-00000003"
    for rank in (0, 1):
        meta, _, _ = load_checkpoint(root / "step-00000003", rank=rank, world_size=2)
        assert (meta["global_step"], meta["epoch"], meta["steps_done_in_epoch"]) == (3, 0, 3)

    resumed = launch(args, nproc=2)  # the plain launch/train.py, no hook
    assert f"resuming from {root / 'step-00000003'}: epoch 0, 3 step(s) into it" in resumed.stdout, resumed.stdout
    _assert_same_run(uninterrupted, tmp_path / "b")
    assert _logged_steps(tmp_path / "b") == (list(range(2, 21, 2)), [1, 2])
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000018", "step-00000020"]  # the leftover is gone
    meta = json.loads((root / "step-00000020" / "meta.json").read_text())
    assert meta["samples"] == {"train": 300, "valid": 110}  # what a resume checks the data against


def _failure_report(stderr: str) -> dict[int, tuple[int, int]]:
    """rank -> (exit code, pid) from torch elastic's failure report (`accelerate launch` prints it
    on stderr when a rank exits with a non-zero code; the launcher itself then exits 1)."""
    found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\n\s*exitcode\s*: (-?\d+) \(pid: (\d+)\)", stderr)
    return {int(rank): (int(code), int(pid)) for rank, code, pid in found}


def test_preemption_signal_saves_and_exits_75_then_resume_finishes(tmp_path, mnist_small, uninterrupted):
    # No checkpoint.every_n_steps: besides epoch ends (steps 10 and 20) only the signal makes one.
    # Both ranks hold still before step 4 (fault_worker `hold`) until rank 1 alone got SIGUSR1.
    markers = tmp_path / "markers"
    markers.mkdir()
    args = _args(mnist_small, tmp_path, "p", periodic=False)
    with Job(["tests/distributed/fault_worker.py", "hold", "3", str(markers), *args[3:]], tmp_path / "logs") as job:
        for rank in (0, 1):
            _wait_for(markers / f"held-rank{rank}", job)
        os.kill(int((markers / "held-rank1").read_text()), signal.SIGUSR1)  # one rank only: every rank must stop
        (markers / "go").write_text("1\n")
        job.wait(timeout=240)
    err = job.stderr()
    root = tmp_path / "p" / "checkpoints"
    # the log point right after the signal (step 4) saved, mid-epoch 0, and nothing trained after it
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004"], err[-3000:]
    assert (root / "latest").read_text().strip() == "step-00000004"
    meta = json.loads((root / "step-00000004" / "meta.json").read_text())
    assert (meta["global_step"], meta["epoch"], meta["steps_done_in_epoch"]) == (4, 0, 4)
    assert meta["steps_done_in_epoch"] % 2 == 0  # at a log point (log.every_n_steps=2)
    line = f"disttrain: preempted: checkpoint saved in {root / 'step-00000004'}; exiting with 75"
    assert err.count(line) == 2, err[-3000:]  # from each rank, the main process included
    assert not (tmp_path / "p" / "results.json").exists()
    assert job.proc.returncode == 1  # accelerate launch itself: "a child failed"
    report = _failure_report(err)
    assert sorted(report) == [0, 1], err[-3000:]
    # every rank exits 75, also one that the launcher SIGTERMs after the first has exited (a
    # preempted rank ignores SIGTERM once its checkpoint is saved: disttrain.cli._ignore_stop_signals)
    assert {rank: code for rank, (code, _) in report.items()} == {0: 75, 1: 75}, err[-3000:]

    done = launch(args, nproc=2)  # the plain launch/train.py resumes and finishes
    assert f"resuming from {root / 'step-00000004'}: epoch 0, 4 step(s) into it, global step 4" in done.stdout, done.stdout
    assert len(json.loads((tmp_path / "p" / "results.json").read_text())["epochs"]) == 2
    assert _logged_steps(tmp_path / "p") == (list(range(2, 21, 2)), [1, 2])  # every log point once
    _assert_same_run(uninterrupted, tmp_path / "p")  # checkpoints of its own or not, the same training


def _fault_args(mnist, out, mode, at, markers):
    """`_args` under fault_worker.py, without loader workers (these runs are not compared with the
    uninterrupted one; workers would only add their start-up)."""
    markers.mkdir(parents=True, exist_ok=True)
    return ["tests/distributed/fault_worker.py", mode, str(at), str(markers), *_args(mnist, out, mode, "data.num_workers=0")[3:]]


def test_a_rank_that_raises_ends_the_job_quickly(tmp_path, mnist_small):
    # A hang would last until train.collective_timeout (300 s) or torch's 30 minutes; timed here from
    # the raise (rank 1 writes the time right before it) to the launcher's exit, start-up excluded.
    markers = tmp_path / "markers"
    with Job(_fault_args(mnist_small, tmp_path, "raise", 4, markers), tmp_path / "logs") as job:
        ended = job.wait(timeout=240)
        raised = float((markers / "raised").read_text())
        ranks = [int((markers / f"pid-rank{rank}").read_text()) for rank in (0, 1)]
        assert not any(_alive(pid) for pid in ranks), "a rank outlived the launcher"
    err = job.stderr()
    assert ended - raised < 30, f"the job ended {ended - raised:.1f} s after the failure"
    assert job.proc.returncode == 1
    assert "injected failure on rank 1 at step 4" in err
    report = _failure_report(err)
    assert report[1] == (1, ranks[1]), err[-3000:]  # rank 1 failed with the exception's exit code
    assert not (tmp_path / "raise" / "results.json").exists()


def test_a_killed_rank_is_restarted_and_resumes_with_the_exact_step_count(tmp_path, mnist_small):
    with Job(_fault_args(mnist_small, tmp_path, "kill", 7, tmp_path / "markers"), tmp_path / "logs",
             launcher=["--max_restarts", "1", "--monitor_interval", "1"]) as job:
        job.wait(timeout=300)
    assert job.proc.returncode == 0, job.stderr()[-4000:]
    step6 = tmp_path / "kill" / "checkpoints" / "step-00000006"  # rank 1 died before its step 8
    assert f"resuming from {step6}: epoch 0, 6 step(s) into it" in job.stdout(), job.stdout()
    assert len(json.loads((tmp_path / "kill" / "results.json").read_text())["epochs"]) == 2
    assert _logged_steps(tmp_path / "kill") == (list(range(2, 21, 2)), [1, 2])  # none lost or logged twice
    latest = (tmp_path / "kill" / "checkpoints" / "latest").read_text().strip()
    assert json.loads((tmp_path / "kill" / "checkpoints" / latest / "meta.json").read_text())["global_step"] == 20


def test_a_checkpoint_of_other_classes_is_refused(tmp_path, mnist_small):
    from conftest import make_folder

    run = ["launch/train.py", f"run.output_dir={tmp_path}", "run.name=c", "data.load_size=36", "data.image_size=32",
           "data.batch_size=8", "train.epochs=1", "train.max_steps_per_epoch=2", "data.num_workers=0", "log.progress=false",
           "log.wandb.mode=disabled", "train.precision=no"]
    launch(run + [f"data.root={mnist_small}", "train.epochs=2"], launcher="python")  # checkpoints at steps 2 and 4
    other = make_folder(tmp_path / "abc", {"train": {"a": 4, "b": 4, "c": 4}, "valid": {"a": 2, "b": 2, "c": 2}}, size=(36, 36))
    refused = launch(run + [f"data.root={other}"], launcher="python", check=False)
    assert refused.returncode == 2
    assert "saved for model resnet18 with classes ['0', '1'" in refused.stderr and "checkpoint.resume=never" in refused.stderr
    fresh = launch(run + [f"data.root={other}", "checkpoint.resume=never", "checkpoint.keep_last=1"], launcher="python")
    assert "resuming" not in fresh.stdout and "moved this run dir's checkpoints" in fresh.stdout
    # the old run's checkpoints are set aside, not mixed with (or pruned against) the new run's
    root = tmp_path / "c" / "checkpoints"
    aside = next(root.glob("superseded-*"))
    assert sorted(p.name for p in aside.iterdir()) == ["latest", "step-00000002", "step-00000004"]
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000002"]
    assert json.loads((root / "step-00000002" / "meta.json").read_text())["classes"] == ["a", "b", "c"]
    assert (root / "latest").read_text().strip() == "step-00000002"
