"""Denoiser backbones and their registry.

Every backbone is called as ``net(x, noise_labels, class_labels)`` and is fully
convolutional, so one set of weights runs on patches and on the full canvas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from patch_diffusion.errors import UserError
from patch_diffusion.networks.adm import ADM, ADMConfig
from patch_diffusion.networks.ddpmpp import DDPMpp, DDPMppConfig
from patch_diffusion.networks.unet2d import UNet2DConfig, build_unet2d, unet2d_size_multiple


@dataclass(frozen=True)
class Backbone:
    """A registered backbone: its config type and how to build it.

    ``build(config, resolution_hw, in_channels, out_channels, label_dim)`` makes
    the network; ``size_multiple(config)`` is what patch and canvas sides must
    be divisible by.
    """

    config: type
    build: Callable[[Any, tuple[int, int], int, int, int], nn.Module]
    size_multiple: Callable[[Any], int]
    description: str


def _levels_multiple(config: Any) -> int:
    # One 2x downsampling between consecutive levels.
    return 2 ** (len(config.channel_mult) - 1)


def _build_ddpmpp(
    config: DDPMppConfig, resolution_hw: tuple[int, int], in_channels: int, out_channels: int, label_dim: int
) -> DDPMpp:
    # Square-canvas nets place attention by the shorter side.
    return DDPMpp(min(resolution_hw), in_channels, out_channels, config, label_dim=label_dim)


def _build_adm(
    config: ADMConfig, resolution_hw: tuple[int, int], in_channels: int, out_channels: int, label_dim: int
) -> ADM:
    return ADM(min(resolution_hw), in_channels, out_channels, config, label_dim=label_dim)


BACKBONES: dict[str, Backbone] = {
    "ddpmpp": Backbone(DDPMppConfig, _build_ddpmpp, _levels_multiple, "DDPM++ UNet (EDM's SongUNet)"),
    "adm": Backbone(ADMConfig, _build_adm, _levels_multiple, "ADM UNet of Dhariwal & Nichol (EDM's DhariwalUNet)"),
    "unet2d": Backbone(UNet2DConfig, build_unet2d, unet2d_size_multiple,
                       "any diffusers UNet2DModel, from options or a local folder (needs diffusers)"),
}


def get_backbone(name: str) -> Backbone:
    """The registered backbone called ``name``; UserError naming the choices otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}") from None


__all__ = ["ADM", "ADMConfig", "BACKBONES", "Backbone", "DDPMpp", "DDPMppConfig", "UNet2DConfig",
           "get_backbone"]
