"""mmengine's ``AmpOptimWrapper`` on a CPU, for end-to-end tests of mixed-precision training.

mmengine refuses ``AmpOptimWrapper`` without an accelerator (an assert in its
``__init__``), builds its loss scaler from ``torch.cuda.amp.GradScaler``, which disables
itself without CUDA, and its ``autocast`` wrapper allows only bf16 on a CPU.
:class:`CpuAmpOptimWrapper` is the same class with the check skipped,
``torch.amp.GradScaler("cpu")`` as the scaler and ``torch.autocast("cpu", dtype)`` as
the autocast: the loss scaling, unscaling before gradient clipping, skipped steps on
overflow and fp16 or bf16 autocast all run as on a GPU.  Test-only: a config names it as
``optim_wrapper.type``.
"""

import functools
from contextlib import contextmanager
from unittest import mock

import torch
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.optim.optimizer import amp_optimizer_wrapper


class CpuAmpOptimWrapper(AmpOptimWrapper):
    def __init__(self, *args, **kwargs):
        with mock.patch.object(amp_optimizer_wrapper, "is_cuda_available", lambda: True), \
                mock.patch.object(amp_optimizer_wrapper, "GradScaler",
                                  functools.partial(torch.amp.GradScaler, "cpu")):
            super().__init__(*args, **kwargs)

    @contextmanager
    def optim_context(self, model):
        # OptimWrapper's context (gradient accumulation), then autocast as AMP's would.
        with OptimWrapper.optim_context(self, model), \
                torch.autocast("cpu", dtype=self.cast_dtype or torch.bfloat16):
            yield
