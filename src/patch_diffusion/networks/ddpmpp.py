"""DDPM++-style UNet (the "SongUNet" family used by EDM), fully convolutional.

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
           ``num_blocks + 1`` residual blocks, each consuming one skip.
  output:  GroupNorm -> SiLU -> zero-initialised 3x3 conv.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_SKIP_SCALE = math.sqrt(0.5)  # keeps the variance of residual sums near 1
_MAX_POSITIONS = 10000  # period range of the sinusoidal noise embedding
_NORM_EPS = 1e-6


@dataclass(frozen=True)
class DDPMppConfig:
    """Architecture hyper-parameters of :class:`DDPMpp`."""

    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_blocks: int = 2  # residual blocks per resolution level
    attn_resolutions: tuple[int, ...] = (16,)  # canvas-relative: level l is resolution >> l
    dropout: float = 0.0
    label_dim: int = 0  # 0 = unconditional
    label_dropout: float = 0.0  # prob. of zeroing class labels in training (classifier-free guidance)
    embedding_channels_mult: int = 4  # noise-embedding width = model_channels * this

    def __post_init__(self) -> None:
        if self.model_channels < 4 or self.model_channels % 2:
            raise ValueError(f"model_channels must be an even number >= 4, got {self.model_channels}")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.label_dim < 0:
            raise ValueError(f"label_dim must be >= 0, got {self.label_dim}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout must be in [0, 1], got {self.label_dropout}")
        if self.embedding_channels_mult < 1:
            raise ValueError(f"embedding_channels_mult must be >= 1, got {self.embedding_channels_mult}")


def _group_norm(channels: int) -> nn.GroupNorm:
    # EDM's rule is min(32, C // 4) groups; step down until it divides C, since
    # concatenated skip widths (e.g. 96 + 48) are not always multiples of 32.
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=_NORM_EPS)


def _init(layer: nn.Conv2d | nn.Linear, zero: bool = False, gain: float = 1.0) -> nn.Module:
    # Xavier-uniform weights and zero biases as in DDPM++; "zero" layers end a
    # residual branch so each block (and the whole net) starts as identity / zero.
    if zero:
        nn.init.zeros_(layer.weight)
    else:
        nn.init.xavier_uniform_(layer.weight, gain=gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _conv(cin: int, cout: int, kernel: int, zero: bool = False, gain: float = 1.0) -> nn.Conv2d:
    return _init(nn.Conv2d(cin, cout, kernel, padding=kernel // 2), zero=zero, gain=gain)


def _resample(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    # The [1, 1] FIR filter of DDPM++ is exactly 2x2 average pooling / nearest upsampling.
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class _SelfAttention(nn.Module):
    """Single-head spatial self-attention with a zero-initialised output projection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = _conv(channels, channels * 3, 1, gain=math.sqrt(0.2))
        self.proj = _conv(channels, channels, 1, zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # [B, 3C, H, W] -> three [B, 1, HW, C] token tensors.
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unsqueeze(2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return (x + self.proj(a)) * _SKIP_SCALE


class _ResBlock(nn.Module):
    """GroupNorm+SiLU residual block conditioned on the noise embedding.

    The embedding modulates the second normalisation with a per-channel scale
    and shift; ``resample`` ("up", "down" or None) applies to both branches.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        emb_channels: int,
        dropout: float,
        resample: str | None = None,
        attention: bool = False,
    ) -> None:
        super().__init__()
        self.resample = resample
        self.norm0 = _group_norm(cin)
        self.conv0 = _conv(cin, cout, 3)
        self.affine = _init(nn.Linear(emb_channels, cout * 2))
        self.norm1 = _group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _conv(cout, cout, 3, zero=True)
        # A 1x1 projection on the skip path only when the shape changes.
        self.skip = _conv(cin, cout, 1) if cin != cout or resample is not None else None
        self.attn = _SelfAttention(cout) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = _resample(x, self.resample)
        h = self.conv0(_resample(F.silu(self.norm0(x)), self.resample))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        skip = self.skip(orig) if self.skip is not None else orig
        h = (h + skip) * _SKIP_SCALE
        return self.attn(h) if self.attn is not None else h


def _positional_embedding(t: torch.Tensor, channels: int) -> torch.Tensor:
    # Sinusoids with geometrically spaced frequencies from 1 down to 1/10000
    # (endpoint included, as in DDPM++), computed in fp32 for precision.
    half = channels // 2
    exponents = torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1)
    freqs = (1.0 / _MAX_POSITIONS) ** exponents
    angles = torch.outer(t.float(), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class DDPMpp(nn.Module):
    """DDPM++ UNet mapping ``[B, in_channels, h, w]`` to ``[B, out_channels, h, w]``.

    ``resolution`` is the canvas side; it only decides where attention goes.
    The input may be any crop with ``h`` and ``w`` divisible by ``2 ** (levels - 1)``.
    The output is exactly zero at initialisation (zero-initialised final conv).
    """

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        out_channels: int,
        config: DDPMppConfig = DDPMppConfig(),
    ) -> None:
        super().__init__()
        if resolution < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"resolution, in_channels and out_channels must be positive, "
                f"got {resolution}, {in_channels}, {out_channels}"
            )
        self.resolution = resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.config = config
        levels = len(config.channel_mult)
        self.size_multiple = 2 ** (levels - 1)

        mc = config.model_channels
        emb_channels = mc * config.embedding_channels_mult
        self.map_label = _init(nn.Linear(config.label_dim, mc)) if config.label_dim else None
        self.map0 = _init(nn.Linear(mc, emb_channels))
        self.map1 = _init(nn.Linear(emb_channels, emb_channels))

        def block(cin: int, cout: int, resample: str | None = None, attention: bool = False) -> _ResBlock:
            return _ResBlock(cin, cout, emb_channels, config.dropout, resample, attention)

        # Encoder: remember every output's width so the decoder can size its inputs.
        self.conv_in = _conv(in_channels, mc, 3)
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

        self.norm_out = _group_norm(cout)
        self.conv_out = _conv(cout, out_channels, 3, zero=True)

    def num_parameters(self) -> int:
        """Total number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape [B, {self.in_channels}, h, w], got {list(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(
                f"input size {h}x{w} is not divisible by {self.size_multiple} "
                f"(2 ** (levels - 1) for {len(self.config.channel_mult)} levels); "
                f"use patch/image sizes that are multiples of {self.size_multiple}"
            )

    def _embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        noise_labels = noise_labels.reshape(-1)
        if noise_labels.numel() == 1:
            noise_labels = noise_labels.expand(batch)
        if noise_labels.numel() != batch:
            raise ValueError(f"noise_labels must have {batch} entries, got {noise_labels.numel()}")
        emb = _positional_embedding(noise_labels, self.config.model_channels)

        if self.map_label is not None:
            dim = self.config.label_dim
            if class_labels is None:
                # Missing labels act as the "dropped" (unconditional) input.
                class_labels = torch.zeros(batch, dim, device=emb.device)
            if class_labels.shape != (batch, dim):
                raise ValueError(f"class_labels must have shape [{batch}, {dim}], got {list(class_labels.shape)}")
            labels = class_labels.to(emb.dtype)
            p = self.config.label_dropout
            if self.training and p > 0:
                keep = torch.rand(batch, 1, device=labels.device) >= p
                labels = labels * keep.to(labels.dtype)
            # sqrt(dim) rescales one-hot vectors to unit variance per entry.
            emb = emb + self.map_label(labels * math.sqrt(dim))
        elif class_labels is not None:
            raise ValueError("class_labels given but the network is unconditional (label_dim=0)")

        emb = F.silu(self.map0(emb))
        return F.silu(self.map1(emb))

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict ``[B, out_channels, h, w]`` from ``x`` and the noise level ``c_noise``."""
        self._check_input(x)
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
