"""Patch XTuner so that InternLM2 models train on xtuner-patch's kernels.

What :func:`patch` replaces (and :func:`unpatch` restores, object for object):

- ``dispatch_modules`` in the XTuner modules that bind it
  (:data:`DISPATCH_BINDINGS`, and XTuner's ``tools/train.py`` when it runs as
  ``__main__``).  The replacement runs XTuner's own dispatch first, then gives InternLM2
  modules our forwards (:mod:`xtuner_patch.dispatch`).  Modules imported later bind the
  replacement through ``xtuner.model.modules``.
- ``SupervisedFinetune.build_llm_from_cfg``: the same method, run in a context that
  tells the dispatch whether the model being built computes its loss from the logits
  (DPO, ORPO override ``compute_loss``), which then keeps the logits.
- ``check_cfg`` of XTuner's ``tools/train.py`` (when attention is switched on): varlen
  attention and sequence parallel no longer need flash-attn (:mod:`.train_checks`).

Kernels are switched per family with keyword arguments or ``XTUNER_PATCH_<FAMILY>``
(:mod:`.switches`); an explicit argument wins over the environment.
"""

import logging
import os
import sys
import threading
from typing import Optional

from .switches import CheckpointSetting, KernelSwitches, resolve_checkpoint

logger = logging.getLogger("xtuner_patch")

# The XTuner modules that bind ``dispatch_modules`` at import (read from XTuner 0.2's
# source): where they are loaded, the name is rebound.
DISPATCH_BINDINGS = ("xtuner.model.modules.dispatch", "xtuner.model.modules", "xtuner.model.sft",
                     "xtuner.model.reward", "xtuner.model.llava", "xtuner.tools.train")


class _State:
    lock = threading.Lock()
    switches: Optional[KernelSwitches] = None
    checkpoint: Optional[CheckpointSetting] = None
    stock_dispatch = None  # XTuner's dispatch_modules
    patched_dispatch = None  # ours, wrapping it
    # (object, attribute name, original value) for everything replaced.
    replaced: list = []
    logged_for: Optional[KernelSwitches] = None


def _train_tool_modules():
    """XTuner's ``tools/train.py`` as loaded: imported, and/or run as ``__main__`` (``xtuner
    train`` runs the file as a script, so only its path tells it apart)."""
    found = []
    imported = sys.modules.get("xtuner.tools.train")
    if imported is not None:
        found.append(imported)
    main = sys.modules.get("__main__")
    path = (getattr(main, "__file__", None) or "").replace(os.sep, "/")
    if main is not None and path.endswith("xtuner/tools/train.py"):
        found.append(main)
    return found


def _rebind(owner, attr: str, original, replacement) -> None:
    """``owner.attr = replacement`` where it is ``original`` (a name bound elsewhere since
    is left alone), recorded for :func:`unpatch`."""
    if getattr(owner, attr, None) is original:
        setattr(owner, attr, replacement)
        _State.replaced.append((owner, attr, original))


def _bind_dispatch() -> None:
    modules = [sys.modules[name] for name in DISPATCH_BINDINGS if name in sys.modules]
    for module in modules + _train_tool_modules():
        _rebind(module, "dispatch_modules", _State.stock_dispatch, _State.patched_dispatch)


def patch(*, attention: Optional[bool] = None, rope: Optional[bool] = None,
          rms_norm: Optional[bool] = None, fused_residual: Optional[bool] = None,
          swiglu: Optional[bool] = None, cross_entropy: Optional[bool] = None,
          checkpoint=None) -> KernelSwitches:
    """Make XTuner's dispatch give InternLM2 models xtuner-patch's kernels.

    ``checkpoint``: the activation-checkpointing policy of the decoder layers,
    ``'auto' | 'none' | 'selective' | 'full'`` or a budget in GiB (default
    ``XTUNER_PATCH_CHECKPOINT``; unset: XTuner's checkpointing as its config asks);
    see :mod:`xtuner_patch.checkpointing`.

    Idempotent: patching again with the same switches changes nothing (but binds the
    replacement in XTuner modules loaded since); with other switches it re-patches.
    Returns the active switches.
    """
    switches = KernelSwitches.resolve(attention=attention, rope=rope, rms_norm=rms_norm,
                                      fused_residual=fused_residual, swiglu=swiglu,
                                      cross_entropy=cross_entropy)
    checkpoint_setting = resolve_checkpoint(checkpoint)
    import xtuner.model  # noqa: F401  (binds dispatch_modules in sft/reward/llava)
    import xtuner.model.modules.dispatch as xtuner_dispatch
    from xtuner.model.sft import SupervisedFinetune

    with _State.lock:
        if _State.switches == switches and _State.checkpoint == checkpoint_setting:
            _bind_dispatch()
            return switches
        if _State.switches is not None:
            _unpatch_locked()
        from .dispatch import make_dispatch_modules
        from .train_checks import make_check_cfg, wrap_build_llm

        _State.stock_dispatch = xtuner_dispatch.dispatch_modules
        _State.patched_dispatch = make_dispatch_modules(_State.stock_dispatch, switches,
                                                        checkpoint_setting)
        _bind_dispatch()
        build = SupervisedFinetune.build_llm_from_cfg
        _rebind(SupervisedFinetune, "build_llm_from_cfg", build, wrap_build_llm(build))
        if switches.attention:
            for module in _train_tool_modules():
                check = module.check_cfg
                _rebind(module, "check_cfg", check, make_check_cfg(check))
        _State.switches = switches
        _State.checkpoint = checkpoint_setting
        _log_once(switches)
    return switches


def _unpatch_locked() -> None:
    for owner, attr, original in reversed(_State.replaced):
        setattr(owner, attr, original)
    _State.replaced = []
    _State.switches = None
    if _State.checkpoint is not None:
        from .checkpointing import uninstall_all

        uninstall_all()  # models dispatched with a policy get their checkpoint function back
        _State.checkpoint = None


def unpatch() -> None:
    """Restore every XTuner object :func:`patch` replaced.  A no-op when not patched.

    Models already dispatched keep the forwards they were given; their decoder layers
    get XTuner's checkpointing back (the policy of :mod:`.checkpointing` is removed).
    """
    with _State.lock:
        if _State.switches is not None:
            _unpatch_locked()
            logger.info("xtuner-patch: XTuner restored")


def active_switches() -> Optional[KernelSwitches]:
    """The switches of the active patch, or None when XTuner is not patched."""
    return _State.switches


def _log_once(switches: KernelSwitches) -> None:
    if _State.logged_for == switches:
        return
    _State.logged_for = switches
    from .dispatch import describe

    message = "xtuner-patch: " + describe(switches)
    try:
        from mmengine.logging import print_log

        print_log(message, logger="current")
    except ImportError:
        logger.warning(message)


__all__ = ["KernelSwitches", "patch", "unpatch", "active_switches"]
