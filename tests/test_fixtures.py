"""The offline fixtures: InternLM2 checkpoints and the sample ftdp dataset."""

import json
import os

import numpy as np
import pytest
import torch

from xtuner_patch.fixtures import (MODEL_PRESETS, SampleDataSpec, build_internlm2_checkpoint,
                                   internlm2_config_dict, write_sample_ftdp_dataset)


def test_checkpoint_loads_like_a_hub_checkpoint(tiny_checkpoint):
    from transformers import AutoConfig, AutoModelForCausalLM

    files = set(os.listdir(tiny_checkpoint))
    assert {"config.json", "modeling_internlm2.py", "configuration_internlm2.py"} <= files
    assert any(f.endswith(".safetensors") for f in files)
    with open(os.path.join(tiny_checkpoint, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm2.InternLM2ForCausalLM"

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    # Loaded through transformers' dynamic-module machinery, as hub checkpoints are.
    assert type(model).__module__.startswith("transformers_modules.")
    assert type(model).__name__ == "InternLM2ForCausalLM"
    config = AutoConfig.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    assert config.num_attention_heads // config.num_key_value_heads == 4
    assert config.hidden_size // config.num_attention_heads == 64

    ids = torch.randint(3, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = model(ids).logits
    assert logits.shape == (2, 12, config.vocab_size)
    assert torch.isfinite(logits).all()
    # Random initialisation, not zeros: logits must vary across the vocabulary.
    assert logits.std().item() > 0


def test_checkpoint_is_reused_and_guarded(tiny_checkpoint):
    mtime = os.path.getmtime(os.path.join(tiny_checkpoint, "config.json"))
    assert build_internlm2_checkpoint(tiny_checkpoint, "tiny") == tiny_checkpoint
    assert os.path.getmtime(os.path.join(tiny_checkpoint, "config.json")) == mtime
    with pytest.raises(FileExistsError, match="different checkpoint"):
        build_internlm2_checkpoint(tiny_checkpoint, "tiny", num_hidden_layers=3)


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_presets_keep_internlm2_ratios(preset):
    cfg = internlm2_config_dict(preset)
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    assert cfg["hidden_size"] // cfg["num_attention_heads"] in (64, 128)
    assert cfg["auto_map"]["AutoConfig"] == "configuration_internlm2.InternLM2Config"


def test_config_overrides_are_checked():
    assert internlm2_config_dict("7b", num_hidden_layers=2)["num_hidden_layers"] == 2
    with pytest.raises(ValueError, match="preset"):
        internlm2_config_dict("13b")
    with pytest.raises(ValueError, match="unknown"):
        internlm2_config_dict("tiny", hiden_size=3)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        internlm2_config_dict("tiny", num_key_value_heads=3)


def _read_file(bin_path):
    with open(bin_path + ".meta", "rb") as f:
        meta = np.load(f)
    with open(bin_path, "rb") as f:
        raw = f.read()
    samples = []
    for offset, count in meta:
        end = raw.index(b"\n", int(offset))
        tokens = json.loads(raw[int(offset):end])["tokens"]
        assert len(tokens) == int(count)
        samples.append(tokens)
    return meta, samples


def test_sample_data_layout_and_contents(sample_ftdp):
    root = sample_ftdp["root"]
    assert sorted(os.listdir(root)) == ["cn", "en"]
    meta_dtypes, lengths, negatives, ids = set(), [], 0, set()
    for path in sample_ftdp["files"]:
        meta, samples = _read_file(path)
        assert meta.shape == (len(samples), 2)
        meta_dtypes.add(meta.dtype)
        for tokens in samples:
            lengths.append(len(tokens))
            negatives += sum(t < 0 for t in tokens)
            ids.update(abs(t) for t in tokens)
            assert abs(tokens[0]) == 1  # BOS first
    assert meta_dtypes == {np.dtype("int32"), np.dtype("int64")}
    assert min(lengths) == 1
    assert max(lengths) > SampleDataSpec().long_sample_length
    assert negatives > 0
    assert max(ids) < SampleDataSpec().vocab_size and min(ids) >= 1
    assert sum(lengths) == sample_ftdp["tokens"]
    assert len(lengths) == sample_ftdp["samples"]


def test_sample_data_is_deterministic(tmp_path):
    spec = SampleDataSpec(files={"en/a/part-000": (20, "int32")})
    first = write_sample_ftdp_dataset(str(tmp_path / "one"), spec)
    second = write_sample_ftdp_dataset(str(tmp_path / "two"), spec)
    assert first["tokens"] == second["tokens"]
    with open(first["files"][0], "rb") as a, open(second["files"][0], "rb") as b:
        assert a.read() == b.read()
    with pytest.raises(ValueError, match="int32 or int64"):
        write_sample_ftdp_dataset(str(tmp_path / "bad"),
                                  SampleDataSpec(files={"en/a/p": (3, "float32")}))


def test_xtuner_reads_the_sample_data(sample_ftdp):
    intern_repo = pytest.importorskip("xtuner.dataset.intern_repo")
    packed = intern_repo.build_packed_dataset(
        dict(type=intern_repo.load_intern_repo_tokenized_dataset, folder=sample_ftdp["root"],
             min_length=0), packed_length=1024, seed=1024)
    assert len(packed) > 10
    item = packed[3]
    assert len(item["input_ids"]) == 1024
    assert item["cumulative_len"][0] == 0 and item["cumulative_len"][-1] == 1024
    assert any(label == -100 for label in item["labels"])
