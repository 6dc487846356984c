r"""HiPPO: online projection of a signal's history onto orthogonal functions, as a linear ODE.

HiPPO (Gu, Dao, Ermon, Rudra and Ré 2020, "HiPPO: Recurrent Memory with Optimal
Polynomial Projections") asks: given a signal :math:`f` seen up to time :math:`t`, keep
the :math:`N` coefficients :math:`c(t)` of its best approximation by
:math:`g_0, \dots, g_{N-1}` in the weighted space :math:`L^2(\omega^{(t)})`, where the
measure :math:`\omega^{(t)}` says which part of the past matters (a sliding window, all of
it, an exponentially fading memory). With orthonormal :math:`g_n`,

.. math::

    c_n(t) = \int f(x)\, g_n(t, x)\, \omega(t, x)\, dx, \qquad
    f(x) \approx \sum_{n<N} c_n(t)\, g_n(t, x) \quad (x \le t).

For the measures below, differentiating under the integral closes up: :math:`c'(t)`
depends only on :math:`c(t)` and :math:`f(t)`, a linear ODE

.. math::

    c'(t) = A\,c(t) + B\,f(t) \qquad \text{(LegT, LagT, FouT: time-invariant)},
    \qquad c'(t) = \tfrac{1}{t}\big(A\,c(t) + B\,f(t)\big) \qquad \text{(LegS)},

so a recurrent model can carry the memory in :math:`N` numbers (Gu et al. 2020, Sec. 2-3,
Thm. 1 and 2, derivations in App. D). This module writes the matrices with the sign
convention of the ODE above (``A`` stable, eigenvalues in the left half-plane), the one
S4 uses, whereas the paper's theorems write :math:`c' = -Ac + Bf`.

The four measures (``theta = 1``: the window length of LegT and FouT), with
:math:`n, k = 0, \dots, N-1`::

    measure  omega(t, x)               window      basis g_n(t, x)
    legt     1 on [t-1, t]             [t-1, t]    sqrt(2n+1) P_n(2(x-t) + 1)
    legs     1/t on [0, t]             [0, t]      sqrt(2n+1) P_n(2x/t - 1)
    lagt     e^{-(t-x)} on (-inf, t]   (-inf, t]   L_n(t - x)
    fout     1 on [t-1, t]             [t-1, t]    1, sqrt2 cos(2 pi k s), sqrt2 sin(2 pi k s);  s = x - t

    measure  A_nk                                                      B_n
    legt     -s_n s_k  (k <= n),   -s_n s_k (-1)^(n-k)  (k > n)        s_n
    legs     -s_n s_k  (n > k),    -(n+1)  (n = k),   0  (n < k)       s_n
    lagt     -1  (k <= n),   0  (k > n)                                1
    fout     Omega - e e^T  (Omega: the rotation of each cos/sin pair)  e = g(t, t)

with :math:`s_n = \sqrt{2n+1}`, :math:`P_n` the Legendre and :math:`L_n` the Laguerre
polynomials. Each derivation is two lines (App. D of the paper has them at length):

- **legs**: :math:`\partial_t` of :math:`\frac1t\int_0^t f(x)g_n(t,x)dx` gives
  :math:`\frac1t f(t) g_n(t,t) - \frac1t c_n` plus the term from
  :math:`\partial_t P_n(2x/t - 1)`, which is a combination of lower :math:`P_k`
  (:math:`(z+1)P_n'(z) = nP_n + \sum_{k<n} (2k+1) P_k`); collecting, Thm. 2.
- **legt**: the window's two ends give :math:`f(t)g_n(1) - f(t-1)g_n(-1)`; the unknown
  :math:`f(t-1)` is replaced by the reconstruction :math:`\sum_k c_k g_k(t, t-1)`, and
  :math:`P_n' = \sum_{k<n,\ n-k \text{ odd}} (2k+1)P_k` gives the rest (Thm. 1; the paper
  writes LegT with unnormalized coefficients and the window's ends the other way round,
  which is this system after the diagonal change of coordinates
  :math:`c_n \to (-1)^n \sqrt{2n+1}\, c_n`, checked in the tests).
- **lagt**: :math:`L_n(0) = 1` and :math:`L_n' = -\sum_{k<n} L_k`, and the weight's own
  derivative gives :math:`-c_n` (Thm. 1, with the Laguerre parameter :math:`\alpha = 0`).
- **fout**: the basis is periodic with period 1, so the window's two ends give
  :math:`e\,(f(t) - f(t-1))`; :math:`\frac{d}{ds}` rotates each cos/sin pair (the skew
  :math:`\Omega`, :math:`\Omega_{2k-1, 2k} = 2\pi k = -\Omega_{2k, 2k-1}`), and
  :math:`f(t-1)` is again replaced by the reconstruction :math:`e^\top c` (App. D).
  FouT's ordering: :math:`g_0 = 1`, :math:`g_{2k-1} = \sqrt2\cos(2\pi k s)`,
  :math:`g_{2k} = \sqrt2\sin(2\pi k s)`.

LegT's and FouT's ODEs are exact only when the reconstruction at the far end of the window
is (a polynomial of degree < N for LegT; a 1-periodic trigonometric polynomial for
FouT); LegS and LagT lose nothing at the far end and their ODEs are exact for every
:math:`f`. For FouT the reconstruction at the window's ends converges to the *average*
:math:`(f(t) + f(t-1))/2` when :math:`f` jumps there (Gibbs), so its memory is the least
faithful of the four.

Glossary (symbol -> shape)
--------------------------
::

    A          (N, N)               the HiPPO transition matrix (without LegS's 1/t)
    B          (N,)                 the input vector
    c          (batch, length, N)   the coefficients c(t_k) after each sample
    f          (batch, length)      the signal, f[:, k] = f(t_k), t_k = (k + 1) dt
    t_grid     (T,)                 times at which a basis or a reconstruction is evaluated
    Lambda, P, B_tilde, V           the NPLR form (see nplr): (N,), (N, r), (N,), (N, N), complex

Everything here is float64 by default: these are the fixed matrices a model starts from,
built once.
"""

