"""modadd: a small modular-addition transformer, the toy on which the Local Interaction Basis
was first shown to find sparsely interacting features (SPEC §11).

Every document of its corpus is one sum ``"a b = c"`` with ``c = (a + b) mod p``; a word-level
tokenizer gives each number, ``=`` and ``<|endoftext|>`` (BOS, EOS and PAD) one token, so with
128-token contexts replaced by 6-token ones (``BOS a b = c EOS``) every context holds exactly one
sum. The model is ``transformers``' ``GPTNeoForCausalLM`` (global attention, ReLU MLP, untied
unembedding, like the original's one-layer transformer), trained on the next-token loss of every
position of the sums crossint's corpus split leaves for harvests; the sums it holds out are the
text every analysis reads, so held-out loss measures the algorithm, not memory. The corpus is
saved next to the model (``modadd.txt``), so any crossint command can read it with
``--corpus DIR/modadd.txt --context-length 6``.

The loss at a held-out position averages four predictions: b after a (uniform: log p nats at
best), ``=`` after b, c after ``=`` (the sum) and EOS after c (the last three learnable), so a
model that has learned the sum has loss log(p) / 4.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossint.config import JsonConfig, invalid, is_int, is_number
from crossint.errors import CrossintError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

SPECIAL_TOKEN = "<|endoftext|>"
EQUALS = "="
CONTEXT_LENGTH = 6  # BOS a b = c EOS
CORPUS_FILE = "modadd.txt"
ANSWER_POSITION = 3  # the position of "=", whose next token is the sum


@dataclass(frozen=True)
class ModaddSettings(JsonConfig):
    """The toy and its training: modulus ``p``, a GPT-Neo of ``n_blocks`` blocks of width
    ``d_model`` (``n_heads`` heads, ReLU MLP of ``d_mlp``), AdamW (``lr``, ``weight_decay``,
    betas 0.9/0.98) for ``steps`` steps of ``batch_size`` sums, constant learning rate after
    ``warmup`` steps; ``seed`` seeds initialisation and batch order; ``threads`` torch CPU
    threads (the result is bitwise repeatable at a fixed thread count)."""

    p: int = 113
    d_model: int = 128
    n_blocks: int = 1
    n_heads: int = 4
    d_mlp: int = 512
    steps: int = 3000
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 1.0
    warmup: int = 100
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        for name, least in (("p", 2), ("d_model", 1), ("n_blocks", 1), ("n_heads", 1),
                            ("d_mlp", 1), ("steps", 1), ("batch_size", 1), ("warmup", 0),
                            ("seed", 0), ("threads", 1)):
            value = getattr(self, name)
            if not is_int(value) or value < least:
                invalid("modadd", name, value, f"an integer >= {least}")
        if self.d_model % self.n_heads:
            raise CrossintError(f"d_model {self.d_model} must be divisible by n_heads "
                                f"{self.n_heads}")
        if not is_number(self.lr) or not self.lr > 0:
            invalid("modadd", "lr", self.lr, "a number > 0")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            invalid("modadd", "weight_decay", self.weight_decay, "a number >= 0")


# --- data ----------------------------------------------------------------------------------------
def modadd_lines(p: int) -> list[str]:
    """Every sum ``"a b = c"``, a and b in 0..p−1, in order (a major)."""
    return [f"{a} {b} {EQUALS} {(a + b) % p}" for a in range(p) for b in range(p)]


def modadd_tokenizer(p: int) -> PreTrainedTokenizerFast:
    """Word-level: ``<|endoftext|>`` 0 (BOS, EOS, PAD), the numbers 0..p−1 as 1..p, ``=`` p+1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {SPECIAL_TOKEN: 0, **{str(n): n + 1 for n in range(p)}, EQUALS: p + 1}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL_TOKEN,
                                   eos_token=SPECIAL_TOKEN, pad_token=SPECIAL_TOKEN,
                                   unk_token=SPECIAL_TOKEN, model_max_length=CONTEXT_LENGTH)


def sum_contexts(lines: list[str], p: int) -> torch.Tensor:
    """(N, 6) token ids ``BOS a b = c EOS`` of the sums in ``lines``."""
    import torch

    rows = []
    for line in lines:
        a, b, _, c = line.split()
        rows.append([0, int(a) + 1, int(b) + 1, p + 1, int(c) + 1, 0])
    return torch.tensor(rows, dtype=torch.long).reshape(-1, CONTEXT_LENGTH)


def split_sums(corpus_path: Path, lines: list[str]) -> tuple[list[str], list[str]]:
    """(harvest sums, held-out sums) by crossint's corpus split of the corpus file."""
    from crossint.data.corpus import split_corpus

    split = split_corpus(corpus_path)
    assert split is not None
    heldout = [line for line in lines if split.is_heldout(line)]
    train = [line for line in lines if not split.is_heldout(line)]
    return train, heldout


