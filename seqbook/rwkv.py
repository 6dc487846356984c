r"""RWKV: an RNN that trains like a Transformer, in three generations (4, 6 and 7).

RWKV's time mixing is linear attention (chapter 6) with per-channel decays, a bonus for the
current token, and, in version 7, a delta rule. This module has each version's core operator
in readable forms that are checked equal, and the mixers that use them.

**RWKV-4** (Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era", Eq. 13-16):
per channel :math:`c` (no heads, no matrix state), with a decay rate :math:`w_c \ge 0` and a
bonus :math:`u_c`,

.. math::

    \mathrm{wkv}_t = \frac{\sum_{i<t} e^{-(t-1-i)w + k_i}\, v_i + e^{u + k_t}\, v_t}
                         {\sum_{i<t} e^{-(t-1-i)w + k_i} + e^{u + k_t}} ,

a softmax over the past with a position bias :math:`-(t-1-i)w` (:func:`wkv4_parallel`, "GPT
mode"), or a recurrence on a numerator and a denominator (:func:`wkv4_recurrent`, "RNN
mode"). Raw :math:`e^{k}` overflows float32 once :math:`k > 88` (:func:`wkv4_naive` shows it);
the stable form keeps both sums scaled by :math:`e^{-p}`, :math:`p` a running maximum exponent.

**RWKV-6 "Finch"** (Peng et al. 2024, "Eagle and Finch", Sec. 4, Eq. 17-19): heads with a
matrix state, a data-dependent vector decay :math:`w_t \in (0,1)^{d_k}` and the bonus
:math:`u`; in the paper's row-vector convention

.. math::

    o_t = r_t\big(S_{t-1} + \mathrm{Diag}(u)\, k_t^\top v_t\big), \qquad
    S_t = \mathrm{Diag}(w_t)\, S_{t-1} + k_t^\top v_t ,

which is gated linear attention with a bonus (:func:`seqbook.linear_attention.gla_chunked`
is its chunked form), scale 1.

**RWKV-7 "Goose"** (Peng et al. 2025, "RWKV-7 Goose with Expressive Dynamic State
Evolution", Sec. 4, the "wkv" state update): a generalized delta rule. The paper writes the
state as :math:`S \in \mathbb R^{d_v \times d_k}` (values by keys) and

.. math::

    S_t = S_{t-1}\big(\mathrm{Diag}(w_t) - \hat\kappa_t^\top (a_t \odot \hat\kappa_t)\big) + v_t^\top \tilde k_t,
    \qquad o_t = S_t\, r_t^\top,

with :math:`w_t = e^{-e^{-1/2}\sigma(d_t)} \in (0.545, 1)` the decay, :math:`a_t \in (0,1)^{d_k}`
the in-context learning rate, :math:`\hat\kappa_t` the L2-normalized removal key and
:math:`\tilde k_t = k_t \odot (1 + (a_t - 1)\odot\alpha)` the replacement key. This module
keeps every state as ``(d_k, d_v)`` (keys by values), the transpose, so the implemented
update is

.. math::

    S_t = \mathrm{Diag}(w_t)\, S_{t-1} - (a_t \odot \hat\kappa_t)\,(\hat\kappa_t^\top S_{t-1}) + \tilde k_t v_t^\top,
    \qquad o_t = r_t^\top S_t .

It is the version of the paper's arXiv v1/v2 (March 2025), the "x070" architecture. With
:math:`w = 1`, :math:`a = \beta`, :math:`\hat\kappa = k` and :math:`\tilde k = \beta k` it is
the delta rule of chapter 6; with :math:`a = 0`, gated linear attention without bonus.

Glossary (symbol -> shape)
--------------------------
::

    RWKV-4 (C channels):
    w           (C,)                      decay rate >= 0; the state decays by e^{-w} per step
    u           (C,)                      bonus for the current token
    k, v        (batch, length, C)        keys and values
    wkv         (batch, length, C)        the output
    state       (a, b, p), each (batch, C)  numerator and denominator scaled by e^{-p}; p running max exponent

    RWKV-6 / RWKV-7 (H heads of d_k = d_v = N):
    r           (batch, length, H, N)     receptance (the query)
    k, v        (batch, length, H, N)     keys and values (RWKV-7: k is the replacement key k~)
    log_w       (batch, length, H, N)     log w_t <= 0, the data-dependent decay (in log space)
    u           (H, N)                    RWKV-6's bonus
    kappa_hat   (batch, length, H, N)     RWKV-7's normalized removal key
    a           (batch, length, H, N)     RWKV-7's in-context learning rate, in [0, 1]
    S           (batch, H, N, N)          the state, keys by values

Every ``*_recurrent`` is a loop over time (the loop is the lesson, and what decoding runs);
the parallel and chunked forms are checked equal to it in float64.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from . import backend as _backend
from . import linear_attention as _la
from .validate import check_device, check_range, check_tensor

REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# --------------------------------------------------------------------------------------
# RWKV-4: the WKV operator, per channel
# --------------------------------------------------------------------------------------


def wkv4_naive(w, u, k, v):
    r"""RWKV-4's WKV as the paper's recurrence on raw sums, ``(batch, length, C) -> (batch, length, C)``.

    :math:`\alpha_t = e^{-w}\alpha_{t-1} + e^{k_t} v_t`, :math:`\beta_t = e^{-w}\beta_{t-1} + e^{k_t}`,
    :math:`\mathrm{wkv}_t = (\alpha_{t-1} + e^{u+k_t} v_t)/(\beta_{t-1} + e^{u+k_t})`. Exact on
    paper; in float32 :math:`e^{k}` is ``inf`` for :math:`k > 88.7`, and ``inf / inf`` is ``nan``.
    Kept to show that failure; use :func:`wkv4_recurrent`.
    """
    B, L, C = k.shape
    num = torch.zeros(B, C, dtype=k.dtype, device=k.device)
    den = torch.zeros(B, C, dtype=k.dtype, device=k.device)
    decay = torch.exp(-w)
    out = []
    for t in range(L):
        e_now = torch.exp(u + k[:, t])
        out.append((num + e_now * v[:, t]) / (den + e_now))
        num = decay * num + torch.exp(k[:, t]) * v[:, t]
        den = decay * den + torch.exp(k[:, t])
    return torch.stack(out, 1) if out else v.clone()


def wkv4_init_state(batch, channels, dtype=torch.float32, device=None):
    """The empty RWKV-4 state ``(a, b, p)``: zero sums, and :math:`p = -\\infty` (nothing seen)."""
    zeros = torch.zeros(batch, channels, dtype=dtype, device=device)
    return zeros, zeros.clone(), torch.full((batch, channels), -math.inf, dtype=dtype, device=device)


def wkv4_step(w, u, k_t, v_t, state):
    r"""One stable step, "RNN mode": ``k_t, v_t (batch, C)``, ``state = (a, b, p)`` -> ``(wkv_t, state')``.

    The state holds the numerator and denominator as :math:`a\,e^{p}` and :math:`b\,e^{p}`.
    To output, bring the current token's exponent :math:`u + k_t` and :math:`p` to their
    maximum :math:`q` before exponentiating, so that every exponential is :math:`\le 1`:

    .. math::

        q = \max(p, u + k_t),\quad
        \mathrm{wkv}_t = \frac{e^{p-q} a + e^{u+k_t-q} v_t}{e^{p-q} b + e^{u+k_t-q}} .

    To update, decay (:math:`p \to p - w`) and add :math:`e^{k_t}`, again at the maximum
    :math:`q' = \max(p - w, k_t)`: :math:`a' = e^{p-w-q'} a + e^{k_t - q'} v_t`,
    :math:`b' = e^{p-w-q'} b + e^{k_t-q'}`, :math:`p' = q'`. One of the two weights is exactly
    1, so :math:`b' \ge 1`: the denominator never underflows either.
    """
    a, b, p = state
    q = torch.maximum(p, u + k_t)
    e1, e2 = torch.exp(p - q), torch.exp(u + k_t - q)
    wkv = (e1 * a + e2 * v_t) / (e1 * b + e2)
    q = torch.maximum(p - w, k_t)
    e1, e2 = torch.exp(p - w - q), torch.exp(k_t - q)
    return wkv, (e1 * a + e2 * v_t, e1 * b + e2, q)


def wkv4_recurrent(w, u, k, v, initial_state=None):
    """RWKV-4's WKV, "RNN mode": :func:`wkv4_step` over the sequence. Returns ``(wkv, final_state)``."""
    B, L, C = k.shape
    state = wkv4_init_state(B, C, k.dtype, k.device) if initial_state is None else initial_state
    out = []
    for t in range(L):
        wkv, state = wkv4_step(w, u, k[:, t], v[:, t], state)
        out.append(wkv)
    return (torch.stack(out, 1) if out else v.clone()), state


def wkv4_parallel(w, u, k, v, initial_state=None):
    r"""RWKV-4's WKV, "GPT mode": every output at once, as a softmax with a positional bias.

    For output :math:`t` the weight of token :math:`i` is :math:`e^{E_{ti}}` with
    :math:`E_{ti} = k_i - (t-1-i)\,w` for :math:`i < t`, :math:`E_{tt} = u + k_t`, and
    nothing for :math:`i > t`: a causal softmax over :math:`i` of :math:`E_{t\cdot}` per
    channel, computed with its maximum subtracted (chapter 5's stable softmax). An initial
    state :math:`(a, b, p)` is one more column, of exponent :math:`p - t w`, carrying
    :math:`a` and :math:`b` in place of :math:`v_i` and 1. ``(batch, C, L, L)`` memory: the
    training form when :math:`L` is short, a check of the recurrence here. Returns
    ``(wkv, final_state)``.
    """
    B, L, C = k.shape
    t = torch.arange(L, device=k.device, dtype=k.dtype)
    lag = (t[:, None] - 1 - t[None, :])  # (t, i): t - 1 - i
    E = k.transpose(1, 2)[:, :, None, :] - lag * w[:, None, None]  # (b, c, t, i)
    E = torch.where(torch.eye(L, dtype=torch.bool, device=k.device), (u + k).transpose(1, 2)[..., None], E)
    E = E.masked_fill(lag < -1, -math.inf)  # i > t: the future
    vT = v.transpose(1, 2)  # (b, c, i)
    if initial_state is None:
        a0, b0, p0 = wkv4_init_state(B, C, k.dtype, k.device)
    else:
        a0, b0, p0 = initial_state
    E0 = p0[..., None] - t * w[:, None]  # (b, c, t): the initial state seen from step t
    m = torch.maximum(E.amax(-1), E0)  # (b, c, t)
    weights, w0 = torch.exp(E - m[..., None]), torch.exp(E0 - m)
    num = (weights * vT[:, :, None, :]).sum(-1) + w0 * a0[..., None]
    den = weights.sum(-1) + w0 * b0[..., None]
    wkv = (num / den).transpose(1, 2)
    # The final state: the sums of the last update, at their own maximum exponent.
    F_ = k.transpose(1, 2) - (L - 1 - t) * w[:, None]  # (b, c, i): token i seen after the last update
    F0 = p0 - L * w
    p = torch.maximum(F_.amax(-1), F0) if L else F0
    e, e0 = torch.exp(F_ - p[..., None]), torch.exp(F0 - p)
    return wkv, ((e * vT).sum(-1) + e0 * a0, e.sum(-1) + e0 * b0, p)


def wkv4(w, u, k, v, *, initial_state=None, return_final_state=False, chunk_size=64, backend="auto"):
    r"""RWKV-4's WKV operator (see the module docstring), stable in any dtype.

    Args:
        w: ``(C,)``, the decay rates, :math:`\ge 0` (the official code stores
            :math:`-e^{\text{time\_decay}}`; pass :math:`e^{\text{time\_decay}}`).
        u: ``(C,)``, the bonus. k, v: ``(batch, length, C)``.
        initial_state: ``(a, b, p)``, each ``(batch, C)``, or None.
        chunk_size: the kernel's steps per program (the reference ignores it).
        backend: ``"reference"`` (:func:`wkv4_recurrent`), ``"triton"``
            (:mod:`seqbook.kernels.rwkv4`: a chunked scan over the length, forward and
            backward; float32, float16, bfloat16 on CUDA), or ``"auto"`` (the kernel for CUDA
            tensors, the reference otherwise).

    Returns ``wkv (batch, length, C)`` in the inputs' dtype (computed in float32 or better)
    and, with ``return_final_state``, the state (float32 from the kernel, which returns it
    detached: gradients flow from ``wkv`` into every input and the initial state).
    """
    where = "wkv4"
    for name, x in (("w", w), ("u", u), ("k", k), ("v", v)):
        _check_tensor(where, name, x, k, "k")
    if k.dim() != 3:
        raise ValueError(f"{where}: k must be (batch, length, C), got shape {tuple(k.shape)}")
    B, L, C = k.shape
    if v.shape != k.shape:
        raise ValueError(f"{where}: v must have the shape of k, (batch, length, C) = {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, x in (("w", w), ("u", u)):
        if x.shape != (C,):
            raise ValueError(f"{where}: {name} must be (C,) = ({C},), got {tuple(x.shape)}")
    check_range(where, "w", w, 0, None, "the decay e^-w in (0, 1]")
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 3 \
                or any(not isinstance(s, torch.Tensor) or s.shape != (B, C) for s in initial_state):
            raise ValueError(f"{where}: initial_state must be a tuple (a, b, p) of tensors of shape (batch, C) = {(B, C)}")
        for name, s in zip("abp", initial_state):
            _check_tensor(where, f"initial_state's {name}", s, k, "k")
    chosen = _backend.resolve(backend, k, v)
    if chosen == "triton":
        refusal = _wkv4_kernel_refuses(k, chunk_size)
        if refusal and backend == "auto":
            chosen = "reference"
        elif refusal:
            raise refusal[0](f"{where}(backend='triton'): {refusal[1]}; use backend='reference' for it")
    if chosen == "triton" and k.numel() == 0:
        chosen = "reference"  # nothing to launch
    if chosen == "triton":
        state = None if initial_state is None else tuple(s.float() for s in initial_state)
        out, state = _backend.kernels("rwkv4").wkv4(w, u, k, v, state, chunk_size)
        return (out, state) if return_final_state else out
    work = torch.promote_types(k.dtype, torch.float32)
    state = None if initial_state is None else tuple(s.to(work) for s in initial_state)
    out, state = wkv4_recurrent(w.to(work), u.to(work), k.to(work), v.to(work), state)
    out = out.to(k.dtype)
    return (out, state) if return_final_state else out


#: dtypes the WKV-4 kernel accepts (it computes in float32)
WKV4_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _wkv4_kernel_refuses(k, chunk_size):
    """Why the WKV-4 kernel cannot take these inputs (the exception, the message), or None."""
    if k.dtype not in WKV4_KERNEL_DTYPES:
        return TypeError, f"the kernel supports dtypes float16, bfloat16, float32 (float32 inside), got {k.dtype}"
    if k.dtype == torch.bfloat16 and not k.is_cuda:
        return TypeError, "the Triton interpreter cannot run bfloat16 (NumPy has no such type): use float32 or float16 on CPU"
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        return ValueError, f"chunk_size must be a positive int, got {chunk_size!r}"
    return None


# --------------------------------------------------------------------------------------
# RWKV-6: vector decay and bonus (gated linear attention with a bonus)
# --------------------------------------------------------------------------------------


def wkv6_recurrent(r, k, v, log_w, u, initial_state=None):
    r"""RWKV-6's state update, written as the paper writes it (row vectors, per head):
    :math:`o_t = r_t(S_{t-1} + \mathrm{Diag}(u) k_t^\top v_t)`, :math:`S_t = \mathrm{Diag}(w_t) S_{t-1} + k_t^\top v_t`.

    Shapes in the module glossary; returns ``(o, final_state)``. The output reads the state
    *before* this step's decay: the current token enters only through the bonus :math:`u`.
    """
    B, L, H, N = r.shape
    S = torch.zeros(B, H, N, v.shape[-1], dtype=r.dtype, device=r.device) if initial_state is None \
        else initial_state.to(r.dtype)  # fmt: skip
    out = []
    for t in range(L):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # k_t^T v_t, (b, h, N, N)
        out.append(torch.einsum("bhk,bhkv->bhv", r[:, t], S + u[..., None] * kv))
        S = torch.exp(log_w[:, t])[..., None] * S + kv
    return (torch.stack(out, 1) if out else v.clone()), S


def wkv6_chunked(r, k, v, log_w, u, initial_state=None, chunk_size=64):
    """RWKV-6's operator by chunks: :func:`seqbook.linear_attention.gla_chunked` with the bonus and scale 1."""
    return _la.gla_chunked(r, k, v, log_w, initial_state, 1.0, u, chunk_size=chunk_size)


def wkv6(r, k, v, log_w, u, *, initial_state=None, chunk_size=64, return_final_state=False, backend="auto"):
    r"""RWKV-6's time-mixing operator (module docstring), ``(o, final_state)`` as in :func:`seqbook.linear_attention.gla`.

    Args: ``r, k, log_w (batch, length, H, N)``, ``v (batch, length, H, d_v)``, ``u (H, N)``,
    ``initial_state (batch, H, N, d_v)`` or None. ``log_w <= 0``. ``backend`` as in
    :func:`seqbook.linear_attention.gla`: ``"triton"`` runs :mod:`seqbook.kernels.gla` (bonus
    included, forward and backward).
    """
    try:
        return _la.gla(r, k, v, log_w, initial_state=initial_state, scale=1.0, bonus=u, chunk_size=chunk_size,
                       return_final_state=return_final_state, backend=backend)  # fmt: skip
    except (ValueError, TypeError, NotImplementedError) as error:  # the same checks, in RWKV-6's names
        message = str(error).replace("gla", "wkv6").replace("log_alpha", "log_w").replace("bonus", "u")
        message = message.replace("q must", "r must").replace("of q", "of r").replace("in q", "in r")
        raise type(error)(message.replace("alpha = exp(log_w)", "w = exp(log_w)")) from None


# --------------------------------------------------------------------------------------
# RWKV-7: the generalized delta rule
# --------------------------------------------------------------------------------------


def wkv7_step(r_t, log_w_t, k_t, v_t, kappa_hat_t, a_t, S):
    r"""One RWKV-7 step (module docstring), per head; ``(batch, H, N)`` vectors, ``S (batch, H, N, d_v)``.

    .. math::

        S' = \mathrm{Diag}(w_t)\, S - (a_t \odot \hat\kappa_t)\,(\hat\kappa_t^\top S) + \tilde k_t v_t^\top,
        \qquad o_t = r_t^\top S' .

    :math:`\hat\kappa_t^\top S` is what the state currently answers for the removal key;
    the update removes the fraction :math:`a_t` of it (per key channel) and writes the new
    value under the replacement key: a gradient step on
    :math:`\tfrac12\lVert S^\top\hat\kappa_t - \cdot\rVert^2` with a vector learning rate.
    Returns ``(o_t (batch, H, d_v), S')``.
    """
    recalled = torch.einsum("bhk,bhkv->bhv", kappa_hat_t, S)
    S = torch.exp(log_w_t)[..., None] * S - (a_t * kappa_hat_t)[..., None] * recalled[..., None, :] \
        + k_t[..., None] * v_t[..., None, :]  # fmt: skip
    return torch.einsum("bhk,bhkv->bhv", r_t, S), S


def wkv7_recurrent(r, log_w, k, v, kappa_hat, a, initial_state=None):
    """RWKV-7's operator, :func:`wkv7_step` over the sequence. Returns ``(o, final_state)``."""
    B, L, H, N = r.shape
    S = torch.zeros(B, H, N, v.shape[-1], dtype=r.dtype, device=r.device) if initial_state is None \
        else initial_state.to(r.dtype)  # fmt: skip
    out = []
    for t in range(L):
        o_t, S = wkv7_step(r[:, t], log_w[:, t], k[:, t], v[:, t], kappa_hat[:, t], a[:, t], S)
        out.append(o_t)
    return (torch.stack(out, 1) if out else v.clone()), S


def wkv7_chunked(r, log_w, k, v, kappa_hat, a, initial_state=None, chunk_size=16):
    r"""RWKV-7 by chunks: the delta rule's WY idea with vector decays (readable, ``(C, C, N)`` per chunk).

    In a chunk entered with :math:`S_0`, let :math:`\Gamma_t = \prod_{r \le t} w_r` (inside the
    chunk) and :math:`x_t = \hat\kappa_t^\top S_{t-1}` the unknown recalled rows. Unrolling,

    .. math::

        S_t = \mathrm{Diag}(\Gamma_t) S_0 + \sum_{j \le t} \mathrm{Diag}(\Gamma_t/\Gamma_j)
              \big(\tilde k_j v_j^\top - (a_j\odot\hat\kappa_j)\, x_j\big),

    and :math:`x_t = \hat\kappa_t^\top S_{t-1}` becomes the unit lower-triangular system
    :math:`(I + A)\,X = (\hat\kappa \odot \Gamma_{t-1}) S_0 + B V` with
    :math:`A_{tj} = \sum_c \hat\kappa_{tc} \tfrac{\Gamma_{t-1,c}}{\Gamma_{jc}} (a_j\hat\kappa_j)_c`
    and :math:`B_{tj}` the same with :math:`\tilde k_j`, for :math:`j < t`. Solve for :math:`X`
    (forward substitution), then outputs and the state leaving the chunk are decayed sums as
    in gated linear attention. Every ratio :math:`\Gamma_t/\Gamma_j` is formed as
    :math:`e^{\sum_{r=j+1}^t \log w_r}`: exponents :math:`\le 0`. Equal to :func:`wkv7_recurrent`.
    """
    B, L, H, N = r.shape
    S = torch.zeros(B, H, N, v.shape[-1], dtype=r.dtype, device=r.device) if initial_state is None \
        else initial_state.to(r.dtype)  # fmt: skip
    out = torch.empty(*r.shape[:3], v.shape[-1], dtype=r.dtype, device=r.device)
    for t0 in range(0, L, chunk_size):
        rc, lw, kc, vc, kh, ac = (x[:, t0 : t0 + chunk_size] for x in (r, log_w, k, v, kappa_hat, a))
        n = rc.shape[1]
        g = torch.cumsum(lw, dim=1)  # (b, n, h, N): log Gamma_t
        g_prev = g - lw  # log Gamma_{t-1}
        idx = torch.arange(n, device=r.device)
        strict = (idx[:, None] > idx[None, :])[None, :, :, None, None]
        incl = (idx[:, None] >= idx[None, :])[None, :, :, None, None]
        # decays from after step j to (the start of) step t: exp(g_prev_t - g_j), j < t
        d_prev = torch.exp((g_prev[:, :, None] - g[:, None, :]).masked_fill(~strict, -math.inf))  # (b, t, j, h, N)
        d_incl = torch.exp((g[:, :, None] - g[:, None, :]).masked_fill(~incl, -math.inf))
        removal = ac * kh  # a_j * kappa_hat_j
        A = torch.einsum("bthc,btjhc,bjhc->bhtj", kh, d_prev, removal)
        Bm = torch.einsum("bthc,btjhc,bjhc->bhtj", kh, d_prev, kc)
        rhs = torch.einsum("bthc,bhcv->bhtv", kh * torch.exp(g_prev), S) + Bm @ vc.transpose(1, 2)
        eye = torch.eye(n, dtype=r.dtype, device=r.device)
        X = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)  # (b, h, n, d_v)
        # outputs: o_t = r_t^T S_t
        Pk = torch.einsum("bthc,btjhc,bjhc->bhtj", rc, d_incl, kc)
        Pa = torch.einsum("bthc,btjhc,bjhc->bhtj", rc, d_incl, removal)
        o = torch.einsum("bthc,bhcv->bhtv", rc * torch.exp(g), S) + Pk @ vc.transpose(1, 2) - Pa @ X
        out[:, t0 : t0 + n] = o.transpose(1, 2)
        to_end = torch.exp(g[:, -1:] - g)  # (b, j, h, N)
        S = torch.exp(g[:, -1])[..., None] * S + torch.einsum("bjhc,bjhv->bhcv", to_end * kc, vc) \
            - torch.einsum("bjhc,bhjv->bhcv", to_end * removal, X)  # fmt: skip
    return out, S


def wkv7(r, log_w, k, v, kappa_hat, a, *, initial_state=None, chunk_size=16, return_final_state=False,
         backend="auto"):  # fmt: skip
    r"""RWKV-7's operator (module docstring).

    Args: ``r, log_w, k, kappa_hat, a (batch, length, H, N)``, ``v (batch, length, H, d_v)``;
    ``log_w <= 0``; ``a`` in ``[0, 1]``; ``initial_state (batch, H, N, d_v)`` or None.
    Backend: ``"reference"`` (:func:`wkv7_chunked`, chunks of ``chunk_size``), ``"triton"``
    (:mod:`seqbook.kernels.rwkv7`: the same chunked form in chunks of 16 steps, whatever
    ``chunk_size``, forward and backward; float32, float16, bfloat16 on CUDA; ``N, d_v`` in
    :data:`seqbook.linear_attention.KERNEL_HEAD_DIMS`), or ``"auto"``: the kernel for CUDA
    tensors it supports. Returns ``o`` in the inputs' dtype (computed in float32 or better), and
    the state with ``return_final_state`` (float32 from the kernel).
    """
    where = "wkv7"
    for name, x in (("r", r), ("log_w", log_w), ("k", k), ("v", v), ("kappa_hat", kappa_hat), ("a", a)):
        _check_tensor(where, name, x, r, "r")
    if r.dim() != 4:
        raise ValueError(f"{where}: r must be (batch, length, H, N), got shape {tuple(r.shape)}")
    for name, x in (("log_w", log_w), ("k", k), ("kappa_hat", kappa_hat), ("a", a)):
        if x.shape != r.shape:
            raise ValueError(f"{where}: {name} must have the shape of r, (batch, length, H, N) = {tuple(r.shape)}, "
                             f"got {tuple(x.shape)}")  # fmt: skip
    if v.dim() != 4 or v.shape[:3] != r.shape[:3]:
        raise ValueError(f"{where}: v must be (batch, length, H, d_v) with (batch, length, H) = {tuple(r.shape[:3])}, "
                         f"got {tuple(v.shape)}")  # fmt: skip
    for name, x in (("k", k), ("v", v), ("kappa_hat", kappa_hat), ("a", a)):  # log_w may be kept in float32
        if x.dtype != r.dtype:
            raise TypeError(f"{where}: {name} must have the dtype of r ({r.dtype}), got {x.dtype}")
    check_range(where, "log_w", log_w, None, 0, "a decay w in (0, 1]")
    check_range(where, "a", a, 0, 1, "the in-context learning rate")
    B, L, H, N = r.shape
    if initial_state is not None and (not isinstance(initial_state, torch.Tensor)
                                      or initial_state.shape != (B, H, N, v.shape[-1])):  # fmt: skip
        raise ValueError(f"{where}: initial_state must be (batch, H, N, d_v) = {(B, H, N, v.shape[-1])}")
    if initial_state is not None:
        _check_tensor(where, "initial_state", initial_state, r, "r")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{where}: chunk_size must be a positive int, got {chunk_size!r}")
    if _la._gated_backend(where, backend, r, k, v) == "triton":  # same dtypes and head dims as the GLA kernel
        o, S = _backend.kernels("rwkv7").wkv7(r, log_w, k, v, kappa_hat, a, initial_state)
        return (o, S) if return_final_state else o
    work = torch.promote_types(r.dtype, torch.float32)
    cast = lambda x: None if x is None else x.to(work)  # noqa: E731
    o, S = wkv7_chunked(*(cast(x) for x in (r, log_w, k, v, kappa_hat, a, initial_state)), chunk_size=chunk_size)
    o = o.to(r.dtype)
    return (o, S) if return_final_state else o


def _check_tensor(where, name, x, ref, ref_name):
    """``x`` is a floating tensor on ``ref``'s device (the checks of :mod:`seqbook.validate`)."""
    check_tensor(where, name, x, REFERENCE_DTYPES)
    check_device(where, name, x, ref_name, ref)


# --------------------------------------------------------------------------------------
# Mixers: RWKV-6 and RWKV-7 blocks for seqbook.nn.LanguageModel
# --------------------------------------------------------------------------------------


def token_shift(x, x_last=None):
    """``x (batch, length, d)`` -> the previous token at each step, ``x_last (batch, d)`` (or zeros) at step 0."""
    first = torch.zeros_like(x[:, :1]) if x_last is None else x_last[:, None]
    return torch.cat([first, x[:, :-1]], dim=1)


class _LoRA(nn.Module):
    """``x -> tanh(x A) B`` (or ``sigmoid`` / none in the middle): the low-rank data-dependent terms of RWKV-6/7."""

    def __init__(self, d_in, rank, d_out, middle="tanh"):
        super().__init__()
        self.A = nn.Parameter(torch.empty(d_in, rank).uniform_(-0.01, 0.01))
        self.B = nn.Parameter(torch.zeros(rank, d_out))  # zero: starts as the static parameter
        self.middle = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "none": lambda z: z}[middle]

    def forward(self, x):
        return self.middle(x @ self.A) @ self.B


