"""Packing ftdp samples into fixed-length varlen rows: XTuner's ``build_packed_dataset``.

Default behaviour is XTuner's, item for item (``pack_sample_into_one=False`` packing of
InternEvo): per file, samples are shuffled with ``RandomState(seed)``, concatenated,
and cut into ``num_tokens // packed_length`` packs (remainder dropped; packs never
cross files; files concatenated in load order).  A sample cut by a pack boundary
continues at the start of the next pack with positions restarting at 0.

Options beyond XTuner (keyword-only, defaults keep XTuner's items):

``label_alignment``
    ``'xtuner'`` (default): ``labels[i]`` is token ``i``'s own label (``t if t > 0 else
    -100``) and the model's loss shifts over the whole row (HF: ``logits[:-1]`` vs
    ``labels[1:]``).  So the last token of a sample is trained to predict the next
    sample's first token (usually a BOS, trained when positive), and the row's last
    token predicts nothing, even when its sample continues in the next pack.

    ``'internevo'``: InternEvo's per-sample shift, done here: ``labels[i]`` is the label
    of the *next* token of the same sample; a sample's last token gets -100; the last
    token of a prefix cut by the pack boundary gets the label of the sample's next
    token (the first token of the next pack).  The model's loss must NOT shift again:
    it must compare ``logits[i]`` with ``labels[i]``.  Items carry ``labels_shifted:
    True`` and the dataset has ``labels_shifted = True`` so the loss side can check;
    XTuner's ``default_collate_fn`` drops unknown keys, so check the dataset attribute
    when the model is configured.

``micro_bsz``
    InternEvo's ``micro_bsz``: a row holds ``packed_length * micro_bsz`` tokens (here
    ``packed_length`` is InternEvo's ``seq_len``), and every segment is split into
    windows of ``packed_length`` tokens counted from the segment's start, positions and
    ``cumulative_len`` restarting per window, so one varlen row reproduces an InternEvo
    micro-batch.  With ``micro_bsz=1`` no segment exceeds the row: XTuner's items.
    (A zero-token sample gives an empty segment, a repeated ``cumulative_len`` entry, as
    in XTuner; InternEvo adds no entry for it.)

``dataset_weights``
    Mixing ratios; see :mod:`xtuner_patch.dataset.mixing`.

``check_lines`` / ``cache_dir``
    Every line of every file is parsed once when the dataset is built (rank 0), so a
    bad line fails the build, naming file and line, instead of the training step that
    reaches its pack; the tokens are kept as a token index per file in ``cache_dir``
    (see :mod:`xtuner_patch.dataset.index`), which later builds reuse and packs are read
    from.  ``check_lines=False`` skips the parse (an index already there is still
    used): lines are then checked when their pack is read.  ``cache_dir=False`` keeps
    no index: lines are checked at build, then parsed again per pack.

Items: ``input_ids``, ``labels``, ``position_ids`` (int64 arrays ``[R]``, ``R =
packed_length * micro_bsz``) and ``cumulative_len`` (int64 array ``[S + 1]``, from 0 to
``R``), in XTuner's key order; plus ``labels_shifted`` with ``label_alignment='internevo'``.
XTuner's packs hold the same numbers as lists; its ``default_collate_fn`` makes the same
tensors from either (``torch.LongTensor`` / ``torch.IntTensor`` of each), and from arrays
without a Python int per token.

Multi-rank: rank 0 builds, the dataset (numpy arrays, 24 bytes per sample) is broadcast
to the other ranks with ``broadcast_object_list``, as XTuner does; an error on rank 0
is raised on every rank instead of leaving the others waiting.
"""

import operator
import warnings
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import distributed as dist

from .ftdp import IGNORE_INDEX, FtdpDataWarning, FtdpFile, FtdpFormatError, read_meta, read_samples
from .index import ensure_index, open_index
from .mixing import weighted_pack_index

__all__ = ["LABEL_ALIGNMENTS", "PackedFtdpDataset", "build_packed_dataset"]

LABEL_ALIGNMENTS = ("xtuner", "internevo")


