"""Time-to-FID: train several arms one after another, each for the same training-time
budget from the same seed, and measure FID at K evenly spaced points of that time.

The clock counts training steps only (``TrainState.train_seconds``), so grids, FID
and checkpoints never eat into an arm's budget. Each arm trains in K segments that
resume bit-exactly from the previous checkpoint; after each segment the EMA weights
are scored against cached reference statistics. Results are written after every point,
so ``resume=True`` continues an interrupted benchmark, adds arms to a finished one, or
extends its arms to more minutes (more points at the same spacing).

With ``kimg`` every arm instead trains on the same nominal number of images (the
paper's Table comparison: final FID and the wall time each schedule needed), with the
K points evenly spaced in images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..checkpoint import atomic_write_bytes, load_checkpoint
from ..config import TrainConfig, apply_model_options, apply_recipe, get_preset, replace, with_data
from ..data import default_cache_dir, has_test_split, open_dataset
from ..devices import describe_machine, resolve_device
from ..errors import UserError
from ..evaluate import cached_reference, model_features, reference_cache_path, score
from ..generate import load_denoiser, save_grid
from ..metrics import InceptionV3, compute_features, load_inception, load_reference
from ..patches import PatchConfig
from ..runs import latest_checkpoint
from ..train import train
from .diffusers_arm import import_diffusers, run_diffusers_arm
from .report import write_plot, write_report

def _patch_arm(**changes: Any) -> Callable[[TrainConfig], TrainConfig]:
    """An arm that is the paper's stochastic p = 0.5 schedule plus ``changes``: fields of
    PatchConfig, of LossConfig (prefixed ``loss_``) or of TrainConfig."""
    patch = {k: v for k, v in changes.items() if k in PatchConfig.__dataclass_fields__}
    loss = {k[5:]: v for k, v in changes.items() if k.startswith("loss_")}
    rest = {k: v for k, v in changes.items() if k not in patch and not k.startswith("loss_")}

    def arm(config: TrainConfig) -> TrainConfig:
        return dataclasses.replace(
            config, patch=PatchConfig(**{"schedule": "stochastic", "real_p": 0.5, **patch}),
            loss=dataclasses.replace(config.loss, **loss), **rest)
    return arm


# Each arm turns the preset's config into the config that arm trains; same network,
# optimiser, data and seed everywhere. "diffusers" is handled by diffusers_arm.
ARMS: dict[str, Callable[[TrainConfig], TrainConfig] | None] = {
    "full": lambda c: dataclasses.replace(c, patch=PatchConfig(schedule="full")),  # plain EDM
    "patch": _patch_arm(),  # the paper's schedule, our per-pixel loss
    "progressive": lambda c: dataclasses.replace(c, patch=PatchConfig(schedule="progressive")),
    "diffusers": None,
    # Hypotheses beyond the paper, each one change to the "patch" arm:
    "paper": lambda c: apply_recipe(c, "paper"),  # the reference code's loss (pixel sum)
    "repeat": _patch_arm(batch_images="repeat"),  # d crops of each image, not d*B images
    "noise-shift": _patch_arm(loss_patch_P_mean_shift=1.0),  # lower noise for smaller patches
    "p-ramp": _patch_arm(real_p=1.0, real_p_end=0.25),  # full images first, patches later
    "patch-lr": _patch_arm(patch_lr_scale=2.0),  # larger steps on the larger patch batches
    "p-rise": _patch_arm(real_p=0.5, real_p_end=1.0),  # p rising to 1: patches fade out
    "early": _patch_arm(patch_until=0.5),  # patch steps in the first half only, then full images
    "half": None,  # R/2 patches only (the reference's latent setting): needs the canvas, see arm_configs
    # Full images on version 0.1's DDPM++ (scale-shift conditioning, zero-initialised
    # branch ends) against EDM's exact DDPM++ of the "full" arm:
    "full-scale-shift": lambda c: _scale_shift(dataclasses.replace(c, patch=PatchConfig(schedule="full"))),
}


def _scale_shift(config: TrainConfig) -> TrainConfig:
    if config.model.backbone != "ddpmpp":
        raise UserError("the full-scale-shift arm is a DDPM++ variant; use it with --backbone ddpmpp")
    network = dataclasses.replace(config.model.backbone_config, adaptive_scale=True, init_zero=0.0)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, backbone_config=network))
DEFAULT_ARMS = ("full", "patch", "progressive", "diffusers")


@dataclass(frozen=True)
class BenchConfig:
    data: str = "fashion-mnist"
    minutes: float = 12.0  # training-time budget per arm
    points: int = 3  # FID evaluations per arm, evenly spaced in training time (or in kimg)
    kimg: float | None = None  # instead of a time budget: this many thousand images per arm
    fid_num: int = 1000  # generated images per FID
    arms: tuple[str, ...] = DEFAULT_ARMS
    p_values: tuple[float, ...] = ()  # extra stochastic arms, one per full-image ratio
    subset: int | None = None  # train on N images only (small-data runs)
    subset_seed: int | None = 0  # which N: drawn with this seed; None = the first N (older results)
    preset: str = "fmnist-32"
    batch: int | None = None  # base batch (default: the preset's)
    backbone: str | None = None  # networks.BACKBONES name (default: the preset's)
    precond: str | None = None  # precond.PRECONDS name (default: the preset's)
    channels: int | None = None  # backbone base channels (default: the preset's)
    precision: str = "auto"  # every arm's; auto = bf16 on CPUs with AMX, else fp32
    compile: bool = False  # torch.compile the patch arms' network
    ref_data: str | None = None  # default: the test split of a built-in set, else the data
    ref_num: int | None = None  # reference images (default: all of ref_data)
    seed: int = 0
    device: str = "auto"


def arm_configs(bench: BenchConfig, base: TrainConfig,
                height: int | None = None) -> dict[str, TrainConfig | None]:
    """The arms to run, by name (None for diffusers): the named ones, then one stochastic
    arm per p value. ``height`` is the canvas's, for the arms whose patch sizes need it."""
    unknown = [a for a in bench.arms if a not in ARMS]
    if unknown:
        raise UserError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)} "
                        "(and --p for more full-image ratios)")
    arms = {name: (ARMS[name](base) if ARMS[name] else None) for name in bench.arms}
    if "half" in arms:
        if not height or height % 2:
            raise UserError("the half arm needs an even canvas height (R/2 patches)")
        arms["half"] = _patch_arm(patch_sizes=(height // 2,))(base)
    for p in bench.p_values:
        arms[f"patch-p{p:g}"] = dataclasses.replace(base, patch=PatchConfig(schedule="stochastic", real_p=p))
    if not arms:
        raise UserError("no arms to run; pass --arms or --p")
    if "diffusers" in arms:
        import_diffusers()  # fail before any work when it is missing
    return arms


def reference_data(bench: BenchConfig) -> str:
    if bench.ref_data:
        return bench.ref_data
    name, _, split = bench.data.partition(":")
    if has_test_split(bench.data) and split in ("", "train"):
        return f"{name}:test"  # built-in sets: score against the held-out split
    return bench.data  # emoji, folders and zips: against the training images themselves


def run_time_to_fid(bench: BenchConfig, out: Path, *, resume: bool = False,
                    progress: bool = True) -> dict[str, Any]:
    """Run (or continue) the benchmark in ``out``; returns the results dict."""
    if bench.points < 1 or bench.minutes <= 0:
        raise UserError("--points must be at least 1 and --minutes positive")
    if bench.kimg is not None and bench.kimg <= 0:
        raise UserError(f"--kimg must be positive, got {bench.kimg:g}")
    if bench.kimg is not None and "diffusers" in bench.arms:
        raise UserError("the diffusers arm trains on a time budget only; drop it from --arms with --kimg")
    base = with_data(get_preset(bench.preset), bench.data)
    base = apply_model_options(base, backbone=bench.backbone, precond=bench.precond,
                               model_channels=bench.channels)
    base = replace(base, data=dataclasses.replace(base.data, max_images=bench.subset,
                                                  subset_seed=bench.subset_seed), seed=bench.seed,
                   device=bench.device, max_minutes=bench.minutes, duration_kimg=1e9,
                   checkpoint_kimg=1e9, sample_kimg=1e9, keep_checkpoints=1,
                   batch_size=bench.batch, precision=bench.precision, compile=bench.compile)
    if bench.kimg is not None:  # the paper's comparison: the same nominal images for every arm
        base = dataclasses.replace(base, duration_kimg=bench.kimg, max_minutes=None)  # None is a value here
    resolution = open_dataset(base.data.path, resolution=base.data.resolution, fit=base.data.fit,
                              max_images=1).resolution
    arms = arm_configs(bench, base, resolution[0])  # bad options fail before anything is written
    out = Path(out)
    results_path = out / "results.json"
    if results_path.exists() and not resume:
        raise UserError(f"'{out}' already holds a benchmark; pass --resume to continue it or "
                        "choose another --out")
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    stored = results.get("bench", {})
    if results and _settings(stored) != _settings(_jsonable(bench)):
        if not _extends(stored, bench):
            raise UserError(f"'{out}' holds a benchmark with other settings; resume it with the same "
                            "options (other --arms/--p may be added, or --minutes and --points grown "
                            "together) or choose another --out")
        _check_extendable(arms, results["arms"], bench)
    # Arms run earlier stay in the results; this call's arms are added or continued.
    results = {"arms": {}, **results, "bench": _jsonable(bench)}
    device = resolve_device(bench.device)
    machine = describe_machine(device, bench.precision)
    results["machine"] = machine  # of the latest call; each arm keeps the one that timed it

    ref_name = reference_data(bench)
    ref_num = bench.ref_num or len(open_dataset(ref_name))
    inception = load_inception(None, device)
    cache = default_cache_dir()
    if not reference_cache_path(ref_name, ref_num, tuple(resolution), base.data.fit, cache).is_file():
        # A full reference can take the better part of an hour on a CPU: say so before it starts.
        per_image = inception_seconds_per_image(inception, tuple(resolution), device)
        print(reference_notice(ref_num, per_image, device, suggest=bench.ref_num is None),
              file=sys.stderr, flush=True)
    ref_path = cached_reference(ref_name, ref_num, tuple(resolution), base.data.fit, cache,
                                device=bench.device)
    ref = load_reference(ref_path)
    results["ref"] = {"data": ref_name, "num": ref_num, "path": str(ref_path)}

    for name, config in arms.items():
        record = results["arms"].setdefault(name, {"points": []})
        if len(record["points"]) < bench.points:
            _note_machine(name, record, machine)
        if config is None:
            _run_diffusers(base, bench, record, results, results_path, out, ref, inception, device,
                           progress)
            continue
        arm_dir = out / "arms" / name
        for k in range(len(record["points"]) + 1, bench.points + 1):
            previous = latest_checkpoint(arm_dir)
            if bench.kimg is not None:
                budget = dict(stop_after_kimg=bench.kimg * k / bench.points)
            else:
                budget = dict(stop_after_minutes=bench.minutes * k / bench.points, pace_minutes=bench.minutes)
            train(config, arm_dir, resume_from=previous, run_dir=previous.parent if previous else None,
                  progress=progress, **budget)
            checkpoint = latest_checkpoint(arm_dir)
            record["points"].append(_evaluate(checkpoint, bench, ref, inception, device, progress))
            atomic_write_bytes(results_path, json.dumps(results, indent=1).encode())
            _announce(name, record["points"][-1])
        grids = sorted(arm_dir.glob("*/samples-*.png"))
        if grids:
            shutil.copyfile(grids[-1], out / f"samples-{name}.png")

    atomic_write_bytes(results_path, json.dumps(results, indent=1).encode())
    write_report(results, out / "report.md")
    write_plot(results, out / "fid_vs_time.png")
    return results


# Suggest a smaller --ref-num when the reference would take longer than this.
SLOW_REFERENCE_SECONDS = 5 * 60


def inception_seconds_per_image(net: InceptionV3, resolution: tuple[int, int],
                                device: torch.device, batch: int = 16) -> float:
    """Inception's measured time per image on ``device``: one untimed image (the first
    call pays one-off setup), then one timed batch."""
    images = torch.zeros((batch, 3, *resolution), dtype=torch.uint8)
    compute_features([images[:1]], net, device, progress=False)
    start = time.perf_counter()
    compute_features([images], net, device, progress=False)  # returns features on the host: done
    return (time.perf_counter() - start) / batch


def reference_notice(num: int, seconds_per_image: float, device: torch.device, *,
                     suggest: bool) -> str:
    """One line announcing a reference computation and its estimated time; with ``suggest``
    and more than ``SLOW_REFERENCE_SECONDS`` to go, the --ref-num that fits that time."""
    seconds = num * seconds_per_image
    line = (f"computing Inception features of {num} reference images (about {_duration(seconds)} "
            f"on this {device.type}; cached for later runs)")
    fewer = _round_down(SLOW_REFERENCE_SECONDS / max(seconds_per_image, 1e-9))
    if suggest and seconds > SLOW_REFERENCE_SECONDS and 2 <= fewer < num:
        line += (f"; --ref-num {fewer} makes it about {_duration(fewer * seconds_per_image)} "
                 "(a smaller reference gives a noisier FID)")
    return line


def _round_down(x: float) -> int:
    """``x`` rounded down to one significant digit: 2345 -> 2000, 27 -> 20."""
    if x < 1:
        return 0
    unit = 10 ** int(math.log10(x))
    return int(x // unit * unit)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _run_diffusers(base: TrainConfig, bench: BenchConfig, record: dict, results: dict,
                   results_path: Path, out: Path, ref, inception, device: torch.device,
                   progress: bool) -> None:
    if len(record["points"]) == bench.points:
        return
    record["points"] = []  # no checkpoints: an interrupted diffusers arm starts again
    budgets = [bench.minutes * 60 * k / bench.points for k in range(1, bench.points + 1)]
    last: list[torch.Tensor] = []

    def evaluate(generate: Callable[[list[int]], torch.Tensor]) -> float:
        def batches() -> Iterator[torch.Tensor]:
            for start in range(0, bench.fid_num, 64):
                images = generate(list(range(start, min(start + 64, bench.fid_num))))
                if start == 0:
                    last[:] = [images]
                yield images
        features = compute_features(batches(), inception, device, total=bench.fid_num,
                                    progress=progress)
        return score(features, ref)["fid"]

    for point in run_diffusers_arm(base, budgets, evaluate, device, progress=progress):
        record["points"].append(point)
        atomic_write_bytes(results_path, json.dumps(results, indent=1).encode())
        _announce("diffusers", point)
    if last:
        save_grid(last[0], out / "samples-diffusers.png", scale=max(1, 64 // max(last[0].shape[-2:])))


def _announce(name: str, point: dict[str, Any]) -> None:
    print(f"[{name}] {point['minutes']:.2f} min, {point['kimg']:.1f} kimg: FID {point['fid']:.2f}",
          flush=True)


def _evaluate(checkpoint: Path, bench: BenchConfig, ref, inception, device: torch.device,
              progress: bool) -> dict[str, Any]:
    denoiser, config = load_denoiser(checkpoint, device)
    meta = load_checkpoint(checkpoint, with_tensors=False)[1]
    features = model_features(denoiser, config.model.resolution, list(range(bench.fid_num)),
                              config.sampler, device=device, net=inception, progress=progress,
                              precision=config.precision)
    seconds = float(meta["train_seconds"])
    return {"minutes": round(seconds / 60, 4), "steps": meta["step"], "kimg": round(meta["kimg"], 3),
            "img_per_s": round(meta["kimg"] * 1000 / max(seconds, 1e-9), 2),
            "fid": round(score(features, ref)["fid"], 4)}


def _note_machine(name: str, record: dict[str, Any], machine: dict[str, Any]) -> None:
    """An arm's minutes mean something only on the machine that timed them: record it
    when the arm starts, and warn when a resumed arm goes on elsewhere."""
    if not record["points"]:
        record["machine"] = machine
        return
    timed_on = record.get("machine")  # absent in results written before machines were recorded
    if timed_on is not None and _same_machine(timed_on, machine):
        return
    before = f"{timed_on['name']} ({timed_on['precision']})" if timed_on else "an unrecorded machine"
    print(f"warning: arm {name} was timed on {before} and continues on {machine['name']} "
          f"({machine['precision']}), so its minutes mix two machines; to compare arms on this "
          "machine, run them again with another --out", file=sys.stderr, flush=True)


def _same_machine(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("device", "name", "cpu_capability", "precision", "threads")
    return all(a.get(k) == b.get(k) for k in keys)


def _settings(bench: dict[str, Any], *, budget: bool = True) -> dict[str, Any]:
    """What must match for arms to be comparable: everything but the choice of arms,
    and without ``budget`` also but the minutes and points (settings a results file
    predates take their defaults)."""
    # Results written before subset_seed existed took the first N images.
    bench = {**_jsonable(BenchConfig()), "subset_seed": None, **bench}
    ignored = ("arms", "p_values") if budget else ("arms", "p_values", "minutes", "points")
    return {k: v for k, v in bench.items() if k not in ignored}


def _extends(stored: dict[str, Any], bench: BenchConfig) -> bool:
    """Whether ``bench`` continues the stored time budget: more minutes, with the FID
    points at the same times (minutes / points unchanged), all else equal."""
    if _settings(_jsonable(bench), budget=False) != _settings(stored, budget=False):
        return False
    theirs = _settings(stored)
    if bench.kimg is not None or bench.minutes <= theirs["minutes"]:
        return False
    return math.isclose(bench.minutes / bench.points, theirs["minutes"] / theirs["points"], rel_tol=1e-9)


def _check_extendable(arms: dict[str, TrainConfig | None], records: dict[str, Any],
                      bench: BenchConfig) -> None:
    """An arm whose patch schedule follows the fraction of training done would change
    course mid-run if its budget grew: refuse to extend it (new arms start fresh)."""
    paced = [name for name, config in arms.items() if records.get(name, {}).get("points")
             and (config is None or config.patch.paced)]
    if paced:
        raise UserError(f"arm(s) {', '.join(paced)} cannot be extended to {bench.minutes:g} minutes: "
                        "their schedule (or the diffusers arm's clock) was planned for the first "
                        "budget; leave them out of --arms, or run them in a new --out")


def _jsonable(bench: BenchConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(bench)))
