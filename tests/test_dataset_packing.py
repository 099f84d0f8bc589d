"""xtuner_patch.dataset.packing: XTuner parity, InternEvo label alignment and micro_bsz,
XTuner's sampler + collate fn, and the multi-rank build."""

import itertools
import json

import numpy as np
import pytest
import torch

from xtuner_patch.dataset import (FtdpFormatError, PackedFtdpDataset, build_packed_dataset,
                                  load_intern_repo_tokenized_dataset, write_ftdp_file)
from xtuner_patch.fixtures.ftdp import write_synthetic_corpus

intern_repo = pytest.importorskip("xtuner.dataset.intern_repo")
pytestmark = pytest.mark.filterwarnings("ignore::xtuner_patch.dataset.FtdpDataWarning")

# Nested folders, empty files, zero-token samples, token id 0, negative tokens, samples
# longer than a pack, int32 and int64 meta.
EDGE_FILES = {
    "cn/chat/part-001": (60, "int32"), "cn/chat/part-000": (45, "int64"),
    "cn/wiki/deep/er/part-000": (30, "int32"), "en/empty/part-000": (0, "int64"),
    "en/code/part-000": (80, "int64"), "zz/one/part-000": (1, "int32"), "top": (12, "int64"),
}


@pytest.fixture(scope="module")
def edge_corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("edge"))
    write_synthetic_corpus(root, EDGE_FILES, seed=11, median_length=30, max_length=300,
                           long_length=700, zero_length=0.08, zero_token=0.03)
    return root


def _xtuner(folder, packed_length, seed=1024, **load):
    return intern_repo.build_packed_dataset(
        dict(type=intern_repo.load_intern_repo_tokenized_dataset, folder=folder, **load),
        packed_length=packed_length, seed=seed)


def _ours(folder, packed_length, seed=1024, **load):
    return build_packed_dataset(dict(type=load_intern_repo_tokenized_dataset, folder=folder,
                                     **load), packed_length=packed_length, seed=seed)


def _lists(item):
    """An item with its arrays as lists (XTuner's packs hold lists)."""
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in item.items()}


def _assert_same_packs(ours, xtuner):
    assert len(ours) == len(xtuner)
    for i in range(len(xtuner)):
        a, b = ours[i], xtuner[i]
        assert all(isinstance(v, np.ndarray) and v.dtype == np.int64 for v in a.values())
        assert list(a) == list(b) and _lists(a) == b, f"pack {i} differs"


@pytest.mark.parametrize("packed_length, min_length, seed", [
    (64, 0, 1024), (256, 0, 1024), (700, 0, 7), (1024, 20, 1024), (97, 1, 1024)])
def test_parity_with_xtuner_on_edge_corpus(edge_corpus, packed_length, min_length, seed):
    ours = _ours(edge_corpus, packed_length, seed, min_length=min_length)
    xtuner = _xtuner(edge_corpus, packed_length, seed, min_length=min_length)
    _assert_same_packs(ours, xtuner)
    cum = [ours[i]["cumulative_len"] for i in range(len(ours))]
    if packed_length == 64:  # the corpus does exercise the edge cases
        assert any(len(c) == 2 for c in cum)  # a pack inside one long sample
        assert any(np.any(np.diff(c) == 0) for c in cum)  # zero-token samples
        assert any(0 in ours[i]["input_ids"] for i in range(len(ours)))


@pytest.mark.parametrize("packed_length", [512, 2048])
def test_parity_with_xtuner_on_sample_data(sample_ftdp, packed_length):
    _assert_same_packs(_ours(sample_ftdp["root"], packed_length),
                       _xtuner(sample_ftdp["root"], packed_length))


def test_parity_with_data_order(edge_corpus, tmp_path, monkeypatch):
    order = tmp_path / "order.txt"
    order.write_text("top.bin\nen/code/part-000.bin\ncn/chat/part-000.bin\n")
    real = intern_repo.load_dataset  # XTuner's data_order path needs a list (datasets < 4)
    monkeypatch.setattr(intern_repo, "load_dataset",
                        lambda *a, **k: {"text": list(real(*a, **k)["text"])})
    _assert_same_packs(_ours(edge_corpus, 128, data_order_path=str(order)),
                       _xtuner(edge_corpus, 128, data_order_path=str(order)))


