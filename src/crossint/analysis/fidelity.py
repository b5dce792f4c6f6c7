"""Fidelity: one block's MLP rebuilt from features, spliced back into the model (SPEC §6.1).

At block l the crosscoder's features give every neuron's pre-activation as a sum of per-feature
contributions p (SPEC §4.1). A *scheme* keeps or drops some of them per token and neuron, the
MLP is recomputed from what is kept, and

    resid_post_l ← â(resid_mid_l) + φ(z_scheme)·W_out + b_out

is written into the model, which finishes the forward pass. Fidelity is the loss recovered
against the bias-only MLP (``zero``):  Φ = 1 − (L_scheme − L_model) / (L_zero − L_model).
``keep_ratio`` = Φ_keep_largest / Φ_none is the paper's headline: the fraction of the rebuilt
MLP's performance kept with a single feature per neuron.

Schemes rank features by |p| per token and neuron; ties go to the first active slot. For gated
MLPs a scheme acts on the gate pre-activation and the up projection reads the full reconstructed
``mlp_in`` (as in the SPEC §4.3 gap). ``independent`` is the SPEC §4.7 surrogate: every active
feature's effect on the MLP alone, summed (gate and up split by feature).

**All blocks at once**: every analysed block's MLP output (``blocks.l.mlp_out``) is replaced by
its surrogate in one forward pass, the residual stream otherwise the model's own; ``zero`` is
then every MLP bias-only. (Replacing ``resid_post`` at every block, as the one-block splice
does, would leave only the last block's replacement visible.) Confidence intervals come from a
bootstrap over texts with the same resamples for every scheme and run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from crossint import rundir
from crossint.analysis.heldout import (
    HeldoutRequest,
    capture_tokens,
    heldout_batches,
    load_run,
    request_from,
)
from crossint.analysis.splicing import TextLosses, percentile_interval, variant_losses
from crossint.errors import CrossintError
from crossint.interactions.additivity import MLPTerms, independent_post, iter_terms, kept_post
from crossint.interactions.contributions import (
    MLPFeatureBlock,
    active_features,
    dominant_slot,
    feature_blocks,
)
from crossint.io import sha256_file
from crossint.models.adapter import BlockInput
from crossint.models.hookpoints import hookpoint
from crossint.rundir import RunDir

# The SPEC §6.1 schemes that keep or drop gate contributions, then the SPEC §4.7 surrogate.
KEEP_DROP_SCHEMES: tuple[str, ...] = (
    "none", "drop_random", "drop_second", "drop_largest", "keep_largest", "zero",
)
SCHEMES: tuple[str, ...] = (*KEEP_DROP_SCHEMES[:-1], "independent", "zero")
# Every block replaced at once (each MLP's output by its surrogate): the end-to-end view.
ALL_BLOCK_SCHEMES: tuple[str, ...] = ("none", "keep_largest", "independent", "zero")
BOOTSTRAP_RESAMPLES = 1000
FIDELITY_TEXTS = 200  # default held-out texts (contexts)


# --- the schemes (pure functions) --------------------------------------------------------------
def random_active_slot(mask_BK: Tensor, n_neurons: int, generator: torch.Generator) -> Tensor:
    """One uniformly drawn active slot per token and neuron (B×N); slot 0 for a token with none
    (its contributions are all zero, so dropping it drops nothing)."""
    n_tokens, n_slots = mask_BK.shape
    draws_BKN = torch.rand((n_tokens, n_slots, n_neurons), generator=generator)
    draws_BKN = draws_BKN.to(mask_BK.device) * mask_BK[:, :, None]
    return draws_BKN.argmax(dim=1)


def scheme_pre_activations(
    p_BKN: Tensor, mask_BK: Tensor, scheme: str, generator: torch.Generator | None = None
) -> Tensor:
    """Σ of the contributions a scheme keeps, per token and neuron (B×N; add c for z).

    ``mask_BK`` flags the active slots (padding slots hold p = 0). ``drop_random`` needs
    ``generator`` (CPU)."""
    if scheme not in KEEP_DROP_SCHEMES:
        raise CrossintError(f"unknown scheme {scheme!r}: the schemes that keep or drop "
                            f"contributions are {', '.join(KEEP_DROP_SCHEMES)}")
    total_BN = p_BKN.sum(dim=1)
    if scheme == "none":
        return total_BN
    if scheme == "zero":
        return torch.zeros_like(total_BN)
    if scheme == "drop_random":
        if generator is None:
            raise CrossintError("the drop_random scheme needs a seeded torch.Generator")
        slot_BN = random_active_slot(mask_BK, p_BKN.shape[2], generator)
        return total_BN - p_BKN.gather(1, slot_BN[:, None]).squeeze(1)
    abs_BKN = p_BKN.abs()
    largest_BN = dominant_slot(abs_BKN)
    p_largest_BN = p_BKN.gather(1, largest_BN[:, None]).squeeze(1)
    if scheme == "keep_largest":
        return p_largest_BN
    if scheme == "drop_largest":
        return total_BN - p_largest_BN
    if p_BKN.shape[1] < 2:  # drop_second with one slot: there is no second feature
        return total_BN
    # A negative value ranks below every |p| ≥ 0, so the next dominant slot is the second.
    abs_BKN.scatter_(1, largest_BN[:, None], -1.0)
    second_BN = dominant_slot(abs_BKN, in_place=True)
    return total_BN - p_BKN.gather(1, second_BN[:, None]).squeeze(1)


def scheme_post(terms: MLPTerms, act: Callable[[Tensor], Tensor], scheme: str,
                generator: torch.Generator | None = None) -> Tensor:
    """What the MLP's output linear reads under a scheme (B×N): the kept gate contributions
    (the up projection of a gated MLP keeps its full value), or for ``independent`` the SPEC
    §4.7 surrogate, every active feature's effect alone on c, summed."""
    if scheme == "independent":
        return independent_post(terms, act)
    assert terms.mask_BK is not None
    return kept_post(terms, act, scheme_pre_activations(terms.p_BKN, terms.mask_BK, scheme,
                                                        generator))


