r"""Continuous-time state space models, their discretization, and the two views of a linear SSM.

A linear time-invariant state space model in continuous time,

.. math::

    x'(t) = A\,x(t) + B\,u(t), \qquad y(t) = C\,x(t) + D\,u(t),

is turned into a discrete recurrence by choosing a step :math:`\Delta` and a
*discretization* (:func:`discretize`):

.. math::

    x_k = \bar A\,x_{k-1} + \bar B\,u_k, \qquad y_k = C\,x_k + D\,u_k .

Unrolling the recurrence from :math:`x_{-1} = 0` gives the *convolutional view*
(S4, Gu et al. 2022, eq. 4-5):

.. math::

    y_k = \sum_{j=0}^{k} C \bar A^{j} \bar B\, u_{k-j} + D\,u_k = (\bar K * u)_k + D\,u_k,
    \qquad \bar K = (C\bar B,\ C\bar A\bar B,\ C\bar A^2\bar B,\ \dots).

So one model can be run three ways, all here and all equal up to rounding:
the loop (:func:`ssm_recurrent`, constant memory, one step per token), the
kernel :func:`ssm_kernel` followed by a direct causal convolution
(:func:`ssm_convolve_direct`, :math:`O(L^2)`), or by the FFT
(:func:`ssm_convolve`, :math:`O(L \log L)`).

Two kinds of system
-------------------
*Dense*: ``A`` is a full ``(N, N)`` matrix, one system with ``M`` inputs and ``P``
outputs. *Diagonal*: ``A`` is given by its eigenvalues, a ``(..., N)`` vector
(complex allowed), and each of ``H`` channels is an independent single-input
single-output system with its own ``A, B, C`` rows, the layout of S4D (Gu, Gupta,
Goel and Ré 2022, "On the Parameterization and Initialization of Diagonal State
Space Models") and DSS (Gupta, Gu and Berant 2022, "Diagonal State Spaces are as
Effective as Structured State Spaces"). Functions that accept both take
``diagonal=True`` for the second: the shapes alone cannot tell a ``(N, N)`` matrix
from ``H = N`` channels of ``N`` eigenvalues.

A diagonal system with complex ``A`` has a complex state; its output is the real
part, :math:`y = \mathrm{Re}(C x) + D u`. A real system's complex eigenvalues come
in conjugate pairs whose contributions are conjugate, so S4D keeps one of each pair
and doubles ``C``: with this module's convention, pass ``2 C`` for the kept half.

Glossary (symbol -> shape)
--------------------------
::

    symbol          dense                          diagonal (S4D layout, diagonal=True)
    A      (A)      (..., N, N)                    (..., N) eigenvalues, e.g. (H, N); complex allowed
    B      (B)      (..., N, M)                    (..., N), e.g. (H, N)
    C      (C)      (P, N)                         (H, N)
    D      (D)      (P, M)                         (H,)
    step   (Delta)  broadcasts with A.shape[:-2]   broadcasts with A.shape[:-1], e.g. (H,) or (batch, length, H)
    A_bar, B_bar    (*batch, N, N), (*batch, N, M) (*batch, N) each
    u               (batch, length, M)             (batch, length, H)
    y               (batch, length, P)             (batch, length, H)
    x  (state)      (batch, N)                     (batch, H, N)
    K  (K_bar)      (P, M, length)                 (H, length), real
    N: state size, M: inputs, P: outputs, H: channels, L = length

References: Gu, Goel and Ré 2022, "Efficiently Modeling Long Sequences with
Structured State Spaces" (S4), Sec. 2, eq. 1-5; Gu, Gupta, Goel and Ré 2022, "On the
Parameterization and Initialization of Diagonal State Space Models" (S4D), Sec. 2-4;
Gupta, Gu and Berant 2022, "Diagonal State Spaces are as Effective as Structured State
Spaces" (DSS), Sec. 3; Van Loan 1978, "Computing integrals involving the matrix
exponential" (the augmented-matrix exponential).
"""

from __future__ import annotations

import torch

from seqbook import backend as _backend

METHODS = ("euler", "backward_euler", "bilinear", "zoh")
"""The discretizations :func:`discretize` knows (forward Euler first)."""

KERNEL_METHODS = ("zoh", "bilinear")
"""The discretizations :func:`s4d_kernel` knows: ZOH (S4D, DSS) and bilinear (S4)."""


# --------------------------------------------------------------------------------------
# Validation helpers: every public entry checks its arguments and names the one at fault.
# --------------------------------------------------------------------------------------


def _tensor(name: str, x, *, complex_ok: bool = True) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or (complex_ok and x.is_complex())):
        kinds = "a floating-point or complex" if complex_ok else "a real floating-point"
        raise TypeError(f"{name} must have {kinds} dtype, got {x.dtype}")
    return x


def _same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