@pytest.mark.parametrize("packed_length", [1, 2, 3, 5])
def test_parity_with_zero_token_samples_first_and_at_boundaries(tmp_path, packed_length):
    # RandomState(1024) keeps sample 0 first among 3 and 4 samples: a file starts empty.
    for name, samples in {"a": [[], [1, 2], [3, 4, 5]], "b": [[], [6], [], [7, 8]],
                          "c": [[9, 10], [], [], [11, 12, 13, 14]]}.items():
        write_ftdp_file(str(tmp_path / f"{name}.bin"), np.array(sum(samples, [])),
                        [len(s) for s in samples])
    _assert_same_packs(_ours(str(tmp_path), packed_length), _xtuner(str(tmp_path), packed_length))


def test_packs_xtuners_own_loaded_files(edge_corpus):
    """Only build_packed_dataset switched: XTuner's JsonlDataset list is accepted."""
    files = intern_repo.load_intern_repo_tokenized_dataset(edge_corpus, min_length=5)
    _assert_same_packs(build_packed_dataset(files, 200), _xtuner(edge_corpus, 200, min_length=5))
    with pytest.raises(TypeError, match="needs ftdp files"):
        build_packed_dataset([[1, 2, 3]], 2)


def test_indexing_and_errors(edge_corpus):
    ds = _ours(edge_corpus, 256)
    assert _lists(ds[-1]) == _lists(ds[len(ds) - 1])
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="label_alignment"):
        _build_small(edge_corpus, label_alignment="hf")
    with pytest.raises(ValueError, match="no complete pack: .* fewer than a row of 1000000"):
        _ours(edge_corpus, 10**6)


def _build_small(folder, **options):
    return build_packed_dataset(load_intern_repo_tokenized_dataset(folder), 64, **options)


def _corrupt_third_line(tmp_path):
    good = np.arange(1, 11)
    write_ftdp_file(str(tmp_path / "a.bin"), np.concatenate([good] * 4), [10] * 4)
    raw = (tmp_path / "a.bin").read_bytes().split(b"\n")
    raw[2] = raw[2].replace(b"[", b"(")
    (tmp_path / "a.bin").write_bytes(b"\n".join(raw))


BAD_THIRD_LINE = r"a\.bin:3 \(byte offset \d+, meta row 2\): not a JSON line"


def test_bad_line_fails_the_build(tmp_path):
    _corrupt_third_line(tmp_path)
    with pytest.raises(FtdpFormatError, match=BAD_THIRD_LINE):
        _ours(str(tmp_path), 10)


def test_bad_line_without_the_check_fails_when_its_pack_is_read(tmp_path):
    _corrupt_third_line(tmp_path)
    ds = build_packed_dataset(load_intern_repo_tokenized_dataset(str(tmp_path)), 10,
                              check_lines=False)
    bad = [i for i in range(len(ds)) if _raises(ds, i)]
    assert len(bad) == 1
    with pytest.raises(FtdpFormatError, match=BAD_THIRD_LINE):
        ds[bad[0]]


def _raises(ds, i):
    try:
        ds[i]
    except FtdpFormatError:
        return True
    return False


# ---------------------------------------------------------------------------------------
# label_alignment='internevo' and micro_bsz, by hand and against a port of InternEvo.

# One file; RandomState(1024) shuffles 3 samples to [0, 2, 1].
HAND = [[-1, -5, 6, 7], [1, 8, 9], [-1, 3, 0, 4, 2]]


@pytest.fixture
def hand_corpus(tmp_path):
    write_ftdp_file(str(tmp_path / "a.bin"), np.concatenate(HAND), [len(s) for s in HAND])
    return str(tmp_path)


def test_hand_checked_labels(hand_corpus):
    # Stream: -1 -5 6 7 | -1 3 0 4 2 | 1 8 9, two packs of 5 (2 tokens dropped).
    xtuner = _build_small_len(hand_corpus, 5)
    assert [_lists(xtuner[0]), _lists(xtuner[1])] == [
        {"input_ids": [1, 5, 6, 7, 1], "cumulative_len": [0, 4, 5],
         "position_ids": [0, 1, 2, 3, 0], "labels": [-100, -100, 6, 7, -100]},
        {"input_ids": [3, 0, 4, 2, 1], "cumulative_len": [0, 4, 5],
         "position_ids": [0, 1, 2, 3, 0], "labels": [3, -100, 4, 2, 1]}]
    internevo = _build_small_len(hand_corpus, 5, label_alignment="internevo")
    assert internevo.labels_shifted and not xtuner.labels_shifted
    # A sample's last token: -100; a cut prefix's last token: the sample's next token.
    assert [internevo[i]["labels"].tolist() for i in range(2)] == [[-100, 6, 7, -100, 3],
                                                                  [-100, 4, 2, -100, 8]]
    for i in range(2):
        shifted, plain = _lists(internevo[i]), _lists(xtuner[i])
        assert shifted.pop("labels_shifted") is True and "labels_shifted" not in plain
        assert {k: v for k, v in shifted.items() if k != "labels"} == \
            {k: v for k, v in plain.items() if k != "labels"}


