"""xtuner_patch.dataset.mixing: dataset_weights proportions, reproducibility, errors."""

from collections import Counter

import numpy as np
import pytest

from xtuner_patch.dataset import build_packed_dataset, load_intern_repo_tokenized_dataset
from xtuner_patch.dataset.mixing import group_files, weighted_pack_index
from xtuner_patch.fixtures.ftdp import write_synthetic_corpus

FILES = {"cn/chat/p0": 300, "cn/chat/p1": 200, "cn/wiki/p0": 150, "en/code/p0": 100,
         "en/web/p0": 400}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mix"))
    write_synthetic_corpus(root, FILES, seed=2, median_length=30, max_length=200)
    return root


def _build(folder, weights, seed=1024, packed_length=128):
    return build_packed_dataset(load_intern_repo_tokenized_dataset(folder), packed_length, seed,
                                dataset_weights=weights)


def _item_files(ds):
    """Relative path of the file each item's pack comes from."""
    return [ds.rel_paths[f] for f in np.searchsorted(ds.file_packs, ds.index, side="right") - 1]


def test_token_proportions_follow_the_weights(corpus):
    plain = _build(corpus, None)
    ds = _build(corpus, {"cn": 1, "en": 3})
    assert len(ds) == len(plain)  # the epoch keeps its natural length
    counts = Counter(rel.split("/")[0] for rel in _item_files(ds))
    assert counts["cn"] + counts["en"] == len(ds)
    assert abs(counts["en"] / len(ds) - 0.75) <= 1 / len(ds)
    # Every item is an unweighted pack, unchanged (tokens per item are equal, so pack
    # proportions are token proportions).
    for i in (0, 7, len(ds) - 1):
        a, b = ds[i], plain[int(ds.index[i])]
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        assert len(ds[i]["input_ids"]) == 128


def test_longest_key_wins_and_zero_weight_leaves_data_out(corpus):
    ds = _build(corpus, {"en/code": 2, "en": 1, "cn/wiki": 0, "cn": 1})
    counts = Counter("/".join(rel.split("/")[:2]) if rel.startswith(("en/code/", "cn/wiki/"))
                     else rel.split("/")[0] for rel in _item_files(ds))
    natural = _build(corpus, None)
    wiki = natural.rel_paths.index("cn/wiki/p0.bin")
    assert "cn/wiki" not in counts
    assert len(ds) == len(natural) - int(np.diff(natural.file_packs)[wiki])
    share = {k: v / len(ds) for k, v in counts.items()}
    assert share["en/code"] == pytest.approx(0.5, abs=1 / len(ds))
    assert share["en"] == pytest.approx(0.25, abs=1 / len(ds))
    assert share["cn"] == pytest.approx(0.25, abs=1 / len(ds))


def test_upsampling_repeats_whole_passes_then_a_random_subset():
    packs = np.array([4, 6])  # file 0: packs 0-3, file 1: packs 4-9
    index = weighted_pack_index(["a/x.bin", "b/y.bin"], packs, {"a": 9, "b": 1}, seed=0)
    assert len(index) == 10
    counts = Counter(index.tolist())
    assert sorted(counts[p] for p in range(4)) == [2, 2, 2, 3]  # 9 = 2 passes + 1
    assert sum(counts[p] for p in range(4, 10)) == 1


def test_seeded_and_reproducible(corpus):
    a = _build(corpus, {"cn": 2, "en": 1}, seed=3)
    b = _build(corpus, {"en": 1.0, "cn": 2.0}, seed=3)  # key order does not matter
    c = _build(corpus, {"cn": 2, "en": 1}, seed=4)
    assert np.array_equal(a.index, b.index)
    assert not np.array_equal(a.index, c.index)
    # Groups interleave even without a shuffling sampler.
    assert {"cn", "en"} <= {rel.split("/")[0] for rel in _item_files(a)[:20]}


def test_weight_errors(corpus):
    with pytest.raises(ValueError, match=r"covers no key for 2 file\(s\).*en/"):
        _build(corpus, {"cn": 1})
    with pytest.raises(ValueError, match=r"keys \['de'\] match no data file"):
        _build(corpus, {"cn": 1, "en": 1, "de": 1})
    with pytest.raises(ValueError, match="finite and >= 0"):
        _build(corpus, {"cn": -1, "en": 1})
    with pytest.raises(ValueError, match="at least one weight must be > 0"):
        _build(corpus, {".": 0})
    with pytest.raises(ValueError, match="empty"):
        _build(corpus, {})
    with pytest.raises(ValueError, match=r"dataset_weights\['en/code'\] > 0 but its files hold "
                                         "no complete pack"):
        weighted_pack_index(["cn/a.bin", "en/code/b.bin"], np.array([5, 0]),
                            {"cn": 1, "en/code": 1}, 0)
    with pytest.raises(ValueError, match="relative to the folder"):
        group_files([None], ["cn"])


def test_key_spellings():
    rels = ["cn/a/x.bin", "cn/ab.bin", "en/x.bin", "top.bin"]
    assert group_files(rels, ["cn/", "/en", ".", "cn/a"]) == ["cn/a", "cn", "en", "."]
    with pytest.raises(ValueError, match="covers no key"):
        group_files(["cn/ab.bin"], ["cn/a"])  # a prefix of the name is not a folder match
