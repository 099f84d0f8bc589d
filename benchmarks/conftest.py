"""Benchmark harness: ``pytest benchmarks/ --benchmark-only``.

Every benchmark is one pytest-benchmark test per (case, implementation): ours and
each baseline are parametrisations of the same test, so they run side by side in one
session and share ``benchmark.group`` (one group per case).  :func:`measure` records
what the report needs in ``extra_info``: the implementation name, the work done
(FLOPs and/or bytes that must move), and peak memory.  ``benchmarks/report.py`` turns
``--benchmark-json`` output into ratio tables and plots; the same tables are printed
at the end of the session.

Baselines that are not installed call :func:`skip_missing`, which skips with a reason:
they are never silently replaced by something else.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from benchmarks.targets import OURS  # noqa: E402,F401  (re-exported for the benchmarks)

HAS_CUDA = torch.cuda.is_available()


def skip_missing(what: str, why: str):
    pytest.skip(f"baseline {what} unavailable: {why}")


def requires_cuda():
    if not HAS_CUDA:
        pytest.skip("kernel benchmarks need a CUDA device; run `make gpu-check` on the GPU host")


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def measure(benchmark, fn, *, impl: str, case: dict, flops: float = None,
            bytes_moved: float = None, rounds: int = None, warmup_rounds: int = 3,
            setup=None):
    """Time ``fn()`` with ``benchmark.pedantic`` and record throughput and peak memory.

    ``case`` identifies the workload (shape, dtype, ...); its items go to extra_info
    and make up ``benchmark.group`` so implementations of the same case are compared.
    ``flops``/``bytes_moved`` are the work the *problem* needs (not what an
    implementation happens to do), so throughputs are comparable across
    implementations.  ``setup`` (optional) is called before every round, untimed.
    """
    benchmark.group = " ".join(f"{k}={v}" for k, v in case.items())
    benchmark.extra_info.update(case)
    benchmark.extra_info["impl"] = impl
    if rounds is None:
        rounds = 20 if HAS_CUDA else 3

    def target():
        fn()
        _sync()

    # Peak memory of one call, measured before timing, relative to what was live.
    if HAS_CUDA:
        if setup is not None:
            setup()
        _sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        target()
        benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base

    def synced_setup():
        setup()
        _sync()

    benchmark.pedantic(target, setup=synced_setup if setup is not None else None, rounds=rounds,
                       warmup_rounds=warmup_rounds, iterations=1)
    stats = benchmark.stats.stats
    if flops is not None:
        benchmark.extra_info["flops"] = flops
        benchmark.extra_info["tflops"] = flops / stats.median / 1e12
    if bytes_moved is not None:
        benchmark.extra_info["bytes"] = bytes_moved
        benchmark.extra_info["gbps"] = bytes_moved / stats.median / 1e9


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    from benchmarks.report import ratio_table, rows_from_benchmarks

    rows = rows_from_benchmarks(session.benchmarks)
    if rows:
        terminalreporter.write_sep("=", "xtuner-patch: ours vs baselines (median times)")
        terminalreporter.write_line(ratio_table(rows))
