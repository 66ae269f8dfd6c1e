"""Latent-space Patch Diffusion (the paper trains its 256x256 models this way): encode a
data set once with a diffusers ``AutoencoderKL``, train the denoiser on the latents with
the same patch machinery, decode its samples back to pixels for PNGs, grids and FID.

Normalisation: as in EDM2, each latent channel is shifted by its mean over the data set
and scaled to a standard deviation of ``data_std`` (0.5, the preconditioning's
sigma_data), from the VAE's raw latents; the VAE's own ``scaling_factor`` is not used.

The VAE is loaded from a local folder (``save_pretrained``) or a Hugging Face hub id,
with safetensors weights only: nothing is ever unpickled. The file format of the
encoded data set is in ``data/latents.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import VAEConfig
from .data import open_dataset
from .data.latents import FORMAT, HEADER, VERSION
from .devices import resolve_device
from .distributed import keep_rows
from .errors import UserError


def load_vae(path: str, device: torch.device, subfolder: str | None = None) -> torch.nn.Module:
    """A diffusers ``AutoencoderKL`` from a local folder or a hub id, in eval mode on ``device``."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError("latent space needs diffusers: pip install 'patch-diffusion[diffusers]'") from None
    local = Path(path).expanduser()
    if local.exists():
        folder = local / subfolder if subfolder else local
        if not (folder / "config.json").is_file():
            raise UserError(f"'{folder}' is not a diffusers AutoencoderKL folder (no config.json); pass "
                            "the folder that save_pretrained wrote, or a Hugging Face hub id")
        if not any(folder.glob("*.safetensors")):
            raise UserError(f"'{folder}' has no .safetensors weights, and pickled weights are never loaded; "
                            "convert them with save_pretrained(folder, safe_serialization=True)")
    try:
        vae = AutoencoderKL.from_pretrained(str(local) if local.exists() else path, subfolder=subfolder,
                                            use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the VAE '{path}' ({reason[:160]}); pass a local diffusers "
                        "AutoencoderKL folder, or a hub id when online") from None
    if type(vae).__name__ != "AutoencoderKL":
        raise UserError(f"'{path}' is a {type(vae).__name__}, not an AutoencoderKL")
    return vae.to(device).eval().requires_grad_(False)


