"""A full training step of InternLM2 (forward, backward, AdamW): patched vs XTuner's stock path.

Models: InternLM2-1.8B (all 24 layers) and a 7B-width slice (4 layers), bf16
weights, activation checkpointing on (as XTuner configs enable it), one packed row
of 32k tokens with the SFT length mix, varlen attention arguments in XTuner's
MessageHub, exactly as ``VarlenAttnArgsToMessageHubHook`` leaves them.

- ``xtuner-patch``: XTuner's dispatch patched by :func:`xtuner_patch.patch`.
- ``xtuner-stock-fa2``: XTuner's own dispatch and its own ``internlm2_varlen_attn_forward``
  (K/V repeated, RoPE as PyTorch ops, RMSNorm as PyTorch ops), with flash-attn's
  ``flash_attn_varlen_func`` when installed, else PyTorch's built-in FA2 kernel put in
  its place (the only substitution; the GPU test host has no flash-attn).

Reported: tokens/s (``throughput``), model TFLOP/s (6 x non-embedding parameters x
tokens, plus the causal attention FLOPs per sample and the LM head; recomputation
under checkpointing not counted) and peak memory of the step.

With ``XTUNER_PATCH_PROFILE_DIR`` set (``make gpu-check`` sets it to the results folder),
one more step of each case runs under ``torch.profiler`` and its operators, by device
time, go to ``train_step-<model>-<impl>.txt`` there: where the time of each path goes.

Without CUDA the same code runs the tiny InternLM2 in fp32 on a 256-token row (ours
under the Triton interpreter), with the float64-tested PyTorch reference of varlen
attention standing in for FA2 in XTuner's path (``xtuner-stock-reference-attn``): the
times mean nothing, but every line the GPU run takes is exercised before a GPU is
spent on it (``tests/test_benchmark_train_step.py`` runs it that way).
"""

import os
from pathlib import Path

import pytest
import torch

from benchmarks.conftest import HAS_CUDA, OURS, measure, skip_missing
from benchmarks.stock import use_fa2_in_xtuner
from benchmarks.workloads import packed_lengths

if HAS_CUDA:
    STOCK = "xtuner-stock-fa2"
    DEVICE, DTYPE, DTYPE_NAME, TOKENS = "cuda", torch.bfloat16, "bf16", 32768
    MODELS = {"internlm2-1.8b": ("1_8b", {}),
              "internlm2-7b-4layers": ("7b", {"num_hidden_layers": 4})}
else:
    STOCK = "xtuner-stock-reference-attn"
    DEVICE, DTYPE, DTYPE_NAME, TOKENS = "cpu", torch.float32, "fp32", 256
    MODELS = {"internlm2-tiny": ("tiny", {})}


def _model(preset: str, overrides: dict):
    from xtuner._lite.modelings.internlm2 import InternLM2ForCausalLM

    from xtuner_patch.fixtures import internlm2_config_dict, internlm2_hf_config

    # The attention class XTuner's varlen dispatch targets.
    config = internlm2_hf_config(internlm2_config_dict(
        preset, attn_implementation="flash_attention_2", **overrides))
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = InternLM2ForCausalLM(config).to(DTYPE)
    model.gradient_checkpointing_enable()
    model.train()
    return model


def _model_flops(config, lengths) -> float:
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    hd = h // config.num_attention_heads
    kv = config.num_key_value_heads * hd
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * config.intermediate_size
    tokens = sum(lengths)
    dense = 6.0 * (layers * per_layer + h * vocab) * tokens
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    attention = 3 * 4.0 * config.num_attention_heads * hd * pairs * layers
    return dense + attention


def _write_profile(step, path: Path) -> None:
    """One ``step()`` under the profiler: its operators by self time, device time on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if HAS_CUDA else [])
    with profile(activities=activities) as prof:
        step()
        if HAS_CUDA:
            torch.cuda.synchronize()
    sort_by = "self_device_time_total" if HAS_CUDA else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=70)
    path.write_text(table)


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A process group of this process alone, as ``xtuner train`` has: XTuner's varlen
    attention forward asks for its rank."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("one-rank") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("impl", [OURS, STOCK])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_train_step(benchmark, one_rank_group, model_name, impl):
    pytest.importorskip("xtuner.model", reason="needs xtuner (make gpu-wheels)")
    from mmengine import MessageHub

    import xtuner_patch

    if impl == STOCK:
        reason = use_fa2_in_xtuner()
        if reason:
            skip_missing(STOCK, reason)
        xtuner_patch.unpatch()
    else:
        xtuner_patch.patch()
    try:
        import xtuner.model.modules.dispatch as dispatch

        preset, overrides = MODELS[model_name]
        model = _model(preset, overrides)
        dispatch.dispatch_modules(model, use_varlen_attn=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=HAS_CUDA)

        lengths = packed_lengths("sft-lognormal", TOKENS)
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        input_ids = torch.randint(3, model.config.vocab_size, (1, TOKENS), device=DEVICE,
                                  generator=gen)
        position_ids = torch.cat([torch.arange(n, device=DEVICE) for n in lengths])[None]
        cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
        hub = MessageHub.get_instance("varlen_attn_args")
        hub.update_info("cumulative_len_rank_0", cu)
        hub.update_info("max_seqlen_rank_0", max(lengths))

        def step():
            loss = model(input_ids=input_ids, labels=input_ids,
                         position_ids=position_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # compile, autotune, allocate optimizer state
        if HAS_CUDA:
            torch.cuda.synchronize()
        case = {"bench": "train_step", "model": model_name, "tokens": TOKENS,
                "mix": "sft-lognormal", "dtype": DTYPE_NAME, "checkpointing": True}
        measure(benchmark, step, impl=impl, case=case,
                flops=_model_flops(model.config, lengths), rounds=5 if HAS_CUDA else 1,
                warmup_rounds=1 if HAS_CUDA else 0)
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(throughput=TOKENS / median, throughput_unit="tokens/s")
        profile_dir = os.environ.get("XTUNER_PATCH_PROFILE_DIR")
        if profile_dir:
            _write_profile(step, Path(profile_dir) / f"train_step-{model_name}-{impl}.txt")
    finally:
        hub = MessageHub.get_instance("varlen_attn_args")
        hub.update_info("cumulative_len_rank_0", None)
        hub.update_info("max_seqlen_rank_0", None)
        xtuner_patch.patch()
