"""Token index: every line of an ftdp file parsed and checked once, its tokens kept.

``build_packed_dataset`` parses every line of every file on rank 0 while it builds (the
up-front check: a bad line fails the build, naming file and line, before the first
training step) and keeps what it parsed: one :data:`~.lines.TOKEN_DTYPE` ``.npy`` per
``.bin``, every meta row's tokens in meta order.  A later build finds it and skips the
parse, and reading a pack gathers from it instead of parsing JSON.

An index belongs to one version of its ``.bin`` and ``.bin.meta``: its name holds a hash
of their real path, sizes and modification times, so a changed file gets a new index
(the old one is removed when the new one is written).

Where: the ``cache_dir`` argument, else ``$XTUNER_PATCH_CACHE_DIR``, else
``$XDG_CACHE_HOME/xtuner_patch/ftdp`` (``~/.cache/...``).  Size: 4 bytes per token, about
half the ``.bin``.  Every rank reads the index rank 0 wrote when it sees the same folder
(one machine, or a shared file system); a rank that does not find it parses each pack's
lines from the ``.bin`` when reading it (slower, same packs).
"""

import hashlib
import os
import warnings
from typing import Dict, Optional, Union

import numpy as np

from .ftdp import FtdpDataWarning, iter_file_tokens, read_meta
from .lines import TOKEN_DTYPE

__all__ = ["CACHE_ENV", "check_lines", "default_cache_dir", "ensure_index", "open_index"]

CACHE_ENV = "XTUNER_PATCH_CACHE_DIR"
_FORMAT = 1  # bump when the parse or the file layout changes: old indexes are not reused


def default_cache_dir() -> str:
    """``$XTUNER_PATCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/xtuner_patch/ftdp``."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xtuner_patch", "ftdp")


def _names(path: str):
    """``(prefix, file name)`` of ``path``'s index: the prefix is shared by every version
    of the file, the name adds the version (sizes and mtimes of the .bin and its meta)."""
    real = os.path.realpath(path)
    stats = [os.stat(p) for p in (real, real + ".meta")]
    prefix = hashlib.sha1(real.encode()).hexdigest()[:16]
    key = ":".join([str(_FORMAT), real, *(f"{s.st_size}:{s.st_mtime_ns}" for s in stats)])
    return prefix, f"{prefix}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy"


def check_lines(path: str) -> None:
    """Parse every meta row's line of ``path`` (nothing kept); FtdpFormatError if one is bad."""
    offsets, lengths = read_meta(path)
    for _ in iter_file_tokens(path, offsets, lengths):
        pass


def ensure_index(path: str, cache_dir: Union[str, bool, None] = None,
                 check: bool = True) -> Optional[str]:
    """The index of ``path``: found in ``cache_dir``, or (``check``) parsed and written.

    ``cache_dir``: a folder, None for :func:`default_cache_dir`, False for no index (with
    ``check`` the lines are still parsed, and nothing is kept).  Returns the index's
    path, or None where there is none (``check`` False and none found, no cache, or the
    folder not writable: a warning says so).  Raises FtdpFormatError for a bad line.
    """
    if cache_dir is False:
        if check:
            check_lines(path)
        return None
    folder = default_cache_dir() if cache_dir is None else str(cache_dir)
    prefix, name = _names(path)
    final = os.path.join(folder, name)
    if os.path.exists(final):
        return final
    if not check:
        return None
    return _write_index(path, folder, prefix, final)


def _write_index(path, folder, prefix, final) -> Optional[str]:
    offsets, lengths = read_meta(path)
    tmp = f"{final}.{os.getpid()}.tmp"
    sink = None
    try:
        os.makedirs(folder, exist_ok=True)
        sink = open(tmp, "wb")
        np.lib.format.write_array_header_1_0(sink, {
            "descr": np.lib.format.dtype_to_descr(TOKEN_DTYPE), "fortran_order": False,
            "shape": (int(lengths.sum()),)})
    except OSError as exc:
        sink = _give_up(sink, tmp, folder, exc)
    try:
        for _, _, tokens in iter_file_tokens(path, offsets, lengths):
            if sink is not None:
                try:
                    tokens.tofile(sink)
                except OSError as exc:
                    sink = _give_up(sink, tmp, folder, exc)
    except BaseException:
        _give_up(sink, tmp, folder, None)
        raise
    if sink is None:
        return None
    try:
        sink.close()
        os.replace(tmp, final)
    except OSError as exc:
        return _give_up(sink, tmp, folder, exc)
    for old in os.listdir(folder):
        if old.startswith(prefix + "-") and old.endswith(".npy") and old != os.path.basename(final):
            try:
                os.remove(os.path.join(folder, old))
            except OSError:  # another process may be replacing it: harmless
                pass
    return final


def _give_up(sink, tmp, folder, exc) -> None:
    """Close and remove a partial index; warn why (``exc``) unless a parse error ends it."""
    if sink is not None:
        sink.close()
    try:
        os.remove(tmp)
    except OSError:
        pass
    if exc is not None:
        warnings.warn(f"token index not written to {folder} ({exc}): lines are still checked, "
                      "packs will be parsed from the .bin files when read (set cache_dir or "
                      f"${CACHE_ENV} to a writable folder)", FtdpDataWarning, stacklevel=4)
    return None


_OPENED: Dict[str, np.ndarray] = {}  # per process; forked workers inherit the maps


def open_index(index_path: str) -> Optional[np.ndarray]:
    """The index at ``index_path`` mapped read-only (once per process), or None if this
    machine does not have it."""
    index = _OPENED.get(index_path)
    if index is None:
        try:
            index = np.asarray(np.load(index_path, mmap_mode="r"))
        except FileNotFoundError:
            return None
        _OPENED[index_path] = index
    return index
