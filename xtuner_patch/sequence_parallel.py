"""XTuner's sequence parallel (Ulysses) for InternLM2 attention, on xtuner-patch's kernels.

XTuner splits every row along the sequence over the ranks of a sequence-parallel group
(``input_ids``, ``labels`` and ``position_ids``; ``cumulative_len`` keeps describing the
whole row), so each rank's attention forward holds its own tokens of every head.  Per
layer, on each rank::

    wqkv -> split + RoPE (its own positions) into the send buffer -> all_to_all_single
         -> [sp * tokens, heads of this rank, d] views -> varlen attention over whole rows
         -> all_to_all_single -> unpack_heads -> wo (the GEMMs of its input gradient
            write the backward's send buffer)

(split + RoPE write the send buffer directly, :func:`kernels.sp_layout.pack_qkv_rotary`,
when every kv head goes to one rank and the fused RoPE kernel runs; otherwise
``split_qkv_rotary`` then :func:`kernels.pack_heads`.)

XTuner instead repeats K and V to every query head, then runs three all-to-alls that
each copy their input into per-rank pieces and concatenate the output
(``xtuner.parallel.sequence``).  Here q, k and v travel in one exchange, K and V as kv
heads (a quarter of XTuner's bytes for InternLM2's 32 query / 8 kv heads), and the
received buffer is the attention input as it is.  Head counts that do not divide by the
group size are split unevenly (see :func:`kernels.sp_layout.split_heads`): a rank then
attends over at most ``ceil(hq / sp)`` heads, never more than XTuner's alternative
gives it (splitting head_dim over an inner group, all-gathering it, and computing each
head on several ranks).

The backward pass runs the same exchanges in reverse.  When ``wo`` is a plain
``nn.Linear`` (no LoRA, no hooks such as ZeRO-3's, no autocast), its input gradient is
computed by GEMMs straight into the send buffer of the output's reverse exchange
(:func:`kernels.sp_layout.pack_linear_input_grad`) rather than packed after one GEMM.
The attention kernel returns the gradients of the received q, k, v views as views of
one buffer, which is the send buffer of the reverse exchange as it is (no
concatenation).  What comes back,
:func:`kernels.unpack_heads` reads into q, k, v gradients, summing those of kv heads sent
to several ranks (or :func:`kernels.sp_layout.unpack_qkv_rotary` rotates it back into
``wqkv``'s output gradient).  The loss stays XTuner's:
``SupervisedFinetune`` splits the data and reduces the loss over the group
(``reduce_sequence_parallel_loss``).  Layout transforms run as Triton kernels where
:func:`xtuner_patch.ops.use_triton` says so, else as their PyTorch references.
"""

from typing import Optional

import torch
import torch.distributed as dist

import kernels
from kernels import reference
from kernels._runtime import packed_heads
from kernels.sp_layout import (HeadSplit, pack_linear_input_grad, pack_qkv_rotary, split_heads,
                               unpack_qkv_rotary)

from . import ops


