"""kernels.rms_norm against InternLM2RMSNorm (float64) and the PyTorch reference."""

import pytest
import torch

from kernels import rms_norm
from kernels.reference import rms_norm_reference
from kernels.rms_norm import MAX_FUSED_HIDDEN
from tests.helpers import DEVICE, DTYPES, assert_rel_close, leaf, randn


@pytest.fixture
def hf_norm():
    module = pytest.importorskip("xtuner._lite.modelings.internlm2.modeling_internlm2",
                                 reason="needs xtuner's InternLM2 modeling code")
    return module.InternLM2RMSNorm


def _weight(hidden, dtype, gen):
    # Around one, never exactly one, so a kernel that ignores it fails.
    return (1.0 + 0.2 * randn(hidden, generator=gen)).to(dtype)


def _hf_forward_backward(hf_norm, x, weight, eps, dy):
    """InternLM2RMSNorm in float64 on the same (rounded) inputs: output, dx, dweight."""
    module = hf_norm(x.shape[-1], eps).to(DEVICE, torch.float64)
    with torch.no_grad():
        module.weight.copy_(weight.double())
    x64 = x.detach().double().requires_grad_()
    y = module(x64)
    y.backward(dy.double())
    return y, x64.grad, module.weight.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 96), (2, 3, 1000), (3, 16384), (37, 64)],
                         ids=["96", "3d-1000", "wide-16384", "many-rows-64"])
def test_matches_internlm2(hf_norm, gen, dtype, shape):
    eps = 1e-5
    x = leaf(randn(shape, dtype, generator=gen))
    w = leaf(_weight(shape[-1], dtype, gen))
    y = rms_norm(x, w, eps)
    assert y.dtype == dtype and y.shape == x.shape
    dy = randn(shape, dtype, generator=gen)
    y.backward(dy)
    ref_y, ref_dx, ref_dw = _hf_forward_backward(hf_norm, x, w, eps, dy)
    assert_rel_close(y, ref_y, name="y")
    assert_rel_close(x.grad, ref_dx, name="dx")
    assert_rel_close(w.grad, ref_dw, name="dweight")
    assert w.grad.dtype == dtype


def test_fp32_weight_promotes_output_like_internlm2(hf_norm, gen):
    """InternLM2 multiplies an fp32 weight by the fp16-rounded normalised value: fp32 out."""
    x = leaf(randn((5, 200), torch.float16, generator=gen))
    w = leaf(_weight(200, torch.float32, gen))
    y = rms_norm(x, w, 1e-6)
    assert y.dtype == torch.float32
    dy = randn(y.shape, torch.float32, generator=gen)
    y.backward(dy)
    ref_y, ref_dx, ref_dw = _hf_forward_backward(hf_norm, x, w, 1e-6, dy)
    # Rounding the normalised value to fp16 is the dominant error.
    assert_rel_close(y, ref_y, torch.float16, name="y")
    assert_rel_close(x.grad, ref_dx, torch.float16, name="dx")
    assert_rel_close(w.grad, ref_dw, torch.float16, name="dweight")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("used", ["both", "normed", "sum"])
def test_residual_variant(gen, dtype, used):
    shape, eps = (3, 7, 160), 1e-6
    x = leaf(randn(shape, dtype, generator=gen))
    r = leaf(randn(shape, dtype, generator=gen))
    w = leaf(_weight(shape[-1], dtype, gen))
    y, s = rms_norm(x, w, eps, residual=r)
    assert y.shape == s.shape == shape and s.dtype == dtype

    x64, r64, w64 = (leaf(t.double()) for t in (x, r, w))
    ref_y, ref_s = rms_norm_reference(x64, w64, eps, residual=r64)
    assert_rel_close(y, ref_y, name="normed")
    assert_rel_close(s, ref_s, name="sum")

    dy = randn(shape, dtype, generator=gen)
    ds = randn(shape, dtype, generator=gen)
    outs = {"both": ([y, s], [dy, ds]), "normed": ([y], [dy]), "sum": ([s], [ds])}[used]
    refs = {"both": [ref_y, ref_s], "normed": [ref_y], "sum": [ref_s]}[used]
    torch.autograd.backward(*outs)
    torch.autograd.backward(refs, [g.double() for g in outs[1]])
    assert_rel_close(x.grad, x64.grad, name="dx")
    assert_rel_close(r.grad, r64.grad, name="dresidual")
    if used == "sum":
        assert w.grad is None or not w.grad.any()
    else:
        assert_rel_close(w.grad, w64.grad, name="dweight")


