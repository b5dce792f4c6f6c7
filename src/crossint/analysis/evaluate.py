"""Standard crosscoder metrics on held-out text (SPEC §3.6) and CE-loss recovered (SPEC §6.2).

The evaluation runs the subject model itself on text the crosscoder never trained on, so the
numbers need no activation cache: FVU per hookpoint, mean L0, dead and dense fractions, and, for
every residual-stream hookpoint, the next-token loss with the crosscoder's reconstruction spliced
in, against zero- and mean-ablation of that hookpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from crossint.analysis.heldout import (
    HeldoutRequest,
    capture_tokens,
    heldout_batches,
    load_subject,
    request_from,
)
from crossint.analysis.splicing import TextLosses, percentile_interval, variant_losses
from crossint.models.adapter import BlockInput
from crossint.models.hookpoints import RESID_SITES, hookpoint, parse_hookpoint

DENSE_FIRING_RATE = 0.1  # SPEC §3.6: a feature firing on more than 10% of tokens is "dense"
BOOTSTRAP_RESAMPLES = 1000  # text resamples behind every confidence interval


@dataclass
class ReconstructionStats:
    """Running sums for FVU (SPEC §3.6) per hookpoint and feature firing counts."""

    n_positions: int
    n_features: int
    sq_error_X: Tensor = field(init=False)
    sum_XD: Tensor | None = None
    sq_norm_X: Tensor = field(init=False)
    fires_H: Tensor = field(init=False)
    l0_sum: float = 0.0
    n_tokens: int = 0

    def __post_init__(self) -> None:
        self.sq_error_X = torch.zeros(self.n_positions, dtype=torch.float64)
        self.sq_norm_X = torch.zeros(self.n_positions, dtype=torch.float64)
        self.fires_H = torch.zeros(self.n_features, dtype=torch.int64)

    def update(self, acts_TXD: Tensor, recon_TXD: Tensor, f_TH: Tensor) -> None:
        acts_TXD = acts_TXD.double()
        self.sq_error_X += (acts_TXD - recon_TXD.double()).pow(2).sum(dim=(0, 2))
        self.sq_norm_X += acts_TXD.pow(2).sum(dim=(0, 2))
        batch_sum_XD = acts_TXD.sum(dim=0)
        self.sum_XD = batch_sum_XD if self.sum_XD is None else self.sum_XD + batch_sum_XD
        active_TH = f_TH != 0
        self.fires_H += active_TH.sum(dim=0)
        self.l0_sum += float(active_TH.sum())
        self.n_tokens += acts_TXD.shape[0]

    def mean_XD(self) -> Tensor:
        return self.sum_XD / self.n_tokens

    def fvu_X(self) -> Tensor:
        # Total variance around the evaluation-set mean: Σ‖a‖² − n‖ā‖².
        variance_X = self.sq_norm_X - self.n_tokens * self.mean_XD().pow(2).sum(dim=1)
        return self.sq_error_X / variance_X


EVAL_TOKENS = 20_000  # default held-out tokens


def _reconstruct(adapter, crosscoder, ids_BS: Tensor, hookpoints: list[str], special_ids: set[int],
                 also: Sequence[str] = ()):
    """The captured pass (``Captured``, with the ``also`` hookpoints in its ``acts``) and the
    crosscoder's output on its tokens."""
    captured = capture_tokens(adapter, ids_BS, hookpoints, special_ids, also)
    with torch.no_grad():
        out = crosscoder(captured.acts_TXD)
    return captured, out


def _token_losses(adapter, ids_BS: Tensor, patches=None) -> Tensor:
    with torch.no_grad():
        return adapter.token_losses(ids_BS, patches=patches)


