"""InternLM2 forwards on xtuner-patch's kernels, and their dispatch onto a model.

The attention forward replaces every InternLM2 attention class's (eager, sdpa,
flash-attention-2) training path::

    wqkv -> split + RoPE (one kernel) -> varlen causal GQA attention (K/V never
    repeated) -> wo

Packing boundaries come from XTuner's MessageHub (``varlen_attn_args``, filled by
``VarlenAttnArgsToMessageHubHook``) when the model was dispatched with
``use_varlen_attn=True``; otherwise each batch row is one causal sequence, with padding
(from a 2-D padding mask or HF's 4-D causal mask) removed before attention.
With a KV cache (generation, or ``use_cache=True`` in a training forward) the first
pass fills the cache from our rotated K/V; later decoding steps and
``output_attentions=True`` run the class's own forward: they are not training hot
loops.

The MLP gates with one fused ``silu(w1 x) * w3 x`` kernel.

The causal LM's loss: a forward **with labels in training mode** (``model.train()``, as
XTuner's ``SupervisedFinetune.compute_loss`` calls it) runs the decoder, then the LM head
fused with the cross-entropy (:func:`kernels.fused_linear_cross_entropy`, Hugging Face's
shift and mean over non-ignored targets; 0 instead of NaN when none is left) and returns
``CausalLMOutputWithPast(loss=..., logits=None)``: the logits are never materialised.
Every other call (no labels, eval mode: ``generate``, evaluation, ``predict``) runs the
class's own forward and returns logits.  XTuner models that compute their loss from the
logits of a training forward (DPO, ORPO: any ``SupervisedFinetune`` subclass overriding
``compute_loss``) keep the class's forward.  The head goes through its module call (so
DeepSpeed ZeRO-3 gathers its weight).  A PEFT LoRA adapter on ``output`` (XTuner's LoRA
configs put one there) joins the fused loss as a low-rank addend to the logits; a head
otherwise replaced after dispatch gets its loss from the logits, with one warning.  Under
XTuner's sequence parallel each rank's loss is the mean over its own tokens, as with
Hugging Face's forward, which XTuner's ``reduce_sequence_parallel_loss`` token-weights.

Data whose labels are already shifted (``build_packed_dataset(label_alignment=
'internevo')``) need a loss that does not shift again: :func:`set_labels_shifted` (or
``xtuner_patch.model.SupervisedFinetune(labels_shifted=True)``) makes the model compare
position ``i`` with ``labels[i]``, with or without the fused loss.
"""

import logging
import types
from typing import Tuple

import torch
import torch.nn.functional as F

from kernels._runtime import TensorMemo
from kernels.reference.cross_entropy import shift_targets

from . import ops, sequence_parallel
from .patch import KernelSwitches

logger = logging.getLogger("xtuner_patch")

ATTENTION_CLASSES = ("InternLM2Attention", "InternLM2FlashAttention2", "InternLM2SdpaAttention")
ROTARY_CLASSES = ("InternLM2RotaryEmbedding", "InternLM2LinearScalingRotaryEmbedding",
                  "InternLM2DynamicNTKScalingRotaryEmbedding")


# --------------------------------------------------------------------------- rotary
def rope_arguments(rotary_emb, position_ids: torch.Tensor) -> dict:
    """Keyword arguments of :func:`kernels.split_qkv_rotary` for an HF InternLM2 rotary module.

    Reproduces the module's numerics: linear scaling divides positions by the factor;
    dynamic NTK recomputes (and keeps, as HF does) ``inv_freq`` once positions run past
    ``max_position_embeddings``.
    """
    kind = type(rotary_emb).__name__
    if kind not in ROTARY_CLASSES:
        raise NotImplementedError(f"unsupported rotary embedding {kind}")
    divisor = 1.0
    if kind == "InternLM2LinearScalingRotaryEmbedding":
        divisor = float(rotary_emb.scaling_factor)
    elif kind == "InternLM2DynamicNTKScalingRotaryEmbedding":
        from kernels import rotary_inv_freq

        seq_len = int(position_ids.max()) + 1
        if seq_len > rotary_emb.max_position_embeddings:
            inv_freq, _ = rotary_inv_freq(
                rotary_emb.dim, rotary_emb.base, scaling_type="dynamic",
                scaling_factor=rotary_emb.scaling_factor,
                max_position_embeddings=rotary_emb.max_position_embeddings, seq_len=seq_len,
                device=position_ids.device)
            rotary_emb.register_buffer("inv_freq", inv_freq, persistent=False)
    # Casting the whole model (``model.to(bf16)``, DeepSpeed's ``module.bfloat16()``) also
    # casts this buffer; HF's forward takes it ``.float()``, and so do we.
    return dict(position_ids=position_ids, inv_freq=rotary_emb.inv_freq.float(),
                position_divisor=divisor)


