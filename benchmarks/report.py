"""Turn pytest-benchmark results into ratio tables (markdown) and speed-up plots.

Usage::

    pytest benchmarks/ --benchmark-only --benchmark-json=results.json
    python -m benchmarks.report results.json [more.json ...] --out benchmarks/results/<device>/

Within one ``benchmark.group`` (one workload), the row of ``xtuner-patch`` is compared
with every other implementation: ``speed-up = baseline median / ours median`` (> 1
means ours is faster) and ``memory = ours peak / baseline peak``.  ``targets.md``
holds the verdicts of the issues' targets (:mod:`benchmarks.targets`).
"""

import argparse
import json
import os
import sys
from collections import OrderedDict

from benchmarks.targets import OURS, evaluate, impl_row


def _row(group, name, extra, median):
    return {"group": group or name, "name": name, "impl": extra.get("impl", name),
            "median_s": median, "extra": dict(extra)}


def rows_from_benchmarks(benchmarks):
    """Rows from pytest-benchmark's live ``Metadata`` objects (the terminal summary)."""
    return [_row(b.group, b.name, b.extra_info, b.stats.median) for b in benchmarks
            if getattr(b, "stats", None) is not None]


def rows_from_json(data):
    return [_row(b.get("group"), b["name"], b.get("extra_info", {}), b["stats"]["median"])
            for b in data.get("benchmarks", [])]


def _group(rows):
    groups = OrderedDict()
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    return groups


def _fmt_rate(extra):
    if "tflops" in extra:
        return f"{extra['tflops']:.1f} TFLOP/s"
    if "gbps" in extra:
        return f"{extra['gbps']:.1f} GB/s"
    if "throughput" in extra:
        return f"{extra['throughput']:.4g} {extra.get('throughput_unit', '/s')}"
    return ""


def _fmt_mem(extra):
    mem = extra.get("peak_mem_bytes")
    return "" if mem is None else f"{mem / 2**20:.1f} MiB"


def ratio_table(rows) -> str:
    """A markdown table: every implementation of every case, with ratios to ours."""
    lines = ["| case | impl | median | throughput | peak mem | speed-up of ours |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for group, members in _group(rows).items():
        ours = impl_row(members, OURS)
        for row in members:
            speedup = ""
            if ours is not None and row is not ours:
                speedup = f"{row['median_s'] / ours['median_s']:.2f}x"
            lines.append(f"| {group} | {row['impl']} | {row['median_s'] * 1e3:.3f} ms | "
                         f"{_fmt_rate(row['extra'])} | {_fmt_mem(row['extra'])} | {speedup} |")
    return "\n".join(lines)


def targets_table(rows) -> str:
    """A markdown table of the issues' targets judged on these rows (:mod:`benchmarks.targets`)."""
    lines = ["| issue | case | target | value | met |", "| ---: | --- | --- | ---: | :---: |"]
    for v in evaluate(_group(rows)):
        lines.append(f"| #{v['issue']} | {v['case']} | {v['target']} | {v['value']:.3g} | "
                     f"{'yes' if v['met'] else 'no'} |")
    return "\n".join(lines)


def speedups(rows, x_key="tokens"):
    """``{(series, baseline): [(x, speed-up), ...]}`` for plotting speed-up vs ``x_key``.

    ``series`` is the case (the benchmark group, ``k=v`` words from the ``case`` dict)
    without its ``x_key`` word, so curves of different shapes are not mixed and
    measured values never split a curve.
    """
    curves = {}
    for group, members in _group(rows).items():
        ours = impl_row(members, OURS)
        if ours is None or x_key not in ours["extra"]:
            continue
        series = " ".join(w for w in group.split(" ") if not w.startswith(f"{x_key}="))
        for row in members:
            if row is ours:
                continue
            curves.setdefault((series, row["impl"]), []).append(
                (ours["extra"][x_key], row["median_s"] / ours["median_s"]))
    return {k: sorted(v) for k, v in curves.items()}


def plot_speedups(rows, out_dir, x_key="tokens"):
    """One PNG per benchmark family: speed-up of ours vs ``x_key``, one line per baseline."""
    curves = speedups(rows, x_key)
    if not curves:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = OrderedDict()
    for (series, baseline), points in curves.items():
        families.setdefault(series.split(" ")[0], []).append((series, baseline, points))
    written = []
    for family, lines in families.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for series, baseline, points in lines:
            xs, ys = zip(*points)
            label = f"vs {baseline} ({series.partition(' ')[2]})".replace(" ()", "")
            ax.plot(xs, ys, marker="o", label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"{x_key} per pack")
        ax.set_ylabel("speed-up of xtuner-patch (x)")
        ax.set_title(family)
        ax.legend(fontsize=6)
        fig.tight_layout()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in family) or "bench"
        path = os.path.join(out_dir, f"speedup_{safe}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(json_paths, out_dir, title=None):
    """Write ``results.md`` and plots for one or more ``--benchmark-json`` files."""
    if isinstance(json_paths, str):
        json_paths = [json_paths]
    rows, runs, machine = [], [], {}
    for path in json_paths:
        with open(path) as f:
            data = json.load(f)
        rows.extend(rows_from_json(data))
        runs.append(data.get("datetime", ""))
        machine = machine or data.get("machine_info", {})
    os.makedirs(out_dir, exist_ok=True)
    header = title or f"Benchmarks on {machine.get('node', 'unknown host')}"
    md_path = os.path.join(out_dir, "results.md")
    with open(md_path, "w") as f:
        f.write(f"# {header}\n\nRun: {', '.join(r for r in runs if r)}\n\n{ratio_table(rows)}\n")
    with open(os.path.join(out_dir, "targets.md"), "w") as f:
        f.write(f"# Targets of the issues: {header}\n\n{targets_table(rows)}\n")
    plots = plot_speedups(rows, out_dir)
    return md_path, plots


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="files written by --benchmark-json")
    parser.add_argument("--out", required=True, help="output folder, e.g. benchmarks/results/<device>")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    md_path, plots = write_report(args.json, args.out, args.title)
    print(md_path)
    for p in plots:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
