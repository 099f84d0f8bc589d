"""Kernels compile (and tune) once per model shape, not again for each new packing.

Triton compiles a kernel again when an integer argument that is not marked
``do_not_specialize`` changes class (equal to 1, divisible by 16, other), and the
autotuner tunes again when a value of its key changes.  On a GPU either stalls a
training step for seconds (an H200 run stalled at steps 3 and 8 when the attention
key followed the longest sample).  Here every kernel a training step launches runs on
two batches of other packings and other token counts, its launch arguments are
recorded (through the launch's pre-run hooks, which the interpreter and the GPU
launcher both call), and every argument that changed class must be one Triton does not
specialise on.
"""

import importlib

import pytest
import torch
from triton.runtime.autotuner import Autotuner

import kernels
from tests.helpers import DEVICE, randn

# By module path: the package re-exports functions under some module names.
(cross_entropy, rms_norm, rotary, sp_layout, swiglu, varlen_attention) = (
    importlib.import_module(f"kernels.{name}") for name in (
        "cross_entropy", "rms_norm", "rotary", "sp_layout", "swiglu", "varlen_attention"))

KERNELS = [varlen_attention._fwd_kernel, varlen_attention._delta_kernel,
           varlen_attention._dkdv_kernel, varlen_attention._dq_kernel,
           rotary._rotary_kernel, rms_norm._rms_norm_fwd_kernel, rms_norm._rms_norm_bwd_kernel,
           swiglu._swiglu_fwd_kernel, swiglu._swiglu_bwd_kernel,
           cross_entropy._cross_entropy_rows_kernel, sp_layout._heads_kernel]


def _interpreted(kernel):
    """The JIT (or interpreted) function under an autotuner."""
    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def _not_specialised(fn) -> set:
    """Indices of the arguments ``fn`` was told not to specialise on."""
    names = getattr(fn, "do_not_specialize", None)
    if names is None:  # the interpreter keeps the decorator's arguments as they were
        names = fn.kwargs.get("do_not_specialize") or ()
    return {fn.arg_names.index(n) if isinstance(n, str) else n for n in names}


@pytest.fixture
def launches():
    """``{kernel: [(positional args, keyword args), ...]}`` of every launch in the test."""
    calls = {kernel: [] for kernel in KERNELS}
    hooks = []
    for kernel in KERNELS:
        def hook(*args, _calls=calls[kernel], **kwargs):
            _calls.append((args, kwargs))
        _interpreted(kernel).add_pre_run_hook(hook)
        hooks.append((kernel, hook))
    yield calls
    for kernel, hook in hooks:
        _interpreted(kernel).pre_run_hooks.remove(hook)


def _training_step(gen, lengths, vocab=512):
    """What a decoder layer and the loss launch for one packed row of ``lengths``."""
    hq, hkv, d, hidden = 4, 2, 64, 64
    total = sum(lengths)
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    positions = torch.cat([torch.arange(n, device=DEVICE) for n in lengths])[None]
    inv_freq = kernels.rotary_inv_freq(d, 1e6, device=DEVICE)[0]
    qkv = randn((1, total, hkv * (hq // hkv + 2) * d), generator=gen).requires_grad_()
    q, k, v = kernels.split_qkv_rotary(qkv, hkv, d, position_ids=positions, inv_freq=inv_freq)
    flat = [x.reshape(total, -1, d) for x in (q, k, v)]
    # Positions from the packing itself (the public API's cu_seqlens form).
    kernels.apply_rotary(flat[0].detach(), flat[1].detach(), cu_seqlens=cu, inv_freq=inv_freq)
    out = kernels.varlen_attn_func(*flat, cu, cu, max(lengths), max(lengths), causal=True)
    x = randn((total, hidden), generator=gen).requires_grad_()
    normed, _ = kernels.rms_norm(out.reshape(total, -1)[:, :hidden],
                                 torch.ones(hidden, device=DEVICE), 1e-5,
                                 residual=x)
    gate = kernels.swiglu(normed, normed)
    labels = torch.randint(0, vocab, (total,), generator=gen, device=DEVICE)
    head = randn((vocab, hidden), generator=gen).requires_grad_()
    loss = sum(kernels.fused_linear_cross_entropy(gate, head, labels, grad_weight_mode=mode,
                                                  chunk_size=16)
               for mode in ("accumulate", "recompute"))
    loss.backward()
    split = kernels.split_heads(hq, hkv, 2)
    buffer = kernels.pack_heads(split, *flat)
    kernels.unpack_heads(split, buffer, total, d)


def _signature(fn, free, args, kwargs):
    """What Triton compiles ``fn`` for: the class of each integer argument it specialises
    on (equal to 1, divisible by 16) and the compile-time constants."""
    classes = tuple((i, a == 1, a % 16 == 0) for i, a in enumerate(args)
                    if isinstance(a, int) and not isinstance(a, bool) and i not in free)
    return classes, tuple(sorted((k, v) for k, v in kwargs.items() if isinstance(v, int)))


def _closest_difference(fn, signature, compiled) -> str:
    """The arguments (or constants) by which ``signature`` differs from the nearest of
    the ``compiled`` ones."""
    def difference(other):
        args = {fn.arg_names[a[0]] for a, b in zip(signature[0], other[0]) if a != b}
        return sorted(args) + (["constants"] if signature[1] != other[1] else [])
    return ", ".join(min((difference(other) for other in compiled), key=len))


def test_new_packings_and_token_counts_compile_nothing_new(gen, launches):
    """After a first step, steps of other packings (7 and 16 samples) and another token
    count (96, then 101 tokens) launch only what the first step compiled."""
    steps = ([40, 1, 30, 8, 9, 4, 4], [6] * 16, [50, 51])
    seen = []
    for lengths in steps:
        before = {kernel: len(calls) for kernel, calls in launches.items()}
        _training_step(gen, lengths)
        seen.append({kernel: calls[before[kernel]:] for kernel, calls in launches.items()})
    problems = []
    for kernel in KERNELS:
        fn = _interpreted(kernel)
        free = _not_specialised(fn)
        compiled = {_signature(fn, free, *call) for call in seen[0][kernel]}
        assert compiled, f"{fn.__name__} was not launched: the step no longer covers it"
        for step in seen[1:]:
            for args, kwargs in step[kernel]:
                signature = _signature(fn, free, args, kwargs)
                if signature not in compiled:
                    difference = _closest_difference(fn, signature, compiled)
                    problems.append(f"{fn.__name__} ({difference})")
        if isinstance(kernel, Autotuner):
            keys = {tuple(kwargs[k] if k in kwargs else args[fn.arg_names.index(k)]
                          for k in kernel.keys)
                    for step in seen for args, kwargs in step[kernel]}
            assert len(keys) == 1, f"{fn.__name__} would be tuned again: key {kernel.keys}"
    assert not problems, f"compiled again for a new packing: {sorted(set(problems))}"
