#!/usr/bin/env bash
# Installs what fused_resnet needs, idempotently, into one Python environment ($PYTHON, default python3):
#   torch   FUSED_RESNET_TORCH_REQS if set (pinned requirements, e.g. "torch==2.14.1 torchvision==0.29.1
#           timm"; pip leaves them alone when already satisfied); else only if none is importable, then
#           the pinned CPU build 2.13.0 (an unpinned `pip install torch` would pull gigabytes of CUDA
#           packages); a present torch (e.g. a CUDA build on a GPU machine) is kept;
#   triton, ninja and the test/train tools;
#   the package itself, editable (once: `pip install -e` with FUSED_RESNET_SKIP_EXT=1, metadata only),
#   then its native extension built in place against this torch (`setup.py build_ext --inplace`: objects
#   under build/torch<version>/, so rebuilding for a torch built before only relinks, and the in-place
#   _C*.so and _C_ops.so always match the torch of the last install).
# Usage: scripts/install.sh            (FUSED_RESNET_SKIP_EXT=1 for a pure-Python install)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
pip() { "$PYTHON" -m pip install --quiet --disable-pip-version-check "$@"; }

if [ -n "${FUSED_RESNET_TORCH_REQS:-}" ]; then
  # shellcheck disable=SC2086  # a list of requirements
  pip $FUSED_RESNET_TORCH_REQS
elif ! "$PYTHON" -c "import torch" 2>/dev/null; then
  pip "torch==2.13.0"
fi
"$PYTHON" -c "import triton" 2>/dev/null || pip "triton>=3.0"
pip ninja "setuptools>=64" wheel build pytest pytest-benchmark hypothesis numpy scikit-learn matplotlib tqdm \
  onnx onnxruntime onnxscript  # the export tests (tests/test_export_eval.py)

# Editable from this checkout already? (Asked from / so that the working directory cannot answer.)
if ! (cd / && "$PYTHON" -c "import sys, fused_resnet; sys.exit(fused_resnet.__file__ != sys.argv[1])" \
      "$PWD/fused_resnet/__init__.py") 2>/dev/null; then
  FUSED_RESNET_SKIP_EXT=1 pip --no-build-isolation --no-deps -e .
fi
if [ "${FUSED_RESNET_SKIP_EXT:-0}" != 1 ]; then
  # The compiler's output (thousands of lines of torch header warnings) goes to a log; setup.py's own
  # lines (which toolkit, or why no CUDA kernels) are shown.
  log="build/build_ext-torch$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null).log"
  mkdir -p build
  if ! "$PYTHON" setup.py build_ext --inplace >"$log" 2>&1; then
    tail -n 80 "$log"
    echo "building the extension FAILED (whole log: $log)" >&2
    exit 1
  fi
  grep -E "^(fused_resnet: |WARNING \(fused_resnet\))" "$log" || true
  echo "extension built in place (log: $log)"
fi
"$PYTHON" -m fused_resnet info
