#!/usr/bin/env bash
# Provisions a CUDA 13.0 build toolchain from PyPI wheels (no GPU and no system CUDA
# needed) for candle 0.11's `cuda` feature, and prints the exports that select it.
#
#   eval "$(scripts/cuda-toolchain.sh .cuda)"
#
# Every version stays at 13.0: a newer nvcc emits PTX that driver 580 rejects. The
# libcuda.so it writes under lib/stubs is a link-time stub (candle links the driver
# dynamically); it must never be on a runtime library path.
set -euo pipefail
PREFIX=${1:?usage: $0 PREFIX}
C=$PREFIX/nvidia/cu13
if [ ! -x "$C/bin/nvcc" ]; then
  python3 -m pip install -q --no-deps --no-compile --target "$PREFIX" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88 >&2
fi
cd "$C/lib"
for l in cudart.so.13 cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13; do ln -sf "lib$l" "lib${l%%.so*}.so"; done
mkdir -p stubs
R=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 | head -1)
[ -n "$R" ] || { echo "run 'cargo fetch' first: cudarc 0.19.10 sources not found" >&2; exit 1; }
grep -ohE '^\s+fn (cu[A-Za-z0-9_]+)\(' "$R/src/driver/sys/mod.rs" | sed -E 's/^\s+fn ([A-Za-z0-9_]+)\(/\1/' \
  | sort -u | awk '{print "void " $1 "(void) {}"}' > stubs/libcuda_stub.c
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o stubs/libcuda.so stubs/libcuda_stub.c
echo "export CUDA_HOME=$C PATH=$C/bin:\$PATH CUDA_COMPUTE_CAP=90"
