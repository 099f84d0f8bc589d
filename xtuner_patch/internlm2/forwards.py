"""InternLM2 forwards on xtuner-patch's kernels, given to a model's modules by
:func:`install` (what the patched ``dispatch_modules`` calls per module).

- attention (every InternLM2 attention class: eager, sdpa, flash-attention-2):
  ``wqkv`` -> split + RoPE (one kernel) -> varlen causal GQA attention -> ``wo``.
  Packing boundaries come from XTuner's MessageHub when the model was dispatched with
  ``use_varlen_attn=True``; otherwise each row is one causal sequence, padding removed.
  A KV cache is filled from our rotated K/V; decoding steps and ``output_attentions``
  run the class's own forward.  Under XTuner's sequence parallel:
  :mod:`xtuner_patch.internlm2.sequence_parallel`.
- ``InternLM2RMSNorm``; the decoder layer's residual add fused with ``ffn_norm``; the
  MLP's ``silu(w1 x) * w3 x``.
- the causal LM: a forward **with labels in training mode** computes the LM head fused
  with the cross-entropy (Hugging Face's shift and mean, 0 instead of NaN when every
  label is ignored) and returns ``logits=None``; any other call runs the class's
  forward.  The head is called as a module (DeepSpeed ZeRO-3 gathers its weight); a
  plain PEFT LoRA adapter on it joins the fused loss (:mod:`.lora`); any other head
  replaced after dispatch gives the loss from the logits, with one warning.

Each patched module's options live in a registry of this module (weakly keyed by the
module), not on the Hugging Face modules.
"""

import types
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from kernels import backend, packing_bounds
from kernels.reference import shift_targets

from .. import checkpointing
from ..log import warn_once
from . import sequence_parallel
from .lora import lora_loss, plain_lora_parts
from .varlen import message_hub_varlen_args, rope_arguments, unpacked_bounds


@dataclass
class AttentionOptions:
    varlen: bool  # packing from XTuner's MessageHub
    fused_rope: bool  # RoPE by our kernel (else PyTorch ops)


@dataclass
class CausalLMOptions:
    fused_loss: bool  # the LM head's loss without logits in training with labels
    labels_shifted: bool = False  # position i is compared with labels[i]


# module -> its options; the patched LM heads map to None.
_OPTIONS = weakref.WeakKeyDictionary()


def options(module):
    """The options :func:`install` gave ``module`` (KeyError when it gave none)."""
    return _OPTIONS[module]


# ----------------------------------------------------------------------- forwards
def attention_forward(self, hidden_states, attention_mask=None, position_ids=None,
                      past_key_value=None, output_attentions=False, use_cache=False,
                      cache_position=None, **kwargs):
    if output_attentions or (past_key_value is not None
                             and past_key_value.get_seq_length(self.layer_idx) > 0):
        return type(self).forward(self, hidden_states, attention_mask, position_ids,
                                  past_key_value, output_attentions, use_cache,
                                  cache_position, **kwargs)
    opts = _OPTIONS[self]
    sp_group = sequence_parallel.group_for(self)
    if sp_group is not None:
        # XTuner's sequence parallel: this rank holds a slice of every row.
        out = sequence_parallel.attention_forward(
            self, hidden_states, sp_group, varlen=opts.varlen, fused_rope=opts.fused_rope,
            attention_mask=attention_mask, position_ids=position_ids)
        return out, None, past_key_value
    bsz, q_len, _ = hidden_states.shape
    device = hidden_states.device
    if position_ids is None:
        position_ids = torch.arange(q_len, device=device).unsqueeze(0)
    q, k, v = backend.split_qkv_rotary(self.wqkv(hidden_states), self.num_key_value_heads,
                                       self.head_dim, fused=opts.fused_rope,
                                       **rope_arguments(self.rotary_emb, position_ids))
    if past_key_value is not None:
        # HF caches rotated keys as [batch, kv_heads, seq, head_dim].
        past_key_value.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx,
                              {"cache_position": cache_position})
    total = bsz * q_len
    q, k, v = (x.reshape(total, x.shape[-2], self.head_dim) for x in (q, k, v))

    cumulative_len, max_seqlen = message_hub_varlen_args() if opts.varlen else (None, None)
    index = None
    if cumulative_len is not None:
        if bsz != 1:
            raise ValueError(f"varlen attention packs samples into one row: batch size must "
                             f"be 1, got {bsz}")
        cu_seqlens, longest = packing_bounds(cumulative_len, total, device)
        max_seqlen = int(max_seqlen) if max_seqlen is not None else longest
    else:
        cu_seqlens, max_seqlen, index = unpacked_bounds(attention_mask, bsz, q_len, device)
        if index is not None:
            q, k, v = q[index], k[index], v[index]

    out = backend.varlen_causal_attention(q, k, v, cu_seqlens, max_seqlen)
    if index is not None:
        out = out.new_zeros((total,) + out.shape[1:]).index_copy(0, index, out)
    out = self.wo(out.reshape(bsz, q_len, self.num_heads * self.head_dim))
    return out, None, past_key_value


