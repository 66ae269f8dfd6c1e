"""One Patch Diffusion optimisation step and the objects it needs (Wang et al. 2023, Alg. 1,
with the preconditioning's loss):

  1. draw the step's patch divisor d from the schedule;
  2. take d loader batches (d x batch_size distinct images);
  3. crop each image at a uniform random offset to (H/d, W/d), build its coordinates;
  4. the denoising loss on the crops, Adam step, EMA update.

``Trainer`` holds the network, its EMA, the optimiser, the random generators and the
data stream; ``train.py`` adds logs, grids, FID and checkpoints around it, and the
throughput benchmark times the very same phases.

In a job of several processes (torchrun) each process holds a share of the step's
crops; ``distributed.py`` says how the step is split so that the result does not
depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from .config import TrainConfig
from .data import ImageDataset, InfiniteBatches
from .devices import autocast, memory_format, to_device
from .distributed import Distributed, keep_rows, per_process_batch, shard_rows
from .errors import UserError
from .generate import from_uint8
from .latents import draw_latents
from .loss import denoising_loss, draw_noise
from .model import build_denoiser, wrap_backbone
from .patches import PatchBatch, PatchSchedule, make_patches, steps_for_duration


@dataclass
class TrainState:
    """Counters that, with the weights and generators, define where training is."""

    step: int = 0
    data_batches: int = 0  # loader batches consumed (the data position)
    train_seconds: float = 0.0  # time spent in training steps (not grids, FID or checkpoints)
    images: int = 0  # crops trained on (d x batch per step): the progressive schedule's clock
    skipped_steps: int = 0  # steps whose loss was not finite (no update made)


class Trainer:
    """Network, EMA, optimiser, generators and data of one training run.

    ``backbone`` replaces the configured one with any module called as
    ``backbone(x, noise_labels, class_labels)``. ``dist`` is this process's place in a
    job of several (one process by default).
    """

    def __init__(self, config: TrainConfig, device: torch.device,
                 backbone: torch.nn.Module | None = None, dist: Distributed | None = None) -> None:
        self.config = config
        self.device = device
        self.dist = dist = dist or Distributed()
        # Images per process per loader batch, and forward/backward rounds per step.
        self.local_batch, self.rounds = per_process_batch(config.batch_size, dist.world_size,
                                                          config.batch_gpu)
        self.schedule = PatchSchedule(config.patch, config.model.resolution)
        self.total_steps = steps_for_duration(config.duration_kimg, config.batch_size,
                                              self.schedule.expected_multiplier)
        self.img_per_step = config.batch_size * self.schedule.expected_multiplier
        torch.manual_seed(config.seed)  # initial weights and dropout
        net = build_denoiser(config.model) if backbone is None else wrap_backbone(backbone, config.model)
        self.memory_format = memory_format(config.channels_last, device)
        self.net = net.to(device, memory_format=self.memory_format).train()
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.ddp: DistributedDataParallel | None = None
        if dist.enabled:
            # Every process built the same weights and buffers from the same seed, so
            # buffers need no broadcast each step.
            self.ddp = DistributedDataParallel(
                self.net, device_ids=[device.index] if device.type == "cuda" else None,
                **no_buffer_sync())
        self.step_net = compiled(self.ddp or self.net, config, device)
        if dist.rank:  # each process its own dropout masks; rank 0 keeps the one-process stream
            torch.manual_seed(dist.rank_seed(config.seed, 0))
        self.optimizer = make_optimizer(self.net, config, device)
        self.patch_gen = torch.Generator().manual_seed(config.seed + 1)  # sizes, offsets, flips
        self.noise_gen = torch.Generator(device=device).manual_seed(config.seed + 2)  # sigma, noise, labels
        self.state = TrainState()
        self.autocast = autocast(config.precision, device)
        self.loader: Iterator | None = None
        self.data_size: int | None = None

    def start_data(self, dataset: ImageDataset, num_workers: int) -> None:
        """Open the data stream at the current data position."""
        self.data_size = len(dataset)
        self.loader = iter(InfiniteBatches(dataset, self.config.batch_size, seed=self.config.seed,
                                           start_batch=self.state.data_batches, num_workers=num_workers,
                                           pin_memory=self.device.type == "cuda",
                                           shard=(self.dist.rank, self.dist.world_size)))

    def progress(self, time_limit: float | None = None) -> float:
        """The fraction of training done, in images (the progressive schedule splits its
        phases by images seen, as the paper's code does); a time budget that ends
        training first paces it instead."""
        fraction = self.state.images / max(self.config.duration_kimg * 1000, 1e-9)
        if time_limit:
            fraction = max(fraction, self.state.train_seconds / time_limit)
        return fraction

    def draw_divisor(self, time_limit: float | None = None) -> int:
        return self.schedule.draw(self.progress(time_limit), self.patch_gen)

    def load(self, divisor: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's images in [-1, 1] on the device, and their labels (data phase);
        in a job of several processes, this process's share of them."""
        try:
            images, labels = next_images(self.loader, divisor, self.state, self.config.patch.batch_images)
        except UserError as exc:  # this process's files: it alone names the problem
            raise self.dist.local_user_error(exc) from None
        if self.config.vae is not None:  # stored (mean, std): a fresh latent draw each time
            total = images.shape[0] * self.dist.world_size
            return draw_latents(to_device(images, self.device), self.config.vae, self.noise_gen,
                                self.rows(divisor), total), labels
        # Host-side draws travel through pinned memory: no per-step wait for the GPU.
        return from_uint8(images, self.device), labels

    def patches(self, images: torch.Tensor, labels: torch.Tensor, divisor: int) -> PatchBatch:
        """Flips, labels (with label dropout), crops and coordinates (patch phase).
        Every draw is made for the job's whole batch; this process keeps its rows."""
        rows, total = self.rows(divisor), images.shape[0] * self.dist.world_size
        if self.config.data.xflip:  # flip the image, keep the coordinates (paper, Sec. 3)
            flip = to_device(keep_rows(torch.rand(total, generator=self.patch_gen) < 0.5, rows), self.device)
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        cond = None
        model = self.config.model
        if model.label_dim:
            cond = torch.nn.functional.one_hot(to_device(labels, self.device), model.label_dim).float()
            cond = drop_labels(cond, model.label_dropout, self.noise_gen, rows=rows, total=total)
        return laid_out(make_patches(images, cond, divisor, self.patch_gen, rows=rows, total=total),
                        self.memory_format)

    def rows(self, divisor: int) -> torch.Tensor | None:
        """Which crops of the job's batch this process holds (None: all, one process)."""
        if not self.dist.enabled:
            return None
        return shard_rows(self.config.batch_size, self.dist.world_size, self.dist.rank, divisor,
                          self.config.patch.batch_images)

    def optimise(self, batch: PatchBatch) -> torch.Tensor | None:
        """Loss, backward, Adam and EMA for one batch of crops; returns the loss (on device),
        or None when it was not finite: then nothing is updated and the step is not counted."""
        config, state = self.config, self.state
        lr = step_lr(config, state.step, self.img_per_step, batch.divisor)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        if self.dist.enabled or self.rounds > 1:
            loss = self._accumulate(batch)
        else:
            with self.autocast:
                loss = denoising_loss(self.step_net, batch.images, batch.pos, batch.labels, config.loss,
                                      self.noise_gen, divisor=batch.divisor, precond=self.net)
            loss.backward()
        # Checked once the backward pass is queued, so the wait for the GPU costs about one
        # kernel launch instead of the whole step's lead.
        if not torch.isfinite(loss):
            state.skipped_steps += 1
            return None
        for p in self.net.parameters():  # EDM: a rare non-finite gradient must not poison Adam
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), config.grad_clip)
        self.optimizer.step()
        state.step += 1
        state.images += batch.images.shape[0] * self.dist.world_size
        update_ema(self.ema, self.net, config, state.step * self.img_per_step, self.img_per_step)
        return loss.detach()

    def _accumulate(self, batch: PatchBatch) -> torch.Tensor:
        """Loss and gradients of this process's crops in ``rounds`` forward/backward
        passes, with noise drawn for the job's whole batch (so the result is the one
        process's, up to float sums); DDP averages the gradients over processes in the
        last round's backward. Returns the job's mean loss, the same in every process."""
        config, images = self.config, batch.images
        total = images.shape[0] * self.dist.world_size
        sigma, noise = draw_noise(self.net, (total, *images.shape[1:]), config.loss, self.noise_gen,
                                  batch.divisor, self.device)
        rows = self.rows(batch.divisor)
        sigma, noise = keep_rows(sigma, rows), keep_rows(noise, rows)
        chunk = images.shape[0] // self.rounds
        loss_sum = torch.zeros((), device=self.device)
        for i in range(self.rounds):
            part = slice(i * chunk, (i + 1) * chunk)
            labels = batch.labels[part] if batch.labels is not None else None
            last = i == self.rounds - 1
            # Gradients are exchanged once per step, after the last round.
            sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with sync:
                with self.autocast:
                    loss = denoising_loss(self.step_net, images[part], batch.pos[part], labels, config.loss,
                                          divisor=batch.divisor, precond=self.net,
                                          sigma=sigma[part], noise=noise[part])
                (loss / self.rounds).backward()
            loss_sum += loss.detach().float()
        return self.dist.mean(loss_sum / self.rounds)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def drop_labels(labels: torch.Tensor, p: float, generator: torch.Generator | None, *,
                rows: torch.Tensor | None = None, total: int | None = None) -> torch.Tensor:
    """Classifier-free guidance training: each row becomes the null (all-zero) label with
    probability ``p`` (the reference code has the option but never enables it). With
    ``rows``, ``labels`` are those rows of a batch of ``total``: all are drawn, these kept."""
    if p <= 0:
        return labels
    keep = torch.rand(total or labels.shape[0], 1, device=labels.device, generator=generator) >= p
    return labels * keep_rows(keep, rows).to(labels.dtype)


