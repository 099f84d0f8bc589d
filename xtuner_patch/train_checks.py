"""Replacements for two XTuner functions around building a model for training.

:func:`make_check_cfg`: XTuner's ``tools/train.py::check_cfg`` refuses
``use_varlen_attn=True`` and ``sequence_parallel_size > 1`` unless flash-attn is
installed and the model's ``attn_implementation`` is unset or ``flash_attention_2``.
With our attention, InternLM2 runs both on our kernels with any attention class, so the
replacement runs XTuner's own check with exactly that requirement lifted; every other
check (batch size 1 with varlen, ``max_length`` divisible by the sequence-parallel size,
DeepSpeed for sequence parallel) stays XTuner's.  XTuner has no hook for it, and its
check reads ``SUPPORT_FLASH2`` as a global of ``tools/train.py``: the replacement sets
that global for the duration of the call (and hides ``attn_implementation`` from it),
then puts both back.

:func:`wrap_build_llm`: XTuner's ``SupervisedFinetune.build_llm_from_cfg``, run in the
context that tells our dispatch whether the model computes its loss from the logits.
"""

import functools


def make_check_cfg(original):
    @functools.wraps(original)
    def check_cfg(cfg, args):
        lift = (getattr(cfg, "use_varlen_attn", False)
                or getattr(cfg, "sequence_parallel_size", 1) > 1)
        if not lift:
            return original(cfg, args)
        train_globals = original.__globals__
        saved_flag = train_globals.get("SUPPORT_FLASH2")
        llm = cfg.model.get("llm") if hasattr(cfg, "model") else None
        saved_impl = llm.pop("attn_implementation", None) if hasattr(llm, "pop") else None
        train_globals["SUPPORT_FLASH2"] = True
        try:
            return original(cfg, args)
        finally:
            train_globals["SUPPORT_FLASH2"] = saved_flag
            if saved_impl is not None:
                llm["attn_implementation"] = saved_impl

    check_cfg.xtuner_patch_original = original
    return check_cfg


def wrap_build_llm(original):
    from xtuner.model.sft import SupervisedFinetune

    from .dispatch import building_llm

    @functools.wraps(original)
    def build_llm_from_cfg(self, *args, **kwargs):
        # XTuner's compute_loss reads only the loss; subclasses overriding it (DPO, ORPO,
        # a user's) read the logits of training forwards, which the fused loss drops.
        loss_from_logits = type(self).compute_loss is not SupervisedFinetune.compute_loss
        with building_llm(loss_from_logits):
            return original(self, *args, **kwargs)

    return build_llm_from_cfg
