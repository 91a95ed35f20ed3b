#!/usr/bin/env bash
# Builds the CUDA wheels of fused_resnet: one per (torch, CUDA, Python), the strategy of docs/design.md
# (item 9: the extension uses ATen's full C++ API, not the LibTorch stable ABI, so a wheel works with the
# torch it was built against only). For each (Python, torch, CUDA) in the matrix it makes a virtual
# environment with that torch from PyTorch's index for that CUDA, builds the wheel against it with the
# CUDA kernels (FORCE_CUDA=1: no silent CPU-only wheel), and checks that the wheel imports there with the
# torch it was built for. Wheels land in dist/<cuda>/ (one folder per CUDA, as PyTorch's own indexes are:
# serve each as `pip install fused-resnet --extra-index-url <yours>/<cuda>`), named with a local version
# label saying what they are built against (0.1.0+torch2.14.1cu130) and requiring exactly that torch
# (Requires-Dist: torch==2.14.1), so pip installs that torch with it and `pip check` flags another.
#
# Needs, on a Linux x86_64 machine (no GPU needed): the CUDA toolkits of the matrix (CUDA_HOME_<cuda>, e.g.
# CUDA_HOME_cu130=/usr/local/cuda-13.0, default /usr/local/cuda-<x.y>), the Python interpreters
# (python3.11 ...), a C++ compiler, network access to download.pytorch.org.
#
#   bash scripts/build_cuda_wheels.sh                          # the default matrix below
#   MATRIX="3.11:2.14.1:cu130 3.12:2.14.1:cu128" bash scripts/build_cuda_wheels.sh
#   TORCH_CUDA_ARCH_LIST="8.0;9.0;10.0+PTX" MAX_JOBS=8 bash scripts/build_cuda_wheels.sh
#   DRY_RUN=1 bash scripts/build_cuda_wheels.sh                # print the plan only
#   TORCH_INDEX= MATRIX="3.11:2.14.1:cu130" bash scripts/build_cuda_wheels.sh   # torch from pip's own
#       configuration (a mirror, a local wheel cache) instead of download.pytorch.org/whl/<cuda>
# For manylinux-tagged wheels, run it inside PyTorch's manylinux builder image and `auditwheel repair
# --exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude _C_ops.so` the results (torch's libraries come
# from torch; fused_resnet/_C_ops.so is the wheel's own, found by _C beside it through its RUNPATH $ORIGIN).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MATRIX="${MATRIX:-3.11:2.14.1:cu130 3.12:2.14.1:cu130 3.11:2.14.1:cu128}"
# 8.0 A100 (and later GPUs through PTX), 9.0 H100/H200.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
OUT="${OUT:-dist}"
TORCH_INDEX="${TORCH_INDEX-https://download.pytorch.org/whl}"  # set empty: pip's configured index
WORK="${WORK:-build/cuda-wheels}"
mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)"  # absolute: the import check runs from /

for entry in $MATRIX; do
  IFS=: read -r python torch_version cuda <<<"$entry"
  case "$cuda" in cu[0-9][0-9][0-9]) ;; *) echo "bad CUDA tag '$cuda' in '$entry' (want e.g. cu130)" >&2; exit 2 ;; esac
  dotted="${cuda:2:2}.${cuda:4}"
  home_var="CUDA_HOME_$cuda"
  cuda_home="${!home_var:-/usr/local/cuda-$dotted}"
  venv="$WORK/py$python-torch$torch_version-$cuda"
  echo "=== Python $python, torch $torch_version, CUDA $dotted ($cuda_home) -> $OUT/$cuda/ ==="
  if [ -n "${DRY_RUN:-}" ]; then continue; fi
  [ -x "$cuda_home/bin/nvcc" ] || { echo "no CUDA toolkit at $cuda_home (set $home_var)" >&2; exit 1; }
  [ -x "$venv/bin/python" ] || "python$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip "setuptools>=64" wheel ninja
  "$venv/bin/python" -m pip install --quiet "torch==$torch_version" \
    ${TORCH_INDEX:+--index-url "$TORCH_INDEX/$cuda"}
  mkdir -p "$OUT/$cuda"
  # build/torch<version>-<cuda>/ keeps each torch's objects apart (setup.py); a clean build per entry.
  CUDA_HOME="$cuda_home" FORCE_CUDA=1 FUSED_RESNET_LOCAL_VERSION=1 PATH="$cuda_home/bin:$PATH" \
    "$venv/bin/python" -m pip wheel . --no-build-isolation --no-deps -w "$OUT/$cuda"
  wheel="$(ls -t "$OUT/$cuda"/fused_resnet-*+torch"$torch_version$cuda"-cp"${python/./}"-*.whl | head -n 1)"
  # The wheel in its own torch's environment: imports from site-packages with the CUDA kernels built in.
  "$venv/bin/python" -m pip install --quiet --no-deps --force-reinstall "$wheel"
  (cd / && "$venv/bin/python" -c "
import fused_resnet, fused_resnet._C as C
assert 'site-packages' in fused_resnet.__file__ and C.WITH_CUDA, (fused_resnet.__file__, C.CUDA_SKIP_REASON)
print('ok', fused_resnet.__version__)")
  # Its ops library needs no Python (loadable from C++: docs/design.md, decision 7).
  ops_lib="$(cd / && "$venv/bin/python" -c 'import pathlib, fused_resnet; print(pathlib.Path(fused_resnet.__file__).parent / "_C_ops.so")')"
  if readelf -d "$ops_lib" | grep -E 'NEEDED.*(libpython|libtorch_python)'; then
    echo "$ops_lib links Python" >&2; exit 1
  fi
  echo "built $wheel"
done
