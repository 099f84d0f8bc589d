"""InternEvo <-> Hugging Face InternLM2 checkpoints, for any tensor / pipeline parallel layout.

The InternEvo side, as InternEvo's own source writes and reads it
(``internlm/checkpoint/components.py``, ``internlm/model/modeling_internlm2.py``,
``internlm/model/modules/{mha,mlp}.py``, ``internlm/initialize/launch.py``):

- a folder with ``model_config.pt`` (the training config's ``model`` dict) and one state dict
  per rank, ``model_tp{t}_pp{p}.pt``; with ``parallel.tensor.mode="isp"`` the ranks are
  weight-parallel and the files ``model_wp{w}_pp{p}.pt``;
- layer indices restart at 0 on every pipeline stage; the first stage holds the embedding,
  the last one ``norm`` and ``output``; stage ``p`` of ``P`` holds ``L // P`` layers, one more
  for the last ``L % P`` stages;
- column-parallel weights (``wqkv`` or ``wq``/``wk``/``wv``, ``w1``, ``w3``, ``output``) are
  split on dim 0 and row-parallel ones (``wo``, ``w2``) on dim 1 (dim 0 under isp); the
  embedding on dim 1 when ``embed_split_hidden``, else dim 0; norms are replicated;
- ``wqkv`` rows are grouped per kv head exactly as in HF; with ``qk_interleaved=True``
  (older configs: ``adapt_hf=False``) the q and k rows of each head hold the rotary pairs
  side by side (even/odd) where HF keeps them half a head apart;
- the MLP width is ``multiple_of * ceil(int(hidden_size * mlp_ratio) / multiple_of)``
  (``multiple_of`` 256 unless the config says otherwise).
"""

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from ..atomic import atomic_output_dir
from ..errors import check_positive
from .hf_folder import HF_CHECKPOINT_FILES, complete_internlm2_config, write_internlm2_files
from ._io import (ConversionError, Progress, SafetensorsFolder, ShardedSafetensorsWriter,
                  load_model_config, load_state_dict, parse_size, release_freed_memory)

CONFIG_FILE = "model_config.pt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_SHARD_RE = re.compile(r"model_(tp|wp)(\d+)_pp(\d+)\.pt")

# How each weight is split over the ranks of a stage (None: replicated).
_COL, _ROW, _EMBED = "column", "row", "embedding"
_LAYER_SPLIT = {
    "attention_norm.weight": None,
    "attention.wqkv.weight": _COL,
    "attention.wq.weight": _COL,
    "attention.wk.weight": _COL,
    "attention.wv.weight": _COL,
    "attention.wo.weight": _ROW,
    "ffn_norm.weight": None,
    "feed_forward.w1.weight": _COL,
    "feed_forward.w3.weight": _COL,
    "feed_forward.w2.weight": _ROW,
}
_FUSED_QKV = ("attention.wqkv.weight",)
_SPLIT_QKV = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight")
# The order layers are written in, on both sides (the HF names are "model.layers.{i}." + these).
_HF_LAYER = ("attention_norm.weight", "attention.wqkv.weight", "attention.wo.weight",
             "ffn_norm.weight", "feed_forward.w1.weight", "feed_forward.w3.weight",
             "feed_forward.w2.weight")
_EMBED_KEYS = ("tok_embeddings.weight", "tok_embeddings.word_embeddings.weight")
_HEAD_KEYS = ("norm.weight", "output.weight")
_TOP_SPLIT = {"embed": _EMBED, "norm.weight": None, "output.weight": _COL}
_HF_TOP = {"embed": "model.tok_embeddings.weight", "norm.weight": "model.norm.weight",
           "output.weight": "output.weight"}
_INTERNEVO_OWNED = [r"model_(tp|wp)\d+_pp\d+\.pt", re.escape(CONFIG_FILE)]