def evaluate(
    run_dir: str | Path,
    request: HeldoutRequest | None = None,
    *,
    progress: bool = True,
    **text: Any,
) -> dict:
    """Evaluate a saved crosscoder on held-out text; returns the ``eval.json`` dictionary.

    ``request`` (``crossint.analysis.heldout.HeldoutRequest``) or its fields as keywords
    (``evaluate(run, n_tokens=10_000, corpus="stories")``; default 20,000 tokens): corpus and
    context length default to those of the activation cache the run was trained on (else
    built-in stories, 128), the text to its held-out part (stories of another seed, or the
    documents a file corpus's split holds out).
    """
    request = request_from(request, text, n_tokens=EVAL_TOKENS)
    crosscoder, adapter, request = load_subject(run_dir, request)
    hookpoints = list(crosscoder.config.hookpoints)
    for name in hookpoints:
        parse_hookpoint(name, adapter.n_blocks)
    resid_hookpoints = [
        h for h in hookpoints if parse_hookpoint(h, adapter.n_blocks)[1] in RESID_SITES
    ]
    # An encoder (BERT) has no next-token loss: known now, not after the reconstruction pass.
    has_loss = not adapter.arch.encoder
    batches = heldout_batches(adapter, request)
    bar = tqdm(total=(2 if has_loss else 1) * len(batches), desc="eval", unit="batch",
               disable=not progress)
    passes = _Passes(adapter, crosscoder, hookpoints, adapter.special_token_ids(), request.device,
                     bar.update)
    # Pass 1: reconstruction quality and the activation means that mean-ablation needs.
    stats = passes.reconstruction(batches)
    # Pass 2: splice each residual hookpoint's reconstruction (and its ablations) into the model.
    losses = (passes.splices(batches, resid_hookpoints, stats.mean_XD().float()) if has_loss
              else None)
    bar.close()
    result = {"run": str(run_dir), "model": adapter.name, "corpus": request.corpus,
              "seed": request.seed, "context_length": request.context_length}
    result.update(eval_metrics(stats, losses, hookpoints, resid_hookpoints))
    if not has_loss:
        result["n_texts"] = sum(len(ids_BS) for ids_BS in batches)
        result["ce_not_applicable"] = (
            f"{adapter.name} is a {adapter.model_type} encoder: it has no next-token loss, so "
            f"CE recovered does not apply")
    result["request"] = request.record()
    return result


@dataclass
class _Passes:
    """The two passes of :func:`evaluate` over the held-out batches."""

    adapter: Any
    crosscoder: Any
    hookpoints: list[str]
    special_ids: set[int]
    device: str
    tick: Any  # called after every batch (progress)

    def reconstruction(self, batches: list[Tensor]) -> ReconstructionStats:
        stats = ReconstructionStats(len(self.hookpoints), self.crosscoder.config.n_features)
        for ids_BS in batches:
            captured, out = _reconstruct(self.adapter, self.crosscoder, ids_BS.to(self.device),
                                         self.hookpoints, self.special_ids)
            stats.update(captured.acts_TXD, out.recon_BXD, out.f_BH)
            self.tick()
        return stats

    def splices(self, batches: list[Tensor], resid_hookpoints: list[str], mean_XD: Tensor,
                ) -> TextLosses:
        """Next-token losses of the model, and with every residual hookpoint replaced by its
        reconstruction, by zeros and by its mean (special tokens keep their activations).

        The three variants of a hookpoint in block l share one pass that starts at block l
        from the unpatched residual stream (captured with the crosscoder's hookpoints)."""
        mean_XD = mean_XD.to(self.device)
        block_of = {h: parse_hookpoint(h, self.adapter.n_blocks)[0] for h in resid_hookpoints}
        starts = [hookpoint(l, "resid_pre") for l in sorted(set(block_of.values()))]
        losses = TextLosses()
        for ids_BS in batches:
            ids_BS = ids_BS.to(self.device)
            (acts, keep_BS, _), out = _reconstruct(self.adapter, self.crosscoder, ids_BS,
                                                   self.hookpoints, self.special_ids, starts)
            losses.new_batch(keep_BS[:, :-1])
            losses.add("model", _token_losses(self.adapter, ids_BS))
            for x, name in enumerate(self.hookpoints):
                if name not in resid_hookpoints:
                    continue
                recon_BSD = torch.zeros_like(acts[name])
                recon_BSD[keep_BS] = out.recon_BXD[:, x].to(recon_BSD.dtype)
                variants = {
                    "splice": {name: recon_BSD},
                    "zero": {name: torch.zeros_like(recon_BSD)},
                    "mean": {name: mean_XD[x].to(recon_BSD.dtype).expand_as(recon_BSD)},
                }
                l = block_of[name]
                start = BlockInput(l, acts[hookpoint(l, "resid_pre")])
                for variant, loss_BS in variant_losses(self.adapter, ids_BS, keep_BS, start,
                                                       variants).items():
                    losses.add(f"{name}/{variant}", loss_BS)
            self.tick()
        return losses


