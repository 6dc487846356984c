r"""Linear-Gaussian state space models: the Kalman filter, the Rauch–Tung–Striebel
smoother, and the filter as a parallel (associative) scan.

The model (Kalman 1960), for t = 1, ..., T:

.. math::

    x_t = F x_{t-1} + w_t, \quad w_t \sim \mathcal N(0, Q), \qquad
    z_t = H x_t + v_t,     \quad v_t \sim \mathcal N(0, R), \qquad
    x_0 \sim \mathcal N(x_0, P_0).

Every belief is a Gaussian ``N(x, P)``; a filter step is *predict* (push the belief
through the dynamics) then *update* (condition it on the measurement).

Glossary (n = state size, m = measurement size; every function is batched over
leading dimensions, and the model matrices may be shared or given per batch):

=============  ==========================  ==========================================
symbol         shape                       meaning
=============  ==========================  ==========================================
``F``          (n, n) or (batch, n, n)     state transition
``H``          (m, n) or (batch, m, n)     measurement matrix
``Q``          (n, n) or (batch, n, n)     process noise covariance
``R``          (m, m) or (batch, m, m)     measurement noise covariance
``x0, P0``     (n,), (n, n) (or batched)   belief about x_0, before any measurement
``z``          (batch, T, m)               measurements; NaN in ``z[b, t]`` = none at (b, t)
``x, P``       (..., n), (..., n, n)       a belief's mean and covariance
``y, S``       (..., m), (..., m, m)       innovation z - H x and its covariance
``K``          (..., n, m)                 Kalman gain
``G``          (..., n, n)                 smoother gain
``A, b, C``    (batch, T, n, n), (.., n)   scan element: x_t | x_{t-1}, z_t ~ N(A x_{t-1} + b, C)
``eta, J``     (batch, T, n), (.., n, n)   scan element: evidence of z_t about x_{t-1} (information form)
=============  ==========================  ==========================================

Every function that takes a whole sequence (``kalman_filter``, ``parallel_kalman_filter``,
``batch_posterior``, ``simulate``) validates its inputs and raises a ``ValueError`` that names
the argument and the shape it expected; the one-step functions check shapes and dtypes.

References

- R. E. Kalman (1960), A new approach to linear filtering and prediction problems,
  J. Basic Engineering 82(1): the filter (predict, update).
- H. E. Rauch, F. Tung, C. T. Striebel (1965), Maximum likelihood estimates of linear
  dynamic systems, AIAA Journal 3(8): the backward smoother.
- R. S. Bucy, P. D. Joseph (1968), Filtering for Stochastic Processes with Applications
  to Guidance: the "Joseph form" of the covariance update.
- S. Särkkä, Á. F. García-Fernández (2021), Temporal parallelization of Bayesian
  smoothers, IEEE Trans. Automatic Control 66(1), Lemmas 8-9: the filter as an
  associative scan.
- S. Särkkä (2013), Bayesian Filtering and Smoothing: all of it in one place.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "FilterResult", "SmootherResult", "predict", "update", "kalman_filter", "rts_step",
    "rts_smoother", "ScanElement", "scan_elements", "combine", "parallel_kalman_filter",
    "batch_posterior", "simulate", "constant_velocity", "nis", "nees", "chi2_interval",
]


class FilterResult(NamedTuple):
    """What :func:`kalman_filter` returns; every field has shape (batch, T, ...)."""

    x_pred: Tensor          # (batch, T, n)     mean of p(x_t | z_1..z_{t-1})
    P_pred: Tensor          # (batch, T, n, n)
    x: Tensor               # (batch, T, n)     mean of p(x_t | z_1..z_t)
    P: Tensor               # (batch, T, n, n)
    innovation: Tensor      # (batch, T, m)     z_t - H x_pred_t  (NaN where z_t is missing)
    S: Tensor               # (batch, T, m, m)  its covariance
    log_likelihood: Tensor  # (batch,)          log p(z_1..z_T)


class SmootherResult(NamedTuple):
    """What :func:`rts_smoother` returns: beliefs given *all* measurements."""

    x: Tensor  # (batch, T, n)     mean of p(x_t | z_1..z_T)
    P: Tensor  # (batch, T, n, n)
    G: Tensor  # (batch, T, n, n)  smoother gains (zero at the last step)


# ----------------------------------------------------------------------------
# One step at a time
# ----------------------------------------------------------------------------

def _symmetrize(P: Tensor) -> Tensor:
    # Exact arithmetic keeps covariances symmetric; rounding does not, and the
    # asymmetry compounds over thousands of steps. Averaging with the transpose
    # removes it at the cost of one addition.
    return 0.5 * (P + P.mT)


def _matvec(M: Tensor, v: Tensor) -> Tensor:
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def predict(x: Tensor, P: Tensor, F: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    r"""Push the belief N(x, P) through the dynamics: :math:`x^- = F x`, :math:`P^- = F P F^\top + Q`.

    A linear map of a Gaussian is Gaussian, and adding independent noise adds covariances.
    Shapes: x (..., n), P (..., n, n), F and Q (..., n, n); returns (x_pred, P_pred).
    """
    _check_step(x=x, P=P, F=F, Q=Q)  # shapes and dtypes, or a ValueError naming the argument
    return _matvec(F, x), _symmetrize(F @ P @ F.mT + Q)


def update(x: Tensor, P: Tensor, z: Tensor, H: Tensor, R: Tensor, *, joseph: bool = True):
    r"""Condition the belief N(x, P) on the measurement z = H x + v, v ~ N(0, R).

    .. math::

        y = z - H x, \quad S = H P H^\top + R, \quad K = P H^\top S^{-1}, \quad
        x^+ = x + K y, \quad P^+ = (I - KH) P (I - KH)^\top + K R K^\top .

    Shapes: x (..., n), P (..., n, n), z (..., m), H (..., m, n), R (..., m, m).
    Returns ``(x_post, P_post, y, S)``. A measurement with a NaN (any component)
    counts as missing: the belief comes back unchanged and ``y`` is NaN there.

    ``joseph=False`` uses the short form :math:`P^+ = (I - KH) P`, equal in exact
    arithmetic for the optimal gain; see the comment below for why we do not.
    """
    _check_step(x=x, P=P, z=z, H=H, R=R)
    missing = torch.isnan(z).any(dim=-1)
    Hx = _matvec(H, x)
    # A missing measurement is replaced by its prediction (zero innovation) before any
    # arithmetic, so no NaN enters the computation, nor its gradients.
    y = torch.where(missing.unsqueeze(-1), torch.zeros_like(Hx), z - Hx)
    S = _symmetrize(H @ P @ H.mT + R)
    # K = P H^T S^{-1}. We never form S^{-1}: since S and P are symmetric,
    # K^T = S^{-1} (H P), one linear solve, cheaper and more accurate than an inverse.
    K = torch.linalg.solve(S, H @ P).mT
    x_post = x + _matvec(K, y)
    I_KH = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device) - K @ H
    if joseph:
        # Joseph form (Bucy & Joseph 1968): the error covariance for *any* gain K, and a sum
        # of two terms A M A^T with M PSD, so symmetric and PSD in exact arithmetic whatever
        # K is. Around the optimal gain K*, P_J(K* + dK) = P_J(K*) + dK S dK^T: the rounding
        # error in the computed K enters only at second order, where it enters the short
        # form (I - KH) P at first order (chapter 1: float32 variances to 1e-7 relative,
        # against 1e-3 for the short form). It is no guarantee of a PSD result in floating
        # point: rounding in the products can still leave an eigenvalue below zero when P has
        # eigenvalues near eps * |P| (chapter 1 counts about 8% of random float32 updates,
        # against 28% for the short form). Square-root or UD filters, which never form P,
        # are the robust answer.
        P_post = I_KH @ P @ I_KH.mT + K @ R @ K.mT
    else:
        P_post = I_KH @ P
    P_post = _symmetrize(P_post)
    keep = missing.unsqueeze(-1)
    x_post = torch.where(keep, x, x_post)
    P_post = torch.where(keep.unsqueeze(-1), P, P_post)
    y = torch.where(keep, torch.full_like(y, float("nan")), y)
    return x_post, P_post, y, S


def _gaussian_log_density(y: Tensor, S: Tensor) -> Tensor:
    """log N(y; 0, S) through the Cholesky factor S = L L^T: no inverse, no determinant."""
    L = torch.linalg.cholesky(S)
    w = torch.linalg.solve_triangular(L, y.unsqueeze(-1), upper=False).squeeze(-1)
    half_logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (w * w).sum(-1) - half_logdet - 0.5 * y.shape[-1] * math.log(2 * math.pi)


# ----------------------------------------------------------------------------
# The filter and the smoother
# ----------------------------------------------------------------------------

def kalman_filter(z, F, H, Q, R, x0, P0, *, joseph: bool = True) -> FilterResult:
    r"""Filter a batch of measurement sequences: predict, then update, at every step.

    Shapes in the module glossary: z (batch, T, m); the model may be shared or per batch.
    The loop over time is the point: the belief (x, P) is a fixed-size summary of
    everything seen so far, carried from one step to the next. The batch is not looped
    over: a missing z[b, t] (NaN) only switches that track's update off at that step.

    ``log_likelihood`` is log p(z_1..z_T) = Σ_t log N(y_t; 0, S_t), the "prediction error
    decomposition": each measurement is scored against its prediction from the past.
    Missing steps contribute nothing. ``joseph`` picks the covariance update (see :func:`update`).
    """
    z, F, H, Q, R, x0, P0 = _validate(z, F, H, Q, R, x0, P0)
    B, n = z.shape[0], F.shape[-1]
    x, P = x0.expand(B, n), P0.expand(B, n, n)
    steps = []
    for t in range(z.shape[1]):
        x_pred, P_pred = predict(x, P, F, Q)
        x, P, y, S = update(x_pred, P_pred, z[:, t], H, R, joseph=joseph)
        steps.append((x_pred, P_pred, x, P, y, S))
    x_pred, P_pred, x, P, y, S = (torch.stack(field, dim=1) for field in zip(*steps))
    observed = ~torch.isnan(y).any(-1)
    log_p = _gaussian_log_density(torch.nan_to_num(y), S)
    log_likelihood = torch.where(observed, log_p, torch.zeros_like(log_p)).sum(-1)
    return FilterResult(x_pred, P_pred, x, P, y, S, log_likelihood)


def _smoother_gain(P_filt: Tensor, P_pred_next: Tensor, F: Tensor) -> Tensor:
    # G = P_filt F^T (P_pred_next)^{-1}; with symmetric covariances, G^T is one solve.
    return torch.linalg.solve(P_pred_next, F @ P_filt).mT


def rts_step(x_filt, P_filt, x_pred_next, P_pred_next, x_smooth_next, P_smooth_next, F):
    r"""One backward step of the Rauch–Tung–Striebel smoother.

    .. math::

        G_t = P_t F^\top (P^-_{t+1})^{-1}, \quad
        x^s_t = x_t + G_t (x^s_{t+1} - x^-_{t+1}), \quad
        P^s_t = P_t + G_t (P^s_{t+1} - P^-_{t+1}) G_t^\top .

    The filtered belief at t is corrected by how much the smoothed belief at t+1
    differs from what the filter predicted for t+1. Shapes: means (..., n),
    covariances and F (..., n, n). Returns ``(x_smooth, P_smooth)``.
    """
    _check_step(x_filt=x_filt, P_filt=P_filt, x_pred_next=x_pred_next, P_pred_next=P_pred_next,
                x_smooth_next=x_smooth_next, P_smooth_next=P_smooth_next, F=F)
    G = _smoother_gain(P_filt, P_pred_next, F)
    x_s = x_filt + _matvec(G, x_smooth_next - x_pred_next)
    P_s = P_filt + G @ (P_smooth_next - P_pred_next) @ G.mT
    return x_s, _symmetrize(P_s)


def rts_smoother(result: FilterResult, F: Tensor) -> SmootherResult:
    """Smooth a :func:`kalman_filter` result backwards in time (Rauch, Tung & Striebel 1965).

    Needs only the filter's stored beliefs and F: the predicted covariances already hold Q.
    """
    if not isinstance(result, FilterResult):
        raise TypeError(f"result must be the FilterResult of kalman_filter, got {type(result).__name__}")
    B, n = result.x.shape[0], result.x.shape[-1]
    _check_tensor("F", F, ("result.x", result.x))
    _check_matrix("F", F, n, n, B, "n", "n")
    T = result.x.shape[1]
    x_s, P_s = result.x[:, -1], result.P[:, -1]
    xs, Ps, Gs = [x_s], [P_s], [torch.zeros_like(P_s)]
    for t in range(T - 2, -1, -1):
        Gs.append(_smoother_gain(result.P[:, t], result.P_pred[:, t + 1], F))
        x_s, P_s = rts_step(result.x[:, t], result.P[:, t], result.x_pred[:, t + 1],
                            result.P_pred[:, t + 1], x_s, P_s, F)
        xs.append(x_s)
        Ps.append(P_s)
    flip = lambda items: torch.stack(items[::-1], dim=1)  # noqa: E731
    return SmootherResult(flip(xs), flip(Ps), flip(Gs))


# ----------------------------------------------------------------------------
# The filter as an associative scan (Särkkä & García-Fernández 2021)
# ----------------------------------------------------------------------------

class ScanElement(NamedTuple):
    """One step of the filter as a function of the belief it receives (Lemma 8 of the paper).

    ``p(x_t | x_{t-1}, z_t) = N(A x_{t-1} + b, C)`` and the measurement's evidence about
    x_{t-1}, ``N_I(x_{t-1}; eta, J)`` in information form.
    """

    A: Tensor    # (batch, T, n, n)
    b: Tensor    # (batch, T, n)
    C: Tensor    # (batch, T, n, n)
    eta: Tensor  # (batch, T, n)
    J: Tensor    # (batch, T, n, n)


def scan_elements(z, F, H, Q, R, x0, P0) -> ScanElement:
    """The T elements of the scan, all at once (Lemma 8): each is an update step whose
    "prediction" is N(F x_{t-1}, Q) for a given x_{t-1}, except the first, which starts
    from the known prior and so is the filter's first step itself (A_1 = 0, J_1 = 0).
    """
    z, F, H, Q, R, x0, P0 = _validate(z, F, H, Q, R, x0, P0)
    B, T, m = z.shape
    n = F.shape[-1]
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    # A missing measurement is a measurement with H = 0: it carries no information.
    observed = ~torch.isnan(z).any(-1, keepdim=True)                            # (B, T, 1)
    z = torch.where(observed, z, torch.zeros_like(z))
    H = H.expand(B, m, n).unsqueeze(1) * observed.unsqueeze(-1)                 # (B, T, m, n)
    F = F.expand(B, n, n).unsqueeze(1)                                          # (B, 1, n, n)
    Q = Q.expand(B, n, n).unsqueeze(1)
    R = R.expand(B, m, m).unsqueeze(1)
    # Every step but the first starts from an unknown x_{t-1}: its prediction is N(F x, Q).
    m_pred = torch.zeros(B, T, n, dtype=z.dtype, device=z.device)
    P_pred = Q.expand(B, T, n, n).clone()
    A_prior = F.expand(B, T, n, n).clone()
    # The first step starts from the known prior x_0 ~ N(x0, P0): nothing to carry in.
    m_pred[:, 0] = _matvec(F[:, 0], x0.expand(B, n))
    P_pred[:, 0] = F[:, 0] @ P0.expand(B, n, n) @ F[:, 0].mT + Q[:, 0]
    A_prior[:, 0] = 0.0
    S = _symmetrize(H @ P_pred @ H.mT + R)
    K = torch.linalg.solve(S, H @ P_pred).mT
    I_KH = eye - K @ H
    A = I_KH @ A_prior
    b = m_pred + _matvec(K, z - _matvec(H, m_pred))
    C = _symmetrize(I_KH @ P_pred)
    # Evidence of z_t about x_{t-1}: z_t = H F x_{t-1} + (H w_t + v_t), noise covariance S.
    HF = H @ A_prior
    eta = _matvec(HF.mT, torch.linalg.solve(S, (z - _matvec(H, m_pred)).unsqueeze(-1)).squeeze(-1))
    J = _symmetrize(HF.mT @ torch.linalg.solve(S, HF))
    return ScanElement(A, b, C, eta, J)


def combine(i: ScanElement, j: ScanElement) -> ScanElement:
    """The associative operator: element i (earlier steps) followed by element j (later).

    Composes two Gaussian conditionals and two pieces of evidence (Lemma 9 of the paper).
    (I + C_i J_j) is inverted only through solves; its transpose is (I + J_j C_i) since
    C and J are symmetric.
    """
    eye = torch.eye(i.A.shape[-1], dtype=i.A.dtype, device=i.A.device)
    M = eye + i.C @ j.J                                         # (I + C_i J_j)
    solve_M = lambda rhs: torch.linalg.solve(M, rhs)            # noqa: E731  M^{-1} rhs
    solve_Mt = lambda rhs: torch.linalg.solve(M.mT, rhs)        # noqa: E731  (I + J_j C_i)^{-1} rhs
    A = j.A @ solve_M(i.A)
    b = _matvec(j.A, solve_M((i.b + _matvec(i.C, j.eta)).unsqueeze(-1)).squeeze(-1)) + j.b
    C = _symmetrize(j.A @ solve_M(i.C) @ j.A.mT + j.C)
    eta = _matvec(i.A.mT, solve_Mt((j.eta - _matvec(j.J, i.b)).unsqueeze(-1)).squeeze(-1)) + i.eta
    J = _symmetrize(i.A.mT @ solve_Mt(j.J @ i.A) + i.J)
    return ScanElement(A, b, C, eta, J)


def parallel_kalman_filter(z, F, H, Q, R, x0, P0) -> tuple[Tensor, Tensor]:
    """The Kalman filter as an inclusive scan with :func:`combine` (Särkkä & García-Fernández 2021).

    Each step becomes an element; since the combine is associative, the prefix
    ``e_1 ∘ e_2 ∘ ... ∘ e_t`` can be computed in ceil(log2 T) rounds (Hillis–Steele:
    in the round with offset 2^d, every position t >= 2^d combines its partial prefix
    with the one at t - 2^d), each round one batched call over all positions. The prefix's (b, C) are the filtered mean and
    covariance. Returns (x, P) with shapes (batch, T, n), (batch, T, n, n), equal to
    :func:`kalman_filter`'s ``x`` and ``P``.
    """
    prefix = scan_elements(z, F, H, Q, R, x0, P0)
    T, offset = z.shape[1], 1
    while offset < T:
        earlier = ScanElement(*(field[:, :-offset] for field in prefix))
        later = ScanElement(*(field[:, offset:] for field in prefix))
        combined = combine(earlier, later)
        prefix = ScanElement(*(torch.cat([old[:, :offset], new], dim=1) for old, new in zip(prefix, combined)))
        offset *= 2
    return prefix.b, prefix.C


# ----------------------------------------------------------------------------
# The same problem as one linear system: the exact posterior
# ----------------------------------------------------------------------------

def batch_posterior(z, F, H, Q, R, x0, P0) -> tuple[Tensor, Tensor]:
    r"""The exact posterior p(x_1..x_T | z_1..z_T), computed as one Gaussian, no recursion.

    Stack the states into X = (x_1, ..., x_T), a vector of T n numbers. The log joint
    density log p(X, z) is a quadratic in X, so the posterior is N(Λ^{-1} η, Λ^{-1}) with
    the block-tridiagonal precision (blocks indexed by time)

    .. math::

        Λ = \underbrace{P_1^{-1}}_{(1, 1)}
            + \sum_{t=2}^T \begin{bmatrix} F^\top Q^{-1} F & -F^\top Q^{-1} \\
                                            -Q^{-1} F & Q^{-1} \end{bmatrix}_{(t-1,\, t)}
            + \sum_{t \text{ observed}} \big[H^\top R^{-1} H\big]_{(t, t)}, \qquad
        η = \big[P_1^{-1} m_1\big]_{1} + \sum_{t \text{ observed}} \big[H^\top R^{-1} z_t\big]_{t},

    where N(m_1, P_1) = N(F x0, F P0 F^T + Q) is the prior of x_1: the prior x_0 ~ N(x0, P0)
    is integrated out first, which keeps the system T n in size and lets P0 be singular.

    Returns the marginal means (batch, T, n) and covariances (batch, T, n, n) of all T
    states given all of z: the smoother's answer. The filter's answer at t uses
    z_1..z_t only, so compare it with ``batch_posterior(z[:, :t], ...)``, whose last
    marginal is p(x_t | z_1..z_t). Needs Q and R invertible. This is the O((T n)^3)
    check that the O(T n^3) recursions are exact, not a method to use.
    """
    z, F, H, Q, R, x0, P0 = _validate(z, F, H, Q, R, x0, P0)
    B, T, m = z.shape
    n = F.shape[-1]
    F, H, Q, R = (M.expand(B, *M.shape[-2:]) for M in (F, H, Q, R))
    observed = ~torch.isnan(z).any(-1)                       # (B, T): which z_t to use
    # Precisions of the noises; an SPD matrix is inverted through its Cholesky factor.
    spd_inverse = lambda S: torch.cholesky_inverse(torch.linalg.cholesky(S))  # noqa: E731
    Q_inv, R_inv = spd_inverse(Q), spd_inverse(R)
    m1, P1 = predict(x0.expand(B, n), P0.expand(B, n, n), F, Q)   # prior of x_1
    P1_inv = spd_inverse(P1)

    Lam = z.new_zeros(B, T, n, T, n)   # Λ, with its (T n) rows and columns split as (T, n)
    eta = z.new_zeros(B, T, n)
    Lam[:, 0, :, 0] += P1_inv
    eta[:, 0] += _matvec(P1_inv, m1)
    for t in range(1, T):   # transition: -1/2 |x_t - F x_{t-1}|^2 in the metric Q^{-1}
        Lam[:, t - 1, :, t - 1] += F.mT @ Q_inv @ F
        Lam[:, t, :, t] += Q_inv
        Lam[:, t - 1, :, t] -= F.mT @ Q_inv
        Lam[:, t, :, t - 1] -= Q_inv @ F
    HtRinv = H.mT @ R_inv
    for t in range(T):      # measurement: -1/2 |z_t - H x_t|^2 in the metric R^{-1}, if observed
        w = observed[:, t].to(z.dtype)
        Lam[:, t, :, t] += w[:, None, None] * (HtRinv @ H)
        eta[:, t] += w[:, None] * _matvec(HtRinv, torch.nan_to_num(z[:, t]))

    # Λ is symmetric positive definite, so one Cholesky factorization Λ = L L^T serves
    # both the mean (two triangular solves) and the covariance Λ^{-1}, all of which
    # we need here: its diagonal (n, n) blocks are the marginal covariances.
    L = torch.linalg.cholesky(Lam.reshape(B, T * n, T * n))
    mean = torch.cholesky_solve(eta.reshape(B, T * n, 1), L).reshape(B, T, n)
    cov = torch.cholesky_inverse(L).reshape(B, T, n, T, n)
    t = torch.arange(T)
    marginals = cov[:, t, :, t].permute(1, 0, 2, 3)   # advanced indexing puts T first
    return mean, _symmetrize(marginals)


# ----------------------------------------------------------------------------
# Data, models and consistency checks
# ----------------------------------------------------------------------------

def _sqrt_psd(P: Tensor) -> Tensor:
    """A square root L with L L^T = P for a PSD P (Cholesky would refuse a singular P)."""
    eigenvalues, V = torch.linalg.eigh(P)
    return V * eigenvalues.clamp_min(0).sqrt().unsqueeze(-2)


def simulate(F, H, Q, R, x0, P0, length: int, *, batch: int = 1, generator: torch.Generator | None = None):
    """Draw ``batch`` independent tracks of the model: returns (x_true (batch, T, n), z (batch, T, m)).

    x_0 ~ N(x0, P0), then for t = 1..T: x_t = F x_{t-1} + w_t, z_t = H x_t + v_t. A per-batch
    model needs ``batch`` equal to its leading size. Pass a seeded ``generator`` to repeat a draw.
    """
    for name, count in (("length", length), ("batch", batch)):
        if not isinstance(count, numbers.Integral) or count < 1:
            raise ValueError(f"{name} must be a positive int, got {count!r}")
    _validate_model(F, H, Q, R, x0, P0, batch=batch)
    n, m = F.shape[-1], H.shape[-2]

    def noise(size, cov):   # N(0, cov) draws: a square root of cov times standard normals
        e = torch.randn(*size, dtype=F.dtype, device=F.device, generator=generator)
        return _matvec(_sqrt_psd(cov), e)

    x = x0.expand(batch, n) + noise((batch, n), P0)
    xs, zs = [], []
    for _ in range(length):
        x = _matvec(F, x) + noise((batch, n), Q)
        xs.append(x)
        zs.append(_matvec(H, x) + noise((batch, m), R))
    return torch.stack(xs, dim=1), torch.stack(zs, dim=1)


def constant_velocity(dt: float, q: float, r: float, *, dims: int = 2, dtype=torch.float64) -> dict:
    r"""The constant-velocity (white-noise acceleration) model in ``dims`` dimensions.

    State (p_1..p_d, v_1..v_d); positions are measured. With acceleration noise of
    spectral density q, integrating over one step gives (Bar-Shalom et al. 2001, §6.2)

    .. math::

        F = \begin{bmatrix} I & \Delta t\, I \\ 0 & I \end{bmatrix}, \quad
        Q = q \begin{bmatrix} \Delta t^3/3\, I & \Delta t^2/2\, I \\ \Delta t^2/2\, I & \Delta t\, I \end{bmatrix},
        \quad H = [I \;\; 0], \quad R = r I.

    Returns a dict with keys F, H, Q, R.
    """
    I = torch.eye(dims, dtype=dtype)  # noqa: E741
    O = torch.zeros(dims, dims, dtype=dtype)  # noqa: E741
    F = torch.cat([torch.cat([I, dt * I], 1), torch.cat([O, I], 1)], 0)
    Q = q * torch.cat([torch.cat([dt**3 / 3 * I, dt**2 / 2 * I], 1), torch.cat([dt**2 / 2 * I, dt * I], 1)], 0)
    H = torch.cat([I, O], 1)
    R = r * I
    return {"F": F, "H": H, "Q": Q, "R": R}


def nis(innovation: Tensor, S: Tensor) -> Tensor:
    r"""Normalized innovation squared :math:`y^\top S^{-1} y`, shape ``innovation.shape[:-1]``.

    For a filter whose model is right, it is χ² with m degrees of freedom (NaN where missing).
    """
    _check_step(innovation=innovation, S=S)
    return (innovation * torch.linalg.solve(S, innovation.unsqueeze(-1)).squeeze(-1)).sum(-1)


def nees(x_true: Tensor, x: Tensor, P: Tensor) -> Tensor:
    r"""Normalized estimation error squared :math:`e^\top P^{-1} e`, e = x_true - x; χ² with n dof if calibrated."""
    _check_step(x_true=x_true, x=x, P=P)
    e = x_true - x
    return (e * torch.linalg.solve(P, e.unsqueeze(-1)).squeeze(-1)).sum(-1)


def _chi2_quantile(p: float, dof: float) -> float:
    # The χ²(k) CDF is the regularized lower incomplete gamma P(k/2, x/2): bisect on it.
    k = torch.tensor(dof / 2, dtype=torch.float64)
    lo, hi = 0.0, max(10.0, 10.0 * dof)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if torch.special.gammainc(k, torch.tensor(mid / 2, dtype=torch.float64)).item() < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def chi2_interval(dof: int, prob: float = 0.95, *, samples: int = 1) -> tuple[float, float]:
    """Two-sided ``prob`` interval for the mean of ``samples`` independent χ²(dof) values.

    The mean of N independent χ²(k) is χ²(N k) / N, so averaging over runs narrows
    the band around k. Used for NIS (dof = m) and NEES (dof = n) checks.
    """
    if not 0 < prob < 1:
        raise ValueError(f"prob must be in (0, 1), got {prob}")
    if dof < 1 or samples < 1:
        raise ValueError(f"dof and samples must be positive, got dof={dof}, samples={samples}")
    total = dof * samples
    return (_chi2_quantile((1 - prob) / 2, total) / samples, _chi2_quantile((1 + prob) / 2, total) / samples)


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------

def _shape(M) -> str:
    return str(tuple(M.shape)) if isinstance(M, Tensor) else type(M).__name__


def _check_tensor(name: str, M, like: tuple[str, Tensor] | None = None) -> None:
    """M is a floating-point tensor; with ``like = (other_name, other)``, of other's dtype and device."""
    if not isinstance(M, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(M).__name__}")
    if not M.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (float64 for the lesson), got {M.dtype}")
    if like is not None:
        other_name, other = like
        if M.dtype != other.dtype:
            raise ValueError(f"{name} has dtype {M.dtype} but {other_name} has {other.dtype}: "
                             f"all inputs must share one dtype")
        if M.device != other.device:
            raise ValueError(f"{name} is on {M.device} but {other_name} is on {other.device}: "
                             f"all inputs must share one device")


