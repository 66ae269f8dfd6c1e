"""Builds the denoiser a run trains: the registered backbone inside the registered
preconditioning, both named in the run's ``ModelConfig``."""

from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .networks import get_backbone
from .precond import Precond, build_precond


def build_backbone(config: ModelConfig) -> nn.Module:
    """The configured backbone, taking image + 2 coordinate channels."""
    if config.resolution is None or config.channels is None:
        raise ValueError("ModelConfig.resolution and .channels must be resolved from the data first")
    return get_backbone(config.backbone).build(
        config.backbone_config, tuple(config.resolution),
        config.channels + 2,  # + x and y coordinate channels
        config.channels, config.label_dim)


def wrap_backbone(backbone: nn.Module, config: ModelConfig) -> Precond:
    """Any backbone module inside the configured preconditioning."""
    return build_precond(config.precond, config.precond_config, backbone, config.channels,
                         label_dim=config.label_dim)


def build_denoiser(config: ModelConfig) -> Precond:
    """The configured backbone wrapped in the configured preconditioning."""
    return wrap_backbone(build_backbone(config), config)
