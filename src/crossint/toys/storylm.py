"""storylm: the embedded default model, a small GPT-Neo trained on generated instruction stories.

Nothing is downloaded at run time, so crossint brings its own real language model in the spirit
of TinyStories-Instruct: the corpus comes from :mod:`crossint.toys.stories`, the tokenizer is a
byte-level BPE trained with ``tokenizers``, and the model is ``transformers``' own
``GPTNeoForCausalLM`` (4 blocks, GELU MLP, alternating global/local attention like the
TinyStories models). The trained files are saved with ``save_pretrained`` and load through the
same ``AutoModelForCausalLM`` / ``AutoTokenizer`` path as any Hugging Face model.

The packaged weights under ``crossint/assets/storylm/`` are produced by ``crossint storylm train``
with its default settings (see docs/storylm.md).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossint.errors import CrossintError
from crossint.toys.stories import (
    Story,
    format_document,
    format_prompt,
    generate_stories,
    generate_story,
    iter_stories,
    split_document,
)

if TYPE_CHECKING:
    import torch
    from transformers import GPTNeoConfig, PreTrainedModel, PreTrainedTokenizerFast

__all__ = [
    "Story", "generate_story", "generate_stories", "iter_stories", "format_prompt",
    "format_document", "split_document", "SPECIAL_TOKEN", "TRAIN_DATA_SEED", "HELDOUT_DATA_SEED",
    "REGENERATE_COMMAND", "train_tokenizer", "storylm_config", "pack_contexts",
    "tokenize_stream", "token_losses", "mean_token_loss", "unigram_entropy", "train_storylm",
    "default_model_path", "resolve_model_dir", "load_storylm", "generate",
]

SPECIAL_TOKEN = "<|endoftext|>"
TRAIN_DATA_SEED = 0  # the training corpus is iter_stories(0) ...
HELDOUT_DATA_SEED = 1  # ... and held-out evaluation uses a different stream
REGENERATE_COMMAND = "crossint storylm train --out src/crossint/assets/storylm"
# Files a trained model directory must contain to be loadable.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


# --- tokenizer and config ------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``; ``<|endoftext|>`` is BOS, EOS and PAD (as in GPT-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise CrossintError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{len(alphabet) + 1} (256 bytes + {SPECIAL_TOKEN})"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        model_max_length=512,
    )


def storylm_config(
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 512,
    window_size: int = 256,
    bos_token_id: int = 0,
    eos_token_id: int = 0,
) -> GPTNeoConfig:
    """The GPT-Neo config of storylm: blocks alternate global and local attention (TinyStories)."""
    from transformers import GPTNeoConfig

    if num_layers % 2:
        raise CrossintError(f"num_layers must be even (global/local pairs), got {num_layers}")
    if hidden_size % num_heads:
        raise CrossintError(
            f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}"
        )
    return GPTNeoConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        hidden_size=hidden_size,
        num_layers=num_layers,
        attention_types=[[["global", "local"], num_layers // 2]],
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        window_size=window_size,
        activation_function="gelu_new",
        resid_dropout=0.0,
        embed_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        tie_word_embeddings=True,
    )


# --- data --------------------------------------------------------------------------------------


def tokenize_stream(
    texts: Iterator[str], tokenizer, n_tokens: int, eos_id: int, batch_docs: int = 512
) -> torch.Tensor:
    """The first ``n_tokens`` of the token stream doc1 EOS doc2 EOS ... as an int64 tensor."""
    import numpy as np
    import torch

    chunks: list[np.ndarray] = []
    total = 0
    while total < n_tokens:
        docs = list(itertools.islice(texts, batch_docs))
        if not docs:
            raise CrossintError(f"the corpus ended after {total} tokens; {n_tokens} were needed")
        # The backend tokenizer: no special tokens, no max-length warnings on long documents.
        for enc in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
            arr = np.asarray([*enc.ids, eos_id], dtype=np.int32)
            chunks.append(arr)
            total += len(arr)
    return torch.from_numpy(np.concatenate(chunks)[:n_tokens].astype(np.int64))


def pack_contexts(tokens_T: torch.Tensor, context_length: int, bos_id: int) -> torch.Tensor:
    """Cut a token stream into rows of ``context_length``, each row starting with BOS.

    Every row holds BOS + the next ``context_length - 1`` stream tokens, so the model always sees
    the same start symbol at position 0 (as at generation time); the ragged tail is dropped.
    """
    import torch

    body = context_length - 1
    n = tokens_T.numel() // body
    if n == 0:
        raise CrossintError(
            f"{tokens_T.numel()} tokens are too few for one context of length {context_length}"
        )
    rows_CS = tokens_T[: n * body].view(n, body)
    bos_C1 = torch.full((n, 1), bos_id, dtype=tokens_T.dtype)
    return torch.cat([bos_C1, rows_CS], dim=1)


def token_losses(model: PreTrainedModel, input_ids_BS: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (nats) at every position: shape (B, S-1)."""
    import torch.nn.functional as F

    logits_BSV = model(input_ids=input_ids_BS).logits
    return F.cross_entropy(
        logits_BSV[:, :-1].transpose(1, 2).float(), input_ids_BS[:, 1:], reduction="none"
    )


