"""The training loop: Patch Diffusion steps with Adam, EMA, logs, grids and checkpoints.

One step (Wang et al. 2023, Alg. 1, with EDM's loss):
  1. draw the step's patch divisor d from the schedule;
  2. take d loader batches (d x batch_size distinct images);
  3. crop each image at a uniform random offset to (H/d, W/d), build its coordinates;
  4. EDM loss on the crops, Adam step, EMA update.
Progress is counted in images seen at the schedule's *expected* multiplier (as the
paper's code does), so a duration in kimg maps to a fixed number of steps.

Resume restores weights, EMA, Adam moments, the step, every random generator and the
data position, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import (checkpoint_name, load_checkpoint, optimizer_from_tensors,
                         optimizer_to_tensors, prefixed, prune_checkpoints, save_checkpoint,
                         unprefixed)
from .config import TrainConfig, from_dict, to_dict, to_json
from .data import ImageDataset, InfiniteBatches, default_num_workers, open_dataset
from .devices import resolve_device, to_device
from .errors import UserError
from .evaluate import FIDTracker
from .generate import from_uint8, sample, save_grid
from .loss import edm_loss
from .model import build_denoiser
from .networks.ddpmpp import DDPMpp
from .patches import PatchBatch, PatchSchedule, make_patches, steps_for_duration
from .precond import EDMPrecond
from .runs import RunLog, new_run_dir


@dataclass
class TrainState:
    """Counters that, with the weights and generators, define where training is."""

    step: int = 0
    data_batches: int = 0  # loader batches consumed (the data position)
    train_seconds: float = 0.0  # time spent in training steps (not grids, FID or checkpoints)


def resolve_config(config: TrainConfig, dataset: ImageDataset) -> TrainConfig:
    """Fill in what comes from the data and check the patch sizes fit the network."""
    label_dim = dataset.num_classes if config.data.cond else 0
    if config.data.cond and not dataset.num_classes:
        raise UserError(f"--cond needs class labels but '{config.data.path}' has none; "
                        "use class subfolders or a dataset.json, or drop --cond")
    network = replace(config.model.network, label_dim=label_dim)
    model = replace(config.model, resolution=tuple(dataset.resolution),
                    channels=dataset.channels, network=network)
    config = replace(config, model=model)
    schedule = PatchSchedule(config.patch, model.resolution)
    step = 2 ** (len(network.channel_mult) - 1)
    for divisor in schedule.divisors:
        h, w = schedule.patch_shape(divisor)
        if h % step or w % step:
            raise UserError(
                f"{h}x{w} patches do not fit a network with {len(network.channel_mult)} resolution "
                f"levels (sides must divide by {step}); use larger --patch-sizes or fewer levels"
            )
    if config.batch_size < 1:
        raise UserError("--batch must be at least 1")
    return config


def train(
    config: TrainConfig,
    outdir: str | Path,
    *,
    resume_from: Path | None = None,
    run_dir: Path | None = None,
    backbone: torch.nn.Module | None = None,
    stop_after_minutes: float | None = None,
    progress: bool = True,
) -> Path:
    """Train as ``config`` says; returns the run folder.

    ``resume_from`` restores a checkpoint's full state. ``run_dir`` continues an existing
    run folder (automatic resume); otherwise a new numbered folder is made in ``outdir``.
    ``backbone`` replaces the configured DDPM++ with any module called as
    ``backbone(x, noise_labels, class_labels)`` whose input has image channels + 2
    coordinate channels and whose output has the image channels.

    Time limits count training steps only: ``config.max_minutes`` ends the run (and,
    when it comes before ``duration_kimg``, paces the progressive schedule), while
    ``stop_after_minutes`` pauses it with a checkpoint, to be resumed later.
    """
    device = resolve_device(config.device)
    dataset = open_dataset(config.data.path, resolution=config.data.resolution,
                           fit=config.data.fit, channels=config.data.channels,
                           max_images=config.data.max_images)
    config = resolve_config(config, dataset)
    schedule = PatchSchedule(config.patch, config.model.resolution)
    total_steps = steps_for_duration(config.duration_kimg, config.batch_size,
                                     schedule.expected_multiplier)
    img_per_step = config.batch_size * schedule.expected_multiplier

    torch.manual_seed(config.seed)  # initial weights and dropout
    if backbone is None:
        net = build_denoiser(config.model)
    else:
        net = EDMPrecond(backbone, config.model.channels, sigma_data=config.model.sigma_data,
                         label_dim=config.model.network.label_dim)
    net = net.to(device, memory_format=_memory_format(config)).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    step_net = compiled(net, config, device)
    optimizer = make_optimizer(net, config, device)
    patch_gen = torch.Generator().manual_seed(config.seed + 1)  # sizes, offsets, flips
    noise_gen = torch.Generator(device=device).manual_seed(config.seed + 2)  # sigma, noise
    state = TrainState()

    if resume_from is not None:
        tensors, meta = load_checkpoint(resume_from)
        if meta.get("backbone") != _backbone_name(backbone):
            raise UserError(f"'{resume_from}' was trained with backbone {meta.get('backbone')}; "
                            "resume it with the same network")
        _restore(tensors, meta, net, ema, optimizer, patch_gen, noise_gen, state, device)

    fid = None
    if config.fid_every_kimg:
        if not config.fid_ref:
            raise UserError("--fid-every needs --fid-ref REF.npz (make one with 'patch-diffusion fid ref')")
        fid = FIDTracker(config.fid_ref, config.fid_num, device, config.model.resolution)

    run_dir = Path(run_dir) if run_dir else new_run_dir(Path(outdir), _run_desc(config))
    log = RunLog(run_dir, echo=progress)
    (run_dir / "config.json").write_text(to_json(config) + "\n")
    n_params = sum(p.numel() for p in net.parameters())
    log.info(f"{'resuming from ' + str(resume_from) if resume_from else 'new run'} in {run_dir}")
    log.info(f"data: {dataset.name}, {len(dataset)} images, {config.model.channels}x"
             f"{config.model.resolution[0]}x{config.model.resolution[1]}; device: {device}; "
             f"parameters: {n_params / 1e6:.2f}M")
    log.info(f"schedule: {config.patch.schedule}, patches "
             + ", ".join(f"{'x'.join(map(str, schedule.patch_shape(d)))} p={p:.2f}"
                         for d, p in zip(schedule.divisors, schedule.probs))
             + f", expected batch multiplier {schedule.expected_multiplier:.2f}; "
             f"{total_steps} steps for {config.duration_kimg:g} kimg")
    if state.step == 0:
        reals = dataset.get_batch(torch.arange(min(config.grid_seeds, len(dataset))))[0]
        save_grid(reals, run_dir / "reals.png", scale=_grid_scale(config))

    dataset = data_on_device(dataset, config, device)
    num_workers = config.data.num_workers
    if num_workers is None:  # in-memory data is one tensor index per batch: workers only add IPC
        num_workers = 0 if dataset.in_memory else default_num_workers()
    loader = iter(InfiniteBatches(dataset, config.batch_size, seed=config.seed,
                                  start_batch=state.data_batches, num_workers=num_workers,
                                  pin_memory=device.type == "cuda"))
    autocast = autocast_for(config, device)
    every = {name: max(1, round(kimg * 1000 / img_per_step)) for name, kimg in
             (("log", config.log_kimg), ("ckpt", config.checkpoint_kimg), ("grid", config.sample_kimg),
              ("fid", config.fid_every_kimg or 0.0))}

    limit = config.max_minutes * 60 if config.max_minutes is not None else None
    pause = stop_after_minutes * 60 if stop_after_minutes is not None else None
    window = {"loss": 0.0, "steps": 0, "images": 0, "busy": 0.0}
    if limit:  # a time budget: the bar counts training seconds, not a step total it may never reach
        bar = time_bar(limit, state.train_seconds, progress)
    else:
        bar = tqdm(total=total_steps, initial=state.step, desc="training", unit="step",
                   disable=not progress, dynamic_ncols=True)
    stopped_early = False
    while state.step < total_steps:
        step_start = time.monotonic()
        fraction = state.step / total_steps
        if limit:  # a time budget paces the schedule when it ends training first
            fraction = max(fraction, state.train_seconds / limit)
        divisor = schedule.draw(fraction, patch_gen)
        images, labels = _next_images(loader, divisor, state, config.patch.batch_images)
        # Host-side draws travel through pinned memory: no per-step wait for the GPU.
        images = from_uint8(images, device)
        if config.data.xflip:  # flip the image, keep the coordinates (paper, Sec. 3)
            flip = to_device(torch.rand(images.shape[0], generator=patch_gen) < 0.5, device)
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        cond = None
        if config.model.network.label_dim:
            cond = torch.nn.functional.one_hot(to_device(labels, device), config.model.network.label_dim).float()
        batch = laid_out(make_patches(images, cond, divisor, patch_gen), config)

        lr = step_lr(config, state.step, img_per_step, divisor)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = edm_loss(step_net, batch.images, batch.pos, batch.labels, config.loss, noise_gen,
                            divisor=divisor)
        loss.backward()
        for p in net.parameters():  # EDM: a rare non-finite gradient must not poison Adam
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        optimizer.step()
        state.step += 1
        _update_ema(ema, net, config, state.step * img_per_step, img_per_step)
        step_seconds = time.monotonic() - step_start
        state.train_seconds += step_seconds

        window["busy"] += step_seconds
        window["loss"] += loss.detach()
        window["steps"] += 1
        window["images"] += batch.images.shape[0]
        if limit:
            advance(bar, step_seconds)
        else:
            bar.update(1)
        over_time = any(t is not None and state.train_seconds >= t for t in (limit, pause))
        done = state.step == total_steps or over_time
        if state.step % every["log"] == 0 or done:
            _log_stats(log, bar, window, state, img_per_step, lr)
        if state.step % every["grid"] == 0 or done:
            grid = sample(ema, list(range(config.grid_seeds)), config.sampler,
                          config.model.resolution, device)
            path = save_grid(grid, run_dir / f"samples-{state.step:08d}.png", scale=_grid_scale(config))
            log.info(f"samples: {path}")
        if fid is not None and (state.step % every["fid"] == 0 or done):
            value = fid(ema, config.sampler)
            log.stats({"step": state.step, "kimg": round(state.step * img_per_step / 1000, 4),
                       "fid": round(value, 4), "fid_num": config.fid_num})
            log.info(f"FID ({config.fid_num} images) at {state.step * img_per_step / 1000:.1f} kimg: {value:.2f}")
        if state.step % every["ckpt"] == 0 or done:
            _save(run_dir, config, net, ema, optimizer, patch_gen, noise_gen, state, img_per_step)
        if over_time:
            log.info(f"stopping after {state.train_seconds / 60:.2f} minutes of training (step "
                     f"{state.step}); resume with --resume latest")
            stopped_early = True
            break
    bar.close()
    if not stopped_early:
        log.info(f"done: {state.step} steps, {state.step * img_per_step / 1000:.1f} kimg")
    return run_dir


def time_bar(seconds: float, done: float = 0.0, progress: bool = True, desc: str = "training") -> tqdm:
    """A progress bar over a training-time budget; update it with each step's seconds."""
    return tqdm(total=seconds, initial=done, desc=desc, disable=not progress, dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of training "
                "[{elapsed}<{remaining}{postfix}]")


