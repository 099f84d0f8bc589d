"""kernels.rotary against InternLM2's rotary modules (float64) and the PyTorch reference."""

import pytest
import torch

from kernels import apply_rotary, rotary_inv_freq, split_qkv_rotary
from kernels.reference import rotary_reference, split_qkv_rotary_reference
from kernels.reference.rotary import rotary_positions
from tests.helpers import DEVICE, DTYPES, assert_rel_close, leaf, randn


@pytest.fixture
def hf():
    return pytest.importorskip("xtuner._lite.modelings.internlm2.modeling_internlm2",
                               reason="needs xtuner's InternLM2 modeling code")


def _packed_position_ids(lengths, device=DEVICE):
    return torch.cat([torch.arange(n, device=device) for n in lengths])


def _cu_seqlens(lengths, device=DEVICE):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


# (scaling type, factor, rope_theta, max_position_embeddings)
VARIANTS = {
    "plain-theta1e6": (None, 1.0, 1e6, 2048),
    "plain-theta1e4": (None, 1.0, 10000.0, 2048),
    "linear": ("linear", 2.5, 1e6, 2048),
    "dynamic-within": ("dynamic", 2.0, 1e6, 2048),
    "dynamic-beyond": ("dynamic", 2.0, 1e6, 64),
}


def _hf_module(hf, variant, head_dim):
    scaling, factor, theta, max_pos = VARIANTS[variant]
    cls = {None: hf.InternLM2RotaryEmbedding, "linear": hf.InternLM2LinearScalingRotaryEmbedding,
           "dynamic": hf.InternLM2DynamicNTKScalingRotaryEmbedding}[scaling]
    kwargs = {} if scaling is None else {"scaling_factor": factor}
    return cls(head_dim, max_position_embeddings=max_pos, base=theta, **kwargs).to(DEVICE)


def _our_frequencies(variant, head_dim, position_ids):
    scaling, factor, theta, max_pos = VARIANTS[variant]
    return rotary_inv_freq(head_dim, theta, scaling_type=scaling, scaling_factor=factor,
                           max_position_embeddings=max_pos,
                           seq_len=int(position_ids.max()) + 1, device=DEVICE)


def _hf_rotate(hf, variant, q, k, position_ids, dq, dk):
    """HF InternLM2 rotary on [b, s, h, d] tensors in float64: outputs and grads."""
    module = _hf_module(hf, variant, q.shape[-1])
    q64, k64 = leaf(q.double()), leaf(k.double())
    cos, sin = module(q64, position_ids)
    q_out, k_out = hf.apply_rotary_pos_emb(q64, k64, cos, sin, unsqueeze_dim=2)
    torch.autograd.backward([q_out, k_out], [dq.double(), dk.double()])
    return q_out, k_out, q64.grad, k64.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_internlm2(hf, gen, dtype, variant):
    b, s, hq, hk, d = 2, 48, 4, 2, 32
    q = leaf(randn((b, s, hq, d), dtype, generator=gen))
    k = leaf(randn((b, s, hk, d), dtype, generator=gen))
    # Packed rows: positions restart per sample, as XTuner's collate produces.
    position_ids = torch.stack([_packed_position_ids([30, 18]), _packed_position_ids([48]) + 70])
    inv_freq, divisor = _our_frequencies(variant, d, position_ids)
    q_out, k_out = apply_rotary(q, k, position_ids=position_ids, inv_freq=inv_freq,
                                position_divisor=divisor)
    dq, dk = randn(q.shape, dtype, generator=gen), randn(k.shape, dtype, generator=gen)
    torch.autograd.backward([q_out, k_out], [dq, dk])
    ref_q, ref_k, ref_dq, ref_dk = _hf_rotate(hf, variant, q, k, position_ids, dq, dk)
    assert_rel_close(q_out, ref_q, name="q")
    assert_rel_close(k_out, ref_k, name="k")
    assert_rel_close(q.grad, ref_dq, name="dq")
    assert_rel_close(k.grad, ref_dk, name="dk")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inv_freq_is_bitwise_internlm2s(hf, variant):
    d = 128
    position_ids = torch.arange(100, device=DEVICE)[None]
    module = _hf_module(hf, variant, d)
    module(torch.zeros(1, device=DEVICE), position_ids)  # dynamic NTK updates inv_freq here
    inv_freq, divisor = _our_frequencies(variant, d, position_ids)
    assert torch.equal(inv_freq, module.inv_freq.to(DEVICE))
    assert divisor == (VARIANTS[variant][1] if variant == "linear" else 1.0)


