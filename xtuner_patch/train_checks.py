"""XTuner's ``tools/train.py::check_cfg`` with its flash-attn requirements lifted.

XTuner refuses ``use_varlen_attn=True`` and ``sequence_parallel_size > 1`` unless
flash-attn is installed and the model's ``attn_implementation`` is unset or
``flash_attention_2``.  With xtuner-patch's attention active, InternLM2 runs varlen and
sequence-parallel attention on our kernels with any attention class
(:mod:`xtuner_patch.sequence_parallel`), so the wrapper runs XTuner's own check with
exactly that requirement lifted: every other check (batch size 1 with varlen,
``max_length`` divisible by the sequence-parallel size, DeepSpeed for sequence
parallel) still runs, unchanged.
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
