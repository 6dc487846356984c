r"""Triton kernel: gated linear attention with vector gates (and RWKV-6's bonus), chunked, forward and backward.

The readable forms, the glossary and the shapes are in :mod:`seqbook.linear_attention`
(:func:`~seqbook.linear_attention.gla_chunked`); this module has the signature
``gla(q, k, v, log_alpha, initial_state, scale, bonus) -> (o, final_state)`` behind a
:class:`torch.autograd.Function`.

Design
------
Chunks of ``T = 64`` steps, each cut into four sub-chunks of 16 (fla's layout for ``chunk_gla``, read for the
facts). The inputs are padded to a multiple of ``T`` with zeros (a zero key and value add nothing; a zero
log-gate keeps the decay flat). ``c`` is the log-gates' inclusive cumulative sum inside each chunk (float32,
written by the state pass; the state passes form their own with ``tl.cumsum``); the query's exponent is
:math:`c^q = c`, or :math:`c - \log\alpha` with the bonus (the query reads the state before its own step).
Every matrix product runs on float32 operands: exact (``"ieee"``) for float32 inputs, on the tensor cores at
tf32 for 16-bit ones (float16's mantissa, float32's range: the states and the exponentials need no 16-bit
rounding).

Forward:

1. ``_state_pass``: one program per (batch, head, key block, value block) walks the chunks in order with
   its tile of the state in float32, saves the state entering each chunk (and at the end the final state)
   and folds the chunk in,
   :math:`S \leftarrow \mathrm{Diag}(e^{c_\text{last}}) S + (k \circ e^{c_\text{last} - c})^\top v`. Key
   rows decay separately and never mix, so the state splits into independent tiles both ways.
2. ``_intra_weights``: the chunk's weights :math:`A_{tj} = \sum_c q_{tc} k_{jc} e^{c^q_{tc} - c_{jc}}`
   (``j <= t``; ``j < t`` and the bonus :math:`q_t\cdot(u\circ k_t)` on the diagonal with it), float32,
   stored. A block of sub-chunks ``I > J`` is one matrix product: the exponent is split at the step before
   sub-chunk ``I``, :math:`(q_I\circ e^{c^q_I - c_r})(k_J\circ e^{c_r - c_J})^\top`, both factors
   :math:`\le 1` because ``c`` decreases, so neither overflows and an underflow only drops a weight that is
   below float32's range anyway. The 16x16 diagonal blocks are formed column by column, each exponent a
   difference :math:`\le 0` formed before the exponential (the readable form's "diagonal sub-block").
3. ``_chunk_out``: :math:`o = s\,((q \circ e^{c^q}) S_\text{in} + A v)`, two 64-row matrix products.

Backward:

4. ``_dstate_pass``: the state's gradient walks the chunks in reverse,
   :math:`\bar S_\text{in} = \mathrm{Diag}(e^{c_\text{last}})\bar S_\text{out} + s\,(q\circ e^{c^q})^\top do`,
   saving :math:`\bar S_\text{out}` per chunk; it ends with the initial state's gradient.
5. ``_chunk_dv``: :math:`dv = s A^\top do + (k\circ e^{c_\text{last}-c})\bar S_\text{out}` and the weights'
   gradient :math:`dA = s\, do\, v^\top` (lower triangle), stored.
6. ``_chunk_dqk``: per (chunk, key block), sub-chunk by sub-chunk: dq, dk through the states, through the
   other sub-chunks (matrix products with the same split exponents) and through the diagonal block (column by
   column), the bonus's diagonal terms, and the log-gates' gradient.

The log-gates' gradient: every exponent in the model is a difference :math:`b_x - b_y` of global cumulative
gates (the chunk boundaries cancel), so :math:`\partial\mathcal L/\partial b_x = q_x \odot \partial q_x -
k_x\odot\partial k_x` (the gated parts of dq, dk), and the log-gate's gradient at step ``t`` is the sum of
these over steps ``>= t`` (with the bonus the query's exponent is :math:`b_{t-1}`, so its own step's
:math:`q_t \odot\partial q_t` leaves the sum). The sum over the later chunks needs no pass of its own: at the
chunk's last step the recurrence :math:`S_t = \mathrm{Diag}(e^{g_t}) S_{t-1} + k_t v_t^\top` gives the
gradient directly, :math:`\sum_v (S_\text{out} - k_t v_t^\top) \odot \bar S_t`, where :math:`\bar S_t` is the
state's whole gradient after that step (:math:`\bar S_\text{out}`, plus :math:`s\, q_t\, do_t^\top` without
the bonus, where the query reads that state); step 6 adds the in-chunk sums to it and writes the log-gates'
gradient in their dtype. The final state is stored after the chunks' entering states, so
:math:`S_\text{out}` is always "the next entering state".

Measured on the H200 (GPU call 3 of 2026-12-02, bf16 inputs as in ``benchmarks.gated``, ``do_bench``; see
``benchmarks/NOTES.md``): at B=4, L=4096, H=32, d=64 GLA forward 1.30 ms, forward+backward 3.32 ms; RWKV-6
1.44 / 4.05 ms (fla on the same GPU earlier: 0.76 ms GLA forward, 0.89 / 3.33 ms RWKV-6, so 0.6x forward and
0.8x forward+backward, not yet the 1.0x of issue 13); at B=1, L=16384, H=16, d=128 GLA 2.81 / 6.05 ms. The
sub-chunk kernels are the slow part (``_intra_weights`` 0.75 ms of the forward, ``_chunk_dqk`` 1.3-1.9 ms of the
backward, against 0.20 ms for ``_chunk_out``'s 64-row products): their 16-row products and per-sub-chunk steps
leave the GPU idle. Errors against float64 at B=1, L=1000, H=16 (bf16 inputs): at most 4.3e-3 of the largest
value (the output's bf16 rounding). Unmeasured: the tile variants (``_tiles``), RWKV-6 at d=128.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunked_state import pad_to

#: steps per chunk
CHUNK = 64
#: steps per sub-chunk: the blocks of the chunk's weights formed as one matrix product, or column by column
SUB_CHUNK = 16
#: the largest decay (in log space, over one sub-chunk, any channel) for which a diagonal block is one matrix
#: product: its key factor is at most e^SPAN (float32 overflows past e^88)
SPAN = tl.constexpr(40.0)


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """``a @ b`` on float32 operands, accumulated in float32: ``"ieee"`` (exact float32, for float32 inputs) or
    ``"tf32"`` (tensor cores, 10-bit mantissas like float16's, float32's range: for 16-bit inputs)."""
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _last_row(x, rt, T: tl.constexpr):
    """Row ``T - 1`` of a ``(T, n)`` tile."""
    return tl.sum(tl.where(rt[:, None] == T - 1, x, 0.0), axis=0)


@triton.jit
def _state_pass(k_ptr, v_ptr, g_ptr, c_ptr, s0_ptr, states_ptr, Lp, H, n_chunks,
                DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                HAS_S0: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """The states entering each chunk and, after them, the final state (``n_chunks + 1`` per (batch, head));
    and (the programs of the first value block) ``c``, the log-gates' inclusive cumulative sum inside each
    chunk, float32, for the passes after this one."""
    # one (batch, head) and one (BK, BV) tile of the state: key rows decay separately and never mix
    bh, pk, pv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    rk, rv, rt = pk * BK + tl.arange(0, BK), pv * BV + tl.arange(0, BV), tl.arange(0, T)
    s_off = rk[:, None] * DV + rv[None, :]
    if HAS_S0:
        S = tl.load(s0_ptr + bh * DK * DV + s_off).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for ci in range(n_chunks):
        tl.store(states_ptr + (bh * (n_chunks + 1) + ci) * DK * DV + s_off, S)
        rows = (b * Lp + ci * T + rt) * H + h  # (T,)
        k = tl.load(k_ptr + rows[:, None] * DK + rk[None, :]).to(tl.float32)
        v = tl.load(v_ptr + rows[:, None] * DV + rv[None, :]).to(tl.float32)
        c = tl.cumsum(tl.load(g_ptr + rows[:, None] * DK + rk[None, :]).to(tl.float32), axis=0)
        if pv == 0:
            tl.store(c_ptr + rows[:, None] * DK + rk[None, :], c)
        c_last = _last_row(c, rt, T)  # (BK,)
        S = tl.exp(c_last)[:, None] * S + _dot(tl.trans(k * tl.exp(c_last[None, :] - c)), v, PREC)
    tl.store(states_ptr + (bh * (n_chunks + 1) + n_chunks) * DK * DV + s_off, S)


@triton.jit
def _intra_weights(q_ptr, k_ptr, c_ptr, g_ptr, u_ptr, a_ptr, Lp, H,
                   DK: tl.constexpr, T: tl.constexpr, BC: tl.constexpr, BONUS: tl.constexpr,
                   PREC: tl.constexpr):  # fmt: skip
    r"""The chunk's weights ``A[t, j]`` (T, T), float32, zeros above the diagonal:
    :math:`\sum_c q_{tc} k_{jc} e^{c^q_{tc} - c_{jc}}` for ``j < t`` (and ``j = t`` without the bonus), the bonus's
    :math:`q_t \cdot (u \circ k_t)` on the diagonal with it."""
    ci, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    NC: tl.constexpr = T // BC
    rc, rk = tl.arange(0, BC), tl.arange(0, DK)
    t0 = b * Lp + ci * T  # the chunk's first step
    a_base = a_ptr + (bh * (Lp // T) + ci) * T * T
    for I in tl.static_range(NC):
        rows_i = (t0 + I * BC + rc) * H + h
        q_i = tl.load(q_ptr + rows_i[:, None] * DK + rk[None, :]).to(tl.float32)
        c_i = tl.load(c_ptr + rows_i[:, None] * DK + rk[None, :])
        if BONUS:  # the query reads the state before its own step: its exponent stops one step short
            cq_i = c_i - tl.load(g_ptr + rows_i[:, None] * DK + rk[None, :]).to(tl.float32)
        else:
            cq_i = c_i
        # the exponent split at the step before sub-chunk I (the chunk's start for the first): the query's factor
        # is <= 1 against every earlier key (c decreases along the chunk)
        if I > 0:
            ref = tl.load(c_ptr + ((t0 + I * BC - 1) * H + h) * DK + rk)
        else:
            ref = tl.zeros([DK], dtype=tl.float32)
        qe = q_i * tl.exp(cq_i - ref[None, :])
        # earlier sub-chunks: one matrix product, the key's factor <= 1 as well, so neither overflows and an
        # underflow only drops a weight below float32's range
        for J in tl.static_range(I):
            rows_j = (t0 + J * BC + rc) * H + h
            k_j = tl.load(k_ptr + rows_j[:, None] * DK + rk[None, :]).to(tl.float32)
            c_j = tl.load(c_ptr + rows_j[:, None] * DK + rk[None, :])
            a_ij = _dot(qe, tl.trans(k_j * tl.exp(ref[None, :] - c_j)), PREC)
            tl.store(a_base + (I * BC + rc)[:, None] * T + J * BC + rc[None, :], a_ij)
        for J in tl.static_range(I + 1, NC):  # the future: zeros
            tl.store(a_base + (I * BC + rc)[:, None] * T + J * BC + rc[None, :], tl.zeros([BC, BC], dtype=tl.float32))
        # the diagonal block: the same product where the sub-chunk's decay stays within e^{-SPAN} in every channel
        # (its key factor e^{c_r - c_j} <= e^{SPAN} cannot overflow), else one key column at a time, each exponent
        # a difference <= 0 formed before the exponential
        k_i = tl.load(k_ptr + rows_i[:, None] * DK + rk[None, :]).to(tl.float32)
        c_end = tl.load(c_ptr + ((t0 + I * BC + BC - 1) * H + h) * DK + rk)
        if tl.max(ref - c_end, axis=0) <= SPAN:
            a_ii = _dot(qe, tl.trans(k_i * tl.exp(ref[None, :] - c_i)), PREC)
            if BONUS:
                a_ii = tl.where(rc[:, None] > rc[None, :], a_ii, 0.0)
            else:
                a_ii = tl.where(rc[:, None] >= rc[None, :], a_ii, 0.0)
        else:
            a_ii = tl.zeros([BC, BC], dtype=tl.float32)
            for j in range(BC):
                row_j = (t0 + I * BC + j) * H + h
                k_col = tl.load(k_ptr + row_j * DK + rk).to(tl.float32)
                c_col = tl.load(c_ptr + row_j * DK + rk)
                if BONUS:
                    causal = rc > j
                else:
                    causal = rc >= j
                expo = tl.where(causal[:, None], cq_i - c_col[None, :], float("-inf"))
                col = tl.sum(q_i * k_col[None, :] * tl.exp(expo), axis=1)
                a_ii = tl.where(rc[None, :] == j, col[:, None], a_ii)
        if BONUS:  # the bonus's weight on the diagonal: q_t . (u o k_t)
            u = tl.load(u_ptr + h * DK + rk)
            a_ii += tl.where(rc[:, None] == rc[None, :], tl.sum(q_i * u[None, :] * k_i, axis=1)[:, None], 0.0)
        tl.store(a_base + (I * BC + rc)[:, None] * T + I * BC + rc[None, :], a_ii)


@triton.jit
def _chunk_out(q_ptr, v_ptr, c_ptr, g_ptr, a_ptr, states_ptr, o_ptr, scale, Lp, H, n_chunks,
               DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BV: tl.constexpr, BONUS: tl.constexpr,
               PREC: tl.constexpr):  # fmt: skip
    """``o = s (q e^{c^q} S_in + A v)`` for one chunk and one block of value columns."""
    ci, bh, pv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    rk, rv, rt = tl.arange(0, DK), pv * BV + tl.arange(0, BV), tl.arange(0, T)
    rows = (b * Lp + ci * T + rt) * H + h
    q = tl.load(q_ptr + rows[:, None] * DK + rk[None, :]).to(tl.float32)
    cq = tl.load(c_ptr + rows[:, None] * DK + rk[None, :])
    if BONUS:
        cq -= tl.load(g_ptr + rows[:, None] * DK + rk[None, :]).to(tl.float32)
    S = tl.load(states_ptr + (bh * (n_chunks + 1) + ci) * DK * DV + rk[:, None] * DV + rv[None, :])
    A = tl.load(a_ptr + (bh * n_chunks + ci) * T * T + rt[:, None] * T + rt[None, :])
    v = tl.load(v_ptr + rows[:, None] * DV + rv[None, :]).to(tl.float32)
    o = _dot(q * tl.exp(cq), S, PREC) + _dot(A, v, PREC)
    tl.store(o_ptr + rows[:, None] * DV + rv[None, :], (scale * o).to(o_ptr.dtype.element_ty))


@triton.jit
def _dstate_pass(q_ptr, do_ptr, g_ptr, dsl_ptr, dstates_ptr, ds0_ptr, scale, Lp, H, n_chunks,
                 DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 BONUS: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    r"""The state's gradient, chunks in reverse: saves :math:`\bar S_\text{out}` of each chunk, then
    :math:`\bar S_\text{in} = \mathrm{Diag}(e^{c_\text{last}})\bar S_\text{out} + s\,(q\circ e^{c^q})^\top do`."""
    bh, pk, pv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    rk, rv, rt = pk * BK + tl.arange(0, BK), pv * BV + tl.arange(0, BV), tl.arange(0, T)
    s_off = rk[:, None] * DV + rv[None, :]
    dS = tl.load(dsl_ptr + bh * DK * DV + s_off)
    for i in range(n_chunks):
        ci = n_chunks - 1 - i
        tl.store(dstates_ptr + (bh * n_chunks + ci) * DK * DV + s_off, dS)
        rows = (b * Lp + ci * T + rt) * H + h
        q = tl.load(q_ptr + rows[:, None] * DK + rk[None, :]).to(tl.float32)
        do = tl.load(do_ptr + rows[:, None] * DV + rv[None, :]).to(tl.float32)
        g = tl.load(g_ptr + rows[:, None] * DK + rk[None, :]).to(tl.float32)
        c = tl.cumsum(g, axis=0)
        c_last = _last_row(c, rt, T)
        if BONUS:
            cq = c - g
        else:
            cq = c
        dS = tl.exp(c_last)[:, None] * dS + scale * _dot(tl.trans(q * tl.exp(cq)), do, PREC)
    tl.store(ds0_ptr + bh * DK * DV + s_off, dS)


@triton.jit
def _chunk_dv(k_ptr, v_ptr, do_ptr, c_ptr, a_ptr, dstates_ptr, dv_ptr, da_ptr, scale, Lp, H, n_chunks,
              DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    r"""One chunk: :math:`dv = s A^\top do + (k \circ e^{c_\text{last} - c})\,\bar S_\text{out}` and the weights'
    gradient :math:`dA = s\, do\, v^\top` (lower triangle, diagonal included), value blocks in a loop."""
    ci, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rk, rt = tl.arange(0, DK), tl.arange(0, T)
    rows = (b * Lp + ci * T + rt) * H + h
    k = tl.load(k_ptr + rows[:, None] * DK + rk[None, :]).to(tl.float32)
    c = tl.load(c_ptr + rows[:, None] * DK + rk[None, :])
    c_last = tl.load(c_ptr + ((b * Lp + ci * T + T - 1) * H + h) * DK + rk)
    k_end = k * tl.exp(c_last[None, :] - c)
    tile = (bh * n_chunks + ci) * T * T + rt[:, None] * T + rt[None, :]
    A = tl.load(a_ptr + tile)
    dA = tl.zeros([T, T], dtype=tl.float32)
    for pv in tl.static_range(DV // BV):
        rv = pv * BV + tl.arange(0, BV)
        do = tl.load(do_ptr + rows[:, None] * DV + rv[None, :]).to(tl.float32)
        v = tl.load(v_ptr + rows[:, None] * DV + rv[None, :]).to(tl.float32)
        dS = tl.load(dstates_ptr + (bh * n_chunks + ci) * DK * DV + rk[:, None] * DV + rv[None, :])
        dA += _dot(do, tl.trans(v), PREC)
        dv = scale * _dot(tl.trans(A), do, PREC) + _dot(k_end, dS, PREC)
        tl.store(dv_ptr + rows[:, None] * DV + rv[None, :], dv.to(dv_ptr.dtype.element_ty))
    tl.store(da_ptr + tile, tl.where(rt[:, None] >= rt[None, :], scale * dA, 0.0))


@triton.jit
def _chunk_dqk(q_ptr, k_ptr, v_ptr, do_ptr, c_ptr, g_ptr, u_ptr, states_ptr, dstates_ptr, da_ptr,
               dq_ptr, dk_ptr, dg_ptr, du_ptr, scale, Lp, H, n_chunks,
               DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, BONUS: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """dq, dk and the log-gates' gradient of one chunk and one block of key channels, sub-chunk by sub-chunk
    from the last."""
    ci, bh, pk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    NC: tl.constexpr = T // BC
    rc, rk = tl.arange(0, BC), pk * BK + tl.arange(0, BK)
    t0 = b * Lp + ci * T
    st_base = (bh * (n_chunks + 1) + ci) * DK * DV  # states: n_chunks + 1 per (batch, head)
    ds_base = (bh * n_chunks + ci) * DK * DV  # their gradients: n_chunks
    da_base = da_ptr + (bh * n_chunks + ci) * T * T
    c_last = tl.load(c_ptr + ((t0 + T - 1) * H + h) * DK + rk)
    # The log-gate's gradient at the chunk's last step, from the recurrence S_t = Diag(e^{g_t}) S_{t-1} + k_t v_t^T:
    # d/dg_t = rowsum(e^{g_t} S_{t-1} o dS_t) with e^{g_t} S_{t-1} = S_out - k_t v_t^T and dS_t the whole gradient
    # of the state after step t: dS_out, plus s q_t do_t^T where the query reads that state (no bonus).
    row_l = (t0 + T - 1) * H + h
    q_l = tl.load(q_ptr + row_l * DK + rk).to(tl.float32)
    k_l = tl.load(k_ptr + row_l * DK + rk).to(tl.float32)
    d_last = tl.zeros([BK], dtype=tl.float32)
    v_do = 0.0
    for pv in tl.static_range(DV // BV):
        rv = pv * BV + tl.arange(0, BV)
        s_tile = rk[:, None] * DV + rv[None, :]
        s_out = tl.load(states_ptr + st_base + DK * DV + s_tile)  # the next chunk's entering state, or the final
        ds_out = tl.load(dstates_ptr + ds_base + s_tile)
        v_l = tl.load(v_ptr + row_l * DV + rv).to(tl.float32)
        d_last += tl.sum(s_out * ds_out, axis=1) - k_l * tl.sum(ds_out * v_l[None, :], axis=1)
        if not BONUS:
            do_l = tl.load(do_ptr + row_l * DV + rv).to(tl.float32)
            d_last += scale * q_l * tl.sum(s_out * do_l[None, :], axis=1)
            v_do += tl.sum(v_l * do_l)
    if not BONUS:
        d_last -= scale * q_l * k_l * v_do
    # the gradient at step t is d_last plus the sum of b_x's shares over t <= x < T - 1 (see the module docstring)
    shift = d_last  # becomes d_last minus the last step's share, in the first sub-chunk done
    carry = tl.zeros([BK], dtype=tl.float32)  # the shares summed over the later sub-chunks
    du = tl.zeros([BK], dtype=tl.float32)
    for X in tl.static_range(NC - 1, -1, -1):  # sub-chunks from the last
        rows = (t0 + X * BC + rc) * H + h
        kd_off = rows[:, None] * DK + rk[None, :]
        q = tl.load(q_ptr + kd_off).to(tl.float32)
        k = tl.load(k_ptr + kd_off).to(tl.float32)
        c = tl.load(c_ptr + kd_off)
        if BONUS:
            cq = c - tl.load(g_ptr + kd_off).to(tl.float32)
        else:
            cq = c
        # 1. through the states: dq = s e^{c^q} (do S_in^T), dk = e^{c_last - c} (v dS_out^T)
        dq = tl.zeros([BC, BK], dtype=tl.float32)
        dk = tl.zeros([BC, BK], dtype=tl.float32)
        for pv in tl.static_range(DV // BV):
            rv = pv * BV + tl.arange(0, BV)
            do = tl.load(do_ptr + rows[:, None] * DV + rv[None, :]).to(tl.float32)
            v = tl.load(v_ptr + rows[:, None] * DV + rv[None, :]).to(tl.float32)
            s_tile = rk[:, None] * DV + rv[None, :]
            dq += _dot(do, tl.trans(tl.load(states_ptr + st_base + s_tile)), PREC)
            dk += _dot(v, tl.trans(tl.load(dstates_ptr + ds_base + s_tile)), PREC)
        dq *= scale * tl.exp(cq)
        dk *= tl.exp(c_last[None, :] - c)
        # 2. earlier sub-chunks' keys (for dq) and later sub-chunks' queries (for dk): matrix products with the
        # exponent split at a step between the two sub-chunks (before this one, or its end), both factors <= 1
        if X > 0:
            ref = tl.load(c_ptr + ((t0 + X * BC - 1) * H + h) * DK + rk)
        else:
            ref = tl.zeros([BK], dtype=tl.float32)
        acc = tl.zeros([BC, BK], dtype=tl.float32)
        for J in tl.static_range(X):
            rows_j = (t0 + J * BC + rc) * H + h
            k_j = tl.load(k_ptr + rows_j[:, None] * DK + rk[None, :]).to(tl.float32)
            c_j = tl.load(c_ptr + rows_j[:, None] * DK + rk[None, :])
            da = tl.load(da_base + (X * BC + rc)[:, None] * T + J * BC + rc[None, :])
            acc += _dot(da, k_j * tl.exp(ref[None, :] - c_j), PREC)
        dq += acc * tl.exp(cq - ref[None, :])
        c_end = tl.load(c_ptr + ((t0 + X * BC + BC - 1) * H + h) * DK + rk)
        if X < NC - 1:
            acc = tl.zeros([BC, BK], dtype=tl.float32)
            for I in tl.static_range(X + 1, NC):
                rows_i = (t0 + I * BC + rc) * H + h
                q_i = tl.load(q_ptr + rows_i[:, None] * DK + rk[None, :]).to(tl.float32)
                cq_i = tl.load(c_ptr + rows_i[:, None] * DK + rk[None, :])
                if BONUS:
                    cq_i -= tl.load(g_ptr + rows_i[:, None] * DK + rk[None, :]).to(tl.float32)
                da = tl.load(da_base + (I * BC + rc)[:, None] * T + X * BC + rc[None, :])
                acc += _dot(tl.trans(da), q_i * tl.exp(cq_i - c_end[None, :]), PREC)
            dk += acc * tl.exp(c_end[None, :] - c)
        # 3. the diagonal block: matrix products with the split at the step before it where the sub-chunk's decay
        # stays within e^{-SPAN} (as in _intra_weights), else one key column j at a time
        if tl.max(ref - c_end, axis=0) <= SPAN:
            da = tl.load(da_base + (X * BC + rc)[:, None] * T + X * BC + rc[None, :])
            if BONUS:
                da = tl.where(rc[:, None] > rc[None, :], da, 0.0)
            dq += _dot(da, k * tl.exp(ref[None, :] - c), PREC) * tl.exp(cq - ref[None, :])
            dk += _dot(tl.trans(da), q * tl.exp(cq - ref[None, :]), PREC) * tl.exp(ref[None, :] - c)
        else:
            for j in range(BC):
                row_j = (t0 + X * BC + j) * H + h
                k_col = tl.load(k_ptr + row_j * DK + rk).to(tl.float32)
                c_col = tl.load(c_ptr + row_j * DK + rk)
                da_j = tl.load(da_base + (X * BC + rc) * T + X * BC + j)  # dA[:, j] in this block
                if BONUS:
                    causal = rc > j
                else:
                    causal = rc >= j
                E = tl.exp(tl.where(causal[:, None], cq - c_col[None, :], float("-inf")))
                dq += da_j[:, None] * k_col[None, :] * E
                dk += tl.where(rc[:, None] == j, tl.sum(da_j[:, None] * q * E, axis=0)[None, :], 0.0)
        # 4. the log-gates: b_x appears with + in the queries' exponents, with - in the keys'
        db = q * dq - k * dk
        if BONUS:  # the query's exponent is b_{t-1}: its own step's share is not in the sum
            own = q * dq
        else:
            own = tl.zeros([BC, BK], dtype=tl.float32)
        suffix = carry[None, :] + tl.sum(db, axis=0)[None, :] - tl.cumsum(db, axis=0) + db  # over steps >= t
        carry += tl.sum(db, axis=0)
        shift += tl.sum(tl.where((X * BC + rc == T - 1)[:, None], own - db, 0.0), axis=0)
        dg = shift[None, :] + suffix - own
        if BONUS:
            # the bonus's diagonal term s (q_t . (u o k_t)) v_t: no gate in it
            da_tt = tl.load(da_base + (X * BC + rc) * (T + 1))
            u = tl.load(u_ptr + h * DK + rk)
            dq += da_tt[:, None] * u[None, :] * k
            dk += da_tt[:, None] * u[None, :] * q
            du += tl.sum(da_tt[:, None] * q * k, axis=0)
        tl.store(dq_ptr + kd_off, dq.to(dq_ptr.dtype.element_ty))
        tl.store(dk_ptr + kd_off, dk.to(dk_ptr.dtype.element_ty))
        tl.store(dg_ptr + kd_off, dg.to(dg_ptr.dtype.element_ty))
    if BONUS:
        tl.store(du_ptr + ((b * n_chunks + ci) * H + h) * DK + rk, du)


def _tiles(DK, DV):
    """Tile sizes of each pass (key block, value block) and its warps."""
    return dict(state=(min(DK, 64), min(DV, 32), 4), intra=4, out=(min(DV, 64), 4), dv=(min(DV, 64), 8),
                dqk=(min(DK, 64), min(DV, 64), 4))


class GLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_alpha, S0, scale, bonus):
        B, L, H, DK = q.shape
        DV = v.shape[-1]
        T, n = CHUNK, triton.cdiv(L, CHUNK)
        Lp = n * T
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        tiles = _tiles(DK, DV)
        qp, kp, vp, g = pad_to(q, Lp), pad_to(k, Lp), pad_to(v, Lp), pad_to(log_alpha, Lp)
        c = torch.empty(B, Lp, H, DK, dtype=torch.float32, device=q.device)
        states = torch.empty(B * H, n + 1, DK, DV, dtype=torch.float32, device=q.device)  # + the final state
        s0 = S0.float().contiguous() if S0 is not None else states
        BK, BV, warps = tiles["state"]
        _state_pass[(B * H, DK // BK, DV // BV)](kp, vp, g, c, s0, states, Lp, H, n, DK=DK, DV=DV, T=T, BK=BK,
                                                 BV=BV, HAS_S0=S0 is not None, PREC=prec, num_warps=warps)  # fmt: skip
        u = bonus.float().contiguous() if bonus is not None else c
        A = torch.empty(B * H, n, T, T, dtype=torch.float32, device=q.device)
        _intra_weights[(n, B * H)](qp, kp, c, g, u, A, Lp, H, DK=DK, T=T, BC=SUB_CHUNK, BONUS=bonus is not None,
                                   PREC=prec, num_warps=tiles["intra"])  # fmt: skip
        o = torch.empty(B, Lp, H, DV, dtype=q.dtype, device=q.device)
        BV, warps = tiles["out"]
        _chunk_out[(n, B * H, DV // BV)](qp, vp, c, g, A, states, o, scale, Lp, H, n, DK=DK, DV=DV, T=T, BV=BV,
                                         BONUS=bonus is not None, PREC=prec, num_warps=warps)  # fmt: skip
        ctx.save_for_backward(qp, kp, vp, g, c, u, A, states)
        ctx.scale, ctx.L, ctx.has_s0, ctx.has_bonus = scale, L, S0 is not None, bonus is not None
        ctx.dtypes = (log_alpha.dtype, None if S0 is None else S0.dtype, None if bonus is None else bonus.dtype)
        return o[:, :L], states[:, n].view(B, H, DK, DV).clone()

    @staticmethod
    def backward(ctx, do, dS_final):
        qp, kp, vp, g, c, u, A, states = ctx.saved_tensors
        B, Lp, H, DK = qp.shape
        DV, T, L, scale, bonus = vp.shape[-1], CHUNK, ctx.L, ctx.scale, ctx.has_bonus
        n = Lp // T
        prec = "ieee" if qp.dtype == torch.float32 else "tf32"
        tiles = _tiles(DK, DV)
        dop = pad_to(do if do is not None else torch.zeros(B, L, H, DV, dtype=vp.dtype, device=vp.device), Lp)
        dsl = (dS_final if dS_final is not None else torch.zeros(B, H, DK, DV, device=qp.device)).float().contiguous()
        dstates, dS0 = torch.empty(B * H, n, DK, DV, dtype=torch.float32, device=qp.device), torch.empty_like(dsl)
        BK, BV, warps = tiles["state"]
        _dstate_pass[(B * H, DK // BK, DV // BV)](qp, dop, g, dsl, dstates, dS0, scale, Lp, H, n, DK=DK, DV=DV, T=T,
                                                  BK=BK, BV=BV, BONUS=bonus, PREC=prec, num_warps=warps)  # fmt: skip
        dv = torch.empty_like(vp)
        dA = torch.empty_like(A)
        BV, warps = tiles["dv"]
        _chunk_dv[(n, B * H)](kp, vp, dop, c, A, dstates, dv, dA, scale, Lp, H, n, DK=DK, DV=DV, T=T, BV=BV, PREC=prec,
                              num_warps=warps)  # fmt: skip
        dq, dk = torch.empty_like(qp), torch.empty_like(kp)
        dg = torch.empty_like(g)
        du = torch.empty(B, n, H, DK, dtype=torch.float32, device=qp.device) if bonus else dg
        BK, BV, warps = tiles["dqk"]
        _chunk_dqk[(n, B * H, DK // BK)](qp, kp, vp, dop, c, g, u, states, dstates, dA, dq, dk, dg, du, scale,
                                         Lp, H, n, DK=DK, DV=DV, T=T, BC=SUB_CHUNK, BK=BK, BV=BV, BONUS=bonus,
                                         PREC=prec, num_warps=warps)  # fmt: skip
        _, s0_dt, u_dt = ctx.dtypes
        return (dq[:, :L], dk[:, :L], dv[:, :L], dg[:, :L], dS0.to(s0_dt) if ctx.has_s0 else None, None,
                du.sum((0, 1)).to(u_dt) if bonus else None)  # fmt: skip


def gla(q, k, v, log_alpha, initial_state=None, scale=None, bonus=None):
    """``(o, final_state)``; shapes as in :func:`seqbook.linear_attention.gla`; d_k, d_v in 16..128, powers of two."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return GLA.apply(q, k, v, log_alpha, initial_state, scale, bonus)
