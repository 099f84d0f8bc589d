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

``test_train_step_policy`` (#22): the activation-checkpointing policies of
:mod:`xtuner_patch.checkpointing` at 8k and 32k tokens, one row each (``xtuner-patch``:
``auto``; ``xtuner-patch-none`` / ``-selective`` / ``-full``) beside XTuner's stock path
(full checkpointing), for InternLM2-1.8B and InternLM2-7B with as many of its 32 layers as
the device holds beside the stock step (:func:`benchmarks.model_flops.layers_that_fit`:
all 32 on a 141 GB H200, fewer on an 80 GB H100; ``layers`` in the row says how many).
Each row records model TFLOP/s and MFU against the bf16 matmul peak measured in the same
run (``matmul_peak_tflops``, ``mfu``).

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
from benchmarks.model_flops import layers_that_fit, matmul_tflops, model_flops
from benchmarks.stock import use_fa2_in_xtuner
from benchmarks.workloads import packed_lengths

if HAS_CUDA:
    STOCK = "xtuner-stock-fa2"
    DEVICE, DTYPE, DTYPE_NAME, TOKENS = "cuda", torch.bfloat16, "bf16", 32768
    MODELS = {"internlm2-1.8b": ("1_8b", {}),
              "internlm2-7b-4layers": ("7b", {"num_hidden_layers": 4})}
    POLICY_MODELS = ("internlm2-1.8b", "internlm2-7b")
    POLICY_TOKENS = (8192, 32768)
    # the matmul peak MFU is taken against
    PEAK_DTYPE, PEAK_N = torch.bfloat16, 8192
else:
    STOCK = "xtuner-stock-reference-attn"
    DEVICE, DTYPE, DTYPE_NAME, TOKENS = "cpu", torch.float32, "fp32", 256
    MODELS = {"internlm2-tiny": ("tiny", {})}
    POLICY_MODELS = ("internlm2-tiny",)
    POLICY_TOKENS = (64,)
    PEAK_DTYPE, PEAK_N = torch.float32, 256

# the rows of test_train_step_policy: impl -> XTUNER_PATCH_CHECKPOINT (None: stock XTuner)
POLICY_IMPLS = {OURS: "auto", f"{OURS}-none": "none", f"{OURS}-selective": "selective",
                f"{OURS}-full": "full", STOCK: None}
# XTuner's stock step at 32k tokens beside the 7B's states: its activations and fp32
# logits took 35.9 GiB at 4 layers of 7B width (H200, 2026-12-04), 0.25 GiB more per layer
STOCK_STEP_7B_32K = 35.9 * 2**30
STOCK_STEP_PER_LAYER_32K = 0.25 * 2**30
MARGIN_BYTES = 4 * 2**30


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


def _run_case(benchmark, model_name, preset, overrides, impl, tokens, case, checkpoint=None,
              stock=False, peak_tflops=None):
    """Build the model (patched with ``checkpoint``, or XTuner's stock path), run one
    warm-up step, then measure steps of ``tokens`` tokens; the row gets ``case``."""
    from mmengine import MessageHub

    import xtuner_patch

    if stock:
        reason = use_fa2_in_xtuner()
        if reason:
            skip_missing(STOCK, reason)
        xtuner_patch.unpatch()
    else:
        xtuner_patch.patch(checkpoint=checkpoint)
    try:
        import xtuner.model.modules.dispatch as dispatch

        if HAS_CUDA:
            # auto plans from the peak of this model's first step, not an earlier case's
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = _model(preset, overrides)
        dispatch.dispatch_modules(model, use_varlen_attn=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=HAS_CUDA)

        lengths = packed_lengths("sft-lognormal", tokens)
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        input_ids = torch.randint(3, model.config.vocab_size, (1, tokens), device=DEVICE,
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

        step()  # compile, autotune, allocate optimizer state (auto: measure, then plan)
        if HAS_CUDA:
            torch.cuda.synchronize()
        flops = model_flops(model.config, lengths)
        measure(benchmark, step, impl=impl, case=case, flops=flops,
                rounds=5 if HAS_CUDA else 1, warmup_rounds=1 if HAS_CUDA else 0)
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(throughput=tokens / median, throughput_unit="tokens/s")
        if peak_tflops is not None:
            benchmark.extra_info.update(matmul_peak_tflops=peak_tflops,
                                        mfu=flops / median / 1e12 / peak_tflops)
        if checkpoint is not None:
            from xtuner_patch.checkpointing import policy_of

            plan = policy_of(model.model)
            benchmark.extra_info["checkpoint_plan"] = ",".join(plan) if plan else None
        profile_dir = os.environ.get("XTUNER_PATCH_PROFILE_DIR")
        if profile_dir:
            _write_profile(step, Path(profile_dir) / f"train_step-{model_name}-{impl}.txt")
    finally:
        hub = MessageHub.get_instance("varlen_attn_args")
        hub.update_info("cumulative_len_rank_0", None)
        hub.update_info("max_seqlen_rank_0", None)
        xtuner_patch.patch()


@pytest.mark.parametrize("impl", [OURS, STOCK])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_train_step(benchmark, one_rank_group, model_name, impl):
    pytest.importorskip("xtuner.model", reason="needs xtuner (make gpu-wheels)")
    preset, overrides = MODELS[model_name]
    case = {"bench": "train_step", "model": model_name, "tokens": TOKENS,
            "mix": "sft-lognormal", "dtype": DTYPE_NAME, "checkpointing": True}
    _run_case(benchmark, model_name, preset, overrides, impl, TOKENS, case,
              stock=impl == STOCK)


def policy_model(model_name: str, total_bytes: float = None):
    """``(preset, overrides)`` of a policy row's model: InternLM2-7B with the layers
    :func:`layers_that_fit` a device of ``total_bytes`` (default: this GPU's)."""
    if model_name == "internlm2-tiny":
        return "tiny", {}
    if model_name == "internlm2-1.8b":
        return "1_8b", {}
    from xtuner_patch.fixtures import internlm2_config_dict

    config = internlm2_config_dict("7b")
    if total_bytes is None:
        total_bytes = torch.cuda.mem_get_info()[1]
    stock = STOCK_STEP_7B_32K + STOCK_STEP_PER_LAYER_32K * (config["num_hidden_layers"] - 4)
    return "7b", {"num_hidden_layers": layers_that_fit(total_bytes, config, stock,
                                                       MARGIN_BYTES)}


@pytest.mark.parametrize("impl", list(POLICY_IMPLS))
@pytest.mark.parametrize("tokens", POLICY_TOKENS)
@pytest.mark.parametrize("model_name", POLICY_MODELS)
def test_train_step_policy(benchmark, one_rank_group, model_name, tokens, impl):
    pytest.importorskip("xtuner.model", reason="needs xtuner (make gpu-wheels)")
    preset, overrides = policy_model(model_name)
    layers = overrides.get("num_hidden_layers")
    if layers == 0:
        pytest.skip(f"{model_name}: not one layer fits this device beside the stock step")
    peak = matmul_tflops(DEVICE, PEAK_DTYPE, PEAK_N)
    case = {"bench": "train_step_policy", "model": model_name, "layers": layers,
            "tokens": tokens, "mix": "sft-lognormal", "dtype": DTYPE_NAME}
    _run_case(benchmark, model_name, preset, overrides, impl, tokens, case,
              checkpoint=POLICY_IMPLS[impl], stock=impl == STOCK, peak_tflops=peak)
