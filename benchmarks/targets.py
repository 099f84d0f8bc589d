"""The speed and memory targets of the issues, checked against benchmark results.

Each :class:`Target` names a benchmark family (``extra_info["bench"]``), a value read
from one case's rows (ours against a baseline of the same case, or a number ours
recorded) and the bound the issue sets.  :func:`evaluate` applies every target to every
case that has the rows it needs; cases without them (a baseline not installed, a family
not run) are left out rather than counted as met or missed.  ``benchmarks.report``
writes the verdicts to ``targets.md`` next to ``results.md``.  Row dicts are the
report's: ``impl``, ``median_s`` and the benchmark's ``extra`` info.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional

OURS = "xtuner-patch"


def impl_row(members, impl):
    """The row of implementation ``impl`` among one case's rows, or None."""
    return next((r for r in members if r["impl"] == impl), None)


def speedup_over(impl: str) -> Callable:
    """Baseline median / our median (> 1: ours is faster)."""
    def value(ours, members):
        base = impl_row(members, impl)
        return None if base is None else base["median_s"] / ours["median_s"]
    return value


def speedup_over_fastest(*impls: str) -> Callable:
    """The fastest of ``impls`` that ran (smallest median) / our median."""
    def value(ours, members):
        times = [r["median_s"] for r in members if r["impl"] in impls]
        return min(times) / ours["median_s"] if times else None
    return value


def memory_share_of(impl: str) -> Callable:
    """Our peak memory / the baseline's."""
    def value(ours, members):
        base = impl_row(members, impl)
        if base is None or not base["extra"].get("peak_mem_bytes"):
            return None
        mine = ours["extra"].get("peak_mem_bytes")
        return None if mine is None else mine / base["extra"]["peak_mem_bytes"]
    return value


def recorded(key: str, impl: str = OURS) -> Callable:
    """A number a benchmark recorded in ``extra_info`` on ``impl``'s row."""
    def value(ours, members):
        row = impl_row(members, impl)
        return None if row is None else row["extra"].get(key)
    return value


def added_share_of(impl: str, key: str) -> Callable:
    """(Our median - ``impl``'s) / the seconds ours recorded under ``key``: the time ours
    adds to a baseline doing the same work otherwise, as a share of a reference time."""
    def value(ours, members):
        base = impl_row(members, impl)
        if base is None or key not in ours["extra"]:
            return None
        return (ours["median_s"] - base["median_s"]) / ours["extra"][key]
    return value


def best_within_memory_of(impl: str, prefix: str = OURS) -> Callable:
    """The best speed-up over ``impl`` among the rows whose implementation starts with
    ``prefix`` (ours, any variant) and whose peak memory is at most ``impl``'s; 0 when
    none is."""
    def value(ours, members):
        base = impl_row(members, impl)
        if base is None or not base["extra"].get("peak_mem_bytes"):
            return None
        limit = base["extra"]["peak_mem_bytes"]
        return max((base["median_s"] / r["median_s"] for r in members
                    if r["impl"].startswith(prefix)
                    and r["extra"].get("peak_mem_bytes") is not None
                    and r["extra"]["peak_mem_bytes"] <= limit), default=0.0)
    return value


@dataclass(frozen=True)
class Target:
    issue: int
    bench: str
    what: str
    value: Callable
    bound: float
    at_least: bool  # the value must be >= bound (else <= bound)
    # (key, value) pairs our row's extra info must hold for the target to apply
    where: tuple = ()

    def applies(self, ours) -> bool:
        extra = ours["extra"]
        return extra.get("bench") == self.bench and all(
            extra.get(k) == v for k, v in self.where)

    def met(self, value: float) -> bool:
        return value >= self.bound if self.at_least else value <= self.bound

    def describe(self) -> str:
        where = "".join(f", {k} {v}" for k, v in self.where)
        return f"{self.what}{where} {'>=' if self.at_least else '<='} {self.bound:g}"


FA2, FLEX, STOCK, HF, LIGER = ("fa2", "flex-attention", "xtuner-stock-fa2", "hf-pytorch",
                               "liger-kernel")
