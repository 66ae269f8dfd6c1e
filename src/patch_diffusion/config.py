"""Typed run configuration, named presets, and their JSON form.

A run is fully described by one ``TrainConfig``; its resolved form (data size and
channels filled in) is saved as ``config.json`` in the run folder and inside every
checkpoint, so a checkpoint alone is enough to rebuild the model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import UserError
from .loss import LossConfig
from .networks import DDPMppConfig, get_backbone
from .patches import PatchConfig
from .precond import EDMConfig, get_precond

CONFIG_VERSION = 3  # 1: before component registries (DDPM++ and EDM only); 2: first-N subsets


@dataclass(frozen=True)
class DataConfig:
    path: str = "fashion-mnist"  # folder, zip, or a built-in name (fashion-mnist, mnist, ...)
    resolution: tuple[int, int] | None = None  # (H, W); None = the data's own size
    fit: Literal["none", "resize", "center-crop", "pad"] = "none"
    channels: int | None = None  # None = the data's own (1 or 3)
    max_images: int | None = None  # use only N images (small-data runs)
    # Which N: a random subset drawn with this seed (recorded, so a run can be rebuilt),
    # or None for the first N in file-name order (configs before version 3).
    subset_seed: int | None = 0
    xflip: bool = False  # random horizontal flips of the crops (coordinates unchanged)
    cond: bool = False  # condition on class labels when the data has them
    num_workers: int | None = None  # None = automatic
    # In-memory data is copied to the GPU once when it takes under a quarter of its free
    # memory: batches are then indexed there, with no host work or copy per step.
    on_device: bool = True


@dataclass(frozen=True)
class VAEConfig:
    """The autoencoder of a latent-space run (from the latents' header): what decodes the
    model's samples to pixels, and how its latents were normalised for training."""

    path: str = ""  # local diffusers AutoencoderKL folder, or a Hugging Face hub id
    subfolder: str | None = None  # e.g. "vae" inside a whole pipeline's repository
    latent_mean: tuple[float, ...] = ()  # per channel, over the encoded data set
    latent_std: tuple[float, ...] = ()
    data_std: float = 0.5  # latents are scaled to this standard deviation (EDM2: sigma_data)
    image_resolution: tuple[int, int] = (0, 0)  # (H, W) of the decoded images
    image_channels: int = 3


@dataclass(frozen=True)
class ModelConfig:
    """The denoiser: a registered backbone inside a registered preconditioning.

    ``backbone`` / ``precond`` name registry entries (``networks.BACKBONES``,
    ``precond.PRECONDS``); ``backbone_config`` / ``precond_config`` are those entries'
    typed configs, rebuilt by name when a config is read back from JSON.
    """

    resolution: tuple[int, int] | None = None  # filled from the data when None
    channels: int | None = None  # image channels; filled from the data when None
    backbone: str = "ddpmpp"
    backbone_config: Any = field(default_factory=DDPMppConfig, metadata={"registry": "backbone"})
    precond: str = "edm"
    precond_config: Any = field(default_factory=EDMConfig, metadata={"registry": "precond"})
    label_dim: int = 0  # classes; 0 = unconditional (filled from the data with --cond)
    label_dropout: float = 0.0  # prob. of the null (all-zero) label in training, for guidance

    def __post_init__(self) -> None:
        for kind, name, value in (("backbone", self.backbone, self.backbone_config),
                                  ("precond", self.precond, self.precond_config)):
            expected = _registry(kind)(name).config
            if not isinstance(value, expected):
                raise UserError(f"--{kind} {name} takes a {expected.__name__}, got a "
                                f"{type(value).__name__}; switch components with with_backbone/with_precond")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise UserError(f"--label-dropout must lie in [0, 1], got {self.label_dropout}")


def _registry(kind: str) -> Any:
    return {"backbone": get_backbone, "precond": get_precond}[kind]


# Architecture options every built-in backbone shares; they carry over when the backbone changes.
SHARED_NETWORK_FIELDS = ("model_channels", "channel_mult", "num_blocks", "attn_resolutions", "dropout")


def with_backbone(model: ModelConfig, name: str | None) -> ModelConfig:
    """``model`` with another backbone, keeping the shared architecture options."""
    if name is None or name == model.backbone:
        return model
    config_cls = get_backbone(name).config
    names = {f.name for f in dataclasses.fields(config_cls)}
    shared = {k: getattr(model.backbone_config, k) for k in SHARED_NETWORK_FIELDS
              if k in names and hasattr(model.backbone_config, k)}
    return dataclasses.replace(model, backbone=name, backbone_config=config_cls(**shared))


def with_precond(model: ModelConfig, name: str | None) -> ModelConfig:
    """``model`` with another preconditioning at its default settings."""
    if name is None or name == model.precond:
        return model
    return dataclasses.replace(model, precond=name, precond_config=get_precond(name).config())


def apply_model_options(
    config: TrainConfig,
    *,
    backbone: str | None = None,
    backbone_from: str | None = None,
    precond: str | None = None,
    label_dropout: float | None = None,
    **network: Any,
) -> TrainConfig:
    """``config`` with the given component choices and shared network options
    (``SHARED_NETWORK_FIELDS``; None = keep). ``backbone_from`` starts a diffusers
    UNet2DModel from a local folder and implies the ``unet2d`` backbone."""
    if backbone_from:
        if backbone not in (None, "unet2d"):
            raise UserError(f"--backbone-from loads a diffusers UNet2DModel folder; drop --backbone "
                            f"{backbone} or use --backbone unet2d")
        backbone = "unet2d"
    model = with_precond(with_backbone(config.model, backbone), precond)
    if backbone_from:
        from .networks.unet2d import unet2d_config_from_folder

        sized = [k for k, v in network.items() if v is not None and k != "dropout"]
        if sized:
            raise UserError(f"a pretrained UNet keeps its own architecture; drop the size options "
                            f"({', '.join(sized)}) when using --backbone-from")
        model = replace(model, backbone_config=unet2d_config_from_folder(backbone_from))
    try:
        backbone_config = replace(model.backbone_config, **network)
    except ValueError as exc:  # the backbone config's own checks of the size options
        raise UserError(f"{exc} (--backbone {model.backbone}); change the network size options") from None
    return replace(config, model=replace(model, backbone_config=backbone_config,
                                         label_dropout=label_dropout))


@dataclass(frozen=True)
class SamplerConfig:
    """Sampler settings (Karras et al. 2022, Table 1 and Algorithm 2; ``samplers.SAMPLERS``)."""

    name: str = "heun"  # a samplers.SAMPLERS name: euler, heun, dpmpp-2m, euler-ancestral
    num_steps: int = 18
    sigma_min: float | None = None  # None = the preconditioning's default range
    sigma_max: float | None = None
    rho: float = 7.0
    S_churn: float = 0.0  # heun only: EDM's stochastic churn
    S_min: float = 0.0
    S_max: float | None = None  # None = no upper bound
    S_noise: float = 1.0  # heun's churn noise; euler-ancestral's noise scale
    eta: float = 1.0  # euler-ancestral: 0 = deterministic Euler, 1 = full ancestral noise
    guidance: float = 1.0  # classifier-free guidance weight; 1 = the plain conditional model


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "fmnist-32"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    batch_size: int = 64  # base batch; a step on R/d crops takes d times as many images
    # Images per device per forward pass (None: all of its share); the rest is gradient
    # accumulation: batch_size = batch_gpu x rounds x processes, as in EDM.
    batch_gpu: int | None = None
    duration_kimg: float = 1000.0  # training length in thousands of images seen
    max_minutes: float | None = None  # cap on time in training steps (grids, FID excluded)
    lr: float = 2e-4
    lr_warmup_kimg: float = 10.0
    patch_lr_scale: float = 1.0  # learning-rate multiplier for steps on patches (d > 1)
    ema_halflife_kimg: float = 500.0
    ema_rampup: float | None = 0.05  # EDM: half-life at most this fraction of images seen
    grad_clip: float | None = None
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # bf16 = autocast for the network; auto = bf16 on CPUs with AMX, else fp32 (devices.py)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False  # torch.compile the network (one graph per patch size)
    channels_last: bool | None = None  # NHWC layout for the convolutions; None = on CPU only
    checkpoint_kimg: float = 50.0
    sample_kimg: float = 50.0
    log_kimg: float = 1.0
    keep_checkpoints: int = 3  # keep the newest N checkpoints (0 = keep all)
    grid_seeds: int = 64  # samples in each periodic grid
    fid_every_kimg: float | None = None  # periodic FID during training (needs fid_ref)
    fid_ref: str | None = None  # reference statistics (.npz from 'patch-diffusion fid ref')
    fid_num: int = 1000  # generated images per periodic FID
    vae: VAEConfig | None = None  # set when the data are latents ('patch-diffusion encode')
    version: int = CONFIG_VERSION  # of this config's layout (older layouts are migrated)


def _tiny() -> TrainConfig:
    # Seconds-long smoke runs: a very small net on few images.
    return TrainConfig(
        preset="tiny",
        data=DataConfig(path="fashion-mnist", resolution=(32, 32), fit="pad", max_images=512),
        model=ModelConfig(backbone_config=DDPMppConfig(
            model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=())),
        batch_size=8,
        duration_kimg=0.1,
        lr=1e-3,
        lr_warmup_kimg=0.0,
        ema_halflife_kimg=0.05,
        checkpoint_kimg=0.05,
        sample_kimg=0.05,
        log_kimg=0.02,
        grid_seeds=16,
        sampler=SamplerConfig(num_steps=6),
    )


def _fmnist32() -> TrainConfig:
    # Fashion-MNIST padded to 32x32, sized for the 10-minute CPU demo: a 0.71M-parameter
    # net at batch 32, enough for clothing (net size, batch and lr picked by a measured
    # sweep, see BENCHMARKS.md). The demo stops by time; 1,000 kimg is long enough that it
    # never stops it first (2 AMX cores train about 370 kimg in 10 minutes).
    return TrainConfig(
        preset="fmnist-32",
        data=DataConfig(path="fashion-mnist", resolution=(32, 32), fit="pad"),
        model=ModelConfig(backbone_config=DDPMppConfig(
            model_channels=16, channel_mult=(1, 2, 4), num_blocks=1, attn_resolutions=())),
        batch_size=32,
        duration_kimg=1000.0,
        lr=1e-3,
        lr_warmup_kimg=5.0,
        ema_halflife_kimg=10.0,
        checkpoint_kimg=25.0,
        sample_kimg=50.0,
        log_kimg=2.0,
    )


def _emoji64() -> TrainConfig:
    # The 3,786 64x64 emoji (built-in 'emoji'), sized for CPU runs of tens of minutes:
    # four levels (64 to 8 px) at 16-64 channels, batch 16 (step times in BENCHMARKS.md).
    return TrainConfig(
        preset="emoji-64",
        data=DataConfig(path="emoji", xflip=True),
        model=ModelConfig(backbone_config=DDPMppConfig(
            model_channels=16, channel_mult=(1, 2, 2, 4), num_blocks=1, attn_resolutions=())),
        batch_size=16,
        duration_kimg=100.0,
        lr=1e-3,
        lr_warmup_kimg=2.0,
        ema_halflife_kimg=5.0,
        checkpoint_kimg=10.0,
        sample_kimg=10.0,
        log_kimg=1.0,
    )


def _celeba64() -> TrainConfig:
    # The paper's CelebA-64 recipe (DDPM++, channel mults 1,2,2,2, batch 256,
    # lr 2e-4, dropout 0.05, no augmentation, p = 0.5, 200M images).
    return TrainConfig(
        preset="celeba-64",
        data=DataConfig(path="celeba", resolution=(64, 64), fit="center-crop"),
        model=ModelConfig(backbone_config=DDPMppConfig(
            model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=4,
            attn_resolutions=(16,), dropout=0.05)),
        batch_size=256,
        duration_kimg=200_000.0,
        lr=2e-4,
        lr_warmup_kimg=10_000.0,
        ema_halflife_kimg=500.0,
        checkpoint_kimg=5_000.0,
        sample_kimg=5_000.0,
        log_kimg=100.0,
    )


PRESETS = {"tiny": _tiny, "fmnist-32": _fmnist32, "emoji-64": _emoji64, "celeba-64": _celeba64}


def get_preset(name: str) -> TrainConfig:
    """A fresh copy of a named preset, or a UserError listing the names."""
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


def _paper_recipe(config: TrainConfig) -> TrainConfig:
    # The paper's code exactly: stochastic sizes R/4, R/2, R at p = 0.5 with 2:3 shares,
    # distinct images across the batch multiplier, per-sample pixel-sum loss, one lr.
    return dataclasses.replace(
        config, patch=PatchConfig(schedule="stochastic", real_p=0.5),
        loss=dataclasses.replace(config.loss, reduction="sum", patch_P_mean_shift=0.0),
        patch_lr_scale=1.0)


# Named patch recipes: whole bundles of patch, loss and learning-rate settings.
RECIPES = {"paper": _paper_recipe}


def apply_recipe(config: TrainConfig, name: str) -> TrainConfig:
    """``config`` with the named recipe's patch, loss and lr-per-patch settings."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe '{name}'; choose one of: {', '.join(RECIPES)}")
    return RECIPES[name](config)


def output_resolution(config: TrainConfig) -> tuple[int, int]:
    """(H, W) of the images a run generates: the decoded size for latents."""
    return tuple(config.vae.image_resolution) if config.vae else tuple(config.model.resolution)


def with_data(config: TrainConfig, path: str | None) -> TrainConfig:
    """Point ``config`` at another data set. A preset's size and fit belong to its own
    data set, so they are dropped when the path changes; the recipe's flags stay."""
    if path is None or path == config.data.path:
        return config
    return dataclasses.replace(config, data=DataConfig(path=path, xflip=config.data.xflip,
                                                       cond=config.data.cond))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_json(config: Any) -> str:
    return json.dumps(to_dict(config), indent=2)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from its ``to_dict`` form.

    Unknown keys are an error, so a config from another program is not misread;
    missing keys take their defaults, so older run folders still load. A component's
    config (``metadata={"registry": kind}``) is rebuilt as the class its registry
    entry names, and a ``TrainConfig`` written before the registries is migrated first.
    """
    if cls is TrainConfig:
        data = migrate(data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise UserError(
            f"config has unknown fields {sorted(unknown)} for {cls.__name__}; "
            "was it written by another version of patch-diffusion?"
        )
    kwargs = {}
    for key, value in data.items():
        kind = fields[key].metadata.get("registry")
        if kind is not None and isinstance(value, dict):
            name = data.get(kind, fields[kind].default)
            kwargs[key] = from_dict(_registry(kind)(name).config, value)
        else:
            kwargs[key] = _convert(hints[key], value)
    return cls(**kwargs)


def read_config(data: Any, source: str) -> TrainConfig:
    """A run config read from a file: anything malformed (a damaged or hostile header)
    is a one-line UserError, never a traceback."""
    if not isinstance(data, dict):
        raise UserError(f"'{source}' holds no run config; pass a file written by patch-diffusion")
    try:
        return from_dict(TrainConfig, data)
    except UserError as exc:
        raise UserError(f"'{source}': {exc}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as exc:
        raise UserError(f"'{source}' holds a run config this version cannot read ({type(exc).__name__}); "
                        "pass a file written by patch-diffusion") from None


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """An older run config in today's form.

    Version 1 kept label_dim/label_dropout inside the network's options, sigma_data on
    the model and EDM's P_mean/P_std on the loss; its DDPM++ used scale-shift
    conditioning with exactly-zero final layers (``adaptive_scale=True, init_zero=0``).
    Versions 1 and 2 took the first N images for ``max_images``.
    """
    version = data.get("version", 1)
    if version >= CONFIG_VERSION:
        return data
    data = copy.deepcopy(data)
    if version < 3:
        data.setdefault("data", {})["subset_seed"] = None
    data["version"] = CONFIG_VERSION
    if "network" not in data.get("model", {}):
        return data
    model, loss = data["model"], data.get("loss", {})
    network = model.pop("network")
    model["label_dim"] = network.pop("label_dim", 0)
    model["label_dropout"] = network.pop("label_dropout", 0.0)
    model["backbone"] = "ddpmpp"
    model["backbone_config"] = {**network, "adaptive_scale": True, "init_zero": 0.0}
    edm = {"sigma_data": model.pop("sigma_data", loss.get("sigma_data", 0.5))}
    for key in ("P_mean", "P_std"):
        if key in loss:
            edm[key] = loss[key]
    for key in ("P_mean", "P_std", "sigma_data"):
        loss.pop(key, None)
    model["precond"] = "edm"
    model["precond_config"] = edm
    data["version"] = CONFIG_VERSION
    return data


def _convert(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(options[0], value) if len(options) == 1 else value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value)
    if origin is tuple:
        return tuple(value)
    return value


def replace(config: Any, **changes: Any) -> Any:
    """dataclasses.replace that ignores None values (unset command-line options)."""
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
