"""``xtuner-patch train``: run XTuner's own ``tools/train.py`` on every rank, patched.

XTuner's ``xtuner train`` re-launches ``tools/train.py`` in new processes (``python``
or ``torchrun``), so anything done in the launching process is lost.  This launcher
mirrors that logic (``NPROC_PER_NODE``/``NNODES``/``NODE_RANK``/``ADDR``/``PORT``,
``--launcher slurm``) but starts :func:`rank_main` in every rank, which prepares the
rank (:func:`prepare_rank`) and runs XTuner's unmodified ``main()``.  ``XTUNER_PATCH=0``
runs XTuner's stock path through the same launcher, for side-by-side comparisons.
Unlike ``xtuner train`` it returns the training's exit status, and it starts a single
``--deepspeed`` process through torchrun as well: DeepSpeed's ``init_distributed`` finds
no rank environment in a bare process and falls back to MPI discovery, which needs
mpi4py.
"""

import importlib
import os
import random
import subprocess
import sys
from typing import List, Optional

from .switches import patch_requested


def prepare_rank(patch: bool) -> None:
    """What a training process started by one of our entry points gets before XTuner
    builds anything: on a machine without CUDA the shims XTuner needs there
    (:mod:`.cpu_compat`), the checkpoint-loading fix of :mod:`.torch_compat`, and, when
    ``patch``, :func:`xtuner_patch.patch`."""
    from . import cpu_compat
    from .patcher import patch as apply_patch
    from .torch_compat import allow_full_checkpoint_loads

    cpu_compat.apply()
    allow_full_checkpoint_loads()
    if patch:
        apply_patch()


def rank_main(argv: Optional[List[str]] = None) -> None:
    """Entry of one training rank: :func:`prepare_rank`, then XTuner's ``tools/train.py``."""
    argv = sys.argv[1:] if argv is None else argv
    patch = patch_requested(default=True)
    from xtuner.tools import train as xtuner_train

    # After importing the train tool, so that the names it bound are patched too.
    prepare_rank(patch)
    sys.argv = [xtuner_train.__file__] + list(argv)
    xtuner_train.main()


def _uses_slurm(args: List[str]) -> bool:
    for i, arg in enumerate(args):
        if arg == "--launcher":
            return i + 1 < len(args) and args[i + 1] == "slurm"
        if arg == "--launcher=slurm":
            return True
    return False


def _uses_deepspeed(args: List[str]) -> bool:
    return any(arg == "--deepspeed" or arg.startswith("--deepspeed=") for arg in args)


def launch(args: List[str], rank_module: str = "xtuner_patch.launch") -> int:
    """Start training with XTuner's process layout; returns the exit status.

    ``rank_module``: the module each rank runs (``python -m rank_module ARGS`` under
    torchrun, its ``rank_main(ARGS)`` in this process otherwise).
    """
    patch_requested(default=True)  # a bad value fails here, once, not in every rank
    nnodes = int(os.environ.get("NNODES", 1))
    nproc_per_node = int(os.environ.get("NPROC_PER_NODE", 1))
    single = nnodes == 1 and nproc_per_node == 1 and not _uses_deepspeed(args)
    if _uses_slurm(args) or single:
        # One process per task (srun starts the tasks) or a plain single process.
        importlib.import_module(rank_module).rank_main(args)
        return 0
    port = os.environ.get("PORT") or str(random.randint(20000, 29999))
    cmd = [sys.executable, "-m", "torch.distributed.run",
           f"--nnodes={nnodes}",
           f"--node_rank={os.environ.get('NODE_RANK', 0)}",
           f"--nproc_per_node={nproc_per_node}",
           f"--master_addr={os.environ.get('ADDR', '127.0.0.1')}",
           f"--master_port={port}",
           "-m", rank_module, *args, "--launcher", "pytorch"]
    return subprocess.call(cmd)


if __name__ == "__main__":
    rank_main()
