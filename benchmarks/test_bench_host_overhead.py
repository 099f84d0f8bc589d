"""Host work per call: each op eager next to the same call replayed from a CUDA graph (GPU).

A CUDA graph replays the recorded kernels with no Python, no argument checks and no
launch overhead, so ``eager / graph`` is what the host side adds on top of the GPU time
(``host_overhead`` target: <= 1.15 at 8k tokens).  Cases at InternLM2-1.8B widths,
8192 tokens of 1k samples, bf16, forward + backward:

- ``rms_norm``: ``kernels.rms_norm`` ``[8192, 2048]``;
- ``split_qkv_rotary``: the ``wqkv`` output to rotated q, k and v (16 q / 8 kv heads);
- ``apply_rotary``: q and k rotated in place, gradients too (as Liger-Kernel does);
- ``swiglu``: ``[8192, 8192]``, gradients written over the inputs (the patched MLP's call);
- ``decoder_layer``: one patched ``InternLM2DecoderLayer`` (weights' gradients included).

Rows: ``xtuner-patch`` (eager) and ``cuda-graph-replay``.  Without CUDA the eager rows
run at a tiny size under the Triton interpreter (``tests/test_benchmark_host_overhead.py``),
so that every line the GPU run takes runs first on CPU.
"""

import pytest
import torch

from benchmarks.conftest import HAS_CUDA, OURS, measure
from benchmarks.workloads import packed_lengths

GRAPH = "cuda-graph-replay"
if HAS_CUDA:
    DEVICE, DTYPE, TOKENS, PRESET = "cuda", torch.bfloat16, 8192, "1_8b"
    HIDDEN, INTERMEDIATE, HQ, HKV, HEAD_DIM = 2048, 8192, 16, 8, 128
else:
    DEVICE, DTYPE, TOKENS, PRESET = "cpu", torch.float32, 128, "tiny"
    HIDDEN, INTERMEDIATE, HQ, HKV, HEAD_DIM = 256, 896, 4, 1, 64
OPS = ("rms_norm", "split_qkv_rotary", "apply_rotary", "swiglu", "decoder_layer")


def _rand(*shape, requires_grad=False):
    return torch.randn(shape, device=DEVICE, dtype=DTYPE).requires_grad_(requires_grad)


def _packing():
    lengths = packed_lengths("equal-1k", TOKENS) if TOKENS >= 1024 else [TOKENS // 2] * 2
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    position_ids = torch.cat([torch.arange(n, device=DEVICE) for n in lengths])
    return cu, position_ids, max(lengths)


def _decoder_layer():
    """A patched InternLM2 decoder layer and its inputs, packing in XTuner's MessageHub."""
    pytest.importorskip("xtuner._lite.modelings.internlm2", reason="needs xtuner")
    from mmengine import MessageHub
    from xtuner._lite.modelings.internlm2 import InternLM2ForCausalLM

    from xtuner_patch import KernelSwitches
    from xtuner_patch.dispatch import make_dispatch_modules
    from xtuner_patch.fixtures import internlm2_config_dict, internlm2_hf_config

    config = internlm2_hf_config(internlm2_config_dict(
        PRESET, num_hidden_layers=1, attn_implementation="flash_attention_2"))
    with torch.device(DEVICE):
        model = InternLM2ForCausalLM(config).to(DTYPE)
    # XTuner's own dispatch is left out: it only picks the attention forward ours replaces.
    make_dispatch_modules(lambda model, use_varlen_attn=False: None, KernelSwitches())(
        model, True)
    cu, position_ids, max_seqlen = _packing()
    hub = MessageHub.get_instance("varlen_attn_args")
    hub.update_info("cumulative_len_rank_0", cu)
    hub.update_info("max_seqlen_rank_0", max_seqlen)
    layer = model.model.layers[0]
    hidden = _rand(1, TOKENS, HIDDEN, requires_grad=True)
    inputs = [hidden, *layer.parameters()]
    grad_out = _rand(1, TOKENS, HIDDEN)

    def step():
        out = layer(hidden, position_ids=position_ids[None])[0]
        return torch.autograd.grad(out, inputs, grad_out)
    return step


def _make_step(op: str):
    """The op's forward + backward, as a closure returning the gradients."""
    import kernels

    cu, position_ids, _ = _packing()
    inv_freq, _ = kernels.rotary_inv_freq(HEAD_DIM, 1e6, device=DEVICE)
    if op == "rms_norm":
        x, weight = _rand(TOKENS, HIDDEN, requires_grad=True), _rand(HIDDEN, requires_grad=True)
        dy = _rand(TOKENS, HIDDEN)
        return lambda: torch.autograd.grad(kernels.rms_norm(x, weight, 1e-6), [x, weight], dy)
    if op == "split_qkv_rotary":
        qkv = _rand(TOKENS, (HQ + 2 * HKV) * HEAD_DIM, requires_grad=True)
        grads = [_rand(TOKENS, h, HEAD_DIM) for h in (HQ, HKV, HKV)]
        return lambda: torch.autograd.grad(
            kernels.split_qkv_rotary(qkv, HKV, HEAD_DIM, cu_seqlens=cu, inv_freq=inv_freq),
            [qkv], grads)
    if op == "apply_rotary":
        q, k = _rand(TOKENS, HQ, HEAD_DIM, requires_grad=True), _rand(TOKENS, HKV, HEAD_DIM,
                                                                      requires_grad=True)
        grads = [_rand(TOKENS, HQ, HEAD_DIM), _rand(TOKENS, HKV, HEAD_DIM)]

        # Clones (non-leaf, gradient passed through without a kernel) and fresh incoming
        # gradients: the step rotates both in place.  Inside the step so a graph replays it.
        def step():
            outs = kernels.apply_rotary(q.clone(), k.clone(), cu_seqlens=cu, inv_freq=inv_freq,
                                        in_place=True, in_place_grad=True)
            return torch.autograd.grad(outs, [q, k], [g.clone() for g in grads])
        return step
    if op == "swiglu":
        a, b = (_rand(TOKENS, INTERMEDIATE, requires_grad=True) for _ in range(2))
        dy = _rand(TOKENS, INTERMEDIATE)

        def step():
            a1, b1 = a * 1, b * 1  # stand-ins for w1(x), w3(x): outputs of an op
            return torch.autograd.grad(kernels.swiglu(a1, b1, in_place_grad=True), [a1, b1], dy)
        return step
    if op == "decoder_layer":
        return _decoder_layer()
    raise AssertionError(op)


def _graphed(step):
    """``step`` captured in a CUDA graph after warm-up (compilation, autotuning, the
    packing's first read); returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


@pytest.mark.parametrize("impl", [OURS, GRAPH])
@pytest.mark.parametrize("op", OPS)
def test_host_overhead(benchmark, op, impl):
    if impl == GRAPH and not HAS_CUDA:
        pytest.skip("CUDA graphs need a GPU")
    step = _make_step(op)
    if impl == GRAPH:
        step = _graphed(step)
    else:
        step()  # compile and autotune outside the timing
    case = {"bench": "host_overhead", "op": op, "tokens": TOKENS,
            "dtype": str(DTYPE).replace("torch.", "")}
    try:
        measure(benchmark, step, impl=impl, case=case, rounds=50 if HAS_CUDA else 2,
                warmup_rounds=5 if HAS_CUDA else 0)
    finally:
        if op == "decoder_layer":
            from mmengine import MessageHub

            hub = MessageHub.get_instance("varlen_attn_args")
            hub.update_info("cumulative_len_rank_0", None)
            hub.update_info("max_seqlen_rank_0", None)