def _step(step, like: torch.Tensor) -> torch.Tensor:
    """The step as a real tensor on ``like``'s device; Python numbers allowed."""
    real = like.real.dtype if like.is_complex() else like.dtype
    if isinstance(step, bool):  # an int to Python, but a flag passed where a step belongs
        raise TypeError(f"step must be a positive number or a tensor, got {step!r}")
    if isinstance(step, (int, float)):
        step = torch.tensor(float(step), dtype=real, device=like.device)
    step = _tensor("step", step, complex_ok=False)
    if step.device != like.device:
        raise ValueError(f"step must be on the device of A ({like.device}), got {step.device}")
    # Checked where it is free: on a GPU the comparison would stall the host until the
    # device catches up (a synchronization per call), so CUDA tensors are trusted.
    if step.device.type == "cpu" and not torch.all(step > 0):
        raise ValueError("step must be positive (a time step Delta > 0)")
    return step


def _common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _broadcast(name: str, shapes: dict[str, tuple], what: str) -> torch.Size:
    try:
        return torch.broadcast_shapes(*shapes.values())
    except RuntimeError:
        listed = ", ".join(f"{n} {tuple(s)}" for n, s in shapes.items())
        raise ValueError(f"{name}: {what} do not broadcast: {listed}") from None


def _check_method(method: str, allowed=METHODS) -> None:
    if method not in allowed:
        raise ValueError(f"method must be one of {allowed}, got {method!r}")


def _check_length(length) -> int:
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    return length


# --------------------------------------------------------------------------------------
# The continuous-time model
# --------------------------------------------------------------------------------------


def impulse_response(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    r"""The continuous impulse response :math:`h(t) = C e^{A t} B` of a dense system.

    The solution of :math:`x' = Ax + Bu` from :math:`x(0) = 0` is
    :math:`x(t) = \int_0^t e^{A(t-s)} B u(s)\,ds`; for a unit impulse at :math:`s = 0`
    that is :math:`e^{At}B`, read through :math:`C`.

    Shapes: ``A (N, N)``, ``B (N, M)``, ``C (P, N)``, ``times (T,)`` -> ``(T, P, M)``.
    """
    A, B, C, times = _dense_system("impulse_response", A, B, C, times)
    expAt = torch.linalg.matrix_exp(times[:, None, None] * A)  # (T, N, N)
    return torch.einsum("pn,tnk,km->tpm", C, expAt, B)


def step_response(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    r"""The continuous step response :math:`s(t) = C \int_0^t e^{A s}\,ds\; B` of a dense system.

    The response to :math:`u(t) = 1` for :math:`t \ge 0`. For invertible :math:`A` it
    equals :math:`C A^{-1}(e^{At} - I) B`; here it is computed without the inverse, as
    the top-right block of :math:`\exp\big(t\,[\begin{smallmatrix}A & B\\ 0 & 0\end{smallmatrix}]\big)`
    (the same augmented-matrix trick as ZOH in :func:`discretize`), so a singular
    ``A`` (an integrator, say) is fine.

    Shapes: ``A (N, N)``, ``B (N, M)``, ``C (P, N)``, ``times (T,)`` -> ``(T, P, M)``.
    """
    A, B, C, times = _dense_system("step_response", A, B, C, times)
    N = A.shape[-1]
    integral = _augmented_exp(A, B, times[:, None, None])[..., :N, N:]  # (T, N, M)
    return torch.einsum("pn,tnm->tpm", C, integral)


def _dense_system(fn, A, B, C, times):
    for name, x in (("A", A), ("B", B), ("C", C)):
        _tensor(name, x)
    times = _tensor("times", times, complex_ok=False)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"{fn}: A must be a square (N, N) matrix, got shape {tuple(A.shape)}")
    N = A.shape[0]
    if B.ndim != 2 or B.shape[0] != N:
        raise ValueError(f"{fn}: B must be (N, M) = ({N}, M), got shape {tuple(B.shape)}")
    if C.ndim != 2 or C.shape[1] != N:
        raise ValueError(f"{fn}: C must be (P, N) = (P, {N}), got shape {tuple(C.shape)}")
    if times.ndim != 1:
        raise ValueError(f"{fn}: times must be a 1-D tensor (T,), got shape {tuple(times.shape)}")
    _same_device(A=A, B=B, C=C, times=times)
    dtype = _common_dtype(A, B, C, times)
    return A.to(dtype), B.to(dtype), C.to(dtype), times.to(dtype)


def _augmented_exp(A: torch.Tensor, B: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    r"""``matrix_exp(step * [[A, B], [0, 0]])``, batched over the broadcast of all leading dims.

    Its blocks are :math:`\begin{bmatrix} e^{A\Delta} & \int_0^\Delta e^{As}ds\,B \\ 0 & I\end{bmatrix}`:
    the series :math:`\sum_k (\Delta\,\mathcal M)^k / k!` of the block matrix
    :math:`\mathcal M` has top-right block :math:`\sum_{k\ge1} \Delta^k A^{k-1} B / k!`,
    which is exactly the integral (Van Loan 1978, "Computing integrals involving the
    matrix exponential").
    """
    N, M = A.shape[-1], B.shape[-1]
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2], step.shape[:-2])
    top = torch.cat([A.expand(*batch, N, N), B.expand(*batch, N, M)], dim=-1)  # (..., N, N+M)
    bottom = torch.zeros(*batch, M, N + M, dtype=top.dtype, device=top.device)  # u is held constant: u' = 0
    return torch.linalg.matrix_exp(step * torch.cat([top, bottom], dim=-2))  # (..., N+M, N+M)