def world_size() -> int:
    """The size of XTuner's sequence-parallel group (1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    from xtuner.parallel.sequence import get_sequence_parallel_world_size

    return get_sequence_parallel_world_size()


def group_for(module) -> Optional["dist.ProcessGroup"]:
    """XTuner's sequence-parallel group when ``module``'s forward must run sequence
    parallel (training, as XTuner decides it, in a group of several ranks), else None."""
    if not module.training or world_size() <= 1:
        return None
    from xtuner.parallel.sequence import get_sequence_parallel_group

    return get_sequence_parallel_group()


def attention_forward(module, hidden_states: torch.Tensor, group,
                      attention_mask: Optional[torch.Tensor] = None,
                      position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """An InternLM2 attention module's output ``[b, tokens, hidden]`` for this rank's
    ``tokens`` of each row, the rows being spread over ``group`` (from :func:`group_for`).

    ``position_ids`` are this rank's (XTuner's split gives each rank its own).  Packing
    boundaries come from XTuner's MessageHub as in :mod:`xtuner_patch.internlm2`; other
    arguments as for :func:`attention`.
    """
    from . import internlm2

    if position_ids is None:
        raise ValueError("sequence parallel attention needs this rank's position_ids "
                         "(XTuner's data split provides them)")
    bsz, tokens, _ = hidden_states.shape
    head_dim = module.head_dim
    split = split_heads(module.num_heads, module.num_key_value_heads,
                        dist.get_world_size(group))
    qkv = module.wqkv(hidden_states)
    rope = internlm2.rope_arguments(module.rotary_emb, position_ids)
    if module.xtuner_patch_fused_rope and split.partitions_kv and ops.use_triton(qkv):
        layout, inputs = _RotaryQKVLayout(split, head_dim, rope), (qkv,)
    else:
        q, k, v = ops.split_qkv_rotary(qkv, split.num_kv_heads, head_dim,
                                       fused=module.xtuner_patch_fused_rope, **rope)
        layout = _HeadLayout(split, head_dim, ops.use_triton(qkv))
        inputs = tuple(x.reshape(bsz * tokens, x.shape[-2], head_dim) for x in (q, k, v))
    cumulative_len, max_seqlen = (internlm2._message_hub_varlen_args()
                                  if module.xtuner_patch_varlen else (None, None))
    projection = _plain_linear(module.wo, qkv)
    out = _attend(layout, inputs, group, bsz, tokens, cumulative_len, max_seqlen,
                  attention_mask, projection)
    if projection is not None:
        return out.view(bsz, tokens, -1)
    return module.wo(out.reshape(bsz, tokens, split.num_heads * head_dim))


def _plain_linear(linear, x: torch.Tensor) -> Optional[tuple]:
    """``(weight, bias)`` of ``linear`` when ``F.linear`` with them is all its forward
    would do on ``x`` (``wqkv``'s output, for its dtype and device), else None: then the
    module runs as it is and its input gradient is packed by a separate pass."""
    if type(linear) is not torch.nn.Linear:
        reason = f"it is a {type(linear).__name__} (a LoRA wrapper, a subclass, ...), " \
                 "not a plain torch.nn.Linear"
    elif ops.has_hooks(linear) or hasattr(linear.weight, "ds_id"):
        reason = "it has hooks (e.g. DeepSpeed ZeRO-3 gathering its weight)"
    elif torch.is_autocast_enabled(x.device.type):
        reason = "autocast picks its GEMM's dtype"
    elif (linear.weight.dtype, linear.weight.device) != (x.dtype, x.device):
        reason = f"its weight is {linear.weight.dtype} on {linear.weight.device}, its input " \
                 f"{x.dtype} on {x.device}"
    else:
        return linear.weight, linear.bias
    ops.warn_once("xtuner-patch: sequence parallel calls the attention output projection as a "
                  "module, its input gradient packed by a separate pass: %s", reason)
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, *,
              cumulative_len: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
              attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention over whole rows, each rank of ``group`` holding a slice of them.

    ``q``: ``[b, tokens, hq, d]``, ``k``/``v``: ``[b, tokens, hkv, d]``, rotated: rank ``r``
    holds tokens ``[r * tokens, (r + 1) * tokens)`` of each row.  ``cumulative_len``
    (packing boundaries of the whole row, ``b == 1``) and ``max_seqlen`` as XTuner's
    varlen attention takes them; without them each row is one causal sequence.  A 2-D
    ``attention_mask`` ``[b, sp * tokens]`` may only pad rows on the right (what XTuner's
    collate does), which causal attention needs no mask for; other masks are ignored
    for the same reason (the 4-D masks Hugging Face builds from one rank's positions
    describe nothing under sequence parallel).  Returns ``[b, tokens, hq, d]``.
    """
    bsz, tokens, num_heads, head_dim = q.shape
    split = split_heads(num_heads, k.shape[2], dist.get_world_size(group))
    layout = _HeadLayout(split, head_dim, ops.use_triton(q))
    inputs = tuple(x.reshape(bsz * tokens, x.shape[2], head_dim) for x in (q, k, v))
    out = _attend(layout, inputs, group, bsz, tokens, cumulative_len, max_seqlen,
                  attention_mask)
    return out.view(bsz, tokens, num_heads, head_dim)


def _attend(layout, inputs, group, bsz: int, tokens: int, cumulative_len, max_seqlen,
            attention_mask, projection: Optional[tuple] = None) -> torch.Tensor:
    """Exchange, attend over whole rows, exchange back: ``[bsz * tokens, hq, d]``, or
    with ``projection`` ``(weight, bias)`` that output projected: ``[bsz * tokens, out]``."""
    split, rank = layout.split, dist.get_rank(group)
    cu_seqlens, max_seqlen = _row_bounds(bsz, tokens, split.world_size, cumulative_len,
                                         max_seqlen, attention_mask, inputs[0].device)
    q, k, v = _ToRankHeads.apply(layout, rank, group, bsz, bsz * tokens, *inputs)
    if split.num_q(rank):
        out = ops.varlen_causal_attention(q, k, v, cu_seqlens, max_seqlen)
    else:
        # No heads on this rank: an empty output that keeps it in the backward exchanges.
        out = q.clone()
    weight, bias = projection if projection is not None else (None, None)
    return _FromRankHeads.apply(out, weight, bias, split, rank, group, bsz, layout.use_triton)


def _row_bounds(bsz, tokens, sp, cumulative_len, max_seqlen, attention_mask, device):
    """``(cu_seqlens, max_seqlen)`` of the whole rows the group holds."""
    row = tokens * sp
    if cumulative_len is None:
        _check_right_padding(attention_mask, bsz, row)
        return torch.arange(0, bsz * row + 1, row, dtype=torch.int32, device=device), row
    from .internlm2 import packed_bounds

    if bsz != 1:
        raise ValueError(f"varlen attention packs samples into one row: batch size must "
                         f"be 1, got {bsz}")
    cu_seqlens, longest = packed_bounds(
        cumulative_len, row, device,
        overflow_hint=f" that the {sp} ranks of the sequence-parallel group hold ({tokens} "
                      "each): the row must be split evenly, padded to a multiple of the "
                      "sequence-parallel size as XTuner's collate does")
    return cu_seqlens, int(max_seqlen) if max_seqlen is not None else longest


def _check_right_padding(attention_mask, bsz: int, row: int) -> None:
    if attention_mask is None or attention_mask.dim() != 2:
        return
    if attention_mask.shape != (bsz, row):
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not "
                         f"cover the {bsz} x {row} tokens of the sequence-parallel group")
    keep = attention_mask.bool()
    if bool((keep[:, 1:] & ~keep[:, :-1]).any()):
        raise NotImplementedError("sequence parallel attention takes right-padded rows only "
                                  "(a padding token is followed by a real one)")