@dataclass
class Arch:
    """The InternLM2 shapes and hyper-parameters both formats describe."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    rope_scaling: Optional[dict] = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def shape(self, key: str) -> Tuple[int, ...]:
        """Full (unsplit) shape of a layer suffix, ``"embed"``, or a head key."""
        h, d, i, v = self.hidden_size, self.head_dim, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * d, self.num_kv_heads * d
        return {"attention_norm.weight": (h,), "ffn_norm.weight": (h,), "norm.weight": (h,),
                "attention.wqkv.weight": (q + 2 * kv, h), "attention.wq.weight": (q, h),
                "attention.wk.weight": (kv, h), "attention.wv.weight": (kv, h),
                "attention.wo.weight": (h, q), "feed_forward.w1.weight": (i, h),
                "feed_forward.w3.weight": (i, h), "feed_forward.w2.weight": (h, i),
                "embed": (v, h), "output.weight": (v, h)}[key]

    def hf_config(self) -> dict:
        return complete_internlm2_config(dict(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings, rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps, rope_scaling=self.rope_scaling))


@dataclass
class Layout:
    """How an InternEvo checkpoint spreads the weights over ranks and stages."""

    mode: str  # "tp" (tensor parallel: mtp/msp/fsp) or "wp" (isp weight parallel)
    size: int
    pp: int
    embed_split_hidden: bool

    def split_dim(self, kind: Optional[str]) -> Optional[int]:
        if kind is None:
            return None
        if kind == _EMBED:
            return 1 if self.embed_split_hidden else 0
        return 1 if kind == _ROW and self.mode == "tp" else 0

    def file(self, rank: int, stage: int) -> str:
        return f"model_{self.mode}{rank}_pp{stage}.pt"


def _torch_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is not None and name not in DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name] if name else None


def stage_sizes(num_layers: int, pp: int) -> List[int]:
    """Layers per pipeline stage as InternEvo's ``partition_uniform`` assigns them."""
    if not 1 <= pp <= num_layers:
        raise ConversionError(f"pp={pp} must be between 1 and the {num_layers} layers "
                              "(InternEvo refuses empty pipeline stages)")
    base, extra = divmod(num_layers, pp)
    return [base + (p >= pp - extra) for p in range(pp)]


# ----------------------------------------------------------------------------- q/k row order
def _interleaved_to_half(head_dim: int) -> torch.Tensor:
    # Interleaved storage keeps rotary pair (2j, 2j + 1) side by side, HF at (j, j + d/2).
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _permute_qk(wqkv: torch.Tensor, arch: Arch, to_hf: bool) -> torch.Tensor:
    """Reorder the q and k rows of every head of a fused ``wqkv`` (v rows stay)."""
    perm = _interleaved_to_half(arch.head_dim)
    if not to_hf:
        perm = torch.argsort(perm)
    g = arch.group
    w = wqkv.reshape(arch.num_kv_heads, g + 2, arch.head_dim, -1)
    return torch.cat([w[:, :g + 1][:, :, perm], w[:, g + 1:]], dim=1).reshape(wqkv.shape)


def _fuse_qkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, arch: Arch) -> torch.Tensor:
    kv, d = arch.num_kv_heads, arch.head_dim
    parts = [wq.reshape(kv, arch.group, d, -1), wk.reshape(kv, 1, d, -1), wv.reshape(kv, 1, d, -1)]
    return torch.cat(parts, dim=1).reshape(-1, wq.shape[-1])


def _split_qkv(wqkv: torch.Tensor, arch: Arch) -> Tuple[torch.Tensor, ...]:
    g, h = arch.group, wqkv.shape[-1]
    w = wqkv.reshape(arch.num_kv_heads, g + 2, arch.head_dim, h)
    return w[:, :g].reshape(-1, h), w[:, g].reshape(-1, h), w[:, g + 1].reshape(-1, h)


# ----------------------------------------------------------------------------- InternEvo side
@dataclass
class _Stage:
    index: int
    files: List[str]
    num_layers: int
    qkv: Tuple[str, ...]
    embed_key: Optional[str]
    shapes: Dict[str, Tuple[int, ...]]  # per rank shard, keys as normalised
    dtypes: Dict[str, torch.dtype]


def _scan(src: str) -> Tuple[str, int, int]:
    """Parallel mode, rank count and stage count, from the shard file names."""
    if not os.path.isdir(src):
        raise ConversionError(f"{src}: not a folder")
    found, modes = set(), set()
    for name in sorted(os.listdir(src)):
        match = _SHARD_RE.fullmatch(name)
        if match:
            modes.add(match.group(1))
            found.add((int(match.group(2)), int(match.group(3))))
        elif name.startswith("model_") and name.endswith(".pt") and name != CONFIG_FILE:
            raise ConversionError(
                f"{os.path.join(src, name)}: unsupported shard (FSDP `_dp` shards and MoE "
                "expert files cannot be converted; only model_tp*_pp*.pt / model_wp*_pp*.pt)")
    if not found:
        raise ConversionError(f"{src}: no model_tp{{t}}_pp{{p}}.pt shards")
    if len(modes) > 1:
        raise ConversionError(f"{src}: mixes model_tp* and model_wp* shards")
    mode = modes.pop()
    size = 1 + max(t for t, _ in found)
    pp = 1 + max(p for _, p in found)
    missing = [f"model_{mode}{t}_pp{p}.pt" for p in range(pp) for t in range(size)
               if (t, p) not in found]
    if missing:
        raise ConversionError(f"{src}: missing shard(s) {', '.join(missing)} (found {mode} ranks "
                              f"0..{size - 1} and pipeline stages 0..{pp - 1})")
    return mode, size, pp


