"""Samplers for the probability-flow ODE / SDE of EDM (Karras et al. 2022).

Every sampler has one signature::

    fn(denoise, latents, sigmas, *, randn_like=torch.randn_like, progress=False, **options)

- ``denoise(x, sigma_batch)`` returns D(x; sigma), the ideal-denoiser estimate of the
  clean data, for a batch at one noise level (``sigma_batch`` has one entry per sample);
- ``latents`` are unit-variance noise, scaled inside by ``sigmas[0]``;
- ``sigmas`` is the decreasing schedule ending in 0 (e.g. ``karras_sigmas``);
- all noise comes from ``randn_like``, so per-seed streams (``SeededNoise``) make
  image k depend only on seed k;
- the state is kept in ``state_dtype`` (float64 except on MPS), so the step error is the
  method's alone; the denoiser still sees float32.

``SAMPLERS`` maps the CLI names to a ``Sampler`` record (function, network evaluations
per number of steps, option names, description). Adding a sampler is one function with
the signature above plus one line in ``SAMPLERS``.

Patch Diffusion samples as EDM does: at full resolution, the denoiser supplying the
full coordinate grid itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import UserError

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RandnLike = Callable[[torch.Tensor], torch.Tensor]
SamplerFn = Callable[..., torch.Tensor]


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


def euler(
    denoise: Denoise,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    randn_like: RandnLike = torch.randn_like,
    progress: bool = False,
) -> torch.Tensor:
    """Deterministic Euler steps on the probability-flow ODE (1st order; EDM Eq. 1).

    One network evaluation per step. ``randn_like`` is unused (the ODE has no noise).
    """
    x, sigmas = _start(latents, sigmas)
    for i in _steps(sigmas, progress):
        d = (x - _denoise(denoise, x, sigmas[i])) / sigmas[i]
        x = x + (sigmas[i + 1] - sigmas[i]) * d
    return x


def heun(
    denoise: Denoise,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    randn_like: RandnLike = torch.randn_like,
    progress: bool = False,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
) -> torch.Tensor:
    """EDM Algorithm 2: Heun's 2nd-order steps with optional stochastic churn.

    Two network evaluations per step except the last one to sigma = 0, where the
    correction would divide by zero, so 2 * steps - 1 in all.
    """
    num_steps = len(sigmas) - 1
    x_next, sigmas = _start(latents, sigmas)
    for i in _steps(sigmas, progress):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        x_cur = x_next
        # Churn: raise the noise level a little, then add matching fresh noise.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur)
        else:
            x_hat = x_cur
        d_cur = (x_hat - _denoise(denoise, x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if t_next > 0:  # 2nd-order correction, skipped on the last step to sigma = 0
            d_prime = (x_next - _denoise(denoise, x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def dpmpp_2m(
    denoise: Denoise,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    randn_like: RandnLike = torch.randn_like,
    progress: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095), data prediction, multistep.

    In lambda = -log(sigma) the ODE is solved exactly for the linear part, leaving
    x_{i+1} = (sigma_{i+1}/sigma_i) x_i - expm1(-h) D with h = lambda_{i+1} - lambda_i.
    D is the current denoised output on the first step (no history yet) and on the
    last step to sigma = 0 (where the update is just D); otherwise a linear
    extrapolation with the previous denoised output makes the step 2nd order.
    One network evaluation per step.
    """
    x, sigmas = _start(latents, sigmas)
    d_prev: torch.Tensor | None = None
    h_prev = 0.0
    for i in _steps(sigmas, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d_cur = _denoise(denoise, x, sigma)
        if sigma_next == 0:
            # h is infinite: the exact update of the linear part is D itself.
            x = d_cur
            break
        h = torch.log(sigma / sigma_next)
        if d_prev is None:
            d = d_cur
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * d_cur - (1 / (2 * r)) * d_prev
        x = (sigma_next / sigma) * x - torch.expm1(-h) * d
        d_prev, h_prev = d_cur, h
    return x


def euler_ancestral(
    denoise: Denoise,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    randn_like: RandnLike = torch.randn_like,
    progress: bool = False,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Ancestral Euler: DDPM-style ancestral sampling in the sigma parameterisation.

    Each step splits sigma_next^2 into sigma_down^2 + sigma_up^2: a deterministic Euler
    step to sigma_down, then fresh noise of std sigma_up. With eta = 1, sigma_up is the
    std of the posterior q(x_next | x, x_0); eta = 0 gives plain ``euler``.
    One network evaluation per step.
    """
    x, sigmas = _start(latents, sigmas)
    for i in _steps(sigmas, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_up = torch.minimum(
            sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt()
        )
        sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
        d = (x - _denoise(denoise, x, sigma)) / sigma
        x = x + (sigma_down - sigma) * d
        if sigma_next > 0 and sigma_up > 0:  # no noise is added at sigma = 0 or with eta = 0
            x = x + s_noise * sigma_up * randn_like(x)
    return x


@dataclass(frozen=True)
class Sampler:
    """A sampler and what a caller needs to know about it.

    ``nfe(steps)`` is the number of network evaluations (batch calls of ``denoise``)
    for a schedule of ``steps`` steps, i.e. ``len(sigmas) - 1``; ``options`` are the
    names of the extra keyword arguments ``fn`` accepts.
    """

    fn: SamplerFn
    nfe: Callable[[int], int]
    options: tuple[str, ...]
    description: str

    def __call__(
        self,
        denoise: Denoise,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        *,
        randn_like: RandnLike = torch.randn_like,
        progress: bool = False,
        **options: Any,
    ) -> torch.Tensor:
        """Run ``fn``, first rejecting options it does not take with a ``UserError``."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(self.options) if self.options else "none"
            raise UserError(f"sampler option(s) {', '.join(unknown)} not understood; "
                            f"this sampler takes: {allowed}")
        return self.fn(denoise, latents, sigmas, randn_like=randn_like, progress=progress,
                       **options)


SAMPLERS: dict[str, Sampler] = {
    "euler": Sampler(euler, lambda steps: steps, (),
                     "Euler on the probability-flow ODE (1st order, deterministic)"),
    "heun": Sampler(heun, lambda steps: 2 * steps - 1, ("S_churn", "S_min", "S_max", "S_noise"),
                    "EDM Algorithm 2: Heun (2nd order) with optional churn"),
    "dpmpp-2m": Sampler(dpmpp_2m, lambda steps: steps, (),
                        "DPM-Solver++(2M): 2nd-order multistep, deterministic"),
    "euler-ancestral": Sampler(euler_ancestral, lambda steps: steps, ("eta", "s_noise"),
                               "ancestral Euler (stochastic, DDPM-like)"),
}


def get_sampler(name: str) -> Sampler:
    """The registered sampler called ``name``; a ``UserError`` naming the choices if none."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise UserError(f"unknown sampler '{name}'; choose one of: "
                        f"{', '.join(SAMPLERS)}") from None


class CountedDenoiser:
    """Wraps a denoiser and counts its calls; one batch call is one network evaluation."""

    def __init__(self, denoise: Denoise) -> None:
        self.denoise = denoise
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.denoise(x, sigma)


def count_calls(denoise: Denoise) -> CountedDenoiser:
    """``denoise`` wrapped to count network evaluations: pass the result to a sampler,
    then read ``.calls``."""
    return CountedDenoiser(denoise)


def state_dtype(device: torch.device) -> torch.dtype:
    """float64 for the sampler state, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _start(latents: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial state latents * sigma_max and the schedule, both in the state dtype."""
    sigmas = sigmas.to(device=latents.device, dtype=state_dtype(latents.device))
    return latents.to(sigmas.dtype) * sigmas[0], sigmas


def _steps(sigmas: torch.Tensor, progress: bool) -> tqdm:
    return tqdm(range(len(sigmas) - 1), desc="sampling", disable=not progress, leave=False)


def _denoise(denoise: Denoise, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    # The network runs in float32; its output comes back in the state dtype.
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