def test_long_positions_keep_fp32_accuracy(hf, gen):
    """Angles up to ~1.3e5 rad (128k positions): the in-kernel range reduction holds."""
    d, n = 64, 256
    position_ids = torch.linspace(0, 131071, n, device=DEVICE).long()[None]
    q = randn((1, n, 2, d), torch.float32, generator=gen)
    k = randn((1, n, 1, d), torch.float32, generator=gen)
    for theta in (10000.0, 1e6):
        inv_freq, _ = rotary_inv_freq(d, theta, device=DEVICE)
        q_out, k_out = apply_rotary(q, k, position_ids=position_ids, inv_freq=inv_freq)
        module = hf.InternLM2RotaryEmbedding(d, base=theta).to(DEVICE)
        cos, sin = module(q.double(), position_ids)
        ref_q, ref_k = hf.apply_rotary_pos_emb(q.double(), k.double(), cos, sin, unsqueeze_dim=2)
        assert_rel_close(q_out, ref_q, name="q")
        assert_rel_close(k_out, ref_k, name="k")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cu_seqlens_position_ids_and_reference_agree(gen, dtype):
    lengths = [5, 0, 17, 1, 33]
    t, hq, hk, d = sum(lengths), 3, 1, 24
    q = leaf(randn((t, hq, d), dtype, generator=gen))
    k = leaf(randn((t, hk, d), dtype, generator=gen))
    inv_freq, _ = rotary_inv_freq(d, 1e6, device=DEVICE)
    by_ids = apply_rotary(q, k, position_ids=_packed_position_ids(lengths), inv_freq=inv_freq)
    by_cu = apply_rotary(q, k, cu_seqlens=_cu_seqlens(lengths), inv_freq=inv_freq)
    assert torch.equal(by_ids[0], by_cu[0]) and torch.equal(by_ids[1], by_cu[1])
    ref_q, ref_k = rotary_reference(q.double(), k.double(), cu_seqlens=_cu_seqlens(lengths),
                                    inv_freq=inv_freq)
    assert_rel_close(by_cu[0], ref_q, name="q")
    assert_rel_close(by_cu[1], ref_k, name="k")


def test_mixed_dtypes_each_rotated_in_its_own(gen):
    """q and k of different dtypes, each rotated with cos/sin rounded to its own dtype (as
    Hugging Face rounds them to the activation's); ``inv_freq`` of a model cast as a whole
    (bf16 here) read as fp32, as Hugging Face's ``inv_freq.float()`` reads it."""
    lengths = [9, 30]
    q = leaf(randn((sum(lengths), 4, 32), torch.float16, generator=gen))
    k = leaf(randn((sum(lengths), 2, 32), torch.float32, generator=gen))
    inv_freq = rotary_inv_freq(32, 1e6, device=DEVICE)[0].bfloat16()
    q_out, k_out = apply_rotary(q, k, cu_seqlens=_cu_seqlens(lengths), inv_freq=inv_freq)
    assert (q_out.dtype, k_out.dtype) == (torch.float16, torch.float32)
    dq, dk = randn(q.shape, torch.float16, generator=gen), randn(k.shape, generator=gen)
    torch.autograd.backward([q_out, k_out], [dq, dk])
    q64, k64 = leaf(q.double()), leaf(k.double())
    ref_q, ref_k = rotary_reference(q64, k64, cu_seqlens=_cu_seqlens(lengths),
                                    inv_freq=inv_freq.float())
    torch.autograd.backward([ref_q, ref_k], [dq.double(), dk.double()])
    assert_rel_close(q_out, ref_q, name="q")
    assert_rel_close(k_out, ref_k, name="k")
    assert_rel_close(q.grad, q64.grad, name="dq")
    assert_rel_close(k.grad, k64.grad, name="dk")


