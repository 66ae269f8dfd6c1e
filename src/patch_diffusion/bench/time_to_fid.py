"""Time-to-FID: train several arms one after another, each for the same training-time
budget from the same seed, and measure FID at K evenly spaced points of that time.

The clock counts training steps only (``TrainState.train_seconds``), so grids, FID
and checkpoints never eat into an arm's budget. Each arm trains in K segments that
resume bit-exactly from the previous checkpoint; after each segment the EMA weights
are scored against cached reference statistics. Results are written after every point,
so ``resume=True`` continues an interrupted benchmark.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_write_bytes, load_checkpoint
from ..config import get_preset, replace, with_data
from ..data import default_cache_dir, open_dataset
from ..devices import resolve_device
from ..errors import UserError
from ..evaluate import cached_reference, model_features, score
from ..generate import load_denoiser
from ..metrics import load_inception, load_reference
from ..patches import PatchConfig
from ..runs import latest_checkpoint
from ..train import train
from .report import write_plot, write_report

ARMS = {
    "full": PatchConfig(schedule="full"),  # plain EDM, same network and optimiser
    "patch": PatchConfig(schedule="stochastic", real_p=0.5),  # the paper's default
    "progressive": PatchConfig(schedule="progressive", real_p=0.5),
}


@dataclass(frozen=True)
class BenchConfig:
    data: str = "fashion-mnist"
    minutes: float = 12.0  # training-time budget per arm
    points: int = 3  # FID evaluations per arm, evenly spaced in training time
    fid_num: int = 1000  # generated images per FID
    arms: tuple[str, ...] = ("full", "patch", "progressive")
    p_values: tuple[float, ...] = ()  # extra stochastic arms, one per full-image ratio
    subset: int | None = None  # train on the first N images only (small-data runs)
    preset: str = "fmnist-32"
    ref_data: str | None = None  # default: the test split of a built-in set, else the data
    ref_num: int | None = None  # reference images (default: all of ref_data)
    seed: int = 0
    device: str = "auto"


def arm_configs(bench: BenchConfig) -> dict[str, PatchConfig]:
    """The arms to run, by name: the named ones, then one stochastic arm per p value."""
    unknown = [a for a in bench.arms if a not in ARMS]
    if unknown:
        raise UserError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)} "
                        "(and --p for more full-image ratios)")
    arms = {name: ARMS[name] for name in bench.arms}
    for p in bench.p_values:
        arms[f"patch-p{p:g}"] = PatchConfig(schedule="stochastic", real_p=p)
    if not arms:
        raise UserError("no arms to run; pass --arms or --p")
    return arms


def reference_data(bench: BenchConfig) -> str:
    if bench.ref_data:
        return bench.ref_data
    name, _, split = bench.data.partition(":")
    if not Path(bench.data).exists() and split in ("", "train"):
        return f"{name}:test"  # built-in sets: score against the held-out split
    return bench.data


def run_time_to_fid(bench: BenchConfig, out: Path, *, resume: bool = False,
                    progress: bool = True) -> dict[str, Any]:
    """Run (or continue) the benchmark in ``out``; returns the results dict."""
    if bench.points < 1 or bench.minutes <= 0:
        raise UserError("--points must be at least 1 and --minutes positive")
    arms = arm_configs(bench)  # bad options fail before anything is read or written
    out = Path(out)
    results_path = out / "results.json"
    if results_path.exists() and not resume:
        raise UserError(f"'{out}' already holds a benchmark; pass --resume to continue it or "
                        "choose another --out")
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if results and results.get("bench") != _jsonable(bench):
        raise UserError(f"'{out}' holds a benchmark with other settings; resume it with the same "
                        "options or choose another --out")
    results = results or {"bench": _jsonable(bench), "arms": {}}
    device = resolve_device(bench.device)

    base = with_data(get_preset(bench.preset), bench.data)
    base = replace(base, data=replace(base.data, max_images=bench.subset), seed=bench.seed,
                   device=bench.device, max_minutes=bench.minutes, duration_kimg=1e9,
                   checkpoint_kimg=1e9, sample_kimg=1e9, keep_checkpoints=1)
    resolution = open_dataset(base.data.path, resolution=base.data.resolution, fit=base.data.fit,
                              max_images=1).resolution
    ref_name = reference_data(bench)
    ref_num = bench.ref_num or len(open_dataset(ref_name))
    ref_path = cached_reference(ref_name, ref_num, tuple(resolution), base.data.fit,
                                default_cache_dir(), device=bench.device)
    ref = load_reference(ref_path)
    results["ref"] = {"data": ref_name, "num": ref_num, "path": str(ref_path)}
    inception = load_inception(None, device)

    for name, patch in arms.items():
        record = results["arms"].setdefault(name, {"points": []})
        arm_dir = out / "arms" / name
        config = replace(base, patch=patch)
        for k in range(len(record["points"]) + 1, bench.points + 1):
            previous = latest_checkpoint(arm_dir)
            train(config, arm_dir, resume_from=previous,
                  run_dir=previous.parent if previous else None,
                  stop_after_minutes=bench.minutes * k / bench.points, progress=progress)
            checkpoint = latest_checkpoint(arm_dir)
            record["points"].append(_evaluate(checkpoint, bench, ref, inception, device, progress))
            atomic_write_bytes(results_path, json.dumps(results, indent=1).encode())
            point = record["points"][-1]
            print(f"[{name}] {point['minutes']:.2f} min, {point['kimg']:.1f} kimg: FID {point['fid']:.2f}",
                  flush=True)
        grids = sorted(arm_dir.glob("*/samples-*.png"))
        if grids:
            shutil.copyfile(grids[-1], out / f"samples-{name}.png")

    atomic_write_bytes(results_path, json.dumps(results, indent=1).encode())
    write_report(results, out / "report.md")
    write_plot(results, out / "fid_vs_time.png")
    return results


def _evaluate(checkpoint: Path, bench: BenchConfig, ref, inception, device: torch.device,
              progress: bool) -> dict[str, Any]:
    denoiser, config = load_denoiser(checkpoint, device)
    meta = load_checkpoint(checkpoint, with_tensors=False)[1]
    features = model_features(denoiser, config.model.resolution, list(range(bench.fid_num)),
                              config.sampler, device=device, net=inception, progress=progress)
    seconds = float(meta["train_seconds"])
    return {"minutes": round(seconds / 60, 4), "steps": meta["step"], "kimg": round(meta["kimg"], 3),
            "img_per_s": round(meta["kimg"] * 1000 / max(seconds, 1e-9), 2),
            "fid": round(score(features, ref)["fid"], 4)}


def _jsonable(bench: BenchConfig) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(bench)))