# --- model ---------------------------------------------------------------------------------------
def modadd_model(s: ModaddSettings) -> PreTrainedModel:
    """A freshly initialised GPT-Neo for the sums (seeded with ``s.seed``)."""
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(
        vocab_size=s.p + 2, max_position_embeddings=CONTEXT_LENGTH, hidden_size=s.d_model,
        num_layers=s.n_blocks, attention_types=[[["global"], s.n_blocks]], num_heads=s.n_heads,
        intermediate_size=s.d_mlp, activation_function="relu", resid_dropout=0.0,
        embed_dropout=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(s.seed)
    return GPTNeoForCausalLM(config)


def evaluate(model: PreTrainedModel, ids_NS: torch.Tensor, batch: int = 2048
             ) -> dict[str, float]:
    """Mean next-token loss over the four predicted positions (what crossint's analyses
    measure), the loss of the sum alone, and the sum's greedy accuracy."""
    import torch
    import torch.nn.functional as F

    total, answer, correct = 0.0, 0.0, 0
    with torch.no_grad():
        for chunk_NS in ids_NS.split(batch):
            logits_NSV = model(input_ids=chunk_NS).logits[:, 1:CONTEXT_LENGTH - 1]
            targets_NS = chunk_NS[:, 2:]
            loss_NS = F.cross_entropy(logits_NSV.transpose(1, 2), targets_NS, reduction="none")
            total += float(loss_NS.double().sum())
            answer += float(loss_NS[:, ANSWER_POSITION - 1].double().sum())
            guess_N = logits_NSV[:, ANSWER_POSITION - 1].argmax(-1)
            correct += int((guess_N == targets_NS[:, ANSWER_POSITION - 1]).sum())
    n = max(len(ids_NS), 1)
    return {"loss": total / (4 * n), "answer_loss": answer / n, "accuracy": correct / n}


def _train_step(model: PreTrainedModel, optimizer: torch.optim.Optimizer,
                batch_NS: torch.Tensor) -> float:
    """One AdamW step on the next-token loss of the four predicted positions (as evaluated)."""
    import torch.nn.functional as F

    logits_NSV = model(input_ids=batch_NS).logits[:, 1:CONTEXT_LENGTH - 1]
    loss = F.cross_entropy(logits_NSV.transpose(1, 2), batch_NS[:, 2:])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def fit(model: PreTrainedModel, train_NS: torch.Tensor, heldout_NS: torch.Tensor,
        s: ModaddSettings, progress: bool = False) -> list[dict[str, float]]:
    """Train in place; the held-out loss and accuracy every 250 steps and after the last."""
    import torch
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay,
                                  betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (s.warmup + 1)))
    order = torch.Generator().manual_seed(s.seed)
    history, start = [], time.perf_counter()
    model.train()
    for step in tqdm(range(s.steps), desc="modadd train", disable=not progress):
        batch_NS = train_NS[torch.randint(0, len(train_NS), (s.batch_size,), generator=order)]
        loss = _train_step(model, optimizer, batch_NS)
        schedule.step()
        if (step + 1) % 250 == 0 or step + 1 == s.steps:
            model.eval()
            history.append({"step": step + 1, "train_loss": round(loss, 5),
                            **{f"heldout_{k}": round(v, 5)
                               for k, v in evaluate(model, heldout_NS).items()},
                            "seconds": round(time.perf_counter() - start, 1)})
            model.train()
    model.eval()
    return history


def train_modadd(out_dir: str | Path, settings: ModaddSettings | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Train the toy and save it (``save_pretrained``: config, weights, tokenizer), its corpus
    (``modadd.txt``) and ``training.json`` into ``out_dir``; returns training.json."""
    import torch

    from crossint.io import atomic_write_dir, atomic_write_json, atomic_write_text

    s = settings or ModaddSettings()
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        lines = modadd_lines(s.p)
        corpus = "\n".join(lines) + "\n"
        staging = Path(out_dir).with_name(f".{Path(out_dir).name}.corpus.txt")
        atomic_write_text(staging, corpus)
        try:
            train, heldout = split_sums(staging, lines)
        finally:
            staging.unlink(missing_ok=True)
        train_NS, heldout_NS = sum_contexts(train, s.p), sum_contexts(heldout, s.p)
        model = modadd_model(s)
        start = time.perf_counter()
        history = fit(model, train_NS, heldout_NS, s, progress)
        result = {"settings": s.to_dict(), "n_train_sums": len(train),
                  "n_heldout_sums": len(heldout), "history": history,
                  "heldout": evaluate(model, heldout_NS), "train": evaluate(model, train_NS),
                  "loss_floor": math.log(s.p) / 4, "train_seconds": time.perf_counter() - start,
                  "torch_version": torch.__version__}
    finally:
        torch.set_num_threads(threads)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        modadd_tokenizer(s.p).save_pretrained(tmp)
        atomic_write_text(tmp / CORPUS_FILE, corpus)
        atomic_write_json(tmp / "training.json", result)

    atomic_write_dir(out_dir, write)
    return result