def diagonalize(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
    r"""Rewrite a dense single-input single-output system in its eigenbasis.

    With :math:`A = V \Lambda V^{-1}` and the change of state :math:`\tilde x = V^{-1} x`,
    :math:`x' = Ax + Bu,\ y = Cx` becomes
    :math:`\tilde x' = \Lambda \tilde x + (V^{-1}B) u,\ y = (CV)\tilde x`: the same map
    from ``u`` to ``y`` (S4D, Gu et al. 2022, Sec. 2; DSS, Gupta et al. 2022, Sec. 3).
    Real ``A`` with complex eigenvalues gives conjugate pairs; the diagonal system then
    has complex entries, yet its output :math:`\mathrm{Re}(\tilde C \tilde x)` is the
    original real one (the imaginary parts cancel in pairs).

    ``A (..., N, N)`` (diagonalizable), ``B (..., N)``, ``C (..., N)`` ->
    ``(Lambda, B_tilde, C_tilde)``, each complex ``(..., N)``.
    """
    for name, x in (("A", A), ("B", B), ("C", C)):
        _tensor(name, x)
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"diagonalize: A must be (..., N, N), got shape {tuple(A.shape)}")
    N = A.shape[-1]
    for name, x in (("B", B), ("C", C)):
        if x.ndim < 1 or x.shape[-1] != N:
            raise ValueError(f"diagonalize: {name} must be (..., N) = (..., {N}), got shape {tuple(x.shape)}")
    Lambda, V = torch.linalg.eig(A)
    cdtype = Lambda.dtype
    B_tilde = torch.linalg.solve(V, B.to(cdtype).unsqueeze(-1)).squeeze(-1)  # V^{-1} B, without forming V^{-1}
    C_tilde = (C.to(cdtype).unsqueeze(-2) @ V).squeeze(-2)  # C V
    return Lambda, B_tilde, C_tilde


# --------------------------------------------------------------------------------------
# Discretization
# --------------------------------------------------------------------------------------


def discretize(A: torch.Tensor, B: torch.Tensor, step, method: str = "zoh", *, diagonal: bool = False):
    r"""Turn the continuous system :math:`(A, B)` into the discrete :math:`(\bar A, \bar B)` for a step :math:`\Delta`.

    The recurrence is :math:`x_k = \bar A x_{k-1} + \bar B u_k`, with :math:`x_k \approx x(k\Delta)`.
    Each method approximates the exact step
    :math:`x(t+\Delta) = e^{A\Delta}x(t) + \int_0^{\Delta} e^{As}B\,u(t+\Delta-s)\,ds`
    in its own way (S4, Gu et al. 2022, eq. 3 for bilinear; S4D Sec. 3 and DSS for ZOH):

    ::

        method           A_bar                                B_bar                             order
        euler            I + Delta A                          Delta B                           1
        backward_euler   (I - Delta A)^-1                     (I - Delta A)^-1 Delta B          1
        bilinear         (I - Delta/2 A)^-1 (I + Delta/2 A)   (I - Delta/2 A)^-1 Delta B        2
        zoh              exp(Delta A)                         (int_0^Delta exp(A s) ds) B       exact*

    \*ZOH (zero-order hold) is exact when ``u`` is constant over each step (equal to
    :math:`u_k` on :math:`((k-1)\Delta, k\Delta]`). Forward Euler maps a stable
    eigenvalue :math:`a` (:math:`\mathrm{Re}\,a < 0`) to :math:`1 + \Delta a`, which
    leaves the unit disc when :math:`\Delta` is too large; backward Euler, bilinear and
    ZOH map the whole left half-plane inside it, for every :math:`\Delta`.

    How ZOH is computed:

    - dense: :math:`\bar A` and :math:`\bar B` are the two top blocks of
      :math:`\exp\big(\Delta\,[\begin{smallmatrix}A & B\\ 0 & 0\end{smallmatrix}]\big)`,
      one ``torch.linalg.matrix_exp`` of an ``(N+M, N+M)`` matrix (Van Loan 1978).
      The textbook :math:`A^{-1}(e^{\Delta A} - I)B` needs :math:`A` invertible, which
      it need not be (an integrator has eigenvalue 0), and loses accuracy when
      :math:`A` is ill-conditioned or :math:`\Delta A` is small: it subtracts two
      nearly equal matrices and then multiplies the error by :math:`A^{-1}`. The
      augmented exponential contains no inverse and no subtraction.
    - diagonal: elementwise :math:`\bar B = \Delta\,\varphi_1(\Delta a)\,b` with
      :math:`\varphi_1(z) = (e^z - 1)/z` computed as ``expm1(z) / z`` (accurate for small
      :math:`|z|`), and its limit :math:`\varphi_1(0) = 1`, so :math:`a = 0` is fine.

    Args:
        A: dense ``(..., N, N)``, or with ``diagonal=True`` the eigenvalues ``(..., N)``
            (real or complex; e.g. ``(H, N)`` for H channels).
        B: dense ``(..., N, M)``; diagonal ``(..., N)``, broadcasting with ``A``.
        step: :math:`\Delta > 0` (checked for numbers and CPU tensors), a number or a real
            tensor broadcasting with the batch dims of ``A`` (``A.shape[:-2]`` dense,
            ``A.shape[:-1]`` diagonal), e.g. ``(H,)``
            for one step per channel, or ``(batch, length, H)`` for a step that depends
            on the input (the selective SSMs of chapter 4).
        method: one of :data:`METHODS`.
        diagonal: ``A`` holds eigenvalues of a diagonal system.

    Returns:
        ``(A_bar, B_bar)``, in the promoted dtype of ``A``, ``B`` and ``step``, with the
        batch dims broadcast: dense ``(*batch, N, N)`` and ``(*batch, N, M)``;
        diagonal both ``(*batch, N)``.
    """
    _check_method(method)
    _tensor("A", A)
    _tensor("B", B)
    _same_device(A=A, B=B)
    step = _step(step, A)
    dtype = _common_dtype(A, B, step)
    A, B, step = A.to(dtype), B.to(dtype), step.to(dtype)
    if diagonal:
        A_bar, B_bar = _discretize_diagonal(A, B, step, method)
        shape = torch.broadcast_shapes(A_bar.shape, B_bar.shape)
        return A_bar.expand(shape), B_bar.expand(shape)
    A_bar, B_bar = _discretize_dense(A, B, step, method)
    batch = torch.broadcast_shapes(A_bar.shape[:-2], B_bar.shape[:-2])
    return A_bar.expand(*batch, *A_bar.shape[-2:]), B_bar.expand(*batch, *B_bar.shape[-2:])


