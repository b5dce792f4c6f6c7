"""`crossint harvest`: collect activations at a set of hookpoints into an on-disk cache."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from crossint.errors import CrossintError

if TYPE_CHECKING:
    from crossint.data.cache import ActivationCache
    from crossint.models.adapter import ModelAdapter

DESCRIPTION = """\
Run a model over a text corpus and store the activations at a set of hookpoints in a sharded,
checksummed cache directory that `crossint train` reads.

Positions holding special tokens (BOS/EOS/PAD) are left out unless --include-special. Shards are
shuffled at token level and written atomically; the manifest is updated after each one, so an
interrupted harvest continues where it stopped when re-run with the same settings (a complete
cache with the same settings is left as it is). A directory holding anything else is refused.

examples:
  crossint harvest --model storylm --tokens 200000 --out cache/
  crossint harvest --model gpt2 --corpus texts.jsonl --layout resid --dtype bfloat16 --out c2/
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "harvest",
        help="collect model activations into an on-disk activation cache",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                        help="'storylm' (the embedded model), a hub id already in the local "
                             "cache (e.g. gpt2), or a local save_pretrained directory")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="cache directory (created; resumed if it holds a partial cache)")
    parser.add_argument("--tokens", type=int, default=200_000, metavar="N",
                        help="tokens to harvest (default: %(default)s)")
    parser.add_argument("--layout", default="paper",
                        help="'paper' (resid_pre, attn_in, resid_mid, mlp_in of every block + "
                             "the last resid_post), 'resid', or a comma-separated hookpoint list "
                             "such as blocks.0.mlp_in,blocks.1.mlp_in (default: %(default)s)")
    parser.add_argument("--corpus", default="stories",
                        help="'stories' (built-in), a .txt file (one document per non-empty "
                             "line), a .jsonl file, or hf:NAME[:SPLIT[:FIELD]] (needs the "
                             "'datasets' extra) (default: %(default)s)")
    parser.add_argument("--text-field", default="text", metavar="FIELD",
                        help="field holding the text in a .jsonl corpus (default: %(default)s)")
    parser.add_argument("--context-length", type=int, default=128, metavar="S",
                        help="tokens per context, BOS included; at most the model's maximum "
                             "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B",
                        help="contexts per forward pass (default: %(default)s)")
    parser.add_argument("--dtype", default="float32",
                        help="storage dtype: float32, float16 or bfloat16 (default: %(default)s)")
    parser.add_argument("--shard-tokens", type=int, default=65536, metavar="N",
                        help="tokens per shard, also the harvest's shuffle buffer "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the story corpus and the token shuffle (default: 0)")
    parser.add_argument("--include-special", action="store_true",
                        help="also keep positions holding BOS/EOS/PAD tokens")
    parser.add_argument("--resume", action="store_true",
                        help="require DIR to hold a cache to continue (a partial cache with the "
                             "same settings is resumed even without this flag)")
    parser.add_argument("--device", default="auto",
                        help="torch device for the model: auto (cuda when available), cpu, "
                             "cuda, cuda:1, ... (default: %(default)s)")
    parser.add_argument("--model-dtype", default="float32",
                        help="dtype the model runs in: float32, bfloat16 or float16 (halves "
                             "the model's memory and speeds up GPUs; recorded in the manifest; "
                             "default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from crossint.commands.common import locked_output
    from crossint.data.cache import canonical_dtype

    dtype = canonical_dtype(args.dtype)
    for flag, value in (("--tokens", args.tokens), ("--batch-size", args.batch_size),
                        ("--shard-tokens", args.shard_tokens),
                        ("--context-length", args.context_length)):
        if value < 1:
            raise CrossintError(f"{flag} must be a positive integer, got {value}")
    out = Path(args.out)
    was_complete = _holds_complete_cache(out, args.resume)
    with locked_output(out, "harvest"):  # before the model loads: a busy or bad --out fails now
        return _run(args, out, dtype, was_complete)


def _run(args: argparse.Namespace, out: Path, dtype: str, was_complete: bool) -> int:
    import time

    from crossint.data.cache import cache_size_bytes
    from crossint.models.adapter import load_model

    adapter = load_model(args.model, device=_device(args.device), dtype=args.model_dtype)
    start = time.perf_counter()
    cache, new_tokens = _harvest(adapter, out, dtype, args)
    elapsed = time.perf_counter() - start
    size = _human_bytes(cache_size_bytes(out))
    summary = (f"{cache.n_tokens} tokens x {len(cache.hookpoints)} hookpoints ({cache.dtype}) in "
               f"{cache.n_shards} shards, {size} on disk")
    if was_complete and new_tokens == 0:
        print(f"{out} already holds a complete cache with these settings: {summary}")
        return 0
    rate = new_tokens / elapsed if elapsed > 0 else float("nan")
    print(f"harvested {new_tokens} tokens in {elapsed:.1f} s ({rate:,.0f} tokens/s); "
          f"{out}: {summary}")
    return 0


def _holds_complete_cache(out: Path, resume: bool) -> bool:
    """Whether ``out`` already holds a complete cache; with ``resume``, it must hold one."""
    import json

    from crossint.data.cache import MANIFEST_NAME

    manifest_path = out / MANIFEST_NAME
    if resume and not manifest_path.is_file():
        raise CrossintError(f"--resume: {out} holds no activation cache to continue")
    if not manifest_path.is_file():
        return False
    try:
        return bool(json.loads(manifest_path.read_text("utf-8")).get("complete"))
    except (ValueError, AttributeError, OSError):
        return False  # harvest() reports the broken manifest precisely


def _device(device: str) -> str:
    """--device, with "auto" meaning cuda when available, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _harvest(adapter: ModelAdapter, out: Path, dtype: str, args: argparse.Namespace
             ) -> tuple[ActivationCache, int]:
    """(the cache, the tokens this call added) of a harvest into ``out`` with the command's
    settings; runtime warnings go to stderr as single lines, every time."""
    import sys
    import warnings

    from crossint.data.harvest import harvest

    new_tokens = [0]

    def on_shard(index: int, entry: dict) -> None:
        new_tokens[0] += entry["n_tokens"]

    with warnings.catch_warnings():  # shown as one line each by the command line (crossint.cli)
        warnings.simplefilter("always", RuntimeWarning)
        cache = harvest(
            adapter,
            out,
            hookpoints=args.layout,
            n_tokens=args.tokens,
            corpus=args.corpus,
            context_length=args.context_length,
            batch_size=args.batch_size,
            dtype=dtype,
            shard_tokens=args.shard_tokens,
            seed=args.seed,
            include_special=args.include_special,
            progress=not args.quiet and sys.stderr.isatty(),  # no bar in logs and pipes
            text_field=args.text_field,
            on_shard=on_shard,
        )
    return cache, new_tokens[0]


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
