"""The fused CPU kernels of :mod:`crossint.interactions.additivity_kernels` (numba; imported
only when numba is installed).

``code`` selects φ: 0 ReLU, 1 GELU (erf), 2 GELU (tanh approximation), 3 SiLU, 4 quick GELU.
φ and φ' are written with rational approximations of tanh and erf (the float32 ones of Eigen)
and a Taylor-and-squaring exp, all plain arithmetic, so that the loops over neurons vectorise:
libm's tanh, erf and exp are scalar calls. They agree with torch's float32 activations to about
1e-7 absolute, which is why the kernels serve float32 only (float64 analyses use torch).
"""

import numba


@numba.njit(inline="always", fastmath=True)
def tanh(x):
    saturated = 1.0 if x > 0.0 else -1.0
    inside = abs(x) < 7.90531110763549805
    x = min(max(x, -7.90531110763549805), 7.90531110763549805)
    x2 = x * x
    p = x2 * -2.76076847742355e-16 + 2.00018790482477e-13
    p = p * x2 + -8.60467152213735e-11
    p = p * x2 + 5.12229709037114e-08
    p = p * x2 + 1.48572235717979e-05
    p = p * x2 + 6.37261928875436e-04
    p = p * x2 + 4.89352455891786e-03
    q = x2 * 1.19825839466702e-06 + 1.18534705686654e-04
    q = q * x2 + 2.26843463243900e-03
    q = q * x2 + 4.89352518554385e-03
    # exactly ±1 once saturated, so that 1 − tanh² is 0 there, as in float32 torch
    return x * p / q if inside else saturated


@numba.njit(inline="always", fastmath=True)
def erf(x):
    x = min(max(x, -4.0), 4.0)
    x2 = x * x
    p = x2 * -2.72614225801306e-10 + 2.77068142495902e-08
    p = p * x2 + -2.10102402082508e-06
    p = p * x2 + -5.69250639462346e-05
    p = p * x2 + -7.34990630326855e-04
    p = p * x2 + -2.95459980854025e-03
    p = p * x2 + -1.60960333262415e-02
    q = x2 * -1.45660718464996e-05 + -2.13374055278905e-04
    q = q * x2 + -1.68282697438203e-03
    q = q * x2 + -7.37332916720468e-03
    q = q * x2 + -1.42647390514189e-02
    return x * p / q


@numba.njit(inline="always", fastmath=True)
def gauss(x):
    """exp(−x²/2) (0 beyond |x| = 6): exp(y/16) by its Taylor series, squared four times."""
    y = max(-0.5 * x * x, -18.0) * 0.0625
    e = 1.0 + y * (1.0 + y * (0.5 + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (
        1.0 / 120.0 + y * (1.0 / 720.0 + y * (1.0 / 5040.0 + y * (1.0 / 40320.0 + y * (
            1.0 / 362880.0 + y / 3628800.0)))))))))
    e = e * e
    e = e * e
    e = e * e
    return e * e


@numba.njit(inline="always", fastmath=True)
def phi(x, code):
    if code == 0:
        return max(x, 0.0)
    if code == 1:
        return 0.5 * x * (1.0 + erf(x * 0.7071067811865476))
    if code == 2:
        return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    if code == 3:
        return 0.5 * x * (1.0 + tanh(0.5 * x))
    return 0.5 * x * (1.0 + tanh(0.851 * x))


@numba.njit(inline="always", fastmath=True)
def dphi(x, code):
    if code == 0:
        return 1.0 if x > 0.0 else 0.0
    if code == 1:
        return 0.5 * (1.0 + erf(x * 0.7071067811865476)) + 0.3989422804014327 * x * gauss(x)
    if code == 2:
        t = tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        return 0.5 * (1.0 + t) + (0.3989422804014327 * x * (1.0 - t * t)
                                  * (1.0 + 0.134145 * x * x))
    a = 0.5 if code == 3 else 0.851
    s = 0.5 * (1.0 + tanh(a * x))
    return s * (1.0 + 2.0 * a * x * (1.0 - s))


