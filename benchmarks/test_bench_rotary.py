"""RoPE forward + backward at InternLM2 shapes: xtuner-patch vs baselines (GPU).

- ``rope_fwd_bwd``: q ``[tokens, hq, d]`` and k ``[tokens, hkv, d]`` (bf16, packed
  samples of 8k tokens, positions restarting per sample, rope_theta 1e6).  Baselines
  compute cos/sin with InternLM2's rotary module inside the timed region, as the model
  does; ours computes them in the kernel.  Ours rotates q and k in their own buffers and
  the gradients in theirs (``in_place=True, in_place_grad=True``, on inputs made fresh
  before every round, untimed), as Liger-Kernel does; ``xtuner-patch-out-of-place``
  allocates outputs and gradients (the defaults).
- ``split_rope_fwd_bwd``: from the ``wqkv`` projection output ``[tokens, (hq + 2 hkv)
  d]`` to contiguous rotated q, k and plain v (the attention kernel's layout).  Ours is
  the fused ``split_qkv_rotary``; ``xtuner-patch-views`` is ``apply_rotary`` on strided
  views plus a copy of v, which tells whether the fusion wins.

Bytes that must move: q and k read and written in each direction (``rope``), the
whole qkv buffer read and written in each direction (``split``).
"""

import pytest
import torch

from benchmarks.conftest import OURS, measure, requires_cuda, skip_missing
from benchmarks.copy_bandwidth import record_copy_share

MODELS = {"internlm2-7b": (32, 8), "internlm2-1.8b": (16, 8)}
TOKENS = [8192, 32768, 131072]
HEAD_DIM = 128
THETA = 1e6
SAMPLE_LEN = 8192
DTYPE = torch.bfloat16

OUT_OF_PLACE = "xtuner-patch-out-of-place"
ROPE_IMPLS = [OURS, OUT_OF_PLACE, "hf-pytorch", "xtuner-triton", "liger-kernel"]
SPLIT_IMPLS = [OURS, "xtuner-patch-views", "hf-pytorch"]

CASES = [dict(bench=bench, model=m, hq=hq, hkv=hkv, head_dim=HEAD_DIM, tokens=t, dtype="bf16")
         for bench in ("rope_fwd_bwd", "split_rope_fwd_bwd")
         for m, (hq, hkv) in MODELS.items() for t in TOKENS]
PARAMS = [(impl, case) for case in CASES
          for impl in (ROPE_IMPLS if case["bench"] == "rope_fwd_bwd" else SPLIT_IMPLS)]


def _hf():
    try:
        from xtuner._lite.modelings.internlm2 import modeling_internlm2
    except Exception as exc:  # noqa: BLE001 - any import failure means "not installed"
        skip_missing("hf-pytorch", f"xtuner's InternLM2 modeling code does not import: {exc!r}")
    return modeling_internlm2


def _hf_cos_sin(hf, like, position_ids):
    """cos/sin ``[1, tokens, d]`` from InternLM2's rotary module, as the model computes them."""
    module = hf.InternLM2RotaryEmbedding(HEAD_DIM, base=THETA).to(like.device)
    return module(like, position_ids[None])


def _rope_step(impl, q, k, position_ids):
    """Forward + backward of rotating q ``[t, hq, d]`` and k ``[t, hkv, d]``."""
    if impl == OUT_OF_PLACE:
        from kernels import apply_rotary, rotary_inv_freq

        inv_freq, _ = rotary_inv_freq(HEAD_DIM, THETA, device=q.device)

        def forward():
            return apply_rotary(q, k, position_ids=position_ids, inv_freq=inv_freq)
    elif impl == "hf-pytorch":
        hf = _hf()

        def forward():
            cos, sin = _hf_cos_sin(hf, q, position_ids)
            return hf.apply_rotary_pos_emb(q[None], k[None], cos, sin, unsqueeze_dim=2)
    elif impl == "xtuner-triton":
        hf = _hf()
        try:
            from xtuner.model.modules.dispatch.triton_kernels.rotary import apply_rotary_emb
        except Exception as exc:  # noqa: BLE001
            skip_missing(impl, f"xtuner's Triton rotary kernel does not import: {exc!r}")

        def forward():
            cos, sin = _hf_cos_sin(hf, q, position_ids)
            return (apply_rotary_emb(q[None], cos[0], sin[0]),
                    apply_rotary_emb(k[None], cos[0], sin[0]))
    elif impl == "liger-kernel":
        hf = _hf()
        try:
            from liger_kernel.transformers.rope import liger_rotary_pos_emb
        except Exception as exc:  # noqa: BLE001
            skip_missing(impl, f"liger_kernel does not import: {exc!r}")

        def forward():
            cos, sin = _hf_cos_sin(hf, q, position_ids)
            return liger_rotary_pos_emb(q[None].transpose(1, 2), k[None].transpose(1, 2),
                                        cos, sin)
    else:
        raise AssertionError(impl)
    return forward


