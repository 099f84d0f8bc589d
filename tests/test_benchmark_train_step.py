"""The training-step benchmark runs end to end without a GPU (tiny model, CPU stand-ins).

Its GPU run is the one place the patched and stock XTuner paths meet at full size;
running the same code here first keeps device time for measuring.
"""

import pytest

from tests.helpers import run_benchmark_file

pytest.importorskip("xtuner.model")


def test_train_step_benchmark_runs_without_a_gpu(tmp_path):
    benchmarks = run_benchmark_file("benchmarks/test_bench_train_step.py::test_train_step",
                                    tmp_path, XTUNER_PATCH_PROFILE_DIR=str(tmp_path))
    runs = {b["extra_info"]["impl"]: b["extra_info"] for b in benchmarks}
    assert set(runs) == {"xtuner-patch", "xtuner-stock-reference-attn"}
    for impl, info in runs.items():
        assert info["throughput"] > 0 and info["tokens"] == 256
        profile = (tmp_path / f"train_step-internlm2-tiny-{impl}.txt").read_text()
        assert "aten::mm" in profile


def test_policy_rows_run_without_a_gpu(tmp_path):
    """#22's rows: one per checkpointing policy beside the stock path, each with its
    plan, model TFLOP/s and MFU against the matmul peak measured in the run.  The
    kernels' PyTorch references stand in for the interpreter here (the test above runs
    the kernels): the rows' own lines are what is tested."""
    rows = {b["extra_info"]["impl"]: b["extra_info"] for b in run_benchmark_file(
        "benchmarks/test_bench_train_step.py::test_train_step_policy", tmp_path,
        TRITON_INTERPRET="0")}
    assert set(rows) == {"xtuner-patch", "xtuner-patch-none", "xtuner-patch-selective",
                         "xtuner-patch-full", "xtuner-stock-reference-attn"}
    # auto cannot measure without CUDA: full, as stock
    assert rows["xtuner-patch"]["checkpoint_plan"] == "full,full"
    for policy in ("none", "selective", "full"):
        assert rows[f"xtuner-patch-{policy}"]["checkpoint_plan"] == f"{policy},{policy}"
    assert rows["xtuner-stock-reference-attn"].get("checkpoint_plan") is None
    for info in rows.values():
        assert info["bench"] == "train_step_policy" and info["tokens"] == 64
        assert info["matmul_peak_tflops"] > 0
        assert info["mfu"] == pytest.approx(info["tflops"] / info["matmul_peak_tflops"])


def test_layers_that_fit_the_device():
    from benchmarks.model_flops import layers_that_fit
    from xtuner_patch.fixtures import internlm2_config_dict

    config = internlm2_config_dict("7b")
    h, inter, vocab = 4096, 14336, 92544
    per_layer = 8 * (h * (h + 2 * 1024) + h * h + 3 * h * inter + 2 * h)  # 8 kv heads x 128
    outside = 8 * (2 * vocab * h + h)
    gib = 2 ** 30
    stock, margin = 40 * gib, 4 * gib
    assert layers_that_fit(outside + stock + margin + 17.5 * per_layer, config, stock,
                           margin) == 17
    assert layers_that_fit(141 * gib, config, stock, margin) == 32  # an H200 holds all
    assert layers_that_fit(outside + stock + margin, config, stock, margin) == 0


def test_matmul_peak_and_model_flops_on_cpu():
    import torch

    from benchmarks.model_flops import matmul_tflops, model_flops
    from xtuner_patch.fixtures import internlm2_config_dict, internlm2_hf_config

    assert 0 < matmul_tflops("cpu", torch.float32, 64, rounds=2) < 100
    config = internlm2_hf_config(internlm2_config_dict("tiny"))
    h, inter, vocab = 256, 896, 2048
    per_layer = h * (h + 2 * 64) + h * h + 3 * h * inter  # 1 kv head of 64
    lengths = [3, 5]
    attention = 3 * 4.0 * 4 * 64 * (6 + 15) * 2
    assert model_flops(config, lengths) == 6.0 * (2 * per_layer + h * vocab) * 8 + attention
