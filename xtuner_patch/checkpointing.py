"""Activation checkpointing chosen per InternLM2 decoder layer: ``none``, ``selective``
or ``full``, fixed or fitted into a memory budget.

Hook: Hugging Face's ``InternLM2Model.forward`` calls each decoder layer through
``self._gradient_checkpointing_func(layer.__call__, ...)`` when
``model.gradient_checkpointing`` and training (XTuner's ``use_activation_checkpointing``
sets it through ``gradient_checkpointing_enable``; PEFT may set it again).  :func:`install`
registers a forward pre-hook on the ``InternLM2Model`` that wraps whatever checkpoint
function is set there at that moment in a :class:`PolicyCheckpoint`, which per layer

- ``full``: calls the original function (XTuner's full-layer recompute, unchanged);
- ``none``: calls the layer directly (everything it saves is kept);
- ``selective``: calls the layer directly under :func:`selective_saving`: the tensors that
  are cheap to recompute (the RMSNorm outputs feeding ``wqkv`` / ``w1`` / ``w3``, the
  SwiGLU output feeding ``w2``, as our forwards announce them through
  :func:`recomputable`) are not kept by the linear layers' backward; a token that
  recomputes them from what is kept anyway (the norm's input and a copy of its weight;
  the ``w1`` / ``w3`` outputs) takes their place.  GEMM outputs and attention's saved
  q, k, v, output and lse are kept.

With gradient checkpointing off the policy has no effect (logged once).  Budgeted
policies (``auto``, ``<GiB>``) start from the per-layer estimates of
:func:`estimate_layer_bytes`; ``auto`` runs full until the first optimizer step is done,
then fits the layers into the device memory left at the measured peak, minus a margin,
and stays full where it cannot measure (no CUDA).  Ranks agree on one plan (the most
tokens, the least memory) so that recomputation, and the collectives in it (ZeRO-3
gathers, sequence-parallel all-to-alls), is the same on every rank.
"""

import contextlib
import contextvars
import math
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from .log import logger
from .switches import CheckpointSetting

POLICIES = ("none", "selective", "full")
GIB = 1 << 30
# auto keeps this share of the device memory (at least AUTO_MARGIN_MIN_BYTES) free beyond
# the measured peak: the allocator's fragmentation and steps longer than the measured one.
AUTO_MARGIN_SHARE = 0.10
AUTO_MARGIN_MIN_BYTES = 2 * GIB


# ---------------------------------------------------------------- estimates and plans
@dataclass(frozen=True)
class LayerShape:
    """The widths of an InternLM2 decoder layer."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> "LayerShape":
        heads = config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, heads,
                   getattr(config, "num_key_value_heads", heads) or heads,
                   config.hidden_size // heads)

    @property
    def linear_weights(self) -> int:
        """Elements of the layer's five linear weights (wqkv, wo, w1, w3, w2)."""
        return self.hidden * ((self.heads + 2 * self.kv_heads) * self.head_dim
                              + self.heads * self.head_dim + 3 * self.intermediate)