def _discretize_diagonal(a, b, step, method):
    if a.ndim < 1:
        raise ValueError("discretize(diagonal=True): A must be a vector of eigenvalues (..., N), got a scalar")
    _broadcast("discretize(diagonal=True)", {"A": a.shape, "B": b.shape}, "A (..., N) and B (..., N)")
    dt = step.unsqueeze(-1)  # (..., 1): one step per channel, shared by its N modes
    _broadcast(
        "discretize(diagonal=True)", {"A.shape[:-1]": a.shape[:-1], "step": step.shape}, "the batch dims of A and step"
    )
    z = dt * a  # Delta * a, the eigenvalue in units of the step: every method is a function of z alone
    if method == "euler":
        return 1 + z, dt * b
    if method == "backward_euler":
        inv = 1 / (1 - z)
        return inv, inv * dt * b
    if method == "bilinear":
        den = 1 - z / 2
        return (1 + z / 2) / den, dt * b / den
    # zoh: B_bar = (e^z - 1)/a * b = Delta * phi1(z) * b. At z = 0 use phi1's series 1 + z/2,
    # which has the right value and the right derivative, and keep 0/0 out of the graph.
    zero = z == 0
    phi1 = torch.where(zero, 1 + z / 2, torch.expm1(z) / torch.where(zero, torch.ones_like(z), z))
    return torch.exp(z), dt * phi1 * b


def _discretize_dense(A, B, step, method):
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(
            f"discretize: A must be a square (..., N, N) matrix, got shape {tuple(A.shape)} "
            "(for a vector of eigenvalues (..., N) pass diagonal=True)"
        )
    N = A.shape[-1]
    if B.ndim < 2 or B.shape[-2] != N:
        raise ValueError(f"discretize: B must be (..., N, M) with N = {N}, got shape {tuple(B.shape)}")
    _broadcast(
        "discretize",
        {"A.shape[:-2]": A.shape[:-2], "B.shape[:-2]": B.shape[:-2], "step": step.shape},
        "the batch dims of A, B and step",
    )
    dt = step[..., None, None]  # (..., 1, 1)
    eye = torch.eye(N, dtype=A.dtype, device=A.device)
    if method == "euler":
        return eye + dt * A, dt * B
    if method == "backward_euler":
        lhs = eye - dt * A
        # Solve instead of inverting: (I - Delta A) X = I and (I - Delta A) X = Delta B.
        return torch.linalg.solve(lhs, eye.expand_as(lhs)), torch.linalg.solve(lhs, dt * B)
    if method == "bilinear":
        lhs = eye - dt / 2 * A
        return torch.linalg.solve(lhs, eye + dt / 2 * A), torch.linalg.solve(lhs, dt * B)
    E = _augmented_exp(A, B, dt)
    return E[..., :N, :N], E[..., :N, N:]


# --------------------------------------------------------------------------------------
# The recurrent view
# --------------------------------------------------------------------------------------


