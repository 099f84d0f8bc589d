"""InternEvo <-> Hugging Face InternLM2 conversion (``xtuner-patch convert ...``).

The InternEvo checkpoints used against ``internevo2hf`` are either written by
``hf2internevo`` (round trips) or built here by hand from an HF state dict with code that
shares nothing with the converter: interleaved q/k rows, split wq/wk/wv, ``model.``
prefixes, ParallelGPT2Embeddings' key and InternEvo's pickled ``Config`` object.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

pytest.importorskip("xtuner._lite.modelings.internlm2", reason="needs xtuner's InternLM2 code")

from safetensors.torch import load_file, save_file  # noqa: E402

from tests.outputs import siblings, snapshot  # noqa: E402
from tests.xtuner_run import NO_VARLEN, REPO, config_variant, iteration_metrics, train  # noqa: E402
from xtuner_patch.cli import main  # noqa: E402
from xtuner_patch.convert.internevo import (ConversionError, hf_to_internevo,  # noqa: E402
                                            internevo_to_hf, stage_sizes)
from xtuner_patch.errors import UserError  # noqa: E402
from xtuner_patch.fixtures import build_internlm2_checkpoint  # noqa: E402

# 8 heads over 4 kv heads (head_dim 32) so tp 1, 2 and 4 all keep whole kv groups.
H, KV, D, HIDDEN, LAYERS = 8, 4, 32, 256, 4
G = H // KV


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory) -> str:
    return build_internlm2_checkpoint(str(tmp_path_factory.mktemp("gqa")), "tiny", seed=3,
                                      num_attention_heads=H, num_key_value_heads=KV,
                                      num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def evo_checkpoint(tmp_path_factory, gqa_checkpoint) -> str:
    """tp 2 / pp 2 InternEvo shards of ``gqa_checkpoint``, to be copied and damaged."""
    path = str(tmp_path_factory.mktemp("evo") / "ckpt")
    hf_to_internevo(gqa_checkpoint, path, tp=2, pp=2)
    return path


def hf_tensors(path: str) -> dict:
    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    return tensors


def assert_same_tensors(expected: dict, got: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def logits(path: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    ids = torch.randint(3, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


def read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2), (2, 3)])
def test_round_trip_gives_identical_tensors(tmp_path, gqa_checkpoint, tp, pp):
    evo, back = str(tmp_path / "evo"), str(tmp_path / "hf")
    summary = hf_to_internevo(gqa_checkpoint, evo, tp=tp, pp=pp)

    shards = {f"model_tp{t}_pp{p}.pt" for t in range(tp) for p in range(pp)}
    assert set(os.listdir(evo)) == shards | {"model_config.pt"}
    # InternEvo's partition_uniform: the later stages take the extra layers.
    assert summary["layers"] == stage_sizes(LAYERS, pp) == {1: [4], 2: [2, 2], 3: [1, 1, 2]}[pp]
    first = torch.load(os.path.join(evo, f"model_tp{tp - 1}_pp0.pt"), weights_only=True)
    last = torch.load(os.path.join(evo, f"model_tp{tp - 1}_pp{pp - 1}.pt"), weights_only=True)
    assert first["tok_embeddings.weight"].shape == (2048, HIDDEN // tp)  # embed_split_hidden
    assert first["layers.0.attention.wqkv.weight"].shape == ((H + 2 * KV) * D // tp, HIDDEN)
    assert first["layers.0.attention.wo.weight"].shape == (HIDDEN, H * D // tp)
    assert first["layers.0.feed_forward.w2.weight"].shape == (HIDDEN, 896 // tp)
    assert last["output.weight"].shape == (2048 // tp, HIDDEN)
    assert max(int(k.split(".")[1]) for k in last if k.startswith("layers.")) == \
        summary["layers"][-1] - 1  # indices restart on every stage
    cfg = torch.load(os.path.join(evo, "model_config.pt"), weights_only=True)
    assert (cfg["num_layers"], cfg["num_kv_attention_heads"], cfg["rope_base"]) == (4, KV, 1e6)
    multiple = cfg["multiple_of"]  # InternEvo's FeedForward rounds the width up to it
    assert multiple * math.ceil(int(cfg["hidden_size"] * cfg["mlp_ratio"]) / multiple) == 896

    merged = internevo_to_hf(evo, back)
    assert (merged["ranks"], merged["pp"], merged["layers"]) == (tp, pp, summary["layers"])
    assert_same_tensors(hf_tensors(gqa_checkpoint), hf_tensors(back))
    original, converted = read_config(gqa_checkpoint), read_config(back)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rope_theta", "rms_norm_eps",
                "max_position_embeddings", "torch_dtype", "auto_map"):
        assert converted[key] == original[key], key


@pytest.mark.parametrize("options", [
    dict(qk_interleaved=True), dict(split_qkv=True), dict(isp=True),
    dict(embed_split_hidden=False, qk_interleaved=True, split_qkv=True),
], ids=["qk_interleaved", "split_qkv", "isp", "vocab_split+interleaved+split_qkv"])
def test_round_trip_through_internevo_variants(tmp_path, gqa_checkpoint, options):
    evo, back = str(tmp_path / "evo"), str(tmp_path / "hf")
    hf_to_internevo(gqa_checkpoint, evo, tp=2, pp=2, **options)
    state = torch.load(os.path.join(evo, f"model_{'wp' if options.get('isp') else 'tp'}1_pp0.pt"),
                       weights_only=True)
    if options.get("split_qkv"):
        assert state["layers.0.attention.wk.weight"].shape == (KV * D // 2, HIDDEN)
        assert "layers.0.attention.wqkv.weight" not in state
    if options.get("isp"):  # weight parallel splits every matrix on dim 0
        assert state["layers.0.attention.wo.weight"].shape == (HIDDEN // 2, H * D)
    if options.get("embed_split_hidden") is False:
        assert state["tok_embeddings.weight"].shape == (1024, HIDDEN)
    summary = internevo_to_hf(evo, back)
    assert summary["qk_interleaved"] == options.get("qk_interleaved", False)
    assert_same_tensors(hf_tensors(gqa_checkpoint), hf_tensors(back))


def test_dtype_and_shards(tmp_path, gqa_checkpoint):
    evo, back = str(tmp_path / "evo"), str(tmp_path / "hf")
    hf_to_internevo(gqa_checkpoint, evo, tp=2, pp=2, dtype="bfloat16")
    assert torch.load(os.path.join(evo, "model_config.pt"))["dtype"] == "torch.bfloat16"
    summary = internevo_to_hf(evo, back, max_shard_size="2MB")
    assert summary["dtype"] == "bfloat16" and len(summary["files"]) > 2
    with open(os.path.join(back, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert sorted(set(index["weight_map"].values())) == summary["files"]
    assert index["metadata"]["total_size"] == summary["bytes"]
    assert read_config(back)["torch_dtype"] == "bfloat16"
    expected = {k: v.to(torch.bfloat16) for k, v in hf_tensors(gqa_checkpoint).items()}
    assert_same_tensors(expected, hf_tensors(back))

    internevo_to_hf(evo, back, dtype="float32", overwrite=True)  # stale shards are removed
    assert "model.safetensors.index.json" not in os.listdir(back)
    assert read_config(back)["torch_dtype"] == "float32"


def test_rope_scaling_and_norm_head(tmp_path, evo_checkpoint):
    src = build_internlm2_checkpoint(str(tmp_path / "hf"), "tiny",
                                     rope_scaling={"type": "dynamic", "factor": 2.0})
    hf_to_internevo(src, str(tmp_path / "evo"))
    cfg = torch.load(os.path.join(tmp_path / "evo", "model_config.pt"), weights_only=True)
    assert cfg["use_dynamic_ntk_rope"] and cfg["rope_scaling_factor"] == 2.0
    internevo_to_hf(str(tmp_path / "evo"), str(tmp_path / "back"))
    assert read_config(str(tmp_path / "back"))["rope_scaling"] == {"type": "dynamic",
                                                                   "factor": 2.0}

    # InternEvo's norm head normalises the output rows at run time; HF must store them so.
    evo = str(tmp_path / "norm_head")
    shutil.copytree(evo_checkpoint, evo)
    cfg = torch.load(os.path.join(evo, "model_config.pt"), weights_only=True)
    torch.save(dict(cfg, norm_head=True), os.path.join(evo, "model_config.pt"))
    internevo_to_hf(evo, str(tmp_path / "norm_head_hf"))
    output = hf_tensors(str(tmp_path / "norm_head_hf"))["output.weight"]
    stored = torch.cat([torch.load(os.path.join(evo, f"model_tp{t}_pp1.pt"),
                                   weights_only=True)["output.weight"] for t in (0, 1)])
    torch.testing.assert_close(output, torch.nn.functional.normalize(stored, dim=-1))


def test_sharded_output_loads_as_the_same_model(tmp_path, gqa_checkpoint):
    evo, back = str(tmp_path / "evo"), str(tmp_path / "hf")
    hf_to_internevo(gqa_checkpoint, evo, tp=4, pp=2)
    internevo_to_hf(evo, back, max_shard_size="3MB")
    assert len([n for n in os.listdir(back) if n.endswith(".safetensors")]) > 1
    assert torch.equal(logits(back), logits(gqa_checkpoint))


# ----------------------------------------------------------------------------- hand-built InternEvo
class _Rows:
    """Slices an HF state dict the way InternEvo's ranks hold it, written independently of
    the converter: explicit per-rank ranges, per-head loops."""

    def __init__(self, tensors: dict):
        self.t = tensors

    def layer(self, i: int, suffix: str) -> torch.Tensor:
        return self.t[f"model.layers.{i}.{suffix}"]

    @staticmethod
    def rank_rows(w: torch.Tensor, rank: int, ranks: int) -> torch.Tensor:
        n = w.shape[0] // ranks
        return w[rank * n:(rank + 1) * n].clone()

    @staticmethod
    def rank_cols(w: torch.Tensor, rank: int, ranks: int) -> torch.Tensor:
        n = w.shape[1] // ranks
        return w[:, rank * n:(rank + 1) * n].clone()

    @staticmethod
    def interleave_head(rows: torch.Tensor) -> torch.Tensor:
        # HF rotates row j with row j + D/2; interleaved storage puts them at 2j and 2j + 1.
        out = torch.empty_like(rows)
        for j in range(D // 2):
            out[2 * j], out[2 * j + 1] = rows[j], rows[j + D // 2]
        return out

    def heads(self, i: int, interleave: bool):
        """Per kv group g: the G query heads, the key head and the value head (D rows each)."""
        wqkv = self.layer(i, "attention.wqkv.weight")
        groups = []
        for g in range(KV):
            block = [wqkv[(g * (G + 2) + s) * D:(g * (G + 2) + s + 1) * D] for s in range(G + 2)]
            if interleave:
                block = [self.interleave_head(b) for b in block[:G + 1]] + [block[G + 1]]
            groups.append(block)
        return groups


def _save_fake_internevo_config(path: str, cfg: dict, monkeypatch) -> None:
    """Pickle ``cfg`` as InternEvo does: an ``internlm`` ``Config`` dict subclass that the
    converter cannot import."""
    module_name = "internlm.core.context.parallel_context"
    config_cls = type("Config", (dict,), {"__module__": module_name})
    parts = module_name.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[module_name].Config = config_cls
    obj = config_cls(cfg)
    obj["moe_kwargs"] = config_cls()  # nested Config, as launch() adds
    torch.save(obj, path)
    for depth in range(1, len(parts) + 1):
        monkeypatch.delitem(sys.modules, ".".join(parts[:depth]))


def _internevo_config(**changes) -> dict:
    cfg = dict(num_chunks=1, checkpoint=0, dtype=torch.float32, embed_split_hidden=False,
               num_layers=LAYERS, hidden_size=HIDDEN, vocab_size=2048, embed_grad_scale=1,
               parallel_output=True, num_attention_heads=H, num_kv_attention_heads=KV,
               mlp_ratio=3.5, multiple_of=128, norm_type="rmsnorm", adapt_hf=False,
               apply_post_layer_norm=False, no_bias=True, layer_norm_epsilon=1e-5,
               rope_base=1000000, use_flash_attn=True)
    cfg.update(changes)
    return cfg


def _write_hand_built(path: str, rows: _Rows, *, tp: int, pp_layers, interleave: bool,
                      split_qkv: bool) -> None:
    os.makedirs(path)
    offsets = [sum(pp_layers[:p]) for p in range(len(pp_layers))]
    for p, count in enumerate(pp_layers):
        for rank in range(tp):
            state = {}
            if p == 0:  # vocab split, ParallelGPT2Embeddings' key, as with use_flash_attn
                state["model.tok_embeddings.word_embeddings.weight"] = rows.rank_rows(
                    rows.t["model.tok_embeddings.weight"], rank, tp)
            for local in range(count):
                i = offsets[p] + local
                groups = rows.heads(i, interleave)[rank * KV // tp:(rank + 1) * KV // tp]
                pre = f"model.layers.{local}."
                if split_qkv:
                    queries = [h for g in groups for h in g[:G]]
                    state[pre + "attention.wq.weight"] = torch.cat(queries)
                    state[pre + "attention.wk.weight"] = torch.cat([g[G] for g in groups])
                    state[pre + "attention.wv.weight"] = torch.cat([g[G + 1] for g in groups])
                else:
                    state[pre + "attention.wqkv.weight"] = torch.cat([h for g in groups for h in g])
                state[pre + "attention.wo.weight"] = rows.rank_cols(
                    rows.layer(i, "attention.wo.weight"), rank, tp)
                for name in ("w1", "w3"):
                    state[pre + f"feed_forward.{name}.weight"] = rows.rank_rows(
                        rows.layer(i, f"feed_forward.{name}.weight"), rank, tp)
                state[pre + "feed_forward.w2.weight"] = rows.rank_cols(
                    rows.layer(i, "feed_forward.w2.weight"), rank, tp)
                for name in ("attention_norm", "ffn_norm"):
                    state[pre + f"{name}.weight"] = rows.layer(i, f"{name}.weight").clone()
                state[pre + "attention.rotary_emb.inv_freq"] = torch.ones(D // 2)
            if p == len(pp_layers) - 1:
                state["model.norm.weight"] = rows.t["model.norm.weight"].clone()
                state["model.output.weight"] = rows.rank_rows(rows.t["output.weight"], rank, tp)
            torch.save(state, os.path.join(path, f"model_tp{rank}_pp{p}.pt"))


def test_interleaved_checkpoint_converts_to_the_same_model(tmp_path, gqa_checkpoint, monkeypatch):
    rows = _Rows(hf_tensors(gqa_checkpoint))
    evo = str(tmp_path / "evo")
    _write_hand_built(evo, rows, tp=2, pp_layers=[1, 3], interleave=True, split_qkv=False)
    _save_fake_internevo_config(os.path.join(evo, "model_config.pt"), _internevo_config(),
                                monkeypatch)
    summary = internevo_to_hf(evo, str(tmp_path / "hf"))
    assert summary["qk_interleaved"] and summary["layers"] == [1, 3]
    assert_same_tensors(rows.t, hf_tensors(str(tmp_path / "hf")))
    assert torch.equal(logits(str(tmp_path / "hf")), logits(gqa_checkpoint))

    # The same rows read as HF-ordered make a different model: the row order matters.
    _save_fake_internevo_config(os.path.join(evo, "model_config.pt"),
                                _internevo_config(adapt_hf=True), monkeypatch)
    internevo_to_hf(evo, str(tmp_path / "wrong"))
    wrong = hf_tensors(str(tmp_path / "wrong"))["model.layers.0.attention.wqkv.weight"]
    assert not torch.equal(wrong, rows.layer(0, "attention.wqkv.weight"))


def test_split_wq_wk_wv_checkpoint(tmp_path, gqa_checkpoint):
    rows = _Rows(hf_tensors(gqa_checkpoint))
    evo = str(tmp_path / "evo")
    _write_hand_built(evo, rows, tp=4, pp_layers=[4], interleave=False, split_qkv=True)
    torch.save(_internevo_config(adapt_hf=True, dtype="torch.float32"),
               os.path.join(evo, "model_config.pt"))
    summary = internevo_to_hf(evo, str(tmp_path / "hf"))
    assert summary["qkv"] == "split" and summary["ranks"] == 4
    assert_same_tensors(rows.t, hf_tensors(str(tmp_path / "hf")))


# ----------------------------------------------------------------------------- bad input
def _load(path):
    return torch.load(path, weights_only=True)


def _edit_shard(name, edit):
    def apply(evo):
        path = os.path.join(evo, name)
        state = _load(path)
        edit(state)
        torch.save(state, path)
    return apply


def _edit_config(**changes):
    def apply(evo):
        path = os.path.join(evo, "model_config.pt")
        cfg = _load(path)
        cfg.update(changes)
        torch.save(cfg, path)
    return apply


def _copy(pairs):
    def apply(evo):
        for src, dst in pairs:
            shutil.copyfile(os.path.join(evo, src), os.path.join(evo, dst))
    return apply


def _truncate(key):
    def edit(state):
        state[key] = state[key][:, :-1].clone()
    return edit


def _add(key, value):
    return lambda state: state.__setitem__(key, value)


def _prefix_chunk(state):
    for key in list(state):
        state["0." + key] = state.pop(key)


BAD_INTERNEVO = {
    "missing shard": (lambda evo: os.remove(os.path.join(evo, "model_tp1_pp1.pt")),
                      ["model_tp1_pp1.pt", "missing"]),
    "extra tp shards": (_copy([("model_tp1_pp0.pt", "model_tp2_pp0.pt"),
                               ("model_tp1_pp1.pt", "model_tp2_pp1.pt")]),
                        ["3 tensor-parallel ranks", "num_kv_attention_heads=4"]),
    "extra pp shards": (_copy([("model_tp0_pp1.pt", "model_tp0_pp2.pt"),
                               ("model_tp1_pp1.pt", "model_tp1_pp2.pt")]),
                        ["model_tp0_pp1.pt", "'norm.weight'", "extra pipeline shards"]),
    "shapes disagree": (_edit_shard("model_tp1_pp0.pt", _truncate("layers.1.attention.wo.weight")),
                        ["'layers.1.attention.wo.weight'", "model_tp0_pp0.pt",
                         "model_tp1_pp0.pt"]),
    "unknown key": (lambda evo: [_edit_shard(f"model_tp{t}_pp1.pt", _add(
        "layers.0.attention.wqkv.bias", torch.zeros(192)))(evo) for t in (0, 1)],
        ["model_tp0_pp1.pt", "unknown key 'layers.0.attention.wqkv.bias'"]),
    "missing key": (_edit_shard("model_tp1_pp1.pt",
                                lambda s: s.pop("layers.1.feed_forward.w2.weight")),
                    ["model_tp1_pp1.pt", "lacks 'layers.1.feed_forward.w2.weight'"]),
    "config hidden_size": (_edit_config(hidden_size=512),
                           ["model_config.pt", "hidden_size=512", "model_tp0_pp0.pt"]),
    "config kv heads": (_edit_config(num_kv_attention_heads=2),
                        ["model_config.pt", "num_kv_attention_heads=2",
                         "'layers.0.attention.wqkv.weight'"]),
    "config num_layers": (_edit_config(num_layers=6), ["model_config.pt", "num_layers=6"]),
    "config mlp_ratio": (_edit_config(mlp_ratio=4.0),
                         ["model_config.pt", "mlp_ratio=4.0", "feed_forward.w1.weight"]),
    "config q/k layout": (_edit_config(adapt_hf=True, qk_interleaved=True),
                          ["adapt_hf", "qk_interleaved"]),
    "no config": (lambda evo: os.remove(os.path.join(evo, "model_config.pt")),
                  ["model_config.pt", "missing"]),
    "interleaved pipeline": (_edit_shard("model_tp0_pp0.pt", _prefix_chunk),
                             ["model_tp0_pp0.pt", "num_chunks"]),
    "fsdp shard": (_copy([("model_tp0_pp0.pt", "model_tp0_pp0_dp0.pt")]),
                   ["model_tp0_pp0_dp0.pt", "unsupported"]),
    "corrupt shard": (lambda evo: open(os.path.join(evo, "model_tp0_pp1.pt"), "wb").write(b"x"),
                      ["model_tp0_pp1.pt", "not a readable"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INTERNEVO))
def test_bad_internevo_input_names_file_and_key(tmp_path, evo_checkpoint, case):
    damage, expected = BAD_INTERNEVO[case]
    evo = str(tmp_path / "evo")
    shutil.copytree(evo_checkpoint, evo)
    damage(evo)
    with pytest.raises(ConversionError) as info:
        internevo_to_hf(evo, str(tmp_path / "hf"))
    for text in expected:
        assert text in str(info.value), str(info.value)
    assert not os.path.exists(tmp_path / "hf")  # checked before anything is written


def _hf_copy(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        path = os.path.join(dst, "model.safetensors")
        tensors = load_file(path)
        edit_tensors(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
    if edit_config:
        cfg = read_config(dst)
        cfg.update(edit_config)
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(cfg, f)
    return dst


BAD_HF = {
    "tp does not divide kv heads": (None, None, dict(tp=3), ["tp=3", "num_key_value_heads=4"]),
    "pp beyond the layers": (None, None, dict(pp=5), ["pp=5", "4 layers"]),
    "unknown key": (lambda t: t.__setitem__("model.layers.0.attention.wqkv.bias",
                                            torch.zeros(512)), None, {},
                    ["model.safetensors", "unknown key 'model.layers.0.attention.wqkv.bias'"]),
    "missing tensor": (lambda t: t.pop("model.layers.3.ffn_norm.weight"), None, {},
                       ["'model.layers.3.ffn_norm.weight'", "num_hidden_layers=4"]),
    "config disagrees": (None, dict(intermediate_size=1024), {},
                         ["model.safetensors", "intermediate_size=1024",
                          "'model.layers.0.feed_forward.w1.weight'"]),
    "tied embeddings": (None, dict(tie_word_embeddings=True), {}, ["tie_word_embeddings"]),
    "linear rope scaling": (None, dict(rope_scaling={"type": "linear", "factor": 2.0}), {},
                            ["config.json", "rope_scaling"]),
    "not internlm2": (None, dict(model_type="llama"), {}, ["config.json", "'llama'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_HF))
def test_bad_hf_input_names_file_and_key(tmp_path, gqa_checkpoint, case):
    edit_tensors, edit_config, options, expected = BAD_HF[case]
    src = _hf_copy(gqa_checkpoint, str(tmp_path / "hf"), edit_tensors, edit_config)
    with pytest.raises(ConversionError) as info:
        hf_to_internevo(src, str(tmp_path / "evo"), **{"tp": 2, "pp": 2, **options})
    for text in expected:
        assert text in str(info.value), str(info.value)


def test_output_folder_is_not_clobbered(tmp_path, gqa_checkpoint, evo_checkpoint):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="--overwrite"):
        internevo_to_hf(evo_checkpoint, str(busy))
    with pytest.raises(UserError, match="--overwrite"):
        hf_to_internevo(gqa_checkpoint, str(busy))
    assert os.listdir(busy) == ["notes.txt"]
    hf_to_internevo(gqa_checkpoint, str(busy), tp=2, overwrite=True)
    assert (busy / "notes.txt").read_text() == "keep me"
    assert len(os.listdir(busy)) == 4


# ----------------------------------------------------------------------------- atomic output
def test_a_failed_conversion_leaves_the_output_as_it_was(tmp_path, gqa_checkpoint):
    # A truncated safetensors file passes the header checks and fails once its data is read:
    # here in output.weight, on the last pipeline stage, after stage 0's shards are written.
    src = tmp_path / "truncated"
    shutil.copytree(gqa_checkpoint, src)
    os.truncate(src / "model.safetensors", os.path.getsize(src / "model.safetensors") - 4096)
    with pytest.raises(ConversionError, match="truncated inside 'output.weight'"):
        hf_to_internevo(str(src), str(tmp_path / "evo"), tp=2, pp=2)
    assert sorted(os.listdir(tmp_path)) == ["truncated"]

    previous = tmp_path / "previous"
    hf_to_internevo(gqa_checkpoint, str(previous), tp=2, pp=2)
    (previous / "notes.txt").write_text("keep me")
    before = snapshot(previous)
    with pytest.raises(ConversionError, match="truncated inside"):
        hf_to_internevo(str(src), str(previous), tp=1, pp=4, overwrite=True)
    assert snapshot(previous) == before
    assert siblings(previous) == []


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory) -> dict:
    """An HF checkpoint, its InternEvo shards and an earlier (other) conversion of each
    direction: big enough that converting it writes for well over a second."""
    root = tmp_path_factory.mktemp("slow")
    hf = build_internlm2_checkpoint(str(root / "hf"), "tiny", vocab_size=32000,
                                    intermediate_size=2048, num_hidden_layers=8,
                                    num_attention_heads=H, num_key_value_heads=KV)
    hf_to_internevo(hf, str(root / "evo"), tp=2, pp=8)
    small = build_internlm2_checkpoint(str(root / "small"), "tiny", num_hidden_layers=1)
    hf_to_internevo(small, str(root / "small_evo"))
    return {"hf": hf, "evo": str(root / "evo"), "small": small,
            "small_evo": str(root / "small_evo")}


def _start_and_stop_while_writing(argv, dst, logs):
    """Start ``xtuner-patch ARGV`` and SIGSTOP it as soon as the temporary sibling of ``dst``
    holds a file; returns the stopped process and that folder."""
    out, err = open(logs / "stdout", "w"), open(logs / "stderr", "w")
    proc = subprocess.Popen([sys.executable, "-m", "xtuner_patch.cli", *argv], stdout=out,
                            stderr=err, env=dict(os.environ, PYTHONPATH=REPO))
    out.close()
    err.close()
    parent, name = os.path.split(dst)
    deadline = time.monotonic() + 300
    while True:
        for entry in os.listdir(parent):
            if entry.startswith(f".{name}.tmp-"):
                try:
                    if os.listdir(os.path.join(parent, entry)):
                        proc.send_signal(signal.SIGSTOP)
                        return proc, os.path.join(parent, entry)
                except FileNotFoundError:
                    pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never saw {dst} being written: {(logs / 'stderr').read_text()}")
        time.sleep(0.002)


def _conversion_argv(direction, slow, dst, previous):
    src = slow["hf"] if direction == "hf2internevo" else slow["evo"]
    argv = ["convert", direction, src, str(dst)]
    if direction == "hf2internevo":
        argv += ["--tp", "2", "--pp", "8"]
    else:
        argv += ["--max-shard-size", "4MB"]
    if previous:
        other = slow["small"] if direction == "hf2internevo" else slow["small_evo"]
        main(["convert", direction, other, str(dst)])
        (dst / "notes.txt").write_text("keep me")
        argv.append("--overwrite")
    return argv


@pytest.mark.parametrize("direction, signum, previous", [
    ("hf2internevo", signal.SIGINT, False), ("hf2internevo", signal.SIGTERM, True),
    ("internevo2hf", signal.SIGTERM, False), ("internevo2hf", signal.SIGINT, True),
], ids=["hf2internevo-SIGINT-new", "hf2internevo-SIGTERM-overwrite",
        "internevo2hf-SIGTERM-new", "internevo2hf-SIGINT-overwrite"])
def test_an_interrupted_conversion_leaves_the_output_as_it_was(tmp_path, slow_checkpoint,
                                                              capsys, direction, signum,
                                                              previous):
    dst = tmp_path / "out"
    argv = _conversion_argv(direction, slow_checkpoint, dst, previous)
    capsys.readouterr()
    before = snapshot(dst) if previous else None
    proc, tmp = _start_and_stop_while_writing(argv, str(dst), tmp_path)
    try:
        # Checked while the conversion is frozen: it has not finished, so the signal lands
        # mid-way.
        assert os.path.isdir(tmp) and (snapshot(dst) if previous else None) == before, \
            "the conversion finished before the signal: make slow_checkpoint bigger"
        proc.send_signal(signum)
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=300) == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum]
    finally:
        proc.kill()  # a no-op once it has exited
        proc.wait()
    err = (tmp_path / "stderr").read_text()
    assert "Traceback" not in err, err
    assert err.splitlines()[-1] == f"interrupted: {dst} left unchanged", err
    assert (tmp_path / "stdout").read_text() == ""
    if previous:
        assert snapshot(dst) == before
    else:
        assert not dst.exists()
    assert siblings(dst) == []


def test_kill_9_leaves_the_output_and_the_next_run_cleans_up(tmp_path, slow_checkpoint):
    dst = tmp_path / "out"
    argv = _conversion_argv("hf2internevo", slow_checkpoint, dst, previous=True)
    before = snapshot(dst)
    proc, tmp = _start_and_stop_while_writing(argv, str(dst), tmp_path)
    proc.kill()
    proc.wait()
    assert snapshot(dst) == before
    assert siblings(dst) == [os.path.basename(tmp)]  # cannot be caught: left behind
    summary = hf_to_internevo(slow_checkpoint["small"], str(dst), tp=1, overwrite=True)
    assert siblings(dst) == []
    assert sorted(os.listdir(dst)) == sorted(summary["files"] + ["model_config.pt",
                                                                 "notes.txt"])


# ----------------------------------------------------------------------------- CLI
def test_cli_converts_and_reports_bad_input(tmp_path, gqa_checkpoint, capsys):
    evo, back = str(tmp_path / "evo"), str(tmp_path / "hf")
    assert main(["convert", "hf2internevo", gqa_checkpoint, evo, "--tp", "2", "--pp", "2",
                 "--qk-interleaved"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["files"][-1] == "model_tp1_pp1.pt"
    assert "tensor.size=2" in err
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json", "tokenization_internlm2.py"):
        (tokenizer / name).write_text(name)
    assert main(["convert", "internevo2hf", evo, back, "--dtype", "bfloat16",
                 "--max-shard-size", "4MB", "--progress", "--tokenizer", str(tokenizer)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["qk_interleaved"] is True and "internevo2hf" in err  # progress bar
    assert read_config(back)["torch_dtype"] == "bfloat16"
    assert (tmp_path / "hf" / "tokenization_internlm2.py").read_text() == \
        "tokenization_internlm2.py"

    os.remove(os.path.join(evo, "model_tp0_pp1.pt"))
    assert main(["convert", "internevo2hf", evo, str(tmp_path / "hf2")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and "model_tp0_pp1.pt" in err
    assert len(err.splitlines()) == 1


BAD_ARGUMENTS = {
    "tp 0": (["hf2internevo", "{hf}", "{dst}", "--tp", "0"], "--tp must be > 0, got 0"),
    "pp -1": (["hf2internevo", "{hf}", "{dst}", "--pp", "-1"], "--pp must be > 0, got -1"),
    "tp not a number": (["hf2internevo", "{hf}", "{dst}", "--tp", "two"],
                        "argument --tp: invalid int value: 'two' "
                        "(see xtuner-patch convert hf2internevo --help)"),
    "shard size 0": (["internevo2hf", "{evo}", "{dst}", "--max-shard-size", "0MB"],
                     "--max-shard-size must be > 0 bytes, got '0MB'"),
    "shard size not a size": (["internevo2hf", "{evo}", "{dst}", "--max-shard-size", "1.2.3GB"],
                              "--max-shard-size must be a size such as 5GB, 500MB, 2GiB or a "
                              "byte count, got '1.2.3GB'"),
    "max positions 0": (["internevo2hf", "{evo}", "{dst}", "--max-position-embeddings", "0"],
                        "--max-position-embeddings must be > 0, got 0"),
    "missing internevo folder": (["internevo2hf", "{missing}", "{dst}"],
                                 "{missing}: not a folder"),
    "missing hf folder": (["hf2internevo", "{missing}", "{dst}"], "{missing}: not a folder"),
    "missing tokenizer folder": (["internevo2hf", "{evo}", "{dst}", "--tokenizer", "{missing}"],
                                 "{missing}: not a folder (the tokenizer folder to copy from)"),
    "output is a file": (["hf2internevo", "{hf}", "{file}"],
                         "{file}: exists and is not a folder"),
    "output not empty": (["internevo2hf", "{evo}", "{hf}"],
                         "{hf}: exists and is not empty (pass --overwrite to replace it)"),
    "no subcommand": ([], "the following arguments are required: convert_command "
                          "(see xtuner-patch convert --help)"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_cli_reports_bad_arguments_in_one_line(tmp_path, gqa_checkpoint, evo_checkpoint,
                                               capsys, case):
    argv, message = BAD_ARGUMENTS[case]
    (tmp_path / "file").write_text("x")
    paths = dict(hf=gqa_checkpoint, evo=evo_checkpoint, dst=str(tmp_path / "dst"),
                 missing=str(tmp_path / "missing"), file=str(tmp_path / "file"))
    before = snapshot(gqa_checkpoint)
    assert main(["convert"] + [a.format(**paths) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"error: {message.format(**paths)}\n")
    assert sorted(os.listdir(tmp_path)) == ["file"]
    assert snapshot(gqa_checkpoint) == before


# ----------------------------------------------------------------------------- memory
_MEASURE = r"""
import json, os, sys, threading, time
import transformers, xtuner._lite.modelings.internlm2  # imports are not the conversion's memory
from xtuner_patch.convert.internevo import hf_to_internevo, internevo_to_hf

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

