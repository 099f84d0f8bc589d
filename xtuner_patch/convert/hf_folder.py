"""A Hugging Face InternLM2 checkpoint folder, as the converter and the fixtures write it.

The modeling code is the one that ships inside XTuner
(``xtuner/_lite/modelings/internlm2/``), copied next to the weights with an
``auto_map`` in ``config.json``, so that
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` loads the
directory exactly as it loads a hub checkpoint (through ``transformers_modules``).
"""

import json
import os
import re
import shutil

# The record xtuner_patch.fixtures leaves beside a checkpoint it built (its seed).
FIXTURE_RECORD = "xtuner_patch_fixture.json"
# Top-level names of an InternLM2 checkpoint folder as written here and by the converter
# (regexes): what replacing such a folder replaces; anything else in it is kept.  ``.partial``
# shards are those of converters that wrote into the folder itself before writes were atomic.
HF_CHECKPOINT_FILES = [r"model(-\d+-of-\d+)?\.safetensors(\.partial)?",
                       r"model\.safetensors\.index\.json", r"config\.json",
                       r"generation_config\.json", r"configuration_internlm2\.py",
                       r"modeling_internlm2\.py", re.escape(FIXTURE_RECORD)]

_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}


def _modeling_dir() -> str:
    import xtuner._lite.modelings.internlm2 as pkg

    return os.path.dirname(pkg.__file__)


def complete_internlm2_config(cfg: dict) -> dict:
    """Check an InternLM2 shape dict (the keys of a preset) and add the fields every
    InternLM2 ``config.json`` carries (``auto_map``, token ids, ...)."""
    cfg = dict(cfg)
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    cfg.setdefault("bias", False)
    cfg.setdefault("attn_implementation", "eager")
    cfg.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2",
               auto_map=dict(_AUTO_MAP), bos_token_id=1, eos_token_id=2, pad_token_id=0,
               hidden_act="silu", initializer_range=cfg.get("initializer_range", 0.02),
               use_cache=True, tie_word_embeddings=cfg.get("tie_word_embeddings", False))
    return cfg


def internlm2_hf_config(cfg: dict):
    """An ``InternLM2Config`` (XTuner's class) from a :func:`complete_internlm2_config` dict."""
    from xtuner._lite.modelings.internlm2 import InternLM2Config

    config = InternLM2Config(**{k: v for k, v in cfg.items()
                                if k not in ("architectures", "model_type", "auto_map",
                                             "torch_dtype")})
    config.auto_map = dict(_AUTO_MAP)
    config.architectures = ["InternLM2ForCausalLM"]
    return config


def write_internlm2_files(path: str, cfg: dict, dtype: str) -> None:
    """Write everything of an InternLM2 checkpoint directory but the weights.

    ``config.json`` (with ``auto_map`` and ``torch_dtype``), ``generation_config.json`` and
    XTuner's modeling code go into ``path``; ``cfg`` is a :func:`complete_internlm2_config`
    dict.  Whoever calls this writes the safetensors next to them.
    """
    from transformers import GenerationConfig

    os.makedirs(path, exist_ok=True)
    config = internlm2_hf_config(cfg)
    config.save_pretrained(path)
    GenerationConfig.from_model_config(config).save_pretrained(path)
    src = _modeling_dir()
    for name in ("configuration_internlm2.py", "modeling_internlm2.py"):
        shutil.copyfile(os.path.join(src, name), os.path.join(path, name))
    # A bare config saves no torch_dtype (only a model's save_pretrained sets it): pin both.
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        saved = json.load(f)
    saved.update(auto_map=dict(_AUTO_MAP), torch_dtype=dtype)
    with open(config_path, "w") as f:
        json.dump(saved, f, indent=2, sort_keys=True)
