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

Noise levels per patch size (beyond the paper, off by default): ``patch_P_mean_shift``
lowers P_mean by that much for every halving of the patch side (R/2: one shift, R/4:
two). A small crop at very high noise holds almost nothing but its coordinates, so the
hypothesis is that patches should teach the low-noise detail and full images the rest.
"""

from __future__ import annotations

import math
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
    patch_P_mean_shift: float = 0.0  # P_mean lowered by this per halving of the patch side


def edm_loss(
    denoiser: nn.Module,
    images: torch.Tensor,
    pos: torch.Tensor,
    labels: torch.Tensor | None,
    config: LossConfig,
    generator: torch.Generator | None = None,
    divisor: int = 1,
) -> torch.Tensor:
    """The scalar training loss for one batch of crops ``images`` with coordinates ``pos``.

    ``divisor`` is the crops' d (R/d patches), used only by ``patch_P_mean_shift``.
    Noise is drawn with ``generator`` (on the images' device) so runs are reproducible.
    """
    batch = images.shape[0]
    p_mean = config.P_mean - config.patch_P_mean_shift * math.log2(divisor)
    rnd = torch.randn(batch, device=images.device, generator=generator)
    sigma = (rnd * config.P_std + p_mean).exp()
    weight = (sigma**2 + config.sigma_data**2) / (sigma * config.sigma_data) ** 2
    noise = torch.randn(images.shape, device=images.device, generator=generator)
    noisy = images + noise * sigma.reshape(-1, 1, 1, 1)
    denoised = denoiser(noisy, sigma, labels, pos=pos)
    per_pixel = weight.reshape(-1, 1, 1, 1) * (denoised - images.to(denoised.dtype)) ** 2
    if config.reduction == "sum":
        return per_pixel.sum() / batch
    return per_pixel.mean()