def ssm_recurrent(
    A_bar: torch.Tensor,
    B_bar: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    u: torch.Tensor,
    *,
    diagonal: bool = False,
    x0: torch.Tensor | None = None,
    return_state: bool = False,
):
    r"""Run the discrete SSM as a loop over time.

    .. math::

        x_k = \bar A x_{k-1} + \bar B u_k, \qquad y_k = C x_k + D u_k.

    The loop is the lesson: one step per token, constant memory, the state
    :math:`x_k` carrying everything the model remembers (S4, Gu et al. 2022, eq. 3).
    It costs :math:`O(L N^2)` dense and :math:`O(L H N)` diagonal, sequential in
    :math:`L`; the convolutional view (:func:`ssm_kernel` + :func:`ssm_convolve`)
    computes the same ``y`` in parallel over time.

    Dense (one system, ``M`` inputs, ``P`` outputs):
        ``A_bar (N, N)``, ``B_bar (N, M)``, ``C (P, N)``, ``D (P, M)`` or None,
        ``u (batch, length, M)`` -> ``y (batch, length, P)``; state ``x (batch, N)``.

    Diagonal (``diagonal=True``; H independent SISO channels, the S4D layout):
        ``A_bar, B_bar, C``: ``(H, N)``, or ``(batch, length, H, N)`` for a system that
        changes with time (an input-dependent step, chapter 4);
        ``D (H,)`` or None; ``u (batch, length, H)`` -> ``y (batch, length, H)``, real:
        :math:`y_k = \mathrm{Re}\sum_n C_n x_{k,n} + D u_k`; state ``x (batch, H, N)``
        (complex when ``A_bar`` is).

    Args:
        x0: the state before the first input, :math:`x_{-1}` (zeros if None).
        return_state: also return the last state :math:`x_{L-1}`, to continue the
            sequence later (decoding one token at a time).

    Returns:
        ``y``, or ``(y, x_last)`` with ``return_state=True``.
    """
    for name, t in (("A_bar", A_bar), ("B_bar", B_bar), ("C", C), ("u", u)):
        _tensor(name, t)
    if D is not None:
        _tensor("D", D)
    if x0 is not None:
        _tensor("x0", x0)
    _same_device(A_bar=A_bar, B_bar=B_bar, C=C, D=D, u=u, x0=x0)
    if u.ndim != 3:
        raise ValueError(f"ssm_recurrent: u must be (batch, length, M or H), got shape {tuple(u.shape)}")
    if diagonal:
        return _recurrent_diagonal(A_bar, B_bar, C, D, u, x0, return_state)
    return _recurrent_dense(A_bar, B_bar, C, D, u, x0, return_state)


def _recurrent_dense(A_bar, B_bar, C, D, u, x0, return_state):
    if A_bar.ndim != 2 or A_bar.shape[0] != A_bar.shape[1]:
        raise ValueError(
            f"ssm_recurrent: A_bar must be (N, N), got shape {tuple(A_bar.shape)} "
            "(for a diagonal system pass diagonal=True)"
        )
    N = A_bar.shape[0]
    batch, length, M = u.shape
    if B_bar.shape != (N, M):
        raise ValueError(f"ssm_recurrent: B_bar must be (N, M) = ({N}, {M}), got shape {tuple(B_bar.shape)}")
    if C.ndim != 2 or C.shape[1] != N:
        raise ValueError(f"ssm_recurrent: C must be (P, N) = (P, {N}), got shape {tuple(C.shape)}")
    P = C.shape[0]
    if D is not None and D.shape != (P, M):
        raise ValueError(f"ssm_recurrent: D must be (P, M) = ({P}, {M}), got shape {tuple(D.shape)}")
    if x0 is not None and x0.shape != (batch, N):
        raise ValueError(f"ssm_recurrent: x0 must be (batch, N) = ({batch}, {N}), got shape {tuple(x0.shape)}")
    dtype = _common_dtype(*(t for t in (A_bar, B_bar, C, D, u, x0) if t is not None))
    A_bar, B_bar, C, u = A_bar.to(dtype), B_bar.to(dtype), C.to(dtype), u.to(dtype)
    x = torch.zeros(batch, N, dtype=dtype, device=u.device) if x0 is None else x0.to(dtype)
    ys = []
    for k in range(length):
        u_k = u[:, k]  # (batch, M)
        # x_k = A_bar x_{k-1} + B_bar u_k
        x = torch.einsum("nj,bj->bn", A_bar, x) + torch.einsum("nm,bm->bn", B_bar, u_k)
        y_k = torch.einsum("pn,bn->bp", C, x)  # y_k = C x_k (+ D u_k)
        if D is not None:
            y_k = y_k + torch.einsum("pm,bm->bp", D.to(dtype), u_k)
        ys.append(y_k)
    y = torch.stack(ys, dim=1)  # (batch, length, P)
    return (y, x) if return_state else y


def _recurrent_diagonal(A_bar, B_bar, C, D, u, x0, return_state):
    batch, length, H = u.shape
    if A_bar.ndim not in (2, 4) or A_bar.shape[-2] != H:
        raise ValueError(
            f"ssm_recurrent(diagonal=True): A_bar must be (H, N) or (batch, length, H, N) with H = {H} "
            f"(u's last dim), got shape {tuple(A_bar.shape)}"
        )
    N = A_bar.shape[-1]
    full = (batch, length, H, N)
    for name, t in (("A_bar", A_bar), ("B_bar", B_bar), ("C", C)):
        if t.shape not in ((H, N), full):
            raise ValueError(
                f"ssm_recurrent(diagonal=True): {name} must be (H, N) = ({H}, {N}) or "
                f"(batch, length, H, N) = {full}, got shape {tuple(t.shape)}"
            )
    if D is not None and D.shape != (H,):
        raise ValueError(f"ssm_recurrent(diagonal=True): D must be (H,) = ({H},), got shape {tuple(D.shape)}")
    if x0 is not None and x0.shape != (batch, H, N):
        raise ValueError(
            f"ssm_recurrent(diagonal=True): x0 must be (batch, H, N) = ({batch}, {H}, {N}), got {tuple(x0.shape)}"
        )
    dtype = _common_dtype(*(t for t in (A_bar, B_bar, C, u, x0) if t is not None))
    # A time-invariant system is a time-varying one whose parameters do not change:
    # expand (a view, no copy) so that one loop serves both.
    A_bar, B_bar, C = (t.to(dtype).expand(full) for t in (A_bar, B_bar, C))
    x = torch.zeros(batch, H, N, dtype=dtype, device=u.device) if x0 is None else x0.to(dtype)
    ys = []
    for k in range(length):
        u_k = u[:, k]  # (batch, H)
        x = A_bar[:, k] * x + B_bar[:, k] * u_k[..., None]  # each mode n of each channel h on its own
        y_k = (C[:, k] * x).sum(-1).real  # (batch, H)
        if D is not None:
            y_k = y_k + D * u_k
        ys.append(y_k)
    y = torch.stack(ys, dim=1)  # (batch, length, H)
    return (y, x) if return_state else y


