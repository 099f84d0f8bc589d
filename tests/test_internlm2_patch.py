"""Model parity: a tiny InternLM2 patched vs XTuner's stock model and a float64 reference.

The float64 reference runs every packed sample as its own sequence through the
unpatched model (what a block-diagonal causal mask means), so it shares no code with
the patched path.  On CPU the patched model runs the Triton kernels under the
interpreter (fp32); the ``gpu`` test repeats the comparison in bf16.
"""

import pytest
import torch

pytest.importorskip("xtuner.model")

from tests.helpers import DEVICE, HAS_CUDA, REL_TOL, assert_rel_close, rel_error  # noqa: E402
from tests.models import (ATTN_IMPLEMENTATIONS, dispatch, load_model, packed_batch,  # noqa: E402
                          reference_per_sample, shifted_loss, with_lora)


@pytest.mark.parametrize("attn_implementation", ATTN_IMPLEMENTATIONS)
def test_packed_forward_backward_matches_float64_reference(
        tiny_checkpoint, gen, varlen_args, attn_implementation):
    model = dispatch(load_model(tiny_checkpoint, attn_implementation))
    model64 = load_model(tiny_checkpoint, "eager", torch.float64)
    lengths = [17, 1, 40, 6, 32]
    input_ids, labels, position_ids, cu = packed_batch(gen, lengths, model.config.vocab_size)
    varlen_args(cu, max(lengths))

    logits = model(input_ids, position_ids=position_ids).logits
    out = model(input_ids, position_ids=position_ids, labels=labels)
    assert out.logits is None  # training with labels: the fused loss, no logits
    out.loss.backward()
    ref_logits = reference_per_sample(model64, input_ids, lengths)
    ref_loss = shifted_loss(ref_logits, labels)
    ref_loss.backward()

    # A whole model in fp32 against float64: the per-op tolerance, 20x for depth.
    assert_rel_close(logits, ref_logits, torch.float32, factor=20, name="logits")
    assert abs(out.loss.item() - ref_loss.item()) < 1e-4
    grads = dict(model64.named_parameters())
    for name, param in model.named_parameters():
        assert_rel_close(param.grad, grads[name].grad, torch.float32, factor=50, name=name)


@pytest.fixture
def validations(monkeypatch):
    """Names of the cu_seqlens the attention kernel validates (each one a device sync)."""
    import kernels.varlen_attention as attention

    calls = []
    checked = attention.check_cu_seqlens
    monkeypatch.setattr(attention, "check_cu_seqlens",
                        lambda name, *a: calls.append(name) or checked(name, *a))
    return calls


def test_packing_is_read_once_per_step(tiny_checkpoint, gen, varlen_args, validations):
    """Reading the packing on the host is a device sync: every layer of a step shares
    XTuner's ``cumulative_len``, so the forward and backward of all layers read it once."""
    calls = validations
    model = dispatch(load_model(tiny_checkpoint))
    assert model.config.num_hidden_layers > 1
    lengths = [20, 9, 25]
    input_ids, labels, position_ids, cu = packed_batch(gen, lengths, model.config.vocab_size)
    # Two tokens of padding after the packed samples: the patch closes cu_seqlens at 56,
    # a new tensor, which must still be one tensor for all layers.
    input_ids = torch.nn.functional.pad(input_ids, (0, 2), value=0)
    labels = torch.nn.functional.pad(labels, (0, 2), value=-100)
    position_ids = torch.cat([position_ids, torch.arange(2, device=DEVICE)[None]], 1)
    varlen_args(cu, max(lengths))
    model(input_ids, position_ids=position_ids, labels=labels).loss.backward()
    assert calls == ["cu_seqlens_q", "cu_seqlens_k"]  # for the first layer only


def test_switches_off_match_too(tiny_checkpoint, gen, varlen_args):
    lengths = [30, 34]
    full = dispatch(load_model(tiny_checkpoint))
    partial = dispatch(load_model(tiny_checkpoint), rope=False, rms_norm=False,
                        fused_residual=False, swiglu=False, cross_entropy=False)
    input_ids, labels, position_ids, cu = packed_batch(gen, lengths, full.config.vocab_size)
    varlen_args(cu, max(lengths))
    a = full(input_ids, position_ids=position_ids).logits
    b = partial(input_ids, position_ids=position_ids).logits
    assert_rel_close(a, b, torch.float32, factor=20)
    fused, stock = (m(input_ids, position_ids=position_ids, labels=labels) for m in (full, partial))
    assert fused.logits is None and stock.logits is not None
    assert abs(fused.loss.item() - stock.loss.item()) < 1e-4
    fused.loss.backward()
    stock.loss.backward()
    grads = dict(partial.named_parameters())
    for name, param in full.named_parameters():
        assert_rel_close(param.grad, grads[name].grad, torch.float32, factor=50, name=name)
    for module in partial.modules():
        if type(module).__name__ in ("InternLM2RMSNorm", "InternLM2DecoderLayer",
                                     "InternLM2MLP", "InternLM2ForCausalLM", "Linear"):
            assert "forward" not in module.__dict__  # switched off: the class's forward


