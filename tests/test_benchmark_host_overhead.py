"""The host-overhead benchmark's eager rows run without a GPU (tiny shapes, interpreter)."""

import pytest

from tests.helpers import run_benchmark_file

pytest.importorskip("xtuner.model")


def test_host_overhead_benchmark_runs_without_a_gpu(tmp_path):
    rows = run_benchmark_file("benchmarks/test_bench_host_overhead.py", tmp_path)
    ops = {r["extra_info"]["op"] for r in rows if r["extra_info"]["impl"] == "xtuner-patch"}
    assert ops == {"rms_norm", "split_qkv_rotary", "apply_rotary", "swiglu", "decoder_layer"}
    assert all(r["stats"]["median"] > 0 for r in rows)
