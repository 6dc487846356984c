"""Grading tests for chapter 1 (the Kalman filter): Exercises 1-6, 16 points.

Run by the grader (``python -m seqbook.grading grade ...``), one process per
submission; ``submission`` holds the student's functions, running in a
sandbox.  Each test compares a student function with its counterpart in
``seqbook.kalman`` on seeded random float64 problems of several shapes (one
batch dimension, several, size-1 dimensions, shared or per-batch matrices), to
1e-8.  Each case earns its share of the test's points (``credit``); the message
names the cases and outputs that differ, how, and the likely mistake.
Exercise 2 also has a float32 case that only the Joseph form passes: with P
much larger than R the short form (I - K C) P loses its digits to the rounding
of the gain, the Joseph form does not (its error is second order in the gain's).

While a student function runs, the library's Kalman functions are blocked
(FORBIDDEN below): a wrapper around ``seqbook.kalman.predict`` earns nothing.

Contract (chapters/01_kalman/kalman.ipynb, "Exercises"):
  Exercise 1  kf_predict(x, P, F, Q) -> (x_pred, P_pred)
  Exercise 2  kf_update(x, P, z, C, R) -> (x_post, P_post)            Joseph form
  Exercise 3  rts_step(x_filt, P_filt, x_pred_next, P_pred_next, x_smooth_next, P_smooth_next, F) -> (x_s, P_s)
  Exercise 4  nis(innovation, S) -> innovation.shape[:-1]
  Exercise 5  steady_state(F, C, Q, R, tol=1e-12, max_iter=10_000) -> (P_inf, K_inf)   unbatched (N, N), (N, m)
  Exercise 6  kf_update_sequential(x, P, z, C, r) -> (x_post, P_post)  == update with R = diag(r); C (m, N), r (m,)
Shapes: x (..., N), P (..., N, N), z (..., m); F, Q (N, N) or (..., N, N); C (m, N) or (..., m, N); R likewise.
(C is the measurement matrix, which seqbook.kalman's functions take as their argument H.)
"""

import pytest
import torch

from seqbook import kalman
from seqbook.grading.checks import DENSE_SOLVERS, as_tuple, assert_close, random_spd

DTYPE = torch.float64
TOL = 1e-8

# Every function of seqbook.kalman is off-limits while an exercise runs, except helpers that
# compute none of the answers (simulating a model, chi-square intervals).
KALMAN = ["seqbook.kalman.*", "!seqbook.kalman.simulate", "!seqbook.kalman.constant_velocity",
          "!seqbook.kalman.chi2_interval", "!seqbook.kalman._chi2_quantile"]
FORBIDDEN = {"kf_predict": KALMAN, "kf_update": KALMAN, "rts_step": KALMAN, "nis": KALMAN,
             "steady_state": KALMAN, "kf_update_sequential": KALMAN + DENSE_SOLVERS}
FORBIDDEN_WHY = {"kf_update_sequential": "Exercise 6 absorbs one scalar measurement at a time: divisions only, "
                                         "no matrix solve, factorization or inverse"}

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
def test_kf_predict(submission, credit):
    """Exercise 1: x_pred = F x, P_pred = F P F^T + Q."""
    gen = torch.Generator().manual_seed(101)
    for lead, n, m, batched in CASES:
        x = torch.randn(*lead, n, generator=gen, dtype=DTYPE)
        P = random_spd(*lead, n=n, generator=gen)
        F, Q = _matrix(gen, lead, n, n, batched), _spd(gen, lead, n, batched)
        x_ref, P_ref = kalman.predict(x, P, F, Q)
        case = _describe(lead, n, m, batched)
        with credit.case(case):
            x_pred, P_pred = as_tuple(submission.kf_predict(x, P, F, Q), ("x_pred", "P_pred"), "kf_predict")
            assert_close(x_pred, x_ref, f"x_pred ({case})", rtol=TOL, atol=TOL,
                         mistakes={"x_pred looks like F^T x: multiply by F itself": (F.mT @ x.unsqueeze(-1)).squeeze(-1)})
            assert_close(P_pred, P_ref, f"P_pred ({case})", rtol=TOL, atol=TOL, mistakes={
                "P_pred looks like F P F^T without + Q: the process noise adds uncertainty": F @ P @ F.mT,
                "P_pred looks like F^T P F + Q: it is F P F^T + Q": F.mT @ P @ F + Q,
            })


