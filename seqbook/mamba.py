r"""Selective state spaces: Mamba's selective scan (S6) and Mamba-2's state space duality (SSD).

**The selective scan** (Gu and Dao 2023, "Mamba", Sec. 3.2, Algorithm 2) is a diagonal
SSM whose step size :math:`\Delta` and matrices :math:`B, C` depend on the input. For
every batch element, channel :math:`d` and state index :math:`n`:

.. math::

    \bar A_t = e^{\Delta_t A}, \qquad \bar B_t u_t = \Delta_t B_t u_t,
    \qquad h_t = \bar A_t \odot h_{t-1} + \bar B_t u_t \quad (2a),
    \qquad y_t = C_t^\top h_t + D u_t \quad (2b),

then optionally gated, :math:`y_t \leftarrow y_t \cdot \mathrm{silu}(z_t)`. :math:`A` is
discretized by the zero-order hold (:math:`\bar A = e^{\Delta A}`, eq. 4) and :math:`B` by
the simplified (Euler) rule :math:`\bar B = \Delta B`, as in the paper's reference
implementation: the exact ZOH factor :math:`(\Delta A)^{-1}(e^{\Delta A} - 1)` equals
:math:`\Delta` to first order, and the simpler form is what Mamba trains with. With
``delta_softplus`` the step size is :math:`\Delta = \mathrm{softplus}(\delta + \text{delta\_bias})`
(Algorithm 2's :math:`\tau_\Delta`), else :math:`\delta + \text{delta\_bias}`.

Glossary (symbol -> shape), selective scan
------------------------------------------
::

    u           (batch, length, d)   the input u_t (x in the paper)
    delta       (batch, length, d)   the raw step sizes delta_t (before bias and softplus)
    A           (d, N)               the continuous-time diagonal A, real and negative (decays)
    B, C        (batch, length, N)   input-dependent B_t, C_t, shared by all d channels
    D           (d,)                 the skip connection D (None: no skip)
    z           (batch, length, d)   the gate z_t: y_t * silu(z_t) (None: no gate)
    delta_bias  (d,)                 added to delta before the softplus (None: zero)
    h           (batch, length, d, N) the states h_t (the loop and the parallel form only)
    y           (batch, length, d)   the output, in u's dtype
    last_state  (batch, d, N)        h_{L-1}, in float32 (float64 for float64 inputs)

**Layout.** seqbook puts time second everywhere, ``(batch, length, ...)``. mamba_ssm's
``selective_scan_fn`` and ``selective_scan_ref`` take ``u, delta, z`` as
``(batch, d, length)`` and ``B, C`` as ``(batch, N, length)``: transpose the last two
dimensions to move between the two (``A``, ``D``, ``delta_bias`` and the last state have
the same shapes in both). Only real ``A`` and input-dependent ``B, C`` of one group are
supported here (mamba_ssm also accepts complex ``A`` and fixed or grouped ``B, C``).

**SSD** (Dao and Gu 2024, "Transformers are SSMs", Sec. 3-6) restricts :math:`A` to a
scalar per head, :math:`A_t = e^{\Delta_t A_h}`, and widens the state to a ``(P, N)``
matrix per head. The sequence map is then a masked, attention-like matrix product
:math:`y = (L \circ C B^\top)(\Delta x)` with the 1-semiseparable mask
:math:`L_{ts} = e^{\sum_{r=s+1}^{t} \Delta_r A}` (:func:`ssd_quadratic`), or, cut into
chunks, quadratic inside each chunk and a recurrence between chunks (:func:`ssd_chunked`).

Glossary (symbol -> shape), SSD
-------------------------------
::

    x      (batch, length, heads, P)       the input, P channels per head
    dt     (batch, length, heads)          the step sizes Delta_t (already positive); own dtype allowed
    A      (heads,)                        one negative decay rate per head; own dtype allowed
    B, C   (batch, length, groups, N)      shared by the heads/groups heads of each group
    y      (batch, length, heads, P)
    state  (batch, heads, P, N)

Implementations of the selective scan, one signature:

- :func:`selective_scan_loop`: the recurrence one step at a time: the lesson;
- :func:`selective_scan_parallel`: the same as one diagonal linear recurrence over the
  flattened ``d * N`` channels, by :func:`seqbook.scan.linear_recurrence_parallel`;
- :mod:`seqbook.kernels.selective_scan`: the Triton kernel, forward and backward, with
  the state kept on chip;
- :func:`selective_scan`: the public entry, which validates and dispatches (``backend``).

and of SSD: :func:`ssd_quadratic`, :func:`ssd_chunked` (readable), :mod:`seqbook.kernels.ssd`
(the Triton kernel, forward and backward), :func:`ssd` (the public entry).

**The Mamba block** (:class:`Mamba`, Sec. 3.4 of the paper) wraps the selective scan in a
mixer: an input projection to a branch and a gate, a short causal convolution, the
projections that make :math:`\Delta, B, C` from the input, the gate and an output
projection. It can also run one token at a time (:meth:`Mamba.step`) with a state whose
size does not depend on the length of the sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import backend as _backend
from . import ssm as _ssm
from . import validate as _validate
from .scan import linear_recurrence_parallel

#: dtypes the readable forms accept (they compute in float32, or float64 for float64 inputs).
REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: dtypes the Triton kernel accepts; it computes in float32 whatever the input.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------
# The selective scan
# --------------------------------------------------------------------------------------


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    backend: str = "auto",
):
    r"""Mamba's selective scan (S6): ``y``, and the last state if asked.

    Args:
        u: ``(batch, length, d)``, the input.
        delta: ``(batch, length, d)``, the raw step sizes; same dtype as ``u``.
        A: ``(d, N)``, real; negative entries make the state decay.
        B, C: ``(batch, length, N)``, same dtype as ``u``.
        D: ``(d,)`` or None, the skip :math:`y_t \mathrel{+}= D u_t`.
        z: ``(batch, length, d)`` or None, the gate :math:`y_t \leftarrow y_t\,\mathrm{silu}(z_t)`;
            same dtype as ``u``.
        delta_bias: ``(d,)`` or None, added to ``delta``.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return :math:`h_{L-1}`.
        backend: ``"reference"`` (:func:`selective_scan_parallel`), ``"triton"``
            (:mod:`seqbook.kernels.selective_scan`; compiled on CUDA, interpreted on a
            machine without a GPU), or ``"auto"``: the kernel for CUDA tensors of the
            dtypes it supports (float32, bfloat16, float16), the reference otherwise.

    Returns:
        ``y`` ``(batch, length, d)`` in ``u``'s dtype, or ``(y, last_state)`` with
        ``last_state`` ``(batch, d, N)`` in float32 (float64 if ``u`` or ``A`` is).
        Differentiable in every tensor argument.

    ``A``, ``D`` and ``delta_bias`` may have their own floating dtypes (Mamba keeps them
    in float32 while the activations are bfloat16). Shapes follow seqbook's
    ``(batch, length, ...)`` convention, not mamba_ssm's ``(batch, d, length)``: see the
    module docstring. Bad shapes, dtypes or devices raise ``ValueError``/``TypeError``
    naming the argument.
    """
    _check_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    tensors = [x for x in (u, delta, A, B, C, D, z, delta_bias) if x is not None]
    chosen = _backend.resolve(backend, *tensors)
    if chosen == "triton" and any(x.dtype not in KERNEL_DTYPES for x in tensors):
        if backend == "auto":
            chosen = "reference"  # float64 has no kernel: the reference is still right
        else:
            raise TypeError(
                f"selective_scan(backend='triton') supports dtypes {_names(KERNEL_DTYPES)} "
                f"(float32 accumulation), got {sorted({str(x.dtype) for x in tensors})}: "
                "use backend='reference' for float64"
            )
    if chosen == "triton" and (u.numel() == 0 or A.numel() == 0):
        chosen = "reference"  # nothing to launch: an empty batch, length, width or state
    if chosen == "reference":
        return selective_scan_parallel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return _backend.kernels("selective_scan").selective_scan(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
    )


def step_sizes(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    r""":math:`\Delta = \mathrm{softplus}(\delta + \text{bias})` (or without the softplus),
    ``(batch, length, d)``. Softplus keeps every step positive, so that
    :math:`e^{\Delta A}` with :math:`A < 0` is a decay in :math:`(0, 1)`."""
    if delta_bias is not None:
        delta = delta + delta_bias
    return F.softplus(delta) if delta_softplus else delta


def selective_scan_loop(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    r"""The selective scan as written in Algorithm 2, one time step at a time.

    Shapes as in :func:`selective_scan` (the module glossary); no validation. At each
    step the discretization is done afresh, because :math:`\Delta_t` and :math:`B_t`
    change with the input: this is what "selective" costs. A time-invariant SSM could
    precompute :math:`\bar A, \bar B` once, or turn the whole map into one convolution
    (chapter 2); here neither is possible, and the state :math:`h_t` ``(batch, d, N)``,
    ``N`` times larger than the input, is what must be carried from step to step.
    """
    work = _compute_dtype(u, A)
    out_dtype = u.dtype
    u, A, B, C = (x.to(work) for x in (u, A, B, C))
    Delta = step_sizes(delta.to(work), None if delta_bias is None else delta_bias.to(work), delta_softplus)
    batch, length, d = u.shape
    h = torch.zeros(batch, d, A.shape[1], dtype=work, device=u.device)
    ys = []
    for t in range(length):
        A_bar = torch.exp(torch.einsum("bd,dn->bdn", Delta[:, t], A))  # ZOH: e^{Delta A}
        B_bar_u = torch.einsum("bd,bn,bd->bdn", Delta[:, t], B[:, t], u[:, t])  # Euler: Delta B u
        h = A_bar * h + B_bar_u  # (2a)
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))  # (2b), before the skip
    y = torch.stack(ys, dim=1) if ys else u.new_zeros(batch, 0, d)
    out = _skip_and_gate(y, u, D, z, work).to(out_dtype)
    return (out, h) if return_last_state else out


def selective_scan_parallel(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    r"""The same output, as one diagonal linear recurrence over ``d * N`` channels.

    Shapes as in :func:`selective_scan`; no validation. Once discretized, the selective
    scan is the recurrence of :mod:`seqbook.scan` with :math:`a_t = e^{\Delta_t A}` and
    :math:`b_t = \Delta_t B_t u_t`, one channel per pair ``(d, n)``: so it inherits that
    module's parallel scan, :math:`O(\log L)` dependent steps. The price is memory: it
    materializes ``(batch, length, d, N)`` tensors, ``N`` times the input (2 GiB each at
    ``B=4, L=4096, d=2048, N=16`` in float32), exactly what the kernel avoids by keeping
    the state on chip.
    """
    work = _compute_dtype(u, A)
    out_dtype = u.dtype
    u, A, B, C = (x.to(work) for x in (u, A, B, C))
    Delta = step_sizes(delta.to(work), None if delta_bias is None else delta_bias.to(work), delta_softplus)
    batch, length, d = u.shape
    N = A.shape[1]
    A_bar = torch.exp(torch.einsum("bld,dn->bldn", Delta, A))  # a_t
    B_bar_u = torch.einsum("bld,bln,bld->bldn", Delta, B, u)  # b_t
    h, h_last = linear_recurrence_parallel(A_bar.reshape(batch, length, d * N), B_bar_u.reshape(batch, length, d * N))
    y = torch.einsum("bldn,bln->bld", h.reshape(batch, length, d, N), C)
    out = _skip_and_gate(y, u, D, z, work).to(out_dtype)
    return (out, h_last.reshape(batch, d, N)) if return_last_state else out


def _skip_and_gate(y, u, D, z, work):
    if D is not None:
        y = y + D.to(work) * u
    if z is not None:
        y = y * F.silu(z.to(work))
    return y


def _compute_dtype(u: torch.Tensor, A: torch.Tensor) -> torch.dtype:
    """float64 if the input or A is float64, else float32 (half inputs are widened, as in mamba_ssm)."""
    return torch.float64 if torch.float64 in (u.dtype, A.dtype) else torch.float32


# --------------------------------------------------------------------------------------
# SSD (Mamba-2): the quadratic (attention-like) form and the chunked algorithm
# --------------------------------------------------------------------------------------


def segsum_unstable(a: torch.Tensor) -> torch.Tensor:
    r"""Segment sums :math:`S_{ts} = \sum_{r=s+1}^{t} a_r` (:math:`-\infty` above the diagonal)
    as differences of one cumulative sum, :math:`S_{ts} = c_t - c_s`.

    ``a`` ``(..., T)`` -> ``(..., T, T)``. Exact in exact arithmetic, and wrong in floating
    point: over a long sequence :math:`c_t` grows large (the sum of every log-decay so far),
    and the difference of two large, nearly equal numbers keeps only the digits they do
    not share. :func:`segsum` adds only the terms of each segment.
    """
    c = torch.cumsum(a, dim=-1)
    S = c[..., :, None] - c[..., None, :]
    T = a.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    return S.masked_fill(~causal, float("-inf"))


def segsum(a: torch.Tensor) -> torch.Tensor:
    r"""Segment sums :math:`S_{ts} = \sum_{r=s+1}^{t} a_r` for :math:`t \ge s` (0 on the
    diagonal), :math:`-\infty` for :math:`t < s`, each summed from its own terms.

    ``a`` ``(..., T)`` -> ``(..., T, T)``. Column ``s`` holds :math:`a_r` in rows
    :math:`r > s` and zeros elsewhere, and a cumulative sum down the rows adds exactly the
    terms :math:`s < r \le t`: no large running total is ever subtracted (compare
    :func:`segsum_unstable`). :math:`e^{S}` is then the decay from step ``s`` to step ``t``,
    the 1-semiseparable mask of SSD, with zeros above the diagonal.
    """
    T = a.shape[-1]
    rows = torch.arange(T, device=a.device)
    below = rows[:, None] > rows[None, :]  # r > s
    terms = a[..., :, None].expand(*a.shape, T).masked_fill(~below, 0.0)  # [..., r, s] = a_r if r > s
    S = torch.cumsum(terms, dim=-2)  # [..., t, s] = sum_{s < r <= t} a_r
    return S.masked_fill(rows[:, None] < rows[None, :], float("-inf"))


def ssd_quadratic(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    r"""SSD as one masked matrix product, the "attention" form (Dao and Gu 2024, Sec. 3-4).

    .. math::

        y_t = \sum_{s \le t} \underbrace{(C_t^\top B_s)}_{\text{scores}}\;
        \underbrace{e^{\sum_{r=s+1}^{t} \Delta_r A}}_{L_{ts}}\; \Delta_s x_s,

    shapes as in the SSD glossary (module docstring); returns ``y`` ``(batch, length, heads, P)``.
    It costs :math:`O(L^2)` like attention: the scores :math:`C B^\top` play the role of
    :math:`Q K^\top`, and the causal softmax is replaced by the decay mask :math:`L`, built
    with the stable :func:`segsum`. It is the same map as :func:`ssd_chunked` and as
    :func:`selective_scan` with one decay per head (the tests check both in float64).
    """
    _check_ssd(x, dt, A, B, C, "ssd_quadratic")
    out_dtype = x.dtype
    x, dt, A, B, C = _common_dtype(x, dt, A, B, C)
    B, C = _expand_groups(B, x.shape[2]), _expand_groups(C, x.shape[2])
    mask = torch.exp(segsum((dt * A).transpose(1, 2)))  # (batch, heads, t, s)
    scores = torch.einsum("bthn,bshn->bhts", C, B)
    return torch.einsum("bhts,bhts,bsh,bshp->bthp", scores, mask, dt, x).to(out_dtype)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    r"""SSD by its chunked algorithm (Dao and Gu 2024, Sec. 6): quadratic inside chunks,
    a recurrence between them.

    Shapes as in the SSD glossary; ``initial_state`` ``(batch, heads, P, N)`` or None
    (zeros). Returns ``y`` ``(batch, length, heads, P)``, and the final state
    ``(batch, heads, P, N)`` if ``return_final_state``. Cut the sequence into chunks of
    ``Q = chunk_size`` steps; the matrix of :func:`ssd_quadratic` splits into blocks:

    1. **diagonal blocks**, each chunk's outputs from its own inputs: the quadratic form
       on ``Q`` steps, :math:`O(L Q)` in all;
    2. **chunk states**, the state each chunk leaves behind from its own inputs,
       :math:`\sum_s e^{\sum_{r=s+1}^{Q-1} \Delta_r A} B_s \Delta_s x_s^\top`;
    3. **state passing**, the state *entering* each chunk: a linear recurrence over the
       ``L / Q`` chunks, :math:`S_c = e^{\sum_{\text{chunk } c} \Delta A} S_{c-1} + \text{state}_c`,
       run by :func:`seqbook.scan.linear_recurrence_parallel`;
    4. **state to output**, each step's view of the state that entered its chunk,
       :math:`C_t^\top e^{\sum_{r \le t} \Delta_r A} S_{c-1}`.

    Steps 1, 2 and 4 are batched matrix products (tensor cores, on a GPU); only step 3
    is sequential, and it is ``Q`` times shorter than the sequence. Within a chunk the
    decays are differences of cumulative sums over at most ``Q`` steps, short enough to
    stay accurate; across chunks they are multiplied, never subtracted. A length that is
    not a multiple of ``Q`` is padded with steps :math:`\Delta = 0`, which decay nothing
    and add nothing.
    """
    _check_ssd(x, dt, A, B, C, "ssd_chunked", initial_state)
    _validate.check_positive_int("ssd_chunked", "chunk_size", chunk_size)
    _validate.check_bool("ssd_chunked", "return_final_state", return_final_state)
    batch, length, heads, P = x.shape
    N = B.shape[-1]
    out_dtype = x.dtype
    x, dt, A, B, C = _common_dtype(x, dt, A, B, C)
    if initial_state is not None:
        initial_state = initial_state.to(x.dtype)
    if batch == 0 or length == 0:  # nothing to compute: an empty y, and the state passes through
        y = x.new_zeros(batch, length, heads, P).to(out_dtype)
        final = x.new_zeros(batch, heads, P, N) if initial_state is None else initial_state
        return (y, final) if return_final_state else y
    B, C = _expand_groups(B, heads), _expand_groups(C, heads)
    Q = chunk_size
    pad = (-length) % Q
    if pad:  # steps with dt = 0: decay e^0 = 1 and input 0, so they change nothing
        x, dt, B, C = (F.pad(t, (0,) * (2 * (t.dim() - 2)) + (0, pad)) for t in (x, dt, B, C))
    n_chunks = x.shape[1] // Q
    # (batch, chunks, Q, ...) views; the log-decays laid out (batch, heads, chunks, Q)
    xdt = (x * dt[..., None]).reshape(batch, n_chunks, Q, heads, P)  # Delta_s x_s
    B, C = B.reshape(batch, n_chunks, Q, heads, N), C.reshape(batch, n_chunks, Q, heads, N)
    a = (dt * A).reshape(batch, n_chunks, Q, heads).permute(0, 3, 1, 2)
    a_cum = torch.cumsum(a, dim=-1)  # sum_{r <= t} within the chunk

    # 1. Diagonal blocks: the quadratic form inside each chunk.
    mask = torch.exp(segsum(a))  # (batch, heads, chunks, t, s)
    y_diag = torch.einsum("bcthn,bcshn,bhcts,bcshp->bcthp", C, B, mask, xdt)

    # 2. Each chunk's own final state: inputs decayed to the chunk's last step.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (batch, heads, chunks, s)
    chunk_states = torch.einsum("bcshn,bhcs,bcshp->bchpn", B, decay_to_end, xdt)

    # 3. State passing: S_c = (decay over chunk c) * S_{c-1} + chunk_states_c.
    chunk_decay = torch.exp(a_cum[..., -1]).permute(0, 2, 1)  # (batch, chunks, heads)
    decays = chunk_decay[..., None, None].expand(batch, n_chunks, heads, P, N).reshape(batch, n_chunks, -1)
    h0 = None if initial_state is None else initial_state.reshape(batch, -1)
    ends, final = linear_recurrence_parallel(decays, chunk_states.reshape(batch, n_chunks, -1), h0)
    start = torch.zeros_like(final) if h0 is None else h0
    entering = torch.cat([start[:, None], ends[:, :-1]], dim=1).reshape(batch, n_chunks, heads, P, N)

    # 4. State to output: each step reads the state that entered its chunk, decayed to it.
    y_off = torch.einsum("bcthn,bchpn,bhct->bcthp", C, entering, torch.exp(a_cum))

    y = (y_diag + y_off).reshape(batch, n_chunks * Q, heads, P)[:, :length].to(out_dtype)
    return (y, final.reshape(batch, heads, P, N)) if return_final_state else y


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    *,
    backend: str = "auto",
):
    r"""SSD (Mamba-2), the public entry: :func:`ssd_chunked` or its Triton kernel.

    Arguments and results as in :func:`ssd_chunked` (the SSD glossary in the module
    docstring); the final state is float32 from the kernel. ``chunk_size`` changes how
    the work is cut, not the result: None takes each implementation's own (64 for the
    reference, the kernel's configuration for the kernel). ``backend``: ``"reference"``
    (:func:`ssd_chunked`), ``"triton"`` (:mod:`seqbook.kernels.ssd`: forward and backward,
    gradients for ``x, dt, A, B, C`` and ``initial_state``; it refuses a ``chunk_size``
    that is not a power of two >= 16, and dtypes other than float32, bfloat16 and
    float16), or ``"auto"``: the kernel for CUDA tensors it supports, the reference
    otherwise. When no gradient is needed the kernel runs forward only (saving no
    per-chunk states).
    """
    _check_ssd(x, dt, A, B, C, "ssd", initial_state)
    _validate.check_positive_int("ssd", "chunk_size", chunk_size, optional=True)
    _validate.check_bool("ssd", "return_final_state", return_final_state)
    tensors = [t for t in (x, dt, A, B, C, initial_state) if t is not None]
    chosen = _backend.resolve(backend, *tensors)
    if chosen == "triton":
        pow2 = chunk_size is None or (isinstance(chunk_size, int) and chunk_size >= 16
                                      and chunk_size & (chunk_size - 1) == 0)  # fmt: skip
        why = (f"chunk_size must be a power of two >= 16, got {chunk_size!r}" if not pow2
               else f"it supports dtypes {_names(KERNEL_DTYPES)}, got {x.dtype}" if x.dtype not in KERNEL_DTYPES
               else None)  # fmt: skip
        if why and backend == "triton":
            raise ValueError(f"ssd(backend='triton'): {why}; use backend='reference'")
        if why or x.numel() == 0:
            chosen = "reference"
    if chosen == "reference":
        return ssd_chunked(x, dt, A, B, C, 64 if chunk_size is None else chunk_size, initial_state,
                           return_final_state)  # fmt: skip
    kernel = _backend.kernels("ssd")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        y, final = kernel.ssd_autograd(x, dt, A, B, C, chunk_size, initial_state)
    else:
        y, final = kernel.ssd_forward(x, dt, A, B, C, chunk_size, initial_state)
    return (y, final) if return_final_state else y


def _common_dtype(*tensors):
    """The tensors in one dtype, the widest of theirs (dt and A may be float32 beside bfloat16 x)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in tensors]


