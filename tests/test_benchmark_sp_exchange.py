"""The sequence-parallel benchmarks' steps run here first, at tiny sizes, so that device
time goes to measuring them (``make test`` does not run ``benchmarks/``).

``benchmarks.sp_exchange.step`` (layouts and exchanges alone, ours and XTuner's) must
send the bytes the benchmark checks; ``benchmarks.sp_exchange.layer_step`` times
training's path (``xtuner-patch``) against the same RoPE and ``wo`` without sequence
parallel (``no-layout``); with the collectives counting no-ops, ours must send exactly
the layer's bytes, forward and backward, and both must give ``wo``'s weight its
gradient.  ``p2p_all_to_all``, the gloo benchmark's list all-to-all where gloo has
none, must move what gloo's ``all_to_all_single`` moves.
"""

import pytest
import torch

pytest.importorskip("xtuner.parallel.sequence")

from benchmarks.sp_exchange import (HEAD_DIM as BENCH_HEAD_DIM, HEADS as BENCH_HEADS,  # noqa: E402
                                    KV_HEADS as BENCH_KV_HEADS, LAYER_IMPLS,
                                    counting_collectives, layer_step, step)
from kernels.sp_layout import split_heads  # noqa: E402
from tests.helpers import DEVICE  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, TOKENS = 4, 2, 16, 8


@pytest.mark.parametrize("sp", [2, 8])
@pytest.mark.parametrize("impl", ["xtuner-patch", "xtuner"])
def test_exchange_step_sends_the_bytes_the_benchmark_expects(impl, sp):
    tokens = 4
    with counting_collectives(sp) as sent:
        step(impl, sp, 0, None, tokens, DEVICE)()
    split = split_heads(BENCH_HEADS, BENCH_KV_HEADS, sp)
    ours = split.bytes_sent(tokens, BENCH_HEAD_DIM, 2)
    kv_factor = 1 if impl == "xtuner-patch" else BENCH_HEADS // BENCH_KV_HEADS
    assert sent["bytes"] == 2 * (ours["q"] + ours["out"] + kv_factor * (ours["k"] + ours["v"]))


@pytest.mark.parametrize("sp", [2])
@pytest.mark.parametrize("impl", LAYER_IMPLS)
def test_layer_step_sends_the_layer_bytes_and_reaches_wo(impl, sp, monkeypatch):
    import torch.nn.functional as F

    shapes = dict(heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=torch.float32)
    leaves = []
    linear = F.linear

    def recording_linear(x, weight, *args):
        leaves.append(weight)
        return linear(x, weight, *args)

    monkeypatch.setattr(F, "linear", recording_linear)
    with counting_collectives(sp) as sent:
        layer_step(impl, sp, 0, None, TOKENS, DEVICE, **shapes)()
    per_layer = split_heads(HEADS, KV_HEADS, sp).bytes_sent(TOKENS, HEAD_DIM, 4)
    assert sent["bytes"] == (2 * sum(per_layer.values()) if impl == "xtuner-patch" else 0)
    (weight,) = leaves
    assert weight.grad is not None and weight.grad.shape == (HEADS * HEAD_DIM,) * 2


def test_layer_step_names_what_it_cannot_time():
    with pytest.raises(ValueError, match="general path"):
        layer_step("xtuner-patch", 4, 0, None, TOKENS, DEVICE, heads=HEADS, kv_heads=KV_HEADS,
                   head_dim=HEAD_DIM)
    with pytest.raises(ValueError, match="impl must be one of"):
        layer_step("other", 2, 0, None, TOKENS, DEVICE, heads=HEADS, kv_heads=KV_HEADS,
                   head_dim=HEAD_DIM)


def _p2p_rank(rank: int, address: str, out_dir: str) -> None:
    import torch.distributed as dist

    from benchmarks.sp_exchange import p2p_all_to_all

    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=2)
    inputs = [torch.arange(6.0).view(2, 3) + 10 * rank + 100 * dest for dest in range(2)]
    outputs = [torch.full((2, 3), float("nan")) for _ in range(2)]
    p2p_all_to_all(outputs, inputs, dist.group.WORLD)
    single = torch.empty(12)
    dist.all_to_all_single(single, torch.cat([x.reshape(-1) for x in inputs]))
    torch.save((torch.stack(outputs), single.view(2, 2, 3)), f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


def test_p2p_list_all_to_all_moves_what_gloo_all_to_all_single_moves(tmp_path):
    # The gloo benchmark's stand-in for the list all-to-all XTuner calls.
    context = torch.multiprocessing.get_context("spawn")
    ranks = [context.Process(target=_p2p_rank,
                             args=(r, f"file://{tmp_path / 'store'}", str(tmp_path)))
             for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
    assert [p.exitcode for p in ranks] == [0, 0]
    for rank in range(2):
        got, single = torch.load(tmp_path / f"{rank}.pt")
        want = torch.stack([torch.arange(6.0).view(2, 3) + 10 * src + 100 * rank
                            for src in range(2)])
        assert torch.equal(got, want) and torch.equal(single, want)
