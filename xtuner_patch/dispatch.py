"""The ``dispatch_modules`` that :func:`xtuner_patch.patch` puts in place of XTuner's, and
the one log line that names what it replaces.

XTuner's own dispatch runs first; an InternLM2 model's modules then get the forwards of
:mod:`xtuner_patch.internlm2.forwards`, as the switches say.  Other models keep
XTuner's dispatch.
"""

import contextlib
import contextvars
import logging
from typing import Optional

import torch

from kernels.varlen_attention import SUPPORTED_HEAD_DIMS

from . import checkpointing
from .internlm2 import forwards, sequence_parallel
from .internlm2.varlen import ROTARY_CLASSES
from .switches import CheckpointSetting, KernelSwitches

logger = logging.getLogger("xtuner_patch")

ATTENTION_CLASSES = ("InternLM2Attention", "InternLM2FlashAttention2", "InternLM2SdpaAttention")

# What each active switch replaces; the log line is made of these, and names the kernels
# that then run (tests/test_patch.py checks one against the other).
REPLACEMENTS = {
    "attention": "InternLM2 attention forward -> kernels.varlen_attn_func (native GQA, varlen "
                 "from MessageHub; XTuner's check_cfg no longer needs flash-attn)",
    "rope": "rotate_half RoPE and the wqkv split -> kernels.split_qkv_rotary",
    "rms_norm": "InternLM2RMSNorm.forward -> kernels.rms_norm",
    "fused_residual": "decoder residual add + ffn_norm -> kernels.rms_norm(residual=)",
    "swiglu": "InternLM2MLP silu(w1 x) * w3 x -> kernels.swiglu",
    "cross_entropy": "InternLM2ForCausalLM training loss (labels given, train mode; with a "
                     "PEFT LoRA adapter on the head too) -> kernels.fused_linear_cross_entropy "
                     "(no logits returned)",
}

# Whether the model being built computes its loss from the logits of training forwards
# (set around XTuner's ``SupervisedFinetune.build_llm_from_cfg`` by the patch).
_LOSS_FROM_LOGITS = contextvars.ContextVar("xtuner_patch_loss_from_logits", default=False)


@contextlib.contextmanager
def building_llm(loss_from_logits: bool):
    """The LLM dispatched inside this block belongs to a model that does (or does not)
    compute its loss from the logits (DPO, ORPO: ``compute_loss`` overridden)."""
    token = _LOSS_FROM_LOGITS.set(loss_from_logits)
    try:
        yield
    finally:
        _LOSS_FROM_LOGITS.reset(token)


def describe(switches: KernelSwitches) -> str:
    """One line naming what replaces which XTuner function."""
    parts = [REPLACEMENTS[name] for name in switches.active()]
    active = "; ".join(parts) if parts else "no kernel switched on"
    return f"xtuner.model.modules.dispatch.dispatch_modules patched: {active}"


def is_internlm2(model) -> bool:
    return any(type(m).__name__ in ATTENTION_CLASSES for m in model.modules())


def make_dispatch_modules(stock_dispatch, switches: KernelSwitches,
                          checkpoint: Optional[CheckpointSetting] = None):
    """Wrap XTuner's ``dispatch_modules``: stock dispatch, then our InternLM2 forwards
    (and the activation-checkpointing policy ``checkpoint``, when one is set)."""

    def dispatch_modules(model, use_varlen_attn=False):
        stock_dispatch(model, use_varlen_attn=use_varlen_attn)
        if not is_internlm2(model):
            _check_stock_path_possible(model, use_varlen_attn)
            logger.info("xtuner-patch: %s is not InternLM2; XTuner's dispatch is left as is",
                        type(model).__name__)
            return
        dispatch_internlm2(model, switches, use_varlen_attn=use_varlen_attn,
                           loss_from_logits=_LOSS_FROM_LOGITS.get(), checkpoint=checkpoint)

    dispatch_modules.__wrapped__ = stock_dispatch
    dispatch_modules.xtuner_patch_switches = switches
    return dispatch_modules


