"""One rank of the sequence-parallel tests (started by ``torchrun`` from
``tests/test_sequence_parallel.py``; gloo, CPU, Triton interpreter).

Every rank builds the same whole-sequence inputs from one seed, keeps its slice of
the sequence, runs the sequence-parallel path and compares its output and gradients
with a single-rank computation of the whole sequence.  Rank 0 writes
``{case: {quantity: relative error}}`` (the worst over ranks), which layers packed the
send buffers straight from ``wqkv``'s output and from ``wo``'s input-gradient GEMMs,
and the messages of impossible layouts as JSON to ``argv[1]``.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from kernels import reference
from tests.helpers import make_generator, randn, rel_error

HEAD_DIM = 64
# (name, hq, hkv, dtype, batch, row length, packing of the row (may end before it) or
#  None for whole rows, right padding of the last row)
ATTENTION_CASES = {
    2: [("gqa_kv_per_rank", 4, 2, torch.float32, 1, 48, [0, 19, 26, 48], 0),
        ("kv_heads_lt_sp", 4, 1, torch.float32, 1, 48, [0, 30, 44], 0),
        ("kv_split_mid_rank", 6, 3, torch.float32, 1, 32, [0, 9, 32], 0),
        ("heads_not_divisible", 3, 1, torch.float32, 1, 32, [0, 32], 0),
        ("fp16_mha", 2, 2, torch.float16, 1, 32, [0, 5, 32], 0),
        ("padded_batch", 4, 2, torch.float32, 2, 16, None, 3)],
    4: [("gqa_kv_per_rank", 8, 4, torch.float32, 1, 64, [0, 21, 40, 64], 0),
        ("kv_heads_lt_sp", 4, 1, torch.float32, 1, 64, [0, 37, 60], 0),
        ("uneven_kv_slots", 12, 3, torch.float32, 1, 32, [0, 11, 32], 0),
        ("heads_not_divisible", 6, 2, torch.float32, 1, 32, [0, 32], 0),
        ("fewer_heads_than_ranks", 2, 1, torch.float32, 1, 32, [0, 16, 32], 0),
        ("padded_batch", 8, 2, torch.float32, 2, 16, None, 0)],
}
# (name, num_attention_heads, num_key_value_heads, packed varlen row or 2 whole rows,
#  biases in wqkv / wo, a forward hook on wo): the tiny preset is 4 / 1.
LAYER_CASES = [("tiny", 4, 1, True, False, False),
               ("kv_divisible", 8, 4, True, False, False),
               ("rows", 8, 4, False, False, False),
               ("heads_not_divisible_bias", 6, 2, True, True, False),  # uneven at sp 4
               ("wo_hooked", 8, 4, True, False, True)]


def _worst(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _shard(x: torch.Tensor, rank: int, sp: int) -> torch.Tensor:
    """This rank's slice of dimension 1 (the sequence), as XTuner splits the data."""
    n = x.shape[1] // sp
    return x[:, rank * n:(rank + 1) * n]


def attention_case(group, rank, sp, case, seed):
    from kernels import sequence_parallel

    name, hq, hkv, dtype, bsz, row, packing, pad = case
    gen = make_generator(seed)
    q = randn((bsz, row, hq, HEAD_DIM), dtype, generator=gen)
    k = randn((bsz, row, hkv, HEAD_DIM), dtype, generator=gen)
    v = randn((bsz, row, hkv, HEAD_DIM), dtype, generator=gen)
    weight = randn((bsz, row, hq, HEAD_DIM), torch.float32, generator=gen)
    cumulative_len = None if packing is None else torch.tensor(packing, dtype=torch.int32)
    mask = None
    if packing is None and pad:
        mask = torch.ones(bsz, row, dtype=torch.bool)
        mask[-1, row - pad:] = False

    local = [_shard(x, rank, sp).detach().requires_grad_() for x in (q, k, v)]
    out = sequence_parallel.attention(*local, group, cu_seqlens=cumulative_len,
                                      attention_mask=mask,
                                      max_seqlen=None if packing is None else row)
    (out.float() * _shard(weight, rank, sp)).sum().backward()

    # Whole sequence, float64 reference; a padded tail of a packing is its own sequence,
    # padded rows attend over their padding too (their real tokens never see it).
    bounds = [b * row for b in range(bsz + 1)] if packing is None else packing
    if bounds[-1] < bsz * row:
        bounds = bounds + [bsz * row]
    cu = torch.tensor(bounds, dtype=torch.int32)
    full = [x.detach().double().reshape(bsz * row, -1, HEAD_DIM).requires_grad_()
            for x in (q, k, v)]
    ref = reference.varlen_attn_reference(*full, cu, cu, causal=True)[0]
    (ref * weight.double().reshape(ref.shape)).sum().backward()
    real = torch.ones(bsz, row, dtype=torch.bool) if mask is None else mask
    keep = _shard(real, rank, sp)
    ref = _shard(ref.view(bsz, row, hq, HEAD_DIM), rank, sp)
    errors = {"out": rel_error(out[keep], ref[keep])}
    for label, x, x64 in zip("qkv", local, full):
        grad64 = x64.grad.view(bsz, row, -1, HEAD_DIM)
        errors["d" + label] = rel_error(x.grad, _shard(grad64, rank, sp))
    return name, errors


