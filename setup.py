"""Installs ``xtuner-patch.pth`` into site-packages next to the packages.

Everything else is declared in pyproject.toml; this file only adds the ``.pth`` (the
``XTUNER_PATCH=1`` auto-import, see ``_xtuner_patch_autoload.py``) to the build, for
regular and editable installs alike.
"""

import os

from setuptools import setup
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


setup(cmdclass={"build_py": BuildPyWithPth})
