"""What a training step's throughput is judged against: the device's matmul peak (measured
in the same run), model FLOPs, MFU, and how many InternLM2 layers a device's memory holds.

``matmul_tflops(device, dtype, n)`` times ``n x n @ n x n`` (the largest square GEMM
shape a step's projections approach) once per session and case; MFU is model FLOP/s over
it.  :func:`layers_that_fit` sizes the InternLM2-7B row of the training-step benchmark
to the device: bf16 weights, bf16 gradients and AdamW's two bf16 states (8 bytes per
parameter) of every layer and of the embedding and head, plus what XTuner's stock path
needs for the activations and logits of the step, must fit the device with a margin.
"""

import functools
import time

import torch


def _time_median(fn, rounds: int, device: str) -> float:
    times = []
    for _ in range(rounds + 1):  # the first call warms up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    return times[len(times) // 2]


@functools.lru_cache(maxsize=None)
def matmul_tflops(device: str, dtype: torch.dtype, n: int, rounds: int = 10) -> float:
    """Measured TFLOP/s of one ``[n, n] @ [n, n]`` in ``dtype`` on ``device`` (the
    median of ``rounds``; 10 back-to-back products per round so that launch gaps do
    not count)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)

    def ten():
        for _ in range(10):
            torch.mm(a, b)

    return 10 * 2.0 * n ** 3 / _time_median(ten, rounds, device) / 1e12


def model_flops(config, lengths) -> float:
    """Training FLOPs of one step of InternLM2 ``config`` on packed samples of ``lengths``
    tokens: 6 x non-embedding parameters (and the head) x tokens, plus the causal
    attention of each sample (forward 4 h d per pair, backward twice that); the
    recomputation of activation checkpointing is not counted."""
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    hd = h // config.num_attention_heads
    kv = config.num_key_value_heads * hd
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * config.intermediate_size
    tokens = sum(lengths)
    dense = 6.0 * (layers * per_layer + h * vocab) * tokens
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    attention = 3 * 4.0 * config.num_attention_heads * hd * pairs * layers
    return dense + attention


def layers_that_fit(total_bytes: float, config: dict, stock_step_bytes: float,
                    margin_bytes: float) -> int:
    """The most decoder layers (at most ``config['num_hidden_layers']``) whose training
    state fits ``total_bytes`` beside the embedding's and head's, ``stock_step_bytes``
    (the activations and logits of XTuner's stock step, measured or estimated) and
    ``margin_bytes``; 0 when not even one does.

    ``config``: an InternLM2 ``config.json`` dict.  8 bytes per parameter: bf16 weight,
    bf16 gradient, AdamW's two bf16 states.
    """
    h, inter = config["hidden_size"], config["intermediate_size"]
    hd = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd
    per_layer = 8 * (h * (h + 2 * kv) + h * h + 3 * h * inter + 2 * h)
    outside = 8 * (2 * config["vocab_size"] * h + h)
    room = total_bytes - outside - stock_step_bytes - margin_bytes
    return max(0, min(config["num_hidden_layers"], int(room // per_layer)))
