"""Tests for seqbook.ssm (chapter 2) and its Triton kernel seqbook.kernels.ssm_kernel.

Every claim of the chapter is checked here in float64 against an independent route:
discretizations against the exact solution from ``torch.linalg.matrix_exp``, their
convergence orders and stability, the recurrent == convolutional == FFT views, dense
== diagonal on a diagonalizable system, and the Triton kernel generator (output and
every gradient) against the float64 reference: through the interpreter on CPU, compiled
on CUDA when a GPU is present.
"""

from __future__ import annotations

import math

import pytest
import torch

from seqbook import ssm

F64 = torch.float64
C128 = torch.complex128

# The readable code runs anywhere; the Triton kernels run compiled on CUDA, or in the
# interpreter on CPU when there is no GPU (on a GPU machine CPU tensors cannot use them).
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])
KERNEL_DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else ["cpu"]


def hurwitz(N: int, gen: torch.Generator, margin: float = 0.2) -> torch.Tensor:
    """A random real (N, N) matrix whose eigenvalues all have real part <= -margin (complex pairs included)."""
    A = torch.randn(N, N, generator=gen, dtype=F64) / math.sqrt(N)
    shift = torch.linalg.eigvals(A).real.max() + margin
    return A - shift * torch.eye(N, dtype=F64)


def stable_eigs(shape, gen, dtype=C128) -> torch.Tensor:
    """Random complex eigenvalues with Re in [-1.1, -0.1], Im in [-4, 4]: decaying oscillations."""
    re = -(torch.rand(shape, generator=gen, dtype=F64) + 0.1)
    im = 8 * torch.rand(shape, generator=gen, dtype=F64) - 4
    return torch.complex(re, im).to(dtype)


def crandn(shape, gen, dtype=C128) -> torch.Tensor:
    return torch.complex(torch.randn(shape, generator=gen, dtype=F64), torch.randn(shape, generator=gen, dtype=F64)).to(
        dtype
    )


# --------------------------------------------------------------------------------------
# Discretization against the exact solution
# --------------------------------------------------------------------------------------


def test_zoh_dense_matches_closed_form_and_is_exact_for_piecewise_constant_input():
    gen = torch.Generator().manual_seed(0)
    N, M, steps, dt = 5, 2, 30, 0.3
    A, B = hurwitz(N, gen), torch.randn(N, M, generator=gen, dtype=F64)
    A_bar, B_bar = ssm.discretize(A, B, dt, "zoh")
    eAdt = torch.linalg.matrix_exp(dt * A)
    eye = torch.eye(N, dtype=F64)
    torch.testing.assert_close(A_bar, eAdt, rtol=0, atol=1e-13)
    # the textbook formula, with the inverse the augmented-matrix form avoids
    torch.testing.assert_close(B_bar, torch.linalg.solve(A, (eAdt - eye) @ B), rtol=0, atol=1e-12)

    # u held constant at u_k on ((k-1) dt, k dt]: the exact state at T = steps * dt is
    # x(T) = sum_k e^{A (T - k dt)} A^{-1} (e^{A dt} - I) B u_k, each term its own matrix exponential.
    u = torch.randn(1, steps, M, generator=gen, dtype=F64)
    _, x_last = ssm.ssm_recurrent(A_bar, B_bar, torch.eye(N, dtype=F64), None, u, return_state=True)
    one_step = torch.linalg.solve(A, (eAdt - eye) @ B)
    exact = sum(torch.linalg.matrix_exp((steps - 1 - k) * dt * A) @ one_step @ u[0, k] for k in range(steps))
    torch.testing.assert_close(x_last[0], exact, rtol=0, atol=1e-10)


