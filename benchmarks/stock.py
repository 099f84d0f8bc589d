"""XTuner's stock InternLM2 path on a host without flash-attn, for side-by-side runs.

XTuner dispatches its varlen attention only when flash-attn imports; the GPU test host
has none.  :func:`use_fa2_in_xtuner` puts an FA2 varlen kernel in its place (flash-attn
when installed, else PyTorch's built-in copy of the FA2 kernels), the only
substitution besides mapping that forward to the attention class the model has, so that
XTuner's own ``internlm2_varlen_attn_forward`` (K/V repeated, RoPE and RMSNorm as PyTorch
ops) runs.  Without CUDA the float64-tested PyTorch
reference of varlen attention stands in (runs that exercise the code, not timings).
"""


def stock_varlen_attention():
    """``(flash_attn_varlen_func-like function, '')``, or ``(None, why there is none)``."""
    import torch

    if not torch.cuda.is_available():
        from kernels.reference import varlen_attn_reference

        def reference(q, k, v, cu_q, cu_k, max_q, max_k, causal, softmax_scale=None):
            out = varlen_attn_reference(q, k, v, cu_q, cu_k, softmax_scale, causal)[0]
            return out.to(q.dtype)
        return reference, ""
    from tests.baselines import fa2_unavailable_reason, fa2_varlen

    reason = fa2_unavailable_reason()
    return (None, reason) if reason else (fa2_varlen, "")


def use_fa2_in_xtuner() -> str:
    """Make XTuner's varlen attention call an FA2 kernel; '' or why it cannot."""
    fa2_varlen, reason = stock_varlen_attention()
    if reason:
        return reason
    import xtuner.model.modules.dispatch as dispatch
    import xtuner.model.modules.dispatch.attention as attention
    import xtuner.model.modules.dispatch.internlm2 as internlm2

    # Where flash-attn is installed, XTuner loads InternLM2 with the flash-attention-2
    # class, the only one its varlen forward is mapped to; from_pretrained gives the eager
    # class here (it would refuse flash_attention_2 without flash-attn), so that class
    # gets the same forward.
    mapping = dispatch.VARLEN_ATTN_DISPATCH_MAPPING
    for name in ("InternLM2Attention", "InternLM2SdpaAttention"):
        mapping.setdefault(name, mapping["InternLM2FlashAttention2"])
    if not attention.SUPPORT_FLASH2:
        def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None,
                                   dropout_p=0.0, causal=True, **_unused):
            return fa2_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, softmax_scale)

        attention.flash_attn_varlen_func = flash_attn_varlen_func
        for module in (attention, internlm2, dispatch):
            module.SUPPORT_FLASH2 = True
    return ""