def _check_matrix(name: str, M: Tensor, rows: int, cols: int, batch: int, rows_sym: str, cols_sym: str) -> None:
    """M is (rows, cols), shared by all tracks, or (batch, rows, cols), one per track."""
    expected = f"{name} must be ({rows_sym}, {cols_sym}) = ({rows}, {cols}) or (batch, {rows}, {cols})"
    if M.dim() not in (2, 3) or M.shape[-2:] != (rows, cols):
        raise ValueError(f"{expected}, got {_shape(M)}")
    if M.dim() == 3 and M.shape[0] not in (1, batch):
        raise ValueError(f"{expected} with batch = {batch}, got {_shape(M)}")
    if not torch.isfinite(M).all():
        raise ValueError(f"{name} must be finite (no NaN or inf); only z may hold NaN, for a missing measurement")


def _check_covariance(name: str, M: Tensor) -> None:
    """M is symmetric and positive semi-definite, up to rounding (tolerances relative to its size)."""
    scale = M.abs().amax(dim=(-2, -1)).clamp_min(torch.finfo(M.dtype).tiny)
    asymmetry = (M - M.mT).abs().amax(dim=(-2, -1)) / scale
    if (asymmetry > (1e-6 if M.dtype == torch.float64 else 1e-4)).any():
        raise ValueError(f"{name} must be symmetric (a covariance), but |{name} - {name}^T| / |{name}| = "
                         f"{asymmetry.max().item():.2e}")
    smallest = torch.linalg.eigvalsh(_symmetrize(M)).amin(-1)
    tol = (1e-10 if M.dtype == torch.float64 else 1e-5) * scale
    if (smallest < -tol).any():
        raise ValueError(f"{name} must be positive semi-definite (a covariance), but its smallest "
                         f"eigenvalue is {smallest.min().item():.3e}")