def downsampling(vae: torch.nn.Module) -> int:
    """How many pixels of a side one latent covers."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_dataset(
    data: str,
    vae_path: str,
    out: str | os.PathLike,
    *,
    subfolder: str | None = None,
    resolution: tuple[int, int] | None = None,
    fit: str = "none",
    max_images: int | None = None,
    subset_seed: int | None = 0,
    xflip: bool = False,
    batch_size: int = 32,
    shard_size: int = 10_000,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Encode every image of ``data`` (and its mirror image with ``xflip``) into the
    latents folder ``out``; returns its header. The folder appears whole or not at all:
    it is written under a temporary name and renamed at the end."""
    out = Path(out)
    if out.exists():
        raise UserError(f"'{out}' exists; pass a new --out folder (or delete the old one)")
    dev = resolve_device(device)
    vae = load_vae(vae_path, dev, subfolder)
    dataset = open_dataset(data, resolution=resolution, fit=fit, channels=vae.config.in_channels,
                           max_images=max_images, subset_seed=subset_seed)
    height, width = dataset.resolution
    factor = downsampling(vae)
    if height % factor or width % factor:
        size = -(-max(height, width) // factor) * factor
        raise UserError(f"{height}x{width} images do not divide into the VAE's {factor}x{factor} pixel "
                        f"blocks; use --resolution {size} --fit pad (or resize)")
    channels = vae.config.latent_channels
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        sums = torch.zeros(3, channels, dtype=torch.float64)  # E[mean], E[mean^2], E[std^2] sums
        pending: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "labels": []}
        shards: list[dict[str, Any]] = []
        count = 0
        for start in tqdm(range(0, len(dataset), batch_size), desc="encoding", unit="batch",
                          disable=not progress):
            images, labels = dataset.get_batch(torch.arange(start, min(start + batch_size, len(dataset))))
            x = images.to(dev, torch.float32) / 127.5 - 1
            for view in (x, x.flip(3)) if xflip else (x,):
                posterior = vae.encode(view).latent_dist
                mean, std = posterior.mean.float(), posterior.std.float()
                sums += torch.stack([mean.sum((0, 2, 3)), (mean**2).sum((0, 2, 3)),
                                     (std**2).sum((0, 2, 3))]).double().cpu()
                pending["mean"].append(mean.half().cpu())
                pending["std"].append(std.half().cpu())
                pending["labels"].append(labels.cpu())
                count += len(mean)
            if sum(len(m) for m in pending["mean"]) >= shard_size:
                shards.append(_write_shard(tmp, len(shards), pending))
        if pending["mean"]:
            shards.append(_write_shard(tmp, len(shards), pending))
        latent_h, latent_w = height // factor, width // factor
        per_channel = count * latent_h * latent_w
        mean_c = sums[0] / per_channel
        std_c = (sums[1] / per_channel - mean_c**2 + sums[2] / per_channel).clamp_min(1e-12).sqrt()
        header = {
            "format": FORMAT, "version": VERSION,
            "vae": str(Path(vae_path).expanduser().resolve()) if Path(vae_path).expanduser().exists() else vae_path,
            "vae_subfolder": subfolder, "vae_class": type(vae).__name__,
            "shape": [channels, latent_h, latent_w], "images": count,
            "source": data, "source_images": len(dataset), "image_resolution": [height, width],
            "image_channels": vae.config.in_channels, "fit": fit, "xflip": xflip,
            "stored": "mean and std of the VAE's Gaussian per image, float16; training draws mean + std * eps",
            "latent_mean": mean_c.tolist(), "latent_std": std_c.tolist(), "data_std": 0.5,
            "num_classes": dataset.num_classes, "shards": shards,
        }
        (tmp / HEADER).write_text(json.dumps(header, indent=1) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return header


def _write_shard(folder: Path, index: int, pending: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
    tensors = {key: torch.cat(parts).contiguous() for key, parts in pending.items()}
    name = f"shard-{index:05d}.safetensors"
    save_file(tensors, str(folder / name))
    for parts in pending.values():
        parts.clear()
    return {"file": name, "count": len(tensors["mean"])}


def _channel_view(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).reshape(1, -1, 1, 1)


def draw_latents(stats: torch.Tensor, vae: VAEConfig, generator: torch.Generator | None,
                 rows: torch.Tensor | None = None, total: int | None = None) -> torch.Tensor:
    """Training latents from stored (mean, std) items ``stats`` [N, 2C, h, w]: one draw
    mean + std * eps each, normalised. With ``rows``, these items are those rows of a
    batch of ``total`` (several processes): eps is drawn for all and these rows kept."""
    mean, std = stats.float().chunk(2, dim=1)
    eps = torch.randn((total or len(mean), *mean.shape[1:]), device=mean.device, generator=generator)
    return normalise(mean + std * keep_rows(eps, rows), vae)


def normalise(z: torch.Tensor, vae: VAEConfig) -> torch.Tensor:
    """Raw VAE latents -> the model's space (per-channel mean 0, std ``data_std``)."""
    return (z - _channel_view(vae.latent_mean, z)) / _channel_view(vae.latent_std, z) * vae.data_std


def denormalise(x: torch.Tensor, vae: VAEConfig) -> torch.Tensor:
    """The model's space -> raw VAE latents."""
    return x / vae.data_std * _channel_view(vae.latent_std, x) + _channel_view(vae.latent_mean, x)


class LatentDecoder:
    """Model-space latents -> images in [-1, 1], through the run's VAE (loaded once)."""

    def __init__(self, vae: VAEConfig, device: torch.device) -> None:
        self.config = vae
        self.vae = load_vae(vae.path, device, vae.subfolder)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        z = denormalise(x.float(), self.config)
        return self.vae.decode(z).sample.float().clamp(-1, 1)


def image_decoder(vae: VAEConfig | None, device: torch.device) -> LatentDecoder | None:
    """The decoder a run needs for pixels: None for a pixel-space run."""
    return LatentDecoder(vae, device) if vae is not None else None