base, peak, done = rss(), [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
thread = threading.Thread(target=sample)
thread.start()
fn = {"to_evo": hf_to_internevo, "to_hf": internevo_to_hf}[sys.argv[1]]
fn(sys.argv[2], sys.argv[3], **json.loads(sys.argv[4]))
done.append(1)
thread.join()
print(json.dumps({"peak_delta": max(peak[0], rss()) - base}))
"""


def test_peak_memory_is_one_pipeline_stage(tmp_path):
    # Streaming holds one pipeline stage (half the model at pp 2) plus 16 MiB blocks; loading
    # every shard, as a merge-then-save converter does, would cost the whole model or more.
    # A 64k vocabulary makes the embedding and head, the tensors split across ranks, most
    # of the ~145 MB.
    src = build_internlm2_checkpoint(str(tmp_path / "hf"), "tiny", vocab_size=64000,
                                     num_attention_heads=H, num_key_value_heads=KV,
                                     num_hidden_layers=LAYERS)
    model_bytes = os.path.getsize(os.path.join(src, "model.safetensors"))
    env = dict(os.environ, PYTHONPATH=REPO)
    for direction, args, options in [
            ("to_evo", (src, str(tmp_path / "evo")), {"tp": 2, "pp": 2}),
            ("to_hf", (str(tmp_path / "evo"), str(tmp_path / "back")), {})]:
        proc = subprocess.run([sys.executable, "-c", _MEASURE, direction, *args,
                               json.dumps(options)], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        delta = json.loads(proc.stdout.strip().splitlines()[-1])["peak_delta"]
        assert delta < 0.8 * model_bytes, (direction, delta / model_bytes)


# ----------------------------------------------------------------------------- XTuner
@pytest.mark.slow
def test_converted_model_trains_under_xtuner(tmp_path, tiny_checkpoint, sample_ftdp):
    evo, back, work = tmp_path / "evo", tmp_path / "hf", tmp_path / "work"
    hf_to_internevo(tiny_checkpoint, str(evo), tp=1, pp=2, qk_interleaved=True)
    internevo_to_hf(str(evo), str(back), max_shard_size="4MB")
    work.mkdir()
    # XTuner's stock path (which has no varlen attention without flash-attn): what is under
    # test is the checkpoint, not the kernels.
    proc = train(str(work), str(back), sample_ftdp["root"], max_iters=1,
                 config=config_variant(tmp_path, "no_varlen.py", NO_VARLEN),
                 env={"XTUNER_PATCH": "0"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    rows = iteration_metrics(log)
    assert [r["iter"] for r in rows] == [1], log[-4000:]
    assert abs(rows[0]["loss"] - math.log(2048)) < 0.5  # a random model's loss, finite
