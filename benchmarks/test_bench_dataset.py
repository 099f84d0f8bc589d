"""InternEvo (ftdp) data path on one CPU core: xtuner-patch vs XTuner 0.2.0's own functions.

One case per (length mix, line shape); each measures what a training run pays for its
data over one epoch: ``build_packed_dataset(dict(type=load_intern_repo_tokenized_dataset,
folder=...))`` plus reading every pack once, packs of 8192 tokens.

Length mixes (8 ``.bin`` files in cn/ and en/ type folders, int32 and int64 meta,
negative prompt ids, one 20k-token sample per file), generated once into
``.cache/bench-data/``:

- ``sft``: 40k samples, log-normal lengths (median 150, sigma 1.2: mean ~300 tokens,
  up to 20k), ~12M tokens;
- ``short``: 200k samples, median 24 tokens (sigma 0.9), ~6M tokens: XTuner's
  per-sample cost dominates.

Line shapes (:data:`xtuner_patch.fixtures.ftdp.LINE_SHAPES`): ``dumps``
(``{"tokens": [1, -2]}``), ``compact`` (``{"tokens":[1,-2]}``), ``key_after`` (the
tokens, then keys holding quotes, brackets and ``"tokens"`` in strings).

Implementations: ``xtuner-patch`` (as installed: the compiled line reader),
``xtuner-patch-numpy-reader`` (the same loader where the C extension did not build: the
numpy scanner and simdjson read the lines), ``xtuner`` (XTuner's own functions).

Our rows are a first run: its token index is written inside the timed call (every line
parsed and checked), into a fresh cache folder each round; ``warm_s`` (extra_info) is
the same work with the index already there (a later run).  ``check_s``: the build alone,
cold.  Peak memory: each implementation builds and reads every pack in its own process,
which imports both packages first; ``peak_mem_bytes`` is the highest RSS sampled,
``anon_mem_growth_bytes`` the anonymous memory added (RSS also counts the mapped
``.bin`` and index pages read).
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from benchmarks.conftest import OURS, measure, skip_missing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, ".cache", "bench-data")
PACKED_LENGTH = 8192
XTUNER = "xtuner"
NUMPY_READER = "xtuner-patch-numpy-reader"
MIXES = {
    "sft": dict(samples=5_000, median_length=150, sigma=1.2),
    "short": dict(samples=25_000, median_length=24, sigma=0.9),
}
SHAPES = ["dumps", "compact", "key_after"]
CASES = [(mix, shape) for mix in MIXES for shape in SHAPES]


def _files(per_file):
    return {f"{kind}/part-{i:03d}": (per_file, "int32" if i % 2 else "int64")
            for kind in ("cn/chat", "cn/wiki", "en/code", "en/web") for i in range(2)}


def corpus_folder(mix: str, shape: str) -> str:
    """The corpus of a case, written on first use."""
    folder = os.path.join(DATA, f"ftdp-{mix}-{shape}-v2")
    stamp = os.path.join(folder, ".complete")
    if not os.path.exists(stamp):
        from xtuner_patch.fixtures.ftdp import rewrite_lines, write_synthetic_corpus

        spec = MIXES[mix]
        shutil.rmtree(folder, ignore_errors=True)
        summary = write_synthetic_corpus(folder, _files(spec["samples"]), seed=0,
                                         median_length=spec["median_length"],
                                         sigma=spec["sigma"], max_length=20000,
                                         long_length=20000)
        for path in summary["files"]:
            rewrite_lines(path, shape)
        with open(stamp, "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "files"}, f)
    return folder


def _summary(folder):
    with open(os.path.join(folder, ".complete")) as f:
        return json.load(f)


@contextlib.contextmanager
def reader_of(impl):
    """Within it, ``impl``'s line reader parses (the compiled one unless NUMPY_READER)."""
    if impl != NUMPY_READER:
        yield
        return
    from xtuner_patch.dataset import ftdp, lines

    compiled, warned = lines._compiled_scan, ftdp._uncompiled_warned
    lines._compiled_scan, ftdp._uncompiled_warned = None, True
    try:
        yield
    finally:
        lines._compiled_scan, ftdp._uncompiled_warned = compiled, warned


