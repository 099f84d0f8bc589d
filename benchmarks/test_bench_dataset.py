"""InternEvo (ftdp) data path on CPU: xtuner-patch vs XTuner 0.2.0's own functions.

Corpus: 1M samples in 8 ``.bin`` files of 125k (cn/ and en/ type folders, int32 and
int64 meta), log-normal SFT-like lengths (median 24 tokens, ~36M tokens, ~260 MB),
generated once into ``.cache/bench-data/`` and reused.  Packs of 8192 tokens.

- ``ftdp_build``: ``build_packed_dataset(dict(type=load_intern_repo_tokenized_dataset,
  ...))`` from the folder (meta files read, samples shuffled, pack index built).
- ``ftdp_iterate``: reading the same fixed random subset of packs (XTuner needs ~1 min
  for all of them); ``ftdp_iterate_all``: ours over every pack.
- Peak memory: each implementation builds and reads the subset in its own process,
  which imports both packages first, so the baselines match; ``peak_mem_bytes`` is the
  highest RSS sampled during build + iterate, ``mem_growth_bytes`` that minus the RSS
  before the build, ``anon_mem_growth_bytes`` the same for anonymous memory only (both
  implementations mmap the ``.bin`` files, so reading packs also adds page-cache pages).
- ``epoch_s`` (extra_info of ``ftdp_iterate``): build + reading every pack once,
  estimated from the measured rates.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.conftest import OURS, measure, skip_missing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, ".cache", "bench-data", "ftdp-1m-v1")
FILES = {f"{kind}/part-{i:03d}": (125_000, "int32" if i % 2 else "int64")
         for kind in ("cn/chat", "cn/wiki", "en/code", "en/web") for i in range(2)}
PACKED_LENGTH = 8192
SUBSET = 100
IMPLS = [OURS, "xtuner"]
CASE = dict(samples=sum(n for n, _ in FILES.values()), files=len(FILES),
            packed_length=PACKED_LENGTH)


@pytest.fixture(scope="module")
def corpus() -> str:
    stamp = os.path.join(DATA, ".complete")
    if not os.path.exists(stamp):
        from xtuner_patch.dataset.synthetic import write_synthetic_corpus

        summary = write_synthetic_corpus(DATA, FILES, seed=0, median_length=24, sigma=0.9,
                                         max_length=16384, long_length=20000)
        with open(stamp, "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "files"}, f)
    return DATA


def _functions(impl):
    """``(load_intern_repo_tokenized_dataset, build_packed_dataset)`` of ``impl``."""
    if impl == OURS:
        from xtuner_patch.dataset import build_packed_dataset, load_intern_repo_tokenized_dataset
    else:
        try:
            from xtuner.dataset.intern_repo import (build_packed_dataset,
                                                    load_intern_repo_tokenized_dataset)
        except Exception as exc:  # noqa: BLE001 - any import failure means "not installed"
            skip_missing(impl, f"xtuner.dataset.intern_repo does not import: {exc!r}")
    return load_intern_repo_tokenized_dataset, build_packed_dataset


def _build(impl, folder):
    load, build = _functions(impl)
    return build(dict(type=load, folder=folder, min_length=0), packed_length=PACKED_LENGTH,
                 seed=1024)


def _subset(num_packs):
    return np.random.RandomState(0).choice(num_packs, SUBSET, replace=False).tolist()


# Runs in a fresh interpreter: build, read the subset, report RSS and timings.
_MEMORY_SCRIPT = r"""
import json, os, sys, threading, time
import numpy, torch
import xtuner.dataset.intern_repo, xtuner_patch.dataset
sys.path.insert(0, {repo!r})
from benchmarks.test_bench_dataset import _build, _subset

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
t0 = time.perf_counter()
ds = _build({impl!r}, {folder!r})
t1 = time.perf_counter()
for i in _subset(len(ds)):
    ds[i]
t2 = time.perf_counter()
done.set()
peak.append(rss())
print(json.dumps(dict(base=base[0], peak=max(p[0] for p in peak), base_anon=base[1],
                      peak_anon=max(p[1] for p in peak), build_s=t1 - t0, iterate_s=t2 - t1)))
"""

_memory = {}


def _memory_of(impl, folder):
    if impl not in _memory:
        _functions(impl)  # skips if unavailable
        script = _MEMORY_SCRIPT.format(repo=REPO, impl=impl, folder=folder)
        out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                             text=True, timeout=300, check=True)
        _memory[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    m = _memory[impl]
    return {"peak_mem_bytes": m["peak"], "mem_growth_bytes": m["peak"] - m["base"],
            "anon_mem_growth_bytes": m["peak_anon"] - m["base_anon"]}


_rates = {}


@pytest.mark.parametrize("impl", IMPLS)
def test_ftdp_build(benchmark, corpus, impl):
    _functions(impl)
    measure(benchmark, lambda: _build(impl, corpus), impl=impl,
            case=dict(bench="ftdp_build", **CASE), rounds=3, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(_memory_of(impl, corpus), throughput=CASE["samples"] / median,
                                throughput_unit="samples/s")
    _rates.setdefault(impl, {})["build_s"] = median


@pytest.mark.parametrize("impl", IMPLS)
def test_ftdp_iterate(benchmark, corpus, impl):
    ds = _build(impl, corpus)
    subset = _subset(len(ds))

    def read():
        for i in subset:
            ds[i]

    measure(benchmark, read, impl=impl, case=dict(bench="ftdp_iterate", packs=SUBSET, **CASE),
            rounds=3, warmup_rounds=1)
    rate = SUBSET / benchmark.stats.stats.median
    epoch = {}
    if "build_s" in _rates.get(impl, {}):
        epoch["epoch_s"] = _rates[impl]["build_s"] + len(ds) / rate
    benchmark.extra_info.update(_memory_of(impl, corpus), throughput=rate,
                                throughput_unit="packs/s", total_packs=len(ds),
                                tokens_per_s=rate * PACKED_LENGTH, **epoch)


def test_ftdp_iterate_all(benchmark, corpus):
    ds = _build(OURS, corpus)

    def read_all():
        for i in range(len(ds)):
            ds[i]

    measure(benchmark, read_all, impl=OURS,
            case=dict(bench="ftdp_iterate_all", packs=len(ds), **CASE), rounds=2,
            warmup_rounds=0)
    rate = len(ds) / benchmark.stats.stats.median
    benchmark.extra_info.update(throughput=rate, throughput_unit="packs/s",
                                tokens_per_s=rate * PACKED_LENGTH)
