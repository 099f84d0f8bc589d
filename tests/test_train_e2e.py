"""End to end through the real CLIs: patched XTuner training of the tiny InternLM2 on CPU.

Every test starts XTuner's own ``tools/train.py`` in fresh processes, on the sample
ftdp data: ``xtuner-patch train`` (single process and 2 ranks with DeepSpeed ZeRO on
gloo), ``XTUNER_PATCH=1 xtuner train`` (the ``.pth`` auto-import) and a plain
``xtuner train`` of a config whose model type is ours.
"""

import math
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from tests.xtuner_run import (NO_VARLEN, SEQUENCE_PARALLEL_2, TINY_CONFIG, config_variant,
                              fp32_deepspeed_config, iteration_metrics, train, training_env)

pytestmark = [pytest.mark.slow]
pytest.importorskip("xtuner")
PATCH_LINE = "dispatch_modules patched"


def _losses(proc):
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    rows = iteration_metrics(log)
    assert rows, log[-5000:]
    return [r["loss"] for r in rows], log


def test_varlen_training_with_accumulation_resumes_exactly(tmp_path, tiny_checkpoint,
                                                           sample_ftdp):
    common = dict(extra_options=["optim_wrapper.accumulative_counts=2",
                                 "default_hooks.checkpoint.max_keep_ckpts=-1",
                                 "default_hooks.checkpoint.interval=2"])
    first = tmp_path / "first"
    first.mkdir()
    losses, log = _losses(train(str(first), tiny_checkpoint, sample_ftdp["root"], max_iters=6,
                                **common))
    assert PATCH_LINE in log and "varlen" in log
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(2048)) < 0.5
    assert (first / "iter_4.pth").exists()

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    again, _ = _losses(train(str(resumed), tiny_checkpoint, sample_ftdp["root"], max_iters=6,
                             extra_args=["--resume", str(first / "iter_4.pth")], **common))
    assert len(again) == 2
    assert again == pytest.approx(losses[4:], rel=1e-4, abs=1e-4)




def _stock_and_patched_losses(tmp_path, checkpoint, data, config):
    """Per-step losses of XTuner's stock path and of ours (Triton kernels under the
    interpreter) training ``config`` for 3 steps; asserts the patch ran only in ours."""
    runs = {}
    for name, env in (("stock", {"XTUNER_PATCH": "0"}),
                      ("patched", {"TRITON_INTERPRET": "1"})):
        work = tmp_path / name
        work.mkdir()
        runs[name] = _losses(train(str(work), checkpoint, data, config=config, max_iters=3,
                                   env=env,
                                   extra_options=["train_dataloader.dataset.packed_length=256"]))
    (stock, stock_log), (patched, patched_log) = runs["stock"], runs["patched"]
    assert PATCH_LINE not in stock_log and PATCH_LINE in patched_log
    assert "PyTorch reference" not in patched_log  # the Triton kernels really ran
    return stock, patched, patched_log


def test_patched_kernels_match_stock_xtuner_per_step(tmp_path, tiny_checkpoint, sample_ftdp):
    """Without varlen both paths compute the same model; the patched one on our Triton
    kernels (interpreter), the stock one on XTuner's eager PyTorch forwards."""
    config = config_variant(tmp_path, "no_varlen.py", NO_VARLEN)
    stock, patched, _ = _stock_and_patched_losses(tmp_path, tiny_checkpoint,
                                                  sample_ftdp["root"], config)
    assert patched == pytest.approx(stock, rel=2e-4)


def _amp(dtype: str):
    """Config replacements: mmengine's AmpOptimWrapper (fp32 weights, ``dtype`` autocast,
    a dynamic loss scale), in its CPU form (:mod:`tests.cpu_amp`)."""
    return [("from xtuner.model import SupervisedFinetune",
             "from xtuner.model import SupervisedFinetune\n"
             "from tests.cpu_amp import CpuAmpOptimWrapper"),
            ("    type=OptimWrapper,\n",
             f"    type=CpuAmpOptimWrapper,\n    dtype='{dtype}',\n    loss_scale='dynamic',\n")]


def test_fp16_amp_training_matches_stock_xtuner_per_step(tmp_path, tiny_checkpoint,
                                                         sample_ftdp):
    """mmengine's fp16 AMP, as XTuner's configs set it up (no ``dtype``: fp16 on a GPU):
    the patched model (Triton kernels, fp16 under the interpreter) and XTuner's stock
    model in the same autocast, with the same dynamic loss scale."""
    config = config_variant(tmp_path, "amp_fp16.py", NO_VARLEN + _amp("float16"))
    stock, patched, _ = _stock_and_patched_losses(tmp_path, tiny_checkpoint,
                                                  sample_ftdp["root"], config)
    assert patched == pytest.approx(stock, rel=5e-4)


