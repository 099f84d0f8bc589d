"""The patched tiny InternLM2 in the precision set-ups XTuner users train in.

mmengine's ``AmpOptimWrapper`` (fp32 weights under bf16 / fp16 autocast, a loss scale for
fp16), half-precision weights with and without autocast (XTuner's LoRA / QLoRA configs
load fp16 bases; DeepSpeed's bf16 / fp16 engines cast the model), and fp32 LoRA adapters
on a half-precision base, the head's adapter included (PEFT keeps adapters in fp32).

Each set-up runs forward + backward with labels on the patched model and on XTuner's
stock model, and measures both against the stock model in float64 on the very same
weights: the patched loss and every gradient must be no further from float64 than the
stock model's, up to a margin, or within the dtype's tolerance.  On CPU, fp16 runs the
Triton kernels under the interpreter and bf16 the PyTorch references (the interpreter's
bf16 is broken); the ``gpu`` test repeats the bf16 set-ups on the kernels.
"""

from typing import NamedTuple, Optional

import pytest
import torch

pytest.importorskip("xtuner.model")

from tests.helpers import DEVICE, HAS_CUDA, REL_TOL, rel_error  # noqa: E402
from tests.models import (dispatch, load_model, packed_batch, reference_per_sample,  # noqa: E402
                          shifted_loss, with_lora)


class Setup(NamedTuple):
    weights: torch.dtype
    autocast: Optional[torch.dtype]
    lora: bool = False
    # What the loss is multiplied by before backward (AMP's dynamic loss scale starts
    # at 2**16; DeepSpeed's fp16 engine too); gradients are divided by it after.
    loss_scale: float = 1.0

    @property
    def compute(self) -> torch.dtype:
        return self.autocast or self.weights


SETUPS = {
    "amp-fp16": Setup(torch.float32, torch.float16, loss_scale=2.0 ** 16),
    "amp-bf16": Setup(torch.float32, torch.bfloat16),
    "fp16-weights": Setup(torch.float16, None, loss_scale=2.0 ** 16),
    "fp16-weights-amp": Setup(torch.float16, torch.float16, loss_scale=2.0 ** 16),
    "bf16-weights": Setup(torch.bfloat16, None),
    "bf16-weights-amp": Setup(torch.bfloat16, torch.bfloat16),
    "lora-fp16-base-amp": Setup(torch.float16, torch.float16, lora=True, loss_scale=2.0 ** 16),
    "lora-bf16-base": Setup(torch.bfloat16, None, lora=True),
}

# Margin over the stock model's own error, and the factor on the per-op tolerance that
# a whole model's gradients get (as in test_internlm2_patch).
MARGIN = 2.0
FACTOR = 50


def _models(checkpoint, setup: Setup, gen, use_varlen_attn: bool):
    """Patched, stock and float64 models holding identical weights (adapters included)."""
    patched = dispatch(load_model(checkpoint, dtype=setup.weights),
                       use_varlen_attn=use_varlen_attn)
    stock = load_model(checkpoint, dtype=setup.weights)
    model64 = load_model(checkpoint, dtype=torch.float64)
    if setup.lora:
        lora_gen = torch.Generator(device=DEVICE).manual_seed(int(torch.randint(
            0, 2 ** 31, (1,), generator=gen)))
        patched, stock, model64 = (with_lora(m, lora_gen) for m in (patched, stock, model64))
        assert any(p.dtype == torch.float32 for n, p in patched.named_parameters()
                   if "lora_" in n), "PEFT keeps adapters on a half-precision base in fp32"
    state = patched.state_dict()
    stock.load_state_dict(state)
    model64.load_state_dict({k: v.double() for k, v in state.items()})
    return patched, stock, model64