def _load_stage(src: str, layout: Layout, stage: int) -> List[Dict[str, torch.Tensor]]:
    """The stage's rank state dicts with InternEvo's ``model.`` prefix stripped."""
    states = []
    for rank in range(layout.size):
        path = os.path.join(src, layout.file(rank, stage))
        state = {}
        for key, tensor in load_state_dict(path).items():
            name = key[len("model."):] if key.startswith("model.") else key
            if name.endswith(".inv_freq"):  # rotary cache buffers of old versions
                continue
            if re.match(r"\d+\.", name):
                raise ConversionError(f"{path}: key {key!r} belongs to an interleaved pipeline "
                                      "(num_chunks > 1), which is not supported")
            if name in state:
                raise ConversionError(f"{path}: holds {name!r} twice (with and without "
                                      "the 'model.' prefix)")
            state[name] = tensor
        states.append(state)
    return states


def _inspect_stage(src: str, layout: Layout, stage: int) -> _Stage:
    states = _load_stage(src, layout, stage)
    files = [layout.file(rank, stage) for rank in range(layout.size)]
    for rank in range(1, layout.size):
        extra = set(states[0]).symmetric_difference(states[rank])
        if extra:
            key = sorted(extra)[0]
            has, lacks = (files[0], files[rank]) if key in states[0] else (files[rank], files[0])
            raise ConversionError(f"{os.path.join(src, lacks)}: lacks {key!r}, which {has} holds "
                                  "(shards of different checkpoints?)")
    layers: Dict[int, set] = {}
    embed = [k for k in _EMBED_KEYS if k in states[0]]
    for key in states[0]:
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if match and match.group(2) in _LAYER_SPLIT:
            layers.setdefault(int(match.group(1)), set()).add(match.group(2))
        elif key not in _EMBED_KEYS and key not in _HEAD_KEYS:
            raise ConversionError(
                f"{os.path.join(src, files[0])}: unknown key {key!r} (an InternLM2 checkpoint "
                "holds tok_embeddings, layers.N.{attention.wqkv|wq|wk|wv|wo, feed_forward.w1|w2|"
                "w3, attention_norm, ffn_norm}.weight, norm and output; biases are not supported)")
    path0 = os.path.join(src, files[0])
    if not layers:
        raise ConversionError(f"{path0}: holds no transformer layers (InternEvo never writes an "
                              "empty pipeline stage: extra or misnamed shards?)")
    if sorted(layers) != list(range(len(layers))):
        raise ConversionError(f"{path0}: layer indices {sorted(layers)} do not run 0..N-1")
    qkv = None
    for index in sorted(layers):
        have = layers[index]
        kind = _SPLIT_QKV if "attention.wq.weight" in have else _FUSED_QKV
        qkv = qkv or kind
        wanted = set(_LAYER_SPLIT) - set(_SPLIT_QKV if qkv == _FUSED_QKV else _FUSED_QKV)
        for suffix in sorted(wanted - have) + sorted(have - wanted):
            verb = "lacks" if suffix in wanted else "mixes split wq/wk/wv and fused wqkv at"
            raise ConversionError(f"{path0}: {verb} 'layers.{index}.{suffix}'")
    last = stage == layout.pp - 1
    if len(embed) > 1:
        raise ConversionError(f"{path0}: holds both {embed[0]!r} and {embed[1]!r}")
    if bool(embed) != (stage == 0):
        where = f"holds {embed[0]!r}" if embed else "lacks 'tok_embeddings.weight'"
        raise ConversionError(f"{path0}: {where}, but only the first pipeline stage holds the "
                              f"embedding (found stages 0..{layout.pp - 1}: missing or extra "
                              "pipeline shards?)")
    for key in _HEAD_KEYS:
        if (key in states[0]) != last:
            where = f"holds {key!r}" if not last else f"lacks {key!r}"
            raise ConversionError(f"{path0}: {where}, but only the last pipeline stage holds it "
                                  f"(found stages 0..{layout.pp - 1}: missing or extra pipeline "
                                  "shards?)")
    shapes, dtypes = {}, {}
    for key, tensor in states[0].items():
        for rank in range(1, layout.size):
            other = states[rank][key]
            if other.shape != tensor.shape or other.dtype != tensor.dtype:
                raise ConversionError(
                    f"{src}: {key!r} is {tuple(tensor.shape)} {tensor.dtype} in {files[0]} but "
                    f"{tuple(other.shape)} {other.dtype} in {files[rank]}")
        shapes[key], dtypes[key] = tuple(tensor.shape), tensor.dtype
    return _Stage(stage, files, len(layers), qkv, embed[0] if embed else None, shapes, dtypes)


