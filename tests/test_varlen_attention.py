"""kernels.varlen_attention against the float64 per-sequence reference (and FA2 on a GPU)."""

import pytest
import torch

from kernels import attn_func, varlen_attn_func
from kernels._runtime import packed_heads
from kernels.reference import varlen_attn_reference
from kernels.varlen_attention import SUPPORTED_HEAD_DIMS
from tests.baselines import fa2_name, fa2_unavailable_reason, fa2_varlen
from tests.helpers import (DEVICE, DTYPES, REL_TOL, assert_rel_close,
                           make_generator, randn, rel_error)

# Gradients go through one more rounding (of dS) to the input dtype than the output
# does and sum over whole sequences (dK/dV also over the query-head group), so they are
# allowed twice the output's tolerance.  Worst errors measured on CPU: fp16 out 2.7e-4,
# grads 4.0e-4; fp32 out 3.3e-7, grads 5.2e-7 (tolerances 2e-3 and 1e-5).  On a GPU
# fp32 products are tf32 and bf16 rounds P and dS coarsely, hence the margin.
GRAD_FACTOR = 2.0


def _dtype_id(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32)


def _random_lengths(g, n, low, high, specials=()):
    """``n`` lengths in ``[low, high]`` with ``specials`` inserted at random places."""
    lengths = torch.randint(low, high + 1, (n,), generator=g).tolist()
    for value in specials:
        lengths.insert(int(torch.randint(0, len(lengths) + 1, (1,), generator=g)), value)
    return lengths


# id -> (hq, hkv, head_dim, lengths_q(g), lengths_k(g) or None for the same lengths)
CASES = {
    "mixed-g4": (4, 1, 64, lambda g: _random_lengths(g, 5, 2, 150, (0, 1)), None),
    "one-long-g1": (2, 2, 64, lambda g: _random_lengths(g, 1, 180, 260), None),
    "many-short-g2": (4, 2, 64, lambda g: _random_lengths(g, 24, 0, 12, (0, 1)), None),
    "g8-d96": (8, 1, 96, lambda g: _random_lengths(g, 2, 20, 80, (1,)), None),
    "g2-d128": (4, 2, 128, lambda g: _random_lengths(g, 2, 20, 70), None),
    # q longer than k, shorter, equal, and empty on either side (bottom-right causal).
    "cross-g2": (4, 2, 64, lambda g: [40, 7, 33, 0, 5, 1], lambda g: [9, 50, 33, 6, 0, 1]),
}


def _inputs(case, dtype, gen, seed):
    hq, hkv, d, lengths_q, lengths_k = CASES[case]
    g = make_generator(seed, "cpu")
    lens_q = lengths_q(g)
    lens_k = lengths_k(g) if lengths_k is not None else lens_q
    q = randn((sum(lens_q), hq, d), dtype, generator=gen).requires_grad_()
    k = randn((sum(lens_k), hkv, d), dtype, generator=gen).requires_grad_()
    v = randn((sum(lens_k), hkv, d), dtype, generator=gen).requires_grad_()
    return q, k, v, _cu(lens_q).to(DEVICE), _cu(lens_k).to(DEVICE), lens_q, lens_k


