r"""Triton kernel: the delta rule by chunks (the WY representation), forward and backward.

The readable form is :func:`seqbook.linear_attention.delta_rule_chunked`; read it first. This
module has the signature ``delta_rule(q, k, v, beta, initial_state, scale) -> (o, final_state)``
behind a :class:`torch.autograd.Function`.

Design: one program per (batch, head) walks the chunks of ``T = 16`` steps with the state
``(d_k, d_v)`` in float32 (the state's rows mix, :math:`(I - \beta k k^\top) S`, so it is not
split by rows; it is split by value columns in the forward, whose columns never mix). Per chunk:

1. the WY representation: :math:`A = \mathrm{tril}_{-1}(\mathrm{Diag}(\beta) K K^\top)`, then
   :math:`W = (I + A)^{-1}\mathrm{Diag}(\beta) K` and :math:`\tilde U = (I+A)^{-1}\mathrm{Diag}(\beta) V`
   by forward substitution, one row at a time (16 rows);
2. :math:`U = \tilde U - W S`, :math:`o = s\,(Q S + \mathrm{tril}(Q K^\top)\, U)`,
   :math:`S \leftarrow S + K^\top U`; the state entering each chunk is saved.

The backward walks the chunks in reverse with the state's gradient :math:`\bar S` (all value
columns in one program: :math:`\partial W = -\partial U\, S^\top` sums over them). Per chunk, from
the saved entering state and the WY step recomputed:

.. math::

    \partial U = s\,M^\top do + K \bar S, \quad M = \mathrm{tril}(QK^\top), \quad
    \partial M = s\,\mathrm{tril}(do\, U^\top), \quad
    \partial Q = \partial M\, K + s\, do\, S^\top, \quad \partial K \mathrel{+}= \partial M^\top Q + U \bar S^\top,

    \bar S_\text{in} = \bar S + s\, Q^\top do - W^\top \partial U, \qquad
    \partial W = -\partial U\, S^\top, \qquad \partial\tilde U = \partial U .

Through :math:`X = (I+A)^{-1} Y` (:math:`Y = \mathrm{Diag}(\beta)[K\,|\,V]`): :math:`\partial Y =
(I+A)^{-\top}\partial X` by backward substitution, :math:`\partial A = -\partial Y X^\top` on the
strictly lower triangle, and from :math:`A = \mathrm{Diag}(\beta)\,\mathrm{tril}_{-1}(KK^\top)`:
:math:`\partial\beta_i \mathrel{+}= \sum_j \partial A_{ij} (KK^\top)_{ij}`,
:math:`\partial K \mathrel{+}= (G + G^\top) K` with :math:`G = \mathrm{Diag}(\beta)\,\partial A`.

Unmeasured: checked under the Triton interpreter against the float64 recurrence and compiled for
sm_90 by ``benchmarks.compile_check``; not timed on a GPU. The walk over chunks is sequential per
(batch, head): at small batch times heads the GPU is underused (a kernel tuned for speed would
compute the WY step of every chunk in parallel first, as flash-linear-attention does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunked_state import pad_to, state_tile

#: steps per chunk
CHUNK = 16
#: value columns per program in the forward
BLOCK_V = 32


@triton.jit
def _wy(K, Y, beta, A, rt, T: tl.constexpr):
    """X = (I + A)^{-1} diag(beta) Y by forward substitution, A strictly lower (T, T)."""
    X = tl.zeros(Y.shape, dtype=tl.float32)
    for i in range(T):
        one = (rt == i).to(tl.float32)
        a_i = tl.sum(A * one[:, None], axis=0)  # row i of A, over j
        y_i = tl.sum(Y * one[:, None], axis=0)
        b_i = tl.sum(beta * one, axis=0)
        x_i = b_i * y_i - tl.sum(a_i[:, None] * X, axis=0)
        X += one[:, None] * x_i[None, :]
    return X


@triton.jit
def _wy_transpose(A, dX, rt, T: tl.constexpr):
    """dY = (I + A)^{-T} dX by backward substitution."""
    dY = tl.zeros(dX.shape, dtype=tl.float32)
    for r in range(T):
        i = T - 1 - r
        one = (rt == i).to(tl.float32)
        col_i = tl.sum(A * one[None, :], axis=1)  # column i of A: A_ji over j
        dx_i = tl.sum(dX * one[:, None], axis=0)
        dy_i = dx_i - tl.sum(col_i[:, None] * dY, axis=0)
        dY += one[:, None] * dy_i[None, :]
    return dY


@triton.jit
def _delta_fwd(q_ptr, k_ptr, v_ptr, b_ptr, s0_ptr, states_ptr, o_ptr, final_ptr, scale, Lp, H, n_chunks,
               DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr):  # fmt: skip
    bh, b, h, rk, rv, rt, vmask, s_off, S = state_tile(s0_ptr, H, DK, DV, T, BV, HAS_S0)
    lower = rt[:, None] > rt[None, :]
    for ci in range(n_chunks):
        tl.store(states_ptr + (bh * n_chunks + ci) * DK * DV + s_off, S, mask=vmask[None, :])
        rows = (b * Lp + ci * T + rt) * H + h
        q = tl.load(q_ptr + rows[:, None] * DK + rk[None, :]).to(tl.float32)
        k = tl.load(k_ptr + rows[:, None] * DK + rk[None, :]).to(tl.float32)
        v = tl.load(v_ptr + rows[:, None] * DV + rv[None, :], mask=vmask[None, :], other=0.0).to(tl.float32)
        beta = tl.load(b_ptr + rows).to(tl.float32)
        A = tl.where(lower, beta[:, None] * tl.dot(k, tl.trans(k), input_precision="ieee"), 0.0)
        W = _wy(k, k, beta, A, rt, T)
        U = _wy(k, v, beta, A, rt, T) - tl.dot(W, S, input_precision="ieee")
        M = tl.where(rt[:, None] >= rt[None, :], tl.dot(q, tl.trans(k), input_precision="ieee"), 0.0)
        o = scale * (tl.dot(q, S, input_precision="ieee") + tl.dot(M, U, input_precision="ieee"))
        tl.store(o_ptr + rows[:, None] * DV + rv[None, :], o.to(o_ptr.dtype.element_ty), mask=vmask[None, :])
        S = S + tl.dot(tl.trans(k), U, input_precision="ieee")
    tl.store(final_ptr + bh * DK * DV + s_off, S, mask=vmask[None, :])


@triton.jit
def _delta_bwd(q_ptr, k_ptr, v_ptr, b_ptr, do_ptr, states_ptr, dsl_ptr, dq_ptr, dk_ptr, dv_ptr, db_ptr, ds0_ptr,
               scale, Lp, H, n_chunks, DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr):  # fmt: skip
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    rk, rv, rt = tl.arange(0, DK), tl.arange(0, DV), tl.arange(0, T)
    s_off = rk[:, None] * DV + rv[None, :]
    dS = tl.load(dsl_ptr + bh * DK * DV + s_off)
    lower = rt[:, None] > rt[None, :]
    causal = rt[:, None] >= rt[None, :]
    for r in range(n_chunks):
        ci = n_chunks - 1 - r
        rows = (b * Lp + ci * T + rt) * H + h
        q = tl.load(q_ptr + rows[:, None] * DK + rk[None, :]).to(tl.float32)
        k = tl.load(k_ptr + rows[:, None] * DK + rk[None, :]).to(tl.float32)
        v = tl.load(v_ptr + rows[:, None] * DV + rv[None, :]).to(tl.float32)
        do = tl.load(do_ptr + rows[:, None] * DV + rv[None, :]).to(tl.float32)
        beta = tl.load(b_ptr + rows).to(tl.float32)
        S = tl.load(states_ptr + (bh * n_chunks + ci) * DK * DV + s_off)
        # the forward's chunk, recomputed
        G = tl.dot(k, tl.trans(k), input_precision="ieee")
        A = tl.where(lower, beta[:, None] * G, 0.0)
        W = _wy(k, k, beta, A, rt, T)
        U_t = _wy(k, v, beta, A, rt, T)
        U = U_t - tl.dot(W, S, input_precision="ieee")
        M = tl.where(causal, tl.dot(q, tl.trans(k), input_precision="ieee"), 0.0)
        # o = s (Q S + M U); S_end = S + K^T U
        dU = scale * tl.dot(tl.trans(M), do, input_precision="ieee") + tl.dot(k, dS, input_precision="ieee")
        dM = tl.where(causal, scale * tl.dot(do, tl.trans(U), input_precision="ieee"), 0.0)
        dq = tl.dot(dM, k, input_precision="ieee") + scale * tl.dot(do, tl.trans(S), input_precision="ieee")
        dk = tl.dot(tl.trans(dM), q, input_precision="ieee") + tl.dot(U, tl.trans(dS), input_precision="ieee")
        dS_in = dS + scale * tl.dot(tl.trans(q), do, input_precision="ieee") - tl.dot(tl.trans(W), dU, input_precision="ieee")
        dW = -tl.dot(dU, tl.trans(S), input_precision="ieee")
        # through X = (I + A)^{-1} diag(beta) Y, for (W, K) and (U~, V)
        dYk = _wy_transpose(A, dW, rt, T)
        dYv = _wy_transpose(A, dU, rt, T)
        dA = tl.where(lower, -(tl.dot(dYk, tl.trans(W), input_precision="ieee")
                               + tl.dot(dYv, tl.trans(U_t), input_precision="ieee")), 0.0)  # fmt: skip
        dk += beta[:, None] * dYk
        dv = beta[:, None] * dYv
        dbeta = tl.sum(dYk * k, axis=1) + tl.sum(dYv * v, axis=1) + tl.sum(dA * G, axis=1)
        dG = beta[:, None] * dA
        dk += tl.dot(dG + tl.trans(dG), k, input_precision="ieee")
        tl.store(dq_ptr + rows[:, None] * DK + rk[None, :], dq)
        tl.store(dk_ptr + rows[:, None] * DK + rk[None, :], dk)
        tl.store(dv_ptr + rows[:, None] * DV + rv[None, :], dv)
        tl.store(db_ptr + rows, dbeta)
        dS = dS_in
    tl.store(ds0_ptr + bh * DK * DV + s_off, dS)


class DeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, S0, scale):
        B, L, H, DK = q.shape
        DV = v.shape[-1]
        T = CHUNK
        n = triton.cdiv(L, T)
        Lp = n * T
        qp, kp, vp, bp = pad_to(q, Lp), pad_to(k, Lp), pad_to(v, Lp), pad_to(beta.float(), Lp)  # padded steps: beta = 0
        states = torch.empty(B * H, n, DK, DV, dtype=torch.float32, device=q.device)
        final = torch.empty(B, H, DK, DV, dtype=torch.float32, device=q.device)
        o = torch.empty(B, Lp, H, DV, dtype=q.dtype, device=q.device)
        s0 = S0.float().contiguous() if S0 is not None else final
        _delta_fwd[(B * H, triton.cdiv(DV, BLOCK_V))](qp, kp, vp, bp, s0, states, o, final, scale, Lp, H, n, DK=DK,
                                                       DV=DV, T=T, BV=BLOCK_V, HAS_S0=S0 is not None)  # fmt: skip
        ctx.save_for_backward(qp, kp, vp, bp, states)
        ctx.scale, ctx.L, ctx.has_s0, ctx.dtypes = scale, L, S0 is not None, (beta.dtype, None if S0 is None else S0.dtype)
        return o[:, :L], final

    @staticmethod
    def backward(ctx, do, dS_final):
        qp, kp, vp, bp, states = ctx.saved_tensors
        B, Lp, H, DK = qp.shape
        DV, T, L = vp.shape[-1], CHUNK, ctx.L
        n = Lp // T
        dop = pad_to(do if do is not None else torch.zeros(B, L, H, DV, dtype=vp.dtype, device=vp.device), Lp)
        dsl = (dS_final if dS_final is not None else torch.zeros(B, H, DK, DV, device=qp.device)).float().contiguous()
        dq = torch.empty(B, Lp, H, DK, dtype=torch.float32, device=qp.device)
        dk, dv = torch.empty_like(dq), torch.empty(B, Lp, H, DV, dtype=torch.float32, device=qp.device)
        db, dS0 = torch.empty(B, Lp, H, dtype=torch.float32, device=qp.device), torch.empty_like(dsl)
        _delta_bwd[(B * H,)](qp, kp, vp, bp, dop, states, dsl, dq, dk, dv, db, dS0, ctx.scale, Lp, H, n, DK=DK, DV=DV,
                             T=T)  # fmt: skip
        b_dt, s0_dt = ctx.dtypes
        return (dq[:, :L].to(qp.dtype), dk[:, :L].to(kp.dtype), dv[:, :L].to(vp.dtype), db[:, :L].to(b_dt),
                dS0.to(s0_dt) if ctx.has_s0 else None, None)  # fmt: skip


def delta_rule(q, k, v, beta, initial_state=None, scale=None):
    """``(o, final_state)``; shapes as in :func:`seqbook.linear_attention.delta_rule`; d_k, d_v in 16..128."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return DeltaRule.apply(q, k, v, beta, initial_state, scale)
