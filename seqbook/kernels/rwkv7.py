r"""Triton kernel: RWKV-7's generalized delta rule, fused recurrent, forward and backward.

The readable forms, the glossary and the shapes are in :mod:`seqbook.rwkv`
(:func:`~seqbook.rwkv.wkv7_step`, :func:`~seqbook.rwkv.wkv7_recurrent`); this module has the
signature ``wkv7(r, log_w, k, v, kappa_hat, a, initial_state, checkpoint) -> (o, final_state)``
behind a :class:`torch.autograd.Function`. The state is keys by values, ``(N, d_v)``, and one
step is

.. math::

    x_t = \hat\kappa_t^\top S_{t-1}, \qquad
    S_t = \mathrm{Diag}(w_t)\, S_{t-1} - b_t\, x_t + \tilde k_t v_t^\top, \quad b_t = a_t \odot \hat\kappa_t,
    \qquad o_t = r_t^\top S_t .

What this is, and is not
------------------------
It is the **fused recurrent** form, not the chunked (WY / diagonal-plus-low-rank) form: time is
walked one step after another inside each program. A chunked kernel, which turns the steps of a
chunk into matrix products (:func:`seqbook.rwkv.wkv7_chunked` is its readable form, and
:mod:`seqbook.kernels.delta` the kernel of its special case, the delta rule), is what a fast
training kernel needs; this one is the correct baseline it must match.

Forward: one program per (batch, head, block of ``BLOCK_V`` value columns). The transition acts
on the state's rows (key channels) only, so value columns never mix and the state splits by
them. The program keeps its ``(N, BLOCK_V)`` block of the state in float32 registers, walks the
steps, writes :math:`o_t`, and saves the state entering every ``checkpoint`` steps.

Backward: one program per (batch, head, value block) walks time in reverse with the state's
gradient :math:`G = \partial\mathcal L/\partial S_t` (float32). A step needs the state before
it, :math:`S_{t-1}`, and the forward kept only one state per checkpoint interval: entering an
interval, the program recomputes its ``checkpoint`` states from the saved one into a scratch
buffer (global memory, ``checkpoint * N * BLOCK_V`` floats per program), then walks them
backwards. Per step, with :math:`G \mathrel{+}= r_t\, do_t^\top` first (:math:`o_t` reads
:math:`S_t`):

.. math::

    \partial r_t = S_t\, do_t, \quad \partial\tilde k_t = G v_t, \quad \partial v_t = G^\top \tilde k_t, \quad
    \partial w_t = \textstyle\sum_v G \odot S_{t-1}, \quad \partial b_t = -G x_t^\top, \quad
    \partial x_t = -G^\top b_t,

    \partial\hat\kappa_t = S_{t-1}\, \partial x_t + a_t \odot \partial b_t, \quad
    \partial a_t = \hat\kappa_t \odot \partial b_t, \quad
    \partial \log w_t = w_t \odot \partial w_t, \quad
    G \leftarrow \mathrm{Diag}(w_t)\, G + \hat\kappa_t\, \partial x_t^\top .

The gradients of ``r, log_w, k, kappa_hat, a`` sum over value columns: each value block writes
its share and PyTorch adds the shares. The inputs are padded to a multiple of ``checkpoint``
with identity steps (:math:`\log w = 0`, :math:`\tilde k = \hat\kappa = a = 0`), which leave the
state unchanged.

Cost: :math:`O(L\,N\,d_v)` work per (batch, head), like the chunked form's state updates, but
in ``L`` dependent steps of a few vector operations: on a GPU its speed is set by the latency of
one step, not by bandwidth or FLOPs. Unmeasured: checked under the Triton interpreter against
the float64 recurrence and compiled for sm_90 by ``benchmarks.compile_check``; not timed on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: value columns per program (the smallest head dim the kernel takes: more programs, shorter steps)
BLOCK_V = 16
#: steps between the states the forward saves for the backward, by default
CHECKPOINT = 16


@triton.jit
def _load_step(r_ptr, w_ptr, k_ptr, kh_ptr, a_ptr, v_ptr, row, rk, rv, vmask, DK: tl.constexpr, DV: tl.constexpr):
    """One step's vectors, in float32: r, w = e^{log w}, k~, kappa_hat, a (N,) and v (BLOCK_V,)."""
    r = tl.load(r_ptr + row * DK + rk).to(tl.float32)
    log_w = tl.load(w_ptr + row * DK + rk).to(tl.float32)
    k = tl.load(k_ptr + row * DK + rk).to(tl.float32)
    kh = tl.load(kh_ptr + row * DK + rk).to(tl.float32)
    a = tl.load(a_ptr + row * DK + rk).to(tl.float32)
    v = tl.load(v_ptr + row * DV + rv, mask=vmask, other=0.0).to(tl.float32)
    return r, tl.exp(log_w), k, kh, a, v


