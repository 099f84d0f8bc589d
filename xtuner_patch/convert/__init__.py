"""Checkpoint conversion: ``xtuner-patch convert internevo2hf|hf2internevo``.

InternEvo saves one ``model_tp{t}_pp{p}.pt`` per rank and loads only with the same tp/pp;
XTuner starts from Hugging Face folders.  :func:`internevo_to_hf` merges any tp/pp layout
into an HF InternLM2 folder that ``AutoModelForCausalLM.from_pretrained(...,
trust_remote_code=True)`` and ``xtuner train`` load; :func:`hf_to_internevo` splits one back.
"""

import argparse
import json
import sys

from ..errors import check_positive
from ._io import parse_size
from .internevo import ConversionError, hf_to_internevo, internevo_to_hf

__all__ = ["ConversionError", "add_subcommands", "hf_to_internevo", "internevo_to_hf", "run"]

_DTYPES = ["float32", "bfloat16", "float16"]


def add_subcommands(subparsers) -> None:
    """Add ``convert`` (with ``internevo2hf`` and ``hf2internevo``) to a CLI's subparsers."""
    convert = subparsers.add_parser(
        "convert", help="convert checkpoints between InternEvo (any tp/pp) and Hugging Face")
    sub = convert.add_subparsers(dest="convert_command", required=True)

    to_hf = sub.add_parser(
        "internevo2hf", help="merge InternEvo model_tp*_pp*.pt shards into an HF InternLM2 folder",
        description="Merge an InternEvo checkpoint (model_config.pt + model_tp{t}_pp{p}.pt, any "
                    "tp/pp, read from the file names) into a Hugging Face InternLM2 folder.")
    to_hf.add_argument("src", help="InternEvo checkpoint folder")
    to_hf.add_argument("dst", help="output folder (written atomically)")
    to_hf.add_argument("--dtype", choices=_DTYPES, default=None,
                       help="cast the weights (default: keep the stored dtypes)")
    to_hf.add_argument("--max-shard-size", default="5GB",
                       help="largest safetensors file, e.g. 5GB or 500MB (default 5GB)")
    to_hf.add_argument("--max-position-embeddings", type=int, default=None,
                       help="for config.json when model_config.pt has none (InternEvo: 2048)")
    to_hf.add_argument("--tokenizer", metavar="HF_DIR", default=None,
                       help="copy the tokenizer files of this HF folder into DST")
    to_hf.set_defaults(convert_func=_internevo2hf)

    to_evo = sub.add_parser(
        "hf2internevo", help="split an HF InternLM2 folder into InternEvo tp/pp shards",
        description="Split a Hugging Face InternLM2 folder into an InternEvo checkpoint "
                    "(model_config.pt + model_tp{t}_pp{p}.pt) for the given tp and pp.")
    to_evo.add_argument("src", help="Hugging Face InternLM2 folder")
    to_evo.add_argument("dst", help="output folder (written atomically)")
    to_evo.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel size; must divide the kv heads (default 1)")
    to_evo.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    to_evo.add_argument("--dtype", choices=_DTYPES, default=None,
                        help="cast the weights (default: keep the stored dtypes)")
    to_evo.add_argument("--no-embed-split-hidden", dest="embed_split_hidden",
                        action="store_false",
                        help="split the embedding over the vocabulary, not the hidden dim")
    to_evo.add_argument("--qk-interleaved", action="store_true",
                        help="store q/k rows interleaved (qk_interleaved=True / adapt_hf=False)")
    to_evo.add_argument("--split-qkv", action="store_true",
                        help="store wq/wk/wv instead of wqkv (enable_qkv_fusion=False)")
    to_evo.add_argument("--isp", action="store_true",
                        help="tensor.mode='isp': --tp is the weight-parallel size, files "
                             "model_wp{w}_pp{p}.pt")
    to_evo.set_defaults(convert_func=_hf2internevo)

    for parser in (to_hf, to_evo):
        parser.add_argument("--overwrite", action="store_true",
                            help="replace a non-empty DST (the files a conversion does not "
                                 "write are kept)")
        parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                            help="progress bar on stderr (default: for models of 1 GiB or more)")


def run(args) -> int:
    """Run the parsed ``convert`` command and print its summary as JSON.

    Bad input raises :class:`~xtuner_patch.errors.UserError` (:class:`ConversionError`
    included), which ``xtuner-patch`` prints as one ``error:`` line.
    """
    print(json.dumps(args.convert_func(args)))
    return 0


def _internevo2hf(args) -> dict:
    if args.max_position_embeddings is not None:
        check_positive("--max-position-embeddings", args.max_position_embeddings)
    return internevo_to_hf(args.src, args.dst, dtype=args.dtype,
                           max_shard_size=parse_size(args.max_shard_size, "--max-shard-size"),
                           max_position_embeddings=args.max_position_embeddings,
                           tokenizer=args.tokenizer, overwrite=args.overwrite,
                           progress=args.progress)


def _hf2internevo(args) -> dict:
    check_positive("--tp", args.tp)
    check_positive("--pp", args.pp)
    summary = hf_to_internevo(args.src, args.dst, tp=args.tp, pp=args.pp, dtype=args.dtype,
                              embed_split_hidden=args.embed_split_hidden,
                              qk_interleaved=args.qk_interleaved, split_qkv=args.split_qkv,
                              isp=args.isp, overwrite=args.overwrite, progress=args.progress)
    parallel = (f"tensor.mode='isp', weight.size={args.tp}" if args.isp
                else f"tensor.size={args.tp}")
    # InternEvo loads shards only with the parallel layout they were written for.
    print(f"# load in InternEvo with parallel {parallel}, pipeline.size={args.pp} and "
          f"ckpt.load_ckpt_info=dict(path='local:{args.dst}', content=('model',), "
          "ckpt_type='internevo'); model_config.pt holds the model dict", file=sys.stderr)
    return {k: v for k, v in summary.items() if k != "model_config"}
