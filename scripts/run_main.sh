#!/usr/bin/env bash
# The main job: installs what it needs (scripts/install.sh), then trains a fused ResNet on the
# handwritten digits bundled with scikit-learn (offline) and reports test accuracy, images/s and
# a PNG of the curves. Extra arguments go to `python -m fused_resnet train` (see --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
bash scripts/install.sh
exec "$PYTHON" -m fused_resnet train "$@"
