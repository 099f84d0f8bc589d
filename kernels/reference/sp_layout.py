"""Pure-PyTorch sequence-parallel buffer layouts (see :mod:`kernels.sp_layout`).

What the Triton transforms are tested against and what fallbacks run: built from the
:class:`~kernels.sp_layout.HeadSplit` directly with slice copies (K and V head by head),
not from the kernels' tables.  Any dtype (float64 included); differentiable.
"""

from typing import Optional, Tuple

import torch

from kernels.reference.rotary import split_qkv_rotary_reference


def pack_heads_reference(split, q: torch.Tensor, k: Optional[torch.Tensor] = None,
                         v: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`kernels.sp_layout.pack_heads`: chunk ``r`` = rank ``r``'s q heads (+ K, V slots)."""
    tokens, _, head_dim = q.shape
    kv = k is not None
    sizes = split.chunk_numels(tokens, head_dim, kv)
    buffer = q.new_empty(sum(sizes))
    start = 0
    for r, size in enumerate(sizes):
        # Copies into slices of one buffer: differentiable, one pass over every input.
        chunk = buffer[start:start + size].view(tokens, -1, head_dim)
        start += size
        nq = split.num_q(r)
        chunk[:, :nq] = q[:, split.q_bounds[r]:split.q_bounds[r + 1]]
        if kv:
            nkv = split.num_kv(r)
            for slot, head in enumerate(split.kv_heads[r]):
                chunk[:, nq + slot] = k[:, head]
                chunk[:, nq + nkv + slot] = v[:, head]
    return buffer


def unpack_heads_reference(split, buffer: torch.Tensor, tokens: int, head_dim: int,
                           kv: bool = True) -> Tuple[torch.Tensor, ...]:
    """:func:`kernels.sp_layout.unpack_heads`: repeated kv slots are summed (in order of
    rank and slot, in the buffer's dtype)."""
    q = buffer.new_empty((tokens, split.num_heads, head_dim))
    kv_shape = (tokens, split.num_kv_heads, head_dim)
    k, v = (buffer.new_empty(kv_shape), buffer.new_empty(kv_shape)) if kv else (None, None)
    filled = set()
    for r, chunk in enumerate(buffer.split(split.chunk_numels(tokens, head_dim, kv))):
        nq, nkv = split.num_q(r), split.num_kv(r) if kv else 0
        q_r, k_r, v_r = chunk.view(tokens, -1, head_dim).split([nq, nkv, nkv], dim=1)
        q[:, split.q_bounds[r]:split.q_bounds[r + 1]] = q_r
        for slot, head in enumerate(split.kv_heads[r] if kv else ()):
            if head in filled:
                k[:, head] += k_r[:, slot]
                v[:, head] += v_r[:, slot]
            else:
                k[:, head] = k_r[:, slot]
                v[:, head] = v_r[:, slot]
                filled.add(head)
    return (q, k, v) if kv else (q,)


def pack_qkv_rotary_reference(split, qkv: torch.Tensor, head_dim: int, **rope) -> torch.Tensor:
    """:func:`kernels.sp_layout.pack_qkv_rotary`'s buffer (differentiable: its backward is
    :func:`~kernels.sp_layout.unpack_qkv_rotary`)."""
    q, k, v = split_qkv_rotary_reference(qkv, split.num_kv_heads, head_dim, **rope)
    return pack_heads_reference(split, *(x.reshape(-1, x.shape[-2], head_dim) for x in (q, k, v)))


def pack_linear_input_grad_reference(split, grad_output: torch.Tensor,
                                     weight: torch.Tensor) -> torch.Tensor:
    """:func:`kernels.sp_layout.pack_linear_input_grad`: one GEMM, then a pack."""
    heads = (grad_output @ weight).view(grad_output.shape[0], split.num_heads, -1)
    return pack_heads_reference(split, heads)
