"""Adapter that runs any diffusers ``UNet2DModel`` as a Patch Diffusion backbone.

Patch Diffusion feeds every backbone ``[B, C + 2, h, w]``: the image's C channels
(already scaled by the preconditioning's c_in) followed by the x and y canvas
coordinates of each pixel. A ``UNet2DModel`` is built for C channels; the adapter
widens its ``conv_in`` by two input channels whose weights start at zero, so a
pretrained UNet initially computes exactly what it did before and learns to use
the coordinates during training.

How the noise label maps to ``UNet2DModel``'s ``timestep`` input
-----------------------------------------------------------------
The backbone receives the preconditioning's ``c_noise`` and calls the UNet with
``timestep = c_noise * timestep_scale``:

* EDM preconditioning: ``c_noise = ln(sigma) / 4`` is passed as is (times
  ``timestep_scale``), the way EDM feeds its own UNets. UNet2DModel's sinusoidal
  embedding has periods from 2*pi up to 2*pi*10000, so for a fresh net
  ``timestep_scale`` (e.g. 250 or 1000) can spread those small labels over more of
  the frequencies; 1.0 matches EDM.
* VP preconditioning: ``c_noise = (M - 1) t = 999 t`` is exactly DDPM's own
  timestep scale, and VP's ``c_skip = 1``, ``c_out = -sigma`` and
  ``c_in = 1 / sqrt(1 + sigma^2)`` make ``D = x - sigma * F(x_t, t)`` with
  ``x_t = x / sqrt(1 + sigma^2)``: the backbone's output is the epsilon prediction
  of ``x_t``. A pretrained DDPM ``UNet2DModel`` therefore plugs in exactly with VP
  preconditioning and ``timestep_scale = 1``. (VP's default continuous schedule,
  beta_min = 0.1 and beta_d = 19.9, is the limit of DDPM's linear 1e-4..0.02 betas:
  the sigma of DDPM step i maps to a c_noise within about 3 of i.)

Timesteps are passed as float tensors (fractional timesteps are fine for the
positional embedding). Time embeddings that need integer or sigma-valued
timesteps (``"learned"``, ``"fourier"``) and the NCSN++ "Skip" blocks (whose skip
path hard-codes 3 raw input channels, which the coordinates would break) are
refused. A config with ``center_input_sample`` also maps the coordinates to
``2 * pos - 1``; that is harmless, as their weights are learned from zero.

Class labels arrive as ``[B, label_dim]`` one-hot rows; the UNet gets an
``nn.Embedding`` with ``label_dim + 1`` rows, the last one being the
classifier-free-guidance null label used for all-zero rows (and ``None``).

diffusers is an optional dependency and is imported only when needed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from patch_diffusion.errors import UserError

_MISSING_DIFFUSERS = "--backbone unet2d needs the diffusers package: pip install 'patch-diffusion[diffusers]'"
_WEIGHTS = "diffusion_pytorch_model.safetensors"
_SHARDED_WEIGHTS = "diffusion_pytorch_model.safetensors.index.json"
_MAX_GROUPS = 32
# Config entries that do not change what the pretrained weights compute, or that
# the adapter sets itself, so they may differ when loading weights.
_IGNORED_WHEN_MATCHING = frozenset({"sample_size", "num_class_embeds", "dropout"})


def _diffusers_unet_class() -> Any:
    # Lazy import keeps diffusers optional for users of the other backbones.
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise UserError(_MISSING_DIFFUSERS) from None
    return UNet2DModel


@dataclass(frozen=True)
class UNet2DConfig:
    """Architecture of a diffusers ``UNet2DModel`` backbone.

    Without ``unet`` the net is derived from the shared fields; with ``unet`` (a
    ``UNet2DModel`` config as read from a pretrained folder's config.json) that
    config is used verbatim and the shared fields are ignored.
    """

    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_blocks: int = 2  # resnet layers per down block (up blocks get one more)
    attn_resolutions: tuple[int, ...] = (16,)  # canvas-relative: level l is resolution >> l
    dropout: float = 0.0
    timestep_scale: float = 1.0  # UNet timestep = c_noise * timestep_scale
    unet: dict[str, Any] | None = None  # verbatim UNet2DModel config
    pretrained: str | None = None  # folder the starting weights came from (informational)

    def __post_init__(self) -> None:
        # Config files give lists; keep the documented tuple types.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        if not isinstance(self.model_channels, int) or self.model_channels < 1:
            raise ValueError(f"model_channels must be a positive int, got {self.model_channels!r}")
        if not self.channel_mult or any(not isinstance(m, int) or m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        if not isinstance(self.num_blocks, int) or self.num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {self.num_blocks!r}")
        if any(not isinstance(r, int) or r < 1 for r in self.attn_resolutions):
            raise ValueError(f"attn_resolutions must be positive ints, got {self.attn_resolutions}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.timestep_scale) and self.timestep_scale > 0):
            raise ValueError(f"timestep_scale must be a finite number > 0, got {self.timestep_scale}")
        if self.unet is not None and not isinstance(self.unet, dict):
            raise ValueError(f"unet must be a dict (a UNet2DModel config) or None, got {type(self.unet).__name__}")
        if self.unet is not None and not self.unet.get("down_block_types", True):
            raise ValueError("unet config has no down_block_types")
        if self.pretrained is not None and not isinstance(self.pretrained, str):
            raise ValueError(f"pretrained must be a folder path string or None, got {self.pretrained!r}")


def _num_levels(config: UNet2DConfig) -> int:
    if config.unet is not None:
        # UNet2DModel's own default has four down blocks.
        return len(config.unet.get("down_block_types", (None,) * 4))
    return len(config.channel_mult)


def unet2d_size_multiple(config: UNet2DConfig) -> int:
    """What patch and canvas sides must divide by: 2 ** (number of down blocks - 1)."""
    return 2 ** (_num_levels(config) - 1)


def _norm_groups(widths: list[int]) -> int:
    # The largest group count <= 32 that divides every width, so tiny nets work.
    return next(g for g in range(_MAX_GROUPS, 0, -1) if all(w % g == 0 for w in widths))


def _derived_kwargs(config: UNet2DConfig, resolution_hw: tuple[int, int], channels: int) -> dict[str, Any]:
    widths = [config.model_channels * m for m in config.channel_mult]
    base = min(resolution_hw)
    attn = [(base >> level) in config.attn_resolutions for level in range(len(widths))]
    height, width = resolution_hw
    return {
        "sample_size": height if height == width else [height, width],
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": widths,
        "layers_per_block": config.num_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "dropout": config.dropout,
        "norm_num_groups": _norm_groups(widths),
        # Single-head attention (as in DDPM / DDPM++), valid for any width.
        "attention_head_dim": None,
    }


def _check_verbatim(unet: dict[str, Any], where: str) -> None:
    """Refuse UNet2DModel configs the adapter cannot run faithfully."""
    if unet.get("class_embed_type") is not None or unet.get("num_class_embeds") is not None:
        raise UserError(
            f"the UNet2DModel config in {where} has its own class embedding; only unconditional "
            "pretrained UNets are supported: use an unconditional one (class labels are added by --label-dim)"
        )
    time_type = unet.get("time_embedding_type", "positional")
    if time_type != "positional":
        raise UserError(
            f"the UNet2DModel config in {where} uses time_embedding_type={time_type!r}; only 'positional' "
            "works with continuous noise labels: use a UNet with positional time embeddings"
        )
    blocks = list(unet.get("down_block_types", [])) + list(unet.get("up_block_types", []))
    skip = [b for b in blocks if "Skip" in b]
    if skip:
        raise UserError(
            f"the UNet2DModel config in {where} uses {skip[0]}, whose skip path takes exactly the raw "
            "image channels and cannot see the coordinate channels: use a UNet without Skip blocks"
        )


def _check_folder(folder: str | Path) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"pretrained UNet folder {str(path)!r} does not exist: pass a local diffusers UNet2DModel folder")
    if not (path / "config.json").is_file():
        hint = (f"; it looks like a pipeline, pass {str(path / 'unet')!r}"
                if (path / "unet" / "config.json").is_file() else "")
        raise UserError(f"{str(path)!r} has no config.json: pass a diffusers UNet2DModel folder{hint}")
    if not ((path / _WEIGHTS).is_file() or (path / _SHARDED_WEIGHTS).is_file()):
        if any(path.glob("*.bin")):
            raise UserError(
                f"{str(path)!r} holds only .bin (pickle) weights, which are never loaded: "
                f"convert them to {_WEIGHTS} (e.g. save_pretrained(..., safe_serialization=True))"
            )
        raise UserError(f"{str(path)!r} has no {_WEIGHTS}: pass a folder with safetensors weights")
    return path


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {str(path / 'config.json')!r} ({err}): pass an intact diffusers folder") from None
    if not isinstance(data, dict):
        raise UserError(f"{str(path / 'config.json')!r} is not a JSON object: pass a diffusers UNet2DModel folder")
    name = data.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise UserError(f"{str(path)!r} holds a {name}, not a UNet2DModel: pass a UNet2DModel folder")
    # Keys starting with "_" are diffusers' bookkeeping (class name, version, source).
    return {k: v for k, v in data.items() if not k.startswith("_")}


def unet2d_config_from_folder(folder: str) -> UNet2DConfig:
    """A config that rebuilds the UNet2DModel saved in a local diffusers folder."""
    path = _check_folder(folder)
    unet = _read_config(path)
    _check_verbatim(unet, repr(str(path)))
    return UNet2DConfig(unet=unet, pretrained=str(folder))


class UNet2DBackbone(nn.Module):
    """A ``UNet2DModel`` (``self.unet``) taking ``[B, C + 2, h, w]`` and returning ``[B, C, h, w]``."""

    def __init__(self, unet: nn.Module, image_channels: int, label_dim: int = 0,
                 timestep_scale: float = 1.0) -> None:
        super().__init__()
        self.image_channels = image_channels
        self.label_dim = label_dim
        self.timestep_scale = timestep_scale
        self.size_multiple = 2 ** (len(unet.down_blocks) - 1)
        old = unet.conv_in
        if old.in_channels != image_channels:
            raise ValueError(f"the UNet's conv_in takes {old.in_channels} channels, expected {image_channels}")
        wide = nn.Conv2d(image_channels + 2, old.out_channels, old.kernel_size, old.stride, old.padding,
                         dtype=old.weight.dtype, device=old.weight.device)
        with torch.no_grad():
            wide.weight.zero_()  # zero coordinate weights: the UNet starts out unchanged
            wide.weight[:, :image_channels] = old.weight
            wide.bias.copy_(old.bias)
        unet.conv_in = wide
        self.unet = unet

    def num_parameters(self) -> int:
        """Total number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def _class_indices(self, class_labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        if not self.label_dim:
            if class_labels is not None and class_labels.numel():
                raise ValueError("class_labels given but the network is unconditional (label_dim=0)")
            return None
        if class_labels is None:
            return torch.full((batch,), self.label_dim, dtype=torch.long, device=device)
        if class_labels.shape != (batch, self.label_dim):
            raise ValueError(f"class_labels must have shape [{batch}, {self.label_dim}], "
                             f"got {list(class_labels.shape)}")
        # All-zero rows are the guidance null label, the embedding's last row.
        present = (class_labels != 0).any(dim=1)
        null = torch.full_like(present, self.label_dim, dtype=torch.long)
        return torch.where(present, class_labels.argmax(dim=1), null)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Run the UNet on image + coordinate channels with timestep ``noise_labels * timestep_scale``."""
        if x.ndim != 4 or x.shape[1] != self.image_channels + 2:
            raise ValueError(f"expected x of shape [B, {self.image_channels + 2}, h, w], got {list(x.shape)}")
        batch, (h, w) = x.shape[0], x.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(
                f"input size {h}x{w} is not divisible by {self.size_multiple} "
                f"(2 ** (down blocks - 1) for {len(self.unet.down_blocks)} down blocks); "
                f"use patch/image sizes that are multiples of {self.size_multiple}"
            )
        t = noise_labels.reshape(-1).to(torch.float32)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"noise_labels must have {batch} entries, got {t.numel()}")
        labels = self._class_indices(class_labels, batch, x.device)
        return self.unet(x, t * self.timestep_scale, class_labels=labels).sample

    def load_pretrained(self, folder: str | Path) -> None:
        """Copy the weights of a local diffusers UNet2DModel folder (safetensors only) into this net.

        conv_in's weight is widened with zero columns for the coordinate channels;
        a class embedding this net added stays as it is (zero at initialisation).
        """
        path = _check_folder(folder)
        _check_verbatim(_read_config(path), repr(str(path)))
        unet_class = _diffusers_unet_class()
        try:
            source = unet_class.from_pretrained(str(path), use_safetensors=True)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"cannot load the UNet2DModel in {str(path)!r} ({first}): "
                            "pass an intact diffusers folder with safetensors weights") from None
        ours_cfg, theirs_cfg = dict(self.unet.config), dict(source.config)
        differing = sorted(
            k for k in set(ours_cfg) | set(theirs_cfg)
            if not k.startswith("_") and k not in _IGNORED_WHEN_MATCHING and ours_cfg.get(k) != theirs_cfg.get(k)
        )
        if differing:
            k = differing[0]
            raise UserError(
                f"the UNet2DModel in {str(path)!r} does not match this network ({k}: {theirs_cfg.get(k)!r} there, "
                f"{ours_cfg.get(k)!r} here; {len(differing)} setting(s) differ): "
                "build the network from that folder's config (unet2d_config_from_folder)"
            )
        state = {k: v.clone() for k, v in self.unet.state_dict().items()}
        theirs = source.state_dict()
        extra = set(theirs) - set(state)
        missing = {k for k in set(state) - set(theirs) if not k.startswith("class_embedding.")}
        shapes = [k for k in set(theirs) & set(state) if k != "conv_in.weight" and theirs[k].shape != state[k].shape]
        if extra or missing or shapes:
            bad = sorted(extra | missing | set(shapes))
            raise UserError(f"the weights in {str(path)!r} do not fit this network (e.g. {bad[0]!r}): "
                            "build the network from that folder's config (unet2d_config_from_folder)")
        for k, v in theirs.items():
            if k == "conv_in.weight":
                state[k].zero_()
                state[k][:, :self.image_channels] = v
            else:
                state[k] = v
        self.unet.load_state_dict(state)


def build_unet2d(config: UNet2DConfig, resolution_hw: tuple[int, int], in_channels: int,
                 out_channels: int, label_dim: int) -> UNet2DBackbone:
    """Build the backbone for a canvas of ``resolution_hw``; ``in_channels`` is C + 2.

    Weights are fresh (diffusers' default initialisation); call
    :meth:`UNet2DBackbone.load_pretrained` to start from ``config.pretrained``.
    """
    channels = in_channels - 2
    if channels < 1 or out_channels != channels:
        raise ValueError(f"in_channels must be image channels + 2 and out_channels the image channels, "
                         f"got {in_channels} and {out_channels}")
    if label_dim < 0:
        raise ValueError(f"label_dim must be >= 0, got {label_dim}")
    if config.unet is not None:
        where = repr(config.pretrained) if config.pretrained else "the unet setting"
        _check_verbatim(config.unet, where)
        kwargs = {k: v for k, v in config.unet.items() if not k.startswith("_")}
        cin, cout = kwargs.get("in_channels", 3), kwargs.get("out_channels", 3)
        if cin != channels or cout != channels:
            raise UserError(
                f"the UNet2DModel config in {where} has in_channels={cin} and out_channels={cout}, but the "
                f"images have C={channels}: use a UNet made for C={channels} image channels"
            )
    else:
        kwargs = _derived_kwargs(config, resolution_hw, channels)
    if label_dim:
        # The extra last row is the classifier-free-guidance null label.
        kwargs["num_class_embeds"] = label_dim + 1
    unet_class = _diffusers_unet_class()
    try:
        unet = unet_class.from_config(kwargs)
    except (ValueError, TypeError, KeyError) as err:
        if config.unet is None:
            raise
        raise UserError(f"the unet config cannot build a UNet2DModel ({err}): "
                        "pass a config.json written by diffusers") from None
    if unet.class_embedding is not None:
        # Zero rows: every class starts as the unconditional net (a pretrained one stays exact).
        nn.init.zeros_(unet.class_embedding.weight)
    return UNet2DBackbone(unet, channels, label_dim, config.timestep_scale)
