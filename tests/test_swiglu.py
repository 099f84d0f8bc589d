"""kernels.swiglu against InternLM2MLP's gate ``act_fn(w1 x) * w3 x`` in float64."""

import pytest
import torch
import torch.nn.functional as F

from kernels import swiglu
from kernels.reference import swiglu_reference
from tests.helpers import DEVICE, DTYPES, assert_rel_close, leaf, randn


def _float64(a, b, dy):
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    y = F.silu(a64) * b64
    y.backward(dy.double())
    return y, a64.grad, b64.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 96), (2, 3, 1000), (5, 4100)],
                         ids=["96", "3d-1000", "blocks-4100"])
def test_matches_float64(gen, dtype, shape):
    # Gate pre-activations of a few units: both tails of silu are exercised.
    a = leaf(randn(shape, dtype, generator=gen, scale=3.0))
    b = leaf(randn(shape, dtype, generator=gen))
    y = swiglu(a, b)
    assert y.shape == shape and y.dtype == dtype and y.is_contiguous()
    dy = randn(shape, dtype, generator=gen)
    y.backward(dy)
    ref_y, ref_da, ref_db = _float64(a, b, dy)
    assert_rel_close(y, ref_y, name="y")
    assert_rel_close(a.grad, ref_da, name="da")
    assert_rel_close(b.grad, ref_db, name="db")


@pytest.mark.parametrize("a_dtype, b_dtype", [(torch.float16, torch.float32),
                                             (torch.float32, torch.float16)])
def test_mixed_dtypes_follow_pytorch_promotion(gen, a_dtype, b_dtype):
    """``silu(a) * b`` in PyTorch has the promoted dtype; each gradient its input's."""
    a = leaf(randn((6, 300), a_dtype, generator=gen, scale=3.0))
    b = leaf(randn((6, 300), b_dtype, generator=gen))
    y = swiglu(a, b)
    assert y.dtype == torch.float32
    dy = randn(y.shape, generator=gen)
    y.backward(dy)
    ref_y, ref_da, ref_db = _float64(a, b, dy)
    for name, got, ref in (("y", y, ref_y), ("da", a.grad, ref_da), ("db", b.grad, ref_db)):
        assert_rel_close(got, ref, torch.float16, name=name)
    assert (a.grad.dtype, b.grad.dtype) == (a_dtype, b_dtype)


def test_reference_matches_float64(gen):
    a, b = (randn((7, 33), torch.float64, generator=gen) for _ in range(2))
    assert_rel_close(swiglu_reference(a, b), F.silu(a) * b)


def test_halves_of_a_fused_projection_are_read_in_place(gen):
    """``a``/``b`` as the two column halves of one ``[tokens, 2n]`` output (w1, w3 fused)."""
    fused = leaf(randn((3, 11, 2 * 160), generator=gen, scale=2.0))
    a, b = fused[..., :160], fused[..., 160:]
    y = swiglu(a, b)
    dy = randn(y.shape, generator=gen)
    y.backward(dy)
    ref_y, ref_da, ref_db = _float64(a, b, dy)
    assert_rel_close(y, ref_y, name="y")
    assert_rel_close(fused.grad, torch.cat([ref_da, ref_db], -1), name="d fused")


def test_backward_keeps_only_the_inputs(gen):
    a, b = (leaf(randn((4, 64), generator=gen)) for _ in range(2))
    y = swiglu(a, b)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 2
    assert saved[0].data_ptr() == a.data_ptr() and saved[1].data_ptr() == b.data_ptr()


def test_broadcast_gradient_and_empty_input(gen):
    a, b = (leaf(randn((6, 50), generator=gen)) for _ in range(2))
    swiglu(a, b).sum().backward()
    _, ref_da, ref_db = _float64(a, b, torch.ones(6, 50, device=DEVICE))
    assert_rel_close(a.grad, ref_da, name="da")
    assert_rel_close(b.grad, ref_db, name="db")
    empty = leaf(torch.empty(0, 8, device=DEVICE))
    swiglu(empty, empty).sum().backward()
    assert empty.grad.shape == (0, 8)


@pytest.mark.parametrize("make, error, message", [
    (lambda a: (a, a.long()), TypeError, "b must have dtype"),
    (lambda a: (a, a[:, :5]), ValueError, "b must have a's shape"),
    (lambda a: (a.long(), a.long()), TypeError, "a must have dtype"),
    (lambda a: (a.t(), a.t()), ValueError, "a must be contiguous in its last dimension"),
    (lambda a: (a[0, 0], a[0, 0]), ValueError, "a must have at least one dimension"),
], ids=["integer-b", "shape", "int", "transposed", "scalar"])
def test_bad_inputs_name_the_argument(gen, make, error, message):
    a = randn((6, 8), generator=gen)
    with pytest.raises(error, match=message):
        swiglu(*make(a))


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused-halves"])
def test_in_place_grad_writes_gradients_over_the_inputs(gen, fused):
    """The MLP's option: da/db land in a's and b's buffers and equal the allocating path's."""
    x = leaf(randn((5, 2 * 96), generator=gen, scale=2.0))
    if fused:
        both = x * 1
        a, b = both[:, :96], both[:, 96:]
    else:
        a, b = x[:, :96] * 1, x[:, 96:] * 1
    dy = randn((5, 96), generator=gen)
    expected = torch.autograd.grad(swiglu(a, b), [x], dy, retain_graph=True)[0]
    a_ptr, b_ptr = a.data_ptr(), b.data_ptr()
    got_da = []
    a.register_hook(got_da.append)
    y = swiglu(a, b, in_place_grad=True)
    (grad,) = torch.autograd.grad(y, [x], dy)
    assert torch.equal(grad, expected)
    assert got_da[0].data_ptr() == a_ptr and torch.equal(a, got_da[0])
    assert b.data_ptr() == b_ptr and torch.equal(b, expected[:, 96:])


def test_in_place_grad_refuses_what_it_would_corrupt(gen):
    a, b = (leaf(randn((4, 32), generator=gen)) for _ in range(2))
    with pytest.raises(ValueError, match="a, a leaf tensor that requires grad"):
        swiglu(a, b, in_place_grad=True)
    shared = a * 1
    with pytest.raises(ValueError, match="overlap"):
        swiglu(shared, shared, in_place_grad=True)
    with pytest.raises(ValueError, match="overlap"):
        swiglu(shared[:, :20], shared[:, 10:30], in_place_grad=True)
    # A second backward would read gradients as inputs.
    y = swiglu(a * 1, b * 1, in_place_grad=True)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run its backward twice"):
        y.sum().backward()
    # So would another op that saved a: autograd's version check stops it.
    base = leaf(randn((4, 32), generator=gen))
    a = torch.exp(base)  # exp saves its output for its own backward
    y = swiglu(a, b * 1, in_place_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
