"""Where an InternLM2 attention layer finds its sequences and positions under XTuner.

- :func:`message_hub_varlen_args`: the packing of the current training iteration, which
  XTuner's ``VarlenAttnArgsToMessageHubHook`` puts in mmengine's MessageHub;
- :func:`unpacked_bounds`: the sequences of a plain ``[batch, seq]`` batch, from its
  padding mask (2-D, or Hugging Face's 4-D additive one);
- :func:`rope_arguments`: the RoPE kernel's arguments for an HF rotary module.
"""

import torch
import torch.nn.functional as F

from kernels import TensorMemo, rotary_inv_freq

ROTARY_CLASSES = ("InternLM2RotaryEmbedding", "InternLM2LinearScalingRotaryEmbedding",
                  "InternLM2DynamicNTKScalingRotaryEmbedding")


def message_hub_varlen_args():
    """``(cumulative_len, max_seqlen)`` XTuner's hook stored for this rank, or ``(None, None)``
    (outside a training iteration)."""
    from mmengine import MessageHub

    rank = torch.distributed.get_rank() if (torch.distributed.is_available()
                                            and torch.distributed.is_initialized()) else 0
    hub = MessageHub.get_instance("varlen_attn_args")
    return (hub.get_info(f"cumulative_len_rank_{rank}"),
            hub.get_info(f"max_seqlen_rank_{rank}"))


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
        seq_len = int(position_ids.max()) + 1
        if seq_len > rotary_emb.max_position_embeddings:
            inv_freq, _ = rotary_inv_freq(
                rotary_emb.dim, rotary_emb.base, scaling_type="dynamic",
                scaling_factor=rotary_emb.scaling_factor,
                max_position_embeddings=rotary_emb.max_position_embeddings, seq_len=seq_len,
                device=position_ids.device)
            rotary_emb.register_buffer("inv_freq", inv_freq, persistent=False)
    # A model cast as a whole (DeepSpeed's bf16 engine) casts this buffer too; the kernel
    # reads it as fp32, as Hugging Face's ``inv_freq.float()`` does.
    return dict(position_ids=position_ids, inv_freq=rotary_emb.inv_freq,
                position_divisor=divisor)
