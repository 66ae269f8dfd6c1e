"""The time-to-FID report: a table, time-to-reach ratios against the full-image arm, a plot."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_bytes


def time_to_reach(points: list[dict[str, Any]], level: float) -> float | None:
    """Training minutes at which an arm's FID first falls to ``level``, interpolating
    linearly between evaluation points; None if it never does."""
    previous = None
    for point in points:
        if point["fid"] <= level:
            if previous is None or previous["fid"] == point["fid"]:
                return point["minutes"]
            frac = (previous["fid"] - level) / (previous["fid"] - point["fid"])
            return previous["minutes"] + frac * (point["minutes"] - previous["minutes"])
        previous = point
    return None


def machine_label(machine: dict[str, Any]) -> str:
    """A recorded machine in a few words: the GPU, or the CPU with its vector instructions."""
    if machine["device"] == "cpu":
        return f"{machine['name']} ({machine['cpu_capability']})"
    return machine["name"]


def _machines(arms: dict[str, Any]) -> list[str]:
    """One line per machine that timed arms (recorded since 2026-12-07), naming the arms
    when there were several: minutes from two machines do not compare."""
    timed: dict[str, list[str]] = {}
    for name, record in arms.items():
        m = record.get("machine")
        if m:
            timed.setdefault(f"{machine_label(m)}, {m['precision']}, {m['threads']} threads, torch {m['torch']}",
                             []).append(name)
    if len(timed) == 1:
        return [f"Timed on {next(iter(timed))}.", ""]
    return [f"Arms {', '.join(names)} timed on {where}." for where, names in timed.items()] + (
        [""] if timed else [])


def write_report(results: dict[str, Any], path: Path) -> None:
    arms = results["arms"]
    bench = results["bench"]
    budget = (f"{bench['kimg']:g} kimg (thousand images) per arm" if bench.get("kimg")
              else f"{bench['minutes']:g} training minutes per arm")
    lines = [
        "# Time-to-FID",
        "",
        f"Data `{bench['data']}`" + (_subset(bench) if bench.get("subset") else "")
        + f", preset `{bench['preset']}`, {budget}, seed {bench['seed']}; "
        f"FID of {bench['fid_num']} generated images against {results['ref']['num']} images of "
        f"`{results['ref']['data']}`.",
        "",
        *_machines(arms),
        "| arm | " + " | ".join(f"point {i + 1}" for i in range(bench["points"])) + " | img/s |",
        "| --- | " + " | ".join("---" for _ in range(bench["points"])) + " | --- |",
    ]
    for name, record in arms.items():
        cells = [f"{p['fid']:.2f} @ {p['minutes']:.1f} min, {p['steps']} steps, {p['kimg']:.0f} kimg"
                 for p in record["points"]]
        cells += ["" for _ in range(bench["points"] - len(cells))]
        rate = record["points"][-1]["img_per_s"] if record["points"] else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rate} |")
    full = arms.get("full", {}).get("points", [])
    if bench.get("kimg"):
        lines += fixed_budget_table(arms)
    if full:
        lines += ["", "Training time to reach the full-image arm's FID at each of its points, "
                  "relative to the full arm (below 1 = faster; linear interpolation between points):", "",
                  "| FID level | " + " | ".join(arms) + " |", "| --- | " + " | ".join("---" for _ in arms) + " |"]
        for point in full:
            level = point["fid"]
            reference = time_to_reach(full, level)
            cells = []
            for record in arms.values():
                t = time_to_reach(record["points"], level)
                # Below the level already at the first point: it got there sooner, by how much is unknown.
                early = t is not None and record["points"][0]["fid"] < level and t == record["points"][0]["minutes"]
                cells.append("not reached" if t is None else
                             f"{'≤ ' if early else ''}{t / reference:.2f}x ({t:.1f} min)")
            lines.append(f"| {level:.2f} | " + " | ".join(cells) + " |")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def _subset(bench: dict[str, Any]) -> str:
    seed = bench.get("subset_seed")
    return (f" ({bench['subset']} images drawn with seed {seed})" if seed is not None
            else f" (first {bench['subset']} images)")


def fixed_budget_table(arms: dict[str, Any]) -> list[str]:
    """Final FID and training time of each arm after the same images, with both ratios
    against the full-image arm (the layout of the paper's Table 1)."""
    full = arms.get("full", {}).get("points", [])
    lines = ["", "After the same number of images: final FID and training time, each relative to "
             "the full-image arm (time below 1 = faster, FID below 1 = better):", "",
             "| arm | kimg | FID | training min | FID / full | time / full |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, record in arms.items():
        if not record["points"]:
            continue
        last = record["points"][-1]
        ratios = ["", ""]
        if full:  # every arm stops at the first step past the budget: kimg agree to one step
            ratios = [f"{last['fid'] / full[-1]['fid']:.2f}", f"{last['minutes'] / full[-1]['minutes']:.2f}"]
        lines.append(f"| {name} | {last['kimg']:g} | {last['fid']:.2f} | {last['minutes']:.2f} | "
                     + " | ".join(ratios) + " |")
    return lines


def plain_log_ticks(axis: Any) -> None:
    """Label a log axis with plain numbers (60, 80, 100, 150) instead of powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    # Dense enough that a narrow FID range (80-125) still shows two labels or more.
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)))
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(FuncFormatter(lambda value, _: ""))


def write_plot(results: dict[str, Any], path: Path) -> None:
    """FID against training minutes, one line per arm (log scale)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    # Left: what the benchmark is about (time). Right: the same points per optimisation
    # step, which separates "cheaper steps" from "better steps".
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100, sharey=True)
    for name, record in results["arms"].items():
        points = record["points"]
        fids = [p["fid"] for p in points]
        line, = axes[0].plot([p["minutes"] for p in points], fids, marker="o", label=name)
        axes[1].plot([p["steps"] for p in points], fids, marker="o", color=line.get_color())
    axes[0].set_xlabel("training minutes")
    axes[1].set_xlabel("optimisation steps")
    axes[0].set_ylabel(f"FID ({results['bench']['fid_num']} samples)")
    for ax in axes:
        ax.set_yscale("log")
        plain_log_ticks(ax.yaxis)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
