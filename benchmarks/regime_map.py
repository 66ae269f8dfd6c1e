"""The regime map of issue 12 from its cells' results: for each cell (a `bench
time-to-fid` results.json of resolution x data size), full training's best FID, when
each patch arm reaches it (the time-to-FID ratio patch / full), each arm's best FID and
the ratio to full's, and memorisation when a `<cell>-memorization.json` lies beside the
results (`fid calc --checkpoint ... --memorization ... --json`, one object per arm).

Prints a Markdown table and writes one FID-against-minutes panel per cell:

    python benchmarks/regime_map.py docs/results/map-*.json --plot docs/bench-map.png

The cells, commands and machine are in BENCHMARKS.md ("The regime map").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from patch_diffusion.bench.report import plain_log_ticks, time_to_reach  # noqa: E402


def cell_rows(path: Path) -> tuple[str, list[dict]]:
    results = json.loads(path.read_text())
    bench = results["bench"]
    size = {"fmnist-32": "32x32", "emoji-64": "64x64"}.get(bench["preset"], bench["preset"])
    cell = f"{size}, {bench['data']}, {bench['subset'] or 'all'} images"
    memo_path = path.with_name(path.stem + "-memorization.json")
    memo = json.loads(memo_path.read_text()) if memo_path.is_file() else {}
    arms = results["arms"]
    full = arms.get("full", {}).get("points", [])
    if not full:
        return cell, []
    best = min(full, key=lambda p: p["fid"])
    rows = []
    for name, record in arms.items():
        points = record["points"]
        if not points:
            continue
        own_best = min(p["fid"] for p in points)
        reach = time_to_reach(points, best["fid"])
        row = {"arm": name, "minutes": points[-1]["minutes"], "best_fid": own_best,
               "best_vs_full": own_best / best["fid"], "full_best": best["fid"],
               "full_best_minutes": best["minutes"],
               "time_ratio": None if reach is None else reach / best["minutes"]}
        if name in memo:
            row.update({k: memo[name][k] for k in ("memorized_px", "memorized_inception", "nn_distance_px")
                        if k in memo[name]})
        rows.append(row)
    return cell, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--plot", type=Path)
    a = parser.parse_args()
    print("| cell | arm | trained (min) | best FID | best / full's | time to full's best / full's time | "
          "memorised (pixels / Inception) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    cells = []
    for path in a.results:
        cell, rows = cell_rows(path)
        cells.append((cell, path))
        for r in rows:
            ratio = "-" if r["arm"] == "full" else ("not reached" if r["time_ratio"] is None
                                                    else f"{r['time_ratio']:.2f}")
            memo = (f"{r['memorized_px']:.3f} / {r['memorized_inception']:.3f}"
                    if "memorized_px" in r else "")
            print(f"| {cell} | {r['arm']} | {r['minutes']:.0f} | {r['best_fid']:.2f} | "
                  f"{r['best_vs_full']:.2f} | {ratio} | {memo} |")
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 3.8), dpi=100, squeeze=False)
        for ax, (cell, path) in zip(axes[0], cells):
            results = json.loads(path.read_text())
            for name, record in results["arms"].items():
                points = record["points"]
                ax.plot([p["minutes"] for p in points], [p["fid"] for p in points], marker="o", label=name)
            ax.set_title(cell, fontsize="medium")
            ax.set_xlabel("training minutes (2-core CPU)")
            ax.set_ylabel(f"FID ({results['bench']['fid_num']} samples)")
            ax.set_yscale("log")
            plain_log_ticks(ax.yaxis)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(a.plot)
        print(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
