"""The regime map of issue 12 from its cells' results.

A cell is one resolution x data set x data size x settings. Several `bench
time-to-fid` results files of the same cell (e.g. the full and patch arms in one, a
hypothesis arm run later in another) are merged into one cell. For each cell it reports
full training's best FID, each other arm's best FID and its ratio to full's, and the
time-to-FID ratio: how long the arm took to reach the FID full training had after t
minutes, divided by t, for every t full was evaluated at (the "length" axis of the map:
early in training and near full's plateau). Memorisation is added when a
`<results>-memorization.json` lies beside a results file (`fid calc --checkpoint ...
--memorization ... --json`, one object per arm).

Prints two Markdown tables and, with --plot, draws one FID-against-minutes panel per
cell and one panel of the time-to-FID ratios of every cell against training length:

    python benchmarks/regime_map.py docs/results/map-*.json docs/results/cpu-45min.json --plot docs/bench-map.png

The cells, commands and machine are in BENCHMARKS.md ("The regime map").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from patch_diffusion.bench.report import machine_label, plain_log_ticks, time_to_reach  # noqa: E402

# What makes two results files one cell: everything but the arms and their budget.
_NOT_THE_CELL = ("arms", "p_values", "minutes", "points", "kimg")
_SIZES = {"fmnist-32": "32x32", "emoji-64": "64x64", "celeba-64": "64x64"}


def cell_name(bench: dict, machine: dict | None = None) -> str:
    size = _SIZES.get(bench["preset"], bench["preset"])
    subset = bench.get("subset")
    if subset is None:
        images = "all images"
    elif bench.get("subset_seed") is None:  # absent: written before subsets were drawn at random
        images = f"first {subset} images"
    else:
        images = f"{subset} images"
    if machine:  # recorded since 2026-12-07; the earlier cells all ran on the Xeon of BENCHMARKS.md
        extra = f", {machine_label(machine)}, {machine['precision']}"
    else:
        extra = "" if bench.get("precision", "fp32") == "auto" else f", {bench.get('precision', 'fp32')}"
    return f"{size} {bench['data']}, {images}{extra}"


def timed_on(results: dict) -> dict | None:
    """The machine that timed every arm of a results file, or None if not recorded
    (or if arms were timed on different machines)."""
    machines = [record.get("machine") for record in results["arms"].values()]
    if machines and all(m is not None and m == machines[0] for m in machines):
        return machines[0]
    return None


def load_cells(paths: list[Path]) -> dict[str, dict]:
    """Cells by name: {"bench": settings, "arms": {name: points}, "memo": {name: stats}}.
    Of an arm found in several files, the longest run is kept."""
    cells: dict[str, dict] = {}
    keys: dict[str, dict] = {}
    for path in paths:
        results = json.loads(path.read_text())
        bench = results["bench"]
        if bench.get("kimg"):
            continue  # a fixed image budget is not a time-to-FID cell
        name = cell_name(bench, timed_on(results))
        key = {k: v for k, v in bench.items() if k not in _NOT_THE_CELL}
        if name in keys and keys[name] != key:
            raise SystemExit(f"{path}: same cell name as an earlier file but other settings; "
                             "give them apart or leave one out")
        keys[name] = key
        cell = cells.setdefault(name, {"bench": bench, "arms": {}, "memo": {}})
        for arm, record in results["arms"].items():
            points = record["points"]
            if points and len(points) > len(cell["arms"].get(arm, [])):
                cell["arms"][arm] = points
        # full first, whatever order the arms ran in, so colours and rows match across cells
        cell["arms"] = dict(sorted(cell["arms"].items(), key=lambda item: item[0] != "full"))
        memo_path = path.with_name(path.stem + "-memorization.json")
        if memo_path.is_file():
            cell["memo"].update(json.loads(memo_path.read_text()))
    return cells


def ratios(full: list[dict], points: list[dict]) -> list[tuple[float, float | None]]:
    """(t, time the arm took to reach full's FID at t, over t) for each of full's points."""
    out = []
    for p in full:
        reach = time_to_reach(points, p["fid"])
        out.append((p["minutes"], None if reach is None else reach / p["minutes"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--plot", type=Path)
    a = parser.parse_args()
    cells = {name: c for name, c in load_cells(a.results).items() if c["arms"].get("full")}

    print("| cell | arm | trained (min) | best FID | best / full's | time to full's best / full's time | "
          "memorised (pixels / Inception) | nearest-neighbour distance (pixels) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, cell in cells.items():
        full = cell["arms"]["full"]
        best = min(full, key=lambda p: p["fid"])
        for arm, points in cell["arms"].items():
            own = min(p["fid"] for p in points)
            reach = time_to_reach(points, best["fid"])
            ratio = "-" if arm == "full" else ("not reached" if reach is None else f"{reach / best['minutes']:.2f}")
            m = cell["memo"].get(arm, {})
            memo = (f"{m['memorized_px']:.1%} / {m['memorized_inception']:.1%}" if "memorized_px" in m else "")
            dist = f"{m['nn_distance_px']:.2f}" if "nn_distance_px" in m else ""
            print(f"| {name} | {arm} | {points[-1]['minutes']:.0f} | {own:.2f} | {own / best['fid']:.2f} | "
                  f"{ratio} | {memo} | {dist} |")

    print("\nTime to reach full training's FID at t minutes, over t (below 1: the arm is faster):\n")
    print("| cell | arm | full's minutes t: ratio |")
    print("| --- | --- | --- |")
    for name, cell in cells.items():
        full = cell["arms"]["full"]
        for arm, points in cell["arms"].items():
            if arm == "full":
                continue
            cols = ", ".join(f"{t:.0f}: {'-' if r is None else f'{r:.2f}'}" for t, r in ratios(full, points)
                             if t <= points[-1]["minutes"] * 1.001 or r is not None)
            print(f"| {name} | {arm} | {cols} |")

    if a.plot:
        plot(cells, a.plot)
        print(f"\nplot: {a.plot}")


def plot(cells: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(cells) + 1
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.9 * rows), dpi=100, squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax, (name, cell) in zip(axes, cells.items()):
        for arm, points in cell["arms"].items():
            ax.plot([p["minutes"] for p in points], [p["fid"] for p in points], marker="o", label=arm)
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("training minutes (2-core CPU)")
        ax.set_ylabel(f"FID ({cell['bench']['fid_num']} samples)")
        ax.set_yscale("log")
        plain_log_ticks(ax.yaxis)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    ax = axes[n - 1]
    for name, cell in cells.items():
        full = cell["arms"]["full"]
        for arm, points in cell["arms"].items():
            if arm == "full":
                continue
            pts = [(t, r) for t, r in ratios(full, points) if r is not None]
            if pts:
                ax.plot([t for t, _ in pts], [r for _, r in pts], marker="o", label=f"{name}: {arm}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(0.5, color="black", lw=0.8, ls="--")
    ax.set_title("time to full's FID at t, over t\n(below 1: faster than full; dashed: the 0.5x target)",
                 fontsize="medium")
    ax.set_xlabel("t: full training's minutes")
    ax.set_ylabel("patch arm time / full time")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
