"""RMSNorm with the numerics of InternLM2's ``InternLM2RMSNorm``, optionally fused with
the residual add that precedes it in every decoder layer::

    s    = x + residual            (in fp32, rounded to s's dtype; only with a residual)
    rstd = rsqrt(mean(s**2) + eps)  (fp32)
    y    = weight * (s * rstd).to(s.dtype)

Mixed dtypes follow PyTorch's promotion, as the unfused ops do under ``torch.autocast``
(where, with fp32 weights, the residual stream stays fp32 while the attention output is
half precision): ``s`` is ``promote_types(x, residual)``, the output
``promote_types(s, weight)``; each input's gradient comes back in its own dtype.  No
part of RMSNorm is cast by autocast.  The weight gradient is deterministic (fixed-order
sums, no atomics).  Design: ``docs/design.md``.
"""

from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from kernels._runtime import (FLOAT_DTYPES, as_rows, cdiv, check_tensor, multiprocessor_count,
                              next_power_of_2)
from kernels.reference.norm import rms_norm_reference

# Rows wider than this would need more registers per program than a GPU has; such
# rows go to the PyTorch reference instead.
MAX_FUSED_HIDDEN = 65536

# Backward programs per multiprocessor: enough resident programs to hide memory
# latency, few enough that the fp32 partial weight-gradient buffer stays small.
_BWD_PROGRAMS_PER_SM = 4


# Row counts follow the data (padded batches): not specialised on, so that a new count
# divisible by 16 does not compile the kernels again in the middle of training.
@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_fwd_kernel(
    X, R, W, Y, S, RSTD,
    n_rows, n_cols,
    stride_x, stride_r, stride_y, stride_s,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)

    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        # PyTorch adds half-precision tensors in fp32 and rounds once; so do we.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + rows[:, None] * stride_s + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)

    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    tl.store(RSTD + rows, rstd, mask=row_mask)

    # InternLM2 rounds the normalised value to the input dtype (s's) before the weight.
    normed = (x * rstd[:, None]).to(S.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = normed * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows", "rows_per_program"])
def _rms_norm_bwd_kernel(
    DY, DS, X, W, RSTD, DX, DW_PARTIAL,
    n_rows, n_cols, rows_per_program,
    stride_dy, stride_ds, stride_x, stride_dx,
    HAS_DSUM: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    for first in range(row_start, row_end, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)

        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)

        xhat = x * rstd[:, None]
        dn = dy * w[None, :]
        proj = tl.sum(dn * xhat, axis=1) / n_cols
        dx = (dn - xhat * proj[:, None]) * rstd[:, None]
        if HAS_DSUM:
            ds = tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0)
            dx += ds.to(tl.float32)
        # With in-place gradients DX is DY: every element of the tile was loaded above.
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty),
                 mask=mask)
        if COMPUTE_DW:
            # The forward multiplied the weight by the normalised value rounded to x.dtype.
            dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)

    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw, axis=0), mask=col_mask)


