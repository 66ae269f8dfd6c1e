"""Building blocks shared by the UNet backbones (DDPM++ and ADM).

As in EDM, one residual ``UNetBlock`` serves both UNets; its keyword arguments
select each paper's variant (how the noise embedding enters, skip scaling,
GroupNorm eps, whether resampling blocks project their skip path, init).

Everything here is fully convolutional: nothing depends on the input size, so
the same weights run on patches and on the full canvas.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

Resample = Optional[Literal["up", "down"]]
LayerInit = Callable[[nn.Module], None]  # re-initialises a Conv2d / Linear in place


# ---------------------------------------------------------------- initialisation


def keep_default(layer: nn.Module) -> None:
    """PyTorch's own Conv2d/Linear init (kaiming-uniform, a=sqrt(5)).

    That equals EDM's ``kaiming_uniform`` with weight and bias gain sqrt(1/3),
    which is what ADM uses, so there is nothing to redo.
    """


def zero_init(layer: nn.Module) -> None:
    """Exactly zero weights and biases (ends a residual branch at identity)."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def xavier_init(gain: float = 1.0) -> LayerInit:
    """Xavier-uniform weights times ``gain`` and zero biases, as in DDPM++."""

    def init(layer: nn.Module) -> None:
        if gain == 0:
            # Exact zeros without drawing random numbers, so a gain of 0 leaves
            # the RNG stream (and every other layer's init) as zero_init would.
            nn.init.zeros_(layer.weight)
        else:
            nn.init.xavier_uniform_(layer.weight, gain=gain)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)

    return init


def conv2d(in_channels: int, out_channels: int, kernel: int, init: LayerInit = keep_default) -> nn.Conv2d:
    """A same-padded, stride-1 convolution with the given init."""
    layer = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
    init(layer)
    return layer


def linear(in_features: int, out_features: int, init: LayerInit = keep_default, bias: bool = True) -> nn.Linear:
    """A linear layer with the given init."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    init(layer)
    return layer


# ---------------------------------------------------------------- basic ops


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with EDM's min(32, C // 4) groups, stepped down until it divides C.

    Concatenated skip widths (e.g. 96 + 48) are not always multiples of 32.
    """
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return GroupNorm(groups, channels, eps=eps)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that normalises bf16 channels-last input in NCHW order.

    PyTorch's CPU kernel for bf16 channels-last group norm runs 2-3x slower than an
    NCHW copy plus the NCHW kernel (measured, BENCHMARKS.md); the convolution after it
    takes either layout. Other dtypes and layouts go straight through.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not x.is_contiguous():
            y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
            return y.contiguous(memory_format=torch.channels_last)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def resample(x: torch.Tensor, mode: Resample) -> torch.Tensor:
    """2x down (2x2 average pool) or up (nearest); None passes ``x`` through.

    These are exactly EDM's resampling with the [1, 1] FIR filter.
    """
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


def positional_embedding(
    t: torch.Tensor,
    channels: int,
    *,
    endpoint: bool,
    max_positions: int = 10000,
    sin_first: bool = False,
) -> torch.Tensor:
    """Sinusoidal embedding ``[B] -> [B, channels]``, ``[cos, sin]`` (or ``[sin, cos]``).

    Frequencies run geometrically from 1 down to 1/max_positions (reaching it
    when ``endpoint``: DDPM++ uses True, ADM False). Computed in fp32.
    """
    half = channels // 2
    exponents = torch.arange(half, dtype=torch.float32, device=t.device) / (half - (1 if endpoint else 0))
    freqs = (1.0 / max_positions) ** exponents
    angles = torch.outer(t.float(), freqs)
    parts = [angles.sin(), angles.cos()] if sin_first else [angles.cos(), angles.sin()]
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------- blocks