def test_hand_checked_micro_bsz(hand_corpus):
    # seq_len 2, micro_bsz 3: rows of 6 tokens, segments cut into windows of 2.
    ds = _build_small_len(hand_corpus, 2, micro_bsz=3, label_alignment="internevo")
    assert len(ds) == 2 and ds.row_length == 6
    assert _lists(ds[0]) == {"input_ids": [1, 5, 6, 7, 1, 3], "cumulative_len": [0, 2, 4, 6],
                     "position_ids": [0, 1, 0, 1, 0, 1], "labels": [-100, 6, 7, -100, 3, -100],
                     "labels_shifted": True}
    assert _lists(ds[1]) == {"input_ids": [0, 4, 2, 1, 8, 9], "cumulative_len": [0, 2, 3, 5, 6],
                     "position_ids": [0, 1, 0, 0, 1, 0], "labels": [4, 2, -100, 8, 9, -100],
                     "labels_shifted": True}
    plain = _build_small_len(hand_corpus, 2, micro_bsz=3)
    assert plain[1]["labels"].tolist() == [-100, 4, 2, 1, 8, 9]


def _build_small_len(folder, packed_length, **options):
    return build_packed_dataset(load_intern_repo_tokenized_dataset(folder), packed_length,
                                **options)


def _internevo_packs(samples, seq_len, micro_bsz):
    """Port of InternEvo's PackedDatasetWithCut.build_pack (seed 1024) and the label rule of
    its packed_collate_fn, for one file: ``[(tokens, labels, cu_seqlens, indexes)]``."""
    packed = seq_len * micro_bsz
    order = np.arange(len(samples))
    np.random.RandomState(1024).shuffle(order)
    lens = [len(samples[i]) for i in order]
    acc = list(itertools.accumulate(lens))

    def cal_map(k):
        return int(np.searchsorted(acc, (k + 1) * packed, side="left"))

    out = []
    for k in range(acc[-1] // packed):
        pre_pos, pre_tok = 0, 0
        if k > 0:
            pre_pos = cal_map(k - 1)
            pre_tok = lens[pre_pos] - (acc[pre_pos] - k * packed)
            if pre_tok == lens[pre_pos]:
                pre_pos, pre_tok = pre_pos + 1, 0
        pos = cal_map(k)
        tok = lens[pos] - (acc[pos] - (k + 1) * packed)
        pack, cu, idx, labels = [], [0], [], []

        def add(chunk, lab):
            pack.extend(chunk)
            labels.extend(lab)
            full, left = divmod(len(chunk), seq_len)
            for _ in range(full):
                cu.append(cu[-1] + seq_len)
                idx.extend(range(seq_len))
            if left:
                cu.append(cu[-1] + left)
                idx.extend(range(left))

        while pre_pos < pos:
            chunk = samples[order[pre_pos]][pre_tok:]
            add(chunk, chunk[1:] + [-100])
            pre_pos, pre_tok = pre_pos + 1, 0
        sample = samples[order[pos]]
        chunk = sample[pre_tok:tok]
        add(chunk, chunk[1:] + ([-100] if tok == len(sample) else [sample[tok]]))
        out.append(([abs(t) for t in pack], [t if t > 0 else -100 for t in labels], cu, idx))
    return out


@pytest.mark.parametrize("seq_len, micro_bsz", [(64, 1), (32, 2), (16, 4), (50, 3)])
def test_internevo_alignment_and_micro_bsz_match_internevo(tmp_path, seq_len, micro_bsz):
    write_synthetic_corpus(str(tmp_path), {"a": 120}, seed=5, median_length=20, max_length=90,
                           long_length=400, zero_token=0.05)
    with open(tmp_path / "a.bin") as f:
        expected = _internevo_packs([json.loads(line)["tokens"] for line in f], seq_len,
                                    micro_bsz)
    files = load_intern_repo_tokenized_dataset(str(tmp_path))
    ours = build_packed_dataset(files, seq_len, label_alignment="internevo", micro_bsz=micro_bsz)
    assert len(ours) == len(expected) > 5
    for i, (tokens, labs, cu, idx) in enumerate(expected):
        item = _lists(ours[i])
        assert item["input_ids"] == tokens
        assert item["labels"] == labs
        assert item["cumulative_len"] == cu
        assert item["position_ids"] == idx
    assert max(np.diff(ours[i]["cumulative_len"]).max() for i in range(len(ours))) == seq_len


def test_micro_bsz_keeps_tokens_and_xtuner_labels(edge_corpus):
    """micro_bsz only adds window boundaries: same tokens and labels as a row of L*m."""
    wide = _ours(edge_corpus, 256)
    split = build_packed_dataset(load_intern_repo_tokenized_dataset(edge_corpus), 64,
                                 micro_bsz=4)
    assert len(split) == len(wide)
    for i in range(len(wide)):
        a, b = _lists(wide[i]), _lists(split[i])
        assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
        assert set(a["cumulative_len"]) <= set(b["cumulative_len"])
        assert np.diff(b["cumulative_len"]).max() <= 64


# ---------------------------------------------------------------------------------------
# XTuner's sampler, collate fn, and multi-rank runs.


def test_with_xtuners_sampler_and_collate(edge_corpus):
    from torch.utils.data import BatchSampler, DataLoader

    from xtuner.dataset.collate_fns import default_collate_fn
    from xtuner.dataset.samplers import InternRepoSampler

    def batches(dataset):
        sampler = InternRepoSampler(dataset, shuffle=True, seed=1024)
        sampler.set_epoch(1)
        loader = DataLoader(dataset, batch_sampler=BatchSampler(sampler, 1, drop_last=True),
                            collate_fn=lambda b: default_collate_fn(b, use_varlen_attn=True))
        return list(itertools.islice(loader, 6))

    ours, xtuner = batches(_ours(edge_corpus, 128)), batches(_xtuner(edge_corpus, 128))
    for a, b in zip(ours, xtuner):
        a, b = a["data"], b["data"]
        assert a.keys() == b.keys()
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(a[key], b[key]) and a[key].dtype == torch.int64
        assert torch.equal(a["cumulative_len"][0], b["cumulative_len"][0])
        assert a["cumulative_len"][0].dtype == torch.int32
        assert a["max_seqlen"] == b["max_seqlen"]


def _rank_main(rank, world, store, folder, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        # Only rank 0 may read the data: the others get a folder that does not exist.
        cfg = dict(type=load_intern_repo_tokenized_dataset,
                   folder=folder if rank == 0 else folder + "-missing")
        ds = build_packed_dataset(cfg, 128, label_alignment="internevo")
        results[rank] = (len(ds), [_lists(ds[i]) for i in (0, len(ds) // 2, len(ds) - 1)])
        bad = dict(type=load_intern_repo_tokenized_dataset, folder=folder + "-missing")
        try:
            build_packed_dataset(bad, 128)
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            results[f"error{rank}"] = f"{type(exc).__name__}: {exc}"
    finally:
        dist.destroy_process_group()


def test_two_ranks_build_once_and_agree(edge_corpus, tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=_rank_main, args=(r, 2, str(tmp_path / "store"),
                                                     edge_corpus, results)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        results = dict(results)
    assert [p.exitcode for p in procs] == [0, 0], results
    single = build_packed_dataset(load_intern_repo_tokenized_dataset(edge_corpus), 128,
                                  label_alignment="internevo")
    expected = (len(single), [_lists(single[i]) for i in (0, len(single) // 2, len(single) - 1)])
    assert results[0] == results[1] == expected
    # A failure on rank 0 reaches every rank instead of leaving them waiting.
    assert "FileNotFoundError" in results["error0"]
    assert results["error1"].startswith("RuntimeError: rank 0 failed to build the packed "
                                        "dataset: dataset folder")


def test_dataset_pickles_small(edge_corpus):
    import pickle

    ds = _ours(edge_corpus, 128)
    blob = pickle.dumps(ds)
    assert len(blob) < 40 * ds.offsets.size + 200_000
    again = pickle.loads(blob)
    assert isinstance(again, PackedFtdpDataset)
    assert [_lists(again[i]) for i in range(3)] == [_lists(ds[i]) for i in range(3)]
