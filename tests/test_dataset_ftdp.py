"""xtuner_patch.dataset.ftdp: file order, meta, reading lines, and every bad input."""

import json
import os

import numpy as np
import pytest

from xtuner_patch.dataset import (FtdpDataWarning, FtdpFile, FtdpFormatError, list_ftdp_files,
                                  load_intern_repo_tokenized_dataset, read_samples,
                                  write_ftdp_file)
from xtuner_patch.dataset import ftdp
from xtuner_patch.fixtures.ftdp import write_synthetic_corpus

intern_repo = pytest.importorskip("xtuner.dataset.intern_repo")


def _write_lines(path, lines, lengths, meta_dtype="int64", offsets=None):
    """A .bin of raw ``lines`` (bytes, newline added) and a meta of ``lengths``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = b"".join(line + b"\n" for line in lines)
    if offsets is None:
        offsets = np.cumsum([0] + [len(line) + 1 for line in lines])[:-1]
    with open(path, "wb") as f:
        f.write(data)
    with open(path + ".meta", "wb") as f:
        np.save(f, np.stack([np.asarray(offsets), np.asarray(lengths)], 1).astype(meta_dtype))


def _nested_corpus(root):
    """Folders created out of alphabetical order at several depths, plus decoys."""
    files = {}
    for i, rel in enumerate(["zeta/b/part-001", "zeta/b/part-000", "alpha/x/part-000",
                             "mid/part-000", "top", "alpha/x/deeper/part-000", "beta/y/part-000"]):
        files[rel] = (5 + i, "int32" if i % 2 else "int64")
    write_synthetic_corpus(str(root), files, seed=3)
    (root / "zeta" / "notes.txt").write_text("not data")
    (root / "alpha" / "x" / "part-000.bin.meta.bak").write_bytes(b"")
    return files


def test_file_order_is_xtuners(tmp_path):
    _nested_corpus(tmp_path)
    xtuner = [ds.path for ds in intern_repo.load_intern_repo_tokenized_dataset(str(tmp_path))]
    ours = list_ftdp_files(str(tmp_path))
    assert ours == xtuner
    assert len(ours) == 7


def test_loaded_samples_match_xtuners_jsonl_dataset(tmp_path):
    write_synthetic_corpus(str(tmp_path), {"a/p0": (40, "int32"), "a/p1": 30, "b/p0": 25},
                           seed=1, zero_length=0.1, zero_token=0.05, long_length=500)
    for min_length in (0, 1, 30):
        xtuner = intern_repo.load_intern_repo_tokenized_dataset(str(tmp_path), min_length)
        ours = load_intern_repo_tokenized_dataset(str(tmp_path), min_length)
        assert [d.path for d in ours] == [d.path for d in xtuner]
        for a, b in zip(ours, xtuner):
            assert a.offsets.tolist() == b.offsets.tolist()
            assert a.length.tolist() == b.length.tolist()
            assert len(a) == len(b)
            for i in (0, len(a) // 2, -1):
                item = b[i]
                assert a[i] == {k: item[k] for k in ("input_ids", "labels", "length")}


def _xtuner_with_data_order(monkeypatch):
    """XTuner's loader as it runs with ``datasets`` < 4: ``["text"]`` was a list (with
    datasets 5 its data_order path fails: "'Column' object does not support item
    assignment")."""
    real = intern_repo.load_dataset
    monkeypatch.setattr(intern_repo, "load_dataset",
                        lambda *a, **k: {"text": list(real(*a, **k)["text"])})
    return intern_repo.load_intern_repo_tokenized_dataset


def test_data_order_file(tmp_path, monkeypatch):
    _nested_corpus(tmp_path / "data")
    root = str(tmp_path / "data")
    order = ["top.bin", "beta/y/part-000.bin", os.path.join(root, "mid/part-000.bin"),
             "zeta/b/part-000.bin"]
    path = tmp_path / "data_order.txt"
    path.write_text("\n".join(order) + "\n")
    xtuner = _xtuner_with_data_order(monkeypatch)(root, data_order_path=str(path))
    ours = load_intern_repo_tokenized_dataset(root, data_order_path=str(path))
    assert [d.path for d in ours] == [d.path for d in xtuner]
    assert [d.rel_path for d in ours] == ["top.bin", "beta/y/part-000.bin", "mid/part-000.bin",
                                          "zeta/b/part-000.bin"]
    # XTuner fails on blank lines (it joins "" to the folder); they are skipped with a warning.
    path.write_text("\n".join(order[:2]) + "\n\n" + "\r\n".join(order[2:]) + "\n\n")
    with pytest.warns(FtdpDataWarning, match=r"blank line\(s\) \[3, 6\]"):
        assert [d.path for d in load_intern_repo_tokenized_dataset(
            root, data_order_path=str(path))] == [d.path for d in xtuner]


