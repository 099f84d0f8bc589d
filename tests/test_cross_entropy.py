"""kernels.fused_linear_cross_entropy against Hugging Face's loss in float64."""

import pytest
import torch
import torch.nn.functional as F

from kernels import fused_linear_cross_entropy
from kernels.reference import linear_cross_entropy_reference
from tests.helpers import (DEVICE, DTYPES, HAS_CUDA, REL_TOL, assert_rel_close, leaf, randn,
                           rel_error)

IGNORE = -100


def _hf_loss(hidden, weight, labels, shift, reduction="mean"):
    """InternLM2ForCausalLM's loss, written as Hugging Face writes it (float64 inputs)."""
    logits = hidden @ weight.t()
    if shift:
        logits, labels = logits[..., :-1, :].contiguous(), labels[..., 1:].contiguous()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE, reduction=reduction)


def _inputs(shape, hidden_size, vocab, dtype, gen, ignored=0.3):
    hidden = randn(shape + (hidden_size,), dtype, generator=gen).requires_grad_()
    # Logits of a few units, as in a trained model; a spread that exercises the softmax.
    weight = randn((vocab, hidden_size), dtype, generator=gen,
                   scale=2.0 / hidden_size ** 0.5).requires_grad_()
    labels = torch.randint(0, vocab, shape, generator=gen, device=DEVICE)
    labels[torch.rand(shape, generator=gen, device=DEVICE) < ignored] = IGNORE
    return hidden, weight, labels


def _float64_grads(hidden, weight, labels, shift, reduction="mean"):
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    loss = _hf_loss(h64, w64, labels, shift, reduction)
    loss.backward()
    return loss, h64.grad, w64.grad


CASES = {
    # name: (leading shape, hidden, vocab, chunk_size, shift_labels)
    "tokens-one-chunk": ((64,), 48, 1000, None, False),
    "vocab-5003-blocks": ((37,), 64, 5003, None, False),
    "chunks-of-5-split-samples": ((2, 19), 32, 777, 5, True),
    "chunk-1-shift": ((23,), 32, 300, 1, True),
    "batched-default-chunk": ((3, 40), 16, 500, None, True),
}


