"""The hot loops of the ``additivity`` penalty (SPEC §4.7): per token and neuron, the gap
between the MLP of the whole reconstruction and the sum of every active feature's effect alone,

    g = h(c + Σ_k p_k) − h(c) − Σ_k [h(c + p_k) − h(c)]      h(z) = φ(z), or φ(z_g)·z_u (gated)

and, given G = ∂L/∂g, the gradients on every slot's f and on the decoder rows' V = d·W_in
(and V_u = d·W_up):

    ∂L/∂p_k = G·(h'(z) − h'(c + p_k))  (per projection),  ∂L/∂f_k = Σ_n ∂L/∂p_kn·V_kn,
    ∂L/∂V_un = Σ_{(b,k): row = u} f_bk·∂L/∂p_bkn.

On the CPU in float32 with numba (the ``fast`` extra) and an activation it knows by name, one
fused pass per token evaluates each h(c + p_k) once forward and each h'(c + p_k) once backward,
with no B×K×N tensor; every thread scatters into its own copy of V's gradient, summed at the
end (:mod:`crossint.interactions.numba_additivity`). Elsewhere (GPU, float64, no numba, another
activation) the same numbers come from chunked torch tensors, with φ' by autograd through the
model's own φ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from crossint.interactions.kernels import _fall_back, _set_threads, chunks, fused_available

# Activation names (as model configs spell them) the fused kernels evaluate themselves; each is
# checked against the model's own φ before it is used.
ACTIVATION_CODES = {"relu": 0, "gelu": 1, "gelu_new": 2, "gelu_pytorch_tanh": 2,
                    "gelu_fast": 2, "silu": 3, "swish": 3, "quick_gelu": 4}
_CHECKED: dict[tuple[int, str], bool] = {}  # (id of φ, name) -> agrees with the kernel's φ


def _numba_additivity():  # noqa: ANN202 (the compiled kernels, or None)
    try:
        from crossint.interactions import numba_additivity as kernels
    except ImportError:  # no numba (the fast extra)
        return None
    return kernels.gaps, kernels.grads, kernels.evaluate


_ADDITIVITY: list = []  # filled on first use: [(gaps, grads, evaluate) or None]


def _fused_code(act: Callable[[Tensor], Tensor], act_name: str, like: Tensor) -> int | None:
    """The kernel code of φ when the fused kernels can run it here, else None. The first time a
    (φ, name) pair is seen, the kernel's φ and φ' are compared with the model's own."""
    code = ACTIVATION_CODES.get(act_name)
    if code is None or like.dtype != torch.float32 or not fused_available(like):
        return None
    if not _ADDITIVITY:
        _ADDITIVITY.append(_numba_additivity())
    if _ADDITIVITY[0] is None:
        return None
    key = (id(act), act_name)
    if key not in _CHECKED:
        x_E = torch.linspace(-12.0, 12.0, 6001, dtype=torch.float32)
        out_E, dout_E = torch.empty_like(x_E), torch.empty_like(x_E)
        try:
            _ADDITIVITY[0][2](x_E.numpy(), code, out_E.numpy(), dout_E.numpy())
        except Exception as error:  # a numba that cannot compile: the torch path
            _fall_back(error)
            _ADDITIVITY[0] = None
            return None
        ok = (torch.allclose(out_E, act(x_E), rtol=1e-5, atol=2e-6)
              and torch.allclose(dout_E, derivative(act, x_E), rtol=1e-4, atol=2e-5))
        _CHECKED[key] = ok
    return code if _CHECKED[key] else None


