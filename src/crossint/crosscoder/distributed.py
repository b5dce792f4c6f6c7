"""Data-parallel training over several processes (``torchrun ... -m crossint train``).

torchrun starts P processes (ranks) and tells each its place through the environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); :func:`ranks_from_
environment` reads it and :func:`data_parallel` joins the process group (gloo on the CPU, nccl on
CUDA). Every rank holds the whole crosscoder and its Adam state (no sharding).

``--batch-size`` stays the global batch B, and :class:`RankReader` decides what each rank reads
of it. An activation cache whose shards deal into P even parts is dealt into P fixed parts
(``ActivationCache.shard_parts``): rank r reads only part r's shards, as a stream of B/P rows
per step, and the global batch is the parts' rows in rank order, which one process reads with
``data_parts=P``. Any other source (or ``data_parts=1``) is read whole by every rank, which keeps
its own consecutive B/P rows of each global batch (:meth:`Ranks.own_rows`). Either way the ranks
together train on exactly the rows one process would. What makes P ranks equal one process, up
to float rounding:

- gradients are summed over the ranks and divided by P; every loss term is a mean over the
  rank's tokens, or scaled so that the ranks' mean is the global batch's value;
- BatchTopK keeps the K·B largest pre-activations of the global batch (the candidates are
  all-gathered, ``activations.batchtopk_across_ranks``), so θ moves alike on every rank;
- AuxK's dead-feature counters advance by B and reset where a feature fired on any rank, and its
  variance normalisation uses the global batch mean;
- metrics.jsonl holds the mean of the ranks' values;
- the initialisation sample is drawn part by part and all-gathered, so every rank starts from
  the one process's sample.

Only rank 0 takes the run directory's lock and writes config.json, metrics.jsonl, checkpoints
and the saved crosscoder. A collective that fails because another rank stopped raises
:class:`RankLost`.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from crossint.errors import CrossintError
from crossint.lock import locked


def divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """A normalised penalty's ratio of two sums over the batch (a zero denominator counts as
    the smallest positive float); :meth:`Ranks.ratio` is the same over the global batch."""
    return numerator / denominator.clamp_min(torch.finfo(denominator.dtype).tiny)


class RankLost(CrossintError):
    """A collective failed: another rank of the run stopped (or cannot be reached)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a data-parallel run (one rank: every method is
    the identity and no collective runs). Collectives use the default process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run directory."""
        return self.rank == 0

    def device_name(self, name: str) -> str:
        """Under torchrun each rank trains on its own GPU: ``cuda`` means ``cuda:LOCAL_RANK``."""
        return f"cuda:{self.local_rank}" if self.world_size > 1 and name == "cuda" else name

    def own_rows(self, batches: Iterator[Tensor]) -> Iterator[Tensor]:
        """This rank's consecutive slice of every global batch."""
        if self.world_size == 1:
            return batches
        return (batch_BXD[self.rank * len(batch_BXD) // self.world_size:
                          (self.rank + 1) * len(batch_BXD) // self.world_size]
                for batch_BXD in batches)

    # --- collectives (all detached) --------------------------------------------------------------
    def _collective(self, operation: Any, *args: Any, **kwargs: Any) -> None:
        try:
            operation(*args, **kwargs)
        except RuntimeError as e:  # gloo: a peer closed its connection; nccl: timeout or abort
            raise RankLost(
                f"rank {self.rank} of {self.world_size} lost contact with the other training "
                f"processes ({_first_sentence(e)}): another rank stopped, see its own error"
            ) from None

    def barrier(self) -> None:
        if self.world_size > 1:
            self._collective(dist.barrier)

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the ranks."""
        if self.world_size == 1:
            return tensor
        total = tensor.detach().clone()
        self._collective(dist.all_reduce, total)
        return total

    def any(self, mask_H: Tensor) -> Tensor:
        """Where ``mask_H`` is True on any rank."""
        if self.world_size == 1:
            return mask_H
        count_H = mask_H.to(torch.int32)
        self._collective(dist.all_reduce, count_H, op=dist.ReduceOp.MAX)
        return count_H.bool()

    def gather(self, values_E: Tensor) -> Tensor:
        """Every rank's ``values_E`` (the same shape on every rank), concatenated along the
        first dimension, on the device ``values_E`` is on."""
        if self.world_size == 1:
            return values_E
        own = values_E.detach().to(self._device()).contiguous()
        parts = [torch.empty_like(own) for _ in range(self.world_size)]
        self._collective(dist.all_gather, parts, own)
        return torch.cat(parts).to(values_E.device)

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace every gradient by its mean over the ranks (DDP's all-reduce)."""
        if self.world_size == 1:
            return
        for parameter in parameters:
            if parameter.grad is None:  # the collective needs the same tensors on every rank
                parameter.grad = torch.zeros_like(parameter)
            self._collective(dist.all_reduce, parameter.grad)
            parameter.grad.div_(self.world_size)

    def ratio(self, numerator: Tensor, denominator: Tensor) -> Tensor:
        """numerator / denominator of the global batch, each a sum over this rank's tokens, as
        this rank's term of a loss whose mean over the ranks has the global ratio's value and
        gradient: P·(n/D − N·d/D²) + N/D, with N and D the sums over the ranks (detached). A
        zero denominator counts as the smallest positive float."""
        if self.world_size == 1:
            return divide(numerator, denominator)
        both = self.sum(torch.stack([numerator.detach(), denominator.detach().to(numerator)]))
        N, D = both[0], both[1].clamp_min(torch.finfo(both.dtype).tiny)
        return self.world_size * (numerator / D - (N / D**2) * denominator) + N / D

    def total_variance(self, acts_BXD: Tensor) -> Tensor:
        """Σ over the global batch of ‖a_bx − ā_x‖², ā the global batch mean (detached)."""
        acts_BXD = acts_BXD.detach()
        mean_XD = self.sum(acts_BXD.sum(dim=0)) / (acts_BXD.shape[0] * self.world_size)
        return self.sum((acts_BXD - mean_XD).pow(2).sum())

    def mean_values(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` with each float replaced by its mean over the ranks (ints are step counts,
        equal on every rank)."""
        if self.world_size == 1:
            return row
        names = [name for name, value in row.items() if isinstance(value, float)]
        values_N = torch.tensor([row[name] for name in names], dtype=torch.float64,
                                device=self._device())
        means = (self.sum(values_N) / self.world_size).tolist()
        return {**row, **dict(zip(names, means, strict=True))}

    def _device(self) -> torch.device:
        """Where this rank's collective buffers live (nccl needs them on the rank's GPU)."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


SINGLE_PROCESS = Ranks()


UNEVEN_PARTS = 1.1  # parts whose token counts differ more than this are uneven


def resolve_data_parts(requested: int | None, source: Any, ranks: Ranks, seed: int) -> int:
    """The parts a run deals its source's shards into (``TrainConfig.data_parts``). By default
    one per process when the source is made of enough shards to deal into even parts; else 1,
    with a warning (rank 0's) that says why when there are several processes."""
    n_shards, world_size = getattr(source, "n_shards", None), ranks.world_size
    if requested is None:
        if world_size == 1 or n_shards is None:
            return 1
        tokens = source.part_tokens(world_size, seed) if n_shards >= world_size else None
        if tokens is not None and max(tokens) <= UNEVEN_PARTS * min(tokens):
            return world_size
        why = (f"its {n_shards} shard(s) are fewer than the {world_size} processes"
               if tokens is None else f"its shards deal into uneven parts of {min(tokens)} to "
               f"{max(tokens)} tokens")
        if ranks.is_main:
            warnings.warn(f"every process reads the whole cache: {why} (harvest equal shards, "
                          f"as many as a multiple of {world_size}, or pass --data-parts "
                          f"{world_size} to deal them anyway)", stacklevel=2)
        return 1
    if requested == 1:
        return 1
    if n_shards is None:
        raise CrossintError(
            f"--data-parts {requested}: only an activation cache is made of shards to deal into "
            f"parts, not {type(source).__name__}; use --data-parts 1"
        )
    if world_size > 1 and requested != world_size:
        raise CrossintError(
            f"--data-parts {requested} with {world_size} processes: use {world_size} (each "
            "process reads its own part of the cache) or 1 (every process reads all of it)"
        )
    if n_shards < requested:
        raise CrossintError(
            f"--data-parts {requested}: the cache has only {n_shards} shard(s); harvest it with "
            f"a smaller --shard-tokens or use fewer parts"
        )
    return requested


@dataclass(frozen=True)
class RankReader:
    """What this rank reads of a training source: its B/P rows of every global batch and the
    initialisation sample, which is the same on every rank (see the module docstring)."""

    source: Any  # crossint.crosscoder.source.ActivationSource
    parts: int = 1
    ranks: Ranks = SINGLE_PROCESS

    @property
    def n_tokens(self) -> int:
        return self.source.n_tokens

    @property
    def _part(self) -> int | None:
        """The part this rank reads (None: one process reads all parts)."""
        return self.ranks.rank if self.ranks.world_size > 1 else None

    def batches(self, batch_size: int, seed: int, start_batch: int = 0) -> Iterator[Tensor]:
        """This rank's rows of global batches ``start_batch``, ``start_batch + 1``, ..."""
        if self.parts == 1:
            return self.ranks.own_rows(iter(self.source.batches(batch_size, seed, start_batch)))
        return iter(self.source.batches(batch_size, seed, start_batch, parts=self.parts,
                                        part=self._part))

    def sample(self, n_tokens: int, seed: int) -> Tensor:
        if self.parts == 1:
            return self.source.sample(n_tokens, seed)
        own = self.source.sample(n_tokens, seed, parts=self.parts, part=self._part)
        return own if self._part is None else self.ranks.gather(own)

    def check(self, batch_size: int, seed: int) -> None:
        """Refuse a batch the parts cannot share and shards this rank needs that are absent
        (before anything is written), and warn when the parts asked for are uneven: the tokens
        of a smaller part come round more often."""
        if getattr(self.source, "n_shards", None) is None:  # not made of shards: read whole
            return
        self.source.check_parts(batch_size, self.parts, seed,
                                self._part if self.parts > 1 else None)
        tokens = self.source.part_tokens(self.parts, seed)
        if max(tokens) > UNEVEN_PARTS * min(tokens) and self.ranks.is_main:
            warnings.warn(
                f"the cache's {self.parts} parts hold {min(tokens)} to {max(tokens)} tokens: the "
                f"smallest part's tokens are trained on {max(tokens) / min(tokens):.2f} times as "
                "often as the largest's (equal shards, as many as a multiple of the parts, even "
                "them out)", stacklevel=2)


def _first_sentence(error: Exception) -> str:
    """The backend's reason without its source location (``[.../pair.cc:537] Read error ...``)."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip())
    return text.split(". ")[0].splitlines()[0][:200] if text else type(error).__name__


def _environment_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise CrossintError(f"environment variable {name}={value!r} is not an integer (it is "
                            "set by torchrun)") from None


def ranks_from_environment() -> Ranks:
    """This process's ranks as torchrun describes them (a single process without torchrun)."""
    world_size = _environment_int("WORLD_SIZE", 1)
    rank = _environment_int("RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise CrossintError(f"torchrun environment: RANK={rank} must lie in [0, WORLD_SIZE="
                            f"{world_size})")
    return Ranks(rank, world_size, _environment_int("LOCAL_RANK", 0))


@contextlib.contextmanager
def data_parallel(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """Hold the process group of a torchrun launch (gloo on the CPU, nccl on CUDA) for the
    duration. A group the caller initialised already is used as it is and left alone."""
    if ranks.world_size == 1:
        yield
        return
    if dist.is_initialized():
        if dist.get_world_size() != ranks.world_size:
            raise CrossintError(f"the process group has {dist.get_world_size()} ranks, but "
                                f"WORLD_SIZE is {ranks.world_size}")
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "gloo" if device.type == "cpu" else "nccl"
    try:
        dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size)
    except (RuntimeError, ValueError) as e:
        raise CrossintError(f"rank {ranks.rank} could not join the {ranks.world_size} training "
                            f"processes ({backend}: {e}); launch with torchrun") from None
    try:
        yield
    finally:
        dist.destroy_process_group()


def writer_lock(directory: str | Path, command: str,
                ranks: Ranks) -> contextlib.AbstractContextManager:
    """The output directory's lock (``crossint.lock``), taken by rank 0 only: it alone writes
    there, and the other ranks of the same run must not be refused as a second writer."""
    return locked(directory, command) if ranks.is_main else contextlib.nullcontext()
