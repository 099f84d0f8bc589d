"""One attention layer's sequence-parallel exchanges, forward + backward, per implementation.

Shared by ``benchmarks/test_bench_sequence_parallel.py`` and, run as
``python -m benchmarks.sp_exchange ADDRESS``, its gloo peer: rank 1 of a 2-rank group
whose rank 0 is the benchmark process.  The peer runs whatever step rank 0 announces
(a broadcast before every call), so both ranks always make the same collectives.

Implementations (``step``):

- ``xtuner-patch``: :mod:`kernels.sequence_parallel`'s exchanges (``pack_heads``,
  one all-to-all, views; all-to-all, ``unpack_heads``; the reverse in backward);
- ``xtuner``: what XTuner's varlen InternLM2 forward does: ``repeat_kv_bshd`` on K and
  V, then ``pre_process_for_sequence_parallel_attn`` / ``post_process_...``
  (``tensor_split`` + ``contiguous`` + list all-to-all + ``cat`` for each of q, k, v).
  Where the backend has no list all-to-all (gloo in torch 2.11; 2.14 has one), that
  one runs as point-to-point pairs (:func:`p2p_all_to_all`);
- ``all-to-all``: ``all_to_all_single`` of our byte counts alone (4 per step), the
  floor ``xtuner-patch`` is measured against.

Attention itself is a free stand-in, so that a step times layouts and exchanges only.
``layer_step`` adds the RoPE and ``wo`` around them, as a training step runs them.
"""

import contextlib
import sys
import types

import torch
import torch.distributed as dist

from kernels.sp_layout import split_heads

IMPLS = ("xtuner-patch", "xtuner", "all-to-all")
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # InternLM2-7B
DTYPE = torch.bfloat16
GLOO_TOKENS = 2048  # per rank
STOP, PROBE = -1, -2  # announced cases besides the indices of IMPLS


class _Attend(torch.autograd.Function):
    """A free stand-in for attention: an output of q's shape, and as gradients of q, k, v
    the tensors ``grads`` allocated once, laid out as the real attention lays them out."""

    @staticmethod
    def forward(ctx, q, k, v, grads):
        ctx.grads = grads
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)

    @staticmethod
    def backward(ctx, dout):
        return (*ctx.grads, None)


@contextlib.contextmanager
def xtuner_groups(sp: int, group):
    """XTuner's sequence-parallel globals set to ``group`` (and no inner group needed)."""
    from xtuner.parallel.sequence import setup_distributed as state

    saved = dict(vars(state))
    state._SEQUENCE_PARALLEL_GROUP = group
    state._SEQUENCE_PARALLEL_WORLD_SIZE = sp
    state._INNER_SEQUENCE_PARALLEL_GROUP = object()  # only tested for being set: insp is 1
    state._INNER_SEQUENCE_PARALLEL_WORLD_SIZE = 1
    try:
        yield
    finally:
        for name in [n for n in vars(state) if n.startswith("_") and n.isupper()]:
            setattr(state, name, saved.get(name))


def p2p_all_to_all(outputs, inputs, group=None) -> None:
    """``dist.all_to_all`` as ``isend``/``irecv`` pairs, each list tensor sent or received
    where it is (what NCCL does for a list all-to-all: no staging buffer, so XTuner's
    layouts are timed with no copy they would not make), this rank's own piece copied.
    For backends without a list all-to-all."""
    rank = dist.get_rank(group)
    requests = []
    for peer, (out, inp) in enumerate(zip(outputs, inputs)):
        if peer == rank:
            out.copy_(inp)
            continue
        other = peer if group is None else dist.get_global_rank(group, peer)
        requests += [dist.isend(inp, other, group=group), dist.irecv(out, other, group=group)]
    for request in requests:
        request.wait()


@contextlib.contextmanager
def xtuner_list_all_to_all(emulated: bool):
    """XTuner's sequence-parallel collective as it is, or with ``emulated`` its list
    all-to-all replaced by :func:`p2p_all_to_all`."""
    if not emulated:
        yield
        return
    import xtuner.parallel.sequence.comm as xtuner_comm

    saved = xtuner_comm.dist
    xtuner_comm.dist = types.SimpleNamespace(**{**vars(dist), "all_to_all": p2p_all_to_all})
    try:
        yield
    finally:
        xtuner_comm.dist = saved