@pytest.mark.points(3)
def test_kf_update(submission, credit):
    """Exercise 2: gain from a solve, Joseph-form covariance."""
    gen = torch.Generator().manual_seed(202)
    for lead, n, m, batched in CASES:
        x = torch.randn(*lead, n, generator=gen, dtype=DTYPE)
        P = random_spd(*lead, n=n, generator=gen)
        z = torch.randn(*lead, m, generator=gen, dtype=DTYPE)
        H, R = _matrix(gen, lead, m, n, batched), _spd(gen, lead, m, batched)
        x_ref, P_ref, _, _ = kalman.update(x, P, z, H, R, joseph=True)
        case = _describe(lead, n, m, batched) + f", z of shape {(*lead, m)}"
        with credit.case(case):
            x_post, P_post = as_tuple(submission.kf_update(x, P, z, H, R), ("x_post", "P_post"), "kf_update")
            assert_close(x_post, x_ref, f"x_post ({case})", rtol=TOL, atol=TOL)
            assert_close(P_post, P_ref, f"P_post ({case})", rtol=TOL, atol=TOL)
    # float32, P ~ 1e5 R, every direction measured (H square): the posterior is ~R, and the short
    # form's error is ~eps * |P| (measured: 1e-2 of |P_post| at best over 20 seeds of 32 problems,
    # gain by solve or by inverse), the Joseph form's ~eps * |P_post| (at most 6e-7).
    for n, seed in ((2, 212), (3, 213)):
        g = torch.Generator().manual_seed(seed)
        batch = 32
        L = torch.randn(batch, n, n, generator=g, dtype=DTYPE)
        P = (L @ L.mT / n + 0.5 * torch.eye(n, dtype=DTYPE)) * 1e5
        H = torch.eye(n, dtype=DTYPE) + 0.3 * torch.randn(batch, n, n, generator=g, dtype=DTYPE) / n**0.5
        Lr = torch.randn(batch, n, n, generator=g, dtype=DTYPE)
        R = Lr @ Lr.mT / n + 0.5 * torch.eye(n, dtype=DTYPE)
        x, z = (torch.randn(batch, n, generator=g, dtype=DTYPE) for _ in range(2))
        x, P, z, H, R = (t.float() for t in (x, P, z, H, R))
        _, P_ref, _, _ = kalman.update(*(t.double() for t in (x, P, z, H, R)), joseph=True)
        case = f"float32, {batch} problems with N = m = {n}, P about 1e5 R"
        with credit.case(case, weight=2):
            _, P_post = as_tuple(submission.kf_update(x, P, z, H, R), ("x_post", "P_post"), "kf_update")
            assert isinstance(P_post, torch.Tensor) and P_post.dtype == torch.float32, (
                f"P_post ({case}): float32 in, float32 out")
            try:
                assert_close(P_post.double(), P_ref, f"P_post ({case})", rtol=1e-5, atol=1e-5 * float(P_ref.abs().max()))
            except AssertionError as exc:
                raise AssertionError(f"{exc}. Hint: this is the error of the short form (I - K C) P, whose error is "
                                     "first order in the gain's rounding; the Joseph form (I - K C) P (I - K C)^T "
                                     "+ K R K^T is insensitive to it") from None


@pytest.mark.points(3)
def test_rts_step(submission, credit):
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
        # the gain with F^T and P_pred^-1 in the wrong order: G' = P_pred^-1 F P_filt
        G_wrong = torch.linalg.solve(P_pred_next, F @ P_filt)
        wrong_x = x_filt + (G_wrong @ (x_smooth_next - x_pred_next).unsqueeze(-1)).squeeze(-1)
        case = _describe(lead, n, m, batched)
        with credit.case(case):
            x_s, P_s = as_tuple(submission.rts_step(*args), ("x_s", "P_s"), "rts_step")
            assert_close(x_s, x_ref, f"x_s ({case})", rtol=TOL, atol=TOL, mistakes={
                "looks like the gain P_pred^-1 F P_filt; the smoother gain is G = P_filt F^T P_pred^-1 "
                "(its transpose)": wrong_x})
            assert_close(P_s, P_ref, f"P_s ({case})", rtol=TOL, atol=TOL)


@pytest.mark.points(2)
def test_nis(submission, credit):
    """Exercise 4: y^T S^{-1} y over the last dim, for any leading dims."""
    gen = torch.Generator().manual_seed(404)
    for lead, m in [((3, 7), 2), ((2, 5), 1), ((4,), 3), ((2, 2, 3), 2)]:
        innovation = torch.randn(*lead, m, generator=gen, dtype=DTYPE)
        S = random_spd(*lead, n=m, generator=gen)
        ref = kalman.nis(innovation, S)
        y = innovation.unsqueeze(-1)
        case = f"innovation of shape {(*lead, m)}"
        with credit.case(case):
            got = submission.nis(innovation, S)
            assert_close(got, ref, f"nis ({case})", rtol=TOL, atol=TOL, mistakes={
                "looks like y^T S y: solve with S (S^-1 y) instead of multiplying by it": (y.mT @ S @ y)[..., 0, 0],
                "looks like y^T y: the innovation must be weighted by S^-1": (y.mT @ y)[..., 0, 0]})


