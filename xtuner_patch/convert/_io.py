"""File-level pieces of the converters: reading torch pickles, streaming safetensors shards
and progress reporting."""

import ctypes
import json
import os
import pickle
import re
import sys
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from ..errors import UserError


class ConversionError(UserError, ValueError):
    """A checkpoint that cannot be converted, or a bad argument; the message names the file
    and the key, or the argument."""


# ----------------------------------------------------------------------------- torch pickles
def load_state_dict(path: str) -> dict:
    """A rank's state dict, memory-mapped when the file allows it.

    With ``mmap`` a tensor costs nothing until its bytes are read, so a whole pipeline stage
    can be opened to check keys and shapes without loading it.
    """
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Files from torch < 1.6 (legacy, non-zip format) cannot be memory-mapped.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ConversionError(f"{path}: not a readable torch state dict ({exc})") from exc
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


class _InternEvoConfig(dict):
    """Stands in for InternEvo's ``Config`` (a ``dict`` subclass) when unpickling."""


_SAFE_GLOBALS = {("collections", "OrderedDict"), ("copyreg", "_reconstructor"),
                 ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"),
                 ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "object")}


class _ConfigUnpickler(pickle.Unpickler):
    # InternEvo saves ``gpc.config.model``, an ``internlm`` Config object: read it without
    # importing internlm and without letting the pickle name any other code.
    def find_class(self, module, name):
        if module == "internlm" or module.startswith("internlm."):
            return _InternEvoConfig
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


class _ConfigPickleModule:
    """What ``torch.load(pickle_module=...)`` needs, with every path through the Unpickler."""

    Unpickler = _ConfigUnpickler

    @staticmethod
    def load(file, **kwargs):
        return _ConfigUnpickler(file, **kwargs).load()


