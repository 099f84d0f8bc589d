"""Pick, per call, the Triton kernel or the pure-PyTorch reference it is tested against.

Triton kernels run on CUDA tensors, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before ``kernels`` is imported, as the test-suite does).
Anything else - CPU training without the interpreter, as in ``make demo`` - runs the
references from :mod:`kernels.reference`, with one warning per process: same
semantics, PyTorch speed.
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


def use_triton(tensor: torch.Tensor) -> bool:
    if tensor.is_cuda or INTERPRETER:
        return True
    warn_once("xtuner-patch: Triton kernels need CUDA (or TRITON_INTERPRET=1); tensors on %s "
              "run the PyTorch reference implementations", tensor.device.type)
    return False


def varlen_causal_attention(q, k, v, cu_seqlens, max_seqlen):
    """Causal attention within packed sequences; ``q`` ``[t, hq, d]``, ``k``/``v`` ``[t, hkv, d]``."""
    if use_triton(q):
        return kernels.varlen_attn_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                        causal=True)
    return reference.varlen_attn_reference(q, k, v, cu_seqlens, cu_seqlens, causal=True)[0]


def rms_norm(x, weight, eps, residual=None):
    """``InternLM2RMSNorm`` of ``x`` (or of ``x + residual``, returned too)."""
    if use_triton(x):
        return kernels.rms_norm(x, weight, eps, residual=residual)
    return reference.rms_norm_reference(x, weight, eps, residual=residual)


def split_qkv_rotary(qkv, num_kv_heads, head_dim, *, fused: bool, **rope):
    """q, k (rotated) and v from InternLM2's ``wqkv`` output; ``fused`` picks our kernel."""
    if fused and use_triton(qkv):
        return kernels.split_qkv_rotary(qkv, num_kv_heads, head_dim, **rope)
    return reference.split_qkv_rotary_reference(qkv, num_kv_heads, head_dim, **rope)


def swiglu(a, b):
    """``silu(a) * b``, the gate of InternLM2's MLP."""
    if use_triton(a):
        return kernels.swiglu(a, b)
    return reference.swiglu_reference(a, b)


def linear_cross_entropy(hidden, weight, labels, *, shift_labels: bool, ignore_index=-100,
                         low_rank=None):
    """Mean cross-entropy of ``hidden @ weight.T`` (``+ a @ b.T`` with ``low_rank`` ``(a, b)``)
    against ``labels`` (0 when all are ignored); the fused kernel never materialises the
    logits, the reference does."""
    if use_triton(hidden):
        return kernels.fused_linear_cross_entropy(hidden, weight, labels, ignore_index,
                                                  shift_labels=shift_labels, low_rank=low_rank)
    return reference.linear_cross_entropy_reference(hidden, weight, labels, ignore_index,
                                                    shift_labels=shift_labels,
                                                    low_rank=low_rank)
