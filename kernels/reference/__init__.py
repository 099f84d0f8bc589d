from kernels.reference.norm import rms_norm_reference  # noqa: F401
from kernels.reference.rotary import rotary_reference, split_qkv_rotary_reference  # noqa: F401
from kernels.reference.attention import varlen_attn_reference  # noqa: F401