# --------------------------------------------------------------------------- layouts
def _transforms(use_triton: bool):
    if use_triton:
        return kernels.pack_heads, kernels.unpack_heads
    return reference.pack_heads_reference, reference.unpack_heads_reference


class _HeadLayout:
    """q, k, v ``[tokens, h, d]`` <-> the exchange buffer (:func:`kernels.pack_heads`)."""

    def __init__(self, split: HeadSplit, head_dim: int, use_triton: bool):
        self.split, self.head_dim, self.use_triton = split, head_dim, use_triton
        self._pack, self._unpack = _transforms(use_triton)

    def pack(self, q, k, v) -> torch.Tensor:
        return self._pack(self.split, q, k, v)

    def unpack(self, buffer: torch.Tensor, tokens: int) -> tuple:
        return self._unpack(self.split, buffer, tokens, self.head_dim)


class _RotaryQKVLayout:
    """``wqkv``'s output <-> the exchange buffer, split and rotated on the way (Triton)."""

    use_triton = True

    def __init__(self, split: HeadSplit, head_dim: int, rope: dict):
        self.split, self.head_dim, self.rope = split, head_dim, rope

    def pack(self, qkv) -> torch.Tensor:
        buffer, self.rotary = pack_qkv_rotary(self.split, qkv, self.head_dim, **self.rope)
        return buffer

    def unpack(self, buffer: torch.Tensor, tokens: int) -> tuple:
        return (unpack_qkv_rotary(self.split, buffer, self.rotary),)