def _qk_interleaved(config_path: str, cfg: dict) -> bool:
    # InternEvo's launch: qk_interleaved wins, adapt_hf is its opposite, False by default.
    if "qk_interleaved" in cfg:
        if "adapt_hf" in cfg and bool(cfg["adapt_hf"]) == bool(cfg["qk_interleaved"]):
            raise ConversionError(f"{config_path}: adapt_hf={cfg['adapt_hf']} and qk_interleaved"
                                  f"={cfg['qk_interleaved']} must be opposite")
        return bool(cfg["qk_interleaved"])
    return not cfg.get("adapt_hf", True)


_UNSUPPORTED = {
    "norm_type": (lambda v: str(v).lower() != "rmsnorm", "HF InternLM2 uses RMSNorm"),
    "apply_post_layer_norm": (bool, "HF InternLM2 normalises before each block"),
    "use_swiglu": (lambda v: not v, "HF InternLM2's MLP is SwiGLU"),
    "is_reward": (bool, "reward heads are not converted"),
    "num_chunks": (lambda v: v > 1, "interleaved pipeline checkpoints are not supported"),
}


def _check_supported(config_path: str, cfg: dict) -> None:
    for key, (bad, reason) in _UNSUPPORTED.items():
        if key in cfg and bad(cfg[key]):
            raise ConversionError(f"{config_path}: {key}={cfg[key]!r}: {reason}")


def _mlp_width(cfg: dict) -> Optional[int]:
    if "mlp_ratio" not in cfg:
        return None
    multiple = int(cfg.get("multiple_of", 256))
    return multiple * math.ceil(int(cfg["hidden_size"] * cfg["mlp_ratio"]) / multiple)


