"""Compile every Triton kernel of ``kernels/`` for an H100 (sm_90) without a GPU.

The test-suite runs the kernels under the Triton interpreter, which accepts code the
GPU compiler rejects (and has no shared-memory limit).  This check runs the real
compiler offline (``triton.compile`` with the ptxas Triton ships) on every kernel at
InternLM2's shapes: each autotuning config of the attention kernels in bf16 for head
dims 64/96/128, and the first config in fp32 (what ``XTUNER_PATCH_AUTOTUNE=0`` keeps),
failing when a kernel does not compile or needs more shared memory than an H100 has.

    python scripts/compile_check.py          # one line per compiled kernel, exit 1 on failure

``TRITON_INTERPRET`` must be unset (``make compile-check`` and
``tests/test_compile_check.py`` run it in a process of its own).
"""

import importlib
import os
import sys
import time
from typing import Callable, Dict, Iterator, Tuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
SHARED_MEMORY_BYTES = 232448  # an H100's opt-in shared memory per block (227 KiB)

# A kernel to compile: (label, JIT function, argument types, constexprs, launch options).
Job = Tuple[str, object, Callable[[str], str], Dict[str, object], Dict[str, int]]


def _module(name: str):
    # kernels/__init__ re-exports functions under some module names (kernels.swiglu).
    return importlib.import_module(f"kernels.{name}")


def _types(data: str, pointers: Dict[str, str] = None, floats=(), int64=()):
    """Argument type by name: upper-case names are pointers to ``data`` unless listed."""
    pointers = pointers or {}

    def of(name: str) -> str:
        if name in pointers:
            return pointers[name]
        if name.isupper():
            return "*" + data
        if name in floats:
            return "fp32"
        return "i64" if name in int64 else "i32"
    return of


def _attention_jobs() -> Iterator[Job]:
    attention = _module("varlen_attention")
    pointers = {"CU_Q": "*i32", "CU_K": "*i32", "WORK": "*i32", "LSE": "*fp32",
                "DELTA": "*fp32"}
    for name in ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel"):
        tuner = getattr(attention, name)
        for data, configs, head_dims in (("bf16", tuner.configs, (64, 96, 128)),
                                         ("fp32", tuner.configs[:1], (128,))):
            for config in configs:
                for head_dim in head_dims:
                    constexprs = dict(HEAD_DIM=head_dim,
                                      BLOCK_D=triton.next_power_of_2(head_dim), CAUSAL=True,
                                      UPCAST=False, UNIT=128, **config.kwargs)
                    label = (f"varlen_attention.{name} {data} d{head_dim} "
                             + " ".join(f"{k}={v}" for k, v in config.kwargs.items()))
                    yield (label, tuner.fn,
                           _types(data, pointers, floats=("qk_scale", "sm_scale")), constexprs,
                           dict(num_warps=config.num_warps, num_stages=config.num_stages))
    yield ("varlen_attention._delta_kernel bf16 d128", attention._delta_kernel,
           _types("bf16", {"DELTA": "*fp32"}), dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_T=64), {})


def _row_kernel_jobs() -> Iterator[Job]:
    rms = _module("rms_norm")
    block_m, block_n, warps = rms._tile(4096)
    tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n)
    yield ("rms_norm._rms_norm_fwd_kernel bf16 h4096 +residual", rms._rms_norm_fwd_kernel,
           _types("bf16", {"RSTD": "*fp32"}, floats=("eps",)), dict(HAS_RESIDUAL=True, **tiles),
           dict(num_warps=warps))
    yield ("rms_norm._rms_norm_bwd_kernel bf16 h4096 +dsum", rms._rms_norm_bwd_kernel,
           _types("bf16", {"RSTD": "*fp32", "DW_PARTIAL": "*fp32"}),
           dict(HAS_DSUM=True, COMPUTE_DW=True, **tiles), dict(num_warps=warps))

    rotary = _module("rotary")
    block_t, heads_per_tile, warps = rotary._tile(64)
    for inverse in (False, True):
        yield (f"rotary._rotary_kernel bf16 d128 packed inverse={inverse}",
               rotary._rotary_kernel,
               _types("bf16", {"POS": "*i64", "CU_SEQLENS": "*i32", "INV_FREQ": "*fp32",
                               "COS": "*fp32", "SIN": "*fp32"},
                      floats=("position_divisor",)),
               dict(CU_POSITIONS=False, FROM_CACHE=False, INTERLEAVED=False, INVERSE=inverse,
                    HAS_V=True, BLOCK_T=block_t, BLOCK_HALF=64, BLOCK_HQ=heads_per_tile,
                    BLOCK_HK=heads_per_tile),
               dict(num_warps=warps))

    layout = _module("sp_layout")
    for to_buffer in (True, False):
        yield (f"sp_layout._heads_kernel bf16 d128 to_buffer={to_buffer}", layout._heads_kernel,
               _types("bf16", {"TABLE": "*i32"}),
               dict(ROW=5, SLOTS=1, TO_BUFFER=to_buffer, BLOCK_T=32, BLOCK_D=128),
               dict(num_warps=4))

    swiglu = _module("swiglu")
    for name in ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel"):
        yield (f"swiglu.{name} bf16", getattr(swiglu, name), _types("bf16"),
               dict(BLOCK=swiglu._BLOCK), dict(num_warps=swiglu._NUM_WARPS))

    loss = _module("cross_entropy")
    for lse_known in (False, True):
        yield (f"cross_entropy._cross_entropy_rows_kernel bf16 lse_known={lse_known}",
               loss._cross_entropy_rows_kernel,
               _types("bf16", {"TARGETS": "*i64", "LOSSES": "*fp32", "LSE": "*fp32"},
                      floats=("scale",), int64=("stride_row",)),
               dict(LSE_KNOWN=lse_known, COMPUTE_GRAD=True, BLOCK_V=loss._BLOCK_V),
               dict(num_warps=loss._NUM_WARPS))


def jobs() -> Iterator[Job]:
    yield from _attention_jobs()
    yield from _row_kernel_jobs()


def compile_one(fn, types, constexprs, options) -> int:
    """Compile for :data:`TARGET`; returns the shared memory the kernel needs (bytes)."""
    signature = {name: "constexpr" if name in constexprs else types(name)
                 for name in fn.arg_names}
    source = ASTSource(fn, signature, constexprs=constexprs)
    return triton.compile(source, target=TARGET, options=options).metadata.shared


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)",
              file=sys.stderr)
        return 2
    failures = 0
    for label, fn, types, constexprs, options in jobs():
        start = time.perf_counter()
        try:
            shared = compile_one(fn, types, constexprs, options)
        except Exception as exc:  # noqa: BLE001 - report every kernel, then fail
            failures += 1
            print(f"FAIL {label}: {type(exc).__name__}: {exc}", flush=True)
            continue
        status = "ok" if shared <= SHARED_MEMORY_BYTES else "FAIL (shared memory)"
        failures += status != "ok"
        print(f"{status} {label}: {shared} B shared, {time.perf_counter() - start:.1f} s",
              flush=True)
    print(f"compile_check: {failures} failure(s) for sm_{TARGET.arch} with triton "
          f"{triton.__version__}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