def test_sequence_parallel_shard_offset(gen):
    """A rank's shard of a packing: cu_seqlens of the whole packing + the shard start."""
    lengths, world = [10, 23, 7, 24], 4
    total, d = sum(lengths), 16
    full_ids = _packed_position_ids(lengths)
    inv_freq, _ = rotary_inv_freq(d, 10000.0, device=DEVICE)
    shard = total // world
    for rank in range(world):
        lo = rank * shard
        q = randn((shard, 2, d), generator=gen)
        k = randn((shard, 2, d), generator=gen)
        by_cu = apply_rotary(q, k, cu_seqlens=_cu_seqlens(lengths), position_offset=lo,
                             inv_freq=inv_freq)
        by_ids = apply_rotary(q, k, position_ids=full_ids[lo:lo + shard], inv_freq=inv_freq)
        assert torch.equal(by_cu[0], by_ids[0]) and torch.equal(by_cu[1], by_ids[1])


def _wqkv_view(t, hkv, groups, d, dtype, gen):
    """InternLM2's wqkv output [tokens, hkv*(G+2)*d] seen as [1, tokens, hkv, G+2, d]."""
    flat = randn((t, hkv * (groups + 2) * d), dtype, generator=gen)
    return flat, flat.view(1, t, hkv, groups + 2, d)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_wqkv_views(hf, gen, dtype):
    t, hkv, groups, d = 40, 2, 3, 32
    flat, qkv = _wqkv_view(t, hkv, groups, d, dtype, gen)
    q_view, k_view = qkv[..., :groups, :], qkv[..., groups, :]
    position_ids = _packed_position_ids([25, 15])[None]
    inv_freq, _ = rotary_inv_freq(d, 1e6, device=DEVICE)
    q_out, k_out = apply_rotary(q_view, k_view, position_ids=position_ids, inv_freq=inv_freq)
    assert q_out.shape == (1, t, hkv, groups, d) and q_out.is_contiguous()

    module = hf.InternLM2RotaryEmbedding(d, base=1e6).to(DEVICE)
    q64 = q_view.double().reshape(1, t, hkv * groups, d)
    cos, sin = module(q64, position_ids)
    ref_q, ref_k = hf.apply_rotary_pos_emb(q64, k_view.double(), cos, sin, unsqueeze_dim=2)
    assert_rel_close(q_out.reshape(1, t, hkv * groups, d), ref_q, name="q")
    assert_rel_close(k_out, ref_k, name="k")

    # In place (no autograd): q and k rows of the buffer rotate, v rows stay.
    v_before = qkv[..., groups + 1, :].clone()
    with torch.no_grad():
        q_same, k_same = apply_rotary(q_view, k_view, position_ids=position_ids,
                                      inv_freq=inv_freq, in_place=True)
    assert q_same is q_view and k_same is k_view
    assert torch.equal(q_view, q_out) and torch.equal(k_view, k_out)
    assert torch.equal(qkv[..., groups + 1, :], v_before)


def test_split_qkv_rotary_gradient_of_v_alone(gen):
    """Only v used: q and k rows of the qkv gradient are zero, v rows are v's gradient."""
    hkv, groups, d = 2, 1, 8
    flat = leaf(randn((5, hkv * (groups + 2) * d), generator=gen))
    _, _, v = split_qkv_rotary(flat, hkv, d, position_ids=torch.arange(5, device=DEVICE),
                               inv_freq=rotary_inv_freq(d, 1e6, device=DEVICE)[0])
    dv = randn(v.shape, generator=gen)
    v.backward(dv)
    grad = flat.grad.view(5, hkv, groups + 2, d)
    assert torch.equal(grad[:, :, groups + 1], dv)
    assert not grad[:, :, :groups + 1].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
def test_split_qkv_rotary(gen, dtype, interleaved):
    lengths, hkv, groups, d = [9, 30, 1], 2, 2, 16
    t = sum(lengths)
    flat = leaf(randn((t, hkv * (groups + 2) * d), dtype, generator=gen))
    kwargs = dict(cu_seqlens=_cu_seqlens(lengths), interleaved=interleaved,
                  inv_freq=rotary_inv_freq(d, 1e6, device=DEVICE)[0])
    q, k, v = split_qkv_rotary(flat, hkv, d, **kwargs)
    assert q.shape == (t, hkv * groups, d) and k.shape == v.shape == (t, hkv, d)
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()

    flat64 = leaf(flat.double())
    refs = split_qkv_rotary_reference(flat64, hkv, d, **kwargs)
    grads = [randn(x.shape, dtype, generator=gen) for x in (q, k, v)]
    torch.autograd.backward([q, k, v], grads)
    torch.autograd.backward(refs, [g.double() for g in grads])
    for name, out, ref in zip("qkv", (q, k, v), refs):
        assert_rel_close(out, ref, name=name)
    assert torch.equal(v, flat.detach().view(t, hkv, groups + 2, d)[:, :, groups + 1])
    assert_rel_close(flat.grad, flat64.grad, name="dqkv")


