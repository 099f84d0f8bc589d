"""Framework-free Triton kernels for training InternLM2-style models.

This package imports only ``torch`` and ``triton``.  Each kernel family lives in
its own module (Triton kernels, launcher, ``torch.autograd.Function`` and the
public function); the pure-PyTorch references they are tested against, and that
fallback paths run, live in :mod:`kernels.reference`.

The package is installed by the ``xtuner-patch`` distribution.  Hugging Face's
``kernels`` distribution also installs a top-level ``kernels`` package;
``IS_XTUNER_PATCH_KERNELS`` lets :mod:`xtuner_patch` tell the two apart.
"""

IS_XTUNER_PATCH_KERNELS = True

__version__ = "0.1.0.dev0"

from kernels._runtime import TensorMemo  # noqa: E402,F401
from kernels.rms_norm import rms_norm  # noqa: E402,F401
from kernels.rotary import apply_rotary, rotary_inv_freq, split_qkv_rotary  # noqa: E402,F401
from kernels.sp_layout import HeadSplit, pack_heads, split_heads, unpack_heads  # noqa: E402,F401
from kernels.varlen_attention import attn_func, packing_bounds, varlen_attn_func  # noqa: E402,F401
from kernels.cross_entropy import fused_linear_cross_entropy  # noqa: E402,F401
from kernels.swiglu import swiglu  # noqa: E402,F401
# The Triton-or-reference choice, and sequence-parallel attention over a process group.
from kernels import backend, sequence_parallel  # noqa: E402,F401

__all__ = ["apply_rotary", "attn_func", "rms_norm", "rotary_inv_freq", "split_qkv_rotary",
           "varlen_attn_func", "packing_bounds", "fused_linear_cross_entropy", "swiglu",
           "HeadSplit", "pack_heads", "split_heads", "unpack_heads", "TensorMemo", "backend",
           "sequence_parallel"]
