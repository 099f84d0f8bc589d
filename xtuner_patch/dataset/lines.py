"""Parsing ftdp JSON lines into token arrays: the fast readers and the exact one.

:func:`scan_lines` reads many lines at once, whatever their shape:

- with the compiled reader (``_ftdp_lines.c``, built at install): one strict C parse per
  line, a few nanoseconds per token, for every line shape (other keys in any order, any
  JSON whitespace);
- without it (no C compiler at install; a warning says so), by two slower readers: plain
  lines, ``{"tokens": [...]}`` as ``json.dumps`` or compact separators write them
  (InternEvo's tokenizer writes these), through a vectorised numpy scanner (a few numpy
  calls for all the lines of a chunk), any other shape through ``simdjson`` (one C++
  parse per line and one copy of its ``tokens`` list).

All take negative ids and empty lists.  What no fast reader vouches for goes to
:func:`parse_line_exact` (``json.loads``), the authority: it returns the tokens of an odd
but valid line (``1e999`` or ``NaN`` in another key, a duplicated ``tokens`` key, a lone
surrogate escape) or raises naming what is wrong.

Valid means what XTuner's ``JsonlDataset`` reads without error, with two stricter rules:
every token is a JSON integer (not a float or a boolean) in int32 range, and the list
holds as many tokens as the meta says.
"""

import json
from typing import Optional, Tuple

import numpy as np
import simdjson

try:
    from ._ftdp_lines import scan as _compiled_scan
    #: Why the compiled reader is missing (None when it is there).
    UNCOMPILED_REASON = None
except ImportError as exc:  # built without a C compiler: see setup.py
    _compiled_scan = None
    UNCOMPILED_REASON = f"{type(exc).__name__}: {exc}"

__all__ = ["PAD", "TOKEN_DTYPE", "UNCOMPILED_REASON", "concat_ranges", "has_compiled_reader",
           "parse_line_exact", "scan_lines"]

TOKEN_DTYPE = np.dtype(np.int32)
_INT32_MAX = 2**31 - 1

# Bytes the scanner's buffer must have before the first line and after the last, neither
# digits nor whitespace: its 8-byte loads reach that far past a line's ends.
PAD = 16

_SPACE, _TAB, _CR = 32, 9, 13
_COMMA, _MINUS = 44, 45

# What simdjson raises on a line it will not read as asked: malformed JSON or UTF-8
# (ValueError), a number beyond 64 bits (RuntimeError), no "tokens" key (KeyError), a
# document or element of another type (TypeError).
_REFUSED = (ValueError, RuntimeError, KeyError, TypeError)
_BOM = b"\xef\xbb\xbf"


def _word(text: bytes) -> np.uint64:
    return np.uint64(int.from_bytes(text, "little"))


_HEAD = _word(b'{"tokens')  # the first 8 bytes of a plain line

# SWAR digit conversion: the 8 bytes ending at a number's last digit, the bytes before its
# first digit cleared, become its value in three multiply-shift rounds.
_DIGIT_MASK = np.array([0] + [(0x0F0F0F0F0F0F0F0F >> (8 * (8 - k))) << (8 * (8 - k))
                              for k in range(1, 9)], dtype=np.uint64)


