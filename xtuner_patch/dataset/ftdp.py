"""InternEvo's ftdp tokenized data: finding the files, their meta, and reading samples.

Layout: ``folder/<type>/<dataset>/*.bin``, each with a ``*.bin.meta`` beside it.

- ``.bin``: JSON lines ``{"tokens": [int, ...], ...}`` (other keys ignored).  A negative id
  is an input-only (prompt) token: input ``abs(t)``, label ``t if t > 0 else -100``.
- ``.bin.meta``: a ``numpy.save``-d integer array ``(N, >=2)`` (int32 or int64): column 0
  is the byte offset of a sample's line in the ``.bin``, the last column its token count.

What XTuner does, and therefore what this module does unless it says otherwise:

- Files come from ``os.walk(folder, followlinks=True)`` in *its* order: XTuner sorts
  ``dirs`` only after ``list(os.walk(...))`` has already consumed the walk, so the
  sort has no effect and sibling folders come in the file system's order (not
  alphabetical); files within a folder are sorted.  Write a ``data_order.txt``
  (``xtuner-patch data order``) to pin an order across machines.
- ``data_order_path``: one path per line, relative to ``folder`` (``os.path.join``
  semantics, so absolute paths work too), read as text with universal newlines.
- ``min_length`` drops samples (not files) shorter than it; files left with no sample are
  skipped.

Where XTuner would crash or silently produce wrong packs, this module raises
:class:`FtdpFormatError` / :class:`FtdpFileNotFoundError` (both
:class:`~xtuner_patch.errors.UserError`) naming the file and line instead.  Cheap checks
(meta shape, offsets inside the file) run when a file is loaded; the lines are checked
when they are parsed: all of them when ``build_packed_dataset`` builds (see
:mod:`.index`), or a pack's when it is read.
"""

import mmap
import os
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..errors import UserError
from .lines import (PAD, TOKEN_DTYPE, UNCOMPILED_REASON, concat_ranges, has_compiled_reader,
                    parse_line_exact, scan_lines)

__all__ = [
    "FtdpDataWarning",
    "FtdpFile",
    "FtdpFileNotFoundError",
    "FtdpFormatError",
    "iter_file_tokens",
    "list_ftdp_files",
    "load_intern_repo_tokenized_dataset",
    "read_meta",
    "read_samples",
    "write_ftdp_file",
]

IGNORE_INDEX = -100
_NEWLINE = 10
_FILLER = ord("x")  # the numpy scanner's padding: neither a digit nor whitespace
# Bytes of lines read and scanned at once.  For the numpy scanner (no compiled reader) its
# temporaries (~20 bytes per byte of text) then stay in the shared cache; smaller chunks
# pay more of numpy's per-call overhead.  Measured on the 2-core CI machine (L2 1 MiB, L3
# 32 MiB), parse only: 512 KiB is 5-10% faster than 256 KiB, 128 KiB and 1 MiB are
# slower.  The compiled reader's build times at 512 KiB and 2 MiB chunks are within 10%.
CHUNK_BYTES = 1 << 19


class FtdpFormatError(ValueError, UserError):
    """Malformed ftdp data; the message names the file and the line or meta row."""


class FtdpFileNotFoundError(FileNotFoundError, UserError):
    """A dataset folder, data file, ``.bin.meta`` or data_order file that does not exist."""


class FtdpDataWarning(UserWarning):
    """Data skipped where XTuner skips it silently (empty files, blank order lines)."""


def _mmap(path: str, _cache: Dict[str, tuple] = {}) -> np.ndarray:  # noqa: B006
    """``path``'s bytes (uint8) through a read-only map, kept per process (forked workers
    inherit it) and replaced when the file changes (size or mtime)."""
    st = os.stat(path)
    key = (st.st_size, st.st_mtime_ns)
    cached = _cache.get(path)
    if cached is None or cached[0] != key:
        if st.st_size == 0:
            data = np.zeros(0, dtype=np.uint8)
        else:
            with open(path, "rb") as f:
                data = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ),
                                     dtype=np.uint8)
        cached = (key, data)
        _cache[path] = cached
    return cached[1]