@pytest.mark.parametrize("mode", ["accumulate", "recompute"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf_float64(gen, dtype, case, mode):
    """Both weight-gradient modes; with 'recompute' the vocabulary slices of the second
    pass are ``chunk * vocab // tokens`` rows, so chunked cases also split the vocabulary."""
    shape, hidden_size, vocab, chunk, shift = CASES[case]
    hidden, weight, labels = _inputs(shape, hidden_size, vocab, dtype, gen)
    loss = fused_linear_cross_entropy(hidden, weight, labels, shift_labels=shift,
                                      chunk_size=chunk, grad_weight_mode=mode)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    ref_loss, ref_dh, ref_dw = _float64_grads(hidden, weight, labels, shift)
    assert_rel_close(loss, ref_loss, dtype, name="loss")
    assert_rel_close(hidden.grad, ref_dh, name="grad hidden")
    assert_rel_close(weight.grad, ref_dw, name="grad weight")
    assert hidden.grad.dtype == weight.grad.dtype == dtype


def _low_rank(shape, vocab, rank, dtype, gen):
    """A LoRA adapter's two factors: ``a`` (``scaling * lora_A(x)``) and ``b`` (lora_B)."""
    a = randn(shape + (rank,), dtype, generator=gen).requires_grad_()
    b = randn((vocab, rank), dtype, generator=gen, scale=0.5 / rank ** 0.5).requires_grad_()
    return a, b


@pytest.mark.parametrize("mode", ["accumulate", "recompute"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,frozen", [("chunks-of-5-split-samples", True),
                                         ("vocab-5003-blocks", False),
                                         ("batched-default-chunk", True)])
def test_low_rank_addend_matches_hf_with_lora_float64(gen, dtype, case, frozen, mode):
    """``hidden @ weight.T + a @ b.T`` as logits (a LoRA adapter on the head, the base
    weight frozen or not): loss and every gradient against float64."""
    shape, hidden_size, vocab, chunk, shift = CASES[case]
    hidden, weight, labels = _inputs(shape, hidden_size, vocab, dtype, gen)
    weight.requires_grad_(not frozen)
    a, b = _low_rank(shape, vocab, 4, dtype, gen)
    loss = fused_linear_cross_entropy(hidden, weight, labels, shift_labels=shift,
                                      chunk_size=chunk, grad_weight_mode=mode, low_rank=(a, b))
    loss.backward()
    h64, w64, a64, b64 = (leaf(t.double()) for t in (hidden, weight, a, b))
    ref = linear_cross_entropy_reference(h64, w64, labels, IGNORE, shift_labels=shift,
                                         low_rank=(a64, b64))
    ref.backward()
    # The reference is Hugging Face's loss of the summed logits.
    logits = h64.detach() @ w64.detach().t() + a64.detach() @ b64.detach().t()
    hf = _hf_loss(logits, torch.eye(vocab, dtype=torch.float64, device=DEVICE), labels, shift)
    assert rel_error(ref.detach(), hf) < 1e-12
    assert_rel_close(loss, ref, dtype, name="loss")
    for name, ours, ref_grad in (("grad hidden", hidden.grad, h64.grad),
                                 ("grad a", a.grad, a64.grad), ("grad b", b.grad, b64.grad)):
        assert ours.dtype == dtype
        assert_rel_close(ours, ref_grad, name=name)
    if frozen:
        assert weight.grad is None
    else:
        assert_rel_close(weight.grad, w64.grad, name="grad weight")


@pytest.mark.parametrize("frozen", [True, False])
def test_auto_mode_accumulates_when_only_the_adapter_learns(gen, monkeypatch, frozen):
    """Below 8 tokens per hidden unit 'auto' recomputes to spare the V x H accumulator;
    with the head frozen only the adapter's V x r one is needed: it accumulates."""
    import kernels.cross_entropy as module

    second_pass = []
    rows_kernel = module._rows_kernel
    monkeypatch.setattr(module, "_rows_kernel", lambda *args, **kw: (
        second_pass.append(kw.get("lse_known", False)), rows_kernel(*args, **kw)))
    hidden, weight, labels = _inputs((20,), 16, 100, torch.float32, gen)
    weight.requires_grad_(not frozen)
    a, b = _low_rank((20,), 100, 2, torch.float32, gen)
    fused_linear_cross_entropy(hidden, weight, labels, chunk_size=8, low_rank=(a, b)).backward()
    assert any(second_pass) is not frozen


def test_half_precision_accumulation_in_vocabulary_slices(gen, monkeypatch):
    """Without an fp32-output addmm (CPU), half-precision chunk products reach the fp32
    accumulator slice by slice; slices that do not divide the vocabulary."""
    import kernels.cross_entropy as module

    monkeypatch.setattr(module, "GRAD_WEIGHT_SLICE", 64)
    hidden, weight, labels = _inputs((40,), 32, 300, torch.float16, gen)
    loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=16,
                                      grad_weight_mode="accumulate")
    loss.backward()
    _, _, ref_dw = _float64_grads(hidden, weight, labels, False)
    assert_rel_close(weight.grad, ref_dw, name="grad weight")


def test_reference_is_hugging_face_loss(gen):
    """The fallback (kernels.reference) computes Hugging Face's loss, shift included."""
    hidden, weight, labels = _inputs((2, 15), 16, 90, torch.float64, gen)
    for shift in (False, True):
        for reduction in ("mean", "sum"):
            got = linear_cross_entropy_reference(hidden, weight, labels, IGNORE, reduction,
                                                 shift_labels=shift)
            want = _hf_loss(hidden, weight, labels, shift, reduction)
            assert rel_error(got, want) < 1e-12


def test_sum_reduction_and_grad_output_scaling(gen):
    hidden, weight, labels = _inputs((30,), 32, 400, torch.float32, gen)
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction="sum", chunk_size=7)
    (2.5 * loss).backward()
    ref_loss, ref_dh, ref_dw = _float64_grads(hidden, weight, labels, False, "sum")
    assert_rel_close(loss, ref_loss, name="loss")
    assert_rel_close(hidden.grad, 2.5 * ref_dh, name="grad hidden")
    assert_rel_close(weight.grad, 2.5 * ref_dw, name="grad weight")


