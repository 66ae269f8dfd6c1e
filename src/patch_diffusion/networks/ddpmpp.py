"""DDPM++ UNet (EDM's "SongUNet" with its DDPM++ settings), fully convolutional.

The net is built for a square canvas of side ``resolution`` but runs on any
input whose height and width are divisible by ``2 ** (levels - 1)``: patch
diffusion trains on crops of the canvas with the same weights it later uses on
full images. Attention placement is therefore fixed at construction from the
canvas resolution (level ``l`` is nominally ``resolution >> l`` pixels wide),
never from the runtime input size.

Layout (per EDM's DDPM++ settings):
  encoder: 3x3 input conv, then per level an optional down block followed by
           ``num_blocks`` residual blocks; every output is kept as a skip.
  middle:  one residual block with attention, one without, at the lowest level.
  decoder: per level (coarsest first) an optional up block followed by
           ``num_blocks + 1`` residual blocks, each consuming one skip; only
           the last block of a level attends.
  output:  GroupNorm -> SiLU -> 3x3 conv.

The defaults reproduce EDM's DDPM++ exactly. ``adaptive_scale=True,
init_zero=0.0`` is this project's earlier variant (scale-shift conditioning,
exactly-zero residual ends, [cos, sin] noise embedding) and loads its
checkpoints; both settings have the same state_dict keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patch_diffusion.networks.layers import (
    UNet,
    UNetBlock,
    batch_class_labels,
    batch_noise_labels,
    check_unet_options,
    linear,
    positional_embedding,
    xavier_init,
)

_SKIP_SCALE = math.sqrt(0.5)  # keeps the variance of residual sums near 1
_MAX_POSITIONS = 10000  # period range of the sinusoidal noise embedding
_NORM_EPS = 1e-6
_ATTN_GAIN = math.sqrt(0.2)  # Xavier gain of the qkv conv


@dataclass(frozen=True)
class DDPMppConfig:
    """Architecture hyper-parameters of :class:`DDPMpp`."""

    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_blocks: int = 2  # residual blocks per resolution level
    attn_resolutions: tuple[int, ...] = (16,)  # canvas-relative: level l is resolution >> l
    dropout: float = 0.0
    embedding_channels_mult: int = 4  # noise-embedding width = model_channels * this
    # False (EDM's DDPM++): the embedding adds one bias per channel before norm1,
    # and the noise embedding is [sin, cos]. True: per-channel scale and shift
    # after norm1, with a [cos, sin] embedding (this project's earlier network).
    adaptive_scale: bool = False
    # Xavier gain of the layers that end a residual branch (block conv1,
    # attention proj, output conv); EDM uses 1e-5, 0 makes them exactly zero.
    init_zero: float = 1e-5

    def __post_init__(self) -> None:
        check_unet_options(self, min_channels=4)
        if self.embedding_channels_mult < 1:
            raise ValueError(f"embedding_channels_mult must be >= 1, got {self.embedding_channels_mult}")
        if not math.isfinite(self.init_zero) or self.init_zero < 0:
            raise ValueError(f"init_zero must be a finite number >= 0, got {self.init_zero}")


class DDPMpp(UNet):
    """DDPM++ UNet mapping ``[B, in_channels, h, w]`` to ``[B, out_channels, h, w]``.

    ``resolution`` is the canvas side; it only decides where attention goes.
    The input may be any crop with ``h`` and ``w`` divisible by ``2 ** (levels - 1)``.
    ``label_dim`` > 0 makes the net class-conditional on one-hot labels; an
    all-zero row (or ``None``) is the null label. The output is tiny at
    initialisation, and exactly zero when ``config.init_zero == 0``.
    """

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        out_channels: int,
        config: DDPMppConfig = DDPMppConfig(),
        label_dim: int = 0,
    ) -> None:
        super().__init__()
        self.check_and_keep(resolution, in_channels, out_channels, config, label_dim)
        # The [sin, cos] order is EDM's; the adaptive_scale=True variant predates
        # it, and its checkpoints need the [cos, sin] order they were trained with.
        self._sin_first = not config.adaptive_scale

        init = xavier_init()
        init_zero = xavier_init(config.init_zero)
        init_attn = xavier_init(_ATTN_GAIN)
        mc = config.model_channels
        emb_channels = mc * config.embedding_channels_mult
        self.map_label = linear(label_dim, mc, init) if label_dim else None
        self.map0 = linear(mc, emb_channels, init)
        self.map1 = linear(emb_channels, emb_channels, init)

        def block(cin: int, cout: int, resample: str | None = None, attention: bool = False) -> UNetBlock:
            return UNetBlock(
                cin,
                cout,
                emb_channels,
                resample=resample,
                num_heads=1 if attention else 0,
                dropout=config.dropout,
                skip_scale=_SKIP_SCALE,
                eps=_NORM_EPS,
                adaptive_scale=config.adaptive_scale,
                resample_proj=True,
                init=init,
                init_zero=init_zero,
                init_attn=init_attn,
            )

        self.build_layout(resolution=resolution, in_channels=in_channels, out_channels=out_channels,
                          config=config, first_width=mc, block=block, attend_all=False, eps=_NORM_EPS,
                          in_init=init, out_init=init_zero)

    def _embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        noise_labels = batch_noise_labels(noise_labels, batch)
        emb = positional_embedding(
            noise_labels, self.config.model_channels, endpoint=True, max_positions=_MAX_POSITIONS,
            sin_first=self._sin_first,
        )
        labels = batch_class_labels(class_labels, self.label_dim, batch, emb)
        if labels is not None:
            # sqrt(dim) rescales one-hot vectors to unit variance per entry.
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        emb = F.silu(self.map0(emb))
        return F.silu(self.map1(emb))