def _functions(impl):
    """``(load_intern_repo_tokenized_dataset, build_packed_dataset)`` of ``impl``."""
    if impl in (OURS, NUMPY_READER):
        from xtuner_patch.dataset import build_packed_dataset, load_intern_repo_tokenized_dataset
    else:
        try:
            from xtuner.dataset.intern_repo import (build_packed_dataset,
                                                    load_intern_repo_tokenized_dataset)
        except Exception as exc:  # noqa: BLE001 - any import failure means "not installed"
            skip_missing(impl, f"xtuner.dataset.intern_repo does not import: {exc!r}")
    return load_intern_repo_tokenized_dataset, build_packed_dataset


def build(impl, folder, cache_dir=None):
    load, build_packed = _functions(impl)
    options = {} if impl == XTUNER else dict(cache_dir=cache_dir)
    with reader_of(impl):
        return build_packed(dict(type=load, folder=folder, min_length=0),
                            packed_length=PACKED_LENGTH, seed=1024, **options)


def epoch(impl, folder, cache_dir=None):
    """Build, then read every pack once; returns the number of packs."""
    ds = build(impl, folder, cache_dir)
    with reader_of(impl):
        for i in range(len(ds)):
            ds[i]
    return len(ds)


# Runs in a fresh interpreter: one epoch, RSS sampled meanwhile.
_MEMORY_SCRIPT = r"""
import json, sys, tempfile, threading
import numpy, torch
import xtuner.dataset.intern_repo, xtuner_patch.dataset
sys.path.insert(0, {repo!r})
from benchmarks.test_bench_dataset import epoch

def rss():  # (total, anonymous) resident bytes
    with open("/proc/self/status") as f:
        kb = dict(line.split(":") for line in f if line.startswith(("VmRSS", "RssAnon")))
    return int(kb["VmRSS"].split()[0]) * 1024, int(kb["RssAnon"].split()[0]) * 1024
peak, done = [rss()], threading.Event()
def sample():
    while not done.wait(0.002):
        peak.append(rss())
base = rss()
threading.Thread(target=sample, daemon=True).start()
with tempfile.TemporaryDirectory() as cache:
    epoch({impl!r}, {folder!r}, cache)
done.set()
peak.append(rss())
print(json.dumps(dict(base=base[0], peak=max(p[0] for p in peak), base_anon=base[1],
                      peak_anon=max(p[1] for p in peak))))
"""


def _memory(impl, folder):
    script = _MEMORY_SCRIPT.format(repo=REPO, impl=impl, folder=folder)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=600, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    return {"peak_mem_bytes": m["peak"], "mem_growth_bytes": m["peak"] - m["base"],
            "anon_mem_growth_bytes": m["peak_anon"] - m["base_anon"]}


@pytest.mark.parametrize("impl", [OURS, NUMPY_READER, XTUNER])
@pytest.mark.parametrize("mix, shape", CASES)
def test_ftdp_epoch(benchmark, mix, shape, impl):
    _functions(impl)
    folder = corpus_folder(mix, shape)
    summary = _summary(folder)
    case = dict(bench="ftdp_epoch", mix=mix, shape=shape, samples=summary["samples"],
                tokens=summary["tokens"], packed_length=PACKED_LENGTH)
    caches = []

    def fresh_cache():  # a first run: no token index yet
        caches.append(tempfile.mkdtemp(prefix="bench-ftdp-index-"))

    try:
        if impl != XTUNER:
            measure(benchmark, lambda: epoch(impl, folder, caches[-1]), impl=impl, case=case,
                    rounds=5, warmup_rounds=0, setup=fresh_cache)
        else:  # several seconds a round: one round, as the side-by-side run
            measure(benchmark, lambda: epoch(impl, folder), impl=impl, case=case, rounds=1,
                    warmup_rounds=0)
        median = benchmark.stats.stats.median
        packs = len(build(impl, folder, caches[-1] if caches else None))
        extra = dict(throughput=packs * PACKED_LENGTH / median, throughput_unit="tokens/s",
                     tokens_per_s=packs * PACKED_LENGTH / median, packs=packs)
        if impl != XTUNER:
            t0 = time.perf_counter()
            epoch(impl, folder, caches[-1])  # the index is there now
            extra["warm_s"] = time.perf_counter() - t0
            extra["warm_tokens_per_s"] = packs * PACKED_LENGTH / extra["warm_s"]
            fresh_cache()
            t0 = time.perf_counter()
            build(impl, folder, caches[-1])
            extra["check_s"] = time.perf_counter() - t0
        extra.update(_memory(impl, folder))
        benchmark.extra_info.update(extra)
    finally:
        for cache in caches:
            shutil.rmtree(cache, ignore_errors=True)
