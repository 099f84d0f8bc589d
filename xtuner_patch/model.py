"""Config objects that patch XTuner when a plain ``xtuner train CONFIG`` builds them.

mmengine parses XTuner configs lazily: an ``import xtuner_patch`` at the top of a
config never runs, but the objects a config *uses* are imported when they are built.
Using :class:`SupervisedFinetune` from here as the model ``type`` therefore patches
XTuner in every training rank, right before the LLM is built and dispatched.

Note: XTuner's ``check_cfg`` runs before any config object is built, so without
flash-attn it still refuses a top-level ``use_varlen_attn = True``.  The configs in
``configs/`` therefore name that setting ``varlen_attn`` (XTuner's check of batch size 1
is then done by our attention forward).  ``xtuner-patch train`` and
``XTUNER_PATCH=1 xtuner train`` lift the requirement in ``check_cfg`` itself.
"""

from xtuner.model import SupervisedFinetune as _XTunerSupervisedFinetune

from _xtuner_patch_autoload import disabled

from .patch import patch


class SupervisedFinetune(_XTunerSupervisedFinetune):
    """XTuner's ``SupervisedFinetune``, with :func:`xtuner_patch.patch` applied first.

    ``XTUNER_PATCH=0`` in the environment keeps XTuner's stock path.

    ``labels_shifted=True`` is for data built with ``build_packed_dataset(
    label_alignment='internevo')`` (whose ``labels_shifted`` attribute is then True): the
    loss compares position ``i`` with ``labels[i]`` instead of shifting the labels again
    (:func:`xtuner_patch.internlm2.set_labels_shifted`; needed with ``XTUNER_PATCH=0`` too).
    """

    def __init__(self, *args, labels_shifted: bool = False, **kwargs):
        if not disabled():
            patch()
        super().__init__(*args, **kwargs)
        if labels_shifted:
            from .internlm2 import set_labels_shifted

            set_labels_shifted(self.llm)
