"""Packed-row workloads shared by the benchmarks."""

import math

MIXES = ("equal-1k", "sft-lognormal", "one-sample")


def packed_lengths(mix: str, tokens: int) -> list:
    """Sample lengths of one packed row of ``tokens`` tokens for a length ``mix``.

    ``equal-1k``: 1024-token samples; ``one-sample``: one sample filling the row;
    ``sft-lognormal``: SFT conversations, median ~600 tokens with a long tail to 16k
    (seeded by ``tokens``), the last sample cut to fill the row exactly.
    """
    import torch

    if mix == "equal-1k":
        return [1024] * (tokens // 1024)
    if mix == "one-sample":
        return [tokens]
    if mix != "sft-lognormal":
        raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
    gen = torch.Generator().manual_seed(tokens)
    lengths, total = [], 0
    while total < tokens:
        draw = torch.empty(1).log_normal_(math.log(600.0), 1.0, generator=gen)
        length = min(max(int(draw), 16), 16384, tokens - total)
        lengths.append(length)
        total += length
    return lengths
