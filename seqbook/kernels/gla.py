r"""Triton kernel: gated linear attention with vector gates (and RWKV-6's bonus), chunked, forward and backward.

The readable forms, the glossary and the shapes are in :mod:`seqbook.linear_attention`
(:func:`~seqbook.linear_attention.gla_chunked`); this module has the signature
``gla(q, k, v, log_alpha, initial_state, scale, bonus) -> (o, final_state)`` behind a
:class:`torch.autograd.Function`.

Design
------
Chunks of ``T = 16`` steps. The inputs are padded to a multiple of ``T`` with zeros (a zero key
and value add nothing; a zero log-gate keeps the decay flat), and the gates' cumulative sums
inside each chunk, :math:`c_t`, are formed once in PyTorch (a cumulative sum over 16 steps).

Forward, as in :mod:`seqbook.kernels.linear_attention`:

1. ``_state_pass``: one program per (batch, head, block of value columns) walks the chunks in
   order with its ``(d_k, BLOCK_V)`` state in float32, saves the state entering each chunk and
   folds the chunk in, :math:`S \leftarrow \mathrm{Diag}(e^{c_\text{last}}) S + (k \circ
   e^{c_\text{last} - c})^\top v`. Rows (key channels) decay separately but never mix.
2. ``_chunk_out``: one program per (batch, head, chunk, value block):
   :math:`o = s\,(q \circ e^{c^q}) S_\text{in}` plus the intra-chunk sum. The intra-chunk
   weights :math:`\sum_c q_{tc} k_{jc} e^{c^q_{tc} - c_{jc}}` cannot be one matrix product
   without splitting the exponential (which overflows: the readable form's docstring); with
   chunks of 16 steps the kernel forms them column by column, one key :math:`j` at a time,
   exponent first, every exponent :math:`\le 0`. This is the readable form's "diagonal
   sub-block" with the chunk as the sub-chunk: exact, :math:`O(T^2 d_k)` per chunk.

Backward:

3. ``_dstate_pass``: the state's gradient walks the chunks in reverse,
   :math:`\bar S_\text{in} = \mathrm{Diag}(e^{c_\text{last}})\bar S_\text{out} + s\,(q\circ e^{c^q})^\top do`,
   saving :math:`\bar S_\text{out}` per chunk; it ends with the initial state's gradient.
4. ``_chunk_grads``: one program per (batch, head, chunk) with the whole ``d_v``:
   :math:`dq, dk, dv` from the intra-chunk columns and the saved states.

The log-gates' gradient needs no kernel: every exponent in the model is a difference
:math:`b_x - b_y` of global cumulative gates (the chunk boundaries cancel), so
:math:`\partial\mathcal L/\partial b_x` is :math:`q_x \odot \partial q_x` (where :math:`b_x`
appears with a plus sign, shifted by one step with the bonus) minus :math:`k_x \odot
\partial k_x`, plus the final state's :math:`\sum_v S_L \odot \bar S_L` at the last step; the
log-gates' gradient is its reverse cumulative sum. The bonus's terms are elementwise and are
added in PyTorch.

Unmeasured: checked under the Triton interpreter against the float64 reference, compiled for
sm_90 by ``benchmarks.compile_check``; not timed on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunked_state import pad_to, state_tile

#: steps per chunk
CHUNK = 16
#: value columns per program in the forward passes
BLOCK_V = 32


@triton.jit
def _state_pass(k_ptr, v_ptr, c_ptr, s0_ptr, states_ptr, final_ptr, Lp, H, n_chunks,
                DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr):  # fmt: skip
    bh, b, h, rk, rv, rt, vmask, s_off, S = state_tile(s0_ptr, H, DK, DV, T, BV, HAS_S0)
    for ci in range(n_chunks):
        tl.store(states_ptr + (bh * n_chunks + ci) * DK * DV + s_off, S, mask=vmask[None, :])
        rows = (b * Lp + ci * T + rt) * H + h  # (T,)
        k = tl.load(k_ptr + rows[:, None] * DK + rk[None, :]).to(tl.float32)
        v = tl.load(v_ptr + rows[:, None] * DV + rv[None, :], mask=vmask[None, :], other=0.0).to(tl.float32)
        c = tl.load(c_ptr + rows[:, None] * DK + rk[None, :])
        c_last = tl.load(c_ptr + ((b * Lp + ci * T + T - 1) * H + h) * DK + rk)  # (DK,)
        kd = k * tl.exp(c_last[None, :] - c)
        S = tl.exp(c_last)[:, None] * S + tl.dot(tl.trans(kd), v, input_precision="ieee")
    tl.store(final_ptr + bh * DK * DV + s_off, S, mask=vmask[None, :])


@triton.jit
def _chunk_out(q_ptr, k_ptr, v_ptr, c_ptr, cq_ptr, u_ptr, states_ptr, o_ptr, scale, Lp, H, n_chunks,
               DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BV: tl.constexpr, BONUS: tl.constexpr):  # fmt: skip
    bh, ci, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    rk, rv, rt = tl.arange(0, DK), pid_v * BV + tl.arange(0, BV), tl.arange(0, T)
    vmask = rv < DV
    rows = (b * Lp + ci * T + rt) * H + h
    q = tl.load(q_ptr + rows[:, None] * DK + rk[None, :]).to(tl.float32)
    cq = tl.load(cq_ptr + rows[:, None] * DK + rk[None, :])
    S = tl.load(states_ptr + (bh * n_chunks + ci) * DK * DV + rk[:, None] * DV + rv[None, :], mask=vmask[None, :], other=0.0)
    o = tl.dot(q * tl.exp(cq), S, input_precision="ieee")  # the past, decayed to each step
    for j in range(T):  # the chunk's own keys, one column of weights at a time
        row_j = (b * Lp + ci * T + j) * H + h
        k_j = tl.load(k_ptr + row_j * DK + rk).to(tl.float32)
        c_j = tl.load(c_ptr + row_j * DK + rk)
        v_j = tl.load(v_ptr + row_j * DV + rv, mask=vmask, other=0.0).to(tl.float32)
        if BONUS:
            causal = rt > j
        else:
            causal = rt >= j
        expo = tl.where(causal[:, None], cq - c_j[None, :], float("-inf"))
        a_j = tl.sum(q * k_j[None, :] * tl.exp(expo), axis=1)  # (T,)
        if BONUS:
            u = tl.load(u_ptr + h * DK + rk).to(tl.float32)
            a_j += tl.where(rt == j, tl.sum(q * (u * k_j)[None, :], axis=1), 0.0)
        o += a_j[:, None] * v_j[None, :]
    tl.store(o_ptr + rows[:, None] * DV + rv[None, :], (scale * o).to(o_ptr.dtype.element_ty), mask=vmask[None, :])


@triton.jit
def _dstate_pass(q_ptr, do_ptr, c_ptr, cq_ptr, dsl_ptr, dstates_ptr, ds0_ptr, scale, Lp, H, n_chunks,
                 DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BV: tl.constexpr):  # fmt: skip
    bh, b, h, rk, rv, rt, vmask, s_off, dS = state_tile(dsl_ptr, H, DK, DV, T, BV, True)
    for i in range(n_chunks):
        ci = n_chunks - 1 - i
        tl.store(dstates_ptr + (bh * n_chunks + ci) * DK * DV + s_off, dS, mask=vmask[None, :])
        rows = (b * Lp + ci * T + rt) * H + h
        q = tl.load(q_ptr + rows[:, None] * DK + rk[None, :]).to(tl.float32)
        do = tl.load(do_ptr + rows[:, None] * DV + rv[None, :], mask=vmask[None, :], other=0.0).to(tl.float32)
        cq = tl.load(cq_ptr + rows[:, None] * DK + rk[None, :])
        c_last = tl.load(c_ptr + ((b * Lp + ci * T + T - 1) * H + h) * DK + rk)
        dS = tl.exp(c_last)[:, None] * dS + scale * tl.dot(tl.trans(q * tl.exp(cq)), do, input_precision="ieee")
    tl.store(ds0_ptr + bh * DK * DV + s_off, dS, mask=vmask[None, :])


@triton.jit
def _chunk_grads(q_ptr, k_ptr, v_ptr, do_ptr, c_ptr, cq_ptr, states_ptr, dstates_ptr, dq_ptr, dk_ptr, dv_ptr,
                 scale, Lp, H, n_chunks, DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr,
                 BONUS: tl.constexpr):  # fmt: skip
    """dq, dk, dv of one chunk, without the bonus's diagonal terms (added in PyTorch)."""
    bh, ci = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rk, rv, rt = tl.arange(0, DK), tl.arange(0, DV), tl.arange(0, T)
    rows = (b * Lp + ci * T + rt) * H + h
    q = tl.load(q_ptr + rows[:, None] * DK + rk[None, :]).to(tl.float32)
    k = tl.load(k_ptr + rows[:, None] * DK + rk[None, :]).to(tl.float32)
    v = tl.load(v_ptr + rows[:, None] * DV + rv[None, :]).to(tl.float32)
    do = tl.load(do_ptr + rows[:, None] * DV + rv[None, :]).to(tl.float32)
    c = tl.load(c_ptr + rows[:, None] * DK + rk[None, :])
    cq = tl.load(cq_ptr + rows[:, None] * DK + rk[None, :])
    c_last = tl.load(c_ptr + ((b * Lp + ci * T + T - 1) * H + h) * DK + rk)
    s_off = (bh * n_chunks + ci) * DK * DV + rk[:, None] * DV + rv[None, :]
    S_in = tl.load(states_ptr + s_off)
    dS_out = tl.load(dstates_ptr + s_off)
    # inter-chunk parts
    dq = scale * tl.exp(cq) * tl.dot(do, tl.trans(S_in), input_precision="ieee")
    to_end = tl.exp(c_last[None, :] - c)
    dk = to_end * tl.dot(v, tl.trans(dS_out), input_precision="ieee")
    dv = tl.dot(k * to_end, dS_out, input_precision="ieee")
    # intra-chunk parts, one key column j at a time
    for j in range(T):
        row_j = (b * Lp + ci * T + j) * H + h
        k_j = tl.load(k_ptr + row_j * DK + rk).to(tl.float32)
        c_j = tl.load(c_ptr + row_j * DK + rk)
        v_j = tl.load(v_ptr + row_j * DV + rv).to(tl.float32)
        if BONUS:
            causal = rt > j
        else:
            causal = rt >= j
        E = tl.exp(tl.where(causal[:, None], cq - c_j[None, :], float("-inf")))  # (T, DK)
        a_j = tl.sum(q * k_j[None, :] * E, axis=1)  # A[:, j]
        da_j = tl.where(causal, tl.sum(do * v_j[None, :], axis=1), 0.0)  # dA[:, j] = do_t . v_j
        dq += scale * da_j[:, None] * k_j[None, :] * E
        one = (rt == j).to(tl.float32)[:, None]
        dk += one * scale * tl.sum(da_j[:, None] * q * E, axis=0)[None, :]
        dv += one * scale * tl.sum(a_j[:, None] * do, axis=0)[None, :]
    tl.store(dq_ptr + rows[:, None] * DK + rk[None, :], dq)
    tl.store(dk_ptr + rows[:, None] * DK + rk[None, :], dk)
    tl.store(dv_ptr + rows[:, None] * DV + rv[None, :], dv)


class GLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_alpha, S0, scale, bonus):
        B, L, H, DK = q.shape
        DV = v.shape[-1]
        T = CHUNK
        n = triton.cdiv(L, T)
        Lp = n * T
        qp, kp, vp = pad_to(q, Lp), pad_to(k, Lp), pad_to(v, Lp)
        g = pad_to(log_alpha.float(), Lp)
        c = g.view(B, n, T, H, DK).cumsum(2).view(B, Lp, H, DK).contiguous()  # inclusive, within each chunk
        cq = c if bonus is None else (c - g).contiguous()  # the bonus form reads the state before the step
        states = torch.empty(B * H, n, DK, DV, dtype=torch.float32, device=q.device)
        final = torch.empty(B, H, DK, DV, dtype=torch.float32, device=q.device)
        s0 = S0.float().contiguous() if S0 is not None else final
        nv = triton.cdiv(DV, BLOCK_V)
        _state_pass[(B * H, nv)](kp, vp, c, s0, states, final, Lp, H, n, DK=DK, DV=DV, T=T, BV=BLOCK_V,
                                 HAS_S0=S0 is not None)  # fmt: skip
        o = torch.empty(B, Lp, H, DV, dtype=q.dtype, device=q.device)
        u = bonus.float().contiguous() if bonus is not None else c
        _chunk_out[(B * H, n, nv)](qp, kp, vp, c, cq, u, states, o, scale, Lp, H, n, DK=DK, DV=DV, T=T, BV=BLOCK_V,
                                   BONUS=bonus is not None)  # fmt: skip
        ctx.save_for_backward(qp, kp, vp, g, c, cq, states, final, bonus)
        ctx.scale, ctx.L, ctx.has_s0, ctx.dtypes = scale, L, S0 is not None, (log_alpha.dtype, None if S0 is None else S0.dtype)
        return o[:, :L], final

    @staticmethod
    def backward(ctx, do, dS_final):
        qp, kp, vp, g, c, cq, states, final, bonus = ctx.saved_tensors
        B, Lp, H, DK = qp.shape
        DV, T, n, L, scale = vp.shape[-1], CHUNK, Lp // CHUNK, ctx.L, ctx.scale
        dop = pad_to(do if do is not None else torch.zeros(B, L, H, DV, dtype=vp.dtype, device=vp.device), Lp)
        dsl = (dS_final if dS_final is not None else torch.zeros_like(final)).float().contiguous()
        dstates, dS0 = torch.empty_like(states), torch.empty_like(final)
        _dstate_pass[(B * H, triton.cdiv(DV, BLOCK_V))](qp, dop, c, cq, dsl, dstates, dS0, scale, Lp, H, n, DK=DK, DV=DV,
                                                       T=T, BV=BLOCK_V)  # fmt: skip
        dq = torch.empty(B, Lp, H, DK, dtype=torch.float32, device=qp.device)
        dk, dv = torch.empty_like(dq), torch.empty(B, Lp, H, DV, dtype=torch.float32, device=qp.device)
        _chunk_grads[(B * H, n)](qp, kp, vp, dop, c, cq, states, dstates, dq, dk, dv, scale, Lp, H, n, DK=DK, DV=DV, T=T,
                                 BONUS=bonus is not None)  # fmt: skip
        q32, k32 = qp.float(), kp.float()
        # the log-gates: +q dq where b appears as the query's exponent, -k dk where as the key's
        plus, minus = q32 * dq, k32 * dk
        if bonus is not None:  # the query reads b_{t-1}: its share belongs one step earlier
            plus = torch.cat([plus[:, 1:], torch.zeros_like(plus[:, :1])], dim=1)
        db = plus - minus
        db[:, L - 1] += (final * dsl).sum(-1)  # the final state's decay exponent is b_{L-1}
        dg = db.flip(1).cumsum(1).flip(1)
        du = None
        if bonus is not None:  # the diagonal term s (q_t . (u * k_t)) v_t, elementwise
            u = bonus.float()
            dov = scale * (dop.float() * vp.float()).sum(-1, keepdim=True)  # (B, Lp, H, 1)
            dq = dq + dov * u * k32
            dk = dk + dov * u * q32
            dv = dv + scale * (q32 * u * k32).sum(-1, keepdim=True) * dop.float()
            du = (dov * q32 * k32).sum((0, 1)).to(bonus.dtype)
        la_dt, s0_dt = ctx.dtypes
        return (dq[:, :L].to(qp.dtype), dk[:, :L].to(kp.dtype), dv[:, :L].to(vp.dtype), dg[:, :L].to(la_dt),
                dS0.to(s0_dt) if ctx.has_s0 else None, None, du)  # fmt: skip


def gla(q, k, v, log_alpha, initial_state=None, scale=None, bonus=None):
    """``(o, final_state)``; shapes as in :func:`seqbook.linear_attention.gla`; d_k, d_v in 16..128, powers of two."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return GLA.apply(q, k, v, log_alpha, initial_state, scale, bonus)
