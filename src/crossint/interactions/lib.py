"""The Local Interaction Basis (SPEC §11) as pure functions over tensors and block functions.

A *node layer* is the residual stream entering a block (and, last, leaving the final block); a
*block function* ``fn(x_BSD) -> y_BSI`` maps one node layer of a batch of contexts to what the
next one is made of: the next node layer's basis functions, or (for the last node layer) the
logits. Nothing here knows about models: callers build the functions.

Special positions (BOS/EOS/PAD, ``keep_BS`` False) are context, not data: they enter the block
at their own value, are never scaled along an integration path, and are left out of every sum.

Per node layer, from the output backwards (SPEC §11 and its Decisions):

1. Centre the activations (mean μ) and eigendecompose the covariance, dropping eigenvalues below
   ``rtol`` times the largest: PCA basis ``U_DY``, eigenvalues ``D_Y``; whitened coordinates
   ``y = (x − μ)·U·D^{-1/2}``.
2. The gradient Gram ``M'_DD = Σ_{b, s} Σ_{t, i} g gᵀ`` with ``g = ∂fn_i(t)/∂x(s)`` (integrated
   along ``μ + α(x − μ)`` when ``steps`` > 0), estimated with Rademacher sources over (t, i) or
   exactly; in whitened coordinates ``M = D^{1/2}Uᵀ M' U D^{1/2}``. Its eigenvectors ``V`` (the
   right singular vectors of the gradient dataset) and eigenvalues ``Λ`` (truncated like D) give
   ``C = U D^{-1/2} V Λ^{1/2}``: the LIB functions are ``f̂ = (x − μ)·C``.
3. Edges between adjacent node layers, ``E[i, j] = mean_{x,t} (Σ_s f̂_j(s) ∫∂f̂_i(t)/∂f̂_j(s) dα)²``,
   computed exactly: one Jacobian-vector product per input function j gives every i and t.

The edge-ablated block output (``masked_block_output``) is the yardstick of
``crossint.interactions.edges``: each output function sees only the input functions whose edges
are kept, the others held at their mean.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from crossint.errors import CrossintError

BlockFn = Callable[[Tensor], Tensor]  # x_BSD -> y_BSI
KINDS = ("pca", "lib")
RTOL = 1e-7  # eigenvalues below RTOL × the largest are truncated (covariance and M alike)
EDGE_CHUNK = 16  # input functions whose Jacobian-vector products run as one vectorised call


# --- moments and PCA ---------------------------------------------------------------------------
class MomentAccumulator:
    """Token count, mean and covariance of one node layer, accumulated in float64."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.n_tokens = 0
        self._shift_D: Tensor | None = None  # first batch's mean: keeps the sums well conditioned
        self._sum_D = torch.zeros(dim, dtype=torch.float64)
        self._outer_DD = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, x_TD: Tensor) -> None:
        if x_TD.dim() != 2 or x_TD.shape[1] != self.dim:
            raise CrossintError(f"expected activations (tokens, {self.dim}), got "
                                f"{tuple(x_TD.shape)}")
        x_TD = x_TD.detach().to("cpu", torch.float64)
        if x_TD.shape[0] == 0:
            return
        if self._shift_D is None:
            self._shift_D = x_TD.mean(dim=0)
        centred_TD = x_TD - self._shift_D
        self._sum_D += centred_TD.sum(dim=0)
        self._outer_DD += centred_TD.T @ centred_TD
        self.n_tokens += x_TD.shape[0]

    def mean(self) -> Tensor:
        if self._shift_D is None:
            return torch.zeros(self.dim, dtype=torch.float64)
        return self._shift_D + self._sum_D / self.n_tokens

    def covariance(self) -> Tensor:
        """Σ (x − μ)(x − μ)ᵀ / n (the centred Gram matrix per token)."""
        if self.n_tokens == 0:
            return torch.zeros(self.dim, self.dim, dtype=torch.float64)
        offset_D = self._sum_D / self.n_tokens
        return self._outer_DD / self.n_tokens - torch.outer(offset_D, offset_D)


def min_tokens(dim: int) -> int:
    """Tokens a dim × dim covariance needs to have full rank: dim + 1 (one goes to the mean)."""
    return dim + 1


def check_full_rank(n_tokens: int, dim: int, where: str) -> None:
    """CrossintError unless ``n_tokens`` can give a full-rank covariance of width ``dim``."""
    if n_tokens < min_tokens(dim):
        raise CrossintError(
            f"{where}: {n_tokens} tokens cannot give a full-rank {dim}×{dim} covariance; PCA "
            f"needs at least {min_tokens(dim)} (d_model + 1) non-special tokens, ~{10 * dim} "
            f"for a stable estimate: raise --tokens"
        )


