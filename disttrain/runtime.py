"""The one place that builds the Accelerator: device choice, precision, accumulation, seeds."""

from __future__ import annotations

import functools
import os
import platform
import random
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from disttrain.config import Config, ConfigError


@dataclass(frozen=True)
class Precision:
    """The autocast precision a run uses, and why (`train.precision=auto` decides per machine)."""

    mode: str
    """`no` (fp32), `bf16` or `fp16`: what Accelerate's autocast gets."""
    reason: str
    """Why this one: printed in the "training on ..." line."""
    warning: str | None = None
    """A cost the user chose explicitly (bf16 on a CPU that only emulates it), printed once."""


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively. oneDNN's own check (`_is_mkldnn_bf16_supported`)
    also says yes for AVX-512 CPUs without bf16 instructions, so on x86 Linux the `avx512_bf16` /
    `amx_bf16` flags must be there too; without them bf16 autocast is emulated (on an AVX2 EPYC, a
    ResNet-18 step took 4.5x as long as in fp32). Asked once per process (it reads /proc/cpuinfo)."""
    try:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    if supported and platform.machine().lower() in ("x86_64", "amd64"):
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return supported
        return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))
    return supported


def cpu_capability() -> str:
    """torch's name for the CPU's vector instructions: AVX512, AVX2, DEFAULT, ..."""
    return torch.backends.cpu.get_cpu_capability()


def resolve_precision(requested: str, cuda: bool) -> Precision:
    """`train.precision` -> the precision this machine trains in. `auto`: on CUDA bf16 where the GPU
    supports it, else fp16 (with the grad scaler); on the CPU bf16 only with native bf16, else fp32."""
    if requested == "auto":
        if cuda:
            if torch.cuda.is_bf16_supported():
                return Precision("bf16", "auto: this GPU supports bf16")
            return Precision("fp16", "auto: this GPU has no bf16, so fp16 with a grad scaler")
        if cpu_has_native_bf16():
            return Precision("bf16", f"auto: this CPU ({cpu_capability()}) has native bf16")
        return Precision("no", f"auto: fp32, this CPU ({cpu_capability()}) has no native bf16 and would emulate it")
    if requested == "fp16" and not cuda:
        raise ConfigError("train.precision: fp16 needs a CUDA device; use train.precision=auto (or no, or bf16) on CPU")
    warning = None
    if requested == "bf16" and not cuda and not cpu_has_native_bf16():
        warning = (
            f"warning: train.precision=bf16 on a CPU without native bf16 ({cpu_capability()}): autocast emulates it, "
            "typically several times slower than fp32; train.precision=auto picks fp32 here"
        )
    return Precision(requested, "set by train.precision", warning)


def build_accelerator(cfg: Config) -> Accelerator:
    """An Accelerator for this machine: CPU (gloo) when CUDA is absent, precision from the config
    (`resolve_precision`).

    Works under `accelerate launch`, `torchrun` and plain `python` (one process). Gradient
    accumulation (`train.grad_accum`) is done by the Trainer with `no_sync` over exactly the
    micro-batches of each group (also the shorter last group of an epoch), so Accelerate's own
    accumulation counter, which would divide the loss a second time, is left at 1.
    """
    cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg.train.precision, cuda)
    _init_after_restart(cuda, timedelta(seconds=cfg.train.collective_timeout))
    return Accelerator(
        cpu=not cuda,
        mixed_precision=precision.mode,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout))],
    )


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
