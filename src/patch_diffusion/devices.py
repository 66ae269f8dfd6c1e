"""Device choice: CUDA, MPS or CPU, never hard-coded."""

from __future__ import annotations

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
