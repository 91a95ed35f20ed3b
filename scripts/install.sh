#!/usr/bin/env bash
# Installs what fused_resnet needs, idempotently, into the current Python:
#   torch   only if none is importable (then the pinned CPU build 2.13.0: an unpinned
#           `pip install torch` would pull gigabytes of CUDA packages); a present torch (e.g. a
#           CUDA build on a GPU machine) is kept;
#   triton, ninja and the test/train tools;
#   the package itself, editable, built against that torch (--no-build-isolation: the build
#   imports torch to compile the native extension in csrc/).
# Usage: scripts/install.sh            (FUSED_RESNET_SKIP_EXT=1 for a pure-Python install)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
pip() { "$PYTHON" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  pip "torch==2.13.0"
fi
"$PYTHON" -c "import triton" 2>/dev/null || pip "triton>=3.0"
pip ninja "setuptools>=64" wheel build pytest pytest-benchmark hypothesis numpy scikit-learn matplotlib tqdm
pip --no-build-isolation --no-deps -e .
"$PYTHON" -m fused_resnet info