def estimate_layer_bytes(policy: str, tokens: int, shape: LayerShape, residual_bytes: int,
                         compute_bytes: int) -> int:
    """Bytes one decoder layer (our forwards) keeps for its backward at ``tokens`` tokens.

    ``residual_bytes``: element size of the residual stream (the weights' dtype);
    ``compute_bytes``: of the GEMM outputs (the autocast dtype under autocast).
    full keeps the layer input; selective adds the norm inputs' fp32 rstd, the rotated
    q, k, v, attention's output and fp32 lse, the residual sum before ``ffn_norm`` and the
    ``w1`` / ``w3`` outputs; none adds the norm outputs as the linear layers save them
    (in the compute dtype; under autocast ``w1`` and ``w3`` each save their own cast
    copy of ``ffn_norm``'s output) and the SwiGLU output.  Under autocast
    (``compute_bytes != residual_bytes``) none and selective also keep the linear
    layers' weights cast to the compute dtype (full recasts them in its recompute).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    h = shape.hidden
    full = h * residual_bytes
    if policy == "full":
        return tokens * full
    attention = ((shape.heads + 2 * shape.kv_heads) * shape.head_dim + shape.heads * shape.head_dim
                 ) * compute_bytes + shape.heads * 4
    selective = (full + 2 * 4 + attention + h * residual_bytes
                 + 2 * shape.intermediate * compute_bytes)
    autocast = compute_bytes != residual_bytes
    weight_casts = shape.linear_weights * compute_bytes if autocast else 0
    if policy == "selective":
        # plus the two norm-weight copies the recompute tokens hold
        return tokens * selective + 2 * h * residual_bytes + weight_casts
    norm_copies = 3 if autocast else 2
    return (tokens * (selective + (norm_copies * h + shape.intermediate) * compute_bytes)
            + weight_casts)


def plan_layers(num_layers: int, layer_bytes: Dict[str, int], budget_bytes: float
                ) -> Tuple[str, ...]:
    """Per layer a policy such that the layers keep at most ``budget_bytes``.

    ``layer_bytes``: :func:`estimate_layer_bytes` per policy.  Selective saves most of a
    layer's recompute (every GEMM and attention) for its bytes, so layers become
    selective first, and then, with what is left, none (which also skips the cheap
    norm / SwiGLU recompute); the first layers get the lighter policies.  All full when
    even that does not fit.
    """
    full, sel, none = (layer_bytes[p] for p in ("full", "selective", "none"))
    left = budget_bytes - num_layers * full
    if left < 0 or not math.isfinite(left):
        return ("full",) * num_layers
    n_sel = min(num_layers, int(left // max(sel - full, 1)))
    left -= n_sel * (sel - full)
    n_none = min(n_sel, int(left // max(none - sel, 1)))
    return ("none",) * n_none + ("selective",) * (n_sel - n_none) + ("full",) * (num_layers - n_sel)


def describe_plan(plan: Sequence[str]) -> str:
    """``layers 0-3 none, 4-23 full``."""
    parts, start = [], 0
    for i in range(1, len(plan) + 1):
        if i == len(plan) or plan[i] != plan[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            parts.append(f"{span} {plan[start]}")
            start = i
    return "layers " + ", ".join(parts)


@dataclass(frozen=True)
class MemoryReading:
    """Device memory in bytes: its size and the most this process (plus others on the
    device) has held so far."""

    total: int
    peak: int


def cuda_memory_reading(device: torch.device) -> Optional[MemoryReading]:
    """The reading of a CUDA ``device`` (None elsewhere): the peak of the caching
    allocator's reserved memory, plus what other processes hold."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)
    return MemoryReading(total, others + torch.cuda.max_memory_reserved(device))


def auto_budget(reading: MemoryReading, full_bytes: int) -> float:
    """Activation bytes the decoder layers may keep: what full checkpointing kept
    (``full_bytes``, inside the measured peak) plus the memory left above the peak."""
    margin = max(AUTO_MARGIN_SHARE * reading.total, AUTO_MARGIN_MIN_BYTES)
    return full_bytes + reading.total - reading.peak - margin


# ---------------------------------------------------------------- selective saving
class _Recompute:
    """What a saved tensor is replaced by: ``make()`` recomputes the whole tensor it was
    taken from (no grad); the saved view is cut from it again."""

    __slots__ = ("make", "dtype", "device_type", "size", "stride", "offset", "holds")

    def __init__(self, make, saved: torch.Tensor, offset: int, holds: tuple):
        self.make, self.holds, self.offset = make, holds, offset
        self.dtype, self.device_type = saved.dtype, saved.device.type
        self.size, self.stride = saved.size(), saved.stride()

    def unpack(self) -> torch.Tensor:
        # The recompute gives the forward's values: no autocast (the dtype is cast
        # explicitly) and no graph (a saved tensor comes back without one).
        with torch.no_grad(), torch.autocast(self.device_type, enabled=False):
            whole = self.make().to(self.dtype)
        return whole.as_strided(self.size, self.stride, self.offset)


# Autograd nodes whose output holds the values of their input: views and dtype casts
# (autocast's cast inside F.linear, PEFT's cast of a LoRA adapter's input).
_SAME_VALUES = frozenset(("ToCopyBackward0", "ViewBackward0", "UnsafeViewBackward0",
                          "ReshapeAliasBackward0", "AliasBackward0"))
_MAX_CHAIN = 8