def test_fused_loss_only_when_training_with_labels(tiny_checkpoint, gen):
    """Eval mode or no labels: logits as usual; training with labels: loss, logits=None."""
    model = dispatch(load_model(tiny_checkpoint), use_varlen_attn=False)
    vocab = model.config.vocab_size
    input_ids = torch.randint(3, vocab, (2, 20), generator=gen, device=DEVICE)
    labels = input_ids.clone()
    labels[:, :5] = -100
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids, labels=labels)
    assert evaluated.logits.shape == (2, 20, vocab)
    ref = torch.nn.functional.cross_entropy(evaluated.logits[:, :-1].flatten(0, 1),
                                            labels[:, 1:].flatten())
    assert abs(evaluated.loss.item() - ref.item()) < 1e-5
    model.train()
    trained = model(input_ids, labels=labels)
    assert trained.logits is None
    assert abs(trained.loss.item() - ref.item()) < 1e-5
    loss, logits = model(input_ids, labels=labels, return_dict=False)[:2]
    assert logits is None and abs(loss.item() - ref.item()) < 1e-5
    assert model(input_ids).logits.shape == (2, 20, vocab)
    # Every target ignored: 0 with zero gradients where Hugging Face gives NaN.
    empty = model(input_ids, labels=torch.full_like(labels, -100)).loss
    assert empty.item() == 0.0
    empty.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("cross_entropy", [True, False], ids=["fused", "switch-off"])
def test_labels_shifted_are_not_shifted_again(tiny_checkpoint, gen, cross_entropy):
    from xtuner_patch.internlm2 import set_labels_shifted

    model = dispatch(load_model(tiny_checkpoint), use_varlen_attn=False,
                      cross_entropy=cross_entropy)
    set_labels_shifted(model)
    vocab = model.config.vocab_size
    input_ids = torch.randint(3, vocab, (1, 24), generator=gen, device=DEVICE)
    labels = torch.cat([input_ids[:, 1:], input_ids.new_full((1, 1), -100)], 1)
    labels[0, :4] = -100
    logits = model(input_ids).logits
    ref = torch.nn.functional.cross_entropy(logits[0], labels[0])
    assert abs(model(input_ids, labels=labels).loss.item() - ref.item()) < 1e-5
    model.eval()
    evaluated = model(input_ids, labels=labels)
    assert abs(evaluated.loss.item() - ref.item()) < 1e-5
    assert_rel_close(evaluated.logits, logits, torch.float32, factor=20)
    set_labels_shifted(model, False)  # Hugging Face's shift again
    shifted = torch.nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:])
    assert abs(model(input_ids, labels=input_ids).loss.item() - shifted.item()) < 1e-5


def test_models_computing_loss_from_logits_keep_the_logits(tiny_checkpoint):
    """DPO / ORPO-like XTuner models (compute_loss overridden) get no fused loss: the patch
    tells the dispatch so around XTuner's own ``build_llm_from_cfg``."""
    from mmengine.config import ConfigDict
    from transformers import AutoModelForCausalLM
    from xtuner.model.sft import SupervisedFinetune

    import xtuner_patch

    class ReadsLogits(SupervisedFinetune):
        def compute_loss(self, data, data_samples=None):
            return {"loss": self.llm(**data).logits.mean()}

    before = xtuner_patch.active_switches()
    xtuner_patch.patch()
    try:
        for owner, fused in ((SupervisedFinetune, True), (ReadsLogits, False)):
            cfg = ConfigDict(type=AutoModelForCausalLM.from_pretrained,
                             trust_remote_code=True,
                             pretrained_model_name_or_path=tiny_checkpoint)
            model = owner.__new__(owner).build_llm_from_cfg(cfg, False, None)
            assert ("forward" in model.__dict__) is fused
            assert "forward" in model.model.layers[0].feed_forward.__dict__
    finally:
        xtuner_patch.unpatch()
        if before is not None:
            xtuner_patch.patch(**before.__dict__)


def _lora_loss_and_grads(model, input_ids, labels):
    out = model(input_ids, labels=labels)
    out.loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("varlen", [False, True])
