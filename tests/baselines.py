"""Third-party attention implementations that the GPU tests and benchmarks compare with.

- ``fa2_varlen``: FlashAttention-2 varlen with native GQA: flash-attn's
  ``flash_attn_varlen_func`` when it is importable, otherwise PyTorch's built-in copy
  of the FA2 kernels (``torch.ops.aten._flash_attention_forward/_backward`` with
  cumulative sequence lengths), wrapped in an autograd function here;
- ``xtuner_varlen``: XTuner's InternLM2 varlen path, K/V repeated to every query
  head (``repeat_kv``) and then the same FA2 call;
- ``sdpa_dense_loop``: ``torch.nn.functional.scaled_dot_product_attention`` on each
  packed sample in turn, K/V repeated (what a model without a varlen kernel does).

Each takes ``(q [total_q, hq, d], k, v [total_k, hkv, d], cu_seqlens_q, cu_seqlens_k,
max_seqlen_q, max_seqlen_k, causal, softmax_scale)`` and returns ``out`` with autograd.
"""

import torch

try:  # pragma: no cover - not installed on the project's machines
    import flash_attn
    from flash_attn import flash_attn_varlen_func as _flash_attn_varlen_func
except ImportError:
    flash_attn = None
    _flash_attn_varlen_func = None


def fa2_name() -> str:
    if _flash_attn_varlen_func is not None:
        return f"flash-attn {flash_attn.__version__}"
    return "torch built-in FA2"


def fa2_unavailable_reason() -> str:
    """Why no FA2 varlen kernel can run here ('' when one can)."""
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if _flash_attn_varlen_func is not None:
        return ""
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return "flash-attn is not installed and this torch has no aten._flash_attention_forward"
    if torch.cuda.get_device_capability() < (8, 0):
        return "FlashAttention-2 needs compute capability 8.0 or newer"
    return ""


class _TorchFlashVarlen(torch.autograd.Function):
    """PyTorch's FA2 varlen kernels; the positional arguments are the same in torch 2.11
    and 2.14 (only the names of the two state outputs changed)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        out, lse, state_a, state_b, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, state_a, state_b)
        ctx.args = (max_q, max_k, causal, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k, state_a, state_b = ctx.saved_tensors
        max_q, max_k, causal, scale = ctx.args
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal,
            state_a, state_b, scale=scale)
        return dq, dk, dv, None, None, None, None, None, None


def fa2_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, softmax_scale=None):
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if _flash_attn_varlen_func is not None:
        return _flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, 0.0,
                                       softmax_scale=scale, causal=causal)
    return _TorchFlashVarlen.apply(q, k, v, cu_q, cu_k, int(max_q), int(max_k), causal, scale)


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[t, hkv, d] -> [t, hkv * group, d]``, head ``h`` a copy of kv head ``h // group``."""
    t, hkv, d = x.shape
    return x[:, :, None, :].expand(t, hkv, group, d).reshape(t, hkv * group, d)


def xtuner_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, softmax_scale=None):
    group = q.shape[1] // k.shape[1]
    return fa2_varlen(q, repeat_kv(k, group), repeat_kv(v, group), cu_q, cu_k, max_q, max_k,
                      causal, softmax_scale)


def sdpa_dense_loop(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, softmax_scale=None):
    """One SDPA call per sample; q and k lengths must match when ``causal`` (SDPA's
    causal mask is top-left aligned)."""
    group = q.shape[1] // k.shape[1]
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    outs = []
    for i in range(len(bounds_q) - 1):
        qi = q[bounds_q[i]:bounds_q[i + 1]].transpose(0, 1)[None]
        ki = repeat_kv(k[bounds_k[i]:bounds_k[i + 1]], group).transpose(0, 1)[None]
        vi = repeat_kv(v[bounds_k[i]:bounds_k[i + 1]], group).transpose(0, 1)[None]
        oi = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=causal,
                                                              scale=softmax_scale)
        outs.append(oi[0].transpose(0, 1))
    return torch.cat(outs)
