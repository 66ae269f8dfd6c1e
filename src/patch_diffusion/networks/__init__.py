"""Denoiser backbones."""

from patch_diffusion.networks.ddpmpp import DDPMpp, DDPMppConfig

__all__ = ["DDPMpp", "DDPMppConfig"]