class _ChannelMix(nn.Module):
    r"""RWKV's channel mixing: :math:`k = \mathrm{ReLU}(W_k x_k)^2`, out :math:`= \sigma(W_r x_r) \odot W_v k`
    (RWKV-4/6), or :math:`W_v k` without the receptance gate (RWKV-7), with token-shifted inputs
    :math:`x_* = x + (x_{t-1} - x)\odot\mu_*`. Squared ReLU (So et al. 2021, Primer)."""

    def __init__(self, d_model, d_ffn, receptance):
        super().__init__()
        self.mu_k = nn.Parameter(torch.full((d_model,), 0.5))
        self.key = nn.Linear(d_model, d_ffn, bias=False)
        self.value = nn.Linear(d_ffn, d_model, bias=False)
        self.receptance = None
        if receptance:
            self.mu_r = nn.Parameter(torch.full((d_model,), 0.5))
            self.receptance = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, x_prev):
        delta = x_prev - x
        out = self.value(torch.relu(self.key(x + delta * self.mu_k)) ** 2)
        if self.receptance is not None:
            out = torch.sigmoid(self.receptance(x + delta * self.mu_r)) * out
        return out


class _RWKVMixer(nn.Module):
    """What RWKV-6 and RWKV-7 share: heads, time mixing then channel mixing, token-shift state, decoding."""

    version = 0

    def __init__(self, d_model, n_heads, d_ffn, backend):
        super().__init__()
        name = type(self).__name__
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"{name}: d_model must be a positive int, got {d_model!r}")
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1 or d_model % n_heads:
            raise ValueError(f"{name}: n_heads must be a positive int dividing d_model = {d_model}, got {n_heads!r}")
        self.d_model, self.n_heads, self.head_dim, self.backend = d_model, n_heads, d_model // n_heads, backend
        self.receptance = nn.Linear(d_model, d_model, bias=False)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.output = nn.Linear(d_model, d_model, bias=False)
        # A LayerNorm per head and per position, as RWKV-5/6/7's GroupNorm over (batch * length, d).
        self.head_norm_weight = nn.Parameter(torch.ones(d_model))
        self.head_norm_bias = nn.Parameter(torch.zeros(d_model))
        self.ln_channel = nn.LayerNorm(d_model)
        d_ffn = d_ffn if d_ffn is not None else 7 * d_model // 2  # RWKV-6's 3.5 d
        self.channel_mix = _ChannelMix(d_model, d_ffn, receptance=self.version < 7)
        # Per channel, decays spread from fast (index 0) to slow: RWKV-6's initialization, d_0 = -6 + 5 (n/(d-1))^0.85.
        n = torch.arange(d_model, dtype=torch.float64) / max(d_model - 1, 1)
        self.register_buffer("_decay_ramp", (-6.0 + 5.0 * n**0.85).float(), persistent=False)

    def _heads(self, x):
        return x.unflatten(-1, (self.n_heads, self.head_dim))

    def _head_norm(self, o):
        """``o (batch, length, H, N)`` -> each head normalized at each position, ``(batch, length, d_model)``."""
        o = F.layer_norm(o, (self.head_dim,), eps=64e-5).flatten(-2)
        return o * self.head_norm_weight + self.head_norm_bias

    def _time_mix(self, x, x_prev, S, step):  # pragma: no cover - each version defines it
        raise NotImplementedError

    def forward(self, x):
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"{type(self).__name__}: x must be (batch, length, d_model) with d_model = "
                             f"{self.d_model}, got shape {tuple(x.shape)}")  # fmt: skip
        y, _ = self._time_mix(x, token_shift(x), None, step=False)
        # The channel mix sees this block's stream after time mixing (x here is already LayerNorm'd
        # by the ResidualBlock around the mixer, which adds the outer residual).
        h = self.ln_channel(x + y)
        return y + self.channel_mix(h, token_shift(h))

    def init_state(self, batch, device=None, dtype=torch.float32):
        """``(x_prev for time mixing (batch, d), S (batch, H, N, N), h_prev for channel mixing (batch, d))``, zeros."""
        d, H, N = self.d_model, self.n_heads, self.head_dim
        zeros = lambda *s: torch.zeros(*s, device=device, dtype=dtype)  # noqa: E731
        return zeros(batch, d), zeros(batch, H, N, N), zeros(batch, d)

    def step(self, x_t, state):
        """One token, ``x_t (batch, d_model)`` -> ``(y_t, state')``; reproduces :meth:`forward`."""
        x_prev, S, h_prev = state
        x = x_t[:, None]
        y, S = self._time_mix(x, x_prev[:, None], S, step=True)
        h = self.ln_channel(x + y)
        y = y + self.channel_mix(h, h_prev[:, None])
        return y[:, 0], (x_t, S, h[:, 0])


