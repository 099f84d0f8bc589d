"""The ``dispatch_modules`` that :func:`xtuner_patch.patch` puts in place of XTuner's."""

import logging
import sys

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
    if switches.swiglu:
        parts.append("InternLM2MLP silu(w1 x) * w3 x -> kernels.swiglu")
    if switches.cross_entropy:
        parts.append("InternLM2ForCausalLM training loss (labels given, train mode; with a "
                     "PEFT LoRA adapter on the head too) -> kernels.fused_linear_cross_entropy "
                     "(no logits returned)")
    active = "; ".join(parts) if parts else "no kernel switched on"
    return f"xtuner.model.modules.dispatch.dispatch_modules patched: {active}"


def make_dispatch_modules(stock_dispatch, switches: KernelSwitches):
    """Wrap XTuner's ``dispatch_modules``: stock dispatch, then our InternLM2 forwards."""

    def dispatch_modules(model, use_varlen_attn=False):
        stock_dispatch(model, use_varlen_attn=use_varlen_attn)
        if not is_internlm2(model):
            _check_stock_path_possible(model, use_varlen_attn)
            logger.info("xtuner-patch: %s is not InternLM2; XTuner's dispatch is left as is",
                        type(model).__name__)
            return
        from .internlm2 import dispatch_internlm2

        dispatch_internlm2(model, switches, use_varlen_attn=use_varlen_attn,
                           loss_from_logits=_caller_computes_loss_from_logits())

    dispatch_modules.__wrapped__ = stock_dispatch
    dispatch_modules.xtuner_patch_switches = switches
    return dispatch_modules


def _caller_computes_loss_from_logits(max_depth: int = 8) -> bool:
    """Whether the XTuner model dispatching us computes its loss from the logits.

    XTuner's ``SupervisedFinetune.compute_loss`` reads only ``outputs.loss``; subclasses
    that override it (DPO, ORPO, a user's) read ``outputs.logits`` of training forwards
    with labels, which the fused loss does not produce.  The model being built is the
    ``self`` of the ``__init__`` that calls ``dispatch_modules``, a few frames up.
    """
    try:
        from xtuner.model.sft import SupervisedFinetune
    except ImportError:
        return False
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if isinstance(owner, SupervisedFinetune):
            return type(owner).compute_loss is not SupervisedFinetune.compute_loss
        frame = frame.f_back
    return False


def _check_stock_path_possible(model, use_varlen_attn: bool) -> None:
    """XTuner's check_cfg requirements were lifted for InternLM2 only: keep them for others."""
    from xtuner.model.modules.dispatch import SUPPORT_FLASH2

    from .internlm2 import check_stock_attention_possible

    check_stock_attention_possible(type(model).__name__)
    if not use_varlen_attn:
        return

    if not SUPPORT_FLASH2:
        raise RuntimeError(
            f"use_varlen_attn=True: xtuner-patch provides varlen attention for InternLM2 "
            f"models only, and XTuner's own varlen path for {type(model).__name__} needs "
            "flash-attn, which is not installed (or CUDA is unavailable)")
