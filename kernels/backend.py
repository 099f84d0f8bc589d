"""Per call, the Triton kernel or the PyTorch reference it is tested against: the one place
that decides.

Triton kernels run on CUDA tensors of fp16 / bf16 / fp32, and on CPU tensors of fp16 /
fp32 under the Triton interpreter (``TRITON_INTERPRET=1`` set before ``kernels`` is
imported; the interpreter's bf16 arithmetic is broken).  Anything else - CPU tensors
without the interpreter, bf16 under it, float64 - runs the reference from
:mod:`kernels.reference` with one warning per reason and process: same semantics,
PyTorch speed.  For matrix-product ops under ``torch.autocast`` the dtype that counts is
the autocast dtype they compute in.

The functions below take what the kernels take (see each kernel's public function) and
are what a model layer calls.
"""

import logging
from typing import Optional

import torch

from kernels import reference
from kernels import sp_layout
from kernels._runtime import INTERPRETER
from kernels.cross_entropy import fused_linear_cross_entropy
from kernels.rms_norm import rms_norm as _triton_rms_norm
from kernels.rotary import split_qkv_rotary as _triton_split_qkv_rotary
from kernels.swiglu import swiglu as _triton_swiglu
from kernels.varlen_attention import varlen_attn_func

logger = logging.getLogger("kernels")
_warned = set()

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETER_DTYPES = (torch.float16, torch.float32)


def warn_once(message: str, *args, log: Optional[logging.Logger] = None) -> None:
    """Log ``message % args`` as a warning (on ``log``, default this package's logger) the
    first time that text comes up in this process."""
    text = message % args if args else message
    if text not in _warned:
        _warned.add(text)
        (log or logger).warning(text)


def use_triton(*tensors: Optional[torch.Tensor], matmul: bool = False) -> bool:
    """Whether the Triton kernels can compute on ``tensors`` (the first decides the device;
    None entries are skipped); ``matmul``: the op computes in the autocast dtype when
    autocast is on."""
    device = tensors[0].device
    dtypes = {t.dtype for t in tensors if t is not None and t.is_floating_point()}
    if matmul and torch.is_autocast_enabled(device.type):
        dtypes.add(torch.get_autocast_dtype(device.type))
    if device.type == "cuda":
        supported, where = _TRITON_DTYPES, "Triton kernels compute"
    elif INTERPRETER:
        supported, where = (_INTERPRETER_DTYPES,
                             "the Triton interpreter computes (its bf16 is broken)")
    else:
        warn_once("kernels: Triton kernels need CUDA (or TRITON_INTERPRET=1); tensors on %s run "
                  "the PyTorch reference implementations", device.type)
        return False
    unsupported = sorted(str(d) for d in dtypes if d not in supported)
    if unsupported:
        warn_once("kernels: %s %s only: %s tensors run the PyTorch reference implementations",
                  where, "/".join(str(d) for d in supported), "/".join(unsupported))
        return False
    return True


def varlen_causal_attention(q, k, v, cu_seqlens, max_seqlen):
    """Causal attention within packed sequences: ``q`` ``[t, hq, d]``, ``k``/``v``
    ``[t, hkv, d]``, int32 ``cu_seqlens`` ``[n + 1]``; returns ``[t, hq, d]``."""
    if use_triton(q, k, v, matmul=True):
        return varlen_attn_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                causal=True)
    return reference.varlen_attn_reference(q, k, v, cu_seqlens, cu_seqlens, causal=True)[0]


def rms_norm(x, weight, eps, residual=None):
    """``InternLM2RMSNorm`` of ``x`` (or of ``x + residual``, returned too)."""
    if use_triton(x, weight, residual):
        return _triton_rms_norm(x, weight, eps, residual=residual)
    return reference.rms_norm_reference(x, weight, eps, residual=residual)


def split_qkv_rotary(qkv, num_kv_heads, head_dim, *, fused: bool = True, **rope):
    """q, k (rotated) and v from InternLM2's ``wqkv`` output; ``fused=False`` asks for the
    reference (RoPE as PyTorch ops) whatever the tensors."""
    if fused and use_triton(qkv):
        return _triton_split_qkv_rotary(qkv, num_kv_heads, head_dim, **rope)
    return reference.split_qkv_rotary_reference(qkv, num_kv_heads, head_dim, **rope)


def swiglu(a, b, *, in_place_grad=False):
    """``silu(a) * b``, the gate of InternLM2's MLP; ``in_place_grad`` as in
    :func:`kernels.swiglu` (the reference path allocates its gradients as usual)."""
    if use_triton(a, b):
        return _triton_swiglu(a, b, in_place_grad=in_place_grad)
    return reference.swiglu_reference(a, b)


def linear_cross_entropy(hidden, weight, labels, *, shift_labels: bool, ignore_index=-100,
                         low_rank=None):
    """Mean cross-entropy of ``hidden @ weight.T`` (``+ a @ b.T`` with ``low_rank`` ``(a, b)``)
    against ``labels`` (0 when all are ignored); the fused kernel never materialises the
    logits, the reference does."""
    if use_triton(hidden, weight, *(low_rank or ()), matmul=True):
        return fused_linear_cross_entropy(hidden, weight, labels, ignore_index,
                                          shift_labels=shift_labels, low_rank=low_rank)
    return reference.linear_cross_entropy_reference(hidden, weight, labels, ignore_index,
                                                    shift_labels=shift_labels, low_rank=low_rank)


def pack_heads(split, q, k=None, v=None):
    """The send buffer of a sequence-parallel exchange (:func:`kernels.pack_heads`)."""
    if use_triton(q):
        return sp_layout.pack_heads(split, q, k, v)
    return reference.pack_heads_reference(split, q, k, v)


def unpack_heads(split, buffer, tokens: int, head_dim: int, kv: bool = True):
    """Tensors back from an exchange buffer (:func:`kernels.unpack_heads`)."""
    if use_triton(buffer):
        return sp_layout.unpack_heads(split, buffer, tokens, head_dim, kv=kv)
    return reference.unpack_heads_reference(split, buffer, tokens, head_dim, kv=kv)
