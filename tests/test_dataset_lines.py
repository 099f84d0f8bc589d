"""Parsing ftdp lines: every valid line shape gives XTuner's packs on the fast path,
odd but valid lines json's tokens, and every malformed line an error naming file and line,
at build time."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from xtuner_patch.dataset import (FtdpDataWarning, FtdpFile, FtdpFormatError,
                                  build_packed_dataset, load_intern_repo_tokenized_dataset,
                                  read_samples)
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


def _without_compiled_reader(monkeypatch, warned=True):
    """As where the C extension did not build (``warned``: its warning already given)."""
    monkeypatch.setattr(readers, "_compiled_scan", None)
    monkeypatch.setattr(ftdp, "_uncompiled_warned", warned)


@pytest.fixture(params=["compiled", "numpy+simdjson", "simdjson-only"])
def reader(request, monkeypatch):
    """Which fast reader takes which line: the compiled one for every line (as shipped;
    the Makefile builds it), or without it (an install with no C compiler) the numpy
    scanner for plain lines and simdjson for the others, or simdjson for every line."""
    if request.param == "compiled":
        assert readers.UNCOMPILED_REASON is None, \
            f"the compiled reader is not built ({readers.UNCOMPILED_REASON}): run `make venv`"
        return request.param
    _without_compiled_reader(monkeypatch)
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
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "uncompiled"])
def test_which_reader_takes_which_line(tmp_path, monkeypatch, shape, compiled):
    """The compiled reader takes every line; without it, plain lines take the scanner and
    the others simdjson, each once."""
    folder = _shaped_corpus(tmp_path / shape, shape)
    if not compiled:
        _without_compiled_reader(monkeypatch)
    seen = []
    read_with_simdjson = readers._read_with_simdjson

    def spy(buf, s, e, n, tokens, place):
        seen.extend(n.tolist())
        return read_with_simdjson(buf, s, e, n, tokens, place)

    monkeypatch.setattr(readers, "_read_with_simdjson", spy)
    build_packed_dataset(load_intern_repo_tokenized_dataset(folder), 64,
                         cache_dir=str(tmp_path / "index"))
    samples = sum(n if isinstance(n, int) else n[0] for n in FILES.values())
    simdjson_lines = 0 if compiled or shape in ("dumps", "compact") else samples
    assert len(seen) == simdjson_lines


def test_the_installed_package_has_the_compiled_reader(tmp_path):
    """What `xtuner train` imports (the installed copy, not this checkout) has it too."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", "import xtuner_patch.dataset.lines as m; "
         "print(m.__file__, m.UNCOMPILED_REASON)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "None", proc.stdout