def truncated_eigh(S_DD: Tensor, rtol: float = RTOL) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric PSD matrix in float64,
    keeping eigenvalues above ``rtol`` times the largest (and above 0): (eig_J, U_DJ)."""
    if not torch.isfinite(S_DD).all():
        raise CrossintError("the matrix to eigendecompose has NaN/Inf entries")
    eig_D, U_DD = torch.linalg.eigh(S_DD.to(torch.float64))
    order = torch.argsort(eig_D, descending=True)
    eig_D, U_DD = eig_D[order], U_DD[:, order]
    largest = float(eig_D[0]) if eig_D.numel() else 0.0
    keep = eig_D > max(rtol * largest, 0.0)
    return eig_D[keep], U_DD[:, keep]


@dataclass(frozen=True)
class LayerBasis:
    """A basis of one node layer: functions ``f_J = (x_D − mean_D)·C_DJ`` and their inverse on
    the kept subspace ``x_D = mean_D + f_J·C_pinv_JD``. ``eig_J``: the eigenvalue behind each
    function (covariance eigenvalues for PCA, Λ for LIB), descending."""

    name: str
    kind: str
    mean_D: Tensor
    C_DJ: Tensor
    C_pinv_JD: Tensor
    eig_J: Tensor

    @property
    def dim(self) -> int:
        return self.C_DJ.shape[1]

    def encode(self, x_D: Tensor) -> Tensor:
        return (x_D - self.mean_D.to(x_D)) @ self.C_DJ.to(x_D)

    def decode(self, f_J: Tensor) -> Tensor:
        return self.mean_D.to(f_J) + f_J @ self.C_pinv_JD.to(f_J)

    def project(self, x_D: Tensor) -> Tensor:
        """x with every truncated direction at its mean."""
        return self.decode(self.encode(x_D))


def covariance_eigh(name: str, cov_DD: Tensor, rtol: float = RTOL) -> tuple[Tensor, Tensor]:
    """``truncated_eigh`` of a node layer's covariance; CrossintError when nothing is left (every
    token has the same activation: the Gram matrix is singular through and through)."""
    eig_J, U_DJ = truncated_eigh(cov_DD, rtol)
    if eig_J.numel() == 0:
        raise CrossintError(f"{name}: the activations' covariance is zero (every token has the "
                            f"same activation), so PCA and LIB keep no direction: use more "
                            f"varied text")
    return eig_J, U_DJ


def pca_basis(name: str, mean_D: Tensor, cov_DD: Tensor, rtol: float = RTOL) -> LayerBasis:
    """The PCA baseline: orthonormal eigenvectors of the covariance (not whitened)."""
    eig_J, U_DJ = covariance_eigh(name, cov_DD, rtol)
    return LayerBasis(name, "pca", mean_D.double(), U_DJ, U_DJ.T.contiguous(), eig_J)


def whitening(cov_DD: Tensor, rtol: float = RTOL, name: str = "node layer"
              ) -> tuple[Tensor, Tensor]:
    """``(W_DY, W_pinv_YD)``: y = (x − μ)·W has identity covariance; x − μ = y·W_pinv."""
    eig_Y, U_DY = covariance_eigh(name, cov_DD, rtol)
    return U_DY / eig_Y.sqrt(), (U_DY * eig_Y.sqrt()).T.contiguous()


def lib_basis(name: str, mean_D: Tensor, cov_DD: Tensor, grad_gram_DD: Tensor,
              rtol: float = RTOL) -> LayerBasis:
    """SPEC §11 steps 1–2 from the covariance and the gradient Gram M' (raw coordinates)."""
    W_DY, W_pinv_YD = whitening(cov_DD, rtol, name)
    M_YY = W_pinv_YD @ grad_gram_DD.to(torch.float64) @ W_pinv_YD.T
    Lambda_J, V_YJ = truncated_eigh((M_YY + M_YY.T) / 2, rtol)
    if Lambda_J.numel() == 0:
        raise CrossintError(f"{name}: every gradient vanishes, so LIB keeps no direction")
    C_DJ = W_DY @ V_YJ * Lambda_J.sqrt()
    C_pinv_JD = (V_YJ / Lambda_J.sqrt()).T @ W_pinv_YD
    return LayerBasis(name, "lib", mean_D.double(), C_DJ, C_pinv_JD, Lambda_J)


