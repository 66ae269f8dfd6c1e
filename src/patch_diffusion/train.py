"""The training loop: Patch Diffusion steps (``step.py``) with logs, grids, FID and
checkpoints around them.

Progress is counted in images seen at the schedule's *expected* multiplier (as the
paper's code does), so a duration in kimg maps to a fixed number of steps.

Resume restores weights, EMA, Adam moments, the step, every random generator and the
data position, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import (checkpoint_name, load_checkpoint, optimizer_from_tensors,
                         optimizer_to_tensors, prefixed, prune_checkpoints, save_checkpoint,
                         unprefixed)
from .config import TrainConfig, from_dict, to_dict, to_json
from .data import ImageDataset, default_num_workers, open_dataset
from .devices import resolve_device
from .errors import UserError
from .evaluate import FIDTracker
from .generate import sample, save_grid
from .networks import get_backbone
from .patches import PatchSchedule
from .runs import RunLog, new_run_dir
from .step import Trainer, TrainState


def resolve_config(config: TrainConfig, dataset: ImageDataset) -> TrainConfig:
    """Fill in what comes from the data and check the patch sizes fit the network."""
    if config.data.cond and not dataset.num_classes:
        raise UserError(f"--cond needs class labels but '{config.data.path}' has none; "
                        "use class subfolders or a dataset.json, or drop --cond")
    label_dim = dataset.num_classes if config.data.cond else 0
    model = replace(config.model, resolution=tuple(dataset.resolution),
                    channels=dataset.channels, label_dim=label_dim)
    config = replace(config, model=model)
    schedule = PatchSchedule(config.patch, model.resolution)
    multiple = get_backbone(model.backbone).size_multiple(model.backbone_config)
    for divisor in reversed(schedule.divisors):  # the full canvas first: it must fit in any case
        h, w = schedule.patch_shape(divisor)
        if h % multiple or w % multiple:
            what = "patches" if divisor > 1 else "images"
            raise UserError(
                f"{h}x{w} {what} do not fit the {model.backbone} network, whose sides must divide "
                f"by {multiple}; use larger --patch-sizes, --resolution/--fit, or fewer resolution levels"
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
    ``backbone`` replaces the configured network with any module called as
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
    trainer = Trainer(config, device, backbone)
    state = trainer.state
    if resume_from is not None:
        tensors, meta = load_checkpoint(resume_from)
        if meta.get("backbone") != _backbone_name(config, backbone):
            raise UserError(f"'{resume_from}' was trained with backbone {meta.get('backbone')}; "
                            "resume it with the same network")
        _restore(trainer, tensors, meta)
    elif backbone is None:
        _load_pretrained(trainer, config)

    fid = None
    if config.fid_every_kimg:
        if not config.fid_ref:
            raise UserError("--fid-every needs --fid-ref REF.npz (make one with 'patch-diffusion fid ref')")
        fid = FIDTracker(config.fid_ref, config.fid_num, device, config.model.resolution)

    run_dir = Path(run_dir) if run_dir else new_run_dir(Path(outdir), _run_desc(config))
    log = RunLog(run_dir, echo=progress)
    (run_dir / "config.json").write_text(to_json(config) + "\n")
    _describe(log, trainer, dataset, resume_from, _backbone_name(config, backbone))
    if state.step == 0:
        reals = dataset.get_batch(torch.arange(min(config.grid_seeds, len(dataset))))[0]
        save_grid(reals, run_dir / "reals.png", scale=_grid_scale(config))

    dataset = data_on_device(dataset, config, device)
    num_workers = config.data.num_workers
    if num_workers is None:  # in-memory data is one tensor index per batch: workers only add IPC
        num_workers = 0 if dataset.in_memory else default_num_workers()
    trainer.start_data(dataset, num_workers)
    img_per_step = trainer.img_per_step
    every = {name: max(1, round(kimg * 1000 / img_per_step)) for name, kimg in
             (("log", config.log_kimg), ("ckpt", config.checkpoint_kimg), ("grid", config.sample_kimg),
              ("fid", config.fid_every_kimg or 0.0))}

    limit = config.max_minutes * 60 if config.max_minutes is not None else None
    pause = stop_after_minutes * 60 if stop_after_minutes is not None else None
    window = {"loss": 0.0, "steps": 0, "images": 0, "busy": 0.0}
    if limit:  # a time budget: the bar counts training seconds, not a step total it may never reach
        bar = time_bar(limit, state.train_seconds, progress)
    else:
        bar = tqdm(total=trainer.total_steps, initial=state.step, desc="training", unit="step",
                   disable=not progress, dynamic_ncols=True)
    stopped_early = False
    while state.step < trainer.total_steps:
        step_start = time.monotonic()
        divisor = trainer.draw_divisor(limit)
        batch = trainer.patches(*trainer.load(divisor), divisor)
        loss = trainer.optimise(batch)
        step_seconds = time.monotonic() - step_start
        state.train_seconds += step_seconds

        window["busy"] += step_seconds
        window["loss"] += loss
        window["steps"] += 1
        window["images"] += batch.images.shape[0]
        if limit:
            advance(bar, step_seconds)
        else:
            bar.update(1)
        over_time = any(t is not None and state.train_seconds >= t for t in (limit, pause))
        done = state.step == trainer.total_steps or over_time
        if state.step % every["log"] == 0 or done:
            _log_stats(log, bar, window, state, img_per_step, trainer.lr())
        if state.step % every["grid"] == 0 or done:
            _sample_grid(trainer, run_dir, log)
        if fid is not None and (state.step % every["fid"] == 0 or done):
            _fid_point(trainer, fid, log)
        if state.step % every["ckpt"] == 0 or done:
            _save(run_dir, trainer, backbone)
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


def _log_stats(log: RunLog, bar: tqdm, window: dict, state: TrainState, img_per_step: float,
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


def _describe(log: RunLog, trainer: Trainer, dataset: ImageDataset, resume_from: Path | None,
              backbone: str) -> None:
    """The run's first lines: where, what data, which network, which schedule."""
    config, schedule, model = trainer.config, trainer.schedule, trainer.config.model
    n_params = sum(p.numel() for p in trainer.net.parameters())
    log.info(f"{'resuming from ' + str(resume_from) if resume_from else 'new run'} in {log.run_dir}")
    log.info(f"data: {dataset.name}, {len(dataset)} images, {model.channels}x"
             f"{model.resolution[0]}x{model.resolution[1]}; device: {trainer.device}; "
             f"network: {backbone} in {model.precond} preconditioning, {n_params / 1e6:.2f}M parameters")
    log.info(f"schedule: {config.patch.schedule}, patches "
             + ", ".join(f"{'x'.join(map(str, schedule.patch_shape(d)))} p={p:.2f}"
                         for d, p in zip(schedule.divisors, schedule.probs))
             + f", expected batch multiplier {schedule.expected_multiplier:.2f}; "
             f"{trainer.total_steps} steps for {config.duration_kimg:g} kimg")


