"""MLP feature-interaction benchmarks (SPEC §4).

    python benchmarks/interactions.py            # all three; writes results/interactions.json
    python benchmarks/interactions.py --only penalty --device cuda

(a) ``penalty``: one crosscoder training step (forward, reconstruction loss, backward, Adam) with
    the interaction penalty off, on (analytic chunked backward, the library's; unnormalised and
    per-neuron normalised), and on through plain autograd (for comparison), 4-block paper layout
    (17 positions), D 128, N 512, H 2048, BatchTopK K 20, batch 1024. Target: on/off ≤ 1.5×.
(b) ``contributions``: SPEC §4.1–§4.2 statistics (S, Mx, dominant) over the active features vs a
    naive dense B×N×H computation (chunked over tokens so it fits), H 4096. Target ≥ 10×.
(c) ``pairwise``: the SPEC §4.5 matrix accumulated (sparse storage) at H 16384 over 4 blocks:
    tokens/s and peak memory. Target ≤ 2 GB.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the growth of the
resident-set high-water mark during one call (Linux), next to the analytic size of the largest
tensors. Freed memory that the allocator keeps is not counted twice, so run one bench per
process (``--only``) for the cleanest CPU numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from common import print_table, status_kb, time_call, time_interleaved, write_results
from crossint.crosscoder.config import CrosscoderConfig
from crossint.crosscoder.losses import reconstruction_loss
from crossint.crosscoder.model import Crosscoder
from crossint.interactions import (
    MLPFeatureBlock,
    PairwiseAccumulator,
    abs_stats,
    active_features,
    distinct_virtual_weights,
    feature_blocks,
    interaction_penalty,
    iter_contributions,
    neuron_stats,
    resolve_chunk,
)
from crossint.interactions.contributions import slot_contributions
from crossint.interactions.kernels import DISABLE_ENV, fused_available
from crossint.interactions.penalty import AdditivityPenalty, KeepErrorPenalty
from crossint.models.adapter import MLPWeights
from crossint.models.hookpoints import resolve_layout

MB = 2**20


# --- helpers -----------------------------------------------------------------------------------
@contextlib.contextmanager
def torch_path_only(disable_fused: bool) -> Iterator[None]:
    """Run with the fused numba kernel off (``disable_fused``) or allowed."""
    previous = os.environ.pop(DISABLE_ENV, None)
    if disable_fused:
        os.environ[DISABLE_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(DISABLE_ENV, None)
        if previous is not None:
            os.environ[DISABLE_ENV] = previous


def peak_memory(fn: Callable[[], object], device: torch.device) -> float:
    """Extra memory (MB) one call of ``fn`` needs at its peak: CUDA's allocator peak, or on the
    CPU the resident-set high-water mark (reset through /proc/self/clear_refs) above the
    resident set at the start."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / MB
    gc.collect()
    try:  # hand freed heap pages back so that reusing them shows up as growth
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    start = status_kb("VmRSS")
    fn()
    return max(status_kb("VmHWM") - start, 0) * 1024 / MB


def sync_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    def call() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return time_call(call, repeats=repeats)


def random_mlps(n_blocks: int, D: int, N: int, device: torch.device) -> dict[int, MLPWeights]:
    g = torch.Generator().manual_seed(1)
    mlps = {}
    for block in range(n_blocks):
        mlps[block] = MLPWeights(
            W_in_DN=(torch.randn(D, N, generator=g) / D**0.5).to(device),
            b_in_N=(0.1 * torch.randn(N, generator=g)).to(device),
            W_out_ND=(torch.randn(N, D, generator=g) / N**0.5).to(device),
            b_out_D=torch.zeros(D, device=device),
            act=F.gelu,
            act_name="gelu",
            lipschitz=1.13,
        )
    return mlps


def topk_codes(
    B: int, H: int, K: int, seed: int, device: torch.device, zipf: float = 0.0
) -> torch.Tensor:
    """f_BH with exactly K active features per token; ``zipf`` > 0 makes some features common
    (as in trained crosscoders), so feature pairs recur."""
    g = torch.Generator().manual_seed(seed)
    weights_H = torch.arange(1, H + 1, dtype=torch.float64) ** -zipf
    chosen_BK = torch.multinomial(weights_H.expand(B, H), K, replacement=False, generator=g)
    values_BK = 0.1 + torch.rand(B, K, generator=g)
    return torch.zeros(B, H).scatter(1, chosen_BK, values_BK).to(device)


# --- (a) training step with the penalty --------------------------------------------------------
def autograd_penalty(f_BH: torch.Tensor, blocks: list[MLPFeatureBlock]) -> torch.Tensor:
    """The same uniform penalty through plain autograd (saves B·K·N per block for backward)."""
    active = active_features(f_BH)
    total, count = 0, 0
    for block in blocks:
        V_UN, row_BK = distinct_virtual_weights(active, block.d_HD, block.mlp.W_in_DN)
        S_BN, Mx_BN, _ = abs_stats(slot_contributions(active.f_BK, V_UN, row_BK))
        total = total + (S_BN - Mx_BN).sum()
        count += S_BN.numel()
    return total / count


