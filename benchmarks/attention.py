"""Attention feature-interaction benchmark (SPEC §5): `crossint attention` on storylm.

    python benchmarks/attention.py --threads 1      # runs/kind_additivity_s/lambda_0, blocks 1,2
    python benchmarks/attention.py --run runs/other --blocks 0,3 --tokens 20000

Measures 20,000 held-out storylm tokens at two blocks with a trained crosscoder (default
``runs/kind_additivity_s/lambda_0``: H 1536, BatchTopK K 20, 17 paper-layout hookpoints): the
wall time of each step of ``analyse_attention`` (load and held-out text, the measuring pass,
the per-head tables, the examples pass) and the process's CPU seconds (the machine's load
average is recorded: on a busy machine two torch threads spin while they wait for a core, so
``--threads 1`` can be faster there), the observed (query, key) feature pairs and the bytes
their tables hold (``pairs_shared``: the block reuses an earlier block's table, equal for
absolute positions with the same visible position pairs), and the peak resident memory
growth. Target: ≤ 3 minutes on 2 cores; memory bounded by the observed pairs. Writes
benchmarks/results/attention.json.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from common import status_kb, write_results
from crossint.analysis.attention import (
    add_examples,
    block_heads,
    measure_attention,
    prepare_attention,
)
from crossint.analysis.heldout import HeldoutRequest

MB = 2**20


def table_bytes(table) -> int:
    """Bytes a PairTable holds (keys and value columns)."""
    return sum(t.numel() * t.element_size() for t in [table.keys_E, *table.columns])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/kind_additivity_s/lambda_0")
    parser.add_argument("--blocks", default="1,2")
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not Path(args.run, "model.safetensors").is_file():
        raise SystemExit(f"{args.run}: no trained crosscoder (train one on storylm first)")
    blocks = [int(b) for b in args.blocks.split(",")]
    start_kb = status_kb("VmRSS")
    times: dict[str, float] = {}
    cpu = time.process_time()
    load_before = os.getloadavg()[0]
    clock = time.perf_counter()
    setup = prepare_attention(args.run, HeldoutRequest(n_tokens=args.tokens), blocks)
    times["load_and_text_s"] = time.perf_counter() - clock
    setup_kb = status_kb("VmRSS")  # libraries, model, crosscoder and held-out text
    clock = time.perf_counter()
    measured = measure_attention(setup, progress=False)
    times["measure_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    heads = [row for meter in measured.meters
             for row in block_heads(meter, measured.n_tokens, 20)]
    times["tables_s"] = time.perf_counter() - clock
    tables = [{"block": m.fblock.block, "pairs": m.pairs.n_pairs,
               "pairs_dense": m.pairs.dense, "pairs_shared": not m.owns_pairs,
               "pairs_MB": table_bytes(m.pairs) / MB,
               "overlaps": m.overlaps.n_pairs, "overlaps_dense": m.overlaps.dense,
               "overlaps_MB": table_bytes(m.overlaps) / MB} for m in measured.meters]
    clock = time.perf_counter()
    add_examples(setup, measured, heads, 3)
    times["examples_s"] = time.perf_counter() - clock
    times["total_s"] = sum(times.values())
    times["cpu_s"] = time.process_time() - cpu  # CPU seconds of this process, all threads
    row = {"run": args.run, "blocks": blocks, "tokens": measured.n_tokens,
           "contexts": len(setup.batches) and sum(b.shape[0] for b in setup.batches),
           "threads": args.threads, **times,
           "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
           "setup_rss_growth_MB": (setup_kb - start_kb) * 1024 / MB,
           "peak_rss_growth_MB": (status_kb("VmHWM") - start_kb) * 1024 / MB,
           "tables": tables,
           "bound_violations": sum(r["bound_violations"] + r["tight_bound_violations"]
                                   for r in heads)}
    for key, value in row.items():
        print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    print("wrote", write_results("attention", [row]))


if __name__ == "__main__":
    main()
