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


# ------------------------------------------------------------------- import graph
PACKAGES = ("kernels", "xtuner_patch")
# Parts whose modules may use each other's private names; across parts only public ones.
PARTS = ("kernels", "xtuner_patch.convert", "xtuner_patch.dataset", "xtuner_patch.fixtures",
         "xtuner_patch.internlm2", "xtuner_patch", "_xtuner_patch_autoload")


def _modules():
    """``{module name: source path}`` of every module of our packages."""
    found = {"_xtuner_patch_autoload": os.path.join(REPO, "_xtuner_patch_autoload.py")}
    for package in PACKAGES:
        for root, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(root, name), REPO)[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    found[".".join(rel)] = os.path.join(root, name)
    return found


def _imports(name, path, modules):
    """``[(imported module, imported names)]`` of every import statement in ``path``
    (nested ones too), relative imports resolved; ``from pkg import sub`` of a submodule
    counts as an import of ``pkg.sub``."""
    import ast

    is_package = path.endswith("__init__.py")
    found = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, ()) if sub in modules else (base, (alias.name,)))
    return found


def _part(module):
    return next(p for p in PARTS if module == p or module.startswith(p + "."))


def test_import_graph_has_no_cycles_and_uses_only_public_names_across_parts():
    modules = _modules()
    graph, private = {}, []
    for name, path in modules.items():
        edges = set()
        for target, names in _imports(name, path, modules):
            if target not in modules:
                continue  # torch, xtuner, ...
            edges.add(target)
            if _part(target) != _part(name):
                hidden = [p for p in target.split(".") + list(names) if p.startswith("_")]
                if hidden:
                    private.append(f"{name} -> {target} {names}")
        graph[name] = edges - {name}
    assert not private, private
    # Depth-first search for a cycle.
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(
                    stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