class _FileBytes:
    """A file's bytes as ``data[lo:hi]`` uint8 slices, read (not mapped): reading a whole
    file front to back then leaves none of its pages in the process's memory."""

    def __init__(self, path: str):
        self._file = open(path, "rb", buffering=0)
        self._size = os.fstat(self._file.fileno()).st_size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, span: slice) -> np.ndarray:
        lo, hi = max(span.start or 0, 0), min(self._size, self._size if span.stop is None
                                                 else span.stop)
        out = np.empty(max(hi - lo, 0), dtype=np.uint8)
        self.read_into(lo, out)
        return out

    def read_into(self, lo: int, out: np.ndarray) -> None:
        """Bytes ``[lo, lo + len(out))`` into ``out`` (uint8, inside the file)."""
        self._file.seek(lo)
        view, done = memoryview(out), 0
        while done < len(out):  # a read may return fewer bytes than asked
            got = self._file.readinto(view[done:])
            if not got:
                raise OSError(f"{self._file.name} shrank while being read")
            done += got

    def close(self) -> None:
        self._file.close()


def _line_number(path: str, offset: int) -> int:
    """1-based line of byte ``offset`` in ``path`` (error messages only: scans the prefix)."""
    buf = _mmap(path)[:offset]
    step = 1 << 26
    return 1 + sum(int(np.count_nonzero(buf[i:i + step] == _NEWLINE))
                   for i in range(0, offset, step))


def _where(path: str, offset: int, row: Optional[int] = None) -> str:
    """``file:line (byte offset, meta row)`` for an error message."""
    if row is None:
        meta_offsets = np.load(path + ".meta", mmap_mode="r")[:, 0]
        rows = np.flatnonzero(meta_offsets == offset)
        row = int(rows[0]) if len(rows) else None
    which = "no meta row" if row is None else f"meta row {row}"
    return f"{path}:{_line_number(path, offset)} (byte offset {offset}, {which})"


def _line_ends(data: np.ndarray, offsets: np.ndarray, step: int = 1 << 20) -> np.ndarray:
    """The newline ending each line that starts at ``offsets`` (sorted), or the file's
    end; the file is searched in blocks of ``step`` bytes, skipping stretches no line needs."""
    ends = np.empty(len(offsets), dtype=np.int64)
    size, done, lo = len(data), 0, 0
    while done < len(offsets):
        lo = max(lo, int(offsets[done]))
        hi = min(size, lo + step)
        newlines = np.flatnonzero(data[lo:hi] == _NEWLINE) + lo
        upto = len(offsets) if hi == size else \
            done + int(np.searchsorted(offsets[done:], newlines[-1] if len(newlines) else -1,
                                       side="right"))
        found = np.searchsorted(newlines, offsets[done:upto])
        ends[done:upto] = np.append(newlines, size)[found]
        done, lo = upto, hi
    return ends


def _scan_rows(data, path, rows, offsets, lengths, out, place) -> None:
    """Parse the lines of ``rows`` (sorted by offset) from ``data`` (:class:`_FileBytes`)
    into ``out`` at ``place`` (each row's first token); raise on the first bad line.

    The file is read once, in chunks of about :data:`CHUNK_BYTES` straight into the
    readers' padded buffer; each chunk's newlines end its rows' lines.  A chunk ends at
    its last complete line: the partial line after it is read again as the start of the
    next chunk (at most one line per chunk).
    """
    size = len(data)
    buf = np.empty(CHUNK_BYTES + 2 * PAD, dtype=np.uint8)
    i, want = 0, CHUNK_BYTES
    while i < len(rows):
        lo = int(offsets[i])
        hi = min(size, lo + want)
        if len(buf) < hi - lo + 2 * PAD:
            buf = np.empty(hi - lo + 2 * PAD, dtype=np.uint8)
        text = buf[PAD:PAD + hi - lo]
        data.read_into(lo, text)
        newlines = np.flatnonzero(text == _NEWLINE) + lo
        if hi == size:  # the last line may lack its newline
            newlines = np.append(newlines, size)
        # Rows whose line ends inside the chunk (none without a newline in it).
        j = i + int(np.searchsorted(offsets[i:], newlines[-1], side="right")) \
            if len(newlines) else i
        if j == i:  # a line longer than the chunk: read more at once
            want *= 2
            continue
        ends = newlines[np.searchsorted(newlines, offsets[i:j])]
        stop = int(ends[-1]) - lo
        buf[:PAD] = _FILLER
        buf[PAD + stop:PAD + stop + PAD] = _FILLER
        shift = PAD - lo
        exact = _scan_into(out, place[i:j], buf[:stop + 2 * PAD], offsets[i:j] + shift,
                           ends + shift, lengths[i:j])
        for k in exact.tolist():
            out[place[i + k]:place[i + k] + lengths[i + k]] = _read_exact(
                data, path, int(offsets[i + k]), int(ends[k]), int(lengths[i + k]),
                int(rows[i + k]))
        i, want = j, CHUNK_BYTES


