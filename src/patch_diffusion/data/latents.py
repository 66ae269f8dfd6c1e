"""A data set of VAE latents, as ``patch-diffusion encode`` writes it.

    LATENTS/
      latents.json                 the header: format, VAE, shapes, normalisation, shards
      shard-00000.safetensors      "mean" and "std" [n, C, h, w] float16, "labels" [n] int64

Each image is stored as the mean and standard deviation of the VAE's diagonal Gaussian
(as EDM2 does), so training draws a fresh latent mean + std * eps every time it sees the
image. Flips cannot be applied to a latent (a flipped latent is not the latent of the
flipped image), so ``encode --xflip`` encodes each mirrored image too, as one more item;
training on latents never flips tensors.

Only safetensors and JSON are read: opening latents never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from patch_diffusion.data.datasets import ImageDataset, subset_indices
from patch_diffusion.errors import UserError

HEADER = "latents.json"
FORMAT = "patch-diffusion-latents"
VERSION = 1


def is_latent_folder(path: Path) -> bool:
    return path.is_dir() and (path / HEADER).is_file()


def read_header(folder: Path) -> dict[str, Any]:
    """The checked header of a latents folder."""
    where = folder / HEADER
    try:
        header = json.loads(where.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read '{where}' ({exc}); encode the data again with 'patch-diffusion encode'") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise UserError(f"'{where}' is not a latents header written by 'patch-diffusion encode'")
    if header.get("version", 0) > VERSION:
        raise UserError(f"'{where}' has latents format {header.get('version')}, newer than this "
                        f"version reads ({VERSION}); update patch-diffusion")
    needed = ("vae", "shape", "images", "latent_mean", "latent_std", "image_resolution", "shards")
    missing = [key for key in needed if key not in header]
    if missing:
        raise UserError(f"'{where}' lacks {', '.join(missing)}; encode the data again")
    return header


class LatentDataset(ImageDataset):
    """Latents as float16 ``[2C, h, w]`` items (mean, then std), with the VAE that
    decodes them (``vae``: a ``VAEConfig``). ``channels`` is C, the model's."""

    def __init__(self, *, name: str, stats: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 vae: Any) -> None:
        super().__init__(name=name, labels=labels, num_classes=num_classes,
                         resolution=(stats.shape[2], stats.shape[3]), channels=stats.shape[1] // 2,
                         images=stats)
        self.vae = vae

    def to(self, device: torch.device | str) -> LatentDataset:
        return LatentDataset(name=self.name, stats=self._images.to(device), labels=self._labels.to(device),
                             num_classes=self.num_classes, vae=self.vae)

    def __repr__(self) -> str:
        h, w = self.resolution
        return f"LatentDataset({self.name!r}, {len(self)} latents, {self.channels}x{h}x{w})"


def open_latents(folder: Path, *, resolution: tuple[int, int] | None = None, fit: str = "none",
                 max_images: int | None = None, subset_seed: int | None = None) -> LatentDataset:
    """Load a latents folder into memory (optionally a seeded subset of its items)."""
    from patch_diffusion.config import VAEConfig  # config imports data; keep the cycle lazy

    header = read_header(folder)
    shape = tuple(header["shape"])
    if resolution is not None and tuple(resolution) != shape[1:]:
        raise UserError(f"'{folder}' holds {shape[1]}x{shape[2]} latents; --resolution does not apply "
                        "to latents (encode the images at another --resolution instead)")
    if fit != "none":
        raise UserError(f"--fit does not apply to latents ('{folder}'); encode with --fit instead")
    means, stds, labels = [], [], []
    for shard in header["shards"]:
        path = folder / str(shard.get("file", ""))
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise UserError(f"cannot read latent shard '{path}' ({exc}); encode the data again") from None
        if set(tensors) != {"mean", "std", "labels"} or tuple(tensors["mean"].shape[1:]) != shape \
                or tensors["std"].shape != tensors["mean"].shape or len(tensors["labels"]) != len(tensors["mean"]):
            raise UserError(f"latent shard '{path}' does not match its header ({shape}); encode the data again")
        means.append(tensors["mean"])
        stds.append(tensors["std"])
        labels.append(tensors["labels"])
    if not means or sum(len(m) for m in means) != header["images"]:
        raise UserError(f"'{folder}' should hold {header['images']} latents but its shards hold "
                        f"{sum(len(m) for m in means)}; encode the data again")
    stats = torch.cat([torch.cat(means), torch.cat(stds)], dim=1)
    all_labels = torch.cat(labels).to(torch.int64)
    keep = subset_indices(len(stats), max_images, subset_seed)
    vae = VAEConfig(path=str(header["vae"]), subfolder=header.get("vae_subfolder"),
                    latent_mean=tuple(float(v) for v in header["latent_mean"]),
                    latent_std=tuple(float(v) for v in header["latent_std"]),
                    data_std=float(header.get("data_std", 0.5)),
                    image_resolution=tuple(int(v) for v in header["image_resolution"]),
                    image_channels=int(header.get("image_channels", 3)))
    return LatentDataset(name=f"latents:{folder.name}", stats=stats[torch.from_numpy(keep)],
                         labels=all_labels[torch.from_numpy(keep)],
                         num_classes=int(header.get("num_classes", 0)), vae=vae)
