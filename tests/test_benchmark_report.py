"""The benchmark report tool: ratio tables and speed-up plots from pytest-benchmark JSON."""

import json

from benchmarks.report import ratio_table, rows_from_json, speedups, write_report


def _bench(group, impl, median, tokens, **extra):
    return {"group": group, "name": f"test[{impl}-{tokens}]",
            "extra_info": {"bench": "attn_fwd", "tokens": tokens, "impl": impl, **extra},
            "stats": {"median": median}}


def _data():
    return {"datetime": "2026-11-27T00:00:00", "machine_info": {"node": "host"},
            "benchmarks": [
                _bench("attn_fwd tokens=8192", "xtuner-patch", 0.002, 8192, tflops=300.0,
                       peak_mem_bytes=2**20),
                _bench("attn_fwd tokens=8192", "fa2", 0.003, 8192, tflops=200.0),
                _bench("attn_fwd tokens=32768", "xtuner-patch", 0.010, 32768),
                _bench("attn_fwd tokens=32768", "fa2", 0.012, 32768),
            ]}


def test_ratio_table_compares_each_baseline_with_ours():
    table = ratio_table(rows_from_json(_data()))
    lines = table.splitlines()
    fa2_8k = next(line for line in lines if "8192" in line and "| fa2 |" in line)
    assert "1.50x" in fa2_8k and "200.0 TFLOP/s" in fa2_8k
    ours_8k = next(line for line in lines if "8192" in line and "xtuner-patch" in line)
    assert "1.0 MiB" in ours_8k and ours_8k.rstrip().endswith("|  |")


def test_speedup_curves_and_files(tmp_path):
    rows = rows_from_json(_data())
    curves = speedups(rows)
    (key, points), = curves.items()
    assert key[1] == "fa2"
    assert [x for x, _ in points] == [8192, 32768]
    assert abs(points[1][1] - 1.2) < 1e-9

    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_data()))
    md, plots = write_report(str(path), str(tmp_path / "out"))
    assert "| attn_fwd tokens=32768 | fa2 |" in open(md).read()
    assert plots and all(p.endswith(".png") for p in plots)
    # 1.5x and 1.2x over FA2 against the forward's 1.2x target.
    targets = (tmp_path / "out" / "targets.md").read_text()
    assert "| #3 | attn_fwd tokens=8192 | speed-up over FA2 >= 1.2 | 1.5 | yes |" in targets
    assert "| #3 | attn_fwd tokens=32768 | speed-up over FA2 >= 1.2 | 1.2 | yes |" in targets