def test_lora_on_the_head_keeps_the_fused_loss(tiny_checkpoint, gen, varlen_args, caplog,
                                               monkeypatch, varlen):
    """XTuner's LoRA (``output`` wrapped too): no logits, loss and every adapter gradient
    as the stock model with the same adapters."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from kernels import backend

    monkeypatch.setattr(backend, "_warned", set())
    lengths = [17, 30, 9]
    model = with_lora(dispatch(load_model(tiny_checkpoint), use_varlen_attn=varlen), gen)
    stock = with_lora(load_model(tiny_checkpoint), gen)
    stock.load_state_dict(model.state_dict())
    assert isinstance(model.base_model.model.output, LoraLinear)
    input_ids, labels, position_ids, cu = packed_batch(gen, lengths, model.config.vocab_size)
    if not varlen:  # one sequence per row, three rows
        input_ids, labels = input_ids.view(1, -1)[:, :54].view(3, 18), labels[:, :54].view(3, 18)
    varlen_args(cu, max(lengths))
    with caplog.at_level("WARNING", logger="xtuner_patch"):
        out, grads = _lora_loss_and_grads(model, input_ids, labels)
    assert out.logits is None and "computed from its logits" not in caplog.text
    varlen_args(None, None)
    if varlen:
        ref = shifted_loss(reference_per_sample(stock, input_ids, lengths), labels)
        ref.backward()
        ref_grads = {n: p.grad for n, p in stock.named_parameters() if p.requires_grad}
    else:
        ref, ref_grads = _lora_loss_and_grads(stock, input_ids, labels)
        ref = ref.loss
    assert abs(out.loss.item() - ref.item()) < 1e-5
    assert grads.keys() == ref_grads.keys() and any("output.lora_B" in n for n in grads)
    for name, grad in grads.items():
        assert_rel_close(grad, ref_grads[name], torch.float32, factor=50, name=name)


def test_lora_head_loss_draws_the_adapter_dropout_as_peft_does(tiny_checkpoint, gen):
    """The head alone, dropout on: the fused loss of the LoRA layer against PEFT's own
    forward of it, on the same random draws."""
    from xtuner_patch.internlm2.forwards import fused_head_loss

    model = with_lora(dispatch(load_model(tiny_checkpoint)), gen, lora_dropout=0.5)
    head = model.base_model.model.output
    hidden = torch.randn(2, 9, model.config.hidden_size, generator=gen, device=DEVICE,
                         requires_grad=True)
    labels = torch.randint(0, model.config.vocab_size, (2, 9), generator=gen, device=DEVICE)
    results = []
    for compute in (lambda: fused_head_loss(head)(hidden, labels, True),
                    lambda: torch.nn.functional.cross_entropy(
                        head(hidden)[:, :-1].flatten(0, 1), labels[:, 1:].flatten())):
        torch.manual_seed(0)
        loss = compute()
        grads = torch.autograd.grad(loss, [hidden, head.lora_A["default"].weight,
                                           head.lora_B["default"].weight])
        results.append((loss, grads))
    (loss, grads), (ref, ref_grads) = results
    assert abs(loss.item() - ref.item()) < 1e-5
    for grad, ref_grad in zip(grads, ref_grads):
        assert_rel_close(grad, ref_grad, torch.float32, factor=5)
    torch.manual_seed(1)  # other draws: another loss (the dropout does drop)
    assert abs(fused_head_loss(head)(hidden, labels, True).item() - loss.item()) > 1e-6


def test_lora_variants_on_the_head_take_the_logits_with_one_warning(tiny_checkpoint, gen,
                                                                    caplog, monkeypatch):
    from kernels import backend

    monkeypatch.setattr(backend, "_warned", set())
    model = with_lora(dispatch(load_model(tiny_checkpoint), use_varlen_attn=False), gen,
                       use_dora=True)
    stock = with_lora(load_model(tiny_checkpoint), gen, use_dora=True)
    stock.load_state_dict(model.state_dict())
    input_ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=gen,
                              device=DEVICE)
    with caplog.at_level("WARNING", logger="xtuner_patch"):
        outs = [model(input_ids, labels=input_ids) for _ in range(2)]
    assert all(out.logits is not None for out in outs)
    assert caplog.text.count("computed from its logits: the LM head is a LoRA variant") == 1
    assert abs(outs[0].loss.item() - stock(input_ids, labels=input_ids).loss.item()) < 1e-5


def test_unpacked_batch_with_padding_matches_stock(tiny_checkpoint, gen):
    """Without varlen arguments: each row is causal, padding removed before attention."""
    model = dispatch(load_model(tiny_checkpoint), use_varlen_attn=False)
    stock = load_model(tiny_checkpoint)
    vocab = model.config.vocab_size
    input_ids = torch.randint(3, vocab, (2, 24), generator=gen, device=DEVICE)
    mask = torch.ones(2, 24, dtype=torch.long, device=DEVICE)
    mask[1, 15:] = 0  # right padding
    got = model(input_ids, attention_mask=mask).logits
    want = stock(input_ids, attention_mask=mask).logits
    assert_rel_close(got[0], want[0], torch.float32, factor=20, name="row 0")
    assert_rel_close(got[1, :15], want[1, :15], torch.float32, factor=20, name="row 1")
    # No mask at all: plain causal rows.
    assert_rel_close(model(input_ids).logits, stock(input_ids).logits, torch.float32, factor=20)


def test_padding_mask_is_read_once_per_forward(tiny_checkpoint, gen, validations):
    """Without varlen arguments the layers share the model's attention mask instead."""
    model = dispatch(load_model(tiny_checkpoint), use_varlen_attn=False)
    input_ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=gen, device=DEVICE)
    mask = torch.ones(2, 24, dtype=torch.long, device=DEVICE)
    mask[1, 15:] = 0
    model(input_ids, attention_mask=mask).logits.sum().backward()
    assert validations == ["cu_seqlens_q", "cu_seqlens_k"]
    model(input_ids).logits.sum().backward()  # no mask: whole rows
    assert validations == ["cu_seqlens_q", "cu_seqlens_k"] * 2


