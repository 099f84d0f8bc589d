"""A training rank of XTuner's stock path with an FA2 kernel standing in for flash-attn.

``python -m benchmarks.stock_rank XTUNER_TRAIN_ARGS`` trains as ``XTUNER_PATCH=0
xtuner-patch train XTUNER_TRAIN_ARGS`` does (same launcher: one process, torchrun for
``--deepspeed`` or ``NPROC_PER_NODE``, Slurm tasks), each rank first putting an FA2
varlen kernel where XTuner expects flash-attn (:func:`benchmarks.stock.use_fa2_in_xtuner`):
the stock side of :mod:`benchmarks.e2e_train` on a host without flash-attn.

XTuner's varlen attention reads ``torch.distributed.get_rank()`` and its
``InternRepoSampler`` asks for the data-parallel group, which only DeepSpeed's strategy
creates: XTuner's own path cannot train varlen in a bare single process.  A single
process here therefore gets a one-rank process group and XTuner's parallel groups of
size one first (mmengine still runs it as one process: no DDP wrapper).
"""

import os
import sys


def _one_rank_groups() -> None:
    import socket

    import torch
    import torch.distributed as dist
    from xtuner.parallel.sequence import init_sequence_parallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    init_sequence_parallel(1)


def rank_main(argv=None) -> None:
    from benchmarks.stock import use_fa2_in_xtuner
    from xtuner_patch import launch

    argv = sys.argv[1:] if argv is None else argv
    reason = use_fa2_in_xtuner()
    if reason:
        raise SystemExit(f"benchmarks.stock_rank: no FA2 kernel for XTuner's path: {reason}")
    if "LOCAL_RANK" not in os.environ and "--launcher" not in argv:
        _one_rank_groups()
    launch.rank_main(argv)


if __name__ == "__main__":
    os.environ["XTUNER_PATCH"] = "0"
    if "LOCAL_RANK" in os.environ:  # a rank torchrun started
        rank_main()
    else:
        from xtuner_patch.launch import launch

        sys.exit(launch(sys.argv[1:], rank_module="benchmarks.stock_rank"))