# ------------------------------------------------------------------------- exchanges
def _to_rank_major(x: torch.Tensor, bsz: int, sp: int) -> torch.Tensor:
    """Rows ``[bsz, sp * tokens, ...]`` -> flat ``[sp, bsz, tokens, ...]``: a view for one row."""
    if bsz == 1:
        return x.reshape(-1)
    return x.reshape(bsz, sp, x.numel() // (bsz * sp)).transpose(0, 1).reshape(-1)


def _to_row_major(x: torch.Tensor, bsz: int, sp: int, shape) -> torch.Tensor:
    """Flat ``[sp, bsz, tokens, ...]`` -> rows, ``shape`` ``[bsz * sp * tokens, ...]``."""
    if bsz > 1:
        x = x.view(sp, bsz, x.numel() // (sp * bsz)).transpose(0, 1)
    return x.reshape(shape)


def _exchange(send: torch.Tensor, recv_sizes, send_sizes, group) -> torch.Tensor:
    recv = send.new_empty(sum(recv_sizes))
    dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=group)
    return recv


class _ToRankHeads(torch.autograd.Function):
    """This rank's tokens of every head -> every token of this rank's heads.

    ``inputs`` in ``layout``'s form, for this rank's ``tokens`` (of all ``bsz`` rows);
    outputs q, k, v ``[sp * tokens, h_rank, d]``, views of the received buffer (for one
    row; a copy reorders a padded batch).
    """

    @staticmethod
    def forward(ctx, layout, rank, group, bsz, tokens, *inputs):
        split, head_dim = layout.split, layout.head_dim
        sp, width = split.world_size, split.width(rank)
        recv = _exchange(layout.pack(*inputs), [tokens * width * head_dim] * sp,
                         split.chunk_numels(tokens, head_dim), group)
        every = _to_row_major(recv, bsz, sp, (sp * tokens, width, head_dim))
        ctx.args = (layout, rank, group, bsz, tokens)
        nq, nkv = split.num_q(rank), split.num_kv(rank)
        return every[:, :nq], every[:, nq:nq + nkv], every[:, nq + nkv:]

    @staticmethod
    def backward(ctx, dq, dk, dv):
        layout, rank, group, bsz, tokens = ctx.args
        split, head_dim = layout.split, layout.head_dim
        # Our attention's gradients of the received views are views of one buffer
        # already (kernels.varlen_attention); other attention paths get concatenated.
        every = packed_heads((dq, dk, dv))
        if every is None:
            every = torch.cat([dq, dk, dv], dim=1)
        grad = _to_rank_major(every, bsz, split.world_size)
        back = _exchange(grad, split.chunk_numels(tokens, head_dim),
                         [tokens * split.width(rank) * head_dim] * split.world_size, group)
        return (None, None, None, None, None, *layout.unpack(back, tokens))


class _FromRankHeads(torch.autograd.Function):
    """Every token of this rank's heads ``[sp * tokens, h_rank, d]`` -> this rank's tokens of
    every head ``[tokens, hq, d]``; with ``weight`` (and ``bias``), those times
    ``weight.T`` (+ ``bias``): the output projection ``[tokens, out_features]``, whose
    input gradient the backward computes straight into the send buffer of the reverse
    exchange (:func:`kernels.sp_layout.pack_linear_input_grad`) instead of packing it."""

    @staticmethod
    def forward(ctx, out, weight, bias, split: HeadSplit, rank, group, bsz, use_triton):
        _, unpack = _transforms(use_triton)
        sp, head_dim = split.world_size, out.shape[2]
        tokens = out.shape[0] // sp
        recv = _exchange(_to_rank_major(out.contiguous(), bsz, sp),
                         split.chunk_numels(tokens, head_dim, kv=False),
                         [tokens * split.num_q(rank) * head_dim] * sp, group)
        ctx.args = (split, rank, group, bsz, use_triton, tokens, head_dim)
        ctx.projected = weight is not None
        heads = unpack(split, recv, tokens, head_dim, kv=False)[0]
        if not ctx.projected:
            return heads
        heads = heads.view(tokens, -1)
        ctx.save_for_backward(heads, weight)
        return torch.nn.functional.linear(heads, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        split, rank, group, bsz, use_triton, tokens, head_dim = ctx.args
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
            pack, _ = _transforms(use_triton)
            send = pack(split, grad)
        back = _exchange(send, [tokens * width * head_dim] * sp,
                         split.chunk_numels(tokens, head_dim, kv=False), group)
        return (_to_row_major(back, bsz, sp, (sp * tokens, width, head_dim)),
                grad_weight, grad_bias, None, None, None, None, None)
