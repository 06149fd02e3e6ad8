"""`train.precision`: what a rank trains in, decided from the facts of its own device.

`auto` picks bf16 only where the device computes it natively, else the fastest safe alternative:

- CUDA: bf16 on compute capability 8.0 and newer (A100, A10, L4, H100, ...); older cards (V100, T4:
  7.x) emulate bf16 (torch's `is_bf16_supported()` says yes there by default, counting emulation),
  so they get fp16 with the grad scaler. ROCm GPUs that torch runs on compute bf16 natively.
- CPU: bf16 only with native bf16 instructions (x86: `avx512_bf16` or `amx_bf16`; aarch64: the `bf16`
  feature) that oneDNN also uses; else fp32 (on an AVX2 EPYC, emulated bf16 autocast made a
  ResNet-18 step 4.5x slower than fp32).

The facts are read for one device only (`device_facts(device)`): a GPU rank reads its own card's
properties after its device is set, so no rank opens a context on another rank's GPU. The decision
itself (`choose`) is a pure function of those facts, so it is tested on every kind of card and CPU
without owning one.

One precision for the job. Ranks on devices of two kinds (cards of two generations, or GPUs and a
CPU) would decide `auto` differently, and an all-reduce of fp16-scaled gradients with bf16 ones
drifts the weights without an error. So the ranks exchange their facts (runtime.py: one all_gather
before the Accelerator is built) and every rank computes `agree` over the same list: the best
precision that every rank runs natively. bf16 needs native bf16 on every rank; fp16 runs on any
CUDA card (natively, bf16 cards included) but not on a CPU; fp32 runs everywhere. So: bf16 where
every rank has native bf16, else fp16 where every rank is a GPU, else fp32 (A100 + V100: fp16;
H100 + a CPU without bf16: fp32; V100 + a CPU with bf16: fp32, as the CPU cannot run fp16 and the
V100 only emulates bf16). An explicit precision that one rank cannot run fails on every rank
with the same line, naming that rank and its device.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from disttrain.config import ConfigError

NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere: the first NVIDIA architecture with bf16 tensor cores


@dataclass(frozen=True)
class Precision:
    """The autocast precision a run uses, and why (`train.precision=auto` decides per device)."""

    mode: str
    """`no` (fp32), `bf16` or `fp16`: what Accelerate's autocast gets."""
    reason: str
    """Why this one: printed in the "training on ..." line."""
    warning: str | None = None
    """A cost the user chose explicitly (bf16 where it is only emulated), printed once."""


@dataclass(frozen=True)
class DeviceFacts:
    """What the precision decision needs to know about one device."""

    kind: str
    """`cuda` or `cpu`."""
    name: str
    """How the device is named in messages, e.g. `NVIDIA A100 (compute capability 8.0)`, `CPU (AVX512)`."""
    native_bf16: bool
    """The device computes bf16 in hardware."""
    emulated_bf16: bool = True
    """bf16 runs at all (natively or emulated); False only on GPUs that cannot run it."""


def gpu_facts(name: str, capability: tuple[int, int], emulated_bf16: bool, rocm: bool = False) -> DeviceFacts:
    """A GPU's facts from its name, compute capability and whether torch can run bf16 on it at all."""
    native = rocm or tuple(capability) >= NATIVE_BF16_CAPABILITY
    label = f"{name} (ROCm)" if rocm else f"{name} (compute capability {capability[0]}.{capability[1]})"
    return DeviceFacts("cuda", label, native, emulated_bf16 or native)


def cpu_bf16_flags(cpuinfo: str, machine: str) -> bool:
    """Whether /proc/cpuinfo's text lists native bf16 instructions for this architecture: x86's
    `avx512_bf16` / `amx_bf16` flags, aarch64's `bf16` feature (ARMv8.6 BF16: Graviton3, Neoverse V1/V2)."""
    machine = machine.lower()
    words: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            words.update(value.split())
    if machine in ("x86_64", "amd64", "i686", "i386"):
        return bool(words & {"avx512_bf16", "amx_bf16"})
    if machine in ("aarch64", "arm64"):
        return "bf16" in words
    return False


def cpu_facts(cpuinfo: str | None, machine: str, onednn_bf16: bool, capability: str) -> DeviceFacts:
    """A CPU's facts: native bf16 needs both oneDNN's own check (it also says yes on AVX-512 CPUs
    without bf16 instructions) and the instructions in /proc/cpuinfo (`cpuinfo` None: unreadable,
    e.g. not Linux; oneDNN's word is taken)."""
    flags = cpu_bf16_flags(cpuinfo, machine) if cpuinfo is not None else onednn_bf16
    return DeviceFacts("cpu", f"CPU ({capability})", onednn_bf16 and flags)


