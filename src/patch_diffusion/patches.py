"""Patch Diffusion's own machinery (Wang et al. 2023, Sec. 3): which patch size a
training step uses, how many images it takes, where each crop sits, and the two
coordinate channels that tell the denoiser where the crop came from.

Everything here is independent of the network: it turns a batch of full images into
a batch of crops plus their coordinate channels, and the preconditioning feeds those
channels to whatever backbone it wraps.

Conventions (paper, Sec. 3.2):
- a patch is the canvas divided by an integer *divisor* d on both sides, so an
  H x W canvas gives (H/d) x (W/d) crops; d = 1 is the full image;
- the batch multiplier of a step equals d (x2 for R/2, x4 for R/4): derived from the
  size ratio, so any resolution and any aspect ratio work;
- coordinate channel 0 is x (the column), channel 1 is y (the row), normalised so
  the full canvas spans exactly [-1, 1]: value = index / (size - 1) * 2 - 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .devices import to_device
from .distributed import keep_rows
from .errors import UserError

ScheduleKind = Literal["stochastic", "progressive", "full"]


@dataclass(frozen=True)
class PatchConfig:
    """How patch sizes are chosen during training.

    ``patch_sizes`` are the crop heights in pixels below the full canvas (the width
    follows from the same divisor). Empty means the paper's pixel-space default:
    R/4 and R/2. ``probs`` optionally gives each small size's share of the (1 - p)
    non-full steps; by default two sizes split it 2:3 as in the paper, one size takes
    it all, and more sizes share it equally.
    """

    schedule: ScheduleKind = "stochastic"
    real_p: float = 0.5
    patch_sizes: tuple[int, ...] = ()
    probs: tuple[float, ...] = ()
    # Beyond the paper (None / "distinct" reproduce it exactly):
    real_p_end: float | None = None  # stochastic: p moves linearly from real_p to this over training
    patch_until: float | None = None  # stochastic: patch steps only in this first fraction of training
    batch_images: Literal["distinct", "repeat"] = "distinct"  # R/d steps: d*B images, or d crops of B

    @property
    def paced(self) -> bool:
        """Whether the patch sizes drawn depend on the fraction of training done, so that
        the run's planned length is part of the schedule."""
        if self.schedule == "progressive":
            return True
        moving = self.real_p_end is not None and self.real_p_end != self.real_p
        return self.schedule == "stochastic" and (moving or self.patch_until is not None)