def test_varlen_bf16_amp_training_tracks_fp32(tmp_path, tiny_checkpoint, sample_ftdp):
    """The run that failed on the H200 (varlen packing, mmengine's AMP in bf16 over fp32
    weights: a TypeError in the first step) trains, step for step within bf16's
    precision of the same training in fp32."""
    runs = {}
    for name, replacements in (("fp32", []), ("bf16", _amp("bfloat16"))):
        work = tmp_path / name
        work.mkdir()
        config = config_variant(tmp_path, f"{name}.py", replacements)
        runs[name] = _losses(train(str(work), tiny_checkpoint, sample_ftdp["root"],
                                   config=config, max_iters=4))
    (fp32, _), (bf16, log) = runs["fp32"], runs["bf16"]
    assert PATCH_LINE in log and "varlen" in log
    assert bf16 == pytest.approx(fp32, rel=5e-3)


def _lora(dropout: float):
    """Config replacements: XTuner's LoRA (every linear layer, the head ``output`` too)."""
    return [("from transformers import AutoModelForCausalLM",
             "from peft import LoraConfig\nfrom transformers import AutoModelForCausalLM"),
            ("    use_varlen_attn=use_varlen_attn,\n",
             "    use_varlen_attn=use_varlen_attn,\n    lora=dict(type=LoraConfig, r=8, "
             "lora_alpha=16, "
             f"lora_dropout={dropout}, bias='none', task_type='CAUSAL_LM'),\n")]


def test_lora_training_matches_stock_xtuner_per_step(tmp_path, tiny_checkpoint, sample_ftdp):
    """XTuner's LoRA: the patched run keeps the fused loss, the adapter on the head
    joining as a low-rank addend."""
    config = config_variant(tmp_path, "lora.py", NO_VARLEN + _lora(0.0) + [
        # The adapters start at zero: no warm-up, a large rate, so that they matter by step 3.
        ("lr = 2e-3", "lr = 5e-2"), ("start_factor=0.1", "start_factor=1.0")])
    stock, patched, patched_log = _stock_and_patched_losses(tmp_path, tiny_checkpoint,
                                                            sample_ftdp["root"], config)
    assert "computed from its logits" not in patched_log
    assert len(set(stock)) == 3  # the adapters learn: every step's loss differs
    assert patched == pytest.approx(stock, rel=2e-4)


@pytest.mark.parametrize("zero", ["deepspeed_zero2", "deepspeed_zero3"])
def test_two_ranks_with_deepspeed(tmp_path, tiny_checkpoint, sample_ftdp, zero):
    pytest.importorskip("deepspeed")
    losses, log = _losses(train(str(tmp_path), tiny_checkpoint, sample_ftdp["root"],
                                max_iters=3, extra_args=["--deepspeed", zero],
                                env={"NPROC_PER_NODE": "2"}))
    assert log.count(PATCH_LINE) >= 2  # one line per rank
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(2048)) < 0.5


def test_checkpoint_policies_under_zero2_zero3_and_sequence_parallel_train_as_full(
        tmp_path, tiny_checkpoint, sample_ftdp):
    """``XTUNER_PATCH_CHECKPOINT`` on 2 gloo ranks holding one sequence each half
    (sequence parallel 2): ``full`` under ZeRO-2 (XTuner's recompute through our per-layer
    wrapper) and a budget that makes layer 0 selective and layer 1 full under ZeRO-3
    (whose recompute gathers parameters, and re-runs the all-to-alls: every rank must
    plan the same) give the same losses, the third iteration's after one update (two
    accumulated iterations per step).  Two runs (~35 s each on 2 idle cores); ZeRO-2
    leaves activations alone, so selective is checked where it meets DeepSpeed's hooks.
    fp32 DeepSpeed configs: no CPU bf16 needed."""
    pytest.importorskip("deepspeed")
    config = config_variant(tmp_path, "tiny_sp2.py", SEQUENCE_PARALLEL_2)
    runs = {}
    for stage, policy in ((2, "full"), (3, "0.015")):
        work = tmp_path / f"zero{stage}"
        work.mkdir()
        runs[policy] = _losses(train(str(work), tiny_checkpoint, sample_ftdp["root"],
                                     config=config, max_iters=3, extra_args=[
                                         "--deepspeed", fp32_deepspeed_config(work, stage)],
                                     env={"NPROC_PER_NODE": "2",
                                          "XTUNER_PATCH_CHECKPOINT": policy}))
    (full, full_log), (mixed, mixed_log) = runs["full"], runs["0.015"]
    # the plans, as rank 0 logs them (1024 tokens per rank: 2 x 1 MiB full + 10.8 MiB for
    # one selective layer fit in 0.015 GiB; a second selective layer does not)
    assert "activation checkpointing (full; 1024 tokens): layers 0-1 full" in full_log
    assert ("activation checkpointing (budget 0.015 GiB; 1024 tokens): layers 0 selective, "
            "1 full") in mixed_log
    assert len(full) == 3 and mixed == pytest.approx(full, rel=1e-4)
    assert abs(full[2] - full[1]) > 0.1  # the third loss follows an update: gradients count