PENALTIES = ("off", "analytic", "analytic_torch", "analytic_neuron", "autograd", "keep_error",
             "additivity", "keep_error_quarter", "additivity_quarter")
# *_quarter: L_int on a quarter of each batch's tokens (--penalty-sample 0.25)
KIND_PENALTIES = {"keep_error": KeepErrorPenalty(100.0), "additivity": AdditivityPenalty(100.0),
                  "keep_error_quarter": KeepErrorPenalty(100.0, sample=0.25),
                  "additivity_quarter": AdditivityPenalty(100.0, sample=0.25)}


def bench_penalty(device: torch.device, repeats: int, batch: int = 1024,
                  variants: tuple[str, ...] = PENALTIES) -> list[dict]:
    n_blocks, D, N, H, K = 4, 128, 512, 2048, 20
    hookpoints = resolve_layout("paper", n_blocks)
    config = CrosscoderConfig(hookpoints=hookpoints, d_model=D, n_features=H, k=K)
    model = Crosscoder(config, seed=0).to(device).train()
    mlps = random_mlps(n_blocks, D, N, device)
    acts_BXD = torch.randn(batch, len(hookpoints), D, generator=torch.Generator().manual_seed(0))
    acts_BXD = acts_BXD.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(penalty: str) -> Callable[[], None]:
        def run() -> None:
            out = model(acts_BXD)
            loss = reconstruction_loss(out.acts_norm_BXD, out.recon_norm_BXD)
            if penalty != "off":
                blocks = feature_blocks(model, mlps)
                if penalty in ("analytic", "analytic_torch"):
                    loss = loss + 100.0 * interaction_penalty(out.f_BH, blocks)
                elif penalty == "analytic_neuron":
                    loss = loss + 100.0 * interaction_penalty(out.f_BH, blocks, normalise="neuron")
                elif penalty in KIND_PENALTIES:
                    kind = KIND_PENALTIES[penalty]
                    f_BH = out.f_BH[: kind.sampled_tokens(batch)]
                    loss = loss + kind.weight * kind.value(active_features(f_BH), blocks)
                else:
                    loss = loss + 100.0 * autograd_penalty(out.f_BH, blocks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    with torch.no_grad():
        f_BH = model(acts_BXD).f_BH
        blocks = feature_blocks(model, mlps)
        assert torch.allclose(interaction_penalty(f_BH, blocks), autograd_penalty(f_BH, blocks))
        distinct = int((f_BH != 0).any(dim=0).sum())
    def timed(penalty: str) -> Callable[[], None]:
        # analytic_torch: the same penalty without the fused numba kernel (GPU/no-numba path)
        run = step(penalty)

        def call() -> None:
            with torch_path_only(penalty == "analytic_torch"):
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize()

        return call

    # in turns, so that a shared machine's drift hits every variant alike (one run, one ratio)
    variants = ("off", *(v for v in variants if v != "off"))
    times = time_interleaved({p: timed(p) for p in variants}, repeats=3 * repeats)
    rows = []
    for penalty in variants:
        with torch_path_only(penalty == "analytic_torch"):
            rows.append(
                {
                    "bench": "train_step",
                    "penalty": penalty,
                    "B": batch,
                    "H": H,
                    "N": N,
                    "K": K,
                    "threads": torch.get_num_threads(),
                    "ms": 1e3 * times[penalty],
                    "vs_off": times[penalty] / times["off"],
                    "peak_MB": peak_memory(step(penalty), device),
                    "fused_kernel": penalty.startswith("analytic") and fused_available(
                        model.W_dec_HXD),
                }
            )
    # Analytic sizes: autograd keeps p_BKN (and |p|) per block; the analytic backward keeps one
    # chunk's p at a time; both keep V_UN per block.
    for row in rows:
        row["distinct_U"] = distinct
    return rows


# --- (b) active-feature contributions vs dense B×N×H -------------------------------------------
def bench_contributions(device: torch.device, repeats: int, batch: int = 1024) -> list[dict]:
    D, N, H, K = 128, 512, 4096, 20
    block = MLPFeatureBlock(
        0,
        (torch.randn(H, D, generator=torch.Generator().manual_seed(2)) / 10).to(device),
        torch.zeros(D, device=device),
        random_mlps(1, D, N, device)[0],
    )
    f_BH = topk_codes(batch, H, K, seed=3, device=device)
    dense_chunk = 32  # B×N×H for the whole batch would be 8.6 GB in float32
    chunk = resolve_chunk(None, device, K * N)
    distinct = int((f_BH != 0).any(dim=0).sum())  # rows of V_UN

    def sparse() -> tuple[torch.Tensor, torch.Tensor]:
        parts = [
            abs_stats(c.p_BKN)[:2]
            for _, c in iter_contributions(f_BH, block.d_HD, block.mlp.W_in_DN)
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def dense() -> tuple[torch.Tensor, torch.Tensor]:
        V_HN = block.d_HD @ block.mlp.W_in_DN
        S, Mx = [], []
        for start in range(0, batch, dense_chunk):
            abs_BNH = (f_BH[start : start + dense_chunk, None, :] * V_HN.T[None]).abs_()
            S.append(abs_BNH.sum(-1))
            Mx.append(abs_BNH.amax(-1))
        return torch.cat(S), torch.cat(Mx)

    with torch.no_grad():
        (S_sparse, Mx_sparse), (S_dense, Mx_dense) = sparse(), dense()
        torch.testing.assert_close(S_sparse, S_dense, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(Mx_sparse, Mx_dense, rtol=1e-4, atol=1e-4)
        t_sparse = sync_time(sparse, device, repeats)
        t_dense = sync_time(dense, device, max(1, repeats // 3))
        m_sparse = peak_memory(sparse, device)
        m_dense = peak_memory(dense, device)
    return [
        {
            "bench": "contributions",
            "method": f"active slots (chunks of {chunk})",
            "B": batch,
            "H": H,
            "N": N,
            "K": K,
            "ms": 1e3 * t_sparse,
            "speedup": t_dense / t_sparse,
            "peak_MB": m_sparse,
            "largest_tensor_MB": max(distinct, chunk * K) * N * 4 / MB,
            "unchunked_MB": batch * K * N * 4 / MB,
        },
        {
            "bench": "contributions",
            "method": f"dense B×N×H (chunks of {dense_chunk})",
            "B": batch,
            "H": H,
            "N": N,
            "K": K,
            "ms": 1e3 * t_dense,
            "speedup": 1.0,
            "peak_MB": m_dense,
            "largest_tensor_MB": dense_chunk * N * H * 4 / MB,
            "unchunked_MB": batch * N * H * 4 / MB,
        },
    ]


# --- (c) pairwise accumulation -----------------------------------------------------------------
def bench_pairwise(device: torch.device, n_batches: int, batch: int = 1024) -> list[dict]:
    n_blocks, D, N, H, K = 4, 128, 512, 16384, 20
    mlps = random_mlps(n_blocks, D, N, device)
    g = torch.Generator().manual_seed(4)
    blocks = [
        MLPFeatureBlock(
            l,
            (torch.randn(H, D, generator=g) / 10).to(device),
            torch.zeros(D, device=device),
            mlps[l],
        )
        for l in range(n_blocks)
    ]
    batches = [
        topk_codes(batch, H, K, seed=10 + i, device=device, zipf=0.8) for i in range(n_batches)
    ]

    def run() -> PairwiseAccumulator:
        accumulator = PairwiseAccumulator(H, range(n_blocks), storage="sparse")
        with torch.no_grad():
            for f_BH in batches:
                iterators = [iter_contributions(f_BH, b.d_HD, b.mlp.W_in_DN, 256) for b in blocks]
                for chunk in zip(*iterators, strict=True):
                    accumulator.update(
                        [(b, c, neuron_stats(c)) for b, (_, c) in zip(blocks, chunk, strict=True)]
                    )
        return accumulator

    start = time.perf_counter()
    result = run().result()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stored_bytes = (result.mass_keys_E.numel() + result.count_keys_E.numel()) * 16
    return [
        {
            "bench": "pairwise",
            "storage": "sparse",
            "blocks": n_blocks,
            "H": H,
            "N": N,
            "K": K,
            "tokens": n_batches * batch,
            "tokens_per_s": n_batches * batch / seconds,
            "triplets": result.mass_keys_E.numel(),
            "pairs": result.count_keys_E.numel(),
            "stored_MB": stored_bytes / MB,
            "peak_MB": peak_memory(run, device),
            "dense_would_be_MB": (n_blocks + 1) * H * H * 8 / MB,
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["penalty", "contributions", "pairwise"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairwise-batches", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--penalties", default=",".join(PENALTIES),
                        help=f"penalty variants to time against 'off' (default: all of "
                             f"{','.join(PENALTIES)})")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows: list[dict] = []
    if args.only in (None, "penalty"):
        rows += bench_penalty(device, args.repeats, variants=tuple(args.penalties.split(",")))
        print_table([r for r in rows if r["bench"] == "train_step"])
    if args.only in (None, "contributions"):
        part = bench_contributions(device, args.repeats)
        print_table(part)
        rows += part
    if args.only in (None, "pairwise"):
        part = bench_pairwise(device, args.pairwise_batches)
        print_table(part)
        rows += part
    suffix = "" if args.only is None else f"_{args.only}"
    suffix += f"_{device.type}" if device.type != "cpu" else f"_t{torch.get_num_threads()}"
    print("wrote", write_results(f"interactions{suffix}", rows, device=str(device)))


if __name__ == "__main__":
    main()