def step(impl: str, sp: int, rank: int, group, tokens: int, device,
         p2p_list_all_to_all: bool = False):
    """A callable running one layer's exchanges forward + backward on fresh-looking data
    (XTuner's list all-to-all as :func:`p2p_all_to_all` with ``p2p_list_all_to_all``)."""
    split = split_heads(HEADS, KV_HEADS, sp)
    gen = torch.Generator(device=device).manual_seed(rank)

    def randn(*shape, grad=False):
        x = torch.randn(shape, generator=gen, device=device).to(DTYPE)
        return x.requires_grad_(grad)

    if impl == "xtuner-patch":
        from kernels.sequence_parallel import heads_from_ranks, heads_to_ranks

        q, k, v = (randn(tokens, h, HEAD_DIM, grad=True) for h in (HEADS, KV_HEADS, KV_HEADS))
        # Our attention kernel returns the gradients of the received views as views of
        # one buffer (kernels.varlen_attention), which the backward exchange sends as is.
        nq, nkv = split.num_q(rank), split.num_kv(rank)
        grads = torch.zeros(sp * tokens, nq + 2 * nkv, HEAD_DIM, dtype=DTYPE,
                            device=device).split([nq, nkv, nkv], dim=1)
        dout = randn(tokens, HEADS, HEAD_DIM)

        def run():
            every = heads_to_ranks(split, group, q, k, v)
            out = _Attend.apply(*every, grads)
            heads_from_ranks(split, group, out).backward(dout)
        return run
    if impl == "xtuner":
        from xtuner.model.modules.dispatch.internlm2 import repeat_kv_bshd
        from xtuner.parallel.sequence import (post_process_for_sequence_parallel_attn,
                                              pre_process_for_sequence_parallel_attn)

        q, k, v = (randn(1, tokens, h, HEAD_DIM, grad=True) for h in (HEADS, KV_HEADS, KV_HEADS))
        grads = tuple(torch.zeros(1, sp * tokens, HEADS // sp, HEAD_DIM, dtype=DTYPE,
                                  device=device) for _ in range(3))
        dout = randn(1, tokens, HEADS, HEAD_DIM)

        def run():
            with xtuner_groups(sp, group), xtuner_list_all_to_all(p2p_list_all_to_all):
                every = pre_process_for_sequence_parallel_attn(
                    q, repeat_kv_bshd(k, HEADS // KV_HEADS), repeat_kv_bshd(v, HEADS // KV_HEADS))
                out = _Attend.apply(*every, grads)
                post_process_for_sequence_parallel_attn(out).backward(dout)
        return run
    if impl == "all-to-all":
        mine_in = [tokens * split.width(rank) * HEAD_DIM] * sp
        mine_out = [tokens * split.num_q(rank) * HEAD_DIM] * sp
        sizes = [(split.chunk_numels(tokens, HEAD_DIM), mine_in),  # forward: heads to ranks
                 (mine_out, split.chunk_numels(tokens, HEAD_DIM, kv=False)),  # output back
                 (split.chunk_numels(tokens, HEAD_DIM, kv=False), mine_out),  # its gradient
                 (mine_in, split.chunk_numels(tokens, HEAD_DIM))]  # q/k/v gradients
        buffers = [(randn(sum(send)), torch.empty(sum(recv), dtype=DTYPE, device=device), send,
                    recv) for send, recv in sizes]

        def run():
            for send, recv, send_sizes, recv_sizes in buffers:
                dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=group)
        return run
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


LAYER_IMPLS = ("xtuner-patch", "no-layout")


def layer_step(impl: str, sp: int, rank: int, group, tokens: int, device, *,
               heads: int = HEADS, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM,
               dtype: torch.dtype = DTYPE):
    """A callable running what a training step does around one layer's attention,
    forward + backward: ``wqkv``'s output -> split + RoPE -> attention (the free
    stand-in) -> ``wo``, with the Triton kernels.

    - ``xtuner-patch``: sequence parallel as training runs it when kv heads divide by
      ``sp`` (:mod:`kernels.sequence_parallel`): RoPE writes the send buffer,
      attention reads views of the received one, its output is unpacked into ``wo``,
      whose input-gradient GEMMs write the backward send buffer, and the inverse RoPE
      reads the received gradient;
    - ``no-layout``: the same RoPE kernel and ``wo`` GEMMs on this rank's tokens with no
      sequence parallel.  ``xtuner-patch`` minus it is what sequence parallel's layouts
      add to a step (the exchanges aside).
    """
    import torch.nn.functional as F

    from kernels import rotary_inv_freq, split_qkv_rotary
    from kernels.sequence_parallel import heads_from_ranks, qkv_heads_to_ranks

    split = split_heads(heads, kv_heads, sp)
    if not split.partitions_kv:
        raise ValueError(f"{kv_heads} kv heads over {sp} ranks: training would take the "
                         "general path (sp_layout_fwd_bwd times it)")
    gen = torch.Generator(device=device).manual_seed(rank)

    def randn(*shape, grad=False):
        x = torch.randn(shape, generator=gen, device=device).to(dtype)
        return x.requires_grad_(grad)

    hidden = heads * head_dim
    qkv = randn(1, tokens, (heads + 2 * kv_heads) * head_dim, grad=True)
    weight = randn(hidden, hidden, grad=True)
    dout = randn(tokens, hidden)
    rope = dict(position_ids=torch.arange(tokens, device=device) + rank * tokens,
                inv_freq=rotary_inv_freq(head_dim, 1e6, device=device)[0])
    if impl == "xtuner-patch":
        nq, nkv = split.num_q(rank), split.num_kv(rank)
        grads = torch.zeros(sp * tokens, nq + 2 * nkv, head_dim, dtype=dtype,
                            device=device).split([nq, nkv, nkv], dim=1)

        def run():
            every = qkv_heads_to_ranks(split, group, qkv, head_dim, **rope)
            out = _Attend.apply(*every, grads)
            heads_from_ranks(split, group, out, weight=weight).backward(dout)
        return run
    if impl == "no-layout":
        grads = torch.zeros(1, tokens, heads + 2 * kv_heads, head_dim, dtype=dtype,
                            device=device).split([heads, kv_heads, kv_heads], dim=2)

        def run():
            q, k, v = split_qkv_rotary(qkv, kv_heads, head_dim, **rope)
            out = _Attend.apply(q, k, v, grads)
            F.linear(out.view(tokens, hidden), weight).backward(dout)
        return run
    raise ValueError(f"impl must be one of {LAYER_IMPLS}, got {impl!r}")


@contextlib.contextmanager
def counting_collectives(sp: int):
    """Collectives replaced by no-ops that count the bytes this rank would send.

    Yields a dict ``{"bytes": n}`` updated by every exchange of either implementation.
    """
    import xtuner.parallel.sequence.comm as xtuner_comm

    import kernels.sequence_parallel as ours

    sent = {"bytes": 0}

    def count(tensors):
        sent["bytes"] += sum(t.numel() * t.element_size() for t in tensors)

    fake_ours = types.SimpleNamespace(
        all_to_all_single=lambda out, inp, out_sizes, in_sizes, group=None: count([inp]),
        get_rank=lambda group=None: 0, get_world_size=lambda group=None: sp)
    fake_xtuner = types.SimpleNamespace(
        all_to_all=lambda outs, inps, group=None: count(inps),
        get_world_size=lambda group=None: sp)
    saved = ours.dist, xtuner_comm.dist
    ours.dist, xtuner_comm.dist = fake_ours, fake_xtuner
    try:
        yield sent
    finally:
        ours.dist, xtuner_comm.dist = saved


def announce(case: int) -> None:
    """Rank 0: tell the peer which gloo case runs next (or STOP)."""
    dist.broadcast(torch.tensor([case]), src=0)


def list_all_to_all_supported() -> bool:
    """Whether this process group's backend has the list ``all_to_all`` XTuner's SP calls
    (gloo in torch 2.11 has only ``all_to_all_single``).  Both ranks call it together
    (announced as ``PROBE``): where supported it exchanges one element each way."""
    try:
        dist.all_to_all([torch.zeros(1) for _ in range(2)], [torch.zeros(1) for _ in range(2)])
    except RuntimeError as exc:
        if "does not support" not in str(exc):
            raise
        return False
    return True


def gloo_steps(rank: int):
    """Probe the list all-to-all (announced as ``PROBE``), then ``(the gloo cases,
    indexed as :func:`announce` numbers them; whether the list all-to-all is native)``."""
    native = list_all_to_all_supported()
    return [step(impl, 2, rank, dist.group.WORLD, GLOO_TOKENS, torch.device("cpu"),
                 p2p_list_all_to_all=not native) for impl in IMPLS], native


def peer(address: str) -> None:
    """Rank 1 of the gloo benchmark: run each announced case until STOP."""
    dist.init_process_group("gloo", init_method=address, rank=1, world_size=2)
    steps = None
    case = torch.tensor([0])
    while True:
        dist.broadcast(case, src=0)
        if int(case) == STOP:
            break
        if int(case) == PROBE:
            steps, _ = gloo_steps(1)
        else:
            steps[int(case)]()
    dist.destroy_process_group()


if __name__ == "__main__":
    peer(sys.argv[1])