def unsupported_reason(attention) -> str:
    """Why our attention cannot run this module ('' when it can)."""
    if attention.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {attention.head_dim} (supported: {sorted(SUPPORTED_HEAD_DIMS)})"
    if type(attention.rotary_emb).__name__ not in ROTARY_CLASSES:
        return f"rotary embedding {type(attention.rotary_emb).__name__}"
    return ""


def dispatch_internlm2(model, switches: KernelSwitches, use_varlen_attn: bool,
                       loss_from_logits: bool = False,
                       checkpoint: Optional[CheckpointSetting] = None) -> None:
    """Give the InternLM2 modules of ``model`` our forwards, as ``switches`` say.

    ``loss_from_logits``: the caller computes its loss from the logits of training
    forwards, so the causal LM keeps the class's forward (no fused loss).
    ``checkpoint``: the activation-checkpointing policy of its decoder layers
    (:mod:`xtuner_patch.checkpointing`); None leaves XTuner's checkpointing alone.
    """
    counts = {}
    for module in model.modules():
        name = type(module).__name__
        if name == "InternLM2Model" and checkpoint is not None:
            checkpointing.install(module, checkpoint)
        elif name in ATTENTION_CLASSES and switches.attention:
            reason = unsupported_reason(module)
            if reason:
                check_stock_attention_possible(name)
                logger.warning("xtuner-patch: %s keeps XTuner's forward: %s", name, reason)
                continue
            forwards.install(module, forwards.attention_forward, forwards.AttentionOptions(
                varlen=use_varlen_attn, fused_rope=switches.rope))
        elif name == "InternLM2RMSNorm" and switches.rms_norm:
            forwards.install(module, forwards.rms_norm_forward)
        elif name == "InternLM2DecoderLayer" and switches.fused_residual:
            forwards.install(module, forwards.decoder_layer_forward)
        elif name == "InternLM2MLP" and switches.swiglu:
            if type(module.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
                logger.warning("xtuner-patch: InternLM2MLP keeps XTuner's forward: activation "
                               "%s is not SiLU", type(module.act_fn).__name__)
                continue
            forwards.install(module, forwards.mlp_forward)
        elif name == "InternLM2ForCausalLM" and switches.cross_entropy:
            head = module.output
            if loss_from_logits:
                logger.info("xtuner-patch: InternLM2ForCausalLM keeps its loss: the model "
                            "computes its loss from the logits")
                continue
            if type(head) is not torch.nn.Linear or head.bias is not None:
                logger.warning("xtuner-patch: InternLM2ForCausalLM keeps its loss: the head "
                               "(%s) is not a bias-free nn.Linear", type(head).__name__)
                continue
            forwards.install(head, forwards.lm_head_forward)
            forwards.install(module, forwards.causal_lm_forward,
                             forwards.CausalLMOptions(fused_loss=True))
        else:
            continue
        counts[name] = counts.get(name, 0) + 1
    logger.info("xtuner-patch: dispatched %s", ", ".join(f"{n} x{c}" for n, c in counts.items()))


def check_stock_attention_possible(what: str) -> None:
    """XTuner's attention splits a sequence-parallel row only through flash-attn.

    Without flash-attn, its forward would attend within each rank's shard: silently
    wrong, so refuse instead.
    """
    if sequence_parallel.world_size() <= 1:
        return
    from xtuner.model.modules.dispatch import SUPPORT_FLASH2

    if not SUPPORT_FLASH2:
        raise RuntimeError(
            f"sequence parallel: {what} is left to XTuner's attention, which needs flash-attn "
            "for sequence parallel, and flash-attn is not installed (or CUDA is unavailable)")


def _check_stock_path_possible(model, use_varlen_attn: bool) -> None:
    """XTuner's check_cfg requirements were lifted for InternLM2 only: keep them for others."""
    from xtuner.model.modules.dispatch import SUPPORT_FLASH2

    check_stock_attention_possible(type(model).__name__)
    if use_varlen_attn and not SUPPORT_FLASH2:
        raise RuntimeError(
            f"use_varlen_attn=True: xtuner-patch provides varlen attention for InternLM2 "
            f"models only, and XTuner's own varlen path for {type(model).__name__} needs "
            "flash-attn, which is not installed (or CUDA is unavailable)")