# --------------------------------------------------------------------------------------
# The convolutional view: the kernel K
# --------------------------------------------------------------------------------------


def ssm_kernel(A_bar: torch.Tensor, B_bar: torch.Tensor, C: torch.Tensor, length: int, *, diagonal: bool = False):
    r"""The SSM convolution kernel :math:`\bar K_l = C \bar A^l \bar B` for :math:`l = 0, \dots, L-1`.

    Unrolling :math:`x_k = \bar A x_{k-1} + \bar B u_k` from :math:`x_{-1} = 0` gives
    :math:`y_k = \sum_j \bar K_j u_{k-j}` (S4, Gu et al. 2022, eq. 4-5), so
    ``ssm_convolve(u, ssm_kernel(...), D) == ssm_recurrent(...)``.

    Dense: ``A_bar (N, N)``, ``B_bar (N, M)``, ``C (P, N)`` -> ``K (P, M, length)``,
    built by repeated multiplication :math:`\bar A^{l}\bar B = \bar A(\bar A^{l-1}\bar B)`,
    :math:`O(L N^2 M)`.

    Diagonal (``diagonal=True``): ``A_bar, B_bar, C`` broadcasting to ``(..., N)``, e.g.
    ``(H, N)`` -> ``K (..., length)``, real:

    .. math::

        \bar K_{h,l} = \mathrm{Re} \sum_n C_{h,n} \bar B_{h,n} \bar A_{h,n}^{\,l}
        = \mathrm{Re}\,\big[(C \odot \bar B)\, \mathcal V(\bar A)\big]_{h,l},

    a product with the Vandermonde matrix :math:`\mathcal V_{n,l} = \bar A_n^{\,l}`
    (S4D, Gu et al. 2022, Sec. 3; DSS, Gupta et al. 2022, Sec. 3). This readable form
    materializes the ``(..., N, length)`` powers; :func:`s4d_kernel` has a kernel that
    does not.
    """
    length = _check_length(length)
    for name, t in (("A_bar", A_bar), ("B_bar", B_bar), ("C", C)):
        _tensor(name, t)
    _same_device(A_bar=A_bar, B_bar=B_bar, C=C)
    dtype = _common_dtype(A_bar, B_bar, C)
    A_bar, B_bar, C = A_bar.to(dtype), B_bar.to(dtype), C.to(dtype)
    if diagonal:
        _broadcast(
            "ssm_kernel(diagonal=True)", {"A_bar": A_bar.shape, "B_bar": B_bar.shape, "C": C.shape}, "A_bar, B_bar, C"
        )
        l = torch.arange(length, device=A_bar.device, dtype=A_bar.real.dtype)
        # V[..., n, l] = A_bar[..., n] ** l. pow(0, 0) is nan for complex dtypes, and A_bar^0 = 1 always.
        V = torch.where(l == 0, torch.ones((), dtype=dtype, device=A_bar.device), A_bar[..., None] ** l)
        return torch.einsum("...n,...nl->...l", C * B_bar, V).real
    if A_bar.ndim != 2 or A_bar.shape[0] != A_bar.shape[1]:
        raise ValueError(
            f"ssm_kernel: A_bar must be (N, N), got shape {tuple(A_bar.shape)} "
            "(for a diagonal system pass diagonal=True)"
        )
    N = A_bar.shape[0]
    if B_bar.ndim != 2 or B_bar.shape[0] != N:
        raise ValueError(f"ssm_kernel: B_bar must be (N, M) = ({N}, M), got shape {tuple(B_bar.shape)}")
    if C.ndim != 2 or C.shape[1] != N:
        raise ValueError(f"ssm_kernel: C must be (P, N) = (P, {N}), got shape {tuple(C.shape)}")
    K = []
    AlB = B_bar  # A_bar^l B_bar, (N, M)
    for _ in range(length):
        K.append(C @ AlB)  # (P, M)
        AlB = A_bar @ AlB
    return torch.stack(K, dim=-1)  # (P, M, length)


