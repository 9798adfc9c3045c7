#!/usr/bin/env bash
# Builds onrec with the `cuda` feature on a machine without a GPU or a CUDA install:
# provisions the CUDA 13.0 toolchain from PyPI wheels into .cuda/ (about 1.2 GB, once),
# builds the release binary and the GPU benchmark binaries, strips them, and puts them in
# .gpu/ with scripts/gpu-run.sh, ready to copy to a GPU machine.
#
#   scripts/build-cuda.sh            then, on the GPU machine:   .gpu/gpu-run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fetch --locked
eval "$(scripts/cuda-toolchain.sh "$PWD/.cuda")"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$CUDA_HOME/lib/stubs -L native=$CUDA_HOME/lib"
cargo build --release --locked --features cuda --bin onrec
cargo bench --locked --features cuda --no-run --bench encoder --bench load 2>&1 | tee .cuda/bench-build.log

mkdir -p .gpu
cp target/release/onrec .gpu/onrec
for bench in encoder load; do
  exe=$(grep -oE "target/release/deps/$bench-[0-9a-f]+" .cuda/bench-build.log | tail -1)
  cp "$exe" ".gpu/$bench-bench"
done
strip .gpu/onrec .gpu/encoder-bench .gpu/load-bench
cp scripts/gpu-run.sh .gpu/
ls -la .gpu