def test_zoh_handles_singular_A():
    # An integrator (A = 0) has no A^{-1}; ZOH is still A_bar = I, B_bar = dt B, dense and diagonal.
    gen = torch.Generator().manual_seed(1)
    B = torch.randn(3, 2, generator=gen, dtype=F64)
    A_bar, B_bar = ssm.discretize(torch.zeros(3, 3, dtype=F64), B, 0.7, "zoh")
    torch.testing.assert_close(A_bar, torch.eye(3, dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(B_bar, 0.7 * B, rtol=0, atol=1e-15)
    a = torch.tensor([0.0, 1e-12, -3.0], dtype=C128, requires_grad=True)
    b = torch.ones(3, dtype=C128)
    A_bar, B_bar = ssm.discretize(a, b, 0.5, "zoh", diagonal=True)
    expected = torch.tensor([0.5, 0.5 * (1 + 0.25e-12), (math.exp(-1.5) - 1) / -3.0], dtype=C128)
    torch.testing.assert_close(B_bar, expected, rtol=1e-14, atol=0)
    # d B_bar / d a at a = 0 is dt^2 / 2 (phi1'(0) = 1/2), not the 0 a naive torch.where would give
    (grad,) = torch.autograd.grad(B_bar.real[0], a)
    assert abs(grad[0].real.item() - 0.125) < 1e-14


@pytest.mark.parametrize("diagonal", [False, True])
def test_convergence_orders(diagonal):
    """Free and step response at T = 1 against the exact solution: error ~ dt^order."""
    gen = torch.Generator().manual_seed(2)
    N, T = 4, 1.0
    A = hurwitz(N, gen) if not diagonal else stable_eigs((N,), gen)
    B = torch.randn(N, 1, generator=gen, dtype=F64) if not diagonal else crandn((N,), gen)
    x0 = torch.randn(N, generator=gen, dtype=F64).to(A.dtype)
    if diagonal:
        free_exact = torch.exp(A * T) * x0
        step_exact = torch.expm1(A * T) / A * B
    else:
        free_exact = torch.linalg.matrix_exp(A * T) @ x0
        step_exact = torch.linalg.solve(A, (torch.linalg.matrix_exp(A * T) - torch.eye(N, dtype=F64)) @ B)[:, 0]

    def errors(method, n):
        A_bar, B_bar = ssm.discretize(A, B, T / n, method, diagonal=diagonal)
        if diagonal:
            free, step = A_bar**n * x0, B_bar * (1 - A_bar**n) / (1 - A_bar)  # geometric sum
        else:
            free = torch.linalg.matrix_power(A_bar, n) @ x0
            u = torch.ones(1, n, 1, dtype=F64)
            _, x = ssm.ssm_recurrent(A_bar, B_bar, torch.eye(N, dtype=F64), None, u, return_state=True)
            step = x[0]
        return (free - free_exact).abs().max().item(), (step - step_exact).abs().max().item()

    for method, order in (("euler", 1), ("backward_euler", 1), ("bilinear", 2)):
        e1, e2 = errors(method, 200), errors(method, 400)
        for coarse, fine in zip(e1, e2):
            ratio = coarse / fine
            assert abs(math.log2(ratio) - order) < 0.1, (method, ratio)
    # ZOH: exact for the free response and for a constant input, at any step
    for n in (3, 200):
        assert max(errors("zoh", n)) < 1e-10  # rounding only (200 products); Euler errs by ~1e-3 here


def test_methods_against_their_formulas_dense_and_diagonal():
    """The dense code (solve, matrix_exp) and the elementwise diagonal code are two
    implementations of one table; on a diagonal A they must agree."""
    gen = torch.Generator().manual_seed(3)
    a = stable_eigs((5,), gen)
    b = crandn((5,), gen)
    step = torch.tensor([0.05, 0.5, 3.0], dtype=F64)  # one step per channel, (H,)
    for method in ssm.METHODS:
        A_bar, B_bar = ssm.discretize(a, b, step, method, diagonal=True)
        assert A_bar.shape == B_bar.shape == (3, 5)
        A_dense, B_dense = ssm.discretize(torch.diag_embed(a), b[:, None], step, method)
        assert A_dense.shape == (3, 5, 5) and B_dense.shape == (3, 5, 1)
        torch.testing.assert_close(torch.diagonal(A_dense, dim1=-2, dim2=-1), A_bar, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(B_dense[..., 0], B_bar, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# Stability
# --------------------------------------------------------------------------------------


def test_stability_preserved_by_bilinear_zoh_backward_euler_not_forward_euler():
    gen = torch.Generator().manual_seed(4)
    for trial in range(5):
        A = hurwitz(6, gen, margin=0.05)
        B = torch.randn(6, 1, generator=gen, dtype=F64)
        for step in (1e-3, 0.1, 1.0, 10.0, 1e3):
            for method in ("backward_euler", "bilinear", "zoh"):
                A_bar, _ = ssm.discretize(A, B, step, method)
                assert torch.linalg.eigvals(A_bar).abs().max() < 1, (method, step)
        A_bar, _ = ssm.discretize(A, B, 1e3, "euler")
        assert torch.linalg.eigvals(A_bar).abs().max() > 1  # forward Euler blows up at large steps
    # The whole left half-plane, diagonal form: z = dt * a with Re z < 0 maps into the unit disc.
    z = torch.complex(-torch.logspace(-4, 4, 60, dtype=F64)[:, None], torch.linspace(-1e3, 1e3, 61, dtype=F64))
    for method in ("backward_euler", "bilinear", "zoh"):
        A_bar, _ = ssm.discretize(z, torch.ones_like(z), 1.0, method, diagonal=True)
        assert (A_bar.abs() <= 1).all(), method
    A_bar, _ = ssm.discretize(z, torch.ones_like(z), 1.0, "euler", diagonal=True)
    assert (A_bar.abs() > 1).any() and (A_bar.abs() < 1).any()


# --------------------------------------------------------------------------------------
# Recurrent == convolutional == FFT
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_views_agree_dense(device, method):
    gen = torch.Generator().manual_seed(5)
    N, M, P, batch, L = 6, 2, 3, 2, 57
    A, B = hurwitz(N, gen), torch.randn(N, M, generator=gen, dtype=F64)
    C, D = torch.randn(P, N, generator=gen, dtype=F64), torch.randn(P, M, generator=gen, dtype=F64)
    u = torch.randn(batch, L, M, generator=gen, dtype=F64)
    A, B, C, D, u = (t.to(device) for t in (A, B, C, D, u))
    A_bar, B_bar = ssm.discretize(A, B, 0.2, method)
    y_rec = ssm.ssm_recurrent(A_bar, B_bar, C, D, u)
    K = ssm.ssm_kernel(A_bar, B_bar, C, L)
    assert K.shape == (P, M, L) and y_rec.shape == (batch, L, P)
    y_direct = ssm.ssm_convolve_direct(u, K, D)
    y_fft = ssm.ssm_convolve(u, K, D)
    assert y_rec.abs().max() > 0.1
    torch.testing.assert_close(y_direct, y_rec, rtol=0, atol=1e-10)
    torch.testing.assert_close(y_fft, y_rec, rtol=0, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_views_agree_diagonal(device):
    gen = torch.Generator().manual_seed(6)
    H, N, batch, L = 3, 4, 2, 64
    a, b, c = stable_eigs((H, N), gen), crandn((H, N), gen), crandn((H, N), gen)
    D = torch.randn(H, generator=gen, dtype=F64)
    step = torch.tensor([0.01, 0.1, 0.5], dtype=F64)
    u = torch.randn(batch, L, H, generator=gen, dtype=F64)
    a, b, c, D, step, u = (t.to(device) for t in (a, b, c, D, step, u))
    A_bar, B_bar = ssm.discretize(a, b, step, "zoh", diagonal=True)
    y_rec = ssm.ssm_recurrent(A_bar, B_bar, c, D, u, diagonal=True)
    K = ssm.ssm_kernel(A_bar, B_bar, c, L, diagonal=True)
    assert K.shape == (H, L) and not K.is_complex() and y_rec.dtype == F64
    torch.testing.assert_close(ssm.ssm_convolve_direct(u, K, D), y_rec, rtol=0, atol=1e-10)
    torch.testing.assert_close(ssm.ssm_convolve(u, K, D), y_rec, rtol=0, atol=1e-10)
    # the exp(l log A_bar) form of the S4D kernel == the powers A_bar^l
    K_s4d = ssm.s4d_kernel(a, b, c, step, L, backend="reference")
    torch.testing.assert_close(K_s4d, K, rtol=0, atol=1e-12)


def test_convolve_kernel_shorter_or_longer_than_input_and_complex():
    gen = torch.Generator().manual_seed(7)
    u = torch.randn(2, 40, 3, generator=gen, dtype=F64)
    for Lk in (1, 13, 40, 90):
        K = torch.randn(3, Lk, generator=gen, dtype=F64)
        torch.testing.assert_close(ssm.ssm_convolve(u, K), ssm.ssm_convolve_direct(u, K), rtol=0, atol=1e-10)
    Kc = crandn((3, 25), gen)
    y = ssm.ssm_convolve(u, Kc)
    assert y.is_complex()
    torch.testing.assert_close(y, ssm.ssm_convolve_direct(u, Kc), rtol=0, atol=1e-10)


def test_recurrent_state_carries_over_and_time_varying_system():
    gen = torch.Generator().manual_seed(8)
    # Dense: two halves with the state handed over == one run
    A, B = hurwitz(3, gen), torch.randn(3, 2, generator=gen, dtype=F64)
    C = torch.randn(2, 3, generator=gen, dtype=F64)
    A_bar, B_bar = ssm.discretize(A, B, 0.1, "bilinear")
    u = torch.randn(2, 30, 2, generator=gen, dtype=F64)
    y = ssm.ssm_recurrent(A_bar, B_bar, C, None, u)
    y1, x1 = ssm.ssm_recurrent(A_bar, B_bar, C, None, u[:, :11], return_state=True)
    y2 = ssm.ssm_recurrent(A_bar, B_bar, C, None, u[:, 11:], x0=x1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=0, atol=1e-12)

    # Diagonal with a step that changes with time (the selective SSM of chapter 4):
    # x_L-1 = sum_k (prod_{j>k} A_bar_j) B_bar_k u_k, computed with products instead of a loop.
    batch, L, H, N = 2, 25, 3, 4
    a, b, c = stable_eigs((H, N), gen), crandn((H, N), gen), crandn((H, N), gen)
    step = 0.3 * torch.rand(batch, L, H, generator=gen, dtype=F64) + 0.01
    u = torch.randn(batch, L, H, generator=gen, dtype=F64)
    A_bar, B_bar = ssm.discretize(a, b, step, "zoh", diagonal=True)
    assert A_bar.shape == (batch, L, H, N)
    y, x = ssm.ssm_recurrent(A_bar, B_bar, c, None, u, diagonal=True, return_state=True)
    log_decay = (step[..., None] * a).flip(1).cumsum(1).flip(1)  # sum_{j >= k} dt_j a
    after_k = torch.exp(log_decay - step[..., None] * a)  # prod_{j > k} A_bar_j
    x_expected = (after_k * B_bar * u[..., None]).sum(1)
    torch.testing.assert_close(x, x_expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(y[:, -1], (c * x).sum(-1).real, rtol=0, atol=1e-12)
    # Time-invariant parameters given in full (batch, length, H, N) == given as (H, N)
    A_bar, B_bar = ssm.discretize(a, b, 0.2, "zoh", diagonal=True)
    full = (batch, L, H, N)
    torch.testing.assert_close(
        ssm.ssm_recurrent(A_bar.expand(full), B_bar.expand(full), c.expand(full), None, u, diagonal=True),
        ssm.ssm_recurrent(A_bar, B_bar, c, None, u, diagonal=True),
        rtol=0,
        atol=1e-14,
    )


# --------------------------------------------------------------------------------------
# Dense == diagonal on a diagonalizable system; continuous responses
# --------------------------------------------------------------------------------------


def test_dense_and_diagonal_paths_agree():
    gen = torch.Generator().manual_seed(9)
    N, L, dt = 6, 80, 0.15
    A = hurwitz(N, gen)
    B, C = torch.randn(N, generator=gen, dtype=F64), torch.randn(N, generator=gen, dtype=F64)
    Lam, B_t, C_t = ssm.diagonalize(A, B, C)
    assert Lam.is_complex() and Lam.imag.abs().max() > 0.01  # a real A with oscillating modes
    for method in ssm.METHODS:
        A_bar, B_bar = ssm.discretize(A, B[:, None], dt, method)
        K_dense = ssm.ssm_kernel(A_bar, B_bar, C[None, :], L)[0, 0]  # (L,)
        A_bar_d, B_bar_d = ssm.discretize(Lam, B_t, dt, method, diagonal=True)
        K_diag = ssm.ssm_kernel(A_bar_d, B_bar_d, C_t, L, diagonal=True)
        torch.testing.assert_close(K_diag, K_dense, rtol=0, atol=1e-10)
    # and the recurrences: one real dense system, N complex modes
    u = torch.randn(2, L, 1, generator=gen, dtype=F64)
    A_bar, B_bar = ssm.discretize(A, B[:, None], dt, "zoh")
    A_bar_d, B_bar_d = ssm.discretize(Lam, B_t, dt, "zoh", diagonal=True)
    y_dense = ssm.ssm_recurrent(A_bar, B_bar, C[None, :], None, u)
    y_diag = ssm.ssm_recurrent(A_bar_d[None], B_bar_d[None], C_t[None], None, u, diagonal=True)
    torch.testing.assert_close(y_diag, y_dense, rtol=0, atol=1e-10)


def test_impulse_and_step_response():
    gen = torch.Generator().manual_seed(10)
    N, dt, L = 5, 0.1, 40
    A = hurwitz(N, gen)
    B, C = torch.randn(N, 1, generator=gen, dtype=F64), torch.randn(1, N, generator=gen, dtype=F64)
    times = dt * torch.arange(1, L + 1, dtype=F64)
    # impulse response == the diagonal form Re sum_n C~_n B~_n e^{lambda_n t}
    Lam, B_t, C_t = ssm.diagonalize(A, B[:, 0], C[0])
    h = ssm.impulse_response(A, B, C, times)[:, 0, 0]
    torch.testing.assert_close(h, (C_t * B_t * torch.exp(times[:, None] * Lam)).sum(-1).real, rtol=0, atol=1e-12)
    # step response at (k+1) dt == the running sum of the ZOH kernel (exact for a constant input)
    s = ssm.step_response(A, B, C, times)[:, 0, 0]
    A_bar, B_bar = ssm.discretize(A, B, dt, "zoh")
    torch.testing.assert_close(s, ssm.ssm_kernel(A_bar, B_bar, C, L)[0, 0].cumsum(0), rtol=0, atol=1e-12)
    # and the closed form C A^{-1} (e^{AT} - I) B at the last time
    eAT = torch.linalg.matrix_exp(A * times[-1])
    closed = C @ torch.linalg.solve(A, (eAT - torch.eye(N, dtype=F64)) @ B)
    torch.testing.assert_close(s[-1], closed[0, 0], rtol=0, atol=1e-12)


def test_discretize_gradients():
    gen = torch.Generator().manual_seed(11)
    A = hurwitz(3, gen).requires_grad_()
    B = torch.randn(3, 2, generator=gen, dtype=F64, requires_grad=True)
    step = torch.tensor([0.1, 0.7], dtype=F64, requires_grad=True)
    a = stable_eigs((2, 3), gen).requires_grad_()
    b = crandn((2, 3), gen).requires_grad_()
    for method in ssm.METHODS:
        assert torch.autograd.gradcheck(lambda A, B, s: ssm.discretize(A, B, s, method), (A, B, step))
        assert torch.autograd.gradcheck(lambda a, b, s: ssm.discretize(a, b, s, method, diagonal=True), (a, b, step))


# --------------------------------------------------------------------------------------
# The Triton kernel generator == the float64 reference (output and every gradient)
# --------------------------------------------------------------------------------------


def _s4d_params(H, N, gen, device, dtype=torch.complex64):
    """S4D-Lin-like parameters (Gu et al. 2022, S4D Sec. 4): A = -1/2 + i pi n with noise,
    random complex B and C, steps log-uniform in [1e-3, 1e-1]."""
    n = torch.arange(N, dtype=F64)
    re = -0.5 + 0.2 * torch.rand(H, N, generator=gen, dtype=F64) - 0.1
    A = torch.complex(re, math.pi * n + torch.randn(H, N, generator=gen, dtype=F64))
    B, C = crandn((H, N), gen), crandn((H, N), gen)
    step = torch.exp(torch.empty(H, dtype=F64).uniform_(math.log(1e-3), math.log(1e-1), generator=gen))
    return [A.to(device, dtype), B.to(device, dtype), C.to(device, dtype), step.to(device, dtype.to_real())]


def _assert_close_scaled(actual, expected, rtol, what):
    """Error relative to the largest entry: the kernel sums N terms in float32, so an entry
    that cancels to near zero carries the rounding of the large ones."""
    actual = actual.to(expected.dtype)
    scale = expected.abs().max().item()
    assert scale > 0, what
    assert torch.isfinite(actual).all(), what
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:.0e} * {scale:.3e}"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize(
    "H, N, L, method",
    [(3, 4, 1, "zoh"), (5, 8, 7, "zoh"), (4, 5, 100, "zoh"), (3, 6, 300, "bilinear"), (2, 40, 1500, "zoh")],
)
def test_triton_kernel_matches_reference(device, H, N, L, method):
    gen = torch.Generator().manual_seed(H * 1000 + N * 10 + L)
    params = [p.requires_grad_() for p in _s4d_params(H, N, gen, device)]
    K = ssm.s4d_kernel(*params, L, method=method, backend="triton")
    assert K.shape == (H, L) and K.dtype == torch.float32 and K.device.type == device

    ref = [p.detach().to(C128 if p.is_complex() else F64).requires_grad_() for p in params]
    K_ref = ssm.s4d_kernel(*ref, L, method=method, backend="reference")
    _assert_close_scaled(K, K_ref, 1e-5, "K")

    dK = torch.randn(H, L, generator=gen, dtype=F64).to(device)
    (K * dK.float()).sum().backward()
    (K_ref * dK).sum().backward()
    for name, p, r in zip(("A", "B", "C", "step"), params, ref):
        # complex gradients hold d/d(real part) and d/d(imaginary part) together
        _assert_close_scaled(p.grad, r.grad, 1e-4, f"grad {name}")
    assert params[0].grad.real.abs().max() > 0 and params[0].grad.imag.abs().max() > 0


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_triton_core_real_inputs_and_float64(device):
    """vandermonde_kernel on real (non-oscillating) modes and complex128 inputs: the kernel computes in
    float32, returns the matching real dtype, and gives real inputs real gradients."""
    gen = torch.Generator().manual_seed(12)
    H, N, L = 3, 5, 33
    W = torch.randn(H, N, generator=gen, dtype=F64).to(device).requires_grad_()
    lam = (-torch.rand(H, N, generator=gen, dtype=F64) * 0.3).to(device).requires_grad_()
    K = ssm.vandermonde_kernel(W, lam, L, backend="triton")
    assert K.dtype == F64
    K_ref = ssm.vandermonde_kernel(W, lam, L, backend="reference")
    _assert_close_scaled(K, K_ref, 1e-5, "K")
    g = torch.randn(H, L, generator=gen, dtype=F64).to(device)
    grads = torch.autograd.grad((K * g).sum(), (W, lam))
    grads_ref = torch.autograd.grad((K_ref * g).sum(), (W, lam))
    for name, got, want in zip(("W", "log_A_bar"), grads, grads_ref):
        assert got.dtype == F64
        _assert_close_scaled(got, want, 1e-4, name)


def test_backend_auto_on_cpu_is_reference():
    gen = torch.Generator().manual_seed(13)
    A, B, C, step = _s4d_params(2, 3, gen, "cpu", C128)
    K = ssm.s4d_kernel(A, B, C, step, 10)  # auto on CPU tensors: the readable code, in float64
    assert K.dtype == F64
    torch.testing.assert_close(K, ssm.s4d_kernel(A, B, C, step, 10, backend="reference"), rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# Bad input gets a clear error
# --------------------------------------------------------------------------------------


def test_validation():
    def ones(shape, dtype=F64):
        return torch.ones(shape, dtype=dtype)

    A, B = -torch.eye(3, dtype=F64), ones((3, 1))
    abc = (-ones((2, 3), C128), ones((2, 3), C128), ones((2, 3), C128))
    with pytest.raises(ValueError, match="method must be one of"):
        ssm.discretize(A, B, 0.1, "rk4")
    with pytest.raises(ValueError, match="diagonal=True"):
        ssm.discretize(torch.ones(2, 3, dtype=F64), B, 0.1)
    with pytest.raises(ValueError, match="B must be"):
        ssm.discretize(A, torch.ones(4, 1, dtype=F64), 0.1)
    with pytest.raises(ValueError, match="step must be positive"):
        ssm.discretize(A, B, 0.0)
    with pytest.raises(TypeError, match="step"):
        ssm.discretize(A, B, torch.tensor(0.1j))
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        ssm.discretize([[1.0]], B, 0.1)
    with pytest.raises(TypeError, match="floating-point"):
        ssm.discretize(torch.eye(3, dtype=torch.int64), B, 0.1)
    with pytest.raises(ValueError, match="do not broadcast"):
        ssm.discretize(-ones((2, 3), C128), ones((2, 3), C128), ones((4,)), diagonal=True)
    with pytest.raises(ValueError, match="u must be"):
        ssm.ssm_recurrent(A, B, torch.ones(1, 3, dtype=F64), None, torch.ones(5, 1, dtype=F64))
    with pytest.raises(ValueError, match="B_bar must be"):
        ssm.ssm_recurrent(A, ones((3, 2)), ones((1, 3)), None, ones((1, 5, 1)))
    with pytest.raises(ValueError, match="A_bar must be"):
        ssm.ssm_recurrent(ones((2, 3)), ones((2, 3)), ones((2, 3)), None, ones((1, 5, 4)), diagonal=True)
    with pytest.raises(ValueError, match="length must be a positive int"):
        ssm.ssm_kernel(A, B, torch.ones(1, 3, dtype=F64), 0)
    with pytest.raises(ValueError, match="K must be"):
        ssm.ssm_convolve(torch.ones(1, 5, 2), torch.ones(3, 5))
    with pytest.raises(ValueError, match="D must be"):
        ssm.ssm_convolve(torch.ones(1, 5, 3), torch.ones(3, 5), torch.ones(2))
    with pytest.raises(ValueError, match="method must be one of"):
        ssm.s4d_kernel(*abc, 0.1, 5, method="euler")
    with pytest.raises(ValueError, match="step must be a number or"):
        ssm.s4d_kernel(*abc, ones((3,)), 5)
    with pytest.raises(ValueError, match="backend must be one of"):
        ssm.s4d_kernel(*abc, 0.1, 5, backend="cuda")
    with pytest.raises(ValueError, match="B must broadcast to"):
        ssm.s4d_kernel(abc[0], ones((3, 2), C128), abc[2], 0.1, 5)
    with pytest.raises(ValueError, match="W and log_A_bar must both be"):
        ssm.vandermonde_kernel(ones((2, 3), C128), ones((3,), C128), 5)
