"""Shared fixtures: tiny real Hugging Face models built from configs (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """Tiny models run ~100x slower when two cores' threads contend; one thread is fastest."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


TINY_TEXT = [
    "Once upon a time there was a little cat named Tom. Tom liked to play in the sun.",
    "One day, Lily went to the park with her dog. The dog was happy and ran fast.",
    "Ben saw a big red ball. He kicked the ball and it flew over the tree.",
    "The bird sang a song. Mia smiled and said, \"What a nice song!\"",
]


def build_tiny_tokenizer(vocab_size: int = 128):
    """A byte-level BPE tokenizer trained on a few sentences, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TINY_TEXT * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=64,
    )


def build_tiny_gpt2(out_dir: Path, n_blocks: int = 2, d_model: int = 32, seed: int = 0,
                    n_positions: int = 64) -> Path:
    """Save a random tiny GPT-2 (2 blocks, d_model 32) with a tokenizer to ``out_dir``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=d_model,
        n_layer=n_blocks,
        n_head=4,
        n_inner=4 * d_model,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2 with its tokenizer, saved with save_pretrained (loadable by path)."""
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    path.write_text("\n".join(TINY_TEXT * 50) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_paper_run(tiny_model_dir, tiny_text_file, tmp_path_factory) -> Path:
    """A crosscoder really trained (60 steps, H 64, TopK 4) on the tiny GPT-2's paper-layout
    activations: the input of the clustering and report tests."""
    from crossint.cli import main
    from crossint.data.harvest import harvest

    root = tmp_path_factory.mktemp("paper_run")
    cache = harvest(str(tiny_model_dir), root / "cache", "paper", n_tokens=3000,
                    corpus=str(tiny_text_file), context_length=32, batch_size=8,
                    progress=False).path
    run = root / "run"
    code = main(["train", "--activations", str(cache), "--out", str(run), "--features", "64",
                 "--k", "4", "--steps", "60", "--batch-size", "128", "--log-every", "10",
                 "--quiet"])
    assert code == 0
    return run


@pytest.fixture(params=["fused", "torch"])
def kernel_path(request, monkeypatch):
    """Run a test on both paths of crossint.interactions.kernels (the fused numba kernel is
    skipped when numba is not installed)."""
    from crossint.interactions import kernels

    if request.param == "torch":
        monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    elif not kernels.fused_available(torch.zeros(1)):
        pytest.skip("numba is not installed (the fast extra)")
    return request.param


class Interrupt(Exception):
    pass


def interrupt_at(step: int):
    """An extra loss that contributes nothing and stops the run when step ``step`` begins."""
    calls = {"n": 0}

    def extra(crosscoder, acts_BXD, output):
        if calls["n"] == step:
            raise Interrupt
        calls["n"] += 1
        return {}

    return extra


def assert_one_line_error(capsys, code: int, command: str, *fragments: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert err.count("\n") == 0, err
    assert err.startswith(f"crossint {command}: error: "), err
    for fragment in fragments:
        assert fragment in err, err
