"""The offline fixtures: InternLM2 checkpoints and the sample ftdp dataset."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.outputs import siblings, snapshot
from xtuner_patch.cli import main
from xtuner_patch.errors import UserError
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
    before = snapshot(tiny_checkpoint)
    mtime = os.path.getmtime(os.path.join(tiny_checkpoint, "config.json"))
    assert build_internlm2_checkpoint(tiny_checkpoint, "tiny") == tiny_checkpoint
    assert os.path.getmtime(os.path.join(tiny_checkpoint, "config.json")) == mtime
    with pytest.raises(UserError, match=r"num_hidden_layers=2 \(asked 3\).*--overwrite"):
        build_internlm2_checkpoint(tiny_checkpoint, "tiny", num_hidden_layers=3)
    with pytest.raises(UserError, match=r"seed=0 \(asked 1\).*--overwrite"):
        build_internlm2_checkpoint(tiny_checkpoint, "tiny", seed=1)
    assert snapshot(tiny_checkpoint) == before


def _weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def test_make_tiny_model_cli_refuses_other_arguments_without_overwrite(tmp_path, capsys):
    path = str(tmp_path / "model")
    assert main(["make-tiny-model", path, "--layers", "1"]) == 0
    first = snapshot(path)
    assert main(["make-tiny-model", path, "--layers", "1"]) == 0  # same arguments: reused
    assert snapshot(path) == first
    capsys.readouterr()
    assert main(["make-tiny-model", path, "--layers", "1", "--seed", "1"]) == 2
    assert capsys.readouterr().err == (f"error: {path}: holds a checkpoint with seed=0 (asked 1) "
                                       "(pass --overwrite to replace it)\n")
    assert snapshot(path) == first
    with open(os.path.join(path, "notes.txt"), "w") as f:
        f.write("keep me")
    old = _weights(path)
    assert main(["make-tiny-model", path, "--layers", "1", "--seed", "1", "--overwrite"]) == 0
    new = _weights(path)
    assert sorted(new) == sorted(old)
    assert not any(torch.equal(old[k], new[k]) for k in new if k.endswith("wqkv.weight"))
    with open(os.path.join(path, "xtuner_patch_fixture.json")) as f:
        assert json.load(f) == {"seed": 1}
    with open(os.path.join(path, "notes.txt")) as f:
        assert f.read() == "keep me"
    assert siblings(path) == []


def test_sample_data_cli_refuses_to_overwrite_without_overwrite(tmp_path, capsys):
    root = str(tmp_path / "data")
    assert main(["make-sample-data", root, "--long-sample-length", "300"]) == 0
    with open(os.path.join(root, "data_order.txt"), "w") as f:
        f.write("the user's own file\n")
    first = snapshot(root)
    capsys.readouterr()
    assert main(["make-sample-data", root, "--seed", "1"]) == 2
    assert capsys.readouterr().err == (f"error: {root}: exists and is not empty "
                                       "(pass --overwrite to replace it)\n")
    assert snapshot(root) == first
    assert main(["make-sample-data", root, "--seed", "1", "--overwrite"]) == 0
    second = snapshot(root)
    assert sorted(second) == sorted(first)
    assert second["data_order.txt"] == first["data_order.txt"]
    bins = [k for k in first if k.endswith(".bin")]
    assert bins and all(second[k] != first[k] for k in bins)
    assert siblings(root) == []


FIXTURE_BAD_ARGUMENTS = {
    "layers 0": (["make-tiny-model", "{dst}", "--layers", "0"], "--layers must be > 0, got 0"),
    "model seed -1": (["make-tiny-model", "{dst}", "--seed", "-1"],
                      "--seed must be between 0 and 18446744073709551615, got -1"),
    "unknown preset": (["make-tiny-model", "{dst}", "--preset", "13b"],
                       "argument --preset: invalid choice: '13b' (choose from '1_8b', '7b', "
                       "'tiny') (see xtuner-patch make-tiny-model --help)"),
    "model into a file": (["make-tiny-model", "{file}"], "{file}: exists and is not a folder"),
    "vocab 3": (["make-sample-data", "{dst}", "--vocab-size", "3"],
                "--vocab-size must be >= 4, got 3"),
    "long samples 3": (["make-sample-data", "{dst}", "--long-sample-length", "3"],
                       "--long-sample-length must be >= 4, got 3"),
    "data seed 2**32": (["make-sample-data", "{dst}", "--seed", str(2**32)],
                        "--seed must be between 0 and 4294967295, got 4294967296"),
    "data into a file": (["make-sample-data", "{file}"], "{file}: exists and is not a folder"),
}


@pytest.mark.parametrize("case", sorted(FIXTURE_BAD_ARGUMENTS))
def test_fixture_clis_report_bad_arguments_in_one_line(tmp_path, capsys, case):
    argv, message = FIXTURE_BAD_ARGUMENTS[case]
    (tmp_path / "file").write_text("x")
    paths = dict(dst=str(tmp_path / "dst"), file=str(tmp_path / "file"))
    assert main([a.format(**paths) for a in argv]) == 2
    assert capsys.readouterr() == ("", f"error: {message.format(**paths)}\n")
    assert os.listdir(tmp_path) == ["file"]


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
    with pytest.raises(UserError, match="int32 or int64"):
        write_sample_ftdp_dataset(str(tmp_path / "bad"),
                                  SampleDataSpec(files={"en/a/p": (3, "float32")}))
    with pytest.raises(UserError, match=r"phrase_length\[0\] must be >= 1, got 0"):
        write_sample_ftdp_dataset(str(tmp_path / "bad"), SampleDataSpec(phrase_length=(0, 3)))
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]


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