def derivative(act: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """φ'(x) elementwise, by autograd through the model's own φ."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(act(x).sum(), x)
    return grad


def _dummy(V_UN: Tensor, Vu_UN: Tensor | None, cu_N: Tensor | None, n_neurons: int):
    """Plain MLPs: zero-size stand-ins for the up projection's arrays (numba wants arrays)."""
    if Vu_UN is not None:
        assert cu_N is not None
        return Vu_UN, cu_N
    return V_UN.new_zeros((1, n_neurons)), V_UN.new_zeros(n_neurons)


def additivity_gaps(f_BK: Tensor, V_UN: Tensor, Vu_UN: Tensor | None, row_BK: Tensor,
                    counts_B: Tensor, c_N: Tensor, cu_N: Tensor | None,
                    act: Callable[[Tensor], Tensor], act_name: str, chunk_tokens: int) -> Tensor:
    """g_BN (no gradient); tokens sorted by descending active count (``by_count``)."""
    code = _fused_code(act, act_name, V_UN)
    if code is not None and f_BK.dtype == V_UN.dtype:
        gaps = _ADDITIVITY[0][0]
        g_BN = V_UN.new_empty((f_BK.shape[0], V_UN.shape[1]))
        Vu, cu = _dummy(V_UN, Vu_UN, cu_N, V_UN.shape[1])
        _set_threads(_numba())
        gaps(f_BK.contiguous().numpy(), V_UN.contiguous().numpy(), Vu.contiguous().numpy(),
             row_BK.contiguous().numpy(), counts_B.contiguous().numpy(), c_N.contiguous().numpy(),
             cu.contiguous().numpy(), code, Vu_UN is not None, g_BN.numpy())
        return g_BN
    parts = []
    for start, stop, width in chunks(counts_B, chunk_tokens):
        p, pu = _chunk_terms(f_BK, V_UN, Vu_UN, row_BK, start, stop, width)
        parts.append(_torch_gap(p, pu, c_N, cu_N, act))
    return torch.cat(parts) if parts else V_UN.new_zeros((0, V_UN.shape[1]))


def additivity_grads(f_BK: Tensor, V_UN: Tensor, Vu_UN: Tensor | None, row_BK: Tensor,
                     counts_B: Tensor, c_N: Tensor, cu_N: Tensor | None, G_BN: Tensor,
                     act: Callable[[Tensor], Tensor], act_name: str, chunk_tokens: int,
                     ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(∂L/∂f_BK, ∂L/∂V_UN, ∂L/∂Vu_UN or None) given G_BN = ∂L/∂g_BN."""
    code = _fused_code(act, act_name, V_UN)
    if code is not None and f_BK.dtype == V_UN.dtype:
        grads = _ADDITIVITY[0][1]
        numba = _numba()
        _set_threads(numba)
        n_parts = numba.get_num_threads()
        Vu, cu = _dummy(V_UN, Vu_UN, cu_N, V_UN.shape[1])
        grad_f_BK = torch.zeros_like(f_BK)
        grad_V_PUN = V_UN.new_zeros((n_parts, *V_UN.shape))
        grad_Vu_PUN = V_UN.new_zeros((n_parts, *Vu.shape)) if Vu_UN is not None else \
            V_UN.new_zeros((n_parts, 1, V_UN.shape[1]))
        grads(f_BK.contiguous().numpy(), V_UN.contiguous().numpy(), Vu.contiguous().numpy(),
              row_BK.contiguous().numpy(), counts_B.contiguous().numpy(),
              c_N.contiguous().numpy(), cu.contiguous().numpy(), G_BN.contiguous().numpy(),
              code, Vu_UN is not None, n_parts, grad_f_BK.numpy(), grad_V_PUN.numpy(),
              grad_Vu_PUN.numpy())
        return (grad_f_BK, grad_V_PUN.sum(dim=0),
                grad_Vu_PUN.sum(dim=0) if Vu_UN is not None else None)
    return _torch_grads(f_BK, V_UN, Vu_UN, row_BK, counts_B, c_N, cu_N, G_BN, act, chunk_tokens)


def _numba():  # noqa: ANN202
    import numba

    return numba


def _chunk_terms(f_BK: Tensor, V_UN: Tensor, Vu_UN: Tensor | None, row_BK: Tensor, start: int,
                 stop: int, width: int) -> tuple[Tensor, Tensor | None]:
    f_BK1 = f_BK[start:stop, :width, None]
    rows_BK = row_BK[start:stop, :width]
    return f_BK1 * V_UN[rows_BK], None if Vu_UN is None else f_BK1 * Vu_UN[rows_BK]


def _torch_gap(p_BKN: Tensor, pu_BKN: Tensor | None, c_N: Tensor, cu_N: Tensor | None,
               act: Callable[[Tensor], Tensor]) -> Tensor:
    u_BN = None if pu_BKN is None else cu_N + pu_BKN.sum(dim=1)
    u_BKN = None if pu_BKN is None else cu_N + pu_BKN
    whole = act(c_N + p_BKN.sum(dim=1)) * (1 if u_BN is None else u_BN)
    base = act(c_N) * (1 if cu_N is None else cu_N)
    singles = act(c_N + p_BKN) * (1 if u_BKN is None else u_BKN)
    return whole - base - (singles - base).sum(dim=1)


def _torch_grads(f_BK: Tensor, V_UN: Tensor, Vu_UN: Tensor | None, row_BK: Tensor,
                 counts_B: Tensor, c_N: Tensor, cu_N: Tensor | None, G_BN: Tensor,
                 act: Callable[[Tensor], Tensor], chunk_tokens: int,
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
    grad_f_BK = torch.zeros_like(f_BK)
    grad_V_UN = torch.zeros_like(V_UN)
    grad_Vu_UN = None if Vu_UN is None else torch.zeros_like(Vu_UN)
    for start, stop, width in chunks(counts_B, chunk_tokens):
        p_BKN, pu_BKN = _chunk_terms(f_BK, V_UN, Vu_UN, row_BK, start, stop, width)
        z_BN = c_N + p_BKN.sum(dim=1)
        x_BKN = c_N + p_BKN
        G_B1N = G_BN[start:stop, None, :]
        rows = row_BK[start:stop, :width].reshape(-1)
        f_BK1 = f_BK[start:stop, :width, None]
        if pu_BKN is None:
            r_BKN = G_B1N * (derivative(act, z_BN)[:, None, :] - derivative(act, x_BKN))
            grad_f_BK[start:stop, :width] = (r_BKN * V_UN[row_BK[start:stop, :width]]).sum(-1)
        else:
            u_BN, u_BKN = cu_N + pu_BKN.sum(dim=1), cu_N + pu_BKN
            r_BKN = G_B1N * ((derivative(act, z_BN) * u_BN)[:, None, :]
                             - derivative(act, x_BKN) * u_BKN)
            ru_BKN = G_B1N * (act(z_BN)[:, None, :] - act(x_BKN))
            rows_BK = row_BK[start:stop, :width]
            grad_f_BK[start:stop, :width] = ((r_BKN * V_UN[rows_BK]).sum(-1)
                                             + (ru_BKN * Vu_UN[rows_BK]).sum(-1))
            grad_Vu_UN.index_add_(0, rows, (f_BK1 * ru_BKN).reshape(-1, V_UN.shape[1]))
        grad_V_UN.index_add_(0, rows, (f_BK1 * r_BKN).reshape(-1, V_UN.shape[1]))
    return grad_f_BK, grad_V_UN, grad_Vu_UN
