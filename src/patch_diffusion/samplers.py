"""Samplers for the probability-flow ODE / SDE of EDM (Karras et al. 2022).

Every sampler has one signature, ``sampler(denoise, latents, sigmas, *, randn_like, ...)``
where ``denoise(x, sigma)`` returns D(x; sigma) for a batch at one noise level and
``sigmas`` is the decreasing schedule ending in 0. Patch Diffusion samples as EDM
does: at full resolution, the denoiser supplying the full coordinate grid itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def karras_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """EDM Eq. 5: num_steps levels from sigma_max to sigma_min, spaced in sigma^(1/rho), then 0."""
    if num_steps < 1:
        raise ValueError("num_steps must be at least 1")
    i = torch.arange(num_steps, dtype=torch.float64)
    frac = i / max(num_steps - 1, 1)
    sigmas = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def heun(
    denoise: Denoise,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """EDM Algorithm 2: Heun's 2nd-order steps with optional stochastic churn.

    ``latents`` are unit-variance noise; they are scaled by sigmas[0]. Computation is
    in float64 for the state, as EDM does, so the step error is the method's alone.
    """
    num_steps = len(sigmas) - 1
    sigmas = sigmas.to(device=latents.device, dtype=state_dtype(latents.device))
    x_next = latents.to(sigmas.dtype) * sigmas[0]
    for i in tqdm(range(num_steps), desc="sampling", disable=not progress, leave=False):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        x_cur = x_next
        # Churn: raise the noise level a little, then add matching fresh noise.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur)
        else:
            x_hat = x_cur
        d_cur = (x_hat - _denoise64(denoise, x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if t_next > 0:  # 2nd-order correction, skipped on the last step to sigma = 0
            d_prime = (x_next - _denoise64(denoise, x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def euler(
    denoise: Denoise,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    progress: bool = False,
) -> torch.Tensor:
    """Deterministic Euler steps on the probability-flow ODE (1st order; EDM Eq. 1)."""
    sigmas = sigmas.to(device=latents.device, dtype=state_dtype(latents.device))
    x = latents.to(sigmas.dtype) * sigmas[0]
    for i in tqdm(range(len(sigmas) - 1), desc="sampling", disable=not progress, leave=False):
        d = (x - _denoise64(denoise, x, sigmas[i])) / sigmas[i]
        x = x + (sigmas[i + 1] - sigmas[i]) * d
    return x


def state_dtype(device: torch.device) -> torch.dtype:
    """float64 for the sampler state, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _denoise64(denoise: Denoise, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    sigma_batch = torch.full((x.shape[0],), float(sigma), device=x.device)
    return denoise(x.to(torch.float32), sigma_batch).to(x.dtype)


class SeededNoise:
    """Per-sample random streams, so image k depends only on seed k, not on the batch.

    Provides the latents and the churn noise of a batch drawn from ``seeds``.
    """

    def __init__(self, seeds: list[int], device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.stack(
            [torch.randn(shape, generator=g, device=self.device) for g in self.generators]
        )

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(tuple(x.shape[1:])).to(x.dtype)
