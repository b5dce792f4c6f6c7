"""Sparse vs dense crosscoder decoding (SPEC §3.1) at K/H ≤ 1%.

    python benchmarks/sparse_decode.py     # prints a table; writes results/sparse_decode.json

Times one decode of a batch (forward, and forward + backward) with the gather-sum of the active
decoder rows against the dense B×H · H×XD product, on the same TopK codes.
"""

from __future__ import annotations

import argparse

import torch

from common import print_table, time_call, write_results
from crossint.crosscoder.activations import topk
from crossint.crosscoder.sparse import dense_decode, sparse_codes, sparse_decode

SHAPES = [  # (positions X, d_model D, features H, active K)
    (17, 128, 2048, 20),
    (17, 128, 4096, 20),
    (17, 256, 4096, 20),
    (17, 128, 16384, 32),
]


def bench(X: int, D: int, H: int, K: int, batch: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    W_dec_HXD = torch.randn(H, X, D, generator=generator).requires_grad_()
    f_BH = topk(torch.randn(batch, H, generator=generator), K).requires_grad_()
    grad_BXD = torch.randn(batch, X, D, generator=generator)

    def sparse_fwd():
        with torch.no_grad():
            return sparse_decode(sparse_codes(f_BH), W_dec_HXD)

    def dense_fwd():
        with torch.no_grad():
            return dense_decode(f_BH, W_dec_HXD)

    def sparse_fwd_bwd():
        sparse_decode(sparse_codes(f_BH), W_dec_HXD).backward(grad_BXD)

    def dense_fwd_bwd():
        dense_decode(f_BH, W_dec_HXD).backward(grad_BXD)

    torch.testing.assert_close(sparse_fwd(), dense_fwd(), rtol=1e-4, atol=1e-4)
    times = {
        name: time_call(fn, repeats=repeats)
        for name, fn in [
            ("sparse_fwd", sparse_fwd),
            ("dense_fwd", dense_fwd),
            ("sparse_fwd_bwd", sparse_fwd_bwd),
            ("dense_fwd_bwd", dense_fwd_bwd),
        ]
    }
    return {
        "X": X,
        "D": D,
        "H": H,
        "K": K,
        "K/H": K / H,
        "batch": batch,
        "sparse_fwd_ms": 1e3 * times["sparse_fwd"],
        "dense_fwd_ms": 1e3 * times["dense_fwd"],
        "fwd_speedup": times["dense_fwd"] / times["sparse_fwd"],
        "sparse_fwd_bwd_ms": 1e3 * times["sparse_fwd_bwd"],
        "dense_fwd_bwd_ms": 1e3 * times["dense_fwd_bwd"],
        "fwd_bwd_speedup": times["dense_fwd_bwd"] / times["sparse_fwd_bwd"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = [bench(*shape, batch=args.batch, repeats=args.repeats) for shape in SHAPES]
    print_table(rows)
    print("wrote", write_results("sparse_decode", rows))


if __name__ == "__main__":
    main()
