"""Grading tests for chapter 3 (HiPPO, S4 and S4D): Exercises 1-7, 14 points.

Run by the grader (``python -m seqbook.grading grade ...``), one process per
submission; ``submission`` holds the student's functions, running in a
sandbox.  Each test compares a student function with its counterpart in
``seqbook.hippo`` / ``seqbook.s4`` (or, for Exercise 4, with a dense solve) on
seeded random float64 / complex128 problems of several sizes (size 1, odd
sizes, points shared by the channels or one row per channel).  While a student
function runs, the library's versions are blocked (FORBIDDEN below), and
Exercise 4 may not solve, factor or invert a matrix at all.  A test passes
only if every case does; the message names the first case and output that
differ, and how.

The exercises are in chapters/03_hippo_s4/s4.ipynb ("Exercises"; the chapter's
first notebook, hippo.ipynb, has none).  Contract:
  Exercise 1  hippo_legs(N) -> (A, B)                           == hippo.transition("legs", N)
  Exercise 2  hippo_legt(N) -> (A, B)                           == hippo.transition("legt", N)
  Exercise 3  cauchy_naive(v, z, w) -> k                        == s4.cauchy_reference(v, z, w)
  Exercise 4  woodbury_resolvent(Lambda, p, B, C, g) -> r       == C (g I - diag(Lambda) + p p^*)^{-1} B, per row
  Exercise 5  s4d_inv(H, modes) -> A                            == s4.s4d_init(H, modes, "inv", dtype=complex128)
  Exercise 6  legs_eigenvectors(N) -> E                          A E = E diag(-1..-N), unit columns, E_kk > 0;
                                                                 no eigensolver, factorization or solve
  Exercise 7  legs_online(f, N) -> c                             == hippo.hippo_online("legs", f, N)
Exercises 6 and 7 earn partial credit per case, with hints for the common mistakes.
Shapes: A (N, N), B (N,) float64; v, w, Lambda, p, B, C (H, N) complex; z (L,) or (H, L); g (H, L); k, r (H, L).
"""

import math

import pytest
import torch

from seqbook import hippo, s4
from seqbook.grading.checks import DENSE_SOLVERS, as_tuple, assert_close

F64, C128, C64 = torch.float64, torch.complex128, torch.complex64

# HiPPO matrices, Cauchy products, S4's kernel and initializations: the library's versions of
# every exercise (and the layers and kernels built on them) are blocked while the exercises run.
# Exercise 4 is the Woodbury identity: no N x N solve, factorization or inverse either, however
# it is reached (torch.linalg.solve, torch.inverse, Tensor.inverse, matrix_power(-1), ...).
S4 = ["seqbook.hippo.*", "seqbook.s4.*", "seqbook.nn.*", "seqbook.ssm.*", "seqbook.kernels.cauchy.*"]
FORBIDDEN = {"hippo_legs": S4, "hippo_legt": S4, "cauchy_naive": S4, "woodbury_resolvent": S4 + DENSE_SOLVERS,
             "s4d_inv": S4, "legs_eigenvectors": S4 + DENSE_SOLVERS, "legs_online": S4}
FORBIDDEN_WHY = {"woodbury_resolvent": "Exercise 4 asks for the Woodbury identity, which needs no N x N solve, "
                                       "factorization or inverse",
                 "legs_eigenvectors": "Exercise 6 asks for the eigenvectors by forward substitution, without an "
                                      "eigensolver, factorization or solve"}


@pytest.mark.points(2)
def test_hippo_legs(submission):
    """Exercise 1: A[n, k] = -s_n s_k (n > k), -(n + 1) (n = k), 0 (n < k); B = s, s_n = sqrt(2n + 1)."""
    for N in (1, 2, 3, 8, 17, 64):
        A_ref, B_ref = hippo.transition("legs", N)
        A, B = as_tuple(submission.hippo_legs(N), ("A", "B"), "hippo_legs")
        assert_close(A, A_ref, f"A (N = {N})", rtol=1e-12, atol=1e-12)
        assert_close(B, B_ref, f"B (N = {N})", rtol=1e-12, atol=1e-12)


