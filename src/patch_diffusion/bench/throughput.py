"""Training throughput per patch size, and where a step's time goes.

For each patch size of the schedule (and full images) it times real training steps,
phase by phase: data (the step's d loader batches, to the device), patches (crops and
coordinate channels) and the optimisation step (loss, backward, Adam, EMA). The
schedule's row weights each size by its probability, as training does. A last
measurement times a pipelined loop with and without fresh data and patches, which is
what those phases really cost once the host can run ahead of the GPU. With
``profile``, torch.profiler then names the operators that take each size's step time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as profile_ops

from ..config import TrainConfig, replace
from ..devices import resolve_device, resolve_precision
from ..patches import PatchBatch, PatchConfig
from ..step import Trainer
from ..train import data_on_device, open_run_data, resolve_config

PHASES = ("data", "patches", "step")


def run_throughput(config: TrainConfig, *, steps: int = 10, warmup: int = 2,
                   profile: int = 0) -> dict[str, Any]:
    """Median phase times per patch size for ``config``'s network, batch and data, and the
    share of a pipelined training loop's time that data and patches add. The phases are
    the training loop's own (``step.Trainer``), not a copy of them. ``profile`` > 0 adds,
    per patch size, the operators that take the most time over ``steps`` more steps."""
    device = resolve_device(config.device)
    dataset = open_run_data(config.data)
    if config.patch.schedule == "full":  # still show what patches would cost
        config = replace(config, patch=PatchConfig())
    config = resolve_config(config, dataset)
    trainer = Trainer(config, device)
    schedule = trainer.schedule
    # The same data path as training (data kept on the GPU, or pinned batches).
    host_dataset, dataset = dataset, data_on_device(dataset, config, device)
    trainer.start_data(dataset, num_workers=0)
    gen = torch.Generator().manual_seed(config.seed)

    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def patches(loaded: tuple[torch.Tensor, torch.Tensor], divisor: int) -> PatchBatch:
        return trainer.patches(*loaded, divisor)

    def optimise(batch: PatchBatch) -> None:
        trainer.optimise(batch)

    load = trainer.load

    rows, cached = [], {}
    for divisor, prob in zip(schedule.divisors, schedule.probs):
        times: dict[str, list[float]] = {phase: [] for phase in PHASES}
        first_step = None
        busy: list[float] = []  # CPU seconds of all this process's threads per wall second
        for i in range(warmup + steps):
            c0 = time.process_time()
            t0 = sync()
            loaded = load(divisor)
            t1 = sync()
            batch = patches(loaded, divisor)
            t2 = sync()
            optimise(batch)
            t3 = sync()
            busy.append((time.process_time() - c0) / max(t3 - t0, 1e-9))
            if i == 0:
                first_step = t3 - t0  # includes compilation with --compile
            if i >= warmup:
                for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2)):
                    times[phase].append(seconds)
        cached[divisor] = batch
        medians = {phase: statistics.median(values) for phase, values in times.items()}
        total = sum(medians.values())
        h, w = schedule.patch_shape(divisor)
        count = config.batch_size * divisor
        rows.append({"patch": f"{h}x{w}", "divisor": divisor, "prob": prob, "images": count,
                     "pixels": count * h * w,
                     "sec_per_step": total, "img_per_s": count / total,
                     "kpix_per_s": count * h * w / total / 1000, "first_step_s": first_step,
                     "cpu_cores_busy": statistics.median(busy[warmup:]),
                     **{f"{phase}_share": medians[phase] / total for phase in PHASES}})
    mean_time = sum(r["prob"] * r["sec_per_step"] for r in rows)
    mean_images = sum(r["prob"] * r["images"] for r in rows)
    shares = {f"{phase}_share": sum(r["prob"] * r[f"{phase}_share"] * r["sec_per_step"] for r in rows) / mean_time
              for phase in PHASES}
    full = rows[-1]
    for r in rows:  # time per pixel against a full-image step's: 1.0 = patches cost just their pixels
        r["pixel_cost_vs_full"] = (r["sec_per_step"] / r["pixels"]) / (full["sec_per_step"] / full["pixels"])
    summary = {"sec_per_step": mean_time, "img_per_s": mean_images / mean_time,
               "kpix_per_s": sum(r["prob"] * r["pixels"] for r in rows) / mean_time / 1000,
               "speedup_img_per_s_vs_full": (mean_images / mean_time) / full["img_per_s"], **shares}

    # The phases above are timed with a sync between them, so they add up even where a
    # real loop overlaps host work with the GPU. The loop share instead times the same
    # draw of patch sizes back to back, once loading and cropping every step and once
    # reusing ready batches; the difference is what data and patches cost the loop.
    draws = torch.multinomial(torch.tensor(schedule.probs), max(steps * len(rows), 2),
                              replacement=True, generator=gen).tolist()
    sequence = [schedule.divisors[k] for k in draws]
    loop: dict[str, list[float]] = {"fresh": [], "cached": []}
    for _ in range(3):
        for mode in loop:
            t0 = sync()
            for divisor in sequence:
                optimise(patches(load(divisor), divisor) if mode == "fresh" else cached[divisor])
            loop[mode].append((sync() - t0) / len(sequence))
    fresh, reused = (statistics.median(loop[mode]) for mode in ("fresh", "cached"))
    summary["loop_sec_per_step"] = fresh
    summary["loop_data_patches_share"] = (fresh - reused) / fresh
    if profile:
        for row in rows:
            row["operators"] = top_operators(lambda: optimise(cached[row["divisor"]]), steps, profile, device)
    return {"device": str(device), "batch": config.batch_size, "steps": steps, "rows": rows,
            "precision": resolve_precision(config.precision, device), "compile": config.compile,
            "channels_last": trainer.memory_format == torch.channels_last,
            "data_on_device": dataset is not host_dataset, "schedule": summary}


def top_operators(step: Callable[[], None], steps: int, top: int, device: torch.device) -> list[dict[str, Any]]:
    """The ``top`` operators by their own time (self time: nested calls not counted twice),
    in ms per step, with their share of the profiled steps' total and calls per step."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()  # nothing of the profiler's own start-up in the table
    with profile_ops(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events)  # microseconds
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"op": e.key, "ms_per_step": getattr(e, attr) / steps / 1000, "share": getattr(e, attr) / total,
             "calls_per_step": e.count / steps} for e in events[:top]]


