"""Attention over packed variable-length sequences (causal or not, GQA), forward and backward.

Layouts: ``q`` ``[total_q, hq, d]``, ``k`` and ``v`` ``[total_k, hkv, d]`` (any strides with a
contiguous last dimension, e.g. views of one fused qkv buffer), ``cu_seqlens`` int32
``[batch + 1]``.  Query head ``h`` reads kv head ``h // (hq // hkv)``; K/V are never
repeated.  ``out`` is ``[total_q, hq, d]`` in q's dtype, the natural-log ``lse``
``[hq, total_q]`` fp32, as flash-attn 2's ``flash_attn_varlen_func`` returns them; rows
that see no key get ``out = 0`` and ``lse = +inf``.  Scores, softmax statistics and
accumulators are fp32, P and dS rounded to the input dtype, as flash-attn does.  The
backward pass is deterministic (no atomics); when q, k and v are consecutive head ranges
of one tensor, so are their gradients.  Validation and work lists are computed once per
``cu_seqlens`` pair (the layers of a step share them).  Design: ``docs/design.md``.
"""

import math
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from kernels._runtime import (FLOAT_DTYPES, INTERPRETER, TensorMemo, autotune_configs, cdiv,
                              check_cu_seqlens, check_max_seqlen, check_tensor, next_power_of_2,
                              packed_heads)

# 96 runs in 128-wide tiles with masked columns.  256 would need smaller tiles than the
# tuned configs to fit in shared memory.
SUPPORTED_HEAD_DIMS = (64, 96, 128)

# Rows (forward, dQ) or keys (dK/dV) per work item: a multiple of every tile size.
_UNIT = 128
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_QK_LOG2E = math.log2(math.e)


def _configs(gpu, interp):
    return autotune_configs(
        [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
         for m, n, w, s in gpu],
        triton.Config({"BLOCK_M": interp[0], "BLOCK_N": interp[1]}, num_warps=4, num_stages=1))


# (BLOCK_M, BLOCK_N, num_warps, num_stages).  Forward and dQ: BLOCK_M query rows per
# tile, BLOCK_N keys per step; dK/dV: BLOCK_N keys per tile, BLOCK_M query rows per
# step.  Picked from sm_90 compiles (ptxas -v, head_dim 128, triton 3.6 and 3.8): in
# bf16/fp16 none spills more than a few dozen bytes.  The first of each list also fits
# fp32 tiles in shared memory (it is the one XTUNER_PATCH_AUTOTUNE=0 keeps); the
# tests run scripts/compile_check.py on all of them.  The interpreter uses small tiles
# so that short test sequences still cover several blocks, the unmasked loops and the
# masked ones.
_FWD_CONFIGS = _configs([(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3)],
                        (32, 32))
_DKDV_CONFIGS = _configs([(32, 64, 8, 3), (32, 128, 8, 3), (32, 128, 8, 2), (16, 128, 8, 3)],
                         (32, 32))