def test_lora_with_deepspeed_on_two_ranks(tmp_path, tiny_checkpoint, sample_ftdp):
    """Varlen LoRA training (adapter dropout on) under ZeRO-2 keeps the fused loss; under
    ZeRO-3, whose hooks gather the adapter's weights, the head's loss comes from the
    logits with one warning per rank, and the losses are the same."""
    pytest.importorskip("deepspeed")
    config = config_variant(tmp_path, "lora.py", _lora(0.1))
    runs = {}
    # fp32 ZeRO configs (test_two_ranks_with_deepspeed runs XTuner's own): CPUs without bf16
    # instructions run XTuner's (bf16 there) emulated, about 2x slower.
    for zero, stage in (("deepspeed_zero2", 2), ("deepspeed_zero3", 3)):
        work = tmp_path / zero
        work.mkdir()
        runs[zero] = _losses(train(str(work), tiny_checkpoint, sample_ftdp["root"],
                                   config=config, max_iters=3, extra_args=[
                                       "--deepspeed", fp32_deepspeed_config(work, stage)],
                                   env={"NPROC_PER_NODE": "2"}))
    (zero2, log2), (zero3, log3) = runs["deepspeed_zero2"], runs["deepspeed_zero3"]
    assert "computed from its logits" not in log2
    assert log3.count("computed from its logits: the LM head is a LoRA layer with hooks") == 2
    assert len(zero2) == 3 and zero3 == pytest.approx(zero2, rel=1e-4)


def _installed_pth() -> str:
    path = os.path.join(sysconfig.get_paths()["purelib"], "xtuner-patch.pth")
    if not os.path.exists(path):
        pytest.skip("xtuner-patch is not installed (non-editable) in this environment; "
                    "`make test` installs it")
    return path


def _xtuner_cli(tmp_path, config, checkpoint, data, env):
    """Plain ``xtuner train`` from this environment (it re-launches ``python`` from PATH)."""
    xtuner = shutil.which("xtuner", path=os.path.dirname(sys.executable))
    assert xtuner, "the xtuner console script is not installed next to this python"
    full_env = training_env(dict(env, PATH=os.path.dirname(sys.executable) + os.pathsep
                                 + os.environ.get("PATH", "")))
    full_env.pop("PYTHONPATH", None)  # the installed package, as a user would run it
    cmd = [xtuner, "train", config, "--work-dir", str(tmp_path), "--cfg-options",
           f"model.llm.pretrained_model_name_or_path={checkpoint}",
           f"train_dataloader.dataset.dataset_cfg.folder={data}", "train_cfg.max_iters=2"]
    # `xtuner train` exits 0 even when training fails: read the log instead.
    return subprocess.run(cmd, cwd=str(tmp_path), env=full_env, capture_output=True,
                          text=True, timeout=900)


def test_xtuner_patch_env_var_patches_plain_xtuner_train(tmp_path, tiny_checkpoint, sample_ftdp):
    """The tiny config is a plain XTuner config (XTuner's model type, ``use_varlen_attn``):
    without the patch, check_cfg refuses varlen attention on a machine without
    flash-attn; ``XTUNER_PATCH=1`` patches every process, check_cfg included."""
    _installed_pth()
    proc = _xtuner_cli(tmp_path, TINY_CONFIG, tiny_checkpoint, sample_ftdp["root"],
                       {"XTUNER_PATCH": "1"})
    log = proc.stdout + proc.stderr
    assert PATCH_LINE in log, log[-5000:]
    assert [r["iter"] for r in iteration_metrics(log)] == [1, 2], log[-5000:]


def test_config_with_our_model_type_still_patches_with_a_warning(tmp_path, tiny_checkpoint,
                                                                 sample_ftdp):
    """The former way (a config naming ``xtuner_patch.model.SupervisedFinetune``, varlen
    switch renamed past check_cfg) still patches plain ``xtuner train``, and says that it
    is deprecated."""
    _installed_pth()
    config = config_variant(tmp_path, "our_model_type.py", [
        ("from xtuner.model import SupervisedFinetune",
         "from xtuner_patch.model import SupervisedFinetune"),
        ("use_varlen_attn = True", "varlen_attn = True"),
        ("use_varlen_attn=use_varlen_attn", "use_varlen_attn=varlen_attn")])
    proc = _xtuner_cli(tmp_path, config, tiny_checkpoint, sample_ftdp["root"], {})
    log = proc.stdout + proc.stderr
    assert PATCH_LINE in log, log[-5000:]
    assert "xtuner_patch.model.SupervisedFinetune switched the patch on, which is deprecated" \
        in log
    assert [r["iter"] for r in iteration_metrics(log)] == [1, 2], log[-5000:]
