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

LoRA cases (``lora_head_*``, rank 16, the head frozen as LoRA freezes it; gradients of
hidden and both adapter factors): ``xtuner-patch`` passes the adapter as
``low_rank=(scaling * lora_A(x), lora_B.weight)``; ``hf-peft`` adds the adapter's
``[tokens, V]`` output to the head's logits as PEFT's LoRA layer does, then Hugging
Face's loss.

CPU cases (``*_cpu_memory``): a smaller head in fp32, each implementation run once in its
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
LORA_IMPLS = [OURS, "hf-peft"]
LORA_CASE = dict(bench="lora_head_cross_entropy_fwd_bwd", model="internlm2-7b", tokens=32768,
                 vocab=92544, hidden=4096, rank=16, dtype="bf16")
LORA_CPU_CASE = dict(CPU_CASE, bench="lora_head_cross_entropy_cpu_memory", rank=16)


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


def lora_loss_fn(impl: str, chunk_size=None):
    """``loss(hidden, weight, labels, a, b)``: logits ``hidden @ weight.T + a @ b.T``."""
    if impl == OURS:
        from kernels import fused_linear_cross_entropy

        return lambda h, w, labels, a, b: fused_linear_cross_entropy(
            h, w, labels, shift_labels=True, chunk_size=chunk_size, low_rank=(a, b))
    if impl == "hf-peft":
        def peft(h, w, labels, a, b):
            logits = (F.linear(h, w) + F.linear(a, b)).float()
            return F.cross_entropy(logits[..., :-1, :].flatten(0, -2), labels[..., 1:].flatten())
        return peft
    raise AssertionError(impl)


def make_inputs(case, device):
    """``(hidden, weight, labels)`` and, for a LoRA case, the adapter's ``(a, b)``, each
    requiring a gradient where the step takes one (LoRA freezes the head)."""
    gen = torch.Generator(device=device).manual_seed(case["tokens"])
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[case["dtype"]]
    tokens, vocab, hidden = case["tokens"], case["vocab"], case["hidden"]
    h = torch.randn((1, tokens, hidden), generator=gen, device=device).to(dtype)
    w = torch.randn((vocab, hidden), generator=gen, device=device) * hidden ** -0.5
    labels = torch.randint(0, vocab, (1, tokens), generator=gen, device=device)
    labels[torch.rand((1, tokens), generator=gen, device=device) < 0.3] = IGNORE
    inputs = [h.requires_grad_(), w.to(dtype).requires_grad_("rank" not in case), labels]
    if "rank" in case:
        a = torch.randn((1, tokens, case["rank"]), generator=gen, device=device)
        b = torch.randn((vocab, case["rank"]), generator=gen, device=device) * 0.01
        inputs += [a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()]
    return inputs


def _step(fn, inputs):
    """One loss step: forward, and the gradients of every input that requires one."""
    return torch.autograd.grad(fn(*inputs), [x for x in inputs if x.requires_grad])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['tokens']}")
def test_linear_cross_entropy(benchmark, impl, case):
    requires_cuda()
    fn, inputs = loss_fn(impl), make_inputs(case, "cuda")
    _step(fn, inputs)  # compiles, and allocates cuBLAS workspaces outside the measured peak
    measure(benchmark, lambda: _step(fn, inputs), impl=impl, case=case,
            flops=6.0 * case["tokens"] * case["vocab"] * case["hidden"], rounds=10)


@pytest.mark.parametrize("impl", LORA_IMPLS)
def test_lora_head_cross_entropy(benchmark, impl):
    requires_cuda()
    fn, inputs = lora_loss_fn(impl), make_inputs(LORA_CASE, "cuda")
    _step(fn, inputs)
    tokens, vocab = LORA_CASE["tokens"], LORA_CASE["vocab"]
    # The head's forward and input-gradient products (its weight is frozen).
    measure(benchmark, lambda: _step(fn, inputs), impl=impl, case=LORA_CASE,
            flops=4.0 * tokens * vocab * LORA_CASE["hidden"], rounds=10)


# Runs in a fresh interpreter: inputs, then one step with the peak RSS reset before it.
_MEMORY_SCRIPT = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, {repo!r})
import benchmarks.test_bench_cross_entropy as bench

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

case = getattr(bench, {case!r})
fn = getattr(bench, {make_fn!r})({impl!r}, case["chunk_size"])
inputs = bench.make_inputs(case, "cpu")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident set
base = status("VmRSS:")
grads = bench._step(fn, inputs)
print(json.dumps(dict(base=base, peak=status("VmHWM:"))))
"""


def _cpu_memory(benchmark, impl, case_name, make_fn):
    if HAS_CUDA:
        pytest.skip("CPU memory case; the GPU cases measure memory on this host")
    script = _MEMORY_SCRIPT.format(repo=REPO, impl=impl, case=case_name, make_fn=make_fn)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=True)
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    case = globals()[case_name]
    fn, inputs = globals()[make_fn](impl, case["chunk_size"]), make_inputs(case, "cpu")
    measure(benchmark, lambda: _step(fn, inputs), impl=impl, case=case, rounds=1,
            warmup_rounds=0)
    benchmark.extra_info.update(peak_mem_bytes=mem["peak"] - mem["base"],
                                peak_rss_bytes=mem["peak"])


@pytest.mark.parametrize("impl", [*OURS_MODES, "hf-pytorch"])
def test_linear_cross_entropy_cpu_memory(benchmark, impl):
    _cpu_memory(benchmark, impl, "CPU_CASE", "loss_fn")


@pytest.mark.parametrize("impl", LORA_IMPLS)
def test_lora_head_cross_entropy_cpu_memory(benchmark, impl):
    _cpu_memory(benchmark, impl, "LORA_CPU_CASE", "lora_loss_fn")
