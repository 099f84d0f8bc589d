"""Sequence-parallel attention exchanges at InternLM2-7B heads (32 query / 8 kv, d 128, bf16):
xtuner-patch vs XTuner (see ``benchmarks/sp_exchange.py`` for what each step does).

- ``sp_layout_fwd_bwd`` (sp 2, 4, 8; CPU and GPU): one layer's layouts forward +
  backward with the collective replaced by a no-op that counts the bytes this rank
  sends.  On a GPU this times our Triton layout kernels (vs XTuner's PyTorch copies);
  on a CPU, their PyTorch references.  Ours is the general path, packing q, k, v;
  training InternLM2-7B at these sizes packs straight from ``wqkv``'s output inside
  the RoPE kernel instead (``pack_qkv_rotary``), which takes the pack out of this step.
  ``extra_info`` holds each implementation's bytes per layer forward
  (``bytes_q/k/v/out``), checked against the shapes: our K and V bytes are a quarter of
  XTuner's.  Throughputs count our bytes for both (what the exchange needs).  One GPU
  cannot time an all-to-all between GPUs, so each GPU row also records
  ``layout_share_of_nvlink_a2a_estimate``: its time over the time the all-to-alls
  would take at best, sending the bytes bound for other ranks at
  :data:`NVLINK_BYTES_PER_S` (a model, not a measurement); ``copy_share``, the layout's
  rate over a device-to-device copy (each layout pass reads and writes what it moves
  once); and ``copy_floor_share_of_nvlink_a2a_estimate``, the first ratio for layouts
  running at copy bandwidth: the least any layout done as separate passes can reach.
- ``sp_layer_layout_fwd_bwd`` (sp 2, 4, 8; GPU): what the layouts add to a training
  step.  ``xtuner-patch`` runs RoPE, the layouts and ``wo`` as training runs them
  (q, k, v packed inside the RoPE kernel, ``wo``'s input gradient written into the send
  buffer by its GEMMs: only the attention output's unpack is a pass of its own),
  ``no-layout`` the same RoPE and GEMMs without sequence parallel
  (``benchmarks.sp_exchange.layer_step``); collectives are counting no-ops as above.
  The difference over the modelled NVLink all-to-all time (``nvlink_a2a_estimate_s``)
  is the layout share the issue bounds; ``copy_floor_share_of_nvlink_a2a_estimate`` is
  the remaining pass at copy bandwidth.
- ``sp_gloo_fwd_bwd`` (sp 2, CPU): the same with the real all-to-alls over gloo, this
  process being rank 0 and ``python -m benchmarks.sp_exchange`` rank 1;
  ``all-to-all`` moves our bytes with nothing else, so ``xtuner-patch`` minus it is
  our layout cost (``extra_info["layout_share_of_ours"]``, a fraction of the
  ``all-to-all`` time, on the ``all-to-all`` row).  gloo in torch 2.11 has no list
  all-to-all: XTuner's row then sends its list as point-to-point pairs, as NCCL does
  (``extra_info["list_all_to_all"]``).
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.conftest import HAS_CUDA, OURS, measure, skip_missing
from benchmarks.copy_bandwidth import copy_gbps
from benchmarks.sp_exchange import (DTYPE, GLOO_TOKENS, HEAD_DIM, HEADS, IMPLS, KV_HEADS,
                                    LAYER_IMPLS, PROBE, STOP, announce, counting_collectives,
                                    gloo_steps, layer_step, step)
from kernels.sp_layout import split_heads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 32768 if HAS_CUDA else 8192  # a whole row; each rank holds SEQ_LEN / sp tokens
ITEMSIZE = torch.finfo(DTYPE).bits // 8
# An H100 or H200 SXM's NVLink 4 bandwidth in one direction (18 links x 25 GB/s): the fastest
# an all-to-all can send a GPU's bytes to the others.
NVLINK_BYTES_PER_S = 450e9


def _xtuner():
    try:
        importlib.import_module("xtuner.parallel.sequence")
        importlib.import_module("xtuner.model.modules.dispatch.internlm2")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not installed"
        skip_missing("xtuner", f"XTuner's sequence parallel does not import: {exc!r}")


def _expected_bytes(impl: str, sp: int, tokens: int) -> dict:
    per_head = tokens * HEAD_DIM * ITEMSIZE
    if impl == OURS:
        return split_heads(HEADS, KV_HEADS, sp).bytes_sent(tokens, HEAD_DIM, ITEMSIZE)
    # XTuner repeats K and V to every query head before sending them.
    return {name: per_head * HEADS for name in ("q", "k", "v", "out")}


@pytest.mark.parametrize("impl", [OURS, "xtuner"])
@pytest.mark.parametrize("sp", [2, 4, 8])
def test_sp_layout_fwd_bwd(benchmark, sp, impl):
    _xtuner()
    tokens = SEQ_LEN // sp
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    expected = _expected_bytes(impl, sp, tokens)
    with counting_collectives(sp) as sent:
        run = step(impl, sp, 0, None, tokens, device)
        run()
        # Forward and backward send the same bytes.
        assert sent["bytes"] == 2 * sum(expected.values()), (sent, expected)
        # The bytes the problem needs, the same for every implementation: ours.
        measure(benchmark, run, impl=impl,
                case=dict(bench="sp_layout_fwd_bwd", model="internlm2-7b", sp=sp,
                          seq_len=SEQ_LEN, dtype="bf16"),
                bytes_moved=2 * sum(_expected_bytes(OURS, sp, tokens).values()),
                rounds=None if HAS_CUDA else 10)
    benchmark.extra_info.update({f"bytes_{k}": v for k, v in expected.items()})
    if HAS_CUDA:
        a2a_seconds = _nvlink_a2a_seconds(expected, sp)
        # Every layout pass reads and writes each byte it moves once.
        copy_seconds = 2 * benchmark.extra_info["bytes"] / (copy_gbps() * 1e9)
        benchmark.extra_info.update(
            layout_share_of_nvlink_a2a_estimate=benchmark.stats.stats.median / a2a_seconds,
            copy_share=copy_seconds / benchmark.stats.stats.median)
        if impl == OURS:
            benchmark.extra_info["copy_floor_share_of_nvlink_a2a_estimate"] = (
                copy_seconds / a2a_seconds)
    if impl == OURS:
        xtuner = _expected_bytes("xtuner", sp, tokens)
        assert 4 * expected["k"] == xtuner["k"] and 4 * expected["v"] == xtuner["v"]


def _nvlink_a2a_seconds(bytes_sent: dict, sp: int) -> float:
    """The modelled time of one layer's exchanges, forward and backward (a rank keeps
    its own chunk)."""
    return 2 * sum(bytes_sent.values()) * (sp - 1) / sp / NVLINK_BYTES_PER_S


@pytest.mark.parametrize("impl", LAYER_IMPLS)
@pytest.mark.parametrize("sp", [2, 4, 8])
def test_sp_layer_layout_fwd_bwd(benchmark, sp, impl):
    if not HAS_CUDA:
        pytest.skip("GPU only: training packs q, k, v inside the Triton RoPE kernel "
                    "(tests/test_benchmark_sp_exchange.py runs these steps on CPU)")
    _xtuner()  # counting_collectives replaces XTuner's collective too
    tokens = SEQ_LEN // sp
    mine = _expected_bytes(OURS, sp, tokens)
    with counting_collectives(sp) as sent:
        run = layer_step(impl, sp, 0, None, tokens, torch.device("cuda"))
        run()
        assert sent["bytes"] == (2 * sum(mine.values()) if impl == OURS else 0), sent
        measure(benchmark, run, impl=impl,
                case=dict(bench="sp_layer_layout_fwd_bwd", model="internlm2-7b", sp=sp,
                          seq_len=SEQ_LEN, dtype="bf16"))
    a2a_seconds = _nvlink_a2a_seconds(mine, sp)
    benchmark.extra_info["nvlink_a2a_estimate_s"] = a2a_seconds
    if impl == OURS:
        # The output's unpack, forward only: reads and writes its bytes once.
        unpack_seconds = 2 * mine["out"] / (copy_gbps() * 1e9)
        benchmark.extra_info["copy_floor_share_of_nvlink_a2a_estimate"] = (
            unpack_seconds / a2a_seconds)


@pytest.fixture(scope="module")
def gloo_pair(tmp_path_factory):
    """This process as rank 0 of a 2-rank gloo group; rank 1 mirrors every announced step.
    Yields the steps, whether XTuner's list all-to-all exists on this gloo (else its row
    runs it as point-to-point pairs), and a dict for the medians measured."""
    import torch.distributed as dist

    _xtuner()
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    address = f"file://{tmp_path_factory.mktemp('gloo') / 'store'}"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    peer = subprocess.Popen([sys.executable, "-m", "benchmarks.sp_exchange", address],
                            cwd=REPO, env=env)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two ranks on the same cores
    dist.init_process_group("gloo", init_method=address, rank=0, world_size=2)
    try:
        announce(PROBE)
        yield (*gloo_steps(0), {})
    finally:
        announce(STOP)
        dist.destroy_process_group()
        torch.set_num_threads(threads)
        peer.wait(timeout=60)


@pytest.mark.parametrize("impl", IMPLS)
def test_sp_gloo_fwd_bwd(benchmark, gloo_pair, impl):
    steps, native_list_all_to_all, medians = gloo_pair
    index = IMPLS.index(impl)
    run = steps[index]

    def announced():
        announce(index)
        run()

    expected = _expected_bytes(OURS if impl == "all-to-all" else impl, 2, GLOO_TOKENS)
    measure(benchmark, announced, impl=impl,
            case=dict(bench="sp_gloo_fwd_bwd", model="internlm2-7b", sp=2,
                      seq_len=2 * GLOO_TOKENS, dtype="bf16", backend="gloo-cpu"),
            bytes_moved=2 * sum(_expected_bytes(OURS, 2, GLOO_TOKENS).values()), rounds=10)
    medians[impl] = benchmark.stats.stats.median
    benchmark.extra_info.update({f"bytes_{k}": v for k, v in expected.items()})
    if impl == "xtuner":
        benchmark.extra_info["list_all_to_all"] = (
            "gloo's" if native_list_all_to_all else "isend/irecv pairs (this gloo has none)")
    if impl == "all-to-all" and OURS in medians:
        benchmark.extra_info["layout_share_of_ours"] = (
            (medians[OURS] - medians[impl]) / medians[impl])
