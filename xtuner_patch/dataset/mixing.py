"""``dataset_weights``: mixing ratios between folders of an ftdp dataset (XTuner has none).

``dataset_weights = {"cn": 1, "en": 3}`` or ``{"en/code_en": 2, "en": 1, "cn": 1}``.

Semantics:

- A key is a folder (or file) path relative to the dataset folder, ``/``-separated;
  ``"."`` is the whole folder.  Every file belongs to the group of its longest matching
  key.  A file that no key covers, or a key that covers no file, is an error (give a
  weight of 0 to leave data out on purpose).
- Weights are proportions of **tokens** (input tokens, not samples and not supervised
  tokens).  Every pack holds the same number of tokens, so group ``g`` gets
  ``n_g = N * w_g / sum(w)`` packs, rounded by largest remainder so the ``n_g`` sum to
  ``N``, where ``N`` (the epoch length) is the natural number of packs of the groups
  with a non-zero weight.
- Packs are what XTuner would build (unchanged contents).  A group with more packs
  than ``n_g`` contributes a random subset of them; one with fewer repeats all of its
  packs ``n_g // P_g`` times plus a random subset of ``n_g % P_g`` packs.
- The chosen packs are shuffled together, so groups interleave even with
  ``shuffle=False``.  Everything is drawn from ``RandomState(seed)`` over the groups in
  sorted key order: same data, weights and seed give the same order.
"""

import posixpath
from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = ["group_files", "weighted_pack_index"]


def _norm_key(key: str) -> str:
    return posixpath.normpath(str(key).replace("\\", "/").strip("/") or ".")


def _covers(key: str, rel_path: str) -> bool:
    return key == "." or rel_path == key or rel_path.startswith(key + "/")


def group_files(rel_paths: Sequence[Optional[str]], keys) -> list:
    """For each file, the longest normalised key covering it (ValueError if none)."""
    if any(p is None for p in rel_paths):
        raise ValueError("dataset_weights needs files loaded by xtuner_patch.dataset."
                         "load_intern_repo_tokenized_dataset (their paths relative to the folder)")
    norm = sorted({_norm_key(k) for k in keys}, key=lambda k: (k != ".", len(k)))
    groups, uncovered = [], []
    for rel in rel_paths:
        best = None
        for key in norm:
            if _covers(key, rel):
                best = key
        if best is None:
            uncovered.append(rel)
        groups.append(best)
    if uncovered:
        raise ValueError(f"dataset_weights covers no key for {len(uncovered)} file(s), e.g. "
                         f"{uncovered[:3]}; add a key (weight 0 leaves a folder out)")
    return groups


def weighted_pack_index(rel_paths: Sequence[Optional[str]], packs_per_file: np.ndarray,
                        weights: Mapping[str, float], seed: int) -> np.ndarray:
    """Global pack ids (int64 ``[N]``) of the mixed epoch; see the module docstring.

    ``rel_paths``: per file, its path relative to the dataset folder;
    ``packs_per_file``: int ``[F]`` natural packs per file (files' packs are numbered
    consecutively in file order).
    """
    if not weights:
        raise ValueError("dataset_weights is empty")
    by_key = {}
    for key, w in weights.items():
        w = float(w)
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"dataset_weights[{key!r}] = {w}: weights must be finite and >= 0")
        by_key[_norm_key(key)] = w
    groups = group_files(rel_paths, by_key)
    unused = sorted(set(by_key) - set(groups))
    if unused:
        raise ValueError(f"dataset_weights keys {unused} match no data file")
    packs_per_file = np.asarray(packs_per_file, dtype=np.int64)
    first_pack = np.cumsum(packs_per_file) - packs_per_file
    keys = sorted(by_key)
    members = {k: np.concatenate([np.arange(first_pack[i], first_pack[i] + packs_per_file[i])
                                  for i, g in enumerate(groups) if g == k]) for k in keys}
    w = np.array([by_key[k] for k in keys])
    if w.sum() <= 0:
        raise ValueError("dataset_weights: at least one weight must be > 0")
    total = int(sum(len(members[k]) for k, wk in zip(keys, w) if wk > 0))
    share = total * w / w.sum()
    counts = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[:total - int(counts.sum())]] += 1
    rng = np.random.RandomState(seed)
    chosen = []
    for key, n in zip(keys, counts.tolist()):
        ids = members[key]
        if n and not len(ids):
            raise ValueError(f"dataset_weights[{key!r}] > 0 but its files hold no complete pack")
        if n:
            reps, rest = divmod(n, len(ids))
            chosen.append(np.tile(ids, reps))
            chosen.append(rng.choice(ids, rest, replace=False))
    index = np.concatenate(chosen)
    return index[rng.permutation(len(index))]