def rms_norm_forward(self, hidden_states):
    out = backend.rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return _recomputable_norm(out, hidden_states, self.weight, self.variance_epsilon)


def _recomputable_norm(out, x, weight, eps):
    """``out = rms_norm(x)`` announced to selective checkpointing: recomputed from ``x``
    (kept by the norm's backward) and a copy of ``weight`` (small; under ZeRO-3 the
    parameter is released after the forward)."""
    if not checkpointing.selective_active():
        return out
    x, weight = x.detach(), weight.detach().clone()
    return checkpointing.recomputable(out, lambda: backend.rms_norm(x, weight, eps),
                                      holds=(x, weight))


def decoder_layer_forward(self, hidden_states, attention_mask=None, position_ids=None,
                          past_key_value=None, output_attentions=False, use_cache=False,
                          cache_position=None, **kwargs):
    """InternLM2DecoderLayer.forward with ``residual + attention`` and ``ffn_norm`` fused."""
    residual = hidden_states
    hidden_states = self.attention_norm(hidden_states)
    attn_out, attn_weights, present_key_value = self.attention(
        hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids,
        past_key_value=past_key_value, output_attentions=output_attentions,
        use_cache=use_cache, cache_position=cache_position, **kwargs)
    normed, hidden_states = backend.rms_norm(attn_out, self.ffn_norm.weight,
                                             self.ffn_norm.variance_epsilon, residual=residual)
    # recomputed (selective checkpointing) from the sum, which the fused norm keeps
    normed = _recomputable_norm(normed, hidden_states, self.ffn_norm.weight,
                                self.ffn_norm.variance_epsilon)
    hidden_states = hidden_states + self.feed_forward(normed)
    outputs = (hidden_states,)
    if output_attentions:
        outputs += (attn_weights,)
    if use_cache:
        outputs += (present_key_value,)
    return outputs


def mlp_forward(self, x):
    a, b = self.w1(x), self.w3(x)
    # w1(x) and w3(x) are needed by nothing but the gate, so its backward writes their
    # gradients over them (two [tokens, intermediate] buffers less at the backward's peak).
    # A hook that keeps those outputs for its own backward gets PyTorch's in-place error.
    gated = backend.swiglu(a, b, in_place_grad=True)
    if checkpointing.selective_active():
        # Recomputed from the w1 / w3 outputs (kept by SwiGLU's backward) when w2's
        # backward unpacks it, which runs before SwiGLU's own backward: a SwiGLU whose
        # backward overwrites a and b in place runs after the last recompute.
        a, b = a.detach(), b.detach()
        gated = checkpointing.recomputable(gated, lambda: backend.swiglu(a, b), holds=(a, b))
    return self.w2(gated)


