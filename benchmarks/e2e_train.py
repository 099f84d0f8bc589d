"""The user's own ``xtuner-patch train`` on a GPU, patched and stock, per precision set-up.

::

    python -m benchmarks.e2e_train --out benchmarks/results/<gpu>/ [--setups amp-bf16,...]
        [--steps 30] [--preset 1_8b --layers 4] [--packed-length 8192]

For each set-up, XTuner's train tool trains one random-init InternLM2
(``xtuner-patch make-tiny-model --preset P --layers L``) on the sample ftdp data
(``xtuner-patch make-sample-data``) with ``configs/internlm2_tiny_ftdp_cpu.py``, twice:

- ``xtuner-patch``: ``xtuner-patch train CONFIG --cfg-options ...``, the user's command;
- ``xtuner-stock-fa2``: the same arguments on XTuner's stock path
  (:mod:`benchmarks.stock_rank`: ``XTUNER_PATCH=0``, an FA2 kernel in place of flash-attn).

Set-ups (:data:`SETUPS`): ``amp-bf16`` (mmengine's ``AmpOptimWrapper`` in bf16 over fp32
weights), ``deepspeed-bf16`` (``--deepspeed deepspeed_zero2``: bf16 weights, ZeRO-2, one
process) and ``lora-fp16`` (XTuner's LoRA on every linear layer, the head included, on an
fp16 base under fp16 AMP with a dynamic loss scale, as XTuner's LoRA configs train).

Each run's log gives per step the loss, the step time (``time - data_time``), tokens/s
and peak memory.  Written to ``--out``: ``bench-e2e_train.json`` (rows in
pytest-benchmark's format, so that :mod:`benchmarks.report` puts them in results.md and
judges :mod:`benchmarks.targets` on them: stock-equal losses over the first steps, no
step after the second over 1.3x the median, tokens/s and peak memory against stock),
``e2e_train.md`` (the losses side by side) and each run's log.  Without CUDA it runs
the same commands on CPU (AMP through :mod:`tests.cpu_amp`): a check of the code, not
a measurement (``tests/test_benchmark_e2e_train.py``).
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "internlm2_tiny_ftdp_cpu.py")
OURS, STOCK = "xtuner-patch", "xtuner-stock-fa2"

LORA = ["model.lora.type=peft.LoraConfig", "model.lora.r=64", "model.lora.lora_alpha=16",
        "model.lora.lora_dropout=0.1", "model.lora.bias=none", "model.lora.task_type=CAUSAL_LM"]


def _amp(dtype: str, cuda: bool) -> List[str]:
    wrapper = "AmpOptimWrapper" if cuda else "tests.cpu_amp.CpuAmpOptimWrapper"
    return [f"optim_wrapper.type={wrapper}", f"optim_wrapper.dtype={dtype}",
            "optim_wrapper.loss_scale=dynamic"]


def setups(cuda: bool) -> Dict[str, dict]:
    """``{name: {"options": cfg-options, "args": more train arguments}}``."""
    return {
        "amp-bf16": dict(options=_amp("bfloat16", cuda), args=[]),
        "deepspeed-bf16": dict(options=[], args=["--deepspeed", "deepspeed_zero2"]),
        "lora-fp16": dict(options=LORA + ["model.llm.torch_dtype=float16"]
                          + _amp("float16", cuda), args=[]),
    }


# Steps compared with the stock path, and the steps left out of the timing (compilation,
# tuning, allocation).
COMPARED_STEPS = 5
WARMUP_STEPS = 2


def _env(extra=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra or {})
    return env


def prepare(work: str, preset: str, layers: int) -> Dict[str, str]:
    """The model and data folders (reused when they hold what was asked for)."""
    from xtuner_patch.fixtures import build_internlm2_checkpoint, write_sample_ftdp_dataset

    from xtuner_patch.errors import UserError

    model, data = os.path.join(work, "model"), os.path.join(work, "ftdp")
    try:  # an identical checkpoint is reused
        build_internlm2_checkpoint(model, preset, num_hidden_layers=layers)
    except UserError:  # another one: this folder is ours to replace
        build_internlm2_checkpoint(model, preset, num_hidden_layers=layers, overwrite=True)
    if not os.path.isdir(data):
        write_sample_ftdp_dataset(data)
    return {"model": model, "data": data}


def command(impl: str, setup: dict, folders: Dict[str, str], work_dir: str, steps: int,
            packed_length: int) -> List[str]:
    """The user's ``xtuner-patch train`` command line, or its stock counterpart."""
    entry = (["-m", "xtuner_patch.cli", "train"] if impl == OURS
             else ["-m", "benchmarks.stock_rank"])
    options = [f"model.llm.pretrained_model_name_or_path={folders['model']}",
               f"train_dataloader.dataset.dataset_cfg.folder={folders['data']}",
               f"train_dataloader.dataset.packed_length={packed_length}",
               f"train_cfg.max_iters={steps}", f"default_hooks.checkpoint.interval={steps + 1}",
               *setup["options"]]
    return [sys.executable, *entry, CONFIG, "--work-dir", work_dir, *setup["args"],
            "--cfg-options", *options]


def summarise(rows: List[dict], packed_length: int) -> dict:
    """What one run's log says: losses, step times, tokens/s, peak memory."""
    losses = [r["loss"] for r in rows]
    step_s = [r["time"] - r.get("data_time", 0.0) for r in rows]
    timed = step_s[WARMUP_STEPS:] or step_s
    median = statistics.median(timed)
    memory = [r["memory"] for r in rows if "memory" in r]  # MiB, CUDA only
    return dict(steps=len(rows), losses=losses, step_s=step_s, median_step_s=median,
                max_over_median=max(timed) / median, tokens_per_s=packed_length / median,
                peak_mem_bytes=max(memory) * 2 ** 20 if memory else None)


