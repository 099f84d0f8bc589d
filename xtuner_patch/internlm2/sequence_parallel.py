"""XTuner's sequence parallel (Ulysses) for InternLM2 attention, on
:mod:`kernels.sequence_parallel`.

XTuner splits every row along the sequence over the ranks of a sequence-parallel group
(``input_ids``, ``labels`` and ``position_ids``; ``cumulative_len`` keeps describing the
whole row), so each rank's attention forward holds its own tokens of every head; the
loss stays XTuner's (``reduce_sequence_parallel_loss``).  This module finds the group,
and runs a module's ``wqkv`` -> exchange + attention + exchange back -> ``wo`` with
``wo``'s GEMMs inside the backward exchange when ``wo`` is a plain ``nn.Linear``.
"""

from typing import Optional

import torch
import torch.distributed as dist

from kernels import sequence_parallel

from ..log import warn_once
from .hooks import has_hooks
from .varlen import message_hub_varlen_args, rope_arguments


def world_size() -> int:
    """The size of XTuner's sequence-parallel group (1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    from xtuner.parallel.sequence import get_sequence_parallel_world_size

    return get_sequence_parallel_world_size()


def group_for(module) -> Optional["dist.ProcessGroup"]:
    """XTuner's sequence-parallel group when ``module``'s forward must run sequence
    parallel (training, as XTuner decides it, in a group of several ranks), else None."""
    if not module.training or world_size() <= 1:
        return None
    from xtuner.parallel.sequence import get_sequence_parallel_group

    return get_sequence_parallel_group()


def attention_forward(module, hidden_states: torch.Tensor, group, *, varlen: bool,
                      fused_rope: bool, attention_mask: Optional[torch.Tensor] = None,
                      position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """An InternLM2 attention module's output ``[b, tokens, hidden]`` for this rank's
    ``tokens`` of each row, the rows being spread over ``group`` (from :func:`group_for`).

    ``position_ids`` are this rank's (XTuner's split gives each rank its own); with
    ``varlen`` the packing comes from XTuner's MessageHub; ``fused_rope`` picks the RoPE
    kernel (else PyTorch ops).
    """
    if position_ids is None:
        raise ValueError("sequence parallel attention needs this rank's position_ids "
                         "(XTuner's data split provides them)")
    bsz, tokens, _ = hidden_states.shape
    qkv = module.wqkv(hidden_states)
    cumulative_len, max_seqlen = message_hub_varlen_args() if varlen else (None, None)
    projection = _plain_linear(module.wo, qkv)
    out = sequence_parallel.qkv_attention(
        qkv, module.num_heads, module.num_key_value_heads, module.head_dim, group,
        rope=rope_arguments(module.rotary_emb, position_ids), fused_rope=fused_rope,
        cu_seqlens=cumulative_len, max_seqlen=max_seqlen, attention_mask=attention_mask,
        out_proj=projection)
    return out if projection is not None else module.wo(out)


def _plain_linear(linear, x: torch.Tensor) -> Optional[tuple]:
    """``(weight, bias)`` of ``linear`` when ``F.linear`` with them is all its forward
    would do on ``x`` (``wqkv``'s output, for its dtype and device), else None: then the
    module runs as it is and its input gradient is packed by a separate pass."""
    if type(linear) is not torch.nn.Linear:
        reason = f"it is a {type(linear).__name__} (a LoRA wrapper, a subclass, ...), " \
                 "not a plain torch.nn.Linear"
    elif has_hooks(linear) or hasattr(linear.weight, "ds_id"):
        reason = "it has hooks (e.g. DeepSpeed ZeRO-3 gathering its weight)"
    elif torch.is_autocast_enabled(x.device.type):
        reason = "autocast picks its GEMM's dtype"
    elif (linear.weight.dtype, linear.weight.device) != (x.dtype, x.device):
        reason = f"its weight is {linear.weight.dtype} on {linear.weight.device}, its input " \
                 f"{x.dtype} on {x.device}"
    else:
        return linear.weight, linear.bias
    warn_once("xtuner-patch: sequence parallel calls the attention output projection as a "
              "module, its input gradient packed by a separate pass: %s", reason)
    return None