class _Recorder:
    """The tensors announced as recomputable during one selective layer call.

    A saved tensor is one of them when it shares its first element (a view of it:
    F.linear on ``[b, s, h]`` saves ``[b * s, h]``), or when its autograd history leads
    back to it through views and casts only (the copy autocast or PEFT made of it: the
    same values, rounded the same way by the recompute's own cast).
    """

    def __init__(self):
        self.by_address: Dict[Tuple[int, torch.dtype], tuple] = {}
        self.by_node: Dict[tuple, tuple] = {}

    def add(self, tensor: torch.Tensor, make: Callable, holds: tuple) -> None:
        if not tensor.is_contiguous():
            return
        entry = (tensor, make, holds)
        self.by_address[(tensor.data_ptr(), tensor.dtype)] = entry
        if tensor.grad_fn is not None:
            self.by_node[(tensor.grad_fn, tensor.output_nr)] = entry

    def clear(self) -> None:
        self.by_address.clear()
        self.by_node.clear()

    def _derived(self, saved: torch.Tensor):
        node, nr = saved.grad_fn, saved.output_nr
        for _ in range(_MAX_CHAIN):
            if node is None:
                return None
            entry = self.by_node.get((node, nr))
            if entry is not None:
                return entry
            if type(node).__name__ not in _SAME_VALUES or not node.next_functions:
                return None
            node, nr = node.next_functions[0]
        return None

    def pack(self, saved: torch.Tensor):
        if not saved.is_floating_point():
            return saved
        entry = self.by_address.get((saved.data_ptr(), saved.dtype))
        if entry is not None:
            whole, make, holds = entry
            if (saved.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
                    and saved.numel() == whole.numel()):
                return _Recompute(make, saved, saved.storage_offset() - whole.storage_offset(),
                                  holds)
        if saved.grad_fn is not None and self.by_node:
            entry = self._derived(saved)
            # a contiguous copy of the whole tensor, or a view of one
            if entry is not None and saved.numel() == entry[0].numel() \
                    and saved.untyped_storage().nbytes() == saved.numel() * saved.element_size():
                return _Recompute(entry[1], saved, saved.storage_offset(), entry[2])
        return saved


_RECORDER: contextvars.ContextVar = contextvars.ContextVar("xtuner_patch_selective",
                                                           default=None)
_COUNTER: contextvars.ContextVar = contextvars.ContextVar("xtuner_patch_saved_bytes",
                                                          default=None)


def _unpack(packed):
    return packed.unpack() if isinstance(packed, _Recompute) else packed


@contextlib.contextmanager
def selective_saving():
    """Run a layer's forward so that the tensors announced through :func:`recomputable`
    are recomputed in the backward instead of kept."""
    recorder = _Recorder()
    token = _RECORDER.set(recorder)
    counter = _COUNTER.get()

    def pack(saved):
        packed = recorder.pack(saved)
        if counter is not None:
            counter.add(packed)
        return packed

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield
    finally:
        _RECORDER.reset(token)
        # Every saved tensor keeps its hooks, ``pack`` included, until the backward:
        # the recorder must not keep the announced outputs alive that long.
        recorder.clear()


def selective_active() -> bool:
    """Whether a layer runs under :func:`selective_saving` (our forwards then announce
    their cheap outputs; elsewhere they skip preparing the recompute)."""
    return _RECORDER.get() is not None


def recomputable(output: torch.Tensor, make: Callable[[], torch.Tensor], holds: tuple = ()
                 ) -> torch.Tensor:
    """``output`` of a cheap op, announced by our forwards: inside :func:`selective_saving`
    a saved copy of it is replaced by ``make()`` (which must give the same values from
    tensors that are not modified until the saved copy's consumer has run its backward;
    ``holds``: the tensors ``make`` keeps alive, for :class:`SavedBytes`).

    Returns ``output`` (for the caller to hand on).
    """
    recorder = _RECORDER.get()
    if recorder is not None and output.is_floating_point():
        recorder.add(output, make, holds)
    return output


