"""Rotary position embedding (RoPE) for q and k in one launch, forward and backward.

Layouts (last dimension contiguous, other strides free):

- ``[tokens, heads, d]``: packed sequences, with ``position_ids`` ``[tokens]`` /
  ``[1, tokens]`` or ``cu_seqlens``;
- ``[batch, seq, heads, d]``: with ``position_ids`` ``[batch, seq]`` (or one row
  ``[seq]`` / ``[1, seq]`` shared by the batch);
- ``[batch, seq, heads_outer, heads_inner, d]``: heads split in two dimensions, the
  view ``qkv[..., :G, :]`` of InternLM2's fused ``wqkv`` output
  ``[batch, seq, kv_heads, G + 2, d]`` (use ``batch = 1`` for packed tokens).

``neox`` (default) rotates the pairs ``(i, i + d/2)`` like InternLM2's ``rotate_half``;
``interleaved`` the pairs ``(2i, 2i + 1)``.  Numerics follow ``InternLM2RotaryEmbedding``
+ ``apply_rotary_pos_emb``: angles in fp32, cos/sin rounded to the dtype of the tensor
they rotate; q and k may differ in dtype; ``inv_freq`` is read as fp32 whatever its
dtype.  Accurate to 128k positions (range-reduced angles).  Design: ``docs/design.md``.
"""

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from kernels._runtime import (FLOAT_DTYPES, TensorMemo, cdiv, check_cu_seqlens, check_tensor,
                              next_power_of_2)

# 2*pi = _TWO_PI_A + _TWO_PI_B + _TWO_PI_C (to 2e-13).  A and B have 8 significant
# bits, so turns * A and turns * B are exact fp32 products for |turns| < 2**16.
_TWO_PI_A = tl.constexpr(6.28125)
_TWO_PI_B = tl.constexpr(0.00193023681640625)
_TWO_PI_C = tl.constexpr(5.070363386039389e-06)
_INV_TWO_PI = tl.constexpr(0.15915494309189535)