class RWKV6(_RWKVMixer):
    r"""An RWKV-6 "Finch" block as one mixer, ``(batch, length, d_model) -> (batch, length, d_model)``.

    Time mixing (Peng et al. 2024, Sec. 4.1-4.2): data-dependent token shift ("ddlerp"),
    :math:`\mathrm{lerp}_\square(a, b) = a + (b - a)\odot(\mu_\square + \mathrm{lora}_\square(a + (b-a)\odot\mu_x))`,
    gives :math:`x_r, x_k, x_v, x_w, x_g`; then :math:`r, k, v = W x_\square`,
    :math:`g = \mathrm{SiLU}(W_g x_g)`, the decay :math:`w_t = e^{-e^{d_t}}` with
    :math:`d_t = d_0 + \mathrm{lora}_w(x_w)` (low rank, data-dependent), :func:`wkv6` per head
    with the bonus :math:`u`, a per-head norm, the gate, and :math:`W_o`. Channel mixing with
    squared ReLU and a receptance gate follows (see ``_ChannelMix``).

    The residual around the time mixing is the :class:`seqbook.nn.ResidualBlock`'s; the channel
    mix's residual is taken inside, on the normalized stream (a simplification of RWKV's two
    residual sub-blocks, so that one mixer fits :class:`seqbook.nn.LanguageModel`).
    State for decoding: ``(x_{t-1}, S, h_{t-1})``, constant size.
    """

    version = 6

    def __init__(self, d_model: int, n_heads: int = 1, *, d_lora: int | None = None, d_ffn: int | None = None,
                 backend: str = "auto"):  # fmt: skip
        super().__init__(d_model, n_heads, d_ffn, backend)
        rank = d_lora if d_lora is not None else max(4, min(32, d_model // 4))
        self.mu_x = nn.Parameter(torch.full((d_model,), 0.5))
        self.mu = nn.Parameter(torch.full((5, d_model), 0.5))  # for w, k, v, r, g
        self.ddlerp = nn.ModuleList(_LoRA(d_model, rank, d_model) for _ in range(5))
        self.gate = nn.Linear(d_model, d_model, bias=False)
        self.decay_base = nn.Parameter(self._decay_ramp.clone())
        self.decay_lora = _LoRA(d_model, 2 * rank, d_model)
        self.u = nn.Parameter(torch.full((n_heads, self.head_dim), 0.5))

    def _time_mix(self, x, x_prev, S, step):
        delta = x_prev - x
        base = x + delta * self.mu_x
        xw, xk, xv, xr, xg = (x + delta * (self.mu[i] + self.ddlerp[i](base)) for i in range(5))
        r, k, v = self._heads(self.receptance(xr)), self._heads(self.key(xk)), self._heads(self.value(xv))
        log_w = self._heads(-torch.exp(self.decay_base + self.decay_lora(xw)))  # log w_t = -e^{d_t}
        if step:
            o, S = wkv6_recurrent(r, k, v, log_w, self.u, S)
        else:
            o = wkv6(r, k, v, log_w, self.u, backend=self.backend)
        return self.output(self._head_norm(o) * F.silu(self.gate(xg))), S


class RWKV7(_RWKVMixer):
    r"""An RWKV-7 "Goose" block as one mixer, ``(batch, length, d_model) -> (batch, length, d_model)``.

    Time mixing (Peng et al. 2025, Sec. 4): static token shift :math:`x_\square = x + (x_{t-1}-x)\odot\mu_\square`
    for :math:`r, w, k, v, a, g`; :math:`r, k, v = W x_\square`; the decay
    :math:`w_t = e^{-e^{-1/2}\sigma(d_t)}`, :math:`d_t = w_0 + \mathrm{lora}_w(x_w)`; the in-context
    learning rate :math:`a_t = \sigma(a_0 + \mathrm{lora}_a(x_a))`; the removal key
    :math:`\hat\kappa_t = \mathrm{normalize}(k_t\odot\xi)` per head; the replacement key
    :math:`\tilde k_t = k_t\odot(1 + (a_t - 1)\odot\alpha)`; :func:`wkv7`; a per-head norm;
    the bonus :math:`(\sum_{\text{head}} r_t\odot\rho\odot\tilde k_t)\, v_t`; the gate
    :math:`g = \mathrm{lora}_g(x_g)` (sigmoid inside); :math:`W_o`. Channel mixing: squared
    ReLU, no receptance. Left out: the value residual across layers (each mixer is
    independent in :class:`seqbook.nn.LanguageModel`). Same residual arrangement and decoding
    state as :class:`RWKV6`.
    """

    version = 7

    def __init__(self, d_model: int, n_heads: int = 1, *, d_lora: int | None = None, d_ffn: int | None = None,
                 backend: str = "auto"):  # fmt: skip
        super().__init__(d_model, n_heads, d_ffn, backend)
        rank = d_lora if d_lora is not None else max(4, min(32, d_model // 4))
        self.mu = nn.Parameter(torch.full((6, d_model), 0.5))  # for r, w, k, v, a, g
        # w0 chosen so that the initial decays e^{-e^{-1/2} sigma(w0)} spread over channels like RWKV-6's ramp
        target = torch.exp(self._decay_ramp.double()).clamp(max=0.6)  # -log w at initialization, < e^-0.5
        self.w0 = nn.Parameter(torch.logit(target / math.exp(-0.5)).float())
        self.w_lora = _LoRA(d_model, rank, d_model)
        self.a0 = nn.Parameter(torch.zeros(d_model))
        self.a_lora = _LoRA(d_model, rank, d_model, middle="none")
        self.g_lora = _LoRA(d_model, rank, d_model, middle="sigmoid")
        nn.init.uniform_(self.g_lora.B, -0.1, 0.1)  # a zero gate would block every gradient at the start
        self.xi = nn.Parameter(torch.ones(d_model))  # k_k in the official code: the removal key's scale
        self.alpha = nn.Parameter(torch.zeros(d_model))  # k_a: how much a_t shrinks the replacement key
        self.rho = nn.Parameter(torch.zeros(n_heads, self.head_dim))  # r_k: the bonus

    def _time_mix(self, x, x_prev, S, step):
        delta = x_prev - x
        xr, xw, xk, xv, xa, xg = (x + delta * self.mu[i] for i in range(6))
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        log_w = -math.exp(-0.5) * torch.sigmoid(self.w0 + self.w_lora(xw))
        a = torch.sigmoid(self.a0 + self.a_lora(xa))
        kappa_hat = F.normalize(self._heads(k * self.xi), dim=-1)
        k_tilde = k * (1 + (a - 1) * self.alpha)
        r, log_w, k_tilde, v, a = (self._heads(t) for t in (r, log_w, k_tilde, v, a))
        if step:
            o, S = wkv7_recurrent(r, log_w, k_tilde, v, kappa_hat, a, S)
        else:
            o = wkv7(r, log_w, k_tilde, v, kappa_hat, a, backend=self.backend)
        o = self._head_norm(o)
        bonus = (r * self.rho * k_tilde).sum(-1, keepdim=True) * v
        return self.output((o + bonus.flatten(-2)) * self.g_lora(xg)), S
