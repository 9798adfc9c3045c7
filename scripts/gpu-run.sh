#!/usr/bin/env bash
# The GPU measurements, in one command, on a machine with an NVIDIA GPU (driver 580+)
# and PyTorch's CUDA 13 libraries; run from the folder scripts/build-cuda.sh filled
# (.gpu/). Writes everything to gpu-results.txt beside it.
#
#   encoder and top-K speed on CUDA: users/s at batch 1, 64 and 1024 over 100k and 1M items,
#     with the scoring step's achieved memory bandwidth;
#   CPU–CUDA agreement of the encoder's outputs;
#   a fixed-rate load test of the server on the GPU (its own loopback), 100k and 1M items.
set -uo pipefail
cd "$(dirname "$0")"
out=gpu-results.txt
: >"$out"

site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
export LD_LIBRARY_PATH="$site/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
missing=$(ldd ./onrec | grep 'not found')
if [ -n "$missing" ]; then
  echo "missing libraries: $missing" | tee -a "$out"
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out"

ONREC_BENCH_DEVICE=cuda ONREC_BENCH_ITEMS=100000,1000000 ONREC_BENCH_BATCHES=1,64,1024 \
  ./encoder-bench --bench --warm-up-time 2 --measurement-time 5 2>&1 | tee -a "$out"

for items in 100000 1000000; do
  ONREC_BIN=./onrec ONREC_LOAD_SERVER_ARGS="--device cuda --demo-encoder true --demo-items $items --encoder-batch-window 200us" \
    ./load-bench --rate 2000 --seconds 30 2>&1 | tee -a "$out"
done
echo "results in $(pwd)/$out"