def advance(bar: tqdm, seconds: float) -> None:
    """Add a step's seconds to a ``time_bar``, stopping at its total (the last step of a
    budget usually overruns it)."""
    bar.update(min(seconds, max(bar.total - bar.n, 0.0)))


def data_on_device(dataset: ImageDataset, config: TrainConfig, device: torch.device) -> ImageDataset:
    """The dataset to draw batches from: an in-memory set moves to the GPU when
    ``config.data.on_device`` allows and it takes under a quarter of the free memory.
    Loading from the host cost a compiled step on an H200 about half its time
    (BENCHMARKS.md); indexing on the GPU costs nothing measurable."""
    if not (config.data.on_device and device.type == "cuda" and dataset.in_memory):
        return dataset
    free, _ = torch.cuda.mem_get_info(device)
    return dataset.to(device) if dataset.nbytes * 4 <= free else dataset


def _memory_format(config: TrainConfig) -> torch.memory_format:
    return torch.channels_last if config.channels_last else torch.contiguous_format


def laid_out(batch: PatchBatch, config: TrainConfig) -> PatchBatch:
    """``batch`` with crops and coordinates in the memory layout the network runs in."""
    batch.images = batch.images.contiguous(memory_format=_memory_format(config))
    batch.pos = batch.pos.contiguous(memory_format=_memory_format(config))
    return batch


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
    # One fused kernel for all parameters on CUDA instead of several per tensor.
    return torch.optim.Adam(net.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                            fused=device.type == "cuda")


