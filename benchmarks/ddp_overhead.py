"""Data-parallel training on the CPU: the step time of 2 processes (gloo) against 1 process at the
same global batch.

    python benchmarks/ddp_overhead.py  # prints a table; writes results/ddp_overhead.json
    python benchmarks/ddp_overhead.py --cache cache/story196k  # what each rank reads of a cache

Runs the real training loop (`crossint.crosscoder.train.train`: BatchTopK with its global
selection, AuxK, Adam, gradient all-reduce) on in-memory activations, one torch thread per
process. The step time is the difference between a long and a short run, so set-up and saving
cancel out. The two ranks are spawned the way torchrun starts workers (environment, then
``train``); ``overhead_ms`` is a rank's step time minus half the single process's, i.e. what
data parallelism costs beyond perfect halving (communication, the global BatchTopK gather, and
every rank reading the whole global batch before keeping its slice).

With ``--cache`` it trains 2 processes on a harvested cache twice, reading the cache whole on
every rank (``data_parts=1``) and in one part per rank (the default), and reports per rank the
shards and bytes read from disk, the peak resident memory and the wall time of the run.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from common import print_table, write_results
from crossint.crosscoder.config import CrosscoderConfig
from crossint.crosscoder.train import TrainConfig, train
from crossint.data.cache import ActivationCache, TensorActivations
from crossint.models.hookpoints import resolve_layout

SHAPES = [  # (blocks → paper-layout positions, d_model, features, K, global batch)
    (4, 64, 2048, 20, 1024),
    (4, 128, 2048, 20, 1024),
]


def setup(n_blocks: int, D: int, H: int, K: int, batch: int):
    hookpoints = resolve_layout("paper", n_blocks)
    generator = torch.Generator().manual_seed(0)
    acts_TXD = torch.randn(8 * batch, len(hookpoints), D, generator=generator)
    config = CrosscoderConfig(hookpoints=hookpoints, models=["bench"], d_model=D, n_features=H,
                              activation="batchtopk", k=K)
    return config, TensorActivations(acts_TXD, hookpoints)


def step_seconds(shape: tuple, steps: int, extra_steps: int) -> float:
    """Seconds per step of this process's training (a rank's, under torchrun's environment)."""
    torch.set_num_threads(1)
    config, source = setup(*shape)
    times = []
    for n in (steps, steps + extra_steps):
        settings = TrainConfig(steps=n, batch_size=shape[-1], checkpoint_every=10 * n,
                               log_every=10, normalisation_tokens=shape[-1])
        with tempfile.TemporaryDirectory() as out_dir:
            start = time.perf_counter()
            train(config, settings, source, out_dir, progress=False)
            times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / extra_steps


def rank_main(rank: int, port: int, shape: tuple, steps: int, extra_steps: int,
              results: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    results.put((rank, step_seconds(shape, steps, extra_steps)))
    torch.distributed.destroy_process_group()


def spawn_ranks(target, *args) -> list:
    """Run ``target(rank, port, *args, results)`` as 2 ranks; what each put in ``results``."""
    context = mp.get_context("spawn")
    results = context.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [context.Process(target=target, args=(rank, port, *args, results))
                 for rank in (0, 1)]
    for process in processes:
        process.start()
    answers = sorted(results.get() for _ in processes)
    for process in processes:
        process.join()
    return [answer for _, answer in answers]


def two_ranks(shape: tuple, steps: int, extra_steps: int) -> float:
    """The slower rank's seconds per step."""
    return max(spawn_ranks(rank_main, shape, steps, extra_steps))


def cache_rank(rank: int, port: int, path: str, steps: int, parts: int,
               results: mp.Queue) -> None:
    """One rank's training on the cache: shards and bytes it read, peak memory, seconds."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    read: list[int] = []
    original = ActivationCache._raw_shard

    def recording(self, index):
        if index not in self._memory:
            read.append(index)
        return original(self, index)

    ActivationCache._raw_shard = recording
    cache = ActivationCache(path)
    config = CrosscoderConfig(hookpoints=cache.hookpoints, models=[cache.model],
                              d_model=cache.dims[cache.hookpoints[0]], n_features=2048, k=20)
    settings = TrainConfig(steps=steps, batch_size=1024, checkpoint_every=10 * steps,
                           log_every=10, normalisation_tokens=20_000, data_parts=parts)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        train(config, settings, cache, out_dir, progress=False)
    seconds = time.perf_counter() - start
    torch.distributed.destroy_process_group()
    shard_bytes = [entry["bytes"] for entry in cache.manifest["shards"]]
    results.put((rank, {"shards": len(set(read)),
                        "GB read": sum(shard_bytes[i] for i in read) / 1e9,
                        "peak GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                        "seconds": seconds}))


def cache_reads(path: str, steps: int) -> list[dict]:
    cache = ActivationCache(path)
    rows = []
    for parts, how in ((1, "whole cache on every rank"), (2, "own part per rank")):
        for rank, measured in enumerate(spawn_ranks(cache_rank, path, steps, parts)):
            rows.append({"reading": how, "rank": rank, "cache shards": cache.n_shards,
                         "cache GB": sum(e["bytes"] for e in cache.manifest["shards"]) / 1e9,
                         **measured})
    return rows


def bench(shape: tuple, steps: int, extra_steps: int) -> dict:
    n_blocks, D, H, K, batch = shape
    one = step_seconds(shape, steps, extra_steps)
    two = two_ranks(shape, steps, extra_steps)
    return {
        "X": len(resolve_layout("paper", n_blocks)),
        "D": D,
        "H": H,
        "batch": batch,
        "1 proc ms/step": 1e3 * one,
        "2 procs ms/step": 1e3 * two,
        "speed-up": one / two,
        "overhead_ms": 1e3 * (two - one / 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="steps of the short run")
    parser.add_argument("--extra-steps", type=int, default=20, help="extra steps of the long run")
    parser.add_argument("--cache", help="measure what each rank reads of this activation cache")
    args = parser.parse_args()
    if args.cache:
        rows = cache_reads(args.cache, args.steps + args.extra_steps)
        print_table(rows)
        name = f"ddp_cache_reads_{Path(args.cache).resolve().name}"
        print("wrote", write_results(name, rows, cache=args.cache, threads_per_process=1))
        return
    rows = [bench(shape, args.steps, args.extra_steps) for shape in SHAPES]
    print_table(rows)
    print("wrote", write_results("ddp_overhead", rows, threads_per_process=1))


if __name__ == "__main__":
    main()