@triton.jit
def _rotate_heads(IN, OUT, in_tok, out_tok, n_outer, n_inner,
                  in_stride_outer, in_stride_inner, out_stride_outer, out_stride_inner,
                  cos, sin, tok_mask, cols_a, cols_b, col_mask,
                  ROTATE: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate (or, without ROTATE, copy) every head of a tile of tokens.

    ``in_tok``/``out_tok``: int64 ``[BLOCK_T]`` token offsets; ``cos``/``sin``:
    fp32 ``[BLOCK_T, BLOCK_HALF]``; ``cols_a``/``cols_b``: the two elements of each pair.
    """
    n_heads = n_outer * n_inner
    for first in range(0, n_heads, BLOCK_H):
        head = first + tl.arange(0, BLOCK_H)
        head_mask = head < n_heads
        outer = (head // n_inner).to(tl.int64)
        inner = (head % n_inner).to(tl.int64)
        src = IN + in_tok[:, None, None] + (outer * in_stride_outer
                                             + inner * in_stride_inner)[None, :, None]
        dst = OUT + out_tok[:, None, None] + (outer * out_stride_outer
                                               + inner * out_stride_inner)[None, :, None]
        mask = tok_mask[:, None, None] & head_mask[None, :, None] & col_mask[None, None, :]
        # In place, IN is OUT: both halves of every pair are loaded before either is stored.
        a = tl.load(src + cols_a[None, None, :], mask=mask)
        b = tl.load(src + cols_b[None, None, :], mask=mask)
        if ROTATE:
            a32 = a.to(tl.float32)
            b32 = b.to(tl.float32)
            # Hugging Face rounds cos and sin to the activation dtype before using them.
            c = cos.to(OUT.dtype.element_ty).to(tl.float32)[:, None, :]
            s = sin.to(OUT.dtype.element_ty).to(tl.float32)[:, None, :]
            a = (a32 * c - b32 * s).to(OUT.dtype.element_ty)
            b = (b32 * c + a32 * s).to(OUT.dtype.element_ty)
        tl.store(dst + cols_a[None, None, :], a, mask=mask)
        tl.store(dst + cols_b[None, None, :], b, mask=mask)


# What follows the data (token counts, the packing: sequences, search steps, a rank's
# offset; position strides of a batch) is not specialised on, so that a new packing does
# not compile the kernel again in the middle of training.  Tensor strides stay
# specialised: they are multiples of the head size, whose divisibility does not change.
@triton.jit(do_not_specialize=["n_tokens", "seqlen", "pos_stride_b", "pos_stride_s", "n_seqs",
                               "search_steps", "position_offset"])
def _rotary_kernel(
    Q, Q_OUT, K, K_OUT, V, V_OUT,
    POS, CU_SEQLENS, INV_FREQ, COS, SIN,
    n_tokens, seqlen, half,
    pos_stride_b, pos_stride_s,
    n_seqs, search_steps, position_offset,
    position_divisor, cos_stride, sin_stride,
    q_outer, q_inner, q_sb, q_ss, q_so, q_si, qo_sb, qo_ss, qo_so, qo_si,
    k_outer, k_inner, k_sb, k_ss, k_so, k_si, ko_sb, ko_ss, ko_so, ko_si,
    v_outer, v_inner, v_sb, v_ss, v_so, v_si, vo_sb, vo_ss, vo_so, vo_si,
    CU_POSITIONS: tl.constexpr,
    FROM_CACHE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    INVERSE: tl.constexpr,
    HAS_V: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = tok < n_tokens
    bat = (tok // seqlen).to(tl.int64)
    seq = (tok % seqlen).to(tl.int64)

    if CU_POSITIONS:
        # Binary search for the packed sequence holding each token: the largest j with
        # cu_seqlens[j] <= token (empty sequences are skipped over).  Packed tokens are
        # one row, so positions follow the index in the row (every batch index repeats
        # it: kernels.sp_layout launches a row's per-rank copies as a batch).
        glob = seq + position_offset
        lo = tl.zeros([BLOCK_T], dtype=tl.int32)
        hi = lo + n_seqs
        for step in range(search_steps):
            mid = (lo + hi) // 2
            go_right = tl.load(CU_SEQLENS + mid, mask=tok_mask, other=0) <= glob
            lo = tl.where(go_right, mid, lo)
            hi = tl.where(go_right, hi, mid)
        pos = glob - tl.load(CU_SEQLENS + lo, mask=tok_mask, other=0)
    else:
        pos = tl.load(POS + bat * pos_stride_b + seq * pos_stride_s, mask=tok_mask, other=0)

    i = tl.arange(0, BLOCK_HALF)
    col_mask = i < half
    if FROM_CACHE:
        cs_mask = tok_mask[:, None] & col_mask[None, :]
        row = pos.to(tl.int64)[:, None]
        cos = tl.load(COS + row * cos_stride + i[None, :], mask=cs_mask, other=1.0)
        sin = tl.load(SIN + row * sin_stride + i[None, :], mask=cs_mask, other=0.0)
        cos = cos.to(tl.float32)
        sin = sin.to(tl.float32)
    else:
        inv_freq = tl.load(INV_FREQ + i, mask=col_mask, other=0.0)
        scaled = tl.div_rn(pos.to(tl.float32), position_divisor)
        angle = scaled[:, None] * inv_freq[None, :]
        turns = tl.floor(angle * _INV_TWO_PI + 0.5)
        angle = angle - turns * _TWO_PI_A
        angle = angle - turns * _TWO_PI_B
        angle = angle - turns * _TWO_PI_C
        cos = tl.cos(angle)
        sin = tl.sin(angle)
    if INVERSE:
        sin = -sin

    if INTERLEAVED:
        cols_a = 2 * i
        cols_b = 2 * i + 1
    else:
        cols_a = i
        cols_b = i + half

    _rotate_heads(Q, Q_OUT, bat * q_sb + seq * q_ss, bat * qo_sb + seq * qo_ss,
                  q_outer, q_inner, q_so, q_si, qo_so, qo_si,
                  cos, sin, tok_mask, cols_a, cols_b, col_mask, True, BLOCK_HQ)
    _rotate_heads(K, K_OUT, bat * k_sb + seq * k_ss, bat * ko_sb + seq * ko_ss,
                  k_outer, k_inner, k_so, k_si, ko_so, ko_si,
                  cos, sin, tok_mask, cols_a, cols_b, col_mask, True, BLOCK_HK)
    if HAS_V:
        _rotate_heads(V, V_OUT, bat * v_sb + seq * v_ss, bat * vo_sb + seq * vo_ss,
                      v_outer, v_inner, v_so, v_si, vo_so, vo_si,
                      cos, sin, tok_mask, cols_a, cols_b, col_mask, False, BLOCK_HK)


# --------------------------------------------------------------------------- launcher


class _Heads(NamedTuple):
    """A tensor seen as ``[batch, seq, outer, inner, d]`` (strides in elements)."""
    tensor: torch.Tensor
    n_batch: int
    seqlen: int
    outer: int
    inner: int
    strides: Tuple[int, int, int, int]


def _heads(x: torch.Tensor) -> _Heads:
    if x.dim() == 3:
        return _Heads(x, 1, x.shape[0], x.shape[1], 1, (0, x.stride(0), x.stride(1), 0))
    if x.dim() == 4:
        return _Heads(x, x.shape[0], x.shape[1], x.shape[2], 1,
                      (x.stride(0), x.stride(1), x.stride(2), 0))
    return _Heads(x, *x.shape[:4], tuple(x.stride()[:4]))


# Host values read from position tensors (a device sync each): every layer of a model
# rotates with the same positions within a step, so only the first layer reads them.
_POSITION_READS = TensorMemo()
# fp32 copies of inv_freq buffers held in another dtype (a bf16 model's), made once.
_FP32_INV_FREQ = TensorMemo()


class _Positions(NamedTuple):
    position_ids: Optional[torch.Tensor]
    stride_b: int
    stride_s: int
    cu_seqlens: Optional[torch.Tensor]
    n_seqs: int
    offset: int


class _Angles(NamedTuple):
    inv_freq: Optional[torch.Tensor]
    position_divisor: float
    cos: Optional[torch.Tensor]
    sin: Optional[torch.Tensor]


def _tile(block_half: int) -> Tuple[int, int, int]:
    """``(BLOCK_T, heads per loop step, num_warps)`` for head pairs padded to ``block_half``.

    A few tokens per program amortise their cos/sin over all heads; a loop step moves
    a ``[BLOCK_T, heads, block_half]`` tile of each half (2048 elements).
    """
    block_t = max(1, min(16, 256 // block_half))
    return block_t, max(1, 2048 // (block_t * block_half)), 4


def _launch(groups: Sequence[Tuple[_Heads, _Heads]], copy: Optional[Tuple[_Heads, _Heads]],
            positions: _Positions, angles: _Angles, half: int, interleaved: bool,
            inverse: bool) -> None:
    """Rotate ``(src, dst)`` pairs (at most two: q and k) and copy ``copy`` (v) in one launch."""
    first = groups[0][0]
    n_tokens = first.n_batch * first.seqlen
    if n_tokens == 0:
        return
    block_half = next_power_of_2(half)
    block_t, heads_per_tile, num_warps = _tile(block_half)

    def args(pair):
        src, dst = pair
        return (src.tensor, dst.tensor), (src.outer, src.inner, *src.strides, *dst.strides)

    (q, q_out), q_args = args(groups[0])
    (k, k_out), k_args = args(groups[1] if len(groups) > 1 else
                              (groups[0][0]._replace(outer=0), groups[0][1]))
    (v, v_out), v_args = args(copy if copy is not None else
                              (groups[0][0]._replace(outer=0), groups[0][1]))
    block_hq = min(next_power_of_2(groups[0][0].outer * groups[0][0].inner),
                   heads_per_tile)
    block_hk = min(next_power_of_2(max(k_args[0] * k_args[1], v_args[0] * v_args[1], 1)),
                   heads_per_tile)

    dummy = q
    pos = positions.position_ids if positions.position_ids is not None else dummy
    cu = positions.cu_seqlens if positions.cu_seqlens is not None else dummy
    inv_freq = angles.inv_freq if angles.inv_freq is not None else dummy
    cos = angles.cos if angles.cos is not None else dummy
    sin = angles.sin if angles.sin is not None else dummy
    cos_stride = angles.cos.stride(0) if angles.cos is not None else 0
    sin_stride = angles.sin.stride(0) if angles.sin is not None else 0
    _rotary_kernel[(cdiv(n_tokens, block_t),)](
        q, q_out, k, k_out, v, v_out,
        pos, cu, inv_freq, cos, sin,
        n_tokens, first.seqlen, half,
        positions.stride_b, positions.stride_s,
        positions.n_seqs, max(1, (positions.n_seqs - 1).bit_length()), positions.offset,
        float(angles.position_divisor), cos_stride, sin_stride,
        *q_args, *k_args, *v_args,
        CU_POSITIONS=positions.cu_seqlens is not None,
        FROM_CACHE=angles.cos is not None,
        INTERLEAVED=interleaved,
        INVERSE=inverse,
        HAS_V=copy is not None,
        BLOCK_T=block_t, BLOCK_HALF=block_half, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        num_warps=num_warps,
    )


def _empty_like_contiguous(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# --------------------------------------------------------------------------- autograd


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, positions, angles, interleaved, in_place, in_place_grad):
        q_out, k_out = (q, k) if in_place else (_empty_like_contiguous(q),
                                                _empty_like_contiguous(k))
        _launch([(_heads(q), _heads(q_out)), (_heads(k), _heads(k_out))], None,
                positions, angles, q.shape[-1] // 2, interleaved, inverse=False)
        if in_place:
            ctx.mark_dirty(q, k)
        ctx.positions, ctx.angles, ctx.interleaved = positions, angles, interleaved
        ctx.in_place_grad = in_place_grad
        ctx.set_materialize_grads(False)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        grads = [g if g is None or g.stride(-1) == 1 else g.contiguous() for g in (dq, dk)]
        # Only a dense gradient can take its result in place (an expanded one aliases).
        outs = [None if g is None else g if ctx.in_place_grad and g.is_contiguous()
                else _empty_like_contiguous(g) for g in grads]
        pairs = [(_heads(g), _heads(o)) for g, o in zip(grads, outs) if g is not None]
        if pairs:
            _launch(pairs, None, ctx.positions, ctx.angles, pairs[0][0].tensor.shape[-1] // 2,
                    ctx.interleaved, inverse=True)
        return outs[0], outs[1], None, None, None, None, None


class _SplitQKVRotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, num_kv_heads, head_dim, positions, angles, interleaved):
        batched = qkv if qkv.dim() == 3 else qkv.unsqueeze(0)
        grouped = batched.unflatten(-1, (num_kv_heads, -1, head_dim))
        groups = grouped.shape[-2] - 2
        q = torch.empty(grouped.shape[:3] + (groups, head_dim), dtype=qkv.dtype,
                        device=qkv.device)
        k = torch.empty(grouped.shape[:3] + (head_dim,), dtype=qkv.dtype, device=qkv.device)
        v = torch.empty_like(k)
        _launch([(_heads(grouped[..., :groups, :]), _heads(q)),
                 (_heads(grouped[..., groups, :]), _heads(k))],
                (_heads(grouped[..., groups + 1, :]), _heads(v)),
                positions, angles, head_dim // 2, interleaved, inverse=False)
        ctx.positions, ctx.angles, ctx.interleaved = positions, angles, interleaved
        ctx.qkv_shape, ctx.num_kv_heads, ctx.head_dim = qkv.shape, num_kv_heads, head_dim
        ctx.set_materialize_grads(False)
        lead = qkv.shape[:-1]
        return (q.view(*lead, num_kv_heads * groups, head_dim),
                k.view(*lead, num_kv_heads, head_dim), v.view(*lead, num_kv_heads, head_dim))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        shape, hkv, d = ctx.qkv_shape, ctx.num_kv_heads, ctx.head_dim
        some_missing = dq is None or dk is None or dv is None
        dqkv = (torch.zeros if some_missing else torch.empty)(
            shape, dtype=next(g for g in (dq, dk, dv) if g is not None).dtype,
            device=next(g for g in (dq, dk, dv) if g is not None).device)
        batched = dqkv if dqkv.dim() == 3 else dqkv.unsqueeze(0)
        grouped = batched.unflatten(-1, (hkv, -1, d))
        groups = grouped.shape[-2] - 2
        n_batch, seqlen = grouped.shape[:2]

        def src(g, inner):
            g = g.reshape(n_batch, seqlen, hkv, *inner, d)
            return _heads(g if g.stride(-1) == 1 else g.contiguous())

        pairs = []
        if dq is not None:
            pairs.append((src(dq, (groups,)), _heads(grouped[..., :groups, :])))
        if dk is not None:
            pairs.append((src(dk, ()), _heads(grouped[..., groups, :])))
        copy = (src(dv, ()), _heads(grouped[..., groups + 1, :])) if dv is not None else None
        if pairs:
            _launch(pairs, copy, ctx.positions, ctx.angles, d // 2, ctx.interleaved,
                    inverse=True)
        elif copy is not None:
            grouped[..., groups + 1, :].copy_(copy[0].tensor)
        return dqkv, None, None, None, None, None


# --------------------------------------------------------------------------- checks


def _check_positions(n_batch: int, seqlen: int, device: torch.device,
                     position_ids: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                     position_offset: int, need_max: bool) -> Tuple[_Positions, Optional[int]]:
    """Validated positions and, when ``need_max``, the range they span (host sync)."""
    if (position_ids is None) == (cu_seqlens is None):
        raise ValueError("pass exactly one of position_ids and cu_seqlens")
    if position_ids is not None:
        check_tensor("position_ids", position_ids, dtypes=(torch.int32, torch.int64))
        shape = tuple(position_ids.shape)
        if shape == (n_batch, seqlen):
            strides = position_ids.stride()
            stride_b = 0 if n_batch == 1 else strides[0]
            stride_s = strides[1]
        elif shape in ((seqlen,), (1, seqlen)):
            stride_b, stride_s = 0, position_ids.stride(-1)
        else:
            raise ValueError(f"position_ids must have shape ({n_batch}, {seqlen}), (1, {seqlen}) "
                             f"or ({seqlen},) to match q and k, got {shape}")
        if position_ids.device != device:
            raise ValueError(f"position_ids is on {position_ids.device} but q is on {device}")
        span = None
        if need_max and position_ids.numel():
            span = _POSITION_READS.get((position_ids,), "span", lambda: tuple(
                int(v) for v in torch.aminmax(position_ids)))
        return _Positions(position_ids, stride_b, stride_s, None, 0, 0), span

    position_offset = int(position_offset)
    n_seqs, span = _POSITION_READS.get(
        (cu_seqlens,), ("cu_seqlens", seqlen, position_offset, need_max),
        lambda: _read_cu_seqlens(cu_seqlens, seqlen, position_offset, need_max))
    if n_batch != 1:
        raise ValueError("cu_seqlens describes packed tokens: q and k must be [tokens, heads, d] "
                         f"(or have batch size 1), got batch size {n_batch}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    return _Positions(None, 0, 0, cu_seqlens, n_seqs, position_offset), span


def _read_cu_seqlens(cu_seqlens: torch.Tensor, seqlen: int, position_offset: int,
                     need_max: bool) -> Tuple[int, Optional[Tuple[int, int]]]:
    """Validate ``cu_seqlens`` for ``seqlen`` local tokens at ``position_offset``; the
    number of sequences and, when ``need_max``, the positions the local tokens span."""
    lengths = check_cu_seqlens("cu_seqlens", cu_seqlens, None)
    total = int(lengths.sum())
    if position_offset < 0 or position_offset + seqlen > total:
        raise ValueError(f"tokens [{position_offset}, {position_offset + seqlen}) (position_offset "
                         f"+ local tokens) must lie inside the {total} tokens cu_seqlens describes")
    span = None
    if need_max and seqlen:
        starts = torch.cumsum(lengths, 0) - lengths
        ends = starts + lengths
        lo, hi = position_offset, position_offset + seqlen
        overlap = (ends > lo) & (starts < hi) & (lengths > 0)
        first = torch.clamp(starts, min=lo)[overlap] - starts[overlap]
        last = torch.clamp(ends, max=hi)[overlap] - 1 - starts[overlap]
        span = (int(first.min()), int(last.max()))
    return len(lengths), span


def _check_angles(half: int, device: torch.device, inv_freq: Optional[torch.Tensor],
                  position_divisor: float,
                  cos_sin_cache: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> _Angles:
    if (inv_freq is None) == (cos_sin_cache is None):
        raise ValueError("pass exactly one of inv_freq and cos_sin_cache")
    if inv_freq is not None:
        check_tensor("inv_freq", inv_freq, ndim=1, dtypes=FLOAT_DTYPES,
                     last_dim_contiguous=True)
        if inv_freq.shape[0] != half:
            raise ValueError(f"inv_freq must have head_dim // 2 = {half} entries, "
                             f"got {inv_freq.shape[0]}")
        if inv_freq.device != device:
            raise ValueError(f"inv_freq is on {inv_freq.device} but q is on {device}")
        if not position_divisor > 0:
            raise ValueError(f"position_divisor must be positive, got {position_divisor}")
        if inv_freq.dtype != torch.float32:
            inv_freq = _FP32_INV_FREQ.get((inv_freq,), None, inv_freq.float)
        return _Angles(inv_freq, float(position_divisor), None, None)
    if position_divisor != 1.0:
        raise ValueError("position_divisor applies to inv_freq; bake it into cos_sin_cache")
    if not isinstance(cos_sin_cache, (tuple, list)) or len(cos_sin_cache) != 2:
        raise TypeError("cos_sin_cache must be a pair (cos, sin) of [positions, head_dim // 2] "
                        "tensors")
    cos, sin = cos_sin_cache
    for name, t in (("cos_sin_cache[0] (cos)", cos), ("cos_sin_cache[1] (sin)", sin)):
        check_tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
        if t.shape[1] != half:
            raise ValueError(f"{name} must have head_dim // 2 = {half} columns, "
                             f"got shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin caches differ in shape: {tuple(cos.shape)} vs "
                         f"{tuple(sin.shape)}")
    return _Angles(None, 1.0, cos, sin)


def _check_cache_range(angles: _Angles, span: Optional[Tuple[int, int]]) -> None:
    if angles.cos is None or span is None:
        return
    rows = angles.cos.shape[0]
    if span[0] < 0 or span[1] >= rows:
        raise ValueError(f"positions span [{span[0]}, {span[1]}] but cos_sin_cache holds "
                         f"positions [0, {rows - 1}]")


def _check_qk(name: str, x: torch.Tensor) -> None:
    check_tensor(name, x, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    if x.dim() not in (3, 4, 5):
        raise ValueError(f"{name} must be [tokens, heads, d], [batch, seq, heads, d] or "
                         f"[batch, seq, heads_outer, heads_inner, d], got shape {tuple(x.shape)}")


# --------------------------------------------------------------------------- public API


def apply_rotary(q: torch.Tensor, k: torch.Tensor, *,
                 position_ids: Optional[torch.Tensor] = None,
                 cu_seqlens: Optional[torch.Tensor] = None, position_offset: int = 0,
                 inv_freq: Optional[torch.Tensor] = None, position_divisor: float = 1.0,
                 cos_sin_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                 interleaved: bool = False, in_place: bool = False,
                 in_place_grad: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` by their tokens' positions in one launch; differentiable.

    Args:
        q, k: fp16 / bf16 / fp32 (each rotated in its own dtype), same token dimensions
            and head size ``d`` (even); any layout of the module docstring, each with
            its own head count.
        position_ids: int32/int64 position of every token (``[batch, seq]``, or
            ``[seq]`` / ``[1, seq]`` for all batch rows); restarts at 0 per packed
            sample, as XTuner's varlen collate produces.
        cu_seqlens: instead of ``position_ids``, int32 ``[n + 1]`` cumulative lengths of
            the packed samples; the position is the token's index inside its sample.
            It is validated on the host (a device sync) the first time a given
            ``cu_seqlens`` tensor comes, and not again while it is unmodified (the
            layers of a model share it within a step).
        position_offset: with ``cu_seqlens``, the index in that packing of the first
            local token (a sequence-parallel rank's shard start); cu_seqlens describes
            the whole packing.
        inv_freq: ``[d // 2]`` inverse frequencies (see :func:`rotary_inv_freq`), read
            as fp32; cos/sin are then computed in the kernel.
        position_divisor: positions are divided by it first (linear RoPE scaling).
        cos_sin_cache: instead of ``inv_freq``, ``(cos, sin)`` tables ``[P, d // 2]``
            indexed by position (e.g. ``cos[:, :d // 2]`` of Hugging Face's ``[P, d]``).
        interleaved: rotate pairs ``(2i, 2i + 1)`` instead of ``(i, i + d/2)``.
        in_place: write the result into ``q`` and ``k``.  Under autograd PyTorch allows
            this only for tensors that are not views (use :func:`split_qkv_rotary` for
            the fused ``wqkv`` output).
        in_place_grad: the backward rotates the incoming gradients in their own buffers
            (when they are contiguous) instead of allocating new ones; with ``in_place``,
            neither pass allocates.  Only for outputs whose gradient buffers nobody else
            reads: true when each output feeds one op that computes a fresh gradient
            (attention does), not when it feeds, e.g., an addition (PyTorch hands the
            same gradient tensor to both of its inputs) or a hook that keeps ``grad``.

    Returns:
        ``(q_rotated, k_rotated)``: ``q`` and ``k`` themselves when ``in_place``, else
        new contiguous tensors of their shapes.

    Raises ``ValueError``/``TypeError`` naming the argument for mismatched shapes,
    dtypes or devices, positions outside ``cos_sin_cache``, and bad ``cu_seqlens``.
    """
    _check_qk("q", q)
    _check_qk("k", k)
    q_heads, k_heads = _heads(q), _heads(k)
    if (q_heads.n_batch, q_heads.seqlen) != (k_heads.n_batch, k_heads.seqlen):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same "
                         "token dimensions")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or head_dim % 2:
        raise ValueError(f"q and k must share an even head size, got {head_dim} and "
                         f"{k.shape[-1]}")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}")
    angles = _check_angles(head_dim // 2, q.device, inv_freq, position_divisor, cos_sin_cache)
    positions, span = _check_positions(q_heads.n_batch, q_heads.seqlen, q.device, position_ids,
                                       cu_seqlens, position_offset, angles.cos is not None)
    _check_cache_range(angles, span)
    if (in_place and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
            and (q._base is not None or k._base is not None)):
        raise ValueError("in_place=True under autograd needs q and k that are not views "
                         "(PyTorch cannot record one in-place function on two views); pass "
                         "in_place=False or use split_qkv_rotary")
    return _RotaryFunction.apply(q, k, positions, angles, bool(interleaved), bool(in_place),
                                 bool(in_place_grad))


def split_qkv_rotary(qkv: torch.Tensor, num_kv_heads: int, head_dim: int, *,
                     position_ids: Optional[torch.Tensor] = None,
                     cu_seqlens: Optional[torch.Tensor] = None, position_offset: int = 0,
                     inv_freq: Optional[torch.Tensor] = None, position_divisor: float = 1.0,
                     cos_sin_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                     interleaved: bool = False
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split InternLM2's fused ``wqkv`` output and rotate q and k, in one kernel.

    ``qkv``: ``[tokens, hkv * (G + 2) * d]`` or ``[batch, seq, hkv * (G + 2) * d]``,
    rows grouped per kv head as ``[q_{gG}, ..., q_{gG+G-1}, k_g, v_g]``.  Returns
    contiguous ``q`` ``[..., hkv * G, d]`` (query head ``gG + j`` uses kv head ``g``),
    rotated ``k`` and plain ``v`` ``[..., hkv, d]``.  The backward pass writes the
    gradient of ``qkv`` in one kernel too.  Position and angle arguments as in
    :func:`apply_rotary`.
    """
    positions, angles = check_split_qkv_rotary(
        qkv, num_kv_heads, head_dim, position_ids=position_ids, cu_seqlens=cu_seqlens,
        position_offset=position_offset, inv_freq=inv_freq, position_divisor=position_divisor,
        cos_sin_cache=cos_sin_cache)
    return _SplitQKVRotaryFunction.apply(qkv, num_kv_heads, head_dim, positions, angles,
                                         bool(interleaved))


def check_split_qkv_rotary(qkv: torch.Tensor, num_kv_heads: int, head_dim: int, *,
                           position_ids=None, cu_seqlens=None, position_offset: int = 0,
                           inv_freq=None, position_divisor: float = 1.0, cos_sin_cache=None
                           ) -> Tuple[_Positions, _Angles]:
    """Validate :func:`split_qkv_rotary`'s arguments; the launcher's positions and angles.

    For kernels that write the split and rotated heads elsewhere (sequence-parallel
    send buffers, :mod:`kernels.sp_layout`) through :func:`launch_rotary`.
    """
    check_tensor("qkv", qkv, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    if qkv.dim() not in (2, 3):
        raise ValueError(f"qkv must be [tokens, width] or [batch, seq, width], got shape "
                         f"{tuple(qkv.shape)}")
    if num_kv_heads < 1 or head_dim < 2 or head_dim % 2:
        raise ValueError(f"num_kv_heads must be >= 1 and head_dim even, got {num_kv_heads} "
                         f"and {head_dim}")
    width = qkv.shape[-1]
    per_group = num_kv_heads * head_dim
    if width % per_group or width // per_group < 3:
        raise ValueError(f"qkv width {width} is not num_kv_heads * (G + 2) * head_dim = "
                         f"{num_kv_heads} * (G + 2) * {head_dim} for any G >= 1")
    n_batch, seqlen = (1, qkv.shape[0]) if qkv.dim() == 2 else qkv.shape[:2]
    angles = _check_angles(head_dim // 2, qkv.device, inv_freq, position_divisor, cos_sin_cache)
    positions, span = _check_positions(n_batch, seqlen, qkv.device, position_ids, cu_seqlens,
                                       position_offset, angles.cos is not None)
    _check_cache_range(angles, span)
    return positions, angles


def launch_rotary(q_pair: Tuple[torch.Tensor, torch.Tensor],
                  k_pair: Tuple[torch.Tensor, torch.Tensor],
                  v_pair: Tuple[torch.Tensor, torch.Tensor], positions: _Positions,
                  angles: _Angles, interleaved: bool, inverse: bool) -> None:
    """Rotate ``q_pair``/``k_pair`` ``(src, dst)`` and copy ``v_pair`` in one launch.

    Each tensor is ``[batch, seq, heads, d]`` or ``[batch, seq, heads_outer, heads_inner,
    d]`` with any strides but a contiguous last dimension, the source and destination
    of a pair having the same heads; positions and angles from
    :func:`check_split_qkv_rotary`.  ``inverse`` rotates back (the backward pass).
    """
    _launch([(_heads(q_pair[0]), _heads(q_pair[1])), (_heads(k_pair[0]), _heads(k_pair[1]))],
            (_heads(v_pair[0]), _heads(v_pair[1])), positions, angles,
            q_pair[0].shape[-1] // 2, interleaved, inverse)


def rotary_inv_freq(head_dim: int, base: float = 10000.0, *,
                    scaling_type: Optional[str] = None, scaling_factor: float = 1.0,
                    max_position_embeddings: int = 2048, seq_len: Optional[int] = None,
                    device=None) -> Tuple[torch.Tensor, float]:
    """``(inv_freq, position_divisor)`` of an InternLM2 rotary embedding, from numbers.

    Mirrors the arithmetic of ``InternLM2RotaryEmbedding`` and its variants bit for bit
    (fp32 throughout): ``base`` is ``config.rope_theta``; ``scaling_type`` /
    ``scaling_factor`` are ``config.rope_scaling['type'/'factor']`` (``None``,
    ``"linear"`` or ``"dynamic"``).

    - linear: ``position_divisor = scaling_factor`` (positions are divided by it);
    - dynamic (NTK): when ``seq_len`` (Hugging Face uses ``max(position_ids) + 1``)
      exceeds ``max_position_embeddings``, ``base`` is enlarged to ``base * (factor *
      seq_len / max_pos - (factor - 1)) ** (d / (d - 2))`` on ``device``; otherwise the
      plain frequencies.  Hugging Face's module also keeps an enlarged ``inv_freq`` for
      later, shorter calls; this function is stateless (pass the longest ``seq_len``
      seen to reproduce that).  Under sequence parallelism, pass the longest sample of
      the whole packing so that every rank uses the same frequencies.
    """
    if scaling_type not in (None, "linear", "dynamic"):
        raise ValueError(f"scaling_type must be None, 'linear' or 'dynamic', got {scaling_type!r}")
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if scaling_type == "dynamic":
        if seq_len is None:
            raise ValueError("dynamic NTK scaling needs seq_len (max position + 1)")
        if seq_len > max_position_embeddings:
            seq = torch.tensor(seq_len, device=device)
            base = base * ((scaling_factor * seq / max_position_embeddings)
                           - (scaling_factor - 1)) ** (head_dim / (head_dim - 2))
            exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float().to(device)
            return 1.0 / (base ** (exponents / head_dim)), 1.0
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = (1.0 / (base ** exponents)).to(device)
    return inv_freq, (float(scaling_factor) if scaling_type == "linear" else 1.0)
