"""What a command left in an output folder and next to it, for tests of atomic writes."""

import os


def snapshot(folder) -> dict:
    """Every file, folder and link under ``folder``: relative path -> bytes / "dir" / target."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                found[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                found[rel] = "dir"
            else:
                with open(path, "rb") as f:
                    found[rel] = f.read()
    return found


def siblings(dst) -> list:
    """What the writes of ``dst`` may leave next to it: ``.<name>.tmp-*`` / ``.old-*``."""
    parent, name = os.path.split(os.path.realpath(dst))
    return sorted(e for e in os.listdir(parent) if e.startswith(f".{name}."))
