from kernels.reference.norm import rms_norm_reference  # noqa: F401
from kernels.reference.rotary import rotary_reference, split_qkv_rotary_reference  # noqa: F401
from kernels.reference.attention import varlen_attn_reference  # noqa: F401
from kernels.reference.cross_entropy import (  # noqa: F401
    linear_cross_entropy_reference, shift_targets)
from kernels.reference.swiglu import swiglu_reference  # noqa: F401
from kernels.reference.sp_layout import (  # noqa: F401
    pack_heads_reference, pack_linear_input_grad_reference, pack_qkv_rotary_reference,
    unpack_heads_reference)
