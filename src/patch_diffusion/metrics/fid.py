"""Inception feature statistics and the metrics built on them: FID, KID, precision/recall.

FID follows EDM's fid.py (float64 statistics, unbiased covariance; the matrix square
root's trace via symmetric eigendecompositions, equal to its sqrtm); KID
is StyleGAN's estimator (unbiased MMD^2 with the cubic polynomial kernel over random
subsets); precision/recall is Kynkäänniemi et al. 2019 (k-NN balls around each sample,
k = 3). Reference statistics are ``.npz`` files read without unpickling; EDM's own
reference files (only ``mu`` and ``sigma``) load too.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
from tqdm.auto import tqdm

from patch_diffusion.checkpoint import atomic_write_bytes
from patch_diffusion.data import ImageDataset
from patch_diffusion.errors import UserError
from patch_diffusion.metrics.inception import FEATURE_DIM, InceptionV3, preprocess

REFERENCE_FORMAT = "patch-diffusion-fid-reference"
REFERENCE_VERSION = 1
# Rows of centred features multiplied at once when accumulating the covariance.
_COV_CHUNK = 4096


@dataclass
class FeatureStats:
    """Mean and covariance of Inception features over ``num`` images.

    ``num`` is 0 when a reference file does not say (EDM's files); ``features`` holds
    the raw float32 features only when asked for (KID and precision/recall need them);
    ``meta`` is what ``save_reference`` stored.
    """

    mu: np.ndarray
    sigma: np.ndarray
    num: int
    features: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def compute_features(batches: Iterable[torch.Tensor], net: InceptionV3, device: torch.device | str, *,
                     total: int | None = None, progress: bool = True) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` batches -> float64 features ``[N, 2048]``, in order.

    ``net`` must already be on ``device``. cuDNN's TF32 convolutions are switched off
    meanwhile (and restored after): with them, GPU features drift by ~1e-3 from float32.
    """
    device = torch.device(device)
    chunks: list[np.ndarray] = []
    cudnn = torch.backends.cudnn
    tf32 = cudnn.allow_tf32
    try:
        if device.type == "cuda":
            cudnn.allow_tf32 = False
        with tqdm(total=total, unit="img", desc="Inception features", disable=not progress, leave=False) as bar:
            for images in batches:
                # float32 even inside a caller's autocast: FID must not depend on the machine.
                with torch.autocast(device.type, enabled=False):
                    feats = net(preprocess(images.to(device)))
                chunks.append(feats.to(torch.float64).cpu().numpy())
                bar.update(len(images))
    finally:
        cudnn.allow_tf32 = tf32
    return np.concatenate(chunks) if chunks else np.zeros((0, FEATURE_DIM))


def stats_from_features(features: np.ndarray, *, keep_features: bool = False) -> FeatureStats:
    """float64 mean and unbiased covariance (as EDM); keeps float32 features if asked."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {x.shape}")
    if len(x) < 2:
        raise UserError(f"FID statistics need at least 2 images, got {len(x)}; use more images")
    mu = x.mean(axis=0)
    # Chunks of centred rows: as accurate as np.cov without a second [N, D] copy.
    sigma = np.zeros((x.shape[1], x.shape[1]))
    for start in range(0, len(x), _COV_CHUNK):
        centred = x[start:start + _COV_CHUNK] - mu
        sigma += centred.T @ centred
    sigma /= len(x) - 1
    kept = x.astype(np.float32) if keep_features else None
    return FeatureStats(mu=mu, sigma=sigma, num=len(x), features=kept)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt_product(sigma1, sigma2))


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) through symmetric eigendecompositions.

    With R = sigma1^(1/2), sigma1 sigma2 is similar to R sigma2 R, which is symmetric
    positive semi-definite, so the trace is the sum of the square roots of its (real)
    eigenvalues. This equals the real part of scipy.linalg.sqrtm(sigma1 @ sigma2) (to
    ~1e-8 relative on full-rank statistics, tested) at a fraction of the cost at 2048-d,
    and needs no eps retry for the singular covariances of small image sets.
    """
    w, v = scipy.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root @ sigma2 @ root
    eigenvalues = scipy.linalg.eigvalsh((inner + inner.T) / 2)  # symmetrise rounding
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def kid(feat1: np.ndarray, feat2: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std over random subsets of the unbiased MMD^2
    with k(x, y) = (x.y / d + 1)^3, as StyleGAN's/EDM's metrics compute it."""
    x_all, y_all = np.asarray(feat1, np.float64), np.asarray(feat2, np.float64)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"KID needs [N, D] features of equal D, got {x_all.shape} and {y_all.shape}")
    d = x_all.shape[1]
    m = min(len(x_all), len(y_all), max_subset_size)
    if m < 2:
        raise UserError(f"KID needs at least 2 images per set, got {len(x_all)} and {len(y_all)}")
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        # Within-set sums leave out i == j (unbiased); the cross term keeps all pairs.
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[i] = within - 2 * kxy.mean()
    return float(values.mean()), float(values.std())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, *, device: torch.device | str = "cpu",
                     max_elements: int = 1 << 25) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each sample's manifold ball reaches its k-th nearest neighbour in its own set.
    Precision: share of fake samples inside some real ball; recall: share of real
    samples inside some fake ball. Distances are float32 on ``device``, computed in
    row blocks of at most ``max_elements`` entries.
    """
    real_t = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    fake_t = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    if real_t.ndim != 2 or fake_t.shape[1:] != real_t.shape[1:]:
        raise ValueError(f"precision/recall needs [N, D] features of equal D, got {real_t.shape} and {fake_t.shape}")
    if min(len(real_t), len(fake_t)) <= k:
        raise UserError(f"precision/recall with k={k} needs more than {k} images per set, "
                        f"got {len(real_t)} and {len(fake_t)}")
    return _coverage(real_t, fake_t, k, max_elements), _coverage(fake_t, real_t, k, max_elements)


def _coverage(manifold: torch.Tensor, probes: torch.Tensor, k: int, max_elements: int) -> float:
    """Share of ``probes`` within the k-NN ball of at least one ``manifold`` sample."""
    rows = max(1, max_elements // len(manifold))
    radii = torch.cat([
        # k + 1: each point's nearest neighbour in its own set is itself, at distance 0.
        torch.cdist(block, manifold).kthvalue(k + 1, dim=1).values
        for block in manifold.split(rows)
    ])
    inside = sum(int((torch.cdist(block, manifold) <= radii).any(dim=1).sum()) for block in probes.split(rows))
    return inside / len(probes)


def save_reference(path: str | os.PathLike, stats: FeatureStats, meta: dict[str, Any]) -> None:
    """Write ``stats`` (and float32 features when ``stats.features`` is set) and JSON
    ``meta`` to the ``.npz`` file ``path``, atomically."""
    arrays: dict[str, np.ndarray] = {
        "format": np.array(REFERENCE_FORMAT), "version": np.array(REFERENCE_VERSION),
        "mu": np.asarray(stats.mu, np.float64), "sigma": np.asarray(stats.sigma, np.float64),
        "num": np.array(stats.num, np.int64), "meta": np.array(json.dumps(meta)),
    }
    if stats.features is not None:
        arrays["features"] = np.asarray(stats.features, np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_reference(path: str | os.PathLike) -> FeatureStats:
    """Statistics saved by ``save_reference`` (or an EDM reference ``.npz``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"FID reference statistics '{path}' not found; check the path or compute them "
                        "from the real images first")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with data:
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
            num = int(data["num"]) if "num" in data.files else 0
            meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
            features = np.asarray(data["features"], np.float32) if "features" in data.files else None
        d = mu.shape[0] if mu.ndim == 1 else -1
        if d < 1 or sigma.shape != (d, d) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(f"mu {mu.shape} / sigma {sigma.shape} are not statistics of one feature space")
        if features is not None and (features.ndim != 2 or features.shape[1] != d):
            raise ValueError(f"features {features.shape} do not match mu {mu.shape}")
        if not isinstance(meta, dict):
            raise ValueError("meta is not a JSON object")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"'{path}' is not a readable FID reference file ({e}); delete it and compute "
                        "the statistics again") from None
    return FeatureStats(mu=mu, sigma=sigma, num=num, features=features, meta=meta)


def dataset_batches(dataset: ImageDataset, batch_size: int, num: int | None = None) -> Iterator[torch.Tensor]:
    """The first ``num`` (default: all) images of ``dataset``, as uint8 batches in order."""
    total = len(dataset) if num is None else num
    # Checked here, not inside the generator, so a bad ``num`` fails before any work.
    if total > len(dataset):
        raise UserError(f"{dataset.name} has only {len(dataset)} images, fewer than the {total} asked for; "
                        "ask for fewer or use all")

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, total, batch_size):
            images, _ = dataset.get_batch(torch.arange(start, min(start + batch_size, total)))
            yield images

    return batches()