def test_split_qkv_rotary_batched_with_unused_outputs(gen):
    """[b, s, width] input; grads for q and v only (k unused): dk's rows are zero."""
    b, s, hkv, groups, d = 2, 12, 1, 4, 16
    flat = leaf(randn((b, s, hkv * (groups + 2) * d), generator=gen))
    position_ids = torch.arange(s, device=DEVICE).expand(b, s) + torch.tensor([[0], [40]],
                                                                               device=DEVICE)
    kwargs = dict(position_ids=position_ids, inv_freq=rotary_inv_freq(d, 10000.0,
                                                                      device=DEVICE)[0])
    q, _, v = split_qkv_rotary(flat, hkv, d, **kwargs)
    assert q.shape == (b, s, hkv * groups, d)
    dq, dv = randn(q.shape, generator=gen), randn(v.shape, generator=gen)
    torch.autograd.backward([q, v], [dq, dv])
    flat64 = leaf(flat.double())
    ref_q, ref_k, ref_v = split_qkv_rotary_reference(flat64, hkv, d, **kwargs)
    torch.autograd.backward([ref_q, ref_v], [dq.double(), dv.double()])
    assert_rel_close(q, ref_q, name="q")
    assert_rel_close(flat.grad, flat64.grad, name="dqkv")


@pytest.mark.parametrize("dtype", DTYPES)
def test_interleaved_layout(gen, dtype):
    b, s, h, d = 2, 20, 3, 24
    q = leaf(randn((b, s, h, d), dtype, generator=gen))
    k = leaf(randn((b, s, 1, d), dtype, generator=gen))
    position_ids = torch.arange(s, device=DEVICE)[None] + 7
    inv_freq, _ = rotary_inv_freq(d, 10000.0, device=DEVICE)
    q_out, k_out = apply_rotary(q, k, position_ids=position_ids, inv_freq=inv_freq,
                                interleaved=True)
    dq, dk = randn(q.shape, dtype, generator=gen), randn(k.shape, dtype, generator=gen)
    torch.autograd.backward([q_out, k_out], [dq, dk])
    q64, k64 = leaf(q.double()), leaf(k.double())
    ref_q, ref_k = rotary_reference(q64, k64, position_ids=position_ids, inv_freq=inv_freq,
                                    interleaved=True)
    torch.autograd.backward([ref_q, ref_k], [dq.double(), dk.double()])
    assert_rel_close(q_out, ref_q, name="q")
    assert_rel_close(k_out, ref_k, name="k")
    assert_rel_close(q.grad, q64.grad, name="dq")
    assert_rel_close(k.grad, k64.grad, name="dk")
    # Pairs (2i, 2i+1) rotate by frequency i: unlike the neox layout.
    neox, _ = apply_rotary(q, k, position_ids=position_ids, inv_freq=inv_freq)
    assert not torch.allclose(neox, q_out)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_cos_sin_cache_matches_internlm2(hf, gen, cache_dtype):
    s, d, n_cached = 32, 32, 300
    q = randn((1, s, 2, d), torch.float16, generator=gen)
    k = randn((1, s, 2, d), torch.float16, generator=gen)
    module = hf.InternLM2RotaryEmbedding(d, base=1e6).to(DEVICE)
    cos, sin = module(torch.zeros(1, device=DEVICE), torch.arange(n_cached, device=DEVICE)[None])
    cache = (cos[0, :, :d // 2].to(cache_dtype), sin[0, :, :d // 2].to(cache_dtype))
    position_ids = torch.randint(0, n_cached, (1, s), generator=gen, device=DEVICE)
    q_out, k_out = apply_rotary(q, k, position_ids=position_ids, cos_sin_cache=cache)
    cos, sin = module(q.double(), position_ids)
    ref_q, ref_k = hf.apply_rotary_pos_emb(q.double(), k.double(), cos, sin, unsqueeze_dim=2)
    assert_rel_close(q_out, ref_q, name="q")
    assert_rel_close(k_out, ref_k, name="k")
    # cos/sin computed in the kernel agree with the fp32 cache up to rare fp16 roundings.
    if cache_dtype == torch.float32:
        inv_freq, _ = rotary_inv_freq(d, 1e6, device=DEVICE)
        q_k, _ = apply_rotary(q, k, position_ids=position_ids, inv_freq=inv_freq)
        assert_rel_close(q_k, q_out, factor=0.1, name="q (kernel cos/sin vs cache)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_under_autograd(gen, dtype):
    q0 = leaf(randn((30, 4, 16), dtype, generator=gen))
    k0 = leaf(randn((30, 2, 16), dtype, generator=gen))
    inv_freq, _ = rotary_inv_freq(16, 1e6, device=DEVICE)
    position_ids = _packed_position_ids([12, 18])
    expected = apply_rotary(q0, k0, position_ids=position_ids, inv_freq=inv_freq)
    dq, dk = randn(q0.shape, dtype, generator=gen), randn(k0.shape, dtype, generator=gen)
    expected_grads = torch.autograd.grad(expected, [q0, k0], [dq, dk])

    q, k = q0 * 1, k0 * 1  # non-leaf, non-view tensors
    q_out, k_out = apply_rotary(q, k, position_ids=position_ids, inv_freq=inv_freq,
                                in_place=True)
    assert q_out is q and k_out is k
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])
    grads = torch.autograd.grad([q_out, k_out], [q0, k0], [dq, dk])
    assert torch.equal(grads[0], expected_grads[0]) and torch.equal(grads[1], expected_grads[1])


@pytest.mark.parametrize("in_place", [False, True])
def test_in_place_grad_rotates_the_incoming_gradients(gen, in_place):
    q0 = leaf(randn((30, 4, 16), generator=gen))
    k0 = leaf(randn((30, 2, 16), generator=gen))
    inv_freq, _ = rotary_inv_freq(16, 1e6, device=DEVICE)
    cu_seqlens = _cu_seqlens([12, 18])
    expected = apply_rotary(q0, k0, cu_seqlens=cu_seqlens, inv_freq=inv_freq)
    dq, dk = randn(q0.shape, generator=gen), randn(k0.shape, generator=gen)
    expected_grads = torch.autograd.grad(expected, [q0, k0], [dq, dk])

    q_out, k_out = apply_rotary(q0 * 1, k0 * 1, cu_seqlens=cu_seqlens, inv_freq=inv_freq,
                                in_place=in_place, in_place_grad=True)
    seen = []
    q_out.grad_fn.register_hook(lambda grad_inputs, grad_outputs: seen.extend(grad_inputs))
    incoming = (dq.clone(), dk.clone())
    grads = torch.autograd.grad([q_out, k_out], [q0, k0], incoming)
    assert torch.equal(grads[0], expected_grads[0]) and torch.equal(grads[1], expected_grads[1])
    assert [g.data_ptr() for g in seen] == [t.data_ptr() for t in incoming]
    # An expanded gradient (every element one value) cannot hold the result: copied.
    q_out, k_out = apply_rotary(q0, k0, cu_seqlens=cu_seqlens, inv_freq=inv_freq,
                                in_place_grad=True)
    (q_out.sum() + k_out.sum()).backward()
    ones = [torch.ones_like(q0), torch.ones_like(k0)]
    assert_rel_close(q0.grad, torch.autograd.grad(expected, [q0, k0], ones)[0], name="dq")


def test_rotary_positions_reference():
    cu = _cu_seqlens([3, 4])
    assert rotary_positions(1, 5, cu_seqlens=cu, position_offset=2).tolist() == [[2, 0, 1, 2, 3]]
    ids = torch.tensor([4, 5, 6], device=DEVICE)
    assert rotary_positions(2, 3, position_ids=ids).tolist() == [[4, 5, 6], [4, 5, 6]]


def _bad_case(name):
    """Arguments of apply_rotary with one thing wrong, by name."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = randn((8, 4, 16), generator=g)
    k = randn((8, 2, 16), generator=g)
    ids = torch.arange(8, device=DEVICE)
    inv = rotary_inv_freq(16, 1e6, device=DEVICE)[0]
    cu = _cu_seqlens([3, 5])
    cache = (randn((6, 8), generator=g), randn((6, 8), generator=g))
    args = dict(q=q, k=k, position_ids=ids, inv_freq=inv)
    change = {
        "k-tokens": dict(k=randn((7, 2, 16), generator=g)),
        "k-integer": dict(k=k.long()),
        "head-dim": dict(k=randn((8, 2, 8), generator=g)),
        "odd-head-dim": dict(q=randn((8, 4, 15), generator=g), k=randn((8, 2, 15), generator=g),
                             inv_freq=inv[:7]),
        "q-2d": dict(q=q[:, 0]),
        "q-int": dict(q=q.int()),
        "q-last-dim-strided": dict(q=randn((8, 4, 32), generator=g)[..., ::2]),
        "ids-shape": dict(position_ids=ids[:7]),
        "ids-float": dict(position_ids=ids.float()),
        "no-positions": dict(position_ids=None),
        "two-positions": dict(cu_seqlens=cu),
        "no-angles": dict(inv_freq=None),
        "inv-freq-size": dict(inv_freq=inv[:4]),
        "inv-freq-dtype": dict(inv_freq=inv.double()),
        "divisor-with-cache": dict(inv_freq=None, cos_sin_cache=(cache[0][:, :8],) * 2,
                                   position_divisor=2.0, position_ids=ids % 6),
        "cache-columns": dict(inv_freq=None, cos_sin_cache=(cache[0][:, :4], cache[1][:, :4])),
        "cache-range-ids": dict(inv_freq=None, cos_sin_cache=cache),
        "cache-range-cu": dict(inv_freq=None, cos_sin_cache=(cache[0][:4], cache[1][:4]),
                               position_ids=None, cu_seqlens=cu),
        "cache-not-pair": dict(inv_freq=None, cos_sin_cache=cache[0]),
        "cu-int64": dict(position_ids=None, cu_seqlens=cu.long()),
        "cu-decreasing": dict(position_ids=None, cu_seqlens=cu.flip(0)),
        "cu-offset": dict(position_ids=None, cu_seqlens=cu, position_offset=1),
        "cu-batched": dict(q=q[None].expand(2, -1, -1, -1), k=k[None].expand(2, -1, -1, -1),
                           position_ids=None, cu_seqlens=cu),
    }[name]
    args.update(change)
    return args


BAD = {
    "k-tokens": (ValueError, "same token dimensions"),
    "k-integer": (TypeError, "k must have dtype"),
    "head-dim": (ValueError, "head size"),
    "odd-head-dim": (ValueError, "even head size"),
    "q-2d": (ValueError, r"q must be \[tokens, heads, d\]"),
    "q-int": (TypeError, "q must have dtype"),
    "q-last-dim-strided": (ValueError, "q must be contiguous in its last dimension"),
    "ids-shape": (ValueError, "position_ids must have shape"),
    "ids-float": (TypeError, "position_ids must have dtype"),
    "no-positions": (ValueError, "exactly one of position_ids and cu_seqlens"),
    "two-positions": (ValueError, "exactly one of position_ids and cu_seqlens"),
    "no-angles": (ValueError, "exactly one of inv_freq and cos_sin_cache"),
    "inv-freq-size": (ValueError, "inv_freq must have head_dim // 2 = 8"),
    "inv-freq-dtype": (TypeError, "inv_freq must have dtype"),
    "divisor-with-cache": (ValueError, "position_divisor applies to inv_freq"),
    "cache-columns": (ValueError, "must have head_dim // 2 = 8 columns"),
    "cache-range-ids": (ValueError, r"positions span \[0, 7\] but cos_sin_cache holds "
                                    r"positions \[0, 5\]"),
    "cache-range-cu": (ValueError, r"positions span \[0, 4\] but cos_sin_cache"),
    "cache-not-pair": (TypeError, "cos_sin_cache must be a pair"),
    "cu-int64": (TypeError, "cu_seqlens must have dtype int32"),
    "cu-decreasing": (ValueError, "cu_seqlens must start at 0"),
    "cu-offset": (ValueError, r"tokens \[1, 9\)"),
    "cu-batched": (ValueError, "batch size 2"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs_are_rejected(name):
    error, match = BAD[name]
    with pytest.raises(error, match=match):
        apply_rotary(**_bad_case(name))


def test_in_place_on_views_under_autograd_is_rejected(gen):
    flat = leaf(randn((6, 4 * 16), generator=gen))
    qkv = (flat * 1).view(1, 6, 1, 4, 16)
    inv_freq, _ = rotary_inv_freq(16, 1e6, device=DEVICE)
    with pytest.raises(ValueError, match="not views"):
        apply_rotary(qkv[..., :2, :], qkv[..., 2, :], position_ids=torch.arange(6, device=DEVICE),
                     inv_freq=inv_freq, in_place=True)


@pytest.mark.parametrize("width, hkv, d, match", [
    (5 * 16 + 8, 1, 16, "not num_kv_heads"),
    (2 * 16, 1, 16, "not num_kv_heads"),
    (4 * 15, 1, 15, "head_dim even"),
])
def test_split_qkv_rotary_bad_widths(gen, width, hkv, d, match):
    qkv = randn((4, width), generator=gen)
    with pytest.raises(ValueError, match=match):
        split_qkv_rotary(qkv, hkv, d, position_ids=torch.arange(4, device=DEVICE),
                         inv_freq=torch.ones(d // 2, device=DEVICE))


def test_unknown_scaling_type():
    with pytest.raises(ValueError, match="scaling_type"):
        rotary_inv_freq(128, 1e6, scaling_type="yarn")
    with pytest.raises(ValueError, match="seq_len"):
        rotary_inv_freq(128, 1e6, scaling_type="dynamic")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(32, 8), (16, 8)], ids=["7b", "1_8b"])
def test_internlm2_shapes_on_gpu(gen, dtype, heads):
    """A 4k-token pack of InternLM2 wqkv output, split + RoPE, vs float64 (theta 1e6)."""
    hq, hkv = heads
    d, lengths = 128, [1000, 3000, 96]
    t = sum(lengths)
    flat = leaf(randn((t, (hq + 2 * hkv) * d), dtype, generator=gen))
    kwargs = dict(cu_seqlens=_cu_seqlens(lengths), inv_freq=rotary_inv_freq(d, 1e6,
                                                                            device=DEVICE)[0])
    outs = split_qkv_rotary(flat, hkv, d, **kwargs)
    grads = [randn(x.shape, dtype, generator=gen) for x in outs]
    torch.autograd.backward(outs, grads)
    flat64 = leaf(flat.double())
    refs = split_qkv_rotary_reference(flat64, hkv, d, **kwargs)
    torch.autograd.backward(refs, [g.double() for g in grads])
    for name, out, ref in zip("qkv", outs, refs):
        assert_rel_close(out, ref, name=name)
    assert_rel_close(flat.grad, flat64.grad, name="dqkv")

    # The same through apply_rotary on [b, s, h, d] with position_ids, and in place.
    q = randn((2, 2048, hq, d), dtype, generator=gen)
    k = randn((2, 2048, hkv, d), dtype, generator=gen)
    ids = torch.randint(0, 32768, (2, 2048), device=DEVICE)
    ref_q, ref_k = rotary_reference(q.double(), k.double(), position_ids=ids,
                                    inv_freq=kwargs["inv_freq"])
    out_q, out_k = apply_rotary(q, k, position_ids=ids, inv_freq=kwargs["inv_freq"],
                                in_place=True)
    assert_rel_close(out_q, ref_q, name="q (in place)")
    assert_rel_close(out_k, ref_k, name="k (in place)")


@pytest.mark.gpu
def test_long_positions_on_gpu(gen):
    """The GPU's fast sin/cos: fp32 at 128k positions matches float64 references."""
    d, n = 128, 4096
    position_ids = torch.linspace(0, 131071, n, device=DEVICE).long()
    q = randn((n, 4, d), torch.float32, generator=gen)
    k = randn((n, 1, d), torch.float32, generator=gen)
    for theta in (10000.0, 1e6):
        inv_freq, _ = rotary_inv_freq(d, theta, device=DEVICE)
        out = apply_rotary(q, k, position_ids=position_ids, inv_freq=inv_freq)
        ref = rotary_reference(q.double(), k.double(), position_ids=position_ids,
                               inv_freq=inv_freq)
        for name, o, r in zip("qk", out, ref):
            err = assert_rel_close(o, r, torch.float32, name=name)
            assert err < 1e-5, f"{name}: {err:.2e}"
