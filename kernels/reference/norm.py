"""Pure-PyTorch RMSNorm, the numerics of Hugging Face's ``InternLM2RMSNorm``.

Differentiable with autograd; :func:`kernels.rms_norm.rms_norm` is tested against it
and falls back to it for inputs its kernels do not take.
"""

from typing import Optional, Tuple, Union

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                       residual: Optional[torch.Tensor] = None
                       ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """``weight * (x * rsqrt(mean(x**2) + eps)).to(x.dtype)``, the statistic in fp32.

    ``x``: ``[..., hidden]``; ``weight``: ``[hidden]``.  The result has dtype
    ``promote_types(x.dtype, weight.dtype)``, as in ``InternLM2RMSNorm``.  With
    ``residual`` (``x``'s shape, any float dtype) the input is ``s = x + residual``, in
    PyTorch's promoted dtype, and ``(normed(s), s)`` is returned: the decoder layer's
    residual add followed by its norm.
    """
    if residual is not None:
        x = x + residual
    input_dtype = x.dtype
    # float64 stays float64 so that float64 references are exact.
    stat_dtype = torch.float64 if input_dtype == torch.float64 else torch.float32
    h = x.to(stat_dtype)
    variance = h.pow(2).mean(-1, keepdim=True)
    normed = weight * (h * torch.rsqrt(variance + eps)).to(input_dtype)
    return normed if residual is None else (normed, x)