def test_greedy_generate_gives_stock_tokens(tiny_checkpoint, gen):
    model = dispatch(load_model(tiny_checkpoint), use_varlen_attn=True)
    stock = load_model(tiny_checkpoint)
    prompt = torch.randint(3, model.config.vocab_size, (1, 12), generator=gen, device=DEVICE)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kwargs), stock.generate(prompt, **kwargs))


def test_dispatch_replaces_every_internlm2_module(tiny_checkpoint):
    model = dispatch(load_model(tiny_checkpoint))
    layers = model.config.num_hidden_layers
    patched = [type(m).__name__ for m in model.modules() if "forward" in m.__dict__
               and m.forward.__func__.__module__ == "xtuner_patch.internlm2.forwards"]
    assert patched.count("InternLM2Attention") == layers
    assert patched.count("InternLM2DecoderLayer") == layers
    assert patched.count("InternLM2RMSNorm") == 2 * layers + 1
    assert patched.count("InternLM2MLP") == layers
    assert patched.count("InternLM2ForCausalLM") == patched.count("Linear") == 1  # + head


def test_unsupported_head_dim_keeps_xtuner_forward(tiny_checkpoint, caplog):
    model = load_model(tiny_checkpoint)
    attention = model.model.layers[0].attention
    attention.head_dim = 48  # as a model with head_dim 48 would have
    with caplog.at_level("WARNING", logger="xtuner_patch"):
        dispatch(model)
    assert "forward" not in attention.__dict__
    assert "head_dim 48" in caplog.text


def test_half_precision_model_matches_float64_reference(tiny_checkpoint, gen, varlen_args):
    """A model cast as a whole (buffers too, as DeepSpeed's bf16 engine does) still runs:
    the rotary ``inv_freq`` buffer is half precision then (found on the H100 in bf16)."""
    model = dispatch(load_model(tiny_checkpoint, dtype=torch.float16))
    assert model.model.layers[0].attention.rotary_emb.inv_freq.dtype == torch.float16
    model64 = load_model(tiny_checkpoint, "eager", torch.float64)
    lengths = [20, 1, 43]
    input_ids, _, position_ids, cu = packed_batch(gen, lengths, model.config.vocab_size)
    varlen_args(cu, max(lengths))
    logits = model(input_ids, position_ids=position_ids).logits
    ref = reference_per_sample(model64, input_ids, lengths)
    assert_rel_close(logits, ref, torch.float16, factor=20, name="logits")


@pytest.mark.gpu
def test_packed_bf16_on_gpu_matches_float64(tiny_checkpoint, gen, varlen_args):
    model = dispatch(load_model(tiny_checkpoint, dtype=torch.bfloat16))
    stock = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    model64 = load_model(tiny_checkpoint, "eager", torch.float64)
    lengths = [300, 1, 700, 23]
    input_ids, labels, position_ids, cu = packed_batch(gen, lengths, model.config.vocab_size)
    varlen_args(cu, max(lengths))
    ours = model(input_ids, position_ids=position_ids).logits
    ref = reference_per_sample(model64, input_ids, lengths)
    stock_logits = reference_per_sample(stock, input_ids, lengths)
    stock_err = rel_error(stock_logits, ref)
    err = rel_error(ours, ref)
    # No worse than XTuner's stock bf16 model run sample by sample.
    assert err <= max(1.5 * stock_err, REL_TOL[torch.bfloat16]), (err, stock_err)
    ref_loss = shifted_loss(ref, labels).item()
    loss_err = abs(model(input_ids, position_ids=position_ids, labels=labels).loss.item()
                   - ref_loss)
    stock_loss_err = abs(shifted_loss(stock_logits, labels).item() - ref_loss)
    assert loss_err <= max(1.5 * stock_loss_err, 1e-2 * ref_loss), (loss_err, stock_loss_err)
    assert HAS_CUDA