@pytest.mark.parametrize("shift", [False, True])
def test_all_ignored_gives_zero_loss_and_zero_grads(gen, shift):
    hidden, weight, labels = _inputs((12,), 16, 50, torch.float32, gen)
    labels.fill_(IGNORE)
    if shift:
        labels[0] = 3  # the first label is never a target after the shift
    loss = fused_linear_cross_entropy(hidden, weight, labels, shift_labels=shift,
                                      chunk_size=5)
    loss.backward()
    assert loss.item() == 0.0
    assert not hidden.grad.any() and not weight.grad.any()
    # Hugging Face's mean over no target is 0 / 0.
    assert _hf_loss(hidden.detach(), weight.detach(), labels, shift).isnan()


def test_zero_tokens(gen):
    hidden, weight, labels = _inputs((0,), 16, 50, torch.float32, gen)
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == (0, 16) and not weight.grad.any()


def test_only_requested_gradients(gen):
    hidden, weight, labels = _inputs((20,), 16, 100, torch.float32, gen)
    weight.requires_grad_(False)
    fused_linear_cross_entropy(hidden, weight, labels, chunk_size=6).backward()
    _, ref_dh, _ = _float64_grads(hidden, weight, labels, False)
    assert weight.grad is None
    assert_rel_close(hidden.grad, ref_dh, name="grad hidden")
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels)
    assert not loss.requires_grad
    assert_rel_close(loss, _hf_loss(hidden.double(), weight.double(), labels, False))