def mean_token_loss(model: PreTrainedModel, contexts_CS: torch.Tensor, batch_size: int = 16
                    ) -> float:
    """Mean next-token loss in nats over all predicted positions of ``contexts_CS``."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, contexts_CS.shape[0], batch_size):
            loss_BS = token_losses(model, contexts_CS[i : i + batch_size])
            total += float(loss_BS.double().sum())
            count += loss_BS.numel()
    model.train(was_training)
    return total / count


def unigram_entropy(targets: torch.Tensor) -> float:
    """Entropy (nats) of the empirical token distribution of ``targets``.

    This is the loss of the best possible context-free predictor *fitted on the very same
    tokens*, so it is a generous baseline: a model that has learned anything beyond token
    frequencies beats it.
    """
    import torch

    counts = torch.bincount(targets.flatten()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


# --- training ----------------------------------------------------------------------------------


def _lr_at(step: int, steps: int, warmup: int, lr: float, min_ratio: float = 0.1) -> float:
    """Linear warmup, then cosine decay to ``min_ratio * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_storylm(
    out_dir: str | Path,
    steps: int = 2000,
    batch_size: int = 16,
    context_length: int = 256,
    lr: float = 3e-3,
    seed: int = 0,
    n_train_tokens: int | None = None,
    vocab_size: int = 2048,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 512,
    warmup_steps: int | None = None,
    weight_decay: float = 0.1,
    tokenizer_stories: int = 5000,
    eval_contexts: int = 64,
    eval_every: int = 100,
    num_threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the tokenizer and a GPT-Neo from scratch on generated stories; save to ``out_dir``.

    The training corpus is ``iter_stories(TRAIN_DATA_SEED)``; documents are joined by EOS and
    packed into ``context_length`` rows that each start with BOS. ``n_train_tokens`` defaults to
    exactly one pass (``steps * batch_size * (context_length - 1)`` stream tokens); a smaller
    value repeats the data in epochs. Held-out loss is measured on ``iter_stories
    (HELDOUT_DATA_SEED)`` together with the unigram entropy of the same held-out tokens. Writes
    ``config.json``, ``model.safetensors``, tokenizer files and ``training.json`` (all numbers,
    settings and timings) into a temporary directory that replaces ``out_dir`` when complete.
    ``num_threads`` sets torch's CPU threads for the run (one thread is much faster than two on
    a machine whose cores are busy with other work). Returns the contents of ``training.json``.
    """
    import torch

    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        if num_threads < 1:
            raise CrossintError(f"num_threads must be a positive integer, got {num_threads}")
        torch.set_num_threads(num_threads)
    try:
        settings = _TrainSettings(
            steps, batch_size, context_length, lr, seed, n_train_tokens, vocab_size, hidden_size,
            num_layers, num_heads, intermediate_size, warmup_steps, weight_decay,
            tokenizer_stories, eval_contexts, eval_every,
        )
        return _train_storylm(Path(out_dir), settings, progress)
    finally:
        torch.set_num_threads(previous_threads)


@dataclasses.dataclass(frozen=True)
class _TrainSettings:
    """The settings of one :func:`train_storylm` run, checked when made."""

    steps: int
    batch_size: int
    context_length: int
    lr: float
    seed: int
    n_train_tokens: int | None
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    warmup_steps: int | None
    weight_decay: float
    tokenizer_stories: int
    eval_contexts: int
    eval_every: int

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_contexts", "eval_every"):
            value = getattr(self, name)
            if value < 1:
                raise CrossintError(f"{name} must be a positive integer, got {value}")
        if not 8 <= self.context_length <= 512:
            raise CrossintError(
                f"context_length must be between 8 and 512, got {self.context_length}"
            )
        if self.lr <= 0:
            raise CrossintError(f"lr must be positive, got {self.lr}")

    @property
    def warmup(self) -> int:
        """Warmup steps: ``warmup_steps``, by default a twentieth of the steps (at least 1)."""
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)

    @property
    def tokens_seen(self) -> int:
        """Stream tokens the optimizer sees: steps x batch_size x (context_length - 1)."""
        return self.steps * self.batch_size * (self.context_length - 1)

    @property
    def stream_tokens(self) -> int:
        """Size of the training stream: one pass by default; a smaller ``n_train_tokens`` means
        several epochs."""
        return self.tokens_seen if self.n_train_tokens is None else int(self.n_train_tokens)

    def record(self) -> dict[str, Any]:
        """The settings as ``training.json`` records them (warmup resolved, data seeds added)."""
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k != "eval_every"}
        settings["warmup_steps"] = self.warmup
        return {**settings, "train_data_seed": TRAIN_DATA_SEED,
                "heldout_data_seed": HELDOUT_DATA_SEED}


def _story_contexts(seed: int, tokenizer, n_tokens: int, context_length: int) -> torch.Tensor:
    """The first ``n_tokens`` of the story stream ``iter_stories(seed)``, documents joined by
    EOS, packed into BOS-led rows of ``context_length`` (BOS = EOS = ``<|endoftext|>``)."""
    special_id = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)
    return pack_contexts(tokenize_stream(iter_stories(seed), tokenizer, n_tokens, special_id),
                         context_length, special_id)


def _storylm_data(
    s: _TrainSettings,
) -> tuple[PreTrainedTokenizerFast, torch.Tensor, torch.Tensor]:
    """(tokenizer, training contexts, held-out contexts). The tokenizer is trained on the start
    of the training stream only; the held-out contexts come from a different stream."""
    tokenizer = train_tokenizer(
        itertools.islice(iter_stories(TRAIN_DATA_SEED), s.tokenizer_stories), s.vocab_size
    )
    if s.stream_tokens < s.context_length:
        raise CrossintError(
            f"n_train_tokens must be at least context_length, got {s.stream_tokens}"
        )
    train_CS = _story_contexts(TRAIN_DATA_SEED, tokenizer, s.stream_tokens, s.context_length)
    heldout_CS = _story_contexts(HELDOUT_DATA_SEED, tokenizer,
                                 s.eval_contexts * (s.context_length - 1), s.context_length)
    return tokenizer, train_CS, heldout_CS


def _new_storylm(tokenizer: PreTrainedTokenizerFast, s: _TrainSettings) -> PreTrainedModel:
    """A freshly initialised GPT-Neo (seeded with ``s.seed``) in training mode."""
    import torch
    from transformers import GPTNeoForCausalLM

    special_id = tokenizer.convert_tokens_to_ids(SPECIAL_TOKEN)
    torch.manual_seed(s.seed)
    config = storylm_config(
        vocab_size=len(tokenizer), hidden_size=s.hidden_size, num_layers=s.num_layers,
        num_heads=s.num_heads, intermediate_size=s.intermediate_size,
        max_position_embeddings=max(512, s.context_length), window_size=256,
        bos_token_id=special_id, eos_token_id=special_id,
    )
    model = GPTNeoForCausalLM(config)
    model.train()
    return model


def _adamw(model: PreTrainedModel, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW that decays only matrices (not biases, LayerNorm gains or position-free vectors)."""
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )


