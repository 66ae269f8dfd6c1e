"""patch-diffusion: Patch Diffusion (Wang et al., NeurIPS 2023) on top of EDM.

The public API, in the order a training run uses it::

    from patch_diffusion import (get_preset, train, load_denoiser, sample,
                                 PatchSchedule, make_patches, EDMPrecond, denoising_loss, heun)

Components are chosen by name from three registries: ``BACKBONES`` (networks),
``PRECONDS`` (preconditionings with their training noise and loss weight) and
``SAMPLERS``; adding one is a module or function plus one registry line.
"""

from .config import (DataConfig, ModelConfig, SamplerConfig, TrainConfig, get_preset, with_backbone,
                     with_precond)
from .errors import UserError
from .generate import load_denoiser, load_weights, sample
from .guidance import guided
from .loss import LossConfig, denoising_loss, edm_loss
from .networks import BACKBONES, Backbone
from .patches import PatchConfig, PatchSchedule, coordinate_grid, crop, make_patches
from .precond import PRECONDS, EDMConfig, EDMPrecond, Precond, VEConfig, VEPrecond, VPConfig, VPPrecond
from .samplers import SAMPLERS, Sampler, euler, heun, karras_sigmas
from .train import train

__version__ = "0.2.0"

__all__ = [
    "BACKBONES", "Backbone", "DataConfig", "EDMConfig", "EDMPrecond", "LossConfig", "ModelConfig",
    "PRECONDS", "PatchConfig", "PatchSchedule", "Precond", "SAMPLERS", "Sampler", "SamplerConfig",
    "TrainConfig", "UserError", "VEConfig", "VEPrecond", "VPConfig", "VPPrecond", "coordinate_grid",
    "crop", "denoising_loss", "edm_loss", "euler", "get_preset", "guided", "heun", "karras_sigmas",
    "load_denoiser", "load_weights", "make_patches", "sample", "train", "with_backbone",
    "with_precond",
]
