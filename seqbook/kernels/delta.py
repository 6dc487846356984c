r"""Triton kernel: the delta rule by chunks (the WY representation), forward and backward.

The readable form is :func:`seqbook.linear_attention.delta_rule_chunked`; read it first. This
module has the signature ``delta_rule(q, k, v, beta, initial_state, scale) -> (o, final_state)``
behind a :class:`torch.autograd.Function`.

Design
------
Chunks of ``T = 64`` steps (inputs padded with ``beta = 0`` steps, which change nothing). The work
that does not depend on the state entering a chunk is done for all chunks at once; only a thin
pass over chunks stays sequential. Per chunk, with :math:`K, V` its rows and :math:`S` the state
``(d_k, d_v)`` entering it:

1. ``_wy_fwd`` (all chunks in parallel): :math:`A = \mathrm{tril}_{-1}(\mathrm{Diag}(\beta) K K^\top)`,
   :math:`T = (I + A)^{-1}` (``_unit_lower_inverse_doubling``), the WY representation
   :math:`W = T\,\mathrm{Diag}(\beta) K` and :math:`\tilde U = T\,\mathrm{Diag}(\beta) V`.
2. ``_state_fwd`` (one program per (batch, head, ``BV`` value columns): the transition
   :math:`I - \beta k k^\top` mixes rows of the state, never its columns) walks the chunks in order:
   saves :math:`S`, then :math:`U = \tilde U - W S` (the pseudo-values) and
   :math:`S \leftarrow S + K^\top U`. Two matrix products per chunk.
3. ``_out_fwd`` (all chunks in parallel): :math:`o = s\,(Q S + \mathrm{tril}(Q K^\top)\, U)`.

The inverse of the unit lower triangular :math:`I + A` (64 by 64) is built by doubling the
diagonal blocks (``_unit_lower_inverse_doubling``). Let :math:`D_s` be the block-diagonal matrix of
the inverses of the diagonal :math:`(s, s)` blocks of :math:`I + A`, so :math:`D_1 = I` and
:math:`D_{64} = T`. A diagonal block of :math:`2s` rows is :math:`\begin{pmatrix} I + A_{11} & 0 \\ A_{21} &
I + A_{22}\end{pmatrix}` with inverse :math:`\begin{pmatrix} D_1 & 0 \\ -D_2 A_{21} D_1 & D_2\end{pmatrix}`, for
every such block at once

.. math::

    D_{2s} = D_s - D_s\, A_s\, D_s,

with :math:`A_s` the entries of :math:`A` inside the diagonal blocks of :math:`2s` rows and outside those
of :math:`s` rows. :math:`D_2 = I - A_1` needs no product; :math:`D_4 \dots D_{64}` take two (64, 64)
products each (tensor cores), ten in all, a chain of ten dependent steps. Every intermediate is a
block of :math:`T` itself, so nothing grows larger than the inverse does (a product form such as
:math:`(I - A)(I + A^2)(I + A^4)\cdots` takes as few steps, but its powers of :math:`A` grow large for
repeated keys, and so do their rounding errors). Forward substitution by blocks of 16 rows
(``_unit_lower_inverse``: the four diagonal blocks at once on a ``(4, 16, 16)`` stack, 15 dependent
elementwise steps, then block row :math:`b` as :math:`T_b = D_b (I - L_b T)`) was this kernel's inverse
before 2026-12-03 and lost to the doubling on the H200 (below); the RWKV-7 kernel uses it
(:mod:`seqbook.kernels.rwkv7`).

The backward, with :math:`\bar S` the gradient of the state leaving a chunk:

4. ``_dv_local`` (parallel): :math:`\partial U \mathrel{+}= s\, M^\top do`, :math:`M = \mathrm{tril}(QK^\top)`.
5. ``_state_bwd`` (per value block, chunks in reverse; each chunk's share of :math:`\partial U` from
   step 4 loaded one step ahead): saves :math:`\bar S`, then
   :math:`\partial U \mathrel{+}= K \bar S` and :math:`\bar S \leftarrow \bar S + s\,Q^\top do - W^\top \partial U`.
6. ``_bwd_chunk`` (parallel, one program per chunk for this step and the next, so that
   :math:`\partial K, \partial W` stay in registers):
   :math:`\partial M = s\,\mathrm{tril}(do\, U^\top)`,
   :math:`\partial Q = \partial M K + s\, do\, S^\top`,
   :math:`\partial K = \partial M^\top Q + U \bar S^\top` (so far), :math:`\partial W = -\partial U S^\top`.
7. (the same program) through :math:`X = T Y` for :math:`(W, \mathrm{Diag}(\beta)K)` and
   :math:`(\tilde U, \mathrm{Diag}(\beta)V)`: :math:`\partial Y = T^\top \partial X`,
   :math:`\partial A = -\partial Y X^\top` on the strictly lower triangle, and from
   :math:`A = \mathrm{Diag}(\beta)\,\mathrm{tril}_{-1}(KK^\top)`:
   :math:`\partial\beta_i \mathrel{+}= \sum_j \partial A_{ij} (KK^\top)_{ij}`,
   :math:`\partial K \mathrel{+}= (G + G^\top) K` with :math:`G = \mathrm{Diag}(\beta)\,\partial A`.

Precision: the state and its gradient inside the passes, and every accumulation, in float32. Matrix
products take their operands in the inputs' dtype (bfloat16/float16 operands on tensor cores, as
flash-linear-attention does), so what is only ever such an operand is stored in that dtype: the
chunks' inverses :math:`T`, :math:`W, \tilde U, U`, the states saved at chunk boundaries and their
gradients, :math:`\partial U, \partial W`. For float32 inputs every product is exact float32
(``input_precision="ieee"``); the inverse is computed in float32 (its block products in TF32 for
16-bit inputs, whose products round :math:`T` to 16 bits afterwards anyway).

Measured (H200, GPU call 2, ``triton.testing.do_bench`` medians, B=4, L=4096, H=32, d=64 bf16):
forward 0.73 ms, forward+backward 1.85 ms (``_wy_fwd`` 483 us, steps 7 and 6 as two kernels 363 and 272,
``_state_bwd`` 242, ``_state_fwd`` 147, ``_out_fwd`` 100, ``_dv_local`` 84, torch's casts of the
gradients to bfloat16 142), errors against the float64 recurrence 4e-3 to 6e-3 of the largest
value on the output, the final state and every gradient. That was before the stacked diagonal
blocks, the fused backward and the intermediates and gradients stored in the inputs' dtype: the
current version ran on the H200 in GPU call 3 with the same errors at that shape (4e-3 to 6e-3),
but its timing did not finish inside that call's time limit; fla's
``chunk_delta_rule`` was not timed in that call, nor was B=1, L=16384, H=16, d=128. The previous
kernel (one program per (batch, head) walking chunks of 16 with the WY step inside the walk) took
10.6 ms forward and 92 ms forward+backward at the first shape (GPU call 1).

Before the doubling inverse (with the forward substitution by blocks, "stacked"), on the H200 of
2026-12-02 (``benchmarks.profile``, 5 runs): forward 690 us at d=64 (``_wy_fwd`` 472, ``_state_fwd`` 127,
``_out_fwd`` 87) and 753 us at B=1, L=16384, H=16, d=128 (``_state_fwd`` 337, ``_wy_fwd`` 276, ``_out_fwd``
137); forward+backward at d=128 2060 us. fla's ``chunk_delta_rule``: 0.675 / 0.679 ms forward.

GPU call 2 of 2026-12-03 (H200, bf16, do_bench medians, variants interleaved with the default; errors against
float64 4e-3 to 6e-3 of max for every variant): the doubling inverse takes the forward to 0.512 ms at d=64
(stacked 0.697) and 0.666 at d=128 (stacked 0.761; ``_wy_fwd`` 286 / 181 us against 472 / 276),
forward+backward 1.112 / 1.792 ms; ``_state_bwd`` loading step 4's share one step ahead 1.792 against 1.962 ms
without at d=128 (``_state_bwd`` 412 against 583 us). Three pipeline stages in the passes over chunks
(``STATE_STAGES``, was 2): forward 0.479 / 0.535 ms, forward+backward 1.044 / 1.539 ms (four: 0.498 / 0.523,
1.146 / 1.564). Slower and left at their defaults: 8 warps in ``_wy_fwd`` (0.82 / 0.88 ms) or the walk (0.72),
``OUT_BLOCK_V`` 128 (0.64 at d=128 with 2 stages, untried with 3), ``BWD_BLOCK_V`` 16 (1.94). Removed after
that call, as losers: the stacked forward substitution as ``_wy_fwd``'s inverse (and its variant with the
diagonal blocks by (64, 64) products, not timed in that call), steps 6 and 7 as two kernels passing
:math:`\partial K, \partial W` through memory (1.93 against 1.79 ms forward+backward at d=128), ``_state_bwd``
without the load ahead (1.96 against 1.79).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunked_state import pad_to

#: steps per chunk
CHUNK = 64
#: rows per diagonal block of the inverse by forward substitution (``_unit_lower_inverse``, used by rwkv7)
SUB = 16
#: warps per program of ``_wy_fwd``
WY_WARPS = 4
#: warps and pipeline stages of the passes over chunks (``_state_fwd``, ``_state_bwd``; 3 stages: module docstring)
STATE_WARPS, STATE_STAGES = 4, 3
#: value columns per program and warps of ``_out_fwd``
OUT_BLOCK_V, OUT_WARPS = 64, 4
#: value columns per step and warps of the backward's per-chunk kernels; None: 64 and 4 warps for d_k <= 64,
#: else 32 and 8 warps
BWD_BLOCK_V, BWD_WARPS = None, None
#: value columns per program of the passes over chunks (16 or 32); None: chosen from the shape
STATE_BLOCK_V = None


def _state_block_v(BH, DV):
    """Value columns per program of the passes over chunks: ``STATE_BLOCK_V`` if set, else 32, or 16 when
    32 leaves too few programs to fill the GPU's 132 SMs (B=1, H=16, d_v=128: 64 programs of 32 columns)."""
    if STATE_BLOCK_V is not None:
        return min(DV, STATE_BLOCK_V)
    return min(DV, 32 if BH * triton.cdiv(DV, 32) >= 256 else 16)


