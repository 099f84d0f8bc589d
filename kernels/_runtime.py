"""Shared launcher utilities: interpreter detection, autotune configs, input checks.

Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before the kernel modules are imported), which is how
the test-suite runs on machines without a GPU.
"""

import collections
import functools
import os
import threading
import weakref
from typing import Callable, Hashable, Iterable, Optional, Sequence

import torch
import triton

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# The floating-point dtypes every kernel takes.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints.

    Launchers call this on every launch; ``triton.cdiv`` is a constexpr function
    whose host call costs microseconds, which adds up at small shapes.
    """
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for 0, as triton's); see ``cdiv`` for why not
    triton's."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def autotune_configs(gpu_configs: Sequence[triton.Config],
                     interpreter_config: triton.Config) -> list:
    """Configs for ``@triton.autotune``: the full list on a GPU, one under the interpreter.

    The interpreter runs every program serially on the CPU, so tuning there costs
    minutes and measures nothing; with several configs it also needs a GPU timer.
    ``XTUNER_PATCH_AUTOTUNE=0`` (read at import) keeps only the first GPU config, so
    that broad GPU test runs compile each kernel once per shape instead of per config.
    """
    if INTERPRETER:
        return [interpreter_config]
    if os.environ.get("XTUNER_PATCH_AUTOTUNE", "1") == "0":
        return list(gpu_configs[:1])
    return list(gpu_configs)


def check_device(name: str, tensor: torch.Tensor) -> None:
    """Kernels need CUDA tensors, or CPU tensors when the Triton interpreter is on."""
    if tensor.is_cuda:
        return
    if tensor.device.type == "cpu" and INTERPRETER:
        return
    raise ValueError(
        f"{name} is on {tensor.device}; Triton kernels need a CUDA tensor "
        "(or CPU tensors with TRITON_INTERPRET=1 set before `kernels` is imported)")


def check_tensor(name: str, tensor, *, ndim: Optional[int] = None,
                 dtypes: Optional[Iterable[torch.dtype]] = None,
                 last_dim_contiguous: bool = False) -> None:
    """Raise a clear error naming ``name`` when ``tensor`` is not what a kernel expects."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if tensor.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {tensor.dtype}")
    if last_dim_contiguous and tensor.dim() > 0 and tensor.stride(-1) != 1 and tensor.shape[-1] > 1:
        raise ValueError(
            f"{name} must be contiguous in its last dimension (stride 1), "
            f"got strides {tuple(tensor.stride())}")
    check_device(name, tensor)


