"""Grading tests for chapter 2 (state space models): Exercises 1-4, 10 points.

Run by the grader (``python -m seqbook.grading grade ...``), one process per
submission; ``submission`` holds the student's functions, running in a
sandbox.  Each test compares a student function with its counterpart in
``seqbook.ssm`` on seeded random float64 / complex128 problems of several
shapes (channels, a batch of per-token steps, size-1 dimensions, lengths that
are not powers of two).  A test passes only if every case does; the message
names the first case and output that differ, and how.

Contract (chapters/02_ssm/ssm.ipynb, "Exercises"):
  Exercise 1  discretize_zoh_diag(A, B, step) -> (A_bar, B_bar)   == ssm.discretize(A, B, step, "zoh", diagonal=True)
  Exercise 2  ssm_kernel_diag(A_bar, B_bar, C, length) -> K       == ssm.ssm_kernel(A_bar, B_bar, C, length, diagonal=True)
  Exercise 3  bilinear(A, B, step) -> (A_bar, B_bar)              == ssm.discretize(A, B, step, "bilinear")
  Exercise 4  causal_conv_fft(u, K) -> y                          == ssm.ssm_convolve(u, K)
Shapes: diagonal A, B, C (..., N), step broadcasting with A.shape[:-1]; dense A (..., N, N), B (..., N, M);
u (batch, L, H), K (H, L_K).
"""

import math

import pytest
import torch

from seqbook import ssm
from seqbook.grading.checks import as_tuple, assert_close

F64, C128 = torch.float64, torch.complex128


def _stable_eigenvalues(shape, gen, kind):
    """Eigenvalues with negative real part (complex: also a spread of frequencies)."""
    re = -(torch.rand(shape, generator=gen, dtype=F64) * 3 + 0.01)
    if kind == "real":
        return re
    return torch.complex(re, 6 * torch.randn(shape, generator=gen, dtype=F64))


@pytest.mark.points(3)
def test_discretize_zoh_diag(submission):
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
        A_bar, B_bar = as_tuple(submission.discretize_zoh_diag(A, B, step), ("A_bar", "B_bar"), "discretize_zoh_diag")
        case = f"A {tuple(A.shape)} {A.dtype}, step {tuple(step.shape)}: {what}"
        assert_close(A_bar, A_bar_ref, f"A_bar ({case})", rtol=1e-10, atol=1e-12)
        assert_close(B_bar, B_bar_ref, f"B_bar ({case})", rtol=1e-10, atol=1e-12)


@pytest.mark.points(3)
def test_ssm_kernel_diag(submission):
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
        got = submission.ssm_kernel_diag(A_bar, B_bar, C, length)
        scale = float(ref.abs().max())
        assert_close(got, ref, f"K (A_bar {tuple(shape)} {kind}, length {length})", rtol=1e-9, atol=1e-11 * scale)


@pytest.mark.points(2)
def test_bilinear(submission):
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
        A_bar, B_bar = as_tuple(submission.bilinear(A, B, step), ("A_bar", "B_bar"), "bilinear")
        step_desc = f"step {step}" if isinstance(step, float) else f"step {tuple(step.shape)}"
        case = f"A {shape_A}, B {shape_B}, {step_desc}"
        assert_close(A_bar, A_bar_ref, f"A_bar ({case})", rtol=1e-10, atol=1e-12)
        assert_close(B_bar, B_bar_ref, f"B_bar ({case})", rtol=1e-10, atol=1e-12)


@pytest.mark.points(2)
def test_causal_conv_fft(submission):
    """Exercise 4: y[b, k, h] = sum_{j <= k} K[h, j] u[b, k - j, h]; kernels shorter or longer than u."""
    gen = torch.Generator().manual_seed(204)
    # ((batch, L, H), L_K)
    cases = [((2, 128, 3), 128), ((1, 37, 4), 10), ((3, 16, 2), 50), ((2, 1, 1), 1), ((1, 300, 5), 299)]
    for (batch, L, H), L_K in cases:
        u = torch.randn(batch, L, H, generator=gen, dtype=F64)
        K = torch.randn(H, L_K, generator=gen, dtype=F64) * torch.exp(-torch.arange(L_K, dtype=F64) / 50)
        ref = ssm.ssm_convolve(u, K)
        got = submission.causal_conv_fft(u, K)
        scale = float(ref.abs().max())
        assert_close(got, ref, f"y (u {(batch, L, H)}, K {(H, L_K)})", rtol=1e-9, atol=1e-11 * scale)
