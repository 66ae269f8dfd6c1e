"""patch-diffusion: Patch Diffusion (Wang et al., NeurIPS 2023) on top of EDM.

The public API, in the order a training run uses it::

    from patch_diffusion import (get_preset, train, load_denoiser, sample,
                                 PatchSchedule, make_patches, EDMPrecond, edm_loss, heun)
"""

from .config import DataConfig, ModelConfig, SamplerConfig, TrainConfig, get_preset
from .errors import UserError
from .generate import load_denoiser, load_weights, sample
from .loss import LossConfig, edm_loss
from .patches import PatchConfig, PatchSchedule, coordinate_grid, crop, make_patches
from .precond import EDMPrecond
from .samplers import euler, heun, karras_sigmas
from .train import train

__version__ = "0.1.0"

__all__ = [
    "DataConfig", "EDMPrecond", "LossConfig", "ModelConfig", "PatchConfig", "PatchSchedule",
    "SamplerConfig", "TrainConfig", "UserError", "coordinate_grid", "crop", "edm_loss", "euler",
    "get_preset", "heun", "karras_sigmas", "load_denoiser", "load_weights", "make_patches",
    "sample", "train",
]
