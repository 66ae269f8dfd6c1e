"""One process against two gloo processes (torchrun) at the same global batch on this
machine: training speed, and how much of a two-process step is the exchange.

Three ways to train the fmnist-32 preset, each for --steps steps, in alternating rounds:
  one       1 process, all cores, batch B
  two       torchrun, 2 processes of 1 thread each, global batch B (B/2 each)
  half      1 process, 1 thread, batch B/2: what each of the two computes, without the
            gradient exchange and the agreed decisions
so (two - half) / two per step is the share of a two-process step spent communicating
and waiting for the slower process. Seconds per step are the medians of the logged
windows after the first.

    python benchmarks/ddp_cpu.py --rounds 3 --steps 120 --out docs/results/ddp-cpu.json

Results and the machine are in BENCHMARKS.md ("Several processes").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(kind: str, schedule: list[str], multiplier: int, steps: int, batch: int, folder: Path) -> float:
    """Median seconds per step of one training run of ``kind``."""
    if kind == "half":
        batch //= 2
    duration = steps * batch * multiplier * 0.999 / 1000  # kimg, as the run counts images
    args = ["train", "--preset", "fmnist-32", "--device", "cpu", "--workers", "0", "--seed", "0",
            "--batch", str(batch), "--duration", f"{duration:.6f}", "--checkpoint-every", "1e9",
            "--sample-every", "1e9", "--outdir", str(folder), *schedule]
    env = dict(os.environ, OMP_NUM_THREADS="1") if kind != "one" else dict(os.environ)
    if kind == "two":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", "--master_port=29611", "-m", "patch_diffusion", *args]
    else:
        cmd = [sys.executable, "-m", "patch_diffusion", *args]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (run_dir,) = [p for p in folder.iterdir() if p.is_dir()]
    records = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    return statistics.median([r["sec_per_step"] for r in records if "sec_per_step" in r][1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path)
    a = parser.parse_args()
    schedules = {"full": (["--schedule", "full"], 1), "8x8": (["--patch-sizes", "8", "--real-p", "0"], 4)}
    rows = []
    for name, (schedule, multiplier) in schedules.items():
        times: dict[str, list[float]] = {"one": [], "two": [], "half": []}
        for _ in range(a.rounds):
            for kind in times:
                with tempfile.TemporaryDirectory() as tmp:
                    times[kind].append(run(kind, schedule, multiplier, a.steps, a.batch, Path(tmp)))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"schedule": name, "sec_per_step": med, "all": times,
               "two_vs_one_speed": round(med["one"] / med["two"], 3),
               "exchange_share_of_two": round((med["two"] - med["half"]) / med["two"], 3)}
        rows.append(row)
        print(json.dumps(row))
    if a.out:
        a.out.write_text(json.dumps({"command": " ".join(sys.argv), "batch": a.batch, "steps": a.steps,
                                     "rounds": a.rounds, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
