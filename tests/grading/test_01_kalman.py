"""Grading tests for chapter 1 (the Kalman filter): Exercises 1-4, 10 points.

Run by the grader (``python -m seqbook.grading grade ...``), one process per
submission; ``submission`` holds the student's functions, running in a
sandbox.  Each test compares a student function with its counterpart in
``seqbook.kalman`` on seeded random float64 problems of several shapes (one
batch dimension, several, size-1 dimensions, shared or per-batch matrices), to
1e-8.  A test passes only if every case does; the message names the first case
and output that differ, and how.

Contract (notes/kalman_api.md, "Exercises"):
  Exercise 1  kf_predict(x, P, F, Q) -> (x_pred, P_pred)
  Exercise 2  kf_update(x, P, z, H, R) -> (x_post, P_post)            Joseph form
  Exercise 3  rts_step(x_filt, P_filt, x_pred_next, P_pred_next, x_smooth_next, P_smooth_next, F) -> (x_s, P_s)
  Exercise 4  nis(innovation, S) -> innovation.shape[:-1]
Shapes: x (..., n), P (..., n, n), z (..., m); F, Q (n, n) or (..., n, n); H (m, n) or (..., m, n); R likewise.
"""

import pytest
import torch

from seqbook import kalman
from seqbook.grading.checks import as_tuple, assert_close, random_spd

DTYPE = torch.float64
TOL = 1e-8

# (leading dims, n, m, per-batch matrices?) -- several leading dims and size-1 dims included
CASES = [((5,), 3, 2, True), ((4,), 4, 2, False), ((1,), 1, 1, True), ((2, 3), 2, 3, False)]


def _describe(lead, n, m, batched) -> str:
    return f"x of shape {(*lead, n)}, " + ("per-batch matrices" if batched else "shared matrices")


def _matrix(gen, lead, rows, cols, batched):
    shape = (*lead, rows, cols) if batched else (rows, cols)
    return torch.randn(*shape, generator=gen, dtype=DTYPE) / cols**0.5


def _spd(gen, lead, n, batched):
    return random_spd(*(lead if batched else ()), n=n, generator=gen)


@pytest.mark.points(2)
def test_kf_predict(submission):
    """Exercise 1: x_pred = F x, P_pred = F P F^T + Q."""
    gen = torch.Generator().manual_seed(101)
    for lead, n, m, batched in CASES:
        x = torch.randn(*lead, n, generator=gen, dtype=DTYPE)
        P = random_spd(*lead, n=n, generator=gen)
        F, Q = _matrix(gen, lead, n, n, batched), _spd(gen, lead, n, batched)
        x_ref, P_ref = kalman.predict(x, P, F, Q)
        x_pred, P_pred = as_tuple(submission.kf_predict(x, P, F, Q), ("x_pred", "P_pred"), "kf_predict")
        case = _describe(lead, n, m, batched)
        assert_close(x_pred, x_ref, f"x_pred ({case})", rtol=TOL, atol=TOL)
        assert_close(P_pred, P_ref, f"P_pred ({case})", rtol=TOL, atol=TOL)


@pytest.mark.points(3)
def test_kf_update(submission):
    """Exercise 2: gain from a solve, Joseph-form covariance."""
    gen = torch.Generator().manual_seed(202)
    for lead, n, m, batched in CASES:
        x = torch.randn(*lead, n, generator=gen, dtype=DTYPE)
        P = random_spd(*lead, n=n, generator=gen)
        z = torch.randn(*lead, m, generator=gen, dtype=DTYPE)
        H, R = _matrix(gen, lead, m, n, batched), _spd(gen, lead, m, batched)
        x_ref, P_ref, _, _ = kalman.update(x, P, z, H, R, joseph=True)
        x_post, P_post = as_tuple(submission.kf_update(x, P, z, H, R), ("x_post", "P_post"), "kf_update")
        case = _describe(lead, n, m, batched) + f", z of shape {(*lead, m)}"
        assert_close(x_post, x_ref, f"x_post ({case})", rtol=TOL, atol=TOL)
        assert_close(P_post, P_ref, f"P_post ({case})", rtol=TOL, atol=TOL)


@pytest.mark.points(3)
def test_rts_step(submission):
    """Exercise 3: one backward step of the Rauch-Tung-Striebel smoother."""
    gen = torch.Generator().manual_seed(303)
    for lead, n, m, batched in CASES:
        x_filt = torch.randn(*lead, n, generator=gen, dtype=DTYPE)
        P_filt = random_spd(*lead, n=n, generator=gen)
        F, Q = _matrix(gen, lead, n, n, batched), _spd(gen, lead, n, batched)
        # a consistent problem: the prediction really comes from the filtered state
        x_pred_next = (F @ x_filt.unsqueeze(-1)).squeeze(-1)
        P_pred_next = F @ P_filt @ F.mT + Q
        x_smooth_next = x_pred_next + 0.3 * torch.randn(*lead, n, generator=gen, dtype=DTYPE)
        P_smooth_next = 0.5 * random_spd(*lead, n=n, generator=gen)
        args = (x_filt, P_filt, x_pred_next, P_pred_next, x_smooth_next, P_smooth_next, F)
        x_ref, P_ref = kalman.rts_step(*args)
        x_s, P_s = as_tuple(submission.rts_step(*args), ("x_s", "P_s"), "rts_step")
        case = _describe(lead, n, m, batched)
        assert_close(x_s, x_ref, f"x_s ({case})", rtol=TOL, atol=TOL)
        assert_close(P_s, P_ref, f"P_s ({case})", rtol=TOL, atol=TOL)


@pytest.mark.points(2)
def test_nis(submission):
    """Exercise 4: y^T S^{-1} y over the last dim, for any leading dims."""
    gen = torch.Generator().manual_seed(404)
    for lead, m in [((3, 7), 2), ((2, 5), 1), ((4,), 3), ((2, 2, 3), 2)]:
        innovation = torch.randn(*lead, m, generator=gen, dtype=DTYPE)
        S = random_spd(*lead, n=m, generator=gen)
        ref = kalman.nis(innovation, S)
        got = submission.nis(innovation, S)
        assert_close(got, ref, f"nis (innovation of shape {(*lead, m)})", rtol=TOL, atol=TOL)
