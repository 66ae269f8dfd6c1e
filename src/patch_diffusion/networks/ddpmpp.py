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
from torch import nn

from patch_diffusion.networks.layers import (
    UNetBlock,
    batch_class_labels,
    batch_noise_labels,
    check_input,
    conv2d,
    group_norm,
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
        # Config files give lists; keep the documented (hashable) tuple types.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        if self.model_channels < 4 or self.model_channels % 2:
            raise ValueError(f"model_channels must be an even number >= 4, got {self.model_channels}")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if any(r < 1 for r in self.attn_resolutions):
            raise ValueError(f"attn_resolutions must be positive, got {self.attn_resolutions}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.embedding_channels_mult < 1:
            raise ValueError(f"embedding_channels_mult must be >= 1, got {self.embedding_channels_mult}")
        if not math.isfinite(self.init_zero) or self.init_zero < 0:
            raise ValueError(f"init_zero must be a finite number >= 0, got {self.init_zero}")


class DDPMpp(nn.Module):
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
        if resolution < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"resolution, in_channels and out_channels must be positive, "
                f"got {resolution}, {in_channels}, {out_channels}"
            )
        if label_dim < 0:
            raise ValueError(f"label_dim must be >= 0, got {label_dim}")
        self.resolution = resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.config = config
        levels = len(config.channel_mult)
        self.size_multiple = 2 ** (levels - 1)
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

        # Encoder: remember every output's width so the decoder can size its inputs.
        self.conv_in = conv2d(in_channels, mc, 3, init)
        self.encoder = nn.ModuleList()
        skip_widths = [mc]
        cout = mc
        for level, mult in enumerate(config.channel_mult):
            attn = (resolution >> level) in config.attn_resolutions
            if level > 0:
                self.encoder.append(block(cout, cout, resample="down"))
                skip_widths.append(cout)
            for _ in range(config.num_blocks):
                self.encoder.append(block(cout, mc * mult, attention=attn))
                cout = mc * mult
                skip_widths.append(cout)

        # Decoder (incl. the two middle blocks); takes_skip marks blocks that
        # concatenate the next encoder skip onto their input.
        self.decoder = nn.ModuleList()
        takes_skip: list[bool] = []
        for level in reversed(range(levels)):
            attn = (resolution >> level) in config.attn_resolutions
            if level == levels - 1:
                # Middle of the UNet always attends, as in DDPM++.
                self.decoder.extend([block(cout, cout, attention=True), block(cout, cout)])
                takes_skip += [False, False]
            else:
                self.decoder.append(block(cout, cout, resample="up"))
                takes_skip.append(False)
            for idx in range(config.num_blocks + 1):
                cin = cout + skip_widths.pop()
                cout = mc * config.channel_mult[level]
                # Only the last block of a level attends, matching DDPM++.
                self.decoder.append(block(cin, cout, attention=attn and idx == config.num_blocks))
                takes_skip.append(True)
        self._takes_skip = tuple(takes_skip)

        self.norm_out = group_norm(cout, _NORM_EPS)
        self.conv_out = conv2d(cout, out_channels, 3, init_zero)

    def num_parameters(self) -> int:
        """Total number of parameters."""
        return sum(p.numel() for p in self.parameters())

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

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict ``[B, out_channels, h, w]`` from ``x`` and the noise level ``c_noise``."""
        check_input(x, self.in_channels, self.size_multiple, len(self.config.channel_mult))
        emb = self._embed(noise_labels, class_labels, x.shape[0])

        h = self.conv_in(x)
        skips = [h]
        for block in self.encoder:
            h = block(h, emb)
            skips.append(h)
        for block, takes_skip in zip(self.decoder, self._takes_skip):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
