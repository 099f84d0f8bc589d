"""Package layout: `kernels` stays framework-free; a foreign `kernels` is detected."""

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, pythonpath: str, **kwargs):
    env = dict(os.environ, PYTHONPATH=pythonpath)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


def test_kernels_imports_only_torch_and_triton():
    proc = _run("""
        import sys, kernels, kernels.reference
        import pkgutil, importlib
        for info in pkgutil.walk_packages(kernels.__path__, 'kernels.'):
            importlib.import_module(info.name)
        heavy = {'xtuner', 'transformers', 'mmengine', 'deepspeed', 'xtuner_patch'}
        loaded = sorted(heavy & {m.split('.')[0] for m in sys.modules})
        print('LOADED', loaded)
        """, REPO, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout


def test_foreign_kernels_package_is_reported(tmp_path):
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("# stands in for Hugging Face's `kernels`\n")
    # The foreign package comes first on the path, as when it is installed alongside.
    proc = _run("import xtuner_patch", os.pathsep.join([str(tmp_path), REPO]), cwd=str(tmp_path))
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert str(fake) in proc.stderr
    assert "pip uninstall kernels" in proc.stderr


def test_our_kernels_package_is_accepted():
    proc = _run("import xtuner_patch, kernels; print(kernels.IS_XTUNER_PATCH_KERNELS)", REPO,
                cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("True")


def test_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["scripts"]["xtuner-patch"] == "xtuner_patch.cli:main"
