"""What `crossint lib` and `crossint lib --compare` spend their time on (SPEC §11).

    python benchmarks/lib.py   # prints a table; writes results/lib.json

One batch of held-out story contexts of the model (storylm by default, 16 × 128 tokens), one
block (block 1), timed in turns (median of --repeats). Rows: the block's forward pass (replayed
with the model's own arguments); one gradient-Gram step of the basis (a forward with gradients and
--sources backward passes); the exact edges of one block in one basis (one Jacobian-vector product
per input function); one edge-ablated block output (one block run per distinct output row; all
rows distinct, the worst case). The last column multiplies each by the number of times the
default commands run it (20 000 tokens for the basis, 4096 for the edges, PCA and LIB, every
block; the compare's count of ablations is a typical one, 15 per block and basis).
"""

from __future__ import annotations

import argparse

import torch

from common import print_table, time_interleaved, write_results
from crossint.analysis.heldout import HeldoutRequest, heldout_batches
from crossint.analysis.lib import (
    block_function,
    frozen,
    next_layer_function,
    node_layers,
    run_batch,
)
from crossint.interactions.lib import (
    MomentAccumulator,
    edge_sums,
    gradient_gram,
    masked_block_output,
    pca_basis,
)
from crossint.models.adapter import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="storylm")
    parser.add_argument("--batch", type=int, default=16, help="contexts per batch")
    parser.add_argument("--sources", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    adapter = load_model(args.model)
    request = HeldoutRequest(n_texts=args.batch, corpus="stories", context_length=128,
                             batch_size=args.batch)
    (ids_BS,) = heldout_batches(adapter, request)
    names, l = node_layers(adapter.n_blocks), 1
    with frozen(adapter.model):
        with torch.no_grad():
            batch = run_batch(adapter, ids_BS, names, range(adapter.n_blocks),
                              adapter.special_token_ids())
        bases = []
        for name in names[l:l + 2]:
            moments = MomentAccumulator(adapter.d_model)
            moments.update(batch.acts[name][batch.keep_BS])
            bases.append(pca_basis(name, moments.mean(), moments.covariance()))
        x, keep = batch.acts[names[l]], batch.keep_BS
        fn = next_layer_function(adapter, batch, l, bases[1])
        block = block_function(adapter, batch, l)
        rows_distinct = torch.ones(bases[1].dim, bases[0].dim, dtype=torch.bool).triu()

        def forward() -> None:
            with torch.no_grad():
                block(x)

        calls = {
            "block forward": forward,
            "gradient Gram step": lambda: gradient_gram(fn, x, keep, bases[0].mean_D,
                                                        sources=args.sources),
            "edges (one block, one basis)": lambda: edge_sums(fn, x, keep, bases[0]),
            "edge-ablated block output": lambda: masked_block_output(
                block, x, keep, bases[0], bases[1], rows_distinct),
        }
        seconds = time_interleaved(calls, repeats=args.repeats, warmup=1)
    tokens = int(keep.sum())
    per_run = {
        "block forward": 1,
        "gradient Gram step": (adapter.n_blocks + 1) * 20_000 / tokens,
        "edges (one block, one basis)": 2 * adapter.n_blocks * 4096 / tokens,
        "edge-ablated block output": 2 * adapter.n_blocks * 15 * 2048 / tokens,
    }
    rows = [{"step": name, "seconds": s, "tokens": tokens,
             "default run (s)": s * per_run[name]} for name, s in seconds.items()]
    print_table(rows)
    print(f"wrote {write_results('lib', rows, model=args.model, sources=args.sources)}")


if __name__ == "__main__":
    main()
