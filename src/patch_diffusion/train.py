"""The training loop: Patch Diffusion steps (``step.py``) with logs, grids, FID and
checkpoints around them.

Progress is counted in images seen at the schedule's *expected* multiplier (as the
paper's code does), so a duration in kimg maps to a fixed number of steps.

Resume restores weights, EMA, Adam moments, the step, every random generator and the
data position, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import (atomic_write_bytes, checkpoint_name, list_checkpoints, load_checkpoint,
                         optimizer_from_tensors, optimizer_to_tensors, prefixed, prune_checkpoints,
                         remove_stale_temp_files, save_checkpoint, unprefixed)
from .config import DataConfig, TrainConfig, output_resolution, read_config, to_dict, to_json
from .data import ImageDataset, default_num_workers, open_dataset
from .devices import resolve_precision
from .distributed import Distributed, lost_peers, per_process_batch
from .errors import UserError
from .evaluate import FIDTracker
from .generate import sample, save_grid, to_uint8
from .latents import LatentDecoder, image_decoder, normalise
from .networks import get_backbone
from .patches import PatchSchedule, default_patch_sizes, steps_for_duration
from .runs import RunLog, new_run_dir
from .step import Trainer, TrainState


def open_run_data(data: DataConfig) -> ImageDataset:
    """The data set a run's config names, with its subset."""
    return open_dataset(data.path, resolution=data.resolution, fit=data.fit, channels=data.channels,
                        max_images=data.max_images, subset_seed=data.subset_seed)


def resolve_config(config: TrainConfig, dataset: ImageDataset, notes: list[str] | None = None
                   ) -> TrainConfig:
    """Fill in what comes from the data and check the patch sizes fit the network.

    When the user gave no patch sizes and one of the defaults (R/4, R/2) does not fit
    the network (28 px images: 7 px patches), the sizes that fit are used and a line
    saying so is added to ``notes``.
    """
    if config.data.cond and not dataset.num_classes:
        raise UserError(f"--cond needs class labels but '{config.data.path}' has none; "
                        "use class subfolders or a dataset.json, or drop --cond")
    if config.batch_size < 1:
        raise UserError("--batch must be at least 1")
    label_dim = dataset.num_classes if config.data.cond else 0
    model = replace(config.model, resolution=tuple(dataset.resolution),
                    channels=dataset.channels, label_dim=label_dim)
    config = dataclasses.replace(config, model=model, vae=getattr(dataset, "vae", None))
    if config.vae is not None and config.data.xflip:
        # A mirrored latent is not the latent of the mirrored image.
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, xflip=False))
        if notes is not None:
            notes.append("flips: latents are never flipped; 'encode --xflip' stores each mirrored "
                         "image as one more item instead")
    multiple = get_backbone(model.backbone).size_multiple(model.backbone_config)
    height, width = model.resolution
    if height % multiple or width % multiple:
        raise UserError(f"{height}x{width} images do not fit the {model.backbone} network, whose sides "
                        f"must divide by {multiple}; use --resolution {_fitting_size(height, 4 * multiple)} "
                        "--fit pad (or resize), or fewer resolution levels")
    schedule = PatchSchedule(config.patch, model.resolution)
    if not config.patch.patch_sizes and len(schedule.divisors) > 1:
        config = _fitting_defaults(config, multiple, notes)
        schedule = PatchSchedule(config.patch, model.resolution)
    for divisor in schedule.divisors:
        h, w = schedule.patch_shape(divisor)
        if h % multiple or w % multiple:
            raise UserError(
                f"{h}x{w} patches do not fit the {model.backbone} network, whose sides must divide "
                f"by {multiple}; use larger --patch-sizes, --resolution/--fit, or fewer resolution levels"
            )
    return config


