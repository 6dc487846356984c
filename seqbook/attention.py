r"""Softmax attention: the naive form, the online softmax, FlashAttention's tiling, a multi-head mixer.

.. math::

    \mathrm{attention}(Q, K, V) = \mathrm{softmax}\!\left(s\, Q K^\top + M\right) V,
    \qquad s = 1/\sqrt{d} \text{ by default},

per batch element and head, with the mask :math:`M_{ij} = -\infty` for :math:`j > i` when
causal (token :math:`i` sees tokens :math:`0..i`) and 0 otherwise (Vaswani et al. 2017,
Sec. 3.2.1). Each output row is an average of the value rows, weighted by how well the
query matches each key: soft retrieval.

Glossary (symbol -> shape)
--------------------------
seqbook puts time second everywhere, so the heads come after it::

    q, k, v   (batch, length, heads, d)   queries, keys, values; d = head dimension
    o         (batch, length, heads, d)   the outputs, one per query
    S         (batch, heads, length, length)   the scores s q_i . k_j (materialized by the naive form only)
    P         (batch, heads, length, length)   softmax(S) along the last axis
    lse       (batch, heads, length)       log-sum-exp of each row of S: log sum_j exp(S_ij)
    m, l      (..., rows)                  the online softmax's running max and normalizer
    scale     float                        s, default 1/sqrt(d)
    k_cache, v_cache   (batch, t, heads, d)   the keys and values of the t tokens decoded so far

Implementations with one signature ``(q, k, v, causal=False, scale=None) -> o``:

- :func:`attention_naive`: the formula as written, with the row maximum subtracted before
  the exponential; materializes the ``(L, L)`` scores. It is the reference.
- :func:`attention_naive_unstable`: the same without the subtraction. In float32 ``exp``
  overflows past 88.7, so scores of a few hundred give ``inf / inf = nan``: the one line
  that differs is the lesson.
- :func:`attention_tiled`: FlashAttention's algorithm in PyTorch (Dao et al. 2022; Dao
  2023): key blocks streamed through an online softmax, never more than a
  ``(block_m, block_n)`` tile of scores at once; returns the log-sum-exp too, which the
  backward (:func:`attention_backward_tiled`) uses to recompute the probabilities.
- :mod:`seqbook.kernels.attention`: the Triton kernel, forward and backward.

The public entry :func:`attention` validates and picks one with ``backend``
(:mod:`seqbook.backend`). :class:`MultiHeadAttention` is the mixer for
:class:`seqbook.nn.LanguageModel`, with rotary positions and a KV cache for decoding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import backend as _backend

#: dtypes the readable forms accept.
REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: dtypes the Triton kernel accepts; it accumulates in float32 whatever the input.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: head dimensions the Triton kernel accepts (a tile holds whole rows of q, k and v).
KERNEL_HEAD_DIMS = (16, 32, 64, 128)


# --------------------------------------------------------------------------------------
# Softmax, two ways, and the online softmax
# --------------------------------------------------------------------------------------


def softmax_unstable(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r""":math:`e^{x_j} / \sum_k e^{x_k}` as written: overflows once some :math:`x_j` exceeds
    the dtype's largest exponent (88.7 in float32, 11.1 in float16)."""
    e = torch.exp(x)
    return e / e.sum(dim, keepdim=True)