def as_rows(name: str, tensor: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``tensor`` as ``[rows, n_cols]`` with a single row stride, without copying.

    Any contiguous tensor qualifies, and so does a column slice of one (e.g. one half
    of a fused projection's output).
    """
    try:
        return tensor.view(-1, n_cols)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(tensor.shape)} and strides {tuple(tensor.stride())} "
            "cannot be addressed as rows with one row stride; pass .contiguous()") from None


def packed_heads(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The ``[tokens, h_0 + h_1 + ..., d]`` contiguous tensor of which ``tensors`` (each
    ``[tokens, h_i, d]``) are consecutive head ranges, as a view; None when they are not
    laid out so (a packed ``qkv``, or a sequence-parallel receive buffer, is)."""
    first = tensors[0]
    if first.dim() != 3:
        return None
    tokens, _, head_dim = first.shape
    heads = sum(t.shape[1] for t in tensors)
    storage = first.untyped_storage().data_ptr()
    expected_ptr = first.data_ptr()
    for t in tensors:
        if (t.dim() != 3 or t.shape[0] != tokens or t.shape[2] != head_dim
                or t.dtype != first.dtype or t.device != first.device
                or t.stride() != (heads * head_dim, head_dim, 1)
                or t.untyped_storage().data_ptr() != storage or t.data_ptr() != expected_ptr):
            return None
        expected_ptr += t.shape[1] * head_dim * t.element_size()
    return first.as_strided((tokens, heads, head_dim), (heads * head_dim, head_dim, 1))


def check_cu_seqlens(name: str, cu_seqlens, total_tokens: Optional[int]) -> torch.Tensor:
    """Validate a flash-attn style cumulative sequence-length vector.

    ``cu_seqlens`` must be an int32 tensor ``[batch + 1]`` that starts at 0, never
    decreases and ends at ``total_tokens`` (any end when it is None, e.g. when the
    tensor describes a whole packing of which the caller holds a shard).  Returns the
    per-sequence lengths (int64, on the host) so launchers can size their grids without
    a second device sync.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 1 entries, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    host = cu_seqlens.detach().to("cpu", torch.int64)
    if int(host[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(host[0])}")
    lengths = host[1:] - host[:-1]
    if lengths.numel() and int(lengths.min()) < 0:
        bad = int(torch.nonzero(lengths < 0)[0, 0])
        raise ValueError(f"{name} must be non-decreasing, but {name}[{bad + 1}]="
                         f"{int(host[bad + 1])} < {name}[{bad}]={int(host[bad])}")
    if total_tokens is not None and int(host[-1]) != total_tokens:
        raise ValueError(f"{name} must end at the token count {total_tokens}, "
                         f"got {int(host[-1])}")
    return lengths


def check_max_seqlen(name: str, max_seqlen: int, longest: int, cu_seqlens_name: str) -> None:
    """flash-attn's ``max_seqlen`` arguments must be at least the longest sequence."""
    if max_seqlen < longest:
        raise ValueError(f"{name}={max_seqlen} is smaller than the longest sequence in "
                         f"{cu_seqlens_name} ({longest})")


class TensorMemo:
    """Values derived from tensors' contents, reused while the same tensors come back unmodified.

    Launchers use it for what needs a tensor's values on the host (a device sync), such
    as validating ``cu_seqlens``: the layers of a model pass the same ``cu_seqlens``
    tensor within a step, so only the first layer pays.  An entry matches when every
    tensor is the very object it was computed from, with the same version counter
    (in-place writes through PyTorch bump it), and the extra key is equal.  Entries hold
    weak references, so a memo keeps no tensor alive (an attention mask can be large),
    and an entry whose tensor has died matches nothing, even a new tensor at the same
    address.  Writes that bypass the counter (``.data``, NumPy views) are not seen.
    Inference-mode tensors have no counter and are never memoised (nor are non-tensors:
    ``compute`` then runs and reports them).  The ``size`` most
    recently used entries are kept.  Thread-safe.
    """

    def __init__(self, size: int = 8):
        self._size = size
        self._entries = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, tensors: Sequence[torch.Tensor], extra: Hashable, compute: Callable):
        """``compute()``, or its value from an earlier call with the same tensors and ``extra``."""
        if any(not isinstance(t, torch.Tensor) or t.is_inference() for t in tensors):
            return compute()
        key = tuple(id(t) for t in tensors) + (extra,)
        versions = tuple(t._version for t in tensors)
        with self._lock:
            entry = self._entries.get(key)
            if (entry is not None and entry[1] == versions
                    and all(ref() is t for ref, t in zip(entry[0], tensors))):
                self._entries.move_to_end(key)
                return entry[2]
        value = compute()
        with self._lock:
            self._entries[key] = (tuple(weakref.ref(t) for t in tensors), versions, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return value


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 under the interpreter.

    Persistent-style launchers size their grids with it.  The interpreter runs
    programs one after another, so a few programs still exercise the multi-program
    code paths without making CPU tests slow.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_multiprocessor_count(index)
    return 4


@functools.lru_cache(maxsize=None)
def _cuda_multiprocessor_count(index: int) -> int:
    # Cached: launchers call this on every backward pass.
    return torch.cuda.get_device_properties(index).multi_processor_count
