"""benchmarks.targets: the issues' targets judged on benchmark rows."""

from benchmarks.targets import TARGETS, Target, evaluate, recorded, speedup_over


def _row(impl, median, bench, **extra):
    return {"impl": impl, "median_s": median, "extra": {"bench": bench, **extra}}


def _verdicts(*rows, case="case"):
    return evaluate({case: list(rows)})


def test_speed_and_memory_against_a_baseline():
    verdicts = _verdicts(
        _row("xtuner-patch", 1.0, "train_step", peak_mem_bytes=90),
        _row("xtuner-stock-fa2", 1.2, "train_step", peak_mem_bytes=100))
    (speed, memory) = sorted(verdicts, key=lambda v: v["target"])[::-1]
    assert speed["target"].startswith("tokens/s") and abs(speed["value"] - 1.2) < 1e-12
    assert not speed["met"]  # 1.2x < 1.3x
    assert abs(memory["value"] - 0.9) < 1e-12 and memory["met"]


def test_cross_entropy_time_is_ours_over_hf():
    verdicts = _verdicts(
        _row("xtuner-patch", 1.05, "linear_cross_entropy_fwd_bwd", peak_mem_bytes=10),
        _row("hf-pytorch", 1.0, "linear_cross_entropy_fwd_bwd", peak_mem_bytes=100))
    by_target = {v["target"]: v for v in verdicts}
    assert by_target["time / HF's <= 1.1"]["met"]
    assert abs(by_target["time / HF's <= 1.1"]["value"] - 1.05) < 1e-12
    assert by_target["peak memory / HF's <= 0.15"]["met"]


def test_values_recorded_on_another_row():
    verdicts = _verdicts(_row("xtuner-patch", 2.0, "sp_gloo_fwd_bwd"),
                         _row("all-to-all", 1.0, "sp_gloo_fwd_bwd", layout_share_of_ours=1.0))
    (v,) = verdicts
    assert v["issue"] == 6 and v["value"] == 1.0 and not v["met"]


def test_time_added_to_a_baseline_as_a_share_of_a_recorded_time():
    verdicts = _verdicts(_row("xtuner-patch", 1.3, "sp_layer_layout_fwd_bwd",
                              nvlink_a2a_estimate_s=2.5),
                         _row("no-layout", 1.0, "sp_layer_layout_fwd_bwd"))
    by_issue = {v["issue"]: v for v in verdicts}
    assert abs(by_issue[6]["value"] - 0.12) < 1e-12 and not by_issue[6]["met"]  # <= 0.10
    assert abs(by_issue[21]["value"] - 0.12) < 1e-12 and by_issue[21]["met"]  # <= 0.15
    # Without the baseline's row, or the recorded time, there is nothing to judge.
    assert _verdicts(_row("xtuner-patch", 1.3, "sp_layer_layout_fwd_bwd",
                          nvlink_a2a_estimate_s=4.0)) == []
    assert _verdicts(_row("xtuner-patch", 1.3, "sp_layer_layout_fwd_bwd"),
                     _row("no-layout", 1.0, "sp_layer_layout_fwd_bwd")) == []


def test_cases_without_what_a_target_needs_are_left_out():
    assert _verdicts(_row("xtuner-patch", 1.0, "attn_fwd")) == []  # no FA2 row
    assert _verdicts(_row("fa2", 1.0, "attn_fwd")) == []  # no row of ours
    assert _verdicts(_row("xtuner-patch", 1.0, "unknown"), _row("fa2", 2.0, "unknown")) == []


def test_bounds_and_descriptions():
    at_least = Target(1, "b", "x", speedup_over("fa2"), 1.1, True)
    at_most = Target(1, "b", "y", recorded("share"), 0.1, False)
    assert at_least.met(1.1) and not at_least.met(1.09)
    assert at_most.met(0.1) and not at_most.met(0.11)
    assert at_least.describe() == "x >= 1.1" and at_most.describe() == "y <= 0.1"
    assert {t.issue for t in TARGETS} == {3, 4, 5, 6, 8, 17, 19, 21, 22}


def test_fastest_peer_and_host_overhead():
    from benchmarks.targets import speedup_over_fastest

    rows = [_row("xtuner-patch", 1.0, "swiglu_fwd_bwd", peak_mem_bytes=30),
            _row("hf-pytorch", 1.5, "swiglu_fwd_bwd", peak_mem_bytes=90),
            _row("liger-kernel", 0.8, "swiglu_fwd_bwd", peak_mem_bytes=30)]
    assert speedup_over_fastest("hf-pytorch", "liger-kernel")(rows[0], rows) == 0.8
    assert speedup_over_fastest("fa2")(rows[0], rows) is None
    by_target = {(v["issue"], v["target"]): v for v in evaluate({"c": rows})}
    fastest = by_target[(21, "speed-up over the fastest peer >= 1")]
    assert fastest["value"] == 0.8 and not fastest["met"]
    assert by_target[(21, "peak memory / Liger-Kernel's <= 1")]["met"]
    (host,) = _verdicts(_row("xtuner-patch", 1.2, "host_overhead"),
                        _row("cuda-graph-replay", 1.0, "host_overhead"))
    assert host["issue"] == 21 and abs(host["value"] - 1.2) < 1e-12 and not host["met"]


def test_checkpointing_policies_best_row_within_stock_memory_and_mfu():
    """#22: the best of our policy rows whose peak memory is at most stock's, with the
    bound of the row's token count; MFU only for the 7B at 32k."""
    def rows(tokens, model="internlm2-7b"):
        info = dict(tokens=tokens, model=model)
        return [_row("xtuner-patch", 1.0, "train_step_policy", peak_mem_bytes=50, mfu=0.56,
                     **info),
                _row("xtuner-patch-none", 0.5, "train_step_policy", peak_mem_bytes=120,
                     **info),  # fastest, but over stock's memory: not counted
                _row("xtuner-patch-selective", 0.7, "train_step_policy", peak_mem_bytes=100,
                     **info),
                _row("xtuner-stock-fa2", 1.05, "train_step_policy", peak_mem_bytes=100, **info)]

    by_target = {v["target"]: v for v in _verdicts(*rows(32768))}
    speed = by_target["tokens/s over XTuner's stock path, best policy within its peak memory, "
                      "tokens 32768 >= 1.6"]
    assert abs(speed["value"] - 1.5) < 1e-12 and not speed["met"]
    mfu = by_target["MFU (auto) against the measured bf16 matmul peak, model internlm2-7b, "
                    "tokens 32768 >= 0.55"]
    assert mfu["met"] and mfu["value"] == 0.56
    assert len(by_target) == 2
    (speed8k,) = _verdicts(*rows(8192))
    assert speed8k["target"].endswith("tokens 8192 >= 1.3") and speed8k["met"]
    assert abs(_verdicts(*rows(32768, model="internlm2-1.8b"))[0]["value"] - 1.5) < 1e-12
    assert len(_verdicts(*rows(32768, model="internlm2-1.8b"))) == 1  # no MFU verdict
    # no policy row within stock's memory: 0, not met
    (none_fit,) = _verdicts(_row("xtuner-patch", 1.0, "train_step_policy", tokens=8192,
                                 peak_mem_bytes=200),
                            _row("xtuner-stock-fa2", 1.05, "train_step_policy", tokens=8192,
                                 peak_mem_bytes=100))
    assert none_fit["value"] == 0.0 and not none_fit["met"]
