"""Sequence-parallel (Ulysses) attention over a ``torch.distributed`` group.

Each of the ``sp`` ranks of ``group`` holds ``tokens`` consecutive tokens of each of
``rows`` rows (rank ``r``: tokens ``[r * tokens, (r + 1) * tokens)`` of every row), all
heads.  :func:`heads_to_ranks` (or :func:`qkv_heads_to_ranks`, from InternLM2's fused
``wqkv`` output, rotated on the way) exchanges that for every token of this rank's heads
(:func:`kernels.split_heads` decides which; K/V travel as kv heads), attention runs on
whole rows, and :func:`heads_from_ranks` brings the output back, optionally through the
output projection, whose input gradient is then computed straight into the backward
exchange's send buffer.  Each exchange is one ``all_to_all_single`` on buffers the
layout kernels of :mod:`kernels.sp_layout` write, and is differentiable (the backward
runs the reverse exchange).  :func:`attention` and :func:`qkv_attention` compose them.

Only ``torch.distributed`` and this package are used; which group, which rank holds
what, and where the packing comes from are the caller's.
"""

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from kernels import backend
from kernels._runtime import packed_heads
from kernels.sp_layout import (HeadSplit, pack_linear_input_grad, pack_qkv_rotary, split_heads,
                               unpack_qkv_rotary)
from kernels.varlen_attention import packing_bounds

__all__ = ["attention", "heads_from_ranks", "heads_to_ranks", "qkv_attention",
           "qkv_heads_to_ranks"]


# --------------------------------------------------------------------------- layouts
class _HeadLayout:
    """q, k, v ``[tokens, h, d]`` <-> the exchange buffer (:func:`kernels.pack_heads`)."""

    def __init__(self, split: HeadSplit, head_dim: int):
        self.split, self.head_dim = split, head_dim

    def pack(self, q, k, v) -> torch.Tensor:
        return backend.pack_heads(self.split, q, k, v)

    def unpack(self, buffer: torch.Tensor, tokens: int) -> tuple:
        return backend.unpack_heads(self.split, buffer, tokens, self.head_dim)


class _RotaryQKVLayout:
    """``wqkv``'s output <-> the exchange buffer, split and rotated on the way (Triton)."""

    def __init__(self, split: HeadSplit, head_dim: int, rope: dict):
        self.split, self.head_dim, self.rope = split, head_dim, rope

    def pack(self, qkv) -> torch.Tensor:
        buffer, self.rotary = pack_qkv_rotary(self.split, qkv, self.head_dim, **self.rope)
        return buffer

    def unpack(self, buffer: torch.Tensor, tokens: int) -> tuple:
        return (unpack_qkv_rotary(self.split, buffer, self.rotary),)