def choose(requested: str, facts: DeviceFacts, rank: int | None = None) -> Precision:
    """`train.precision` -> the precision to train in on a device with these facts (`rank`: named
    in the messages, for a device of a job of several ranks)."""
    cuda = facts.kind == "cuda"
    named = facts.name if rank is None else f"rank {rank}'s {facts.name}"
    if requested == "auto":
        if facts.native_bf16:
            return Precision("bf16", f"auto: {named} computes bf16 natively")
        if cuda:
            return Precision("fp16", f"auto: {named} has no native bf16 (capability < 8.0), so fp16 with a grad scaler")
        return Precision("no", f"auto: fp32, this {named} has no native bf16 and would emulate it")
    if requested == "fp16" and not cuda:
        if rank is None:
            raise ConfigError("train.precision: fp16 needs a CUDA device; use train.precision=auto (or no, or bf16) on CPU")
        raise ConfigError(f"train.precision: fp16 needs a CUDA device, and {named} is not one; use train.precision=auto "
                          "(the ranks then agree on one they all run) or no")
    warning = None
    if requested == "bf16" and not facts.native_bf16:
        if not facts.emulated_bf16:
            raise ConfigError(f"train.precision: bf16 does not run on {named}; use train.precision=auto (fp16 there) or no")
        warning = (
            f"warning: train.precision=bf16 on {named}, which has no native bf16: autocast emulates it, typically "
            f"several times slower than {'fp16' if cuda else 'fp32'}; train.precision=auto picks {'fp16' if cuda else 'fp32'} here"
        )
    return Precision(requested, "set by train.precision", warning)


def agree(requested: str, ranks: list[DeviceFacts]) -> Precision:
    """`train.precision` -> the one precision of a job whose rank i runs on a device with `ranks[i]`'s
    facts (the same answer on every rank, given the same list). Each rank's own decision (`choose`)
    where they all agree; else, for `auto`, the best one every rank runs natively (module docstring),
    naming the rank whose device forced it. An explicit choice some rank cannot run raises that
    rank's error; an emulated explicit bf16 warns with the first such rank."""
    own = [choose(requested, facts, rank if len(ranks) > 1 else None) for rank, facts in enumerate(ranks)]
    if requested != "auto":
        return next((p for p in own if p.warning), own[0])
    if len({p.mode for p in own}) == 1:
        return choose(requested, ranks[0])
    no_bf16 = next(i for i, facts in enumerate(ranks) if not facts.native_bf16)
    named = f"rank {no_bf16}'s {ranks[no_bf16].name}"
    if all(facts.kind == "cuda" for facts in ranks):
        return Precision("fp16", f"auto: {named} has no native bf16, so the job uses fp16 with a grad scaler")
    if ranks[no_bf16].kind != "cuda":
        why = f"{named} has no native bf16 and cannot run fp16"
    else:
        cpu = next(i for i, facts in enumerate(ranks) if facts.kind != "cuda")
        why = f"{named} has no native bf16 and rank {cpu}'s {ranks[cpu].name} cannot run fp16"
    return Precision("no", f"auto: {why}, so the job trains in fp32")


@functools.cache
def device_facts(device: torch.device) -> DeviceFacts:
    """The facts of `device` as this machine reports them (a CUDA device's own properties only,
    asked once per process and device)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        rocm = torch.version.hip is not None
        native = rocm or (props.major, props.minor) >= NATIVE_BF16_CAPABILITY
        emulated = native or _bf16_runs_on(index)
        return gpu_facts(props.name, (props.major, props.minor), emulated, rocm)
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = None
    return cpu_facts(cpuinfo, platform.machine(), onednn, torch.backends.cpu.get_cpu_capability())


def _bf16_runs_on(index: int) -> bool:
    """Whether a bf16 tensor op runs on this (pre-Ampere) GPU at all (emulated)."""
    try:
        torch.ones(1, dtype=torch.bfloat16, device=f"cuda:{index}").add_(1)
    except RuntimeError:
        return False
    return True


def resolve_precision(requested: str, device: torch.device | str) -> Precision:
    """`train.precision` -> the precision this rank trains in on `device` (call after the rank's
    device is set; for a GPU only that device's properties are read)."""
    return choose(requested, device_facts(torch.device(device)))


def cpu_has_native_bf16() -> bool:
    """This machine's CPU computes bf16 natively (see `cpu_facts`)."""
    return device_facts(torch.device("cpu")).native_bf16