def load_model_config(path: str) -> dict:
    """InternEvo's ``model_config.pt`` as a plain dict (nested Config objects included)."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: missing (InternEvo writes the model config there)")
    try:
        try:
            cfg = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            cfg = torch.load(path, map_location="cpu", weights_only=False,
                             pickle_module=_ConfigPickleModule)
    except Exception as exc:  # noqa: BLE001
        raise ConversionError(f"{path}: cannot be read ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path}: holds a {type(cfg).__name__}, not a config dict")
    return _plain(cfg)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- arguments
def parse_size(text, name: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count, as a positive number of bytes;
    ``name`` (the argument, as the caller spells it) is in the error message."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGT]?)(I?B)?\s*",
                             str(text).upper())
        if not match:
            raise ConversionError(f"{name} must be a size such as 5GB, 500MB, 2GiB or a byte "
                                  f"count, got {text!r}")
        number, prefix, unit = match.groups()
        base = 1024 if unit == "IB" else 1000
        size = int(float(number) * base ** " KMGT".index(prefix or " "))
    if size <= 0:
        raise ConversionError(f"{name} must be > 0 bytes, got {text!r}")
    return size


# ----------------------------------------------------------------------------- safetensors
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
              torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}

Entry = Tuple[str, Tuple[int, ...], torch.dtype]


def _nbytes(entry: Entry) -> int:
    _, shape, dtype = entry
    count = 1
    for n in shape:
        count *= n
    return count * torch.empty((), dtype=dtype).element_size()


_ST_TORCH = {v: k for k, v in _ST_DTYPES.items()}
# Row blocks for moving a matrix between rank pieces and whole tensors: small next to a
# pipeline stage, large enough that reads and writes stay sequential and fast.
_READ_BLOCK_BYTES = _WRITE_BLOCK_BYTES = 16 << 20


class SafetensorsFolder:
    """The tensors of a Hugging Face folder's safetensors files, read one at a time.

    Plain reads rather than safetensors' memory map: mapped pages stay counted against the
    process until the whole file is closed, which would put the full model in memory.
    """

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
        if not files:
            raise ConversionError(f"{directory}: no *.safetensors weights (.bin checkpoints are "
                                  "not supported: re-save with safe_serialization=True)")
        self.directory, self.file_of, self._entries = directory, {}, {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise ConversionError(f"{index}: names {name}, which is missing")
            for key, (shape, dtype, start) in self._read_header(path).items():
                if key in self.file_of:
                    raise ConversionError(f"{directory}: {key!r} is in both "
                                          f"{self.file_of[key]} and {name}")
                self.file_of[key] = name
                self._entries[key] = (shape, dtype, start)

    @staticmethod
    def _read_header(path: str) -> dict:
        try:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            return {key: (tuple(v["shape"]), _ST_TORCH[v["dtype"]],
                          8 + size + v["data_offsets"][0]) for key, v in header.items()}
        except (OSError, ValueError, KeyError) as exc:
            raise ConversionError(f"{path}: not a readable safetensors file ({exc!r})") from exc

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._entries[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][1]

    def nbytes(self, key: str) -> int:
        shape, dtype, _ = self._entries[key]
        return _nbytes((key, shape, dtype))

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, self.file_of[key])

    def _fill(self, f, key: str, offset: int, tensor: torch.Tensor) -> None:
        f.seek(self._entries[key][2] + offset)
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        if f.readinto(view) != len(view):
            raise ConversionError(f"{self._path(key)}: truncated inside {key!r}")

    def get(self, key: str) -> torch.Tensor:
        shape, dtype, _ = self._entries[key]
        tensor = torch.empty(shape, dtype=dtype)
        with open(self._path(key), "rb") as f:
            self._fill(f, key, 0, tensor)
        return tensor

    def get_split(self, key: str, dim: int, parts: int) -> List[torch.Tensor]:
        """``get(key).chunk(parts, dim)`` as tensors of their own, read without ever holding
        the whole tensor (``dim`` must divide evenly)."""
        if parts == 1:
            return [self.get(key)]
        shape, dtype, _ = self._entries[key]
        piece_shape = shape[:dim] + (shape[dim] // parts,) + shape[dim + 1:]
        pieces = [torch.empty(piece_shape, dtype=dtype) for _ in range(parts)]
        row_bytes = self.nbytes(key) // shape[0]
        with open(self._path(key), "rb") as f:
            if dim == 0:
                for i, piece in enumerate(pieces):
                    self._fill(f, key, i * piece_shape[0] * row_bytes, piece)
                return pieces
            step = max(1, _READ_BLOCK_BYTES // row_bytes)
            # One buffer for all blocks: fresh ones fragment the heap and stay resident.
            buffer = torch.empty((min(step, shape[0]),) + shape[1:], dtype=dtype)
            for row in range(0, shape[0], step):
                block = buffer[:min(step, shape[0] - row)]
                self._fill(f, key, row * row_bytes, block)
                for piece, part in zip(pieces, block.chunk(parts, dim)):
                    piece[row:row + block.shape[0]] = part
        return pieces


class ShardedSafetensorsWriter:
    """Writes Hugging Face style sharded safetensors while the tensors are still being made.

    A safetensors header lists every tensor's offset, so the shards are laid out up front
    from ``entries`` (name, shape, dtype, in the order :meth:`write` will receive them); each
    tensor's bytes then go to disk as soon as it arrives and nothing is kept.  Files get their
    final names at once: ``directory`` is meant to be a temporary folder that becomes the
    output only when complete (:func:`xtuner_patch.atomic.atomic_output_dir`).
    """

    def __init__(self, directory: str, entries: Iterable[Entry], max_shard_bytes: int):
        self.directory = directory
        shards: List[List[Entry]] = [[]]
        size = 0
        for entry in entries:
            n = _nbytes(entry)
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += n
        count = len(shards)
        self.files = (["model.safetensors"] if count == 1 else
                      [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self._order = [(i, entry) for i, shard in enumerate(shards) for entry in shard]
        self._shards = shards
        self.total_size = sum(_nbytes(e) for _, e in self._order)
        self._next = 0
        self._handle = None
        self._open_shard = -1

    def _start_shard(self, index: int) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in self._shards[index]:
            end = offset + _nbytes((name, shape, dtype))
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, end]}
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
        self._handle = open(os.path.join(self.directory, self.files[index]), "wb")
        self._handle.write(len(raw).to_bytes(8, "little"))
        self._handle.write(raw)
        self._open_shard = index

    def _close_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def write(self, name: str, pieces: Sequence[torch.Tensor], dim: int = 0) -> int:
        """Write ``name`` as ``torch.cat(pieces, dim)`` cast to the planned dtype, without
        building the concatenation (rank shards go out a row block at a time); returns the
        bytes written."""
        index, (want_name, shape, dtype) = self._order[self._next]
        got = list(pieces[0].shape)
        got[dim] = sum(p.shape[dim] for p in pieces)
        if (name, tuple(got)) != (want_name, shape):
            raise RuntimeError(f"writer expected {want_name} {shape}, got {name} {tuple(got)}")
        if index != self._open_shard:
            self._close_shard()
            self._start_shard(index)
        if dim == 0 or len(pieces) == 1:
            for piece in pieces:
                self._write_bytes(piece.to(dtype))
        else:
            rows = max(1, _WRITE_BLOCK_BYTES // max(1, _nbytes((name, shape[1:], dtype))))
            buffer = torch.empty((min(rows, shape[0]),) + shape[1:], dtype=pieces[0].dtype)
            for row in range(0, shape[0], rows):
                block = buffer[:min(rows, shape[0] - row)]
                torch.cat([p[row:row + rows] for p in pieces], dim, out=block)
                self._write_bytes(block.to(dtype))
        self._next += 1
        return _nbytes((name, shape, dtype))

    def _write_bytes(self, tensor: torch.Tensor) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("safetensors stores little-endian bytes; this host is big-endian")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._handle.write(memoryview(data))

    def close(self) -> None:
        """Finish the last shard and, when there are several, write the index."""
        self._close_shard()
        if self._next != len(self._order):
            raise RuntimeError(f"writer closed after {self._next} of {len(self._order)} tensors")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {e[0]: self.files[i] for i, e in self._order}}
            with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)

    def abort(self) -> None:
        """Close the open file; what was written stays, incomplete, for the caller to remove."""
        self._close_shard()


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS.

    glibc keeps the small and mid-sized blocks of a freed pipeline stage mapped, so the
    next stage would count on top of it; ``malloc_trim`` (glibc only) returns them.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------- progress
PROGRESS_MIN_BYTES = 1 << 30


class Progress:
    """Bytes converted so far: a tqdm bar, or a line per 10% on stderr without tqdm.

    ``enabled=None`` shows it only for models of ``PROGRESS_MIN_BYTES`` or more.
    """

    def __init__(self, total: int, desc: str, enabled: Optional[bool] = None):
        self.total, self.desc, self.done = max(total, 1), desc, 0
        self._bar, self._shown = None, -1
        self.enabled = total >= PROGRESS_MIN_BYTES if enabled is None else enabled
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                             unit_divisor=1024, file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        tenth = 10 * self.done // self.total
        if tenth > self._shown:
            self._shown = tenth
            print(f"{self.desc}: {10 * tenth}% ({self.done >> 20} MiB)", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