def _scan_into(out, place, buf, starts, ends, lengths) -> np.ndarray:
    """:func:`~.lines.scan_lines` with each line's tokens put into ``out`` at its
    ``place``; returns the lines left to the exact reader."""
    if not has_compiled_reader():
        _warn_uncompiled()
    total = int(lengths.sum())
    if len(place) and int(place[-1] - place[0] + lengths[-1]) == total and \
            (np.diff(place) == lengths[:-1]).all():  # back to back: scanned in place
        return scan_lines(buf, starts, ends, lengths, out=out[place[0]:place[0] + total])[1]
    tokens, exact = scan_lines(buf, starts, ends, lengths)
    out[concat_ranges(place, lengths)] = tokens
    return exact


_uncompiled_warned = False  # per process


def _warn_uncompiled() -> None:
    global _uncompiled_warned
    if not _uncompiled_warned:
        _uncompiled_warned = True
        warnings.warn("xtuner_patch.dataset._ftdp_lines, the compiled reader of ftdp lines, "
                      f"is not there ({UNCOMPILED_REASON or 'turned off'}): lines are parsed "
                      "by numpy and simdjson instead, 3-9x slower (a first epoch 1.2-3.5x); "
                      "reinstall xtuner-patch where a C compiler and the Python headers are "
                      "found to build it", FtdpDataWarning, stacklevel=5)


def _read_exact(data, path, offset, end, expected, row) -> np.ndarray:
    try:
        return parse_line_exact(data[offset:end].tobytes(), expected)
    except ValueError as exc:
        raise FtdpFormatError(f"{_where(path, offset, row)}: {exc}") from None


