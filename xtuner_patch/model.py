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
    """

    def __init__(self, *args, **kwargs):
        if not disabled():
            patch()
        super().__init__(*args, **kwargs)
