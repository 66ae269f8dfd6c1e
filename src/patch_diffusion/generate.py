"""Seeds -> images: load a checkpoint's EMA denoiser, sample at full resolution, save PNGs.

Image k depends on seed k alone (its own noise stream), not on the batch it was
drawn in, so the same seed always gives the same image, and a folder of PNGs from an
interrupted run can be completed by sampling only the missing seeds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .checkpoint import atomic_write_bytes, load_checkpoint, unprefixed
from .config import SamplerConfig, TrainConfig, output_resolution, read_config, replace, to_dict
from .devices import autocast, memory_format, resolve_device, to_device
from .errors import UserError
from .guidance import check_request, guided, seed_labels
from .latents import image_decoder
from .model import build_denoiser
from .precond import Precond
from .samplers import SeededNoise, count_calls, get_sampler, karras_sigmas


def load_denoiser(path: str | os.PathLike, device: torch.device,
                  weights: str = "ema") -> tuple[Precond, TrainConfig]:
    """The denoiser (EMA weights by default) and the run config stored in a checkpoint:
    the backbone and preconditioning it names, rebuilt from their recorded configs, in
    the memory layout the run's settings give on ``device``."""
    tensors, meta = load_checkpoint(path)
    config = read_config(meta.get("config"), str(path))
    if meta.get("backbone", config.model.backbone) != config.model.backbone:
        raise UserError(f"'{path}' holds a custom backbone ({meta['backbone']}); build that network "
                        "in Python and load the weights with patch_diffusion.load_weights")
    net = build_denoiser(config.model)
    _load_state(net, unprefixed(weights, tensors), path)
    layout = memory_format(config.channels_last, device)
    return net.to(device, memory_format=layout).eval().requires_grad_(False), config


def load_weights(denoiser: Precond, path: str | os.PathLike, weights: str = "ema") -> Precond:
    """Load a checkpoint's weights ('ema' or 'net') into a denoiser you built yourself."""
    tensors, _ = load_checkpoint(path)
    _load_state(denoiser, unprefixed(weights, tensors), path)
    return denoiser


