"""The ``dispatch_modules`` that :func:`xtuner_patch.patch` puts in place of XTuner's."""

import logging

from .patch import KernelSwitches

logger = logging.getLogger("xtuner_patch")

INTERNLM2_ATTENTION_CLASSES = ("InternLM2Attention", "InternLM2FlashAttention2",
                               "InternLM2SdpaAttention")


def is_internlm2(model) -> bool:
    return any(type(m).__name__ in INTERNLM2_ATTENTION_CLASSES for m in model.modules())


def describe(switches: KernelSwitches) -> str:
    """One line naming what replaces which XTuner function."""
    parts = []
    if switches.attention:
        parts.append("InternLM2 attention forward -> kernels.varlen_attn_func (native GQA, "
                     "varlen from MessageHub; XTuner check_cfg no longer needs flash-attn)")
    if switches.rope:
        parts.append("rotate_half RoPE -> kernels.rotary")
    if switches.rms_norm:
        parts.append("InternLM2RMSNorm.forward -> kernels.rms_norm")
    if switches.fused_residual:
        parts.append("decoder residual add + ffn_norm -> kernels.rms_norm(residual=)")
    active = "; ".join(parts) if parts else "no kernel switched on"
    return f"xtuner.model.modules.dispatch.dispatch_modules patched: {active}"


def make_dispatch_modules(stock_dispatch, switches: KernelSwitches):
    """Wrap XTuner's ``dispatch_modules``: stock dispatch, then our InternLM2 forwards."""

    def dispatch_modules(model, use_varlen_attn=False):
        stock_dispatch(model, use_varlen_attn=use_varlen_attn)
        if not is_internlm2(model):
            _check_stock_varlen_possible(model, use_varlen_attn)
            logger.info("xtuner-patch: %s is not InternLM2; XTuner's dispatch is left as is",
                        type(model).__name__)
            return
        from .internlm2 import dispatch_internlm2

        dispatch_internlm2(model, switches, use_varlen_attn=use_varlen_attn)

    dispatch_modules.__wrapped__ = stock_dispatch
    dispatch_modules.xtuner_patch_switches = switches
    return dispatch_modules


def _check_stock_varlen_possible(model, use_varlen_attn: bool) -> None:
    """XTuner's check_cfg requirement was lifted for InternLM2 only: keep it for others."""
    if not use_varlen_attn:
        return
    from xtuner.model.modules.dispatch import SUPPORT_FLASH2

    if not SUPPORT_FLASH2:
        raise RuntimeError(
            f"use_varlen_attn=True: xtuner-patch provides varlen attention for InternLM2 "
            f"models only, and XTuner's own varlen path for {type(model).__name__} needs "
            "flash-attn, which is not installed (or CUDA is unavailable)")
