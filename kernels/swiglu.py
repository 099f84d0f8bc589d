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

from kernels._runtime import FLOAT_DTYPES, as_rows, cdiv, check_tensor
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
    return (n_rows, cdiv(n_cols, _BLOCK))


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, in_place_grad):
        n_cols = a.shape[-1]
        a2, b2 = as_rows("a", a, n_cols), as_rows("b", b, n_cols)
        y = torch.empty(a.shape, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
        y2 = y.view(-1, n_cols)
        _swiglu_fwd_kernel[_grid(*y2.shape)](
            a2, b2, y2, n_cols, a2.stride(0), b2.stride(0), y2.stride(0),
            BLOCK=_BLOCK, num_warps=_NUM_WARPS)
        ctx.save_for_backward(a, b)
        ctx.in_place_grad = in_place_grad
        ctx.backward_done = False
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        if ctx.backward_done:
            raise RuntimeError("swiglu(in_place_grad=True) cannot run its backward twice: the "
                               "first one wrote the gradients over a and b")
        a, b = ctx.saved_tensors
        n_cols = a.shape[-1]
        a2, b2 = as_rows("a", a, n_cols), as_rows("b", b, n_cols)
        # The incoming gradient may be a broadcast or otherwise strided view.
        dy2 = dy.reshape(-1, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        if ctx.in_place_grad:
            # Each element's a and b are loaded before its da and db are stored over them.
            da, db, da2, db2 = a, b, a2, b2
        else:
            da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
            db = torch.empty(b.shape, dtype=b.dtype, device=b.device)
            da2, db2 = da.view(-1, n_cols), db.view(-1, n_cols)
        _swiglu_bwd_kernel[_grid(*da2.shape)](
            dy2, a2, b2, da2, db2, n_cols, dy2.stride(0), a2.stride(0), b2.stride(0),
            da2.stride(0), db2.stride(0), BLOCK=_BLOCK, num_warps=_NUM_WARPS)
        if ctx.in_place_grad:
            ctx.backward_done = True
            # Any other backward that saved a or b now fails loudly instead of reading
            # gradients in place of its inputs.
            torch.autograd.graph.increment_version((a, b))
        return da, db, None


def swiglu(a: torch.Tensor, b: torch.Tensor, *, in_place_grad: bool = False) -> torch.Tensor:
    """``silu(a) * b``, differentiable, storing only ``a`` and ``b`` for the backward.

    Args:
        a: the gate, ``[..., n]`` (``w1(x)``), fp16 / bf16 / fp32, last dimension
            contiguous and the leading dimensions addressable with one row stride.
        b: the up projection (``w3(x)``), ``a``'s shape and device, fp16 / bf16 / fp32.
        in_place_grad: the backward writes ``da`` over ``a`` and ``db`` over ``b`` instead
            of allocating them (saves ``a`` and ``b``'s bytes at the backward's peak).  For
            inputs nothing else needs after this backward, such as the MLP's ``w1(x)`` and
            ``w3(x)``: a later backward that saved them raises PyTorch's in-place
            modification error, and so does running this backward twice.  Refused for
            leaf tensors that require grad (their values would be lost) and for ``a`` and
            ``b`` sharing memory.

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
    if in_place_grad:
        for name, t in (("a", a), ("b", b)):
            if t.is_leaf and t.requires_grad:
                raise ValueError(f"in_place_grad=True would overwrite {name}, a leaf tensor "
                                 "that requires grad; pass in_place_grad=False")
        if _overlap(a, b):
            raise ValueError("in_place_grad=True needs a and b in separate memory, but they "
                             "overlap; pass in_place_grad=False")
    if a.numel() == 0:
        return swiglu_reference(a, b)
    return _SwiGLUFunction.apply(a, b, bool(in_place_grad))


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (same shape, rows of one stride each) share any element.

    Column slices of one tensor, such as the two halves of a fused projection, do not.
    """
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if a.dtype != b.dtype:
        return True
    n_cols = a.shape[-1]
    a2, b2 = a.view(-1, n_cols), b.view(-1, n_cols)
    offset = (b.data_ptr() - a.data_ptr()) // a.element_size()
    if a2.shape[0] == 1:
        return abs(offset) < n_cols
    if a2.stride(0) != b2.stride(0):
        return True
    shift = offset % a2.stride(0)
    return not n_cols <= shift <= a2.stride(0) - n_cols
