#!/usr/bin/env bash
# Compile-only check of the CUDA sources of the native extension's library _C_ops (csrc/**/*.cu,
# and the host files of csrc/cuda with the CUDA headers) against the installed torch's headers, for sm_80 and
# sm_90, with no GPU and no CUDA build of torch: a syntax, template or device-code error fails.
#
# Needs: nvcc (CUDA >= 12) on PATH or at $CUDA_HOME/bin, and torch importable by $PYTHON.
# Usage: .ci/cuda_compile_check.sh            (archs from CUDA_ARCHS, default "80 90")
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="${NVCC:-$(command -v nvcc || echo "$CUDA_HOME/bin/nvcc")}"
ARCHS="${CUDA_ARCHS:-80 90}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

read -r -a INCLUDES < <("$PYTHON" - <<'PY'
from torch.utils.cpp_extension import include_paths
# No Python headers: the CUDA kernels are part of fused_resnet/_C_ops.so, which has no Python in it
# (docs/design.md, decision 7; the router reaches Python through a hook that the pybind module sets).
print(" ".join(include_paths()))
PY
)
ABI="$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
INC=()
for d in "${INCLUDES[@]}"; do INC+=("-I$d"); done
GENCODE=()
for a in $ARCHS; do GENCODE+=("-gencode=arch=compute_$a,code=sm_$a"); done
# torch's CPU wheels lack the CMake-generated cuda_cmake_macros.h: this define stands in for it.
COMMON=(-std=c++20 -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE "-D_GLIBCXX_USE_CXX11_ABI=$ABI" -DFR_WITH_CUDA
        -I"$CUDA_HOME/include" "${INC[@]}")

echo "nvcc: $NVCC ($("$NVCC" --version | tail -1)); archs: $ARCHS"
status=0
shopt -s nullglob globstar
for src in "$ROOT"/csrc/**/*.cu; do
  echo "  nvcc -c ${src#"$ROOT"/}"
  "$NVCC" -c "$src" -o "$OUT/$(basename "$src").o" "${COMMON[@]}" "${GENCODE[@]}" -O3 --expt-relaxed-constexpr \
    -Xcompiler -fPIC || status=1
done
# The CUDA host files (csrc/cuda/*.cpp) are compiled by the host compiler in a real build: check
# them the same way, with the CUDA runtime headers visible.
for src in "$ROOT"/csrc/cuda/*.cpp; do
  echo "  ${CXX:-c++} -fsyntax-only ${src#"$ROOT"/}"
  "${CXX:-c++}" -fsyntax-only "$src" "${COMMON[@]}" || status=1
done
if [ "$status" -ne 0 ]; then echo "CUDA compile check FAILED"; else echo "CUDA compile check passed"; fi
exit "$status"