CE_KEYS = ("ce_model", "ce_splice", "ce_zero", "ce_mean_ablation", "ce_recovered",
           "ce_recovered_ci", "ce_recovered_mean_ablation", "n_texts")


def eval_metrics(stats: ReconstructionStats, losses: TextLosses | None, hookpoints: list[str],
                 resid_hookpoints: list[str]) -> dict[str, Any]:
    """The metrics of eval.json from the two passes' accumulators (pure); ``losses`` None (an
    encoder: no next-token loss) gives None for every CE entry."""
    fvu_X = stats.fvu_X()
    firing_rate_H = stats.fires_H.double() / stats.n_tokens
    metrics = {
        "n_tokens": stats.n_tokens,
        "fvu": {name: float(fvu_X[x]) for x, name in enumerate(hookpoints)},
        "fvu_mean": float(fvu_X.mean()),
        "l0": stats.l0_sum / stats.n_tokens,
        "dead_fraction": float((stats.fires_H == 0).double().mean()),
        "dense_fraction": float((firing_rate_H > DENSE_FIRING_RATE).double().mean()),
    }
    if losses is None:
        return {**metrics, **dict.fromkeys(CE_KEYS)}
    return {**metrics, **ce_metrics(losses, resid_hookpoints)}


def ce_metrics(losses: TextLosses, resid_hookpoints: list[str]) -> dict[str, Any]:
    """The next-token loss entries of eval.json (SPEC §6.2), with bootstrap intervals."""
    weights_RC = losses.resample_weights(BOOTSTRAP_RESAMPLES, seed=0)
    return {
        "ce_model": losses.mean("model"),
        "ce_splice": {h: losses.mean(f"{h}/splice") for h in resid_hookpoints},
        "ce_zero": {h: losses.mean(f"{h}/zero") for h in resid_hookpoints},
        "ce_mean_ablation": {h: losses.mean(f"{h}/mean") for h in resid_hookpoints},
        "ce_recovered": {
            h: losses.recovered(f"{h}/splice", f"{h}/zero") for h in resid_hookpoints
        },
        "ce_recovered_ci": {
            h: percentile_interval(losses.recovered_samples(f"{h}/splice", f"{h}/zero", weights_RC))
            for h in resid_hookpoints
        },
        "ce_recovered_mean_ablation": {
            h: losses.recovered(f"{h}/splice", f"{h}/mean") for h in resid_hookpoints
        },
        "n_texts": losses.n_texts,
    }


def format_table(result: dict) -> str:
    """A plain-text table of one evaluation (printed by `crossint eval`)."""
    ce_model = result.get("ce_model")
    lines = [
        f"model {result['model']}  tokens {result['n_tokens']}  L0 {result['l0']:.1f}  "
        f"dead {result['dead_fraction']:.3f}  dense {result['dense_fraction']:.3f}  "
        + (f"CE(model) {ce_model:.4f}" if ce_model is not None else "CE: not applicable"),
        f"{'hookpoint':<24} {'FVU':>8} {'CE splice':>10} {'CE rec.':>8} {'CE rec. (mean)':>15}",
    ]
    for name, fvu in result["fvu"].items():
        row = f"{name:<24} {fvu:>8.4f}"
        if name in (result.get("ce_recovered") or {}):
            row += (
                f" {result['ce_splice'][name]:>10.4f} {result['ce_recovered'][name]:>8.3f}"
                f" {result['ce_recovered_mean_ablation'][name]:>15.3f}"
            )
        lines.append(row)
    lines.append(f"{'mean':<24} {result['fvu_mean']:>8.4f}")
    if result.get("ce_not_applicable"):
        lines.append(f"CE recovered: not applicable ({result['ce_not_applicable']})")
    return "\n".join(lines)
