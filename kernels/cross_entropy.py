"""Cross-entropy of a linear layer's output (the LM head) without materialising the logits.

For hidden states ``h`` ``[N, H]``, the head's weight ``W`` ``[V, H]`` and int64 targets
``t`` ``[N]``::

    loss_i = logsumexp_j (h_i . W_j) - h_i . W_{t_i}        (rows with t_i != ignore_index)
    loss   = sum_i loss_i / n_valid   ('mean')   or   sum_i loss_i   ('sum')

Tokens go in chunks: per chunk one matrix product into a reused ``[chunk, V]`` logits
buffer (rounded to the compute dtype, as Hugging Face's logits are), a Triton kernel
for the log-sum-exp, the loss and, in place, the logits' gradient, then the gradients of
``h`` and ``W``: every gradient is finished when the forward pass returns, and backward
only scales them (once).  The weight gradient is summed over chunks in an fp32
accumulator (``'accumulate'``) or recomputed per vocabulary slice from the stored
log-sum-exp (``'recompute'``, no ``V x H`` accumulator); ``'auto'`` picks by token
count.  A low-rank addend ``a @ b.T`` (a LoRA adapter on the head) joins every product.

Dtypes: the logits are computed in ``hidden``'s dtype, or autocast's under
``torch.autocast``; operands are cast inside, so each gradient comes back in its
input's dtype (an fp32 master weight gets its fp32 accumulator).  In fp16 the logits'
gradient is scaled by a power of two before it is rounded and unscaled in the backward
(:data:`FP16_GRAD_BOUND`), so that AMP's loss scale finds the softmax tail Hugging
Face's path keeps.  Design and memory budget: ``docs/design.md``.
"""

import functools
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels._runtime import FLOAT_DTYPES, cdiv, check_tensor, next_power_of_2
from kernels.reference.cross_entropy import REDUCTIONS, shift_targets

# Default tokens per chunk.  Every chunk after the first reads and writes the fp32
# weight-gradient accumulator (about 12 * V * H bytes with the half-precision temporary),
# about 430 / chunk_tokens of the chunk's matrix-product time on an H100 (3 TB/s, ~650
# TFLOP/s) whatever V and H: ~10% at 4096.  The logits buffer is then 4096 * V elements
# (0.76 GB at V = 92544 in bf16, the size of InternLM2-7B's head).
CHUNK_TOKENS = 4096

# Tokens per chunk of the 'recompute' mode: its logits buffer is this many rows of V
# (190 MB at V = 92544 in bf16), and also holds each vocabulary slice's logits for all
# tokens.  At 4096 hidden units, products of 1024 rows still run near peak on an H100.
RECOMPUTE_CHUNK_TOKENS = 1024

GRAD_WEIGHT_MODES = ("auto", "accumulate", "recompute")

# Vocabulary rows per weight-gradient product added to the fp32 accumulator where torch
# has no fp32-output addmm for half inputs: the fp32 copies are GRAD_WEIGHT_SLICE x
# chunk (128 MiB at 4096 tokens) and chunk x H.
GRAD_WEIGHT_SLICE = 8192

# In fp16 the logits' gradient is written scaled by a power of two so that its largest
# possible magnitude lies in (FP16_GRAD_BOUND / 2, FP16_GRAD_BOUND]: softmax values down
# to 1e-7 of the largest stay normal fp16 numbers, and the hidden-state gradient
# (at most 2 * FP16_GRAD_BOUND * max|W| per element) stays far from fp16's 65504.
FP16_GRAD_BOUND = 256.0

# Vocabulary columns per iteration of the row kernel (at most), and its warps.
_BLOCK_V = 4096
_NUM_WARPS = 8


