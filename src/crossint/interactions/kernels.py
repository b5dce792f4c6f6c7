"""The dominant feature of every (token, neuron) from |p| = |f|·|V[row]| (SPEC §4.2), and the
gradients routed through it: the hot loops of the training penalty (SPEC §4.4).

On the CPU with numba installed (the ``fast`` extra), one fused pass per token reads each
active feature's |V| row once and keeps the running maximum, its slot and the sum: no B×K×N
tensor is ever built. Elsewhere (GPU, no numba) the same numbers come from chunked B×K×N
tensors and :func:`crossint.interactions.contributions.dominant_slot`. The two agree exactly on
Mx and S; the slot may differ only where two contributions agree to 2⁻¹⁷ relative (float32),
which ``dominant_slot`` treats as a tie, and either slot is a valid subgradient.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from crossint.interactions.contributions import dominant_slot

DISABLE_ENV = "CROSSINT_NO_NUMBA"  # set to 1 to force the torch path (benchmarks, debugging)


def _numba_kernels():  # noqa: ANN202 (numba and its dispatchers, or None)
    """The compiled kernels, or None without numba (compiled on first use, cached on disk)."""
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(parallel=True, cache=True, fastmath=True)
    def dominant_rows(abs_f_BK, abs_V_UN, row_BK, counts_B, slot_BN, Mx_BN, S_BN, with_sum):  # noqa: N803
        n_neurons = abs_V_UN.shape[1]
        for b in numba.prange(abs_f_BK.shape[0]):
            best, slot, total = Mx_BN[b], slot_BN[b], S_BN[b]
            best[:] = 0.0
            slot[:] = 0
            if with_sum:
                total[:] = 0.0
            for k in range(counts_B[b]):
                f = abs_f_BK[b, k]
                V_N = abs_V_UN[row_BK[b, k]]
                if with_sum:  # a separate loop keeps the maximum's loop vectorised
                    for n in range(n_neurons):
                        total[n] += f * V_N[n]
                k32 = numba.int32(k)  # int32 slots: the select vectorises with float32
                for n in range(n_neurons):
                    p = f * V_N[n]
                    larger = p > best[n]  # strict: ties keep the first slot, like autograd
                    best[n] = p if larger else best[n]
                    slot[n] = k32 if larger else slot[n]

    @numba.njit(parallel=True, cache=True, fastmath=True)
    def dominant_scatters(abs_f_BK, row_BK, slot_BN, Mx_BN, W_BN, dominant_BK, unsigned_UN):  # noqa: N803
        n_tokens, n_neurons = slot_BN.shape
        for b in numba.prange(n_tokens):  # per token: no two threads share a row
            for n in range(n_neurons):
                dominant_BK[b, slot_BN[b, n]] += Mx_BN[b, n] * W_BN[b, n]
        # per tile of neurons: no two threads share a column
        for tile in numba.prange((n_neurons + NEURON_TILE - 1) // NEURON_TILE):
            start = tile * NEURON_TILE
            stop = min(start + NEURON_TILE, n_neurons)
            for b in range(n_tokens):
                for n in range(start, stop):
                    k = slot_BN[b, n]
                    unsigned_UN[row_BK[b, k], n] -= abs_f_BK[b, k] * W_BN[b, n]

    return numba, dominant_rows, dominant_scatters


NEURON_TILE = 64  # neurons per thread task in the backward's scatter into V's gradient


_KERNELS: list = []  # filled on first use: [] -> [(numba, rows, scatters) or None]


def fused_available(tensor: Tensor) -> bool:
    """Whether the fused kernels handle ``tensor``'s device and dtype here."""
    if tensor.device.type != "cpu" or tensor.dtype not in (torch.float32, torch.float64):
        return False
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return False
    if not _KERNELS:
        _KERNELS.append(_numba_kernels())
    return _KERNELS[0] is not None


def _fall_back(error: Exception) -> None:
    """A numba that cannot compile here: the torch path gives the same numbers, slower."""
    warnings.warn(f"crossint: the fused numba kernel failed ({error}); using torch",
                  RuntimeWarning, stacklevel=3)
    _KERNELS[0] = None


def _set_threads(numba) -> None:  # noqa: ANN001
    """As many numba threads as torch uses (the test suite and benchmarks set torch's)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def chunks(counts_B: Tensor, chunk_tokens: int) -> Iterator[tuple[int, int, int]]:
    """(start, stop, width) of each chunk of tokens; tokens come sorted by descending active
    count, so a chunk's first count is its width (at least 1)."""
    n_tokens = counts_B.shape[0]
    widths = counts_B[::chunk_tokens].clamp_min(1).tolist()
    for start, width in zip(range(0, n_tokens, chunk_tokens), widths, strict=True):
        yield start, min(start + chunk_tokens, n_tokens), width


def chunk_magnitudes(abs_f_BK: Tensor, abs_V_UN: Tensor, row_BK: Tensor, start: int, stop: int,
                     width: int) -> Tensor:
    """|p| = |f|·|V[row]| for tokens start:stop and their first ``width`` slots (B×K×N)."""
    abs_BKN = abs_V_UN.index_select(0, row_BK[start:stop, :width].reshape(-1))
    abs_BKN = abs_BKN.view(stop - start, width, abs_V_UN.shape[1])
    return abs_BKN.mul_(abs_f_BK[start:stop, :width, None])