def test_empty_files_are_skipped_with_a_warning(tmp_path):
    write_synthetic_corpus(str(tmp_path), {"a/empty": 0, "a/full": 10, "b/short": 3},
                           median_length=5, max_length=8)
    write_synthetic_corpus(str(tmp_path), {"b/long": 4}, median_length=200, max_length=300)
    xtuner = intern_repo.load_intern_repo_tokenized_dataset(str(tmp_path))
    with pytest.warns(FtdpDataWarning, match=r"1 file\(s\) with no samples \['a/empty.bin'\]"):
        ours = load_intern_repo_tokenized_dataset(str(tmp_path))
    assert [d.path for d in ours] == [d.path for d in xtuner]
    assert "a/empty.bin" not in [d.rel_path for d in ours]
    xtuner = intern_repo.load_intern_repo_tokenized_dataset(str(tmp_path), min_length=50)
    with pytest.warns(FtdpDataWarning, match="no sample of at least min_length=50"):
        ours = load_intern_repo_tokenized_dataset(str(tmp_path), min_length=50)
    assert [d.path for d in ours] == [d.path for d in xtuner]
    assert [d.rel_path for d in ours] == ["b/long.bin"]


@pytest.mark.parametrize("meta_dtype", ["int32", "int64"])
def test_write_ftdp_file_is_json_dumps(tmp_path, meta_dtype):
    samples = [[1, -2, 3], [], [0], [-92543, 92543, 7, 7, 7], [], [12]]
    tokens = np.array([t for s in samples for t in s])
    write_ftdp_file(str(tmp_path / "x.bin"), tokens, [len(s) for s in samples], meta_dtype)
    expected = b"".join((json.dumps({"tokens": s}) + "\n").encode() for s in samples)
    assert (tmp_path / "x.bin").read_bytes() == expected
    meta = np.load(str(tmp_path / "x.bin.meta"))
    assert meta.dtype == np.dtype(meta_dtype)
    starts = [0]
    for s in samples[:-1]:
        starts.append(starts[-1] + len(json.dumps({"tokens": s})) + 1)
    assert meta.tolist() == [[o, len(s)] for o, s in zip(starts, samples)]
    with pytest.raises(ValueError, match="sum to len"):
        write_ftdp_file(str(tmp_path / "y.bin"), tokens, [1, 2])


def test_read_samples_handles_every_json_spelling(tmp_path):
    """Compact JSON, extra keys, CRLF, spaces: the fast path or json.loads, same tokens."""
    samples = [[1, 2, 3], [-4, 5], [], [6], [0, -7, 8], [9, 10]]
    lines = [b'{"tokens":[1,2,3]}', b'{"tokens": [-4, 5], "id": "x]"}', b'{"tokens": []}',
             b'{"id": 3, "tokens": [6]}', b'{"tokens": [0, -7, 8]}\r', b' {"tokens" : [9,10] } ']
    path = str(tmp_path / "odd.bin")
    _write_lines(path, lines, [len(s) for s in samples])
    f = FtdpFile.load(path)
    assert read_samples(path, f.offsets, f.length).tolist() == sum(samples, [])
    order = [5, 0, 2, 3]
    assert read_samples(path, f.offsets[order], f.length[order]).tolist() == \
        sum([samples[i] for i in order], [])
    assert f[4] == {"input_ids": [0, 7, 8], "labels": [-100, -100, 8], "length": 3}
    assert f[-1]["input_ids"] == [9, 10]


def test_last_line_without_newline(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b'{"tokens": [1, 2]}\n{"tokens": [3, -4]}')
    with open(str(path) + ".meta", "wb") as f:
        np.save(f, np.array([[0, 2], [19, 2]]))
    f = FtdpFile.load(str(path))
    assert read_samples(f.path, f.offsets, f.length).tolist() == [1, 2, 3, -4]


def test_files_rewritten_in_place_are_reread(tmp_path):
    path = str(tmp_path / "x.bin")
    write_ftdp_file(path, np.array([1, 2, 3]), [3])
    assert FtdpFile.load(path)[0]["input_ids"] == [1, 2, 3]
    write_ftdp_file(path, np.array([4, 5, 6, 7, 8]), [5])
    assert FtdpFile.load(path)[0]["input_ids"] == [4, 5, 6, 7, 8]


# ---------------------------------------------------------------------------------------
# Bad input: clear errors naming the file and line, or XTuner's skip with a warning.


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_intern_repo_tokenized_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FtdpFormatError, match=r"no '\*\.bin' files under .*empty"):
        load_intern_repo_tokenized_dataset(str(tmp_path / "empty"))


def test_all_samples_under_min_length(tmp_path):
    write_synthetic_corpus(str(tmp_path), {"a/p": 20, "b/p": 10}, median_length=5, max_length=9)
    with pytest.warns(FtdpDataWarning), pytest.raises(
            FtdpFormatError, match="none of the 2 .* has a sample of at least min_length=10"):
        load_intern_repo_tokenized_dataset(str(tmp_path), min_length=10)


def test_missing_meta(tmp_path):
    write_synthetic_corpus(str(tmp_path), {"a/p0": 5, "a/p1": 5})
    os.remove(tmp_path / "a" / "p1.bin.meta")
    with pytest.raises(FileNotFoundError, match=r"a/p1\.bin\.meta not found"):
        load_intern_repo_tokenized_dataset(str(tmp_path))


