"""A PEFT LoRA adapter on InternLM2's LM head, joined to the fused loss.

XTuner's LoRA configs wrap every linear layer, the head ``output`` included.  A plain
LoRA ``Linear`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``; the fused
loss takes the adapter as the low-rank addend ``(scaling * lora_A(dropout(x)),
lora_B.weight)`` of :func:`kernels.fused_linear_cross_entropy`, the adapter's modules
called as PEFT calls them (same dropout draws, same input cast), so that neither
``[tokens, vocab]`` product is materialised.
"""

import torch


def plain_lora_parts(head, is_patched_head):
    """``(lora_A, lora_B, dropout, scaling)`` of a PEFT LoRA ``Linear`` around a patched
    head (``is_patched_head(base)``) whose output is ``base(x) + lora_B(lora_A(dropout(x)))
    * scaling``; else a string saying why it is not."""
    from .hooks import has_hooks

    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        LoraLinear = None
    if LoraLinear is None or type(head) is not LoraLinear:
        return f"is a {type(head).__name__}, not the patched nn.Linear (or a PEFT LoRA layer " \
               "around it)"
    if not is_patched_head(head.base_layer):
        return f"is a LoRA layer around a {type(head.base_layer).__name__}, not the patched " \
               "nn.Linear"
    active = [name for name in head.active_adapters if name in head.lora_A]
    if head.merged or head.disable_adapters or len(active) != 1:
        return "is a LoRA layer with merged, disabled or several active adapters"
    name = active[0]
    lora_a, lora_b = head.lora_A[name], head.lora_B[name]
    if (name in getattr(head, "lora_variant", {}) or getattr(head, "use_dora", {}).get(name)
            or getattr(head, "lora_bias", {}).get(name) or head.fan_in_fan_out
            or type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear
            or lora_b.bias is not None):
        return "is a LoRA variant (DoRA, an adapter bias, fan_in_fan_out, ...)"
    dropout = head.lora_dropout[name]
    if has_hooks(head, lora_a, lora_b, dropout) or hasattr(lora_b.weight, "ds_id"):
        return "is a LoRA layer with hooks (e.g. DeepSpeed ZeRO-3 gathering its weights)"
    return lora_a, lora_b, dropout, head.scaling[name]


def lora_loss(head, parts):
    """``loss(hidden, labels, shift_labels)`` of the LoRA layer ``head`` with ``parts`` from
    :func:`plain_lora_parts`: its base (the patched head) computes the fused loss with the
    adapter as the low-rank addend."""
    lora_a, lora_b, dropout, scaling = parts
    # PEFT casts the adapter's input to the adapter's dtype (fp32 adapters on a
    # half-precision base); its own method where PEFT has one, so that its switch for
    # that cast is honoured.
    cast = getattr(head, "_cast_input_dtype", lambda x, dtype: x.to(dtype))

    def loss(hidden, labels, shift):
        adapter_input = cast(hidden, lora_a.weight.dtype)
        low_rank = (lora_a(dropout(adapter_input)) * scaling, lora_b.weight)
        return head.base_layer(hidden, labels=labels, shift_labels=shift, low_rank=low_rank)
    return loss