# ------------------------------------------------------------------------- exchanges
def _to_rank_major(x: torch.Tensor, rows: int, sp: int) -> torch.Tensor:
    """Rows ``[rows, sp * tokens, ...]`` -> flat ``[sp, rows, tokens, ...]``: a view for one row."""
    if rows == 1:
        return x.reshape(-1)
    return x.reshape(rows, sp, x.numel() // (rows * sp)).transpose(0, 1).reshape(-1)


def _to_row_major(x: torch.Tensor, rows: int, sp: int, shape) -> torch.Tensor:
    """Flat ``[sp, rows, tokens, ...]`` -> rows, ``shape`` ``[rows * sp * tokens, ...]``."""
    if rows > 1:
        x = x.view(sp, rows, x.numel() // (sp * rows)).transpose(0, 1)
    return x.reshape(shape)


def _exchange(send: torch.Tensor, recv_sizes, send_sizes, group) -> torch.Tensor:
    recv = send.new_empty(sum(recv_sizes))
    dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=group)
    return recv


class _ToRankHeads(torch.autograd.Function):
    """This rank's tokens of every head -> every token of this rank's heads: q, k, v
    ``[sp * tokens, h_rank, d]``, views of the received buffer (for one row; a copy
    reorders several)."""

    @staticmethod
    def forward(ctx, layout, rank, group, rows, tokens, *inputs):
        split, head_dim = layout.split, layout.head_dim
        sp, width = split.world_size, split.width(rank)
        recv = _exchange(layout.pack(*inputs), [tokens * width * head_dim] * sp,
                         split.chunk_numels(tokens, head_dim), group)
        every = _to_row_major(recv, rows, sp, (sp * tokens, width, head_dim))
        ctx.args = (layout, rank, group, rows, tokens)
        nq, nkv = split.num_q(rank), split.num_kv(rank)
        return every[:, :nq], every[:, nq:nq + nkv], every[:, nq + nkv:]

    @staticmethod
    def backward(ctx, dq, dk, dv):
        layout, rank, group, rows, tokens = ctx.args
        split, head_dim = layout.split, layout.head_dim
        # Our attention's gradients of the received views are views of one buffer
        # already (kernels.varlen_attention); other attention paths get concatenated.
        every = packed_heads((dq, dk, dv))
        if every is None:
            every = torch.cat([dq, dk, dv], dim=1)
        grad = _to_rank_major(every, rows, split.world_size)
        back = _exchange(grad, split.chunk_numels(tokens, head_dim),
                         [tokens * split.width(rank) * head_dim] * split.world_size, group)
        return (None, None, None, None, None, *layout.unpack(back, tokens))


class _FromRankHeads(torch.autograd.Function):
    """Every token of this rank's heads ``[sp * tokens, h_rank, d]`` -> this rank's tokens
    of every head ``[tokens, hq, d]``; with ``weight`` (and ``bias``), those times
    ``weight.T`` (+ ``bias``) ``[tokens, out_features]``, whose input gradient the backward
    computes straight into the reverse exchange's send buffer."""

    @staticmethod
    def forward(ctx, out, weight, bias, split: HeadSplit, rank, group, rows):
        sp, head_dim = split.world_size, out.shape[2]
        tokens = out.shape[0] // sp
        recv = _exchange(_to_rank_major(out.contiguous(), rows, sp),
                         split.chunk_numels(tokens, head_dim, kv=False),
                         [tokens * split.num_q(rank) * head_dim] * sp, group)
        ctx.args = (split, rank, group, rows, tokens, head_dim)
        ctx.projected = weight is not None
        heads = backend.unpack_heads(split, recv, tokens, head_dim, kv=False)[0]
        if not ctx.projected:
            return heads
        heads = heads.view(tokens, -1)
        ctx.save_for_backward(heads, weight)
        return torch.nn.functional.linear(heads, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        split, rank, group, rows, tokens, head_dim = ctx.args
        sp, width = split.world_size, split.num_q(rank)
        grad_weight = grad_bias = None
        if ctx.projected:
            heads, weight = ctx.saved_tensors
            send = pack_linear_input_grad(split, grad, weight)
            if ctx.needs_input_grad[1]:
                grad_weight = grad.t().mm(heads)
            if ctx.needs_input_grad[2]:
                grad_bias = grad.sum(0)
        else:
            send = backend.pack_heads(split, grad)
        back = _exchange(send, [tokens * width * head_dim] * sp,
                         split.chunk_numels(tokens, head_dim, kv=False), group)
        return (_to_row_major(back, rows, sp, (sp * tokens, width, head_dim)),
                grad_weight, grad_bias, None, None, None, None)


def heads_to_ranks(split: HeadSplit, group, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   rows: int = 1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``[rows * tokens, hq, d]``, k/v ``[rows * tokens, hkv, d]`` (this rank's tokens of
    every row, row-major) -> this rank's heads of every token of the rows,
    ``[rows * sp * tokens, h, d]`` each.  Differentiable."""
    layout = _HeadLayout(split, q.shape[-1])
    return _ToRankHeads.apply(layout, dist.get_rank(group), group, rows, q.shape[0], q, k, v)


def qkv_heads_to_ranks(split: HeadSplit, group, qkv: torch.Tensor, head_dim: int,
                       rows: int = 1, **rope) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`heads_to_ranks` from InternLM2's fused ``wqkv`` output ``[rows, tokens,
    width]``, split and rotated (``rope``: the position and angle arguments of
    :func:`kernels.split_qkv_rotary`) by the kernel that writes the send buffer.  Needs
    every kv head on one rank (``split.partitions_kv``) and tensors the Triton kernels
    take."""
    if not split.partitions_kv:
        raise ValueError(f"qkv_heads_to_ranks needs the {split.num_kv_heads} kv heads to "
                         f"divide by the {split.world_size} ranks; use heads_to_ranks")
    layout = _RotaryQKVLayout(split, head_dim, rope)
    tokens = qkv.shape[0] * qkv.shape[1]
    return _ToRankHeads.apply(layout, dist.get_rank(group), group, rows, tokens, qkv)


def heads_from_ranks(split: HeadSplit, group, out: torch.Tensor, rows: int = 1,
                     weight: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This rank's heads of every token ``[rows * sp * tokens, h, d]`` -> this rank's tokens
    of every head ``[rows * tokens, hq, d]``; with ``weight`` ``[out, hq * d]`` (and
    ``bias``) their projection ``[rows * tokens, out]``.  Differentiable."""
    return _FromRankHeads.apply(out, weight, bias, split, dist.get_rank(group), group, rows)


# ------------------------------------------------------------------------ attention
def _row_bounds(rows: int, tokens: int, sp: int, cu_seqlens, max_seqlen, attention_mask,
                device) -> Tuple[torch.Tensor, int]:
    """``(cu_seqlens, max_seqlen)`` of the whole rows the group holds."""
    row = tokens * sp
    if cu_seqlens is None:
        _check_right_padding(attention_mask, rows, row)
        return torch.arange(0, rows * row + 1, row, dtype=torch.int32, device=device), row
    if rows != 1:
        raise ValueError(f"varlen attention packs samples into one row: batch size must "
                         f"be 1, got {rows}")
    cu_seqlens, longest = packing_bounds(
        cu_seqlens, row, device,
        overflow_hint=f" that the {sp} ranks of the sequence-parallel group hold ({tokens} "
                      "each): the row must be split evenly, padded to a multiple of the "
                      "sequence-parallel size as XTuner's collate does")
    return cu_seqlens, int(max_seqlen) if max_seqlen is not None else longest


def _check_right_padding(attention_mask, rows: int, row: int) -> None:
    if attention_mask is None or attention_mask.dim() != 2:
        return
    if attention_mask.shape != (rows, row):
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not "
                         f"cover the {rows} x {row} tokens of the sequence-parallel group")
    keep = attention_mask.bool()
    if bool((keep[:, 1:] & ~keep[:, :-1]).any()):
        raise NotImplementedError("sequence parallel attention takes right-padded rows only "
                                  "(a padding token is followed by a real one)")


def _attend(split: HeadSplit, group, every: Sequence[torch.Tensor], cu_seqlens, max_seqlen):
    q, k, v = every
    if split.num_q(dist.get_rank(group)):
        return backend.varlen_causal_attention(q, k, v, cu_seqlens, max_seqlen)
    # No heads on this rank: an empty output that keeps it in the backward exchanges.
    return q.clone()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, *,
              cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
              attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention over whole rows, each rank of ``group`` holding a slice of them.

    ``q``: ``[b, tokens, hq, d]``, ``k``/``v``: ``[b, tokens, hkv, d]``, rotated: rank ``r``
    holds tokens ``[r * tokens, (r + 1) * tokens)`` of each row.  ``cu_seqlens`` (int32, the
    packing of the whole row, ``b == 1``; it may end before the row, whose rest then
    attends as one sequence of padding) and ``max_seqlen`` as XTuner's varlen attention
    takes them; without them each row is one causal sequence.  A 2-D ``attention_mask``
    ``[b, sp * tokens]`` may only pad rows on the right, which causal attention needs no
    mask for; other masks are ignored for the same reason (a 4-D mask built from one
    rank's positions describes nothing under sequence parallel).  Returns
    ``[b, tokens, hq, d]``.
    """
    bsz, tokens, num_heads, head_dim = q.shape
    split = split_heads(num_heads, k.shape[2], dist.get_world_size(group))
    bounds = _row_bounds(bsz, tokens, split.world_size, cu_seqlens, max_seqlen,
                         attention_mask, q.device)
    every = heads_to_ranks(split, group, *(x.reshape(bsz * tokens, x.shape[2], head_dim)
                                           for x in (q, k, v)), rows=bsz)
    out = heads_from_ranks(split, group, _attend(split, group, every, *bounds), rows=bsz)
    return out.view(bsz, tokens, num_heads, head_dim)


def qkv_attention(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, group, *,
                  rope: dict, fused_rope: bool = True, cu_seqlens: Optional[torch.Tensor] = None,
                  max_seqlen: Optional[int] = None, attention_mask: Optional[torch.Tensor] = None,
                  out_proj: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None
                  ) -> torch.Tensor:
    """InternLM2's attention from its fused ``wqkv`` output ``[b, tokens, width]`` (this
    rank's tokens of each row): split + RoPE (``rope``: the position and angle arguments
    of :func:`kernels.split_qkv_rotary`, this rank's positions), the exchange, attention
    over whole rows, the exchange back.  ``fused_rope=False`` takes RoPE as PyTorch ops.
    Returns ``[b, tokens, hq * d]``, or with ``out_proj`` ``(weight, bias)`` its
    projection ``[b, tokens, out_features]``.  Packing arguments as for :func:`attention`.
    """
    bsz, tokens, _ = qkv.shape
    split = split_heads(num_heads, num_kv_heads, dist.get_world_size(group))
    bounds = _row_bounds(bsz, tokens, split.world_size, cu_seqlens, max_seqlen,
                         attention_mask, qkv.device)
    if fused_rope and split.partitions_kv and backend.use_triton(qkv):
        every = qkv_heads_to_ranks(split, group, qkv, head_dim, rows=bsz, **rope)
    else:
        q, k, v = backend.split_qkv_rotary(qkv, num_kv_heads, head_dim, fused=fused_rope,
                                           **rope)
        every = heads_to_ranks(split, group, *(x.reshape(bsz * tokens, x.shape[-2], head_dim)
                                               for x in (q, k, v)), rows=bsz)
    weight, bias = out_proj if out_proj is not None else (None, None)
    out = heads_from_ranks(split, group, _attend(split, group, every, *bounds), rows=bsz,
                           weight=weight, bias=bias)
    return out.view(bsz, tokens, -1)
