"""EDM's denoising loss (Karras et al. 2022, Sec. 5) applied to patches.

    ln(sigma) ~ N(P_mean, P_std^2),  n ~ N(0, sigma^2 I)
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2
    L = lambda(sigma) * || D(y + n; sigma, pos) - y ||^2

Normalisation across patch sizes (our choice, ``reduction``):
- ``"mean"`` (default): the weighted squared error is averaged over the pixels of
  each crop and over the samples. A step on 8x8 crops and a step on full 32x32
  images then carry the same loss scale per pixel, so small-patch steps are not
  silently down-weighted and one learning rate serves every patch size.
- ``"sum"``: the paper's code: summed over all pixels and divided by the number of
  samples. A step on R/4 crops carries about 1/16 of a full step's loss magnitude.
With Adam the overall scale barely matters; what changes is the balance between
patch sizes within a run. The benchmark measures the effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class LossConfig:
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5
    reduction: Literal["mean", "sum"] = "mean"


def edm_loss(
    denoiser: nn.Module,
    images: torch.Tensor,
    pos: torch.Tensor,
    labels: torch.Tensor | None,
    config: LossConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The scalar training loss for one batch of crops ``images`` with coordinates ``pos``.

    Noise is drawn with ``generator`` (on the images' device) so runs are reproducible.
    """
    batch = images.shape[0]
    rnd = torch.randn(batch, device=images.device, generator=generator)
    sigma = (rnd * config.P_std + config.P_mean).exp()
    weight = (sigma**2 + config.sigma_data**2) / (sigma * config.sigma_data) ** 2
    noise = torch.randn(images.shape, device=images.device, generator=generator)
    noisy = images + noise * sigma.reshape(-1, 1, 1, 1)
    denoised = denoiser(noisy, sigma, labels, pos=pos)
    per_pixel = weight.reshape(-1, 1, 1, 1) * (denoised - images.to(denoised.dtype)) ** 2
    if config.reduction == "sum":
        return per_pixel.sum() / batch
    return per_pixel.mean()
