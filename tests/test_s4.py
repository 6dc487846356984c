"""Tests for seqbook.s4 (chapter 3): the Cauchy kernel, S4's kernel algorithm, S4D's initializations.

The fast path (truncated generating function, roots of unity, bilinear, Woodbury, Cauchy,
inverse FFT) is checked in float64 against the definition, dense powers of the discretized
matrix, on random DPLR systems and at lengths odd and even; at initialization the S4 kernel
is checked against the real, dense HiPPO-LegS system built by seqbook.hippo and
seqbook.ssm with no DPLR algebra at all. Gradients by autograd against the explicit form and
by gradcheck.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

from seqbook import backend, hippo, s4, ssm
from compare import assert_near

F64 = torch.float64
C128 = torch.complex128


def crandn(*shape, gen, dtype=C128):
    re, im = torch.randn(*shape, generator=gen, dtype=F64), torch.randn(*shape, generator=gen, dtype=F64)
    return torch.complex(re, im).to(dtype)


def random_dplr(H, N, seed, dtype=C128):
    """A random stable DPLR system: Re Lambda in [-1.1, -0.1], moderate P, steps in [0.01, 0.5]."""
    gen = torch.Generator().manual_seed(seed)
    Lambda = torch.complex(
        -torch.rand(H, N, generator=gen, dtype=F64) - 0.1, 4 * torch.randn(H, N, generator=gen, dtype=F64)
    ).to(dtype)
    P = 0.4 * crandn(H, N, gen=gen, dtype=dtype)
    B, C = crandn(H, N, gen=gen, dtype=dtype), crandn(H, N, gen=gen, dtype=dtype)
    log_step = torch.log(0.01 + 0.49 * torch.rand(H, generator=gen, dtype=F64))
    return Lambda, P, B, C, log_step.to(F64 if dtype == C128 else torch.float32)


# --------------------------------------------------------------------------------------
# Cauchy
# --------------------------------------------------------------------------------------


def cauchy_loop(v, z, w):
    """k[h, l] = sum_n v[h, n] / (z[h, l] - w[h, n]), one term at a time."""
    H, N = v.shape
    z = z.expand(H, -1) if z.ndim == 1 else z
    k = torch.zeros(H, z.shape[1], dtype=v.dtype)
    for h in range(H):
        for l in range(z.shape[1]):
            for n in range(N):
                k[h, l] += v[h, n] / (z[h, l] - w[h, n])
    return k


@pytest.mark.parametrize("shared_z", [True, False])
def test_cauchy_reference_equals_double_loop(shared_z):
    gen = torch.Generator().manual_seed(0)
    H, N, L = 3, 5, 7
    v, w = crandn(H, N, gen=gen), crandn(H, N, gen=gen)
    z = crandn(L, gen=gen) if shared_z else crandn(H, L, gen=gen)
    want = cauchy_loop(v, z, w)
    torch.testing.assert_close(s4.cauchy_reference(v, z, w), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s4.cauchy(v, z, w, backend="reference"), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s4.cauchy(v, z, w), want, rtol=1e-12, atol=1e-12)  # auto on CPU: reference


def test_cauchy_gradcheck():
    gen = torch.Generator().manual_seed(1)
    v, z, w = crandn(2, 3, gen=gen), crandn(2, 4, gen=gen), crandn(2, 3, gen=gen)
    inputs = tuple(x.requires_grad_() for x in (v, z, w))
    assert torch.autograd.gradcheck(lambda v, z, w: s4.cauchy(v, z, w, backend="reference"), inputs)


def test_cauchy_triton_backend_dispatches_to_the_kernel_module(monkeypatch):
    """backend='triton' goes through seqbook.backend.kernels('cauchy').cauchy(v, z, w) (the
    kernel itself is tested in test_cauchy.py); 'auto' on CPU tensors never does."""
    calls = []

    def fake_kernels(name):
        calls.append(name)
        return types.SimpleNamespace(cauchy=lambda v, z, w: s4.cauchy_reference(v, z, w) * 0 + 7)

    monkeypatch.setattr(backend, "kernels", fake_kernels)
    gen = torch.Generator().manual_seed(2)
    v, z, w = crandn(2, 3, gen=gen, dtype=torch.complex64), crandn(4, gen=gen, dtype=torch.complex64), crandn(
        2, 3, gen=gen, dtype=torch.complex64
    )
    if backend.interpreting():
        out = s4.cauchy(v, z, w, backend="triton")
        assert calls == ["cauchy"] and torch.all(out == 7)
    calls.clear()
    s4.cauchy(v, z, w, backend="auto")
    assert calls == ([] if not torch.cuda.is_available() else calls)


def test_cauchy_validation():
    gen = torch.Generator().manual_seed(3)
    v, z, w = crandn(2, 3, gen=gen), crandn(4, gen=gen), crandn(2, 3, gen=gen)
    with pytest.raises(TypeError, match="v must be complex64 or complex128"):
        s4.cauchy(v.real, z, w)
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        s4.cauchy(v, [1.0], w)
    with pytest.raises(TypeError, match="w must have the dtype of v"):
        s4.cauchy(v, z, w.to(torch.complex64))
    with pytest.raises(ValueError, match=r"v must be \(H, N\)"):
        s4.cauchy(v[0], z, w)
    with pytest.raises(ValueError, match="w must have the shape of v"):
        s4.cauchy(v, z, w[:, :2])
    with pytest.raises(ValueError, match=r"z must be \(L,\) or \(H, L\) with H = 2"):
        s4.cauchy(v, crandn(3, 4, gen=gen), w)
    with pytest.raises(ValueError, match="z must be on the device of v"):
        s4.cauchy(v, torch.empty(4, dtype=C128, device="meta"), w)
    with pytest.raises(ValueError, match="backend must be one of"):
        s4.cauchy(v, z, w, backend="cuda")


# --------------------------------------------------------------------------------------
# The S4 kernel: Algorithm 1 against the definition
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [1, 2, 3, 7, 16, 33, 100])
@pytest.mark.parametrize("C_is_truncated", [False, True])
def test_s4_kernel_equals_explicit_powers(L, C_is_truncated):
    Lambda, P, B, C, log_step = random_dplr(3, 6, seed=L)
    K = s4.s4_kernel(Lambda, P, B, C, log_step, L, C_is_truncated=C_is_truncated)
    K_ref = s4.s4_kernel_explicit(Lambda, P, B, C, log_step, L, C_is_truncated=C_is_truncated)
    assert K.shape == (3, L) and K.dtype == F64
    assert K_ref.abs().max() > 0.1
    torch.testing.assert_close(K, K_ref, rtol=0, atol=1e-11 * K_ref.abs().max().item())


def test_s4_kernel_shared_Lambda_and_P():
    """Lambda and P given once, (N,), act like the same row for every channel."""
    Lambda, P, B, C, log_step = random_dplr(2, 5, seed=10)
    K = s4.s4_kernel(Lambda[0], P[0], B, C, log_step, 12)
    K_rows = s4.s4_kernel(Lambda[0].expand(2, 5), P[0].expand(2, 5), B, C, log_step, 12)
    torch.testing.assert_close(K, K_rows, rtol=0, atol=0)
    torch.testing.assert_close(K, s4.s4_kernel_explicit(Lambda[0], P[0], B, C, log_step, 12), rtol=0, atol=1e-11)


def test_s4_kernel_explicit_is_the_definition():
    """The explicit reference itself, against ssm.discretize + ssm.ssm_kernel of the dense matrix."""
    Lambda, P, B, C, log_step = random_dplr(2, 4, seed=11)
    K = s4.s4_kernel_explicit(Lambda, P, B, C, log_step, 9)
    for h in range(2):
        A = torch.diag(Lambda[h]) - torch.outer(P[h], P[h].conj())
        A_bar, B_bar = ssm.discretize(A, B[h][:, None], log_step[h].exp(), "bilinear")
        K_h = ssm.ssm_kernel(A_bar, B_bar, C[h][None, :], 9)[0, 0].real
        torch.testing.assert_close(K[h], K_h, rtol=0, atol=1e-12)


def test_s4_kernel_at_init_is_hippo_legs():
    """The kernel from LegS's NPLR form (half the modes plus their conjugates, as the S4 layer
    keeps them) equals the kernel of the real dense LegS system with C_dense = C V^*."""
    modes, L = 4, 40
    Lambda, P, B = s4.legs_half(modes)
    Lf, Pf, Bf = (torch.cat([x, x.conj()])[None] for x in (Lambda, P, B))
    gen = torch.Generator().manual_seed(12)
    C = crandn(modes, gen=gen)
    Cf = torch.cat([C, C.conj()])[None]
    log_step = torch.tensor([math.log(0.1)], dtype=F64)
    K = s4.s4_kernel(Lf, Pf, Bf, Cf, log_step, L)
    # The same system in the original coordinates: A = V (Lambda - P P^*) V^*, C_dense = C V^*.
    Lambda_all, _, _, V = hippo.nplr("legs", 2 * modes)
    # The kept modes' eigenvectors, and their conjugates for the conjugate modes: eigh fixes
    # each column's phase its own way (LAPACK-dependent), so V's other half need not be conj.
    order = [int(torch.argmin((Lambda_all - lam).abs())) for lam in Lambda]
    Vf = torch.cat([V[:, order], V[:, order].conj()], dim=1)
    torch.testing.assert_close(Vf.conj().T @ Vf, torch.eye(2 * modes, dtype=C128), rtol=0, atol=1e-12)
    A, B_dense = hippo.transition("legs", 2 * modes)
    torch.testing.assert_close(Vf @ Bf[0], B_dense.to(C128), rtol=0, atol=1e-10)
    C_dense = Cf[0] @ Vf.conj().T
    assert C_dense.imag.abs().max() < 1e-10  # conjugate pairs: a real system
    A_bar, B_bar = ssm.discretize(A, B_dense[:, None], 0.1, "bilinear")
    C_trunc = C_dense.real @ (torch.eye(2 * modes, dtype=F64) - torch.linalg.matrix_power(A_bar, L))
    # s4_kernel truncates C itself (C_is_truncated=False): compare with the untruncated dense kernel
    K_dense = ssm.ssm_kernel(A_bar, B_bar, C_dense.real[None, :], L)[0, 0]
    torch.testing.assert_close(K[0], K_dense, rtol=0, atol=1e-10)
    # and with C~ given, the truncated-C convention
    Ct = (C_trunc.to(C128) @ Vf)[None]
    K_t = s4.s4_kernel(Lf, Pf, Bf, Ct, log_step, L, C_is_truncated=True)
    torch.testing.assert_close(K_t[0], K_dense, rtol=0, atol=1e-9)


def test_s4_kernel_float32_close_to_float64():
    Lambda, P, B, C, log_step = random_dplr(4, 8, seed=13)
    L = 1000
    K64 = s4.s4_kernel_explicit(Lambda, P, B, C, log_step, L)
    args32 = [x.to(torch.complex64) for x in (Lambda, P, B, C)] + [log_step.float()]
    K32 = s4.s4_kernel(*args32, L)
    assert K32.dtype == torch.float32
    assert_near(K32, K64, 1e-4, "K in float32")


def test_s4_kernel_gradients_equal_explicit():
    Lambda, P, B, C, log_step = random_dplr(2, 4, seed=14)
    G = torch.randn(2, 11, generator=torch.Generator().manual_seed(15), dtype=F64)

    def grads(fn):
        leaves = [x.detach().clone().requires_grad_() for x in (Lambda, P, B, C, log_step)]
        (fn(*leaves, 11) * G).sum().backward()
        return [x.grad for x in leaves]

    for name, got, want in zip(
        ("Lambda", "P", "B", "C", "log_step"), grads(s4.s4_kernel), grads(s4.s4_kernel_explicit)
    ):
        assert want.abs().max() > 1e-3, name
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f"grad {name}")


def test_s4_kernel_gradcheck():
    Lambda, P, B, C, log_step = (x.requires_grad_() for x in random_dplr(1, 3, seed=16))
    for L in (4, 5):  # even L includes the point z = -1, filled in by its limit
        assert torch.autograd.gradcheck(
            lambda *a: s4.s4_kernel(*a, L), (Lambda, P, B, C, log_step), atol=1e-7
        )


def test_s4_kernel_validation():
    Lambda, P, B, C, log_step = random_dplr(2, 3, seed=17)
    with pytest.raises(ValueError, match="L must be a positive int"):
        s4.s4_kernel(Lambda, P, B, C, log_step, 0)
    with pytest.raises(ValueError, match=r"B must be \(H, N\)"):
        s4.s4_kernel(Lambda, P, B[0], C, log_step, 4)
    with pytest.raises(ValueError, match=r"Lambda must be \(H, N\) = \(2, 3\) or \(N,\)"):
        s4.s4_kernel(Lambda[:, :2], P, B, C, log_step, 4)
    with pytest.raises(ValueError, match=r"C must be \(H, N\)"):
        s4.s4_kernel(Lambda, P, B, C[:1], log_step, 4)
    with pytest.raises(ValueError, match=r"log_step must be \(H,\)"):
        s4.s4_kernel(Lambda, P, B, C, log_step[:1], 4)
    with pytest.raises(TypeError, match="log_step must be real"):
        s4.s4_kernel(Lambda, P, B, C, log_step.to(C128), 4)
    with pytest.raises(TypeError, match="P must be a torch.Tensor"):
        s4.s4_kernel_explicit(Lambda, None, B, C, log_step, 4)
    with pytest.raises(ValueError, match="C must be on the device of B"):
        s4.s4_kernel(Lambda, P, B, torch.empty(2, 3, dtype=C128, device="meta"), log_step, 4)


# --------------------------------------------------------------------------------------
# S4D initializations
# --------------------------------------------------------------------------------------


def test_s4d_init_formulas():
    H, N = 3, 6
    n = torch.arange(N, dtype=F64)
    lin = s4.s4d_init(H, N, "lin", dtype=C128)
    assert lin.shape == (H, N) and lin.dtype == C128
    torch.testing.assert_close(lin[1], torch.complex(torch.full((N,), -0.5, dtype=F64), math.pi * n))
    inv = s4.s4d_init(H, N, "inv", dtype=C128)
    torch.testing.assert_close(inv[2].imag, 2 * N / math.pi * (2 * N / (2 * n + 1) - 1))
    assert s4.s4d_init(H, N).dtype == torch.complex64
    # S4D-LegS: the eigenvalues with Im > 0 of LegS's normal part A + P P^T, found here by a
    # general eigensolver on the dense real matrix, no seqbook.hippo.nplr involved
    A, _ = hippo.transition("legs", 2 * N)
    Pn = torch.sqrt(torch.arange(2 * N, dtype=F64) + 0.5)
    eig = torch.linalg.eigvals(A + torch.outer(Pn, Pn))
    want = eig[eig.imag > 0]
    want = want[torch.argsort(want.imag)]
    legs = s4.s4d_init(H, N, "legs", dtype=C128)
    torch.testing.assert_close(legs[0], want, rtol=1e-9, atol=1e-9)
    # S4D-Inv approximates it (S4D, Sec. 4): same magnitudes, within 25% for every mode
    ratio = inv[0].imag.flip(0) / legs[0].imag
    assert torch.all((ratio > 0.75) & (ratio < 1.25)), ratio
    with pytest.raises(ValueError, match="kind must be one of"):
        s4.s4d_init(H, N, "fout")
    with pytest.raises(ValueError, match="N must be a positive int"):
        s4.s4d_init(H, 0)
    with pytest.raises(TypeError, match="dtype must be complex64 or complex128"):
        s4.s4d_init(H, N, dtype=torch.float32)


def test_s4d_kernel_is_reexported():
    assert s4.s4d_kernel is ssm.s4d_kernel


def test_s4_kernel_through_the_triton_cauchy_kernel(device):
    """The whole algorithm with the fused Cauchy kernel (interpreted on CPU, compiled on CUDA):
    output and every gradient against the float64 explicit form."""
    Lambda, P, B, C, log_step = random_dplr(2, 4, seed=18)
    G = torch.randn(2, 9, generator=torch.Generator().manual_seed(19), dtype=F64)

    def run(fn, dtype, **kw):
        cast = [x.to(dtype) for x in (Lambda, P, B, C)] + [log_step.to(torch.float32 if dtype != C128 else F64)]
        leaves = [x.to(device).requires_grad_() for x in cast]
        K = fn(*leaves, 9, **kw)
        (K * G.to(device, K.dtype)).sum().backward()
        return [K] + [x.grad for x in leaves]

    got = run(s4.s4_kernel, torch.complex64, backend="triton")
    want = run(s4.s4_kernel_explicit, C128)
    for name, x, y in zip(("K", "Lambda", "P", "B", "C", "log_step"), got, want):
        assert_near(x.cpu(), y.cpu(), 1e-4, name)