def surrogate_outputs(f_TH: Tensor, block: MLPFeatureBlock, schemes: Sequence[str],
                      generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Block l's MLP output (T×D) rebuilt from the features under every scheme."""
    mlp = block.mlp
    parts: dict[str, list[Tensor]] = {scheme: [] for scheme in schemes}
    for _, terms in iter_terms(active_features(f_TH), block):
        for scheme in schemes:
            post_BN = scheme_post(terms, mlp.act, scheme, generator)
            parts[scheme].append(mlp.to_residual(post_BN @ mlp.W_out_ND + mlp.b_out_D))
    empty_TD = block.b_dec_D.new_zeros((0, mlp.W_out_ND.shape[1]))
    return {scheme: torch.cat(chunks) if chunks else empty_TD for scheme, chunks in parts.items()}


# --- the analysis -------------------------------------------------------------------------------
def run_names(run_dirs: Sequence[str | Path]) -> list[str]:
    names = [Path(run).name or str(run) for run in run_dirs]
    if len(set(names)) < len(names):
        names = [str(run) for run in run_dirs]
    if len(set(names)) < len(names):
        raise CrossintError(f"the same run was given twice: {', '.join(names)}")
    return names


def _rebuildable_blocks(crosscoder, n_blocks: int) -> list[int]:
    hookpoints = set(crosscoder.config.hookpoints)
    return [
        l for l in range(n_blocks)
        if {hookpoint(l, "resid_mid"), hookpoint(l, "mlp_in")} <= hookpoints
    ]


def _choose_blocks(
    requested: Sequence[int] | None, crosscoders: dict[str, Any], n_blocks: int
) -> list[int]:
    """The blocks to rebuild: those requested (checked), or every block all runs can rebuild."""
    rebuildable = {name: _rebuildable_blocks(cc, n_blocks) for name, cc in crosscoders.items()}
    if requested is None:
        common = sorted(set.intersection(*(set(b) for b in rebuildable.values())))
        if not common:
            raise CrossintError(
                "no block can be rebuilt by every run: fidelity needs the blocks.{l}.resid_mid "
                "and blocks.{l}.mlp_in hookpoints (the paper layout has both)"
            )
        return common
    for block in requested:
        if not 0 <= block < n_blocks:
            raise CrossintError(f"block {block} is out of range: the model has {n_blocks} blocks")
        for name, blocks in rebuildable.items():
            if block not in blocks:
                raise CrossintError(
                    f"run {name!r} cannot rebuild block {block}: it needs the hookpoints "
                    f"{hookpoint(block, 'resid_mid')} and {hookpoint(block, 'mlp_in')} "
                    f"(it can rebuild blocks {blocks})"
                )
    return list(dict.fromkeys(requested))


def block_summary(losses: TextLosses, prefix: str, weights_RC: Tensor,
                  schemes: Sequence[str] = SCHEMES) -> dict[str, Any]:
    """Φ per scheme with bootstrap intervals and the keep ratio, from one run's losses at one
    block, or at all blocks at once (variant keys ``{prefix}/{scheme}``)."""
    zero = f"{prefix}/zero"
    phi, phi_ci, samples = {}, {}, {}
    for scheme in schemes:
        key = f"{prefix}/{scheme}"
        phi[scheme] = losses.recovered(key, zero)
        samples[scheme] = losses.recovered_samples(key, zero, weights_RC)
        phi_ci[scheme] = percentile_interval(samples[scheme])
    keep_ratio = phi["keep_largest"] / phi["none"] if phi["none"] else float("nan")
    return {
        "phi": phi,
        "phi_ci": phi_ci,
        "keep_ratio": keep_ratio,
        "keep_ratio_ci": percentile_interval(samples["keep_largest"] / samples["none"]),
        "ce_model": losses.mean("model"),
        "ce_zero": losses.mean(zero),
        "ce_scheme": {scheme: losses.mean(f"{prefix}/{scheme}") for scheme in schemes},
    }


def fidelity(
    run_dirs: Sequence[str | Path],
    request: HeldoutRequest | None = None,
    *,
    blocks: Sequence[int] | None = None,
    scheme_seed: int = 0,
    progress: bool = True,
    **text: Any,
) -> dict[str, Any]:
    """SPEC §6.1 for every run and block on the same held-out texts, and every block's MLP
    replaced at once; the ``fidelity.json`` dictionary ``{run name: {"per_block": [...],
    "all_blocks": {...}}}`` (with one block, that block's entry is also spread into the run's
    own dictionary).

    ``request`` (a ``HeldoutRequest``) or its fields as keywords (``fidelity(runs, n_texts=50,
    corpus="stories")``; default 200 texts; corpus and context length default to the first
    run's training cache's). A text is one held-out context. ``blocks``: None = every block all
    runs can rebuild. ``scheme_seed`` seeds ``drop_random`` and the bootstrap."""
    if not run_dirs:
        raise CrossintError("give at least one run directory")
    request = request_from(request, text, n_texts=FIDELITY_TEXTS)
    names = run_names(run_dirs)
    crosscoders, adapter = _load_runs(names, run_dirs, request)
    request = request.resolve(run_dirs[0])
    chosen = _choose_blocks(blocks, crosscoders, adapter.n_blocks)
    mlp_by_block = {l: adapter.mlp_weights(l) for l in chosen}
    splicer = _SchemeSplicer(
        adapter=adapter, crosscoders=crosscoders, blocks=chosen,
        blocks_by_run={name: {b.block: b for b in feature_blocks(cc, mlp_by_block)}
                       for name, cc in crosscoders.items()},
        hookpoints=sorted({h for cc in crosscoders.values() for h in cc.config.hookpoints}),
        generator=torch.Generator().manual_seed(scheme_seed),
    )
    batches = heldout_batches(adapter, request)
    losses = TextLosses()
    n_variants = len(batches) * (1 + len(crosscoders) * (len(chosen) * len(SCHEMES)
                                                          + len(ALL_BLOCK_SCHEMES)))
    with tqdm(total=n_variants, desc="fidelity", unit="variant", disable=not progress) as bar:
        for ids_BS in batches:
            splicer.add(losses, ids_BS.to(request.device), bar.update)
    weights_RC = losses.resample_weights(BOOTSTRAP_RESAMPLES, seed=scheme_seed)
    common = {"model": adapter.name, "corpus": request.corpus, "seed": request.seed,
              "scheme_seed": scheme_seed, "context_length": request.context_length,
              "n_texts": losses.n_texts, "n_tokens": losses.n_tokens,
              "request": request.record()}
    return {name: {"run": str(run_dir), "crosscoder_sha256": sha256_file(RunDir(run_dir).weights),
                   **_run_summary(losses, name, chosen, weights_RC), **common}
            for name, run_dir in zip(names, run_dirs, strict=True)}


def _run_summary(losses: TextLosses, name: str, blocks: list[int], weights_RC: Tensor,
                 ) -> dict[str, Any]:
    """One run's ``per_block`` and ``all_blocks`` entries (one block: also spread in)."""
    per_block = [{"block": l, **block_summary(losses, f"{name}/{l}", weights_RC)}
                 for l in blocks]
    all_blocks = {"blocks": blocks,
                  **block_summary(losses, f"{name}/all", weights_RC, ALL_BLOCK_SCHEMES)}
    return {**(per_block[0] if len(per_block) == 1 else {}), "per_block": per_block,
            "all_blocks": all_blocks}


def _load_runs(names: list[str], run_dirs: Sequence[str | Path], request: HeldoutRequest,
               ) -> tuple[dict[str, Any], Any]:
    """Every run's crosscoder on the request's device and their one subject model (the
    request's ``model`` if given), checked to have the crosscoders' width."""
    from crossint.models.adapter import load_model

    crosscoders, model_names = {}, set()
    for name, run_dir in zip(names, run_dirs, strict=True):
        crosscoder, model_name = load_run(run_dir, command="fidelity")
        crosscoders[name] = crosscoder.to(request.device)
        model_names.add(model_name)
    if request.model is None and len(model_names) > 1:
        raise CrossintError(
            f"the runs have different subject models ({', '.join(sorted(model_names))}); "
            "fidelity compares runs of one model on the same texts"
        )
    adapter = load_model(request.model or model_names.pop(), device=request.device)
    for name, crosscoder in crosscoders.items():
        if crosscoder.config.d_model != adapter.d_model:
            raise CrossintError(
                f"run {name!r} has d_model {crosscoder.config.d_model} but model "
                f"{adapter.name!r} has {adapter.d_model}"
            )
    return crosscoders, adapter


def _tokens_to_batch(values_TD: Tensor, keep_BS: Tensor, like_BSD: Tensor) -> Tensor:
    """Per-token values back into (B, S, D) at the kept positions (zeros elsewhere)."""
    new_BSD = like_BSD.new_zeros(like_BSD.shape)
    new_BSD[keep_BS] = values_TD.to(new_BSD.dtype)
    return new_BSD


@dataclass
class _SchemeSplicer:
    """Adds one batch's losses to a ``TextLosses``: the model's own (``model``); for every run,
    block and scheme, that block rebuilt as SPEC §6.1 splices it (``{run}/{block}/{scheme}``:
    resid_post ← â(resid_mid) + MLP_scheme); and for every run and whole-model scheme, every
    block's MLP output replaced by its surrogate at once (``{run}/all/{scheme}``)."""

    adapter: Any
    crosscoders: dict[str, Any]
    blocks: list[int]
    blocks_by_run: dict[str, dict[int, MLPFeatureBlock]]
    hookpoints: list[str]  # every run's hookpoints, captured once
    generator: torch.Generator

    def add(self, losses: TextLosses, ids_BS: Tensor, tick: Callable[[int], Any]) -> None:
        """The schemes of one patch share passes that start at its first block (from the
        unpatched residual stream captured with the crosscoders' hookpoints)."""
        adapter = self.adapter
        starts = [hookpoint(l, "resid_pre") for l in self.blocks]
        with torch.no_grad():
            acts, keep_BS, acts_TXD = capture_tokens(adapter, ids_BS, self.hookpoints,
                                                     adapter.special_token_ids(), starts)
            losses.new_batch(keep_BS[:, :-1])
            losses.add("model", adapter.token_losses(ids_BS))
            tick(1)
            for name, crosscoder in self.crosscoders.items():
                hookpoints = crosscoder.config.hookpoints
                out = crosscoder(acts_TXD[:, [self.hookpoints.index(h) for h in hookpoints]])
                outputs = {l: surrogate_outputs(out.f_BH, self.blocks_by_run[name][l], SCHEMES,
                                                self.generator) for l in self.blocks}
                like_BSD = acts[hookpoint(self.blocks[0], "resid_mid")]
                for l in self.blocks:
                    resid_mid_TD = out.recon_BXD[:, hookpoints.index(hookpoint(l, "resid_mid"))]
                    variants = {
                        f"{name}/{l}/{scheme}": {hookpoint(l, "resid_post"): _tokens_to_batch(
                            resid_mid_TD + outputs[l][scheme].to(resid_mid_TD.dtype), keep_BS,
                            like_BSD)}
                        for scheme in SCHEMES
                    }
                    start = BlockInput(l, acts[hookpoint(l, "resid_pre")])
                    self._add_variants(losses, ids_BS, keep_BS, start, variants, tick)
                variants = {
                    f"{name}/all/{scheme}": {hookpoint(l, "mlp_out"): _tokens_to_batch(
                        outputs[l][scheme], keep_BS, like_BSD) for l in self.blocks}
                    for scheme in ALL_BLOCK_SCHEMES
                }
                first = min(self.blocks)
                start = BlockInput(first, acts[hookpoint(first, "resid_pre")])
                self._add_variants(losses, ids_BS, keep_BS, start, variants, tick)

    def _add_variants(self, losses: TextLosses, ids_BS: Tensor, keep_BS: Tensor,
                      start: BlockInput, variants: dict[str, dict[str, Tensor]],
                      tick: Callable[[int], Any]) -> None:
        for key, loss_BS in variant_losses(self.adapter, ids_BS, keep_BS, start,
                                           variants).items():
            losses.add(key, loss_BS)
        tick(len(variants))


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """fidelity.json and fidelity.png (one panel per block and one for all blocks at once, one
    bar group per run)."""
    from crossint.io import atomic_write_json
    from crossint.report.plots import plot_fidelity

    paths = rundir.FIDELITY.paths(out_dir)
    phi: dict[str, dict[str, list]] = {}
    ci: dict[str, dict[str, list]] = {}
    schemes: dict[str, Sequence[str]] = {}
    for name, entry in result.items():
        panels = [(f"block {b['block']}", b, SCHEMES) for b in entry["per_block"]]
        panels.append(("all blocks at once", entry["all_blocks"], ALL_BLOCK_SCHEMES))
        for panel, summary, chosen in panels:
            schemes[panel] = chosen
            phi.setdefault(panel, {})[name] = [summary["phi"][s] for s in chosen]
            ci.setdefault(panel, {})[name] = [summary["phi_ci"][s] for s in chosen]
    plot_fidelity(schemes, phi, ci, paths["plot"])
    atomic_write_json(paths["json"], result)
    return paths


def format_table(result: dict[str, Any]) -> str:
    """Φ per scheme (rows) for every run and block (columns) and for all blocks at once, then
    the keep ratios."""
    columns = [(f"{name}@{b['block']}", b) for name, entry in result.items()
               for b in entry["per_block"]]
    columns += [(f"{name}@all", entry["all_blocks"]) for name, entry in result.items()]
    width = max(16, *(len(head) + 2 for head, _ in columns))

    def row(label: str, cells: list[str]) -> str:
        return f"{label:<14}" + "".join(f"{cell:>{width}}" for cell in cells)

    def cell(summary: dict[str, Any], scheme: str) -> str:
        return f"{summary['phi'][scheme]:.3f}" if scheme in summary["phi"] else ""

    lines = [row("scheme", [head for head, _ in columns])]
    lines += [row(scheme, [cell(b, scheme) for _, b in columns]) for scheme in SCHEMES]
    lines.append(row("keep ratio", [f"{b['keep_ratio']:.3f}" for _, b in columns]))
    lines.append(row("  95% CI", ["[{:.2f}, {:.2f}]".format(*b["keep_ratio_ci"])
                                  for _, b in columns]))
    first = next(iter(result.values()))
    lines.append(
        "Φ = 1 − (L_scheme − L_model)/(L_zero − L_model); "
        f"CE(model) {first['per_block'][0]['ce_model']:.4f}; "
        f"{first['n_texts']} texts, {first['n_tokens']} tokens; "
        "@all: every block's MLP output replaced at once"
    )
    return "\n".join(lines)