def test_weight_gradient_is_deterministic(gen):
    """Several backward programs, each a fixed chunk of rows; no atomics: bitwise equal."""
    x = leaf(randn((203, 96), torch.float32, generator=gen))
    w = leaf(_weight(96, torch.float32, gen))
    dy = randn((203, 96), torch.float32, generator=gen)
    grads = []
    for _ in range(2):
        x.grad = w.grad = None
        rms_norm(x, w).backward(dy)
        grads.append((x.grad.clone(), w.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])
    x64, w64 = leaf(x.double()), leaf(w.double())
    rms_norm_reference(x64, w64).backward(dy.double())
    assert_rel_close(w.grad, w64.grad, name="dweight")


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_input_gradient(gen, dtype):
    x = leaf(randn((9, 130), dtype, generator=gen))
    w = leaf(_weight(130, dtype, gen))
    y = rms_norm(x, w, in_place_grad=True)
    dy = randn(y.shape, dtype, generator=gen)
    x64 = leaf(x.double())
    rms_norm_reference(x64, w.double().detach()).backward(dy.double())
    dx, dw = torch.autograd.grad(y, [x, w], dy)
    assert dx.data_ptr() == dy.data_ptr(), "the input gradient was not written into dy"
    assert_rel_close(dx, x64.grad, name="dx")
    assert torch.isfinite(dw).all()


def test_column_slice_rows_are_read_by_stride(gen):
    """Rows of a wider buffer (row stride > hidden) need no copy."""
    wide = leaf(randn((4, 5, 256), torch.float32, generator=gen))
    x = wide[..., :200]
    w = leaf(_weight(200, torch.float32, gen))
    y = rms_norm(x, w)
    dy = randn(y.shape, generator=gen)
    y.backward(dy)
    x64 = leaf(x.detach().double())
    ref = rms_norm_reference(x64, w.double().detach())
    ref.backward(dy.double())
    assert_rel_close(y, ref, name="y")
    assert_rel_close(wide.grad[..., :200], x64.grad, name="dx")
    assert not wide.grad[..., 200:].any()


def test_zero_rows(gen):
    x = leaf(randn((0, 64), torch.float32, generator=gen))
    w = leaf(_weight(64, torch.float32, gen))
    y = rms_norm(x, w)
    y.sum().backward()
    assert y.shape == (0, 64) and x.grad.shape == (0, 64)
    assert not w.grad.any()


def test_rows_wider_than_the_fused_kernel_use_the_reference(gen):
    hidden = MAX_FUSED_HIDDEN + 8
    x = randn((2, hidden), torch.float32, generator=gen)
    w = _weight(hidden, torch.float32, gen)
    assert_rel_close(rms_norm(x, w), rms_norm_reference(x.double(), w.double()), name="y")


def test_in_place_gradient_is_not_written_into_a_buffer_of_another_dtype(gen):
    """With an fp32 weight, dy is fp32 but dx must be fp16: a new buffer is used."""
    x = leaf(randn((4, 64), torch.float16, generator=gen))
    w = leaf(_weight(64, torch.float32, gen))
    y = rms_norm(x, w, in_place_grad=True)
    dy = randn(y.shape, torch.float32, generator=gen)
    dx, = torch.autograd.grad(y, [x], dy)
    assert dx.dtype == torch.float16 and dx.data_ptr() != dy.data_ptr()
    x64 = leaf(x.double())
    rms_norm_reference(x64, w.double().detach()).backward(dy.double())
    assert_rel_close(dx, x64.grad, name="dx")


@pytest.mark.parametrize("make, error, match", [
    (lambda g: (randn((4, 64), generator=g), randn(63, generator=g)), ValueError, "weight"),
    (lambda g: (randn((4, 64), generator=g), randn((1, 64), generator=g)), ValueError, "weight"),
    (lambda g: (torch.ones(4, 64, dtype=torch.int32, device=DEVICE), randn(64, generator=g)),
     TypeError, "x must have dtype"),
    (lambda g: (randn((4, 64), torch.float64, generator=g), randn(64, generator=g)),
     TypeError, "x must have dtype"),
    (lambda g: (randn((64, 4), generator=g).t(), randn(64, generator=g)), ValueError,
     "contiguous in its last dimension"),
    (lambda g: (randn((6, 5, 64), generator=g).transpose(0, 1)[:, :3], randn(64, generator=g)),
     ValueError, "one row stride"),
], ids=["weight-size", "weight-2d", "int-x", "float64-x", "strided-last-dim", "unmergeable-rows"])
def test_bad_inputs_are_rejected(gen, make, error, match):
    x, w = make(gen)
    with pytest.raises(error, match=match):
        rms_norm(x, w)