def _riccati_reference(F, H, Q, R, steps=3000):
    """P_{t|t-1} and K_t after many steps of the library's own filter on the model alone."""
    n, m = F.shape[-1], H.shape[-2]
    x, zeros = torch.zeros(n, dtype=DTYPE), torch.zeros(m, dtype=DTYPE)
    P = Q.clone()
    for _ in range(steps):
        _, P_upd, _, _ = kalman.update(x, P, zeros, H, R)
        _, P = kalman.predict(x, P_upd, F, Q)
    K = torch.linalg.solve(H @ P @ H.mT + R, H @ P).mT
    return P, K


@pytest.mark.points(3)
def test_steady_state(submission, credit):
    """Exercise 5: the fixed point of the Riccati recursion, and the steady-state gain."""
    gen = torch.Generator().manual_seed(505)
    cv = kalman.constant_velocity(0.1, 1.0, 1.0)
    one = lambda v: torch.tensor([[v]], dtype=DTYPE)  # noqa: E731
    A = torch.randn(3, 3, generator=gen, dtype=DTYPE)
    models = [
        ("the chapter's tracker (N = 4, m = 2)", cv["F"], cv["H"], cv["Q"], cv["R"]),
        ("1-D random walk, q/r = 0.01", one(1.0), one(1.0), one(0.01), one(1.0)),
        ("stable random F (N = 3, m = 1)", 0.8 * A / torch.linalg.eigvals(A).abs().max(),
         torch.randn(1, 3, generator=gen, dtype=DTYPE), random_spd(n=3, generator=gen), random_spd(n=1, generator=gen)),
        ("unstable random F (n = 3, m = 2)", 1.3 * A / torch.linalg.eigvals(A).abs().max(),
         torch.randn(2, 3, generator=gen, dtype=DTYPE), random_spd(n=3, generator=gen), random_spd(n=2, generator=gen)),
    ]
    for case, F, H, Q, R in models:
        P_ref, K_ref = _riccati_reference(F, H, Q, R)
        P_filtered = P_ref - K_ref @ H @ P_ref  # the *updated* covariance: a common mix-up
        with credit.case(case):
            P_inf, K_inf = as_tuple(submission.steady_state(F, H, Q, R), ("P_inf", "K_inf"), "steady_state")
            assert_close(P_inf, P_ref, f"P_inf ({case})", rtol=1e-8, atol=1e-10, mistakes={
                "looks like the steady *filtered* covariance P_{t|t}; Exercise 5 asks for the predicted one, "
                "P_{t|t-1}": P_filtered})
            assert_close(K_inf, K_ref, f"K_inf ({case})", rtol=1e-8, atol=1e-10)


@pytest.mark.points(3)
def test_kf_update_sequential(submission, credit):
    """Exercise 6: m scalar updates, one per independent noise component, equal the joint update."""
    gen = torch.Generator().manual_seed(606)
    for lead, n, m in [((5,), 3, 2), ((2, 3), 4, 3), ((1,), 1, 1), ((4,), 2, 4)]:
        x = torch.randn(*lead, n, generator=gen, dtype=DTYPE)
        P = random_spd(*lead, n=n, generator=gen)
        z = torch.randn(*lead, m, generator=gen, dtype=DTYPE)
        H = torch.randn(m, n, generator=gen, dtype=DTYPE)
        r = torch.rand(m, generator=gen, dtype=DTYPE) + 0.1
        x_ref, P_ref, _, _ = kalman.update(x, P, z, H, torch.diag(r))
        case = f"x of shape {(*lead, n)}, m = {m}"
        # the usual slip: every component updated from the *prior* belief, not the running one
        K_each = (P @ H.mT) / (((H @ P) * H).sum(-1) + r).unsqueeze(-2)  # (..., n, m): a separate gain per row
        x_stale = x + (K_each @ (z - (H @ x.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)).squeeze(-1)
        with credit.case(case):
            x_post, P_post = as_tuple(submission.kf_update_sequential(x, P, z, H, r), ("x_post", "P_post"),
                                      "kf_update_sequential")
            assert_close(x_post, x_ref, f"x_post ({case})", rtol=1e-9, atol=1e-10, mistakes={
                "looks like every component updated from the prior belief: each scalar update must start from "
                "the belief the previous ones left": x_stale})
            assert_close(P_post, P_ref, f"P_post ({case})", rtol=1e-9, atol=1e-10)
