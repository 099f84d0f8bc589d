"""Run ``xtuner-patch train`` (XTuner's own train tool) in a subprocess and read its log."""

import os
import re
import subprocess
import sys
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "configs", "internlm2_tiny_ftdp_cpu.py")
# Config replacements: packed rows without varlen attention, which XTuner's stock path runs
# on a CPU too (its varlen attention needs flash-attn).
NO_VARLEN = [("use_varlen_attn = True", "use_varlen_attn = False"),
             ("custom_hooks = [dict(type=ThroughputHook), dict(type=VarlenAttnArgsToMessageHubHook)]",
              "custom_hooks = [dict(type=ThroughputHook)]")]

# Config replacements: XTuner's sequence-parallel set-up, 2 ranks per sequence.
SEQUENCE_PARALLEL_2 = [
    ("from xtuner.dataset.samplers import InternRepoSampler",
     "from xtuner.parallel.sequence import SequenceParallelSampler"),
    ("sampler=dict(type=InternRepoSampler, shuffle=True, seed=1024)",
     "sampler=dict(type=SequenceParallelSampler, shuffle=True, seed=1024)"),
    ("accumulative_counts = 1\n",
     "sequence_parallel_size = 2\naccumulative_counts = 1\n"
     "accumulative_counts *= sequence_parallel_size\n"),
]


def config_variant(tmp_path, name, replacements, base: str = TINY_CONFIG) -> str:
    """A copy of ``base`` with exact text replacements (each must apply), in ``tmp_path``."""
    text = open(base).read()
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    path = os.path.join(str(tmp_path), name)
    with open(path, "w") as f:
        f.write(text)
    return path


_ITER_LINE = re.compile(r"Iter\(train\) \[\s*(\d+)/\s*\d+\].*")
_METRIC = re.compile(r"(\w+): (-?[0-9.]+(?:e[-+]?\d+)?|nan|inf)")


def train(work_dir: str, checkpoint: str, data_folder: str, *, config: str = TINY_CONFIG,
          max_iters: int = 6, extra_options: Optional[List[str]] = None,
          extra_args: Optional[List[str]] = None, env: Optional[Dict[str, str]] = None,
          timeout: int = 900) -> subprocess.CompletedProcess:
    """Train the tiny config on ``data_folder`` from ``checkpoint`` for ``max_iters`` steps.

    The training process does not inherit ``TRITON_INTERPRET`` (set by conftest for
    this process): on a CPU it runs the kernels' PyTorch references unless ``env``
    asks for the interpreter, which is much slower.
    """
    options = [f"model.llm.pretrained_model_name_or_path={checkpoint}",
               f"train_dataloader.dataset.dataset_cfg.folder={data_folder}",
               f"train_cfg.max_iters={max_iters}",
               f"default_hooks.checkpoint.interval={max_iters}"] + list(extra_options or [])
    cmd = [sys.executable, "-m", "xtuner_patch.cli", "train", config, "--work-dir", work_dir,
           *(extra_args or []), "--cfg-options", *options]
    full_env = training_env(env)
    full_env["PYTHONPATH"] = os.pathsep.join(
        [REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(cmd, cwd=work_dir, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    return proc


def training_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """This process's environment for a training subprocess, without ``TRITON_INTERPRET``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra or {})
    return env


def iteration_metrics(log_text: str) -> List[Dict[str, float]]:
    """One dict per logged training iteration: ``{"iter": n, "loss": ..., ...}``."""
    rows = []
    for match in _ITER_LINE.finditer(log_text):
        row = {"iter": int(match.group(1))}
        row.update({k: float(v) for k, v in _METRIC.findall(match.group(0))})
        rows.append(row)
    return rows


def fp32_deepspeed_config(tmp_path, stage: int) -> str:
    """A DeepSpeed ZeRO-``stage`` config like XTuner's ``deepspeed_zero{stage}`` with fp16
    and bf16 off: on a CPU XTuner's own resolves to bf16, which runs emulated (slowly)
    where the CPU has no bf16 instructions and rounds the losses being compared."""
    import json

    config = {"gradient_accumulation_steps": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
              "zero_force_ds_cpu_optimizer": False,
              "zero_optimization": {"stage": stage, "overlap_comm": True},
              "fp16": {"enabled": False}, "bf16": {"enabled": False}}
    path = os.path.join(str(tmp_path), f"zero{stage}_fp32.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path
