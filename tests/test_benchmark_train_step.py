"""The training-step benchmark runs end to end without a GPU (tiny model, CPU stand-ins).

Its GPU run is the one place the patched and stock XTuner paths meet at full size;
running the same code here first keeps device time for measuring.
"""

import pytest

from tests.helpers import run_benchmark_file

pytest.importorskip("xtuner.model")


def test_train_step_benchmark_runs_without_a_gpu(tmp_path):
    benchmarks = run_benchmark_file("benchmarks/test_bench_train_step.py", tmp_path,
                                    XTUNER_PATCH_PROFILE_DIR=str(tmp_path))
    runs = {b["extra_info"]["impl"]: b["extra_info"] for b in benchmarks}
    assert set(runs) == {"xtuner-patch", "xtuner-stock-reference-attn"}
    for impl, info in runs.items():
        assert info["throughput"] > 0 and info["tokens"] == 256
        profile = (tmp_path / f"train_step-internlm2-tiny-{impl}.txt").read_text()
        assert "aten::mm" in profile
