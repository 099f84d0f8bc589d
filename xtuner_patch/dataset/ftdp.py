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
:class:`FtdpFormatError` / ``FileNotFoundError`` naming the file and line instead.  Cheap
checks (meta shape, offsets inside the file) run when a file is loaded; the line
contents are checked when a sample is read.
"""

import json
import mmap
import os
import warnings
from typing import Dict, List, Optional

import numpy as np

__all__ = [
    "FtdpDataWarning",
    "FtdpFile",
    "FtdpFormatError",
    "list_ftdp_files",
    "load_intern_repo_tokenized_dataset",
    "read_samples",
    "write_ftdp_file",
]

IGNORE_INDEX = -100

# The fast path reads lines written as `{"tokens": [...]}` (json.dumps, or compact);
# any line it cannot vouch for is re-read with json.loads, which is the authority.
_PREFIX = np.frombuffer(b'{"tokens":', dtype=np.uint8)
_SUFFIX = np.frombuffer(b"]}", dtype=np.uint8)
_COMMA = ord(",")


class FtdpFormatError(ValueError):
    """Malformed ftdp data; the message names the file and the line or meta row."""


class FtdpDataWarning(UserWarning):
    """Data skipped where XTuner skips it silently (empty files, blank order lines)."""


def _mmap(path: str, _cache: Dict[str, tuple] = {}) -> mmap.mmap:  # noqa: B006
    """A read-only map of ``path``, kept per process (forked workers inherit it) and
    replaced when the file changes (size or mtime)."""
    st = os.stat(path)
    key = (st.st_size, st.st_mtime_ns)
    cached = _cache.get(path)
    if cached is None or cached[0] != key:
        with open(path, "rb") as f:
            cached = (key, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        _cache[path] = cached
    return cached[1]


def _line_number(path: str, offset: int) -> int:
    """1-based line of byte ``offset`` in ``path`` (error messages only: scans the prefix)."""
    buf = np.frombuffer(_mmap(path), dtype=np.uint8, count=offset)
    step = 1 << 26
    return 1 + sum(int(np.count_nonzero(buf[i:i + step] == 10)) for i in range(0, offset, step))


def _where(path: str, offset: int) -> str:
    """``file:line (byte offset, meta row)`` for an error message."""
    meta_offsets = np.load(path + ".meta", mmap_mode="r")[:, 0]
    rows = np.flatnonzero(meta_offsets == offset)
    row = f"meta row {int(rows[0])}" if len(rows) else "no meta row"
    return f"{path}:{_line_number(path, offset)} (byte offset {offset}, {row})"


def _read_line_exact(path: str, offset: int, expected: int) -> np.ndarray:
    """Parse one line with ``json`` and check it; int64 ``[expected]`` or FtdpFormatError."""
    mm = _mmap(path)
    end = mm.find(b"\n", offset)
    line = mm[offset:end if end >= 0 else len(mm)]
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FtdpFormatError(
            f"{_where(path, offset)}: not a JSON line ({exc}): {line[:120]!r}") from None
    tokens = obj.get("tokens") if isinstance(obj, dict) else None
    if not isinstance(tokens, list):
        raise FtdpFormatError(
            f'{_where(path, offset)}: no "tokens" list in the line: {line[:120]!r}')
    if not all(type(t) is int for t in tokens):
        raise FtdpFormatError(f'{_where(path, offset)}: "tokens" holds non-integers')
    if len(tokens) != expected:
        raise FtdpFormatError(
            f"{_where(path, offset)}: the line has {len(tokens)} tokens but {path}.meta "
            f"says {expected}")
    return np.array(tokens, dtype=np.int64)


def _read_fast(mm: mmap.mmap, offsets: np.ndarray, lengths: np.ndarray) -> Optional[np.ndarray]:
    """``read_samples`` for well-formed lines, vectorised over the lines; None otherwise."""
    find, size = mm.find, len(mm)
    ends = np.array([find(b"\n", o) for o in offsets.tolist()], dtype=np.int64)
    ends[ends < 0] = size
    data = np.frombuffer(mm, dtype=np.uint8)
    head = data[np.minimum(offsets[:, None] + np.arange(12), size - 1)]
    spaced = head[:, 10] == ord(" ")
    opens = offsets + 10 + spaced
    if not ((ends - opens >= 3).all()
            and (head[:, :10] == _PREFIX).all()
            and (head[np.arange(len(head)), 10 + spaced] == ord("[")).all()
            and (data[ends[:, None] - np.array([2, 1])] == _SUFFIX).all()):
        return None
    nonempty = lengths > 0
    text_len = ends - 2 - (opens + 1)
    if text_len[~nonempty].any():
        return None
    text = b",".join([mm[a + 1:b - 2] for a, b in zip(opens[nonempty].tolist(),
                                                       ends[nonempty].tolist())])
    try:
        tokens = np.fromstring(text, dtype=np.int64, sep=",")
    except ValueError:
        return None
    if len(tokens) != int(lengths.sum()):
        return None
    # Same total: check each line's own count (commas + 1) against its meta length.
    stops = np.cumsum(text_len[nonempty] + 1) - 1
    commas = np.flatnonzero(np.frombuffer(text, dtype=np.uint8) == _COMMA)
    per_line = np.diff(np.searchsorted(commas, stops), prepend=0)
    per_line[1:] -= 1  # the joining comma before each later line
    if not np.array_equal(per_line + 1, lengths[nonempty]):
        return None
    # fromstring reads an empty or "-" field as 0: make sure every field had a digit.
    if not tokens.all():
        raw = np.frombuffer(text, dtype=np.uint8)
        digit = (raw >= ord("0")) & (raw <= ord("9"))
        if np.count_nonzero(digit[1:] & ~digit[:-1]) + int(digit[:1].sum()) != len(tokens):
            return None
    return tokens


def read_samples(path: str, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The tokens (signs as stored) of the samples at ``offsets``, concatenated.

    ``offsets``/``lengths``: int64 ``[k]`` byte offsets and meta token counts.  Returns
    int64 ``[lengths.sum()]``.  Raises FtdpFormatError naming the file and line when a
    line is not JSON, has no ``tokens`` list, or its token count differs from the meta.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(offsets):
        return np.zeros(0, dtype=np.int64)
    tokens = _read_fast(_mmap(path), offsets, lengths)
    if tokens is None:
        tokens = np.concatenate([_read_line_exact(path, o, n)
                                 for o, n in zip(offsets.tolist(), lengths.tolist())])
    return tokens


class FtdpFile:
    """One ``.bin`` file's samples after the ``min_length`` filter.

    Attributes (named as on XTuner's ``JsonlDataset``): ``path`` (str), ``offsets`` and
    ``length`` (int64 ``[n]``: byte offset and token count of each kept sample, meta order),
    ``rel_path`` (path relative to the dataset folder, ``/``-separated, or None),
    ``num_rows`` (meta rows before the filter).
    ``ds[i]`` is XTuner's ``JsonlDataset`` item without the line's extra keys:
    ``{"input_ids": list[int], "labels": list[int], "length": int}``.
    """

    def __init__(self, path: str, offsets: np.ndarray, length: np.ndarray,
                 rel_path: Optional[str] = None, num_rows: Optional[int] = None):
        self.path = path
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.length = np.asarray(length, dtype=np.int64)
        self.rel_path = rel_path
        self.num_rows = len(self.offsets) if num_rows is None else num_rows

    @classmethod
    def load(cls, path: str, min_length: int = 0, rel_path: Optional[str] = None,
             origin: str = "") -> "FtdpFile":
        """Read ``path + '.meta'``, check it against the file, apply ``min_length``.

        ``origin`` (e.g. ``"data_order.txt:3: "``) prefixes the messages of missing files.
        """
        meta_path = path + ".meta"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{origin}{path} does not exist")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(
                f"{origin}{meta_path} not found: every .bin needs its .bin.meta "
                "(numpy-saved (N, 2) [byte offset, token count])")
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
            raise FtdpFormatError(
                f"{meta_path}: row {row} [offset {offsets[row]}, length {length[row]}] points "
                f"outside {path} ({size} bytes); {len(bad)} bad row(s) in all")
        num_rows = len(offsets)
        if min_length > 0:
            keep = length >= min_length
            offsets, length = offsets[keep], length[keep]
        return cls(path, offsets, length, rel_path, num_rows)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, idx: int) -> dict:
        idx = range(len(self))[idx]
        tokens = read_samples(self.path, self.offsets[idx:idx + 1], self.length[idx:idx + 1])
        return {"input_ids": np.abs(tokens).tolist(),
                "labels": np.where(tokens > 0, tokens, IGNORE_INDEX).tolist(),
                "length": len(tokens)}


def _rel(folder: str, path: str) -> str:
    return os.path.relpath(path, folder).replace(os.sep, "/")


def _read_data_order(folder: str, data_order_path: str) -> List[tuple]:
    """``[(path, rel_path, origin)]`` from a data_order file; blank lines skipped."""
    if not os.path.isfile(data_order_path):
        raise FileNotFoundError(f"data_order_path {data_order_path} does not exist")
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
        raise FileNotFoundError(f"dataset folder {folder} does not exist")
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

