"""``xtuner-patch data ...``: write a ``data_order.txt``, print ftdp dataset statistics.

Wiring (in ``xtuner_patch/cli.py``): ``add_subcommands(sub)`` adds the ``data`` command to
the top-level subparsers; ``run(args)`` handles it.  Heavy imports happen in the handlers.
"""

import json
import os
import sys
from collections import OrderedDict

from ..errors import UserError, check_non_negative, check_positive

__all__ = ["add_subcommands", "dataset_statistics", "run", "write_data_order"]


def write_data_order(folder: str, output: str, file_type: str = ".bin", sort: bool = False,
                     overwrite: bool = False) -> list:
    """Write the data files of ``folder``, relative to it, one per line, to ``output``.

    Default order: the order XTuner uses without a data_order file on this machine
    (file-system order of folders), so training with the file reproduces this run;
    ``sort=True`` writes sorted paths (the same on every machine).  An existing
    ``output`` is replaced only with ``overwrite``.  Returns the lines.
    """
    from .ftdp import FtdpFormatError, list_ftdp_files

    lines = [os.path.relpath(p, folder).replace(os.sep, "/")
             for p in list_ftdp_files(folder, None, file_type)]
    if sort:
        lines.sort()
    if not lines:
        raise FtdpFormatError(f"no '*{file_type}' files under {folder}")
    if os.path.exists(output) and not overwrite:
        raise UserError(f"{output} exists (pass --overwrite to replace it)")
    with open(output, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return lines


def dataset_statistics(folder: str, packed_length: int = 8192, min_length: int = 0,
                       data_order_path: str = None, file_type: str = ".bin",
                       micro_bsz: int = 1, parse: bool = True, cache_dir=None) -> dict:
    """Per type folder (first path component; ``.`` for files at the top) and in total:
    ``files``, ``samples``, ``tokens``, ``supervised_tokens`` (tokens > 0, i.e. labels
    other than -100 in XTuner's alignment; None when ``parse`` is False, which skips
    reading the lines) and ``packs`` (of ``packed_length * micro_bsz`` tokens, per
    file as XTuner packs).  Parsing checks every line and writes the token index that
    training then reuses (``cache_dir`` as in ``build_packed_dataset``).
    """
    import numpy as np

    from .ftdp import iter_file_tokens, load_intern_repo_tokenized_dataset, read_meta
    from .index import ensure_index, open_index

    check_positive("packed_length", packed_length)
    check_positive("micro_bsz", micro_bsz)
    check_non_negative("min_length", min_length)
    row = packed_length * micro_bsz
    per_type = OrderedDict()
    for f in load_intern_repo_tokenized_dataset(folder, min_length, data_order_path, file_type):
        kind = f.rel_path.split("/")[0] if "/" in f.rel_path else "."
        s = per_type.setdefault(kind, dict(files=0, samples=0, tokens=0,
                                           supervised_tokens=0 if parse else None, packs=0))
        tokens = int(f.length.sum())
        s["files"] += 1
        s["samples"] += len(f)
        s["tokens"] += tokens
        s["packs"] += tokens // row
        if parse:
            offsets, lengths = read_meta(f.path)
            index_path = ensure_index(f.path, cache_dir)
            index = None if index_path is None else open_index(index_path)
            if index is None:
                blocks = iter_file_tokens(f.path, offsets, lengths)
            else:
                blocks = _index_blocks(index, lengths)
            supervised = np.zeros(len(lengths), dtype=np.int64)
            for lo, hi, ids in blocks:
                supervised[lo:hi] = _per_row(ids > 0, lengths[lo:hi])
            s["supervised_tokens"] += int(supervised[f.rows].sum())
    total = {k: (None if any(s[k] is None for s in per_type.values())
                 else sum(s[k] for s in per_type.values()))
             for k in ("files", "samples", "tokens", "supervised_tokens", "packs")}
    return {"packed_length": packed_length, "micro_bsz": micro_bsz, "min_length": min_length,
            "types": dict(per_type), "total": total}


def _index_blocks(index, lengths, rows_per_block: int = 1 << 16):
    """``(first_row, stop_row, tokens)`` blocks of a token index, as ``iter_file_tokens``."""
    import numpy as np

    bounds = np.concatenate([[0], np.cumsum(lengths)])
    for lo in range(0, len(lengths), rows_per_block):
        hi = min(lo + rows_per_block, len(lengths))
        yield lo, hi, np.asarray(index[bounds[lo]:bounds[hi]])


def _per_row(flags, lengths):
    """Count of true ``flags`` (bool, rows back to back) in each row of ``lengths``."""
    import numpy as np

    ends = np.cumsum(lengths)
    counts = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    return counts[ends] - counts[ends - lengths]


def _format_table(stats: dict) -> str:
    cols = ("files", "samples", "tokens", "supervised_tokens", "packs")
    rows = [("type", *cols)]
    for name, s in [*stats["types"].items(), ("total", stats["total"])]:
        rows.append((name, *("-" if s[c] is None else f"{s[c]:,}" for c in cols)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols) + 1)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    row = stats["packed_length"] * stats["micro_bsz"]
    return "\n".join([f"packs of {row} tokens, min_length={stats['min_length']}", *lines])


def _order(args) -> int:
    if args.force:
        print("warning: --force is deprecated; use --overwrite", file=sys.stderr)
    output = args.output or os.path.join(args.folder, "data_order.txt")
    lines = write_data_order(args.folder, output, args.file_type, args.sort,
                             args.overwrite or args.force)
    print(f"wrote {len(lines)} file(s) to {output}")
    return 0


def _stats(args) -> int:
    check_positive("--packed-length", args.packed_length)
    check_positive("--micro-bsz", args.micro_bsz)
    check_non_negative("--min-length", args.min_length)
    stats = dataset_statistics(args.folder, args.packed_length, args.min_length,
                               args.data_order, args.file_type, args.micro_bsz,
                               parse=not args.no_parse,
                               cache_dir=False if args.no_cache else args.cache_dir)
    print(json.dumps(stats, indent=2) if args.json else _format_table(stats))
    return 0


def add_subcommands(subparsers) -> None:
    """Add ``data order`` and ``data stats`` to a top-level ``add_subparsers()`` object."""
    data = subparsers.add_parser("data",
                                 help="InternEvo (ftdp) datasets: data_order.txt, statistics")
    sub = data.add_subparsers(dest="data_command", required=True)

    order = sub.add_parser("order", help="write a data_order.txt pinning the file order")
    order.add_argument("folder")
    order.add_argument("-o", "--output", default=None,
                       help="output file (default: FOLDER/data_order.txt)")
    order.add_argument("--file-type", default=".bin")
    order.add_argument("--sort", action="store_true",
                       help="sorted paths instead of the order XTuner reads on this machine")
    order.add_argument("--overwrite", action="store_true", help="replace an existing file")
    order.add_argument("--force", action="store_true",
                       help="deprecated spelling of --overwrite")
    order.set_defaults(data_handler=_order)

    stats = sub.add_parser("stats",
                           help="samples, tokens, supervised tokens, packs per type folder; "
                                "checks every line and writes the token index training reuses")
    stats.add_argument("folder")
    stats.add_argument("--packed-length", type=int, default=8192)
    stats.add_argument("--micro-bsz", type=int, default=1)
    stats.add_argument("--min-length", type=int, default=0)
    stats.add_argument("--data-order", default=None, help="a data_order.txt to read files from")
    stats.add_argument("--file-type", default=".bin")
    stats.add_argument("--no-parse", action="store_true",
                       help="meta only: skip reading lines (no supervised-token count)")
    stats.add_argument("--cache-dir", default=None,
                       help="where token indexes go (default: $XTUNER_PATCH_CACHE_DIR, else "
                            "~/.cache/xtuner_patch/ftdp)")
    stats.add_argument("--no-cache", action="store_true",
                       help="check the lines without writing token indexes")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(data_handler=_stats)


def run(args) -> int:
    """Handle a parsed ``data ...`` command line."""
    return args.data_handler(args)

