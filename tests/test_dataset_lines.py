"""Parsing ftdp lines: every valid line shape gives XTuner's packs on the vectorised path,
odd but valid lines json's tokens, and every malformed line an error naming file and line,
at build time."""

import json

import numpy as np
import pytest

from xtuner_patch.dataset import (FtdpFile, FtdpFormatError, build_packed_dataset,
                                  load_intern_repo_tokenized_dataset, read_samples)
from xtuner_patch.dataset import ftdp
from xtuner_patch.dataset import lines as readers
from xtuner_patch.fixtures.ftdp import LINE_SHAPES, rewrite_lines, write_synthetic_corpus

intern_repo = pytest.importorskip("xtuner.dataset.intern_repo")
pytestmark = pytest.mark.filterwarnings("ignore::xtuner_patch.dataset.FtdpDataWarning")

FILES = {"cn/p0": (70, "int32"), "en/p0": 90, "en/p1": (40, "int32")}


def _shaped_corpus(root, shape):
    summary = write_synthetic_corpus(str(root), FILES, seed=8, median_length=30, max_length=300,
                                     long_length=700, zero_length=0.1, zero_token=0.03)
    for path in summary["files"]:
        rewrite_lines(path, shape)
    return str(root)


@pytest.fixture(params=["shipped", "simdjson-only"])
def reader(request, monkeypatch):
    """Which fast reader takes which line: plain lines the scanner and the others simdjson
    (as shipped), or every line simdjson."""
    if request.param == "simdjson-only":
        plain_frames = readers._plain_frames

        def nothing_plain(buf, s, e):
            a, b, plain = plain_frames(buf, s, e)
            return a, b, np.zeros_like(plain)

        monkeypatch.setattr(readers, "_plain_frames", nothing_plain)
    return request.param


def _no_exact_reads(monkeypatch):
    def refuse(line, expected):
        raise AssertionError(f"a valid line took the exact path: {line[:80]!r}")
    monkeypatch.setattr(ftdp, "parse_line_exact", refuse)


@pytest.mark.parametrize("shape", sorted(LINE_SHAPES))
@pytest.mark.parametrize("packed_length", [64, 300])
def test_every_line_shape_packs_as_xtuner_on_the_fast_path(tmp_path, monkeypatch, shape,
                                                          packed_length, reader):
    from tests.test_dataset_packing import _assert_same_packs

    folder = _shaped_corpus(tmp_path / shape, shape)
    xtuner = intern_repo.build_packed_dataset(
        dict(type=intern_repo.load_intern_repo_tokenized_dataset, folder=folder),
        packed_length=packed_length)
    _no_exact_reads(monkeypatch)
    for cache_dir in (str(tmp_path / "index"), False):  # from the index, and parsed per pack
        ours = build_packed_dataset(load_intern_repo_tokenized_dataset(folder), packed_length,
                                    cache_dir=cache_dir)
        _assert_same_packs(ours, xtuner)


@pytest.mark.parametrize("shape", sorted(LINE_SHAPES))
def test_plain_lines_take_the_scanner_and_others_simdjson(tmp_path, monkeypatch, shape):
    folder = _shaped_corpus(tmp_path / shape, shape)
    seen = []
    read_with_simdjson = readers._read_with_simdjson

    def spy(buf, s, e, n, tokens, place):
        seen.extend(n.tolist())
        return read_with_simdjson(buf, s, e, n, tokens, place)

    monkeypatch.setattr(readers, "_read_with_simdjson", spy)
    build_packed_dataset(load_intern_repo_tokenized_dataset(folder), 64,
                         cache_dir=str(tmp_path / "index"))
    samples = sum(n if isinstance(n, int) else n[0] for n in FILES.values())
    assert len(seen) == (0 if shape in ("dumps", "compact") else samples)


def _write_lines(path, lines, lengths):
    data = b"".join(line + b"\n" for line in lines)
    offsets = np.cumsum([0] + [len(line) + 1 for line in lines])[:-1]
    with open(path, "wb") as f:
        f.write(data)
    with open(path + ".meta", "wb") as f:
        np.save(f, np.stack([offsets, lengths], 1))


