"""Grading tests for chapter 2 (state space models): Exercises 1-5, 13 points.

Run by the grader (``python -m seqbook.grading grade ...``), one process per
submission; ``submission`` holds the student's functions, running in a
sandbox.  Each test compares a student function with its counterpart in
``seqbook.ssm`` on seeded random float64 / complex128 problems of several
shapes (channels, a batch of per-token steps, size-1 dimensions, lengths that
are not powers of two).  Each case earns its share of the test's points
(``credit``); the message names the cases and outputs that differ, how, and the
likely mistake (Euler's B-bar instead of ZOH's, exp(z) - 1 instead of expm1, a
reversed kernel, a circular convolution...).

While a student function runs, the library's SSM functions are blocked
(FORBIDDEN below): a wrapper around ``seqbook.ssm.discretize`` earns nothing.

Contract (chapters/02_ssm/ssm.ipynb, "Exercises"):
  Exercise 1  discretize_zoh_diag(A, B, step) -> (A_bar, B_bar)   == ssm.discretize(A, B, step, "zoh", diagonal=True)
  Exercise 2  ssm_kernel_diag(A_bar, B_bar, C, length) -> K       == ssm.ssm_kernel(A_bar, B_bar, C, length, diagonal=True)
  Exercise 3  bilinear(A, B, step) -> (A_bar, B_bar)              == ssm.discretize(A, B, step, "bilinear")
  Exercise 4  causal_conv_fft(u, K) -> y                          == ssm.ssm_convolve(u, K)
  Exercise 5  step_response_diag(A_bar, B_bar, C, length) -> y    == ssm.ssm_kernel(..., diagonal=True).cumsum(-1)
Shapes: diagonal A, B, C (..., N), step broadcasting with A.shape[:-1]; dense A (..., N, N), B (..., N, M);
u (batch, L, H), K (H, L_K).
"""

import math

import pytest
import torch

from seqbook import ssm
from seqbook.grading.checks import as_tuple, assert_close

F64, C128 = torch.float64, torch.complex128

# Everything that discretizes, builds kernels or convolves: the SSM module, the layers built on
# it, S4's and Mamba's versions, and the Triton kernel of the Vandermonde product.
SSM = ["seqbook.ssm.*", "seqbook.s4.*", "seqbook.nn.*", "seqbook.mamba.*", "seqbook.kernels.ssm_kernel.*"]
FORBIDDEN = {"discretize_zoh_diag": SSM, "ssm_kernel_diag": SSM, "bilinear": SSM, "causal_conv_fft": SSM,
             "step_response_diag": SSM}


def _stable_eigenvalues(shape, gen, kind):
    """Eigenvalues with negative real part (complex: also a spread of frequencies)."""
    re = -(torch.rand(shape, generator=gen, dtype=F64) * 3 + 0.01)
    if kind == "real":
        return re
    return torch.complex(re, 6 * torch.randn(shape, generator=gen, dtype=F64))


@pytest.mark.points(3)
def test_discretize_zoh_diag(submission, credit):
    """Exercise 1: A_bar = exp(step A), B_bar = step * expm1(z)/z * B, with phi1(0) = 1."""
    gen = torch.Generator().manual_seed(201)
    # (A shape, step shape, kind, what the case probes)
    cases = [
        ((4, 6), (4,), "complex", "H channels, one step each"),
        ((3, 5), (2, 9, 3), "complex", "one step per token: step (batch, length, H)"),
        ((5, 3), (5,), "real", "real eigenvalues"),
        ((1, 1), (1,), "complex", "size-1 dims"),
        ((3, 4), (3,), "tiny", "eigenvalues near 0 and exactly 0 (needs expm1)"),
    ]
    for shape, step_shape, kind, what in cases:
        if kind == "tiny":
            A = 1e-9 * torch.randn(shape, generator=gen, dtype=C128)
            A[0, 0] = 0
            A[1, 2] = 0
        else:
            A = _stable_eigenvalues(shape, gen, kind)
        B = torch.randn(shape, generator=gen, dtype=A.dtype)
        step = torch.rand(step_shape, generator=gen, dtype=F64) * 0.5 + 0.01
        A_bar_ref, B_bar_ref = ssm.discretize(A, B, step, "zoh", diagonal=True)
        dt = step.unsqueeze(-1)
        z = dt * A
        zero = z == 0
        safe = torch.where(zero, torch.ones_like(z), z)
        mistakes_B = {
            "looks like Euler's B-bar (step * B, what Mamba's code uses), not ZOH's step * phi1(step A) * B":
                (dt * B).expand(B_bar_ref.shape),
            "looks like (exp(z) - 1) / z: near z = 0 that loses its digits to cancellation; use torch.expm1(z) / z":
                torch.where(zero, torch.ones_like(z), (torch.exp(z) - 1) / safe) * dt * B,
            "is NaN where step * A = 0: phi1(0) = 1, so take 1 there (torch.where) instead of dividing 0 by 0":
                torch.expm1(z) / z * dt * B,
            "looks like phi1(step A) * B without the step: B_bar = step * phi1(step A) * B":
                torch.where(zero, torch.ones_like(z), torch.expm1(z) / safe) * B,
        }
        mistakes_A = {"looks like forward Euler's 1 + step A, not ZOH's exp(step A)": 1 + z}
        case = f"A {tuple(A.shape)} {A.dtype}, step {tuple(step.shape)}: {what}"
        with credit.case(case):
            A_bar, B_bar = as_tuple(submission.discretize_zoh_diag(A, B, step), ("A_bar", "B_bar"),
                                    "discretize_zoh_diag")
            assert_close(A_bar, A_bar_ref, f"A_bar ({case})", rtol=1e-10, atol=1e-12, mistakes=mistakes_A)
            assert_close(B_bar, B_bar_ref, f"B_bar ({case})", rtol=1e-10, atol=1e-12, mistakes=mistakes_B)