def _loss_and_grads(model, setup: Setup, run):
    """``run(model)`` -> loss, in ``setup``'s autocast; the loss and the gradient of every
    trainable parameter, as a training step sees them (loss scale divided out)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE.type, dtype=setup.autocast, enabled=setup.autocast is not None):
        loss = run(model)
    (loss * setup.loss_scale).backward()
    grads = {name: p.grad.double() / setup.loss_scale
             for name, p in model.named_parameters() if p.requires_grad}
    return loss.double(), grads


def _assert_no_worse_than_stock(ours, stock, ref, setup: Setup):
    (loss, grads), (stock_loss, stock_grads), (ref_loss, ref_grads) = ours, stock, ref
    tol = REL_TOL[setup.compute]
    loss_err, stock_loss_err = rel_error(loss, ref_loss), rel_error(stock_loss, ref_loss)
    assert loss_err <= max(MARGIN * stock_loss_err, tol), (loss_err, stock_loss_err)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        err, stock_err = rel_error(grad, ref_grads[name]), rel_error(stock_grads[name],
                                                                     ref_grads[name])
        assert err <= max(MARGIN * stock_err, tol * FACTOR), (name, err, stock_err)


def _run_setup(checkpoint, setup, gen):
    patched, stock, model64 = _models(checkpoint, setup, gen, use_varlen_attn=False)
    vocab = patched.config.vocab_size
    input_ids = torch.randint(3, vocab, (2, 24), generator=gen, device=DEVICE)
    labels = input_ids.clone()
    labels[:, :5] = -100
    mask = torch.ones_like(input_ids)
    mask[1, 19:] = 0  # right padding, as XTuner's collate pads
    labels[1, 19:] = -100

    def run(model):
        out = model(input_ids, attention_mask=mask, labels=labels)
        assert (out.logits is None) is (model is patched)  # the fused loss ran
        return out.loss

    ours = _loss_and_grads(patched, setup, run)
    theirs = _loss_and_grads(stock, setup, run)
    ref = _loss_and_grads(model64, Setup(torch.float64, None), run)
    _assert_no_worse_than_stock(ours, theirs, ref, setup)
    return patched


@pytest.mark.parametrize("name", list(SETUPS))
def test_patched_model_trains_like_stock_in_each_precision_setup(tiny_checkpoint, gen, name):
    setup = SETUPS[name]
    if setup.compute == torch.bfloat16 and HAS_CUDA:
        pytest.skip("covered on the Triton kernels by the gpu test below")
    patched = _run_setup(tiny_checkpoint, setup, gen)
    if setup.lora:
        from peft.tuners.lora.layer import Linear as LoraLinear

        assert isinstance(patched.base_model.model.output, LoraLinear)


def test_packed_rows_under_amp_fp16(tiny_checkpoint, gen, varlen_args):
    """Varlen attention under mmengine's fp16 AMP against the stock model run sample by
    sample (a block-diagonal causal mask) in the same autocast."""
    setup = SETUPS["amp-fp16"]
    patched, stock, model64 = _models(tiny_checkpoint, setup, gen, use_varlen_attn=True)
    lengths = [17, 1, 40, 6]
    input_ids, labels, position_ids, cu = packed_batch(gen, lengths, patched.config.vocab_size)
    varlen_args(cu, max(lengths))
    ours = _loss_and_grads(patched, setup, lambda m: m(input_ids, position_ids=position_ids,
                                                       labels=labels).loss)

    def per_sample(model):
        return shifted_loss(reference_per_sample(model, input_ids, lengths), labels)

    theirs = _loss_and_grads(stock, setup, per_sample)
    ref = _loss_and_grads(model64, Setup(torch.float64, None), per_sample)
    _assert_no_worse_than_stock(ours, theirs, ref, setup)


@pytest.mark.gpu
@pytest.mark.parametrize("name", [n for n, s in SETUPS.items() if s.compute == torch.bfloat16])
def test_bf16_setups_on_the_gpu_kernels(tiny_checkpoint, gen, name):
    assert HAS_CUDA
    _run_setup(tiny_checkpoint, SETUPS[name], gen)