def softmax_stable(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""The same values computed as :math:`e^{x_j - m} / \sum_k e^{x_k - m}`, :math:`m = \max_k x_k`.

    Multiplying numerator and denominator by :math:`e^{-m}` changes nothing mathematically;
    numerically every exponent is now :math:`\le 0`, so every term lies in :math:`(0, 1]`
    and the sum in :math:`[1, n]`: nothing overflows, and the largest term is exactly 1,
    so the sum cannot underflow to 0 either. Rows that are entirely :math:`-\infty`
    (fully masked) would give ``nan``; attention's masks never produce them.
    """
    m = x.amax(dim, keepdim=True)
    e = torch.exp(x - m)
    return e / e.sum(dim, keepdim=True)


def online_softmax_update(
    m: torch.Tensor, l: torch.Tensor, x_block: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Fold one block of scores into the running max ``m`` and normalizer ``l``.

    After blocks :math:`x^{(1)}, \dots, x^{(b)}` of a row, :math:`m = \max` of all of them
    and :math:`l = \sum_j e^{x_j - m}` over all of them. A new block with maximum
    :math:`\tilde m` moves the reference point to :math:`m' = \max(m, \tilde m)`; the old
    sum was taken relative to :math:`m`, so it is rescaled by :math:`e^{m - m'}` (at most 1):

    .. math::

        m' = \max(m, \max_j x_j), \qquad l' = l\, e^{m - m'} + \sum_j e^{x_j - m'}.

    (Milakov and Gimelshein 2018.) Start from :math:`m = -\infty, l = 0`: then
    :math:`e^{m - m'} = 0` and the first block is taken as it is.

    Args:
        m, l: ``(...)``, the running max and normalizer of each row.
        x_block: ``(..., n)``, the row's next ``n`` scores.

    Returns:
        ``(m', l')``, each ``(...)``.
    """
    m_new = torch.maximum(m, x_block.amax(-1))
    l_new = l * torch.exp(m - m_new) + torch.exp(x_block - m_new[..., None]).sum(-1)
    return m_new, l_new


def online_logsumexp(x: torch.Tensor, block: int) -> torch.Tensor:
    r""":math:`\log\sum_j e^{x_j}` along the last axis, reading ``block`` entries at a time.

    One pass, constant memory per row: :func:`online_softmax_update` on each block, then
    :math:`\log\sum_j e^{x_j} = m + \log l`. Equal to ``torch.logsumexp(x, -1)`` to rounding.
    """
    m = torch.full(x.shape[:-1], -math.inf, dtype=x.dtype, device=x.device)
    l = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[-1], block):
        m, l = online_softmax_update(m, l, x[..., start : start + block])
    return m + torch.log(l)


# --------------------------------------------------------------------------------------
# Attention, naive and tiled
# --------------------------------------------------------------------------------------


def default_scale(d: int) -> float:
    r""":math:`1/\sqrt d`: with unit-variance entries, :math:`q \cdot k` has variance :math:`d`,
    and this brings the scores back to unit variance whatever the head dimension."""
    return 1.0 / math.sqrt(d)


def causal_mask(length_q: int, length_k: int | None = None, device=None) -> torch.Tensor:
    """``(length_q, length_k)`` bool, True where query ``i`` may see key ``j``: ``j <= i``
    (aligned at the top left: query ``i`` and key ``i`` are the same token)."""
    length_k = length_q if length_k is None else length_k
    i = torch.arange(length_q, device=device)[:, None]
    j = torch.arange(length_k, device=device)[None, :]
    return j <= i