def vandermonde_kernel(W: torch.Tensor, log_A_bar: torch.Tensor, length: int, *, backend: str = "auto") -> torch.Tensor:
    r"""The diagonal SSM kernel from its coefficients and log-eigenvalues.

    .. math::

        K_{h,l} = \mathrm{Re}\sum_n W_{h,n}\, e^{l \log \bar A_{h,n}}, \qquad l = 0, \dots, L-1.

    The computational core of :func:`s4d_kernel`, with :math:`W = C \odot \bar B` and
    :math:`\log \bar A` already formed. The power is written as an exponential,
    :math:`\bar A^l = e^{l\log\bar A}` (for ZOH, :math:`\log \bar A = \Delta A` exactly):
    every :math:`l` is computed on its own, in parallel, with no chain of ``l``
    multiplications whose rounding errors compound, and a stable mode
    (:math:`\mathrm{Re}\log\bar A < 0`) decays smoothly to zero
    (S4D, Gu et al. 2022, Sec. 3).

    - ``"reference"``: materializes the ``(H, N, length)`` tensor
      :math:`e^{l \log\bar A}` and contracts it with an einsum, :math:`O(HNL)` memory.
    - ``"triton"``: :mod:`seqbook.kernels.ssm_kernel`, which never materializes it
      (:math:`O(HL)` memory) and computes in float32; forward and backward.

    Shapes: ``W (H, N)`` complex, ``log_A_bar (H, N)`` complex, ``length`` L ->
    ``K (H, L)`` real (float32 for complex64 inputs, float64 for complex128).
    """
    length = _check_length(length)
    _tensor("W", W)
    _tensor("log_A_bar", log_A_bar)
    _same_device(W=W, log_A_bar=log_A_bar)
    if W.ndim != 2 or log_A_bar.shape != W.shape:
        raise ValueError(
            "vandermonde_kernel: W and log_A_bar must both be (H, N), "
            f"got {tuple(W.shape)} and {tuple(log_A_bar.shape)}"
        )
    if _backend.resolve(backend, W, log_A_bar) == "triton":
        return _backend.kernels("ssm_kernel").vandermonde_kernel(W, log_A_bar, length)
    return vandermonde_kernel_reference(W, log_A_bar, length)


def vandermonde_kernel_reference(W: torch.Tensor, log_A_bar: torch.Tensor, length: int) -> torch.Tensor:
    """The readable form of :func:`vandermonde_kernel`: materialize ``exp(l log A_bar)``, then one einsum."""
    dtype = torch.promote_types(_common_dtype(W, log_A_bar), torch.complex64)
    W, log_A_bar = W.to(dtype), log_A_bar.to(dtype)
    l = torch.arange(length, device=W.device, dtype=W.real.dtype)
    V = torch.exp(log_A_bar[..., None] * l)  # (H, N, L): the Vandermonde matrix A_bar^l, one row per mode
    return torch.einsum("hn,hnl->hl", W, V).real


def s4d_kernel(
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    step,
    length: int,
    *,
    method: str = "zoh",
    backend: str = "auto",
) -> torch.Tensor:
    r"""The convolution kernel of a diagonal SSM, straight from its continuous parameters.

    .. math::

        K_{h,l} = \mathrm{Re} \sum_{n} C_{h,n}\, \bar B_{h,n}\, \bar A_{h,n}^{\,l},
        \qquad (\bar A, \bar B) = \mathrm{discretize}(A, B, \Delta_h),

    the S4D kernel (Gu et al. 2022, "On the Parameterization and Initialization of
    Diagonal State Space Models", Sec. 3; with ZOH the same as DSS, Gupta et al. 2022).
    The cheap :math:`O(HN)` part, :math:`W = C\odot\bar B` and :math:`\log\bar A`
    (:math:`= \Delta A` under ZOH), is ordinary PyTorch, so
    autograd carries gradients from ``W`` and :math:`\log\bar A` back to ``A``, ``B``,
    ``C`` and ``step``; the :math:`O(HNL)` part is :func:`vandermonde_kernel`.

    Args:
        A: ``(H, N)`` eigenvalues, complex (real allowed); stable modes have ``Re A < 0``.
        B: ``(H, N)`` (or broadcasting to it).
        C: ``(H, N)`` (or broadcasting to it). For a real system keep one eigenvalue of
            each conjugate pair and pass ``2 C`` (S4D's convention).
        step: :math:`\Delta`, positive, ``(H,)`` or a number.
        length: L, the number of kernel taps.
        method: ``"zoh"`` (S4D, DSS) or ``"bilinear"`` (S4).
        backend: ``"auto"``, ``"reference"`` (materialized) or ``"triton"`` (fused).

    Returns:
        ``K (H, L)``, real.
    """
    _check_method(method, KERNEL_METHODS)
    for name, t in (("A", A), ("B", B), ("C", C)):
        _tensor(name, t)
    _same_device(A=A, B=B, C=C)
    if A.ndim != 2:
        raise ValueError(f"s4d_kernel: A must be (H, N), got shape {tuple(A.shape)}")
    H, N = A.shape
    for name, t in (("B", B), ("C", C)):
        try:
            torch.broadcast_shapes(t.shape, (H, N))
        except RuntimeError:
            raise ValueError(
                f"s4d_kernel: {name} must broadcast to (H, N) = ({H}, {N}), got {tuple(t.shape)}"
            ) from None
    step = _step(step, A)
    if step.ndim > 1 or (step.ndim == 1 and step.shape[0] not in (1, H)):
        raise ValueError(f"s4d_kernel: step must be a number or (H,) = ({H},), got shape {tuple(step.shape)}")
    A_bar, B_bar = discretize(A, B, step.reshape(-1), method, diagonal=True)
    W = (C * B_bar).expand(H, N)
    if method == "zoh":
        log_A_bar = (step.reshape(-1, 1) * A).expand(H, N)  # exact: no round trip through exp and log
    else:
        log_A_bar = torch.log(A_bar.to(torch.promote_types(A_bar.dtype, torch.complex64))).expand(H, N)
    return vandermonde_kernel(W, log_A_bar, length, backend=backend)