@triton.jit
def _diagonal_block_inverses(A, BT: tl.constexpr, SUB: tl.constexpr):
    """The inverses of the diagonal (SUB, SUB) blocks of I + A, as a block-diagonal (BT, BT) matrix: the
    blocks as a (BT / SUB, SUB, SUB) stack, forward substitution on all of them at once, in float32."""
    NB: tl.constexpr = BT // SUB
    rb, ri = tl.arange(0, NB), tl.arange(0, SUB)
    same = rb[:, None, None, None] == rb[None, None, :, None]  # (NB, 1, NB, 1): block b, block b'
    # A4[b, i, b', l] = A[SUB b + i, SUB b' + l]; keep b' = b
    A3 = tl.sum(tl.where(same, tl.reshape(A, (NB, SUB, NB, SUB)), 0.0), axis=2)  # (NB, SUB, SUB)
    D3 = tl.zeros([NB, SUB, SUB], dtype=tl.float32) + tl.where(ri[:, None] == ri[None, :], 1.0, 0.0)[None, :, :]
    for i in range(1, SUB):  # row i of every block: e_i - sum_{l < i} A[i, l] D[l, :]
        row = (ri == i)[None, :, None]
        a_i = tl.sum(tl.where(row, A3, 0.0), axis=1)  # (NB, SUB)
        D3 -= tl.where(row, tl.sum(a_i[:, :, None] * D3, axis=1)[:, None, :], 0.0)
    return tl.reshape(tl.where(same, D3[:, :, None, :], 0.0), (BT, BT))


