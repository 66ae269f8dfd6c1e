"""Memorisation of training images: nearest-neighbour distance ratios.

A generated image counts as memorised when its distance to the nearest training image
is under a third of its distance to the second-nearest one, d1 / d2 < 1/3: it sits on
one training image rather than between several. The 1/3 threshold is Carlini et al.
2023, "Extracting Training Data from Diffusion Models" (USENIX Security), who flag a
generation as a copy when its l2 distance to the closest training image is small
relative to its distances to the other nearby training images; the nearest over
second-nearest form used here is how the small-data diffusion literature applies that
threshold (e.g. Yoon et al. 2023, "Diffusion probabilistic models generalize when they
fail to memorize"; Gu et al. 2023, "On memorization in diffusion models").

Distances are exact l2: each block of candidates is found with the float64 expansion
||a||^2 - 2 a.b + ||b||^2 (one matrix product), and the two best of each block are then
recomputed from their differences, so an exact copy measures exactly 0. For integer
inputs (uint8 pixels) the expansion itself is exact in float64. Keys can be streamed
(``NearestTwo.update`` per batch), so the training set never has to sit in memory.

Duplicates: when the two nearest training images are both at distance 0 (a generated
image equal to a training image that occurs twice), the ratio 0/0 is defined as 0, i.e.
memorised, which it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from patch_diffusion.errors import UserError

THRESHOLD = 1 / 3  # Carlini et al. 2023


def _matrix(x: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{what} must be [N, D] vectors, got shape {tuple(t.shape)}")
    return t


class NearestTwo:
    """Running nearest and second-nearest keys of fixed ``queries`` [N, D], fed keys in
    batches with ``update``; ``result`` gives what ``nearest_two`` returns.

    ``batch`` bounds the query and key rows of one distance block (a float64
    ``batch x batch`` matrix); ``device`` is where the blocks are computed. Ties go to
    the key seen first.
    """

    def __init__(self, queries: torch.Tensor | np.ndarray, *, batch: int = 512,
                 device: torch.device | str = "cpu") -> None:
        if batch < 1:
            raise ValueError(f"batch must be positive, got {batch}")
        self.device = torch.device(device)
        # Kept in their own dtype (uint8 pixels stay small); blocks are cast to float64.
        self.queries = _matrix(queries, "queries").to(self.device)
        self.batch = batch
        n = len(self.queries)
        self._norms = torch.cat([(q.double() ** 2).sum(1) for q in self.queries.split(batch)]) if n else \
            torch.zeros(0, dtype=torch.float64, device=self.device)
        # Squared distances until ``result``.
        self.d1 = torch.full((n,), torch.inf, dtype=torch.float64, device=self.device)
        self.d2 = torch.full((n,), torch.inf, dtype=torch.float64, device=self.device)
        self.index = torch.full((n,), -1, dtype=torch.int64, device=self.device)
        self.seen = 0  # keys so far; their indices count from 0 across updates

    @torch.no_grad()
    def update(self, keys: torch.Tensor | np.ndarray) -> NearestTwo:
        """Take the next keys [M, D] into account (their indices follow the earlier keys')."""
        keys = _matrix(keys, "keys")
        if keys.shape[1] != self.queries.shape[1]:
            raise ValueError(f"keys have {keys.shape[1]} dimensions, queries {self.queries.shape[1]}")
        for start in range(0, len(keys), self.batch):
            k = keys[start:start + self.batch].to(self.device, torch.float64)
            k_norms = (k ** 2).sum(1)
            offset = self.seen + start
            for q_start in range(0, len(self.queries), self.batch):
                rows = slice(q_start, q_start + self.batch)
                self._merge(rows, self.queries[rows].double(), k, k_norms, offset)
        self.seen += len(keys)
        return self

    def _merge(self, rows: slice, q: torch.Tensor, k: torch.Tensor, k_norms: torch.Tensor, offset: int) -> None:
        squared = self._norms[rows, None] - 2 * q @ k.T + k_norms[None]
        # The block's two best by the expansion (stable: ties keep the lower index) ...
        best = torch.sort(squared, dim=1, stable=True).indices[:, :2]
        # ... measured again from their differences: exact, and exactly 0 for copies.
        # One column at a time keeps the temporaries at [rows, D]. Squared until ``result``.
        exact = torch.stack([((q - k[best[:, j]]) ** 2).sum(1) for j in range(best.shape[1])], dim=1)
        dist = torch.cat([self.d1[rows, None], self.d2[rows, None], exact], dim=1)
        index = torch.cat([self.index[rows, None], torch.full_like(self.index[rows, None], -1),
                           best + offset], dim=1)
        order = torch.sort(dist, dim=1, stable=True).indices  # earlier keys first on ties
        self.d1[rows] = dist.gather(1, order[:, :1]).squeeze(1)
        self.d2[rows] = dist.gather(1, order[:, 1:2]).squeeze(1)
        self.index[rows] = index.gather(1, order[:, :1]).squeeze(1)

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(d1, d2, index) on the CPU: float64 distances to the nearest and second-nearest
        key and the nearest key's index, one per query."""
        if self.seen < 2:
            raise UserError(f"memorisation needs at least 2 training images to compare with, got {self.seen}; "
                            "use more training images")
        # NumPy's square root is correctly rounded; torch's on the CPU can be 1 ulp off.
        return (torch.from_numpy(np.sqrt(self.d1.cpu().numpy())), torch.from_numpy(np.sqrt(self.d2.cpu().numpy())),
                self.index.cpu())


def nearest_two(queries: torch.Tensor | np.ndarray, keys: torch.Tensor | np.ndarray, *, batch: int = 512,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact l2 distances from each query [N, D] to its nearest and second-nearest key
    [M, D] (M >= 2), and the nearest key's index: ``(d1 [N], d2 [N], index [N])``."""
    return NearestTwo(queries, batch=batch, device=device).update(keys).result()


def memorization_from_distances(d1: torch.Tensor, d2: torch.Tensor, *, threshold: float = THRESHOLD,
                                scale: float = 1.0, train_num: int | None = None) -> dict[str, Any]:
    """The summary of ``nearest_two``'s distances; see ``memorization``."""
    if len(d1) == 0:
        raise UserError("memorisation needs at least one generated image; generate or pass some")
    if not 0 < threshold <= 1:
        raise UserError(f"the memorisation threshold is a distance ratio in (0, 1], got {threshold}; use 1/3")
    d1, d2 = torch.as_tensor(d1, dtype=torch.float64), torch.as_tensor(d2, dtype=torch.float64)
    # d2 == 0 forces d1 == 0: a copy of a duplicated training image, 0/0 := 0 (memorised).
    ratio = torch.where(d2 > 0, d1 / d2.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(d1))
    return {"memorized": float((ratio < threshold).double().mean()),
            "nn_distance": float(d1.mean()) * scale,
            "nn_ratio": float(ratio.mean()),
            "num": len(d1),
            "train_num": train_num}


def memorization(gen: torch.Tensor | np.ndarray, train: torch.Tensor | np.ndarray, *,
                 threshold: float = THRESHOLD, scale: float = 1.0, batch: int = 512,
                 device: torch.device | str = "cpu") -> dict[str, Any]:
    """Memorisation of ``gen`` [N, D] against ``train`` [M, D] (M >= 2).

    ``memorized``: share of generated vectors with d1 / d2 < ``threshold``;
    ``nn_distance``: mean d1 times ``scale`` (e.g. 1/255 measures uint8 pixels in [0, 1]
    units, with no float copy of the training set); ``nn_ratio``: mean d1 / d2;
    ``num``, ``train_num``: N and M.
    """
    d1, d2, _ = nearest_two(gen, train, batch=batch, device=device)
    return memorization_from_distances(d1, d2, threshold=threshold, scale=scale, train_num=len(train))