@triton.jit
def _wkv7_fwd(r_ptr, w_ptr, k_ptr, v_ptr, kh_ptr, a_ptr, s0_ptr, ckpt_ptr, o_ptr, final_ptr, Lp, H, n_ckpt, T,
              DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr):  # fmt: skip
    bh, pid_v = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rk, rv = tl.arange(0, DK), pid_v * BV + tl.arange(0, BV)
    vmask = rv < DV
    s_off = rk[:, None] * DV + rv[None, :]
    if HAS_S0:
        S = tl.load(s0_ptr + bh * DK * DV + s_off, mask=vmask[None, :], other=0.0).to(tl.float32)
    else:
        S = tl.zeros([DK, BV], dtype=tl.float32)
    for ci in range(n_ckpt):
        tl.store(ckpt_ptr + (bh * n_ckpt + ci) * DK * DV + s_off, S, mask=vmask[None, :])
        for s in range(T):
            row = (b * Lp + ci * T + s) * H + h
            r, w, k, kh, a, v = _load_step(r_ptr, w_ptr, k_ptr, kh_ptr, a_ptr, v_ptr, row, rk, rv, vmask, DK, DV)
            x = tl.sum(kh[:, None] * S, axis=0)  # what the state recalls for the removal key, (BV,)
            S = w[:, None] * S - (a * kh)[:, None] * x[None, :] + k[:, None] * v[None, :]
            o = tl.sum(r[:, None] * S, axis=0)
            tl.store(o_ptr + row * DV + rv, o.to(o_ptr.dtype.element_ty), mask=vmask)
    tl.store(final_ptr + bh * DK * DV + s_off, S, mask=vmask[None, :])


@triton.jit
def _wkv7_bwd(r_ptr, w_ptr, k_ptr, v_ptr, kh_ptr, a_ptr, do_ptr, ckpt_ptr, scratch_ptr, dsl_ptr,
              dr_ptr, dw_ptr, dk_ptr, dv_ptr, dkh_ptr, da_ptr, ds0_ptr, B, Lp, H, n_ckpt, T,
              DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr):  # fmt: skip
    bh, pid_v = tl.program_id(0), tl.program_id(1)
    nv = tl.num_programs(1)
    b, h = bh // H, bh % H
    rk, rv = tl.arange(0, DK), pid_v * BV + tl.arange(0, BV)
    vmask = rv < DV
    s_off = rk[:, None] * DV + rv[None, :]
    blk_off = rk[:, None] * BV + tl.arange(0, BV)[None, :]  # a (DK, BV) block of this program's scratch
    scratch = scratch_ptr + (bh * nv + pid_v) * T * DK * BV
    share = pid_v * B * Lp * H * DK  # this value block's share of the gradients that sum over values
    G = tl.load(dsl_ptr + bh * DK * DV + s_off, mask=vmask[None, :], other=0.0)
    for cr in range(n_ckpt):
        ci = n_ckpt - 1 - cr
        # recompute the states entering each step of the interval from its checkpoint
        S = tl.load(ckpt_ptr + (bh * n_ckpt + ci) * DK * DV + s_off, mask=vmask[None, :], other=0.0)
        for s in range(T):
            tl.store(scratch + s * DK * BV + blk_off, S)
            row = (b * Lp + ci * T + s) * H + h
            r, w, k, kh, a, v = _load_step(r_ptr, w_ptr, k_ptr, kh_ptr, a_ptr, v_ptr, row, rk, rv, vmask, DK, DV)
            x = tl.sum(kh[:, None] * S, axis=0)
            S = w[:, None] * S - (a * kh)[:, None] * x[None, :] + k[:, None] * v[None, :]
        tl.debug_barrier()  # the scratch written above is read below by other threads of the program
        for sr in range(T):
            s = T - 1 - sr
            row = (b * Lp + ci * T + s) * H + h
            r, w, k, kh, a, v = _load_step(r_ptr, w_ptr, k_ptr, kh_ptr, a_ptr, v_ptr, row, rk, rv, vmask, DK, DV)
            do = tl.load(do_ptr + row * DV + rv, mask=vmask, other=0.0).to(tl.float32)
            S_prev = tl.load(scratch + s * DK * BV + blk_off)
            x = tl.sum(kh[:, None] * S_prev, axis=0)
            bb = a * kh
            S = w[:, None] * S_prev - bb[:, None] * x[None, :] + k[:, None] * v[None, :]
            G += r[:, None] * do[None, :]  # o_t = S_t^T r_t
            dr = tl.sum(S * do[None, :], axis=1)
            dk = tl.sum(G * v[None, :], axis=1)
            dv = tl.sum(G * k[:, None], axis=0)
            dw = tl.sum(G * S_prev, axis=1)
            db = -tl.sum(G * x[None, :], axis=1)
            dx = -tl.sum(G * bb[:, None], axis=0)
            dkh = tl.sum(S_prev * dx[None, :], axis=1) + a * db
            tl.store(dr_ptr + share + row * DK + rk, dr)
            tl.store(dw_ptr + share + row * DK + rk, dw * w)
            tl.store(dk_ptr + share + row * DK + rk, dk)
            tl.store(dkh_ptr + share + row * DK + rk, dkh)
            tl.store(da_ptr + share + row * DK + rk, kh * db)
            tl.store(dv_ptr + row * DV + rv, dv, mask=vmask)
            G = w[:, None] * G + kh[:, None] * dx[None, :]
        tl.debug_barrier()  # the next interval overwrites the scratch read above
    tl.store(ds0_ptr + bh * DK * DV + s_off, G, mask=vmask[None, :])


