"""SwiGLU gate ``silu(a) * b`` (InternLM2MLP's ``act_fn(w1(x)) * w3(x)``), forward and backward.

Elementwise in fp32, rounded once to the output dtype; the backward recomputes
``sigmoid(a)`` from ``a`` and ``b``, the only tensors kept.  Mixed dtypes follow
PyTorch's promotion (``silu(a) * b`` has dtype ``promote_types(a, b)``; autocast casts
neither op): the output has the promoted dtype, ``da`` and ``db`` their inputs' dtypes.
``a`` and ``b`` may be column slices of one tensor (the two halves of a fused
``w1``/``w3`` projection): any layout whose rows share one stride is read in place.
Design: ``docs/design.md``.
"""

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels._runtime import FLOAT_DTYPES, as_rows, check_tensor
from kernels.reference.swiglu import swiglu_reference

# Columns per program: over 8 warps, 8 elements per thread and tensor, one 16-byte
# vector access in bf16.
_BLOCK = 2048
_NUM_WARPS = 8


@triton.jit
def _swiglu_fwd_kernel(A, B, Y, n_cols, stride_a, stride_b, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, A, B, DA, DB, n_cols, stride_dy, stride_a, stride_b,
                       stride_da, stride_db, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = a * sig
    da = dy * b * sig * (1.0 + a * (1.0 - sig))
    tl.store(DA + row * stride_da + cols, da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + row * stride_db + cols, (dy * silu).to(DB.dtype.element_ty), mask=mask)


def _grid(n_rows: int, n_cols: int):
    return (n_rows, triton.cdiv(n_cols, _BLOCK))


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        n_cols = a.shape[-1]
        a2, b2 = as_rows("a", a, n_cols), as_rows("b", b, n_cols)
        y = torch.empty(a.shape, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
        y2 = y.view(-1, n_cols)
        _swiglu_fwd_kernel[_grid(*y2.shape)](
            a2, b2, y2, n_cols, a2.stride(0), b2.stride(0), y2.stride(0),
            BLOCK=_BLOCK, num_warps=_NUM_WARPS)
        ctx.save_for_backward(a, b)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        n_cols = a.shape[-1]
        a2, b2 = as_rows("a", a, n_cols), as_rows("b", b, n_cols)
        # The incoming gradient may be a broadcast or otherwise strided view.
        dy2 = dy.reshape(-1, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
        db = torch.empty(b.shape, dtype=b.dtype, device=b.device)
        da2, db2 = da.view(-1, n_cols), db.view(-1, n_cols)
        _swiglu_bwd_kernel[_grid(*da2.shape)](
            dy2, a2, b2, da2, db2, n_cols, dy2.stride(0), a2.stride(0), b2.stride(0),
            da2.stride(0), db2.stride(0), BLOCK=_BLOCK, num_warps=_NUM_WARPS)
        return da, db


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b``, differentiable, storing only ``a`` and ``b`` for the backward.

    Args:
        a: the gate, ``[..., n]`` (``w1(x)``), fp16 / bf16 / fp32, last dimension
            contiguous and the leading dimensions addressable with one row stride.
        b: the up projection (``w3(x)``), ``a``'s shape and device, fp16 / bf16 / fp32.

    Returns:
        A new contiguous tensor of ``a``'s shape, dtype ``promote_types(a.dtype,
        b.dtype)``.
    """
    check_tensor("a", a, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_tensor("b", b, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    if a.dim() == 0:
        raise ValueError("a must have at least one dimension, got a scalar")
    if b.shape != a.shape:
        raise ValueError(f"b must have a's shape {tuple(a.shape)}, got {tuple(b.shape)}")
    if b.device != a.device:
        raise ValueError(f"b is on {b.device} but a is on {a.device}")
    if a.numel() == 0:
        return swiglu_reference(a, b)
    return _SwiGLUFunction.apply(a, b)
