"""kernels._runtime: the memo launchers use for values that need a device sync."""

import gc
import weakref

import torch

from kernels._runtime import TensorMemo, packed_heads


class _Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.calls


def test_memo_reuses_value_for_same_unmodified_tensors():
    memo, compute = TensorMemo(), _Counter()
    a, b = torch.arange(4), torch.arange(4)
    assert memo.get((a,), "x", compute) == 1
    assert memo.get((a,), "x", compute) == 1
    # An equal tensor that is another object, or another extra key, is another entry.
    assert memo.get((b,), "x", compute) == 2
    assert memo.get((a,), "y", compute) == 3
    assert memo.get((a,), "x", compute) == 1


def test_memo_recomputes_after_in_place_write():
    memo, compute = TensorMemo(), _Counter()
    a = torch.arange(4)
    assert memo.get((a,), None, compute) == 1
    a[0] = 7
    assert memo.get((a,), None, compute) == 2
    a.add_(1)
    assert memo.get((a,), None, compute) == 3
    assert memo.get((a,), None, compute) == 3


def test_memo_keeps_the_most_recent_entries():
    memo, compute = TensorMemo(size=2), _Counter()
    a, b, c = (torch.zeros(1) for _ in range(3))
    memo.get((a,), None, compute)
    memo.get((b,), None, compute)
    memo.get((a,), None, compute)  # a is now the most recent
    memo.get((c,), None, compute)  # evicts b
    assert memo.get((a,), None, compute) == 1
    assert memo.get((b,), None, compute) == 4


def test_memo_skips_inference_tensors():
    memo, compute = TensorMemo(), _Counter()
    with torch.inference_mode():
        a = torch.arange(4)
    assert memo.get((a,), None, compute) == 1
    assert memo.get((a,), None, compute) == 2


def test_memo_keeps_no_tensor_alive_and_forgets_dead_ones():
    memo, compute = TensorMemo(), _Counter()
    a = torch.arange(4)
    assert memo.get((a,), None, compute) == 1
    alive = weakref.ref(a)
    del a
    gc.collect()
    assert alive() is None
    # A new tensor (possibly at the dead one's address) is computed afresh.
    assert memo.get((torch.arange(4),), None, compute) == 2


def test_packed_heads_finds_the_tensor_of_consecutive_head_ranges():
    whole = torch.randn(5, 7, 4)
    q, k, v = whole.split([4, 2, 1], dim=1)
    view = packed_heads((q, k, v))
    assert view is not None and view.data_ptr() == whole.data_ptr()
    assert torch.equal(view, whole)
    offset = torch.randn(5, 9, 4)[:, 2:]  # rows wider than the heads given
    assert packed_heads(offset.split([4, 2, 1], dim=1)) is None


def test_packed_heads_refuses_anything_else():
    whole = torch.randn(5, 7, 4)
    q, k, v = whole.split([4, 2, 1], dim=1)
    assert packed_heads((q, v, k)) is None  # out of order
    assert packed_heads((q, k, v.clone())) is None  # another storage
    assert packed_heads((q, k)) is None  # rows wider than these heads
    gap = torch.randn(5, 8, 4)
    assert packed_heads((gap[:, :4], gap[:, 5:])) is None  # a head between them
    assert packed_heads((whole[:, :4].double(), whole[:, 4:])) is None


def test_cdiv_and_next_power_of_2_match_triton():
    import triton

    from kernels._runtime import cdiv, next_power_of_2

    for a in range(0, 70):
        for b in (1, 2, 7, 16, 64):
            assert cdiv(a, b) == triton.cdiv(a, b)
        assert next_power_of_2(a) == triton.next_power_of_2(a)