# ------------------------------------------------------------------ varlen arguments
def _message_hub_varlen_args():
    """``(cumulative_len, max_seqlen)`` XTuner's hook stored for this rank, or ``(None, None)``."""
    from mmengine import MessageHub

    rank = torch.distributed.get_rank() if (torch.distributed.is_available()
                                            and torch.distributed.is_initialized()) else 0
    hub = MessageHub.get_instance("varlen_attn_args")
    return (hub.get_info(f"cumulative_len_rank_{rank}"),
            hub.get_info(f"max_seqlen_rank_{rank}"))


_PACKED_BOUNDS = TensorMemo()


def packed_bounds(cumulative_len: torch.Tensor, total: int, device,
                  overflow_hint: str = "") -> Tuple[torch.Tensor, int]:
    """``(cu_seqlens, longest)``: XTuner's ``cumulative_len`` as int32 on ``device``, closed
    at ``total`` tokens, and its longest sequence.

    Computed once per step (every layer passes the same ``cumulative_len``): reading its
    end is a device sync.
    """
    def build():
        cu = cumulative_len.to(device=device, dtype=torch.int32).reshape(-1)
        end = int(cu[-1])
        if end > total:
            raise ValueError(f"cumulative_len ends at {end}, past the {total} tokens of the "
                             f"batch{overflow_hint}")
        if end < total:
            # Padding appended after the packed samples (e.g. to a multiple of the
            # sequence-parallel size) attends only to itself; its labels are ignored.
            cu = torch.cat([cu, cu.new_tensor([total])])
        return cu, int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0

    return _PACKED_BOUNDS.get((cumulative_len,), (total, device), build)


def _key_padding(attention_mask, bsz: int, q_len: int):
    """``[bsz, q_len]`` bool of real tokens, or None when nothing is padded."""
    if attention_mask is None:
        return None
    # Without a cache the keys are the first q_len columns (HF's eager mask has one more).
    if attention_mask.dim() == 4:
        # HF's 4-D additive mask: the last query row sees every real key.
        keep = attention_mask[:, 0, -1, :q_len] == 0
    else:
        keep = attention_mask[:, :q_len].bool()
    if keep.shape != (bsz, q_len):
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not "
                         f"match a batch of {bsz} x {q_len} tokens")
    return None if bool(keep.all()) else keep


_UNPACKED_BOUNDS = TensorMemo()


def unpacked_bounds(attention_mask, bsz: int, q_len: int, device):
    """``(cu_seqlens, max_seqlen, index)`` of a plain ``[bsz, q_len]`` batch: one sequence
    per row, or the real tokens of each row when ``attention_mask`` pads some (``index``
    picks them from the flattened batch; None when every token is real).

    Computed once per forward (every layer gets the same mask): reading it is a device sync.
    """
    def build():
        keep = _key_padding(attention_mask, bsz, q_len)
        if keep is None:
            cu = torch.arange(0, bsz * q_len + 1, q_len, dtype=torch.int32, device=device)
            return cu, q_len, None
        lengths = keep.sum(1, dtype=torch.int32)
        cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        return cu, int(lengths.max()), keep.reshape(-1).nonzero().squeeze(1)

    tensors = () if attention_mask is None else (attention_mask,)
    return _UNPACKED_BOUNDS.get(tensors, (bsz, q_len, device), build)