def _reference(q, k, v, cu_q, cu_k, dout, causal, softmax_scale=None):
    """float64 ``out, lse`` and the gradients of ``<out, dout>`` from the same inputs."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out, lse = varlen_attn_reference(q64, k64, v64, cu_q, cu_k, softmax_scale, causal)
    out.backward(dout.double())
    return out, lse, q64.grad, k64.grad, v64.grad


def _check_lse(lse, ref_lse):
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    # Rows that see no key report +inf, as flash-attn 2 does.
    assert torch.equal(torch.isinf(lse).cpu(), torch.isinf(ref_lse).cpu())
    seen = torch.isfinite(ref_lse)
    assert_rel_close(lse[seen], ref_lse[seen], torch.float32, name="lse")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype, causal, gen, seed):
    q, k, v, cu_q, cu_k, lens_q, lens_k = _inputs(case, dtype, gen, seed)
    out, lse = varlen_attn_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                causal=causal, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    dout = randn(out.shape, dtype, generator=gen)
    out.backward(dout)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = _reference(q, k, v, cu_q, cu_k, dout, causal)
    assert_rel_close(out, ref_out, dtype, name="out")
    _check_lse(lse, ref_lse)
    for name, grad, ref in (("dq", q.grad, ref_dq), ("dk", k.grad, ref_dk), ("dv", v.grad, ref_dv)):
        assert grad.dtype == dtype
        assert_rel_close(grad, ref, dtype, factor=GRAD_FACTOR, name=name)


def test_softmax_scale_and_no_lse(gen, seed):
    q, k, v, cu_q, cu_k, lens_q, lens_k = _inputs("cross-g2", torch.float32, gen, seed)
    out = varlen_attn_func(q, k, v, cu_q, cu_k, max(lens_q) + 5, max(lens_k), 0.0, 0.3,
                           True)
    assert isinstance(out, torch.Tensor)
    dout = randn(out.shape, generator=gen)
    out.backward(dout)
    ref_out, _, ref_dq, ref_dk, ref_dv = _reference(q, k, v, cu_q, cu_k, dout, True, 0.3)
    assert_rel_close(out, ref_out, name="out")
    for name, grad, ref in (("dq", q.grad, ref_dq), ("dk", k.grad, ref_dk), ("dv", v.grad, ref_dv)):
        assert_rel_close(grad, ref, torch.float32, factor=GRAD_FACTOR, name=name)


@pytest.mark.parametrize("layout", ["internlm2", "heads-concatenated"])
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=_dtype_id)
def test_strided_views_of_fused_qkv(layout, dtype, gen):
    """q, k, v read in place from one fused projection output; grads reach the buffer."""
    hkv, group, d = 2, 2, 64
    hq = hkv * group
    lengths = [30, 1, 0, 47]
    total = sum(lengths)
    cu = _cu(lengths).to(DEVICE)
    if layout == "internlm2":
        # [t, hkv, G + 2, d]: k and v are strided views; q of one kv head's group is
        # contiguous within the group but not across groups, so it is copied.
        qkv = randn((total, hkv, group + 2, d), dtype, generator=gen).requires_grad_()

        def split(x):
            return x[:, :, :group].reshape(total, hq, d), x[:, :, group], x[:, :, group + 1]
    else:
        qkv = randn((total, hq + 2 * hkv, d), dtype, generator=gen).requires_grad_()

        def split(x):
            return x[:, :hq], x[:, hq:hq + hkv], x[:, hq + hkv:]
    q, k, v = split(qkv)
    assert k.stride(0) == qkv.stride(0) and not k.is_contiguous()
    out = varlen_attn_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    # A gradient with strided rows, as a transposed projection would hand back.
    dout = randn((hq, total, d), dtype, generator=gen).transpose(0, 1)
    out.backward(dout)

    qkv64 = qkv.detach().double().requires_grad_()
    ref, _ = varlen_attn_reference(*split(qkv64), cu, cu, causal=True)
    ref.backward(dout.double())
    assert_rel_close(out, ref, dtype, name="out")
    assert_rel_close(qkv.grad, qkv64.grad, dtype, factor=GRAD_FACTOR, name="dqkv")


def test_gradients_of_packed_heads_are_one_buffer(gen):
    """q, k, v as consecutive head ranges of one tensor (the sequence-parallel receive
    buffer): dq, dk, dv come back as consecutive head ranges of one tensor too."""
    hq, hkv, d = 4, 2, 64
    lengths = [19, 0, 26]
    total = sum(lengths)
    cu = _cu(lengths).to(DEVICE)
    qkv = randn((total, hq + 2 * hkv, d), torch.float32, generator=gen).requires_grad_()
    q, k, v = qkv.split([hq, hkv, hkv], dim=1)
    out = varlen_attn_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    dout = randn((total, hq, d), torch.float32, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    dqkv = packed_heads(grads)
    assert dqkv is not None

    qkv64 = qkv.detach().double().requires_grad_()
    ref, _ = varlen_attn_reference(*qkv64.split([hq, hkv, hkv], dim=1), cu, cu, causal=True)
    ref.backward(dout.double())
    assert_rel_close(dqkv, qkv64.grad, torch.float32, factor=GRAD_FACTOR, name="dqkv")


def test_autocast_computes_in_its_dtype(gen):
    """Under autocast, fp32 (or mixed) inputs are cast to the autocast dtype, as torch's
    scaled_dot_product_attention casts them: the very result of fp16 inputs, gradients
    back in each input's dtype."""
    hq, hkv, d = 4, 2, 64
    lengths = [21, 40]
    cu = _cu(lengths).to(DEVICE)
    q = randn((sum(lengths), hq, d), generator=gen).requires_grad_()
    k = randn((sum(lengths), hkv, d), torch.float16, generator=gen).requires_grad_()
    v = randn((sum(lengths), hkv, d), generator=gen).requires_grad_()
    dout = randn((sum(lengths), hq, d), torch.float16, generator=gen)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        out = varlen_attn_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    assert out.dtype == torch.float16
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert [g.dtype for g in grads] == [torch.float32, torch.float16, torch.float32]
    half = [x.detach().half().requires_grad_() for x in (q, k, v)]
    want = varlen_attn_func(*half, cu, cu, max(lengths), max(lengths), causal=True)
    assert torch.equal(out, want)
    for got, ref in zip(grads, torch.autograd.grad(want, half, dout)):
        assert torch.equal(got, ref.to(got.dtype))


