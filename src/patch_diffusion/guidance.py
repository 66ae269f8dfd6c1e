"""Class labels at sampling time and classifier-free guidance (Ho & Salimans 2022).

    D_w(x; sigma, c) = D(x; sigma, null) + w (D(x; sigma, c) - D(x; sigma, null))

w = 1 is the plain conditional model, w = 0 the unconditional one, w > 1 trades
diversity for fidelity. The null label is the all-zero label vector: the input a
model sees for a label dropped in training (``--label-dropout``), as in EDM's and the
Patch Diffusion reference code's networks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .errors import UserError

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_request(label_dim: int, class_label: int | None = None, weight: float | None = None) -> None:
    """A clear error for a class or a guidance weight the model cannot take."""
    if not label_dim:
        if class_label is not None:
            raise UserError("this model was trained without class labels; drop --class")
        if weight not in (None, 1.0):
            raise UserError("--guidance needs a class-conditional model (trained with --cond and "
                            "--label-dropout); drop --guidance for this one")
    elif class_label is not None and not 0 <= class_label < label_dim:
        raise UserError(f"--class {class_label} is out of range; this model has classes 0-{label_dim - 1}")


def seed_labels(seeds: list[int], label_dim: int, class_label: int | None,
                device: torch.device | str) -> torch.Tensor:
    """One-hot labels [N, label_dim]: ``class_label`` for every seed, or by default a
    class drawn uniformly from each seed alone (so image k never depends on the batch)."""
    check_request(label_dim, class_label)
    idx = torch.tensor([class_label if class_label is not None else
                        int(np.random.default_rng(s).integers(label_dim)) for s in seeds])
    return torch.nn.functional.one_hot(idx, label_dim).float().to(device)


def guided(net: torch.nn.Module, labels: torch.Tensor | None, weight: float = 1.0) -> Denoise:
    """``denoise(x, sigma)`` of ``net`` for the given labels, guided with ``weight``.

    The conditional and null passes run as one batch of twice the size."""
    if labels is None:
        check_request(0, weight=weight)
        return lambda x, sigma: net(x, sigma)
    if weight == 1.0:
        return lambda x, sigma: net(x, sigma, labels)
    null = torch.zeros_like(labels)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        both = net(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, null]))
        cond, uncond = both.chunk(2)
        return uncond + weight * (cond - uncond)

    return denoise