def dominant_magnitudes(abs_f_BK: Tensor, abs_V_UN: Tensor, row_BK: Tensor, counts_B: Tensor,
                        chunk_tokens: int, with_sum: bool = False,
                        ) -> tuple[Tensor, Tensor, Tensor | None]:
    """slot_BN, Mx_BN = max_k |p| and, with ``with_sum``, S_BN = Σ_k |p|, where slot k of
    token b holds feature row ``row_BK[b, k]`` for k < counts_B[b] (zero-padded beyond).

    The slots are int32 from the fused kernel (which :func:`dominant_gradients` reads as they
    are) and int64 from the torch path (ready for ``gather``)."""
    n_tokens, n_neurons = abs_f_BK.shape[0], abs_V_UN.shape[1]
    if fused_available(abs_V_UN) and abs_f_BK.dtype == abs_V_UN.dtype:
        numba, dominant_rows, _ = _KERNELS[0]
        _set_threads(numba)
        slot_BN = torch.empty(n_tokens, n_neurons, dtype=torch.int32)
        Mx_BN = abs_V_UN.new_empty(n_tokens, n_neurons)
        S_BN = abs_V_UN.new_empty(n_tokens, n_neurons)  # untouched (no pages) without the sum
        try:
            dominant_rows(abs_f_BK.contiguous().numpy(), abs_V_UN.contiguous().numpy(),
                          row_BK.contiguous().numpy(), counts_B.contiguous().numpy(),
                          slot_BN.numpy(), Mx_BN.numpy(), S_BN.numpy(), with_sum)
            return slot_BN, Mx_BN, (S_BN if with_sum else None)
        except Exception as error:
            _fall_back(error)
    slot_BN = torch.empty(n_tokens, n_neurons, dtype=torch.int64, device=abs_f_BK.device)
    S_BN = abs_V_UN.new_empty(n_tokens, n_neurons) if with_sum else None
    for start, stop, width in chunks(counts_B, chunk_tokens):
        abs_BKN = chunk_magnitudes(abs_f_BK, abs_V_UN, row_BK, start, stop, width)
        if S_BN is not None:
            S_BN[start:stop] = abs_BKN.sum(dim=1)
        slot_BN[start:stop] = dominant_slot(abs_BKN, in_place=True)
    Mx_BN = abs_f_BK.gather(1, slot_BN) * abs_V_UN.gather(0, row_BK.gather(1, slot_BN))
    return slot_BN, Mx_BN, S_BN


def dominant_gradients(f_BK: Tensor, V_UN: Tensor, row_BK: Tensor, slot_BN: Tensor,
                       Mx_BN: Tensor, W_BN: Tensor, spread_BK: Tensor, unsigned_UN: Tensor,
                       ) -> tuple[Tensor, Tensor]:
    """The penalty's gradients, given the gradient ``W_BN`` on every (token, neuron)'s maximum
    beyond the one on every |p| (already reduced into ``spread_BK`` = Σ_n |V_kn|·(that) and
    ``unsigned_UN`` = Σ_{(b,k): row=u} |f_bk|·(that)):

        ∂L/∂f_bk = sign(f_bk)·spread_bk − (1/f_bk)·Σ_{n: dom(b,n)=k} Mx_bn·W_bn
        ∂L/∂V_un = sign(V_un)·(unsigned_un − Σ_{b: dom row(b,n)=u} |f_dom(b,n)|·W_bn)

    (|V_dom,n| = Mx_bn/|f_dom| turns the maximum's term into B×N scatters: one fused pass for
    the int32 slots of the fused kernel, torch scatters otherwise.) Overwrites ``unsigned_UN``."""
    dominant_BK = torch.zeros_like(f_BK)
    fused = slot_BN.dtype == torch.int32 and fused_available(V_UN)
    if fused:
        numba, _, dominant_scatters = _KERNELS[0]
        _set_threads(numba)
        try:
            dominant_scatters(f_BK.abs().numpy(), row_BK.contiguous().numpy(),
                              slot_BN.contiguous().numpy(), Mx_BN.contiguous().numpy(),
                              W_BN.to(V_UN.dtype).numpy(), dominant_BK.numpy(),
                              unsigned_UN.numpy())
        except Exception as error:
            _fall_back(error)
            fused = False
    if not fused:
        slot_BN = slot_BN.long()
        dominant_BK.scatter_add_(1, slot_BN, Mx_BN * W_BN)
        dom_row_BN = row_BK.gather(1, slot_BN)
        correction_BN = f_BK.abs().gather(1, slot_BN) * W_BN
        # one scatter along the row axis: several times faster on the CPU than a flat index_add
        unsigned_UN.scatter_add_(0, dom_row_BN, -correction_BN)
    safe_f_BK = torch.where(f_BK != 0, f_BK, torch.ones_like(f_BK))
    grad_f_BK = torch.sign(f_BK) * spread_BK - dominant_BK / safe_f_BK
    return grad_f_BK, torch.sign(V_UN) * unsigned_UN