def _context_batches(contexts_CS: torch.Tensor, batch_size: int, seed: int
                     ) -> Iterator[torch.Tensor]:
    """Endless batches of ``batch_size`` contexts: epochs over the contexts, each in a seeded
    random order (a ragged last batch of an epoch is dropped)."""
    import torch

    order_gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(contexts_CS.shape[0], generator=order_gen)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            yield contexts_CS[perm[i : i + batch_size]]
        if len(perm) < batch_size:
            raise CrossintError(
                f"only {len(perm)} training contexts for batch_size {batch_size}; "
                f"raise n_train_tokens or lower batch_size"
            )


def _optimizer_step(model: PreTrainedModel, optimizer: torch.optim.Optimizer,
                    batch_BS: torch.Tensor, lr: float) -> float:
    """One step at learning rate ``lr`` on the batch's mean next-token loss, gradients clipped
    to norm 1; returns the loss."""
    import torch

    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = token_losses(model, batch_BS).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def _fit(model: PreTrainedModel, train_CS: torch.Tensor, heldout_CS: torch.Tensor,
         s: _TrainSettings, history: list[dict[str, float]], baseline: float, t_start: float,
         progress: bool) -> float:
    """Train with AdamW for ``s.steps`` steps (warmup then cosine LR); every ``s.eval_every``
    steps and after the last, append the held-out loss to ``history``. Returns the running (EMA)
    training loss."""
    from tqdm.auto import tqdm

    optimizer = _adamw(model, s.lr, s.weight_decay)
    running = None
    bar = tqdm(total=s.steps, desc="storylm train", disable=not progress)
    batch_iter = _context_batches(train_CS, s.batch_size, s.seed)
    for step in range(s.steps):
        lr = _lr_at(step, s.steps, s.warmup, s.lr)
        loss_value = _optimizer_step(model, optimizer, next(batch_iter), lr)
        running = loss_value if running is None else 0.98 * running + 0.02 * loss_value
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            held = mean_token_loss(model, heldout_CS)
            history.append({"step": step + 1, "train_loss": round(running, 5),
                            "heldout_loss": round(held, 5),
                            "elapsed_s": round(time.time() - t_start, 1)})
            if progress:
                bar.write(f"step {step + 1}/{s.steps}  train {running:.4f}  held-out {held:.4f}"
                          f"  unigram {baseline:.4f}  ({time.time() - t_start:.0f}s)")
    bar.close()
    return running