def _pad(x, Lp):
    L = x.shape[1]
    if L == Lp:
        return x.contiguous()
    return torch.nn.functional.pad(x, [0, 0] * (x.dim() - 2) + [0, Lp - L]).contiguous()


class WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, log_w, k, v, kappa_hat, a, S0, checkpoint):
        B, L, H, DK = r.shape
        DV = v.shape[-1]
        T = checkpoint
        n = triton.cdiv(L, T)
        Lp = n * T
        # padded steps: log w = 0 and k~ = kappa_hat = a = 0, the identity
        rp, wp, kp, vp, khp, ap = (_pad(x, Lp) for x in (r, log_w, k, v, kappa_hat, a))
        ckpt = torch.empty(B * H, n, DK, DV, dtype=torch.float32, device=r.device)
        final = torch.empty(B, H, DK, DV, dtype=torch.float32, device=r.device)
        o = torch.empty(B, Lp, H, DV, dtype=r.dtype, device=r.device)
        s0 = S0.float().contiguous() if S0 is not None else final
        _wkv7_fwd[(B * H, triton.cdiv(DV, BLOCK_V))](rp, wp, kp, vp, khp, ap, s0, ckpt, o, final, Lp, H, n, T, DK=DK,
                                                      DV=DV, BV=BLOCK_V, HAS_S0=S0 is not None)  # fmt: skip
        ctx.save_for_backward(rp, wp, kp, vp, khp, ap, ckpt)
        ctx.L, ctx.T = L, T
        ctx.dtypes = [x.dtype for x in (r, log_w, k, v, kappa_hat, a)] + [None if S0 is None else S0.dtype]
        return o[:, :L], final

    @staticmethod
    def backward(ctx, do, dS_final):
        rp, wp, kp, vp, khp, ap, ckpt = ctx.saved_tensors
        B, Lp, H, DK = rp.shape
        DV, T, L = vp.shape[-1], ctx.T, ctx.L
        n, nv = Lp // T, triton.cdiv(DV, BLOCK_V)
        dev = rp.device
        dop = _pad(do if do is not None else torch.zeros(B, L, H, DV, dtype=vp.dtype, device=dev), Lp)
        dsl = (dS_final if dS_final is not None else torch.zeros(B, H, DK, DV, device=dev)).float().contiguous()
        shares = [torch.empty(nv, B, Lp, H, DK, dtype=torch.float32, device=dev) for _ in range(5)]  # r, log_w, k, kh, a
        dv = torch.empty(B, Lp, H, DV, dtype=torch.float32, device=dev)
        dS0 = torch.empty_like(dsl)
        scratch = torch.empty(B * H, nv, T, DK, BLOCK_V, dtype=torch.float32, device=dev)
        dr, dw, dk, dkh, da = shares
        _wkv7_bwd[(B * H, nv)](rp, wp, kp, vp, khp, ap, dop, ckpt, scratch, dsl, dr, dw, dk, dv, dkh, da, dS0, B, Lp, H,
                               n, T, DK=DK, DV=DV, BV=BLOCK_V)  # fmt: skip
        dr, dw, dk, dkh, da = (x.sum(0)[:, :L] for x in shares)
        d_r, d_w, d_k, d_v, d_kh, d_a, d_s0 = ctx.dtypes
        return (dr.to(d_r), dw.to(d_w), dk.to(d_k), dv[:, :L].to(d_v), dkh.to(d_kh), da.to(d_a),
                None if d_s0 is None else dS0.to(d_s0), None)  # fmt: skip


def wkv7(r, log_w, k, v, kappa_hat, a, initial_state=None, checkpoint=CHECKPOINT):
    """``(o, final_state)``; shapes as in :func:`seqbook.rwkv.wkv7`; N, d_v in 16..128 (powers of two).

    ``checkpoint``: steps between the states saved for the backward (memory ``L / checkpoint``
    states per (batch, head); the backward recomputes the others)."""
    return WKV7.apply(r, log_w, k, v, kappa_hat, a, initial_state, checkpoint)