def read_samples(path: str, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The tokens (signs as stored) of the samples at ``offsets``, concatenated.

    ``offsets``/``lengths``: int64 ``[k]`` byte offsets and meta token counts, any order.
    Returns int64 ``[lengths.sum()]``.  Raises FtdpFormatError naming the file and line
    when a line is not JSON, has no ``tokens`` list of integers, or its token count
    differs from the meta.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    out = np.empty(int(lengths.sum()), dtype=TOKEN_DTYPE)
    if len(offsets):
        data = _mmap(path)
        order = np.argsort(offsets, kind="stable")
        place = (np.cumsum(lengths) - lengths)[order]
        sorted_offsets = offsets[order]
        ends = _line_ends(data, sorted_offsets)
        _gather_scan(data, path, sorted_offsets, ends, lengths[order], out, place)
    return out.astype(np.int64)


def _gather_scan(data, path, offsets, ends, lengths, out, place) -> None:
    """Scan lines scattered through a file: copied next to each other, then one scan."""
    sizes = ends - offsets
    starts = np.cumsum(sizes + 1) - (sizes + 1) + PAD
    work = np.full(int(sizes.sum() + len(sizes)) + 2 * PAD, _FILLER, dtype=np.uint8)
    for o, e, s in zip(offsets.tolist(), ends.tolist(), starts.tolist()):
        work[s:s + e - o] = data[o:e]
    exact = _scan_into(out, place, work, starts, starts + sizes, lengths)
    for k in exact.tolist():
        out[place[k]:place[k] + lengths[k]] = _read_exact(
            data, path, int(offsets[k]), int(ends[k]), int(lengths[k]), None)


def iter_file_tokens(path: str, meta_offsets: np.ndarray, meta_lengths: np.ndarray,
                     rows_per_block: int = 1 << 16) -> Iterator[Tuple[int, int, np.ndarray]]:
    """Every meta row's tokens, in meta order: yields ``(first_row, stop_row, tokens)`` per
    block of rows, ``tokens`` :data:`~.lines.TOKEN_DTYPE` (the block's rows back to back).

    Reads the file front to back in chunks of :data:`CHUNK_BYTES` whatever the meta's
    order; raises FtdpFormatError at the first bad line (file, line, meta row).
    """
    offsets = np.asarray(meta_offsets, dtype=np.int64)
    lengths = np.asarray(meta_lengths, dtype=np.int64)
    data = _FileBytes(path)
    try:
        yield from _file_blocks(data, path, offsets, lengths, rows_per_block)
    finally:
        data.close()


def _file_blocks(data, path, offsets, lengths, rows_per_block):
    for lo in range(0, len(offsets), rows_per_block):
        block = slice(lo, lo + rows_per_block)
        rows = np.arange(lo, min(lo + rows_per_block, len(offsets)))
        off, n = offsets[block], lengths[block]
        order = np.argsort(off, kind="stable") if (np.diff(off) < 0).any() else None
        if order is not None:
            rows, off, n = rows[order], off[order], n[order]
        out = np.empty(int(n.sum()), dtype=TOKEN_DTYPE)
        place = np.cumsum(lengths[block]) - lengths[block]
        if order is not None:
            place = place[order]
        _scan_rows(data, path, rows, off, n, out, place)
        yield lo, lo + len(off), out


class FtdpFile:
    """One ``.bin`` file's samples after the ``min_length`` filter.

    Attributes (named as on XTuner's ``JsonlDataset``): ``path`` (str), ``offsets`` and
    ``length`` (int64 ``[n]``: byte offset and token count of each kept sample, meta order),
    ``rows`` (int64 ``[n]``: each kept sample's meta row), ``rel_path`` (path relative to
    the dataset folder, ``/``-separated, or None), ``num_rows`` (meta rows before the filter).
    ``ds[i]`` is XTuner's ``JsonlDataset`` item without the line's extra keys:
    ``{"input_ids": list[int], "labels": list[int], "length": int}``.
    """

    def __init__(self, path: str, offsets: np.ndarray, length: np.ndarray,
                 rel_path: Optional[str] = None, num_rows: Optional[int] = None,
                 rows: Optional[np.ndarray] = None):
        self.path = path
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.length = np.asarray(length, dtype=np.int64)
        self.rel_path = rel_path
        self.num_rows = len(self.offsets) if num_rows is None else num_rows
        self.rows = np.arange(len(self.offsets)) if rows is None else np.asarray(rows, np.int64)

    @classmethod
    def load(cls, path: str, min_length: int = 0, rel_path: Optional[str] = None,
             origin: str = "") -> "FtdpFile":
        """Read ``path + '.meta'``, check it against the file, apply ``min_length``.

        ``origin`` (e.g. ``"data_order.txt:3: "``) prefixes the messages of missing files.
        """
        meta_path = path + ".meta"
        if not os.path.isfile(path):
            raise FtdpFileNotFoundError(f"{origin}{path} does not exist")
        if not os.path.isfile(meta_path):
            raise FtdpFileNotFoundError(
                f"{origin}{meta_path} not found: every .bin needs its .bin.meta "
                "(numpy-saved (N, 2) [byte offset, token count])")
        offsets, length = read_meta(path)
        num_rows = len(offsets)
        rows = None
        if min_length > 0:
            rows = np.flatnonzero(length >= min_length)
            offsets, length = offsets[rows], length[rows]
        return cls(path, offsets, length, rel_path, num_rows, rows)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, idx: int) -> dict:
        idx = range(len(self))[idx]
        tokens = read_samples(self.path, self.offsets[idx:idx + 1], self.length[idx:idx + 1])
        return {"input_ids": np.abs(tokens).tolist(),
                "labels": np.where(tokens > 0, tokens, IGNORE_INDEX).tolist(),
                "length": len(tokens)}