@triton.jit
def _unit_lower_inverse(A, rt, BT: tl.constexpr, SUB: tl.constexpr, PREC: tl.constexpr):
    """(I + A)^{-1} for A (BT, BT) strictly lower triangular, float32: forward substitution by
    blocks of SUB rows (module docstring; the RWKV-7 kernel's inverse)."""
    eye = tl.where(rt[:, None] == rt[None, :], 1.0, 0.0)
    blk = rt // SUB
    A_diag = tl.where(blk[:, None] == blk[None, :], A, 0.0)  # the diagonal blocks
    A_left = A - A_diag  # the blocks left of the diagonal
    # 1. the diagonal blocks' inverses, all at once, as a stack of (SUB, SUB) blocks
    D = _diagonal_block_inverses(A_diag, BT, SUB)
    # 2. block row b from the block rows above it: T_b = D_b (I - A_left,b T)
    Tinv = D
    for bi in range(1, BT // SUB):
        new = tl.dot(D, eye - tl.dot(A_left, Tinv, input_precision=PREC), input_precision=PREC)
        Tinv = tl.where((blk == bi)[:, None], new, Tinv)
    return Tinv


@triton.jit
def _unit_lower_inverse_doubling(A, rt, LOG2_BT: tl.constexpr, PREC: tl.constexpr):
    """(I + A)^{-1} for A (BT, BT) strictly lower triangular, float32, by doubling the diagonal
    blocks: with D_s the block-diagonal matrix of the inverses of the diagonal (s, s) blocks of I + A,
    D_1 = I and D_2s = D_s - D_s A_s D_s, where A_s holds the entries of A inside a diagonal block of
    2s rows and outside the diagonal blocks of s rows (module docstring). log2(BT) - 1 steps of two
    products each, every intermediate a block of the inverse itself."""
    D = tl.where(rt[:, None] == rt[None, :], 1.0, 0.0) - tl.where((rt[:, None] >> 1) == (rt[None, :] >> 1), A, 0.0)  # D_2
    for lvl in tl.static_range(1, LOG2_BT):  # s = 2^lvl = 2, 4, ..., BT / 2
        A_s = tl.where(((rt[:, None] >> (lvl + 1)) == (rt[None, :] >> (lvl + 1))) & ((rt[:, None] >> lvl) != (rt[None, :] >> lvl)),
                       A, 0.0)  # fmt: skip
        D -= tl.dot(D, tl.dot(A_s, D, input_precision=PREC), input_precision=PREC)
    return D


@triton.jit
def _chunk_rows(Lp, H, BT: tl.constexpr):
    """For a program on the grid (chunk, batch * heads): chunk, bh, rt (BT,) and the rows of the
    (batch * Lp * heads) row-major inputs that hold this chunk's steps."""
    ci, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rt = tl.arange(0, BT)
    return ci, bh, rt, (b * Lp + ci * BT + rt) * H + h


@triton.jit
def _wy_fwd(k_ptr, v_ptr, b_ptr, w_ptr, u_ptr, tinv_ptr, Lp, H, n_chunks, DK: tl.constexpr, DV: tl.constexpr,
            BT: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, INV_PREC: tl.constexpr,
            LOG2_BT: tl.constexpr):  # fmt: skip
    ci, bh, rt, rows = _chunk_rows(Lp, H, BT)
    rk = tl.arange(0, DK)
    k = tl.load(k_ptr + rows[:, None] * DK + rk[None, :])
    dt = k.dtype
    beta = tl.load(b_ptr + rows)
    A = tl.where(rt[:, None] > rt[None, :], beta[:, None] * tl.dot(k, tl.trans(k), input_precision=PREC), 0.0)
    Tinv = _unit_lower_inverse_doubling(A, rt, LOG2_BT, INV_PREC)
    tl.store(tinv_ptr + (bh * n_chunks + ci) * BT * BT + rt[:, None] * BT + rt[None, :], Tinv.to(tinv_ptr.dtype.element_ty))
    Tc = Tinv.to(dt)
    W = tl.dot(Tc, (beta[:, None] * k.to(tl.float32)).to(dt), input_precision=PREC)
    tl.store(w_ptr + rows[:, None] * DK + rk[None, :], W.to(dt))
    for v0 in range(0, DV, BV):
        rv = v0 + tl.arange(0, BV)
        v = tl.load(v_ptr + rows[:, None] * DV + rv[None, :]).to(tl.float32)
        U = tl.dot(Tc, (beta[:, None] * v).to(dt), input_precision=PREC)
        tl.store(u_ptr + rows[:, None] * DV + rv[None, :], U.to(dt))


@triton.jit
def _state_fwd(k_ptr, w_ptr, u_ptr, s0_ptr, states_ptr, vn_ptr, final_ptr, Lp, H, n_chunks, DK: tl.constexpr,
               DV: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    bh, pid_v = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rk, rv, rt = tl.arange(0, DK), pid_v * BV + tl.arange(0, BV), tl.arange(0, BT)
    s_off = rk[:, None] * DV + rv[None, :]
    if HAS_S0:
        S = tl.load(s0_ptr + bh * DK * DV + s_off).to(tl.float32)
    else:
        S = tl.zeros([DK, BV], dtype=tl.float32)
    for ci in range(n_chunks):
        tl.store(states_ptr + (bh * n_chunks + ci) * DK * DV + s_off, S.to(states_ptr.dtype.element_ty))
        rows = (b * Lp + ci * BT + rt) * H + h
        w = tl.load(w_ptr + rows[:, None] * DK + rk[None, :])
        dt = w.dtype
        u = tl.load(u_ptr + rows[:, None] * DV + rv[None, :]).to(tl.float32)
        vn = (u - tl.dot(w, S.to(dt), input_precision=PREC)).to(dt)  # the pseudo-values U = U~ - W S
        tl.store(vn_ptr + rows[:, None] * DV + rv[None, :], vn)
        k = tl.load(k_ptr + rows[:, None] * DK + rk[None, :])
        S += tl.dot(tl.trans(k), vn, input_precision=PREC)
    tl.store(final_ptr + bh * DK * DV + s_off, S)


@triton.jit
def _out_fwd(q_ptr, k_ptr, vn_ptr, states_ptr, o_ptr, scale, Lp, H, n_chunks, DK: tl.constexpr, DV: tl.constexpr,
             BT: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    ci, bh, rt, rows = _chunk_rows(Lp, H, BT)
    rk, rv = tl.arange(0, DK), tl.program_id(2) * BV + tl.arange(0, BV)
    q = tl.load(q_ptr + rows[:, None] * DK + rk[None, :])
    k = tl.load(k_ptr + rows[:, None] * DK + rk[None, :])
    dt = q.dtype
    M = tl.where(rt[:, None] >= rt[None, :], tl.dot(q, tl.trans(k), input_precision=PREC), 0.0)
    S = tl.load(states_ptr + (bh * n_chunks + ci) * DK * DV + rk[:, None] * DV + rv[None, :]).to(dt)
    vn = tl.load(vn_ptr + rows[:, None] * DV + rv[None, :])
    o = scale * (tl.dot(q, S, input_precision=PREC) + tl.dot(M.to(dt), vn, input_precision=PREC))
    tl.store(o_ptr + rows[:, None] * DV + rv[None, :], o.to(o_ptr.dtype.element_ty))


@triton.jit
def _dv_local(q_ptr, k_ptr, do_ptr, dvl_ptr, scale, Lp, H, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
              BV: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """dU's share from inside the chunk: s M^T do, M = tril(Q K^T)."""
    ci, bh, rt, rows = _chunk_rows(Lp, H, BT)
    rk, rv = tl.arange(0, DK), tl.program_id(2) * BV + tl.arange(0, BV)
    q = tl.load(q_ptr + rows[:, None] * DK + rk[None, :])
    k = tl.load(k_ptr + rows[:, None] * DK + rk[None, :])
    Mt = tl.where(rt[:, None] <= rt[None, :], tl.dot(k, tl.trans(q), input_precision=PREC), 0.0)  # M^T
    do = tl.load(do_ptr + rows[:, None] * DV + rv[None, :])
    dvl = scale * tl.dot(Mt.to(do.dtype), do, input_precision=PREC)
    tl.store(dvl_ptr + rows[:, None] * DV + rv[None, :], dvl.to(dvl_ptr.dtype.element_ty))


@triton.jit
def _state_bwd(q_ptr, k_ptr, w_ptr, do_ptr, dvl_ptr, dsl_ptr, dstates_ptr, dvn_ptr, ds0_ptr, scale, Lp, H, n_chunks,
               DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Each chunk's share of dU from inside it (``dvl``) is loaded one step ahead: it is added to a product's
    result, so the compiler makes it that product's accumulator, a plain load that its software pipelining
    does not prefetch, and the load would otherwise sit on the pass's dependent chain (1.96 against 1.79 ms
    forward+backward at d=128 on the H200, module docstring)."""
    bh, pid_v = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rk, rv, rt = tl.arange(0, DK), pid_v * BV + tl.arange(0, BV), tl.arange(0, BT)
    s_off = rk[:, None] * DV + rv[None, :]
    dS = tl.load(dsl_ptr + bh * DK * DV + s_off)  # the gradient of the state leaving the chunk
    dvl_next = tl.load(dvl_ptr + ((b * Lp + (n_chunks - 1) * BT + rt) * H + h)[:, None] * DV + rv[None, :])
    for cr in range(n_chunks):
        ci = n_chunks - 1 - cr
        tl.store(dstates_ptr + (bh * n_chunks + ci) * DK * DV + s_off, dS.to(dstates_ptr.dtype.element_ty))
        rows = (b * Lp + ci * BT + rt) * H + h
        dvl = dvl_next
        dvl_next = tl.load(dvl_ptr + ((b * Lp + tl.maximum(ci - 1, 0) * BT + rt) * H + h)[:, None] * DV + rv[None, :])
        k = tl.load(k_ptr + rows[:, None] * DK + rk[None, :])
        dt = k.dtype
        dvn = dvl.to(tl.float32) + tl.dot(k, dS.to(dt), input_precision=PREC)
        tl.store(dvn_ptr + rows[:, None] * DV + rv[None, :], dvn.to(dvn_ptr.dtype.element_ty))
        q = tl.load(q_ptr + rows[:, None] * DK + rk[None, :])
        w = tl.load(w_ptr + rows[:, None] * DK + rk[None, :])
        do = tl.load(do_ptr + rows[:, None] * DV + rv[None, :])
        dS += scale * tl.dot(tl.trans(q), do, input_precision=PREC) \
            - tl.dot(tl.trans(w), dvn.to(dt), input_precision=PREC)  # fmt: skip
    tl.store(ds0_ptr + bh * DK * DV + s_off, dS)


@triton.jit
def _qkw_grads(q_ptr, k_ptr, vn_ptr, do_ptr, states_ptr, dstates_ptr, dvn_ptr, scale, ci, bh, rt, rows, n_chunks,
               DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Step 6 for one chunk: dq, dk (so far) and dW, (BT, DK) each, float32."""
    rk = tl.arange(0, DK)
    q = tl.load(q_ptr + rows[:, None] * DK + rk[None, :])
    k = tl.load(k_ptr + rows[:, None] * DK + rk[None, :])
    dt = q.dtype
    s_base = (bh * n_chunks + ci) * DK * DV
    dM = tl.zeros([BT, BT], dtype=tl.float32)
    dq = tl.zeros([BT, DK], dtype=tl.float32)
    dk = tl.zeros([BT, DK], dtype=tl.float32)
    dw = tl.zeros([BT, DK], dtype=tl.float32)
    for v0 in range(0, DV, BV):  # the sums over value columns
        rv = v0 + tl.arange(0, BV)
        do = tl.load(do_ptr + rows[:, None] * DV + rv[None, :])
        vn = tl.load(vn_ptr + rows[:, None] * DV + rv[None, :])
        dvn = tl.load(dvn_ptr + rows[:, None] * DV + rv[None, :]).to(dt)
        St = tl.load(states_ptr + s_base + rk[None, :] * DV + rv[:, None]).to(dt)  # S^T, (BV, DK)
        dSt = tl.load(dstates_ptr + s_base + rk[None, :] * DV + rv[:, None]).to(dt)
        dM += tl.dot(do, tl.trans(vn), input_precision=PREC)
        dq += tl.dot(do, St, input_precision=PREC)
        dk += tl.dot(vn, dSt, input_precision=PREC)
        dw -= tl.dot(dvn, St, input_precision=PREC)
    dM = tl.where(rt[:, None] >= rt[None, :], scale * dM, 0.0).to(dt)
    dq = scale * dq + tl.dot(dM, k, input_precision=PREC)
    dk += tl.dot(tl.trans(dM), q, input_precision=PREC)
    return dq, dk, dw


@triton.jit
def _wy_grads(k_ptr, v_ptr, b_ptr, tinv_ptr, w_ptr, u_ptr, dvn_ptr, dv_ptr, db_ptr, dk, dw, ci, bh, rt, rows,
              n_chunks, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Step 7 for one chunk, from step 6's dk and dW: writes dv and dbeta, returns the final dk (float32)."""
    rk = tl.arange(0, DK)
    offs = rows[:, None] * DK + rk[None, :]
    k = tl.load(k_ptr + offs)
    dt = k.dtype
    beta = tl.load(b_ptr + rows)
    # T^T, (BT, BT), read transposed
    Tt = tl.load(tinv_ptr + (bh * n_chunks + ci) * BT * BT + rt[None, :] * BT + rt[:, None]).to(dt)
    # (W, diag(beta) K): dY = T^T dW
    dYk = tl.dot(Tt, dw.to(dt), input_precision=PREC)
    dA = tl.dot(dYk.to(dt), tl.trans(tl.load(w_ptr + offs)), input_precision=PREC)
    dk += beta[:, None] * dYk
    dbeta = tl.sum(dYk * k.to(tl.float32), axis=1)
    # (U~, diag(beta) V), by value blocks: dY = T^T dU
    for v0 in range(0, DV, BV):
        rv = v0 + tl.arange(0, BV)
        v_off = rows[:, None] * DV + rv[None, :]
        dYv = tl.dot(Tt, tl.load(dvn_ptr + v_off).to(dt), input_precision=PREC)
        tl.store(dv_ptr + v_off, (beta[:, None] * dYv).to(dv_ptr.dtype.element_ty))
        dbeta += tl.sum(dYv * tl.load(v_ptr + v_off).to(tl.float32), axis=1)
        dA += tl.dot(dYv.to(dt), tl.trans(tl.load(u_ptr + v_off)), input_precision=PREC)
    # A = diag(beta) tril_{-1}(K K^T)
    dA = tl.where(rt[:, None] > rt[None, :], -dA, 0.0)
    G = tl.dot(k, tl.trans(k), input_precision=PREC)
    dbeta += tl.sum(dA * G, axis=1)
    dG = beta[:, None] * dA
    dk += tl.dot((dG + tl.trans(dG)).to(dt), k, input_precision=PREC)
    tl.store(db_ptr + rows, dbeta)
    return dk


@triton.jit
def _bwd_chunk(q_ptr, k_ptr, v_ptr, b_ptr, vn_ptr, do_ptr, states_ptr, dstates_ptr, dvn_ptr, tinv_ptr, w_ptr, u_ptr,
               dq_ptr, dk_ptr, dv_ptr, db_ptr, scale, Lp, H, n_chunks, DK: tl.constexpr, DV: tl.constexpr,
               BT: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """Steps 6 and 7 in one program per chunk (dk and dW stay in registers)."""
    ci, bh, rt, rows = _chunk_rows(Lp, H, BT)
    offs = rows[:, None] * DK + tl.arange(0, DK)[None, :]
    dq, dk, dw = _qkw_grads(q_ptr, k_ptr, vn_ptr, do_ptr, states_ptr, dstates_ptr, dvn_ptr, scale, ci, bh, rt, rows,
                            n_chunks, DK, DV, BT, BV, PREC)  # fmt: skip
    tl.store(dq_ptr + offs, dq.to(dq_ptr.dtype.element_ty))
    dk = _wy_grads(k_ptr, v_ptr, b_ptr, tinv_ptr, w_ptr, u_ptr, dvn_ptr, dv_ptr, db_ptr, dk, dw, ci, bh, rt, rows,
                   n_chunks, DK, DV, BT, BV, PREC)  # fmt: skip
    tl.store(dk_ptr + offs, dk.to(dk_ptr.dtype.element_ty))


def _precisions(dtype):
    """(products of the inputs' dtype, products inside the inverse): exact float32 for float32 inputs."""
    return ("ieee", "ieee") if dtype == torch.float32 else ("tf32", "tf32")


def _warps(DK):
    return 4 if DK <= 64 else 8


class DeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, S0, scale):
        B, L, H, DK = q.shape
        DV = v.shape[-1]
        T = CHUNK
        n = triton.cdiv(L, T)
        Lp = n * T
        dev = q.device
        prec, inv_prec = _precisions(q.dtype)
        qp, kp, vp, bp = pad_to(q, Lp), pad_to(k, Lp), pad_to(v, Lp), pad_to(beta.float(), Lp)  # padded steps: beta = 0
        # 1. the WY representation of every chunk
        # what the kernels use only as operands of products is kept in the inputs' dtype
        Tinv = torch.empty(B * H, n, T, T, dtype=q.dtype, device=dev)
        W, U = torch.empty_like(kp), torch.empty_like(vp)
        BVw = min(DV, 64)
        _wy_fwd[(n, B * H)](kp, vp, bp, W, U, Tinv, Lp, H, n, DK=DK, DV=DV, BT=T, BV=BVw, PREC=prec,
                            INV_PREC=inv_prec, LOG2_BT=T.bit_length() - 1, num_warps=WY_WARPS)  # fmt: skip
        # 2. the pass over chunks
        BV = _state_block_v(B * H, DV)
        states = torch.empty(B * H, n, DK, DV, dtype=q.dtype, device=dev)
        final = torch.empty(B, H, DK, DV, dtype=torch.float32, device=dev)
        vn = torch.empty_like(vp)
        s0 = S0.float().contiguous() if S0 is not None else final
        _state_fwd[(B * H, triton.cdiv(DV, BV))](kp, W, U, s0, states, vn, final, Lp, H, n, DK=DK, DV=DV, BT=T, BV=BV,
                                                 HAS_S0=S0 is not None, PREC=prec, num_warps=STATE_WARPS,
                                                 num_stages=STATE_STAGES)  # fmt: skip
        # 3. the outputs
        o = torch.empty(B, Lp, H, DV, dtype=q.dtype, device=dev)
        BVo = min(DV, OUT_BLOCK_V)
        _out_fwd[(n, B * H, triton.cdiv(DV, BVo))](qp, kp, vn, states, o, scale, Lp, H, n, DK=DK, DV=DV, BT=T, BV=BVo,
                                                   PREC=prec, num_warps=OUT_WARPS)  # fmt: skip
        ctx.save_for_backward(qp, kp, vp, bp, Tinv, W, U, states, vn)
        ctx.scale, ctx.L, ctx.has_s0, ctx.dtypes = scale, L, S0 is not None, (beta.dtype, None if S0 is None else S0.dtype)
        return o[:, :L], final

    @staticmethod
    def backward(ctx, do, dS_final):
        qp, kp, vp, bp, Tinv, W, U, states, vn = ctx.saved_tensors
        B, Lp, H, DK = qp.shape
        DV, T, L, scale = vp.shape[-1], CHUNK, ctx.L, ctx.scale
        n = Lp // T
        dev = qp.device
        prec, _ = _precisions(qp.dtype)
        dop = pad_to((do if do is not None else torch.zeros(B, L, H, DV, device=dev)).to(vp.dtype), Lp)
        dsl = (dS_final if dS_final is not None else torch.zeros(B, H, DK, DV, device=dev)).float().contiguous()
        f32 = dict(dtype=torch.float32, device=dev)
        # 4. dU from inside each chunk
        BVo = min(DV, 64)
        dvl = torch.empty_like(vp)
        _dv_local[(n, B * H, triton.cdiv(DV, BVo))](qp, kp, dop, dvl, scale, Lp, H, DK=DK, DV=DV, BT=T, BV=BVo,
                                                    PREC=prec, num_warps=4)  # fmt: skip
        # 5. the pass over chunks in reverse
        BV = _state_block_v(B * H, DV)
        dstates = torch.empty(B * H, n, DK, DV, dtype=qp.dtype, device=dev)
        dvn, dS0 = torch.empty_like(vp), torch.empty_like(dsl)
        _state_bwd[(B * H, triton.cdiv(DV, BV))](qp, kp, W, dop, dvl, dsl, dstates, dvn, dS0, scale, Lp, H, n, DK=DK,
                                                 DV=DV, BT=T, BV=BV, PREC=prec, num_warps=STATE_WARPS,
                                                 num_stages=STATE_STAGES)  # fmt: skip
        dq, dk, dv = torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(vp)  # the final gradients
        db = torch.empty(B, Lp, H, **f32)
        BVg = min(DV, BWD_BLOCK_V or (32 if DK > 64 else 64))
        # 6 and 7: dq, dk, dW, then through the WY representation, in one kernel
        _bwd_chunk[(n, B * H)](qp, kp, vp, bp, vn, dop, states, dstates, dvn, Tinv, W, U, dq, dk, dv, db, scale,
                               Lp, H, n, DK=DK, DV=DV, BT=T, BV=BVg, PREC=prec, num_warps=BWD_WARPS or _warps(DK))  # fmt: skip
        b_dt, s0_dt = ctx.dtypes
        return (dq[:, :L], dk[:, :L], dv[:, :L], db[:, :L].to(b_dt),
                dS0.to(s0_dt) if ctx.has_s0 else None, None)  # fmt: skip


def delta_rule(q, k, v, beta, initial_state=None, scale=None):
    """``(o, final_state)``; shapes as in :func:`seqbook.linear_attention.delta_rule`; d_k, d_v in 16..128."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return DeltaRule.apply(q, k, v, beta, initial_state, scale)
