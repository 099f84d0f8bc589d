"""Patch XTuner so that InternLM2 models train on xtuner-patch's kernels.

What :func:`patch` replaces (and :func:`unpatch` restores, object for object):

- ``dispatch_modules`` wherever XTuner bound it (``xtuner.model.modules.dispatch``,
  ``xtuner.model.modules``, ``xtuner.model.sft`` / ``reward`` / ``llava``, and XTuner's
  ``tools/train.py``, also when it runs as ``__main__``).  The replacement runs XTuner's
  own dispatch first, then gives InternLM2 modules our forwards
  (:mod:`xtuner_patch.internlm2`).  Models that are not InternLM2 keep XTuner's dispatch.
- ``check_cfg`` of XTuner's ``tools/train.py``: with our attention active, varlen
  attention no longer needs flash-attn (every other check of XTuner's stays).

Kernels are switched per family with keyword arguments or environment variables
(``XTUNER_PATCH_ATTENTION=0`` ...); an explicit argument wins over the environment.
"""

import logging
import os
import sys
import threading
from dataclasses import dataclass, fields
from typing import Optional

logger = logging.getLogger("xtuner_patch")

_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class KernelSwitches:
    """Which XTuner InternLM2 hot loops are replaced."""

    attention: bool = True  # varlen GQA attention (no K/V repeat); the wqkv split
    rope: bool = True  # rotary embedding of q and k (fused with the wqkv split)
    rms_norm: bool = True  # InternLM2RMSNorm
    fused_residual: bool = True  # decoder layer: residual add + ffn_norm in one kernel
    swiglu: bool = True  # InternLM2MLP: silu(w1 x) * w3 x in one kernel
    cross_entropy: bool = True  # training loss: LM head + cross-entropy, logits never built

    @classmethod
    def resolve(cls, **explicit) -> "KernelSwitches":
        values = {}
        for f in fields(cls):
            value = explicit.get(f.name)
            if value is None:
                env = os.environ.get(f"XTUNER_PATCH_{f.name.upper()}")
                value = f.default if env is None else env.strip().lower() not in _FALSE
            values[f.name] = bool(value)
        unknown = set(explicit) - set(values)
        if unknown:
            raise TypeError(f"unknown kernel switches: {sorted(unknown)}; "
                            f"known: {[f.name for f in fields(cls)]}")
        return cls(**values)


class _State:
    lock = threading.Lock()
    switches: Optional[KernelSwitches] = None
    stock_dispatch = None  # XTuner's dispatch_modules
    patched_dispatch = None  # ours, wrapping it
    # (module object, attribute name, original value) for everything replaced.
    replaced: list = []
    logged_for: Optional[KernelSwitches] = None
    # Set while patch() imports XTuner, whose import hook (see patch_on_import) must not
    # patch again under it.
    importing_xtuner = False


def _is_xtuner_train_function(obj, name: str) -> bool:
    code = getattr(obj, "__code__", None)
    return (code is not None and getattr(obj, "__name__", None) == name
            and code.co_filename.replace(os.sep, "/").endswith("xtuner/tools/train.py"))


def _replace_everywhere(original, replacement, attr: str) -> None:
    """Rebind ``attr`` in every loaded module where it is ``original``."""
    for module in list(sys.modules.values()):
        if module is None:
            continue
        try:
            current = module.__dict__.get(attr)
        except AttributeError:
            continue
        if current is original:
            setattr(module, attr, replacement)
            _State.replaced.append((module, attr, original))


def _train_check_cfg_functions():
    """XTuner's ``check_cfg`` objects: from ``xtuner.tools.train`` and a ``__main__`` run."""
    found = []
    for name in ("xtuner.tools.train", "__main__"):
        module = sys.modules.get(name)
        fn = getattr(module, "check_cfg", None) if module is not None else None
        if fn is not None and _is_xtuner_train_function(fn, "check_cfg") and fn not in found:
            found.append(fn)
    return found


def patch(*, attention: Optional[bool] = None, rope: Optional[bool] = None,
          rms_norm: Optional[bool] = None, fused_residual: Optional[bool] = None,
          swiglu: Optional[bool] = None, cross_entropy: Optional[bool] = None) -> KernelSwitches:
    """Make XTuner's dispatch give InternLM2 models xtuner-patch's kernels.

    Idempotent: patching again with the same switches changes nothing; with other
    switches it re-patches.  Returns the active switches.
    """
    switches = KernelSwitches.resolve(attention=attention, rope=rope, rms_norm=rms_norm,
                                      fused_residual=fused_residual, swiglu=swiglu,
                                      cross_entropy=cross_entropy)
    # Imported before the lock is taken: the first import of xtuner.model runs the hook
    # `import xtuner_patch` left, which would otherwise wait for this very lock.
    _State.importing_xtuner = True
    try:
        import xtuner.model  # noqa: F401  (binds dispatch_modules in sft/reward/llava)
        import xtuner.model.modules.dispatch as xtuner_dispatch
    finally:
        _State.importing_xtuner = False
    with _State.lock:
        if _State.switches == switches:
            _refresh_late_bindings()
            return switches
        if _State.switches is not None:
            _unpatch_locked()
        from .dispatch import make_dispatch_modules

        stock = xtuner_dispatch.dispatch_modules
        _State.stock_dispatch = stock
        _State.patched_dispatch = make_dispatch_modules(stock, switches)
        _replace_everywhere(stock, _State.patched_dispatch, "dispatch_modules")
        _State.switches = switches
        _refresh_late_bindings()
        _log_once(switches)
    return switches


def patch_on_import() -> None:
    """What ``import xtuner_patch`` runs once ``xtuner.model`` is imported: :func:`patch`
    with the environment's switches, unless a :func:`patch` call is the importer (it
    applies its own switches next)."""
    if not _State.importing_xtuner:
        patch()


def _refresh_late_bindings() -> None:
    """Catch names bound after :func:`patch` ran (``tools/train.py`` as ``__main__``)."""
    _replace_everywhere(_State.stock_dispatch, _State.patched_dispatch, "dispatch_modules")
    if not _State.switches.attention:
        return
    from .train_checks import make_check_cfg

    for original in _train_check_cfg_functions():
        _replace_everywhere(original, make_check_cfg(original), "check_cfg")


def _unpatch_locked() -> None:
    for module, attr, original in reversed(_State.replaced):
        setattr(module, attr, original)
    _State.replaced = []
    _State.switches = None


def unpatch() -> None:
    """Restore every XTuner object :func:`patch` replaced.  A no-op when not patched.

    Models already dispatched keep the forwards they were given.
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
