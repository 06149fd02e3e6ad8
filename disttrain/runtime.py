"""The one place that builds the Accelerator: device choice, precision (decided per rank after its
device is set: disttrain/precision.py), accumulation, seeds."""

from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import InitProcessGroupKwargs

from disttrain import cores
from disttrain.config import Config
from disttrain.precision import resolve_precision


def build_accelerator(cfg: Config) -> Accelerator:
    """An Accelerator for this machine: CPU (gloo) when CUDA is absent, precision from the config
    (`resolve_precision`, decided once this rank's device is set, from that device's facts), this
    rank's cores split between its threads and its loader workers (disttrain/cores.py; `auto`
    values of train.threads and data.num_workers are resolved in `cfg`).

    Works under `accelerate launch`, `torchrun` and plain `python` (one process). Gradient
    accumulation (`train.grad_accum`) is done by the Trainer with `no_sync` over exactly the
    micro-batches of each group (also the shorter last group of an epoch), so Accelerate's own
    accumulation counter, which would divide the loss a second time, is left at 1.
    """
    cuda = torch.cuda.is_available()
    timeout = timedelta(seconds=cfg.train.collective_timeout)
    _init_after_restart(cuda, timeout)
    state = PartialState(cpu=not cuda, timeout=timeout)  # the process group, and this rank's own device set
    split = cores.plan_here(state.device.type, cfg.train.threads, cfg.data.num_workers)
    cores.apply(split)  # this rank's threads on its own cores; its loaders' workers on theirs
    cfg.data.num_workers = split.workers  # `auto` resolved: every loader of this process reads it
    precision = resolve_precision(cfg.train.precision, state.device)  # reads that device only
    return Accelerator(cpu=not cuda, mixed_precision=precision.mode, kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])


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
