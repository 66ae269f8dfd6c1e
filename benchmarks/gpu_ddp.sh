#!/usr/bin/env bash
# Issue 10's GPU check, about 3 minutes on one GPU: `train` under torchrun with world
# size 1 (NCCL, bf16) runs, and its speed against plain `train` (target: within 3%),
# three alternating rounds of the fmnist-32 preset at batch 256, median img/s of the
# logged windows after the first. Prints one JSON line per round and the medians.
#
#   bash benchmarks/gpu_ddp.sh                      # on the GPU machine
#   DEVICE=cpu STEPS=40 BATCH=32 bash benchmarks/gpu_ddp.sh   # checked on a CPU
set -euo pipefail
device=${DEVICE:-cuda}
steps=${STEPS:-400}
batch=${BATCH:-256}
py=python; [ -x .venv/bin/python ] && py=.venv/bin/python
kimg=$($py -c "print(f'{$steps * $batch * 1.9 * 0.999 / 1000:.4f}')")
args=(train --preset fmnist-32 --device "$device" --precision bf16 --batch "$batch" --duration "$kimg"
      --checkpoint-every 1e9 --sample-every 1e9 --seed 0)
tmp=$(mktemp -d)
median() { $py -c "
import json, statistics, sys, pathlib
(run,) = [p for p in pathlib.Path(sys.argv[1]).iterdir() if p.is_dir()]
rows = [json.loads(l) for l in (run / 'stats.jsonl').read_text().splitlines() if 'img_per_s' in l][1:]
print(statistics.median(r['img_per_s'] for r in rows))" "$1"; }
for round in 1 2 3; do
  $py -m patch_diffusion "${args[@]}" --outdir "$tmp/plain-$round" > /dev/null 2>&1
  $py -m torch.distributed.run --nproc_per_node 1 -m patch_diffusion "${args[@]}" \
    --outdir "$tmp/torchrun-$round" > "$tmp/torchrun-$round.log" 2>&1
  grep -q "x 1 processes (" "$tmp/torchrun-$round/"*/log.txt  # the process group was opened
  echo "{\"round\": $round, \"plain_img_per_s\": $(median "$tmp/plain-$round"), \"torchrun_img_per_s\": $(median "$tmp/torchrun-$round")}"
done
rm -rf "$tmp"
