#!/usr/bin/env bash
# The project's GPU check (`make gpu-check`), for the GPU test host: system python3
# with torch + triton, no network.  It
#   1. installs the wheels in .whl/ (see `make gpu-wheels`) into a private folder,
#   2. runs the `gpu`-marked tests (bf16, large shapes),
#   3. runs the GPU benchmarks, one JSON per family, and writes
#      benchmarks/results/<gpu-name>/ (results.md, bench-*.json, plots, logs),
#   4. runs the other kernel and model tests on the GPU while time is left.
# Exit status: non-zero when a test or a benchmark failed or a step ran out of time.
# Time: GPU_CHECK_BUDGET (default 450 s) for all steps together; per-step limits
# GPU_TEST_TIMEOUT, BENCH_TIMEOUT (per family), KERNEL_TEST_TIMEOUT (0 skips a step); BENCH_FAMILIES and
# BENCH_FILTER (a pytest -k expression) narrow the benchmarks for a short run.  The CPU-only
# data-pipeline benchmark is not run here (`make bench` runs everything).  If $OUT is set (the device tool), a
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
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET:-450}  # seconds for all steps together (8 minutes with set-up)
run_step() {  # name limit command...: runs within both its own limit and what is left
  local name=$1 limit=$2; shift 2
  if [ "$limit" = 0 ]; then echo "gpu-check: $name skipped (limit 0)"; return; fi
  local left=$((BUDGET - (SECONDS - START)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -le 10 ]; then echo "gpu-check: $name skipped (time budget spent)"; status=1; return; fi
  echo "=== gpu-check: $name (limit ${limit}s) ==="
  # SIGINT first: pytest then ends the session normally, and pytest-benchmark still writes
  # the JSON of the cases that finished.
  timeout -s INT -k 30 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "gpu-check: $name exit status $rc"
  [ "$rc" = 0 ] || status=1
}

run_step gpu-tests "${GPU_TEST_TIMEOUT:-150}" \
  "$PY" -m pytest tests -m gpu -q -p no:cacheprovider --junitxml="$RESULTS/gpu-tests.xml"
# One pytest run (and JSON file) per benchmark family, most important first (the whole
# training step, then attention, then the other kernel families), so that a
# family cut by the time limit does not take the others' time.
export XTUNER_PATCH_PROFILE_DIR=$RESULTS  # the training step's per-operator profiles
for family in ${BENCH_FAMILIES:-train_step varlen_attention cross_entropy swiglu sequence_parallel rms_norm rotary}; do
  run_step "bench-$family" "${BENCH_TIMEOUT:-150}" \
    "$PY" -m pytest "benchmarks/test_bench_$family.py" --benchmark-only -q -p no:cacheprovider \
    ${BENCH_FILTER:+-k "$BENCH_FILTER"} --benchmark-json="$RESULTS/bench-$family.json"
  # A family stopped before its first case leaves an empty file: not a result.
  [ -s "$RESULTS/bench-$family.json" ] || rm -f "$RESULTS/bench-$family.json"
done
JSONS=$(ls "$RESULTS"/bench-*.json 2>/dev/null)
if [ -n "$JSONS" ]; then
  "$PY" -m benchmarks.report $JSONS --out "$RESULTS" --title "xtuner-patch benchmarks on $GPU" \
    || status=1
fi
# Many small shapes: one tuning config per kernel keeps compile time down.
run_step kernel-tests "${KERNEL_TEST_TIMEOUT:-90}" env XTUNER_PATCH_AUTOTUNE=0 \
  "$PY" -m pytest tests/test_varlen_attention.py tests/test_rms_norm.py tests/test_rotary.py \
  tests/test_internlm2_patch.py -m "not gpu" -q -x -p no:cacheprovider

if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/results.tar.gz" "$RESULTS"
  for f in results.md targets.md environment.txt gpu-tests.log kernel-tests.log; do
    [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/"
  done
fi
echo "gpu-check: results in $RESULTS (status $status)"
exit $status