def autocast_for(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if config.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_lr(config: TrainConfig, step: int, img_per_step: float, divisor: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up over ``lr_warmup_kimg``,
    times ``patch_lr_scale`` on patch steps (d > 1)."""
    warmup = min(1.0, (step + 1) * img_per_step / max(config.lr_warmup_kimg * 1000, 1e-8))
    return config.lr * warmup * (config.patch_lr_scale if divisor > 1 else 1.0)


def _next_images(loader, divisor: int, state: TrainState,
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


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, net: torch.nn.Module, config: TrainConfig,
                images_seen: float, img_per_step: float) -> None:
    halflife = config.ema_halflife_kimg * 1000
    if config.ema_rampup is not None:
        halflife = min(halflife, images_seen * config.ema_rampup)
    beta = 0.5 ** (img_per_step / max(halflife, 1e-8))
    # One fused update for all tensors: a per-parameter loop costs a launch each on a GPU.
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in net.parameters()], 1 - beta)


def _log_stats(log: RunLog, bar, window: dict, state: TrainState, img_per_step: float,
               lr: float) -> None:
    elapsed = max(window["busy"], 1e-9)
    stats = {
        "step": state.step,
        "kimg": round(state.step * img_per_step / 1000, 4),
        "loss": round(float(window["loss"]) / max(window["steps"], 1), 6),
        "lr": lr,
        "img_per_s": round(window["images"] / elapsed, 2),
        "sec_per_step": round(elapsed / max(window["steps"], 1), 5),
    }
    log.stats(stats)
    bar.set_postfix(step=state.step, loss=f"{stats['loss']:.4f}", kimg=f"{stats['kimg']:.1f}")
    window.update(loss=0.0, steps=0, images=0, busy=0.0)


def _save(run_dir: Path, config: TrainConfig, net, ema, optimizer, patch_gen, noise_gen,
          state: TrainState, img_per_step: float) -> None:
    opt_tensors, opt_info = optimizer_to_tensors(optimizer)
    tensors = {**prefixed("ema", ema.state_dict()), **prefixed("net", net.state_dict()),
               **prefixed("optim", opt_tensors),
               "rng.patch": patch_gen.get_state(), "rng.noise": noise_gen.get_state(),
               "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and next(net.parameters()).is_cuda:
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"config": to_dict(config), "step": state.step, "data_batches": state.data_batches,
            "train_seconds": state.train_seconds,
            "kimg": state.step * img_per_step / 1000, "optimizer": opt_info}
    meta["backbone"] = _backbone_name(net.backbone)
    save_checkpoint(run_dir / checkpoint_name(state.step), tensors, meta)
    prune_checkpoints(run_dir, config.keep_checkpoints)


def _restore(tensors, meta, net, ema, optimizer, patch_gen, noise_gen, state: TrainState,
             device: torch.device) -> None:
    try:
        net.load_state_dict(unprefixed("net", tensors))
        ema.load_state_dict(unprefixed("ema", tensors))
    except RuntimeError:
        raise UserError("the checkpoint's network does not match this config; resume without "
                        "changing the model options") from None
    optimizer_from_tensors(optimizer, unprefixed("optim", tensors), meta["optimizer"])
    patch_gen.set_state(tensors["rng.patch"])
    noise_gen.set_state(tensors["rng.noise"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    state.step = int(meta["step"])
    state.data_batches = int(meta["data_batches"])
    state.train_seconds = float(meta.get("train_seconds", 0.0))


def _backbone_name(backbone: torch.nn.Module | None) -> str:
    """'ddpmpp' for the built-in network, else the custom module's import path."""
    if backbone is None or isinstance(backbone, DDPMpp):
        return "ddpmpp"
    return f"{type(backbone).__module__}.{type(backbone).__qualname__}"


def checkpoint_config(path: Path) -> TrainConfig:
    """The run config stored in a checkpoint."""
    return from_dict(TrainConfig, load_checkpoint(path, with_tensors=False)[1]["config"])


def _run_desc(config: TrainConfig) -> str:
    p = config.patch
    schedule = "full" if p.schedule == "full" or p.real_p == 1 else f"{p.schedule}-p{p.real_p:g}"
    return f"{config.preset}-{schedule}"


def _grid_scale(config: TrainConfig) -> int:
    return max(1, 64 // max(config.model.resolution))
