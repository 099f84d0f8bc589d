"""The GPU check's end-to-end step (benchmarks/e2e_train.py) runs without a GPU.

The same commands as on the GPU host, at the tiny model's size on CPU: the user's
``xtuner-patch train`` and XTuner's stock path in each precision set-up, their logs read
into benchmark rows and judged by the report.  Both paths run the PyTorch references
here (no interpreter), so their losses agree closely.
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.e2e_train import setups
from benchmarks.report import write_report

pytestmark = pytest.mark.slow
pytest.importorskip("xtuner.model")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("setup", sorted(setups(cuda=False)))
def test_e2e_step_runs_each_setup_without_a_gpu(tmp_path, setup):
    """Every set-up the GPU check runs, one per test (each ~1 minute): pytest-xdist workers
    share them."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.e2e_train", "--out", str(out), "--work",
         str(tmp_path / "work"), "--steps", "3", "--setups", setup],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env=dict({k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
                 CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "bench-e2e_train.json").read_text())["benchmarks"]
    runs = {(r["extra_info"]["setup"], r["extra_info"]["impl"]): r for r in rows}
    assert set(runs) == {(setup, i) for i in ("xtuner-patch", "xtuner-stock-fa2")}
    ours = runs[(setup, "xtuner-patch")]["extra_info"]
    assert len(ours["losses"]) == 3 and ours["throughput"] > 0
    assert ours["loss_rel_diff_vs_stock"] < 1e-3, (setup, ours["losses"])
    patched_log = (out / f"e2e-{setup}-xtuner-patch.log").read_text()
    stock_log = (out / f"e2e-{setup}-xtuner-stock-fa2.log").read_text()
    assert "dispatch_modules patched" in patched_log
    assert "dispatch_modules patched" not in stock_log
    assert "Dispatch InternLM2Attention varlen forward" in stock_log  # XTuner's varlen path
    if setup == "lora-fp16":
        assert "LoraConfig" in patched_log
    write_report([str(out / "bench-e2e_train.json")], str(out))
    targets = (out / "targets.md").read_text()
    assert targets.count("| #17 | bench=e2e_train") == 3  # no peak memory on a CPU