@pytest.mark.parametrize("meta", [np.zeros((3,), np.int64), np.zeros((3, 2), np.float32),
                                  np.zeros((2, 1), np.int64)])
def test_meta_of_the_wrong_shape(tmp_path, meta):
    write_synthetic_corpus(str(tmp_path), {"p": 3})
    with open(tmp_path / "p.bin.meta", "wb") as f:
        np.save(f, meta)
    with pytest.raises(FtdpFormatError, match=r"p\.bin\.meta: expected an integer array"):
        FtdpFile.load(str(tmp_path / "p.bin"))
    (tmp_path / "p.bin.meta").write_bytes(b"garbage")
    with pytest.raises(FtdpFormatError, match=r"p\.bin\.meta: not a numpy"):
        FtdpFile.load(str(tmp_path / "p.bin"))


@pytest.mark.parametrize("meta_dtype", ["int32", "int64"])
def test_meta_rows_past_the_file(tmp_path, meta_dtype):
    path = str(tmp_path / "p.bin")
    _write_lines(path, [b'{"tokens": [1, 2]}', b'{"tokens": [3]}'], [2, 1], meta_dtype,
                 offsets=[0, 400])
    with pytest.raises(FtdpFormatError, match=r"p\.bin\.meta: row 1 \[offset 400, length 1\] "
                                              r"points outside .*p\.bin \(35 bytes\)"):
        FtdpFile.load(path)
    _write_lines(path, [b'{"tokens": [1, 2]}'], [-2], meta_dtype)
    with pytest.raises(FtdpFormatError, match="row 0"):
        FtdpFile.load(path)


BAD_LINES = [
    (b'{"tokens": [4, 5', "not a JSON line"),
    (b"this is not json", "not a JSON line"),
    (b'{"input_ids": [4, 5]}', 'no "tokens" list'),
    (b'[4, 5]', 'no "tokens" list'),
    (b'{"tokens": [4, 5.5]}', '"tokens" holds non-integers'),
    (b'{"tokens": [4, 5, 6]}', "the line has 3 tokens but .*meta says 2"),
    (b'{"tokens": [4]}', "the line has 1 tokens but .*meta says 2"),
    (b'{"tokens": [4, ]}', "not a JSON line"),
    (b'{"tokens": [4, -]}', "not a JSON line"),
    (b'{"tokens": [ , 4]}', "not a JSON line"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_bad_lines_are_reported_when_read(tmp_path, line, message):
    path = str(tmp_path / "bad.bin")
    good = b'{"tokens": [1, 2]}'
    _write_lines(path, [good, good, line, good], [2, 2, 2, 2])
    f = FtdpFile.load(path)  # lazily: loading checks the meta only
    assert f[0]["input_ids"] == [1, 2] and f[3]["input_ids"] == [1, 2]
    with pytest.raises(FtdpFormatError,
                       match=rf"bad\.bin:3 \(byte offset 38, meta row 2\): {message}"):
        f[2]
    with pytest.raises(FtdpFormatError, match=r"bad\.bin:3 "):
        read_samples(path, f.offsets, f.length)


def test_token_count_mismatch_that_keeps_the_total(tmp_path):
    """Two lines off by +1 and -1 in the same read: caught per line, not by the total."""
    path = str(tmp_path / "bad.bin")
    _write_lines(path, [b'{"tokens": [1, 2, 3]}', b'{"tokens": [4]}'], [2, 2])
    f = FtdpFile.load(path)
    with pytest.raises(FtdpFormatError, match=r"bad\.bin:1 .*3 tokens but .*says 2"):
        read_samples(path, f.offsets, f.length)


def test_data_order_naming_a_missing_file(tmp_path):
    write_synthetic_corpus(str(tmp_path / "d"), {"a/p": 5})
    order = tmp_path / "order.txt"
    order.write_text("a/p.bin\na/gone.bin\n")
    with pytest.raises(FileNotFoundError, match=r"order\.txt:2: .*a/gone\.bin does not exist"):
        load_intern_repo_tokenized_dataset(str(tmp_path / "d"), data_order_path=str(order))
    with pytest.raises(FileNotFoundError, match="data_order_path .* does not exist"):
        load_intern_repo_tokenized_dataset(str(tmp_path / "d"),
                                           data_order_path=str(tmp_path / "none.txt"))


@pytest.mark.parametrize("chunk", [16, 64, 1 << 18])
def test_lines_longer_than_a_chunk(tmp_path, monkeypatch, chunk):
    """The build reads the file in chunks: a line longer than one (read whole, in a larger
    chunk) and lines cut by a chunk's end (read again with the next) parse alike."""
    from xtuner_patch.dataset.index import ensure_index, open_index

    monkeypatch.setattr(ftdp, "CHUNK_BYTES", chunk)
    samples = [[1, 2], list(range(3, 40)), [-5], [], list(range(-90, 90)), [7, 8, 9]]
    lines = [json.dumps({"tokens": s}).encode() for s in samples]
    path = str(tmp_path / "long.bin")
    _write_lines(path, lines, [len(s) for s in samples])
    index = open_index(ensure_index(path, str(tmp_path / "index")))
    assert index.tolist() == sum(samples, [])