def test_padded_batch_wrapper(gen):
    batch, seqlen, hq, hkv, d = 3, 37, 4, 2, 64
    q = randn((batch, seqlen, hq, d), generator=gen).requires_grad_()
    k = randn((batch, seqlen, hkv, d), generator=gen).requires_grad_()
    v = randn((batch, seqlen, hkv, d), generator=gen).requires_grad_()
    out, lse = attn_func(q, k, v, causal=True, return_lse=True)
    assert out.shape == q.shape and lse.shape == (batch, hq, seqlen)
    dout = randn(out.shape, generator=gen)
    out.backward(dout)
    cu = _cu([seqlen] * batch).to(DEVICE)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = _reference(
        q.reshape(-1, hq, d), k.reshape(-1, hkv, d), v.reshape(-1, hkv, d), cu, cu,
        dout.reshape(-1, hq, d), True)
    assert_rel_close(out.reshape(-1, hq, d), ref_out, name="out")
    assert_rel_close(lse.transpose(0, 1).reshape(hq, -1), ref_lse, torch.float32, name="lse")
    assert_rel_close(q.grad.reshape(-1, hq, d), ref_dq, torch.float32, factor=GRAD_FACTOR)
    assert_rel_close(k.grad.reshape(-1, hkv, d), ref_dk, torch.float32, factor=GRAD_FACTOR)
    assert_rel_close(v.grad.reshape(-1, hkv, d), ref_dv, torch.float32, factor=GRAD_FACTOR)


def test_backward_is_deterministic(gen, seed):
    q, k, v, cu_q, cu_k, lens_q, lens_k = _inputs("mixed-g4", torch.float32, gen, seed)
    dout = randn((q.shape[0],) + q.shape[1:], generator=gen)
    runs = []
    for _ in range(2):
        for x in (q, k, v):
            x.grad = None
        out = varlen_attn_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True)
        out.backward(dout)
        runs.append([out.detach().clone(), q.grad.clone(), k.grad.clone(), v.grad.clone()])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("lengths_q,lengths_k", [([], []), ([0, 0], [3, 5]), ([4, 0], [0, 0])],
                         ids=["no-sequences", "empty-queries", "empty-keys"])
def test_empty_sides(lengths_q, lengths_k, gen):
    """No work at all, or none on one side: out is 0 / lse +inf for rows without keys,
    and keys without queries get zero gradients."""
    hq, hkv, d = 2, 1, 64
    q = randn((sum(lengths_q), hq, d), generator=gen).requires_grad_()
    k = randn((sum(lengths_k), hkv, d), generator=gen).requires_grad_()
    v = randn((sum(lengths_k), hkv, d), generator=gen).requires_grad_()
    cu_q, cu_k = _cu(lengths_q).to(DEVICE), _cu(lengths_k).to(DEVICE)
    out, lse = varlen_attn_func(q, k, v, cu_q, cu_k, max(lengths_q, default=0),
                                max(lengths_k, default=0), return_lse=True)
    assert out.shape == q.shape and lse.shape == (hq, q.shape[0])
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isinf(lse).all() and (lse > 0).all()
    out.backward(randn(out.shape, generator=gen))
    for grad, x in ((q.grad, q), (k.grad, k), (v.grad, v)):
        assert grad.shape == x.shape and torch.equal(grad, torch.zeros_like(grad))


def _bad_args():
    """Valid arguments: two sequences, hq 4, hkv 2, d 64."""
    return dict(q=torch.randn(10, 4, 64, device=DEVICE), k=torch.randn(12, 2, 64, device=DEVICE),
                v=torch.randn(12, 2, 64, device=DEVICE), cu_seqlens_q=_cu([4, 6]).to(DEVICE),
                cu_seqlens_k=_cu([5, 7]).to(DEVICE), max_seqlen_q=6, max_seqlen_k=7)


