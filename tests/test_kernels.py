"""The fused dominant-feature kernel (numba, CPU) against the chunked torch path and a naive
float64 loop: the same slots, maxima and sums, with padded and empty tokens."""

from __future__ import annotations

import pytest
import torch

from crossint.interactions import kernels
from crossint.interactions.kernels import dominant_magnitudes, fused_available


def inputs(dtype, n_tokens=37, slots=6, rows=11, neurons=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    counts_B = torch.randint(0, slots + 1, (n_tokens,), generator=generator)
    counts_B = counts_B.sort(descending=True).values  # the penalty's order
    row_BK = torch.randint(0, rows, (n_tokens, slots), generator=generator)
    abs_f_BK = torch.rand(n_tokens, slots, generator=generator, dtype=dtype)
    pad_BK = torch.arange(slots)[None, :] >= counts_B[:, None]
    abs_f_BK[pad_BK], row_BK[pad_BK] = 0.0, 0
    abs_V_UN = torch.randn(rows, neurons, generator=generator, dtype=dtype).abs()
    return abs_f_BK, abs_V_UN, row_BK, counts_B


def naive(abs_f_BK, abs_V_UN, row_BK, counts_B):
    B, N = abs_f_BK.shape[0], abs_V_UN.shape[1]
    slot = torch.zeros(B, N, dtype=torch.int64)
    Mx, S = torch.zeros(B, N, dtype=torch.float64), torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            values = [float(abs_f_BK[b, k]) * float(abs_V_UN[row_BK[b, k], n])
                      for k in range(int(counts_B[b]))]
            if values:
                slot[b, n] = max(range(len(values)), key=lambda k: (values[k], -k))
                Mx[b, n], S[b, n] = max(values), sum(values)
    return slot, Mx, S


@pytest.mark.parametrize("chunk_tokens", [1, 8, 100])
def test_slots_maxima_and_sums_match_a_naive_loop(kernel_path, chunk_tokens):
    args = inputs(torch.float64)
    assert fused_available(args[1]) == (kernel_path == "fused")
    slot, Mx, S = dominant_magnitudes(*args, chunk_tokens=chunk_tokens, with_sum=True)
    want_slot, want_Mx_BN, want_S_BN = naive(*args)
    assert torch.equal(slot, want_slot)
    assert torch.allclose(Mx, want_Mx_BN, rtol=1e-12, atol=0)
    assert torch.allclose(S, want_S_BN, rtol=1e-12, atol=1e-15)
    assert dominant_magnitudes(*args, chunk_tokens=chunk_tokens)[2] is None


def test_float32_paths_agree(monkeypatch):
    if not fused_available(torch.zeros(1)):
        pytest.skip("numba is not installed (the fast extra)")
    args = inputs(torch.float32, n_tokens=300, slots=20, rows=64, neurons=128, seed=1)
    fused = dominant_magnitudes(*args, chunk_tokens=64, with_sum=True)
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    plain = dominant_magnitudes(*args, chunk_tokens=64, with_sum=True)
    assert torch.equal(fused[1], plain[1])  # the maximum is exact in both
    assert torch.allclose(fused[2], plain[2], rtol=1e-5)
    # slots differ only where dominant_slot sees a tie (agreement to 2^-17 relative)
    assert (fused[0] != plain[0]).float().mean() < 1e-3


def test_dominant_gradients_match_a_naive_loop(kernel_path):
    from crossint.interactions.kernels import dominant_gradients

    abs_f_BK, abs_V_UN, row_BK, counts_B = inputs(torch.float64, n_tokens=12, slots=5, rows=7,
                                                  neurons=6, seed=2)
    generator = torch.Generator().manual_seed(3)
    f_BK = abs_f_BK * torch.where(torch.rand(abs_f_BK.shape, generator=generator) < 0.5, -1, 1)
    V_UN = abs_V_UN * torch.where(torch.rand(abs_V_UN.shape, generator=generator) < 0.5, -1, 1)
    slot_BN, Mx_BN, _ = dominant_magnitudes(abs_f_BK, abs_V_UN, row_BK, counts_B, 4)
    assert slot_BN.dtype == (torch.int32 if kernel_path == "fused" else torch.int64)
    W_BN = torch.randn(Mx_BN.shape, generator=generator, dtype=torch.float64)
    spread_BK = torch.randn(f_BK.shape, generator=generator, dtype=torch.float64)
    unsigned_UN = torch.randn(V_UN.shape, generator=generator, dtype=torch.float64)
    grad_f, grad_V_UN = dominant_gradients(f_BK, V_UN, row_BK, slot_BN, Mx_BN, W_BN, spread_BK,
                                        unsigned_UN.clone())
    (B, K), (U, N) = f_BK.shape, V_UN.shape
    for b in range(B):
        for k in range(K):
            f = float(f_BK[b, k])
            dominant = sum(float(Mx_BN[b, n] * W_BN[b, n]) for n in range(N)
                           if slot_BN[b, n] == k)
            sign = (f > 0) - (f < 0)
            want = sign * float(spread_BK[b, k]) - (dominant / f if f else dominant)
            assert float(grad_f[b, k]) == pytest.approx(want, abs=1e-12)
    for u in range(U):
        for n in range(N):
            correction = sum(abs(float(f_BK[b, slot_BN[b, n]])) * float(W_BN[b, n])
                             for b in range(B) if row_BK[b, slot_BN[b, n]] == u)
            v = float(V_UN[u, n])
            want = ((v > 0) - (v < 0)) * (float(unsigned_UN[u, n]) - correction)
            assert float(grad_V_UN[u, n]) == pytest.approx(want, abs=1e-12)


def test_a_failing_kernel_falls_back_to_torch(monkeypatch):
    def broken(*args):
        raise RuntimeError("no LLVM here")

    class FakeNumba:
        class config:  # noqa: N801 (mirrors numba.config)
            NUMBA_NUM_THREADS = 1

        @staticmethod
        def set_num_threads(n):
            pass

    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.setattr(kernels, "_KERNELS", [(FakeNumba, broken, broken)])
    args = inputs(torch.float64)
    with pytest.warns(RuntimeWarning, match="no LLVM here"):
        slot, Mx, _ = dominant_magnitudes(*args, chunk_tokens=8)
    want_slot, want_Mx_BN, _ = naive(*args)
    assert torch.equal(slot, want_slot) and torch.allclose(Mx, want_Mx_BN)
    assert not fused_available(args[1])  # not tried again