def _validate_model(F, H, Q, R, x0, P0, *, batch: int, m: int | None = None, like=None):
    """Shapes, dtypes and covariances of the model; ``m`` defaults to H's number of rows.

    ``like = (name, tensor)`` is the input the model must agree with in dtype and device
    (z for the filters); without it, F.
    """
    _check_tensor("F", F, like)
    like = like or ("F", F)
    for name, M in (("H", H), ("Q", Q), ("R", R), ("x0", x0), ("P0", P0)):
        _check_tensor(name, M, like)
    if F.dim() not in (2, 3) or F.shape[-1] != F.shape[-2]:
        raise ValueError(f"F must be (n, n) or (batch, n, n), got {_shape(F)}")
    n = F.shape[-1]
    if m is None:
        if H.dim() not in (2, 3):
            raise ValueError(f"H must be (m, n) or (batch, m, n), got {_shape(H)}")
        m = H.shape[-2]
    _check_matrix("F", F, n, n, batch, "n", "n")
    _check_matrix("H", H, m, n, batch, "m", "n")
    _check_matrix("Q", Q, n, n, batch, "n", "n")
    _check_matrix("R", R, m, m, batch, "m", "m")
    _check_matrix("P0", P0, n, n, batch, "n", "n")
    if x0.dim() not in (1, 2) or x0.shape[-1] != n or (x0.dim() == 2 and x0.shape[0] not in (1, batch)):
        raise ValueError(f"x0 must be (n,) = ({n},) or (batch, {n}) with batch = {batch}, got {_shape(x0)}")
    if not torch.isfinite(x0).all():
        raise ValueError("x0 must be finite (no NaN or inf)")
    for name, M in (("Q", Q), ("R", R), ("P0", P0)):
        _check_covariance(name, M)