class SavedBytes:
    """Counts the bytes kept for the backward by the forward run inside it: distinct
    storages of saved tensors (parameters in ``exclude`` left out) and of what the
    recompute tokens hold."""

    def __init__(self, exclude=()):
        self._excluded = {p.untyped_storage().data_ptr() for p in exclude}
        self._storages: Dict[int, int] = {}
        self.bytes = 0

    def _add_tensor(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._excluded or ptr in self._storages:
            return
        self._storages[ptr] = storage.nbytes()
        self.bytes += storage.nbytes()

    def add(self, packed) -> None:
        if isinstance(packed, _Recompute):
            for t in packed.holds:
                self._add_tensor(t)
        elif isinstance(packed, torch.Tensor):
            self._add_tensor(packed)

    def __enter__(self):
        self._token = _COUNTER.set(self)

        def pack(saved):
            self.add(saved)
            return saved

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, _unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        _COUNTER.reset(self._token)


def run_layer(policy: str, function, *args, checkpoint_function=None, **kwargs):
    """``function(*args, **kwargs)`` (a decoder layer's ``__call__``) under ``policy``;
    ``full`` through ``checkpoint_function`` (default: PyTorch's reentrant checkpoint, as
    Hugging Face sets it)."""
    if policy == "full":
        if checkpoint_function is None:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(function, *args, use_reentrant=True, **kwargs)
        return checkpoint_function(function, *args, **kwargs)
    if policy == "none":
        return function(*args, **kwargs)
    if policy == "selective":
        with selective_saving():
            return function(*args, **kwargs)
    raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")


def measure_layer_bytes(layer, policy: str, *args, **kwargs) -> int:
    """Bytes ``layer`` keeps for its backward when called with ``args`` under ``policy``
    (its parameters not counted)."""
    with SavedBytes(exclude=list(layer.parameters())) as counter:
        out = run_layer(policy, layer.__call__, *args, **kwargs)
    del out
    return counter.bytes


# ---------------------------------------------------------------- the model hook
class _ModelState:
    """The policy of one ``InternLM2Model``."""

    def __init__(self, model, setting: CheckpointSetting, probe):
        self.setting = setting
        self.probe = probe
        self.layer_index = weakref.WeakKeyDictionary(
            (layer, i) for i, layer in enumerate(model.layers))
        self.num_layers = len(model.layers)
        self.shape = LayerShape.from_config(model.config)
        self.plan: Tuple[str, ...] = ("full",) * self.num_layers
        self.reading: Optional[MemoryReading] = None
        # optimizer steps counted before this model's first training forward: auto
        # measures after a step of this model's own (its optimizer state then exists)
        self.steps_before: Optional[int] = None
        self.logged = set()
        self.handle = None


class PolicyCheckpoint:
    """What :func:`install` puts in ``InternLM2Model._gradient_checkpointing_func``: per
    decoder layer its policy, ``full`` through ``original`` (the function Hugging Face or
    XTuner set)."""

    def __init__(self, original, state: _ModelState):
        self.original = original
        self.state = state

    def __call__(self, function, *args, **kwargs):
        index = self.state.layer_index.get(getattr(function, "__self__", None))
        policy = "full" if index is None else self.state.plan[index]
        return run_layer(policy, function, *args, checkpoint_function=self.original, **kwargs)


_STATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_OPTIMIZER_STEPS = [0]
_STEP_HOOK = [None]


def _count_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


def _log_once(state: _ModelState, message: str, key=None) -> None:
    """Log ``message`` unless one with the same ``key`` (default: the message) was."""
    key = message if key is None else key
    if key in state.logged:
        return
    state.logged.add(key)
    try:
        from mmengine.logging import print_log

        print_log(message, logger="current")
    except ImportError:
        logger.warning(message)


def _agree(tokens: int, budget: float, device: torch.device) -> Tuple[int, float]:
    """The most tokens and the least budget over the ranks (one all-reduce), so that
    every rank plans the same recomputation."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return tokens, budget
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    # float64 holds token counts and byte budgets exactly enough (2**53).
    values = torch.tensor([float(tokens), -float(budget)], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return int(values[0].item()), -float(values[1].item())


def _plan_for(state: _ModelState, tokens: int, device: torch.device, residual_dtype,
              ) -> Tuple[Tuple[str, ...], str]:
    setting = state.setting
    if setting.mode in POLICIES:
        return (setting.mode,) * state.num_layers, setting.mode
    compute_dtype = (torch.get_autocast_dtype(device.type)
                     if torch.is_autocast_enabled(device.type) else residual_dtype)
    sizes = {p: estimate_layer_bytes(p, tokens, state.shape, residual_dtype.itemsize,
                                     compute_dtype.itemsize) for p in POLICIES}
    if setting.mode == "budget":
        budget, why = setting.budget_gib * GIB, f"budget {setting.budget_gib:g} GiB"
    else:
        if state.steps_before is None:
            state.steps_before = _OPTIMIZER_STEPS[0]
        if state.reading is None and _OPTIMIZER_STEPS[0] > state.steps_before:
            state.reading = state.probe(device)
        if state.reading is None:
            # Nothing measured yet (first step, or no CUDA): full, as stock.
            budget, why = -1.0, "auto: full until the first optimizer step is measured"
        else:
            budget = auto_budget(state.reading, state.num_layers * sizes["full"])
            why = (f"auto: {state.reading.peak / GIB:.1f} of {state.reading.total / GIB:.1f} "
                   f"GiB at the measured peak")
    tokens_all, budget_all = _agree(tokens, budget, device)
    if tokens_all != tokens:
        sizes = {p: estimate_layer_bytes(p, tokens_all, state.shape, residual_dtype.itemsize,
                                         compute_dtype.itemsize) for p in POLICIES}
    return plan_layers(state.num_layers, sizes, budget_all), why


def _tokens_and_device(args, kwargs):
    for name, position in (("input_ids", 0), ("inputs_embeds", 4)):
        x = kwargs.get(name, args[position] if len(args) > position else None)
        if isinstance(x, torch.Tensor):
            return (x.numel() if name == "input_ids" else x.numel() // x.shape[-1]), x.device
    return None, None


def _pre_forward(state: _ModelState, model, args, kwargs) -> None:
    if not model.gradient_checkpointing:
        _log_once(state, f"xtuner-patch: activation checkpointing policy "
                  f"{state.setting.describe()} has no effect: gradient checkpointing is off "
                  f"(XTuner's use_activation_checkpointing=False)")
        return
    if not model.training:
        return
    current = model._gradient_checkpointing_func
    if not isinstance(current, PolicyCheckpoint):
        # Wrapped at every call that finds a new function (PEFT and user code may call
        # gradient_checkpointing_enable again after dispatch).
        model._gradient_checkpointing_func = PolicyCheckpoint(current, state)
    tokens, device = _tokens_and_device(args, kwargs)
    if tokens is None:
        state.plan = ("full",) * state.num_layers
        return
    state.plan, why = _plan_for(state, tokens, device,
                                 model.get_input_embeddings().weight.dtype)
    # once per plan, not per token count (unpacked batches vary in length)
    _log_once(state, f"xtuner-patch: activation checkpointing ({why}; {tokens} tokens): "
              f"{describe_plan(state.plan)}", key=(why, state.plan))


def install(model, setting: CheckpointSetting,
            probe: Callable[[torch.device], Optional[MemoryReading]] = cuda_memory_reading
            ) -> None:
    """Give ``model`` (an ``InternLM2Model``: the one holding ``layers``) the policy
    ``setting``.  ``probe(device)``: the memory reading ``auto`` plans from (injectable
    for tests).  Installing again replaces the setting."""
    uninstall(model)
    state = _ModelState(model, setting, probe)
    state.handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: _pre_forward(state, module, args, kwargs),
        with_kwargs=True)
    _STATES[model] = state
    if setting.mode == "auto" and _STEP_HOOK[0] is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _STEP_HOOK[0] = register_optimizer_step_post_hook(_count_step)


def uninstall(model) -> None:
    """Remove the policy from ``model``: its checkpoint function is the original again."""
    state = _STATES.pop(model, None)
    if state is None:
        return
    state.handle.remove()
    current = getattr(model, "_gradient_checkpointing_func", None)
    if isinstance(current, PolicyCheckpoint):
        model._gradient_checkpointing_func = current.original


def uninstall_all() -> None:
    """:func:`uninstall` from every model (what :func:`xtuner_patch.unpatch` calls)."""
    for model in list(_STATES.keys()):
        uninstall(model)
    if _STEP_HOOK[0] is not None:
        _STEP_HOOK[0].remove()
        _STEP_HOOK[0] = None
    _OPTIMIZER_STEPS[0] = 0


def policy_of(model) -> Optional[Tuple[str, ...]]:
    """The per-layer plan of the last training forward of ``model`` (None: no policy)."""
    state = _STATES.get(model)
    return None if state is None else state.plan