@pytest.mark.points(3)
def test_ssm_kernel_diag(submission, credit):
    """Exercise 2: K[..., l] = Re sum_n C B_bar A_bar^l."""
    gen = torch.Generator().manual_seed(202)
    # (shape, length, kind)
    cases = [((4, 8), 64, "complex"), ((2, 3, 5), 37, "complex"), ((3, 4), 25, "real, some negative"),
             ((1, 1), 1, "complex"), ((2, 6), 100, "complex, from ZOH")]
    for shape, length, kind in cases:
        if kind == "complex":
            A_bar = torch.rand(shape, generator=gen, dtype=F64) * 0.98 * torch.exp(
                1j * math.pi * torch.rand(shape, generator=gen, dtype=F64))
        elif kind.startswith("real"):
            A_bar = torch.rand(shape, generator=gen, dtype=F64) * 1.9 - 0.95
        else:  # a discretized system, as the chapter builds it
            A = _stable_eigenvalues(shape, gen, "complex")
            A_bar, _ = ssm.discretize(A, torch.ones_like(A), torch.rand(shape[0], generator=gen, dtype=F64) * 0.2,
                                      "zoh", diagonal=True)
        if kind != "complex, from ZOH" and A_bar.numel() > 1:
            A_bar.view(-1)[1] = 0  # forward Euler with step * a = -1 gives exactly this: A_bar^0 is still 1
        B_bar = torch.randn(shape, generator=gen, dtype=A_bar.dtype)
        C = torch.randn(shape, generator=gen, dtype=A_bar.dtype)
        ref = ssm.ssm_kernel(A_bar, B_bar, C, length, diagonal=True)
        scale = float(ref.abs().max())
        mistakes = {}
        if length > 1:
            mistakes["K is reversed (newest first): K[l] weighs the input l steps back, so K[0] = C B_bar, "
                     "K[1] = C A_bar B_bar, ..."] = ref.flip(-1)
            mistakes["K[l] uses A_bar^(l+1): the kernel starts at A_bar^0 = 1"] = ssm.ssm_kernel(
                A_bar, A_bar * B_bar, C, length, diagonal=True)
        case = f"A_bar {tuple(shape)} {kind}, length {length}"
        with credit.case(case):
            got = submission.ssm_kernel_diag(A_bar, B_bar, C, length)
            assert_close(got, ref, f"K ({case})", rtol=1e-9, atol=1e-11 * scale, mistakes=mistakes)


