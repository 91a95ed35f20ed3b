#!/usr/bin/env bash
# The test command (what CI runs): the suite on two torches, each in its own virtual environment inside
# the checkout (created on first use, reused after; ignored by git):
#   2.14  .venv-torch2.14: torch 2.14.1 (a CUDA build, run on the CPU here) + torchvision 0.29.1 + timm;
#         its extension is built with the CUDA kernels when a CUDA toolkit is found;
#   2.13  .venv-torch2.13: torch 2.13.0 (CPU build).
# Each leg installs (scripts/install.sh: tools, the package editable, its extension rebuilt in place for
# that torch), then runs `pytest tests`. The legs run one after the other because they share the
# in-place fused_resnet/_C*.so, which is tied to the torch it was built for; 2.13 runs last, so the tree
# is left with the extension of the default CPU torch. The CUDA sources are compile-checked with nvcc
# once, when nvcc is there. Fails if any leg fails, if a leg runs no test or passes none.
#   FUSED_RESNET_TEST_TORCH="2.14"   run one leg (or a list, in order; default "2.14 2.13")
#   PYTHON=python3.12                the interpreter the virtual environments are made from
# Extra arguments go to pytest (both legs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BASE_PYTHON="${PYTHON:-python3}"
LEGS="${FUSED_RESNET_TEST_TORCH:-2.14 2.13}"
RESULTS=build/test-results

torch_reqs() {
  case "$1" in
    2.13) echo "torch==2.13.0" ;;
    2.14) echo "torch==2.14.1 torchvision==0.29.1 timm" ;;
    *) echo "unknown torch leg '$1' (FUSED_RESNET_TEST_TORCH): 2.13 or 2.14" >&2; return 1 ;;
  esac
}
for leg in $LEGS; do torch_reqs "$leg" >/dev/null; done
# The compile check wants torch's headers, any torch: the CPU leg's if it runs (what it was written for).
CHECK_LEG="$(for leg in $LEGS; do echo "$leg"; done | grep -x 2.13 || echo "${LEGS%% *}")"

# `pytest ... --junitxml` -> "tests passed failed errors skipped" for the summary and the checks below.
count() {
  "$1" - "$2" <<'PY'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print(n["tests"], n["tests"] - n["failures"] - n["errors"] - n["skipped"], n["failures"], n["errors"], n["skipped"])
PY
}

status=0
summary=()
mkdir -p "$RESULTS"
for leg in $LEGS; do
  venv=".venv-torch$leg"
  py="$PWD/$venv/bin/python"
  echo "=== torch $leg ($venv) ==="
  [ -x "$py" ] || "$BASE_PYTHON" -m venv "$venv"
  PYTHON="$py" FUSED_RESNET_TORCH_REQS="$(torch_reqs "$leg")" bash scripts/install.sh
  if [ "$leg" = "$CHECK_LEG" ]; then
    if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
      PYTHON="$py" bash .ci/cuda_compile_check.sh || { status=1; summary+=("CUDA compile check FAILED"); }
    else
      echo "nvcc not found: CUDA compile check skipped"
    fi
  fi
  xml="$RESULTS/torch$leg.xml"
  rm -f "$xml"
  # The extension was just built: a native backend that fails to load must fail the native tests, not
  # skip them.
  rc=0
  FUSED_RESNET_REQUIRE_NATIVE=1 "$py" -m pytest tests --junitxml="$xml" "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then
    line="torch $leg: FAILED, no tests ran (pytest exit 5)"
  elif [ ! -f "$xml" ]; then
    line="torch $leg: FAILED, pytest exit $rc and no report"
  else
    read -r total passed failed errors skipped < <(count "$py" "$xml")
    line="torch $leg: $passed passed, $failed failed, $errors errors, $skipped skipped of $total (pytest exit $rc)"
    # Exit 0 with nothing passed (everything skipped) is no evidence either.
    if [ "$rc" -eq 0 ] && [ "$passed" -eq 0 ]; then line="$line: FAILED, no test passed"; rc=1; fi
  fi
  [ "$rc" -eq 0 ] || status=1
  summary+=("$line")
done
echo "=== summary ==="
printf '  %s\n' "${summary[@]}"
exit "$status"
