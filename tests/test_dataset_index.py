"""The token index: written once per file version, reused, optional, never required."""

import os

import numpy as np
import pytest

from xtuner_patch.dataset import (FtdpDataWarning, build_packed_dataset,
                                  load_intern_repo_tokenized_dataset, write_ftdp_file)
from xtuner_patch.dataset import ftdp, index, packing
from xtuner_patch.fixtures.ftdp import write_synthetic_corpus

pytestmark = pytest.mark.filterwarnings("ignore::xtuner_patch.dataset.FtdpDataWarning")


@pytest.fixture
def corpus(tmp_path):
    write_synthetic_corpus(str(tmp_path / "data"), {"a/p0": 60, "b/p0": (40, "int32")}, seed=6,
                           median_length=20, max_length=200)
    return str(tmp_path / "data")


def _packs(ds):
    return [[ds[i][k].tolist() for k in ("input_ids", "labels", "cumulative_len")]
            for i in range(len(ds))]


def _build(folder, **options):
    return build_packed_dataset(load_intern_repo_tokenized_dataset(folder), 64, **options)


def _parses(monkeypatch):
    """Count the files whose lines get parsed front to back."""
    calls = []
    real = index.iter_file_tokens

    def counting(path, *args):
        calls.append(path)
        return real(path, *args)
    monkeypatch.setattr(index, "iter_file_tokens", counting)
    return calls


def test_written_once_then_reused(corpus, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    calls = _parses(monkeypatch)
    first = _build(corpus, cache_dir=cache)
    assert len(calls) == 2 and len(os.listdir(cache)) == 2
    again = _build(corpus, cache_dir=cache)
    assert len(calls) == 2  # nothing parsed: both indexes found
    assert _packs(again) == _packs(first)


def test_a_changed_file_gets_a_new_index(corpus, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    before = _packs(_build(corpus, cache_dir=cache))
    path = os.path.join(corpus, "a", "p0.bin")
    tokens = np.arange(1, 301)
    write_ftdp_file(path, tokens, [100, 200])
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    calls = _parses(monkeypatch)
    after = _build(corpus, cache_dir=cache)
    assert calls == [path] and len(os.listdir(cache)) == 2  # the stale index removed
    assert _packs(after) != before
    assert _packs(after) == _packs(_build(corpus, cache_dir=False))


def test_no_index_and_unwritable_folder_give_the_same_packs(corpus, tmp_path):
    expected = _packs(_build(corpus, cache_dir=str(tmp_path / "cache")))
    assert _packs(_build(corpus, cache_dir=False)) == expected
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    with pytest.warns(FtdpDataWarning, match="token index not written"):
        ds = _build(corpus, cache_dir=str(blocked / "sub"))
    assert ds.index_paths == [None, None]
    assert _packs(ds) == expected


def test_check_lines_off_parses_nothing_at_build(corpus, tmp_path, monkeypatch):
    calls = _parses(monkeypatch)
    ds = _build(corpus, cache_dir=str(tmp_path / "cache"), check_lines=False)
    assert calls == [] and ds.index_paths == [None, None]
    assert _packs(ds) == _packs(_build(corpus, cache_dir=False))


def test_a_rank_without_the_index_parses_packs(corpus, tmp_path, monkeypatch):
    ds = _build(corpus, cache_dir=str(tmp_path / "cache"))
    expected = _packs(ds)
    moved = str(tmp_path / "elsewhere")
    os.rename(str(tmp_path / "cache"), moved)  # as on a node that does not share the folder
    # A fresh process: nothing mapped or warned yet.
    monkeypatch.setattr(index, "_OPENED", {})
    monkeypatch.setattr(packing, "_MISSING_INDEXES", set())
    with pytest.warns(FtdpDataWarning, match="not found on this machine"):
        assert _packs(ds) == expected


def test_default_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(index.CACHE_ENV, str(tmp_path / "env"))
    assert index.default_cache_dir() == str(tmp_path / "env")
    monkeypatch.delenv(index.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert index.default_cache_dir() == str(tmp_path / "xdg" / "xtuner_patch" / "ftdp")


def test_unsorted_meta_rows(tmp_path):
    """Meta rows in any order (and a line listed twice) index in meta order."""
    path = str(tmp_path / "d" / "x.bin")
    samples = [[1, 2], [3], [4, 5, 6], [7]]
    write_ftdp_file(path, np.concatenate(samples), [len(s) for s in samples])
    meta = np.load(path + ".meta")
    order = [2, 0, 3, 1, 2]
    with open(path + ".meta", "wb") as f:
        np.save(f, meta[order])
    built = index.open_index(index.ensure_index(path, str(tmp_path / "cache")))
    assert built.tolist() == sum([samples[i] for i in order], [])
    assert ftdp.read_samples(path, meta[order][:, 0], meta[order][:, 1]).tolist() == \
        built.tolist()
