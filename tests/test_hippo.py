"""Tests for seqbook.hippo (chapter 3): the HiPPO matrices, the basis, online projection, NPLR.

The matrices are checked twice, independently: against the entry formulas of the paper
(written out here as loops), and against the ODE itself, derived numerically: the
coefficients c(t) of a test function are computed by Gauss quadrature against numpy's
Legendre/Laguerre polynomials (no seqbook code), differentiated in t by central
differences, and compared with A c + B f. Everything in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.polynomial import laguerre as nplag
from numpy.polynomial import legendre as npleg

from seqbook import hippo

F64 = torch.float64


# --------------------------------------------------------------------------------------
# The matrices against the paper's entry formulas
# --------------------------------------------------------------------------------------


def paper_entries(measure, N):
    """Gu et al. 2020, Thm. 1 (LegT, LagT) and Thm. 2 (LegS), entry by entry, with c' = -A c + B f
    there; LegT in the orthonormal basis sqrt(2n+1) P_n(2(x - t) + 1)."""
    A = np.zeros((N, N))
    B = np.zeros(N)
    for n in range(N):
        for k in range(N):
            if measure == "legs":
                A[n, k] = math.sqrt((2 * n + 1) * (2 * k + 1)) if n > k else (n + 1 if n == k else 0.0)
            elif measure == "legt":
                A[n, k] = math.sqrt((2 * n + 1) * (2 * k + 1)) * (1.0 if k <= n else (-1.0) ** (n - k))
            elif measure == "lagt":
                A[n, k] = 1.0 if k <= n else 0.0
        B[n] = 1.0 if measure == "lagt" else math.sqrt(2 * n + 1)
    return -A, B  # this library's sign convention: c' = A c + B f


@pytest.mark.parametrize("measure", ["legs", "legt", "lagt"])
def test_matrices_match_the_papers_entries(measure):
    for N in (1, 2, 5, 12):
        A, B = hippo.transition(measure, N)
        A_ref, B_ref = paper_entries(measure, N)
        assert A.shape == (N, N) and B.shape == (N,) and A.dtype == F64
        np.testing.assert_allclose(A.numpy(), A_ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(B.numpy(), B_ref, rtol=0, atol=1e-12)
    A32, _ = hippo.transition(measure, 4, dtype=torch.float32)
    assert A32.dtype == torch.float32


def test_legt_is_the_papers_unnormalized_form_after_rescaling():
    """The paper's LegT (Thm. 1: A_nk = (2n+1) (-1)^(n-k) for n >= k, (2n+1) for n <= k,
    B_n = (2n+1)(-1)^n) is this one in the coordinates c_n -> (-1)^n sqrt(2n+1) c_n."""
    N = 7
    A, B = hippo.transition("legt", N)
    n = torch.arange(N, dtype=F64)
    S = torch.diag((-1.0) ** n * torch.sqrt(2 * n + 1))
    A_paper = -(S @ A @ torch.linalg.inv(S))
    expected = torch.empty(N, N, dtype=F64)
    for i in range(N):
        for k in range(N):
            expected[i, k] = (2 * i + 1) * ((-1.0) ** (i - k) if i >= k else 1.0)
    torch.testing.assert_close(A_paper, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(S @ B, (2 * n + 1) * (-1.0) ** n, rtol=0, atol=1e-12)


def test_all_measures_are_stable():
    for measure in ("legs", "legt", "lagt"):
        eig = torch.linalg.eigvals(hippo.transition(measure, 16)[0])
        assert eig.real.max() < 0, measure
    # FouT: Omega - e e^T has no eigenvalue to the right of the imaginary axis
    eig = torch.linalg.eigvals(hippo.transition("fout", 15)[0])
    assert eig.real.max() < 1e-10


# --------------------------------------------------------------------------------------
# The ODE derived numerically: projection by quadrature, derivative by central differences
# --------------------------------------------------------------------------------------

N_ODE = 7
XG, WG = npleg.leggauss(64)
XL, WL = nplag.laggauss(64)


def _numpy_basis(measure, t, x):
    """g_n(t, x) from numpy's polynomials, shape (len(x), N)."""
    eye = np.eye(N_ODE)
    s = np.sqrt(2 * np.arange(N_ODE) + 1)
    if measure == "legs":
        return s * np.stack([npleg.legval(2 * x / t - 1, eye[k]) for k in range(N_ODE)], -1)
    if measure == "legt":
        return s * np.stack([npleg.legval(2 * (x - t) + 1, eye[k]) for k in range(N_ODE)], -1)
    if measure == "lagt":
        return np.stack([nplag.lagval(t - x, eye[k]) for k in range(N_ODE)], -1)
    cols = [np.ones_like(x)]
    for k in range(1, N_ODE // 2 + 1):
        cols += [math.sqrt(2) * np.cos(2 * math.pi * k * (x - t)), math.sqrt(2) * np.sin(2 * math.pi * k * (x - t))]
    return np.stack(cols, -1)


def _coefficients(measure, f, t):
    """c_n(t) = int f(x) g_n(t, x) omega(t, x) dx by Gauss quadrature (exact for these f)."""
    if measure == "lagt":  # Gauss-Laguerre already carries the weight e^{-(t - x)}
        x = t - XL
        return (f(x)[:, None] * _numpy_basis(measure, t, x) * WL[:, None]).sum(0)
    a, b, omega = (0.0, t, 1.0 / t) if measure == "legs" else (t - 1.0, t, 1.0)
    x = (XG + 1) / 2 * (b - a) + a
    w = WG * (b - a) / 2 * omega
    return (f(x)[:, None] * _numpy_basis(measure, t, x) * w[:, None]).sum(0)


@pytest.mark.parametrize("measure", hippo.MEASURES)
def test_ode_derived_by_quadrature(measure):
    """d/dt of the projection equals A c + B f (LegS: divided by t), at several times.

    Test functions for which every derivation is exact: for LegT the reconstruction of
    f(t - 1) must be exact, so f is a polynomial of degree < N (also used for LegS and
    LagT); for FouT f must be 1-periodic and in the span, a trigonometric polynomial.
    """
    rng = np.random.default_rng(0)
    if measure == "fout":
        a = rng.standard_normal(N_ODE)

        def f(x):
            out = a[0] * np.ones_like(x)
            for k in range(1, N_ODE // 2 + 1):
                out = out + a[2 * k - 1] * np.cos(2 * math.pi * k * x) + a[2 * k] * np.sin(2 * math.pi * k * x)
            return out
    else:
        coef = rng.standard_normal(N_ODE)

        def f(x):
            return np.polynomial.polynomial.polyval(x, coef)

    A, B = (m.numpy() for m in hippo.transition(measure, N_ODE))
    h = 1e-5
    for t in (0.6, 1.3, 2.9):
        dc = (_coefficients(measure, f, t + h) - _coefficients(measure, f, t - h)) / (2 * h)
        rhs = A @ _coefficients(measure, f, t) + B * f(np.array(t))
        if measure == "legs":
            rhs = rhs / t
        scale = max(1.0, np.abs(dc).max())
        assert np.abs(dc - rhs).max() < 1e-7 * scale, (measure, t, np.abs(dc - rhs).max())


def test_ode_fails_for_a_wrong_matrix():
    """The check above can fail: perturb one entry of LegS and it does."""
    coef = np.random.default_rng(1).standard_normal(N_ODE)

    def f(x):
        return np.polynomial.polynomial.polyval(x, coef)

    A, B = (m.numpy() for m in hippo.transition("legs", N_ODE))
    A[3, 1] += 0.1
    t, h = 1.3, 1e-5
    dc = (_coefficients("legs", f, t + h) - _coefficients("legs", f, t - h)) / (2 * h)
    rhs = (A @ _coefficients("legs", f, t) + B * f(np.array(t))) / t
    assert np.abs(dc - rhs).max() > 1e-3


# --------------------------------------------------------------------------------------
# Basis and reconstruction
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("measure", hippo.MEASURES)
def test_basis_is_orthonormal_and_matches_numpy(measure):
    N, t = 9, 1.7
    if measure == "lagt":
        x, w = t - XL, WL
    else:
        a, b, omega = (0.0, t, 1.0 / t) if measure == "legs" else (t - 1.0, t, 1.0)
        x, w = (XG + 1) / 2 * (b - a) + a, WG * (b - a) / 2 * omega
    G = hippo.basis(measure, N, torch.tensor(x), t=t)
    assert G.shape == (len(x), N) and G.dtype == F64
    gram = G.T @ (G * torch.tensor(w)[:, None])
    torch.testing.assert_close(gram, torch.eye(N, dtype=F64), rtol=0, atol=1e-10)
    if measure != "fout":
        global N_ODE
        saved, N_ODE = N_ODE, N
        try:
            np.testing.assert_allclose(G.numpy(), _numpy_basis(measure, t, x), rtol=1e-10, atol=1e-10)
        finally:
            N_ODE = saved


def test_basis_is_zero_outside_the_window_and_reconstruct_is_exact_in_the_span():
    x = torch.linspace(-1.0, 3.0, 41, dtype=F64)
    G = hippo.basis("legs", 5, x, t=2.0)
    assert torch.all(G[(x < 0) | (x > 2)] == 0) and G[(x >= 0) & (x <= 2)].abs().sum() > 0
    G = hippo.basis("legt", 5, x, t=2.0)
    assert torch.all(G[(x < 1) | (x > 2)] == 0)
    # a polynomial of degree < N is reconstructed exactly from its quadrature coefficients
    coef = np.random.default_rng(2).standard_normal(N_ODE)

    def f(x):
        return np.polynomial.polynomial.polyval(x, coef)

    t = 1.5
    c = torch.tensor(_coefficients("legs", f, t))
    grid = torch.linspace(0, t, 50, dtype=F64)
    rec = hippo.reconstruct("legs", c, grid, t=t)
    torch.testing.assert_close(rec, torch.tensor(f(grid.numpy())), rtol=0, atol=1e-10)
    # batched coefficients (..., N) -> (..., T)
    assert hippo.reconstruct("legs", c.expand(3, 2, -1), grid, t=t).shape == (3, 2, 50)


# --------------------------------------------------------------------------------------
# Online projection
# --------------------------------------------------------------------------------------


def _signal(length):
    t = torch.arange(1, length + 1, dtype=F64) / length
    return t, (torch.sin(2 * math.pi * 3 * t) + 0.5 * torch.cos(2 * math.pi * 5 * t**2))[None]


@pytest.mark.parametrize("measure", ["legs", "legt"])
def test_online_reconstruction_error_decreases_with_N(measure):
    t, f = _signal(400)
    errors = []
    for N in (4, 12, 24, 48):
        c = hippo.hippo_online(measure, f, N)
        assert c.shape == (1, 400, N) and c.dtype == F64
        rec = hippo.reconstruct(measure, c[0, -1], t, t=1.0)
        errors.append(((rec - f[0]) ** 2).mean().sqrt().item())
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05 * errors[0], errors


def test_online_coefficients_converge_to_the_projection():
    """The discretized ODE's coefficients approach the exact (quadrature) projection as the
    sampling gets finer. LegS's ODE is exact for every f (nothing is approximated at the
    window's far end), so the only error is the discretization's: first order here, since
    the first samples are taken with steps 1, 1/2, 1/3, ... of the elapsed time."""

    def f(x):
        return np.sin(3 * x) + x**2

    exact = _coefficients("legs", f, 1.0)
    errs = []
    for length in (100, 200, 400):
        x = torch.arange(1, length + 1, dtype=F64) / length
        c = hippo.hippo_online("legs", torch.tensor(f(x.numpy()))[None], N_ODE, method="bilinear")
        errs.append(np.abs(c[0, -1].numpy() - exact).max())
    assert errs[0] < 5e-3 and errs[1] < 0.6 * errs[0] and errs[2] < 0.6 * errs[1], errs
    # LegS: invariant to the time scale, dt is ignored
    f1 = torch.randn(2, 50, dtype=F64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(hippo.hippo_online("legs", f1, 6, dt=0.1), hippo.hippo_online("legs", f1, 6, dt=7.0))


def test_online_legs_is_the_step_dependent_recurrence():
    """Sample k: c_k = (I - A/(2(k+1)))^{-1} [(I + A/(2(k+1))) c_{k-1} + B f_k / (k+1)], written out."""
    N, L = 5, 9
    A, B = hippo.transition("legs", N)
    f = torch.randn(1, L, dtype=F64, generator=torch.Generator().manual_seed(4))
    c = torch.zeros(N, dtype=F64)
    eye = torch.eye(N, dtype=F64)
    for k in range(L):
        d = 1.0 / (k + 1)
        c = torch.linalg.solve(eye - d / 2 * A, (eye + d / 2 * A) @ c + d * B * f[0, k])
    torch.testing.assert_close(hippo.hippo_online("legs", f, N)[0, -1], c, rtol=1e-12, atol=1e-12)
    # float32 signals give float32 coefficients close to the float64 ones
    c32 = hippo.hippo_online("legs", f.float(), N)
    assert c32.dtype == torch.float32
    torch.testing.assert_close(c32[0, -1].double(), c, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------
# Normal plus low-rank
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("measure", hippo.MEASURES)
def test_nplr_reconstructs_A(measure):
    for N in (1, 2, 7, 16, 64):
        A, B = hippo.transition(measure, N)
        Lambda, P, B_t, V = hippo.nplr(measure, N)
        r = 2 if measure == "legt" else 1
        assert Lambda.shape == (N,) and P.shape == (N, r) and B_t.shape == (N,) and V.shape == (N, N)
        assert Lambda.dtype == P.dtype == V.dtype == torch.complex128
        I = torch.eye(N, dtype=torch.complex128)
        torch.testing.assert_close(V.conj().T @ V, I, rtol=0, atol=1e-12)  # unitary
        A_rec = V @ hippo.dplr_matrix(Lambda, P) @ V.conj().T
        assert (A_rec - A).abs().max() < 1e-6 * max(1.0, A.abs().max().item())
        assert A_rec.imag.abs().max() < 1e-9
        torch.testing.assert_close(V @ B_t, B.to(torch.complex128), rtol=0, atol=1e-10)
        # the normal part has constant real part: -1/2 for legs and lagt, 0 for legt and fout
        expected_re = -0.5 if measure in ("legs", "lagt") else 0.0
        torch.testing.assert_close(Lambda.real, torch.full((N,), expected_re, dtype=F64), rtol=0, atol=1e-9)


def test_nplr_legs_low_rank_term_is_the_papers():
    """S4, Thm. 1 / Sec. 3.2: LegS + P P^T with P_n = sqrt(n + 1/2) is -I/2 plus a skew matrix."""
    N = 10
    A, _ = hippo.transition("legs", N)
    P = torch.sqrt(torch.arange(N, dtype=F64) + 0.5)
    S = A + torch.outer(P, P) + 0.5 * torch.eye(N, dtype=F64)
    torch.testing.assert_close(S, -S.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(hippo.nplr_P("legs", N)[:, 0], P)


def test_validation():
    with pytest.raises(ValueError, match="measure must be one of"):
        hippo.transition("legx", 4)
    with pytest.raises(ValueError, match="N must be a positive int"):
        hippo.transition("legs", 0)
    with pytest.raises(TypeError, match="dtype must be"):
        hippo.transition("legs", 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="t_grid must be a 1-D"):
        hippo.basis("legs", 4, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="t must be positive"):
        hippo.basis("legs", 4, torch.zeros(3), t=0.0)
    with pytest.raises(TypeError, match="coefficients must be a real"):
        hippo.reconstruct("legs", torch.zeros(3, dtype=torch.int64), torch.zeros(3))
    with pytest.raises(ValueError, match=r"f must be \(batch, length\)"):
        hippo.hippo_online("legs", torch.zeros(5), 4)
    with pytest.raises(TypeError, match="f must be a float32 or float64"):
        hippo.hippo_online("legs", torch.zeros(2, 5, dtype=torch.complex64), 4)
    with pytest.raises(ValueError, match="method must be one of"):
        hippo.hippo_online("legt", torch.zeros(2, 5), 4, method="rk4")
    with pytest.raises(ValueError, match="dt must be a positive number"):
        hippo.hippo_online("legt", torch.zeros(2, 5), 4, dt=-1.0)


def test_legs_eigenvector_condition_in_high_precision():
    # N = 2 by hand: A = [[-1, 0], [-sqrt 3, -2]], eigenvectors (1, -sqrt 3)/2 and (0, 1)
    W2 = np.array([[0.5, 0.0], [-math.sqrt(3) / 2, 1.0]])
    assert abs(hippo.legs_eigenvector_condition(2) - np.linalg.cond(W2)) < 1e-12 * np.linalg.cond(W2)
    # small N: float64 is still accurate (condition below 1e7), and numpy's eigenvectors agree
    for N in (3, 6, 10):
        A, _ = hippo.transition("legs", N)
        _, W = np.linalg.eig(A.numpy())
        want = np.linalg.cond(W)
        assert abs(hippo.legs_eigenvector_condition(N) - want) < 1e-6 * want, N
    # large N: more digits change nothing (the answer is converged), and the growth is exponential,
    # with the values an independent high-precision computation gave (9.9e16, 1.1e20, 1.2e23)
    c24 = hippo.legs_eigenvector_condition(24)
    assert abs(hippo.legs_eigenvector_condition(24, digits=90) - c24) < 1e-12 * c24
    conds = {N: hippo.legs_eigenvector_condition(N) for N in (24, 28, 32)}
    assert f"{conds[24]:.1e}" == "9.9e+16" and f"{conds[28]:.1e}" == "1.1e+20" and f"{conds[32]:.1e}" == "1.2e+23"
    assert 10 ** (0.7 * 4) < conds[28] / conds[24] < 10 ** (0.85 * 4)  # ~10^0.76 per unit of N
    with pytest.raises(ValueError, match="digits must be an int >= 20"):
        hippo.legs_eigenvector_condition(4, digits=5)
