"""Preconditionings of EDM (Karras et al. 2022, Table 1) around any backbone, with Patch
Diffusion's coordinate channels concatenated after the c_in scaling (Wang et al. 2023).

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F([c_in(sigma) x, pos]; c_noise(sigma))

Each preconditioning also owns what training needs from it: the distribution of noise
levels sigma and the loss weight lambda(sigma) (Table 1's "training" rows), and the
sigma range a sampler uses by default. The three of Table 1:

- ``edm``: c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd/sqrt(sigma^2+sd^2),
  c_in = 1/sqrt(sigma^2+sd^2), c_noise = ln(sigma)/4; ln(sigma) ~ N(P_mean, P_std^2);
  lambda = (sigma^2+sd^2)/(sigma sd)^2; sampling sigma in [0.002, 80].
- ``vp`` (DDPM++'s continuous VP SDE): sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1);
  c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2+1), c_noise = (M-1) sigma^-1(sigma);
  t ~ U(epsilon_t, 1); lambda = 1/sigma^2; sampling sigma in [sigma(epsilon_s), sigma(1)].
- ``ve`` (NCSN++'s VE SDE): c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma/2);
  ln(sigma) ~ U(ln sigma_min, ln sigma_max); lambda = 1/sigma^2; sampling in
  [sigma_min, sigma_max].

A backbone ``F`` is any module called as ``F(x_in, noise_labels, class_labels)`` whose
input has image_channels + 2 channels and whose output has image_channels. Adding a
preconditioning is one class here plus one line in ``PRECONDS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .patches import coordinate_grid


@dataclass(frozen=True)
class EDMConfig:
    sigma_data: float = 0.5
    P_mean: float = -1.2
    P_std: float = 1.2


@dataclass(frozen=True)
class VPConfig:
    beta_d: float = 19.9
    beta_min: float = 0.1
    M: int = 1000
    epsilon_t: float = 1e-5  # smallest training time
    epsilon_s: float = 1e-3  # smallest sampling time (Table 1)


@dataclass(frozen=True)
class VEConfig:
    sigma_min: float = 0.02
    sigma_max: float = 100.0


class Precond(nn.Module):
    """The denoiser D(x; sigma, pos): a backbone inside one preconditioning.

    Subclasses give ``scalings``, ``sample_sigma``, ``loss_weight`` and ``sigma_range``.
    """

    def __init__(self, backbone: nn.Module, image_channels: int, config: Any,
                 label_dim: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.image_channels = image_channels
        self.config = config
        self.label_dim = label_dim

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) for each sigma."""
        raise NotImplementedError

    def sample_sigma(self, batch: int, generator: torch.Generator | None,
                     device: torch.device) -> torch.Tensor:
        """Training noise levels [batch] from this preconditioning's distribution."""
        raise NotImplementedError

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) of the training loss."""
        raise NotImplementedError

    @property
    def sigma_range(self) -> tuple[float, float]:
        """(sigma_min, sigma_max) a sampler uses by default."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoise ``x`` [B, C, h, w] at noise level ``sigma`` ([B] or scalar).

        ``pos`` [B, 2, h, w] gives each pixel's canvas coordinates; without it ``x``
        is taken to be the whole canvas and gets the full [-1, 1] grid. Without
        ``class_labels`` a conditional model gets the all-zero (null) label.
        """
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(batch) if sigma.numel() == 1 else sigma
        if pos is None:
            pos = coordinate_grid(x.shape[2], x.shape[3], device=x.device).expand(batch, -1, -1, -1)
        if self.label_dim and class_labels is None:
            class_labels = torch.zeros(batch, self.label_dim, device=x.device)
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in self.scalings(sigma))
        x32 = x.to(torch.float32)
        net_in = torch.cat([c_in * x32, pos.to(torch.float32)], dim=1)
        f = self.backbone(net_in, c_noise.flatten(), class_labels)
        return c_skip * x32 + c_out * f.to(torch.float32)


class EDMPrecond(Precond):
    """EDM's own preconditioning (Table 1, "EDM" column)."""

    def __init__(self, backbone: nn.Module, image_channels: int, config: EDMConfig = EDMConfig(),
                 label_dim: int = 0) -> None:
        super().__init__(backbone, image_channels, config, label_dim)
        self.sigma_data = config.sigma_data

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def sample_sigma(self, batch: int, generator: torch.Generator | None,
                     device: torch.device) -> torch.Tensor:
        rnd = torch.randn(batch, device=device, generator=generator)
        return (rnd * self.config.P_std + self.config.P_mean).exp()

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        sd = self.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2

    @property
    def sigma_range(self) -> tuple[float, float]:
        return 0.002, 80.0