def test_backward_runs_once(gen):
    hidden, weight, labels = _inputs((8,), 16, 40, torch.float32, gen)
    loss = fused_linear_cross_entropy(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_autocast_casts_like_the_linear_head(gen):
    """Under autocast every operand, the low-rank pair too, is cast as F.linear casts."""
    hidden, weight, labels = _inputs((16,), 32, 120, torch.float32, gen)
    a, b = _low_rank((16,), 120, 3, torch.float32, gen)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        loss = fused_linear_cross_entropy(hidden, weight, labels, low_rank=(a, b))
    loss.backward()
    assert weight.grad.dtype == b.grad.dtype == torch.float32
    half = [t.detach().half().requires_grad_() for t in (hidden, weight, a, b)]
    fused_linear_cross_entropy(*half[:2], labels, low_rank=half[2:]).backward()
    for name, t, h in zip(("hidden", "weight", "a", "b"), (hidden, weight, a, b), half):
        assert_rel_close(t.grad, h.grad.float(), torch.float16, name=f"grad {name}")


@pytest.mark.parametrize("mode", ["accumulate", "recompute"])
def test_fp16_amp_gradients_keep_the_softmax_tail(gen, mode):
    """mmengine's fp16 AMP: fp32 master weights, fp16 autocast, the loss multiplied by
    the dynamic loss scale (2**16) before backward.  A confident model (each token's
    target at p ~ 0.95) leaves every other token a softmax term ``p / n_valid`` near
    1e-7: a few fp16 subnormal steps, or zero, unless scaled before it is rounded, as
    Hugging Face's path is (by the loss scale).  The weight rows of tokens that are never
    a target hold only such terms: they must be as accurate as Hugging Face's (without
    the pre-scale they were 66x less), and every gradient must come back in fp32."""
    n, hidden_size, vocab = 512, 64, 1024
    labels = torch.randint(0, hidden_size, (n,), generator=gen, device=DEVICE)
    hidden = (F.one_hot(labels, hidden_size).float()
              + randn((n, hidden_size), generator=gen, scale=0.05)).requires_grad_()
    weight = torch.cat([10 * torch.eye(hidden_size, device=DEVICE),
                        randn((vocab - hidden_size, hidden_size), generator=gen, scale=0.3)])
    weight.requires_grad_()
    scale = 2.0 ** 16

    def scaled_grads(loss_fn, h, w):
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            loss = loss_fn(h, w)
        (loss * scale).backward()
        return h.grad / scale, w.grad / scale

    ours = scaled_grads(lambda h, w: fused_linear_cross_entropy(
        h, w, labels, chunk_size=200, grad_weight_mode=mode), hidden, weight)
    hf = scaled_grads(lambda h, w: F.cross_entropy(F.linear(h, w).float(), labels),
                      leaf(hidden), leaf(weight))
    # Float64 on the operands autocast computes with (rounded to fp16).
    _, ref_dh, ref_dw = _float64_grads(hidden.half(), weight.half(), labels, False)
    assert ours[0].dtype == ours[1].dtype == torch.float32
    tail = slice(hidden_size, None)
    for name, got, theirs, ref in (("grad hidden", ours[0], hf[0], ref_dh),
                                   ("grad weight", ours[1], hf[1], ref_dw),
                                   ("grad weight, rows never targeted", ours[1][tail],
                                    hf[1][tail], ref_dw[tail])):
        err, hf_err = rel_error(got, ref), rel_error(theirs, ref)
        assert err <= 1.5 * hf_err, (name, err, hf_err)


def test_fp32_adapter_on_a_half_precision_head(gen):
    """PEFT keeps LoRA adapters in fp32 on an fp16 / bf16 base: the pair is cast to the
    head's dtype for the logits, its gradients come back in fp32."""
    hidden, weight, labels = _inputs((24,), 32, 150, torch.float16, gen)
    a, b = _low_rank((24,), 150, 3, torch.float32, gen)
    loss = fused_linear_cross_entropy(hidden, weight, labels, low_rank=(a, b))
    loss.backward()
    assert a.grad.dtype == b.grad.dtype == torch.float32
    as64 = [t.detach().double().requires_grad_() for t in (hidden, weight, a, b)]
    ref = linear_cross_entropy_reference(as64[0], as64[1], labels, IGNORE,
                                         low_rank=(as64[2], as64[3]))
    ref.backward()
    assert_rel_close(loss, ref, torch.float16, name="loss")
    for name, t, t64 in zip(("hidden", "weight", "a", "b"), (hidden, weight, a, b), as64):
        assert_rel_close(t.grad, t64.grad, torch.float16, name=f"grad {name}")


def test_auto_mode_recomputes_below_eight_tokens_per_hidden_unit():
    from kernels.cross_entropy import recomputes_weight_grad

    assert recomputes_weight_grad("auto", 8191, 1024)
    assert not recomputes_weight_grad("auto", 8192, 1024)
    assert recomputes_weight_grad("recompute", 10 ** 6, 1024)
    assert not recomputes_weight_grad("accumulate", 1, 1024)


BAD_INPUTS = {
    "labels-int32": (lambda h, w, l, k: (h, w, l.int(), k), TypeError, "labels must have dtype"),
    "labels-shape": (lambda h, w, l, k: (h, w, l[:5], k), ValueError, "labels must have shape"),
    "label-past-vocab": (lambda h, w, l, k: (h, w, l.fill_(20), k), ValueError,
                         r"labels must be in \[0, 20\)"),
    "negative-label": (lambda h, w, l, k: (h, w, l.fill_(-1), k), ValueError, "labels must be"),
    "weight-hidden-size": (lambda h, w, l, k: (h, w[:, :7], l, k), ValueError,
                           r"weight must be \[vocab, 8\]"),
    "weight-dtype": (lambda h, w, l, k: (h, w.half(), l, k), TypeError,
                     r"weight \(torch.float16\) must have hidden's dtype \(torch.float32\), "
                     "as F.linear requires outside torch.autocast"),
    "weight-1d": (lambda h, w, l, k: (h, w[0], l, k), ValueError, "weight must have 2 dim"),
    "hidden-1d": (lambda h, w, l, k: (h[0], w, l[0], k), ValueError, "hidden must be"),
    "hidden-int": (lambda h, w, l, k: (h.long(), w, l, k), TypeError, "hidden must have dtype"),
    "reduction": (lambda h, w, l, k: (h, w, l, dict(reduction="none")), ValueError, "reduction"),
    "chunk-size": (lambda h, w, l, k: (h, w, l, dict(chunk_size=0)), ValueError, "chunk_size"),
    "grad-weight-mode": (lambda h, w, l, k: (h, w, l, dict(grad_weight_mode="fp32")),
                         ValueError, "grad_weight_mode must be one of"),
    "low-rank-not-a-pair": (lambda h, w, l, k: (h, w, l, dict(low_rank=torch.zeros(6, 2))),
                            TypeError, "low_rank must be a pair"),
    "low-rank-rows": (lambda h, w, l, k: (h, w, l, dict(low_rank=(torch.zeros(5, 2),
                                                                  torch.zeros(20, 2)))),
                      ValueError, r"low_rank must be \(a \[6, r\], b \[20, r\]\)"),
    "low-rank-rank": (lambda h, w, l, k: (h, w, l, dict(low_rank=(torch.zeros(6, 2),
                                                                  torch.zeros(20, 3)))),
                      ValueError, "got a \\(6, 2\\) and b \\(20, 3\\)"),
    "low-rank-integer": (lambda h, w, l, k: (h, w, l, dict(low_rank=(torch.zeros(6, 2).long(),
                                                                     torch.zeros(20, 2)))),
                         TypeError, r"low_rank\[0\] must have dtype"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_name_the_argument(gen, case):
    change, error, message = BAD_INPUTS[case]
    hidden, weight, labels = _inputs((6,), 8, 20, torch.float32, gen)
    hidden, weight, labels, kwargs = change(hidden.detach(), weight.detach(), labels, {})
    with pytest.raises(error, match=message):
        fused_linear_cross_entropy(hidden, weight, labels, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk,mode,rank", [(None, "auto", 0), (1000, "accumulate", 0),
                                             (1000, "recompute", 0), (None, "auto", 16),
                                             (1000, "recompute", 16)])
def test_bf16_on_gpu_at_internlm2_vocab(gen, chunk, mode, rank):
    """92544 vocabulary, bf16: no worse than Hugging Face's bf16 path against float64
    (with ``rank``, a LoRA adapter of that rank on the head, as PEFT adds it)."""
    hidden, weight, labels = _inputs((2048,), 1024, 92544, torch.bfloat16, gen)
    tensors = [hidden, weight]
    low_rank = None
    if rank:
        weight.requires_grad_(False)
        low_rank = _low_rank((2048,), 92544, rank, torch.bfloat16, gen)
        tensors += low_rank
    loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk,
                                      grad_weight_mode=mode, low_rank=low_rank)
    loss.backward()
    as64 = [leaf(t.double()) if t.requires_grad else t.double() for t in tensors]
    theirs = [leaf(t) if t.requires_grad else t for t in tensors]
    ref_loss = linear_cross_entropy_reference(*as64[:2], labels, IGNORE,
                                              low_rank=as64[2:] or None)
    ref_loss.backward()
    hf = linear_cross_entropy_reference(*theirs[:2], labels, IGNORE,
                                        low_rank=theirs[2:] or None)
    hf.backward()
    rows = [("loss", loss, hf, ref_loss)] + [
        (f"grad {i}", t.grad, h.grad, r.grad)
        for i, (t, h, r) in enumerate(zip(tensors, theirs, as64)) if t.requires_grad]
    for name, ours, theirs_, ref in rows:
        err, hf_err = rel_error(ours, ref), rel_error(theirs_, ref)
        assert err <= max(1.5 * hf_err, REL_TOL[torch.bfloat16]), (name, err, hf_err)
    assert HAS_CUDA


@pytest.mark.gpu
def test_cuda_accumulates_inside_the_matrix_product():
    """On CUDA the half-precision weight-gradient products go straight into the fp32
    accumulator (the fast path the bf16 test above then checks numerically)."""
    from kernels.cross_entropy import _has_fp32_out_addmm

    assert HAS_CUDA and _has_fp32_out_addmm(torch.device(DEVICE))
