#!/usr/bin/env bash
# Issue 12's GPU run, at most about 9 minutes on one H100/H200 (references and FID
# included): full against patch (p = 0.5) and R/2-only patches ("half"), in bf16, on 500
# Fashion-MNIST images at 32x32, then on 1,000 emoji at 64x64. Each arm trains MINUTES
# of training time, long enough on a GPU for thousands of passes over the small sets.
# Not compiled by default: compilation counts against the training clock and took about
# 45 s per patch size on an H200 (DEVELOPERS.md), more than a 48 s arm; COMPILE=--compile
# with MINUTES=5 or more makes it pay (one data set per run, then).
#
#   bash benchmarks/gpu_regime.sh OUT_DIR            # on the GPU machine
#   MINUTES=0.05 POINTS=1 FID_NUM=50 REF_NUM=100 DEVICE=cpu PRECISION=auto \
#     bash benchmarks/gpu_regime.sh /tmp/gpu-check   # the same script, checked on a CPU
#
# Results: OUT_DIR/{fmnist-500,emoji-1000}/results.json (copy them to docs/results/).
set -euo pipefail
out=${1:?usage: gpu_regime.sh OUT_DIR}
minutes=${MINUTES:-0.8}
points=${POINTS:-3}
fid_num=${FID_NUM:-1000}
ref_num=${REF_NUM:-2000}
device=${DEVICE:-cuda}
precision=${PRECISION:-bf16}
compile=${COMPILE:-}
pd=(python -m patch_diffusion)
[ -x .venv/bin/python ] && pd=(.venv/bin/python -m patch_diffusion)
common=(--minutes "$minutes" --points "$points" --arms full,patch,half --fid-num "$fid_num"
        --ref-num "$ref_num" --precision "$precision" --device "$device" $compile --resume)
start=$(date +%s)
"${pd[@]}" bench time-to-fid --data fashion-mnist --subset 500 --preset fmnist-32 \
  --out "$out/fmnist-500" "${common[@]}"
"${pd[@]}" bench time-to-fid --data emoji --subset 1000 --preset emoji-64 \
  --out "$out/emoji-1000" "${common[@]}"
echo "gpu_regime.sh: $(( $(date +%s) - start )) s in all"