# --- integration paths -------------------------------------------------------------------------
def integration_points(steps: int) -> list[tuple[float, float]]:
    """(α, weight) pairs: the plain gradient at α = 1 for ``steps`` = 0, else the midpoint rule
    with ``steps`` points on (0, 1)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise CrossintError(f"integration steps must be an integer >= 0, got {steps!r}")
    if steps == 0:
        return [(1.0, 1.0)]
    return [((k + 0.5) / steps, 1.0 / steps) for k in range(steps)]


def path_point(x_BSD: Tensor, keep_BS: Tensor, centre_D: Tensor, alpha: float) -> Tensor:
    """``centre + α(x − centre)`` at kept positions; special positions keep their value."""
    if alpha == 1.0:
        return x_BSD
    centre_D = centre_D.to(x_BSD)
    scaled_BSD = centre_D + alpha * (x_BSD - centre_D)
    return torch.where(keep_BS[..., None], scaled_BSD, x_BSD)


def _check_finite(tensor: Tensor, what: str) -> Tensor:
    if not torch.isfinite(tensor).all():
        raise CrossintError(f"non-finite {what}: the model's Jacobian has NaN/Inf entries on "
                            f"this text (check the model's weights and the dtype)")
    return tensor


# --- the gradient Gram (SPEC §11 step 2) ---------------------------------------------------------
def rademacher(shape: tuple[int, ...], generator: torch.Generator | None,
               dtype: torch.dtype) -> Tensor:
    """±1 entries, uniformly."""
    bits = torch.randint(0, 2, shape, generator=generator)
    return (bits * 2 - 1).to(dtype)


def _cotangents(y_BSI: Tensor, keep_BS: Tensor, sources: int | None,
                generator: torch.Generator | None) -> Iterator[Tensor]:
    """One-hot cotangents over every (t, i) (exact), or ``sources`` Rademacher ones; zero at
    special output positions."""
    mask_BS1 = keep_BS[..., None].to(y_BSI.dtype)
    if sources:
        for _ in range(sources):
            yield rademacher(tuple(y_BSI.shape), generator, y_BSI.dtype).to(y_BSI.device) * mask_BS1
        return
    _, n_positions, n_out = y_BSI.shape
    for t in range(n_positions):
        for i in range(n_out):
            phi_BSI = torch.zeros_like(y_BSI)
            phi_BSI[:, t, i] = 1.0
            yield phi_BSI * mask_BS1


def gradient_gram(fn: BlockFn, x_BSD: Tensor, keep_BS: Tensor, centre_D: Tensor, *,
                  steps: int = 0, sources: int | None = 16,
                  generator: torch.Generator | None = None) -> Tensor:
    """``Σ_{b, s kept} Σ_{t kept, i} g gᵀ`` (D×D, float64; divide by the kept tokens for the
    mean), ``g = ∫ ∂fn_i(t)/∂x(s) dα`` along ``centre + α(x − centre)``.

    ``sources`` > 0 estimates the sum over (t, i) with that many Rademacher cotangents (unbiased:
    E[φφᵀ] = I); ``None`` or 0 sums it exactly, one backward pass per (t, i)."""
    points = integration_points(steps)
    grads: dict[int, Tensor] = {}
    for alpha, weight in points:
        x_alpha_BSD = path_point(x_BSD, keep_BS, centre_D, alpha).detach().requires_grad_(True)
        with torch.enable_grad():
            y_BSI = fn(x_alpha_BSD)
        # The same cotangents at every α: same seed for each point.
        gen_state = generator.get_state() if generator is not None else None
        phis = list(_cotangents(y_BSI, keep_BS, sources, generator))
        for start in range(0, len(phis), EDGE_CHUNK):
            phi_RBSI = torch.stack(phis[start:start + EDGE_CHUNK])
            for r, g_BSD in enumerate(_batched_grad(y_BSI, x_alpha_BSD, phi_RBSI), start):
                grads[r] = grads.get(r, 0) + weight * g_BSD.detach()
        if generator is not None and alpha != points[-1][0]:
            generator.set_state(gen_state)
    n_sources = len(grads)
    gram_DD = torch.zeros(x_BSD.shape[-1], x_BSD.shape[-1], dtype=torch.float64)
    for g_BSD in grads.values():
        g_TD = g_BSD[keep_BS].to("cpu", torch.float64)
        gram_DD += g_TD.T @ g_TD
    scale = 1.0 / n_sources if sources else 1.0
    return _check_finite(gram_DD * scale, "gradients")


def _batched_grad(y_BSI: Tensor, x_BSD: Tensor, phi_RBSI: Tensor) -> Tensor:
    """The vector-Jacobian products of every cotangent along R: one vectorised backward pass
    where the model's backward allows it, else one pass per cotangent."""
    try:
        (g_RBSD,) = torch.autograd.grad(y_BSI, x_BSD, phi_RBSI, retain_graph=True,
                                        is_grads_batched=True)
        return g_RBSD
    except Exception:  # noqa: BLE001 (an op without a batching rule: one pass each)
        return torch.stack([torch.autograd.grad(y_BSI, x_BSD, phi_BSI, retain_graph=True)[0]
                            for phi_BSI in phi_RBSI])


