"""Data-parallel training on the CPU: the step time of 2 processes (gloo) against 1 process at the
same global batch.

    python benchmarks/ddp_overhead.py  # prints a table; writes results/ddp_overhead.json

Runs the real training loop (`crossint.crosscoder.train.train`: BatchTopK with its global
selection, AuxK, Adam, gradient all-reduce) on in-memory activations, one torch thread per
process. The step time is the difference between a long and a short run, so set-up and saving
cancel out. The two ranks are spawned the way torchrun starts workers (environment, then
``train``); ``overhead_ms`` is a rank's step time minus half the single process's, i.e. what
data parallelism costs beyond perfect halving (communication, the global BatchTopK gather, and
every rank reading the whole global batch before keeping its slice).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp

from common import print_table, write_results
from crossint.crosscoder.config import CrosscoderConfig
from crossint.crosscoder.train import TrainConfig, train
from crossint.data.cache import TensorActivations
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


def two_ranks(shape: tuple, steps: int, extra_steps: int) -> float:
    """The slower rank's seconds per step."""
    context = mp.get_context("spawn")
    results = context.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [context.Process(target=rank_main,
                                 args=(rank, port, shape, steps, extra_steps, results))
                 for rank in (0, 1)]
    for process in processes:
        process.start()
    seconds = [results.get()[1] for _ in processes]
    for process in processes:
        process.join()
    return max(seconds)


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
    args = parser.parse_args()
    rows = [bench(shape, args.steps, args.extra_steps) for shape in SHAPES]
    print_table(rows)
    print("wrote", write_results("ddp_overhead", rows, threads_per_process=1))


if __name__ == "__main__":
    main()
