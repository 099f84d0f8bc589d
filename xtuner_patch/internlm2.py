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
"""

import logging
import types

import torch

from . import ops
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
    return dict(position_ids=position_ids, inv_freq=rotary_emb.inv_freq,
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


def _packed_cu_seqlens(cumulative_len: torch.Tensor, total: int, device) -> torch.Tensor:
    cu = cumulative_len.to(device=device, dtype=torch.int32).reshape(-1)
    end = int(cu[-1])
    if end > total:
        raise ValueError(f"cumulative_len ends at {end}, past the {total} tokens of the batch")
    if end < total:
        # Padding appended after the packed samples (e.g. to a multiple of the
        # sequence-parallel size) attends only to itself; its labels are ignored.
        cu = torch.cat([cu, cu.new_tensor([total])])
    return cu


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


# ------------------------------------------------------------------------ forwards
def attention_forward(self, hidden_states, attention_mask=None, position_ids=None,
                      past_key_value=None, output_attentions=False, use_cache=False,
                      cache_position=None, **kwargs):
    if output_attentions or (past_key_value is not None
                             and past_key_value.get_seq_length(self.layer_idx) > 0):
        return type(self).forward(self, hidden_states, attention_mask, position_ids,
                                  past_key_value, output_attentions, use_cache,
                                  cache_position, **kwargs)
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
    keep = None
    if cumulative_len is not None:
        if bsz != 1:
            raise ValueError(f"varlen attention packs samples into one row: batch size must "
                             f"be 1, got {bsz}")
        cu_seqlens = _packed_cu_seqlens(cumulative_len, total, device)
        max_seqlen = int(max_seqlen) if max_seqlen is not None else None
    else:
        keep = _key_padding(attention_mask, bsz, q_len)
        if keep is None:
            cu_seqlens = torch.arange(0, total + 1, q_len, dtype=torch.int32, device=device)
            max_seqlen = q_len
        else:
            lengths = keep.sum(1, dtype=torch.int32)
            cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
            max_seqlen = int(lengths.max())
            index = keep.reshape(-1).nonzero().squeeze(1)
            q, k, v = q[index], k[index], v[index]
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())

    out = ops.varlen_causal_attention(q, k, v, cu_seqlens, max_seqlen)
    if keep is not None:
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


# ------------------------------------------------------------------------ dispatch
def unsupported_reason(attention) -> str:
    """Why our attention cannot run this module ('' when it can)."""
    from kernels.varlen_attention import SUPPORTED_HEAD_DIMS

    if attention.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {attention.head_dim} (supported: {sorted(SUPPORTED_HEAD_DIMS)})"
    if type(attention.rotary_emb).__name__ not in ROTARY_CLASSES:
        return f"rotary embedding {type(attention.rotary_emb).__name__}"
    return ""


def dispatch_internlm2(model, switches: KernelSwitches, use_varlen_attn: bool) -> None:
    """Give the InternLM2 modules of ``model`` our forwards, as ``switches`` say."""
    counts = {}
    for module in model.modules():
        name = type(module).__name__
        if name in ATTENTION_CLASSES and switches.attention:
            reason = unsupported_reason(module)
            if reason:
                logger.warning("xtuner-patch: %s keeps XTuner's forward: %s", name, reason)
                continue
            module.xtuner_patch_varlen = use_varlen_attn
            module.xtuner_patch_fused_rope = switches.rope
            module.forward = types.MethodType(attention_forward, module)
        elif name == "InternLM2RMSNorm" and switches.rms_norm:
            module.forward = types.MethodType(rms_norm_forward, module)
        elif name == "InternLM2DecoderLayer" and switches.fused_residual:
            module.forward = types.MethodType(decoder_layer_forward, module)
        else:
            continue
        counts[name] = counts.get(name, 0) + 1
    logger.info("xtuner-patch: dispatched %s", ", ".join(f"{n} x{c}" for n, c in counts.items()))
