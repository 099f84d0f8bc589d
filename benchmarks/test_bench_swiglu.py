"""SwiGLU gate ``silu(a) * b`` forward + backward at InternLM2 MLP shapes (GPU, bf16).

- ``xtuner-patch``: ``kernels.swiglu`` as the patched MLP calls it (backward recomputes
  ``silu(a)`` and writes the gradients over ``a`` and ``b``: ``in_place_grad=True``).
- ``hf-pytorch``: ``F.silu(a) * b`` as ``InternLM2MLP`` computes it.
- ``liger-kernel``: ``LigerSiLUMulFunction`` (when installed).

Work counted (``bytes``) is what must move: forward reads ``a`` and ``b`` and writes ``y``;
backward reads ``dy``, ``a`` and ``b`` and writes ``da`` and ``db``: 8 tensors of
``tokens x intermediate``.  ``copy_share`` compares the rate with a device-to-device copy.  ``a`` and ``b`` are made
fresh before every round (untimed) as outputs of an op, like ``w1(x)`` and ``w3(x)``; the
gradients are taken with respect to them.
"""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import OURS, measure, requires_cuda, skip_missing
from benchmarks.copy_bandwidth import record_copy_share

DTYPE = torch.bfloat16
IMPLS = [OURS, "hf-pytorch", "liger-kernel"]
CASES = [dict(bench="swiglu_fwd_bwd", model="internlm2-7b", intermediate=14336, tokens=t,
              dtype="bf16") for t in (8192, 32768, 131072)]
CASES += [dict(bench="swiglu_fwd_bwd", model="internlm2-1.8b", intermediate=8192, tokens=32768,
               dtype="bf16")]


def _gate(impl: str):
    if impl == OURS:
        from kernels import swiglu

        return lambda a, b: swiglu(a, b, in_place_grad=True)
    if impl == "hf-pytorch":
        return lambda a, b: F.silu(a) * b
    if impl == "liger-kernel":
        try:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        except Exception as exc:  # noqa: BLE001 - any import failure means "not installed"
            skip_missing(impl, f"liger_kernel does not import: {exc!r}")
        return LigerSiLUMulFunction.apply
    raise AssertionError(impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['model']}-{c['tokens']}")
def test_swiglu(benchmark, impl, case):
    requires_cuda()
    gate = _gate(impl)
    gen = torch.Generator(device="cuda").manual_seed(case["tokens"])
    shape = (case["tokens"], case["intermediate"])
    a0, b0 = (torch.randn(shape, generator=gen, device="cuda", dtype=DTYPE).requires_grad_()
              for _ in range(2))
    dy = torch.randn(shape, generator=gen, device="cuda", dtype=DTYPE)
    inputs = {}

    def fresh_inputs():
        inputs["a"], inputs["b"] = a0 * 1, b0 * 1

    def step():
        a, b = inputs["a"], inputs["b"]
        return torch.autograd.grad(gate(a, b), [a, b], dy)

    elem = torch.finfo(DTYPE).bits // 8
    measure(benchmark, step, impl=impl, case=case, setup=fresh_inputs,
            bytes_moved=8.0 * elem * case["tokens"] * case["intermediate"])
    record_copy_share(benchmark)
