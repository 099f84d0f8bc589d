"""Import hooks of xtuner-patch, and the interpreter-start hook behind ``XTUNER_PATCH=1``.

``xtuner-patch.pth`` (installed into site-packages with the package) imports this
module in every Python process, so it imports nothing beyond ``os``/``sys`` and does
nothing unless ``XTUNER_PATCH`` is set to something other than ``0``/``false``/``no``/
``off``.  Then, at the first ``mmengine`` ``Config.fromfile`` call - when XTuner's
``tools/train.py`` reads its config, before anything is built - it imports
``xtuner_patch`` and applies the patch, which also rebinds the names ``tools/train.py``
bound when it started as ``__main__``.  Nothing heavy runs while ``site`` is still
processing ``.pth`` files.

:func:`call_after_import` is also what lets a plain ``import xtuner_patch`` patch XTuner
only once XTuner's model package is actually imported.
"""

import os
import sys


class _AfterImport:
    """A meta-path finder that runs a callback once one module has been executed."""

    def __init__(self, fullname, callback):
        self.fullname = fullname
        self.callback = callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.fullname:
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module
        callback = self.callback

        def exec_then_call(module):
            exec_module(module)
            callback(module)

        spec.loader.exec_module = exec_then_call
        return spec


def call_after_import(fullname: str, callback) -> None:
    """Call ``callback(module)`` once ``fullname`` is imported (now, if it already is)."""
    module = sys.modules.get(fullname)
    if module is not None:
        callback(module)
    else:
        sys.meta_path.insert(0, _AfterImport(fullname, callback))


_OFF = ("0", "false", "no", "off")


def enabled() -> bool:
    """``XTUNER_PATCH`` asks for the patch in every process (the ``.pth`` hook)."""
    value = os.environ.get("XTUNER_PATCH", "").strip().lower()
    return value != "" and value not in _OFF


def disabled() -> bool:
    """``XTUNER_PATCH`` explicitly turns the patch off (XTuner's stock path)."""
    return os.environ.get("XTUNER_PATCH", "").strip().lower() in _OFF


def _patch_before_config_load(config_module) -> None:
    config_cls = config_module.Config
    load = config_cls.fromfile  # a static method in mmengine 0.10: callable as is

    def fromfile(*args, **kwargs):
        import xtuner_patch
        from xtuner_patch.torch_compat import allow_full_checkpoint_loads

        allow_full_checkpoint_loads()
        xtuner_patch.patch()
        return load(*args, **kwargs)

    config_cls.fromfile = staticmethod(fromfile)


if enabled() and not getattr(sys, "_xtuner_patch_autoload_installed", False):
    sys._xtuner_patch_autoload_installed = True
    call_after_import("mmengine.config.config", _patch_before_config_load)