def lm_head_forward(self, hidden_states, labels=None, shift_labels=True, low_rank=None):
    """The LM head ``nn.Linear``; given ``labels``, the mean cross-entropy instead of logits
    (of the logits plus ``a @ b.T`` with ``low_rank`` ``(a, b)``: a LoRA adapter's output).

    Computing the loss inside the head's own call lets module hooks (DeepSpeed ZeRO-3's
    parameter gathering) see it as the head's forward.
    """
    if labels is None:
        return F.linear(hidden_states, self.weight, self.bias)
    return backend.linear_cross_entropy(hidden_states, self.weight,
                                        labels.to(hidden_states.device),
                                        shift_labels=shift_labels, low_rank=low_rank)


def _is_patched_head(head) -> bool:
    return head in _OPTIONS and _OPTIONS[head] is None


def fused_head_loss(head):
    """``loss(hidden_states, labels, shift_labels)``: the LM head's training loss without
    logits; None (with one warning per reason) when the head allows no such loss."""
    if _is_patched_head(head):
        return lambda hidden, labels, shift: head(hidden, labels=labels, shift_labels=shift)
    parts = plain_lora_parts(head, _is_patched_head)
    if isinstance(parts, str):
        warn_once("xtuner-patch: the loss of InternLM2ForCausalLM is computed from its "
                  "logits: the LM head %s", parts)
        return None
    return lora_loss(head, parts)


def causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None,
                      past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                      output_attentions=None, output_hidden_states=None, return_dict=None,
                      cache_position=None, **kwargs):
    """InternLM2ForCausalLM.forward: in training with labels, the fused loss and no logits."""
    opts = _OPTIONS[self]
    fused_loss = (fused_head_loss(self.output) if labels is not None and self.training
                  and opts.fused_loss else None)
    if fused_loss is None and not (labels is not None and opts.labels_shifted):
        return type(self).forward(
            self, input_ids=input_ids, attention_mask=attention_mask,
            position_ids=position_ids, past_key_values=past_key_values,
            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=return_dict, cache_position=cache_position, **kwargs)

    outputs = self.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
        output_attentions=output_attentions, output_hidden_states=output_hidden_states,
        return_dict=True, cache_position=cache_position, **kwargs)
    hidden_states = outputs[0]
    logits = None
    shifted = opts.labels_shifted
    loss = fused_loss(hidden_states, labels, not shifted) if fused_loss is not None else None
    if loss is None:
        logits = self.output(hidden_states).float()
        # Hugging Face's shift as targets (the last position predicts nothing), unless the
        # labels are aligned with the positions that predict them already.
        targets = labels if shifted else shift_targets(labels)
        loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten().to(logits.device))

    from transformers.modeling_outputs import CausalLMOutputWithPast

    if return_dict if return_dict is not None else self.config.use_return_dict:
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions)
    # Hugging Face's tuple: loss, logits, then the decoder's outputs that are set.
    return (loss, logits) + tuple(v for v in (outputs.past_key_values, outputs.hidden_states,
                                              outputs.attentions) if v is not None)


# ------------------------------------------------------------------------- install
def install(module, forward, module_options=None) -> None:
    """Give ``module`` one of the forwards above, with its options."""
    _OPTIONS[module] = module_options
    module.forward = types.MethodType(forward, module)


def set_labels_shifted(model, shifted: bool = True) -> None:
    """Make the InternLM2 causal LM in ``model`` compare position ``i`` with ``labels[i]``.

    For data whose labels are already shifted per sample
    (``build_packed_dataset(label_alignment='internevo')``, ``dataset.labels_shifted``):
    the loss must not shift them again.  Works with or without the fused loss (without
    it the loss is taken from the logits); ``shifted=False`` restores Hugging Face's shift.
    """
    found = False
    for module in model.modules():
        if type(module).__name__ != "InternLM2ForCausalLM":
            continue
        found = True
        opts: Optional[CausalLMOptions] = _OPTIONS.get(module)
        if opts is None:
            install(module, causal_lm_forward, CausalLMOptions(fused_loss=False))
            opts = _OPTIONS[module]
        opts.labels_shifted = bool(shifted)
    if not found:
        raise ValueError(f"{type(model).__name__} holds no InternLM2ForCausalLM")
