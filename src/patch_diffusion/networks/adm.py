"""ADM UNet (Dhariwal & Nichol 2021) as EDM configures it ("DhariwalUNet"), fully convolutional.

Like DDPM++, the net is built for a square canvas of side ``resolution`` and
runs on any input whose sides are divisible by ``2 ** (levels - 1)``;
attention placement comes from the canvas (level ``l`` is nominally
``resolution >> l`` wide), never from the runtime input size.

Differences from DDPM++: PyTorch-default (kaiming-uniform) init with exactly
zero residual ends, scale-shift conditioning, GroupNorm eps 1e-5, no skip
scaling, no 1x1 conv on resampling skips, multi-head attention in every block
of an attention level, class labels added to the embedding after ``map1``.

Layout:
  encoder: 3x3 conv to ``model_channels * channel_mult[0]``, then per level an
           optional down block followed by ``num_blocks`` blocks; every
           output is kept as a skip.
  middle:  at the coarsest level, one block with attention, one without.
  decoder: per level (coarsest first) an optional up block followed by
           ``num_blocks + 1`` blocks, each consuming one skip.
  output:  GroupNorm -> SiLU -> zero-initialised 3x3 conv (output is zero at init).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from patch_diffusion.networks.layers import (
    UNet,
    UNetBlock,
    batch_class_labels,
    batch_noise_labels,
    check_unet_options,
    keep_default,
    linear,
    positional_embedding,
    zero_init,
)

_NORM_EPS = 1e-5
_MAX_POSITIONS = 10000


@dataclass(frozen=True)
class ADMConfig:
    """Architecture hyper-parameters of :class:`ADM` (defaults: EDM's ImageNet-64 ADM)."""

    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_blocks: int = 3  # residual blocks per resolution level
    attn_resolutions: tuple[int, ...] = (32, 16, 8)  # canvas-relative: level l is resolution >> l
    dropout: float = 0.1
    channels_per_head: int = 64  # attention heads = max(1, channels // this)
    embedding_channels_mult: int = 4  # embedding width = model_channels * this

    def __post_init__(self) -> None:
        check_unet_options(self, min_channels=2)
        if self.channels_per_head < 1:
            raise ValueError(f"channels_per_head must be >= 1, got {self.channels_per_head}")
        if self.embedding_channels_mult < 1:
            raise ValueError(f"embedding_channels_mult must be >= 1, got {self.embedding_channels_mult}")


class ADM(UNet):
    """ADM UNet mapping ``[B, in_channels, h, w]`` to ``[B, out_channels, h, w]``.

    ``resolution`` is the canvas side; it only decides where attention goes.
    ``label_dim`` > 0 makes the net class-conditional on one-hot labels; an
    all-zero row (or ``None``) is the null label. The output is exactly zero at
    initialisation.
    """

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        out_channels: int,
        config: ADMConfig = ADMConfig(),
        label_dim: int = 0,
    ) -> None:
        super().__init__()
        self.check_and_keep(resolution, in_channels, out_channels, config, label_dim)

        mc = config.model_channels
        emb_channels = mc * config.embedding_channels_mult
        self.map0 = linear(mc, emb_channels)
        self.map1 = linear(emb_channels, emb_channels)
        self.map_label = None
        if label_dim:
            # N(0, 1) weights: EDM's kaiming-normal (std 1/sqrt(fan_in)) times sqrt(label_dim).
            self.map_label = nn.Linear(label_dim, emb_channels, bias=False)
            nn.init.normal_(self.map_label.weight)

        def block(cin: int, cout: int, resample: str | None = None, attention: bool = False) -> UNetBlock:
            # EDM gives C // channels_per_head heads, i.e. none below 64 channels;
            # at least one head keeps attention in small nets.
            heads = max(1, cout // config.channels_per_head) if attention else 0
            return UNetBlock(
                cin,
                cout,
                emb_channels,
                resample=resample,
                num_heads=heads,
                dropout=config.dropout,
                skip_scale=1.0,
                eps=_NORM_EPS,
                adaptive_scale=True,
                resample_proj=False,
                init=keep_default,
                init_zero=zero_init,
            )

        # Unlike DDPM++, every block of an attention level attends.
        self.build_layout(resolution=resolution, in_channels=in_channels, out_channels=out_channels,
                          config=config, first_width=mc * config.channel_mult[0], block=block,
                          attend_all=True, eps=_NORM_EPS, in_init=keep_default, out_init=zero_init)

    def _embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        noise_labels = batch_noise_labels(noise_labels, batch)
        emb = positional_embedding(noise_labels, self.config.model_channels, endpoint=False,
                                   max_positions=_MAX_POSITIONS)
        emb = self.map1(F.silu(self.map0(emb)))
        labels = batch_class_labels(class_labels, self.label_dim, batch, emb)
        if labels is not None:
            emb = emb + self.map_label(labels)
        return F.silu(emb)
