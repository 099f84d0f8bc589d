"""xtuner-patch: Triton kernels for XTuner's InternLM2 training path.

``import xtuner_patch``

- checks that the framework-free ``kernels`` package next to it is ours (Hugging
  Face's ``kernels`` distribution installs a top-level package of the same name);
- on machines without CUDA, installs the small shims XTuner needs to run on a CPU
  (:mod:`xtuner_patch.cpu_compat`);
- patches XTuner's InternLM2 dispatch (:func:`patch`) as soon as ``xtuner.model`` is
  imported (at once if it already is), unless the environment sets ``XTUNER_PATCH=0``.
  :func:`unpatch` restores XTuner.
"""

import importlib


def _check_kernels_package() -> None:
    try:
        kernels = importlib.import_module("kernels")
    except ImportError as exc:
        raise ImportError(
            "xtuner_patch needs the `kernels` package of the xtuner-patch distribution, "
            f"which could not be imported ({exc}). Reinstall it: pip install xtuner-patch"
        ) from exc
    if not getattr(kernels, "IS_XTUNER_PATCH_KERNELS", False):
        location = getattr(kernels, "__file__", None) or list(getattr(kernels, "__path__", []))
        raise ImportError(
            "The top-level package `kernels` resolves to a different package "
            f"({location}), not the one installed by xtuner-patch. This usually means "
            "Hugging Face's `kernels` distribution is installed in the same environment: "
            "both install a top-level `kernels`. Fix: `pip uninstall kernels` and then "
            "`pip install --force-reinstall --no-deps xtuner-patch` (or use separate "
            "virtual environments).")


_check_kernels_package()

from . import cpu_compat  # noqa: E402

cpu_compat.apply()

from .patch import KernelSwitches, active_switches, patch, unpatch  # noqa: E402

__all__ = ["KernelSwitches", "active_switches", "patch", "unpatch"]


def _patch_on_import() -> None:
    """Patch once XTuner's model package is imported (at once if it already is)."""
    from _xtuner_patch_autoload import call_after_import, disabled

    if disabled():
        return
    from .patch import patch_on_import

    call_after_import("xtuner.model", lambda _module: patch_on_import())


_patch_on_import()

__version__ = "0.1.0.dev0"
