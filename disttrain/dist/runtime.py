"""The one place that builds the Accelerator: device choice, the cores (disttrain/dist/cores.py), one
precision for the job (each rank's device facts exchanged, then agreed: disttrain/dist/precision.py),
accumulation, seeds. What it resolves comes back as one value (`Runtime`) that the caller hands on."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import InitProcessGroupKwargs

from disttrain.dist import cores
from disttrain.dist import precision
from disttrain.config import Config
from disttrain.dist.cores import CoreSplit
from disttrain.dist.precision import DeviceFacts, Precision


@dataclass(frozen=True)
class Runtime:
    """What `build_runtime` resolved for this rank, handed down whole: nothing of it is kept elsewhere
    or written back into the config (whose `auto` values stay as the user gave them)."""

    accelerator: Accelerator
    cores: CoreSplit
    """This rank's cores, threads and loader workers (disttrain/dist/cores.py), in effect already."""
    precision: Precision
    """The precision the job agreed on, the same on every rank (disttrain/dist/precision.py)."""


def build_runtime(cfg: Config, compute: str | None = None) -> Runtime:
    """An Accelerator for this machine: CPU (gloo) when CUDA is absent; this rank's cores split
    between its threads and its loader workers, pinned only where the job owns them
    (disttrain/dist/cores.py: `train.pin_cores`; `auto` values of train.threads and data.num_workers are
    resolved into `Runtime.cores`; `compute`: where the work runs when not on the accelerator's device, e.g.
    `cpu` for an ONNX file under onnxruntime); one precision for the job (`every_ranks_facts`,
    then precision.agree: the same decision on every rank, `Runtime.precision`).

    Works under `accelerate launch`, `torchrun` and plain `python` (one process). Gradient
    accumulation (`train.grad_accum`) is done by the Trainer with `no_sync` over exactly the
    micro-batches of each group (also the shorter last group of an epoch), so Accelerate's own
    accumulation counter, which would divide the loss a second time, is left at 1.
    """
    cuda = torch.cuda.is_available()
    timeout = timedelta(seconds=cfg.train.collective_timeout)
    _init_after_restart(cuda, timeout)
    state = PartialState(cpu=not cuda, timeout=timeout)  # the process group, and this rank's own device set
    split = cores.plan_here(compute or state.device.type, cfg.train.threads, cfg.data.num_workers, cfg.train.pin_cores)
    cores.apply(split)  # this rank's threads on its own cores where the job owns them (its loaders' workers: split.loader_cores())
    if cfg.train.deterministic:  # cuDNN: the same algorithms, the same sums, every run (bitwise resume on GPUs)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    agreed = precision.agree(cfg.train.precision, every_ranks_facts(state))  # a ConfigError on every rank alike
    accelerator = Accelerator(cpu=not cuda, mixed_precision=agreed.mode, kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
    return Runtime(accelerator, split, agreed)


def every_ranks_facts(state: PartialState) -> list[DeviceFacts]:
    """Each rank's device facts, in rank order (one all_gather of a few small values): read by each
    rank from its own device only (a GPU rank's card after its device is set)."""
    mine = precision.device_facts(state.device)
    if state.num_processes == 1:
        return [mine]
    gathered: list[DeviceFacts | None] = [None] * state.num_processes
    dist.all_gather_object(gathered, mine)
    return list(gathered)


def _init_after_restart(cuda: bool, timeout: timedelta) -> None:
    """Workers restarted by the elastic agent (`accelerate launch --max_restarts N`) find the keys
    of the previous attempt in the agent's store: gloo then connects to the dead workers' addresses
    ("connectFullMesh failed ... Connection refused"). Such a restart builds the process group
    itself, on a store prefix of its own attempt; Accelerate then uses that group."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if restart == 0 or world < 2 or dist.is_initialized() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout)
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend="nccl" if cuda else "gloo",
        store=dist.PrefixStore(f"/disttrain/attempt_{restart}", store),
        rank=int(os.environ["RANK"]),
        world_size=world,
        timeout=timeout,
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Call with the same seed on every rank before the
    model is built so every rank starts from identical weights."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states in plain types and tensors: restorable with
    `set_rng_state`, and loadable with torch.load(weights_only=True) when saved in a checkpoint."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_seed(seed: int, rank: int, stream: int = 0) -> int:
    """A seed for `rank`'s own random stream (augmentation), distinct per rank and per stream."""
    return (seed * 1_000_003 + rank * 7_919 + stream * 104_729) % 2**63
