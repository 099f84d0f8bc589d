"""Output folders that appear complete or not at all.

Every ``xtuner-patch`` command that writes a folder (``convert``, ``make-tiny-model``,
``make-sample-data``) writes it through :func:`atomic_output_dir`:

- the files go into a temporary sibling, ``.<name>.tmp-<pid>-<random>`` next to the
  destination (same parent, so the same file system, where a rename is atomic);
- only once the writer has finished does that folder take the destination's name.  An
  existing destination (replaced only with ``overwrite``) is exchanged with it in one step
  where the system can (Linux ``renameat2(RENAME_EXCHANGE)``); elsewhere it is renamed aside
  and the new folder renamed in, with SIGINT and SIGTERM held back in between.  Either way the
  destination is never missing, nor a mix of old and new files;
- an exception (``KeyboardInterrupt`` and the CLI's SIGTERM exception included) removes the
  temporary folder, and any parent folders this call created, and leaves the destination as
  it was.

``kill -9`` cannot be caught: it leaves the temporary sibling behind, never a partial
destination.  Readers look inside the destination only, so they never see it; the next write
to the same destination removes the siblings of processes no longer running on this machine
(a live process's are kept: it may still be writing).  A ``.<name>.old-*`` sibling with the
destination missing (``kill -9`` between the two renames of the fallback) is renamed back.
"""

import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, List, Sequence

from .errors import UserError

__all__ = ["atomic_output_dir"]


@contextmanager
def atomic_output_dir(dst: str, *, overwrite: bool, owned: Sequence[str]) -> Iterator[str]:
    """Yield an empty temporary folder to write ``dst`` into; ``dst`` becomes it on success.

    Args:
        dst: the folder to produce (parents are created).  If it is a symlink, the folder it
            points to is the one replaced.
        overwrite: allow replacing an existing, non-empty ``dst``; without it that is refused
            (:class:`UserError` naming ``--overwrite``) before anything is written.  An empty
            ``dst`` counts as absent.
        owned: regexes (full match) of the top-level names the writer produces.  When ``dst``
            is replaced, its other entries (the user's own files next to the output) are
            hard-linked, or copied where links are impossible, into the new folder.

    On an exception the temporary folder is removed and the exception, re-raised, carries the
    note ``"<dst> left unchanged"`` (``__notes__``); a SIGINT/SIGTERM held back during the
    swap is delivered after it with the note ``"<dst> written"``.
    """
    target = os.path.realpath(dst)
    parent, name = os.path.split(target)
    if not name:
        raise UserError(f"{dst}: the root folder cannot be an output folder")
    if os.path.isdir(parent):
        _remove_stale_siblings(parent, name, target)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise UserError(f"{dst}: exists and is not a folder")
    existing = os.path.isdir(target)
    replacing = existing and bool(os.listdir(target))
    if replacing and not overwrite:
        raise UserError(f"{dst}: exists and is not empty (pass --overwrite to replace it)")
    made = _missing_parents(parent)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = _new_sibling(parent, name, "tmp", create=True)
    except OSError as exc:
        _remove_empty(made)
        raise UserError(f"{dst}: cannot create a folder there ({exc.strerror})") from exc
    swapped = False
    try:
        yield tmp
        if existing:
            shutil.copymode(target, tmp)
        if replacing:
            _carry_over(target, tmp, owned)
        with _signals_held():
            if replacing:
                _swap_in(tmp, target)
            else:
                _rename_into_place(dst, tmp, target)
            swapped = True
    except BaseException as exc:
        if not swapped:
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_empty(made)
        # exc.add_note() exists from Python 3.11 only; it appends to this same list.
        exc.__notes__ = [*getattr(exc, "__notes__", ()),
                         f"{dst} {'written' if swapped else 'left unchanged'}"]
        raise


def _rename_into_place(dst: str, tmp: str, target: str) -> None:
    """Give ``tmp`` the name ``target``, which is absent or an empty folder."""
    try:
        os.rename(tmp, target)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise UserError(f"{dst}: was filled by another process while this one wrote it "
                        "(pass --overwrite to replace it)") from exc


def _swap_in(tmp: str, target: str) -> None:
    """Give ``tmp`` the name ``target``, a non-empty folder: all of it or, raising, nothing;
    the folder it replaces is then deleted."""
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # the old content, under the temporary name
        return
    parent, name = os.path.split(target)
    old = _new_sibling(parent, name, "old", create=False)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.lru_cache(maxsize=None)
def _renameat2():
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # not Linux/glibc >= 2.28
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def _exchange(a: str, b: str) -> bool:
    """Swap two existing paths atomically; False where the system or file system cannot."""
    func = _renameat2()
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), a, None, b)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block and deliver them, to the handlers that were
    in place, once it is over: a rename pair must not be cut in the middle.

    Python runs signal handlers in the main thread only, so elsewhere nothing is held (a
    signal cannot raise in this thread then).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: List[int] = []
    # A handler set outside Python (getsignal() is None) could not be put back.
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not None}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(held):
            signal.raise_signal(sig)


def _new_sibling(parent: str, name: str, kind: str, *, create: bool) -> str:
    while True:
        path = os.path.join(parent, f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")
        if not create:
            if not os.path.lexists(path):
                return path
            continue
        try:
            os.mkdir(path)  # not mkdtemp: its 0700 mode would become the destination's
            return path
        except FileExistsError:
            continue


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_siblings(parent: str, name: str, target: str) -> None:
    pattern = re.compile(re.escape(f".{name}.") + r"(tmp|old)-(\d+)-[0-9a-f]+")
    for entry in sorted(os.listdir(parent)):
        match = pattern.fullmatch(entry)
        if not match or _process_alive(int(match.group(2))):
            continue
        path = os.path.join(parent, entry)
        if match.group(1) == "old" and not os.path.lexists(target):
            os.rename(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _missing_parents(parent: str) -> List[str]:
    """The folders ``os.makedirs(parent)`` would create, deepest first."""
    missing = []
    while parent and not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    return missing


def _remove_empty(folders: List[str]) -> None:
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: str, new: str, owned: Sequence[str]) -> None:
    patterns = [re.compile(p) for p in owned]
    for entry in os.scandir(old):
        dst = os.path.join(new, entry.name)
        if any(p.fullmatch(entry.name) for p in patterns) or os.path.lexists(dst):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir():
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, dst)
