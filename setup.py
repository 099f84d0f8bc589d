"""What pyproject.toml cannot declare: the ``.pth`` file and the C extension.

- ``xtuner-patch.pth`` (the ``XTUNER_PATCH=1`` auto-import, see
  ``_xtuner_patch_autoload.py``) goes into site-packages next to the packages, for
  regular and editable installs alike.
- ``xtuner_patch.dataset._ftdp_lines``, the compiled reader of ftdp JSON lines, is
  optional: where it does not build (no C compiler or Python headers), the install goes
  on and the data path uses its numpy/simdjson reader, with a warning at first use.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

PTH = "xtuner-patch.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]

    def get_output_mapping(self):
        mapping = dict(super().get_output_mapping())
        mapping[os.path.join(self.build_lib, PTH)] = PTH
        return mapping


FTDP_LINES = Extension("xtuner_patch.dataset._ftdp_lines",
                       sources=["xtuner_patch/dataset/_ftdp_lines.c"], optional=True)

setup(cmdclass={"build_py": BuildPyWithPth}, ext_modules=[FTDP_LINES])
