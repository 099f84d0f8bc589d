"""Packed causal GQA attention: ours vs FA2, XTuner's repeat-K/V path and dense SDPA.

Shapes: InternLM2-7B (32 q / 8 kv heads) and 1.8B (16 / 8), head_dim 128, bf16, one
packed row of 8k, 32k or 128k tokens split by one of three length mixes: equal 1k
samples, a log-normal mix of SFT lengths (fixed seed), one sample filling the row.
Passes: forward, backward (the forward runs untimed in ``setup``) and both.

Peers: PyTorch's FA2 (``fa2``; flash-attn's varlen interface), FlexAttention
(``flex-attention``: ``torch.compile``d ``flex_attention`` with a document-causal block
mask built once per workload outside the timing, ``enable_gqa``), XTuner's path (K/V
repeated, then FA2) and a dense SDPA loop.

FLOPs are the causal work of the problem: per sample of length L, ``L (L + 1) / 2``
query-key pairs, two matrix products of ``2 * d`` FLOPs per pair and query head in the
forward pass; the backward pass counts 2.5 times that (five products instead of two).

The 128k rows run only forward+backward, with 3 rounds; the dense SDPA loop only the
8k rows (one Python-level call per sample; at 32k+ it is slower by so much that it
only costs benchmark time).

Ours validates ``cu_seqlens`` and builds its work lists once per packing (a device
sync), then reuses them while the same tensor comes back, as it does for every layer
after the first in a step.  ``xtuner-patch-new-packing`` passes a fresh copy of
``cu_seqlens`` to every call, the cost the first layer of a step pays (forward+backward
rows up to 32k).  ``test_attention_plan_host_time`` times that host work alone, on any
machine.
"""

import pytest
import torch

from benchmarks.conftest import OURS, measure, requires_cuda, skip_missing
from benchmarks.workloads import MIXES, packed_lengths
from tests.baselines import (fa2_name, fa2_unavailable_reason, fa2_varlen, sdpa_dense_loop,
                             xtuner_varlen)

MODELS = {"internlm2-7b": (32, 8), "internlm2-1.8b": (16, 8)}
HEAD_DIM = 128
ROWS = (8192, 32768, 131072)
PASSES = ("fwd", "bwd", "fwd_bwd")
FA2 = "fa2"
XTUNER = "xtuner-repeat-kv-fa2"
SDPA = "sdpa-dense-loop"
FLEX = "flex-attention"
OURS_NEW_PACKING = "xtuner-patch-new-packing"
IMPLS = (OURS, OURS_NEW_PACKING, FA2, FLEX, XTUNER, SDPA)
BWD_FLOP_RATIO = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def _cases():
    cases = []
    for model in MODELS:
        for tokens in ROWS:
            for mix in MIXES:
                for name in PASSES:
                    if tokens > 32768 and name != "fwd_bwd":
                        continue
                    cases.append((model, tokens, mix, name))
    return cases


def _impl_fn(impl: str):
    if impl == OURS:
        from kernels import varlen_attn_func

        return lambda q, k, v, cu, m: varlen_attn_func(q, k, v, cu, cu, m, m, causal=True)
    if impl == OURS_NEW_PACKING:
        from kernels import varlen_attn_func

        def new_packing(q, k, v, cu, m):
            fresh = cu.clone()
            return varlen_attn_func(q, k, v, fresh, fresh, m, m, causal=True)
        return new_packing
    fn = {FA2: fa2_varlen, XTUNER: xtuner_varlen, SDPA: sdpa_dense_loop}[impl]
    return lambda q, k, v, cu, m: fn(q, k, v, cu, cu, m, m, True)


_FLEX = {}