class VPPrecond(Precond):
    """The variance-preserving preconditioning (Table 1, "VP" column)."""

    def vp_sigma(self, t: torch.Tensor) -> torch.Tensor:
        c = self.config
        return ((0.5 * c.beta_d * t**2 + c.beta_min * t).exp() - 1).sqrt()

    def vp_sigma_inv(self, sigma: torch.Tensor) -> torch.Tensor:
        c = self.config
        return ((c.beta_min**2 + 2 * c.beta_d * (1 + sigma**2).log()).sqrt() - c.beta_min) / c.beta_d

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.config.M - 1) * self.vp_sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise

    def sample_sigma(self, batch: int, generator: torch.Generator | None,
                     device: torch.device) -> torch.Tensor:
        rnd = torch.rand(batch, device=device, generator=generator)
        return self.vp_sigma(1 + rnd * (self.config.epsilon_t - 1))

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma**2

    @property
    def sigma_range(self) -> tuple[float, float]:
        t = torch.tensor([self.config.epsilon_s, 1.0], dtype=torch.float64)
        lo, hi = self.vp_sigma(t).tolist()
        return lo, hi


class VEPrecond(Precond):
    """The variance-exploding preconditioning (Table 1, "VE" column)."""

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c_skip = torch.ones_like(sigma)
        c_out = sigma
        c_in = torch.ones_like(sigma)
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise

    def sample_sigma(self, batch: int, generator: torch.Generator | None,
                     device: torch.device) -> torch.Tensor:
        rnd = torch.rand(batch, device=device, generator=generator)
        lo, hi = self.config.sigma_min, self.config.sigma_max
        return lo * (hi / lo) ** rnd

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma**2

    @property
    def sigma_range(self) -> tuple[float, float]:
        return self.config.sigma_min, self.config.sigma_max


@dataclass(frozen=True)
class Preconditioning:
    """A registered preconditioning: its typed config and its module class."""

    config: type
    module: type[Precond]
    description: str


PRECONDS: dict[str, Preconditioning] = {
    "edm": Preconditioning(EDMConfig, EDMPrecond, "EDM (Karras et al. 2022): log-normal sigma, sigma_data scaling"),
    "vp": Preconditioning(VPConfig, VPPrecond, "variance preserving (DDPM++ / DDPM timesteps): epsilon prediction"),
    "ve": Preconditioning(VEConfig, VEPrecond, "variance exploding (NCSN++): log-uniform sigma"),
}


def get_precond(name: str) -> Preconditioning:
    if name not in PRECONDS:
        raise UserError(f"unknown preconditioning '{name}'; choose one of: {', '.join(PRECONDS)}")
    return PRECONDS[name]


def build_precond(name: str, config: Any, backbone: nn.Module, image_channels: int,
                  label_dim: int = 0) -> Precond:
    """The named preconditioning around ``backbone``."""
    entry = get_precond(name)
    if not isinstance(config, entry.config):
        raise ValueError(f"preconditioning '{name}' takes a {entry.config.__name__}, "
                         f"got {type(config).__name__}")
    return entry.module(backbone, image_channels, config, label_dim=label_dim)


def log_sigma_shift(sigma: torch.Tensor, shift: float, divisor: int) -> torch.Tensor:
    """sigma lowered by ``shift`` in ln(sigma) per halving of the patch side (R/d: log2 d
    halvings); for EDM's log-normal this is exactly P_mean lowered by that much."""
    if not shift or divisor == 1:
        return sigma
    return sigma * math.exp(-shift * math.log2(divisor))
