"""FID against network evaluations for every sampler, on one trained checkpoint.

For each sampler and each target number of network evaluations (NFE) the step count
whose NFE is nearest is used (Heun's 2 evaluations per step make 10 -> 5 or 6 steps,
say), the same seeds are generated and scored against one reference. Results are
written after every point, so an interrupted run continues with ``resume``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_bytes
from ..config import replace
from ..devices import resolve_device
from ..errors import UserError
from ..evaluate import model_features, score
from ..generate import load_denoiser
from ..metrics import load_inception, load_reference
from ..samplers import SAMPLERS, get_sampler


def steps_for_nfe(name: str, target: int) -> int:
    """The step count whose network evaluations come nearest ``target`` (fewer on a tie)."""
    nfe = get_sampler(name).nfe
    return min(range(1, 4 * target + 2), key=lambda steps: (abs(nfe(steps) - target), steps))


def run_sampler_sweep(checkpoint: str | Path, ref_path: str | Path, out: Path, *,
                      samplers: tuple[str, ...] = tuple(SAMPLERS), nfes: tuple[int, ...] = (10, 18, 35),
                      fid_num: int = 500, device: str = "auto", resume: bool = False,
                      progress: bool = True) -> dict[str, Any]:
    """Score every (sampler, NFE) pair; returns and writes ``results.json``."""
    for name in samplers:
        get_sampler(name)
    if not nfes or min(nfes) < 1:
        raise UserError("--nfe takes positive whole numbers, e.g. 10,18,35")
    out = Path(out)
    results_path = out / "results.json"
    settings = {"checkpoint": str(checkpoint), "ref": str(ref_path), "fid_num": fid_num}
    if results_path.exists():
        if not resume:
            raise UserError(f"'{out}' already holds a sampler sweep; pass --resume to continue it "
                            "or choose another --out")
        results = json.loads(results_path.read_text())
        if results["settings"] != settings:
            raise UserError(f"'{out}' holds a sweep of another checkpoint, reference or --fid-num; "
                            "choose another --out")
    else:
        results = {"settings": settings, "points": []}
    dev = resolve_device(device)
    net, config = load_denoiser(checkpoint, dev)
    reference = load_reference(ref_path)
    inception = load_inception(None, dev)
    done = {(p["sampler"], p["target_nfe"]) for p in results["points"]}
    for name in samplers:
        for target in nfes:
            if (name, target) in done:
                continue
            steps = steps_for_nfe(name, target)
            sampler = replace(config.sampler, name=name, num_steps=steps)
            feats = model_features(net, config.model.resolution, list(range(fid_num)), sampler,
                                   device=dev, net=inception, progress=progress, precision=config.precision)
            point = {"sampler": name, "target_nfe": target, "steps": steps,
                     "nfe": get_sampler(name).nfe(steps), "fid": round(score(feats, reference)["fid"], 4)}
            results["points"].append(point)
            atomic_write_bytes(results_path, json.dumps(results, indent=1).encode())
            print(f"[{name}] {point['nfe']} evaluations ({steps} steps): FID {point['fid']:.2f}", flush=True)
    write_sweep_report(results, out / "report.md")
    write_sweep_plot(results, out / "fid_vs_nfe.png")
    return results


def _by_sampler(results: dict[str, Any]) -> dict[str, list[dict]]:
    """The sweep's points per sampler, in order of network evaluations."""
    by_sampler: dict[str, list[dict]] = {}
    for p in results["points"]:
        by_sampler.setdefault(p["sampler"], []).append(p)
    return {name: sorted(points, key=lambda p: p["nfe"]) for name, points in by_sampler.items()}


def write_sweep_report(results: dict[str, Any], path: Path) -> None:
    by_sampler = _by_sampler(results)
    s = results["settings"]
    lines = ["# FID against network evaluations", "",
             f"Checkpoint `{s['checkpoint']}`, {s['fid_num']} samples against `{s['ref']}`.", "",
             "| sampler | NFE (steps): FID |", "| --- | --- |"]
    for name, points in by_sampler.items():
        cells = ", ".join(f"{p['nfe']} ({p['steps']}): {p['fid']:.2f}" for p in points)
        lines.append(f"| {name} | {cells} |")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def write_sweep_plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, points in _by_sampler(results).items():
        ax.plot([p["nfe"] for p in points], [p["fid"] for p in points], marker="o", label=name)
    ax.set_xlabel("network evaluations per image")
    ax.set_ylabel(f"FID ({results['settings']['fid_num']} samples)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