class _Words:
    """Little-endian uint64 loads at any byte offset of ``buf`` (below ``len - 15``).

    numpy gathers unaligned 8-byte items several times slower than aligned ones, so the
    buffer is copied eight times, shifted by 0..7 bytes: a load is one aligned gather.
    """

    def __init__(self, buf: np.ndarray):
        words = (len(buf) - 8) // 8
        self.words = words
        self.table = np.empty((8, words), dtype="<u8")
        as_bytes = self.table.view(np.uint8)
        for shift in range(8):
            as_bytes[shift] = buf[shift:shift + 8 * words]
        self.flat = self.table.ravel()

    def __call__(self, pos: np.ndarray) -> np.ndarray:
        return self.flat[(pos & 7) * self.words + (pos >> 3)]


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for every pair (int64)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    shift = np.asarray(starts, dtype=np.int64) - (np.cumsum(lengths) - lengths)
    return np.repeat(shift, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def _is_space(buf: np.ndarray, pos: np.ndarray) -> np.ndarray:
    c = buf[pos]
    return (c == _SPACE) | (c == _TAB) | (c == _CR)


def _skip_space(buf: np.ndarray, pos: np.ndarray, step: int) -> np.ndarray:
    """``pos`` moved by ``step`` (+1 or -1) past JSON whitespace; the padding stops it."""
    pos = pos.copy()
    at = np.flatnonzero(_is_space(buf, pos))
    while len(at):
        pos[at] += step
        at = at[_is_space(buf, pos[at])]
    return pos


def _plain_frames(buf, s, e):
    """For lines ``buf[s:e]``: positions of ``[`` and ``]`` where the line is exactly
    ``{"tokens": [...]}`` or ``{"tokens":[...]}`` (a ``\\r`` may end it), and ``plain``
    saying which lines are.  Gathers of a few bytes per line: no pass over the buffer."""
    head = buf[s[:, None] + np.arange(16)].view("<u8")  # [L, 2] little-endian words
    opening = head[:, 1] & np.uint64(0xFFFFFFFF)
    wide = opening == _word(b'": [')
    tight = (opening & np.uint64(0xFFFFFF)) == _word(b'":[')
    cr = buf[e - 1] == _CR
    b = e - np.where(cr, 3, 2)
    closed = (buf[b] == ord("]")) & (buf[b + 1] == ord("}"))
    a = s + np.where(wide, 11, 10)
    return a, b, (head[:, 0] == _HEAD) & (wide | tight) & closed & (a < b)


def _gap_ok(buf, gap_start, gap_end):
    """Per gap ``buf[gap_start:gap_end]`` between two numbers of a list: JSON whitespace,
    one comma, then whitespace (the next number's minus sign is not part of the gap)."""
    idx = concat_ranges(gap_start, gap_end - gap_start)
    which = np.repeat(np.arange(len(gap_start)), gap_end - gap_start)
    c = buf[idx]
    comma = c == _COMMA
    other = ~(comma | (c == _SPACE) | (c == _TAB) | (c == _CR))
    commas = np.bincount(which[comma], minlength=len(gap_start))
    others = np.bincount(which[other], minlength=len(gap_start))
    return (commas == 1) & (others == 0)


def _owner(first, n, runs, inner=False):
    """``(line, inside)``: for digit runs ``runs``, the line whose list holds them
    (``inner``: and a later run of it follows) and which runs are in a list at all."""
    line = np.searchsorted(first, runs, side="right") - 1
    room = first[np.maximum(line, 0)] + n[np.maximum(line, 0)] - (1 if inner else 0)
    inside = (line >= 0) & (runs < room)
    return line, inside


def _scan_numbers(buf, load, a, b, n):
    """Parse the lists ``buf[a + 1:b]`` (``n`` tokens expected in each).

    Returns ``(values, first, good)``: int64 ``[R]`` the value of every digit run of the
    buffer (negated where a minus precedes it), int64 ``[L]`` the index of each line's
    first run, and bool ``[L]`` whether each line's list held exactly its ``n`` valid JSON
    integers, each within int32 (``|id| < 2**31``), which are then
    ``values[first:first + n]``.
    """
    digit = np.subtract(buf, 48, dtype=np.uint8) < 10
    edges = np.flatnonzero(digit[1:] != digit[:-1])
    # The padding is not a digit, so edges pair up: the byte before each run, its last digit.
    # (A run starts at ``before + 1``, computed only where needed: one pass fewer.)
    before, ends = edges[0::2], edges[1::2]
    first = np.searchsorted(before, a)
    good = np.searchsorted(before, b) - first == n
    empty = n == 0
    good[empty] &= _skip_space(buf, a[empty] + 1, 1) == b[empty]
    if not len(before):
        return np.zeros(0, np.int64), first, good
    # Byte gathers through shifted views of buf: no index arithmetic per run.
    next1, next2 = buf[1:], buf[2:]
    size = ends - before
    value = load(ends - 7) & _DIGIT_MASK[np.minimum(size, 8)]
    value *= np.uint64(2561)
    value >>= np.uint64(8)
    value &= np.uint64(0x00FF00FF00FF00FF)
    value *= np.uint64(6553601)
    value >>= np.uint64(16)
    value &= np.uint64(0x0000FFFF0000FFFF)
    value *= np.uint64(42949672960001)
    value >>= np.uint64(32)
    negative = buf[before] == _MINUS

    # Between runs i and i + 1 of a list: "," or ", ", then maybe the next one's "-".
    # The gap's length less that minus, less 1, as uint64: 0 for ",", 1 for ", ", huge for
    # nothing; its bytes are checked at ends + 1 and ends + 2.  Anything else (other
    # spacing, or not JSON) is checked byte by byte below.
    gap_less_one = before[1:] - ends[:-1] - 1 - negative[1:]
    fine = (next1[ends[:-1]] == _COMMA) & \
        (gap_less_one.view(np.uint64) <= (next2[ends[:-1]] == _SPACE))

    lines = np.flatnonzero(~empty)
    head = np.minimum(first[lines], len(before) - 1)
    last = np.minimum(first[lines] + n[lines] - 1, len(before) - 1)
    # A list's first number follows its "[" (whitespace and a minus allowed between),
    # its last one precedes "]" (whitespace allowed).
    opening = _skip_space(buf, a[lines] + 1, 1)
    sign = buf[opening] == _MINUS
    good[lines] &= (before[head] + 1 == opening + sign) & \
        (ends[last] == _skip_space(buf, b[lines] - 1, -1))

    # Runs of more than 8 digits (beyond one 8-byte load) and leading zeros: "0" is the
    # one common run that starts with a zero, so those are few.
    zeros = np.flatnonzero(next1[before] == 48)
    odd = np.union1d(zeros[size[zeros] > 1], np.flatnonzero(size > 8))
    if len(odd):
        wide, ok = _wide_values(buf, before[odd] + 1, size[odd], value[odd])
        value[odd] = wide
        line, inside = _owner(first, n, odd[~ok])
        good[line[inside]] = False
    suspect = np.flatnonzero(~fine)
    line, inside = _owner(first, n, suspect, inner=True)
    inside &= good[line]  # lines not failed already
    suspect, line = suspect[inside], line[inside]
    if len(suspect):
        # Other spacing ("1 ,2", tabs): check those gaps byte by byte.
        follow = suspect + 1
        ok = _gap_ok(buf, ends[suspect] + 1, before[follow] + 1 - negative[follow])
        good[line[~ok]] = False
    signed = value.view(np.int64)
    np.negative(signed, out=signed, where=negative)
    return signed, first, good


def _wide_values(buf, starts, size, low):
    """Runs that one 8-byte load cannot take (int64 ``starts``/``size`` ``[k]``; ``low``
    uint64 ``[k]``, the value of each run's last 8 digits): ``(values, ok)``, uint64 ``[k]``
    and bool ``[k]``; ``ok`` where the run is a JSON integer within int32, i.e. 9 or 10
    digits without a leading zero and at most 2**31 - 1 (rare: ids near the int32 limit)."""
    top = buf[starts].astype(np.uint64) - np.uint64(48)
    second = buf[starts + 1].astype(np.uint64) - np.uint64(48)
    high = np.where(size == 10, top * np.uint64(10) + second, top)
    values = high * np.uint64(10**8) + low
    ok = (size > 8) & (size <= 10) & (top > 0) & (values <= _INT32_MAX)
    return values, ok


def scan_lines(buf: np.ndarray, s: np.ndarray, e: np.ndarray, n: np.ndarray,
               out: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Parse lines ``buf[s[i]:e[i]]`` expected to hold ``n[i]`` tokens each.

    ``buf``: uint8, with at least :data:`PAD` bytes before the first line and after the
    last that are neither digits nor whitespace; lines in increasing order, not
    overlapping, with no digit between them.  ``s``/``e``/``n``: int64 ``[L]``.
    Returns ``(tokens, exact)``: :data:`TOKEN_DTYPE` ``[n.sum()]`` holding each line's
    tokens at ``cumsum(n) - n`` (signs as stored; ``out``, a contiguous array of that
    dtype and size, where given), and the indices (int64, increasing) of the lines left
    unfilled, for :func:`parse_line_exact`.
    """
    tokens = np.empty(int(n.sum()), dtype=TOKEN_DTYPE) if out is None else out
    if _compiled_scan is None:
        return tokens, _scan_lines_uncompiled(buf, s, e, n, tokens)
    read = np.empty(len(s), dtype=bool)
    _compiled_scan(buf, np.ascontiguousarray(s, dtype=np.int64),
                   np.ascontiguousarray(e, dtype=np.int64),
                   np.ascontiguousarray(n, dtype=np.int64), tokens, read)
    return tokens, np.flatnonzero(~read)


def has_compiled_reader() -> bool:
    """Whether :func:`scan_lines` has the compiled reader (else see UNCOMPILED_REASON)."""
    return _compiled_scan is not None


def _scan_lines_uncompiled(buf, s, e, n, tokens) -> np.ndarray:
    """:func:`scan_lines` without the compiled reader: the numpy scanner for plain lines,
    simdjson for the others.  Returns the lines left unfilled."""
    place = np.cumsum(n) - n
    a, b, good = _plain_frames(buf, s, e)
    if good.any():
        values, first, scanned = _scan_numbers(buf, _Words(buf), np.where(good, a, s),
                                               np.where(good, b, s), np.where(good, n, 0))
        good &= scanned
        if good.all() and len(values) == len(tokens):
            tokens[:] = values  # the common case: no index arrays
        else:
            keep = np.flatnonzero(good)
            tokens[concat_ranges(place[keep], n[keep])] = \
                values[concat_ranges(first[keep], n[keep])]
    rest = np.flatnonzero(~good)
    if len(rest):
        good[rest] = _read_with_simdjson(buf, s[rest], e[rest], n[rest], tokens, place[rest])
    return np.flatnonzero(~good)


def _line_tokens(parser: simdjson.Parser, line: bytes, expected: int):
    """The line's tokens as an int64 buffer, or None where :func:`parse_line_exact` must
    decide.  A function of its own: the parser can parse again only once the document
    and its views are gone, which they are when it returns."""
    if line.startswith(_BOM):  # simdjson skips it, json.loads refuses the line
        return None
    try:
        doc = parser.parse(line)
        tokens = doc["tokens"]
        # json.loads keeps the last of duplicated keys, simdjson finds the first.  A
        # second "tokens" key is spelled so or with \u escapes; else no need to look.
        if (line.count(b'"tokens"') > 1 or b"\\u" in line) and \
                sum(key == "tokens" for key in doc.keys()) > 1:
            return None
        if len(tokens) != expected:
            return None
        return tokens.as_buffer(of_type="i")
    except _REFUSED:
        return None


def _read_with_simdjson(buf, s, e, n, tokens, place) -> np.ndarray:
    """simdjson's lines into ``tokens`` at ``place``; returns which lines it vouched for."""
    parser = simdjson.Parser()
    view = memoryview(buf)
    parts, good = [], np.ones(len(s), dtype=bool)
    for i, (start, end, expected) in enumerate(zip(s.tolist(), e.tolist(), n.tolist())):
        # A bytes copy: simdjson takes it faster than a memoryview.
        part = _line_tokens(parser, bytes(view[start:end]), expected)
        if part is None:
            good[i] = False
        else:
            parts.append(part)
    values = np.frombuffer(b"".join(parts), dtype=np.int64)
    if len(values) and (values.max() > _INT32_MAX or values.min() < -_INT32_MAX):
        values = _drop_wide_lines(values, n, good)
    keep = np.flatnonzero(good)
    tokens[concat_ranges(place[keep], n[keep])] = values
    return good


def _drop_wide_lines(values: np.ndarray, n: np.ndarray, good: np.ndarray) -> np.ndarray:
    """``values`` (the good lines' tokens back to back) without the lines holding an id
    beyond int32, which ``good`` (updated) then leaves to the exact reader."""
    kept = np.flatnonzero(good)
    line = np.repeat(np.arange(len(kept)), n[kept])
    wide = np.zeros(len(kept), dtype=bool)
    wide[line[np.abs(values) > _INT32_MAX]] = True
    good[kept[wide]] = False
    return values[~wide[line]]


def parse_line_exact(line: bytes, expected: int) -> np.ndarray:
    """The tokens of one line as ``json.loads`` reads it (:data:`TOKEN_DTYPE` ``[expected]``),
    or ``ValueError`` saying what is wrong."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a JSON line ({exc}): {line[:120]!r}") from None
    tokens = obj.get("tokens") if isinstance(obj, dict) else None
    if not isinstance(tokens, list):
        raise ValueError(f'no "tokens" list in the line: {line[:120]!r}')
    if not all(type(t) is int for t in tokens):
        raise ValueError('"tokens" holds non-integers')
    if any(abs(t) > _INT32_MAX for t in tokens):
        raise ValueError(f'"tokens" holds ids beyond int32 (|id| > {_INT32_MAX})')
    if len(tokens) != expected:
        raise ValueError(f"the line has {len(tokens)} tokens but the meta says {expected}")
    return np.array(tokens, dtype=TOKEN_DTYPE)
