"""Pure-PyTorch rotary position embedding with the numerics of Hugging Face's InternLM2.

Layouts shared with :mod:`kernels.rotary`: ``q``/``k`` are ``[tokens, heads, d]``,
``[batch, seq, heads, d]`` or ``[batch, seq, heads_outer, heads_inner, d]`` (heads split
in two, as in a view of InternLM2's fused ``wqkv`` output).  ``neox`` rotates the pairs
``(i, i + d/2)`` (``rotate_half``, what InternLM2 uses); ``interleaved`` the pairs
``(2i, 2i + 1)``.
"""

from typing import Optional, Tuple

import torch


def rotary_positions(n_batch: int, seqlen: int, *, position_ids: Optional[torch.Tensor] = None,
                     cu_seqlens: Optional[torch.Tensor] = None, position_offset: int = 0,
                     device=None) -> torch.Tensor:
    """Position of every token as an int64 ``[n_batch, seqlen]`` tensor.

    ``position_ids``: ``[n_batch, seqlen]``, or ``[seqlen]`` / ``[1, seqlen]`` shared by
    every batch row.  ``cu_seqlens`` (``n_batch == 1``): cumulative lengths of packed
    sequences; local token ``t`` is token ``t + position_offset`` of that packing (the
    offset of a sequence-parallel rank's shard), and its position is its index inside
    its sequence.
    """
    if position_ids is not None:
        return position_ids.reshape(-1, seqlen).to(torch.int64).expand(n_batch, seqlen)
    cu = cu_seqlens.to(torch.int64)
    token = torch.arange(seqlen, device=cu.device) + position_offset
    seq = torch.searchsorted(cu[1:], token, right=True)
    return (token - cu[seq]).reshape(1, seqlen).to(device)


def rotary_cos_sin(positions: torch.Tensor, *, inv_freq: Optional[torch.Tensor] = None,
                   position_divisor: float = 1.0,
                   cos_sin_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` ``[*positions.shape, d/2]`` as InternLM2 computes them.

    From ``inv_freq`` (fp32 ``[d/2]``): ``angle = (position.float() / position_divisor)
    * inv_freq`` and its cos/sin, all in fp32 (``InternLM2RotaryEmbedding``; the
    divisor is the linear-scaling factor).  From ``cos_sin_cache`` (two ``[P, d/2]``
    tensors): rows gathered at the positions.
    """
    if cos_sin_cache is not None:
        cos, sin = cos_sin_cache
        return cos[positions], sin[positions]
    pos = positions.float() / position_divisor
    angle = pos[..., None] * inv_freq.float()
    return angle.cos(), angle.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           interleaved: bool = False) -> torch.Tensor:
    """Rotate ``x`` ``[..., d]`` by per-frequency ``cos``/``sin`` ``[..., d/2]`` (broadcast).

    ``cos``/``sin`` are first cast to ``x.dtype`` and the arithmetic runs in ``x.dtype``,
    as in InternLM2's ``apply_rotary_pos_emb``.
    """
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        return torch.stack((even * cos - odd * sin, odd * cos + even * sin), -1).flatten(-2)
    half = x.shape[-1] // 2
    cos = torch.cat((cos, cos), -1)
    sin = torch.cat((sin, sin), -1)
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rotated * sin


def _token_dims(x: torch.Tensor) -> Tuple[int, int]:
    return (1, x.shape[0]) if x.dim() == 3 else (x.shape[0], x.shape[1])


def rotary_reference(q: torch.Tensor, k: torch.Tensor, *,
                     position_ids: Optional[torch.Tensor] = None,
                     cu_seqlens: Optional[torch.Tensor] = None, position_offset: int = 0,
                     inv_freq: Optional[torch.Tensor] = None, position_divisor: float = 1.0,
                     cos_sin_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                     interleaved: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotated ``(q, k)``; arguments as in :func:`kernels.rotary.apply_rotary`."""
    n_batch, seqlen = _token_dims(q)
    positions = rotary_positions(n_batch, seqlen, position_ids=position_ids,
                                 cu_seqlens=cu_seqlens, position_offset=position_offset,
                                 device=q.device)
    cos, sin = rotary_cos_sin(positions, inv_freq=inv_freq, position_divisor=position_divisor,
                              cos_sin_cache=cos_sin_cache)
    if q.dim() == 3:
        cos, sin = cos[0], sin[0]

    def apply(x):
        # Broadcast over the one or two head dimensions.
        extra = x.dim() - cos.dim()
        shape = cos.shape[:-1] + (1,) * extra + cos.shape[-1:]
        return rotate(x, cos.reshape(shape), sin.reshape(shape), interleaved)

    return apply(q), apply(k)


def split_qkv_rotary_reference(qkv: torch.Tensor, num_kv_heads: int, head_dim: int,
                               **kwargs) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split InternLM2's ``wqkv`` output and rotate q and k.

    ``qkv``: ``[tokens, hkv * (G + 2) * d]`` or ``[batch, seq, hkv * (G + 2) * d]``.

    Returns contiguous ``q`` ``[..., hkv * G, d]``, ``k`` and ``v`` ``[..., hkv, d]``;
    ``kwargs`` as for :func:`rotary_reference`.
    """
    lead = qkv.shape[:-1]
    batched = qkv if qkv.dim() == 3 else qkv.unsqueeze(0)
    grouped = batched.unflatten(-1, (num_kv_heads, -1, head_dim))
    groups = grouped.shape[-2] - 2
    q, k = rotary_reference(grouped[..., :groups, :], grouped[..., groups, :], **kwargs)
    v = grouped[..., groups + 1, :]
    return (q.reshape(*lead, num_kv_heads * groups, head_dim),
            k.reshape(*lead, num_kv_heads, head_dim),
            v.reshape(*lead, num_kv_heads, head_dim).contiguous())