ODD_VALID = [
    b'{"tokens": [ ]}', b'{"tokens":[-0]}', b'{"tokens": [2147483647, -2147483647]}',
    b'{"tokens": [1, 2], "tokens2": [3]}', b'{"m": {"tokens": [9]}, "tokens": [1, 2]}',
    b'{"\\u0074okens": [5, 6]}', b'{"tokens": [7], "tokens": [8, 9]}',
    b'{"t": "\\u00e9\\"]", "tokens": [1]}', '{"t": "\u00e9\u4e2d", "tokens": [4]}'.encode(),
    b'\t{"tokens": [3]}  ', b'{"tokens": [1\t,\r2]}', b'{"tokens": [123456789, -1234567890]}',
    # Duplicated keys of one length (json.loads keeps the last), JSON that simdjson refuses
    # and json.loads reads (an infinite float, a lone surrogate): the exact reader's.
    b'{"tokens": [7, 1], "tokens": [8, 9]}', b'{"tok\\u0065ns": [3, 4], "tokens": [5, 6]}',
    b'{"tokens": [1], "x": 1e999}', b'{"t": "\\ud800", "tokens": [2]}',
]


def test_odd_valid_lines_read_as_json_reads_them(tmp_path, reader):
    path = str(tmp_path / "odd.bin")
    expected = [json.loads(line)["tokens"] for line in ODD_VALID]
    _write_lines(path, ODD_VALID, [len(t) for t in expected])
    f = FtdpFile.load(path)
    assert read_samples(path, f.offsets, f.length).tolist() == sum(expected, [])
    from xtuner_patch.dataset.index import ensure_index, open_index

    index = open_index(ensure_index(path, str(tmp_path / "index")))
    assert index.tolist() == sum(expected, [])


# Valid lines the vectorised path must take itself (no json.loads): every number width up to
# int32's 10 digits, both signs, 0 and -0, JSON whitespace of every kind around every token,
# keys before, after and between, nested values and brackets inside strings.
FAST_VALID = [
    b'{"tokens": [1, 12, 123, 1234, 12345, 123456, 1234567, 12345678]}',
    b'{"tokens": [-1, -12, -123, -1234, -12345, -123456, -1234567, -12345678]}',
    b'{"tokens": [99999999, 100000000, -100000000, 999999999, -999999999]}',
    b'{"tokens": [1000000000, -1000000000, 2147483647, -2147483647, 1999999999]}',
    b'{"tokens": [0, -0, 10, 0, 100000000, 0]}',
    b'{"tokens":[7,-8,9]}',
    b'{ "tokens" :\t[ 1 ,\t-2 ,3\r, 4 ] } \r',
    b'{"tokens": [\t5,6\t]}',
    b'{"a": 1, "tokens": [11, -12]}',
    b'{"tokens": [13], "a": {"b": [1, 2]}, "c": "]"}',
    b'{"a": [1, {"x": "tokens"}], "tokens": [-14, 15], "z": -1.5e3}',
    b'{"id": "a \\"tokens\\": [1]", "tokens": [16]}',
    b'{"tokens": []}',
    b'{"x": null, "tokens": [ ], "y": true}',
]


def test_valid_lines_take_the_fast_path(tmp_path, monkeypatch, reader):
    path = str(tmp_path / "fast.bin")
    expected = [json.loads(line)["tokens"] for line in FAST_VALID]
    _write_lines(path, FAST_VALID, [len(t) for t in expected])
    _no_exact_reads(monkeypatch)
    f = FtdpFile.load(path)
    assert read_samples(path, f.offsets, f.length).tolist() == sum(expected, [])
    order = np.arange(len(FAST_VALID))[::-1]  # scattered lines: the gathering scan
    assert read_samples(path, f.offsets[order], f.length[order]).tolist() == \
        sum([expected[i] for i in order], [])
    from xtuner_patch.dataset.index import ensure_index, open_index

    assert open_index(ensure_index(path, str(tmp_path / "index"))).tolist() == sum(expected, [])


