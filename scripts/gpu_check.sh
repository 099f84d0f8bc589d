#!/usr/bin/env bash
# The project's GPU check (`make gpu-check`), for the GPU test host: system python3
# with torch + triton, no network.  It installs the wheels in .whl/ (see `make
# gpu-wheels`) into a private folder, then runs the parts named in GPU_CHECK_PARTS, in
# that order (default: all of them; each fits well under 8 minutes on an H200):
#   tests       the `gpu`-marked tests (bf16, large shapes)
#   e2e         the user's `xtuner-patch train` vs XTuner's stock path in three precision
#               set-ups (benchmarks/e2e_train.py)
#   kernels     the kernel and training-step benchmarks with their peers
#               (BENCH_FAMILIES narrows them, BENCH_FILTER is a pytest -k expression)
#   attention   the varlen attention benchmark
#   kernel-tests the other kernel and model tests on the GPU while time is left
#   checkpointing the training step per activation-checkpointing policy (#22), 1.8B and
#               7B at 8k and 32k tokens (CHECKPOINT_TIMEOUT; give it a run of its own)
# and writes benchmarks/results/<gpu-name>/ (results.md and targets.md over every
# bench-*.json there, plots, logs).  Exit status: non-zero when a test or a benchmark
# failed or a step ran out of time.  Time: GPU_CHECK_BUDGET (default 450 s) for all
# steps together; per-step limits GPU_TEST_TIMEOUT, E2E_TIMEOUT, BENCH_TIMEOUT (per
# family), KERNEL_TEST_TIMEOUT (0 skips a step).  If $OUT is set (the device tool), a
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
# The compiled ftdp line reader, where this host can build it (else the data path warns
# and reads lines with numpy and simdjson).
"$PY" setup.py -q build_ext --inplace >/dev/null 2>&1 \
  || echo "gpu-check: xtuner_patch/dataset/_ftdp_lines.c did not build here" >&2

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

# The policy rows take minutes of their own: the checkpointing part runs them.
POLICY_ROWS=benchmarks/test_bench_train_step.py::test_train_step_policy
run_benchmarks() {  # families...: one pytest run (and JSON file) per family
  local family
  for family in "$@"; do
    run_step "bench-$family" "${BENCH_TIMEOUT:-150}" \
      "$PY" -m pytest "benchmarks/test_bench_$family.py" --benchmark-only -q -p no:cacheprovider \
      --deselect "$POLICY_ROWS" \
      ${BENCH_FILTER:+-k "$BENCH_FILTER"} --benchmark-json="$RESULTS/bench-$family.json"
    # A family stopped before its first case leaves an empty file: not a result.
    [ -s "$RESULTS/bench-$family.json" ] || rm -f "$RESULTS/bench-$family.json"
  done
}

export XTUNER_PATCH_PROFILE_DIR=$RESULTS  # the training step's per-operator profiles
for part in ${GPU_CHECK_PARTS:-tests e2e kernels attention kernel-tests checkpointing}; do
  case $part in
    tests)
      run_step gpu-tests "${GPU_TEST_TIMEOUT:-150}" \
        "$PY" -m pytest tests -m gpu -q -p no:cacheprovider --junitxml="$RESULTS/gpu-tests.xml" ;;
    e2e)
      run_step e2e-train "${E2E_TIMEOUT:-420}" "$PY" -m benchmarks.e2e_train --out "$RESULTS" \
        --work "${TMPDIR:-/tmp}/xtuner-patch-e2e" ${E2E_ARGS:-} ;;
    kernels)
      # The whole training step first, then the kernel families.
      run_benchmarks ${BENCH_FAMILIES:-train_step host_overhead cross_entropy swiglu sequence_parallel rms_norm rotary} ;;
    attention)
      run_benchmarks varlen_attention ;;
    kernel-tests)
      # Many small shapes: one tuning config per kernel keeps compile time down.
      run_step kernel-tests "${KERNEL_TEST_TIMEOUT:-90}" env XTUNER_PATCH_AUTOTUNE=0 \
        "$PY" -m pytest tests/test_varlen_attention.py tests/test_rms_norm.py tests/test_rotary.py \
        tests/test_internlm2_patch.py tests/test_compile_once.py -m "not gpu" -q -x -p no:cacheprovider ;;
    checkpointing)
      run_step bench-train_step_policy "${CHECKPOINT_TIMEOUT:-420}" \
        "$PY" -m pytest "$POLICY_ROWS" --benchmark-only -q -p no:cacheprovider \
        --benchmark-json="$RESULTS/bench-train_step_policy.json" ;;
    *)
      echo "gpu-check: unknown part '$part' (tests e2e kernels attention kernel-tests checkpointing)" >&2
      status=1 ;;
  esac
done
JSONS=$(ls "$RESULTS"/bench-*.json 2>/dev/null)
if [ -n "$JSONS" ]; then
  "$PY" -m benchmarks.report $JSONS --out "$RESULTS" --title "xtuner-patch benchmarks on $GPU" \
    || status=1
fi

if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/results.tar.gz" "$RESULTS"
  for f in results.md targets.md environment.txt gpu-tests.log kernel-tests.log e2e_train.md; do
    [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/"
  done
fi
echo "gpu-check: results in $RESULTS (status $status)"
exit $status