from __future__ import annotations

import math

import torch

from . import ssm as _ssm

MEASURES = ("legt", "legs", "lagt", "fout")
"""The measures :func:`transition` knows."""

ONLINE_METHODS = ("euler", "backward_euler", "bilinear", "zoh")
"""Discretizations :func:`hippo_online` accepts (those of :func:`seqbook.ssm.discretize`)."""


def _check_measure(measure) -> str:
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    return measure


def _check_N(N) -> int:
    if isinstance(N, bool) or not isinstance(N, int) or N < 1:
        raise ValueError(f"N must be a positive int (the number of coefficients), got {N!r}")
    return N


def _check_real_dtype(dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


# --------------------------------------------------------------------------------------
# The transition matrices
# --------------------------------------------------------------------------------------


def transition(measure: str, N: int, *, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The HiPPO matrices ``(A, B)`` of ``measure`` for ``N`` coefficients.

    The ODE is :math:`c' = Ac + Bf` for ``"legt"``, ``"lagt"``, ``"fout"`` (window
    length :math:`\theta = 1` for LegT and FouT; for another :math:`\theta` divide both
    by :math:`\theta`), and :math:`c' = \frac1t (Ac + Bf)` for ``"legs"``: ``A, B`` are
    returned **without** the :math:`1/t`. Entries in the module docstring's table
    (Gu et al. 2020, Thm. 1 for LegT and LagT, Thm. 2 for LegS, App. D.1-D.4 for the
    derivations and FouT), with the sign convention ``A`` stable.

    Returns:
        ``A (N, N)``, ``B (N,)`` in ``dtype`` (float64 by default).
    """
    _check_measure(measure)
    _check_N(N)
    _check_real_dtype(dtype)
    n = torch.arange(N, dtype=torch.float64)
    row, col = n[:, None], n[None, :]  # row n, column k
    s = torch.sqrt(2 * n + 1)
    if measure == "legs":
        A = -torch.where(row > col, s[:, None] * s[None, :], torch.where(row == col, row + 1, 0.0))
        B = s
    elif measure == "legt":
        # k <= n: 1; k > n: (-1)^(n-k). Both sides are s_n s_k.
        sign = torch.where(col <= row, 1.0, (-1.0) ** (row - col))
        A = -s[:, None] * s[None, :] * sign
        B = s
    elif measure == "lagt":
        A = -torch.tril(torch.ones(N, N, dtype=torch.float64))
        B = torch.ones(N, dtype=torch.float64)
    else:  # fout
        e = _fourier_at_zero(N)
        Omega = torch.zeros(N, N, dtype=torch.float64)
        for k in range(1, (N - 1) // 2 + 1):  # pairs (cos, sin) = (2k-1, 2k) that both fit in N
            Omega[2 * k - 1, 2 * k] = 2 * math.pi * k  # d/dt c_cos = +2 pi k c_sin
            Omega[2 * k, 2 * k - 1] = -2 * math.pi * k
        # With N even the last coefficient is a cos without its sin: its derivative term
        # -2 pi k c_sin involves a coefficient we do not keep and is dropped (the projection
        # onto the kept span).
        A = Omega - e[:, None] * e[None, :]
        B = e
    return A.to(dtype), B.to(dtype)


def _fourier_at_zero(N: int) -> torch.Tensor:
    """FouT's basis at s = 0 (the present): 1 for the constant, sqrt 2 for cosines, 0 for sines."""
    e = torch.zeros(N, dtype=torch.float64)
    e[0] = 1.0
    e[1::2] = math.sqrt(2.0)  # indices 2k - 1: cosines
    return e


# --------------------------------------------------------------------------------------
# The basis, and reconstruction from coefficients
# --------------------------------------------------------------------------------------


def legendre(N: int, z: torch.Tensor) -> torch.Tensor:
    r"""Legendre polynomials :math:`P_0, \dots, P_{N-1}` at ``z``: ``(..., N)``.

    Bonnet's three-term recurrence :math:`(n+1)P_{n+1} = (2n+1)zP_n - nP_{n-1}`, stable on
    :math:`[-1, 1]` (the monomial expansion is not: its coefficients grow like :math:`2^n`).
    """
    P = [torch.ones_like(z), z]
    for n in range(1, N - 1):
        P.append(((2 * n + 1) * z * P[n] - n * P[n - 1]) / (n + 1))
    return torch.stack(P[:N], dim=-1)


def laguerre(N: int, y: torch.Tensor) -> torch.Tensor:
    r"""Laguerre polynomials :math:`L_0, \dots, L_{N-1}` at ``y``: ``(..., N)``.

    :math:`(n+1)L_{n+1} = (2n+1-y)L_n - nL_{n-1}`; orthonormal for the weight :math:`e^{-y}` on :math:`[0, \infty)`.
    """
    L = [torch.ones_like(y), 1 - y]
    for n in range(1, N - 1):
        L.append(((2 * n + 1 - y) * L[n] - n * L[n - 1]) / (n + 1))
    return torch.stack(L[:N], dim=-1)


def basis(
    measure: str, N: int, t_grid, *, t: float = 1.0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    r"""The basis :math:`g_n(t, x)` of ``measure`` at the points ``x`` in ``t_grid``: ``(T, N)``.

    ``t`` is the present (the end of the window): the window is ``[0, t]`` for legs,
    ``[t - 1, t]`` for legt and fout, ``(-inf, t]`` for lagt (see the module table).
    Outside its window every basis function is 0 there, so that a reconstruction plotted
    over a longer stretch shows what the memory covers. Orthonormal in
    :math:`L^2(\omega^{(t)})`: :math:`\int g_n g_k \omega = \delta_{nk}`.
    """
    _check_measure(measure)
    _check_N(N)
    _check_real_dtype(dtype)
    x = torch.as_tensor(t_grid, dtype=dtype)
    if x.ndim != 1:
        raise ValueError(f"t_grid must be a 1-D tensor of times (T,), got shape {tuple(x.shape)}")
    if measure == "legs" and not t > 0:
        raise ValueError(f"t must be positive for legs (the window is [0, t]), got {t}")
    n = torch.arange(N, dtype=dtype)
    s = torch.sqrt(2 * n + 1)
    if measure == "legs":
        inside = (x >= 0) & (x <= t)
        G = s * legendre(N, 2 * x / t - 1)
    elif measure == "legt":
        inside = (x >= t - 1) & (x <= t)
        G = s * legendre(N, 2 * (x - t) + 1)
    elif measure == "lagt":
        inside = x <= t
        G = laguerre(N, (t - x).clamp_min(0))
    else:  # fout
        inside = (x >= t - 1) & (x <= t)
        k = torch.div(n + 1, 2, rounding_mode="floor")  # frequency of g_n: 0, 1, 1, 2, 2, ...
        phase = 2 * math.pi * k * (x - t)[:, None]
        is_cos = (n % 2 == 1) | (n == 0)
        scale = torch.full((N,), 2.0, dtype=dtype).sqrt()
        scale[0] = 1.0
        G = torch.where(is_cos, torch.cos(phase), torch.sin(phase)) * scale
    return torch.where(inside[:, None], G, torch.zeros((), dtype=dtype))


def reconstruct(measure: str, coefficients: torch.Tensor, t_grid, *, t: float = 1.0) -> torch.Tensor:
    r"""The function the coefficients stand for, :math:`\sum_n c_n g_n(t, x)` at ``x`` in ``t_grid``.

    Args:
        measure: one of :data:`MEASURES`.
        coefficients: ``(..., N)``, e.g. one row ``c[:, k]`` of :func:`hippo_online`'s output.
        t_grid: ``(T,)`` times; the window of ``measure`` at time ``t`` is where the
            answer is meaningful (0 outside it, see :func:`basis`).
        t: the present, the time at which the coefficients were taken.

    Returns:
        ``(..., T)`` in the coefficients' dtype.
    """
    c = coefficients
    if not isinstance(c, torch.Tensor) or not c.is_floating_point():
        raise TypeError(f"coefficients must be a real floating-point tensor (..., N), got {type(c).__name__}")
    if c.ndim < 1:
        raise ValueError("coefficients must be (..., N), got a scalar")
    G = basis(measure, c.shape[-1], t_grid, t=t, dtype=c.dtype).to(c.device)  # (T, N)
    return c @ G.T


# --------------------------------------------------------------------------------------
# Running the ODE over a sampled signal
# --------------------------------------------------------------------------------------


def hippo_online(
    measure: str, f: torch.Tensor, N: int, *, dt: float | None = None, method: str = "bilinear"
) -> torch.Tensor:
    r"""Project the history of ``f`` online: the coefficients after every sample.

    Sample ``k`` is :math:`f(t_k)` with :math:`t_k = (k+1)\,\Delta t`. The ODE is discretized
    with ``method`` (:func:`seqbook.ssm.discretize`; bilinear by default, the generalized
    bilinear transform of Gu et al. 2020, Sec. 2.4 and App. B.3) and run as a recurrence
    :math:`c_k = \bar A_k c_{k-1} + \bar B_k f_k` from :math:`c_{-1} = 0` (nothing seen):

    - legt, lagt, fout: one :math:`(\bar A, \bar B)` for step :math:`\Delta t`
      (default ``1 / length``: the signal fills one window of LegT/FouT exactly at the
      end).
    - legs: the ODE :math:`c' = \frac1t(Ac + Bf)` has step :math:`\Delta t / t_k = 1/(k+1)`
      at sample ``k`` whatever :math:`\Delta t` is (LegS is invariant to the time scale,
      Gu et al. 2020, Prop. 3), so ``dt`` is ignored and :math:`(\bar A_k, \bar B_k)` is the
      discretization of :math:`(A, B)` with step :math:`1/(k+1)`, a different matrix at every step.

    Shapes: ``f (batch, length)`` -> ``c (batch, length, N)``, in ``f``'s dtype.
    """
    _check_measure(measure)
    _check_N(N)
    if method not in ONLINE_METHODS:
        raise ValueError(f"method must be one of {ONLINE_METHODS}, got {method!r}")
    if not isinstance(f, torch.Tensor) or f.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"f must be a float32 or float64 tensor (batch, length), got {getattr(f, 'dtype', type(f))}")
    if f.ndim != 2 or f.shape[1] < 1:
        raise ValueError(f"f must be (batch, length) with length >= 1, got shape {tuple(f.shape)}")
    batch, length = f.shape
    A, B = transition(measure, N, dtype=torch.float64)
    if measure == "legs":
        step = 1.0 / torch.arange(1, length + 1, dtype=torch.float64)  # (length,)
    else:
        dt = 1.0 / length if dt is None else dt
        if not isinstance(dt, (int, float)) or not dt > 0:
            raise ValueError(f"dt must be a positive number, got {dt!r}")
        step = torch.tensor(float(dt), dtype=torch.float64)
    # Discretized in float64 once, then cast: the (I - step/2 A) solves are the only place
    # where rounding could build up, and they cost nothing next to the loop.
    A_bar, B_bar = _ssm.discretize(A, B[:, None], step, method)  # (N, N) or (length, N, N); B_bar (..., N, 1)
    A_bar, B_bar = A_bar.to(f.dtype).to(f.device), B_bar[..., 0].to(f.dtype).to(f.device)
    c = torch.zeros(batch, N, dtype=f.dtype, device=f.device)
    out = []
    for k in range(length):
        Ak, Bk = (A_bar[k], B_bar[k]) if measure == "legs" else (A_bar, B_bar)
        c = c @ Ak.T + f[:, k, None] * Bk  # c_k = A_bar_k c_{k-1} + B_bar_k f_k, for every row of the batch
        out.append(c)
    return torch.stack(out, dim=1)


def legs_eigenvector_condition(N: int, *, digits: int | None = None) -> float:
    r"""The 2-norm condition number of LegS's eigenvector matrix, computed in high precision (mpmath).

    LegS's :math:`A` (``transition("legs", N)``) is lower triangular with distinct eigenvalues
    :math:`\lambda_k = -(k + 1)`, so its eigenvectors follow by forward substitution, exactly:
    :math:`v^{(k)}_j = 0` for :math:`j < k`, :math:`v^{(k)}_k = 1`, and for :math:`n > k`

    .. math::

        v^{(k)}_n = \frac{-\sum_{k \le j < n} A_{nj} v^{(k)}_j}{A_{nn} - \lambda_k} .

    Each column is scaled to unit norm (as ``torch.linalg.eig`` returns them), and the condition
    number :math:`\sigma_{\max}/\sigma_{\min}` of :math:`W` comes from an SVD in ``digits``
    decimal digits (default ``30 + N``: the condition number grows like :math:`10^{0.75 N}`, and
    every digit of it is a digit the arithmetic must carry). In float64 the same computation
    saturates near :math:`10^{16}`-:math:`10^{18}` (the inverse of the rounding unit), whatever
    the truth: S4, Lemma 3.2, shows the growth is exponential. Needs ``mpmath`` (installed with
    the ``test`` and ``book`` extras; it is also a dependency of sympy, which torch installs).
    """
    _check_N(N)
    try:
        import mpmath
    except ImportError as error:  # pragma: no cover - mpmath comes with torch's sympy
        raise ImportError("legs_eigenvector_condition needs mpmath: pip install mpmath") from error
    if digits is None:
        digits = 30 + N
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 20:
        raise ValueError(f"digits must be an int >= 20, got {digits!r}")
    with mpmath.workdps(digits):
        s = [mpmath.sqrt(2 * n + 1) for n in range(N)]

        def A(n, k):
            return -s[n] * s[k] if n > k else (-(n + 1) if n == k else 0)

        W = mpmath.matrix(N, N)
        for k in range(N):
            v = [mpmath.mpf(0)] * N
            v[k] = mpmath.mpf(1)
            for n in range(k + 1, N):  # (A_nn - lambda_k) v_n = -sum_j A_nj v_j
                v[n] = -mpmath.fsum(A(n, j) * v[j] for j in range(k, n)) / (A(n, n) + (k + 1))
            norm = mpmath.sqrt(mpmath.fsum(x * x for x in v))
            for n in range(N):
                W[n, k] = v[n] / norm
        sigma = mpmath.svd_r(W, compute_uv=False)
        return float(max(sigma) / min(sigma))


# --------------------------------------------------------------------------------------
# Normal plus low-rank (S4)
# --------------------------------------------------------------------------------------


def nplr_P(measure: str, N: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    r"""The low-rank term ``P (N, r)`` that makes :math:`A + PP^\top` normal (S4, Gu et al. 2022, Thm. 1).

    The symmetric part of each HiPPO matrix is a multiple of the identity minus a low-rank
    matrix; adding :math:`PP^\top` removes the low-rank part and leaves
    :math:`cI + \text{skew}`, which is normal (unitarily diagonalizable):

    - legs: :math:`P_n = \sqrt{n + 1/2}` (r = 1); :math:`A + PP^\top = -\tfrac12 I + \text{skew}`.
    - legt: :math:`P = [s \odot \text{even}, s \odot \text{odd}]` (r = 2), the sqrt(2n+1) on even
      and on odd indices: the symmetric part of ``A`` is :math:`-s_ns_k` when
      :math:`n \equiv k \pmod 2`, 0 otherwise; :math:`A + PP^\top` is skew.
    - lagt: :math:`P_n = 1/\sqrt2` (r = 1); :math:`A + PP^\top = -\tfrac12 I + \text{skew}`.
    - fout: :math:`P = e = B` (r = 1); :math:`A + PP^\top = \Omega` is skew.
    """
    _check_measure(measure)
    _check_N(N)
    n = torch.arange(N, dtype=torch.float64)
    if measure == "legs":
        P = torch.sqrt(n + 0.5)[:, None]
    elif measure == "legt":
        s = torch.sqrt(2 * n + 1)
        even = (n % 2 == 0).to(torch.float64)
        P = torch.stack([s * even, s * (1 - even)], dim=-1)
    elif measure == "lagt":
        P = torch.full((N, 1), 0.5**0.5, dtype=torch.float64)
    else:
        P = _fourier_at_zero(N)[:, None]
    return P.to(dtype)


def nplr(measure: str, N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The normal-plus-low-rank form :math:`A = V(\Lambda - \tilde P \tilde P^*)V^*` of a HiPPO matrix.

    S4 (Gu, Goel and Ré 2022, "Efficiently Modeling Long Sequences with Structured State
    Spaces", Sec. 3.2-3.3 and Thm. 1): the HiPPO matrices are not stably diagonalizable
    (LegS's eigenvectors are exponentially ill-conditioned), but each is a *normal*
    matrix minus a low-rank one, :math:`A = S - PP^\top` with :math:`S = A + PP^\top`
    (:func:`nplr_P`). A normal :math:`S` has a *unitary* eigenbasis,
    :math:`S = V\Lambda V^*`, so in that basis

    .. math::

        V^* A V = \Lambda - (V^*P)(V^*P)^* =: \Lambda - \tilde P\tilde P^*,
        \qquad \tilde B = V^* B,

    diagonal plus low-rank (DPLR): the form S4's kernel algorithm needs. Computed here
    as :math:`S = cI + K` with :math:`c` the (constant) diagonal and :math:`K` skew:
    :math:`iK` is Hermitian, and ``torch.linalg.eigh`` returns an exactly unitary
    :math:`V` (a general eigensolver would not).

    Returns (complex128):
        ``Lambda (N,)`` the eigenvalues of :math:`S` (real part :math:`c`: -1/2 for legs
        and lagt, 0 for legt and fout), sorted by imaginary part;
        ``P (N, r)`` = :math:`V^*P`; ``B (N,)`` = :math:`V^*B`; ``V (N, N)`` unitary.
    """
    A, B = transition(measure, N)
    P = nplr_P(measure, N)
    S = A + P @ P.T
    c = torch.diagonal(S).mean()
    K = S - c * torch.eye(N, dtype=torch.float64)
    # Guard for the derivations above: S must be c I + skew, or V would not diagonalize it.
    assert torch.allclose(K, -K.T, atol=1e-9 * max(1.0, N)), "A + P P^T is not c I + skew"
    mu, V = torch.linalg.eigh(1j * K.to(torch.complex128))  # iK = V diag(mu) V^*, mu real
    Lambda = c - 1j * mu.to(torch.complex128)  # K = V diag(-i mu) V^*
    order = torch.argsort(Lambda.imag, stable=True)
    Lambda, V = Lambda[order], V[:, order]
    Vh = V.conj().T
    return Lambda, Vh @ P.to(torch.complex128), Vh @ B.to(torch.complex128), V


def dplr_matrix(Lambda: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    r"""The dense matrix :math:`\mathrm{diag}(\Lambda) - PP^*` of a DPLR form: ``(..., N, N)``.

    ``Lambda (..., N)``; ``P (..., N)`` (rank 1) or ``(..., N, r)``.
    """
    if P.ndim == Lambda.ndim:
        P = P[..., None]
    return torch.diag_embed(Lambda) - P @ P.conj().transpose(-1, -2)