def _cu_raw(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


BAD_INPUTS = {
    "dtype-mismatch": (dict(k=lambda a: a["k"].half()), TypeError, "share a dtype"),
    "integer-dtype": (dict(q=lambda a: a["q"].long()), TypeError, "q must have dtype in"),
    "q-rank": (dict(q=lambda a: a["q"][None]), ValueError, "q must have 3 dimensions"),
    "v-rank": (dict(v=lambda a: a["v"].flatten(1)), ValueError, "v must have 3 dimensions"),
    "k-v-shapes": (dict(v=lambda a: a["v"][:, :1]), ValueError, "k and v must have the same shape"),
    "head-dim-mismatch": (dict(k=lambda a: a["k"][..., :32].contiguous(),
                               v=lambda a: a["v"][..., :32].contiguous()),
                          ValueError, "same head_dim"),
    "unsupported-head-dim": (dict(q=lambda a: a["q"][..., :48].contiguous(),
                                  k=lambda a: a["k"][..., :48].contiguous(),
                                  v=lambda a: a["v"][..., :48].contiguous()),
                             ValueError, "head_dim 48 is not supported"),
    "gqa-ratio": (dict(q=lambda a: a["q"][:, :3]), ValueError, r"query heads \(3\) must be a multiple"),
    "strided-last-dim": (dict(q=lambda a: torch.randn(10, 4, 128, device=DEVICE)[..., ::2]),
                         ValueError, "q must be contiguous in its last dimension"),
    "cu-int64": (dict(cu_seqlens_q=lambda a: a["cu_seqlens_q"].long()), TypeError,
                 "cu_seqlens_q must have dtype int32"),
    "cu-start": (dict(cu_seqlens_q=lambda a: _cu_raw([1, 4, 10])), ValueError,
                 "cu_seqlens_q must start at 0"),
    "cu-decreasing": (dict(cu_seqlens_k=lambda a: _cu_raw([0, 13, 12])), ValueError,
                      "cu_seqlens_k must be non-decreasing"),
    "cu-end": (dict(cu_seqlens_k=lambda a: _cu_raw([0, 5, 11])), ValueError,
               "cu_seqlens_k must end at the token count 12"),
    "batch-mismatch": (dict(cu_seqlens_k=lambda a: _cu_raw([0, 12]), max_seqlen_k=lambda a: 12),
                       ValueError,
                       "same number of sequences"),
    "max-seqlen-q": (dict(max_seqlen_q=lambda a: 5), ValueError,
                     r"max_seqlen_q=5 is smaller than the longest sequence in cu_seqlens_q \(6\)"),
    "max-seqlen-k": (dict(max_seqlen_k=lambda a: 6), ValueError, "max_seqlen_k=6 is smaller"),
    "dropout": (dict(dropout_p=lambda a: 0.1), NotImplementedError, "dropout_p=0.1"),
    "softmax-scale": (dict(softmax_scale=lambda a: -1.0), ValueError, "softmax_scale"),
}


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
def test_bad_inputs_raise(bad):
    changes, error, message = BAD_INPUTS[bad]
    args = _bad_args()
    args.update({name: change(args) for name, change in changes.items()})
    with pytest.raises(error, match=message):
        varlen_attn_func(**args)


def test_validation_runs_once_per_cu_seqlens(gen, monkeypatch):
    """Layers sharing one packing validate it (a device sync) once; a packing changed in
    place is validated again and attended over as it now is, not as it was."""
    import kernels.varlen_attention as module

    calls = []
    checked = module.check_cu_seqlens
    monkeypatch.setattr(module, "check_cu_seqlens",
                        lambda name, *a: calls.append(name) or checked(name, *a))
    q = randn((30, 4, 64), generator=gen).requires_grad_()
    k, v = (randn((30, 2, 64), generator=gen).requires_grad_() for _ in range(2))
    cu = _cu([10, 20]).to(DEVICE)
    for _ in range(3):
        out = varlen_attn_func(q, k, v, cu, cu, 20, 20, causal=True)
        out.sum().backward()
    assert calls == ["cu_seqlens_q", "cu_seqlens_k"]
    with pytest.raises(ValueError, match="max_seqlen_q=19 is smaller"):
        varlen_attn_func(q, k, v, cu, cu, 19, 20, causal=True)

    cu[1] = 25
    for x in (q, k, v):
        x.grad = None
    out = varlen_attn_func(q, k, v, cu, cu, 25, 25, causal=True)
    dout = randn(out.shape, generator=gen)
    out.backward(dout)
    assert len(calls) == 4
    ref = _reference(q, k, v, cu, cu, dout, causal=True)
    assert_rel_close(out, ref[0], torch.float32, name="out")
    for name, grad, ref_grad in zip("qkv", (q.grad, k.grad, v.grad), ref[2:]):
        assert_rel_close(grad, ref_grad, torch.float32, factor=GRAD_FACTOR, name=f"d{name}")

    cu[1] = 31
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        varlen_attn_func(q, k, v, cu, cu, 31, 31, causal=True)


def test_supported_head_dims():
    assert {64, 96, 128} <= set(SUPPORTED_HEAD_DIMS)


# ----------------------------------------------------------------------------- GPU
# A realistic SFT packing of ~4k tokens: long and short samples, one of length 1.
GPU_LENGTHS = [1021, 37, 1, 1800, 530, 213, 494]


def _grads_of(fn, q, k, v, dout):
    for x in (q, k, v):
        x.grad = None
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("heads", [(32, 8), (16, 8)], ids=["internlm2-7b", "internlm2-1.8b"])
def test_gpu_internlm2_no_worse_than_fa2(heads, dtype, gen):
    reason = fa2_unavailable_reason()
    if reason:
        pytest.skip(f"FA2 baseline unavailable: {reason}")
    hq, hkv = heads
    d = 128
    total = sum(GPU_LENGTHS)
    cu = _cu(GPU_LENGTHS).to(DEVICE)
    longest = max(GPU_LENGTHS)
    q = randn((total, hq, d), dtype, generator=gen).requires_grad_()
    k = randn((total, hkv, d), dtype, generator=gen).requires_grad_()
    v = randn((total, hkv, d), dtype, generator=gen).requires_grad_()
    dout = randn((total, hq, d), dtype, generator=gen)
    ours = _grads_of(lambda q, k, v: varlen_attn_func(q, k, v, cu, cu, longest, longest,
                                                      causal=True), q, k, v, dout)
    theirs = _grads_of(lambda q, k, v: fa2_varlen(q, k, v, cu, cu, longest, longest, True),
                       q, k, v, dout)
    ref = _reference(q, k, v, cu, cu, dout, True)
    ref = [ref[0]] + list(ref[2:])
    report = []
    for name, mine, fa, exact in zip(("out", "dq", "dk", "dv"), ours, theirs, ref):
        err, fa_err = rel_error(mine, exact), rel_error(fa, exact)
        report.append(f"{name}: ours {err:.3e} vs {fa2_name()} {fa_err:.3e}")
        # No worse than FA2's own rounding; the floor keeps a lucky FA2 draw from failing us.
        assert err <= max(1.5 * fa_err, 0.1 * REL_TOL[dtype]), "; ".join(report)
    print(f"\n[{hq}/{hkv} d{d} {dtype}] " + "; ".join(report))


@pytest.mark.gpu
def test_gpu_offsets_past_int32(gen):
    """Over 2**31 elements in q: token * stride products must be 64-bit."""
    hq, hkv, d, seqlen = 16, 8, 128, 2048
    n_seqs = (2 ** 31) // (seqlen * hq * d) + 2
    total = n_seqs * seqlen
    cu = torch.arange(n_seqs + 1, dtype=torch.int32, device=DEVICE) * seqlen
    q = randn((total, hq, d), torch.bfloat16, generator=gen).requires_grad_()
    k = randn((total, hkv, d), torch.bfloat16, generator=gen).requires_grad_()
    v = randn((total, hkv, d), torch.bfloat16, generator=gen).requires_grad_()
    out, lse = varlen_attn_func(q, k, v, cu, cu, seqlen, seqlen, causal=True, return_lse=True)
    dout = randn(out.shape, torch.bfloat16, generator=gen)
    out.backward(dout)
    cu_one = _cu([seqlen]).to(DEVICE)
    for s in (0, n_seqs - 1):
        rows = slice(s * seqlen, (s + 1) * seqlen)
        ref_out, ref_lse, ref_dq, ref_dk, ref_dv = _reference(
            q[rows], k[rows], v[rows], cu_one, cu_one, dout[rows], True)
        assert_rel_close(out[rows], ref_out, name=f"out of sequence {s}")
        assert_rel_close(lse[:, rows], ref_lse, torch.float32, name=f"lse of sequence {s}")
        for name, grad, ref in (("dq", q.grad, ref_dq), ("dk", k.grad, ref_dk),
                                ("dv", v.grad, ref_dv)):
            assert_rel_close(grad[rows], ref, torch.bfloat16, factor=GRAD_FACTOR,
                             name=f"{name} of sequence {s}")