def _internevo_arch(src: str, cfg: dict, mode: str, size: int, stages: List[_Stage],
                    max_position_embeddings: Optional[int]) -> Tuple[Arch, Layout]:
    config_path = os.path.join(src, CONFIG_FILE)
    for key in ("hidden_size", "num_attention_heads", "vocab_size"):
        if key not in cfg:
            raise ConversionError(f"{config_path}: lacks {key!r}")
    _check_supported(config_path, cfg)
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_kv_attention_heads") or heads)
    head_dim = hidden // heads
    if hidden % heads or heads % kv_heads or (cfg.get("head_dim") or head_dim) != head_dim:
        raise ConversionError(f"{config_path}: hidden_size={hidden}, num_attention_heads={heads}, "
                              f"num_kv_attention_heads={kv_heads} do not make InternLM2 heads")
    if mode == "tp" and kv_heads % size:
        raise ConversionError(f"{src}: {size} tensor-parallel ranks (model_tp0..{size - 1}_pp*.pt) "
                              f"do not divide num_kv_attention_heads={kv_heads} of {CONFIG_FILE}: "
                              "extra shards or a wrong config?")
    total = sum(s.num_layers for s in stages)
    if cfg.get("num_layers", total) != total:
        held = ", ".join(f"pp{s.index}: {s.num_layers}" for s in stages)
        raise ConversionError(f"{config_path}: num_layers={cfg['num_layers']} but the shards hold "
                              f"{total} layers ({held}): missing or extra pipeline shards?")
    first = stages[0]
    w1 = first.shapes["layers.0.feed_forward.w1.weight"]
    width = w1[0] * size
    expected_width = _mlp_width(cfg)
    if expected_width is not None and expected_width != width:
        raise ConversionError(
            f"{config_path}: mlp_ratio={cfg['mlp_ratio']} (hidden_size={hidden}, multiple_of="
            f"{cfg.get('multiple_of', 256)}) makes the MLP {expected_width} wide, but "
            f"layers.0.feed_forward.w1.weight in {first.files[0]} is {w1} over {size} ranks")
    scaling = None
    if cfg.get("use_dynamic_ntk_rope"):
        scaling = {"type": "dynamic", "factor": float(cfg.get("rope_scaling_factor", 1.0))}
    arch = Arch(num_layers=total, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
                vocab_size=int(cfg["vocab_size"]), intermediate_size=width,
                rope_theta=float(cfg.get("rope_base", 10000)),
                rms_norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
                max_position_embeddings=int(max_position_embeddings
                                            or cfg.get("max_position_embeddings", 2048)),
                rope_scaling=scaling)
    embed_shape = first.shapes[first.embed_key]
    if "embed_split_hidden" in cfg:
        split_hidden = bool(cfg["embed_split_hidden"])
    else:
        # Not recorded: the shard's shape tells (vocab == hidden would be ambiguous, and
        # InternEvo's builder default, vocab split, is taken then).
        split_hidden = size > 1 and embed_shape == (arch.vocab_size, hidden // size) != (
            arch.vocab_size // size, hidden)
    layout = Layout(mode, size, len(stages), split_hidden)
    for stage in stages:
        for key, shape in stage.shapes.items():
            match = re.fullmatch(r"layers\.\d+\.(.+)", key)
            name = match.group(1) if match else ("embed" if key in _EMBED_KEYS else key)
            kind = _LAYER_SPLIT[name] if match else _TOP_SPLIT[name]
            want = list(arch.shape(name))
            dim = layout.split_dim(kind)
            if dim is not None:
                want[dim] //= size
            if tuple(want) != shape:
                raise ConversionError(
                    f"{os.path.join(src, stage.files[0])}: {key!r} is {shape}, but {CONFIG_FILE} "
                    f"(hidden_size={hidden}, num_attention_heads={heads}, num_kv_attention_heads="
                    f"{kv_heads}, vocab_size={arch.vocab_size}, embed_split_hidden={split_hidden})"
                    f" over {size} {mode} ranks makes it {tuple(want)}")
    qkv_kinds = {s.qkv for s in stages}
    if len(qkv_kinds) > 1:
        raise ConversionError(f"{src}: some stages store fused wqkv, others split wq/wk/wv")
    return arch, layout


def _hf_plan(arch: Arch, stages: List[_Stage]) -> Iterator[Tuple[int, str, str]]:
    """(stage, InternEvo key or layer suffix, HF name), in writing order."""
    offset = 0
    for stage in stages:
        if stage.embed_key:
            yield stage.index, stage.embed_key, _HF_TOP["embed"]
        for local in range(stage.num_layers):
            for suffix in _HF_LAYER:
                hf_name = f"model.layers.{offset + local}.{suffix}"
                yield stage.index, f"layers.{local}.{suffix}", hf_name
        offset += stage.num_layers
    for key in _HEAD_KEYS:
        yield stages[-1].index, key, _HF_TOP[key]


def _tokenizer_files(folder: str) -> List[str]:
    if not os.path.isdir(folder):
        raise ConversionError(f"{folder}: not a folder (the tokenizer folder to copy from)")
    names = sorted(n for n in os.listdir(folder) if n.startswith("tokeniz")
                   or n in ("special_tokens_map.json", "added_tokens.json"))
    if not names:
        raise ConversionError(f"{folder}: no tokenizer files (tokenizer.model, "
                              "tokenizer_config.json, tokenization_internlm2*.py, ...)")
    return names


def internevo_to_hf(src: str, dst: str, *, dtype: Optional[str] = None,
                    max_shard_size="5GB", max_position_embeddings: Optional[int] = None,
                    tokenizer: Optional[str] = None, overwrite: bool = False,
                    progress: Optional[bool] = None) -> dict:
    """Merge an InternEvo checkpoint folder into a Hugging Face InternLM2 folder.

    Args:
        src: folder with ``model_config.pt`` and ``model_tp{t}_pp{p}.pt`` (or ``model_wp``).
        dst: output folder, written atomically (:func:`xtuner_patch.atomic.atomic_output_dir`):
            created complete or, on any error or interruption, left as it was.
        dtype: ``float32`` / ``bfloat16`` / ``float16``; ``None`` keeps the stored dtypes.
        max_shard_size: largest safetensors shard (``"5GB"``, bytes, ...).
        max_position_embeddings: for ``config.json`` when ``model_config.pt`` has none
            (InternEvo's default then is 2048).
        tokenizer: an HF folder whose tokenizer files to copy next to the weights
            (InternEvo checkpoints carry none).
        overwrite: replace a non-empty ``dst`` (refused otherwise); the files of ``dst`` that
            a conversion does not write are kept.
        progress: show a progress bar (``None``: for models of 1 GiB or more).

    Returns:
        A summary: ranks, stages, layers per stage, q/k layout, bytes written, files.

    Memory: one pipeline stage is opened at a time (memory-mapped when the files allow)
    and every merged tensor is written out before the next is built.
    """
    out_dtype = _torch_dtype(dtype)
    max_shard_bytes = parse_size(max_shard_size, "max_shard_size")
    if max_position_embeddings is not None:
        check_positive("max_position_embeddings", max_position_embeddings)
    tokenizer_files = _tokenizer_files(tokenizer) if tokenizer else []
    mode, size, pp = _scan(src)
    cfg = load_model_config(os.path.join(src, CONFIG_FILE))
    stages = [_inspect_stage(src, Layout(mode, size, pp, False), p) for p in range(pp)]
    arch, layout = _internevo_arch(src, cfg, mode, size, stages, max_position_embeddings)
    interleaved = _qk_interleaved(os.path.join(src, CONFIG_FILE), cfg)
    norm_head = bool(cfg.get("norm_head", False))

    def source_dtype(stage: _Stage, key: str) -> torch.dtype:
        if key.endswith(_FUSED_QKV[0]) and stage.qkv == _SPLIT_QKV:
            key = key.replace(_FUSED_QKV[0], _SPLIT_QKV[0])
        return stage.dtypes[key]

    plan = list(_hf_plan(arch, stages))
    entries = []
    for p, key, hf_name in plan:
        short = "embed" if key in _EMBED_KEYS else re.sub(r"^layers\.\d+\.", "", key)
        entries.append((hf_name, arch.shape(short), out_dtype or source_dtype(stages[p], key)))
    torch_dtype = str(entries[0][2]).replace("torch.", "")
    with atomic_output_dir(dst, overwrite=overwrite, owned=HF_CHECKPOINT_FILES) as out:
        writer = ShardedSafetensorsWriter(out, entries, max_shard_bytes)
        bar = Progress(writer.total_size, "internevo2hf", progress)
        try:
            states, loaded = None, -1
            for p, key, hf_name in plan:
                if p != loaded:
                    # A live view of the previous stage would keep its files mapped.
                    states = pieces = None
                    states, loaded = _load_stage(src, layout, p), p
                pieces, dim = _merge(states, key, layout, stages[p].qkv, arch, interleaved,
                                     norm_head)
                bar.update(writer.write(hf_name, pieces, dim))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        write_internlm2_files(out, arch.hf_config(), torch_dtype)
        for name in tokenizer_files:
            shutil.copyfile(os.path.join(tokenizer, name), os.path.join(out, name))
    return {"mode": mode, "ranks": size, "pp": pp, "layers": [s.num_layers for s in stages],
            "qkv": "split" if stages[0].qkv == _SPLIT_QKV else "fused",
            "qk_interleaved": interleaved, "embed_split_hidden": layout.embed_split_hidden,
            "dtype": torch_dtype, "bytes": writer.total_size, "files": writer.files}


def _merge(states: List[Dict[str, torch.Tensor]], key: str, layout: Layout,
           qkv: Tuple[str, ...], arch: Arch, interleaved: bool,
           norm_head: bool) -> Tuple[List[torch.Tensor], int]:
    """One HF tensor from the stage's rank shards (``key`` as in :func:`_hf_plan`), as pieces
    to concatenate on a dim: only wqkv, whose rows get reordered, is built whole."""
    def pieces(name: str, kind: Optional[str]) -> Tuple[List[torch.Tensor], int]:
        dim = layout.split_dim(kind)
        if dim is None:
            return [states[0][name]], 0
        return [state[name] for state in states], dim

    def whole(name: str, kind: Optional[str]) -> torch.Tensor:
        parts, dim = pieces(name, kind)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)

    if key in _EMBED_KEYS:
        return pieces(key, _EMBED)
    if key == "output.weight" and norm_head:
        # InternEvo's norm head normalises the rows at every forward; HF stores them so.
        output = whole(key, _COL)
        return [torch.nn.functional.normalize(output.float(), dim=-1).to(output.dtype)], 0
    if key in _HEAD_KEYS:
        return pieces(key, _TOP_SPLIT[key])
    prefix, suffix = re.fullmatch(r"(layers\.\d+)\.(.+)", key).groups()
    if suffix != _FUSED_QKV[0]:
        return pieces(key, _LAYER_SPLIT[suffix])
    if qkv == _SPLIT_QKV:
        wqkv = _fuse_qkv(*(whole(f"{prefix}.{s}", _COL) for s in _SPLIT_QKV), arch)
    else:
        wqkv = whole(key, _COL)
    return [_permute_qk(wqkv, arch, to_hf=True) if interleaved else wqkv], 0


