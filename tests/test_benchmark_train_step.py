"""The training-step benchmark runs end to end without a GPU (tiny model, CPU stand-ins).

Its GPU run is the one place the patched and stock XTuner paths meet at full size;
running the same code here first keeps device time for measuring.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("xtuner.model")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_step_benchmark_runs_without_a_gpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_bench_train_step.py",
         "--benchmark-only", "-q", "-p", "no:cacheprovider", f"--benchmark-json={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES="", XTUNER_PATCH_PROFILE_DIR=str(tmp_path)))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    benchmarks = json.loads(out.read_text())["benchmarks"]
    runs = {b["extra_info"]["impl"]: b["extra_info"] for b in benchmarks}
    assert set(runs) == {"xtuner-patch", "xtuner-stock-reference-attn"}
    for impl, info in runs.items():
        assert info["throughput"] > 0 and info["tokens"] == 256
        profile = (tmp_path / f"train_step-internlm2-tiny-{impl}.txt").read_text()
        assert "aten::mm" in profile