def _tile(n_cols: int) -> Tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)`` for rows of ``n_cols`` elements."""
    block_n = next_power_of_2(n_cols)
    # Narrow rows share a program so each program still moves a few KiB.
    block_m = max(1, min(16, 2048 // block_n))
    num_warps = min(32, max(4, block_m * block_n // 512))
    return block_m, block_n, num_warps


def _forward(x2: torch.Tensor, weight: torch.Tensor, r2: Optional[torch.Tensor], eps: float):
    n_rows, n_cols = x2.shape
    s_dtype = torch.promote_types(x2.dtype, r2.dtype) if r2 is not None else x2.dtype
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(s_dtype, weight.dtype),
                    device=x2.device)
    s = torch.empty_like(y, dtype=s_dtype) if r2 is not None else x2
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    if n_rows == 0:
        return y, s, rstd
    block_m, block_n, num_warps = _tile(n_cols)
    r_arg = r2 if r2 is not None else x2
    _rms_norm_fwd_kernel[(cdiv(n_rows, block_m),)](
        x2, r_arg, weight, y, s, rstd,
        n_rows, n_cols,
        x2.stride(0), r_arg.stride(0), y.stride(0), s.stride(0),
        eps,
        HAS_RESIDUAL=r2 is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return y, s, rstd


def _backward(dy: torch.Tensor, ds: Optional[torch.Tensor], x2: torch.Tensor,
              weight: torch.Tensor, rstd: torch.Tensor, compute_dw: bool, in_place: bool):
    n_rows, n_cols = x2.shape
    dy = dy.reshape(n_rows, n_cols)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    if ds is not None:
        ds = ds.reshape(n_rows, n_cols)
        if ds.stride(-1) != 1:
            ds = ds.contiguous()
    # dy may be an autograd buffer of another dtype (fp32 weight) or a broadcast view.
    if in_place and dy.dtype == x2.dtype and dy.is_contiguous():
        dx = dy
    else:
        dx = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    block_m, block_n, num_warps = _tile(n_cols)
    n_tiles = cdiv(n_rows, block_m)
    programs = min(n_tiles, multiprocessor_count(x2.device) * _BWD_PROGRAMS_PER_SM)
    rows_per_program = cdiv(n_tiles, max(programs, 1)) * block_m
    programs = cdiv(n_rows, rows_per_program) if n_rows else 0
    dw_partial = torch.empty((programs, n_cols) if compute_dw else (1,),
                             dtype=torch.float32, device=x2.device)
    if programs:
        ds_arg = ds if ds is not None else dy
        _rms_norm_bwd_kernel[(programs,)](
            dy, ds_arg, x2, weight, rstd, dx, dw_partial,
            n_rows, n_cols, rows_per_program,
            dy.stride(0), ds_arg.stride(0), x2.stride(0), dx.stride(0),
            HAS_DSUM=ds is not None, COMPUTE_DW=compute_dw,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    dw = None
    if compute_dw:
        # A fixed-order reduction over the per-program partial sums.
        dw = dw_partial.sum(0).to(weight.dtype)
    return dx, dw


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps, in_place_grad):
        n_cols = x.shape[-1]
        x2 = as_rows("x", x, n_cols)
        r2 = as_rows("residual", residual, n_cols) if residual is not None else None
        y, s, rstd = _forward(x2, weight, r2, eps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.input_dtypes = (x.dtype, None if residual is None else residual.dtype)
        ctx.in_place_grad = in_place_grad
        ctx.set_materialize_grads(False)
        y = y.view(x.shape)
        return (y, s.view(x.shape)) if residual is not None else y

    @staticmethod
    def backward(ctx, dy, ds=None):
        s, weight, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros(s.shape, dtype=torch.promote_types(s.dtype, weight.dtype),
                             device=s.device)
        dx, dw = _backward(dy, ds, s, weight, rstd, ctx.needs_input_grad[1],
                           ctx.in_place_grad)
        shape = ds.shape if ds is not None else dy.shape
        ds_total = dx.view(shape)  # the gradient of s, shared by x and the residual
        x_dtype, residual_dtype = ctx.input_dtypes
        grad_residual = ds_total.to(residual_dtype) if residual_dtype is not None else None
        return ds_total.to(x_dtype), dw, grad_residual, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             residual: Optional[torch.Tensor] = None, *, in_place_grad: bool = False
             ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """InternLM2 RMSNorm of ``x`` (optionally of ``x + residual``), differentiable.

    Args:
        x: ``[..., hidden]``, fp16 / bf16 / fp32, last dimension contiguous and the
            leading dimensions addressable with one row stride (any contiguous tensor,
            or a column slice of one); other layouts raise ``ValueError``.
        weight: ``[hidden]``, fp16 / bf16 / fp32.
        eps: added to the mean square (``InternLM2RMSNorm.variance_epsilon``).
        residual: optional tensor of ``x``'s shape, any float dtype.  When given, the
            norm is taken of ``s = x + residual`` (summed in fp32, rounded to
            ``promote_types(x.dtype, residual.dtype)``, as ``x + residual`` is) and
            ``(normed, s)`` is returned, both differentiable: the gradient of ``s``
            reaches ``x`` and ``residual`` (each in its own dtype) together with the
            gradient through the norm.
        in_place_grad: write the input gradient into the incoming gradient's buffer
            instead of a new one (when that buffer is contiguous and of ``s``'s dtype).
            Only for callers that do not reuse the gradient of the norm's output.

    Returns:
        ``normed`` (contiguous, ``[..., hidden]``, dtype ``promote_types(s.dtype,
        weight.dtype)`` as in InternLM2, ``s`` being ``x`` without a residual), or
        ``(normed, s)`` with a residual.

    Rows wider than :data:`MAX_FUSED_HIDDEN` run :func:`rms_norm_reference`.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (hidden), got a scalar")
    hidden = x.shape[-1]
    if weight.shape[0] != hidden:
        raise ValueError(f"weight must have shape ({hidden},) to match x's last dimension, "
                         f"got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, "
                             f"got {tuple(residual.shape)}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    if hidden > MAX_FUSED_HIDDEN:
        return rms_norm_reference(x, weight, eps, residual)
    return _RMSNormFunction.apply(x, weight, residual, float(eps), bool(in_place_grad))
