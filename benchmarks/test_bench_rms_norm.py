"""RMSNorm forward + backward at InternLM2 shapes: xtuner-patch vs baselines (GPU).

Cases: hidden 4096 (InternLM2-7B) and 2048 (1.8B), 8k-128k tokens, bf16; the plain
norm and the decoder layer's residual add + norm.  Work counted (``bytes``) is what
must move: forward reads x (+ residual) and the weight and writes y (+ the sum);
backward reads dy (+ the sum's gradient), x (or the sum) and the weight and writes dx
and dweight.  Baselines doing the add separately still get the fused byte count.

Also times a device-to-device copy, the bandwidth the kernels are compared with
(``copy_share`` in every case's extra_info).
"""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import OURS, measure, requires_cuda, skip_missing
from benchmarks.copy_bandwidth import COPY_BYTES, copy_gbps, record_copy_share

MODELS = {"internlm2-7b": 4096, "internlm2-1.8b": 2048}
TOKENS = [8192, 32768, 131072]
EPS = 1e-5
DTYPE = torch.bfloat16
IMPLS = [OURS, "hf-pytorch", "xtuner-triton", "torch-rms_norm", "torch-compile-rms_norm",
         "liger-kernel"]

CASES = [dict(bench="rms_norm_fwd_bwd", model=m, hidden=h, tokens=t, dtype="bf16")
         for m, h in MODELS.items() for t in TOKENS]
CASES += [dict(bench="add_rms_norm_fwd_bwd", model="internlm2-7b", hidden=4096, tokens=t,
               dtype="bf16") for t in TOKENS]

_compiled = {}


def _baseline_norm(impl: str, weight: torch.nn.Parameter):
    """``norm(x) -> y`` of a baseline, with the given weight; skips when unavailable."""
    hidden = weight.shape[0]
    if impl == "hf-pytorch":
        try:
            from xtuner._lite.modelings.internlm2.modeling_internlm2 import InternLM2RMSNorm
        except Exception as exc:  # noqa: BLE001 - any import failure means "not installed"
            skip_missing(impl, f"xtuner's InternLM2 modeling code does not import: {exc!r}")
        module = InternLM2RMSNorm(hidden, EPS)
        module.weight = weight
        return module
    if impl == "xtuner-triton":
        try:
            from xtuner.model.modules.dispatch.triton_kernels.rms_norm import rms_norm as xt_norm
        except Exception as exc:  # noqa: BLE001
            skip_missing(impl, f"xtuner's Triton RMSNorm does not import: {exc!r}")
        return lambda x: xt_norm(x, weight, EPS)
    if impl == "torch-rms_norm":
        return lambda x: F.rms_norm(x, (hidden,), weight, EPS)
    if impl == "torch-compile-rms_norm":
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(F.rms_norm, dynamic=True)
        compiled = _compiled["fn"]
        return lambda x: compiled(x, (hidden,), weight, EPS)
    if impl == "liger-kernel":
        try:
            from liger_kernel.transformers.rms_norm import LigerRMSNorm
        except Exception as exc:  # noqa: BLE001
            skip_missing(impl, f"liger_kernel does not import: {exc!r}")
        module = LigerRMSNorm(hidden, eps=EPS).to(weight.device, weight.dtype)
        module.weight = weight
        return module
    raise AssertionError(impl)


def _step(impl, case, x, residual, weight):
    """One forward + backward as a closure returning the gradients."""
    fused = residual is not None
    if impl == OURS:
        from kernels import rms_norm

        def forward():
            out = rms_norm(x, weight, EPS, residual=residual)
            return list(out) if fused else [out]
    else:
        norm = _baseline_norm(impl, weight)

        def forward():
            if fused:
                s = x + residual
                return [norm(s), s]
            return [norm(x)]

    grads_out = [torch.randn_like(x) for _ in range(2 if fused else 1)]
    inputs = [x, weight] + ([residual] if fused else [])

    def step():
        return torch.autograd.grad(forward(), inputs, grads_out)

    return step


def _bytes(case) -> float:
    rows, hidden = case["tokens"], case["hidden"]
    elem = torch.finfo(DTYPE).bits // 8
    per_row_tensors = 8 if case["bench"] == "add_rms_norm_fwd_bwd" else 5
    return float(elem * (per_row_tensors * rows * hidden + 3 * hidden))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['bench']}-{c['model']}-{c['tokens']}")
def test_rms_norm(benchmark, impl, case):
    requires_cuda()
    if case["bench"] == "add_rms_norm_fwd_bwd" and impl in ("xtuner-triton", "liger-kernel"):
        pytest.skip(f"{impl} adds the residual with a separate PyTorch op; compared on the "
                    "plain norm only")
    gen = torch.Generator(device="cuda").manual_seed(case["tokens"] + case["hidden"])
    shape = (case["tokens"], case["hidden"])
    x = torch.randn(shape, generator=gen, device="cuda", dtype=DTYPE).requires_grad_()
    residual = None
    if case["bench"] == "add_rms_norm_fwd_bwd":
        residual = torch.randn(shape, generator=gen, device="cuda", dtype=DTYPE)
        residual.requires_grad_()
    weight = torch.nn.Parameter(
        1 + 0.1 * torch.randn(case["hidden"], generator=gen, device="cuda", dtype=DTYPE))
    step = _step(impl, case, x, residual, weight)
    if impl == "torch-compile-rms_norm":
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - a compiler failure means "unavailable"
            skip_missing(impl, f"torch.compile failed: {type(exc).__name__}: {exc}")
    measure(benchmark, step, impl=impl, case=case, bytes_moved=_bytes(case))
    record_copy_share(benchmark)


def test_device_copy(benchmark):
    """``torch.clone`` of 1 GiB: the reference bandwidth (bytes read + written)."""
    requires_cuda()
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").random_()
    measure(benchmark, src.clone, impl="torch-clone",
            case=dict(bench="device_copy", size_bytes=COPY_BYTES), bytes_moved=2.0 * COPY_BYTES)
    benchmark.extra_info["copy_gbps"] = copy_gbps()
