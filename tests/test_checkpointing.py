"""Activation checkpointing per decoder layer (:mod:`xtuner_patch.checkpointing`).

Every policy must train exactly as Hugging Face's full checkpointing does (the model
without a policy is the reference: its own ``_gradient_checkpointing_func``), in fp32,
under fp16 autocast (the Triton kernels under the interpreter) and with LoRA under bf16
autocast (the references); selective must really drop the norm / SwiGLU outputs (a weak
reference to them dies) and keep the bytes :func:`estimate_layer_bytes` says; the
budget planner must pick the plan the arithmetic gives for a faked device memory.
"""

import gc
import logging

import pytest
import torch

pytest.importorskip("xtuner.model")

from tests.helpers import DEVICE, rel_error  # noqa: E402
from tests.models import dispatch, load_model, packed_batch, with_lora  # noqa: E402
from xtuner_patch import checkpointing  # noqa: E402
from xtuner_patch.checkpointing import (GIB, LayerShape, MemoryReading,  # noqa: E402
                                        estimate_layer_bytes, plan_layers)
from xtuner_patch.errors import UserError  # noqa: E402
from xtuner_patch.switches import (CHECKPOINT_VARIABLE, CheckpointSetting,  # noqa: E402
                                   parse_checkpoint, resolve_checkpoint)

STOCK_FORWARDS = dict(attention=False, rope=False, rms_norm=False, fused_residual=False,
                      swiglu=False, cross_entropy=False)


def _model(checkpoint, setting=None, lora_gen=None, **switches):
    """The tiny model dispatched (with the policy ``setting``), gradient checkpointing on
    as XTuner's ``SupervisedFinetune`` turns it on (LoRA wrapped after dispatch, as
    there), in training mode."""
    model = dispatch(load_model(checkpoint), use_varlen_attn=False, **switches)
    if setting is not None:
        checkpointing.install(model.model, setting)
    if lora_gen is not None:
        model = with_lora(model, lora_gen)
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable()
    return model.train()