BAD = [
    (b'{"tokens": [4, 5', "not a JSON line"),
    (b'{"tokens": [4 5]}', "not a JSON line"),
    (b'{"tokens": [4,, 5]}', "not a JSON line"),
    (b'{"tokens": [4, 5,]}', "not a JSON line"),
    (b'{"tokens": [, 4, 5]}', "not a JSON line"),
    (b'{"tokens": [04, 5]}', "not a JSON line"),
    (b'{"tokens": [4, - 5]}', "not a JSON line"),
    (b'{"tokens": [4, --5]}', "not a JSON line"),
    (b'{"tokens": [4, 5-]}', "not a JSON line"),
    (b'{"tokens": [4, 5]} x', "not a JSON line"),
    (b'{"tokens": [4, 5]}}', "not a JSON line"),
    (b'{"tokens": [4, 5], "id": }', "not a JSON line"),
    (b'{"tokens": [4, 5], "t": "\xff"}', "not a JSON line"),
    (b'{"tokens": [4, 5]', "not a JSON line"),
    (b'{"tokens": [4, 5.0]}', '"tokens" holds non-integers'),
    (b'{"tokens": [4, 5e0]}', '"tokens" holds non-integers'),
    (b'{"tokens": [4, true]}', '"tokens" holds non-integers'),
    (b'{"tokens": [4, "5"]}', '"tokens" holds non-integers'),
    (b'{"tokens": [4, 2147483648]}', '"tokens" holds ids beyond int32'),
    (b'{"tokens": [4, -2147483648]}', '"tokens" holds ids beyond int32'),
    (b'{"tokens": [4, 9999999999]}', '"tokens" holds ids beyond int32'),
    (b'{"tokens": [4, 12345678901]}', '"tokens" holds ids beyond int32'),
    (b'{"tokens": [4, 012345678]}', "not a JSON line"),
    (b'{"tokens": [4, -0123456789]}', "not a JSON line"),
    (b'{"tokens": [4, 00]}', "not a JSON line"),
    (b'{"a": {"tokens": [4, 5]}}', 'no "tokens" list'),
    (b'[{"tokens": [4, 5]}]', 'no "tokens" list'),
    (b'{"tokens": "4, 5"}', 'no "tokens" list'),
    (b'{"tokens": [4, 5, 6]}', "the line has 3 tokens but the meta says 2"),
    (b'{"tokens": [4], "tokens": [4, 5, 6]}', "the line has 3 tokens but the meta says 2"),
]


@pytest.mark.parametrize("line, message", BAD)
def test_bad_line_fails_the_build_naming_file_and_line(tmp_path, line, message, reader):
    (tmp_path / "d").mkdir()
    path = str(tmp_path / "d" / "bad.bin")
    good = b'{"id": 1, "tokens": [1, 2]}'
    _write_lines(path, [b'{"tokens": [1, 2]}', good, line, good] * 3, [2] * 12)
    with pytest.raises(FtdpFormatError, match=rf"bad\.bin:3 \(byte offset 47, meta row 2\): "
                                              rf"{message}"):
        build_packed_dataset(load_intern_repo_tokenized_dataset(str(tmp_path / "d")), 4,
                             cache_dir=str(tmp_path / "index"))
    with pytest.raises(FtdpFormatError, match=r"bad\.bin:3 "):
        build_packed_dataset(load_intern_repo_tokenized_dataset(str(tmp_path / "d")), 4,
                             cache_dir=False)
    assert not (tmp_path / "index").exists() or not list((tmp_path / "index").iterdir())


@pytest.mark.parametrize("cut", ["mid-line", "line boundary"])
def test_truncated_bin_names_the_cut_row(tmp_path, cut):
    path = str(tmp_path / "t.bin")
    lines = [b'{"tokens": [%d, 2, 3]}' % i for i in range(10, 16)]
    _write_lines(path, lines, [3] * 6)
    data = open(path, "rb").read()
    keep = data.index(lines[3]) + (9 if cut == "mid-line" else 0)
    open(path, "wb").write(data[:keep])
    if cut == "mid-line":
        message = (r"row 4 \[.*2 bad row\(s\) in all; .*t\.bin is truncated: meta row 3's "
                   r"line \(.*t\.bin:4\) is cut 9 bytes after its start")
    else:
        message = (r"row 3 \[.*3 bad row\(s\) in all; .*t\.bin ends after a complete line: "
                   r"truncated at a line boundary, after line 3 \(meta row 2\)")
    with pytest.raises(FtdpFormatError, match=message):
        FtdpFile.load(path)
