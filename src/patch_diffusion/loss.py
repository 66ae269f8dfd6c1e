"""The denoising loss (Karras et al. 2022, Sec. 5 and Table 1) applied to patches.

    sigma ~ the preconditioning's training distribution,  n ~ N(0, sigma^2 I)
    L = lambda(sigma) * || D(y + n; sigma, pos) - y ||^2

The distribution of sigma and the weight lambda(sigma) belong to the preconditioning
(``precond.py``: EDM's log-normal, VP's uniform time, VE's log-uniform), so one loss
serves all of them.

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
lowers ln(sigma) by that much for every halving of the patch side (R/2: one shift, R/4:
two); with EDM's log-normal that is P_mean lowered by the shift. A small crop at very
high noise holds almost nothing but its coordinates, so the hypothesis is that patches
should teach the low-noise detail and full images the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .precond import Precond, log_sigma_shift


@dataclass(frozen=True)
class LossConfig:
    reduction: Literal["mean", "sum"] = "mean"
    patch_P_mean_shift: float = 0.0  # ln(sigma) lowered by this per halving of the patch side


def draw_noise(
    precond: Precond,
    shape: tuple[int, ...] | torch.Size,
    config: LossConfig,
    generator: torch.Generator | None = None,
    divisor: int = 1,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training noise levels sigma [N] (with the patch shift) and unit noise of ``shape``
    for a batch of N crops, drawn in this order from ``generator``."""
    sigma = precond.sample_sigma(shape[0], generator, device)
    sigma = log_sigma_shift(sigma, config.patch_P_mean_shift, divisor)
    noise = torch.randn(shape, device=device, generator=generator)
    return sigma, noise


def denoising_loss(
    denoiser: Precond,
    images: torch.Tensor,
    pos: torch.Tensor,
    labels: torch.Tensor | None,
    config: LossConfig,
    generator: torch.Generator | None = None,
    divisor: int = 1,
    precond: Precond | None = None,
    *,
    sigma: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar training loss for one batch of crops ``images`` with coordinates ``pos``.

    ``divisor`` is the crops' d (R/d patches), used only by ``patch_P_mean_shift``.
    Noise is drawn with ``generator`` (on the images' device) so runs are reproducible,
    unless ``sigma`` and unit ``noise`` are given (drawn by ``draw_noise`` for a larger
    batch that this one is a part of: gradient accumulation, several processes).
    ``precond`` supplies the sigma distribution and weight when ``denoiser`` is a
    compiled wrapper of it.
    """
    precond = precond or denoiser
    batch = images.shape[0]
    if sigma is None or noise is None:
        sigma, noise = draw_noise(precond, images.shape, config, generator, divisor, images.device)
    weight = precond.loss_weight(sigma)
    noisy = images + noise * sigma.reshape(-1, 1, 1, 1)
    denoised = denoiser(noisy, sigma, labels, pos=pos)
    per_pixel = weight.reshape(-1, 1, 1, 1) * (denoised - images.to(denoised.dtype)) ** 2
    if config.reduction == "sum":
        return per_pixel.sum() / batch
    return per_pixel.mean()


edm_loss = denoising_loss  # the name earlier versions exported
