"""Shared fixtures: synthetic image folders, the MNIST sample, and real multi-process launches."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARED_DATA = REPO.parent / "shared" / "data"
LAUNCH_TIMEOUT = 300  # seconds; a hung collective fails the test instead of the CI job


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def launch(
    args: list[str], nproc: int = 2, launcher: str = "accelerate", timeout: int = LAUNCH_TIMEOUT, check: bool = True,
    env: dict | None = None,
):
    """Run a script or `-m module` the way a user does: accelerate launch / disttrain launch /
    torchrun / python (`env`: variables added to the test environment)."""
    if launcher in ("accelerate", "disttrain"):  # `disttrain launch` takes accelerate launch's options
        cmd = [str(BIN / "accelerate"), "launch"] if launcher == "accelerate" else [str(BIN / "disttrain"), "launch"]
        cmd += ["--main_process_port", str(free_port())]
        cmd += ["--multi_gpu", "--num_processes", str(nproc)] if nproc > 1 else ["--cpu", "--num_processes", "1"]
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    elif launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    else:
        cmd = [sys.executable]
    proc = subprocess.run(cmd + args, cwd=REPO, env={**run_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd + args)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL a launched job: the launcher and every process below it. torch elastic starts each
    worker in a session of its own, so killing the launcher's process group leaves the workers."""
    def children(pid: int) -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
        return found

    tree, todo = [], [proc.pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children(pid))
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def rank_exit_codes(stderr: str) -> dict[int, int]:
    """Each failed rank's exit code, from torch elastic's failure report (`accelerate launch` itself
    exits 1 whatever its workers' codes were)."""
    found = re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\n\s+exitcode\s+: (-?\d+)", stderr)
    return {int(rank): int(code) for rank, code in found}


def write_image(path: Path, size=(24, 20), mode="RGB", seed=0, fmt=None) -> Path:
    """A small random image in `mode`, saved in the format the suffix implies."""
    rng = np.random.default_rng(seed)
    w, h = size
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    elif mode == "L":
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    elif mode == "RGBA":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    elif mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").convert("P")
    elif mode == "CMYK":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").convert("CMYK")
    elif mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        raise ValueError(mode)
    img.save(path, format=fmt)
    return path


def make_folder(root: Path, counts: dict[str, dict[str, int]], size=(20, 20)) -> Path:
    """root/<split>/<class>/<i>.png with `counts[split][class]` images; each class has its own tint
    so a model can learn it."""
    for split, classes in counts.items():
        for ci, (cls, n) in enumerate(sorted(classes.items())):
            for i in range(n):
                rng = np.random.default_rng(zlib.crc32(f"{split}/{cls}/{i}".encode()))
                arr = rng.integers(0, 64, (size[1], size[0], 3), dtype=np.uint8)
                arr[..., ci % 3] += 160
                path = root / split / cls / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr, "RGB").save(path)
    return root


@pytest.fixture(scope="session", autouse=True)
def _temp_files_in_basetemp(tmp_path_factory):
    """What the launched jobs leave in the temp folder (torch elastic's per-job folders, W&B's media,
    artifacts and service sockets) goes under this session's basetemp, removed with it, instead of
    piling up in /tmp over many runs of the suite."""
    import tempfile

    folder = tmp_path_factory.mktemp("tmp")
    before = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(folder), str(folder)
    yield folder
    if before[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before[0]
    tempfile.tempdir = before[1]


@pytest.fixture(scope="session")
def mnist_small(tmp_path_factory) -> Path:
    """The real MNIST sample, 30 train + 11 valid digits per class (300 / 110 images)."""
    from disttrain.data.demo import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("mnist") / "mnist", train_per_class=30, valid_per_class=11)


@pytest.fixture
def hymenoptera() -> Path:
    path = SHARED_DATA / "hymenoptera"
    if not path.is_dir():
        pytest.skip("../shared/data/hymenoptera is not present")
    return path


# -- a real single-host SLURM cluster per test module (tests/slurm/cluster.sh), stopped by PID after
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"


def _cluster(tmp_path_factory, nodes: int):
    if os.geteuid() != 0:
        pytest.skip("the test cluster needs root (munge runs as its own user)")
    state = tmp_path_factory.mktemp(f"slurm{nodes}")
    started = subprocess.run(["bash", str(CLUSTER), "start", str(state), str(nodes)], capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, f"SLURM did not start:\n{started.stdout}\n{started.stderr}"
    return state, {**run_env(), "SLURM_CONF": str(state / "slurm.conf"), "GPUS_PER_NODE": "0"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """One node with all of this host's CPUs."""
    state, env = _cluster(tmp_path_factory, 1)
    yield env
    subprocess.run(["bash", str(CLUSTER), "stop", str(state)], timeout=60)


@pytest.fixture(scope="module")
def slurm_four_nodes(tmp_path_factory):
    """Four nodes dt1..dt4 (four slurmd on this host), a quarter of the CPUs each (at least one)."""
    state, env = _cluster(tmp_path_factory, 4)
    yield env
    subprocess.run(["bash", str(CLUSTER), "stop", str(state)], timeout=60)