def _validate(z, F, H, Q, R, x0, P0):
    """The checks every whole-sequence function makes on its inputs."""
    _check_tensor("z", z)
    if z.dim() != 3:
        raise ValueError(f"z must be (batch, length, m), got {_shape(z)}")
    B, T, m = z.shape
    if B == 0 or T == 0 or m == 0:
        raise ValueError(f"z must be (batch, length, m) with no empty dimension, got {_shape(z)}")
    if torch.isinf(z).any():
        raise ValueError("z must not hold inf (NaN is allowed: it marks a missing measurement)")
    _validate_model(F, H, Q, R, x0, P0, batch=B, m=m, like=("z", z))
    return z, F, H, Q, R, x0, P0


# Trailing dimensions of each argument of the one-step functions, by name.
_TRAILING = {
    "x": "n", "P": "nn", "F": "nn", "Q": "nn", "z": "m", "H": "mn", "R": "mm",
    "x_filt": "n", "P_filt": "nn", "x_pred_next": "n", "P_pred_next": "nn",
    "x_smooth_next": "n", "P_smooth_next": "nn", "innovation": "m", "S": "mm", "x_true": "n",
}


def _check_step(**arrays: Tensor) -> None:
    """Light checks for the one-step functions: floating tensors of one dtype whose last
    dimensions agree (n from the first state-sized argument, m from the first measurement-
    sized one). Leading dimensions only need to broadcast, which torch checks itself.
    """
    first = next(iter(arrays.items()))
    sizes: dict[str, int] = {}
    for name, A in arrays.items():
        _check_tensor(name, A, first)
        symbols = _TRAILING[name]
        if A.dim() < len(symbols):
            raise ValueError(f"{name} must be (..., {', '.join(symbols)}), got {_shape(A)}")
        for symbol, size in zip(symbols, A.shape[-len(symbols):]):
            sizes.setdefault(symbol, size)
        expected = tuple(sizes[symbol] for symbol in symbols)
        if tuple(A.shape[-len(symbols):]) != expected:
            raise ValueError(f"{name} must be (..., {', '.join(symbols)}) = (..., "
                             f"{', '.join(map(str, expected))}), got {_shape(A)}")
