#!/usr/bin/env bash
# The test command: installs what it needs (scripts/install.sh), compile-checks the CUDA sources
# with nvcc when nvcc is there, then runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
bash scripts/install.sh
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  PYTHON="$PYTHON" bash .ci/cuda_compile_check.sh
else
  echo "nvcc not found: CUDA compile check skipped"
fi
# The extension was just built: a native backend that fails to load must fail the native tests, not
# skip them.
export FUSED_RESNET_REQUIRE_NATIVE=1
exec "$PYTHON" -m pytest tests "$@"