def test_without_the_compiled_reader_one_warning(tmp_path, monkeypatch):
    folder = _shaped_corpus(tmp_path / "c", "key_after")
    _without_compiled_reader(monkeypatch, warned=False)
    with pytest.warns(FtdpDataWarning) as caught:
        for cache_dir in (str(tmp_path / "index"), False):
            build_packed_dataset(load_intern_repo_tokenized_dataset(folder), 64,
                                 cache_dir=cache_dir)
    messages = [str(w.message) for w in caught if "compiled reader" in str(w.message)]
    assert len(messages) == 1 and "C compiler" in messages[0], messages


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
    # What the compiled reader leaves to json.loads: NaN and the infinities, numbers of
    # 4000+ characters (json.loads reads a long float, refuses an int of 4300+ digits).
    b'{"x": NaN, "tokens": [3]}', b'{"tokens": [4], "x": [Infinity, -Infinity]}',
    b'{"x": 1.' + b"5" * 4100 + b', "tokens": [5]}',
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
    '{"text": "中文 \\n \\"x\\" \\u00e9 😀", "tokens": [1, 2]}'.encode(),
    b'{"tokens": [1], "n": [[[{"a": [true, false, null, {}, []]}]]], "f": -0.5E-3, "g": 0e+1}',
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
    (b'{"tokens": [4, 5], "t": "\x01"}', "not a JSON line"),  # a raw control character
    (b'{"tokens": [4, 5], "t": "\\x"}', "not a JSON line"),
    (b'{"tokens": [4, 5], "t": "\\u12"}', "not a JSON line"),
    (b'{"tokens": [4, 5], "t": "\xc0\xaf"}', "not a JSON line"),  # overlong UTF-8
    (b'{"tokens": [4, 5], "t": "\xed\xa0\x80"}', "not a JSON line"),  # a UTF-8 surrogate
    (b'{"tokens": [4, 5], "t": "\xf4\x90\x80\x80"}', "not a JSON line"),  # > U+10FFFF
    (b'{"tokens": [4, 5], "x": 1' + b"0" * 4400 + b"}", "not a JSON line"),
    (b'{"tokens": [4, 5], "x": 1.}', "not a JSON line"),
    (b'{"tokens": [4, 5], "x": .5}', "not a JSON line"),
    (b'{"tokens": [4, 5], "x": tru}', "not a JSON line"),
    (b'{"tokens": [4, 5], "x": [1, 2}', "not a JSON line"),
    (b'{"tokens": [4, 5], "x": {"a" 1}}', "not a JSON line"),
    (b'{"tokens": [4, 5], 7: 1}', "not a JSON line"),
    (b'\xef\xbb\xbf{"tokens": [4, 5]}', "not a JSON line"),  # a byte-order mark
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


def _random_value(rng, depth=0):
    kind = rng.integers(0, 8 if depth < 3 else 5)
    if kind == 0:
        return int(rng.integers(-10**12, 10**12))
    if kind == 1:
        return float(rng.normal() * 10.0 ** rng.integers(-30, 30))
    if kind == 2:
        return [None, True, False][rng.integers(0, 3)]
    if kind in (3, 4):
        alphabet = 'ab "\\/\b\f\n\r\t\x01]}{[,:' + "\u00e9\u4e2d\U0001f600\ud800tokens"
        return "".join(rng.choice(list(alphabet), size=rng.integers(0, 12)))
    if kind in (5, 6):
        return [_random_value(rng, depth + 1) for _ in range(rng.integers(0, 4))]
    return {_random_value(rng, 3) if rng.random() < 0.5 else "k": _random_value(rng, depth + 1)
            for _ in range(rng.integers(0, 4))}


def _random_line(rng) -> tuple:
    """A valid ftdp line (random other keys and values, key order, spacing, escaping)
    and its token count."""
    bound = [10, 100000, 2**31 - 1][rng.integers(0, 3)]
    tokens = rng.integers(-bound, bound + 1, size=rng.integers(0, 30)).tolist()
    others = {f"k{i}{_random_value(rng, 3) if rng.random() < 0.3 else ''}": _random_value(rng)
              for i in range(rng.integers(0, 4))}
    items = list(others.items())
    items.insert(int(rng.integers(0, len(items) + 1)), ("tokens", tokens))
    spacing = [(", ", ": "), (",", ":"), (" ,\t", " :\r "), (",\t", "\t:\t")][rng.integers(0, 4)]
    text = json.dumps(dict(items), separators=spacing, ensure_ascii=False)
    if rng.random() < 0.5 or "\ud800" in text:  # a lone surrogate is valid only escaped
        text = json.dumps(dict(items), separators=spacing)
    if rng.random() < 0.2:
        text = " \t" + text + " \r"
    return text.encode(), len(tokens)


def _mutated(rng, line: bytes) -> bytes:
    """``line`` with one byte deleted, replaced or inserted; the bytes that matter to JSON."""
    pick = b'"{}[],:-+.0123456789eE \t\\u/x\x00\x1f\x7f\xc3\xa9\xed\xa0\xf4\x90\xff'
    at = int(rng.integers(0, len(line) + 1))
    byte = bytes([pick[rng.integers(0, len(pick))]])
    how = rng.integers(0, 3)
    if how == 0:
        return line[:at] + line[at + 1:]
    if how == 1:
        return line[:at] + byte + line[at + 1:]
    return line[:at] + byte + line[at:]