# (x, residual, weight): the decoder layer under autocast with fp32 weights adds the
# half-precision attention output to the fp32 residual stream; the others permute it.
MIXED = [(torch.float16, torch.float32, torch.float32), (torch.float32, torch.float16,
                                                          torch.float16),
         (torch.float16, torch.float16, torch.float32), (torch.float32, torch.float32,
                                                          torch.float16)]


@pytest.mark.parametrize("x_dtype, r_dtype, w_dtype", MIXED,
                         ids=["-".join(str(d)[6:] for d in m) for m in MIXED])
def test_mixed_dtypes_follow_pytorch_promotion(gen, x_dtype, r_dtype, w_dtype):
    """What ``x + residual`` and ``InternLM2RMSNorm`` give in PyTorch: ``s`` in the
    promoted dtype, the output promoted with the weight's; each gradient in its input's
    dtype, each tensor as accurate as its dtype allows."""
    shape, eps = (5, 9, 96), 1e-5
    x, r = leaf(randn(shape, x_dtype, generator=gen)), leaf(randn(shape, r_dtype, generator=gen))
    w = leaf(_weight(shape[-1], w_dtype, gen))
    y, s = rms_norm(x, w, eps, residual=r)
    s_dtype = torch.promote_types(x_dtype, r_dtype)
    assert s.dtype == s_dtype and y.dtype == torch.promote_types(s_dtype, w_dtype)
    dy, ds = randn(shape, y.dtype, generator=gen), randn(shape, s_dtype, generator=gen)
    torch.autograd.backward((y, s), (dy, ds))
    x64, r64, w64 = (leaf(t.double()) for t in (x, r, w))
    ref_y, ref_s = rms_norm_reference(x64, w64, eps, residual=r64)
    torch.autograd.backward((ref_y, ref_s), (dy.double(), ds.double()))
    # The weakest dtype among the inputs bounds every result.
    weakest = torch.float16
    for name, got, ref in (("normed", y, ref_y), ("sum", s, ref_s), ("dx", x.grad, x64.grad),
                           ("dresidual", r.grad, r64.grad), ("dweight", w.grad, w64.grad)):
        assert_rel_close(got, ref, weakest, name=name)
    assert (x.grad.dtype, r.grad.dtype, w.grad.dtype) == (x_dtype, r_dtype, w_dtype)


@pytest.mark.parametrize("residual, error, match", [
    (lambda g: randn((4, 32), generator=g), ValueError, "residual must have x's shape"),
    (lambda g: torch.ones(4, 64, dtype=torch.int32, device=DEVICE), TypeError,
     "residual must have dtype"),
], ids=["shape", "integer"])
def test_bad_residual_is_rejected(gen, residual, error, match):
    with pytest.raises(error, match=match):
        rms_norm(randn((4, 64), generator=gen), randn(64, generator=gen), residual=residual(gen))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [4096, 2048], ids=["7b", "1_8b"])
def test_internlm2_shapes_on_gpu(gen, dtype, hidden):
    """A 4k-token pack at InternLM2-7B / 1.8B width, residual variant, vs float64."""
    shape, eps = (1, 4096, hidden), 1e-5
    x = leaf(randn(shape, dtype, generator=gen))
    r = leaf(randn(shape, dtype, generator=gen))
    w = leaf(_weight(hidden, dtype, gen))
    y, s = rms_norm(x, w, eps, residual=r)
    dy, ds = (randn(shape, dtype, generator=gen) for _ in range(2))
    torch.autograd.backward([y, s], [dy, ds])
    x64, r64, w64 = (leaf(t.double()) for t in (x, r, w))
    ref_y, ref_s = rms_norm_reference(x64, w64, eps, residual=r64)
    torch.autograd.backward([ref_y, ref_s], [dy.double(), ds.double()])
    assert_rel_close(y, ref_y, name="normed")
    assert_rel_close(s, ref_s, name="sum")
    assert_rel_close(x.grad, x64.grad, name="dx")
    assert_rel_close(r.grad, r64.grad, name="dresidual")
    # 4096 rows summed in fp32 then rounded once: as tight as one rounding.
    assert_rel_close(w.grad, w64.grad, name="dweight")