class PatchSchedule:
    """A resolved schedule for one canvas: the divisors and their probabilities."""

    def __init__(self, config: PatchConfig, resolution: tuple[int, int]) -> None:
        for name, value in (("--real-p", config.real_p), ("--real-p-end", config.real_p_end)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise UserError(
                    f"{name} must lie in [0, 1], got {value}; "
                    "use e.g. 0.5 (the paper's default) or 1 for full images only"
                )
        if config.schedule not in ("stochastic", "progressive", "full"):
            raise UserError(
                f"unknown schedule '{config.schedule}'; use stochastic, progressive or full"
            )
        if config.real_p_end is not None and config.schedule != "stochastic":
            raise UserError("--real-p-end changes p over training for the stochastic schedule "
                            "only; drop it or use --schedule stochastic")
        if config.patch_until is not None and (config.schedule != "stochastic"
                                               or not 0.0 < config.patch_until <= 1.0):
            raise UserError(f"--patch-until takes a fraction of training in (0, 1] with the stochastic "
                            f"schedule, got {config.patch_until:g} with {config.schedule}; e.g. 0.5")
        if config.batch_images not in ("distinct", "repeat"):
            raise UserError(f"unknown batch-images mode '{config.batch_images}'; use distinct or repeat")
        self.config = config
        self.resolution = resolution
        height, width = resolution
        p_end = config.real_p if config.real_p_end is None else config.real_p_end
        self.real_p_range = (config.real_p, p_end)
        if config.schedule == "full" or (config.real_p == 1.0 and p_end == 1.0):
            self.divisors: tuple[int, ...] = (1,)
            self.probs: tuple[float, ...] = (1.0,)
            self._shares: tuple[float, ...] = ()
            self.real_p_range = (1.0, 1.0)
            return
        sizes = config.patch_sizes or default_patch_sizes(height)
        divisors = []
        for size in sorted(set(sizes)):
            if size <= 0 or size >= height or height % size or width % (height // size):
                raise UserError(
                    f"patch size {size} does not divide the {height}x{width} canvas into "
                    f"equal crops; pick sizes below {height} that divide it, e.g. "
                    f"{','.join(str(s) for s in default_patch_sizes(height)) or height // 2}"
                )
            divisors.append(height // size)
        divisors.sort(reverse=True)  # smallest patch (largest divisor) first
        self._shares = _small_patch_shares(len(divisors), config.probs)
        self.divisors = tuple(divisors) + (1,)
        self.probs = self.probs_at(0.0)

    def probs_at(self, progress: float) -> tuple[float, ...]:
        """Each divisor's probability at ``progress`` (0..1) of training; constant unless
        ``real_p_end`` makes p move linearly over training."""
        if not self._shares:
            return (1.0,)
        until = self.config.patch_until
        if until is not None and progress >= until:  # full images only from here on
            return tuple(0.0 for _ in self._shares) + (1.0,)
        start, end = self.real_p_range
        p = start + (end - start) * min(max(progress, 0.0), 1.0)
        return tuple((1.0 - p) * s for s in self._shares) + (p,)

    def patch_shape(self, divisor: int) -> tuple[int, int]:
        return self.resolution[0] // divisor, self.resolution[1] // divisor

    @property
    def expected_multiplier(self) -> float:
        """Images per step relative to the base batch, on average over the run (1.9 at
        the paper's stochastic defaults).

        Used to count images seen and to set the EMA, as in the paper's code. Stochastic:
        E[d] (when p moves over training, its average: E[d] is linear in p). Progressive:
        each size gets its probability's share of the *images*, so a size with share q
        takes q/d of the steps per base batch and the multiplier is 1 / sum(q/d).
        """
        if self.config.schedule == "progressive":
            return 1.0 / sum(p / d for d, p in zip(self.divisors, self.probs))
        until = self.config.patch_until if self._shares and self.config.patch_until else 1.0
        patched = sum(d * p for d, p in zip(self.divisors, self.probs_at(until / 2)))
        return until * patched + (1.0 - until)  # full images (d = 1) after patch_until

    def draw(self, progress: float, generator: torch.Generator) -> int:
        """The divisor for one optimisation step.

        ``progress`` is the fraction of training done (0..1), counted in images seen; the
        progressive schedule walks from the smallest patch to full images, giving each
        size its probability's share of the images (as the paper's code splits by kimg;
        splitting by steps would give full images about a quarter of the images at p = 0.5).
        """
        if self.config.schedule == "progressive":
            edge = 0.0
            for divisor, prob in zip(self.divisors, self.probs):
                edge += prob
                if progress < edge:
                    return divisor
            return 1
        u = torch.rand((), generator=generator).item()
        edge = 0.0
        for divisor, prob in zip(self.divisors, self.probs_at(progress)):
            edge += prob
            if u < edge:
                return divisor
        return self.divisors[-1]


def default_patch_sizes(height: int) -> tuple[int, ...]:
    return tuple(height // d for d in (4, 2) if height % d == 0 and height // d > 0)


def _small_patch_shares(count: int, probs: tuple[float, ...]) -> tuple[float, ...]:
    if probs:
        if len(probs) != count or any(p < 0 for p in probs) or sum(probs) <= 0:
            raise UserError(
                f"--patch-probs needs {count} non-negative numbers, one per patch size"
            )
        total = sum(probs)
        return tuple(p / total for p in probs)
    if count == 2:
        return (0.4, 0.6)  # paper: (1-p)*2/5 for R/4, (1-p)*3/5 for R/2
    return tuple(1.0 / count for _ in range(count))


def coordinate_grid(
    height: int,
    width: int,
    *,
    offsets: torch.Tensor | None = None,
    canvas: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Coordinate channels [B, 2, height, width] (x then y) in the canvas's frame.

    Without ``offsets`` this is the full-canvas grid (B = 1) spanning [-1, 1]. With
    ``offsets`` [B, 2] holding each crop's (row, col) top-left corner, each sample
    gets the slice of the canvas grid that its crop covers.
    """
    canvas_h, canvas_w = canvas or (height, width)
    if canvas_h < 2 or canvas_w < 2:
        raise ValueError("the canvas needs at least 2 pixels per side for coordinates")
    if offsets is None:
        offsets = torch.zeros(1, 2, dtype=torch.long, device=device)
    offsets = offsets.to(device=device)
    rows = offsets[:, 0, None] + torch.arange(height, device=offsets.device)  # [B, h]
    cols = offsets[:, 1, None] + torch.arange(width, device=offsets.device)  # [B, w]
    y = rows.to(dtype) / (canvas_h - 1) * 2 - 1
    x = cols.to(dtype) / (canvas_w - 1) * 2 - 1
    batch = offsets.shape[0]
    return torch.stack(
        [x[:, None, :].expand(batch, height, width), y[:, :, None].expand(batch, height, width)],
        dim=1,
    )


def random_offsets(
    batch: int,
    patch: tuple[int, int],
    canvas: tuple[int, int],
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform top-left corners [B, 2] (row, col) so every crop lies inside the canvas."""
    rows = torch.randint(0, canvas[0] - patch[0] + 1, (batch,), generator=generator)
    cols = torch.randint(0, canvas[1] - patch[1] + 1, (batch,), generator=generator)
    return to_device(torch.stack([rows, cols], dim=1), device)


def crop(images: torch.Tensor, offsets: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """Batched crops [B, C, ph, pw] at per-sample ``offsets``, with one gather (no Python loop)."""
    batch, channels, _, width = images.shape
    ph, pw = patch
    rows = offsets[:, 0, None] + torch.arange(ph, device=images.device)  # [B, ph]
    cols = offsets[:, 1, None] + torch.arange(pw, device=images.device)  # [B, pw]
    # Flat pixel index of every crop pixel, gathered for all channels at once.
    flat = (rows[:, :, None] * width + cols[:, None, :]).reshape(batch, 1, ph * pw)
    out = images.reshape(batch, channels, -1).gather(2, flat.expand(batch, channels, -1))
    return out.reshape(batch, channels, ph, pw)


@dataclass
class PatchBatch:
    """One training step's input: crops and where they came from."""

    images: torch.Tensor  # [B*d, C, H/d, W/d] in [-1, 1]
    pos: torch.Tensor  # [B*d, 2, H/d, W/d] coordinate channels
    labels: torch.Tensor | None
    divisor: int


def make_patches(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    divisor: int,
    generator: torch.Generator,
    *,
    rows: torch.Tensor | None = None,
    total: int | None = None,
) -> PatchBatch:
    """Random crops of ``images`` (already the step's B*d distinct images) plus coordinates.

    With ``rows``, ``images`` are those rows of a batch of ``total`` held elsewhere in
    part (another process): offsets are drawn for all ``total`` and these rows kept, so
    each image gets the crop it would get in one process."""
    canvas = (images.shape[2], images.shape[3])
    patch = (canvas[0] // divisor, canvas[1] // divisor)
    drawn = random_offsets(total or images.shape[0], patch, canvas, generator)
    offsets = to_device(keep_rows(drawn, rows), images.device)
    if divisor == 1:
        crops = images
    else:
        crops = crop(images, offsets, patch)
    pos = coordinate_grid(
        patch[0], patch[1], offsets=offsets, canvas=canvas, device=images.device, dtype=images.dtype
    )
    return PatchBatch(images=crops, pos=pos, labels=labels, divisor=divisor)


def steps_for_duration(kimg: float, batch_size: int, expected_multiplier: float) -> int:
    """Optimisation steps that make ``kimg`` thousand images at the expected multiplier."""
    return max(1, math.ceil(kimg * 1000 / (batch_size * expected_multiplier)))