def read_meta(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(offsets, lengths)`` (int64 ``[N]``) of every row of ``path + '.meta'``, checked
    against ``path``: offsets inside the file, lengths not negative; a ``.bin`` cut short
    (rows past its end) is reported with the row whose line was cut."""
    meta_path = path + ".meta"
    try:
        meta = np.load(meta_path, mmap_mode="r")
    except Exception as exc:  # noqa: BLE001 - any failure means "not a numpy array file"
        raise FtdpFormatError(f"{meta_path}: not a numpy .npy array ({exc})") from None
    if meta.ndim != 2 or meta.shape[1] < 2 or meta.dtype.kind not in "iu":
        raise FtdpFormatError(
            f"{meta_path}: expected an integer array of shape (N, 2), got "
            f"{meta.dtype} {meta.shape}")
    offsets = np.array(meta[:, 0], dtype=np.int64)
    length = np.array(meta[:, -1], dtype=np.int64)
    size = os.path.getsize(path)
    bad = np.flatnonzero((offsets < 0) | (offsets >= size) | (length < 0))
    if len(bad):
        row = int(bad[0])
        message = (f"{meta_path}: row {row} [offset {offsets[row]}, length {length[row]}] "
                   f"points outside {path} ({size} bytes); {len(bad)} bad row(s) in all")
        past = offsets >= size
        if past.any() and not (offsets < 0).any():
            message += "; " + _truncation(path, offsets, past, size)
        raise FtdpFormatError(message)
    return offsets, length


def _truncation(path: str, offsets: np.ndarray, past: np.ndarray, size: int) -> str:
    """What a ``.bin`` shorter than its meta says about where it was cut."""
    inside = np.flatnonzero(~past)
    if not len(inside):
        return f"{path} holds none of the meta's lines (truncated or the wrong file?)"
    row = int(inside[np.argmax(offsets[inside])])
    start = int(offsets[row])
    data = _mmap(path)
    if data[size - 1] == _NEWLINE:
        return (f"{path} ends after a complete line: truncated at a line boundary, after "
                f"line {_line_number(path, size) - 1} (meta row {row})")
    return (f"{path} is truncated: meta row {row}'s line ({path}:{_line_number(path, start)}) "
            f"is cut {size - start} bytes after its start")


def _rel(folder: str, path: str) -> str:
    return os.path.relpath(path, folder).replace(os.sep, "/")


def _read_data_order(folder: str, data_order_path: str) -> List[tuple]:
    """``[(path, rel_path, origin)]`` from a data_order file; blank lines skipped."""
    if not os.path.isfile(data_order_path):
        raise FtdpFileNotFoundError(f"data_order_path {data_order_path} does not exist")
    with open(data_order_path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    entries, blank = [], []
    for lineno, entry in enumerate(lines, 1):
        if not entry.strip():
            blank.append(lineno)
            continue
        path = os.path.join(folder, entry)
        entries.append((path, _rel(folder, path), f"{data_order_path}:{lineno}: "))
    if blank:
        warnings.warn(f"{data_order_path}: skipped blank line(s) {blank[:10]} (XTuner would "
                      "fail on them)", FtdpDataWarning, stacklevel=3)
    return entries


def list_ftdp_files(folder: str, data_order_path: Optional[str] = None,
                    file_type: str = ".bin") -> List[str]:
    """Paths of the data files in XTuner's order (see the module docstring)."""
    return [path for path, _, _ in _ordered_entries(folder, data_order_path, file_type)]


def _ordered_entries(folder, data_order_path, file_type):
    if not os.path.isdir(folder):
        raise FtdpFileNotFoundError(f"dataset folder {folder} does not exist")
    if data_order_path is not None:
        return _read_data_order(folder, data_order_path)
    entries = []
    for root, _dirs, files in os.walk(folder, followlinks=True):
        for name in sorted(files):
            if name.endswith(file_type):
                path = os.path.join(root, name)
                entries.append((path, _rel(folder, path), ""))
    return entries


def load_intern_repo_tokenized_dataset(folder: str, min_length: int = 0,
                                       data_order_path: Optional[str] = None,
                                       file_type: str = ".bin") -> List[FtdpFile]:
    """Drop-in for XTuner's function of that name: one :class:`FtdpFile` per data file.

    Same files in the same order as XTuner, files with no sample left skipped (with a
    :class:`FtdpDataWarning`).  Raises when no file is found or no sample is left, where
    XTuner would fail later with an empty ``ConcatDataset``.
    """
    entries = _ordered_entries(folder, data_order_path, file_type)
    if not entries:
        raise FtdpFormatError(f"no '*{file_type}' files under {folder}")
    datasets, empty, filtered = [], [], []
    for path, rel_path, origin in entries:
        ds = FtdpFile.load(path, min_length, rel_path, origin)
        if len(ds):
            datasets.append(ds)
        else:
            (filtered if ds.num_rows else empty).append(rel_path)
    skipped = [f"{len(names)} file(s) {why} {names[:5]}" for names, why in (
        (empty, "with no samples"),
        (filtered, f"with no sample of at least min_length={min_length} tokens")) if names]
    if skipped:
        warnings.warn(f"{folder}: skipped {' and '.join(skipped)}", FtdpDataWarning,
                      stacklevel=2)
    if not datasets:
        wanted = f"of at least min_length={min_length} tokens" if min_length > 0 else "at all"
        raise FtdpFormatError(
            f"{folder}: none of the {len(entries)} '*{file_type}' files has a sample {wanted}")
    return datasets


def write_ftdp_file(bin_path: str, tokens: np.ndarray, lengths: np.ndarray,
                    meta_dtype: str = "int64") -> None:
    """Write samples as an ftdp ``.bin`` + ``.bin.meta``, byte-identical to ``json.dumps``.

    ``tokens``: int ``[T]`` all samples' tokens concatenated (signs as stored);
    ``lengths``: int ``[n]`` tokens per sample (``sum == T``; zeros allowed).  Vectorised:
    millions of samples take seconds.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if int(lengths.sum()) != len(tokens) or (lengths < 0).any():
        raise ValueError("lengths must be >= 0 and sum to len(tokens)")
    values, inverse = np.unique(tokens, return_inverse=True)
    texts = [str(v).encode() for v in values.tolist()]
    prefix, suffix = b'{"tokens": [', b"]}\n"
    # Piece table: each value with and without the ", " separator, then prefix and suffix.
    pieces = [t + b", " for t in texts] + texts + [prefix, suffix]
    width = max(map(len, pieces))
    table = np.zeros((len(pieces), width), dtype=np.uint8)
    for i, p in enumerate(pieces):
        table[i, :len(p)] = np.frombuffer(p, dtype=np.uint8)
    piece_len = np.array([len(p) for p in pieces], dtype=np.int64)
    n_vals = len(values)
    ids = inverse.astype(np.int64)
    line_end = np.cumsum(lengths)
    last = line_end[lengths > 0] - 1
    ids[last] += n_vals  # the last token of a line takes no separator
    # The sequence of pieces: per line, the prefix, its tokens, the suffix.
    n = len(lengths)
    seq = np.empty(len(tokens) + 2 * n, dtype=np.int64)
    heads = np.arange(n) * 2 + (line_end - lengths)
    tails = heads + lengths + 1
    is_token = np.ones(len(seq), dtype=bool)
    is_token[heads] = is_token[tails] = False
    seq[is_token] = ids
    seq[heads] = 2 * n_vals
    seq[tails] = 2 * n_vals + 1
    seq_len = piece_len[seq]
    data = table[seq][np.arange(width) < seq_len[:, None]]
    line_bytes = np.add.reduceat(seq_len, heads) if n else np.zeros(0, np.int64)
    offsets = np.cumsum(line_bytes) - line_bytes
    os.makedirs(os.path.dirname(os.path.abspath(bin_path)), exist_ok=True)
    with open(bin_path, "wb") as f:
        f.write(data.tobytes())
    with open(bin_path + ".meta", "wb") as f:
        np.save(f, np.stack([offsets, lengths], axis=1).astype(meta_dtype))