# ------------------------------------------------------------------------ forwards
def attention_forward(self, hidden_states, attention_mask=None, position_ids=None,
                      past_key_value=None, output_attentions=False, use_cache=False,
                      cache_position=None, **kwargs):
    if output_attentions or (past_key_value is not None
                             and past_key_value.get_seq_length(self.layer_idx) > 0):
        return type(self).forward(self, hidden_states, attention_mask, position_ids,
                                  past_key_value, output_attentions, use_cache,
                                  cache_position, **kwargs)
    sp_group = sequence_parallel.group_for(self)
    if sp_group is not None:
        # XTuner's sequence parallel: this rank holds a slice of every row.
        out = sequence_parallel.attention_forward(self, hidden_states, sp_group,
                                                  attention_mask, position_ids)
        return out, None, past_key_value
    bsz, q_len, _ = hidden_states.shape
    device = hidden_states.device
    if position_ids is None:
        position_ids = torch.arange(q_len, device=device).unsqueeze(0)
    q, k, v = ops.split_qkv_rotary(self.wqkv(hidden_states), self.num_key_value_heads,
                                   self.head_dim, fused=self.xtuner_patch_fused_rope,
                                   **rope_arguments(self.rotary_emb, position_ids))
    if past_key_value is not None:
        # HF caches rotated keys as [batch, kv_heads, seq, head_dim].
        past_key_value.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx,
                              {"cache_position": cache_position})
    total = bsz * q_len
    q, k, v = (x.reshape(total, x.shape[-2], self.head_dim) for x in (q, k, v))

    cumulative_len, max_seqlen = (_message_hub_varlen_args() if self.xtuner_patch_varlen
                                  else (None, None))
    index = None
    if cumulative_len is not None:
        if bsz != 1:
            raise ValueError(f"varlen attention packs samples into one row: batch size must "
                             f"be 1, got {bsz}")
        cu_seqlens, longest = packed_bounds(cumulative_len, total, device)
        max_seqlen = int(max_seqlen) if max_seqlen is not None else longest
    else:
        cu_seqlens, max_seqlen, index = unpacked_bounds(attention_mask, bsz, q_len, device)
        if index is not None:
            q, k, v = q[index], k[index], v[index]

    out = ops.varlen_causal_attention(q, k, v, cu_seqlens, max_seqlen)
    if index is not None:
        out = out.new_zeros((total,) + out.shape[1:]).index_copy(0, index, out)
    out = self.wo(out.reshape(bsz, q_len, self.num_heads * self.head_dim))
    return out, None, past_key_value


def rms_norm_forward(self, hidden_states):
    return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)


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
    normed, hidden_states = ops.rms_norm(attn_out, self.ffn_norm.weight,
                                         self.ffn_norm.variance_epsilon, residual=residual)
    hidden_states = hidden_states + self.feed_forward(normed)
    outputs = (hidden_states,)
    if output_attentions:
        outputs += (attn_weights,)
    if use_cache:
        outputs += (present_key_value,)
    return outputs


def mlp_forward(self, x):
    return self.w2(ops.swiglu(self.w1(x), self.w3(x)))


def lm_head_forward(self, hidden_states, labels=None, shift_labels=True, low_rank=None):
    """The LM head ``nn.Linear``; given ``labels``, the mean cross-entropy instead of logits
    (of the logits plus ``a @ b.T`` with ``low_rank`` ``(a, b)``: a LoRA adapter's output).

    Computing the loss inside the head's own call lets module hooks (DeepSpeed ZeRO-3's
    parameter gathering) see it as the head's forward.
    """
    if labels is None:
        return F.linear(hidden_states, self.weight, self.bias)
    return ops.linear_cross_entropy(hidden_states, self.weight,
                                    labels.to(hidden_states.device), shift_labels=shift_labels,
                                    low_rank=low_rank)


def _head_is_ours(head) -> bool:
    return getattr(head.forward, "__func__", None) is lm_head_forward


def _fused_head_loss(head):
    """``loss(hidden_states, labels, shift_labels)``: the LM head's training loss without
    logits; None (with one warning per reason) when the head allows no such loss.

    Besides our patched head: a PEFT LoRA ``Linear`` around it (XTuner's LoRA configs
    wrap every linear layer, InternLM2's ``output`` included) in its plain form: one
    active adapter, no DoRA or other variant, no adapter bias, no hooks (ZeRO-3 keeps
    it as a module).  Its ``lora_B(lora_A(dropout(x))) * scaling`` joins the fused loss
    as the low-rank addend ``(scaling * lora_A(dropout(x)), lora_B.weight)``: the
    adapter's modules run as PEFT runs them (same dropout draws), only the
    ``[tokens, vocab]`` product is left out.
    """
    if _head_is_ours(head):
        return lambda hidden, labels, shift: head(hidden, labels=labels, shift_labels=shift)
    parts = _plain_lora(head)
    if isinstance(parts, str):
        ops.warn_once("xtuner-patch: the loss of InternLM2ForCausalLM is computed from its "
                      "logits: the LM head %s", parts)
        return None
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


