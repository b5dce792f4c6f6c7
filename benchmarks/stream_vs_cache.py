"""Streaming training vs training from a cache: tokens/s on the same shapes.

    python benchmarks/stream_vs_cache.py  # prints a table; writes results/stream_vs_cache.json

On the built-in storylm (4 blocks, d_model 128, the 17 paper-layout hookpoints, story corpus):
harvest a cache of steps x batch tokens and train on it, then train on the same tokens streamed
from the model through a shuffle buffer (``crossint.data.stream``). Every phase is timed end to
end (set-up, normalisation sample and saving included) with the same crosscoder and settings.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import print_table, write_results
from crossint.crosscoder.config import CrosscoderConfig
from crossint.crosscoder.train import TrainConfig, train
from crossint.data.cache import cache_size_bytes
from crossint.data.harvest import harvest
from crossint.data.stream import StreamingActivations
from crossint.models.adapter import load_model

CONTEXT, MODEL_BATCH = 128, 32


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=1024, help="tokens per training step")
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--buffer-tokens", type=int, default=16384,
                        help="the stream's shuffle buffer, also the cache's shard size")
    parser.add_argument("--normalisation-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    adapter = load_model("storylm")
    budget = args.steps * args.batch
    settings = {"context_length": CONTEXT, "batch_size": MODEL_BATCH}
    stream = StreamingActivations(adapter, budget, "paper", corpus="stories",
                                  buffer_tokens=args.buffer_tokens, **settings)
    cc = CrosscoderConfig(hookpoints=stream.hookpoints, models=[stream.model], d_model=128,
                          n_features=args.features, activation="batchtopk", k=args.k)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch, log_every=10,
                     checkpoint_every=10 * args.steps,
                     normalisation_tokens=args.normalisation_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        harvest_s, cache = timed(lambda: harvest(
            adapter, root / "cache", "paper", n_tokens=budget, corpus="stories",
            shard_tokens=args.buffer_tokens, progress=False, **settings))
        cache_bytes = cache_size_bytes(root / "cache")
        cached_s, _ = timed(lambda: train(cc, tc, cache, root / "cached", progress=False))
        streamed_s, _ = timed(lambda: train(cc, tc, stream, root / "streamed", progress=False))
    rows = [
        {"what": "harvest into a cache", "s": harvest_s, "tokens_per_s": budget / harvest_s},
        {"what": "train from the cache", "s": cached_s, "tokens_per_s": budget / cached_s},
        {"what": "harvest + train from the cache", "s": harvest_s + cached_s,
         "tokens_per_s": budget / (harvest_s + cached_s)},
        {"what": "train streamed (no cache)", "s": streamed_s,
         "tokens_per_s": budget / streamed_s},
    ]
    print_table(rows)
    memory_mib = args.buffer_tokens * len(stream.hookpoints) * 128 * 4 / 2**20
    print(f"{budget} tokens; cache {cache_bytes / 2**20:.1f} MiB on disk; stream buffer "
          f"{memory_mib:.1f} MiB in memory")
    print("wrote", write_results("stream_vs_cache", rows, tokens=budget, cache_bytes=cache_bytes,
                                 buffer_mib=memory_mib, args=vars(args)))


if __name__ == "__main__":
    main()