# --------------------------------------------------------------------------------------
# Causal convolution: y = K * u (+ D u)
# --------------------------------------------------------------------------------------


def _check_convolve(fn, u, K, D):
    _tensor("u", u)
    _tensor("K", K)
    if D is not None:
        _tensor("D", D)
    _same_device(u=u, K=K, D=D)
    if u.ndim != 3:
        raise ValueError(f"{fn}: u must be (batch, length, H) or (batch, length, M), got shape {tuple(u.shape)}")
    if K.ndim == 2:  # depthwise, one kernel per channel
        H = u.shape[-1]
        if K.shape[0] != H:
            raise ValueError(f"{fn}: K must be (H, length_K) with H = {H} (u's last dim), got {tuple(K.shape)}")
        if D is not None and D.shape != (H,):
            raise ValueError(f"{fn}: D must be (H,) = ({H},), got shape {tuple(D.shape)}")
    elif K.ndim == 3:  # dense: P outputs from M inputs
        M = u.shape[-1]
        if K.shape[1] != M:
            raise ValueError(f"{fn}: K must be (P, M, length_K) with M = {M} (u's last dim), got {tuple(K.shape)}")
        if D is not None and D.shape != K.shape[:2]:
            raise ValueError(f"{fn}: D must be (P, M) = {tuple(K.shape[:2])}, got shape {tuple(D.shape)}")
    else:
        raise ValueError(f"{fn}: K must be (H, length_K) or (P, M, length_K), got shape {tuple(K.shape)}")


def _skip(u, D):
    """The direct term D u: per channel ``D (H,)``, or a matrix ``D (P, M)``."""
    return D * u if D.ndim == 1 else torch.einsum("pm,blm->blp", D, u)


def ssm_convolve(u: torch.Tensor, K: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    r"""Causal convolution :math:`y_k = \sum_{j=0}^{k} K_j u_{k-j} + D u_k` by the FFT, :math:`O(L \log L)`.

    A causal (linear, not circular) convolution of two sequences of lengths ``L`` and
    ``L_K`` has ``L + L_K - 1`` terms; zero-padding both to ``n = L + L_K`` before the
    FFT keeps the circular wrap-around of the discrete Fourier transform away from the
    first ``L`` outputs, which are the ones kept (the convolution of S4, Gu et al. 2022). Uses
    ``rfft`` for real inputs (half the work), ``fft`` for complex ones.

    Shapes:
        depthwise (diagonal SSMs): ``u (batch, L, H)``, ``K (H, L_K)``, ``D (H,)`` -> ``(batch, L, H)``;
        dense: ``u (batch, L, M)``, ``K (P, M, L_K)``, ``D (P, M)`` -> ``(batch, L, P)``.
    A kernel shorter than ``u`` acts as if padded with zeros.
    """
    _check_convolve("ssm_convolve", u, K, D)
    L = u.shape[1]
    n = L + K.shape[-1]
    complex_ = u.is_complex() or K.is_complex()
    fft, ifft = (torch.fft.fft, torch.fft.ifft) if complex_ else (torch.fft.rfft, torch.fft.irfft)
    U = fft(u, n=n, dim=1)  # (batch, F, H or M)
    Kf = fft(K, n=n, dim=-1)  # (H, F) or (P, M, F)
    if K.ndim == 2:
        Y = U * Kf.transpose(0, 1)  # pointwise product in frequency = convolution in time
    else:
        Y = torch.einsum("bfm,pmf->bfp", U, Kf)
    y = ifft(Y, n=n, dim=1)[:, :L]
    if D is not None:
        y = y + _skip(u, D)
    return y


def ssm_convolve_direct(u: torch.Tensor, K: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    r"""The same causal convolution as :func:`ssm_convolve`, term by term: :math:`O(L \cdot L_K)`.

    One loop over the lag ``j``: the input delayed by ``j`` steps, weighted by
    :math:`K_j`, added to the output. Easy to check by eye; quadratic in the length,
    which is what the FFT removes.
    """
    _check_convolve("ssm_convolve_direct", u, K, D)
    batch, L, _ = u.shape
    dtype = _common_dtype(u, K)
    out = K.shape[0]
    ys = torch.zeros(batch, L, out, dtype=dtype, device=u.device)
    for j in range(min(L, K.shape[-1])):
        delayed = u[:, : L - j]  # u_{k-j} for k = j, ..., L-1
        if K.ndim == 2:
            term = K[:, j] * delayed
        else:
            term = torch.einsum("pm,blm->blp", K[..., j], delayed)
        ys = ys + torch.nn.functional.pad(term, (0, 0, j, 0))  # shifted down by j steps
    if D is not None:
        ys = ys + _skip(u, D)
    return ys
