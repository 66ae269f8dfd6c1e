"""FID runs: reference statistics of a data set, and scores of images or of a model
(FID, KID, precision/recall, and memorisation of the training images).

The metric maths lives in ``metrics/``; this module wires it to data sets, image
folders and checkpoints. Reference statistics are computed once and cached in a file;
every evaluation reuses them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import SamplerConfig
from .data import ImageDataset, open_dataset
from .devices import resolve_device
from .errors import UserError
from .generate import sample
from .metrics import (FeatureStats, InceptionV3, NearestTwo, compute_features, dataset_batches,
                      frechet_distance, kid, load_inception, load_reference, memorization_from_distances,
                      precision_recall, save_reference, stats_from_features)
from .precond import Precond


def make_reference(
    data: str,
    out: str | os.PathLike,
    *,
    num: int | None = None,
    resolution: tuple[int, int] | None = None,
    fit: str = "none",
    keep_features: bool = True,
    batch_size: int = 64,
    device: str = "auto",
    inception: str | None = None,
    progress: bool = True,
) -> FeatureStats:
    """Compute and save the Inception statistics of (the first ``num`` images of) ``data``."""
    dataset = open_dataset(data, resolution=resolution, fit=fit)
    dev = resolve_device(device)
    total = len(dataset) if num is None else num
    features = image_features(dataset, num=total, batch_size=batch_size, device=dev,
                              net=load_inception(inception, dev), progress=progress)
    stats = stats_from_features(features, keep_features=keep_features)
    meta = {"data": data, "num": total, "resolution": list(dataset.resolution),
            "channels": dataset.channels, "fit": fit}
    save_reference(out, stats, meta)
    stats.meta = meta
    return stats


def image_features(
    dataset: ImageDataset,
    *,
    num: int | None = None,
    batch_size: int = 64,
    device: torch.device,
    net: InceptionV3,
    progress: bool = True,
) -> np.ndarray:
    """Features of (the first ``num``) images of an opened folder, zip or built-in data set."""
    total = len(dataset) if num is None else num
    return compute_features(dataset_batches(dataset, batch_size, total), net, device,
                            total=total, progress=progress)


def model_features(
    denoiser: Precond,
    resolution: tuple[int, int],
    seeds: list[int],
    sampler: SamplerConfig,
    *,
    batch_size: int = 64,
    device: torch.device,
    net: InceptionV3,
    progress: bool = True,
    precision: str = "fp32",
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Generate one image per seed with ``denoiser`` (in the run's ``precision``; through
    ``decode`` for latents) and return their Inception features."""
    batches = sample_batches(denoiser, resolution, seeds, sampler, batch_size=batch_size, device=device,
                             progress=progress, precision=precision, decode=decode)
    return compute_features(batches, net, device, total=len(seeds), progress=progress)


