"""Compact-proof bound benchmarks (SPEC §7).

    python benchmarks/bounds.py                   # both; writes results/bounds.json
    python benchmarks/bounds.py --only command --run runs/center0 --tokens 10000

(a) ``command``: `crossint bound RUN --tokens N` end to end (every strategy on every block, then
    the end-to-end chain with its spliced forward passes), and the per-block bounds alone
    (``--no-chain``), in a fresh process each: wall and CPU seconds, peak resident memory.
    Target: 10k storylm tokens in ≤ 2 minutes on 2 cores. The machine's load average is
    recorded beside each row: on a shared machine wall time measures the neighbours, CPU seconds
    the command.
(b) ``memory``: the per-block bounds (every strategy, one block of D 128, N 512, K ≈ 20) over
    10k tokens for growing dictionaries H: peak resident memory above the process's baseline.
    Only the V rows of the distinct active features depend on H (U·N floats, U ≤ min(H, T·K)).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import print_table, write_results

MB = 2**20
ROOT = Path(__file__).resolve().parents[1]


def child_usage(command: list[str], threads: int) -> dict[str, float]:
    """Run ``command`` in a fresh process; its wall and CPU seconds and peak RSS (MB)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return {"wall_s": time.perf_counter() - start,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "peak_rss_mb": after.ru_maxrss / 1024}


def bench_command(run: str, tokens: int, threads: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in (("bound (per-block + end to end)", []),
                             ("bound --no-chain (per-block only)", ["--no-chain"])):
            usage = child_usage([sys.executable, "-m", "crossint", "bound", run, "--tokens",
                                 str(tokens), "--out", str(Path(tmp) / label[:5]), "--quiet",
                                 *extra], threads)
            rows.append({"what": label, "tokens": tokens, "threads": threads, **usage,
                         "load_1min": os.getloadavg()[0]})
    return rows


def memory_child(H: int, tokens: int, seed: int = 0) -> None:
    """(in a fresh process) every strategy's bound at one random block; prints the peak RSS
    growth in MB as JSON."""
    from crossint.interactions import bounds as B
    from crossint.interactions.contributions import MLPFeatureBlock, active_features
    from crossint.models.adapter import MLPWeights

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    D, N, K = 128, 512, 20
    mlp = MLPWeights(torch.randn(D, N, generator=g) / D ** 0.5, torch.zeros(N),
                     torch.randn(N, D, generator=g) / N ** 0.5, torch.zeros(D),
                     torch.nn.GELU(approximate="tanh"), "gelu_new", 1.13)
    block = MLPFeatureBlock(0, torch.randn(H, D, generator=g) / D ** 0.5, torch.zeros(D), mlp)
    features = [block]
    f_parts = []
    for start in range(0, tokens, 2048):
        m = min(2048, tokens - start)
        rows = torch.arange(m).repeat_interleave(K)
        cols = torch.randint(H, (m * K,), generator=g)
        f = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.rand(m * K, generator=g),
                                    (m, H)).coalesce()
        f_parts.append(f)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    verifier = B.block_verifier(block)
    start = time.perf_counter()
    for f in f_parts:
        x = torch.randn(f.shape[0], D, generator=g, dtype=torch.float64)
        for _, chunk in B.iter_chunks(active_features(f.to_dense()), features[0], x):
            B.chunk_bounds(chunk, verifier)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mb": (peak - baseline) / 1024, "seconds": seconds}))


def bench_memory(tokens: int, sizes: list[int]) -> list[dict]:
    rows = []
    for H in sizes:
        done = subprocess.run([sys.executable, __file__, "--memory-child", str(H), "--tokens",
                               str(tokens)], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        dense_f = 2048 * H * 4 / MB  # one batch of dense codes, as the encoder returns them
        rows.append({"H": H, "tokens": tokens, "peak_growth_mb": measured["growth_mb"],
                     "dense_codes_batch_mb": dense_f, "V_rows_mb_max": H * 512 * 8 / MB,
                     "seconds": measured["seconds"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["command", "memory"])
    parser.add_argument("--run", default="runs/center0")
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="1536,6144,24576")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.tokens)
        return
    results = {}
    if args.only in (None, "command"):
        results["command"] = bench_command(args.run, args.tokens, args.threads)
        print_table(results["command"])
    if args.only in (None, "memory"):
        results["memory"] = bench_memory(args.tokens, [int(s) for s in args.sizes.split(",")])
        print_table(results["memory"])
    rows = [dict(row, bench=name) for name, part in results.items() for row in part]
    print(f"wrote {write_results('bounds', rows)}")


if __name__ == "__main__":
    main()
