#!/usr/bin/env bash
# The project's GPU check (`make gpu-check`), for the GPU test host: system python3
# with torch + triton, no network.  It
#   1. installs the wheels in .whl/ (see `make gpu-wheels`) into a private folder,
#   2. runs the `gpu`-marked tests (bf16, large shapes),
#   3. runs the benchmarks and writes benchmarks/results/<gpu-name>/ (results.md,
#      benchmarks.json, plots, logs),
#   4. runs the remaining kernel tests on the GPU while time is left.
# Exit status: non-zero when a test or a benchmark failed.
# Budgets (seconds) can be tightened for a rerun: GPU_TEST_TIMEOUT, BENCH_TIMEOUT,
# KERNEL_TEST_TIMEOUT (0 skips that step).  If $OUT is set (the device tool), a
# tarball of the results folder and its key files are copied there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  SITE=${XTP_SITE:-/tmp/xtuner-patch-site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .whl/*.whl \
    || { echo "gpu-check: installing .whl/ failed" >&2; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

GPU=$("$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(0))') \
  || { echo "gpu-check: needs a CUDA device" >&2; exit 2; }
GPU_DIR=$(echo "$GPU" | tr -c 'A-Za-z0-9._\n-' '_')
RESULTS=benchmarks/results/$GPU_DIR
mkdir -p "$RESULTS"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "gpu: $GPU"
  "$PY" - <<'PY'
import importlib, platform
print("python:", platform.python_version())
for name in ("torch", "triton", "transformers", "xtuner", "mmengine", "flash_attn"):
    try:
        mod = importlib.import_module(name)
        print(f"{name}: {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # report, do not fail: missing baselines are skipped
        print(f"{name}: not importable ({type(exc).__name__}: {exc})")
PY
} | tee "$RESULTS/environment.txt"

status=0
run_step() {  # name timeout command...
  local name=$1 limit=$2; shift 2
  if [ "$limit" = 0 ]; then echo "gpu-check: $name skipped"; return 0; fi
  echo "=== gpu-check: $name (limit ${limit}s) ==="
  timeout "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "gpu-check: $name exit status $rc"
  [ "$rc" = 0 ] || status=1
}

run_step gpu-tests "${GPU_TEST_TIMEOUT:-180}" \
  "$PY" -m pytest tests -m gpu -q -p no:cacheprovider --junitxml="$RESULTS/gpu-tests.xml"
run_step benchmarks "${BENCH_TIMEOUT:-240}" \
  "$PY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$RESULTS/benchmarks.json"
if [ -s "$RESULTS/benchmarks.json" ]; then
  "$PY" -m benchmarks.report "$RESULTS/benchmarks.json" --out "$RESULTS" \
    --title "xtuner-patch benchmarks on $GPU" || status=1
fi
KERNEL_TESTS=$(ls tests/test_varlen_attention.py tests/test_rms_norm.py tests/test_rotary.py 2>/dev/null)
if [ -n "$KERNEL_TESTS" ]; then
  run_step kernel-tests "${KERNEL_TEST_TIMEOUT:-90}" \
    "$PY" -m pytest $KERNEL_TESTS -m "not gpu" -q -x -p no:cacheprovider
fi

if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/results.tar.gz" "$RESULTS"
  for f in results.md environment.txt gpu-tests.log benchmarks.log kernel-tests.log; do
    [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/"
  done
fi
echo "gpu-check: results in $RESULTS (status $status)"
exit $status
