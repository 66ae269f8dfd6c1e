"""One picture of the component benchmark: FID against training minutes, full vs patch,
one panel per backbone / preconditioning, from the results.json files that
`patch-diffusion bench time-to-fid` wrote (kept under docs/results/).

    python benchmarks/plot_components.py docs/results/components-*.json --out docs/bench-components.png
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from patch_diffusion.checkpoint import atomic_write_bytes  # noqa: E402


def title(results: dict) -> str:
    bench = results["bench"]
    return f"{bench.get('backbone') or 'ddpmpp'} / {bench.get('precond') or 'edm'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = [json.loads(p.read_text()) for p in args.results]
    fig, axes = plt.subplots(1, len(runs), figsize=(3.6 * len(runs), 3.4), dpi=100, sharey=True,
                             squeeze=False)
    for ax, results in zip(axes[0], runs):
        for name, record in results["arms"].items():
            points = record["points"]
            ax.plot([p["minutes"] for p in points], [p["fid"] for p in points],
                    marker="o", label=name)
        ax.set_title(title(results), fontsize="medium")
        ax.set_xlabel("training minutes (2 CPU cores)")
        ax.grid(True, alpha=0.3)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel(f"FID ({runs[0]['bench']['fid_num']} samples)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(args.out, buffer.getvalue())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
