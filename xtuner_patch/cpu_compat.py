"""Compatibility shims that let XTuner 0.2 train on a machine without CUDA.

Applied by :func:`apply` in the training processes our entry points prepare
(:func:`xtuner_patch.launch.prepare_rank`), never by importing the package, and only
when ``torch.cuda.is_available()`` is False; on a GPU machine nothing here runs.  Each
shim fills a gap in how XTuner / mmengine call torch, not in what the CPU can do:

- ``torch.cpu.is_bf16_supported``: XTuner calls ``get_torch_device().is_bf16_supported()``
  (``torch.cpu`` on a CPU host), which torch does not define.  The shim answers as
  ``torch.cuda.is_bf16_supported`` does: with ``including_emulation`` (the default)
  True, since torch runs bf16 on every CPU (emulated where the CPU has no bf16
  instructions); without it, whether oneDNN has native bf16 kernels here.  XTuner
  resolves DeepSpeed's ``"auto"`` dtypes with it, and DeepSpeed on the CPU runs bf16 but
  not fp16, so an AVX2-only host must hear True too.
- ``torch.cuda.set_device``: mmengine's PyTorch launcher calls it on every rank before
  ``init_process_group``, which fails without a CUDA driver.  With no CUDA device
  there is nothing to select, so the shim makes the call a no-op.

:func:`restore` undoes both (used by the tests).
"""

import torch

_ORIGINALS = {}


def _cpu_is_bf16_supported(including_emulation: bool = True) -> bool:
    if including_emulation:
        return True
    mkldnn_check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(mkldnn_check()) if mkldnn_check is not None else False
    except RuntimeError:
        return False


def _cuda_set_device_without_cuda(device) -> None:
    """No CUDA device exists, so selecting one is a no-op (mmengine calls this per rank)."""


def apply() -> bool:
    """Install the shims when CUDA is absent.  Idempotent; returns True if active."""
    if torch.cuda.is_available():
        return False
    if "is_bf16_supported" not in _ORIGINALS and not hasattr(torch.cpu, "is_bf16_supported"):
        _ORIGINALS["is_bf16_supported"] = None
        torch.cpu.is_bf16_supported = _cpu_is_bf16_supported
    if "set_device" not in _ORIGINALS:
        _ORIGINALS["set_device"] = torch.cuda.set_device
        torch.cuda.set_device = _cuda_set_device_without_cuda
    return True


def restore() -> None:
    """Remove the shims installed by :func:`apply`."""
    if "is_bf16_supported" in _ORIGINALS:
        del _ORIGINALS["is_bf16_supported"]
        del torch.cpu.is_bf16_supported
    if "set_device" in _ORIGINALS:
        torch.cuda.set_device = _ORIGINALS.pop("set_device")


def is_applied() -> bool:
    return bool(_ORIGINALS)