def next_images(loader: Iterator, divisor: int, state: TrainState,
                mode: str = "distinct") -> tuple[torch.Tensor, torch.Tensor]:
    """The step's d x batch images: d loader batches of distinct images (the paper), or
    with ``mode="repeat"`` one batch with each image repeated d times, to be cropped at
    d independent offsets."""
    if mode == "repeat":
        images, labels = next(loader)
        state.data_batches += 1
        return images.repeat_interleave(divisor, 0), labels.repeat_interleave(divisor, 0)
    parts = [next(loader) for _ in range(divisor)]
    state.data_batches += divisor
    if divisor == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def laid_out(batch: PatchBatch, layout: torch.memory_format) -> PatchBatch:
    """``batch`` with crops and coordinates in the memory layout the network runs in."""
    batch.images = batch.images.contiguous(memory_format=layout)
    batch.pos = batch.pos.contiguous(memory_format=layout)
    return batch


def no_buffer_sync() -> dict[str, bool]:
    """DDP's option to skip the per-step buffer broadcast (renamed in newer torch)."""
    import inspect
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def compiled(net: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The module the training step calls: ``net`` itself, or with ``config.compile`` a
    torch.compile'd view of it sharing its weights. dynamic=False gives one graph per
    patch size, each compiled once; on CUDA the graphs are replayed as CUDA graphs,
    which removes the per-kernel launch cost that dominates small networks."""
    if not config.compile:
        return net
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(net, dynamic=False, mode=mode)


def make_optimizer(net: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Adam:
    # One fused kernel for all parameters instead of several per tensor: on the 2-core
    # CPU, Adam's per-tensor loop took 7 ms of every step (BENCHMARKS.md, "CPU speed").
    return torch.optim.Adam(net.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                            fused=device.type in ("cuda", "cpu"))


def step_lr(config: TrainConfig, step: int, img_per_step: float, divisor: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up over ``lr_warmup_kimg``,
    times ``patch_lr_scale`` on patch steps (d > 1)."""
    warmup = min(1.0, (step + 1) * img_per_step / max(config.lr_warmup_kimg * 1000, 1e-8))
    return config.lr * warmup * (config.patch_lr_scale if divisor > 1 else 1.0)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, config: TrainConfig,
               images_seen: float, img_per_step: float) -> None:
    halflife = config.ema_halflife_kimg * 1000
    if config.ema_rampup is not None:
        halflife = min(halflife, images_seen * config.ema_rampup)
    beta = 0.5 ** (img_per_step / max(halflife, 1e-8))
    # One fused update for all tensors: a per-parameter loop costs a launch each on a GPU.
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in net.parameters()], 1 - beta)
