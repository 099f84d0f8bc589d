"""xtuner-patch: Triton kernels for XTuner's InternLM2 training path.

``import xtuner_patch`` checks that the framework-free ``kernels`` package next to it
is ours (Hugging Face's ``kernels`` distribution installs a top-level package of the
same name) and, on machines without CUDA, installs the small shims XTuner needs to
run on a CPU (:mod:`xtuner_patch.cpu_compat`).
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

__version__ = "0.1.0.dev0"
