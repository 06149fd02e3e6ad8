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


def choose(requested: str, facts: DeviceFacts) -> Precision:
    """`train.precision` -> the precision to train in on a device with these facts."""
    cuda = facts.kind == "cuda"
    if requested == "auto":
        if facts.native_bf16:
            return Precision("bf16", f"auto: {facts.name} computes bf16 natively")
        if cuda:
            return Precision("fp16", f"auto: {facts.name} has no native bf16 (capability < 8.0), so fp16 with a grad scaler")
        return Precision("no", f"auto: fp32, this {facts.name} has no native bf16 and would emulate it")
    if requested == "fp16" and not cuda:
        raise ConfigError("train.precision: fp16 needs a CUDA device; use train.precision=auto (or no, or bf16) on CPU")
    warning = None
    if requested == "bf16" and not facts.native_bf16:
        if not facts.emulated_bf16:
            raise ConfigError(f"train.precision: bf16 does not run on {facts.name}; use train.precision=auto (fp16 there) or no")
        warning = (
            f"warning: train.precision=bf16 on {facts.name}, which has no native bf16: autocast emulates it, typically "
            f"several times slower than {'fp16' if cuda else 'fp32'}; train.precision=auto picks {'fp16' if cuda else 'fp32'} here"
        )
    return Precision(requested, "set by train.precision", warning)


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
