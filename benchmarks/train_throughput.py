"""Crosscoder training throughput (tokens/s) at CPU-scaled paper shapes.

    python benchmarks/train_throughput.py  # prints a table; writes results/train_throughput.json
    python benchmarks/train_throughput.py --device cuda --autocast bfloat16 \
        --shape 4,2048,65536,64,4096    # a GPU at the scale of issue "Scale"

Runs the real training loop (`crossint.crosscoder.train.train`, BatchTopK, AuxK, Adam, clipping,
logging) on in-memory activations and measures the steady-state step time as the difference
between a long and a short run, so set-up (normalisation estimate, saving) cancels out.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import print_table, write_results
from crossint.crosscoder.config import CrosscoderConfig
from crossint.crosscoder.train import TrainConfig, train
from crossint.data.cache import TensorActivations
from crossint.models.hookpoints import resolve_layout

SHAPES = [  # (blocks → paper-layout positions, d_model, features, K, batch)
    (4, 128, 2048, 20, 1024),
    (4, 256, 4096, 20, 1024),
]


def timed_run(crosscoder_config, source, steps: int, batch: int, device: str,
              autocast: str | None) -> float:
    train_config = TrainConfig(
        steps=steps,
        batch_size=batch,
        checkpoint_every=10 * steps,
        log_every=10,
        normalisation_tokens=batch,
        device=device,
        autocast=autocast,
    )
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        train(crosscoder_config, train_config, source, out_dir, progress=False)
        return time.perf_counter() - start


def bench(n_blocks: int, D: int, H: int, K: int, batch: int, steps: int, extra_steps: int,
          device: str = "cpu", autocast: str | None = None) -> dict:
    hookpoints = resolve_layout("paper", n_blocks)
    generator = torch.Generator().manual_seed(0)
    acts_TXD = torch.randn(8 * batch, len(hookpoints), D, generator=generator)
    source = TensorActivations(acts_TXD, hookpoints)
    config = CrosscoderConfig(
        hookpoints=hookpoints,
        models=["bench"],
        d_model=D,
        n_features=H,
        activation="batchtopk",
        k=K,
    )
    short = timed_run(config, source, steps, batch, device, autocast)
    long = timed_run(config, source, steps + extra_steps, batch, device, autocast)
    step_s = (long - short) / extra_steps
    return {
        "X": len(hookpoints),
        "D": D,
        "H": H,
        "K": K,
        "batch": batch,
        "device": device,
        "autocast": autocast or "float32",
        "step_ms": 1e3 * step_s,
        "tokens_per_s": batch / step_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="steps of the short run")
    parser.add_argument("--extra-steps", type=int, default=20, help="extra steps of the long run")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--autocast", choices=["bfloat16"], help="mixed precision (TrainConfig)")
    parser.add_argument("--shape", action="append", metavar="BLOCKS,D,H,K,BATCH",
                        help="a shape to time instead of the CPU-scaled defaults (repeatable)")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in text.split(",")) for text in args.shape or []] or SHAPES
    rows = [bench(*shape, steps=args.steps, extra_steps=args.extra_steps, device=args.device,
                  autocast=args.autocast) for shape in shapes]
    print_table(rows)
    name = "train_throughput" + "".join(
        f"_{part}" for part in (None if args.device == "cpu" else args.device, args.autocast,
                                "shapes" if args.shape else None) if part)
    print("wrote", write_results(name, rows, threads=torch.get_num_threads()))


if __name__ == "__main__":
    main()
