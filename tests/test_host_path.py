"""The host side of every kernel call in steady state: launches and device-to-host reads.

On a GPU the Python work around a launch and every read of a device value to the host
(a synchronisation) cost more than the kernel itself at training's per-rank sizes.
These tests count, for a repeated call with the same packing, the Triton launches (one
per kernel the op needs, nothing extra) and the host reads of tensor values: zero, except
the fused loss's one count of valid labels.  The same holds layer by layer for the
patched model: extra layers add launches and no reads.
"""

import collections
import contextlib
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.jit import KernelInterface

import kernels
from tests.helpers import DEVICE, leaf, randn

# The package exports functions named like some of its modules: import the modules.
KERNEL_MODULES = [importlib.import_module(f"kernels.{name}") for name in (
    "cross_entropy", "rms_norm", "rotary", "sp_layout", "swiglu", "varlen_attention")]


@contextlib.contextmanager
def recorded_launches():
    """A Counter of launches per Triton kernel of the ``kernels`` modules, while open."""
    counts = collections.Counter()
    wrapped = []
    for module in KERNEL_MODULES:
        for name, kernel in vars(module).items():
            if not isinstance(kernel, KernelInterface) or kernel in wrapped:
                continue

            def run(*args, _run=kernel.run, _name=f"{module.__name__}.{name}", **kwargs):
                counts[_name] += 1
                return _run(*args, **kwargs)

            kernel.run = run  # `kernel[grid](...)` calls the instance's run
            wrapped.append(kernel)
    try:
        yield counts
    finally:
        for kernel in wrapped:
            del kernel.run


class ScalarReads(TorchDispatchMode):
    """Counts the ops that read tensor values to the host (device syncs on a GPU):
    ``.item()``/``int()``/``bool()``, ``nonzero`` and ``.tolist()``."""

    READS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero")

    def __init__(self):
        super().__init__()
        self.count = 0
        self._tolist = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist

        def tolist(tensor, _tolist=self._tolist):
            self.count += 1
            return _tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def steady_state(step):
    """``(launches, host reads)`` of ``step()`` run after one warm-up call."""
    step()
    with recorded_launches() as launches, ScalarReads() as reads:
        step()
    return sum(launches.values()), reads.count


def _cu_seqlens(lengths):
    return torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)


LENGTHS = [20, 9, 35]
TOKENS = sum(LENGTHS)


def _rms_norm(gen):
    x, weight = leaf(randn((TOKENS, 64), generator=gen)), leaf(randn((64,), generator=gen))
    return lambda: kernels.rms_norm(x, weight, 1e-6).sum().backward()


def _swiglu(gen):
    a, b = (leaf(randn((TOKENS, 96), generator=gen)) for _ in range(2))
    return lambda: kernels.swiglu(a * 1, b * 1, in_place_grad=True).sum().backward()


def _attention(gen):
    cu = _cu_seqlens(LENGTHS)
    q = leaf(randn((TOKENS, 4, 64), generator=gen))
    k, v = (leaf(randn((TOKENS, 2, 64), generator=gen)) for _ in range(2))
    return lambda: kernels.varlen_attn_func(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS),
                                            causal=True).sum().backward()


def _split_qkv_rotary(gen):
    cu = _cu_seqlens(LENGTHS)
    qkv = leaf(randn((TOKENS, 2 * 4 * 16), generator=gen))
    inv_freq, _ = kernels.rotary_inv_freq(16, 1e6, device=DEVICE)

    def step():
        q, k, v = kernels.split_qkv_rotary(qkv, 2, 16, cu_seqlens=cu, inv_freq=inv_freq)
        (q.sum() + k.sum() + v.sum()).backward()
    return step


def _apply_rotary(gen):
    cu = _cu_seqlens(LENGTHS)
    q, k = leaf(randn((TOKENS, 4, 16), generator=gen)), leaf(randn((TOKENS, 2, 16), generator=gen))
    inv_freq, _ = kernels.rotary_inv_freq(16, 1e6, device=DEVICE)
    half_freq = inv_freq.half()  # a bf16/fp16 model's buffer: converted once, not per call

    def step():
        q_out, k_out = kernels.apply_rotary(q * 1, k * 1, cu_seqlens=cu, inv_freq=half_freq,
                                            in_place=True, in_place_grad=True)
        (q_out.sum() + k_out.sum()).backward()
    return step


def _linear_cross_entropy(gen):
    hidden = leaf(randn((TOKENS, 32), generator=gen))
    weight = leaf(randn((200, 32), generator=gen, scale=0.2))
    labels = torch.randint(0, 200, (TOKENS,), generator=gen, device=DEVICE)
    labels[::5] = -100
    return lambda: kernels.fused_linear_cross_entropy(hidden, weight, labels).backward()


# (launches per forward + backward, host reads): the fused loss counts its valid labels
# once per call, to scale the loss and gradients (documented in kernels.cross_entropy).
OPS = {
    "rms_norm": (_rms_norm, 2, 0),
    "swiglu": (_swiglu, 2, 0),
    "varlen_attention": (_attention, 4, 0),
    "split_qkv_rotary": (_split_qkv_rotary, 2, 0),
    "apply_rotary": (_apply_rotary, 2, 0),
    "linear_cross_entropy": (_linear_cross_entropy, 3, 1),
}


@pytest.mark.parametrize("op", list(OPS))
def test_repeated_call_launches_only_its_kernels_and_reads_nothing(gen, op):
    make, launches, reads = OPS[op]
    assert steady_state(make(gen)) == (launches, reads)


def test_new_packing_is_read_once(gen):
    """A new cu_seqlens tensor (the next step's packing) is validated again: once."""
    qkv = leaf(randn((TOKENS, 2 * 4 * 16), generator=gen))
    inv_freq, _ = kernels.rotary_inv_freq(16, 1e6, device=DEVICE)
    kernels.split_qkv_rotary(qkv, 2, 16, cu_seqlens=_cu_seqlens(LENGTHS), inv_freq=inv_freq)
    cu = _cu_seqlens([TOKENS])
    with ScalarReads() as first:
        kernels.split_qkv_rotary(qkv, 2, 16, cu_seqlens=cu, inv_freq=inv_freq)
    with ScalarReads() as again:
        kernels.split_qkv_rotary(qkv, 2, 16, cu_seqlens=cu, inv_freq=inv_freq)
    cu.add_(0)  # an in-place write: the values may have changed, so they are read again
    with ScalarReads() as after_write:
        kernels.split_qkv_rotary(qkv, 2, 16, cu_seqlens=cu, inv_freq=inv_freq)
    assert first.count > 0 and again.count == 0 and after_write.count == first.count


def test_patched_layers_add_launches_but_no_host_reads(tiny_checkpoint, gen, varlen_args):
    pytest.importorskip("xtuner.model")
    from tests.models import dispatch, load_model, packed_batch

    def model_step(n_layers):
        model = dispatch(load_model(tiny_checkpoint))
        model.model.layers = model.model.layers[:n_layers]
        input_ids, labels, position_ids, cu = packed_batch(gen, LENGTHS, model.config.vocab_size)
        varlen_args(cu, max(LENGTHS))
        return lambda: model(input_ids, position_ids=position_ids,
                             labels=labels).loss.backward()

    launches_1, reads_1 = steady_state(model_step(1))
    launches_2, reads_2 = steady_state(model_step(2))
    # Per decoder layer, forward + backward: two RMSNorms, split + RoPE, attention, SwiGLU.
    assert launches_2 - launches_1 == 2 + 2 + 4 + 2 + 2
    assert reads_2 == reads_1
