"""``XTUNER_PATCH=1 xtuner train``: patch every process at its first mmengine config load.

Installed at interpreter start by ``_xtuner_patch_autoload`` (the ``.pth`` hook) when
``XTUNER_PATCH`` is set.  Nothing heavy runs then: a meta-path finder waits for
``mmengine.config.config`` to be imported and wraps ``Config.fromfile``; the first call
(XTuner's ``tools/train.py`` reading its config, before anything is built) reads
``XTUNER_PATCH`` strictly and, when it is on, applies the shims a CPU-only machine needs,
the checkpoint-loading fix and :func:`xtuner_patch.patch`.
"""

import sys

_INSTALLED = "_xtuner_patch_autoload_installed"


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


def _patch_before_config_load(config_module) -> None:
    config_cls = config_module.Config
    load = config_cls.fromfile  # a static method in mmengine 0.10: callable as is

    def fromfile(*args, **kwargs):
        from .launch import prepare_rank
        from .switches import patch_requested

        if patch_requested(default=False):
            prepare_rank(patch=True)
        return load(*args, **kwargs)

    config_cls.fromfile = staticmethod(fromfile)


def install() -> None:
    """Wait for mmengine's config module (at once if it is already loaded).  Idempotent."""
    if getattr(sys, _INSTALLED, False):
        return
    setattr(sys, _INSTALLED, True)
    module = sys.modules.get("mmengine.config.config")
    if module is not None:
        _patch_before_config_load(module)
    else:
        sys.meta_path.insert(0, _AfterImport("mmengine.config.config", _patch_before_config_load))
