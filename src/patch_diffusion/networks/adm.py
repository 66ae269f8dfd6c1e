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
    UNetBlock,
    batch_class_labels,
    batch_noise_labels,
    check_input,
    conv2d,
    group_norm,
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
        # Config files give lists; keep the documented (hashable) tuple types.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        if self.model_channels < 2 or self.model_channels % 2:
            raise ValueError(f"model_channels must be an even number >= 2, got {self.model_channels}")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if any(r < 1 for r in self.attn_resolutions):
            raise ValueError(f"attn_resolutions must be positive, got {self.attn_resolutions}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.channels_per_head < 1:
            raise ValueError(f"channels_per_head must be >= 1, got {self.channels_per_head}")
        if self.embedding_channels_mult < 1:
            raise ValueError(f"embedding_channels_mult must be >= 1, got {self.embedding_channels_mult}")


class ADM(nn.Module):
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

        # Encoder: remember every output's width so the decoder can size its inputs.
        cout = mc * config.channel_mult[0]
        self.conv_in = conv2d(in_channels, cout, 3)
        self.encoder = nn.ModuleList()
        skip_widths = [cout]
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
                self.decoder.extend([block(cout, cout, attention=True), block(cout, cout)])
                takes_skip += [False, False]
            else:
                self.decoder.append(block(cout, cout, resample="up"))
                takes_skip.append(False)
            for _ in range(config.num_blocks + 1):
                cin = cout + skip_widths.pop()
                cout = mc * config.channel_mult[level]
                # Unlike DDPM++, every block of an attention level attends.
                self.decoder.append(block(cin, cout, attention=attn))
                takes_skip.append(True)
        self._takes_skip = tuple(takes_skip)

        self.norm_out = group_norm(cout, _NORM_EPS)
        self.conv_out = conv2d(cout, out_channels, 3, zero_init)

    def num_parameters(self) -> int:
        """Total number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def _embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        noise_labels = batch_noise_labels(noise_labels, batch)
        emb = positional_embedding(noise_labels, self.config.model_channels, endpoint=False,
                                   max_positions=_MAX_POSITIONS)
        emb = self.map1(F.silu(self.map0(emb)))
        labels = batch_class_labels(class_labels, self.label_dim, batch, emb)
        if labels is not None:
            emb = emb + self.map_label(labels)
        return F.silu(emb)

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
