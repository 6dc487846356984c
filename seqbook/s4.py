r"""S4: the convolution kernel of a diagonal-plus-low-rank SSM, by Cauchy kernels and Woodbury.

S4 (Gu, Goel and Ré 2022, "Efficiently Modeling Long Sequences with Structured State
Spaces") starts from a HiPPO matrix written as :math:`A = \Lambda - PP^*` in a unitary
basis (:func:`seqbook.hippo.nplr`) and needs the kernel of the discretized system,

.. math::

    \bar K = (C\bar B,\ C\bar A\bar B,\ \dots,\ C\bar A^{L-1}\bar B), \qquad
    \bar A = (I - \tfrac{\Delta}{2}A)^{-1}(I + \tfrac{\Delta}{2}A),\quad
    \bar B = (I - \tfrac{\Delta}{2}A)^{-1}\Delta B

(bilinear discretization, S4 eq. 3). Powers of a dense :math:`\bar A` cost
:math:`O(N^2 L)` (:func:`s4_kernel_explicit`). :func:`s4_kernel` instead follows S4's
Algorithm 1 (Sec. 3.3, App. C.3), whose only heavy step is a Cauchy kernel: :math:`O(NL)`
work as written here and in the fused kernel, :math:`\tilde O(N + L)` with the fast
multipole-style Cauchy algorithms the paper cites (Thm. 3), and no :math:`N \times N` matrix
(but for step 1, see :func:`truncate_C`):

1. **Truncated generating function.** :math:`\hat K(z) = \sum_{l<L} \bar K_l z^l =
   \tilde C (I - \bar A z)^{-1}\bar B` with :math:`\tilde C = C(I - \bar A^L)`, because
   :math:`\sum_{l<L}\bar A^l z^l = (I - \bar A^L z^L)(I - \bar Az)^{-1}` and
   :math:`z^L = 1` at the points used next (Lemma C.2).
2. **Roots of unity.** At :math:`z_k = e^{-2\pi i k/L}`, :math:`\hat K(z_k)` is the
   discrete Fourier transform of :math:`\bar K`: an inverse FFT returns the kernel.
3. **Bilinear in the resolvent.** With the bilinear :math:`\bar A, \bar B`,
   :math:`(I - \bar Az)^{-1}\bar B = \frac{2}{1+z}\,(g(z) - A)^{-1}B` with
   :math:`g(z) = \frac{2}{\Delta}\frac{1-z}{1+z}` (Lemma C.3).
4. **Woodbury.** :math:`(g - \Lambda + PP^*)^{-1} = R - RP(1 + P^*RP)^{-1}P^*R` with
   the diagonal :math:`R = (g - \Lambda)^{-1}`, so

   .. math::

       \hat K(z) = \frac{2}{1+z}\Big[k_{\tilde C,B} - \frac{k_{\tilde C,P}\;k_{P^*,B}}{1 + k_{P^*,P}}\Big],
       \qquad k_{a,b}(g) = \sum_n \frac{a_n b_n}{g - \Lambda_n},

   four **Cauchy kernels** (:func:`cauchy`), each :math:`O(NL)` work and, with a fused
   kernel, :math:`O(N + L)` memory.

A real system is given by *all* its eigenvalues here: the S4 layer (:class:`seqbook.nn.S4`)
keeps one of each conjugate pair as its parameters and passes the pairs concatenated with
their conjugates, so that the kernel comes out real. Unlike S4D's, S4's kernel cannot
simply keep half the modes and take :math:`2\,\mathrm{Re}`: the low-rank term couples the
two halves through :math:`1 + k_{P^*,P}`. The kernel returned is :math:`\mathrm{Re}\,\bar K`
in every case (the imaginary part of a conjugate-closed system is rounding).

Glossary (symbol -> shape)
--------------------------
::

    Lambda   (H, N) or (N,)   eigenvalues of the normal part, complex (Re < 0 for a stable system)
    P        (H, N) or (N,)   the rank-1 term of A = diag(Lambda) - P P^*, complex
    B, C     (H, N)           input and output vectors in the same basis, complex
    log_step (H,)             log Delta, one step per channel, real
    L                         kernel length (any positive int; odd is fine)
    K        (H, L)           the kernel Re(C A_bar^l B_bar), l = 0..L-1, real
    v, w     (H, N)           Cauchy numerators and poles;  z (L,) or (H, L) the evaluation points

S4D (Gu, Gupta, Goel and Ré 2022) drops :math:`P`: its kernel is
:func:`seqbook.ssm.s4d_kernel` (re-exported here), and :func:`s4d_init` gives its
initializations.
"""