def layer_case(group, rank, sp, case, seed, tmp):
    """A whole InternLM2 attention layer (wqkv, RoPE, attention, wo)."""
    from mmengine import MessageHub
    from transformers import AutoConfig, AutoModelForCausalLM

    import kernels.sequence_parallel as exchanges
    from xtuner_patch import KernelSwitches
    from xtuner_patch.dispatch import dispatch_internlm2
    from xtuner_patch.fixtures import build_internlm2_checkpoint
    from xtuner_patch.internlm2 import sequence_parallel

    name, heads, kv_heads, packed, bias, hook_wo = case
    path = os.path.join(tmp, f"heads{heads}_kv{kv_heads}_bias{int(bias)}")
    if rank == 0:
        build_internlm2_checkpoint(path, "tiny", num_hidden_layers=1,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   hidden_size=64 * heads, bias=bias)
    for turn in range(sp):  # one rank at a time writes Hugging Face's remote-code cache
        dist.barrier()
        if turn == rank:
            config = AutoConfig.from_pretrained(path, trust_remote_code=True)
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    attn = model.model.layers[0].attention
    dispatch_internlm2(attn, KernelSwitches(), use_varlen_attn=packed)
    if hook_wo:  # e.g. what ZeRO-3 does: wo must then run as a module
        attn.wo.register_forward_hook(lambda module, args, out: out)

    gen = make_generator(seed)
    row, bsz = 16 * sp, 1 if packed else 2
    lengths = [5, row - 9, 4] if packed else [row]
    hidden = randn((bsz, row, config.hidden_size), generator=gen)
    weight = randn((bsz, row, config.hidden_size), generator=gen)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).expand(bsz, row)
    hub = MessageHub.get_instance("varlen_attn_args")
    hub.update_info(f"cumulative_len_rank_{dist.get_rank()}",
                    torch.tensor([0] + lengths).cumsum(0).to(torch.int32) if packed else None)
    hub.update_info(f"max_seqlen_rank_{dist.get_rank()}", max(lengths) if packed else None)

    attn.train()
    assert sequence_parallel.group_for(attn) is group
    local = _shard(hidden, rank, sp).detach().requires_grad_()
    fused_packs, fused_projections = [], []
    pack = exchanges.pack_qkv_rotary
    project_back = exchanges.pack_linear_input_grad

    def counting_pack(split, qkv, *args, **kwargs):
        fused_packs.append(qkv.shape)
        return pack(split, qkv, *args, **kwargs)

    def counting_project_back(*args):
        fused_projections.append(args[1].shape)
        return project_back(*args)

    exchanges.pack_qkv_rotary = counting_pack
    exchanges.pack_linear_input_grad = counting_project_back
    try:
        out = attn(local, position_ids=_shard(position_ids, rank, sp))[0]
        (out * _shard(weight, rank, sp)).sum().backward()
    finally:
        exchanges.pack_qkv_rotary = pack
        exchanges.pack_linear_input_grad = project_back
    grads = {n: p.grad.clone() for n, p in attn.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
    attn.zero_grad()

    attn.eval()  # not training: the single-rank path on the whole row
    assert sequence_parallel.group_for(attn) is None
    whole = hidden.detach().requires_grad_()
    ref = attn(whole, position_ids=position_ids)[0]
    (ref * weight).sum().backward()
    errors = {"out": rel_error(out, _shard(ref, rank, sp)),
              "dhidden": rel_error(local.grad, _shard(whole.grad, rank, sp))}
    for n, p in attn.named_parameters():
        errors["d" + n] = rel_error(grads[n], p.grad)
    return name, errors, {"wqkv": bool(fused_packs), "wo": bool(fused_projections)}


def error_messages(group, sp):
    """Impossible layouts fail on every rank before any exchange (no rank hangs)."""
    from kernels import sequence_parallel

    def message(*args, **kwargs):
        try:
            sequence_parallel.attention(*args, group, **kwargs)
        except ValueError as e:
            return str(e)
        return "no error"

    q = torch.zeros(1, 8, 2, HEAD_DIM)
    past_the_end = torch.tensor([0, 8 * sp + 1], dtype=torch.int32)
    return {"cumulative_len_past_the_group": message(q, q, q, cu_seqlens=past_the_end),
            "kv_heads_not_dividing_heads": message(q, q[:, :, :1].repeat(1, 1, 3, 1), q)}


def main():
    out_path, tmp = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    from xtuner.parallel.sequence import get_sequence_parallel_group, init_sequence_parallel

    sp = dist.get_world_size()
    init_sequence_parallel(sp)
    group, rank = get_sequence_parallel_group(), dist.get_rank()
    results = {}
    for i, case in enumerate(ATTENTION_CASES[sp]):
        name, errors = attention_case(group, rank, sp, case, seed=1000 * sp + i)
        results["attention/" + name] = {k: _worst(v) for k, v in errors.items()}
    results["fused"] = {}
    for i, case in enumerate(LAYER_CASES):
        name, errors, fused = layer_case(group, rank, sp, case, seed=2000 * sp + i, tmp=tmp)
        results["layer/" + name] = {k: _worst(v) for k, v in errors.items()}
        results["fused"][name] = fused
    results["errors"] = error_messages(group, sp)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    # Skip C++ static destructors: now and then a rank aborted there, after all its work
    # ("terminate called without an active exception", a thread still joinable at
    # interpreter teardown), failing a run whose results were complete.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