def _loss_and_grads(model, input_ids, labels, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE.type, dtype=autocast or torch.float32,
                        enabled=autocast is not None):
        loss = model(input_ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


# Every policy computes the forward's values again (the recompute casts as autocast and
# PEFT did), so the loss and gradients may differ only by the order of sums.
TOL = 1e-6


@pytest.mark.parametrize("name,autocast,lora,policies", [
    ("fp32", None, False, ("selective", "full")),
    ("amp-fp16", torch.float16, False, ("selective",)),
    ("lora-amp-bf16", torch.bfloat16, True, ("none", "selective")),
])
def test_every_policy_trains_as_full_checkpointing(tiny_checkpoint, gen, name, autocast, lora,
                                                   policies):
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    input_ids, labels, _, _ = packed_batch(gen, [24, 16], 2048)
    lora_gen = (lambda: torch.Generator(device=DEVICE).manual_seed(seed)) if lora else (
        lambda: None)
    reference = _model(tiny_checkpoint, lora_gen=lora_gen())
    ref_loss, ref_grads = _loss_and_grads(reference, input_ids, labels, autocast)
    for policy in policies:
        model = _model(tiny_checkpoint, CheckpointSetting(policy), lora_gen=lora_gen())
        model.load_state_dict(reference.state_dict())  # PEFT draws lora_A from torch's RNG
        loss, grads = _loss_and_grads(model, input_ids, labels, autocast)
        inner = model.get_base_model().model if lora else model.model
        assert checkpointing.policy_of(inner) == (policy,) * 2
        assert rel_error(loss, ref_loss) <= TOL, (policy, loss, ref_loss)
        assert grads.keys() == ref_grads.keys() and len(grads) > 10
        for key, grad in grads.items():
            assert rel_error(grad, ref_grads[key]) <= TOL, (policy, key)


def test_selective_drops_the_cheap_outputs(tiny_checkpoint, gen):
    """Under selective no saved tensor keeps the memory of the norm or SwiGLU outputs
    alive (a weak reference to their storage dies); under none it is kept."""
    from torch.multiprocessing.reductions import StorageWeakRef

    alive = {}
    for policy in ("none", "selective"):
        model = _model(tiny_checkpoint, CheckpointSetting(policy))
        refs = []
        layer = model.model.layers[0]
        for module in (layer.attention_norm, layer.attention.wqkv, layer.feed_forward.w1,
                       layer.feed_forward.w2):
            # inputs of the linear layers (whatever the forward hands on); the norm's output
            module.register_forward_hook(lambda m, args, out: refs.append(StorageWeakRef(
                (out if isinstance(m, type(layer.attention_norm)) else args[0]
                 ).untyped_storage())))
        input_ids, labels, _, _ = packed_batch(gen, [32], 2048)
        loss = model(input_ids, labels=labels).loss
        gc.collect()
        alive[policy] = [not r.expired() for r in refs]
        loss.backward()
    assert alive["none"] == [True, True, True, True]
    assert alive["selective"] == [False, False, False, False]


@pytest.mark.parametrize("autocast", [None, torch.float16])
def test_saved_bytes_per_layer_match_the_estimate(tiny_checkpoint, gen, autocast):
    model = dispatch(load_model(tiny_checkpoint), use_varlen_attn=False)
    layer, tokens = model.model.layers[0], 96
    hidden = torch.randn(1, tokens, model.config.hidden_size, generator=gen, device=DEVICE,
                         requires_grad=True)
    position_ids = torch.arange(tokens, device=DEVICE)[None]
    shape = LayerShape.from_config(model.config)
    measured = {}
    for policy in checkpointing.POLICIES:
        with torch.autocast(DEVICE.type, dtype=autocast or torch.float32,
                            enabled=autocast is not None):
            measured[policy] = checkpointing.measure_layer_bytes(layer, policy, hidden, None,
                                                                 position_ids)
        estimate = estimate_layer_bytes(policy, tokens, shape, 4, (autocast or hidden.dtype
                                                                   ).itemsize)
        # full also keeps the int64 position_ids the checkpoint saves
        assert abs(measured[policy] - estimate) <= 0.02 * estimate, (policy, measured, estimate)
    assert measured["full"] < measured["selective"] < measured["none"]
    if autocast is None:  # (under autocast the layer's fp16 weight copies dominate at 96 tokens)
        assert measured["selective"] < 0.75 * measured["none"]


def test_plan_layers_fills_the_budget_selective_first():
    sizes = {"full": 10, "selective": 60, "none": 100}
    assert plan_layers(4, sizes, 39) == ("full",) * 4  # not even full fits: stock
    assert plan_layers(4, sizes, 40 + 49) == ("full",) * 4
    assert plan_layers(4, sizes, 40 + 50) == ("selective", "full", "full", "full")
    assert plan_layers(4, sizes, 40 + 150 + 39) == ("selective",) * 3 + ("full",)
    assert plan_layers(4, sizes, 40 + 200 + 80) == ("none", "none", "selective", "selective")
    assert plan_layers(4, sizes, 1e30) == ("none",) * 4


def _train_forward(model, gen, tokens=48):
    input_ids, labels, _, _ = packed_batch(gen, [tokens], 2048)
    model(input_ids, labels=labels).loss.backward()


def test_budget_in_gib_picks_the_plan_of_the_estimates(tiny_checkpoint, gen):
    tokens = 48
    shape = LayerShape.from_config(load_model(tiny_checkpoint).config)
    sizes = {p: estimate_layer_bytes(p, tokens, shape, 4, 4) for p in checkpointing.POLICIES}
    budget = 2 * sizes["full"] + (sizes["selective"] - sizes["full"]) + 1
    model = _model(tiny_checkpoint, parse_checkpoint("x", str(budget / GIB)), **STOCK_FORWARDS)
    _train_forward(model, gen, tokens)
    assert checkpointing.policy_of(model.model) == ("selective", "full")
    _train_forward(model, gen, tokens - 8)  # fewer tokens, the same plan: not logged again
    assert checkpointing.policy_of(model.model) == ("selective", "full")
    assert len(checkpointing._STATES[model.model].logged) == 1
    _train_forward(model, gen, 4)  # so few tokens that a layer more fits
    assert checkpointing.policy_of(model.model) != ("selective", "full")
    assert len(checkpointing._STATES[model.model].logged) == 2


def test_auto_runs_full_until_measured_then_fits_the_fake_memory(tiny_checkpoint, gen, caplog):
    """Full until an optimizer step follows the model's first training forward; then
    one reading, and the plan the arithmetic of the estimates gives."""
    tokens = 48
    shape = LayerShape.from_config(load_model(tiny_checkpoint).config)
    sizes = {p: estimate_layer_bytes(p, tokens, shape, 4, 4) for p in checkpointing.POLICIES}
    total = 100 * GIB
    margin = max(checkpointing.AUTO_MARGIN_SHARE * total, checkpointing.AUTO_MARGIN_MIN_BYTES)
    # room for one layer's step from full to selective, not for two
    headroom = 1.5 * (sizes["selective"] - sizes["full"])
    readings = []

    def probe(device):
        readings.append(device)
        return MemoryReading(total=total, peak=int(total - margin - headroom))

    model = _model(tiny_checkpoint, **STOCK_FORWARDS)
    checkpointing.install(model.model, CheckpointSetting("auto"), probe=probe)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    try:
        optimizer.step()  # another model's step, before this one trains: not a measurement
        with caplog.at_level(logging.INFO):
            _train_forward(model, gen, tokens)
            assert checkpointing.policy_of(model.model) == ("full", "full") and not readings
            optimizer.step()
            _train_forward(model, gen, tokens)
            assert checkpointing.policy_of(model.model) == ("selective", "full")
            _train_forward(model, gen, tokens)
        assert len(readings) == 1  # measured once, after the first optimizer step
    finally:
        checkpointing.uninstall_all()


def test_auto_without_cuda_stays_full(tiny_checkpoint, gen):
    model = _model(tiny_checkpoint, CheckpointSetting("auto"), **STOCK_FORWARDS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    try:
        for _ in range(2):
            _train_forward(model, gen)
            optimizer.step()
        assert checkpointing.policy_of(model.model) == ("full", "full")
    finally:
        checkpointing.uninstall_all()


def test_without_gradient_checkpointing_the_policy_has_no_effect(tiny_checkpoint, gen,
                                                                 monkeypatch):
    messages = []
    monkeypatch.setattr(checkpointing, "_log_once",
                        lambda state, message, key=None: messages.append(message))
    model = dispatch(load_model(tiny_checkpoint), use_varlen_attn=False, **STOCK_FORWARDS)
    checkpointing.install(model.model, CheckpointSetting("selective"))
    model.train()
    _train_forward(model, gen)
    assert not hasattr(model.model, "_gradient_checkpointing_func")
    assert len(messages) == 1 and "has no effect" in messages[0]


@pytest.mark.parametrize("value,expected", [
    ("auto", CheckpointSetting("auto")), (" Selective ", CheckpointSetting("selective")),
    ("NONE", CheckpointSetting("none")), ("full", CheckpointSetting("full")),
    ("20", CheckpointSetting("budget", 20.0)), ("7.5", CheckpointSetting("budget", 7.5)),
    ("0", CheckpointSetting("budget", 0.0)), (12, CheckpointSetting("budget", 12.0)),
])
def test_checkpoint_values_parse(value, expected, monkeypatch):
    assert parse_checkpoint("x", value) == expected
    monkeypatch.setenv(CHECKPOINT_VARIABLE, str(value))
    assert resolve_checkpoint() == expected


@pytest.mark.parametrize("value", ["fast", "-1", "nan", "inf", "1GiB", "on", True])
def test_bad_checkpoint_values_name_the_variable(value, monkeypatch):
    monkeypatch.setenv(CHECKPOINT_VARIABLE, str(value))
    with pytest.raises(UserError, match=f"{CHECKPOINT_VARIABLE}=.*auto\\|none\\|selective\\|full"):
        resolve_checkpoint()
    with pytest.raises(UserError, match="checkpoint=.*GiB"):
        resolve_checkpoint(value)


def test_unset_keeps_xtuners_checkpointing(monkeypatch):
    monkeypatch.delenv(CHECKPOINT_VARIABLE, raising=False)
    assert resolve_checkpoint() is None
    monkeypatch.setenv(CHECKPOINT_VARIABLE, " ")
    assert resolve_checkpoint() is None
    monkeypatch.setenv(CHECKPOINT_VARIABLE, "selective")
    assert resolve_checkpoint("full") == CheckpointSetting("full")  # the argument wins


def test_patch_installs_the_policy_and_unpatch_restores(tiny_checkpoint, gen, monkeypatch):
    import xtuner_patch
    from xtuner.model.modules import dispatch as xtuner_dispatch

    monkeypatch.delenv(CHECKPOINT_VARIABLE, raising=False)
    with pytest.raises(UserError, match="checkpoint='sometimes'"):
        xtuner_patch.patch(checkpoint="sometimes", **STOCK_FORWARDS)
    try:
        xtuner_patch.patch(checkpoint="none", **STOCK_FORWARDS)
        model = load_model(tiny_checkpoint)
        xtuner_dispatch.dispatch_modules(model, use_varlen_attn=False)
        model.gradient_checkpointing_enable()
        original = model.model._gradient_checkpointing_func
        model.train()
        _train_forward(model, gen)
        assert isinstance(model.model._gradient_checkpointing_func,
                          checkpointing.PolicyCheckpoint)
        assert checkpointing.policy_of(model.model) == ("none", "none")
    finally:
        xtuner_patch.unpatch()
    assert model.model._gradient_checkpointing_func is original
    assert checkpointing.policy_of(model.model) is None
    _train_forward(model, gen)  # the pre-hook is gone: nothing wraps it again
    assert model.model._gradient_checkpointing_func is original
