"""Builds the denoiser a run trains: the backbone inside EDM preconditioning."""

from __future__ import annotations

from .config import ModelConfig
from .networks.ddpmpp import DDPMpp
from .precond import EDMPrecond


def build_denoiser(config: ModelConfig) -> EDMPrecond:
    """A DDPM++ backbone taking image + 2 coordinate channels, wrapped in EDM's preconditioning."""
    if config.resolution is None or config.channels is None:
        raise ValueError("ModelConfig.resolution and .channels must be resolved from the data first")
    backbone = DDPMpp(
        resolution=min(config.resolution),
        in_channels=config.channels + 2,  # + x and y coordinate channels
        out_channels=config.channels,
        config=config.network,
    )
    return EDMPrecond(backbone, config.channels, sigma_data=config.sigma_data,
                      label_dim=config.network.label_dim)
