"""The tiny InternLM2 of the model tests: loading, dispatching, batches, LoRA, references.

Shared by the model-parity tests (:mod:`tests.test_internlm2_patch`,
:mod:`tests.test_internlm2_mixed_precision`); the checkpoint itself comes from the
``tiny_checkpoint`` fixture (``tests/conftest.py``).
"""

import torch

from tests.helpers import DEVICE

ATTN_IMPLEMENTATIONS = ["eager", "sdpa", "flash_attention_2"]


def load_model(checkpoint, attn_implementation="eager", dtype=torch.float32):
    """The HF model of ``checkpoint`` with ``attn_implementation``, cast to ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    config.attn_implementation = attn_implementation
    # Built from the config (not from_pretrained) so that the flash-attention-2 class
    # can be instantiated without flash-attn; weights copied from the checkpoint.
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    model.load_state_dict(reference.state_dict())
    return model.to(device=DEVICE, dtype=dtype)


def dispatch(model, use_varlen_attn=True, **switches):
    """``model`` given our forwards, as the patched ``dispatch_modules`` gives them."""
    from xtuner_patch import KernelSwitches
    from xtuner_patch.dispatch import make_dispatch_modules

    stock = lambda model, use_varlen_attn=False: None  # noqa: E731  (XTuner's no-op on CPU)
    make_dispatch_modules(stock, KernelSwitches(**switches))(model, use_varlen_attn)
    return model


def packed_batch(gen, lengths, vocab):
    """``(input_ids, labels, position_ids, cu_seqlens)`` of one packed row of samples of
    ``lengths`` tokens; every 7th label ignored."""
    total = sum(lengths)
    input_ids = torch.randint(3, vocab, (1, total), generator=gen, device=DEVICE)
    labels = input_ids.clone()
    labels[0, :: 7] = -100
    position_ids = torch.cat([torch.arange(n, device=DEVICE) for n in lengths]).unsqueeze(0)
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    return input_ids, labels, position_ids, cu


def with_lora(model, gen, **config):
    """``model`` as XTuner's LoRA configs wrap it (every linear layer, the head
    ``output`` included: xtuner's ``find_all_linear_names``), adapters non-zero.
    ``config`` adds to / overrides the ``LoraConfig`` (r 4, alpha 8, no dropout)."""
    from peft import LoraConfig, get_peft_model
    from xtuner.model.utils import find_all_linear_names

    config = dict(dict(r=4, lora_alpha=8, lora_dropout=0.0), **config)
    model = get_peft_model(model, LoraConfig(target_modules=find_all_linear_names(model),
                                             task_type="CAUSAL_LM", **config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts them at zero: no adapter to test
                param.copy_(torch.randn(param.shape, generator=gen, device=DEVICE) * 0.1)
    return model


def reference_per_sample(model, input_ids, lengths):
    """Logits of every packed sample run on its own through ``model`` (a stock one):
    what a block-diagonal causal mask means."""
    pieces, start = [], 0
    for n in lengths:
        ids = input_ids[:, start:start + n]
        pieces.append(model(ids, position_ids=torch.arange(n, device=DEVICE)[None]).logits)
        start += n
    return torch.cat(pieces, 1)


def shifted_loss(logits, labels):
    """Hugging Face's causal-LM loss of one row of ``logits``."""
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:],
                                             ignore_index=-100)