@numba.njit(parallel=True, cache=True, fastmath=True)
def gaps(f_BK, V_UN, Vu_UN, row_BK, counts_B, c_N, cu_N, code, gated, g_BN):  # noqa: N803
    """g_BN = h(c + Σ_k p_k) − h(c) − Σ_k [h(c + p_k) − h(c)], one token per task."""
    n_neurons = V_UN.shape[1]
    for b in numba.prange(f_BK.shape[0]):
        z = c_N.copy()
        zu = cu_N.copy()
        acc = g_BN[b]
        acc[:] = 0.0
        for k in range(counts_B[b]):
            f = f_BK[b, k]
            V = V_UN[row_BK[b, k]]
            if gated:
                Vu = Vu_UN[row_BK[b, k]]
                for n in range(n_neurons):
                    p, pu = f * V[n], f * Vu[n]
                    z[n] += p
                    zu[n] += pu
                    acc[n] += phi(c_N[n] + p, code) * (cu_N[n] + pu)
            else:
                for n in range(n_neurons):
                    p = f * V[n]
                    z[n] += p
                    acc[n] += phi(c_N[n] + p, code)
        extra = counts_B[b] - 1
        if gated:
            for n in range(n_neurons):
                acc[n] = (phi(z[n], code) * zu[n] - acc[n]
                          + extra * phi(c_N[n], code) * cu_N[n])
        else:
            for n in range(n_neurons):
                acc[n] = phi(z[n], code) - acc[n] + extra * phi(c_N[n], code)


@numba.njit(inline="always", fastmath=True)
def _token_grads_plain(b, f_BK, V_UN, row_BK, counts_B, c_N, G, code, grad_f_BK, gV):  # noqa: N803
    n_neurons = V_UN.shape[1]
    z = c_N.copy()
    for k in range(counts_B[b]):
        f, V = f_BK[b, k], V_UN[row_BK[b, k]]
        for n in range(n_neurons):
            z[n] += f * V[n]
    Gdz = z.copy()
    for n in range(n_neurons):
        Gdz[n] = G[n] * dphi(z[n], code)
    for k in range(counts_B[b]):
        f, row = f_BK[b, k], row_BK[b, k]
        V, out = V_UN[row], gV[row]
        total = 0.0
        for n in range(n_neurons):
            r = Gdz[n] - G[n] * dphi(c_N[n] + f * V[n], code)
            total += r * V[n]
            out[n] += f * r
        grad_f_BK[b, k] = total


@numba.njit(inline="always", fastmath=True)
def _token_grads_gated(b, f_BK, V_UN, Vu_UN, row_BK, counts_B, c_N, cu_N, G, code,  # noqa: N803
                       grad_f_BK, gV, gVu):
    n_neurons = V_UN.shape[1]
    z = c_N.copy()
    zu = cu_N.copy()
    for k in range(counts_B[b]):
        f, V, Vu = f_BK[b, k], V_UN[row_BK[b, k]], Vu_UN[row_BK[b, k]]
        for n in range(n_neurons):
            z[n] += f * V[n]
            zu[n] += f * Vu[n]
    Gdz = z.copy()
    Ghz = z.copy()
    for n in range(n_neurons):
        Gdz[n] = G[n] * dphi(z[n], code) * zu[n]
        Ghz[n] = G[n] * phi(z[n], code)
    for k in range(counts_B[b]):
        f, row = f_BK[b, k], row_BK[b, k]
        V, Vu, out, outu = V_UN[row], Vu_UN[row], gV[row], gVu[row]
        total = 0.0
        for n in range(n_neurons):
            x, u = c_N[n] + f * V[n], cu_N[n] + f * Vu[n]
            rg = Gdz[n] - G[n] * dphi(x, code) * u
            ru = Ghz[n] - G[n] * phi(x, code)
            total += rg * V[n] + ru * Vu[n]
            out[n] += f * rg
            outu[n] += f * ru
        grad_f_BK[b, k] = total


@numba.njit(parallel=True, cache=True, fastmath=True)
def grads(f_BK, V_UN, Vu_UN, row_BK, counts_B, c_N, cu_N, G_BN, code, gated,  # noqa: N803
          n_parts, grad_f_BK, grad_V_PUN, grad_Vu_PUN):
    """∂L/∂f and ∂L/∂V (∂L/∂V_u) from G = ∂L/∂g: the tokens in ``n_parts`` contiguous parts,
    each scattering into its own copy of V's gradient (``grad_V_PUN[part]``)."""
    n_tokens = G_BN.shape[0]
    per_part = (n_tokens + n_parts - 1) // n_parts
    for part in numba.prange(n_parts):
        gV, gVu = grad_V_PUN[part], grad_Vu_PUN[part]
        for b in range(part * per_part, min((part + 1) * per_part, n_tokens)):
            if gated:
                _token_grads_gated(b, f_BK, V_UN, Vu_UN, row_BK, counts_B, c_N, cu_N, G_BN[b],
                                   code, grad_f_BK, gV, gVu)
            else:
                _token_grads_plain(b, f_BK, V_UN, row_BK, counts_B, c_N, G_BN[b], code,
                                   grad_f_BK, gV)


@numba.njit(cache=True, fastmath=True)
def evaluate(x_E, code, out_E, dout_E):  # noqa: N803
    """φ and φ' elementwise (to check them against the model's own φ)."""
    for e in range(x_E.shape[0]):
        out_E[e] = phi(x_E[e], code)
        dout_E[e] = dphi(x_E[e], code)