def _plain_lora(head):
    """``(lora_A, lora_B, dropout, scaling)`` of a PEFT LoRA ``Linear`` around our head whose
    output is ``base(x) + lora_B(lora_A(dropout(x))) * scaling``, else why it is not."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        LoraLinear = None
    if LoraLinear is None or type(head) is not LoraLinear:
        return f"is a {type(head).__name__}, not the patched nn.Linear (or a PEFT LoRA layer " \
               "around it)"
    if not _head_is_ours(head.base_layer):
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
    if ops.has_hooks(head, lora_a, lora_b, dropout) or hasattr(lora_b.weight, "ds_id"):
        return "is a LoRA layer with hooks (e.g. DeepSpeed ZeRO-3 gathering its weights)"
    return lora_a, lora_b, dropout, head.scaling[name]


def causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None,
                      past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                      output_attentions=None, output_hidden_states=None, return_dict=None,
                      cache_position=None, **kwargs):
    """InternLM2ForCausalLM.forward: in training with labels, the fused loss and no logits."""
    shifted = getattr(self, "xtuner_patch_labels_shifted", False)
    fused_loss = (_fused_head_loss(self.output) if labels is not None and self.training
                  and self.xtuner_patch_fused_loss else None)
    if fused_loss is None and not (labels is not None and shifted):
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
        module.xtuner_patch_labels_shifted = bool(shifted)
        if getattr(module.forward, "__func__", None) is not causal_lm_forward:
            module.xtuner_patch_fused_loss = False
            module.forward = types.MethodType(causal_lm_forward, module)
    if not found:
        raise ValueError(f"{type(model).__name__} holds no InternLM2ForCausalLM")


# ------------------------------------------------------------------------ dispatch
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


def unsupported_reason(attention) -> str:
    """Why our attention cannot run this module ('' when it can)."""
    from kernels.varlen_attention import SUPPORTED_HEAD_DIMS

    if attention.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {attention.head_dim} (supported: {sorted(SUPPORTED_HEAD_DIMS)})"
    if type(attention.rotary_emb).__name__ not in ROTARY_CLASSES:
        return f"rotary embedding {type(attention.rotary_emb).__name__}"
    return ""


def dispatch_internlm2(model, switches: KernelSwitches, use_varlen_attn: bool,
                       loss_from_logits: bool = False) -> None:
    """Give the InternLM2 modules of ``model`` our forwards, as ``switches`` say.

    ``loss_from_logits``: the caller computes its loss from the logits of training
    forwards, so the causal LM keeps the class's forward (no fused loss).
    """
    counts = {}
    for module in model.modules():
        name = type(module).__name__
        if name in ATTENTION_CLASSES and switches.attention:
            reason = unsupported_reason(module)
            if reason:
                check_stock_attention_possible(name)
                logger.warning("xtuner-patch: %s keeps XTuner's forward: %s", name, reason)
                continue
            module.xtuner_patch_varlen = use_varlen_attn
            module.xtuner_patch_fused_rope = switches.rope
            module.forward = types.MethodType(attention_forward, module)
        elif name == "InternLM2RMSNorm" and switches.rms_norm:
            module.forward = types.MethodType(rms_norm_forward, module)
        elif name == "InternLM2DecoderLayer" and switches.fused_residual:
            module.forward = types.MethodType(decoder_layer_forward, module)
        elif name == "InternLM2MLP" and switches.swiglu:
            if type(module.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
                logger.warning("xtuner-patch: InternLM2MLP keeps XTuner's forward: activation "
                               "%s is not SiLU", type(module.act_fn).__name__)
                continue
            module.forward = types.MethodType(mlp_forward, module)
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
            head.forward = types.MethodType(lm_head_forward, head)
            module.xtuner_patch_fused_loss = True
            module.forward = types.MethodType(causal_lm_forward, module)
        else:
            continue
        counts[name] = counts.get(name, 0) + 1
    logger.info("xtuner-patch: dispatched %s", ", ".join(f"{n} x{c}" for n, c in counts.items()))