_DQ_CONFIGS = _configs([(64, 32, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
                       (32, 32))
# Tuned once per head size, mask and dtype (Triton adds the dtypes), on the first call,
# and kept on disk (Triton's cache folder) for later processes and the other ranks:
# a key that changed with the packing (the longest sample's bit length, until
# 2026-12) re-tuned in the middle of training, stalling steps 3 and 8 of a 20-step
# H200 run.  Token counts vary with the data and are not specialised on, for the same
# reason (a new value divisible by 16 would compile the kernel again).
_TUNE_KEY = ["HEAD_DIM", "CAUSAL"]
_DATA_SIZES = ["total_q"]


@triton.jit
def _load(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr,
          UPCAST: tl.constexpr):
    """A 2-D tile, zero-filled where masked; fp32 when UPCAST (bf16 in the interpreter)."""
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        if MASK_COLS:
            x = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _item(WORK, CU_Q, CU_K, item):
    """Sequence bounds ``(q_start, q_len, k_start, k_len)`` and unit index of a work item."""
    seq = tl.load(WORK + 2 * item)
    unit = tl.load(WORK + 2 * item + 1)
    q_start = tl.load(CU_Q + seq)
    q_len = tl.load(CU_Q + seq + 1) - q_start
    k_start = tl.load(CU_K + seq)
    k_len = tl.load(CU_K + seq + 1) - k_start
    return q_start, q_len, k_start, k_len, unit


@triton.jit
def _key_ranges(m0, q_len, k_len, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """For query rows ``[m0, m0 + BLOCK_M)``: ``(full_end, hi)`` such that key blocks in
    ``[0, full_end)`` are seen by every row and need no mask, and those in
    ``[full_end, hi)`` need one; keys from ``hi`` on are seen by no row of the tile."""
    if CAUSAL:
        diag = k_len - q_len
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + diag, 0), k_len)
        full_end = tl.minimum(tl.maximum(m0 + diag + 1, 0), hi)
    else:
        hi = k_len
        full_end = k_len
    return full_end // BLOCK_N * BLOCK_N, hi


# --------------------------------------------------------------------------- forward
@triton.jit
def _fwd_step(acc, m_i, l_i, q, k_base, v_base, start_n, rows, offs_n, offs_d, d_ok,
              k_len, diag, sk_t, sv_t, qk_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, MASK_D: tl.constexpr,
              UPCAST: tl.constexpr):
    cols = start_n + offs_n
    cols_ok = cols < k_len
    cols64 = cols.to(tl.int64)[:, None]
    k = _load(k_base + cols64 * sk_t + offs_d[None, :], cols_ok, d_ok, MASKED, MASK_D, UPCAST)
    v = _load(v_base + cols64 * sv_t + offs_d[None, :], cols_ok, d_ok, MASKED, MASK_D, UPCAST)
    s = tl.dot(q, tl.trans(k))
    if MASKED:
        keep = cols_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + diag)
        s = tl.where(keep, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; shift it by 0 instead, so that
        # exp2(-inf - -inf) never makes a NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_shift = m_new
        p = tl.exp2(s * qk_scale - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _fwd_rows(O, LSE, q_base, o_base, k_base, v_base, head, m0, q_start, q_len, k_len,
              total_q, sq_t, sk_t, sv_t, so_t, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
              UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    rows = m0 + tl.arange(0, BLOCK_M)
    rows_ok = rows < q_len
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rows64 = rows.to(tl.int64)[:, None]
    q = _load(q_base + rows64 * sq_t + offs_d[None, :], rows_ok, d_ok, True, MASK_D, UPCAST)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    diag = k_len - q_len
    full_end, hi = _key_ranges(m0, q_len, k_len, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, full_end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, start_n, rows, offs_n,
                                  offs_d, d_ok, k_len, diag, sk_t, sv_t, qk_scale,
                                  False, CAUSAL, MASK_D, UPCAST)
    for start_n in range(full_end, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, start_n, rows, offs_n,
                                  offs_d, d_ok, k_len, diag, sk_t, sv_t, qk_scale,
                                  True, CAUSAL, MASK_D, UPCAST)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    out_mask = rows_ok[:, None] & d_ok[None, :]
    tl.store(o_base + rows64 * so_t + offs_d[None, :], out.to(O.dtype.element_ty), mask=out_mask)
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * _LN2, float("inf"))
    lse_ptrs = LSE + head.to(tl.int64) * total_q + q_start + rows
    tl.store(lse_ptrs, lse, mask=rows_ok)


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, cache_results=True)
@triton.jit(do_not_specialize=_DATA_SIZES)
def _fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, WORK,
                n_heads, group, total_q, qk_scale,
                sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                UPCAST: tl.constexpr, UNIT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Heads vary fastest so that the query heads of one kv group run side by side and
    # share its K/V tiles through L2.
    pid = tl.program_id(0)
    item = pid // n_heads
    head = pid % n_heads
    q_start, q_len, k_start, k_len, unit = _item(WORK, CU_Q, CU_K, item)
    kv_head = (head // group).to(tl.int64)
    q_base = Q + q_start.to(tl.int64) * sq_t + head.to(tl.int64) * sq_h
    o_base = O + q_start.to(tl.int64) * so_t + head.to(tl.int64) * so_h
    k_base = K + k_start.to(tl.int64) * sk_t + kv_head * sk_h
    v_base = V + k_start.to(tl.int64) * sv_t + kv_head * sv_h
    for sub in tl.static_range(UNIT // BLOCK_M):
        m0 = unit * UNIT + sub * BLOCK_M
        if m0 < q_len:
            _fwd_rows(O, LSE, q_base, o_base, k_base, v_base, head, m0, q_start, q_len,
                      k_len, total_q, sq_t, sk_t, sv_t, so_t, qk_scale,
                      HEAD_DIM, BLOCK_D, CAUSAL, UPCAST, BLOCK_M, BLOCK_N)


# -------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=_DATA_SIZES)
def _delta_kernel(O, DO, DELTA, total_q, so_t, so_h, sdo_t, sdo_h,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (tok < total_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tok64 = tok.to(tl.int64)[:, None]
    o = tl.load(O + tok64 * so_t + head * so_h + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + tok64 * sdo_t + head * sdo_h + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * total_q + tok, delta, mask=tok < total_q)


@triton.jit
def _dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, cols,
               offs_m, offs_d, d_ok, q_len, diag, sq_t, sdo_t, qk_scale,
               CAUSAL: tl.constexpr, MASK_D: tl.constexpr, UPCAST: tl.constexpr):
    rows = start_m + offs_m
    rows_ok = rows < q_len
    lse = tl.load(lse_base + rows, mask=rows_ok, other=float("inf"))
    delta = tl.load(delta_base + rows, mask=rows_ok, other=0.0)
    # 64-bit tile bases and 32-bit offsets within the tile: fewer registers than 64-bit
    # offsets per element.  q is read transposed ([d, rows]) so that S^T = K Q^T comes
    # out keys-major, the layout dK and dV accumulate in.
    q_tile = q_base + start_m.to(tl.int64) * sq_t
    do_tile = do_base + start_m.to(tl.int64) * sdo_t
    qt = _load(q_tile + offs_m[None, :] * sq_t + offs_d[:, None], d_ok, rows_ok,
               MASK_D, True, UPCAST)
    do = _load(do_tile + offs_m[:, None] * sdo_t + offs_d[None, :], rows_ok, d_ok,
               True, MASK_D, UPCAST)
    st = tl.dot(k, qt)
    pt = tl.exp2(st * qk_scale - lse[None, :] * _LOG2E)
    keep = rows_ok[None, :]
    if CAUSAL:
        keep = keep & (cols[:, None] <= rows[None, :] + diag)
    pt = tl.where(keep, pt, 0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv)
    dpt = tl.dot(v, tl.trans(do))
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk)
    return dk, dv


@triton.jit
def _dkdv_cols(Q, DO, LSE, DELTA, DK, DV, k_base, v_base, dk_base, dv_base, n0,
               q_start, q_len, k_len, kv_head, group, total_q,
               sq_t, sq_h, sk_t, sv_t, sdo_t, sdo_h, sdk_t, sdv_t, qk_scale, sm_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
               UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    cols = n0 + tl.arange(0, BLOCK_N)
    cols_ok = cols < k_len
    cols64 = cols.to(tl.int64)[:, None]
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k = _load(k_base + cols64 * sk_t + offs_d[None, :], cols_ok, d_ok, True, MASK_D, UPCAST)
    v = _load(v_base + cols64 * sv_t + offs_d[None, :], cols_ok, d_ok, True, MASK_D, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Query blocks from lo on see keys of this tile.  One loop with the masks always on:
    # splitting off the unmasked blocks as the forward does costs more in registers
    # (spills) than the masks cost in arithmetic.  Key columns past k_len need no mask:
    # their dK/dV rows are computed but never stored.
    diag = k_len - q_len
    if CAUSAL:
        lo = tl.maximum(n0 - diag, 0) // BLOCK_M * BLOCK_M
    else:
        lo = 0
    for g in range(group):
        head = kv_head * group + g
        q_base = Q + q_start.to(tl.int64) * sq_t + head * sq_h
        do_base = DO + q_start.to(tl.int64) * sdo_t + head * sdo_h
        lse_base = LSE + head * total_q + q_start
        delta_base = DELTA + head * total_q + q_start
        for start_m in range(lo, q_len, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m,
                                cols, offs_m, offs_d, d_ok, q_len, diag, sq_t, sdo_t, qk_scale,
                                CAUSAL, MASK_D, UPCAST)

    store_mask = cols_ok[:, None] & d_ok[None, :]
    tl.store(dk_base + cols64 * sdk_t + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=store_mask)
    tl.store(dv_base + cols64 * sdv_t + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=store_mask)


@triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY, cache_results=True)
@triton.jit(do_not_specialize=_DATA_SIZES)
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, WORK,
                 n_kv_heads, group, total_q, qk_scale, sm_scale,
                 sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdk_t, sdk_h, sdv_t, sdv_h,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                 UPCAST: tl.constexpr, UNIT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    item = pid // n_kv_heads
    kv_head = (pid % n_kv_heads).to(tl.int64)
    q_start, q_len, k_start, k_len, unit = _item(WORK, CU_Q, CU_K, item)
    k_base = K + k_start.to(tl.int64) * sk_t + kv_head * sk_h
    v_base = V + k_start.to(tl.int64) * sv_t + kv_head * sv_h
    dk_base = DK + k_start.to(tl.int64) * sdk_t + kv_head * sdk_h
    dv_base = DV + k_start.to(tl.int64) * sdv_t + kv_head * sdv_h
    for sub in tl.static_range(UNIT // BLOCK_N):
        n0 = unit * UNIT + sub * BLOCK_N
        if n0 < k_len:
            _dkdv_cols(Q, DO, LSE, DELTA, DK, DV, k_base, v_base, dk_base, dv_base, n0,
                       q_start, q_len, k_len, kv_head, group, total_q,
                       sq_t, sq_h, sk_t, sv_t, sdo_t, sdo_h, sdk_t, sdv_t, qk_scale, sm_scale,
                       HEAD_DIM, BLOCK_D, CAUSAL, UPCAST, BLOCK_M, BLOCK_N)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k_base, v_base, start_n, rows, offs_n, offs_d, d_ok,
             k_len, diag, sk_t, sv_t, qk_scale,
             MASKED: tl.constexpr, CAUSAL: tl.constexpr, MASK_D: tl.constexpr,
             UPCAST: tl.constexpr):
    cols = start_n + offs_n
    cols_ok = cols < k_len
    cols64 = cols.to(tl.int64)[:, None]
    k = _load(k_base + cols64 * sk_t + offs_d[None, :], cols_ok, d_ok, MASKED, MASK_D, UPCAST)
    v = _load(v_base + cols64 * sv_t + offs_d[None, :], cols_ok, d_ok, MASKED, MASK_D, UPCAST)
    s = tl.dot(q, tl.trans(k))
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if MASKED:
        keep = cols_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + diag)
        p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq)


@triton.jit
def _dq_rows(DQ, q_base, do_base, dq_base, lse_base, delta_base, k_base, v_base, m0,
             q_len, k_len, sq_t, sdo_t, sdq_t, sk_t, sv_t, qk_scale, sm_scale,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
             UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    rows = m0 + tl.arange(0, BLOCK_M)
    rows_ok = rows < q_len
    rows64 = rows.to(tl.int64)[:, None]
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load(q_base + rows64 * sq_t + offs_d[None, :], rows_ok, d_ok, True, MASK_D, UPCAST)
    do = _load(do_base + rows64 * sdo_t + offs_d[None, :], rows_ok, d_ok, True, MASK_D, UPCAST)
    lse2 = tl.load(lse_base + rows, mask=rows_ok, other=float("inf")) * _LOG2E
    delta = tl.load(delta_base + rows, mask=rows_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    diag = k_len - q_len
    full_end, hi = _key_ranges(m0, q_len, k_len, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, full_end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, start_n, rows, offs_n, offs_d,
                      d_ok, k_len, diag, sk_t, sv_t, qk_scale, False, CAUSAL, MASK_D, UPCAST)
    for start_n in range(full_end, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        dq = _dq_step(dq, q, do, lse2, delta, k_base, v_base, start_n, rows, offs_n, offs_d,
                      d_ok, k_len, diag, sk_t, sv_t, qk_scale, True, CAUSAL, MASK_D, UPCAST)
    tl.store(dq_base + rows64 * sdq_t + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=rows_ok[:, None] & d_ok[None, :])


@triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY, cache_results=True)
@triton.jit(do_not_specialize=_DATA_SIZES)
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, WORK,
               n_heads, group, total_q, qk_scale, sm_scale,
               sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdq_t, sdq_h,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
               UPCAST: tl.constexpr, UNIT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    item = pid // n_heads
    head = (pid % n_heads).to(tl.int64)
    q_start, q_len, k_start, k_len, unit = _item(WORK, CU_Q, CU_K, item)
    kv_head = head // group
    q_base = Q + q_start.to(tl.int64) * sq_t + head * sq_h
    do_base = DO + q_start.to(tl.int64) * sdo_t + head * sdo_h
    dq_base = DQ + q_start.to(tl.int64) * sdq_t + head * sdq_h
    lse_base = LSE + head * total_q + q_start
    delta_base = DELTA + head * total_q + q_start
    k_base = K + k_start.to(tl.int64) * sk_t + kv_head * sk_h
    v_base = V + k_start.to(tl.int64) * sv_t + kv_head * sv_h
    for sub in tl.static_range(UNIT // BLOCK_M):
        m0 = unit * UNIT + sub * BLOCK_M
        if m0 < q_len:
            _dq_rows(DQ, q_base, do_base, dq_base, lse_base, delta_base, k_base, v_base, m0,
                     q_len, k_len, sq_t, sdo_t, sdq_t, sk_t, sv_t, qk_scale, sm_scale,
                     HEAD_DIM, BLOCK_D, CAUSAL, UPCAST, BLOCK_M, BLOCK_N)


# -------------------------------------------------------------------------- launchers
def _work_list(rows: torch.Tensor, other: torch.Tensor, causal: bool, rows_are_queries: bool,
               device: torch.device) -> torch.Tensor:
    """Work items ``(sequence, unit)`` as int32 ``[2 * n_items]`` on ``device``.

    ``rows`` are the per-sequence lengths split into units (queries for the forward
    and dQ, keys for dK/dV), ``other`` the lengths iterated over.  Items are ordered by
    their estimated cost, largest first, so that long items start early and the last
    wave of programs is made of short ones.
    """
    units = (rows + _UNIT - 1) // _UNIT
    seq = torch.repeat_interleave(torch.arange(rows.numel()), units)
    first = torch.cumsum(units, 0) - units
    unit = torch.arange(seq.numel()) - torch.repeat_interleave(first, units)
    n_rows, n_other = rows[seq], other[seq]
    if not causal:
        work = n_other
    elif rows_are_queries:
        # Keys seen by the unit's last query row, bottom-right aligned.
        last = torch.minimum(unit * _UNIT + _UNIT, n_rows)
        work = torch.minimum((last + n_other - n_rows).clamp(0, None), n_other)
    else:
        # Query rows that see the unit's first key.
        work = (n_other - (unit * _UNIT - (n_rows - n_other)).clamp(0, None)).clamp(0, None)
    order = torch.argsort(work, descending=True, stable=True)
    seq, unit = seq[order], unit[order]
    return torch.stack([seq, unit], 1).to(torch.int32).reshape(-1).to(device)


class _Plan:
    """What the launchers need from one ``(cu_seqlens_q, cu_seqlens_k)`` pair.

    Holds the validated per-sequence lengths (host int64) and the longest of each, the
    two cu_seqlens on the device of q, and the work lists, built on
    first use for each ``causal`` and each of the two row kinds (query units for the
    forward and dQ, key units for dK/dV).
    """

    def __init__(self, lens_q, lens_k, cu_q, cu_k):
        self.lens_q, self.lens_k = lens_q, lens_k
        self.longest_q = int(lens_q.max()) if lens_q.numel() else 0
        self.longest_k = int(lens_k.max()) if lens_k.numel() else 0
        self.cu_q, self.cu_k = cu_q, cu_k
        self._work = {}

    def query_work(self, causal: bool) -> torch.Tensor:
        return self._work_list(causal, rows_are_queries=True)

    def key_work(self, causal: bool) -> torch.Tensor:
        return self._work_list(causal, rows_are_queries=False)

    def _work_list(self, causal, rows_are_queries):
        key = (causal, rows_are_queries)
        if key not in self._work:
            rows, other = ((self.lens_q, self.lens_k) if rows_are_queries
                           else (self.lens_k, self.lens_q))
            self._work[key] = _work_list(rows, other, causal, rows_are_queries,
                                         self.cu_q.device)
        return self._work[key]


_PLANS = TensorMemo()


def _plan(cu_seqlens_q, cu_seqlens_k, total_q, total_k, device) -> _Plan:
    """The validated :class:`_Plan` of a cu_seqlens pair, built or reused (see the module doc)."""
    def build():
        lens_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q)
        lens_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k)
        if lens_q.numel() != lens_k.numel():
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number "
                             f"of sequences, got {lens_q.numel()} and {lens_k.numel()}")
        return _Plan(lens_q, lens_k, cu_seqlens_q.to(device), cu_seqlens_k.to(device))

    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be an int32 torch.Tensor, got {type(cu).__name__}")
    return _PLANS.get((cu_seqlens_q, cu_seqlens_k), (total_q, total_k, device), build)


def _block_d(head_dim: int) -> int:
    return next_power_of_2(head_dim)


def _forward(q, k, v, cu_q, cu_k, q_work, scale, causal):
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.empty((total_q, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((hq, total_q), dtype=torch.float32, device=q.device)
    n_items = q_work.numel() // 2
    if n_items:
        _fwd_kernel[(n_items * hq,)](
            q, k, v, out, lse, cu_q, cu_k, q_work,
            hq, hq // hkv, total_q, scale * _QK_LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=d, BLOCK_D=_block_d(d), CAUSAL=causal, UPCAST=_upcast(q), UNIT=_UNIT)
    return out, lse


def _backward(dout, q, k, v, out, lse, cu_q, cu_k, q_work, kv_work, scale, causal):
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    if dout.stride(-1) != 1 or dout.stride(0) * _UNIT >= 2 ** 31:
        dout = dout.contiguous()
    if packed_heads((q, k, v)) is not None:
        # Gradients laid out as the inputs are: whoever packed q, k and v (the
        # sequence-parallel exchange) passes their gradient on as one tensor, no copy.
        dqkv = torch.empty((total_q, hq + 2 * hkv, d), dtype=q.dtype, device=q.device)
        dq, dk, dv = dqkv.split([hq, hkv, hkv], dim=1)
    else:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    delta = torch.empty((hq, total_q), dtype=torch.float32, device=q.device)
    block_d = _block_d(d)
    upcast = _upcast(q)
    if total_q:
        block_t = 64
        _delta_kernel[(cdiv(total_q, block_t), hq)](
            out, dout, delta, total_q, out.stride(0), out.stride(1),
            dout.stride(0), dout.stride(1), HEAD_DIM=d, BLOCK_D=block_d, BLOCK_T=block_t)
    n_kv_items = kv_work.numel() // 2
    if n_kv_items:
        _dkdv_kernel[(n_kv_items * hkv,)](
            q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k, kv_work,
            hkv, group, total_q, scale * _QK_LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1),
            dv.stride(0), dv.stride(1),
            HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, UPCAST=upcast, UNIT=_UNIT)
    n_q_items = q_work.numel() // 2
    if n_q_items:
        _dq_kernel[(n_q_items * hq,)](
            q, k, v, dout, lse, delta, dq, cu_q, cu_k, q_work,
            hq, group, total_q, scale * _QK_LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
            HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, UPCAST=upcast, UNIT=_UNIT)
    return dq, dk, dv


def _upcast(x: torch.Tensor) -> bool:
    # The interpreter's bf16 arithmetic is wrong; compute in fp32 there instead.
    return INTERPRETER and x.dtype == torch.bfloat16


class _VarlenAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale, causal):
        q_work = plan.query_work(causal)
        out, lse = _forward(q, k, v, plan.cu_q, plan.cu_k, q_work, scale, causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        ctx.scale = scale
        ctx.causal = causal
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, causal = ctx.plan, ctx.causal
        dq, dk, dv = _backward(dout, q, k, v, out, lse, plan.cu_q, plan.cu_k,
                               plan.query_work(causal), plan.key_work(causal), ctx.scale,
                               causal)
        return dq, dk, dv, None, None, None


_PACKING_BOUNDS = TensorMemo()


def packing_bounds(cu_seqlens: torch.Tensor, total_tokens: int, device,
                   overflow_hint: str = "") -> Tuple[torch.Tensor, int]:
    """``(cu_seqlens, longest)`` of a packing of ``total_tokens`` tokens: ``cu_seqlens`` (any
    integer dtype, e.g. XTuner's ``cumulative_len``) as int32 on ``device``, closed at
    ``total_tokens`` when it ends before (the rest, e.g. padding to a multiple of the
    sequence-parallel size, attends as one more sequence), and its longest sequence.

    Reading its end is a device sync: the value is computed once for each (unmodified)
    tensor, so the layers of a model share it (:class:`~kernels._runtime.TensorMemo`).
    ``overflow_hint`` ends the error raised when ``cu_seqlens`` ends past the tokens.
    """
    def build():
        cu = cu_seqlens.to(device=device, dtype=torch.int32).reshape(-1)
        end = int(cu[-1])
        if end > total_tokens:
            raise ValueError(f"cu_seqlens ends at {end}, past the {total_tokens} tokens of "
                             f"the batch{overflow_hint}")
        if end < total_tokens:
            cu = torch.cat([cu, cu.new_tensor([total_tokens])])
        return cu, int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0

    return _PACKING_BOUNDS.get((cu_seqlens,), (total_tokens, device), build)


# ------------------------------------------------------------------------- public API
def varlen_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                     softmax_scale: Optional[float] = None, causal: bool = False,
                     return_lse: bool = False
                     ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention within each packed sequence, ``flash_attn_varlen_func``'s signature.

    ``q``: ``[total_q, hq, d]``; ``k``, ``v``: ``[total_k, hkv, d]`` with ``hq % hkv == 0``,
    all of one dtype (fp16, bf16 or fp32; under ``torch.autocast`` any of them, cast to
    the autocast dtype as ``scaled_dot_product_attention`` is), ``d`` in
    :data:`SUPPORTED_HEAD_DIMS`, any
    strides with a contiguous last dimension.  ``cu_seqlens_q/_k``: int32 ``[batch + 1]``
    from 0 to ``total_q``/``total_k``; ``max_seqlen_q/_k`` at least the longest sequence
    (they are only checked: the launch is sized from the lengths themselves).
    ``softmax_scale`` defaults to ``1 / sqrt(d)``; ``causal`` masks bottom-right aligned
    (query ``i`` sees key ``j <= i + len_k - len_q``).  ``dropout_p`` must be 0.

    Returns ``out`` ``[total_q, hq, d]`` in q's (or autocast's) dtype, and with
    ``return_lse`` also ``lse`` ``[hq, total_q]`` fp32 (natural log; not differentiable).
    Rows that see no key get ``out = 0`` and ``lse = +inf``.  Gradients flow to q, k
    and v.
    """
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p={dropout_p}: attention dropout is not "
                                  "implemented; pass dropout_p=0.0")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    if torch.is_autocast_enabled(q.device.type):
        # A matrix-product op: autocast runs it in its lower precision, as it runs
        # torch's scaled_dot_product_attention (a no-op for inputs already in it).
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    total_q, hq, d = q.shape
    total_k, hkv, d_k = k.shape
    if d_k != d:
        raise ValueError(f"q and k must have the same head_dim, got {d} and {d_k}")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {d} is not supported; supported: {SUPPORTED_HEAD_DIMS}")
    if q.stride(0) * _UNIT >= 2 ** 31:
        # Offsets within a tile of rows are 32-bit.
        raise ValueError(f"q's token stride {q.stride(0)} is too large; make q contiguous")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number "
                         f"of kv heads ({hkv})")
    plan = _plan(cu_seqlens_q, cu_seqlens_k, total_q, total_k, q.device)
    check_max_seqlen("max_seqlen_q", int(max_seqlen_q), plan.longest_q, "cu_seqlens_q")
    check_max_seqlen("max_seqlen_k", int(max_seqlen_k), plan.longest_k, "cu_seqlens_k")
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    if not scale > 0.0:
        raise ValueError(f"softmax_scale must be positive, got {softmax_scale}")
    out, lse = _VarlenAttnFunction.apply(q, k, v, plan, scale, bool(causal))
    return (out, lse) if return_lse else out


def attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
              softmax_scale: Optional[float] = None, causal: bool = False,
              return_lse: bool = False
              ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Padded-batch attention, ``flash_attn_func``'s signature, through the varlen kernels.

    ``q``: ``[batch, seqlen_q, hq, d]``; ``k``, ``v``: ``[batch, seqlen_k, hkv, d]``.
    Returns ``out`` ``[batch, seqlen_q, hq, d]`` and, with ``return_lse``, ``lse``
    ``[batch, hq, seqlen_q]`` fp32.  Every row is one whole sequence (no padding mask).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    batch, seqlen_q = q.shape[:2]
    seqlen_k = k.shape[1]
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"q, k and v must have the same batch size, got {q.shape[0]}, "
                         f"{k.shape[0]}, {v.shape[0]}")
    steps = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    cu_q, cu_k = steps * seqlen_q, steps * seqlen_k
    out, lse = varlen_attn_func(q.reshape((batch * seqlen_q,) + q.shape[2:]),
                                k.reshape((batch * seqlen_k,) + k.shape[2:]),
                                v.reshape((batch * seqlen_k,) + v.shape[2:]),
                                cu_q, cu_k, seqlen_q, seqlen_k, dropout_p, softmax_scale,
                                causal, return_lse=True)
    out = out.view(q.shape[:3] + (out.shape[-1],))
    if not return_lse:
        return out
    return out, lse.view(lse.shape[0], batch, seqlen_q).transpose(0, 1)
