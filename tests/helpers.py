"""Numerical helpers shared by the kernel tests and benchmarks.

Policy:
- references run in float64 on the CPU, from the very inputs the kernel saw;
- errors are measured as ``||out - ref|| / ||ref||`` over the whole tensor, against a
  per-dtype tolerance (:data:`REL_TOL`);
- inputs are fresh seeded random numbers for every test (never zeros, never ones);
- outputs are poisoned with NaN before the kernel runs, so an element the kernel
  forgot to write makes the comparison fail.
"""

import hashlib

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# The Triton interpreter's bf16 is broken (see ../shared/notes/environment.md), so
# bf16 is exercised only on a GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])

# Relative (norm-wise) error allowed for a kernel's output in each dtype.  fp32 on a
# GPU includes tf32 matrix products (Triton's default for fp32 ``tl.dot``).
REL_TOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-3 if HAS_CUDA else 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def seed_for(name: str) -> int:
    """A stable 31-bit seed derived from a test's node id."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") & 0x7FFFFFFF


def make_generator(seed: int, device=DEVICE) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def randn(shape, dtype=torch.float32, device=DEVICE, generator=None, scale=1.0):
    """Standard-normal values (times ``scale``) drawn in fp32 and cast to ``dtype``."""
    out = torch.randn(shape, dtype=torch.float32, device=device, generator=generator)
    return (out * scale).to(dtype)


def leaf(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` that is a fresh autograd leaf (its own ``.grad``)."""
    return tensor.detach().clone().requires_grad_()


def poison(tensor: torch.Tensor) -> torch.Tensor:
    """Fill ``tensor`` in place with NaN (or the int minimum) and return it."""
    if tensor.is_floating_point():
        tensor.fill_(float("nan"))
    else:
        tensor.fill_(torch.iinfo(tensor.dtype).min)
    return tensor


def poisoned_empty(shape, dtype, device=DEVICE) -> torch.Tensor:
    return poison(torch.empty(shape, dtype=dtype, device=device))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (``inf`` when ``out`` holds NaN/inf)."""
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype=None, *,
                     factor: float = 1.0, name: str = "output") -> float:
    """Assert shape equality and ``rel_error(out, ref) <= REL_TOL[dtype] * factor``.

    ``dtype`` defaults to ``out.dtype``; returns the measured error so callers can
    compare it with another implementation's.
    """
    dtype = dtype or out.dtype
    assert tuple(out.shape) == tuple(ref.shape), (
        f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    err = rel_error(out, ref)
    tol = REL_TOL[dtype] * factor
    assert err <= tol, f"{name}: relative error {err:.3e} > tolerance {tol:.1e} ({dtype})"
    return err


def run_benchmark_file(path: str, tmp_path, **env) -> list:
    """Run ``pytest PATH --benchmark-only`` in a fresh process without CUDA (``env`` added
    to the environment); its ``--benchmark-json`` rows.  Fails with the output's tail."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", path, "--benchmark-only", "-q", "-p", "no:cacheprovider",
         f"--benchmark-json={out}"],
        cwd=repo, capture_output=True, text=True, timeout=600,
        # Not as an xdist worker: pytest-benchmark turns itself off there.
        env=dict({k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")},
                 CUDA_VISIBLE_DEVICES="", **env))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())["benchmarks"]
