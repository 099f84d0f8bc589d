"""The ``xtuner-patch`` command line.

Exit status (every command but ``train``, which returns the training's): 0 when done; 2 for bad
input, reported as one ``error: <message>`` line on stderr; 130 after SIGINT and 143 after
SIGTERM, reported as one ``interrupted`` line that says what became of the output folder.
Commands that write a folder write it atomically (xtuner_patch/atomic.py): complete or not at
all, an existing one replaced only with --overwrite.
"""

import argparse
import json
import signal
import sys
import threading
from contextlib import contextmanager

from .errors import UserError, check_positive, check_range


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception, so that cleanups (``finally``, atomic output folders) run as
    they do for Ctrl-C."""


def _make_tiny_model(args) -> int:
    from .fixtures.model import MAX_SEED, build_internlm2_checkpoint

    check_range("--seed", args.seed, 0, MAX_SEED)
    overrides = {}
    if args.layers is not None:
        check_positive("--layers", args.layers)
        overrides["num_hidden_layers"] = args.layers
    path = build_internlm2_checkpoint(args.path, args.preset, seed=args.seed,
                                      dtype=args.dtype, overwrite=args.overwrite, **overrides)
    print(path)
    return 0


def _make_sample_data(args) -> int:
    from .fixtures import SampleDataSpec, write_sample_ftdp_dataset

    spec = SampleDataSpec(seed=args.seed, vocab_size=args.vocab_size,
                          long_sample_length=args.long_sample_length)
    spec.check(lambda field: "--" + field.replace("_", "-"))
    summary = write_sample_ftdp_dataset(args.path, spec, overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in summary.items() if k != "files"}))
    return 0


def _data(args) -> int:
    from .dataset.cli import run

    return run(args)


def _convert(args) -> int:
    from .convert import run

    return run(args)


class _Parser(argparse.ArgumentParser):
    # Argument errors as the one-line UserError every other bad input gets (argparse prints
    # usage and exits); subcommand parsers inherit this class.
    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    from .fixtures.model import MODEL_PRESETS

    parser = _Parser(prog="xtuner-patch", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", add_help=False,
        help="run `xtuner train` (same arguments; NPROC_PER_NODE / --launcher slurm as XTuner)")
    train.add_argument("xtuner_args", nargs=argparse.REMAINDER)

    model = sub.add_parser("make-tiny-model", help="write an InternLM2 checkpoint directory")
    model.add_argument("path")
    model.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS))
    model.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    model.add_argument("--overwrite", action="store_true",
                       help="replace what PATH holds, keeping files that are no part of a "
                            "checkpoint (one made with the same arguments is reused anyway)")

    data = sub.add_parser("make-sample-data", help="write a sample ftdp dataset (cn/ and en/)")
    data.add_argument("path")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--vocab-size", type=int, default=2048)
    data.add_argument("--long-sample-length", type=int, default=3000,
                      help="length of the samples meant to exceed a pack")
    data.add_argument("--overwrite", action="store_true",
                      help="replace the cn/ and en/ folders of a non-empty PATH, keeping "
                           "its other files")

    from .dataset.cli import add_subcommands as add_data_subcommands

    add_data_subcommands(sub)

    from .convert import add_subcommands as add_convert_subcommands

    add_convert_subcommands(sub)
    return parser


@contextmanager
def _sigterm_raises():
    # Only over the default action (death): a handler or SIG_IGN someone set is theirs.
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL):
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        # Everything after `train` belongs to XTuner's parser, --help included.
        from .launch import launch

        try:
            return launch(argv[1:])
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    handlers = {"make-tiny-model": _make_tiny_model, "make-sample-data": _make_sample_data,
                "data": _data, "convert": _convert}
    with _sigterm_raises():
        try:
            args = build_parser().parse_args(argv)
            return handlers[args.command](args)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            # The note of an atomic output folder says what became of it.
            notes = "; ".join(getattr(exc, "__notes__", ()))
            print("interrupted" + (f": {notes}" if notes else ""), file=sys.stderr)
            return 143 if isinstance(exc, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