@pytest.mark.points(2)
def test_hippo_legt(submission):
    """Exercise 2: A[n, k] = -s_n s_k (k <= n), -s_n s_k (-1)^(n-k) (k > n); B = s."""
    for N in (1, 2, 3, 8, 17, 64):
        A_ref, B_ref = hippo.transition("legt", N)
        A, B = as_tuple(submission.hippo_legt(N), ("A", "B"), "hippo_legt")
        assert_close(A, A_ref, f"A (N = {N})", rtol=1e-12, atol=1e-12)
        assert_close(B, B_ref, f"B (N = {N})", rtol=1e-12, atol=1e-12)


def _poles(H, N, gen, dtype=C128):
    """S4-like poles: Re in [-1, -0.5], Im near pi n (the S4D-Lin spread), complex."""
    n = torch.arange(N, dtype=F64)
    re = -0.5 - 0.5 * torch.rand(H, N, generator=gen, dtype=F64)
    im = math.pi * n + 0.3 * torch.randn(H, N, generator=gen, dtype=F64)
    return torch.complex(re, im).to(dtype)


@pytest.mark.points(2)
def test_cauchy_naive(submission):
    """Exercise 3: k[h, l] = sum_n v[h, n] / (z[h, l] - w[h, n]), z shared (L,) or per row (H, L)."""
    gen = torch.Generator().manual_seed(301)
    # (H, N, L, z shared?, dtype)
    cases = [(3, 8, 20, True, C128), (2, 5, 7, False, C128), (1, 1, 1, True, C128), (4, 33, 65, False, C128),
             (3, 16, 40, True, C64)]
    for H, N, L, shared, dtype in cases:
        v = torch.randn(H, N, generator=gen, dtype=C128).to(dtype)
        w = _poles(H, N, gen, dtype)
        z = (1j * (torch.rand((L,) if shared else (H, L), generator=gen, dtype=F64) * 2 - 1) * math.pi * N).to(dtype)
        ref = s4.cauchy_reference(v, z, w)
        got = submission.cauchy_naive(v, z, w)
        case = f"v {(H, N)} {dtype}, z {tuple(z.shape)}"
        tol = 1e-11 if dtype == C128 else 1e-4
        assert_close(got, ref, f"k ({case})", rtol=tol, atol=tol * float(ref.abs().max()))


@pytest.mark.points(3)
def test_woodbury_resolvent(submission):
    """Exercise 4: C_h (g I - diag(Lambda_h) + p_h p_h^*)^{-1} B_h at every point, against a dense solve."""
    gen = torch.Generator().manual_seed(302)
    for H, N, L in [(2, 6, 9), (3, 16, 40), (1, 1, 3), (2, 31, 17)]:
        Lambda = _poles(H, N, gen)
        p, B, C = (torch.randn(H, N, generator=gen, dtype=C128) for _ in range(3))
        g = 1j * (torch.rand(H, L, generator=gen, dtype=F64) * 2 - 1) * 4 * N  # on the imaginary axis, as in S4
        A = torch.diag_embed(Lambda) - p[:, :, None] * p.conj()[:, None, :]  # (H, N, N): A = diag(Lambda) - p p^*
        eye = torch.eye(N, dtype=C128)
        x = torch.linalg.solve(g[:, :, None, None] * eye - A[:, None], B[:, None, :, None])  # (H, L, N, 1)
        ref = (C[:, None, None, :] @ x)[..., 0, 0]  # (H, L)
        got = submission.woodbury_resolvent(Lambda, p, B, C, g)
        assert_close(got, ref, f"r (H = {H}, N = {N}, L = {L})", rtol=1e-9, atol=1e-10 * float(ref.abs().max()))


