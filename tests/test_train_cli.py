"""End to end: XTuner's train tool on the tiny InternLM2 and the sample ftdp data, on CPU."""

import math
import os

import pytest

from tests.xtuner_run import iteration_metrics, train

pytestmark = pytest.mark.slow


def test_tiny_config_trains_and_saves(tmp_path, tiny_checkpoint, sample_ftdp):
    pytest.importorskip("xtuner")
    proc = train(str(tmp_path), tiny_checkpoint, sample_ftdp["root"], max_iters=8)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    rows = iteration_metrics(log)
    assert [r["iter"] for r in rows] == list(range(1, 9)), log[-4000:]
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses)
    # Random init: the first loss is about ln(vocab) and training lowers it.
    assert abs(losses[0] - math.log(2048)) < 0.5
    assert min(losses[-3:]) < losses[0] - 0.5
    assert all(r["tokens_per_sec"] > 0 for r in rows)
    assert os.path.exists(tmp_path / "iter_8.pth"), sorted(os.listdir(tmp_path))


def test_train_reports_failure_exit_status(tmp_path, tiny_checkpoint):
    pytest.importorskip("xtuner")
    proc = train(str(tmp_path), tiny_checkpoint, str(tmp_path / "no-such-folder"), max_iters=1)
    assert proc.returncode != 0
    assert "no-such-folder" in proc.stderr + proc.stdout