def _expand_groups(M: torch.Tensor, heads: int) -> torch.Tensor:
    """``(batch, length, groups, N)`` -> ``(batch, length, heads, N)``: head h reads group h // (heads / groups)."""
    return M.repeat_interleave(heads // M.shape[2], dim=2)


# --------------------------------------------------------------------------------------
# The Mamba block: the selective scan inside a gated, convolved, projected mixer
# --------------------------------------------------------------------------------------


def _positive_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Mamba: {name} must be an int >= {low}, got {value!r}")
    return value


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    r"""The :math:`x` with :math:`\mathrm{softplus}(x) = \log(1 + e^x) = y`, for :math:`y > 0`:
    :math:`x = y + \log(1 - e^{-y})`, written with ``expm1`` so that small steps keep their digits
    (:math:`\log(e^y - 1)` would round :math:`e^y - 1` for :math:`y \approx 10^{-4}`)."""
    return y + torch.log(-torch.expm1(-y))


class Mamba(nn.Module):
    r"""The Mamba mixer (Gu and Dao 2023, Sec. 3.4, Fig. 3): ``(batch, length, d_model)`` to the same shape.

    ::

        u --in_proj--+--> x --conv1d (causal)--> SiLU --+-------------> selective scan --+
                     |                                  `--x_proj--> (delta, B, C) --'    |
                     |                                                                    * --out_proj--> y
                     `--> z -----------------------------------------------------> SiLU --+

    Per token, with :math:`E` = ``d_inner`` channels and state size :math:`N`:

    1. ``in_proj``: :math:`(x, z) = W_{\text{in}} u`, two ``(E,)`` halves, the branch and its gate;
    2. a causal depthwise convolution of ``d_conv`` taps along time on :math:`x` (each channel
       its own short filter: the only place where neighbouring tokens meet before the scan),
       then SiLU;
    3. the selection (Algorithm 2): ``x_proj`` reads :math:`x_t` and writes
       :math:`(\delta^{\text{low}}_t, B_t, C_t)`, a rank-``dt_rank`` code for the step and the
       ``(N,)`` input and output vectors; ``dt_proj`` lifts the code to one raw step per
       channel, and :math:`\Delta_t = \mathrm{softplus}(\delta_t + b_\Delta)` (``dt_proj.bias``
       is :math:`b_\Delta`, handed to the scan as ``delta_bias``);
    4. the selective scan with :math:`A = -e^{A_{\log}}`, the skip :math:`D x_t`, and the gate:
       :math:`y_t = (C_t^\top h_t + D x_t)\,\mathrm{silu}(z_t)` (eqs. 2a-2b with eq. 4's ZOH for :math:`A`);
    5. ``out_proj`` back to ``d_model``.

    Glossary (symbol -> shape)
    --------------------------
    ::

        u, y        (batch, length, d_model)  the mixer's input and output
        x, z        (batch, length, E)        E = d_inner = expand * d_model: the branch and the gate
        W_conv      (E, 1, d_conv)            conv1d.weight: one causal filter per channel (+ conv1d.bias (E,))
        dt, B, C    (batch, length, R), (batch, length, N) x2    the split of x_proj(x); R = dt_rank
        delta       (batch, length, E)        dt_proj.weight @ dt: the raw step, before bias and softplus
        A_log       (E, N)                    A = -exp(A_log), real and negative: S4D-real, A_n = -(n + 1)
        D           (E,)                      the skip connection
        state       (conv (batch, E, d_conv - 1), ssm (batch, E, N))   what step() carries

    Args:
        d_model: the width of the residual stream.
        d_state: :math:`N`, the state size per channel (16 in Mamba).
        d_conv: the convolution's taps (4 in Mamba); 1 means no mixing along time before the scan.
        expand: ``d_inner = expand * d_model`` (2 in Mamba).
        dt_rank: :math:`R`, or ``"auto"`` for :math:`\lceil d_{\text{model}}/16 \rceil`.
        dt_min, dt_max, dt_init_floor: the initial steps :math:`\Delta`, log-uniform in
            ``[dt_min, dt_max]`` and at least ``dt_init_floor``, set through ``dt_proj.bias``.
        bias: biases in ``in_proj`` and ``out_proj`` (Mamba: none); ``conv_bias``: in the convolution.
        backend: for :func:`selective_scan` (``"auto"``, ``"reference"``, ``"triton"``).
        selective: ``True`` (Mamba's S6): :math:`\Delta_t, B_t, C_t` computed from each input.
            ``False``: the same block around a **time-invariant** (S4-style, LTI) SSM, the
            ablation of Mamba's Table 1: :math:`\Delta = \mathrm{softplus}(b_\Delta)` ``(E,)``,
            :math:`B` and :math:`C` ``(E, N)`` are learned parameters that no input changes
            (no ``x_proj``, no ``dt_proj``; ``dt_bias``, ``B``, ``C`` instead). The SSM is then
            S4D-real (diagonal :math:`A`, ZOH for :math:`A`, Euler for :math:`B`, as in S6), and
            the scan is one causal convolution with the kernel
            :math:`K_{e,l} = \sum_n C_{en}\,\Delta_e B_{en}\,e^{l\Delta_e A_{en}}`
            (:meth:`lti_kernel`), computed by FFT. Initialization: :math:`B = 1`, :math:`C`
            standard normal (S4D's), :math:`A` and :math:`\Delta` as in the selective block.

    Initialization, as in the paper's code: :math:`A_n = -(n + 1)` in every channel (S4D-real,
    Gu et al. 2022; stored as :math:`\log(n + 1)` so that :math:`A` stays negative whatever
    the optimizer does), :math:`D = 1`, ``dt_proj.weight`` uniform in
    :math:`\pm R^{-1/2}`, and ``dt_proj.bias`` the inverse softplus of the sampled steps, so that
    at the start :math:`\Delta \approx` those steps: time scales spread over two decades.
    Mamba excludes ``A_log`` and ``D`` from weight decay; :func:`seqbook.train.fit` applies
    none unless asked.

    :meth:`step` and :meth:`init_state` follow the step protocol of :class:`seqbook.nn.LanguageModel`;
    feeding a sequence through :meth:`step` reproduces :meth:`forward` (to rounding).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        *,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        bias: bool = False,
        conv_bias: bool = True,
        backend: str = "auto",
        selective: bool = True,
    ):
        super().__init__()
        if not isinstance(selective, bool):
            raise TypeError(f"Mamba: selective must be a bool, got {type(selective).__name__}")
        self.selective = selective
        self.d_model = _positive_int("d_model", d_model)
        self.d_state = _positive_int("d_state", d_state)
        self.d_conv = _positive_int("d_conv", d_conv)
        self.expand = _positive_int("expand", expand)
        self.d_inner = self.expand * self.d_model
        if dt_rank == "auto":
            dt_rank = math.ceil(self.d_model / 16)
        self.dt_rank = _positive_int("dt_rank", dt_rank)
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba: need 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}")
        if not dt_init_floor > 0:
            raise ValueError(f"Mamba: dt_init_floor must be > 0, got {dt_init_floor!r}")
        if backend not in _backend.BACKENDS:
            raise ValueError(f"Mamba: backend must be one of {_backend.BACKENDS}, got {backend!r}")
        self.backend = backend
        E, N, R = self.d_inner, self.d_state, self.dt_rank

        self.in_proj = nn.Linear(self.d_model, 2 * E, bias=bias)
        # padding d_conv - 1 on both sides; forward keeps the first `length` outputs: a causal filter
        self.conv1d = nn.Conv1d(E, E, self.d_conv, groups=E, padding=self.d_conv - 1, bias=conv_bias)
        if selective:
            self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
            self.dt_proj = nn.Linear(R, E, bias=True)
            with torch.no_grad():
                nn.init.uniform_(self.dt_proj.weight, -(R**-0.5), R**-0.5)
        with torch.no_grad():
            u = torch.rand(E)
            steps = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp_min(dt_init_floor)
        if selective:
            with torch.no_grad():
                self.dt_proj.bias.copy_(inverse_softplus(steps))
        else:  # LTI: one step per channel and fixed B, C, whatever the input says
            self.dt_bias = nn.Parameter(inverse_softplus(steps))
            self.B = nn.Parameter(torch.ones(E, N))
            self.C = nn.Parameter(torch.randn(E, N))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, self.d_model, bias=bias)

    @property
    def A(self) -> torch.Tensor:
        """``(d_inner, d_state)``, negative: :math:`A = -e^{A_{\\log}}`."""
        return -torch.exp(self.A_log)

    def _select(self, x: torch.Tensor):
        """``x (..., E)`` -> the raw step ``delta (..., E)`` (before bias and softplus), ``B``, ``C`` ``(..., N)``."""
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return dt @ self.dt_proj.weight.T, B, C  # dt_proj's bias goes to the scan as delta_bias

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if u.ndim != 3 or u.shape[-1] != self.d_model:
            raise ValueError(
                f"Mamba: u must be (batch, length, d_model) with d_model = {self.d_model}, got shape {tuple(u.shape)}"
            )
        length = u.shape[1]
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (batch, length, E) each
        x = self.conv1d(x.transpose(1, 2))[..., :length].transpose(1, 2)  # causal: output t sees inputs <= t
        x = F.silu(x)
        if not self.selective:  # time-invariant: one kernel per channel, a convolution
            y = _ssm.ssm_convolve(x, self.lti_kernel(length).to(x.dtype), self.D.to(x.dtype))
            return self.out_proj(y * F.silu(z))
        delta, B, C = self._select(x)
        y = selective_scan(x, delta, self.A, B, C, self.D, z, self.dt_proj.bias, delta_softplus=True,
                           backend=self.backend)  # fmt: skip
        return self.out_proj(y)

    def lti_kernel(self, length: int) -> torch.Tensor:
        r"""``selective=False`` only: the convolution kernel ``(E, length)`` of the time-invariant SSM,
        :math:`K_{e,l} = \sum_n C_{en}\,\Delta_e B_{en}\,e^{l\Delta_e A_{en}}` (chapter 2's kernel of a
        diagonal system; the same :math:`\bar A, \bar B` at every step is what makes it one kernel)."""
        if self.selective:
            raise TypeError("Mamba.lti_kernel: only a time-invariant block (selective=False) has one kernel")
        Delta = F.softplus(self.dt_bias)  # (E,)
        lags = torch.arange(length, dtype=Delta.dtype, device=Delta.device)
        A_bar_powers = torch.exp(torch.einsum("en,l->enl", Delta[:, None] * self.A, lags))  # e^{l Delta A}
        return torch.einsum("en,enl->el", self.C * Delta[:, None] * self.B, A_bar_powers)

    def init_state(self, batch: int, device=None, dtype=torch.float32):
        """Zeros: ``(conv (batch, d_inner, d_conv - 1), ssm (batch, d_inner, d_state))``, the same size
        at every step of a sequence, however long."""
        _positive_int("batch", batch)
        conv = torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=dtype)
        return conv, torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=dtype)

    def step(self, u_t: torch.Tensor, state):
        r"""One token: ``u_t (batch, d_model)``, ``state`` from :meth:`init_state` or the last call
        -> ``(y_t (batch, d_model), new state)``. Constant work and memory per token.

        The convolution keeps its last ``d_conv - 1`` inputs and slides them by one; the SSM
        state is advanced by one step of eq. (2a), :math:`h_t = e^{\Delta_t A} h_{t-1} + \Delta_t B_t x_t`.
        """
        if u_t.ndim != 2 or u_t.shape[-1] != self.d_model:
            raise ValueError(
                f"Mamba.step: u_t must be (batch, d_model) with d_model = {self.d_model}, got shape {tuple(u_t.shape)}"
            )
        conv_state, h = state
        batch = u_t.shape[0]
        want = {"conv": (batch, self.d_inner, self.d_conv - 1), "ssm": (batch, self.d_inner, self.d_state)}
        for name, s in (("conv", conv_state), ("ssm", h)):
            if not isinstance(s, torch.Tensor) or tuple(s.shape) != want[name]:
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"Mamba.step: the {name} state must be {want[name]} (from init_state), got {got}")
        x, z = self.in_proj(u_t).chunk(2, dim=-1)  # (batch, E) each
        window = torch.cat([conv_state, x[:, :, None]], dim=-1)  # (batch, E, d_conv): oldest input first
        x = torch.einsum("bek,ek->be", window, self.conv1d.weight[:, 0])
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x)
        if self.selective:
            delta, B, C = self._select(x)
            Delta = F.softplus(delta + self.dt_proj.bias)  # (batch, E)
            A_bar = torch.exp(torch.einsum("be,en->ben", Delta, self.A))  # ZOH
            h = A_bar * h + torch.einsum("be,bn,be->ben", Delta, B, x)  # (2a), Euler for B
            y = torch.einsum("ben,bn->be", h, C) + self.D * x  # (2b) and the skip
        else:  # the same update with Delta (E,), B, C (E, N) that no input changes
            Delta = F.softplus(self.dt_bias)
            h = torch.exp(Delta[:, None] * self.A) * h + (Delta * x)[:, :, None] * self.B
            y = (h * self.C).sum(-1) + self.D * x
        y = y * F.silu(z)
        return self.out_proj(y), (window[:, :, 1:], h)


# --------------------------------------------------------------------------------------
# Validation at the public entries
# --------------------------------------------------------------------------------------


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _check_tensor(fn: str, name: str, x, optional: bool = False) -> None:
    if x is None and optional:
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in REFERENCE_DTYPES:
        raise TypeError(
            f"{fn}: {name} must be a real floating tensor, one of {_names(REFERENCE_DTYPES)}; got {x.dtype}"
        )


def _check_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state) -> None:
    fn = "selective_scan"
    for name, x, optional in (("u", u, False), ("delta", delta, False), ("A", A, False), ("B", B, False),
                              ("C", C, False), ("D", D, True), ("z", z, True), ("delta_bias", delta_bias, True)):
        _check_tensor(fn, name, x, optional)  # fmt: skip
    for name, flag in (("delta_softplus", delta_softplus), ("return_last_state", return_last_state)):
        if not isinstance(flag, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {type(flag).__name__}")
    if u.dim() != 3:
        raise ValueError(f"{fn}: u must be (batch, length, d), got shape {tuple(u.shape)}")
    batch, length, d = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"{fn}: A must be (d, N) with d = {d} (u's last dimension), got shape {tuple(A.shape)}")
    N = A.shape[1]
    shapes = {"delta": (u.shape, "(batch, length, d)"), "z": (u.shape, "(batch, length, d)"),
              "B": ((batch, length, N), "(batch, length, N)"), "C": ((batch, length, N), "(batch, length, N)"),
              "D": ((d,), "(d,)"), "delta_bias": ((d,), "(d,)")}  # fmt: skip
    for name, x in (("delta", delta), ("B", B), ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias)):
        if x is None:
            continue
        want, words = shapes[name]
        if x.shape != want:
            raise ValueError(f"{fn}: {name} must be {words} = {tuple(want)}, got shape {tuple(x.shape)}")
    for name, x in (("delta", delta), ("B", B), ("C", C), ("z", z)):
        if x is not None and x.dtype != u.dtype:
            raise TypeError(f"{fn}: {name} must have the dtype of u ({u.dtype}), got {x.dtype}")
    for name, x in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias)):
        if x is not None and x.device != u.device:
            raise ValueError(f"{fn}: {name} must be on the device of u ({u.device}), got {x.device}")


def _check_ssd(x, dt, A, B, C, fn: str, initial_state=None) -> None:
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        _check_tensor(fn, name, t)
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must be (batch, length, heads, P), got shape {tuple(x.shape)}")
    batch, length, heads, _ = x.shape
    if dt.shape != (batch, length, heads):
        raise ValueError(
            f"{fn}: dt must be (batch, length, heads) = ({batch}, {length}, {heads}), got shape {tuple(dt.shape)}"
        )
    if A.shape != (heads,):
        raise ValueError(f"{fn}: A must be (heads,) = ({heads},), one decay per head, got shape {tuple(A.shape)}")
    for name, M in (("B", B), ("C", C)):
        if M.dim() != 4 or M.shape[:2] != (batch, length) or M.shape[2] < 1 or heads % M.shape[2]:
            raise ValueError(
                f"{fn}: {name} must be (batch, length, groups, N) = ({batch}, {length}, groups, N) with groups "
                f"dividing heads = {heads}, got shape {tuple(M.shape)}"
            )
    if C.shape != B.shape:
        raise ValueError(f"{fn}: C must have the shape of B, {tuple(B.shape)}, got {tuple(C.shape)}")
    for name, t in (("dt", dt), ("A", A), ("B", B), ("C", C)):
        if name in ("B", "C") and t.dtype != x.dtype:  # dt and A may keep their own (float32) dtype
            raise TypeError(f"{fn}: {name} must have the dtype of x ({x.dtype}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} must be on the device of x ({x.device}), got {t.device}")
    # S_{-1}, the state before the first step: any floating dtype (used in the computation's).
    _validate.check_tensor(fn, "initial_state", initial_state, REFERENCE_DTYPES, optional=True)
    _validate.check_shape(fn, "initial_state", initial_state, (batch, heads, x.shape[3], B.shape[-1]),
                          "(batch, heads, P, N)")  # fmt: skip
    _validate.check_device(fn, "initial_state", initial_state, "x", x)


# --------------------------------------------------------------------------------------
# The Mamba-2 block: SSD inside a gated, convolved, projected mixer
# --------------------------------------------------------------------------------------


class Mamba2(nn.Module):
    r"""The Mamba-2 mixer (Dao and Gu 2024, "Transformers are SSMs", Sec. 7, Fig. 6): ``(batch, length, d_model)``
    to the same shape, built around :func:`ssd`.

    ::

        u --in_proj--+--> z ----------------------------------------------------> SiLU --+
                     |                                                                    * --RMSNorm--out_proj--> y
                     +--> (x, B, C) --conv1d (causal)--> SiLU --> SSD(x, Delta, A, B, C) + D x
                     `--> dt --> Delta = softplus(dt + dt_bias)

    What changes from :class:`Mamba` (the paper's Sec. 7.1):

    1. **A scalar decay per head.** :math:`A_h < 0` is one number for the ``P`` channels of head
       :math:`h` and all ``N`` state indices, so that :math:`e^{\Delta_t A_h}` is a scalar and the
       sequence map is SSD's masked matrix :math:`L \circ C B^\top` (tensor-core friendly; the
       chunked algorithm of :func:`ssd_chunked`, the Triton kernel on CUDA).
    2. **A larger state, shared by the heads' channels.** Each head keeps a ``(P, N)`` matrix
       state (as a linear-attention head keeps ``(d_k, d_v)``), with ``N`` 64 to 256 in the paper
       instead of Mamba's 16: the scalar decay is what makes a large ``N`` cheap.
    3. **Parallel projections.** :math:`x, B, C, \Delta` and the gate :math:`z` all come from the
       block's input by one ``in_proj`` (Mamba made :math:`\Delta, B, C` from the convolved
       :math:`x`); the short convolution runs over :math:`(x, B, C)` together.
    4. **A norm before the output projection**: :math:`\mathrm{RMSNorm}(y \odot \mathrm{silu}(z))`,
       which the paper adds for stability at scale.

    Glossary (symbol -> shape)
    --------------------------
    ::

        u, y        (batch, length, d_model)   the mixer's input and output
        E           expand * d_model            d_inner, split into H = E / P heads of P = headdim channels
        z           (batch, length, E)          the gate
        x           (batch, length, H, P)       the SSD input (after the convolution and SiLU)
        B, C        (batch, length, 1, N)       one group: every head reads the same B_t, C_t
        dt          (batch, length, H)          raw steps; Delta = softplus(dt + dt_bias)
        A_log       (H,)                        A = -exp(A_log): one negative decay rate per head
        D           (H,)                        the skip, per head
        state       (conv (batch, E + 2N, d_conv - 1), ssm (batch, H, P, N))   what step() carries

    Args:
        d_model: the width of the residual stream.
        d_state: :math:`N` (64 in the paper's small models, 128 in the large).
        headdim: :math:`P`, channels per head (64 in the paper); must divide ``expand * d_model``.
        d_conv: the convolution's taps (4).
        expand: ``E = expand * d_model`` (2).
        A_init_range: :math:`-A_h` is drawn uniformly in it, so that the heads start with
            different memories (the paper's code: (1, 16)).
        dt_min, dt_max, dt_init_floor: the initial steps, log-uniform, through ``dt_bias`` (as in :class:`Mamba`).
        chunk_size: SSD's chunk for the readable form (None: :func:`ssd`'s default).
        backend: for :func:`ssd` (``"auto"``: the Triton kernel on CUDA, for training too).

    :meth:`step` runs the recurrence :math:`S_t = e^{\Delta_t A_h} S_{t-1} + \Delta_t x_t B_t^\top`,
    :math:`y_t = S_t C_t + D_h x_t` one token at a time and reproduces :meth:`forward`.
    """

    def __init__(self, d_model: int, d_state: int = 64, headdim: int = 64, d_conv: int = 4, expand: int = 2, *,
                 A_init_range: tuple[float, float] = (1.0, 16.0), dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4, chunk_size: int | None = None, backend: str = "auto"):  # fmt: skip
        super().__init__()
        self.d_model = _mamba2_int("d_model", d_model)
        self.d_state = _mamba2_int("d_state", d_state)
        self.headdim = _mamba2_int("headdim", headdim)
        self.d_conv = _mamba2_int("d_conv", d_conv)
        self.expand = _mamba2_int("expand", expand)
        self.d_inner = self.expand * self.d_model
        if self.d_inner % self.headdim:
            raise ValueError(f"Mamba2: headdim must divide d_inner = expand * d_model = {self.d_inner}, got {headdim}")
        self.n_heads = self.d_inner // self.headdim
        lo, hi = A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"Mamba2: A_init_range must be (low, high) with 0 < low <= high, got {A_init_range!r}")
        if not 0 < dt_min <= dt_max or not dt_init_floor > 0:
            raise ValueError(f"Mamba2: need 0 < dt_min <= dt_max and dt_init_floor > 0, got {dt_min!r}, {dt_max!r}, "
                             f"{dt_init_floor!r}")  # fmt: skip
        _validate.check_positive_int("Mamba2", "chunk_size", chunk_size, optional=True)
        if backend not in _backend.BACKENDS:
            raise ValueError(f"Mamba2: backend must be one of {_backend.BACKENDS}, got {backend!r}")
        self.chunk_size, self.backend = chunk_size, backend
        E, N, H = self.d_inner, self.d_state, self.n_heads
        self.conv_dim = E + 2 * N  # x, B and C are convolved together
        self.in_proj = nn.Linear(self.d_model, 2 * E + 2 * N + H, bias=False)  # z, (x, B, C), dt
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim,
                                padding=self.d_conv - 1)  # fmt: skip
        with torch.no_grad():
            steps = torch.exp(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            self.dt_bias = nn.Parameter(inverse_softplus(steps.clamp_min(dt_init_floor)))
            self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(lo, hi)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm_weight = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, self.d_model, bias=False)

    @property
    def A(self) -> torch.Tensor:
        """``(n_heads,)``, negative: :math:`A_h = -e^{A_{\\log, h}}`."""
        return -torch.exp(self.A_log)

    def _split(self, zxbcdt: torch.Tensor):
        E, N, H = self.d_inner, self.d_state, self.n_heads
        return torch.split(zxbcdt, [E, E + 2 * N, H], dim=-1)  # z, xBC, dt

    def _finish(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``y, x (..., H, P)``, ``z (..., E)`` -> the skip, the gate, the RMSNorm and ``out_proj``."""
        y = (y + self.D[:, None] * x).flatten(-2) * F.silu(z)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_weight
        return self.out_proj(y)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if not isinstance(u, torch.Tensor):
            raise TypeError(f"Mamba2: u must be a torch.Tensor, got {type(u).__name__}")
        if u.ndim != 3 or u.shape[-1] != self.d_model:
            raise ValueError(
                f"Mamba2: u must be (batch, length, d_model) with d_model = {self.d_model}, got shape {tuple(u.shape)}"
            )
        batch, length, _ = u.shape
        z, xBC, dt = self._split(self.in_proj(u))
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :length].transpose(1, 2))  # causal
        x, B, C = torch.split(xBC, [self.d_inner, self.d_state, self.d_state], dim=-1)
        x = x.unflatten(-1, (self.n_heads, self.headdim))  # (batch, length, H, P)
        Delta = F.softplus(dt + self.dt_bias)  # (batch, length, H)
        y = ssd(x, Delta, self.A.to(x.dtype), B[:, :, None], C[:, :, None], self.chunk_size, backend=self.backend)
        return self._finish(y, x, z)

    def init_state(self, batch: int, device=None, dtype=torch.float32):
        """Zeros: ``(conv (batch, E + 2N, d_conv - 1), ssm (batch, H, P, N))``, the same size at every step."""
        _mamba2_int("batch", batch)
        conv = torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype)
        return conv, torch.zeros(batch, self.n_heads, self.headdim, self.d_state, device=device, dtype=dtype)

    def step(self, u_t: torch.Tensor, state):
        r"""One token: ``u_t (batch, d_model)``, ``state`` from :meth:`init_state` or the last call ->
        ``(y_t (batch, d_model), new state)``: :math:`S_t = e^{\Delta_t A_h} S_{t-1} + \Delta_t x_t B_t^\top`,
        one scalar decay per head."""
        if not isinstance(u_t, torch.Tensor) or u_t.ndim != 2 or u_t.shape[-1] != self.d_model:
            got = tuple(u_t.shape) if isinstance(u_t, torch.Tensor) else type(u_t).__name__
            raise ValueError(f"Mamba2.step: u_t must be (batch, d_model) with d_model = {self.d_model}, got {got}")
        conv_state, S = state
        batch = u_t.shape[0]
        want = {"conv": (batch, self.conv_dim, self.d_conv - 1), "ssm": (batch, self.n_heads, self.headdim, self.d_state)}
        for name, s in (("conv", conv_state), ("ssm", S)):
            if not isinstance(s, torch.Tensor) or tuple(s.shape) != want[name]:
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"Mamba2.step: the {name} state must be {want[name]} (from init_state), got {got}")
        z, xBC, dt = self._split(self.in_proj(u_t))
        window = torch.cat([conv_state, xBC[:, :, None]], dim=-1)  # (batch, E + 2N, d_conv), oldest first
        xBC = F.silu(torch.einsum("bck,ck->bc", window, self.conv1d.weight[:, 0]) + self.conv1d.bias)
        x, B, C = torch.split(xBC, [self.d_inner, self.d_state, self.d_state], dim=-1)
        x = x.unflatten(-1, (self.n_heads, self.headdim))  # (batch, H, P)
        Delta = F.softplus(dt + self.dt_bias)  # (batch, H)
        decay = torch.exp(Delta * self.A)  # one scalar per head: SSD's restriction
        S = decay[:, :, None, None] * S + torch.einsum("bh,bhp,bn->bhpn", Delta, x, B)
        y = torch.einsum("bhpn,bn->bhp", S, C)
        return self._finish(y, x, z), (window[:, :, 1:], S)


def _mamba2_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Mamba2: {name} must be an int >= 1, got {value!r}")
    return value