def _load_state(net: Precond, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    try:
        net.load_state_dict(state)
    except RuntimeError:
        raise UserError(f"the weights in '{path}' do not fit this network; build it with the "
                        "options the run was trained with") from None


def sampler_sigmas(net: Precond, sampler: SamplerConfig) -> torch.Tensor:
    """Karras et al.'s schedule over the sampler's sigma range, by default the
    preconditioning's own (EDM 0.002-80, VP sigma(1e-3)-sigma(1), VE 0.02-100)."""
    lo, hi = net.sigma_range if hasattr(net, "sigma_range") else (0.002, 80.0)
    return karras_sigmas(sampler.num_steps, lo if sampler.sigma_min is None else sampler.sigma_min,
                         hi if sampler.sigma_max is None else sampler.sigma_max, sampler.rho)


_OPTION_FLAGS = {"S_churn": "--churn", "S_min": "--s-min", "S_max": "--s-max", "eta": "--eta"}


def check_sampler_changes(name: str, changes: dict) -> None:
    """Options given for another sampler than ``name``: say so instead of ignoring them."""
    takes = get_sampler(name).options
    stray = [flag for key, flag in _OPTION_FLAGS.items()
             if changes.get(key) is not None and key not in takes]
    if stray:
        raise UserError(f"{', '.join(stray)} do not apply to the {name} sampler; drop them or pick "
                        "a sampler that takes them (heun: --churn/--s-min/--s-max; euler-ancestral: --eta)")


def sampler_options(sampler: SamplerConfig) -> dict[str, float]:
    """The sampler config's options that the chosen sampler takes."""
    every = {"S_churn": sampler.S_churn, "S_min": sampler.S_min,
             "S_max": math.inf if sampler.S_max is None else sampler.S_max,
             "S_noise": sampler.S_noise, "eta": sampler.eta, "s_noise": sampler.S_noise}
    return {k: v for k, v in every.items() if k in get_sampler(sampler.name).options}


@torch.no_grad()
def sample(
    net: Precond,
    seeds: list[int],
    sampler: SamplerConfig,
    resolution: tuple[int, int],
    device: torch.device,
    class_labels: torch.Tensor | None = None,
    class_label: int | None = None,
    counter: list[int] | None = None,
    precision: str = "fp32",
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Generate one image per seed as uint8 [N, C, H, W] with the configured sampler.

    A conditional model gets ``class_labels`` [N, label_dim], else every seed gets
    ``class_label``, else a class drawn from its seed; ``sampler.guidance`` applies.
    ``counter`` (a one-element list) accumulates the network evaluations used.
    ``precision`` is the run's (auto, fp32, bf16): as in EDM, a network trained in
    reduced precision also samples in it; the sampler's own state stays float64.
    ``decode`` turns the samples into images in [-1, 1] (a latent run's VAE decoder).
    """
    noise = SeededNoise(seeds, device)
    latents = noise.randn((net.image_channels, *resolution))
    label_dim = getattr(net, "label_dim", 0)
    if label_dim and class_labels is None:
        class_labels = seed_labels(seeds, label_dim, class_label, device)
    denoise = count_calls(guided(net, class_labels, sampler.guidance))
    with autocast(precision, device):  # touches the network's matrix math only
        x = get_sampler(sampler.name)(denoise, latents, sampler_sigmas(net, sampler),
                                      randn_like=noise.randn_like, **sampler_options(sampler))
    if counter is not None:
        counter[0] += denoise.calls
    return to_uint8(decode(x) if decode is not None else x)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, rounding as EDM does."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8).cpu()


def from_uint8(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1] on ``device`` (the model's range), copied
    without making the host wait for the GPU."""
    return to_device(images, device).to(torch.float32) / 127.5 - 1


def encode_png(image: torch.Tensor) -> bytes:
    """uint8 [C, H, W] -> PNG bytes."""
    array = image.permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buf = BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def make_grid(images: torch.Tensor, columns: int | None = None, pad: int = 2) -> torch.Tensor:
    """Tile uint8 [N, C, H, W] into one uint8 [C, H', W'] image with a white gutter."""
    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = torch.full((c, rows * (h + pad) + pad, columns * (w + pad) + pad), 255, dtype=torch.uint8)
    for k in range(n):
        r, col = divmod(k, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = images[k]
    return grid


def save_grid(images: torch.Tensor, path: Path, scale: int = 1) -> Path:
    """Save a grid PNG, nearest-upscaled by ``scale`` so small images are visible."""
    grid = make_grid(images)
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    atomic_write_bytes(Path(path), encode_png(grid))
    return Path(path)


def parse_seeds(text: str) -> list[int]:
    """'0-63' or '1,5,9' or '0-3,10' -> a list of seeds (ranges inclusive)."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else part.rsplit("-", 1)
                seeds.extend(range(int(lo), int(hi) + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise UserError(f"cannot read seeds '{text}'; use a range like 0-63 or a list like 1,5,9")
    return seeds


# grid.png shows the first GRID_MAX images; only these stay in memory while generating.
GRID_MAX = 256
_PNG_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # what encode_png writes per channel count


def read_png(path: Path, shape: tuple[int, int, int]) -> torch.Tensor | None:
    """The uint8 [C, H, W] image in ``path`` when it is a complete PNG of ``shape``
    (as ``encode_png`` writes it); None when missing, corrupt, or of another size."""
    channels, height, width = shape
    try:
        with Image.open(path) as pil:
            pil.verify()  # chunk structure and checksums; a truncated file fails here or in load
        with Image.open(path) as pil:
            if pil.format != "PNG" or pil.size != (width, height) or pil.mode != _PNG_MODES.get(channels):
                return None
            array = np.array(pil)
    except (OSError, SyntaxError, ValueError, EOFError):  # FileNotFoundError is an OSError
        return None
    return torch.from_numpy(array.reshape(height, width, channels)).permute(2, 0, 1).contiguous()


def _check_settings(outdir: Path, settings: dict, overwrite: bool) -> None:
    """Record what the PNGs in ``outdir`` were made with (generate.json), and refuse to
    complete a folder made with other settings: skipping its PNGs would mix two runs."""
    record = outdir / "generate.json"
    if not overwrite and record.is_file() and any(outdir.glob("seed*.png")):
        try:
            before = json.loads(record.read_text())
        except ValueError:
            before = None
        if before != settings:
            what = ", ".join(k for k in settings if not isinstance(before, dict) or before.get(k) != settings[k])
            raise UserError(f"'{outdir}' holds images made with another {what or 'setup'}; choose another "
                            "--outdir, or pass --overwrite to replace them")
    atomic_write_bytes(record, (json.dumps(settings, indent=1) + "\n").encode())


class Generated(NamedTuple):
    """What ``generate_to_folder`` did."""

    paths: list[Path]  # one PNG per seed, in seed order (new or found complete)
    grid: Path | None  # grid.png, unless no grid was asked for
    sampled: int  # images generated now
    skipped: int  # seeds whose PNG already existed
    nfe: int  # network evaluations per image


def generate_to_folder(
    checkpoint: str | os.PathLike,
    outdir: str | os.PathLike,
    seeds: list[int],
    *,
    sampler_changes: dict | None = None,
    batch_size: int = 64,
    device: str = "auto",
    grid: bool = True,
    class_label: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Generated:
    """Write seed{NNNNNN}.png for each seed, and grid.png of the first ``GRID_MAX``.

    Seeds whose PNG already exists complete (it opens, with the model's size and
    channels) are skipped unless ``overwrite``: as image k depends on seed k alone,
    re-running an interrupted command samples only the missing seeds and ends with the
    same files as an uninterrupted run. The grid reads skipped images back from their
    PNGs. Images go to disk batch by batch; only the grid's images stay in memory.

    ``nfe`` is the network evaluations per image counted while sampling or, when every
    PNG already existed, the sampler's own count for its step number.
    ``sampler_changes`` overrides fields of the run's own sampler settings.
    """
    dev = resolve_device(device)
    net, config = load_denoiser(checkpoint, dev)
    decode = image_decoder(config.vae, dev)  # latents: through the run's VAE
    sampler = replace(config.sampler, **(sampler_changes or {}))  # unset (None) options keep the run's
    check_sampler_changes(sampler.name, sampler_changes or {})  # before any file is written
    check_request(net.label_dim, class_label, sampler.guidance)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    _check_settings(outdir, {"checkpoint": str(Path(checkpoint).resolve()), "sampler": to_dict(sampler),
                             "class_label": class_label}, overwrite)
    resolution = output_resolution(config)
    shape = (config.vae.image_channels if config.vae else net.image_channels, *resolution)
    paths = [outdir / f"seed{seed:06d}.png" for seed in seeds]
    shown = min(len(seeds), GRID_MAX) if grid else 0
    first: dict[int, torch.Tensor] = {}  # position in seeds -> image, for the grid
    todo: list[int] = []  # positions still to sample
    for k, path in enumerate(paths):
        image = None if overwrite else read_png(path, shape)
        if image is None:
            todo.append(k)
        elif k < shown:
            first[k] = image
    counter = [0]
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    for batch in tqdm(batches, desc="generating", unit="batch", disable=not progress):
        images = sample(net, [seeds[k] for k in batch], sampler, config.model.resolution, dev,
                        class_label=class_label, counter=counter, precision=config.precision,
                        decode=decode)
        for k, image in zip(batch, images):
            atomic_write_bytes(paths[k], encode_png(image))
            if k < shown:
                first[k] = image.clone()  # a view would keep the whole batch alive
    grid_path = None
    if shown:
        grid_path = save_grid(torch.stack([first[k] for k in range(shown)]), outdir / "grid.png",
                              scale=max(1, 64 // max(resolution)))
    # Every batch makes the same number of network calls, each over the whole batch.
    nfe = counter[0] // len(batches) if batches else get_sampler(sampler.name).nfe(sampler.num_steps)
    return Generated(paths, grid_path, len(todo), len(seeds) - len(todo), nfe)