def _fast_scan(lines, counts):
    """The fast readers straight on ``lines``: each line's tokens, or None where they
    leave the line to json.loads."""
    pad = bytes([ftdp._FILLER]) * readers.PAD
    buf = np.frombuffer(pad + b"\n".join(lines) + b"\n" + pad, dtype=np.uint8)
    sizes = np.array([len(line) for line in lines], dtype=np.int64)
    starts = np.cumsum(sizes + 1) - (sizes + 1) + readers.PAD
    counts = np.array(counts, dtype=np.int64)
    tokens, exact = readers.scan_lines(buf, starts, starts + sizes, counts)
    place = np.cumsum(counts) - counts
    read = np.ones(len(lines), dtype=bool)
    read[exact] = False
    return [tokens[p:p + c].tolist() if ok else None for p, c, ok in zip(place, counts, read)]


def _json_reads(line: bytes, expected: int):
    try:
        return readers.parse_line_exact(line, expected).tolist()
    except ValueError:
        return None


def test_fast_readers_vouch_only_for_what_json_reads_alike(reader):
    """Random valid lines and one-byte mutations of them: where a fast reader takes a
    line, json.loads reads it too, with the same tokens (and the meta's count).  The
    compiled reader takes every valid line generated (no NaN, no duplicated "tokens" key)."""
    rng = np.random.default_rng(19)
    valid = [_random_line(rng) for _ in range(1500)]
    lines = [line for line, _ in valid]
    counts = [count for _, count in valid]
    read = _fast_scan(lines, counts)
    json_read = [_json_reads(line, count) for line, count in valid]
    assert [got for got in read if got is not None] == \
        [tokens for got, tokens in zip(read, json_read) if got is not None]
    missed = [line for line, got in zip(lines, read) if got is None]
    if reader == "compiled":  # simdjson leaves lone surrogates (escaped) to json.loads
        assert not missed, missed[:3]

    mutants, mutant_counts = [], []
    for line, count in valid:
        for _ in range(12):
            mutants.append(_mutated(rng, line))
            mutant_counts.append(count)
    read = _fast_scan(mutants, mutant_counts)
    taken = 0
    for line, count, got in zip(mutants, mutant_counts, read):
        if got is not None:
            taken += 1
            assert got == _json_reads(line, count), line
    refused = sum(_json_reads(line, count) is None for line, count in zip(mutants, mutant_counts))
    assert taken > len(mutants) // 4 and refused > len(mutants) // 4, (taken, refused)


def test_compiled_reader_names_bad_arguments():
    scan = readers._compiled_scan
    buf = np.frombuffer(b'{"tokens": [1, 2]}', dtype=np.uint8)
    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    out, read = np.empty(2, np.int32), np.empty(1, bool)
    scan(buf, i64(0), i64(len(buf)), i64(2), out, read)
    assert read.tolist() == [True] and out.tolist() == [1, 2]
    with pytest.raises(TypeError, match="starts must hold 8-byte items"):
        scan(buf, np.array([0], np.int32), i64(len(buf)), i64(2), out, read)
    with pytest.raises(TypeError, match="tokens must hold 4-byte items"):
        scan(buf, i64(0), i64(len(buf)), i64(2), np.empty(2, np.int64), read)
    with pytest.raises(ValueError, match=r"line 0 spans \[0, 99\).*outside the 18-byte buffer"):
        scan(buf, i64(0), i64(99), i64(2), out, read)
    with pytest.raises(ValueError, match="tokens holds 2 items, the counts add up to 3"):
        scan(buf, i64(0), i64(len(buf)), i64(3), out, read)
    with pytest.raises(ValueError, match="one item per line"):
        scan(buf, i64(0, 0), i64(len(buf), 0), i64(2, 0), out, read)
    with pytest.raises((BufferError, ValueError), match="read-only"):
        scan(buf, i64(0), i64(len(buf)), i64(2), out, np.frombuffer(b"\x00", dtype=bool))