def _flex_attention(data: dict):
    """``attn(q, k, v, cu, m)`` through compiled FlexAttention, the block mask of
    ``data``'s packing made (once per workload) outside the timed calls."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        skip_missing(FLEX, f"torch.nn.attention.flex_attention does not import: {exc!r}")
    if "compiled" not in _FLEX:
        _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
    if "block_mask" not in data:
        cu = data["cu"].long()
        tokens = int(cu[-1])
        document = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device),
                                           cu[1:] - cu[:-1])

        def document_causal(b, h, q_idx, kv_idx):
            return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

        try:
            data["block_mask"] = create_block_mask(document_causal, None, None, tokens, tokens,
                                                   device=cu.device)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at 128k (2026-12-04)
            skip_missing(FLEX, f"create_block_mask failed: {type(exc).__name__}: {exc}")
    compiled, block_mask = _FLEX["compiled"], data["block_mask"]

    def attn(q, k, v, cu, m):
        # [tokens, heads, d] -> [1, heads, tokens, d] views; FlexAttention takes strides.
        out = compiled(*(x.transpose(0, 1)[None] for x in (q, k, v)), block_mask=block_mask,
                       enable_gqa=True)
        return out[0].transpose(0, 1)
    return attn


_DATA = {}


def _data(model: str, tokens: int, mix: str):
    """Inputs of one workload, kept until the next workload (one in memory at a time)."""
    key = (model, tokens, mix)
    if key not in _DATA:
        _DATA.clear()
        hq, hkv = MODELS[model]
        lengths = packed_lengths(mix, tokens)
        gen = torch.Generator(device="cuda").manual_seed(tokens + len(lengths))

        def rand(*shape):
            return torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16)

        cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
        _DATA[key] = dict(q=rand(tokens, hq, HEAD_DIM).requires_grad_(),
                          k=rand(tokens, hkv, HEAD_DIM).requires_grad_(),
                          v=rand(tokens, hkv, HEAD_DIM).requires_grad_(),
                          dout=rand(tokens, hq, HEAD_DIM), cu=cu, max_seqlen=max(lengths),
                          pairs=sum(n * (n + 1) // 2 for n in lengths), samples=len(lengths))
    return _DATA[key]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model,tokens,mix,pass_name", _cases(),
                         ids=lambda x: str(x))
def test_varlen_attention(benchmark, impl, model, tokens, mix, pass_name):
    requires_cuda()
    if impl == OURS_NEW_PACKING and (pass_name != "fwd_bwd" or tokens > 32768):
        pytest.skip(f"{OURS_NEW_PACKING} runs forward+backward rows up to 32k only")
    if impl not in (OURS, OURS_NEW_PACKING, FLEX):
        reason = fa2_unavailable_reason()
        if reason and impl != SDPA:
            skip_missing(impl, reason)
        if impl == SDPA and tokens > 8192:
            pytest.skip(f"{SDPA} is benchmarked on 8k rows only (one Python call per sample)")
    data = _data(model, tokens, mix)
    hq, hkv = MODELS[model]
    attn = _flex_attention(data) if impl == FLEX else _impl_fn(impl)
    q, k, v, dout, cu, m = (data[n] for n in ("q", "k", "v", "dout", "cu", "max_seqlen"))
    state = {}

    def clear_grads():
        for x in (q, k, v):
            x.grad = None

    def forward():
        return attn(q, k, v, cu, m)

    def fwd_only():
        forward()

    def setup_bwd():
        clear_grads()
        state["out"] = forward()

    def bwd_only():
        state.pop("out").backward(dout)

    def fwd_bwd():
        forward().backward(dout)

    # Compile (and autotune) outside the timing and the peak-memory measurement.
    try:
        fwd_bwd()
    except Exception as exc:  # noqa: BLE001 - a compiler failure means "unavailable"
        if impl != FLEX:
            raise
        skip_missing(impl, f"torch.compile of flex_attention failed: {type(exc).__name__}: {exc}")
    clear_grads()
    torch.cuda.synchronize()

    fn, setup = {"fwd": (fwd_only, None), "bwd": (bwd_only, setup_bwd),
                 "fwd_bwd": (fwd_bwd, clear_grads)}[pass_name]
    case = {"bench": f"attn_{pass_name}", "model": model, "tokens": tokens, "mix": mix,
            "hq": hq, "hkv": hkv, "d": HEAD_DIM, "dtype": "bf16", "causal": True}
    flops = 4.0 * hq * HEAD_DIM * data["pairs"] * BWD_FLOP_RATIO[pass_name]
    big = tokens > 32768
    benchmark.extra_info["samples"] = data["samples"]
    if impl in (FA2, XTUNER):
        benchmark.extra_info["fa2"] = fa2_name()
    measure(benchmark, fn, impl=impl, case=case, flops=flops, setup=setup,
            rounds=3 if big else None, warmup_rounds=1 if big else 3)


@pytest.mark.parametrize("reuse", [False, True], ids=["new-packing", "same-packing"])
@pytest.mark.parametrize("tokens", ROWS[:2])
def test_attention_plan_host_time(benchmark, tokens, reuse):
    """Host work of one call before its kernels: validation and the work lists of the
    forward and the backward, for a new packing or the one the previous call used.

    CPU tensors, so no device sync is included: on a GPU a new packing adds one.
    """
    from kernels.varlen_attention import _plan

    lengths = packed_lengths("sft-lognormal", tokens)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)

    def plan():
        fresh = cu if reuse else cu.clone()
        built = _plan(fresh, fresh, tokens, tokens, cu.device)
        built.query_work(True)
        built.key_work(True)

    plan()
    case = {"bench": "attn_plan_host", "tokens": tokens, "mix": "sft-lognormal",
            "samples": len(lengths)}
    measure(benchmark, plan, impl=OURS if reuse else OURS_NEW_PACKING, case=case,
            rounds=200, warmup_rounds=5)