def attention_scores(q: torch.Tensor, k: torch.Tensor, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    r"""The scores :math:`S = s\,QK^\top` (``-inf`` above the diagonal when causal),
    ``(batch, heads, length_q, length_k)``."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    S = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if causal:
        S = S.masked_fill(~causal_mask(q.shape[1], k.shape[1], device=q.device), -math.inf)
    return S


def attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    r""":math:`\mathrm{softmax}(s\,QK^\top + M)\,V`, the scores materialized, the softmax stable.

    Shapes as in the module glossary; no validation (that is :func:`attention`'s job).
    Memory :math:`O(B H L^2)` for the scores: at ``L = 16384``, 16 heads, float32, 17 GB.
    """
    P = softmax_stable(attention_scores(q, k, causal, scale), dim=-1)
    return torch.einsum("bhij,bjhd->bihd", P, v)


def attention_naive_unstable(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """:func:`attention_naive` with :func:`softmax_unstable`: ``nan`` once scores pass the
    dtype's exponent range. Kept to show what the max subtraction buys."""
    P = softmax_unstable(attention_scores(q, k, causal, scale), dim=-1)
    return torch.einsum("bhij,bjhd->bihd", P, v)


def attention_tiled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    *,
    block_m: int = 64,
    block_n: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""FlashAttention's forward pass in PyTorch: exact attention, one score tile at a time.

    For each block of ``block_m`` queries, the keys and values are read in blocks of
    ``block_n``. Each tile of scores updates the running max ``m`` and normalizer ``l``
    (:func:`online_softmax_update`), and the output accumulator the same way: the
    unnormalized output :math:`\sum_j e^{S_{ij} - m} v_j` is also a sum taken relative to
    ``m``, so when ``m`` moves to ``m'`` it is rescaled by the same :math:`e^{m - m'}`:

    .. math::

        \mathrm{acc}' = \mathrm{acc}\, e^{m - m'} + e^{S_{\text{tile}} - m'}\, V_{\text{tile}}.

    After the last tile, :math:`o = \mathrm{acc} / l`. Nothing is approximated: every
    rescaling is an exact identity, so the result equals :func:`attention_naive` to
    rounding. Causal: tiles entirely above the diagonal are skipped (their weights are 0),
    and only tiles that cross it are masked.

    Returns:
        ``(o, lse)``: ``o`` like ``q``; ``lse (batch, heads, length)``, :math:`m + \log l`
        per query, what the backward needs to recompute :math:`P` without storing it.
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    B, L, H, d = q.shape
    Lk = k.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty(B, H, L, dtype=q.dtype, device=q.device)
    for i0 in range(0, L, block_m):
        qi = q[:, i0 : i0 + block_m]  # (B, bm, H, d)
        rows = qi.shape[1]
        m = torch.full((B, H, rows), -math.inf, dtype=q.dtype, device=q.device)
        l = torch.zeros(B, H, rows, dtype=q.dtype, device=q.device)
        acc = torch.zeros(B, H, rows, d, dtype=q.dtype, device=q.device)
        last_key = min(Lk, i0 + rows) if causal else Lk  # causal: keys past the block's last query never count
        for j0 in range(0, last_key, block_n):
            kj, vj = k[:, j0 : j0 + block_n], v[:, j0 : j0 + block_n]
            S = torch.einsum("bihd,bjhd->bhij", qi, kj) * scale  # (B, H, bm, bn): the only scores held
            if causal and j0 + kj.shape[1] - 1 > i0:  # the tile crosses the diagonal: mask key j > query i
                i = torch.arange(i0, i0 + rows, device=q.device)[:, None]
                j = torch.arange(j0, j0 + kj.shape[1], device=q.device)[None, :]
                S = S.masked_fill(j > i, -math.inf)
            m_new = torch.maximum(m, S.amax(-1))
            alpha = torch.exp(m - m_new)  # rescales what was summed relative to the old max
            P = torch.exp(S - m_new[..., None])
            l = l * alpha + P.sum(-1)
            acc = acc * alpha[..., None] + torch.einsum("bhij,bjhd->bhid", P, vj)
            m = m_new
        o[:, i0 : i0 + rows] = (acc / l[..., None]).transpose(1, 2)
        lse[:, :, i0 : i0 + rows] = m + torch.log(l)
    return o, lse


def attention_backward_tiled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    do: torch.Tensor,
    lse: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    *,
    block_m: int = 64,
    block_n: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The gradients ``(dq, dk, dv)`` of attention, recomputing each tile of :math:`P` from ``lse``.

    With :math:`O = PV`, :math:`P = \mathrm{softmax}(S)` row by row and :math:`S = s\,QK^\top`,
    and :math:`dX` the gradient of the loss with respect to :math:`X`:

    .. math::

        dV = P^\top dO, \qquad dP = dO\, V^\top, \qquad
        dS_{ij} = P_{ij}\,(dP_{ij} - \delta_i), \qquad \delta_i = \sum_j P_{ij}\, dP_{ij} = dO_i \cdot O_i,

        dQ = s\, dS\, K, \qquad dK = s\, dS^\top Q.

    The softmax's Jacobian gives :math:`dS`: :math:`\partial P_{ij}/\partial S_{ik} = P_{ij}(\mathbb 1_{j=k} - P_{ik})`.
    :math:`\delta_i` looks like a sum over the whole row, but :math:`\sum_j P_{ij} (dO_i \cdot v_j)
    = dO_i \cdot \sum_j P_{ij} v_j = dO_i \cdot O_i`: one dot product per row, computed
    before the loop. The probabilities are never stored: a tile of them is
    :math:`P_{ij} = e^{S_{ij} - \mathrm{lse}_i}`, recomputed from the saved log-sum-exp,
    one exponential per score and no second pass for the max. Memory is :math:`O(L)`
    beyond the inputs, against :math:`O(L^2)` for autograd through :func:`attention_naive`.

    Shapes as in the module glossary; ``o``, ``do`` like ``q``; ``lse`` from :func:`attention_tiled`.
    The loop order is the kernel's: each block of keys gathers its ``dk, dv`` over the
    query blocks that see it; ``dq`` is gathered along the way.
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    L, Lk = q.shape[1], k.shape[1]
    delta = torch.einsum("bihd,bihd->bhi", do, o)  # (B, H, L)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for j0 in range(0, Lk, block_n):
        kj, vj = k[:, j0 : j0 + block_n], v[:, j0 : j0 + block_n]
        j = torch.arange(j0, j0 + kj.shape[1], device=q.device)[None, :]
        first_query = (j0 // block_m) * block_m if causal else 0  # causal: queries before the block never see it
        for i0 in range(first_query, L, block_m):
            qi, doi = q[:, i0 : i0 + block_m], do[:, i0 : i0 + block_m]
            S = torch.einsum("bihd,bjhd->bhij", qi, kj) * scale
            P = torch.exp(S - lse[:, :, i0 : i0 + block_m, None])  # the forward's probabilities, recomputed
            if causal:
                i = torch.arange(i0, i0 + qi.shape[1], device=q.device)[:, None]
                P = P.masked_fill(j > i, 0.0)
            dv[:, j0 : j0 + block_n] += torch.einsum("bhij,bihd->bjhd", P, doi)
            dP = torch.einsum("bihd,bjhd->bhij", doi, vj)
            dS = P * (dP - delta[:, :, i0 : i0 + block_m, None])
            dk[:, j0 : j0 + block_n] += scale * torch.einsum("bhij,bihd->bjhd", dS, qi)
            dq[:, i0 : i0 + block_m] += scale * torch.einsum("bhij,bjhd->bihd", dS, kj)
    return dq, dk, dv


def decode_step(
    q_t: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    r"""The output of the newest token: its query against every cached key, ``(batch, heads, d)``.

    ``q_t (batch, heads, d)``; ``k_cache, v_cache (batch, t, heads, d)``, the keys and values
    of tokens ``0..t-1``, the newest token's own included. No mask is needed: everything
    in the cache is in the past. Work and memory :math:`O(t\,d)` per head: each new token
    costs more than the one before, and the cache grows by one row per token.
    """
    scale = default_scale(q_t.shape[-1]) if scale is None else scale
    S = torch.einsum("bhd,bjhd->bhj", q_t, k_cache) * scale
    return torch.einsum("bhj,bjhd->bhd", softmax_stable(S, dim=-1), v_cache)


# --------------------------------------------------------------------------------------
# Positions: sinusoidal and rotary
# --------------------------------------------------------------------------------------


def _frequencies(d: int, base: float, device=None) -> torch.Tensor:
    r""":math:`\theta_i = \text{base}^{-2i/d}`, ``i = 0..d/2-1``, in float64: wavelengths from
    :math:`2\pi` to about :math:`2\pi\,\text{base}` tokens."""
    return base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)


def sinusoidal_embedding(length: int, d: int, base: float = 10000.0) -> torch.Tensor:
    r"""The Transformer's absolute positions, ``(length, d)`` float32 (Vaswani et al. 2017, Sec. 3.5):

    .. math::

        PE_{t, 2i} = \sin(t\,\theta_i), \qquad PE_{t, 2i+1} = \cos(t\,\theta_i),
        \qquad \theta_i = \text{base}^{-2i/d}.

    Added to the token embeddings. Each pair of columns is a point turning on a circle at
    its own speed, so :math:`PE_{t+k}` is a fixed rotation of :math:`PE_t` for every ``t``.
    """
    if d % 2:
        raise ValueError(f"sinusoidal_embedding: d must be even (sin/cos pairs), got {d}")
    angles = torch.arange(length, dtype=torch.float64)[:, None] * _frequencies(d, base)[None, :]
    pe = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1)  # (length, d/2, 2)
    return pe.flatten(-2).float()


def rotary(x: torch.Tensor, positions: torch.Tensor | None = None, base: float = 10000.0) -> torch.Tensor:
    r"""Rotary position embedding (RoPE; Su et al. 2021): rotate each pair of features by its position.

    ``x (batch, length, heads, d)`` with ``d`` even; ``positions (length,)`` integers
    (default ``0..length-1``). Features ``(2i, 2i+1)`` of the token at position ``t``
    are rotated by the angle :math:`t\,\theta_i`:

    .. math::

        \begin{pmatrix} x'_{2i} \\ x'_{2i+1} \end{pmatrix} =
        \begin{pmatrix} \cos t\theta_i & -\sin t\theta_i \\ \sin t\theta_i & \cos t\theta_i \end{pmatrix}
        \begin{pmatrix} x_{2i} \\ x_{2i+1} \end{pmatrix}.

    Applied to queries and keys (not values). Rotations are orthogonal and compose by adding
    angles, so :math:`\langle R_m q, R_n k\rangle = \langle q, R_{n-m} k\rangle`: the score
    depends on the positions only through :math:`n - m`. Computed in float32 (float64 for
    float64 inputs), returned in ``x``'s dtype.
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rotary: the last dimension of x must be even (feature pairs), got {d}")
    if positions is None:
        positions = torch.arange(x.shape[1], device=x.device)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    angles = positions.to(torch.float64)[:, None] * _frequencies(d, base, device=x.device)[None, :]  # (length, d/2)
    cos, sin = torch.cos(angles).to(work)[:, None, :], torch.sin(angles).to(work)[:, None, :]  # (length, 1, d/2)
    x1, x2 = x[..., 0::2].to(work), x[..., 1::2].to(work)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------------------
# The public entry
# --------------------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Scaled dot-product attention, :math:`\mathrm{softmax}(s\,QK^\top + M)\,V`, per batch element and head.

    Args:
        q, k, v: ``(batch, length, heads, d)``, one shape, dtype and device for all three
            (strided views are fine: the kernel reads them through their strides).
        causal: mask key ``j > i`` for query ``i`` (aligned at the top left).
        scale: ``s``, a positive number; default :math:`1/\sqrt d`.
        backend: ``"reference"`` (:func:`attention_naive`), ``"triton"``
            (:mod:`seqbook.kernels.attention`; compiled on CUDA, interpreted on a machine
            without a GPU; ``d`` in ``KERNEL_HEAD_DIMS``, float32, bfloat16 or float16), or
            ``"auto"``: the kernel for CUDA tensors it supports, the reference otherwise.

    Returns:
        ``o (batch, length, heads, d)``, in the inputs' dtype; differentiable in ``q, k, v``.

    Mismatched shapes, dtypes or devices raise ``ValueError``/``TypeError`` naming the argument.
    """
    scale = _check_inputs(q, k, v, causal, scale)
    chosen = _backend.resolve(backend, q, k, v)
    if chosen == "triton":
        refusal = _kernel_refuses(q)
        if refusal and backend == "auto":
            chosen = "reference"  # e.g. float64 or d = 96: the reference is still right
        elif refusal:
            error, why = refusal
            raise error(f"attention(backend='triton'): {why}; use backend='reference' for it")
    if q.shape[1] == 0:
        # An empty sequence: no query, so no output row (the softmax over zero keys is
        # undefined, and the reference's max over them would fail). The empty result still
        # comes from v, so that autograd reaches the inputs.
        return v.clone()
    if chosen == "triton" and q.numel() == 0:
        chosen = "reference"  # nothing to launch
    if chosen == "reference":
        return attention_naive(q, k, v, causal, scale)
    return _backend.kernels("attention").attention(q, k, v, causal, scale)


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _kernel_refuses(q: torch.Tensor) -> tuple[type, str] | None:
    """Why the kernel cannot take these inputs (the exception to raise, and the message), or None."""
    if q.dtype not in KERNEL_DTYPES:
        return TypeError, f"the kernel supports dtypes {_names(KERNEL_DTYPES)} (float32 accumulation), got {q.dtype}"
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        return TypeError, "the Triton interpreter cannot run bfloat16 (NumPy has no such type): use float32 or float16 on CPU"
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        return ValueError, f"the kernel supports head dims d in {KERNEL_HEAD_DIMS}, got d = {q.shape[-1]}"
    return None


def _check_inputs(q, k, v, causal, scale) -> float:
    """Validate the public entry's arguments; return the scale to use."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in REFERENCE_DTYPES:
            raise TypeError(f"attention: {name} must be a floating tensor, one of {_names(REFERENCE_DTYPES)}; got {x.dtype}")
    if q.dim() != 4:
        raise ValueError(f"attention: q must be (batch, length, heads, d), got shape {tuple(q.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(
                f"attention: {name} must have the shape of q, (batch, length, heads, d) = {tuple(q.shape)}, "
                f"got {tuple(x.shape)}"
            )
        if x.dtype != q.dtype:
            raise TypeError(f"attention: {name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"attention: {name} must be on the device of q ({q.device}), got {x.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"attention: causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        return default_scale(q.shape[-1])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"attention: scale must be a positive finite number or None (1/sqrt(d)), got {scale!r}")
    return float(scale)


# --------------------------------------------------------------------------------------
# The mixer
# --------------------------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    r"""Multi-head self-attention, ``(batch, length, d_model) -> (batch, length, d_model)``.

    .. math::

        [Q\ K\ V] = x\,W_{qkv}, \quad \text{split into } h \text{ heads of } d = d_\text{model}/h, \quad
        y = [\mathrm{attention}(Q_1, K_1, V_1)\ \cdots\ \mathrm{attention}(Q_h, K_h, V_h)]\,W_o

    (Vaswani et al. 2017, Sec. 3.2.2). Each head attends in its own ``d``-dimensional
    subspace, so the heads can look for different things at once, for the cost of one head
    of width ``d_model``.

    Args:
        d_model: the width; a multiple of ``n_heads``.
        n_heads: ``h``.
        causal: token ``t`` sees tokens ``<= t`` (a language model needs it).
        rotary: rotate queries and keys by their positions (:func:`rotary`); without it, and
            without positions added to the input, attention is blind to order.
        backend: for :func:`attention` in :meth:`forward`.

    **Decoding.** :meth:`init_state` gives an empty KV cache, and :meth:`step` takes one
    token ``x_t (batch, d_model)`` at position ``t`` = the cache's length: it computes the
    token's query, key and value, appends key and value to the cache, and attends over the
    cache (:func:`decode_step`). Feeding a sequence token by token reproduces
    :meth:`forward` (causal only). The cache is ``(k_cache, v_cache)``, each
    ``(batch, t, n_heads, d)``; :meth:`step` returns a new one (one row longer) rather than
    writing into it.
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool = True, rotary: bool = True, backend: str = "auto"):
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"MultiHeadAttention: d_model must be a positive int, got {d_model!r}")
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1 or d_model % n_heads:
            raise ValueError(f"MultiHeadAttention: n_heads must be a positive int dividing d_model = {d_model}, "
                             f"got {n_heads!r}")  # fmt: skip
        head_dim = d_model // n_heads
        if rotary and head_dim % 2:
            raise ValueError(f"MultiHeadAttention: rotary needs an even head dimension, got d_model / n_heads = {head_dim}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, head_dim
        self.causal, self.rotary, self.backend = causal, rotary, backend
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        """``x (batch, length, d_model)`` -> ``q, k, v``, each ``(batch, length, n_heads, head_dim)``."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, self.head_dim)).unbind(dim=2)
        if self.rotary:
            q, k = rotary(q, positions), rotary(k, positions)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MultiHeadAttention: x must be (batch, length, d_model) with d_model = {self.d_model}, "
                             f"got shape {tuple(x.shape)}")  # fmt: skip
        q, k, v = self._project(x, torch.arange(x.shape[1], device=x.device))
        o = attention(q, k, v, causal=self.causal, backend=self.backend)
        return self.out(o.flatten(-2))

    def init_state(self, batch: int, device=None, dtype=torch.float32):
        """An empty KV cache: ``(k_cache, v_cache)``, each ``(batch, 0, n_heads, head_dim)``."""
        shape = (batch, 0, self.n_heads, self.head_dim)
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def step(self, x_t: torch.Tensor, state):
        """One token: ``x_t (batch, d_model)``, ``state = (k_cache, v_cache)`` ->
        ``(y_t (batch, d_model), (k_cache', v_cache'))``, the caches one row longer."""
        if not self.causal:
            raise RuntimeError("MultiHeadAttention.step: a non-causal mixer cannot decode token by token")
        k_cache, v_cache = state
        t = k_cache.shape[1]
        q, k, v = self._project(x_t[:, None], torch.tensor([t], device=x_t.device))
        k_cache = torch.cat([k_cache, k], dim=1)
        v_cache = torch.cat([v_cache, v], dim=1)
        o = decode_step(q[:, 0], k_cache, v_cache)
        return self.out(o.flatten(-2)), (k_cache, v_cache)


# --------------------------------------------------------------------------------------
# Sliding-window attention: a KV cache of bounded size
# --------------------------------------------------------------------------------------


def sliding_window_mask(length_q: int, window: int, length_k: int | None = None, device=None) -> torch.Tensor:
    """``(length_q, length_k)`` bool, True where query ``i`` may see key ``j``: ``i - window < j <= i``
    (the token itself and the ``window - 1`` before it; aligned at the top left as :func:`causal_mask`)."""
    length_k = length_q if length_k is None else length_k
    i = torch.arange(length_q, device=device)[:, None]
    j = torch.arange(length_k, device=device)[None, :]
    return (j <= i) & (j > i - window)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             scale: float | None = None) -> torch.Tensor:  # fmt: skip
    r"""Causal softmax attention in which query :math:`i` sees only the keys :math:`i - w < j \le i`
    (Beltagy et al. 2020, "Longformer"; the local half of Based, Arora et al. 2024).

    ``q, k, v (batch, length, heads, d)``, ``window`` :math:`w \ge 1` -> ``o (batch, length, heads, d)``.
    Readable form: the full ``(L, L)`` scores with a band mask, so it costs what :func:`attention_naive`
    costs; a kernel would visit only the :math:`w` keys of the band (:math:`O(L w d)` work), and decoding
    keeps only the last :math:`w` keys and values (:class:`SlidingWindowAttention`). With
    :math:`w \ge L` it is causal attention.
    """
    scale = _check_inputs(q, k, v, True, scale)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window_attention: window must be a positive int, got {window!r}")
    S = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    S = S.masked_fill(~sliding_window_mask(q.shape[1], window, k.shape[1], device=q.device), -math.inf)
    return torch.einsum("bhij,bjhd->bihd", softmax_stable(S, dim=-1), v)


class SlidingWindowAttention(MultiHeadAttention):
    r"""Causal multi-head attention over the last ``window`` tokens only: :class:`MultiHeadAttention`
    with the band mask of :func:`sliding_window_attention`.

    **Decoding.** The cache keeps the keys and values of the last ``window`` tokens, so the state
    stops growing once ``window`` tokens have been seen: ``2 window d_model`` numbers per layer,
    plus the position counter that rotary positions need (the cache's length no longer says where
    the sequence is). State: ``(k_cache, v_cache, position)``, the caches ``(batch, min(t, window),
    n_heads, head_dim)`` and ``position`` a 0-d int64 tensor, the number of tokens seen.
    """

    def __init__(self, d_model: int, n_heads: int, window: int, *, rotary: bool = True, backend: str = "auto"):
        super().__init__(d_model, n_heads, causal=True, rotary=rotary, backend=backend)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"SlidingWindowAttention: window must be a positive int, got {window!r}")
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"SlidingWindowAttention: x must be (batch, length, d_model) with d_model = "
                             f"{self.d_model}, got shape {tuple(x.shape)}")  # fmt: skip
        q, k, v = self._project(x, torch.arange(x.shape[1], device=x.device))
        return self.out(sliding_window_attention(q, k, v, self.window).flatten(-2))

    def init_state(self, batch: int, device=None, dtype=torch.float32):
        """An empty cache and position 0: ``(k_cache, v_cache, position)``."""
        k_cache, v_cache = super().init_state(batch, device=device, dtype=dtype)
        return k_cache, v_cache, torch.zeros((), dtype=torch.int64, device=device)

    def step(self, x_t: torch.Tensor, state):
        """One token: ``x_t (batch, d_model)`` -> ``(y_t (batch, d_model), state')``; the oldest row leaves
        the cache once it holds ``window`` rows."""
        if x_t.ndim != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"SlidingWindowAttention.step: x_t must be (batch, d_model) with d_model = "
                             f"{self.d_model}, got shape {tuple(x_t.shape)}")  # fmt: skip
        k_cache, v_cache, position = state
        q, k, v = self._project(x_t[:, None], position.reshape(1).to(x_t.device))
        k_cache = torch.cat([k_cache, k], dim=1)[:, -self.window :]
        v_cache = torch.cat([v_cache, v], dim=1)[:, -self.window :]
        o = decode_step(q[:, 0], k_cache, v_cache)
        return self.out(o.flatten(-2)), (k_cache, v_cache, position + 1)
