"""XTuner's ``SupervisedFinetune`` with the options our data path needs, for configs.

``labels_shifted=True`` is for data built with ``build_packed_dataset(
label_alignment='internevo')`` (whose ``labels_shifted`` attribute is then True): the
loss compares position ``i`` with ``labels[i]`` instead of shifting the labels again
(:func:`xtuner_patch.internlm2.set_labels_shifted`; with or without the patch).

Deprecated: building this class also switches the patch on (unless ``XTUNER_PATCH=0``),
which let a plain ``xtuner train`` of a config naming it run patched.  The documented
ways are ``xtuner-patch train`` and ``XTUNER_PATCH=1 xtuner train``; this one warns.
"""

from xtuner.model import SupervisedFinetune as _XTunerSupervisedFinetune

from .log import warn_once
from .patcher import active_switches
from .switches import patch_requested


class SupervisedFinetune(_XTunerSupervisedFinetune):
    """XTuner's ``SupervisedFinetune`` plus ``labels_shifted`` (see the module doc)."""

    def __init__(self, *args, labels_shifted: bool = False, **kwargs):
        if active_switches() is None and patch_requested(default=True):
            # A log line, not a FutureWarning: XTuner's imports silence those.
            warn_once("xtuner-patch: xtuner_patch.model.SupervisedFinetune switched the patch "
                      "on, which is deprecated and will stop: run `xtuner-patch train`, or "
                      "set XTUNER_PATCH=1 for `xtuner train`")
            from .launch import prepare_rank

            prepare_rank(patch=True)
        super().__init__(*args, **kwargs)
        if labels_shifted:
            from .internlm2 import set_labels_shifted

            set_labels_shifted(self.llm)
