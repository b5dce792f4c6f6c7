"""Can a verifier bound the keep-dominant error without reading every feature's contribution at
every neuron? An experiment for docs/results.md ("Compact-proof bounds"): per-feature top-m
tables.

Every certified strategy of ``crossint bound`` reads the K·N contributions p_kn = f_k·V_kn of a
token's K active features (4·K·N FLOPs: p, Σ, |p| and the max), which on storylm (K ≈ 20, D 128)
is already 0.13 of running the MLP. The cheaper verifier tried here keeps, per feature h, only
its m largest |V_hn| exactly (a table of m neurons) and ρ_h = the (m+1)-th largest, so every
other contribution is certified |p_kn| ≤ b_k = |f_k|·ρ_k. Per neuron n, with E, A and Mx the
signed sum, absolute sum and largest |p| of the contributions known there and B_n = Σ b_k of
the features not known there:

- if Mx > max_k b_k the dominant feature is known and |z − k| ≤ |E − p_dom| + B_n;
- otherwise |z − k| = Σ|p| − max|p| ≤ A + B_n − Mx;

and the slope comes from the certified activation table over the hull of every value z and k
can take. FLOPs per token ≈ 4K + 6·K·m + (22 + table query)·N. Every bound is checked against
the measured error (an assertion).

    python scripts/bound_sparse_tables.py runs/kind_additivity_s/lambda_0 --m 16,64,128,256
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from crossint.analysis.heldout import capture_tokens, request_from
from crossint.analysis.interactions import prepare_analysis
from crossint.interactions import bounds as B
from crossint.interactions.additivity import MLPTerms
from crossint.interactions.contributions import active_features
from crossint.models.hookpoints import hookpoint


def sparse_table_bound(s: B.NeuronSums, terms: MLPTerms, verifier: B.BlockVerifier, m: int
                       ) -> Tensor:
    """The top-m table bound on ‖MLP(x̂) − MLP_keep(x̂)‖ per token (plain MLPs)."""
    p, c = terms.p_BKN, terms.c_N
    abs_p = p.abs()
    top = abs_p.topk(min(m + 1, p.shape[2]), dim=2)  # the top-m of |V_h|, scaled by |f_h|
    known = torch.zeros_like(abs_p, dtype=torch.bool).scatter_(2, top.indices[:, :, :m], True)
    b_BK = top.values[:, :, m] if m < p.shape[2] else abs_p.new_zeros(p.shape[:2])
    E = (p * known).sum(1)
    A = (abs_p * known).sum(1)
    Mx, slot = (abs_p * known).max(1)
    p_dom = p.gather(1, slot[:, None]).squeeze(1)
    B_n = b_BK.sum(1, keepdim=True) - (b_BK[:, :, None] * known).sum(1)
    b_max = b_BK.amax(1, keepdim=True)
    dom_known = Mx > b_max
    gap_bound = torch.where(dom_known, (E - p_dom).abs() + B_n, A + B_n - Mx)
    reach = torch.maximum(Mx, b_max.expand_as(Mx))
    k_lo = torch.where(dom_known, c + p_dom, c - reach)
    k_hi = torch.where(dom_known, c + p_dom, c + reach)
    lo, hi = torch.minimum(c + E - B_n, k_lo), torch.maximum(c + E + B_n, k_hi)
    table = verifier.ensure(float(lo.min()), float(hi.max()))
    per_neuron = table.max_abs_slope(lo, hi) * gap_bound
    return B.rows_or_spectral(per_neuron, verifier.spectrum) * (1 + B.ROUNDING)


def sparse_flops(K: float, N: int, m: int) -> float:
    return 4 * K + 6 * K * m + (22 + B.TABLE_QUERY_FLOPS) * N


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--m", default="16,64,128", help="table sizes, comma-separated")
    args = parser.parse_args()
    sizes = [int(x) for x in args.m.split(",")]
    setup = prepare_analysis(args.run, "bound", request_from(None, {}, n_tokens=args.tokens),
                             None)
    verifiers = {fb.block: B.block_verifier(fb) for fb in setup.fblocks}
    sums: dict[tuple[int, int | str], list[float]] = {}
    active_sum = n_tokens = 0.0
    with torch.no_grad():
        for ids_BS in setup.batches:
            captured = capture_tokens(setup.adapter, ids_BS, list(setup.hookpoints),
                                      setup.special_ids)
            acts_TXD = captured.acts_TXD[:, :len(setup.hookpoints)]
            active = active_features(setup.crosscoder.encode(acts_TXD).double())
            active_sum += float(active.counts_B.sum())
            n_tokens += active.n_tokens
            for fb in setup.fblocks:
                if fb.mlp.gated:
                    raise SystemExit("this experiment covers plain (ungated) MLPs only")
                verifier = verifiers[fb.block]
                x_TD = acts_TXD[:, setup.hookpoints.index(hookpoint(fb.block, "mlp_in"))]
                for _, chunk in B.iter_chunks(active, fb, x_TD.double()):
                    s = B.neuron_sums(chunk.terms)
                    verifier.ensure(*B.query_range(s, chunk, verifier))
                    cb = B.chunk_bounds(chunk, verifier)
                    gap = cb.gap["keep"]
                    rows = {"interval": cb.bounds["keep"]["interval"]}
                    rows.update({m: sparse_table_bound(s, chunk.terms, verifier, m)
                                 for m in sizes})
                    for name, bound in rows.items():
                        assert bool((bound >= gap).all()), f"bound {name} below the error"
                        entry = sums.setdefault((fb.block, name), [0.0, 0.0])
                        entry[0] += float(gap.sum())
                        entry[1] += float(bound.sum())
    K = active_sum / n_tokens
    D, N = setup.adapter.d_model, setup.fblocks[0].n_neurons
    act = setup.fblocks[0].mlp.act_name
    brute = B.strategy_flops("keep", "brute_force", K, N, D, False, act)
    print(f"{int(n_tokens)} tokens, mean active K {K:.1f}, D {D}, N {N}; 0 violations")
    print("| block | strategy | measured | bound | bound ÷ measured | ÷ brute-force FLOPs |")
    print("|---|---|---|---|---|---|")
    for (block, name), (gap_sum, bound_sum) in sorted(sums.items(), key=lambda kv: (
            kv[0][0], -1 if kv[0][1] == "interval" else kv[0][1])):
        flops = (B.strategy_flops("keep", "interval", K, N, D, False, act)
                 if name == "interval" else sparse_flops(K, N, int(name)))
        label = "interval" if name == "interval" else f"top-{name} tables"
        print(f"| {block} | {label} | {gap_sum / n_tokens:.3f} | {bound_sum / n_tokens:.2f} | "
              f"{bound_sum / gap_sum:.2f} | {flops / brute:.3f} |")


if __name__ == "__main__":
    main()
