"""xtuner_patch.atomic: output folders that appear complete or not at all."""

import os
import signal
import subprocess
import sys

import pytest

from tests.outputs import siblings, snapshot
from xtuner_patch import atomic
from xtuner_patch.atomic import atomic_output_dir
from xtuner_patch.errors import UserError

OWNED = [r"weights-\d+\.bin", r"config\.json"]


def write(folder, files: dict) -> None:
    for rel, data in files.items():
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def previous_output(dst) -> dict:
    """A finished earlier output in ``dst`` with the user's own files next to it."""
    write(dst, {"weights-0.bin": b"old 0", "weights-1.bin": b"old 1", "config.json": b"{}",
                "notes.txt": b"mine", "extra/readme.md": b"also mine"})
    os.symlink("notes.txt", os.path.join(dst, "link-to-notes"))
    os.chmod(dst, 0o750)
    return snapshot(dst)


def test_the_folder_appears_only_when_complete(tmp_path):
    dst = tmp_path / "parent" / "out"
    with atomic_output_dir(str(dst), overwrite=False, owned=OWNED) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path / "parent")
        assert os.path.basename(tmp).startswith(".out.tmp-")
        write(tmp, {"weights-0.bin": b"new"})
        assert not dst.exists()
    assert snapshot(dst) == {"weights-0.bin": b"new"}
    assert siblings(dst) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("before", ["absent", "missing parents", "empty", "previous output"])
def test_an_exception_leaves_the_destination_as_it_was(tmp_path, error, before):
    dst = tmp_path / "a" / "b" / "out" if before == "missing parents" else tmp_path / "out"
    if before == "empty":
        dst.mkdir()
    expected = previous_output(dst) if before == "previous output" else None
    with pytest.raises(error) as info:
        with atomic_output_dir(str(dst), overwrite=True, owned=OWNED) as tmp:
            write(tmp, {"weights-0.bin": b"half", "weights-1.bin": b""})
            raise error("stop")
    assert info.value.__notes__ == [f"{dst} left unchanged"]
    if before == "previous output":
        assert snapshot(dst) == expected
        assert oct(os.stat(dst).st_mode & 0o777) == oct(0o750)
    elif before == "empty":
        assert os.listdir(dst) == []
    else:
        assert not dst.exists()
    assert sorted(os.listdir(tmp_path)) == (["out"] if before in ("empty", "previous output")
                                            else [])


def test_a_non_empty_destination_needs_overwrite(tmp_path):
    dst = tmp_path / "out"
    expected = previous_output(dst)
    with pytest.raises(UserError, match=r"exists and is not empty \(pass --overwrite"):
        with atomic_output_dir(str(dst), overwrite=False, owned=OWNED):
            pytest.fail("the writer ran")
    assert snapshot(dst) == expected and siblings(dst) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        with atomic_output_dir(str(tmp_path / "file"), overwrite=True, owned=OWNED):
            pytest.fail("the writer ran")
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output_dir(str(empty), overwrite=False, owned=OWNED) as tmp:
        write(tmp, {"config.json": b"{}"})
    assert snapshot(empty) == {"config.json": b"{}"}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_overwrite_replaces_the_output_and_keeps_the_users_files(tmp_path, monkeypatch,
                                                                 exchange):
    if exchange and atomic._renameat2() is None:
        pytest.skip("no renameat2 here")
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    dst = tmp_path / "out"
    before = previous_output(dst)
    with atomic_output_dir(str(dst), overwrite=True, owned=OWNED) as tmp:
        write(tmp, {"weights-0.bin": b"new 0", "config.json": b"{\"new\": 1}"})
    after = snapshot(dst)
    # weights-1.bin is the writer's (owned): a stale shard of the previous output, gone.
    assert after == {"weights-0.bin": b"new 0", "config.json": b"{\"new\": 1}",
                     "notes.txt": b"mine", "extra": "dir", "extra/readme.md": b"also mine",
                     "link-to-notes": ("link", "notes.txt")}
    assert before["notes.txt"] == after["notes.txt"]
    assert os.stat(dst / "notes.txt").st_nlink == 1  # the old folder's link is gone with it
    assert oct(os.stat(dst).st_mode & 0o777) == oct(0o750)
    assert siblings(dst) == []


