"""Pick, per call, the Triton kernel or the pure-PyTorch reference it is tested against.

Triton kernels run on CUDA tensors of fp16 / bf16 / fp32, and on CPU tensors of fp16 /
fp32 under the Triton interpreter (``TRITON_INTERPRET=1`` set before ``kernels`` is
imported, as the test-suite does; the interpreter's bf16 arithmetic is broken).
Anything else - CPU training without the interpreter, as in ``make demo``, bf16 under
the interpreter, float64 - runs the references from :mod:`kernels.reference`, with one
warning per reason and process: same semantics, PyTorch speed.  For matrix-product ops
under ``torch.autocast`` the dtype that counts is the autocast dtype they compute in.
"""

import logging

import torch

import kernels
from kernels import reference
from kernels._runtime import INTERPRETER

logger = logging.getLogger("xtuner_patch")
_warned = set()


def warn_once(message: str, *args) -> None:
    """Log ``message % args`` as a warning the first time that text comes up in this process."""
    text = message % args if args else message
    if text not in _warned:
        _warned.add(text)
        logger.warning(text)


def has_hooks(*modules) -> bool:
    """Whether calling any of ``modules`` would run hooks (its own or global ones): then
    only a module call does what it does (e.g. DeepSpeed ZeRO-3 gathering weights)."""
    from torch.nn.modules import module as nn_module

    hook_dicts = [nn_module._global_forward_hooks, nn_module._global_forward_pre_hooks,
                  nn_module._global_backward_hooks, nn_module._global_backward_pre_hooks]
    for m in modules:
        hook_dicts += [m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                       m._backward_pre_hooks]
    return any(hook_dicts)


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETER_DTYPES = (torch.float16, torch.float32)


def use_triton(*tensors: torch.Tensor, matmul: bool = False) -> bool:
    """Whether the Triton kernels can compute on ``tensors`` (the first decides the
    device); ``matmul``: the op computes in the autocast dtype when autocast is on."""
    device = tensors[0].device
    dtypes = {t.dtype for t in tensors if t is not None and t.is_floating_point()}
    if matmul and torch.is_autocast_enabled(device.type):
        dtypes.add(torch.get_autocast_dtype(device.type))
    if device.type == "cuda":
        supported, where = _TRITON_DTYPES, "Triton kernels compute"
    elif INTERPRETER:
        supported, where = _INTERPRETER_DTYPES, "the Triton interpreter computes (its bf16 is broken)"
    else:
        warn_once("xtuner-patch: Triton kernels need CUDA (or TRITON_INTERPRET=1); tensors "
                  "on %s run the PyTorch reference implementations", device.type)
        return False
    unsupported = sorted(str(d) for d in dtypes if d not in supported)
    if unsupported:
        warn_once("xtuner-patch: %s %s only: %s tensors run the PyTorch reference "
                  "implementations", where, "/".join(str(d) for d in supported),
                  "/".join(unsupported))
        return False
    return True


def varlen_causal_attention(q, k, v, cu_seqlens, max_seqlen):
    """Causal attention within packed sequences; ``q`` ``[t, hq, d]``, ``k``/``v`` ``[t, hkv, d]``."""
    if use_triton(q, k, v, matmul=True):
        return kernels.varlen_attn_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                        causal=True)
    return reference.varlen_attn_reference(q, k, v, cu_seqlens, cu_seqlens, causal=True)[0]


def rms_norm(x, weight, eps, residual=None):
    """``InternLM2RMSNorm`` of ``x`` (or of ``x + residual``, returned too)."""
    if use_triton(x, weight, residual):
        return kernels.rms_norm(x, weight, eps, residual=residual)
    return reference.rms_norm_reference(x, weight, eps, residual=residual)


def split_qkv_rotary(qkv, num_kv_heads, head_dim, *, fused: bool, **rope):
    """q, k (rotated) and v from InternLM2's ``wqkv`` output; ``fused`` picks our kernel."""
    if fused and use_triton(qkv):
        return kernels.split_qkv_rotary(qkv, num_kv_heads, head_dim, **rope)
    return reference.split_qkv_rotary_reference(qkv, num_kv_heads, head_dim, **rope)


def swiglu(a, b):
    """``silu(a) * b``, the gate of InternLM2's MLP."""
    if use_triton(a, b):
        return kernels.swiglu(a, b)
    return reference.swiglu_reference(a, b)


def linear_cross_entropy(hidden, weight, labels, *, shift_labels: bool, ignore_index=-100,
                         low_rank=None):
    """Mean cross-entropy of ``hidden @ weight.T`` (``+ a @ b.T`` with ``low_rank`` ``(a, b)``)
    against ``labels`` (0 when all are ignored); the fused kernel never materialises the
    logits, the reference does."""
    if use_triton(hidden, weight, *(low_rank or ()), matmul=True):
        return kernels.fused_linear_cross_entropy(hidden, weight, labels, ignore_index,
                                                  shift_labels=shift_labels, low_rank=low_rank)
    return reference.linear_cross_entropy_reference(hidden, weight, labels, ignore_index,
                                                    shift_labels=shift_labels,
                                                    low_rank=low_rank)
