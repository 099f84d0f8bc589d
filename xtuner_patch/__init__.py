"""xtuner-patch: Triton kernels for XTuner's InternLM2 training path.

Importing the package changes nothing: the patch is switched on by ``xtuner-patch
train`` (every rank it starts), by ``XTUNER_PATCH=1 xtuner train`` (the auto-import
installed with the package) or, in a script of one's own, by :func:`patch`;
:func:`unpatch` restores XTuner.

The import checks (cheaply: no torch) that the ``kernels`` package next to it is ours:
Hugging Face's ``kernels`` distribution installs a top-level package of the same name.
"""

import importlib.util
import os

__version__ = "0.1.0.dev0"


def _check_kernels_package() -> None:
    spec = importlib.util.find_spec("kernels")
    if spec is None:
        raise ImportError("xtuner_patch needs the `kernels` package of the xtuner-patch "
                          "distribution, which is not installed. Reinstall it: "
                          "pip install xtuner-patch")
    locations = list(spec.submodule_search_locations or [])
    # A module only our `kernels` has.
    if not any(os.path.exists(os.path.join(p, "varlen_attention.py")) for p in locations):
        raise ImportError(
            "The top-level package `kernels` resolves to a different package "
            f"({spec.origin or locations}), not the one installed by xtuner-patch. This "
            "usually means Hugging Face's `kernels` distribution is installed in the same "
            "environment: both install a top-level `kernels`. Fix: `pip uninstall kernels` "
            "and then `pip install --force-reinstall --no-deps xtuner-patch` (or use "
            "separate virtual environments).")


_check_kernels_package()

from .patcher import active_switches, patch, unpatch  # noqa: E402
from .switches import KernelSwitches  # noqa: E402


def set_labels_shifted(model, shifted: bool = True) -> None:
    """:func:`xtuner_patch.internlm2.set_labels_shifted`."""
    from .internlm2 import set_labels_shifted as set_shifted

    set_shifted(model, shifted)


__all__ = ["KernelSwitches", "active_switches", "patch", "set_labels_shifted", "unpatch"]
