"""The patch's switches: which XTuner hot loops are replaced, read from arguments or the
environment.

``XTUNER_PATCH`` switches the whole patch for the entry points that read it
(``xtuner-patch train``: on unless ``0``; ``XTUNER_PATCH=1 xtuner train``: the
auto-import); ``XTUNER_PATCH_<FAMILY>`` (``ATTENTION``, ``ROPE``, ``RMS_NORM``,
``FUSED_RESIDUAL``, ``SWIGLU``, ``CROSS_ENTROPY``) switch one kernel family.  Values are
``1/0/true/false/on/off/yes/no`` in any case; anything else is a :class:`UserError` naming
the variable.  ``XTUNER_PATCH_CHECKPOINT`` (``auto|none|selective|full|<GiB>``) picks the
activation-checkpointing policy (:func:`parse_checkpoint`, strict too).  This module
imports nothing heavy: the interpreter-start hook reads it.
"""

import os
from dataclasses import dataclass, fields
from typing import List, Optional

from .errors import UserError

_ON = ("1", "true", "on", "yes")
_OFF = ("0", "false", "off", "no")
PATCH_VARIABLE = "XTUNER_PATCH"


def parse_flag(name: str, value: str) -> bool:
    """``value`` of the switch ``name`` (an environment variable) as a bool."""
    text = value.strip().lower()
    if text in _ON:
        return True
    if text in _OFF:
        return False
    raise UserError(f"{name}={value!r} is not a switch value: use one of "
                    f"{'/'.join(_ON + _OFF)} (any case)")


def env_flag(name: str, default: Optional[bool] = None) -> Optional[bool]:
    """The environment variable ``name`` as a bool; ``default`` when it is unset or empty."""
    value = os.environ.get(name, "")
    return default if not value.strip() else parse_flag(name, value)


def patch_requested(default: bool) -> bool:
    """``XTUNER_PATCH`` as the entry point reads it, ``default`` when unset."""
    return env_flag(PATCH_VARIABLE, default)


@dataclass(frozen=True)
class KernelSwitches:
    """Which XTuner InternLM2 hot loops are replaced."""

    attention: bool = True  # varlen GQA attention (no K/V repeat); the wqkv split
    rope: bool = True  # rotary embedding of q and k, fused with the wqkv split (needs attention)
    rms_norm: bool = True  # InternLM2RMSNorm
    fused_residual: bool = True  # decoder layer: residual add + ffn_norm in one kernel
    swiglu: bool = True  # InternLM2MLP: silu(w1 x) * w3 x in one kernel
    cross_entropy: bool = True  # training loss: LM head + cross-entropy, logits never built

    @classmethod
    def resolve(cls, **explicit) -> "KernelSwitches":
        """Switches from keyword arguments, else ``XTUNER_PATCH_<NAME>``, else on."""
        names = [f.name for f in fields(cls)]
        unknown = set(explicit) - set(names)
        if unknown:
            raise TypeError(f"unknown kernel switches: {sorted(unknown)}; known: {names}")
        values = {}
        for name in names:
            value = explicit.get(name)
            if value is None:
                value = env_flag(f"{PATCH_VARIABLE}_{name.upper()}", True)
            values[name] = bool(value)
        return cls(**values)

    def active(self) -> List[str]:
        """The families that really replace something: RoPE runs inside our attention
        forward, so it is active only with it."""
        return [f.name for f in fields(self) if getattr(self, f.name)
                and (f.name != "rope" or self.attention)]


CHECKPOINT_VARIABLE = f"{PATCH_VARIABLE}_CHECKPOINT"
CHECKPOINT_MODES = ("auto", "none", "selective", "full")


@dataclass(frozen=True)
class CheckpointSetting:
    """The activation-checkpointing policy asked for (:mod:`xtuner_patch.checkpointing`).

    ``mode``: ``none`` / ``selective`` / ``full`` for every decoder layer; ``auto``
    (layers fitted into the device memory left) or ``budget`` (fitted into
    ``budget_gib`` GiB of activations kept by the decoder layers).
    """

    mode: str
    budget_gib: Optional[float] = None

    def describe(self) -> str:
        return f"{self.budget_gib:g} GiB" if self.mode == "budget" else self.mode


def parse_checkpoint(name: str, value) -> CheckpointSetting:
    """``value`` of ``name`` (the environment variable or ``patch(checkpoint=)``): one of
    ``auto|none|selective|full`` (any case) or a budget in GiB (a finite number >= 0)."""
    if isinstance(value, CheckpointSetting):
        return value
    accepted = f"{'|'.join(CHECKPOINT_MODES)} (any case) or a budget in GiB, e.g. 20 or 7.5"
    if isinstance(value, bool):  # a bool is an int: refuse it rather than read 1 GiB
        raise UserError(f"{name}={value!r} is not a checkpointing policy: use {accepted}")
    if isinstance(value, (int, float)):
        budget = float(value)
    else:
        text = str(value).strip().lower()
        if text in CHECKPOINT_MODES:
            return CheckpointSetting(text)
        try:
            budget = float(text)
        except ValueError:
            raise UserError(f"{name}={value!r} is not a checkpointing policy: use "
                            f"{accepted}") from None
    if not (budget >= 0 and budget != float("inf")):  # also refuses nan
        raise UserError(f"{name}={value!r}: a budget must be a finite number of GiB >= 0; "
                        f"accepted: {accepted}")
    return CheckpointSetting("budget", budget)


def resolve_checkpoint(explicit=None) -> Optional[CheckpointSetting]:
    """The policy from ``patch(checkpoint=)``, else ``XTUNER_PATCH_CHECKPOINT``; None when
    neither is set (XTuner's own checkpointing, as its config asks, is left alone)."""
    if explicit is not None:
        return parse_checkpoint("checkpoint", explicit)
    value = os.environ.get(CHECKPOINT_VARIABLE, "")
    return parse_checkpoint(CHECKPOINT_VARIABLE, value) if value.strip() else None