from __future__ import annotations

import math

import torch

from . import backend as _backend
from . import hippo as _hippo
from .ssm import s4d_kernel  # noqa: F401  (S4D's kernel lives with chapter 2's diagonal SSMs)

COMPLEX_DTYPES = (torch.complex64, torch.complex128)
#: dtypes the Triton Cauchy kernel is used for under backend="auto" (it computes in float32).
KERNEL_DTYPES = (torch.complex64,)
S4D_INITS = ("inv", "lin", "legs")


# --------------------------------------------------------------------------------------
# The Cauchy kernel
# --------------------------------------------------------------------------------------


def cauchy(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    r"""The Cauchy kernel :math:`k_{h,l} = \sum_n v_{h,n} / (z_{h,l} - w_{h,n})`.

    Args:
        v: ``(H, N)`` complex, the numerators.
        z: ``(L,)`` (shared by every row) or ``(H, L)``, complex, the evaluation points.
        w: ``(H, N)`` complex, the poles; same dtype as ``v`` and ``z``.
        backend: ``"reference"`` (:func:`cauchy_reference`, materializes ``(H, N, L)``),
            ``"triton"`` (:mod:`seqbook.kernels.cauchy`, fused: ``O(H (N + L))`` memory;
            compiled on CUDA, interpreted without a GPU), or ``"auto"``: the kernel for
            CUDA complex64 tensors, the reference otherwise.

    Returns:
        ``k (H, L)`` complex, differentiable in ``v``, ``w`` and ``z``.

    All three must be complex tensors of one dtype (complex64 or complex128) on one
    device; anything else raises ``TypeError``/``ValueError`` naming the argument.
    """
    _check_cauchy(v, z, w)
    chosen = _backend.resolve(backend, v, z, w)
    if chosen == "triton" and backend == "auto" and v.dtype not in KERNEL_DTYPES:
        chosen = "reference"  # complex128: the float32 kernel would lose the digits asked for
    if chosen == "reference":
        return cauchy_reference(v, z, w)
    return _backend.kernels("cauchy").cauchy(v, z, w)


def cauchy_reference(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The readable Cauchy kernel: materialize every ``v / (z - w)`` as ``(H, N, L)``, then sum over ``N``.

    Shapes as in :func:`cauchy`; no validation. ``O(H N L)`` memory, which is what the
    fused kernel avoids: at H = 256, N = 64, L = 16384 in complex64 that is 2 GiB.
    """
    if z.ndim == 1:
        z = z.expand(v.shape[0], -1)  # (H, L), a view
    terms = v[:, :, None] / (z[:, None, :] - w[:, :, None])  # (H, N, L)
    return terms.sum(dim=1)


def _check_cauchy(v, z, w) -> None:
    for name, x in (("v", v), ("z", z), ("w", w)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"cauchy: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in COMPLEX_DTYPES:
            raise TypeError(f"cauchy: {name} must be complex64 or complex128, got {x.dtype}")
    if v.ndim != 2:
        raise ValueError(f"cauchy: v must be (H, N), got shape {tuple(v.shape)}")
    if w.shape != v.shape:
        raise ValueError(f"cauchy: w must have the shape of v, (H, N) = {tuple(v.shape)}, got {tuple(w.shape)}")
    H = v.shape[0]
    if not (z.ndim == 1 or (z.ndim == 2 and z.shape[0] == H)):
        raise ValueError(f"cauchy: z must be (L,) or (H, L) with H = {H}, got shape {tuple(z.shape)}")
    for name, x in (("z", z), ("w", w)):
        if x.dtype != v.dtype:
            raise TypeError(f"cauchy: {name} must have the dtype of v ({v.dtype}), got {x.dtype}")
        if x.device != v.device:
            raise ValueError(f"cauchy: {name} must be on the device of v ({v.device}), got {x.device}")


# --------------------------------------------------------------------------------------
# The S4 kernel
# --------------------------------------------------------------------------------------


def _check_dplr(fn, Lambda, P, B, C, log_step, L):
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ValueError(f"{fn}: L must be a positive int, got {L!r}")
    for name, x in (("Lambda", Lambda), ("P", P), ("B", B), ("C", C), ("log_step", log_step)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not (x.is_complex() or x.is_floating_point()):
            raise TypeError(f"{fn}: {name} must be a floating-point or complex tensor, got {x.dtype}")
    if log_step.is_complex():
        raise TypeError(f"{fn}: log_step must be real (log of the step Delta), got {log_step.dtype}")
    if B.ndim != 2:
        raise ValueError(f"{fn}: B must be (H, N), got shape {tuple(B.shape)}")
    H, N = B.shape
    for name, x in (("Lambda", Lambda), ("P", P)):
        if x.shape not in ((H, N), (N,)):
            raise ValueError(f"{fn}: {name} must be (H, N) = ({H}, {N}) or (N,) = ({N},), got {tuple(x.shape)}")
    if C.shape != (H, N):
        raise ValueError(f"{fn}: C must be (H, N) = ({H}, {N}), got shape {tuple(C.shape)}")
    if log_step.shape != (H,):
        raise ValueError(f"{fn}: log_step must be (H,) = ({H},), got shape {tuple(log_step.shape)}")
    device = B.device
    for name, x in (("Lambda", Lambda), ("P", P), ("C", C), ("log_step", log_step)):
        if x.device != device:
            raise ValueError(f"{fn}: {name} must be on the device of B ({device}), got {x.device}")
    cdtype = torch.promote_types(torch.promote_types(Lambda.dtype, P.dtype), torch.promote_types(B.dtype, C.dtype))
    cdtype = torch.promote_types(cdtype, torch.complex64)
    if log_step.dtype == torch.float64:
        cdtype = torch.complex128
    real = torch.float64 if cdtype == torch.complex128 else torch.float32
    expand = lambda x: x.to(cdtype).expand(H, N)  # noqa: E731
    return expand(Lambda), expand(P), B.to(cdtype), C.to(cdtype), log_step.to(real)


def _bilinear(Lambda, P, B, step):
    """Dense bilinear discretization of A = diag(Lambda) - P P^*, per channel: (H, N, N), (H, N)."""
    A = _hippo.dplr_matrix(Lambda, P)  # (H, N, N)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    half = (step / 2)[:, None, None].to(A.dtype)
    lhs = eye - half * A
    A_bar = torch.linalg.solve(lhs, eye + half * A)
    B_bar = torch.linalg.solve(lhs, (step[:, None].to(A.dtype) * B)[..., None])[..., 0]
    return A_bar, B_bar


def truncate_C(Lambda, P, B, C, log_step, L) -> torch.Tensor:
    r""":math:`\tilde C = C(I - \bar A^L)`, step 1 of S4's Algorithm 1 (``(H, N)``; shapes as in :func:`s4_kernel`).

    A dense :math:`\bar A^L` (repeated squaring, :math:`O(N^3 \log L)`): cheap at the
    sizes it is used (once, or on small models), and the reason the S4 layer learns
    :math:`\tilde C` directly instead (S4, Sec. 3.3: "we can simply parameterize
    :math:`\tilde C`"), as :class:`seqbook.nn.S4` does.
    """
    Lambda, P, B, C, log_step = _check_dplr("truncate_C", Lambda, P, B, C, log_step, L)
    A_bar, _ = _bilinear(Lambda, P, B, log_step.exp())
    A_bar_L = torch.linalg.matrix_power(A_bar, L)
    return C - (C[:, None, :] @ A_bar_L)[:, 0, :]


def s4_kernel(
    Lambda: torch.Tensor,
    P: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    log_step: torch.Tensor,
    L: int,
    *,
    C_is_truncated: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    r"""The S4 convolution kernel of a DPLR system, by S4's Algorithm 1 (see the module docstring).

    Args:
        Lambda, P, B, C, log_step, L: as in the module glossary; the state matrix is
            :math:`A = \mathrm{diag}(\Lambda) - PP^*`, the step :math:`\Delta = e^{\text{log\_step}}`.
        C_is_truncated: ``C`` is already :math:`\tilde C = C(I - \bar A^L)` (what the S4
            layer learns), so step 1 is skipped; otherwise it is computed by
            :func:`truncate_C`.
        backend: for the Cauchy kernel (:func:`cauchy`).

    Returns:
        ``K (H, L)`` real: :math:`\mathrm{Re}\,C\bar A^l\bar B` with the bilinear
        :math:`\bar A, \bar B`. float64 for complex128 (or float64 ``log_step``) inputs,
        float32 otherwise. Differentiable in every input.
    """
    Lambda, P, B, C, log_step = _check_dplr("s4_kernel", Lambda, P, B, C, log_step, L)
    H, N = B.shape
    step = log_step.exp()  # (H,)
    # 1. Truncate the generating function to L terms.
    C_tilde = C if C_is_truncated else truncate_C(Lambda, P, B, C, log_step, L)

    # 2. The L-th roots of unity z_k = exp(-2 pi i k / L). At z = -1 (k = L/2, even L only)
    #    the factor 2/(1+z) and g(z) are both infinite; a safe stand-in keeps inf/nan out of
    #    the forward and backward passes, and that point is filled in exactly at step 5.
    k = torch.arange(L, device=B.device)
    at_minus_one = 2 * k == L  # exact integer test, no float comparison with -1
    z = torch.polar(torch.ones(L, dtype=step.dtype, device=B.device), -2 * math.pi * k.to(step.dtype) / L)
    z = torch.where(at_minus_one, torch.zeros((), dtype=z.dtype, device=z.device), z)

    # 3. Bilinear: (I - A_bar z)^{-1} B_bar = 2/(1+z) (g(z) - A)^{-1} B, g = (2/Delta)(1-z)/(1+z).
    g = (2.0 / step)[:, None] * ((1 - z) / (1 + z))[None, :]  # (H, L), on the imaginary axis

    # 4. Woodbury: four Cauchy sums with the same poles Lambda and points g, in one call.
    Pc = P.conj()
    v = torch.stack([C_tilde * B, C_tilde * P, Pc * B, Pc * P])  # (4, H, N)
    r = cauchy(v.reshape(4 * H, N), g.repeat(4, 1), Lambda.repeat(4, 1), backend=backend).reshape(4, H, L)
    k00, k01, k10, k11 = r
    K_hat = (2 / (1 + z)) * (k00 - k01 * k10 / (1 + k11))  # (H, L)

    # 5. At z = -1: I + A_bar = 2 (I - Delta/2 A)^{-1}, so (I + A_bar)^{-1} B_bar = Delta/2 B exactly.
    K_hat = torch.where(at_minus_one, (step / 2)[:, None] * (C_tilde * B).sum(-1, keepdim=True), K_hat)

    # 6. Back from the roots of unity: K_hat(z_k) = sum_l K_l z_k^l is the DFT of K.
    if H == 0:
        return K_hat.real  # (0, L): nothing to transform (MKL's FFT refuses an empty batch)
    return torch.fft.ifft(K_hat, n=L, dim=-1).real


def s4_kernel_explicit(
    Lambda: torch.Tensor,
    P: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    log_step: torch.Tensor,
    L: int,
    *,
    C_is_truncated: bool = False,
) -> torch.Tensor:
    r"""The same kernel as :func:`s4_kernel`, by powers of the dense discretized matrix: the reference.

    Builds :math:`A = \mathrm{diag}(\Lambda) - PP^*` as a dense ``(H, N, N)`` matrix,
    discretizes it (bilinear, solves rather than inverses) and applies
    :math:`\bar A` ``L`` times: :math:`\bar K_l = C\,(\bar A^l \bar B)`. :math:`O(HN^2L)`,
    no FFT, no Cauchy kernel, no Woodbury: four steps of Algorithm 1 checked against the
    definition. Use complex128 inputs for a float64 reference. With
    ``C_is_truncated=True`` the given ``C`` is :math:`\tilde C` and the true
    :math:`C = \tilde C(I - \bar A^L)^{-1}` is recovered first.
    """
    Lambda, P, B, C, log_step = _check_dplr("s4_kernel_explicit", Lambda, P, B, C, log_step, L)
    A_bar, B_bar = _bilinear(Lambda, P, B, log_step.exp())
    if C_is_truncated:
        eye = torch.eye(A_bar.shape[-1], dtype=A_bar.dtype, device=A_bar.device)
        M = eye - torch.linalg.matrix_power(A_bar, L)  # C_tilde = C M  =>  M^T C^T = C_tilde^T
        C = torch.linalg.solve(M.transpose(-1, -2), C[..., None])[..., 0]
    K = []
    x = B_bar  # A_bar^l B_bar, (H, N)
    for _ in range(L):
        K.append((C * x).sum(-1))
        x = (A_bar @ x[..., None])[..., 0]
    return torch.stack(K, dim=-1).real


# --------------------------------------------------------------------------------------
# Initializations
# --------------------------------------------------------------------------------------


def s4d_init(H: int, N: int, kind: str = "inv", *, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
    r"""Diagonal state matrices for S4D: ``A (H, N)`` complex, ``N`` modes (one per conjugate pair).

    From S4D (Gu, Gupta, Goel and Ré 2022, Sec. 4), every channel the same, for
    :math:`n = 0, \dots, N-1`:

    - ``"lin"`` (S4D-Lin): :math:`A_n = -\tfrac12 + i\pi n`, frequencies evenly spaced
      like a Fourier basis (an approximation of S4-FouT).
    - ``"inv"`` (S4D-Inv): :math:`A_n = -\tfrac12 + i\,\frac{N'}{\pi}\big(\frac{N'}{2n+1} - 1\big)`
      with :math:`N' = 2N` the real state size, a closed-form approximation of the next one.
    - ``"legs"`` (S4D-LegS): the diagonal of LegS's normal part, the eigenvalues
      :math:`\Lambda` of :func:`seqbook.hippo.nplr` for state size :math:`2N`, keeping the
      :math:`N` with positive imaginary part (the others are their conjugates).

    All have real part :math:`-\tfrac12`. A real system of state size :math:`2N` has
    these ``N`` eigenvalues and their conjugates; the S4D kernel keeps one of each pair
    and doubles ``C`` (:func:`seqbook.ssm.s4d_kernel`'s convention).
    """
    if isinstance(H, bool) or not isinstance(H, int) or H < 1:
        raise ValueError(f"s4d_init: H must be a positive int, got {H!r}")
    if isinstance(N, bool) or not isinstance(N, int) or N < 1:
        raise ValueError(f"s4d_init: N must be a positive int (the number of complex modes), got {N!r}")
    if kind not in S4D_INITS:
        raise ValueError(f"s4d_init: kind must be one of {S4D_INITS}, got {kind!r}")
    if dtype not in COMPLEX_DTYPES:
        raise TypeError(f"s4d_init: dtype must be complex64 or complex128, got {dtype}")
    n = torch.arange(N, dtype=torch.float64)
    if kind == "lin":
        imag = math.pi * n
    elif kind == "inv":
        N_real = 2 * N
        imag = N_real / math.pi * (N_real / (2 * n + 1) - 1)
    else:
        Lambda = legs_half(N)[0]
        return Lambda.to(dtype).expand(H, N).clone()
    A = torch.complex(torch.full_like(n, -0.5), imag)
    return A.to(dtype).expand(H, N).clone()


def legs_half(N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""LegS of state size :math:`2N` in NPLR form, one eigenvalue of each conjugate pair kept.

    Returns ``(Lambda, P, B)``, each ``(N,)`` complex128, the modes with
    :math:`\mathrm{Im}\,\Lambda > 0` of :func:`seqbook.hippo.nplr` ``("legs", 2N)``. The
    full system is these concatenated with their conjugates (the eigenvectors of a real
    matrix for conjugate eigenvalues are conjugate, so :math:`\tilde P` and :math:`\tilde B`
    are too); this is the S4 layer's initialization.
    """
    Lambda, P, B, _ = _hippo.nplr("legs", 2 * N)
    keep = torch.argsort(Lambda.imag, descending=True, stable=True)[:N]  # the N with Im > 0
    keep = keep.flip(0)  # ascending frequency, like S4D-Inv and S4D-Lin
    return Lambda[keep], P[keep, 0], B[keep]
