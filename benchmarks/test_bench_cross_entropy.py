"""The LM-head loss step (logits, cross-entropy, gradients of hidden and weight): fused vs HF.

GPU cases: InternLM2-7B's head (vocab 92544, hidden 4096), one packed row of 8k and 32k
tokens, bf16, 30% of the labels ignored (prompt tokens), Hugging Face's shift.

- ``xtuner-patch``: ``kernels.fused_linear_cross_entropy(..., shift_labels=True)``, its
  weight-gradient mode chosen by 'auto' ('recompute' at 8k tokens, 'accumulate' at 32k);
  ``xtuner-patch-accumulate`` and ``xtuner-patch-recompute`` force one mode.
- ``hf-pytorch``: what ``InternLM2ForCausalLM.forward`` does: ``output(h).float()``, the
  shifted ``.contiguous()`` copies, ``CrossEntropyLoss``.
- ``liger-kernel``: ``LigerFusedLinearCrossEntropyLoss`` (when installed) on the same
  shifted targets.

One step is forward + ``torch.autograd.grad`` of hidden and weight; work counted is the
three matrix products (``6 * tokens * vocab * hidden`` FLOPs); ``peak_mem_bytes`` is the
step's peak above what was allocated before it (inputs and weight excluded, gradients
included).

CPU case (``*_cpu_memory``): a smaller head in fp32, each implementation run once in its
own process (ours under the Triton interpreter) so that ``peak_mem_bytes`` is the growth
of the peak resident set during the step (``VmHWM`` reset before it); times there are the
interpreter's and mean nothing.  Skipped where CUDA is available (the GPU cases measure
memory there).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import HAS_CUDA, OURS, measure, requires_cuda, skip_missing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE = -100
OURS_MODES = {OURS: "auto", f"{OURS}-accumulate": "accumulate",
              f"{OURS}-recompute": "recompute"}
IMPLS = [*OURS_MODES, "hf-pytorch", "liger-kernel"]
CASES = [dict(bench="linear_cross_entropy_fwd_bwd", model="internlm2-7b", tokens=t,
              vocab=92544, hidden=4096, dtype="bf16") for t in (8192, 32768)]
# 8 chunks of ours, as at 32k tokens on the GPU.
CPU_CASE = dict(bench="linear_cross_entropy_cpu_memory", tokens=2048, vocab=8192, hidden=256,
                chunk_size=256, dtype="fp32")


def loss_fn(impl: str, chunk_size=None):
    """``loss(hidden [1, T, H], weight [V, H], labels [1, T])`` with Hugging Face's shift."""
    if impl in OURS_MODES:
        from kernels import fused_linear_cross_entropy

        return lambda h, w, labels: fused_linear_cross_entropy(
            h, w, labels, shift_labels=True, chunk_size=chunk_size,
            grad_weight_mode=OURS_MODES[impl])
    if impl == "hf-pytorch":
        def hf(h, w, labels):
            logits = F.linear(h, w).float()
            shift_logits = logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            return torch.nn.CrossEntropyLoss()(shift_logits.view(-1, w.shape[0]),
                                               shift_labels.view(-1))
        return hf
    if impl == "liger-kernel":
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import (
                LigerFusedLinearCrossEntropyLoss)
        except Exception as exc:  # noqa: BLE001 - any import failure means "not installed"
            skip_missing(impl, f"liger_kernel does not import: {exc!r}")
        from kernels.reference import shift_targets

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
        return lambda h, w, labels: liger(w, h.reshape(-1, h.shape[-1]),
                                          shift_targets(labels, IGNORE).reshape(-1))
    raise AssertionError(impl)


def make_inputs(case, device):
    gen = torch.Generator(device=device).manual_seed(case["tokens"])
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[case["dtype"]]
    tokens, vocab, hidden = case["tokens"], case["vocab"], case["hidden"]
    h = torch.randn((1, tokens, hidden), generator=gen, device=device).to(dtype)
    w = torch.randn((vocab, hidden), generator=gen, device=device) * hidden ** -0.5
    labels = torch.randint(0, vocab, (1, tokens), generator=gen, device=device)
    labels[torch.rand((1, tokens), generator=gen, device=device) < 0.3] = IGNORE
    return h.requires_grad_(), torch.nn.Parameter(w.to(dtype)), labels


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['tokens']}")
def test_linear_cross_entropy(benchmark, impl, case):
    requires_cuda()
    fn = loss_fn(impl)
    h, w, labels = make_inputs(case, "cuda")

    def step():
        return torch.autograd.grad(fn(h, w, labels), [h, w])

    step()  # compiles, and allocates cuBLAS workspaces outside the measured peak
    measure(benchmark, step, impl=impl, case=case,
            flops=6.0 * case["tokens"] * case["vocab"] * case["hidden"], rounds=10)


# Runs in a fresh interpreter: inputs, then one step with the peak RSS reset before it.
_MEMORY_SCRIPT = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, {repo!r})
import torch
from benchmarks.test_bench_cross_entropy import CPU_CASE, loss_fn, make_inputs

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

fn = loss_fn({impl!r}, CPU_CASE["chunk_size"])
h, w, labels = make_inputs(CPU_CASE, "cpu")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident set
base = status("VmRSS:")
grads = torch.autograd.grad(fn(h, w, labels), [h, w])
print(json.dumps(dict(base=base, peak=status("VmHWM:"))))
"""


@pytest.mark.parametrize("impl", [*OURS_MODES, "hf-pytorch"])
def test_linear_cross_entropy_cpu_memory(benchmark, impl):
    if HAS_CUDA:
        pytest.skip("CPU memory case; the GPU cases measure memory on this host")
    script = _MEMORY_SCRIPT.format(repo=REPO, impl=impl)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=True)
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    fn = loss_fn(impl, CPU_CASE["chunk_size"])
    h, w, labels = make_inputs(CPU_CASE, "cpu")
    measure(benchmark, lambda: torch.autograd.grad(fn(h, w, labels), [h, w]), impl=impl,
            case=CPU_CASE, rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(peak_mem_bytes=mem["peak"] - mem["base"],
                                peak_rss_bytes=mem["peak"])
