"""The device-to-device copy bandwidth that memory-bound kernels are judged against.

``copy_gbps()`` times ``torch.clone`` of a 1 GiB tensor (bytes read + written) once per
session; :func:`record_copy_share` stores it and a benchmark's share of it in
``extra_info`` (``copy_gbps``, ``copy_share``).
"""

import functools

import torch

COPY_BYTES = 2**30


def time_median(fn, rounds: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


@functools.lru_cache(maxsize=None)
def copy_gbps() -> float:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").random_()
    seconds = time_median(lambda: src.clone())
    return 2 * COPY_BYTES / seconds / 1e9


def record_copy_share(benchmark) -> None:
    """Add the copy bandwidth and ``gbps / copy_gbps`` to a measured benchmark."""
    copy = copy_gbps()
    benchmark.extra_info["copy_gbps"] = copy
    if "gbps" in benchmark.extra_info:
        benchmark.extra_info["copy_share"] = benchmark.extra_info["gbps"] / copy
