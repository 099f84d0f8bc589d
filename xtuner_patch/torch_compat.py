"""Let XTuner 0.2 / mmengine 0.10 resume from their own checkpoints on torch >= 2.6.

torch 2.6 made ``torch.load`` default to ``weights_only=True``.  The checkpoints
mmengine writes hold numpy arrays and dtypes and mmengine's ``HistoryBuffer``, which
that mode rejects, and neither XTuner (``get_seed_from_checkpoint``) nor mmengine
(``CheckpointLoader``) passes ``weights_only``: ``--resume`` and ``load_from`` fail
with "Weights only load failed".  torch's own switch for code that predates the
change, ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, restores the old default for calls
that do not choose; calls that pass ``weights_only=True`` explicitly (Hugging Face's
weight loading) keep it.  Training ranks started by xtuner-patch set it unless the
environment already chooses; only load checkpoints you trust, as with XTuner itself.
"""

import os

ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def allow_full_checkpoint_loads() -> None:
    """Set ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` unless the environment sets either switch."""
    if "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ:
        os.environ.setdefault(ENV, "1")
