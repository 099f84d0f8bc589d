"""Parsing ftdp JSON lines into token arrays: a vectorised scanner and the exact reader.

:func:`scan_lines` parses many lines at once with numpy, whatever the line's shape:
``{"tokens": [...]}`` as ``json.dumps`` or compact separators write it, other keys before
or after ``tokens`` (the rest of such a line checked by one ``orjson`` parse, with the
token list left out), any JSON whitespace, negative ids, empty lists.  What it cannot vouch for it
hands back, line by line, to :func:`parse_line_exact` (``json.loads``), the authority:
that one returns the tokens of an odd but valid line, or raises naming what is wrong.

Valid means what XTuner's ``JsonlDataset`` reads without error, with two stricter rules:
every token is a JSON integer (not a float or a boolean) in int32 range, and the list
holds as many tokens as the meta says.
"""

import json
from typing import Tuple

import numpy as np

try:
    from orjson import loads as _loads
except ImportError:  # the standard library's: slower per line, same results
    from json import loads as _loads

__all__ = ["PAD", "TOKEN_DTYPE", "concat_ranges", "parse_line_exact", "scan_lines"]

TOKEN_DTYPE = np.dtype(np.int32)
_INT32_MAX = 2**31 - 1

# Bytes the scanner's buffer must have before the first line and after the last, neither
# digits nor whitespace: its 8-byte loads reach that far past a line's ends.
PAD = 16

_SPACE, _TAB, _CR = 32, 9, 13
_COMMA, _MINUS, _OPEN, _CLOSE, _QUOTE, _COLON = 44, 45, 91, 93, 34, 58


def _word(text: bytes) -> int:
    return int.from_bytes(text, "little")


_HEAD = np.uint64(_word(b'{"tokens'))  # the first 8 bytes of a plain line
_KEY = np.uint64(_word(b'"tokens"'))

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


def _plain_frames(load, s, e):
    """For lines ``buf[s:e]``: positions of ``[`` and ``]`` when the line is exactly
    ``{"tokens": [...]}`` or ``{"tokens":[...]}`` (a ``\\r`` may end it), else ``plain`` False."""
    short = e - s < 13
    head = np.where(short, 0, s)
    h8 = load(head) == _HEAD
    t4 = load(head + 8) & 0xFFFFFFFF
    wide = t4 == _word(b'": [')
    tight = (t4 & 0xFFFFFF) == _word(b'":[')
    a = s + np.where(wide, 11, 10)
    tail = np.where(short, 0, e - 2)
    end3 = load(tail - 1) & 0xFFFFFF
    close2 = (end3 >> 8) == _word(b"]}")
    close3 = (end3 == _word(b"]}\r")) & ~close2
    b = e - np.where(close3, 3, 2)
    plain = ~short & h8 & (wide | tight) & (close2 | close3) & (a < b)
    return a, b, plain


def _locate_key(buf, load, s, e):
    """``(a, b, found)`` for lines of any shape: the ``[`` after the line's only
    ``"tokens"`` key (quote, colon and whitespace checked) and the first ``]`` after it.
    ``found`` is False where the line has no such key or several."""
    quotes = np.flatnonzero(buf == _QUOTE)
    keys = quotes[load(np.minimum(quotes, len(buf) - PAD)) == _KEY]
    colon = _skip_space(buf, keys + 8, 1)
    ok = buf[colon] == _COLON
    opening = _skip_space(buf, colon + 1, 1)
    ok &= buf[opening] == _OPEN
    keys, opening = keys[ok], opening[ok]
    line = np.searchsorted(s, keys, side="right") - 1
    inside = (line >= 0) & (keys < e[np.maximum(line, 0)])
    line, opening = line[inside], opening[inside]
    per_line = np.bincount(line, minlength=len(s))
    found = per_line == 1
    a = np.zeros(len(s), dtype=np.int64)
    a[line] = opening  # where a line has several keys, any: it is not found
    closes = np.flatnonzero(buf == _CLOSE)
    b = closes[np.minimum(np.searchsorted(closes, a), len(closes) - 1)] if len(closes) else a
    found &= (b > a) & (b < e)
    return a, b, found


def _rest_is_valid(buf, s, a, b, e) -> np.ndarray:
    """Per line: is the line, with its token list emptied, a JSON object whose
    ``"tokens"`` is that empty list?  One JSON parse per line (a batch of lines in one
    document could let a malformed line's brackets pair up with its neighbours')."""
    head, tail = a + 1 - s, e - b
    seg_starts = np.stack([s, b], axis=1).ravel()
    seg_lengths = np.stack([head, tail], axis=1).ravel()
    text = buf[concat_ranges(seg_starts, seg_lengths)].tobytes()
    stops = np.cumsum(head + tail).tolist()
    return np.array([_is_emptied_object(text[p:q]) for p, q in zip([0] + stops[:-1], stops)],
                    dtype=bool)


def _is_emptied_object(text: bytes) -> bool:
    try:
        obj = _loads(text)
    except ValueError:  # the exact reader says what is wrong
        return False
    return type(obj) is dict and obj.get("tokens") == []


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


def scan_lines(buf: np.ndarray, s: np.ndarray, e: np.ndarray, n: np.ndarray
               ) -> Tuple[np.ndarray, np.ndarray]:
    """Parse lines ``buf[s[i]:e[i]]`` expected to hold ``n[i]`` tokens each.

    ``buf``: uint8, with at least :data:`PAD` bytes before the first line and after the
    last that are neither digits nor whitespace; lines in increasing order, not
    overlapping, with no digit between them.  ``s``/``e``/``n``: int64 ``[L]``.
    Returns ``(tokens, exact)``: :data:`TOKEN_DTYPE` ``[n.sum()]`` holding each line's
    tokens at ``cumsum(n) - n`` (signs as stored), and the indices (int64) of the lines
    left unfilled, for :func:`parse_line_exact`.
    """
    load = _Words(buf)
    a, b, plain = _plain_frames(load, s, e)
    found = plain
    if not plain.all():
        other = np.flatnonzero(~plain)
        a2, b2, ok = _locate_key(buf, load, s[other], e[other])
        a[other], b[other] = a2, b2
        if ok.any():
            ok[ok] = _rest_is_valid(buf, s[other[ok]], a2[ok], b2[ok], e[other[ok]])
        found = plain.copy()
        found[other] = ok
    # Lines not found keep a = b: an empty list that expects n tokens fails below.
    a, b = np.where(found, a, s), np.where(found, b, s)
    nn = np.where(found, n, 0)
    values, first, good = _scan_numbers(buf, load, a, b, nn)
    good &= found
    tokens = np.empty(int(n.sum()), dtype=TOKEN_DTYPE)
    if good.all() and len(values) == len(tokens):
        tokens[:] = values
    else:
        place = np.cumsum(n) - n
        keep = np.flatnonzero(good)
        tokens[concat_ranges(place[keep], n[keep])] = values[concat_ranges(first[keep], n[keep])]
    return tokens, np.flatnonzero(~good)


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
