"""Device choice: CUDA, MPS or CPU, never hard-coded; and how each runs the network
(precision and memory layout), since the fastest settings differ by device."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path
from typing import Literal

import torch

from .errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU; an explicit name must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for but this torch has no CUDA GPU; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device '{name}' asked for but MPS is not available; use --device cpu or auto")
    return device


def to_device(tensor: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """Move a host tensor to ``device`` without making the host wait for the GPU.

    A copy from ordinary (pageable) host memory to CUDA blocks until the GPU has caught
    up with all queued work, which stalls a training loop every step. From pinned memory
    the copy is queued like a kernel, so the host can prepare the next step meanwhile.
    """
    if device is None:
        return tensor
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, which run oneDNN's bf16 convolutions several
    times faster than fp32 (BENCHMARKS.md, "CPU speed")."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so guarded
    return bool(check and check())


def resolve_precision(precision: str, device: torch.device) -> Literal["fp32", "bf16"]:
    """'auto' is bf16 autocast on CPUs with AMX (measured faster at no cost in FID) and
    fp32 everywhere else; an explicit choice is kept."""
    if precision == "auto":
        return "bf16" if device.type == "cpu" and cpu_has_amx() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise UserError(f"unknown precision '{precision}'; use auto, fp32 or bf16")
    return precision  # type: ignore[return-value]


def describe_machine(device: torch.device, precision: str) -> dict[str, str | int]:
    """What a training speed depends on, to be stored beside it: the processor or GPU,
    the CPU's vector instructions, the precision actually used and the torch build.
    Minutes measured on two different machines are not comparable."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        name = f"Apple MPS ({platform.machine()})"
    else:
        name = _cpu_name()
    return {"device": device.type, "name": name,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "precision": resolve_precision(precision, device),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")  # Linux; platform.processor() there says only "x86_64"
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for the network's matrix math (weights stay fp32), or nothing."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(channels_last: bool | None, device: torch.device) -> torch.memory_format:
    """NHWC when asked, or by default (None) on CPU, where oneDNN runs convolutions
    without reordering each call; NCHW otherwise."""
    if channels_last is None:
        channels_last = device.type == "cpu"
    return torch.channels_last if channels_last else torch.contiguous_format
