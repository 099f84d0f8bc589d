"""Layouts around the two all-to-alls of sequence-parallel (Ulysses) attention.

Each of ``sp`` ranks holds ``tokens`` consecutive tokens of every sequence and all heads:
``q`` ``[tokens, hq, d]``, ``k``/``v`` ``[tokens, hkv, d]``.  The buffers exchanged are one
flat tensor each: chunk ``r`` (sent to, or received from, rank ``r``) is ``[tokens,
width_r, d]`` contiguous, ``width_r`` counting rank ``r``'s query heads, then its kv
slots of K, then of V (no kv slots for the attention output).

- :func:`split_heads`: which heads each rank attends over (kv heads sent once when
  ``hkv % sp == 0``, balanced uneven splits otherwise);
- :func:`pack_heads` / :func:`unpack_heads`: strided q/k/v to a send buffer and back
  (summing repeated kv slots: the adjoint);
- :func:`pack_qkv_rotary` / :func:`unpack_qkv_rotary`: the send buffer straight from
  InternLM2's ``wqkv`` output, split and rotated by the RoPE kernel, and its backward;
- :func:`pack_linear_input_grad`: the output projection's input-gradient GEMMs writing
  the backward exchange's send buffer.

The process group and collective are the caller's (:mod:`kernels.sequence_parallel`).
Deterministic (fixed-order fp32 sums).  Design: ``docs/design.md``.
"""

import functools
import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from kernels._runtime import FLOAT_DTYPES, cdiv, check_tensor, next_power_of_2
from kernels.rotary import check_split_qkv_rotary, launch_rotary

# A table row: (tensor: 0 q, 1 k, 2 v; head) then, per slot holding that head, (heads
# before the slot's chunk in the buffer, i.e. its offset in units of tokens * d; the
# chunk's width; the slot); -1 pads rows of heads held by fewer slots.
_ROW_HEAD = 2
_PER_SLOT = 3


@dataclass(frozen=True)
class HeadSplit:
    """Which heads each rank of a sequence-parallel group attends over.

    ``q_bounds[r]:q_bounds[r + 1]`` are rank ``r``'s query heads; ``kv_heads[r][s]`` is
    the kv head carried by its slot ``s``.
    """

    num_heads: int
    num_kv_heads: int
    q_bounds: Tuple[int, ...]
    kv_heads: Tuple[Tuple[int, ...], ...]

    @property
    def world_size(self) -> int:
        return len(self.kv_heads)

    def num_q(self, rank: int) -> int:
        return self.q_bounds[rank + 1] - self.q_bounds[rank]

    def num_kv(self, rank: int) -> int:
        return len(self.kv_heads[rank])

    def width(self, rank: int, kv: bool = True) -> int:
        """Heads in rank ``rank``'s chunk: its query heads, plus K and V slots with ``kv``."""
        return self.num_q(rank) + (2 * self.num_kv(rank) if kv else 0)

    def chunk_numels(self, tokens: int, head_dim: int, kv: bool = True) -> List[int]:
        """Elements of each rank's chunk in a buffer of :func:`pack_heads` (split sizes)."""
        return [tokens * self.width(r, kv) * head_dim for r in range(self.world_size)]

    @property
    def partitions_kv(self) -> bool:
        """Every kv head goes to exactly one rank, with its whole group of query heads."""
        return self.num_kv_heads % self.world_size == 0

    @property
    def kv_heads_sent(self) -> int:
        """K (or V) heads all ranks receive in total; ``num_kv_heads`` when none repeats."""
        return sum(len(heads) for heads in self.kv_heads)

    def bytes_sent(self, tokens: int, head_dim: int, itemsize: int) -> dict:
        """Bytes one rank sends per attention layer forward (its own chunk included).

        ``{"q", "k", "v", "out"}`` for ``tokens`` tokens per rank; the backward pass sends
        as much again.
        """
        per_head = tokens * head_dim * itemsize
        return {"q": per_head * self.num_heads, "k": per_head * self.kv_heads_sent,
                "v": per_head * self.kv_heads_sent, "out": per_head * self.num_heads}