class Attention(nn.Module):
    """Multi-head spatial self-attention with a residual add.

    norm -> 1x1 qkv conv -> scaled-dot-product attention per head -> 1x1 proj,
    then ``(x + proj) * skip_scale``. The qkv output is laid out as
    [q | k | v], each split into heads of ``channels // num_heads``.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        *,
        eps: float = 1e-5,
        skip_scale: float = 1.0,
        init_attn: LayerInit = keep_default,
        init_zero: LayerInit = zero_init,
    ) -> None:
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"attention over {channels} channels cannot use {num_heads} heads")
        self.num_heads = num_heads
        self.skip_scale = skip_scale
        self.norm = group_norm(channels, eps)
        self.qkv = conv2d(channels, channels * 3, 1, init_attn)
        self.proj = conv2d(channels, channels, 1, init_zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        heads = self.num_heads
        # [B, 3C, H, W] -> three [B, heads, HW, C/heads] token tensors.
        qkv = self.qkv(self.norm(x)).reshape(b, 3, heads, c // heads, h * w).transpose(3, 4)
        q, k, v = qkv.unbind(1)
        a = attention(q, k, v)  # softmax(q k^T / sqrt(C/heads)) v
        a = a.transpose(2, 3).reshape(b, c, h, w)
        return _scaled(x + self.proj(a), self.skip_scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two dims.

    For bf16 on CPU, as two matrix products with the softmax in fp32: PyTorch's CPU
    flash kernel took 3.1 ms (forward + backward) for 64 tokens at batch 32 where the
    plain products took 1.0 ms (benchmarks/cpu_kernels.py); in fp32 the kernel is faster.
    """
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        weights = torch.softmax((q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5, dim=-1)
        return weights.to(v.dtype) @ v
    return F.scaled_dot_product_attention(q, k, v)


def _scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x if scale == 1 else x * scale


class UNetBlock(nn.Module):
    """Residual block conditioned on the embedding, with optional resampling and attention.

    ``adaptive_scale``: True (ADM's scale-shift norm) gives a per-channel scale
    and shift, ``silu(shift + norm1(h) * (scale + 1))``; False (DDPM++) gives one
    bias per channel added before the norm, ``silu(norm1(h + bias))``.
    ``resample`` ("up" / "down" / None) applies to both branches. The skip path
    gets a 1x1 conv when the width changes, or when resampling and
    ``resample_proj``; otherwise it is the (resampled) input itself.
    ``num_heads`` > 0 appends self-attention. ``init`` initialises ordinary
    layers, ``init_zero`` the ones ending a residual branch (conv1, attention
    proj), ``init_attn`` the qkv conv (``init`` when None).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        resample: Resample = None,
        num_heads: int = 0,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-5,
        adaptive_scale: bool = True,
        resample_proj: bool = False,
        init: LayerInit = keep_default,
        init_zero: LayerInit = zero_init,
        init_attn: LayerInit | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resample = resample
        self.adaptive_scale = adaptive_scale
        self.skip_scale = skip_scale
        # Creation order is kept fixed: it decides which random numbers each layer draws.
        self.norm0 = group_norm(in_channels, eps)
        self.conv0 = conv2d(in_channels, out_channels, 3, init)
        self.affine = linear(emb_channels, out_channels * (2 if adaptive_scale else 1), init)
        self.norm1 = group_norm(out_channels, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = conv2d(out_channels, out_channels, 3, init_zero)
        needs_proj = in_channels != out_channels or (resample is not None and resample_proj)
        self.skip = conv2d(in_channels, out_channels, 1, init) if needs_proj else None
        self.attn = (
            Attention(
                out_channels,
                num_heads,
                eps=eps,
                skip_scale=skip_scale,
                init_attn=init if init_attn is None else init_attn,
                init_zero=init_zero,
            )
            if num_heads
            else None
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = resample(x, self.resample)
        h = self.conv0(resample(F.silu(self.norm0(x)), self.resample))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(self.dropout(h))
        skip = self.skip(orig) if self.skip is not None else orig
        h = _scaled(h + skip, self.skip_scale)
        return self.attn(h) if self.attn is not None else h


# ---------------------------------------------------------------- input checks


def check_unet_options(config: Any, min_channels: int) -> None:
    """Validate the size options the UNets share (a frozen config's __post_init__)."""
    # Config files give lists; keep the documented (hashable) tuple types.
    object.__setattr__(config, "channel_mult", tuple(config.channel_mult))
    object.__setattr__(config, "attn_resolutions", tuple(config.attn_resolutions))
    if config.model_channels < min_channels or config.model_channels % 2:
        raise ValueError(f"model_channels must be an even number >= {min_channels}, got {config.model_channels}")
    if not config.channel_mult or any(m < 1 for m in config.channel_mult):
        raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {config.channel_mult}")
    if config.num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {config.num_blocks}")
    if any(r < 1 for r in config.attn_resolutions):
        raise ValueError(f"attn_resolutions must be positive, got {config.attn_resolutions}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")


def check_input(x: torch.Tensor, in_channels: int, size_multiple: int, levels: int) -> None:
    """Raise ValueError unless ``x`` is [B, in_channels, h, w] with h, w divisible by ``size_multiple``."""
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"expected x of shape [B, {in_channels}, h, w], got {list(x.shape)}")
    h, w = x.shape[-2:]
    if h % size_multiple or w % size_multiple:
        raise ValueError(
            f"input size {h}x{w} is not divisible by {size_multiple} "
            f"(2 ** (levels - 1) for {levels} levels); "
            f"use patch/image sizes that are multiples of {size_multiple}"
        )


def batch_noise_labels(noise_labels: torch.Tensor, batch: int) -> torch.Tensor:
    """``noise_labels`` as a [batch] vector; a single value is broadcast."""
    noise_labels = noise_labels.reshape(-1)
    if noise_labels.numel() == 1:
        noise_labels = noise_labels.expand(batch)
    if noise_labels.numel() != batch:
        raise ValueError(f"noise_labels must have {batch} entries, got {noise_labels.numel()}")
    return noise_labels


def batch_class_labels(
    class_labels: torch.Tensor | None, label_dim: int, batch: int, like: torch.Tensor
) -> torch.Tensor | None:
    """Validated [batch, label_dim] labels in ``like``'s dtype/device; None when unconditional.

    Missing labels on a conditional net become all zeros, the null
    (classifier-free guidance) label.
    """
    if not label_dim:
        if class_labels is not None:
            raise ValueError("class_labels given but the network is unconditional (label_dim=0)")
        return None
    if class_labels is None:
        return torch.zeros(batch, label_dim, dtype=like.dtype, device=like.device)
    if class_labels.shape != (batch, label_dim):
        raise ValueError(f"class_labels must have shape [{batch}, {label_dim}], got {list(class_labels.shape)}")
    return class_labels.to(dtype=like.dtype, device=like.device)


# ---------------------------------------------------------------- the UNet layout

BlockFactory = Callable[..., UNetBlock]  # (cin, cout, resample=None, attention=False)


class UNet(nn.Module):
    """The encoder/decoder layout EDM's DDPM++ and ADM share, on the canvas resolution.

    encoder: ``conv_in``, then per level an optional down block followed by
             ``num_blocks`` blocks; every output is kept as a skip.
    middle:  at the lowest level one block with attention, one without.
    decoder: per level (coarsest first) an optional up block followed by
             ``num_blocks + 1`` blocks, each consuming one skip; attention in the
             last block of an attention level only (DDPM++) or in all of them (ADM).
    output:  GroupNorm -> SiLU -> 3x3 ``conv_out``.
    Attention levels are fixed from the canvas (level l is ``resolution >> l`` wide),
    never from the input size, so crops and full images share one network.
    """

    def check_and_keep(self, resolution: int, in_channels: int, out_channels: int, config: Any,
                       label_dim: int) -> None:
        """Validate and record the sizes every UNet is built from."""
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
        self.size_multiple = 2 ** (len(config.channel_mult) - 1)

    def build_layout(self, *, resolution: int, in_channels: int, out_channels: int, config: Any,
                     first_width: int, block: BlockFactory, attend_all: bool, eps: float,
                     in_init: LayerInit, out_init: LayerInit) -> None:
        """Make conv_in, encoder, decoder, norm_out, conv_out (in this order, which fixes
        how the initialisation draws random numbers)."""
        mc, levels = config.model_channels, len(config.channel_mult)
        self.conv_in = conv2d(in_channels, first_width, 3, in_init)
        self.encoder = nn.ModuleList()
        skip_widths = [first_width]
        cout = first_width
        for level, mult in enumerate(config.channel_mult):
            attn = (resolution >> level) in config.attn_resolutions
            if level > 0:
                self.encoder.append(block(cout, cout, resample="down"))
                skip_widths.append(cout)
            for _ in range(config.num_blocks):
                self.encoder.append(block(cout, mc * mult, attention=attn))
                cout = mc * mult
                skip_widths.append(cout)
        self.decoder = nn.ModuleList()
        takes_skip: list[bool] = []  # blocks that concatenate the next encoder skip
        for level in reversed(range(levels)):
            attn = (resolution >> level) in config.attn_resolutions
            if level == levels - 1:
                self.decoder.extend([block(cout, cout, attention=True), block(cout, cout)])
                takes_skip += [False, False]
            else:
                self.decoder.append(block(cout, cout, resample="up"))
                takes_skip.append(False)
            for idx in range(config.num_blocks + 1):
                cin = cout + skip_widths.pop()
                cout = mc * config.channel_mult[level]
                last = idx == config.num_blocks
                self.decoder.append(block(cin, cout, attention=attn and (attend_all or last)))
                takes_skip.append(True)
        self._takes_skip = tuple(takes_skip)
        self.norm_out = group_norm(cout, eps)
        self.conv_out = conv2d(cout, out_channels, 3, out_init)

    def _embed(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
               batch: int) -> torch.Tensor:
        """The [B, emb_channels] embedding of noise level and label (each UNet its own)."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict ``[B, out_channels, h, w]`` from ``x`` and the noise level ``c_noise``."""
        check_input(x, self.in_channels, self.size_multiple, len(self.config.channel_mult))
        return self.run_layout(x, self._embed(noise_labels, class_labels, x.shape[0]))

    def run_layout(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
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

    def num_parameters(self) -> int:
        """Total number of parameters."""
        return sum(p.numel() for p in self.parameters())