def _sample_grid(trainer: Trainer, run_dir: Path, log: RunLog) -> None:
    config = trainer.config
    grid = sample(trainer.ema, list(range(config.grid_seeds)), config.sampler,
                  config.model.resolution, trainer.device)
    path = save_grid(grid, run_dir / f"samples-{trainer.state.step:08d}.png", scale=_grid_scale(config))
    log.info(f"samples: {path}")


def _fid_point(trainer: Trainer, fid: FIDTracker, log: RunLog) -> None:
    config, step = trainer.config, trainer.state.step
    value = fid(trainer.ema, config.sampler)
    kimg = step * trainer.img_per_step / 1000
    log.stats({"step": step, "kimg": round(kimg, 4), "fid": round(value, 4), "fid_num": config.fid_num})
    log.info(f"FID ({config.fid_num} images) at {kimg:.1f} kimg: {value:.2f}")


def _save(run_dir: Path, trainer: Trainer, backbone: torch.nn.Module | None) -> None:
    config, state = trainer.config, trainer.state
    opt_tensors, opt_info = optimizer_to_tensors(trainer.optimizer)
    tensors = {**prefixed("ema", trainer.ema.state_dict()), **prefixed("net", trainer.net.state_dict()),
               **prefixed("optim", opt_tensors),
               "rng.patch": trainer.patch_gen.get_state(), "rng.noise": trainer.noise_gen.get_state(),
               "rng.torch": torch.get_rng_state()}
    if trainer.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(trainer.device)
    meta = {"config": to_dict(config), "step": state.step, "data_batches": state.data_batches,
            "train_seconds": state.train_seconds, "images": state.images,
            "kimg": state.step * trainer.img_per_step / 1000, "optimizer": opt_info,
            "backbone": _backbone_name(config, backbone)}
    save_checkpoint(run_dir / checkpoint_name(state.step), tensors, meta)
    prune_checkpoints(run_dir, config.keep_checkpoints)


def _restore(trainer: Trainer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    try:
        trainer.net.load_state_dict(unprefixed("net", tensors))
        trainer.ema.load_state_dict(unprefixed("ema", tensors))
    except RuntimeError:
        raise UserError("the checkpoint's network does not match this config; resume without "
                        "changing the model options") from None
    optimizer_from_tensors(trainer.optimizer, unprefixed("optim", tensors), meta["optimizer"])
    trainer.patch_gen.set_state(tensors["rng.patch"])
    trainer.noise_gen.set_state(tensors["rng.noise"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], trainer.device)
    state = trainer.state
    state.step = int(meta["step"])
    state.data_batches = int(meta["data_batches"])
    state.train_seconds = float(meta.get("train_seconds", 0.0))
    state.images = int(meta.get("images", round(state.step * trainer.img_per_step)))


def _load_pretrained(trainer: Trainer, config: TrainConfig) -> None:
    """A fresh run whose backbone config names pretrained weights starts from them
    (net and EMA alike); resumed runs take their weights from the checkpoint instead."""
    folder = getattr(config.model.backbone_config, "pretrained", None)
    if folder:
        trainer.net.backbone.load_pretrained(folder)
        trainer.ema.load_state_dict(trainer.net.state_dict())


def _backbone_name(config: TrainConfig, backbone: torch.nn.Module | None) -> str:
    """The registry name of the configured backbone, else the custom module's import path."""
    if backbone is None:
        return config.model.backbone
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