def format_table(result: dict[str, Any]) -> str:
    extras = [result["precision"]] + [name for name in ("compile", "channels_last", "data_on_device")
                                      if result[name]]
    lines = [f"device {result['device']} ({', '.join(extras)}), base batch {result['batch']}, "
             f"median of {result['steps']} steps",
             f"{'patch':>9} {'p':>5} {'images':>6} {'s/step':>8} {'img/s':>8} {'kpix/s':>8} "
             f"{'px cost':>7} {'data':>6} {'patches':>7} {'step':>6} {'cores':>5}"]
    for r in result["rows"]:
        lines.append(f"{r['patch']:>9} {r['prob']:>5.2f} {r['images']:>6} {r['sec_per_step']:>8.4f} "
                     f"{r['img_per_s']:>8.1f} {r['kpix_per_s']:>8.1f} {r['pixel_cost_vs_full']:>7.2f} "
                     f"{r['data_share']:>6.1%} {r['patches_share']:>7.1%} {r['step_share']:>6.1%} "
                     f"{r['cpu_cores_busy']:>5.2f}")
    s = result["schedule"]
    lines.append(f"{'schedule':>9} {'':>5} {'':>6} {s['sec_per_step']:>8.4f} {s['img_per_s']:>8.1f} "
                 f"{s['kpix_per_s']:>8.1f} {'':>7} {s['data_share']:>6.1%} {s['patches_share']:>7.1%} "
                 f"{s['step_share']:>6.1%}")
    lines.append(f"schedule vs full images: {s['speedup_img_per_s_vs_full']:.2f}x images/s")
    lines.append(f"in a pipelined loop ({s['loop_sec_per_step']:.4f} s/step), data + patches add "
                 f"{s['loop_data_patches_share']:.1%} of step time")
    lines.append("first step per size (compilation with --compile): "
                 + ", ".join(f"{r['patch']} {r['first_step_s']:.2f} s" for r in result["rows"]))
    for r in result["rows"]:
        if "operators" in r:
            lines.append(f"\n{r['patch']}: top operators by own time ({r['sec_per_step'] * 1000:.1f} ms/step)")
            lines.append(f"  {'operator':<44} {'ms/step':>8} {'share':>6} {'calls':>6}")
            lines += [f"  {o['op'][:44]:<44} {o['ms_per_step']:>8.2f} {o['share']:>6.1%} {o['calls_per_step']:>6.0f}"
                      for o in r["operators"]]
    return "\n".join(lines)