@pytest.mark.points(1)
def test_s4d_inv(submission):
    """Exercise 5: lambda_n = -1/2 + i (N/pi) (N/(2n+1) - 1), N = 2 modes, every row the same."""
    for H, modes in ((1, 1), (3, 16), (2, 7), (4, 64)):
        ref = s4.s4d_init(H, modes, "inv", dtype=C128)
        got = submission.s4d_inv(H, modes)
        assert_close(got, ref, f"A (H = {H}, modes = {modes})", rtol=1e-12, atol=1e-12)


def _legs_eigenvectors_reference(N):
    """Forward substitution in float64 (accurate at N <= 12, condition number <= 1e7)."""
    A, _ = hippo.transition("legs", N)
    W = torch.zeros(N, N, dtype=F64)
    for k in range(N):
        v = torch.zeros(N, dtype=F64)
        v[k] = 1.0
        for row in range(k + 1, N):
            v[row] = -(A[row, k:row] @ v[k:row]) / (A[row, row] + (k + 1))
        W[:, k] = v / v.norm()
    return W


@pytest.mark.points(2)
def test_legs_eigenvectors(submission, credit):
    """Exercise 6: column k solves (A + (k + 1) I) v = 0, unit norm, W_kk > 0; entries above k are 0."""
    for N in (1, 2, 3, 6, 9, 12):
        want = _legs_eigenvectors_reference(N)
        unnormalized = want / torch.diagonal(want)  # v_k = 1, never scaled
        mistakes = {"has the right directions but columns not scaled to unit length": unnormalized,
                    "has each column's sign flipped: make E[k, k] > 0": -want}
        case = f"N = {N}"
        with credit.case(case):
            W = submission.legs_eigenvectors(N)
            assert isinstance(W, torch.Tensor) and W.dtype == F64 and tuple(W.shape) == (N, N), (
                f"E ({case}): want a float64 ({N}, {N}) tensor, got {getattr(W, 'dtype', type(W))} "
                f"{tuple(getattr(W, 'shape', ()))}")
            assert_close(W, want, f"E ({case})", rtol=1e-8, atol=1e-10, mistakes=mistakes)


@pytest.mark.points(2)
def test_legs_online(submission, credit):
    """Exercise 7: the LegS recurrence, bilinear with step 1/(k + 1) at sample k."""
    gen = torch.Generator().manual_seed(307)
    for batch, length, N in ((1, 1, 1), (2, 30, 4), (1, 120, 9), (3, 64, 16)):
        f = torch.randn(batch, length, generator=gen, dtype=F64).cumsum(1) / 10
        want = hippo.hippo_online("legs", f, N)
        A, B = hippo.transition("legs", N)
        mistakes = {
            "looks like a fixed step 1/length (LegT's rule): LegS's 1/t makes the step 1/(k + 1) at sample k":
                _legs_fixed_step(f, A, B, 1.0 / length),
            "looks like the step 1/k, off by one: sample k arrives at t_k = (k + 1) dt, so the step is 1/(k + 1)":
                _legs_steps(f, A, B, [1.0 / max(k, 1) for k in range(length)]),
        }
        case = f"batch {batch}, length {length}, N {N}"
        with credit.case(case):
            got = submission.legs_online(f, N)
            assert_close(got, want, f"c ({case})", rtol=1e-9, atol=1e-11, mistakes=mistakes)


def _legs_steps(f, A, B, steps):
    N = A.shape[0]
    eye = torch.eye(N, dtype=F64)
    c, out = torch.zeros(f.shape[0], N, dtype=F64), []
    for k, eps in enumerate(steps):
        left = eye - eps / 2 * A
        A_bar, B_bar = torch.linalg.solve(left, eye + eps / 2 * A), torch.linalg.solve(left, eps * B)
        c = c @ A_bar.T + f[:, k, None] * B_bar
        out.append(c)
    return torch.stack(out, dim=1)


def _legs_fixed_step(f, A, B, eps):
    return _legs_steps(f, A, B, [eps] * f.shape[1])
