"""xtuner_patch.dataset.cli: ``data order`` and ``data stats``."""

import argparse
import json
import os

import numpy as np
import pytest

from xtuner_patch.cli import main as cli_main
from xtuner_patch.dataset import (list_ftdp_files, load_intern_repo_tokenized_dataset,
                                  read_samples)
from xtuner_patch.dataset.cli import add_subcommands, dataset_statistics, run
from xtuner_patch.fixtures.ftdp import write_synthetic_corpus
from xtuner_patch.errors import UserError

FILES = {"en/web/p0": 90, "cn/chat/p1": (70, "int32"), "cn/chat/p0": 50, "code/p0": 40,
         "top": 10}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    summary = write_synthetic_corpus(str(root), FILES, seed=4, median_length=40,
                                     max_length=400, zero_length=0.05)
    return root, summary


def _main(argv):
    parser = argparse.ArgumentParser(prog="xtuner-patch")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


def test_order_writes_the_order_xtuner_reads(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "order.txt"
    assert _main(["data", "order", str(root), "-o", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert [str(root / line) for line in lines] == list_ftdp_files(str(root))
    files = load_intern_repo_tokenized_dataset(str(root), data_order_path=str(out))
    assert [f.path for f in files] == list_ftdp_files(str(root))
    with pytest.raises(UserError, match="exists \\(pass --overwrite"):
        _main(["data", "order", str(root), "-o", str(out), "--sort"])
    assert out.read_text().splitlines() == lines
    assert _main(["data", "order", str(root), "-o", str(out), "--sort", "--overwrite"]) == 0
    assert out.read_text().splitlines() == sorted(lines)


def test_order_force_still_overwrites_with_a_warning(corpus, tmp_path, capsys):
    root, _ = corpus
    out = tmp_path / "order.txt"
    out.write_text("old\n")
    assert cli_main(["data", "order", str(root), "-o", str(out), "--force"]) == 0
    assert capsys.readouterr().err == "warning: --force is deprecated; use --overwrite\n"
    assert out.read_text().splitlines() != ["old"]


def test_order_default_output_is_in_the_folder(tmp_path, capsys):
    write_synthetic_corpus(str(tmp_path), {"b/p": 3, "a/p": 3})
    assert _main(["data", "order", str(tmp_path)]) == 0
    assert sorted((tmp_path / "data_order.txt").read_text().splitlines()) == ["a/p.bin",
                                                                              "b/p.bin"]
    assert "wrote 2 file(s)" in capsys.readouterr().out


def test_stats_counts(corpus, capsys):
    root, summary = corpus
    stats = dataset_statistics(str(root), packed_length=256)
    assert stats["total"]["samples"] == summary["samples"]
    assert stats["total"]["tokens"] == summary["tokens"]
    assert stats["total"]["supervised_tokens"] == summary["supervised_tokens"]
    assert stats["total"]["files"] == 5
    assert set(stats["types"]) == {"en", "cn", "code", "."}
    assert stats["types"]["cn"]["samples"] == 120 and stats["types"]["cn"]["files"] == 2
    files = load_intern_repo_tokenized_dataset(str(root))
    packs = {f.rel_path: int(f.length.sum()) // 256 for f in files}
    assert stats["types"]["cn"]["packs"] == packs["cn/chat/p0.bin"] + packs["cn/chat/p1.bin"]
    assert stats["total"]["packs"] == sum(packs.values())

    assert _main(["data", "stats", str(root), "--packed-length", "128", "--micro-bsz", "2",
                  "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["packed_length"], printed["micro_bsz"]) == (128, 2)
    assert printed["types"] == stats["types"]  # 128 * 2 = 256 tokens per row
    assert _main(["data", "stats", str(root), "--min-length", "30", "--no-parse"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "packs of 8192 tokens, min_length=30"
    assert table[1].split() == ["type", "files", "samples", "tokens", "supervised_tokens",
                                "packs"]
    assert table[-1].split()[0] == "total" and table[-1].split()[4] == "-"


def test_stats_reports_bad_lines(tmp_path, capsys):
    write_synthetic_corpus(str(tmp_path), {"a/p": 20})
    raw = (tmp_path / "a" / "p.bin").read_bytes().split(b"\n")
    raw[4] = raw[4][:-3]
    (tmp_path / "a" / "p.bin").write_bytes(b"\n".join(raw))
    for extra in ([], ["--no-cache"]):
        assert cli_main(["data", "stats", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "p.bin:5 (" in err[0]


def test_stats_counts_from_a_written_index_and_without_one(corpus, tmp_path):
    root, summary = corpus
    cached = dataset_statistics(str(root), 256, min_length=30, cache_dir=str(tmp_path))
    assert len(os.listdir(tmp_path)) == len(FILES)  # one token index per file
    again = dataset_statistics(str(root), 256, min_length=30, cache_dir=str(tmp_path))
    direct = dataset_statistics(str(root), 256, min_length=30, cache_dir=False)
    assert cached == again == direct
    files = load_intern_repo_tokenized_dataset(str(root), min_length=30)
    expected = sum(int(np.count_nonzero(read_samples(f.path, f.offsets, f.length) > 0))
                   for f in files)
    assert direct["total"]["supervised_tokens"] == expected < summary["supervised_tokens"]


@pytest.mark.parametrize("argv, message", [
    (["stats", "{root}", "--packed-length", "-5"], "--packed-length must be > 0, got -5"),
    (["stats", "{root}", "--packed-length", "0"], "--packed-length must be > 0, got 0"),
    (["stats", "{root}", "--micro-bsz", "0"], "--micro-bsz must be > 0, got 0"),
    (["stats", "{root}", "--min-length", "-1"], "--min-length must be >= 0, got -1"),
    (["stats", "{root}/missing"], "dataset folder {root}/missing does not exist"),
    (["order", "{root}/missing"], "dataset folder {root}/missing does not exist"),
    (["stats", "{root}", "--data-order", "{root}/none.txt"],
     "data_order_path {root}/none.txt does not exist"),
    (["order", "{empty}"], "no '*.bin' files under {empty}"),
])
def test_bad_arguments_are_one_error_line(corpus, tmp_path, capsys, argv, message):
    root, _ = corpus
    fill = dict(root=str(root), empty=str(tmp_path))
    code = cli_main(["data", *(a.format(**fill) for a in argv)])
    err = capsys.readouterr().err
    assert (code, err) == (2, f"error: {message.format(**fill)}\n")