# Every implementation of a kernel benchmark that is not ours: what #21 calls the peers.
PEERS = {
    "rms_norm_fwd_bwd": (HF, "xtuner-triton", "torch-rms_norm", "torch-compile-rms_norm", LIGER),
    "rope_fwd_bwd": (HF, "xtuner-triton", LIGER),
    "swiglu_fwd_bwd": (HF, LIGER),
    "linear_cross_entropy_fwd_bwd": (HF, LIGER),
}
TARGETS = [
    Target(3, "attn_fwd", "speed-up over FA2", speedup_over(FA2), 1.2, True),
    Target(3, "attn_bwd", "speed-up over FA2", speedup_over(FA2), 1.0, True),
    Target(3, "attn_fwd_bwd", "speed-up over FA2", speedup_over(FA2), 1.1, True),
    Target(4, "rms_norm_fwd_bwd", "share of copy bandwidth", recorded("copy_share"), 0.85, True),
    Target(4, "rms_norm_fwd_bwd", "speed-up over XTuner's Triton RMSNorm",
           speedup_over("xtuner-triton"), 1.3, True),
    Target(4, "rope_fwd_bwd", "share of copy bandwidth", recorded("copy_share"), 0.85, True),
    Target(4, "rope_fwd_bwd", "speed-up over HF", speedup_over(HF), 3.0, True),
    Target(5, "train_step", "tokens/s over XTuner's stock path", speedup_over(STOCK), 1.3, True),
    Target(5, "train_step", "peak memory / XTuner's stock path", memory_share_of(STOCK), 1.0,
           False),
    Target(6, "sp_layout_fwd_bwd", "layout time / modelled NVLink all-to-all",
           recorded("layout_share_of_nvlink_a2a_estimate"), 0.10, False),
    Target(6, "sp_layer_layout_fwd_bwd",
           "layout time added to a training step / modelled NVLink all-to-all",
           added_share_of("no-layout", "nvlink_a2a_estimate_s"), 0.10, False),
    Target(6, "sp_gloo_fwd_bwd", "layout time / measured gloo all-to-all",
           recorded("layout_share_of_ours", "all-to-all"), 0.10, False),
    Target(8, "linear_cross_entropy_fwd_bwd", "peak memory / HF's", memory_share_of(HF), 0.15,
           False),
    Target(8, "linear_cross_entropy_fwd_bwd", "time / HF's",
           lambda ours, members: _inverse(speedup_over(HF)(ours, members)), 1.1, False),
    Target(8, "swiglu_fwd_bwd", "share of copy bandwidth", recorded("copy_share"), 0.85, True),
    # #8's memory bound, for the head's loss under XTuner's LoRA (adapter on the head).
    Target(8, "lora_head_cross_entropy_fwd_bwd", "peak memory / PEFT's",
           memory_share_of("hf-peft"), 0.15, False),
    # #19: ftdp data, build (every line checked, token index written) + one pass, one core.
    Target(19, "ftdp_epoch", "speed-up over XTuner", speedup_over("xtuner"), 10.0, True),
    Target(19, "ftdp_epoch", "tokens/s", recorded("tokens_per_s"), 25e6, True),
    Target(19, "ftdp_epoch", "peak memory / XTuner's", memory_share_of("xtuner"), 1.0, False),
    # #21: ours at least as fast as the fastest peer at 8k-128k tokens, within Liger's
    # memory, attention 1.1x the faster of FA2 and FlexAttention, host work <= 15%.
    *[Target(21, bench, "speed-up over the fastest peer", speedup_over_fastest(*peers), 1.0,
             True) for bench, peers in PEERS.items()],
    *[Target(21, bench, "peak memory / Liger-Kernel's", memory_share_of(LIGER), 1.0, False)
      for bench in ("rope_fwd_bwd", "swiglu_fwd_bwd", "linear_cross_entropy_fwd_bwd")],
    Target(21, "attn_fwd_bwd", "speed-up over the faster of FA2 and FlexAttention",
           speedup_over_fastest(FA2, FLEX), 1.1, True),
    Target(21, "sp_layer_layout_fwd_bwd",
           "layout time added to a training step / modelled NVLink all-to-all",
           added_share_of("no-layout", "nvlink_a2a_estimate_s"), 0.15, False),
    Target(21, "host_overhead", "eager time / CUDA-graph replay",
           lambda ours, members: _inverse(speedup_over("cuda-graph-replay")(ours, members)),
           1.15, False),
    # #17: the user's `xtuner-patch train`, per precision set-up (benchmarks/e2e_train.py).
    Target(17, "e2e_train", "largest relative loss difference to XTuner's stock path, "
           "first 5 steps", recorded("loss_rel_diff_vs_stock"), 0.02, False),
    Target(17, "e2e_train", "slowest step after the second / median step",
           recorded("max_over_median"), 1.3, False),
    Target(17, "e2e_train", "tokens/s over XTuner's stock path", speedup_over(STOCK), 1.0, True),
    Target(17, "e2e_train", "peak memory / XTuner's stock path", memory_share_of(STOCK), 1.0,
           False),
    # #22: checkpointing policies (benchmarks/test_bench_train_step.py::test_train_step_policy):
    # the best policy row within the stock step's peak memory, per token count; MFU of
    # ours (auto) against the bf16 matmul peak measured in the same run.
    Target(22, "train_step_policy", "tokens/s over XTuner's stock path, best policy within "
           "its peak memory", best_within_memory_of(STOCK), 1.6, True, where=(("tokens", 32768),)),
    Target(22, "train_step_policy", "tokens/s over XTuner's stock path, best policy within "
           "its peak memory", best_within_memory_of(STOCK), 1.3, True, where=(("tokens", 8192),)),
    Target(22, "train_step_policy", "MFU (auto) against the measured bf16 matmul peak",
           recorded("mfu"), 0.55, True, where=(("model", "internlm2-7b"), ("tokens", 32768))),
]


def _inverse(x: Optional[float]) -> Optional[float]:
    return None if x is None else 1.0 / x


def evaluate(groups, targets=TARGETS) -> List[dict]:
    """``[{issue, case, target, value, met}]`` for every target a case can be judged on.

    ``groups``: ``{case: [rows of its implementations]}`` as :mod:`benchmarks.report`
    builds them.
    """
    verdicts = []
    for case, members in groups.items():
        ours = impl_row(members, OURS)
        if ours is None:
            continue
        for target in targets:
            if not target.applies(ours):
                continue
            value = target.value(ours, members)
            if value is not None:
                verdicts.append(dict(issue=target.issue, case=case, target=target.describe(),
                                     value=value, met=target.met(value)))
    return sorted(verdicts, key=lambda v: v["issue"])