def _train_storylm(out_dir: Path, s: _TrainSettings, progress: bool) -> dict[str, Any]:
    import torch

    from crossint.io import atomic_write_dir, atomic_write_json

    t_start = time.time()
    tokenizer, train_CS, heldout_CS = _storylm_data(s)
    baseline = unigram_entropy(heldout_CS[:, 1:])
    t_data = time.time() - t_start

    model = _new_storylm(tokenizer, s)
    initial_loss = mean_token_loss(model, heldout_CS)
    history: list[dict[str, float]] = [{"step": 0, "heldout_loss": initial_loss}]
    t_train = time.time()
    running = _fit(model, train_CS, heldout_CS, s, history, baseline, t_start, progress)
    train_seconds = time.time() - t_train
    model.eval()

    result = {
        "heldout_loss_nats": history[-1]["heldout_loss"],
        "unigram_entropy_nats": round(baseline, 5),
        "initial_heldout_loss_nats": round(initial_loss, 5),
        "final_train_loss_nats": round(running, 5),
        "heldout_tokens": int(heldout_CS[:, 1:].numel()),
        "train_tokens_seen": s.tokens_seen,
        "train_stream_tokens": s.stream_tokens,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "settings": s.record(),
        "data_seconds": round(t_data, 1),
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / s.steps, 4),
        "total_seconds": round(time.time() - t_start, 1),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
        "history": history,
    }

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "training.json", result)

    atomic_write_dir(out_dir, write)
    return result


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# --- loading and generation ----------------------------------------------------------------------


def default_model_path() -> Path:
    """The packaged storylm directory (``crossint/assets/storylm``)."""
    from importlib.resources import files

    path = Path(str(files("crossint") / "assets" / "storylm"))
    missing = _missing_files(path)
    if missing:
        raise CrossintError(
            f"the packaged storylm model is missing ({', '.join(missing)} not found in {path}); "
            f"regenerate it with: {REGENERATE_COMMAND}"
        )
    return path


def _missing_files(path: Path) -> list[str]:
    return [f for f in _REQUIRED_FILES if not (path / f).is_file()]


def resolve_model_dir(model_dir: str | Path | None) -> Path:
    """``None`` or "default"/"storylm" -> the packaged model; otherwise a checked directory."""
    if model_dir is None or str(model_dir) in ("default", "storylm"):
        return default_model_path()
    path = Path(model_dir)
    missing = _missing_files(path)
    if missing:
        raise CrossintError(
            f"{path} is not a storylm model directory (missing {', '.join(missing)}); pass a "
            f"directory written by 'crossint storylm train' or 'default'"
        )
    return path


def load_storylm(model_dir: str | Path | None = None):
    """(model in eval mode, tokenizer) loaded through the ordinary Auto* classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(model_dir)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def generate(
    model_dir: str | Path | None,
    prompt: str,
    max_new_tokens: int = 200,
    seed: int = 0,
    temperature: float = 0.7,
    top_k: int | None = 40,
) -> str:
    """Continue ``prompt`` (BOS is prepended, as in training); returns only the new text.

    Sampling is seeded; ``temperature=0`` decodes greedily. Generation stops at EOS or after
    ``max_new_tokens``.
    """
    import torch

    if max_new_tokens < 1:
        raise CrossintError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise CrossintError(f"temperature must be >= 0, got {temperature}")
    model, tokenizer = load_storylm(model_dir)
    ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    limit = model.config.max_position_embeddings
    if len(ids) + max_new_tokens > limit:
        raise CrossintError(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's {limit} positions; shorten the prompt or lower max_new_tokens"
        )
    input_ids_1S = torch.tensor([ids])
    torch.manual_seed(seed)
    sample = temperature > 0
    kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_new_tokens,
                              "pad_token_id": tokenizer.eos_token_id,
                              "eos_token_id": tokenizer.eos_token_id}
    if sample:
        kwargs.update(temperature=temperature, top_k=top_k)
    with torch.no_grad():
        out_1S = model.generate(input_ids_1S, attention_mask=torch.ones_like(input_ids_1S),
                                **kwargs)
    return tokenizer.decode(out_1S[0, len(ids):], skip_special_tokens=True)
