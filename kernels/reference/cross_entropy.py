"""Pure-PyTorch linear cross-entropy: Hugging Face InternLM2's loss, logits materialised.

Differentiable with autograd; :func:`kernels.cross_entropy.fused_linear_cross_entropy` is
tested against it (in float64) and falls back to it where its kernels cannot run.
"""

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum")


def shift_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Hugging Face's causal shift as targets aligned with the positions that predict them.

    ``targets[..., t] = labels[..., t + 1]`` and the last position of every row (which
    predicts nothing) gets ``ignore_index``: comparing logits at every position with these
    targets is ``CrossEntropyLoss(logits[..., :-1, :], labels[..., 1:])`` without cutting
    (or copying) the logits.  ``labels``: ``[..., seq]``; returns a new tensor.
    """
    return torch.cat([labels[..., 1:], labels.new_full(labels.shape[:-1] + (1,), ignore_index)],
                     dim=-1)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor,
                                   labels: torch.Tensor, ignore_index: int = -100,
                                   reduction: str = "mean", shift_labels: bool = False,
                                   low_rank=None) -> torch.Tensor:
    """``CrossEntropyLoss(hidden @ weight.T, labels)`` as InternLM2ForCausalLM computes it.

    ``hidden``: ``[..., h]``; ``weight``: ``[vocab, h]``; ``labels``: int64 of
    ``hidden.shape[:-1]``.  The logits are computed in the input dtype and taken to fp32
    (float64 stays float64, so float64 references are exact) before the loss.
    ``reduction='mean'`` averages over the targets that are not ``ignore_index``; when
    there are none the loss is 0 (Hugging Face returns NaN), with zero gradients.
    ``shift_labels=True`` compares position ``t`` with ``labels[..., t + 1]``
    (:func:`shift_targets`).  ``low_rank`` ``(a, b)`` adds ``a @ b.T`` to the logits (a
    LoRA adapter's output, summed in the input dtype as PEFT sums it).  Returns a scalar
    of the logits' compute dtype.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    logits = F.linear(hidden, weight)
    if low_rank is not None:
        logits = logits + F.linear(*low_rank)
    if logits.dtype != torch.float64:
        logits = logits.float()
    targets = shift_targets(labels, ignore_index) if shift_labels else labels
    targets = targets.reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets,
                           ignore_index=ignore_index, reduction="sum")
    if reduction == "mean":
        loss = loss / (targets != ignore_index).sum().clamp(min=1)
    return loss