@pytest.mark.points(2)
def test_bilinear(submission, credit):
    """Exercise 3: (I - step/2 A)^-1 (I + step/2 A) and (I - step/2 A)^-1 step B, batched."""
    gen = torch.Generator().manual_seed(203)
    # (A shape, B shape, step: a number or a shape)
    cases = [((4, 4), (4, 2), 0.1), ((3, 5, 5), (5, 1), (3,)), ((3, 3), (3, 3), (2,)),
             ((2, 3, 3), (2, 3, 2), (2,)), ((1, 1), (1, 1), 1.0)]
    for shape_A, shape_B, step in cases:
        N = shape_A[-1]
        A = torch.randn(shape_A, generator=gen, dtype=F64) / math.sqrt(N) - torch.eye(N, dtype=F64)
        B = torch.randn(shape_B, generator=gen, dtype=F64)
        if isinstance(step, tuple):
            step = torch.rand(step, generator=gen, dtype=F64) * 0.5 + 0.01
        A_bar_ref, B_bar_ref = ssm.discretize(A, B, step, "bilinear")
        dt = torch.as_tensor(step, dtype=F64)[..., None, None]
        lhs = torch.eye(N, dtype=F64) - dt / 2 * A
        mistakes_B = {"is missing the step: B_bar = (I - step/2 A)^-1 step B":
                      torch.linalg.solve(lhs, B.expand(*lhs.shape[:-2], *B.shape[-2:])),
                      "looks like Euler's step * B: the bilinear B_bar is (I - step/2 A)^-1 step B":
                      (dt * B).expand(B_bar_ref.shape)}
        mistakes_A = {"looks like forward Euler's I + step A": torch.eye(N, dtype=F64) + dt * A}
        step_desc = f"step {step}" if isinstance(step, float) else f"step {tuple(step.shape)}"
        case = f"A {shape_A}, B {shape_B}, {step_desc}"
        with credit.case(case):
            A_bar, B_bar = as_tuple(submission.bilinear(A, B, step), ("A_bar", "B_bar"), "bilinear")
            assert_close(A_bar, A_bar_ref, f"A_bar ({case})", rtol=1e-10, atol=1e-12, mistakes=mistakes_A)
            assert_close(B_bar, B_bar_ref, f"B_bar ({case})", rtol=1e-10, atol=1e-12, mistakes=mistakes_B)


@pytest.mark.points(2)
def test_causal_conv_fft(submission, credit):
    """Exercise 4: y[b, k, h] = sum_{j <= k} K[h, j] u[b, k - j, h]; kernels shorter or longer than u."""
    gen = torch.Generator().manual_seed(204)
    # ((batch, L, H), L_K)
    cases = [((2, 128, 3), 128), ((1, 37, 4), 10), ((3, 16, 2), 50), ((2, 1, 1), 1), ((1, 300, 5), 299)]
    for (batch, L, H), L_K in cases:
        u = torch.randn(batch, L, H, generator=gen, dtype=F64)
        K = torch.randn(H, L_K, generator=gen, dtype=F64) * torch.exp(-torch.arange(L_K, dtype=F64) / 50)
        ref = ssm.ssm_convolve(u, K)
        scale = float(ref.abs().max())
        # the same product without padding: a circular convolution of length L
        circular = torch.fft.irfft(torch.fft.rfft(u, n=L, dim=1) * torch.fft.rfft(K, n=L, dim=-1).T, n=L, dim=1)
        mistakes = {"looks like a circular convolution: pad both FFTs to n >= L + L_K - 1, or the end of the "
                    "sequence wraps around into its start": circular} if L > 1 else {}
        case = f"u {(batch, L, H)}, K {(H, L_K)}"
        with credit.case(case):
            got = submission.causal_conv_fft(u, K)
            assert_close(got, ref, f"y ({case})", rtol=1e-9, atol=1e-11 * scale, mistakes=mistakes)


@pytest.mark.points(3)
def test_step_response_diag(submission, credit):
    """Exercise 5: y_k = Re sum_n C B_bar (1 + A_bar + ... + A_bar^k), in closed form; A_bar == 1 included."""
    gen = torch.Generator().manual_seed(205)
    # (shape, length, kind)
    cases = [((3, 4), 50, "complex"), ((2, 3, 5), 37, "complex"), ((4, 3), 25, "real"),
             ((1, 1), 1, "complex"), ((2, 6), 120, "complex, an integrator (A_bar = 1)")]
    for shape, length, kind in cases:
        A = _stable_eigenvalues(shape, gen, "real" if kind == "real" else "complex")
        if "integrator" in kind:
            A[0, 0] = 0  # ZOH of a = 0 gives A_bar = 1 exactly: the series is k + 1 equal terms
        B = torch.randn(shape, generator=gen, dtype=A.dtype)
        C = torch.randn(shape, generator=gen, dtype=A.dtype)
        A_bar, B_bar = ssm.discretize(A, B, 0.2, "zoh", diagonal=True)
        kernel = ssm.ssm_kernel(A_bar, B_bar, C, length, diagonal=True)
        ref = kernel.cumsum(-1)
        scale = float(ref.abs().max())
        mistakes = {"looks like the kernel (the impulse response): the step response is its running sum, "
                    "y_k = K_0 + ... + K_k": kernel}
        if length > 1:
            mistakes["has one term too few: x_k sums A_bar^0 ... A_bar^k (k + 1 terms), since the input "
                     "starts at k = 0"] = ref - kernel
        case = f"A_bar {tuple(shape)} {kind}, length {length}"
        with credit.case(case):
            got = submission.step_response_diag(A_bar, B_bar, C, length)
            assert_close(got, ref, f"y ({case})", rtol=1e-9, atol=1e-11 * scale, mistakes=mistakes)
