"""Pure-PyTorch varlen (packed) attention with grouped-query heads.

Differentiable with autograd; :func:`kernels.varlen_attention.varlen_attn_func` is
tested against it (in float64) and falls back to it where Triton cannot run.  Each
sequence is attended densely and on its own, with the K/V heads repeated explicitly,
so it is simple rather than fast or frugal.
"""

import math
from typing import Optional, Tuple

import torch


def varlen_attn_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                          softmax_scale: Optional[float] = None, causal: bool = False
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of attention within each packed sequence.

    ``q``: ``[total_q, hq, d]``; ``k``, ``v``: ``[total_k, hkv, d]`` with ``hq % hkv == 0``
    (query head ``h`` uses kv head ``h // (hq // hkv)``); ``cu_seqlens_q/_k``:
    ``[batch + 1]`` cumulative lengths.  ``causal`` aligns the mask bottom-right: query
    ``i`` of a sequence sees key ``j`` when ``j <= i + len_k - len_q``.

    Returns ``out`` ``[total_q, hq, d]`` in q's dtype and the natural-log
    ``lse`` ``[hq, total_q]`` of the scaled scores.  Rows that see no key (an empty
    key sequence, or causal rows above the diagonal when ``len_q > len_k``) get
    ``out = 0`` and ``lse = +inf``, as flash-attn 2 reports them.  The arithmetic is
    float64 for float64 inputs and float32 otherwise.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    group = q.shape[1] // k.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = cu_seqlens_k.tolist()
    outs, lses = [], []
    for i in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        qi = q[q0:q1].to(compute).transpose(0, 1)                           # [hq, Lq, d]
        ki = k[k0:k1].to(compute).repeat_interleave(group, 1).transpose(0, 1)
        vi = v[k0:k1].to(compute).repeat_interleave(group, 1).transpose(0, 1)
        s = torch.matmul(qi, ki.transpose(1, 2)) * scale                    # [hq, Lq, Lk]
        if causal:
            rows = torch.arange(q1 - q0, device=q.device)[:, None]
            cols = torch.arange(k1 - k0, device=q.device)[None, :]
            s = s.masked_fill(cols > rows + (k1 - k0) - (q1 - q0), float("-inf"))
        # A softmax over only masked scores would be 0/0: shift by a finite maximum and
        # divide by a nonzero sum, so empty rows come out 0 with finite gradients.
        m = s.amax(-1, keepdim=True) if s.shape[-1] else s.new_zeros(s.shape[:-1] + (1,))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
        e = torch.exp(s - m)
        total = e.sum(-1, keepdim=True)
        seen = total > 0
        safe = torch.where(seen, total, torch.ones_like(total))
        outs.append(torch.matmul(e / safe, vi).transpose(0, 1))
        lses.append(torch.where(seen, m + torch.log(safe),
                                torch.full_like(total, float("inf"))).squeeze(-1))
    if not outs:
        return q.new_empty(q.shape), q.new_empty((q.shape[1], 0), dtype=compute)
    return torch.cat(outs).to(q.dtype), torch.cat(lses, dim=1)
