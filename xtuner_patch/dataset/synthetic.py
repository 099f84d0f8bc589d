"""Random ftdp corpora of any size, for tests and benchmarks (seconds per million samples).

Unlike :mod:`xtuner_patch.fixtures.ftdp` (a small corpus a tiny model can learn), these
are random tokens shaped to exercise the data path: log-normal SFT-like lengths,
samples longer than a pack, zero-token samples, token id 0, negative (prompt) tokens,
int32 and int64 meta.
"""

import os
from typing import Mapping, Tuple, Union

import numpy as np

from .ftdp import write_ftdp_file

__all__ = ["write_synthetic_corpus"]


def write_synthetic_corpus(root: str, files: Mapping[str, Union[int, Tuple[int, str]]], *,
                           seed: int = 0, vocab_size: int = 92544, median_length: float = 40.0,
                           sigma: float = 0.9, max_length: int = 4096, long_length: int = 0,
                           zero_length: float = 0.0, zero_token: float = 0.0,
                           prompt: float = 0.6) -> dict:
    """Write ``root/<name>.bin`` (+ ``.meta``) for every ``name`` in ``files``.

    ``files`` maps a relative name (no ``.bin``) to a sample count or ``(count,
    meta_dtype)`` (default int64); files are written in sorted name order from one
    ``RandomState(seed)``.  Lengths: log-normal with ``median_length`` and ``sigma``,
    clipped to ``[1, max_length]``; with ``long_length``, one sample per file (if it has
    more than two) has that length.  ``zero_length``/``zero_token``: fractions of
    zero-token samples / of tokens equal to 0.  A ``prompt`` fraction of samples starts
    with a negative (input-only) prefix of up to half their length.  Token 1 (BOS)
    leads every non-empty sample.

    Returns ``{"files": [bin paths], "samples": int, "tokens": int,
    "supervised_tokens": int}`` (supervised: tokens > 0).
    """
    rng = np.random.RandomState(seed)
    summary = {"files": [], "samples": 0, "tokens": 0, "supervised_tokens": 0}
    for name in sorted(files):
        spec = files[name]
        count, meta_dtype = spec if isinstance(spec, tuple) else (spec, "int64")
        lengths = np.clip(rng.lognormal(np.log(median_length), sigma, count), 1, max_length)
        lengths = lengths.astype(np.int64)
        if long_length and count > 2:
            lengths[count // 2] = long_length
        lengths[rng.random_sample(count) < zero_length] = 0
        tokens = rng.randint(2, vocab_size, size=int(lengths.sum())).astype(np.int64)
        tokens[rng.random_sample(len(tokens)) < zero_token] = 0
        starts = np.cumsum(lengths) - lengths
        tokens[starts[lengths > 0]] = 1
        prompt_len = np.where(rng.random_sample(count) < prompt,
                              (rng.random_sample(count) * (lengths // 2 + 1)).astype(np.int64), 0)
        within = np.arange(len(tokens)) - np.repeat(starts, lengths)
        tokens[within < np.repeat(prompt_len, lengths)] *= -1
        path = os.path.join(root, name + ".bin")
        write_ftdp_file(path, tokens, lengths, meta_dtype)
        summary["files"].append(path)
        summary["samples"] += count
        summary["tokens"] += len(tokens)
        summary["supervised_tokens"] += int(np.count_nonzero(tokens > 0))
    return summary


# How each line shape is made from json.dumps' line (``{"tokens": [1, -2]}``): byte
# replacements, applied in order.  Other keys hold the characters that could fool a
# scanner: quotes, brackets, "tokens" inside strings, digits, nested objects.
LINE_SHAPES = {
    "dumps": [],
    "compact": [(b", ", b","), (b'{"tokens": [', b'{"tokens":[')],
    "key_after": [(b"]}\n", b'], "id": 12, "text": "a \\"tokens\\": [1, 2] ] {", "n": -3.5}\n')],
    "key_before": [(b'{"tokens": [', b'{"meta": {"source": "web", "tokens_seen": [7, 8]}, '
                                       b'"ok": true, "tokens": [')],
    "spaced": [(b", ", b" ,\t"), (b'{"tokens": [', b'{ "tokens" :\t[ '), (b"]}\n", b" ] } \r\n")],
}


def rewrite_lines(bin_path: str, shape: str) -> None:
    """Rewrite a ``.bin`` written by ``write_ftdp_file`` in another valid line ``shape``
    (a key of :data:`LINE_SHAPES`), with its meta's offsets (same dtype) updated."""
    with open(bin_path, "rb") as f:
        data = f.read()
    for old, new in LINE_SHAPES[shape]:
        data = data.replace(old, new)
    with open(bin_path, "wb") as f:
        f.write(data)
    meta = np.load(bin_path + ".meta")
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    meta[:, 0] = np.concatenate([[0], ends[:-1] + 1])[:len(meta)]
    with open(bin_path + ".meta", "wb") as f:
        np.save(f, meta)
