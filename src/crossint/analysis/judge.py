"""The paper's language-model judge of cluster coherence (SPEC §10), through any
OpenAI-compatible chat-completions endpoint. Optional and off by default.

Protocol: the model first describes every involved feature from its top-activating contexts.
Then, for a cluster, it sees the descriptions of all members but one, and must pick the held-out
member's description among ``n_candidates`` (the others from features of other clusters). The
accuracy is compared with chance, 1 / n_candidates (paper: 66% vs 20%).

The endpoint comes from the environment: ``CROSSINT_JUDGE_URL`` (the API base, e.g.
``https://api.openai.com/v1``), ``CROSSINT_JUDGE_KEY`` and ``CROSSINT_JUDGE_MODEL``.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from crossint.errors import CrossintError

ENV_URL, ENV_KEY, ENV_MODEL = "CROSSINT_JUDGE_URL", "CROSSINT_JUDGE_KEY", "CROSSINT_JUDGE_MODEL"
DEFAULT_MODEL = "gpt-4o-mini"
CHAT_COMPLETIONS = "chat/completions"  # the OpenAI-compatible route, relative to the base URL


@dataclass(frozen=True)
class JudgeEndpoint:
    """An OpenAI-compatible chat-completions API."""

    url: str
    key: str = ""
    model: str = DEFAULT_MODEL
    timeout_s: float = 60.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> JudgeEndpoint:
        url = environ.get(ENV_URL, "").strip()
        if not url:
            raise CrossintError(
                f"the judge needs an OpenAI-compatible endpoint: set {ENV_URL} (API base URL, "
                f"e.g. https://api.openai.com/v1), {ENV_KEY} and optionally {ENV_MODEL}"
            )
        return cls(url=url, key=environ.get(ENV_KEY, ""),
                   model=environ.get(ENV_MODEL, "") or DEFAULT_MODEL)

    def complete(self, prompt: str) -> str:
        """The model's reply to one user message (temperature 0)."""
        body = json.dumps({"model": self.model, "temperature": 0,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        endpoint = "/".join((self.url.rstrip("/"), CHAT_COMPLETIONS))
        request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply = json.loads(response.read().decode())
        except urllib.error.HTTPError as e:
            raise CrossintError(f"judge endpoint answered HTTP {e.code}: "
                                f"{e.read().decode(errors='replace')[:200]}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise CrossintError(f"cannot reach the judge endpoint {self.url}: {e}") from None
        except json.JSONDecodeError:
            raise CrossintError("the judge endpoint did not answer with JSON") from None
        try:
            return str(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise CrossintError("the judge endpoint's reply has no choices[0].message.content"
                                ) from None


def context_text(context: Mapping[str, Any]) -> str:
    """A context with its activating token in [[double brackets]]."""
    pieces = list(context["tokens"])
    mark = context["mark"]
    pieces[mark] = f"[[{pieces[mark]}]]"
    return "".join(pieces).replace("\n", " ")


def description_prompt(profile: Mapping[str, Any]) -> str:
    excerpts = "\n".join(f"- {context_text(c)}" for c in profile["contexts"])
    return (
        "These are text excerpts on which one feature of a language model is most active; the "
        "token where it fires is in [[double brackets]].\n"
        f"{excerpts}\n"
        "In one short phrase, what does this feature detect? Answer with the phrase only."
    )


def choice_prompt(group: Sequence[str], candidates: Sequence[str]) -> str:
    shown = "\n".join(f"- {d}" for d in group)
    options = "\n".join(f"{c + 1}. {d}" for c, d in enumerate(candidates))
    return (
        "A group of language-model features has these descriptions:\n"
        f"{shown}\n"
        "Exactly one of the following descriptions belongs to another feature of the same "
        f"group:\n{options}\n"
        f"Which one? Answer with its number (1-{len(candidates)}) only."
    )


def parse_choice(reply: str, n_candidates: int) -> int | None:
    """The 0-based candidate the reply picks (its first number in range), or None."""
    for match in re.finditer(r"\d+", reply):
        value = int(match.group())
        if 1 <= value <= n_candidates:
            return value - 1
    return None


def judge_clusters(
    clusters_by_method: Mapping[str, Sequence[Sequence[int]]],
    profiles: Sequence[Mapping[str, Any]],
    endpoint: JudgeEndpoint,
    n_clusters: int = 20,
    n_candidates: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Judge accuracy per method over up to ``n_clusters`` clusters of ≥ 3 features each."""
    from tqdm.auto import tqdm

    if n_candidates < 2:
        raise CrossintError(f"the judge needs at least 2 candidates, got {n_candidates}")
    by_id = {int(p["id"]): p for p in profiles}
    descriptions: dict[int, str] = {}

    def describe(h: int) -> str:
        if h not in descriptions:
            descriptions[h] = endpoint.complete(description_prompt(by_id[h])).strip()
        return descriptions[h]

    rng = np.random.default_rng(seed)
    result: dict[str, Any] = {"chance": 1.0 / n_candidates, "n_candidates": n_candidates,
                              "model": endpoint.model, "methods": {}}
    for method, clusters in clusters_by_method.items():
        eligible = [list(c) for c in clusters if len(c) >= 3]
        chosen = [eligible[i] for i in sorted(rng.permutation(len(eligible))[:n_clusters])]
        trials, n_correct = [], 0
        for members in tqdm(chosen, desc=f"judge {method}", disable=not progress,
                            dynamic_ncols=True):
            held_out = int(rng.choice(members))
            others = [h for c in clusters if held_out not in c for h in c]
            if len(others) < n_candidates - 1:
                continue
            distractors = [int(h) for h in rng.choice(others, n_candidates - 1, replace=False)]
            candidates = [held_out, *distractors]
            order = rng.permutation(n_candidates)
            candidates = [candidates[o] for o in order]
            reply = endpoint.complete(choice_prompt(
                [describe(h) for h in members if h != held_out],
                [describe(h) for h in candidates]))
            picked = parse_choice(reply, n_candidates)
            correct = picked is not None and candidates[picked] == held_out
            n_correct += correct
            trials.append({"cluster": members, "held_out": held_out, "candidates": candidates,
                           "picked": None if picked is None else candidates[picked],
                           "correct": bool(correct)})
        result["methods"][method] = {
            "accuracy": n_correct / len(trials) if trials else None,
            "n_trials": len(trials),
            "trials": trials,
        }
    result["descriptions"] = {str(h): d for h, d in sorted(descriptions.items())}
    return result