# --- edges (SPEC §11 step 3) ---------------------------------------------------------------------
def jvp_function(fn: BlockFn, x_BSD: Tensor) -> Callable[[Tensor], Tensor]:
    """``tangent_BSD -> J·tangent`` of ``fn`` at ``x``: linearised once (``torch.func``), or by
    forward-mode AD per call where the model's code cannot be traced."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch.fx constant folding chatter
            _, linear = torch.func.linearize(fn, x_BSD)
        return linear
    except Exception:  # noqa: BLE001 (any tracing failure: fall back to forward-mode AD)
        def forward_mode(tangent_BSD: Tensor) -> Tensor:
            with torch.no_grad(), fwAD.dual_level():
                out = fn(fwAD.make_dual(x_BSD, tangent_BSD))
                return fwAD.unpack_dual(out).tangent

        return forward_mode


def edge_sums(fn: BlockFn, x_BSD: Tensor, keep_BS: Tensor, basis_in: LayerBasis, *,
              steps: int = 0) -> Tensor:
    """``Σ_{b, t kept} a_ij(t)²`` (I×J, float64; divide by the kept tokens for SPEC §11's E) with
    ``a_ij(t) = Σ_s f̂_j(s) ∫ ∂fn_i(t)/∂f̂_j(s) dα``, the input on the kept subspace of
    ``basis_in`` and the path ``mean + α(x − mean)``. One JVP per input function j."""
    keep_BS1 = keep_BS[..., None]
    x_BSD = torch.where(keep_BS1, basis_in.project(x_BSD), x_BSD).detach()
    f_BSJ = basis_in.encode(x_BSD) * keep_BS1
    C_pinv_JD = basis_in.C_pinv_JD.to(x_BSD)
    linears = [(jvp_function(fn, path_point(x_BSD, keep_BS, basis_in.mean_D, alpha)), weight)
               for alpha, weight in integration_points(steps)]
    columns = []
    for js in torch.arange(len(C_pinv_JD)).split(EDGE_CHUNK):
        tangent_CBSD = f_BSJ[..., js].permute(2, 0, 1)[..., None] * C_pinv_JD[js, None, None]
        a_CBSI = sum(weight * apply_batched(linear, tangent_CBSD) for linear, weight in linears)
        columns.append((a_CBSI[:, keep_BS].double() ** 2).sum(dim=1))
    return _check_finite(torch.cat(columns).T.cpu(), "edge attributions")


def apply_batched(linear: Callable[[Tensor], Tensor], tangent_C: Tensor) -> Tensor:
    """``linear`` on every tangent along the first axis: vectorised (``torch.vmap``) where the
    function allows it, else one call per tangent."""
    try:
        return torch.vmap(linear)(tangent_C)
    except Exception:  # noqa: BLE001 (an op without a batching rule: one call each)
        return torch.stack([linear(tangent) for tangent in tangent_C])


# --- edge ablation -----------------------------------------------------------------------------
def masked_block_output(block: BlockFn, x_BSD: Tensor, keep_BS: Tensor, basis_in: LayerBasis,
                        basis_out: LayerBasis, mask_IJ: Tensor) -> Tensor:
    """The next node layer when only the edges in ``mask_IJ`` (output i × input j) are kept.

    Output function i is computed from the block run on an input whose functions outside row i
    of the mask are at their mean (0); outputs sharing a row share one run. The result is the
    next node layer rebuilt from those outputs (``basis_out.decode``); special positions keep the
    block's own output. With every edge kept this is the block on ``basis_in``'s kept subspace,
    seen through ``basis_out``'s."""
    keep_BS1 = keep_BS[..., None]
    f_in_BSJ = basis_in.encode(x_BSD)
    rows_GJ, group_I = torch.unique(mask_IJ.bool(), dim=0, return_inverse=True)
    f_out_BSI = f_in_BSJ.new_zeros((*f_in_BSJ.shape[:2], basis_out.dim))
    clean_BSD = None
    for gs in torch.arange(len(rows_GJ)).split(EDGE_CHUNK):
        kept_CBSJ = f_in_BSJ * rows_GJ[gs, None, None, :].to(f_in_BSJ)
        x_in_CBSD = torch.where(keep_BS1, basis_in.decode(kept_CBSJ), x_BSD)
        y_CBSD = apply_batched(block, x_in_CBSD)
        if clean_BSD is None:
            clean_BSD = y_CBSD[0]  # special positions see no ablation (their inputs are their own)
        f_CBSI = basis_out.encode(y_CBSD)
        for c, g in enumerate(gs.tolist()):
            outputs = (group_I == g).nonzero().squeeze(1)
            f_out_BSI[..., outputs] = f_CBSI[c][..., outputs]
    assert clean_BSD is not None
    return torch.where(keep_BS1, basis_out.decode(f_out_BSI), clean_BSD)