def run_one(cmd: List[str], log_path: str, timeout: int, packed_length: int) -> dict:
    from tests.xtuner_run import iteration_metrics

    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=os.path.dirname(log_path), env=_env(),
                              capture_output=True, text=True, timeout=timeout)
        log, status = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        log = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(
            errors="replace")
        status = "timeout"
    with open(log_path, "w") as f:
        f.write(log)
    rows = iteration_metrics(log)
    result = dict(status=status, wall_s=time.perf_counter() - start, log=log_path)
    if rows:
        result.update(summarise(rows, packed_length))
    return result


def loss_difference(ours: dict, stock: dict) -> float:
    """Largest relative difference of the first :data:`COMPARED_STEPS` losses."""
    pairs = list(zip(ours["losses"], stock["losses"]))[:COMPARED_STEPS]
    return max(abs(a - b) / abs(b) for a, b in pairs)


def benchmark_rows(results: Dict[str, Dict[str, dict]], model: str, packed_length: int):
    """pytest-benchmark-style rows for :mod:`benchmarks.report`."""
    rows = []
    for setup, runs in results.items():
        case = {"bench": "e2e_train", "setup": setup, "model": model, "tokens": packed_length}
        group = " ".join(f"{k}={v}" for k, v in case.items())
        for impl, run in runs.items():
            if "median_step_s" not in run:
                continue
            extra = dict(case, impl=impl, throughput=run["tokens_per_s"],
                         throughput_unit="tokens/s", max_over_median=run["max_over_median"],
                         losses=run["losses"], peak_mem_bytes=run["peak_mem_bytes"])
            stock = runs.get(STOCK, {})
            if impl == OURS and "losses" in stock:
                extra["loss_rel_diff_vs_stock"] = loss_difference(run, stock)
            rows.append({"group": group, "name": f"e2e_train[{setup}-{impl}]",
                         "extra_info": extra, "stats": {"median": run["median_step_s"]}})
    return rows


def losses_table(results: Dict[str, Dict[str, dict]]) -> str:
    lines = []
    for setup, runs in results.items():
        lines += [f"## {setup}", "", "| step | " + " | ".join(runs) + " |",
                  "| ---: |" + " ---: |" * len(runs)]
        steps = max((len(r.get("losses", [])) for r in runs.values()), default=0)
        for i in range(steps):
            cells = [f"{r['losses'][i]:.4f} ({r['step_s'][i]:.3f} s)"
                     if i < len(r.get("losses", [])) else "-" for r in runs.values()]
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
        for impl, run in runs.items():
            if run["status"] != 0:
                lines.append(f"\n{impl}: exit status {run['status']}, see {run['log']}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results folder")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(),
                                                        "xtuner-patch-e2e"),
                        help="model, data and run folders (kept: the model is reused)")
    parser.add_argument("--setups", default=",".join(setups(cuda)))
    parser.add_argument("--steps", type=int, default=30 if cuda else 3)
    parser.add_argument("--preset", default="1_8b" if cuda else "tiny")
    parser.add_argument("--layers", type=int, default=4 if cuda else 2)
    parser.add_argument("--packed-length", type=int, default=8192 if cuda else 256)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per training run")
    args = parser.parse_args(argv)
    known = setups(cuda)
    chosen = [s for s in args.setups.split(",") if s]
    unknown = [s for s in chosen if s not in known]
    if unknown:
        parser.error(f"unknown --setups {unknown}; known: {sorted(known)}")
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be > {WARMUP_STEPS} (the warm-up steps are not timed)")
    os.makedirs(args.out, exist_ok=True)
    work = args.work
    folders = prepare(work, args.preset, args.layers)
    model = f"internlm2-{args.preset.replace('_', '.')}-{args.layers}layers"
    results = {}
    try:
        for setup in chosen:
            results[setup] = {}
            for impl in (OURS, STOCK):
                run_dir = os.path.join(work, f"{setup}-{impl}")
                os.makedirs(run_dir, exist_ok=True)
                cmd = command(impl, known[setup], folders, run_dir, args.steps,
                              args.packed_length)
                log = os.path.join(args.out, f"e2e-{setup}-{impl}.log")
                results[setup][impl] = run = run_one(cmd, log, args.timeout, args.packed_length)
                print(f"e2e_train: {setup} {impl}: exit {run['status']}, {run.get('steps', 0)}"
                      f" steps, {run.get('tokens_per_s', 0):.0f} tokens/s, max/median step "
                      f"{run.get('max_over_median', float('nan')):.2f}", flush=True)
    finally:  # stopped by the GPU check's time limit (SIGINT) too: keep the finished runs
        write_results(args.out, results, model, args.packed_length, args.steps,
                      torch.cuda.get_device_name(0) if cuda else "cpu")
    failed = [f"{s}/{i}" for s, runs in results.items() for i, r in runs.items()
              if r["status"] != 0 or r.get("steps") != args.steps]
    if failed:
        print(f"e2e_train: runs that did not complete: {failed}", file=sys.stderr)
    return 1 if failed else 0


def write_results(out: str, results, model: str, packed_length: int, steps: int,
                  node: str) -> None:
    data = {"datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "machine_info": {"node": node},
            "benchmarks": benchmark_rows(results, model, packed_length)}
    with open(os.path.join(out, "bench-e2e_train.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out, "e2e_train.md"), "w") as f:
        f.write(f"# xtuner-patch train vs XTuner's stock path: {model}, {packed_length}-token "
                f"packs, {steps} steps\n\nloss (step time without data loading)\n\n"
                f"{losses_table(results)}")


if __name__ == "__main__":
    sys.exit(main())