def test_a_symlinked_destination_replaces_the_folder_it_points_to(tmp_path):
    real = tmp_path / "real"
    previous_output(real)
    (tmp_path / "link").symlink_to(real)
    with atomic_output_dir(str(tmp_path / "link"), overwrite=True, owned=OWNED) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        write(tmp, {"weights-0.bin": b"new"})
    assert os.readlink(tmp_path / "link") == str(real)
    assert (real / "weights-0.bin").read_bytes() == b"new"
    assert (real / "notes.txt").read_bytes() == b"mine"


def _interrupt_after(func):
    def wrapper(*args):
        result = func(*args)
        os.kill(os.getpid(), signal.SIGINT)
        return result
    return wrapper


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_a_signal_during_the_swap_waits_until_it_is_done(tmp_path, monkeypatch, exchange):
    dst = tmp_path / "out"
    previous_output(dst)
    if exchange:
        if atomic._renameat2() is None:
            pytest.skip("no renameat2 here")
        monkeypatch.setattr(atomic, "_exchange", _interrupt_after(atomic._exchange))
    else:
        # SIGINT right after the old folder is renamed aside: DST is missing at that moment.
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
        rename = os.rename

        def rename_then_interrupt(src, target):
            rename(src, target)
            if src == str(dst):
                os.kill(os.getpid(), signal.SIGINT)

        monkeypatch.setattr(os, "rename", rename_then_interrupt)
    with pytest.raises(KeyboardInterrupt) as info:
        with atomic_output_dir(str(dst), overwrite=True, owned=OWNED) as tmp:
            write(tmp, {"weights-0.bin": b"new"})
    assert info.value.__notes__ == [f"{dst} written"]
    assert (dst / "weights-0.bin").read_bytes() == b"new"
    assert not (dst / "weights-1.bin").exists()
    assert siblings(dst) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    dead, live = _dead_pid(), subprocess.Popen([sys.executable, "-c",
                                                "import time; time.sleep(60)"])
    try:
        for name in (f".out.tmp-{dead}-0123abcd", f".out.tmp-{live.pid}-0123abcd",
                     f".other.tmp-{dead}-0123abcd"):
            write(tmp_path / name, {"weights-0.bin": b"half"})
        with atomic_output_dir(str(tmp_path / "out"), overwrite=False, owned=OWNED) as tmp:
            write(tmp, {"weights-0.bin": b"new"})
        # A live process's folder may still be written; another destination's is not ours.
        assert sorted(os.listdir(tmp_path)) == [f".other.tmp-{dead}-0123abcd",
                                                f".out.tmp-{live.pid}-0123abcd", "out"]
    finally:
        live.kill()
        live.wait()


def test_a_folder_set_aside_by_a_killed_swap_is_put_back(tmp_path):
    # kill -9 between the two renames of the rename-aside swap: DST missing, old content aside.
    aside = tmp_path / f".out.old-{_dead_pid()}-0123abcd"
    expected = previous_output(aside)
    with pytest.raises(UserError, match="--overwrite"):
        with atomic_output_dir(str(tmp_path / "out"), overwrite=False, owned=OWNED):
            pytest.fail("the writer ran")
    assert snapshot(tmp_path / "out") == expected
    assert os.listdir(tmp_path) == ["out"]


def test_a_destination_filled_meanwhile_is_not_replaced_without_overwrite(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(UserError, match="filled by another process") as info:
        with atomic_output_dir(str(dst), overwrite=False, owned=OWNED) as tmp:
            write(tmp, {"weights-0.bin": b"new"})
            write(dst, {"weights-0.bin": b"theirs"})
    assert info.value.__notes__ == [f"{dst} left unchanged"]
    assert snapshot(dst) == {"weights-0.bin": b"theirs"}
    assert siblings(dst) == []