def _split_step(impl, qkv, hq, hkv, position_ids):
    """Forward of wqkv output -> contiguous rotated q, k and v."""
    groups = hq // hkv
    if impl in (OURS, "xtuner-patch-views"):
        from kernels import apply_rotary, rotary_inv_freq, split_qkv_rotary

        inv_freq, _ = rotary_inv_freq(HEAD_DIM, THETA, device=qkv.device)
        if impl == OURS:
            return lambda: split_qkv_rotary(qkv, hkv, HEAD_DIM, position_ids=position_ids,
                                            inv_freq=inv_freq)

        def forward():
            grouped = qkv.view(1, -1, hkv, groups + 2, HEAD_DIM)
            q, k = apply_rotary(grouped[..., :groups, :], grouped[..., groups, :],
                                position_ids=position_ids, inv_freq=inv_freq)
            return q, k, grouped[..., groups + 1, :].contiguous()
        return forward

    hf = _hf()

    def forward():
        # InternLM2Attention's split (einops rearrange in the model), then its RoPE.
        grouped = qkv.view(1, -1, hkv, groups + 2, HEAD_DIM)
        q = grouped[..., :groups, :].reshape(1, -1, hq, HEAD_DIM)
        k, v = grouped[..., groups, :], grouped[..., groups + 1, :]
        cos, sin = _hf_cos_sin(hf, v, position_ids)
        q, k = hf.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        return q.contiguous(), k.contiguous(), v.contiguous()
    return forward


@pytest.mark.parametrize("impl, case", PARAMS,
                         ids=[f"{c['bench']}-{c['model']}-{c['tokens']}-{i}" for i, c in PARAMS])
def test_rotary(benchmark, impl, case):
    requires_cuda()
    gen = torch.Generator(device="cuda").manual_seed(case["tokens"] + case["hq"])
    t, hq, hkv = case["tokens"], case["hq"], case["hkv"]
    position_ids = torch.arange(t, device="cuda") % SAMPLE_LEN
    elem = torch.finfo(DTYPE).bits // 8
    if case["bench"] == "rope_fwd_bwd":
        q = torch.randn((t, hq, HEAD_DIM), generator=gen, device="cuda", dtype=DTYPE)
        k = torch.randn((t, hkv, HEAD_DIM), generator=gen, device="cuda", dtype=DTYPE)
        inputs = [q.requires_grad_(), k.requires_grad_()]
        forward = _rope_step(impl, q, k, position_ids)
        bytes_moved = 4.0 * elem * t * (hq + hkv) * HEAD_DIM
    else:
        qkv = torch.randn((t, (hq + 2 * hkv) * HEAD_DIM), generator=gen, device="cuda",
                          dtype=DTYPE)
        inputs = [qkv.requires_grad_()]
        forward = _split_step(impl, qkv, hq, hkv, position_ids)
        bytes_moved = 4.0 * elem * t * (hq + 2 * hkv) * HEAD_DIM

    if impl == OURS and case["bench"] == "rope_fwd_bwd":
        step, setup = _in_place_rope_step(q, k, position_ids, gen)
    else:
        outs = forward()
        grads_out = [torch.randn_like(o) for o in outs]
        del outs
        setup = None

        def step():
            return torch.autograd.grad(forward(), inputs, grads_out)

    measure(benchmark, step, impl=impl, case=case, bytes_moved=bytes_moved, setup=setup)
    record_copy_share(benchmark)


def _in_place_rope_step(q, k, position_ids, gen):
    """``(step, setup)``: RoPE rotating inputs and gradients in their own buffers.

    ``setup`` makes the inputs (clones of the leaves ``q``/``k``: non-leaf, as in a model,
    with a backward that passes the gradient through without a kernel) and the incoming
    gradients anew, since the step overwrites both.
    """
    from kernels import apply_rotary, rotary_inv_freq

    inv_freq, _ = rotary_inv_freq(HEAD_DIM, THETA, device=q.device)
    grads = [torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype) for t in (q, k)]
    state = {}

    def setup():
        state["inputs"] = [q.clone(), k.clone()]
        state["grads"] = [g.clone() for g in grads]

    def step():
        outs = apply_rotary(*state["inputs"], position_ids=position_ids, inv_freq=inv_freq,
                            in_place=True, in_place_grad=True)
        return torch.autograd.grad(outs, [q, k], state["grads"])

    return step, setup
