"""Pure-PyTorch SwiGLU gate, as Hugging Face's InternLM2MLP computes it.

Differentiable with autograd; :func:`kernels.swiglu.swiglu` is tested against it and the
CPU fallback runs it.
"""

import torch
import torch.nn.functional as F


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b``; ``silu(a)`` is rounded to ``a.dtype`` before the product, as in
    ``InternLM2MLP`` (``act_fn(w1(x)) * w3(x)``)."""
    return F.silu(a) * b