# ----------------------------------------------------------------------------- HF side
def _hf_arch(src: str) -> Arch:
    path = os.path.join(src, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: missing")
    with open(path) as f:
        cfg = json.load(f)
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "vocab_size") if k not in cfg]
    if missing:
        raise ConversionError(f"{path}: lacks {', '.join(missing)}")
    if cfg.get("model_type") != "internlm2":
        raise ConversionError(f"{path}: model_type={cfg.get('model_type')!r}, not 'internlm2'")
    for key in ("bias", "tie_word_embeddings"):
        if cfg.get(key):
            raise ConversionError(f"{path}: {key}=true has no InternEvo InternLM2 equivalent")
    scaling = cfg.get("rope_scaling")
    if scaling and scaling.get("type") != "dynamic":
        raise ConversionError(f"{path}: rope_scaling={scaling} (InternEvo has only dynamic NTK)")
    heads = cfg["num_attention_heads"]
    head_dim = cfg["hidden_size"] // heads
    if cfg["hidden_size"] % heads or (cfg.get("head_dim") or head_dim) != head_dim:
        raise ConversionError(f"{path}: head_dim must be hidden_size / num_attention_heads")
    return Arch(num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
                num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
                vocab_size=cfg["vocab_size"], intermediate_size=cfg["intermediate_size"],
                rope_theta=float(cfg.get("rope_theta", 10000)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                rope_scaling=scaling)


def _hf_names(arch: Arch) -> Dict[str, str]:
    """HF name -> layer suffix / ``"embed"`` / head key."""
    names = {_HF_TOP["embed"]: "embed"}
    for i in range(arch.num_layers):
        names.update({f"model.layers.{i}.{s}": s for s in _HF_LAYER})
    names.update({_HF_TOP[k]: k for k in _HEAD_KEYS})
    return names


def _check_hf(src: str, arch: Arch, weights: SafetensorsFolder) -> None:
    names = _hf_names(arch)
    for key, file in weights.file_of.items():
        if key not in names and not key.endswith(".inv_freq"):
            raise ConversionError(f"{os.path.join(src, file)}: unknown key {key!r} (config.json "
                                  f"has num_hidden_layers={arch.num_layers})")
    for key, short in names.items():
        if key not in weights.file_of:
            raise ConversionError(f"{src}: no tensor {key!r} in its safetensors (config.json has "
                                  f"num_hidden_layers={arch.num_layers})")
        if weights.shape(key) != arch.shape(short):
            raise ConversionError(
                f"{os.path.join(src, weights.file_of[key])}: {key!r} is {weights.shape(key)}, "
                f"but config.json (hidden_size={arch.hidden_size}, intermediate_size="
                f"{arch.intermediate_size}, num_attention_heads={arch.num_heads}, "
                f"num_key_value_heads={arch.num_kv_heads}, vocab_size={arch.vocab_size}) "
                f"makes it {arch.shape(short)}")


def _check_divisible(arch: Arch, layout: Layout, split_qkv: bool) -> None:
    n, what = layout.size, f"{layout.mode}={layout.size}"
    if layout.mode == "tp" and arch.num_kv_heads % n:
        raise ConversionError(f"{what} does not divide num_key_value_heads={arch.num_kv_heads}: "
                              "each tensor-parallel rank must hold whole kv groups")
    keys = ["embed", "output.weight"] + [s for s in _LAYER_SPLIT
                                         if s not in (_FUSED_QKV if split_qkv else _SPLIT_QKV)]
    for key in keys:
        kind = _TOP_SPLIT[key] if key in _TOP_SPLIT else _LAYER_SPLIT[key]
        dim = layout.split_dim(kind)
        if dim is not None and arch.shape(key)[dim] % n:
            raise ConversionError(f"{what} does not divide dim {dim} of {key} "
                                  f"{arch.shape(key)}")


def _mlp_ratio(hidden: int, width: int) -> Tuple[float, int]:
    """``mlp_ratio`` and ``multiple_of`` with which InternEvo rebuilds an MLP ``width`` wide."""
    multiple = math.gcd(width, 256)
    ratio = width / hidden
    if int(hidden * ratio) != width:  # float rounding below an integer
        ratio = math.nextafter(ratio, math.inf)
    assert multiple * math.ceil(int(hidden * ratio) / multiple) == width
    return ratio, multiple


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    # torch.save writes a view's whole underlying storage: give each piece its own.
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole and tensor.is_contiguous() else tensor.clone()


def _internevo_stage(weights: SafetensorsFolder, arch: Arch, layout: Layout, stage: int,
                     layers: range, out_dtype: Optional[torch.dtype], qk_interleaved: bool,
                     split_qkv: bool, bar: Progress) -> List[Dict[str, torch.Tensor]]:
    """The rank state dicts of one pipeline stage; every weight but wqkv goes from the file
    straight into its rank pieces, so a stage costs its own size and little more."""
    ranks: List[Dict[str, torch.Tensor]] = [{} for _ in range(layout.size)]

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if out_dtype is None else tensor.to(out_dtype)

    def put(key: str, name: str, kind: Optional[str]) -> None:
        dim = layout.split_dim(kind)
        bar.update(weights.nbytes(name))
        if dim is None:
            tensor = cast(weights.get(name))
            for rank in ranks:
                rank[key] = tensor
        else:
            for rank, piece in zip(ranks, weights.get_split(name, dim, layout.size)):
                rank[key] = cast(piece)

    def put_qkv(local: int, name: str) -> None:
        bar.update(weights.nbytes(name))
        wqkv = cast(weights.get(name))
        if qk_interleaved:
            wqkv = _permute_qk(wqkv, arch, to_hf=False)
        parts = zip(_SPLIT_QKV, _split_qkv(wqkv, arch)) if split_qkv else [(_FUSED_QKV[0], wqkv)]
        for suffix, part in parts:
            for rank, piece in zip(ranks, part.chunk(layout.size, 0)):
                rank[f"layers.{local}.{suffix}"] = _owned(piece)

    if stage == 0:
        put("tok_embeddings.weight", _HF_TOP["embed"], _EMBED)
    for local, index in enumerate(layers):
        for suffix in _HF_LAYER:
            name = f"model.layers.{index}.{suffix}"
            if suffix == _FUSED_QKV[0]:
                put_qkv(local, name)
            else:
                put(f"layers.{local}.{suffix}", name, _LAYER_SPLIT[suffix])
    if stage == layout.pp - 1:
        for key in _HEAD_KEYS:
            put(key, _HF_TOP[key], _TOP_SPLIT[key])
    return ranks


def hf_to_internevo(src: str, dst: str, *, tp: int = 1, pp: int = 1,
                    dtype: Optional[str] = None, embed_split_hidden: bool = True,
                    qk_interleaved: bool = False, split_qkv: bool = False, isp: bool = False,
                    overwrite: bool = False, progress: Optional[bool] = None) -> dict:
    """Split a Hugging Face InternLM2 folder into an InternEvo checkpoint folder.

    Args:
        src: HF folder (``config.json`` and safetensors, sharded or not).
        dst: output folder for ``model_config.pt`` and ``model_tp{t}_pp{p}.pt``, written
            atomically (:func:`xtuner_patch.atomic.atomic_output_dir`): created complete or,
            on any error or interruption, left as it was.
        tp: tensor-parallel ranks (must divide the kv heads); with ``isp`` the
            weight-parallel ranks, written as ``model_wp{w}_pp{p}.pt``.
        pp: pipeline stages, split as InternEvo's ``partition_uniform`` does.
        dtype: cast to ``float32`` / ``bfloat16`` / ``float16``; ``None`` keeps the dtypes.
        embed_split_hidden: split the embedding on the hidden dim (InternEvo's InternLM2
            configs) instead of the vocabulary.
        qk_interleaved: store q/k rows interleaved (``adapt_hf=False`` checkpoints).
        split_qkv: store ``wq``/``wk``/``wv`` instead of a fused ``wqkv``
            (``enable_qkv_fusion=False`` models).
        overwrite: replace a non-empty ``dst`` (refused otherwise); the files of ``dst`` that
            a conversion does not write are kept.
        progress: show a progress bar (``None``: for models of 1 GiB or more).

    Returns:
        A summary including ``model_config`` (the dict written to ``model_config.pt``).

    Memory: one pipeline stage's shards at a time.
    """
    out_dtype = _torch_dtype(dtype)
    check_positive("tp", tp)
    if not os.path.isdir(src):
        raise ConversionError(f"{src}: not a folder")
    arch = _hf_arch(src)
    weights = SafetensorsFolder(src)
    _check_hf(src, arch, weights)
    layout = Layout("wp" if isp else "tp", tp, pp, embed_split_hidden)
    sizes = stage_sizes(arch.num_layers, pp)
    _check_divisible(arch, layout, split_qkv)
    embed_dtype = out_dtype or weights.dtype(_HF_TOP["embed"])
    ratio, multiple = _mlp_ratio(arch.hidden_size, arch.intermediate_size)
    model_config = dict(
        num_chunks=1, checkpoint=False, dtype=str(embed_dtype),
        embed_split_hidden=embed_split_hidden, num_layers=arch.num_layers,
        hidden_size=arch.hidden_size, vocab_size=arch.vocab_size, embed_grad_scale=1,
        parallel_output=True, num_attention_heads=arch.num_heads,
        num_kv_attention_heads=arch.num_kv_heads, mlp_ratio=ratio, multiple_of=multiple,
        norm_type="rmsnorm", qk_interleaved=qk_interleaved, adapt_hf=not qk_interleaved,
        enable_qkv_fusion=not split_qkv, apply_post_layer_norm=False, no_bias=True,
        layer_norm_epsilon=arch.rms_norm_eps, rope_base=arch.rope_theta,
        max_position_embeddings=arch.max_position_embeddings, norm_head=False,
        use_flash_attn=True, use_dynamic_ntk_rope=bool(arch.rope_scaling))
    if arch.rope_scaling:
        model_config["rope_scaling_factor"] = float(arch.rope_scaling.get("factor", 1.0))
    with atomic_output_dir(dst, overwrite=overwrite, owned=_INTERNEVO_OWNED) as out:
        bar = Progress(sum(weights.nbytes(k) for k in _hf_names(arch)), "hf2internevo",
                       progress)
        try:
            start = 0
            for stage, count in enumerate(sizes):
                ranks = _internevo_stage(weights, arch, layout, stage,
                                         range(start, start + count), out_dtype,
                                         qk_interleaved, split_qkv, bar)
                for rank, state in enumerate(ranks):
                    torch.save(state, os.path.join(out, layout.file(rank, stage)))
                ranks = state = None  # the loop variable would keep the last rank alive
                release_freed_memory()
                start += count
        finally:
            bar.close()
        torch.save(model_config, os.path.join(out, CONFIG_FILE))
    return {"mode": layout.mode, "ranks": tp, "pp": pp, "layers": sizes,
            "files": [layout.file(t, p) for p in range(pp) for t in range(tp)],
            "model_config": model_config}
