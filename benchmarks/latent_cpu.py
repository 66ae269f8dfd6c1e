"""Latent against pixel training of the same 64x64 data (the built-in emoji set), with a
small randomly initialised AutoencoderKL (4x down-sampling, 4 latent channels): the
one-time encode cost, and the training speed of the emoji-64 preset on 64x64x3 pixels
against 16x16x4 latents, in alternating rounds (medians of the logged windows after
the first). No pretrained VAE can be downloaded here, so the encode and decode costs
are those of this small VAE, not of a production one (SD's VAE is far larger).

    python benchmarks/latent_cpu.py --rounds 3 --steps 150 --out docs/results/latent-cpu.json

Results and the machine are in BENCHMARKS.md ("Latent space").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def small_vae(folder: Path) -> None:
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, sample_size=64)
    vae.save_pretrained(folder, safe_serialization=True)


def cli(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "patch_diffusion", *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def train(data: str, steps: int, folder: Path) -> dict:
    duration = steps * 16 * 1.9 * 0.999 / 1000  # emoji-64: batch 16, expected multiplier about 1.9
    cli("train", "--preset", "emoji-64", "--data", data, "--device", "cpu", "--workers", "0", "--seed", "0",
        "--duration", f"{duration:.6f}", "--checkpoint-every", "1e9", "--sample-every", "1e9",
        "--outdir", str(folder))
    (run_dir,) = [p for p in folder.iterdir() if p.is_dir()]
    records = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    windows = [r for r in records if "sec_per_step" in r][1:]
    return {"sec_per_step": statistics.median(r["sec_per_step"] for r in windows),
            "img_per_s": statistics.median(r["img_per_s"] for r in windows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path)
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        small_vae(root / "vae")
        encode_s = cli("encode", "--data", "emoji", "--vae", str(root / "vae"), "--out", str(root / "lat"),
                       "--device", "cpu", "--batch", "64")
        header = json.loads((root / "lat" / "latents.json").read_text())
        results: dict[str, list[dict]] = {"pixels": [], "latents": []}
        for k in range(a.rounds):
            for kind, data in (("pixels", "emoji"), ("latents", str(root / "lat"))):
                results[kind].append(train(data, a.steps, root / f"{kind}-{k}"))
        summary = {kind: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
                   for kind, rows in results.items()}
    row = {"encode_seconds": round(encode_s, 1), "images": header["images"], "latent_shape": header["shape"],
           "encode_img_per_s": round(header["images"] / encode_s, 1), "medians": summary, "all": results,
           "latent_vs_pixel_speed": round(summary["pixels"]["sec_per_step"] / summary["latents"]["sec_per_step"], 2)}
    print(json.dumps(row))
    if a.out:
        a.out.write_text(json.dumps({"command": " ".join(sys.argv), "steps": a.steps, "rounds": a.rounds,
                                     **row}, indent=1) + "\n")


if __name__ == "__main__":
    main()