def _fitting_defaults(config: TrainConfig, multiple: int, notes: list[str] | None) -> TrainConfig:
    """The default patch sizes that the network takes; an error naming a canvas that
    fits when none does."""
    height, width = config.model.resolution

    def shape(size: int) -> str:  # a patch of this height keeps the canvas's aspect ratio
        return f"{size}x{width // (height // size)}"

    sizes = default_patch_sizes(height)
    fitting = tuple(s for s in sizes if s % multiple == 0 and (width // (height // s)) % multiple == 0)
    if fitting == sizes:
        return config
    dropped = ", ".join(shape(s) for s in sizes if s not in fitting)
    why = f"the {config.model.backbone} network needs sides divisible by {multiple}"
    canvas = _fitting_size(height, 4 * multiple)
    if not fitting:
        raise UserError(f"the default patches ({dropped}) do not fit {height}x{width} images: {why}; "
                        f"use --resolution {canvas} --fit pad, or --patch-sizes, or --schedule full")
    if config.patch.probs:
        raise UserError(f"the default patches {dropped} do not fit ({why}), so --patch-probs has no "
                        "sizes to refer to; give --patch-sizes with it")
    if notes is not None:
        notes.append(f"patch sizes: {', '.join(shape(s) for s in fitting)} (default {dropped} left out: "
                     f"{why}; --patch-sizes or --resolution {canvas} --fit pad to choose)")
    return replace(config, patch=replace(config.patch, patch_sizes=fitting))


def _fitting_size(size: int, multiple: int) -> int:
    """The smallest canvas side >= ``size`` that divides by ``multiple``."""
    return -(-size // multiple) * multiple


MAX_NONFINITE_STEPS = 5  # non-finite losses in a row before a run stops


class Interrupted(Exception):
    """Training stopped on SIGTERM or SIGINT after saving a checkpoint; ``str()`` says
    how to resume. ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """Turns SIGTERM and SIGINT into a request to stop at the next step boundary (clusters
    send SIGTERM before preemption); a second Ctrl-C raises KeyboardInterrupt at once.
    Handlers can only be set from the main thread; elsewhere signals keep their default."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.received = signum
        again = " (Ctrl-C again to quit at once)" if signum == signal.SIGINT else ""
        sys.stderr.write(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step{again}\n")


def train(
    config: TrainConfig,
    outdir: str | Path,
    *,
    resume_from: Path | None = None,
    run_dir: Path | None = None,
    backbone: torch.nn.Module | None = None,
    stop_after_minutes: float | None = None,
    stop_after_kimg: float | None = None,
    pace_minutes: float | None = None,
    progress: bool = True,
) -> Path:
    """Train as ``config`` says; returns the run folder.

    ``resume_from`` restores a checkpoint's full state. ``run_dir`` continues an existing
    run folder (automatic resume); otherwise a new numbered folder is made in ``outdir``.
    ``backbone`` replaces the configured network with any module called as
    ``backbone(x, noise_labels, class_labels)`` whose input has image channels + 2
    coordinate channels and whose output has the image channels.

    Time limits count training steps only (not grids, FID or checkpoints).
    ``config.max_minutes`` applies to each call, so a run continues in slices; when the
    run's duration is not reached first, it also paces the progressive schedule, as if
    training ended with this call (``pace_minutes`` sets that total time instead).
    ``stop_after_minutes`` pauses when the run's total training time reaches it, and
    ``stop_after_kimg`` when its images seen do (counted as ``duration_kimg`` is).

    SIGTERM or SIGINT saves a checkpoint after the current step and raises
    ``Interrupted``; a loss that is not finite skips its step, and
    ``MAX_NONFINITE_STEPS`` of them in a row stop the run with a ``UserError``.
    """
    dist = Distributed.from_environment()
    device = dist.device(config.device)
    dist.start(device)
    try:
        return _train(config, outdir, dist, device, resume_from=resume_from, run_dir=run_dir,
                      backbone=backbone, stop_after_minutes=stop_after_minutes,
                      stop_after_kimg=stop_after_kimg, pace_minutes=pace_minutes, progress=progress)
    finally:
        dist.stop()


def _train(config: TrainConfig, outdir: str | Path, dist: Distributed, device: torch.device, *,
           resume_from: Path | None, run_dir: Path | None, backbone: torch.nn.Module | None,
           stop_after_minutes: float | None, stop_after_kimg: float | None,
           pace_minutes: float | None, progress: bool) -> Path:
    # Set-up that may fail differently in each process (files, memory) comes first, and
    # all processes agree on its outcome before the first collective (DDP's weight
    # broadcast), so a failure stops the job with one message instead of a hang.
    failure, notes, meta, tensors, fid, decode = None, [], {}, None, None, None
    try:
        dataset = open_run_data(config.data)
        config = resolve_config(config, dataset, notes)
        per_process_batch(config.batch_size, dist.world_size, config.batch_gpu)
        if resume_from is not None:
            tensors, meta = load_checkpoint(resume_from)
            check_resume(config, meta, dataset, _backbone_name(config, backbone), resume_from)
        if config.fid_every_kimg and dist.is_main:
            if not config.fid_ref:
                raise UserError("--fid-every needs --fid-ref REF.npz (make one with 'patch-diffusion fid ref')")
            fid = FIDTracker(config.fid_ref, config.fid_num, device, output_resolution(config))
        if dist.is_main:  # grids and FID of a latent run are decoded to pixels
            decode = image_decoder(config.vae, device)
    except UserError as exc:
        failure = exc
    dist.agree_on_error(failure)

    trainer = Trainer(config, device, backbone, dist)
    state = trainer.state
    if tensors is not None:
        notes += _restore(trainer, tensors, meta)
        del tensors
    elif backbone is None:
        _load_pretrained(trainer, config)

    if dist.is_main:
        run_dir = Path(run_dir) if run_dir else new_run_dir(Path(outdir), _run_desc(config))
    run_dir = dist.broadcast(run_dir)
    log = RunLog(run_dir, echo=progress, enabled=dist.is_main)
    if dist.is_main and resume_from is not None and Path(resume_from).parent.resolve() == run_dir.resolve():
        # Lines logged after that checkpoint describe steps about to be run again.
        log.rewind(meta.get("logs", {}))
        for stale in remove_stale_temp_files(run_dir):
            notes.append(f"removed {stale.name}, left by a write that was interrupted")
    if dist.is_main:
        atomic_write_bytes(run_dir / "config.json", (to_json(config) + "\n").encode())
    _describe(log, trainer, dataset, resume_from, _backbone_name(config, backbone))
    for note in notes:
        log.info(note)
    if state.step == 0 and dist.is_main:
        reals = dataset.get_batch(torch.arange(min(config.grid_seeds, len(dataset))))[0]
        if decode is not None:  # latents: the VAE's view of the data (each image's mean latent)
            means = reals.to(device).float().chunk(2, dim=1)[0]
            reals = to_uint8(decode(normalise(means, config.vae)))
        save_grid(reals, run_dir / "reals.png", scale=_grid_scale(config))

    data = data_on_device(dataset, config, device)
    num_workers = config.data.num_workers
    if num_workers is None:  # in-memory data is one tensor index per batch: workers only add IPC
        num_workers = 0 if data.in_memory else default_num_workers(dist.local_world_size)
    trainer.start_data(data, num_workers)
    img_per_step = trainer.img_per_step
    every = {name: max(1, round(kimg * 1000 / img_per_step)) for name, kimg in
             (("log", config.log_kimg), ("ckpt", config.checkpoint_kimg), ("grid", config.sample_kimg),
              ("fid", config.fid_every_kimg or 0.0))}

    # --minutes is counted from this call's start, so `--resume latest` continues a run in slices.
    limit = state.train_seconds + config.max_minutes * 60 if config.max_minutes is not None else None
    pace = pace_minutes * 60 if pace_minutes is not None else limit
    pause = stop_after_minutes * 60 if stop_after_minutes is not None else None
    pause_step = (steps_for_duration(stop_after_kimg, config.batch_size, trainer.schedule.expected_multiplier)
                  if stop_after_kimg is not None else None)
    window = {"loss": 0.0, "steps": 0, "images": 0, "busy": 0.0}
    progress = progress and dist.is_main
    if limit:  # a time budget: the bar counts training seconds, not a step total it may never reach
        # A pause before this call's budget ends (the time-to-FID points) ends the bar there.
        bar = time_bar(min(limit, pause) if pause else limit, state.train_seconds, progress)
    else:
        bar = tqdm(total=trainer.total_steps, initial=state.step, desc="training", unit="step",
                   disable=not progress, dynamic_ncols=True, mininterval=bar_interval())
    stop_reason = None
    nonfinite = 0
    with StopSignals() as signals:
        while state.step < trainer.total_steps:
            step_start = time.monotonic()
            divisor = trainer.draw_divisor(pace)
            batch = trainer.patches(*trainer.load(divisor), divisor)
            with lost_peers(dist, only_collectives=True):  # DDP exchanges gradients in backward
                loss = trainer.optimise(batch)
            step_seconds = time.monotonic() - step_start
            if dist.enabled:  # one clock and one stop decision for the whole job
                step_seconds, signum = dist.max([step_seconds, float(signals.received or 0)])
                signals.received = signals.received or (int(signum) or None)
            state.train_seconds += step_seconds
            if limit:
                advance(bar, step_seconds)
            if loss is None:
                nonfinite += 1
                _nonfinite_step(log, state, nonfinite, run_dir)
            else:
                nonfinite = 0
                window["busy"] += step_seconds
                window["loss"] += loss
                window["steps"] += 1
                window["images"] += batch.images.shape[0] * dist.world_size
                if not limit:
                    bar.update(1)
            spent = _budget_spent(state, config, limit, pause, pause_step, stop_after_kimg)
            done = state.step == trainer.total_steps or spent is not None
            if signals.received is not None:  # save and leave: a preempted job has seconds, not minutes
                if window["steps"]:
                    _log_stats(log, bar, window, state, img_per_step, trainer.lr())
                if dist.is_main:
                    _save(run_dir, trainer, backbone, log)
                stop_reason = signals.received
                break
            if loss is None:
                continue
            if state.step % every["log"] == 0 or done:
                _log_stats(log, bar, window, state, img_per_step, trainer.lr())
            if dist.is_main:  # the other processes wait in the next step's first collective
                if state.step % every["grid"] == 0 or done:
                    _sample_grid(trainer, run_dir, log, decode)
                if fid is not None and (state.step % every["fid"] == 0 or done):
                    _fid_point(trainer, fid, log, decode)
                if state.step % every["ckpt"] == 0 or done:
                    _save(run_dir, trainer, backbone, log)
            if spent is not None:
                log.info(f"stopping: {spent} at step {state.step} "
                         f"({state.step * img_per_step / 1000:.1f} kimg); {_resume_hint(run_dir)}")
                stop_reason = "time"
                break
    bar.close()
    if stop_reason is None:
        log.info(f"done: {state.step} steps, {state.step * img_per_step / 1000:.1f} kimg")
    elif stop_reason != "time":
        message = (f"stopped by {signal.Signals(stop_reason).name} at step {state.step}, checkpoint "
                   f"saved; {_resume_hint(run_dir)}")
        log.info(message, echo=False)  # the caller shows it
        raise Interrupted(message, stop_reason)
    return run_dir


def _budget_spent(state: TrainState, config: TrainConfig, limit: float | None, pause: float | None,
                  pause_step: int | None, stop_after_kimg: float | None) -> str | None:
    """Why this call's budget is used up (time per call, total time, images), or None."""
    if pause_step is not None and state.step >= pause_step:
        return f"paused at {stop_after_kimg:g} kimg"
    if limit is not None and state.train_seconds >= limit:
        return f"--minutes {config.max_minutes:g} used up"
    if pause is not None and state.train_seconds >= pause:
        return f"paused after {state.train_seconds / 60:.2f} minutes of training"
    return None


def _resume_hint(run_dir: Path) -> str:
    return (f"continue with: patch-diffusion train --outdir {run_dir.parent} --resume latest "
            "(--minutes applies to each call)")


def _nonfinite_step(log: RunLog, state: TrainState, in_a_row: int, run_dir: Path) -> None:
    """Log a skipped step; stop the run, keeping its last checkpoint, when they repeat."""
    log.info(f"loss not finite at step {state.step + 1}: step skipped, weights unchanged "
             f"({in_a_row} in a row, {state.skipped_steps} in all)")
    if in_a_row >= MAX_NONFINITE_STEPS:
        kept = list_checkpoints(run_dir)
        last = f"the last checkpoint ({kept[-1].name}) is from before" if kept else "no checkpoint was written"
        raise UserError(f"the loss was not finite for {in_a_row} steps in a row (up to step "
                        f"{state.step + 1}); stopped, {last}: lower --lr, use --precision fp32, or "
                        "check the data for bad values")


_FIXED_ON_RESUME = {  # what the data position, the weights or the random streams depend on
    "batch_size": "--batch", "seed": "--seed", "data.path": "--data", "data.resolution": "--resolution",
    "data.fit": "--fit", "data.channels": "the channel count", "data.max_images": "--max-images",
    "data.subset_seed": "--subset-seed",
    "data.cond": "--cond", "model": "the network options", "patch": "the patch schedule options",
    "loss": "the loss options", "vae": "latents (another VAE or another encoding)",
}


def check_resume(config: TrainConfig, meta: dict, dataset: ImageDataset, backbone: str,
                 path: Path) -> None:
    """Refuse to resume with a change that would silently remap the data position or
    not fit the saved state; duration, time limits, learning rate, intervals, device
    and workers may change."""
    if meta.get("backbone") != backbone:
        raise UserError(f"'{path}' was trained with backbone {meta.get('backbone')}; "
                        "resume it with the same network")
    saved = read_config(meta["config"], str(path))
    mine, theirs = to_dict(config), to_dict(saved)
    for key, what in _FIXED_ON_RESUME.items():
        a, b = _lookup(mine, key), _lookup(theirs, key)
        if a != b:
            where = _first_difference(a, b, key)
            raise UserError(f"cannot resume '{path}' with other {what}: {where}; resume without "
                            "changing it, or start a new run")
    images = meta.get("data", {}).get("images")
    if images is not None and images != len(dataset):
        raise UserError(f"'{config.data.path}' now has {len(dataset)} images but '{path}' was trained "
                        f"on {images}; the data order depends on the set, so resume on the same "
                        "images or start a new run")


def _lookup(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _first_difference(a: Any, b: Any, where: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}")
    return f"{where} is {_shown(a)}, the checkpoint's is {_shown(b)}"


def _shown(value: Any) -> str:
    return "unset" if value is None else str(value)


def time_bar(seconds: float, done: float = 0.0, progress: bool = True, desc: str = "training") -> tqdm:
    """A progress bar over a training-time budget; update it with each step's seconds.
    It starts at most full: a resumed slice can begin past its budget (a slow step
    overran the last point), and tqdm then drops the total and fails to draw."""
    return tqdm(total=seconds, initial=min(done, seconds), desc=desc, disable=not progress, dynamic_ncols=True,
                mininterval=bar_interval(), bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of training "
                "[{elapsed}<{remaining}{postfix}]")


def bar_interval() -> float:
    """Least seconds between progress-bar redraws: live on a terminal; a minute when the
    output goes to a file (a cluster job's log, which grew by about 2.8 MB an hour at
    10 redraws a second). tqdm's monitor thread still adds one every 20 s or so."""
    return 0.1 if sys.stderr.isatty() else 60.0


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
    bar.set_postfix(step=state.step, loss=f"{stats['loss']:.4f}", kimg=f"{stats['kimg']:.1f}", refresh=False)
    window.update(loss=0.0, steps=0, images=0, busy=0.0)


def _describe(log: RunLog, trainer: Trainer, dataset: ImageDataset, resume_from: Path | None,
              backbone: str) -> None:
    """The run's first lines: where, what data, which network, which schedule."""
    config, schedule, model = trainer.config, trainer.schedule, trainer.config.model
    n_params = sum(p.numel() for p in trainer.net.parameters())
    log.info(f"{'resuming from ' + str(resume_from) if resume_from else 'new run'} in {log.run_dir}")
    log.info(f"data: {dataset.name}, {len(dataset)} images, {model.channels}x"
             f"{model.resolution[0]}x{model.resolution[1]}; device: {trainer.device} "
             f"({resolve_precision(config.precision, trainer.device)}, "
             f"{'channels-last' if trainer.memory_format == torch.channels_last else 'NCHW'}); "
             f"network: {backbone} in {model.precond} preconditioning, {n_params / 1e6:.2f}M parameters")
    if config.vae is not None:
        h, w = config.vae.image_resolution
        log.info(f"latent space: {h}x{w} images through the VAE {config.vae.path}, latents normalised to "
                 f"std {config.vae.data_std:g}; grids, FID and generate decode them")
    log.info(f"schedule: {config.patch.schedule}, patches "
             + ", ".join(f"{'x'.join(map(str, schedule.patch_shape(d)))} p={p:.2f}"
                         for d, p in zip(schedule.divisors, schedule.probs))
             + f", expected batch multiplier {schedule.expected_multiplier:.2f}; "
             f"{trainer.total_steps} steps for {config.duration_kimg:g} kimg")
    dist = trainer.dist
    if dist.enabled or trainer.rounds > 1 or torch.distributed.is_initialized():
        log.info(f"batch {config.batch_size} = {trainer.local_batch // trainer.rounds} per pass x "
                 f"{trainer.rounds} accumulation rounds x {dist.world_size} processes"
                 + (f" ({torch.distributed.get_backend()})" if torch.distributed.is_initialized() else ""))


def _sample_grid(trainer: Trainer, run_dir: Path, log: RunLog, decode: LatentDecoder | None) -> None:
    config = trainer.config
    grid = sample(trainer.ema, list(range(config.grid_seeds)), config.sampler,
                  config.model.resolution, trainer.device, precision=config.precision, decode=decode)
    path = save_grid(grid, run_dir / f"samples-{trainer.state.step:08d}.png", scale=_grid_scale(config))
    log.info(f"samples: {path}")


def _fid_point(trainer: Trainer, fid: FIDTracker, log: RunLog, decode: LatentDecoder | None) -> None:
    config, step = trainer.config, trainer.state.step
    value = fid(trainer.ema, config.sampler, config.precision, decode=decode,
                model_resolution=config.model.resolution)
    kimg = step * trainer.img_per_step / 1000
    log.stats({"step": step, "kimg": round(kimg, 4), "fid": round(value, 4), "fid_num": config.fid_num})
    log.info(f"FID ({config.fid_num} images) at {kimg:.1f} kimg: {value:.2f}")


def _save(run_dir: Path, trainer: Trainer, backbone: torch.nn.Module | None, log: RunLog) -> None:
    config, state = trainer.config, trainer.state
    opt_tensors, opt_info = optimizer_to_tensors(trainer.optimizer)
    tensors = {**prefixed("ema", trainer.ema.state_dict()), **prefixed("net", trainer.net.state_dict()),
               **prefixed("optim", opt_tensors), **_rng_tensors(trainer)}
    meta = {"config": to_dict(config), "step": state.step, "data_batches": state.data_batches,
            "train_seconds": state.train_seconds, "images": state.images,
            "skipped_steps": state.skipped_steps,
            "kimg": state.step * trainer.img_per_step / 1000, "optimizer": opt_info,
            "backbone": _backbone_name(config, backbone), "device": trainer.device.type,
            "world_size": trainer.dist.world_size,
            "data": {"images": trainer.data_size}, "logs": log.sizes()}
    path = run_dir / checkpoint_name(state.step)
    try:
        save_checkpoint(path, tensors, meta)
    except OSError as exc:  # e.g. a full disk: the previous checkpoint is untouched
        raise UserError(f"cannot write checkpoint '{path}' ({exc.strerror or exc}); the previous "
                        "checkpoints are intact: free some space, then resume with --resume latest") from None
    prune_checkpoints(run_dir, config.keep_checkpoints)


def _rng_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every random generator's state; the device's own default generator is that of the
    device the run uses (cuda:N's on cuda:N, not device 0's)."""
    tensors = {"rng.patch": trainer.patch_gen.get_state(), "rng.noise": trainer.noise_gen.get_state(),
               "rng.torch": torch.get_rng_state()}
    if trainer.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(_cuda_index(trainer.device))
    return tensors


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _restore(trainer: Trainer, tensors: dict[str, torch.Tensor], meta: dict) -> list[str]:
    """Load a checkpoint's state into ``trainer``; returns lines worth logging."""
    try:
        trainer.net.load_state_dict(unprefixed("net", tensors))
        trainer.ema.load_state_dict(unprefixed("ema", tensors))
    except RuntimeError:
        raise UserError("the checkpoint's network does not match this config; resume without "
                        "changing the model options") from None
    optimizer_from_tensors(trainer.optimizer, unprefixed("optim", tensors), meta["optimizer"])
    notes = _restore_rng(trainer, tensors, meta)
    if trainer.dist.rank:  # the checkpoint holds rank 0's dropout stream; the others derive theirs
        torch.manual_seed(trainer.dist.rank_seed(trainer.config.seed, int(meta["step"])))
    state = trainer.state
    state.step = int(meta["step"])
    state.data_batches = int(meta["data_batches"])
    state.train_seconds = float(meta.get("train_seconds", 0.0))
    state.images = int(meta.get("images", round(state.step * trainer.img_per_step)))
    state.skipped_steps = int(meta.get("skipped_steps", 0))
    return notes


def _restore_rng(trainer: Trainer, tensors: dict[str, torch.Tensor], meta: dict) -> list[str]:
    """Generators kept on the host always continue; those on the device continue when the
    checkpoint comes from the same kind of device. Otherwise their state does not apply
    (a CUDA generator's state is not a CPU one's), so they restart from a seed derived
    from the step: the run goes on correctly but not bit-identically."""
    trainer.patch_gen.set_state(tensors["rng.patch"])
    torch.set_rng_state(tensors["rng.torch"])
    saved = meta.get("device", "cuda" if "rng.cuda" in tensors else "cpu")
    here = trainer.device.type
    if saved == here:
        trainer.noise_gen.set_state(tensors["rng.noise"])
        if "rng.cuda" in tensors and here == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], _cuda_index(trainer.device))
        return []
    seed = int(np.random.SeedSequence([trainer.config.seed, int(meta["step"])]).generate_state(1)[0])
    trainer.noise_gen.manual_seed(seed)
    if here == "cuda":
        torch.cuda.manual_seed(seed)
    return [f"checkpoint written on {saved}, resumed on {here}: weights, optimiser, data order and "
            "patch draws continue exactly; the noise generator on the device restarts from a "
            "seed, so this run is not bit-identical to one that stayed on one device"]


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
    return read_config(load_checkpoint(path, with_tensors=False)[1].get("config"), str(path))


def _run_desc(config: TrainConfig) -> str:
    p = config.patch
    schedule = "full" if p.schedule == "full" or p.real_p == 1 else f"{p.schedule}-p{p.real_p:g}"
    return f"{config.preset}-{schedule}"


def _grid_scale(config: TrainConfig) -> int:
    return max(1, 64 // max(output_resolution(config)))
