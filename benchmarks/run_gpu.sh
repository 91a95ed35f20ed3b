#!/usr/bin/env bash
# The whole GPU benchmark: blocks, whole models, kernels + roofs; then the ratio table, the chart
# and the device/version record, all in benchmarks/results/<date>-<gpu>/.
#
#   bash benchmarks/run_gpu.sh [blocks|models|kernels|report|all] [SELECTION]   (default: all)
#
# Parts can be run one at a time into the same folder, and a part can be split further with a
# pytest -k SELECTION (e.g. `blocks basic`, `blocks bottleneck`), written to <part>-<selection>.json,
# to keep each run within a time limit; `report` alone rebuilds the table and chart from the JSON
# files already there.
# FUSED_RESNET_BENCH_MAX_AUTOTUNE=1 adds torch.compile(mode="max-autotune") (much longer compiles).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
part="${1:-all}"
selection="${2:-}"

python - <<'PY' || { echo "run_gpu.sh: needs a CUDA GPU visible to torch" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY
gpu=$(python -c "import torch, re; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name(0)).strip('-'))")
out="benchmarks/results/$(date -u +%Y-%m-%d)-${gpu}"
mkdir -p "$out"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  python - <<'PY'
import platform, torch
print("python:", platform.python_version())
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "cudnn:", torch.backends.cudnn.version())
try:
    import triton
    print("triton:", triton.__version__)
except ImportError:
    print("triton: not installed")
p = torch.cuda.get_device_properties(0)
print("gpu:", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"{p.multi_processor_count} SMs", f"sm_{p.major}{p.minor}")
import fused_resnet
print("fused_resnet:", fused_resnet.__version__, "backends:", fused_resnet.backends("cuda"))
PY
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit --format=csv || true
} > "$out/device.txt"
python -m fused_resnet info > "$out/info.txt" 2>&1 || true

run() {  # $1: blocks | models | kernels
  local name="$1" filter=()
  if [ -n "$selection" ]; then
    name="$1-$(echo "$selection" | tr -c 'A-Za-z0-9.\n' '_')"
    filter=(-k "$selection")
  fi
  python -m pytest "benchmarks/test_$1.py" --benchmark-only -q -p no:cacheprovider "${filter[@]}" \
    --benchmark-json="$out/$name.json" --benchmark-columns=median,iqr,rounds,iterations --benchmark-sort=name \
    | tee "$out/$name.log"
}

failed=0
case "$part" in
  blocks|models|kernels) run "$part" || failed=1 ;;
  all) for p in blocks models kernels; do run "$p" || failed=1; done ;;
  report) ;;
  *) echo "usage: $0 [blocks|models|kernels|report|all]" >&2; exit 2 ;;
esac

jsons=$(ls "$out"/*.json 2>/dev/null || true)
if [ -n "$jsons" ]; then
  # shellcheck disable=SC2086
  python benchmarks/report.py $jsons --out "$out"
fi
echo "results in $out"
exit "$failed"