@triton.jit
def _cross_entropy_rows_kernel(
    LOGITS, TARGETS, LOSSES, LSE,
    n_cols, first_col, stride_row, scale, ignore_index,
    LSE_KNOWN: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One row of logits (vocabulary columns ``[first_col, first_col + n_cols)``).

    Without ``LSE_KNOWN`` the row holds the whole vocabulary: its log-sum-exp goes to
    LSE and its loss to LOSSES.  With it, the log-sum-exp is read from LSE (the row is a
    slice).  With ``COMPUTE_GRAD`` the logits are overwritten by their gradient.
    """
    row = tl.program_id(0).to(tl.int64)
    logits = LOGITS + row * stride_row
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    cols = tl.arange(0, BLOCK_V)

    if LSE_KNOWN:
        lse = tl.load(LSE + row)
    else:
        # Ignored rows skip the read: their loop runs zero times.
        n_read = tl.where(valid, n_cols, 0)
        row_max = float("-inf")
        sum_exp = 0.0
        for start in range(0, n_read, BLOCK_V):
            offs = start + cols
            x = tl.load(logits + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(row_max, tl.max(x, axis=0))
            sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            row_max = new_max
        lse = tl.where(valid, row_max + tl.log(tl.where(valid, sum_exp, 1.0)), 0.0)
        target_logit = tl.load(logits + target, mask=valid, other=0.0).to(tl.float32)
        tl.store(LOSSES + row, tl.where(valid, lse - target_logit, 0.0))
        tl.store(LSE + row, lse)

    if COMPUTE_GRAD:
        # Every element of the row is read before it is overwritten by its gradient.
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            mask = offs < n_cols
            x = tl.load(logits + offs, mask=mask & valid, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(offs + first_col == target, 1.0, 0.0)
            grad = tl.where(valid, grad * scale, 0.0)
            tl.store(logits + offs, grad.to(LOGITS.dtype.element_ty), mask=mask)


def default_chunk_size(n_tokens: int) -> int:
    """Rows per chunk: :data:`CHUNK_TOKENS` at most, balanced so that chunks are of nearly
    equal size (8192 tokens: 2 x 4096; 5000 tokens: 2 x 2500)."""
    return max(1, cdiv(n_tokens, max(1, cdiv(n_tokens, CHUNK_TOKENS))))


def _check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> int:
    """Count the targets that are not ``ignore_index``; raise on targets outside the vocabulary."""
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab))
    n_valid, n_bad = torch.stack([valid.sum(), bad.sum()]).tolist()
    if n_bad:
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels must be in [0, {vocab}) (the weight's vocabulary) or ignore_index="
            f"{ignore_index}; {n_bad} are not, the first is {int(targets[first])} "
            f"(flattened target {first})")
    return n_valid


def recomputes_weight_grad(mode: str, n_tokens: int, hidden_size: int) -> bool:
    """Whether ``mode`` ('auto', 'accumulate', 'recompute') recomputes the logits for the
    weight gradient of ``n_tokens`` tokens (see the module doc)."""
    return mode == "recompute" or (mode == "auto" and n_tokens < 8 * hidden_size)


def _rows_kernel(logits, targets, losses, lse, scale, ignore_index, *, first_col=0,
                 lse_known=False, compute_grad=True):
    block_v = min(_BLOCK_V, next_power_of_2(logits.shape[1]))
    _cross_entropy_rows_kernel[(logits.shape[0],)](
        logits, targets, losses, lse, logits.shape[1], first_col, logits.stride(0), scale,
        ignore_index, LSE_KNOWN=lse_known, COMPUTE_GRAD=compute_grad, BLOCK_V=block_v,
        num_warps=_NUM_WARPS)


def _has_fp32_out_addmm(device: torch.device) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` works for
    half-precision ``a``, ``b`` on ``device`` (CUDA only)."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_has_fp32_out_addmm(index)


@functools.lru_cache(maxsize=None)
def _cuda_has_fp32_out_addmm(index: int) -> bool:
    # Checked once per device, on a 2 x 2 case whose result is exact.
    device = torch.device("cuda", index)
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16, device=device)
    acc = torch.ones(2, 2, dtype=torch.float32, device=device)
    try:
        torch.addmm(acc, a, a.t(), out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):  # an older torch, or no such kernel
        return False
    return torch.equal(acc.cpu(), torch.tensor([[6.0, 12.0], [12.0, 26.0]]))


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an fp32 ``acc`` ``[M, N]``, ``a`` ``[M, K]`` and ``b`` ``[K, N]``
    of one dtype, summed in fp32 and never rounded to a half-precision product."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _has_fp32_out_addmm(acc.device):
        # The GEMM's epilogue reads and writes acc: no temporary, no separate add kernel.
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        b = b.float()
        for start in range(0, acc.shape[0], GRAD_WEIGHT_SLICE):
            rows = slice(start, min(start + GRAD_WEIGHT_SLICE, acc.shape[0]))
            acc[rows].addmm_(a[rows].float(), b)


def gradient_prescale(dtype: torch.dtype, scale: float) -> float:
    """The power of two the forward multiplies the logits' gradient by (see the module
    doc): 1 except in fp16, where ``scale`` (``1 / n_valid`` or 1) times it lies in
    ``(FP16_GRAD_BOUND / 2, FP16_GRAD_BOUND]``."""
    if dtype != torch.float16:
        return 1.0
    return 2.0 ** math.floor(math.log2(FP16_GRAD_BOUND / scale))


def _forward(inputs, weights, targets, ignore_index, scale, chunk_size, need_dx, need_dw,
             recompute, grad_scale, dw_dtypes):
    """Losses and gradients for ``logits = sum_i inputs[i] @ weights[i].T``.

    ``inputs[i]``: ``[N, K_i]``, ``weights[i]``: ``[V, K_i]`` (the head, then an optional
    low-rank addend), all of the compute dtype; ``need_dx[i]`` / ``need_dw[i]`` say which
    gradients to compute.  The gradients are those of ``grad_scale * loss``; the weights'
    are returned in ``dw_dtypes`` (fp32 whenever ``grad_scale != 1``).
    Returns ``(losses, [grad of inputs[i] or None], [grad of weights[i] or None])``.
    """
    n_rows, vocab = inputs[0].shape[0], weights[0].shape[0]
    device = inputs[0].device
    losses = torch.empty(n_rows, dtype=torch.float32, device=device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=device)
    dxs = [torch.empty_like(x, memory_format=torch.contiguous_format) if need else None
           for x, need in zip(inputs, need_dx)]
    if recompute:
        chunk_size = min(chunk_size, RECOMPUTE_CHUNK_TOKENS)
    single = n_rows <= chunk_size
    # Sums over chunks, and every scaled fp16 product, go into fp32 accumulators.
    wide = grad_scale != 1.0 or (not recompute and not single)
    dws = [None if not need else
           torch.zeros(w.shape, dtype=torch.float32, device=device) if wide else
           torch.empty_like(w, memory_format=torch.contiguous_format)
           for w, need in zip(weights, need_dw)]
    if n_rows == 0:
        return losses, dxs, [dw.zero_().to(dtype) if dw is not None else None
                             for dw, dtype in zip(dws, dw_dtypes)]

    def weight_grad_into(dw, dlogits_t, x):
        if wide:
            _add_product(dw, dlogits_t, x)
        else:
            torch.mm(dlogits_t, x, out=dw)

    def logits_into(out, rows, cols):
        torch.mm(inputs[0][rows], weights[0][cols].t(), out=out)
        for x, w in zip(inputs[1:], weights[1:]):
            out.addmm_(x[rows], w[cols].t())

    every = slice(None)
    buffer = torch.empty(min(chunk_size, n_rows) * vocab, dtype=inputs[0].dtype, device=device)
    for start in range(0, n_rows, chunk_size):
        rows = slice(start, min(start + chunk_size, n_rows))
        logits = buffer[:(rows.stop - start) * vocab].view(rows.stop - start, vocab)
        logits_into(logits, rows, every)
        _rows_kernel(logits, targets[rows], losses[rows], lse[rows], scale * grad_scale,
                     ignore_index,
                     compute_grad=any(need_dx) or (any(need_dw) and not recompute))
        for w, dx in zip(weights, dxs):
            if dx is not None:
                torch.mm(logits, w, out=dx[rows])
        for x, dw in zip(inputs, dws):
            if dw is not None and not recompute:
                weight_grad_into(dw, logits.t(), x[rows])
    if any(need_dw) and recompute:
        # The buffer, seen as [n_rows, slice]: every token's logits of a vocabulary slice,
        # a multiple of 16 columns where it can be: the row kernel is specialised on its
        # width and row stride, which must not change divisibility with the token count.
        vocab_slice = max(1, buffer.numel() // n_rows)
        if vocab_slice > 16:
            vocab_slice -= vocab_slice % 16
        for v in range(0, vocab, vocab_slice):
            cols = slice(v, min(v + vocab_slice, vocab))
            logits = buffer[:n_rows * (cols.stop - v)].view(n_rows, cols.stop - v)
            logits_into(logits, every, cols)
            _rows_kernel(logits, targets, losses, lse, scale * grad_scale, ignore_index,
                         first_col=v, lse_known=True)
            for x, dw in zip(inputs, dws):
                if dw is not None:
                    weight_grad_into(dw[cols], logits.t(), x)
    # Freed before the accumulators' copies in the weights' dtype are made, which can reuse it.
    del buffer, logits
    return losses, dxs, [dw.to(dtype) if dw is not None else None
                         for dw, dtype in zip(dws, dw_dtypes)]


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, low_rank_input, low_rank_weight, targets, ignore_index,
                reduction, chunk_size, need_dx, need_dw, recompute, compute_dtype):
        originals = [(hidden, weight)]
        if low_rank_input is not None:
            originals.append((low_rank_input, low_rank_weight))
        inputs = [x.reshape(-1, x.shape[-1]).to(compute_dtype) for x, _ in originals]
        weights = [w.to(compute_dtype) for _, w in originals]
        n_valid = _check_targets(targets, weight.shape[0], ignore_index)
        # With no target left the loss is 0 with zero gradients (not 0/0).
        scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
        grad_scale = gradient_prescale(compute_dtype, scale)
        # Scaled gradients stay in fp32 until backward has divided the scale out.
        dw_dtypes = [w.dtype if grad_scale == 1.0 else torch.float32 for _, w in originals]
        losses, dxs, dws = _forward(inputs, weights, targets, ignore_index, scale, chunk_size,
                                    need_dx[:len(inputs)], need_dw[:len(inputs)], recompute,
                                    grad_scale, dw_dtypes)
        del inputs, weights
        ctx.inputs = [(x.shape, x.dtype, w.dtype) for x, w in originals]
        ctx.grad_scale = grad_scale
        ctx.grads = (dxs, dws)
        return losses.sum() * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward can run only once per forward (its "
                "gradients are computed in the forward pass and scaled in place)")
        (dxs, dws), ctx.grads = ctx.grads, None
        # A power of two: dividing it out is exact.
        factor = grad_loss / ctx.grad_scale if ctx.grad_scale != 1.0 else grad_loss
        dxs = [dx.mul_(factor).view(shape).to(x_dtype) if dx is not None else None
               for dx, (shape, x_dtype, _) in zip(dxs, ctx.inputs)]
        dws = [dw.mul_(factor).to(w_dtype) if dw is not None else None
               for dw, (_, _, w_dtype) in zip(dws, ctx.inputs)]
        dxs += [None] * (2 - len(dxs))
        dws += [None] * (2 - len(dws))
        return (dxs[0], dws[0], dxs[1], dws[1]) + (None,) * 8


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = -100, reduction: str = "mean",
                               shift_labels: bool = False,
                               chunk_size: Optional[int] = None,
                               grad_weight_mode: str = "auto",
                               low_rank: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                               ) -> torch.Tensor:
    """``CrossEntropyLoss(hidden @ weight.T, labels)`` without the full logits, differentiable.

    Args:
        hidden: ``[..., H]`` (``[tokens, H]`` or ``[batch, seq, H]``), fp16 / bf16 / fp32,
            any strides.
        weight: ``[V, H]``, the LM head's weight, on ``hidden``'s device; of ``hidden``'s
            dtype, as ``F.linear`` requires, unless autocast casts both.
        labels: int64 of ``hidden.shape[:-1]``: target ids in ``[0, V)`` or ``ignore_index``.
        ignore_index: targets with this value contribute neither loss nor gradient.
        reduction: ``'mean'`` over the targets that are not ignored (as
            ``torch.nn.CrossEntropyLoss`` and Hugging Face), or ``'sum'``.
        shift_labels: Hugging Face's causal-LM shift: position ``t`` predicts
            ``labels[..., t + 1]`` along the last dimension of ``labels`` (so per row of a
            ``[batch, seq]`` batch) and the last position of each row predicts nothing;
            only the int64 labels are shifted, never the logits.
        chunk_size: tokens per chunk (default :func:`default_chunk_size`; the
            'recompute' mode uses at most :data:`RECOMPUTE_CHUNK_TOKENS`).
        grad_weight_mode: how the weight gradient is summed over chunks: ``'accumulate'``
            (three matrix products, an fp32 ``V x H`` accumulator), ``'recompute'``
            (four products, no accumulator) or ``'auto'`` (accumulate from
            ``8 * H`` tokens on, or when ``weight`` needs no gradient); see the module doc.
        low_rank: ``(a, b)`` whose product ``a @ b.T`` is added to the logits: ``a``
            ``[..., r]`` (``hidden``'s leading dimensions), ``b`` ``[V, r]``, on
            ``hidden``'s device, any float dtype (cast to the logits' compute dtype; PEFT
            keeps adapters in fp32 on a half-precision head).  A LoRA adapter on the
            head is ``a = scaling * lora_A(dropout(hidden))``, ``b = lora_B.weight``: the
            adapter's ``[tokens, V]`` output is never materialised either.  Each chunk's
            logits get the product in the same buffer (one more matrix product of inner
            size ``r``), and ``a`` and ``b`` their gradients like ``hidden`` and
            ``weight``.

    Returns:
        The loss, an fp32 scalar.  When every target is ignored it is 0 and the gradients
        are zero (Hugging Face's mean is NaN there).

    Gradients are computed in the forward pass, only for the inputs that require them
    (and none under ``torch.no_grad()``), each in its input's dtype; the backward pass
    may run once.  Under ``torch.autocast`` the logits are computed in the autocast dtype,
    as the head's ``F.linear`` computes them (see the module doc for the dtype rules).
    """
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [..., hidden_size] with at least 2 dimensions, "
                         f"got shape {tuple(hidden.shape)}")
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("labels", labels, dtypes=(torch.int64,))
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [vocab, {hidden.shape[-1]}] to match hidden's last "
                         f"dimension, got {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (hidden's "
                         f"without the last dimension), got {tuple(labels.shape)}")
    low_rank_input, low_rank_weight = _check_low_rank(low_rank, hidden, weight)
    for name, tensor in (("weight", weight), ("labels", labels), ("low_rank[0]", low_rank_input),
                         ("low_rank[1]", low_rank_weight)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if grad_weight_mode not in GRAD_WEIGHT_MODES:
        raise ValueError(f"grad_weight_mode must be one of {GRAD_WEIGHT_MODES}, got "
                         f"{grad_weight_mode!r}")

    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = hidden.dtype
        if weight.dtype != hidden.dtype:
            raise TypeError(f"weight ({weight.dtype}) must have hidden's dtype "
                            f"({hidden.dtype}), as F.linear requires outside torch.autocast")

    targets = shift_targets(labels, ignore_index) if shift_labels else labels
    targets = targets.reshape(-1).contiguous()
    n_tokens = targets.numel()
    if chunk_size is None:
        chunk_size = default_chunk_size(n_tokens)
    grad = torch.is_grad_enabled()

    def needs(*tensors):
        return tuple(grad and t is not None and t.requires_grad for t in tensors)

    need_dx, need_dw = needs(hidden, low_rank_input), needs(weight, low_rank_weight)
    # 'auto' recomputes to spare the V x H accumulator: with the head frozen (LoRA) only
    # the adapter's V x r one is left, and accumulating is the cheaper mode.
    recompute = recomputes_weight_grad(grad_weight_mode, n_tokens, weight.shape[1]) and (
        need_dw[0] or grad_weight_mode == "recompute")
    with torch.autocast(device_type, enabled=False):
        return _FusedLinearCrossEntropy.apply(
            hidden, weight, low_rank_input, low_rank_weight, targets, int(ignore_index),
            reduction, chunk_size, need_dx, need_dw, recompute, compute_dtype)


def _check_low_rank(low_rank, hidden: torch.Tensor, weight: torch.Tensor):
    """``(a, b)`` of ``low_rank`` after checking their shapes, or ``(None, None)``."""
    if low_rank is None:
        return None, None
    if not isinstance(low_rank, (tuple, list)) or len(low_rank) != 2:
        raise TypeError(f"low_rank must be a pair (a, b) of tensors, got {type(low_rank).__name__}")
    a, b = low_rank
    check_tensor("low_rank[0]", a, dtypes=FLOAT_DTYPES)
    check_tensor("low_rank[1]", b, ndim=2, dtypes=FLOAT_DTYPES)
    rank = b.shape[1]
    if rank < 1 or b.shape[0] != weight.shape[0] or a.shape != hidden.shape[:-1] + (rank,):
        raise ValueError(f"low_rank must be (a [{', '.join(map(str, hidden.shape[:-1]))}, r], "
                         f"b [{weight.shape[0]}, r]) for hidden {tuple(hidden.shape)} and weight "
                         f"{tuple(weight.shape)}, got a {tuple(a.shape)} and b {tuple(b.shape)}")
    return a, b