class PackedFtdpDataset(torch.utils.data.Dataset):
    """Packs of the samples of ``files`` (see the module docstring for the items).

    State, all numpy (what crosses ranks): ``offsets`` int64 ``[S]`` byte offset of every
    sample, each file's samples in shuffled order, files concatenated; ``token_starts``
    int64 ``[S]`` where each sample's tokens start in its file's token index; ``bounds``
    int64 ``[S + 1]`` where each sample's tokens start in the packed stream (the last
    entry: the total); ``file_samples`` / ``file_packs`` int64 ``[F + 1]`` where each
    file's samples / packs start; ``index`` int64 ``[N]`` (the pack of each item, with
    ``dataset_weights``) or None; ``index_paths`` (per file, its token index or None).
    """

    def __init__(self, files: Sequence[FtdpFile], packed_length: int = 8192, seed: int = 1024,
                 *, label_alignment: str = "xtuner", micro_bsz: int = 1,
                 dataset_weights: Optional[Mapping[str, float]] = None,
                 check_lines: bool = True, cache_dir: Union[str, bool, None] = None):
        if label_alignment not in LABEL_ALIGNMENTS:
            raise ValueError(f"label_alignment must be one of {LABEL_ALIGNMENTS}, "
                             f"got {label_alignment!r}")
        if packed_length < 1 or micro_bsz < 1:
            raise ValueError(f"packed_length ({packed_length}) and micro_bsz ({micro_bsz}) "
                             "must be positive")
        self.packed_length = int(packed_length)
        self.micro_bsz = int(micro_bsz)
        self.row_length = self.packed_length * self.micro_bsz
        self._row_positions = np.arange(self.row_length)
        self.seed = seed
        self.label_alignment = label_alignment
        self.labels_shifted = label_alignment == "internevo"
        self.paths = [f.path for f in files]
        self.rel_paths = [f.rel_path for f in files]
        self.index_paths = [ensure_index(f.path, cache_dir, check_lines) for f in files]

        offsets, lengths, starts = [], [], []
        for f in files:
            order = np.arange(len(f.length))
            np.random.RandomState(seed).shuffle(order)
            offsets.append(f.offsets[order])
            lengths.append(f.length[order])
            row_lengths = read_meta(f.path)[1]
            starts.append((np.cumsum(row_lengths) - row_lengths)[f.rows[order]])
        self.offsets = np.concatenate(offsets) if files else np.zeros(0, np.int64)
        self.token_starts = np.concatenate(starts) if files else np.zeros(0, np.int64)
        self.bounds = np.cumsum(np.concatenate([[0], *lengths]))
        self.file_samples = np.cumsum([0] + [len(o) for o in offsets])
        file_tokens = np.diff(self.bounds[self.file_samples])
        self.file_packs = np.cumsum(np.concatenate([[0], file_tokens // self.row_length]))
        if self.file_packs[-1] == 0:
            raise ValueError(
                f"no complete pack: {len(files)} file(s), the largest holds "
                f"{file_tokens.max(initial=0)} tokens, fewer than a row of {self.row_length} "
                "(packs never cross files)")
        self.index = None
        if dataset_weights is not None:
            self.index = weighted_pack_index(self.rel_paths, np.diff(self.file_packs),
                                             dataset_weights, seed)

    def __len__(self) -> int:
        return int(self.file_packs[-1]) if self.index is None else len(self.index)
    def pack_span(self, pack: int):
        """``(file, first, first_token, last, stop_token)`` of global pack ``pack``.

        The pack holds tokens ``[first_token:]`` of sample ``first`` (an index into
        ``offsets``), the samples in between, and ``[:stop_token]`` of sample ``last``:
        XTuner's ``PackedDataset.mapping``, including its choice, when a sample ends
        exactly at a pack boundary, to start the next pack at the following sample.
        """
        f = int(np.searchsorted(self.file_packs, pack, side="right")) - 1
        lo, hi = int(self.file_samples[f]), int(self.file_samples[f + 1])
        ends = self.bounds[lo + 1:hi + 1]
        q = pack - int(self.file_packs[f])
        start = int(self.bounds[lo]) + q * self.row_length
        stop = start + self.row_length
        first, first_token = lo, 0
        if q > 0:
            first = lo + int(np.searchsorted(ends, start, side="left"))
            first_token = start - int(self.bounds[first])
            if first_token == int(self.bounds[first + 1] - self.bounds[first]):
                first, first_token = first + 1, 0
        last = lo + int(np.searchsorted(ends, stop, side="left"))
        return f, first, first_token, last, stop - int(self.bounds[last])

    def __getitem__(self, item: int) -> dict:
        item = range(len(self))[operator.index(item)]
        pack = int(self.index[item]) if self.index is not None else item
        f, first, first_token, last, stop_token = self.pack_span(pack)
        lengths = np.diff(self.bounds[first:last + 2])
        # The pack holds tokens [skip, skip + take) of each of its samples (skip is 0 but
        # for the first).
        take = lengths.copy()
        take[-1] = stop_token
        take[0] -= first_token
        row = self.row_length
        segments = np.zeros(len(take) + 1, dtype=np.int64)
        np.cumsum(take, out=segments[1:])
        # Each token's place in its sample's part: where it is read from, and XTuner's
        # position_ids (one pass serves both).
        in_sample = np.repeat(segments[:-1], take)
        np.subtract(self._row_positions, in_sample, out=in_sample)
        # InternEvo's alignment labels a cut sample's last token in the pack with the
        # sample's next token: read one more.
        cut = bool(stop_token < lengths[-1])
        tokens = self._read(f, first, last, lengths, first_token, take, in_sample,
                            self.labels_shifted and cut)
        input_ids = np.absolute(tokens[:row], dtype=np.int64)

        if self.labels_shifted:
            labels = np.empty(row, dtype=np.int64)
            labels[:-1] = tokens[1:row]
            labels[-1] = tokens[row] if cut else 0
            ends = segments[1:] - 1
            ends_sample = take > 0
            ends_sample[-1] &= not cut
            labels[ends[ends_sample]] = 0  # no next token in the sample: no target
            labels = np.where(labels > 0, labels, IGNORE_INDEX)
        else:
            labels = np.where(tokens[:row] > 0, input_ids, IGNORE_INDEX)
        if self.micro_bsz == 1:
            cumulative, position_ids = segments, in_sample
        else:
            windows = _split_windows(take, self.packed_length)
            cumulative = np.zeros(len(windows) + 1, dtype=np.int64)
            np.cumsum(windows, out=cumulative[1:])
            position_ids = np.arange(row) - np.repeat(cumulative[:-1], windows)
        out = {"input_ids": input_ids,
               "cumulative_len": cumulative,
               "position_ids": position_ids,
               "labels": labels}
        if self.labels_shifted:
            out["labels_shifted"] = True
        return out

    def _read(self, f, first, last, lengths, first_token, take, in_sample, extra) -> np.ndarray:
        """The pack's tokens, signs as stored (int32 from the token index, else int64
        parsed from the ``.bin``), ``[take.sum() + extra]``: ``take`` (int64 ``[k]``)
        tokens of each of samples ``first..last`` of file ``f`` (``lengths`` int64
        ``[k]`` tokens each), from ``first_token`` on for the first and from 0 for the
        others, back to back; ``in_sample`` (int64 ``[take.sum()]``) each one's place
        in its sample's part; ``extra``: plus the last sample's next token."""
        path = self.index_paths[f]
        index = None if path is None else open_index(path)
        if index is not None:
            source, base = index, self.token_starts[first:last + 1].copy()
        else:
            if path is not None:
                _warn_missing_index(path)
            source = read_samples(self.paths[f], self.offsets[first:last + 1], lengths)
            base = np.cumsum(lengths) - lengths
        base[0] += first_token
        at = np.repeat(base, take)
        at += in_sample
        if extra:
            at = np.append(at, at[-1] + 1)
        return source[at]


_MISSING_INDEXES = set()  # per process: warned once


def _warn_missing_index(path: str) -> None:
    if not _MISSING_INDEXES:
        warnings.warn(f"token index {path} not found on this machine (is cache_dir shared "
                      "by every node?): packs are parsed from the .bin files when read",
                      FtdpDataWarning, stacklevel=3)
    _MISSING_INDEXES.add(path)


def _split_windows(segments: np.ndarray, window: int) -> np.ndarray:
    """Split int64 ``[s]`` segment lengths into windows of at most ``window``.

    A segment of ``n`` tokens becomes ``n // window`` full windows plus the remainder;
    an empty segment stays one empty window (XTuner's repeated boundary).
    """
    full, rest = np.divmod(segments, window)
    counts = full + ((rest > 0) | (segments == 0))
    out = np.full(int(counts.sum()), window, dtype=np.int64)
    last = np.cumsum(counts) - 1
    out[last] = np.where(rest > 0, rest, np.where(segments == 0, 0, window))
    return out


def _as_files(datasets) -> list:
    """FtdpFiles from ours or from XTuner's ``JsonlDataset`` (``path``, ``offsets``, ``length``)."""
    if not isinstance(datasets, (list, tuple)):
        datasets = [datasets]
    files = []
    for ds in datasets:
        if isinstance(ds, FtdpFile):
            files.append(ds)
        elif all(hasattr(ds, a) for a in ("path", "offsets", "length")):
            files.append(_foreign_file(str(ds.path), ds.offsets, ds.length))
        else:
            raise TypeError(
                f"build_packed_dataset needs ftdp files (from load_intern_repo_tokenized_dataset"
                f"), got {type(ds).__name__}")
    return files


def _foreign_file(path, offsets, length) -> FtdpFile:
    """An FtdpFile for samples another loader kept (XTuner's ``min_length`` filter): each
    sample's meta row found by its offset."""
    offsets = np.asarray(offsets, dtype=np.int64)
    length = np.asarray(length, dtype=np.int64)
    meta_offsets, meta_lengths = read_meta(path)
    sorter = np.argsort(meta_offsets, kind="stable")
    at = np.minimum(np.searchsorted(meta_offsets[sorter], offsets), len(sorter) - 1)
    rows = sorter[at] if len(sorter) else at
    if len(rows) and not ((meta_offsets[rows] == offsets) & (meta_lengths[rows] == length)).all():
        raise FtdpFormatError(f"{path}: samples given that {path}.meta does not list")
    return FtdpFile(path, offsets, length, num_rows=len(meta_offsets), rows=rows)


def _build_rank0(dataset_cfg, packed_length, seed, options) -> PackedFtdpDataset:
    if isinstance(dataset_cfg, Mapping):
        from xtuner.registry import BUILDER

        dataset_cfg = BUILDER.build(dataset_cfg)
    return PackedFtdpDataset(_as_files(dataset_cfg), packed_length, seed, **options)


def build_packed_dataset(dataset_cfg, packed_length: int = 8192, seed: int = 1024, *,
                         label_alignment: str = "xtuner", micro_bsz: int = 1,
                         dataset_weights: Optional[Mapping[str, float]] = None,
                         check_lines: bool = True, cache_dir: Union[str, bool, None] = None
                         ) -> PackedFtdpDataset:
    """Drop-in for XTuner's ``build_packed_dataset`` (same arguments and items).

    ``dataset_cfg``: a config dict (built with XTuner's ``BUILDER``, e.g.
    ``dict(type=load_intern_repo_tokenized_dataset, folder=...)``), or the list it
    returns.  Keyword options are described in the module docstring.
    """
    options = dict(label_alignment=label_alignment, micro_bsz=micro_bsz,
                   dataset_weights=dataset_weights, check_lines=check_lines, cache_dir=cache_dir)
    if not (dist.is_available() and dist.is_initialized()):
        return _build_rank0(dataset_cfg, packed_length, seed, options)
    shared = [None]
    if dist.get_rank() == 0:
        try:
            shared[0] = _build_rank0(dataset_cfg, packed_length, seed, options)
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            shared[0] = exc
    dist.broadcast_object_list(shared, src=0)
    if isinstance(shared[0], Exception):
        if dist.get_rank() == 0:
            raise shared[0]
        raise RuntimeError(f"rank 0 failed to build the packed dataset: {shared[0]}") \
            from shared[0]
    return shared[0]
