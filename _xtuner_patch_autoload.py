"""The interpreter-start hook behind ``XTUNER_PATCH=1 xtuner train``.

``xtuner-patch.pth`` (installed into site-packages with the package) imports this module
in every Python process.  It does nothing unless ``XTUNER_PATCH`` is set; then it leaves
the rest to :mod:`xtuner_patch.autoload`, which patches at the first mmengine config
load (when XTuner's train tool reads its config) and reads the variable's value there.
"""

import os

if os.environ.get("XTUNER_PATCH", "").strip():
    from xtuner_patch.autoload import install

    install()