def sample_batches(
    denoiser: Precond,
    resolution: tuple[int, int],
    seeds: list[int],
    sampler: SamplerConfig,
    *,
    batch_size: int = 64,
    device: torch.device,
    progress: bool = True,
    precision: str = "fp32",
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """One generated image per seed, as uint8 ``[B, C, H, W]`` batches in seed order;
    ``resolution`` is the model's (the latents' for a latent run, decoded by ``decode``)."""
    for start in tqdm(range(0, len(seeds), batch_size), desc="generating", unit="batch",
                      disable=not progress, leave=False):
        yield sample(denoiser, seeds[start:start + batch_size], sampler, resolution, device,
                     precision=precision, decode=decode)


def features_and_images(
    batches: Iterable[torch.Tensor],
    *,
    total: int | None = None,
    device: torch.device,
    net: InceptionV3,
    progress: bool = True,
) -> tuple[np.ndarray, torch.Tensor]:
    """Inception features of uint8 ``batches`` and the images themselves (uint8, on the
    CPU), for metrics that need the pixels as well (memorisation)."""
    kept: list[torch.Tensor] = []

    def keeping() -> Iterator[torch.Tensor]:
        for images in batches:
            kept.append(images.cpu())
            yield images

    features = compute_features(keeping(), net, device, total=total, progress=progress)
    return features, torch.cat(kept) if kept else torch.zeros(0, dtype=torch.uint8)


def check_training_images(train: ImageDataset, shape: tuple[int, ...]) -> None:
    """Refuse to compare generated images of ``shape`` (C, H, W) with training images of
    another shape: pixel distances between them mean nothing."""
    expected = (train.channels, *train.resolution)
    if tuple(shape) != expected:
        raise UserError(f"the generated images are {'x'.join(map(str, shape))} (CxHxW) but the training images of "
                        f"{train.name} are {'x'.join(map(str, expected))}; bring them to the same size with "
                        "--resolution and --fit, as the model was trained")


def memorization_scores(
    images: torch.Tensor,
    features: np.ndarray,
    train: ImageDataset,
    *,
    batch_size: int = 64,
    device: torch.device,
    net: InceptionV3,
    progress: bool = True,
) -> dict[str, Any]:
    """Memorisation (see ``metrics.memorization``) of generated ``images`` (uint8
    ``[N, C, H, W]``) and their Inception ``features`` against every image of ``train``.

    Two spaces, each with its share ``memorized_*``, mean nearest distance
    ``nn_distance_*`` and mean ratio ``nn_ratio_*``: ``px``, l2 on pixels in [0, 1];
    ``inception``, l2 on the 2048-d pool features. The training images are streamed a
    batch at a time (pixels and features), so only the generated set stays in memory.
    """
    check_training_images(train, tuple(images.shape[1:]))
    # The search runs in float64, which MPS lacks: there it runs on the CPU.
    where = torch.device("cpu") if device.type == "mps" else device
    pixels = NearestTwo(images.flatten(1), device=where)  # uint8: cast per block, exact in float64
    inception = NearestTwo(torch.from_numpy(np.asarray(features, np.float64)), device=where)
    for batch in tqdm(dataset_batches(train, batch_size), total=-(-len(train) // batch_size),
                      desc="training images", unit="batch", disable=not progress, leave=False):
        pixels.update(batch.flatten(1))
        inception.update(torch.from_numpy(compute_features([batch], net, device, progress=False)))
    result: dict[str, Any] = {}
    for space, search, scale in (("px", pixels, 1 / 255), ("inception", inception, 1.0)):
        d1, d2, _ = search.result()
        found = memorization_from_distances(d1, d2, scale=scale)
        result.update({f"{key}_{space}": found[key] for key in ("memorized", "nn_distance", "nn_ratio")})
    result["memorization_num"] = len(train)
    return result


def check_compatible(ref: FeatureStats, resolution: tuple[int, int], ref_path: str | os.PathLike) -> None:
    """Refuse to compare images of another size than the reference's: the score would
    measure the resizing, not the model."""
    expected = ref.meta.get("resolution")
    if expected is not None and tuple(expected) != tuple(resolution):
        raise UserError(
            f"the images are {resolution[0]}x{resolution[1]} but '{ref_path}' was computed on "
            f"{expected[0]}x{expected[1]} images; compute the reference at the same size "
            f"(patch-diffusion fid ref --resolution {resolution[0]}x{resolution[1]} --fit ...)"
        )


def score(features: np.ndarray, ref: FeatureStats, *, with_kid: bool = False,
          with_pr: bool = False, device: torch.device | str = "cpu") -> dict[str, Any]:
    """FID (and optionally KID and precision/recall) of ``features`` against ``ref``."""
    stats = stats_from_features(features)
    result: dict[str, Any] = {"fid": frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma),
                              "num": len(features), "ref_num": ref.num}
    if (with_kid or with_pr) and ref.features is None:
        raise UserError("KID and precision/recall need the reference's raw features; recompute "
                        "the reference with 'patch-diffusion fid ref' (it keeps them by default)")
    if with_kid:
        mean, std = kid(ref.features, features)
        result.update(kid=mean, kid_std=std)
    if with_pr:
        precision, recall = precision_recall(ref.features, features, k=3, device=device)
        result.update(precision=precision, recall=recall)
    return result


class FIDTracker:
    """Periodic FID during training: the Inception net and the reference load once."""

    def __init__(self, ref_path: str | os.PathLike, num: int, device: torch.device,
                 resolution: tuple[int, int], inception: str | None = None) -> None:
        self.ref = load_reference(ref_path)
        check_compatible(self.ref, resolution, ref_path)
        self.num = num
        self.device = device
        self.resolution = resolution
        self.inception_path = inception
        self._net: InceptionV3 | None = None

    def __call__(self, denoiser: Precond, sampler: SamplerConfig, precision: str = "fp32",
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 model_resolution: tuple[int, int] | None = None) -> float:
        """FID of ``num`` samples; a latent run passes its ``decode`` and the latents'
        ``model_resolution`` (``resolution`` is always the images')."""
        if self._net is None:
            self._net = load_inception(self.inception_path, self.device)
        feats = model_features(denoiser, model_resolution or self.resolution, list(range(self.num)), sampler,
                               device=self.device, net=self._net, progress=False, precision=precision,
                               decode=decode)
        return score(feats, self.ref)["fid"]


def reference_cache_path(data: str, num: int, resolution: tuple[int, int], fit: str,
                         cache_dir: Path) -> Path:
    """Where ``cached_reference`` keeps the reference for these arguments."""
    name = f"{data.replace(':', '-').replace('/', '_')}-{num}-{resolution[0]}x{resolution[1]}-{fit}.npz"
    return cache_dir / "fid-refs" / name


def cached_reference(data: str, num: int, resolution: tuple[int, int], fit: str,
                     cache_dir: Path, device: str = "auto") -> Path:
    """A reference file for (data, num, size, fit) in ``cache_dir``, computed on first use."""
    path = reference_cache_path(data, num, resolution, fit, cache_dir)
    if not path.is_file():
        make_reference(data, path, num=num, resolution=resolution, fit=fit, device=device)
    return path