def _kv_slots(first: int, count: int, group: int) -> Tuple[int, ...]:
    """The kv head of each slot serving query heads ``[first, first + count)``.

    Slot ``m`` serves the ``per_slot`` query heads from ``first + m * per_slot``; the
    largest ``per_slot`` (the fewest slots) whose blocks never straddle two kv heads'
    groups wins.
    """
    for per_slot in range(count, 0, -1):
        if count % per_slot:
            continue
        starts = range(first, first + count, per_slot)
        if all(s // group == (s + per_slot - 1) // group for s in starts):
            return tuple(s // group for s in starts)
    return ()


@functools.lru_cache(maxsize=None)
def split_heads(num_heads: int, num_kv_heads: int, world_size: int) -> HeadSplit:
    """The :class:`HeadSplit` of ``num_heads`` query / ``num_kv_heads`` kv heads over ranks."""
    if world_size < 1:
        raise ValueError(f"the sequence-parallel size must be >= 1, got {world_size}")
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"the number of query heads ({num_heads}) must be a positive "
                         f"multiple of the number of kv heads ({num_kv_heads})")
    group = num_heads // num_kv_heads
    bounds = tuple(r * num_heads // world_size for r in range(world_size + 1))
    kv = tuple(_kv_slots(bounds[r], bounds[r + 1] - bounds[r], group)
               for r in range(world_size))
    return HeadSplit(num_heads, num_kv_heads, bounds, kv)


@functools.lru_cache(maxsize=None)
def _table_rows(split: HeadSplit, kv: bool, to_buffer: bool) -> Tuple[Tuple[int, ...], int]:
    """``(flat rows, row length)`` of the kernel's table.

    Towards the buffer there is one row per chunk slot, with its one source.  From the
    buffer, one row per output head, with every slot holding that head.
    """
    chunk_start, sources = 0, {}
    for r in range(split.world_size):
        width = split.width(r, kv)
        heads = [(0, h) for h in range(split.q_bounds[r], split.q_bounds[r + 1])]
        if kv:
            heads += [(1, h) for h in split.kv_heads[r]] + [(2, h) for h in split.kv_heads[r]]
        for slot, head in enumerate(heads):
            sources.setdefault(head, []).append((chunk_start, width, slot))
        chunk_start += width
    if to_buffer:
        rows = [(head, [place]) for head, places in sources.items() for place in places]
    else:
        rows = sorted(sources.items())
    per_row = max(len(places) for _, places in rows)
    flat = []
    for head, places in rows:
        places = places + [(-1, -1, -1)] * (per_row - len(places))
        flat += [*head, *(x for place in places for x in place)]
    return tuple(flat), _ROW_HEAD + _PER_SLOT * per_row


@functools.lru_cache(maxsize=64)
def _table(split: HeadSplit, kv: bool, to_buffer: bool, device: torch.device) -> torch.Tensor:
    # Cached per device: no host-to-device copy on every call.
    flat, row = _table_rows(split, kv, to_buffer)
    return torch.tensor(flat, dtype=torch.int32, device=device).view(-1, row)


@triton.jit
def _slot_ptrs(BUF, PLACE, tok, col, n_tokens, head_dim):
    """Pointers to ``[tokens, d]`` of one slot: PLACE holds (chunk start, width, slot)."""
    start = tl.load(PLACE).to(tl.int64)
    width = tl.load(PLACE + 1).to(tl.int64)
    slot = tl.load(PLACE + 2).to(tl.int64)
    return BUF + (start * n_tokens + tok[:, None] * width + slot) * head_dim + col[None, :]


# The token count follows the data: not specialised on (see kernels.rms_norm).
@triton.jit(do_not_specialize=["n_tokens"])
def _heads_kernel(Q, K, V, BUF, TABLE, n_tokens, head_dim,
                  sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
                  ROW: tl.constexpr, SLOTS: tl.constexpr, TO_BUFFER: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    row = TABLE + tl.program_id(1) * ROW
    tok = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    col = tl.arange(0, BLOCK_D)
    mask = (tok < n_tokens)[:, None] & (col < head_dim)[None, :]
    which = tl.load(row)
    head = tl.load(row + 1).to(tl.int64)
    if which == 0:
        local = Q + tok[:, None] * sq_t + head * sq_h + col[None, :]
    elif which == 1:
        local = K + tok[:, None] * sk_t + head * sk_h + col[None, :]
    else:
        local = V + tok[:, None] * sv_t + head * sv_h + col[None, :]
    if TO_BUFFER:
        tl.store(_slot_ptrs(BUF, row + 2, tok, col, n_tokens, head_dim),
                 tl.load(local, mask=mask), mask=mask)
    else:
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for s in tl.static_range(SLOTS):
            used = tl.load(row + 2 + 3 * s) >= 0
            src = _slot_ptrs(BUF, row + 2 + 3 * s, tok, col, n_tokens, head_dim)
            acc += tl.load(src, mask=mask & used, other=0.0).to(tl.float32)
        tl.store(local, acc.to(Q.dtype.element_ty), mask=mask)


def _launch(split: HeadSplit, tensors: Sequence[torch.Tensor], buffer: torch.Tensor,
            tokens: int, head_dim: int, to_buffer: bool) -> None:
    kv = len(tensors) == 3
    table = _table(split, kv, to_buffer, buffer.device)
    if tokens == 0 or table.shape[0] == 0:
        return
    q, k, v = tensors if kv else (tensors[0],) * 3
    block_d = next_power_of_2(head_dim)
    block_t = max(1, min(64, 4096 // block_d))
    _heads_kernel[(cdiv(tokens, block_t), table.shape[0])](
        q, k, v, buffer, table, tokens, head_dim,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        ROW=table.shape[1], SLOTS=(table.shape[1] - _ROW_HEAD) // _PER_SLOT,
        TO_BUFFER=to_buffer, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)


def _check_split(split: HeadSplit) -> None:
    if not isinstance(split, HeadSplit):
        raise TypeError(f"split must be a HeadSplit (see split_heads), got "
                        f"{type(split).__name__}")


def pack_heads(split: HeadSplit, q: torch.Tensor, k: Optional[torch.Tensor] = None,
               v: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The send buffer (1-D) of an all-to-all that gives every rank its heads.

    ``q``: ``[tokens, hq, d]``; ``k``, ``v`` (both or neither): ``[tokens, hkv, d]``; any
    token and head strides, contiguous last dimension, one dtype.  Chunk ``r`` is
    ``[tokens, width_r, d]``: rank ``r``'s query heads, then (with k and v) its kv slots
    of K, then of V.  Split sizes: ``split.chunk_numels(tokens, d, kv=k is not None)``.
    """
    _check_split(split)
    if (k is None) != (v is None):
        raise ValueError("pass both k and v, or neither")
    tensors = (q,) if k is None else (q, k, v)
    for name, t in zip("qkv", tensors):
        check_tensor(name, t, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} ({t.dtype} on {t.device}) must match q ({q.dtype} on "
                             f"{q.device})")
    tokens, heads, head_dim = q.shape
    if heads != split.num_heads:
        raise ValueError(f"q has {heads} heads, the split is for {split.num_heads}")
    if k is not None and (k.shape != (tokens, split.num_kv_heads, head_dim)
                          or v.shape != k.shape):
        raise ValueError(f"k and v must be [{tokens}, {split.num_kv_heads}, {head_dim}], got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    numel = sum(split.chunk_numels(tokens, head_dim, kv=k is not None))
    buffer = torch.empty(numel, dtype=q.dtype, device=q.device)
    _launch(split, tensors, buffer, tokens, head_dim, to_buffer=True)
    return buffer


def unpack_heads(split: HeadSplit, buffer: torch.Tensor, tokens: int, head_dim: int,
                 kv: bool = True) -> Tuple[torch.Tensor, ...]:
    """Read a buffer in :func:`pack_heads`'s layout back into contiguous heads.

    Returns ``(q, k, v)`` (``q`` ``[tokens, hq, d]``, ``k``/``v`` ``[tokens, hkv, d]``)
    with ``kv``, else ``(q,)``.  A kv head carried by several slots gets their sum (fp32,
    fixed order), which makes this the adjoint of :func:`pack_heads`.
    """
    _check_split(split)
    check_tensor("buffer", buffer, ndim=1, dtypes=FLOAT_DTYPES)
    numel = sum(split.chunk_numels(tokens, head_dim, kv))
    if buffer.numel() != numel:
        raise ValueError(f"buffer has {buffer.numel()} elements; {tokens} tokens of this split "
                         f"with head_dim {head_dim} need {numel}")
    if not buffer.is_contiguous():
        buffer = buffer.contiguous()
    q = torch.empty(tokens, split.num_heads, head_dim, dtype=buffer.dtype, device=buffer.device)
    outs = (q,)
    if kv:
        outs += tuple(torch.empty(tokens, split.num_kv_heads, head_dim, dtype=buffer.dtype,
                                  device=buffer.device) for _ in range(2))
    _launch(split, outs, buffer, tokens, head_dim, to_buffer=False)
    return outs


def pack_linear_input_grad(split: HeadSplit, grad_output: torch.Tensor,
                           weight: torch.Tensor) -> torch.Tensor:
    """:func:`pack_heads` of ``grad_output @ weight``, computed in place by the GEMM.

    The input gradient of a linear layer ``y = x @ weight.T`` whose input ``x``
    ``[tokens, hq * d]`` is an :func:`unpack_heads` of the attention output, as the send
    buffer of the backward exchange (chunk ``r``: the columns of rank ``r``'s query
    heads), with no ``[tokens, hq * d]`` intermediate and no copy.
    ``grad_output``: ``[tokens, out_features]``; ``weight``: ``[out_features, hq * d]``,
    both one dtype and device.  Every element is one whole dot product as in
    ``grad_output @ weight`` (the GEMMs split columns, never the reduction): one batched
    GEMM when every rank holds as many heads, one GEMM per rank otherwise.  Plain
    PyTorch: runs wherever ``torch.mm`` does.
    """
    _check_split(split)
    for name, t in (("grad_output", grad_output), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have 2 dimensions, got shape {tuple(t.shape)}")
    if grad_output.dtype != weight.dtype or grad_output.device != weight.device:
        raise ValueError(f"grad_output ({grad_output.dtype} on {grad_output.device}) and weight "
                         f"({weight.dtype} on {weight.device}) must match")
    (tokens, features), (out_features, in_features) = grad_output.shape, weight.shape
    if features != out_features or in_features % split.num_heads:
        raise ValueError(f"weight must be [{features}, {split.num_heads} * head_dim] for "
                         f"grad_output of shape {tuple(grad_output.shape)}, got "
                         f"{tuple(weight.shape)}")
    head_dim = in_features // split.num_heads
    buffer = grad_output.new_empty(tokens * in_features)
    widths = {split.num_q(r) for r in range(split.world_size)}
    if len(widths) == 1:
        # Chunk r = grad_output @ weight[:, r-th block of columns]: a batch over ranks of
        # strided views of the same operands (batch strides 0 and the block width).
        cols = widths.pop() * head_dim
        blocks = weight.unflatten(1, (split.world_size, cols)).transpose(0, 1)
        torch.bmm(grad_output.expand(split.world_size, tokens, features), blocks,
                  out=buffer.view(split.world_size, tokens, cols))
        return buffer
    chunks = buffer.split(split.chunk_numels(tokens, head_dim, kv=False))
    for r, chunk in enumerate(chunks):
        first, last = split.q_bounds[r] * head_dim, split.q_bounds[r + 1] * head_dim
        torch.mm(grad_output, weight[:, first:last], out=chunk.view(tokens, last - first))
    return buffer


class QKVRotary(NamedTuple):
    """What :func:`unpack_qkv_rotary` needs of a :func:`pack_qkv_rotary` call."""
    qkv_shape: Tuple[int, ...]
    head_dim: int
    positions: tuple
    angles: tuple
    interleaved: bool


def _qkv_launch_views(split: HeadSplit, qkv: torch.Tensor, buffer: torch.Tensor,
                      head_dim: int):
    """``((q, k, v) in qkv, (q, k, v) in buffer)`` per RoPE launch, as ``[batch, seq,
    kv_heads, G, d]`` / ``[batch, seq, kv_heads, d]`` views of rank chunks and the kv
    groups of ``qkv`` they hold (``split.partitions_kv``: every rank holds as many).

    For one row the ranks are the launch's batch axis (the positions of a single row do
    not depend on the batch index), so one launch covers every rank; for several rows,
    one launch per rank.
    """
    batched = qkv if qkv.dim() == 3 else qkv.unsqueeze(0)
    n_batch, seqlen = batched.shape[:2]
    sp, kv, group = split.world_size, split.num_kv(0), split.num_heads // split.num_kv_heads
    nq = split.num_q(0)
    # [sp, batch, seq, kv, G + 2, d]: rank r's kv groups (its G query heads, K, V each).
    mine = batched.unflatten(-1, (sp, kv, group + 2, head_dim)).permute(2, 0, 1, 3, 4, 5)
    chunks = buffer.view(sp, n_batch, seqlen, split.width(0), head_dim)
    src = (mine[..., :group, :], mine[..., group, :], mine[..., group + 1, :])
    dst = (chunks[..., :nq, :].unflatten(-2, (kv, group)), chunks[..., nq:nq + kv, :],
           chunks[..., nq + kv:, :])
    if n_batch == 1:
        return [(tuple(x.squeeze(1) for x in src), tuple(x.squeeze(1) for x in dst))]
    return [(tuple(x[r] for x in src), tuple(x[r] for x in dst)) for r in range(sp)]


def pack_qkv_rotary(split: HeadSplit, qkv: torch.Tensor, head_dim: int, *,
                    interleaved: bool = False, **rope) -> Tuple[torch.Tensor, QKVRotary]:
    """:func:`pack_heads` of :func:`kernels.split_qkv_rotary`'s outputs, without them.

    ``qkv``: InternLM2's fused ``wqkv`` output ``[tokens, width]`` or ``[batch, seq,
    width]`` (``split.num_kv_heads`` groups of ``G`` query heads, K, V); ``rope``: the
    position and angle arguments of :func:`kernels.split_qkv_rotary`.  Needs
    ``split.partitions_kv``.  Returns the send buffer and what
    :func:`unpack_qkv_rotary` needs.
    """
    _check_split(split)
    if not split.partitions_kv:
        raise ValueError(f"pack_qkv_rotary needs every kv head on one rank ({split.num_kv_heads} "
                         f"kv heads over {split.world_size} ranks do not divide); use "
                         "split_qkv_rotary and pack_heads")
    positions, angles = check_split_qkv_rotary(qkv, split.num_kv_heads, head_dim, **rope)
    tokens = qkv.numel() // qkv.shape[-1]
    if qkv.shape[-1] != (split.num_heads + 2 * split.num_kv_heads) * head_dim:
        raise ValueError(f"qkv width {qkv.shape[-1]} does not hold {split.num_heads} query and "
                         f"{split.num_kv_heads} kv heads of {head_dim}")
    buffer = torch.empty(sum(split.chunk_numels(tokens, head_dim)), dtype=qkv.dtype,
                         device=qkv.device)
    for src, dst in _qkv_launch_views(split, qkv, buffer, head_dim):
        launch_rotary(*zip(src, dst), positions, angles, bool(interleaved), inverse=False)
    return buffer, QKVRotary(tuple(qkv.shape), head_dim, positions, angles, bool(interleaved))


def unpack_qkv_rotary(split: HeadSplit, buffer: torch.Tensor, rotary: QKVRotary
                      ) -> torch.Tensor:
    """The backward of :func:`pack_qkv_rotary`: a gradient in its buffer layout -> the
    gradient of ``qkv`` (inverse rotation of q and k, v copied)."""
    _check_split(split)
    check_tensor("buffer", buffer, ndim=1, dtypes=FLOAT_DTYPES)
    tokens = math.prod(rotary.qkv_shape[:-1])
    numel = sum(split.chunk_numels(tokens, rotary.head_dim))
    if buffer.numel() != numel:
        raise ValueError(f"buffer has {buffer.numel()} elements; qkv of shape "
                         f"{rotary.qkv_shape} needs {numel}")
    buffer = buffer.contiguous()
    dqkv = torch.empty(rotary.qkv_shape, dtype=buffer.dtype, device=buffer.device)
    for dst, src in _qkv_launch_views(split, dqkv, buffer, rotary.head_dim):
        launch_rotary(*zip(src, dst), rotary.positions, rotary.angles, rotary.interleaved,
                      inverse=True)
    return dqkv
