r"""Triton kernel: RWKV-4's WKV, parallel over the length by chunks, forward and backward.

The readable forms and the glossary are in :mod:`seqbook.rwkv`; this module has the signature
``wkv4(w, u, k, v, initial_state) -> (wkv, final_state)`` behind a :class:`torch.autograd.Function`.
Read :func:`seqbook.rwkv.wkv4_step` (the stable step) first.

Design: a chunked scan, not one program per channel walking the whole sequence
------------------------------------------------------------------------------
The stable state :math:`(a, b, p)` (sums :math:`a e^p`, :math:`b e^p`) of a stretch of steps
composes associatively: a stretch of :math:`n` steps decays what enters it by
:math:`e^{-nw}` (:math:`p \to p - nw`) and adds its own sums, and two scaled sums add at
their larger exponent. So the length is cut into chunks of ``T`` steps and:

1. ``_walk_fwd`` (one program per batch, block of channels and chunk: all chunks at once)
   walks its chunk from an empty state and writes the chunk's own summary;
2. ``_carry_fwd`` (one program per batch and block of channels) combines the summaries in
   order, ``L / T`` small steps, into the state entering each chunk and the final state;
3. ``_walk_fwd`` again, now from the entering states, writes the outputs, and, for the
   backward, each step's log-denominator
   :math:`\ell_t = q_t + \log \tilde D_t`, with :math:`q_t` the step's maximum exponent and
   :math:`\tilde D_t = e^{p-q_t} b + e^{u + k_t - q_t} \ge 1` the scaled denominator
   (FlashAttention keeps its log-sum-exp the same way). Without gradients it is not written.

Each program walks ``T`` steps (64 by default), not ``L``: at ``B = 1, C = 2048, L = 16384``
there are ``2048 / 64 * 256 = 8192`` programs instead of 2048 / 64 = 32, each of one warp
(two channels per thread). Every combination of two scaled sums takes one exponential, not
two: the larger exponent's weight is 1 (``_weights``).

The backward: reverse sums with their own running maximum
---------------------------------------------------------
With :math:`\gamma_s = g_s / \tilde D_s` (:math:`g = \partial\mathcal L/\partial\,\mathrm{wkv}`)
and :math:`y_s = \mathrm{wkv}_s`, the gradients are sums over later steps :math:`s > t`:

.. math::

    \partial v_t &= e^{u+k_t-q_t}\gamma_t + \sum_{s>t} e^{k_t-(s-1-t)w-q_s}\gamma_s, \\
    \partial k_t &= e^{u+k_t-q_t}(v_t - y_t)\gamma_t + \sum_{s>t} e^{k_t-(s-1-t)w-q_s}\gamma_s (v_t - y_s), \\
    \partial u &= \sum_t e^{u+k_t-q_t}(v_t - y_t)\gamma_t, \qquad
    \partial w = -\sum_t \sum_{s>t} (s-1-t)\, e^{k_t-(s-1-t)w-q_s}\gamma_s (v_t - y_s).

Four reverse recurrences carry them: :math:`R_t = \sum_{s>t} e^{-(s-1-t)w - q_s}\gamma_s`, the
same with :math:`\gamma_s y_s`, and the lag-weighted :math:`R'_t = \sum_{s>t} (s-1-t)\,(\cdot)`,
which obeys :math:`R'_{t-1} = e^{-w}(R'_t + R_t)`. They are kept scaled by :math:`e^{m_t}`,
:math:`m_t` their largest exponent; since :math:`q_s \ge k_t - (s-1-t)w` (the forward's running
maximum), :math:`k_t + m_t \le 0`: every exponential is again :math:`\le 1`. The kernel
reads only :math:`\ell_s = q_s + \log\tilde D_s`: :math:`e^{-q_s}\gamma_s = e^{-\ell_s} g_s`,
and it keeps the maximum of :math:`-(s-1-t)w - \ell_s \le -(s-1-t)w - q_s`, so the bound
holds. The reverse sums compose across chunks like the forward ones (a shift by :math:`n`
steps: :math:`m \to m - nw`, :math:`R' \to R' + nR`), so the backward has the forward's
three phases, run from the end.
``_walk_bwd`` (chunks' own sums), ``_carry_bwd`` (the sums entering each chunk, and the
initial state's gradients from the totals that reach step :math:`-1`), ``_walk_bwd`` again
(:math:`\partial k, \partial v` and per-chunk partial sums of :math:`\partial u, \partial w`,
summed by one torch reduction each).

Gradients flow from the outputs into ``w, u, k, v`` and the initial state. The final state is
returned for decoding and is not differentiable (its scaling :math:`p` is a choice, not a
function of the inputs with a useful derivative).

Measured on an H200 (GPU call 3, Triton 3.6, ``triton.testing.do_bench`` at ``B = 1, C = 2048,
L = 16384``, float32, ``w = e^{N(0,1)}/4``, standard normal ``u, k, v``): forward 0.290 ms,
forward and backward 0.911 ms with ``BLOCK_C = 64``, ``T = 64``, one warp, unroll 8 (0.349 /
0.934 ms with ``BLOCK_C = 32``; 0.290 / 0.931 with 128), against fla's ``fused_recurrent_rwkv4``
at 8.59 / 17.96 ms on an H100 (GPU.md; the lead's benchmark suite times both in one run). The
forward's output there is within 6.6e-7 (relative to its largest value) of the float64
recurrence; at ``B = 2, L = 1500, C = 300`` with keys of size 8 and an initial state every
gradient is within 1.2e-5. Per kernel (``BLOCK_C = 32``): ``_walk_fwd`` 232 us for its two
launches, ``_carry_fwd`` 108 us; backward ``_walk_bwd`` 367 us, ``_carry_bwd`` 121 us. The
carries walk 256 chunks one after another with few programs: they are latency-bound, the next
thing to speed up. Before (GPU call 1) phase 2 was a Python loop of torch operations: 6.43 ms
forward, 15.9 ms forward and backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: channels per program (GPU call 3, forward: 0.290 ms with 64 on one warp, 0.349 with 32, 0.290 with 128)
BLOCK_C = 64
#: steps per chunk (each program walks one chunk)
CHUNK = 64
#: warps per program: one, each thread walking BLOCK_C / 32 channels
NUM_WARPS = 1
#: the walks' loops unrolled by this factor, so that the loads of several steps are in flight at once
UNROLL = 8


@triton.jit
def _weights(x, y):
    """``(e^{x-m}, e^{y-m}, m)`` with ``m = max(x, y)``, by one exponential: the larger side's weight is 1.
    ``x`` may be -inf (an empty sum: weight 0), ``y`` must be finite."""
    e = tl.exp(-tl.abs(x - y))
    first = x >= y
    return tl.where(first, 1.0, e), tl.where(first, e, 1.0), tl.maximum(x, y)


@triton.jit
def _walk_fwd(w_ptr, u_ptr, k_ptr, v_ptr, a_in, b_in, p_in, a_out, b_out, p_out, y_ptr, lse_ptr,
              L, C, n_chunks, T: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr, OUT: tl.constexpr,
              LSE: tl.constexpr):  # fmt: skip
    """One chunk of the stable recurrence for a block of channels. OUT: from the given entering
    states (B, n_chunks, C), write the outputs (and with LSE, each step's log-denominator);
    otherwise, from an empty state, write the state leaving the chunk (the chunk's summary)."""
    pid_b, pid_c, pid_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_c * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0)
    s_off = (pid_b * n_chunks + pid_t) * C + cols
    if OUT:
        a = tl.load(a_in + s_off, mask=cmask, other=0.0)
        b = tl.load(b_in + s_off, mask=cmask, other=0.0)
        p = tl.load(p_in + s_off, mask=cmask, other=float("-inf"))
    else:
        a = tl.zeros([BLOCK], dtype=tl.float32)
        b = a
        p = tl.full([BLOCK], float("-inf"), tl.float32)
    t0 = pid_t * T
    for i in tl.range(0, T, loop_unroll_factor=UNROLL):
        t = t0 + i
        live = cmask & ((cols * 0 + t) < L)
        off = (pid_b.to(tl.int64) * L + t) * C + cols  # B L C may pass 2^31
        k = tl.load(k_ptr + off, mask=live, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + off, mask=live, other=0.0).to(tl.float32)
        if OUT:
            # wkv_t = (e^p a + e^{u+k} v) / (e^p b + e^{u+k}), both scaled by e^-q, q = max(p, u + k)
            e1, e2, q = _weights(p, u + k)
            den = e1 * b + e2  # >= 1
            tl.store(y_ptr + off, ((e1 * a + e2 * v) / den).to(y_ptr.dtype.element_ty), mask=live)
            if LSE:
                tl.store(lse_ptr + off, q + tl.log(den), mask=live)  # log of the true denominator
        # the state after step t: decay by e^-w, add e^k (v, 1); at the scale e^{max(p - w, k)}
        e1, e2, q = _weights(p - w, k)
        a = tl.where(live, e1 * a + e2 * v, a)
        b = tl.where(live, e1 * b + e2, b)
        p = tl.where(live, q, p)
    if not OUT:
        tl.store(a_out + s_off, a, mask=cmask)
        tl.store(b_out + s_off, b, mask=cmask)
        tl.store(p_out + s_off, p, mask=cmask)


@triton.jit
def _carry_fwd(w_ptr, a_loc, b_loc, p_loc, a0_ptr, b0_ptr, p0_ptr, a_in, b_in, p_in, a_fin, b_fin, p_fin,
               L, C, n_chunks, T: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr,
               INIT: tl.constexpr):  # fmt: skip
    """Phase 2: the states entering each chunk (a_in, b_in, p_in: (B, n_chunks, C)) from the chunks'
    summaries (a_loc, ...: (B, n_chunks, C)), walking the chunks in order from the initial state;
    INIT: start from the initial state a0, b0, p0 (B, C), else from the empty one; write the final
    state to a_fin, b_fin, p_fin (B, C)."""
    pid_b, pid_c = tl.program_id(0), tl.program_id(1)
    cols = pid_c * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    io = pid_b * C + cols
    if INIT:
        a = tl.load(a0_ptr + io, mask=cmask, other=0.0)
        b = tl.load(b0_ptr + io, mask=cmask, other=0.0)
        p = tl.load(p0_ptr + io, mask=cmask, other=float("-inf"))
    else:
        a = tl.zeros([BLOCK], dtype=tl.float32)
        b = a
        p = tl.full([BLOCK], float("-inf"), tl.float32)
    for c in tl.range(0, n_chunks, loop_unroll_factor=UNROLL):
        off = (pid_b * n_chunks + c) * C + cols
        tl.store(a_in + off, a, mask=cmask)
        tl.store(b_in + off, b, mask=cmask)
        tl.store(p_in + off, p, mask=cmask)
        # the chunk's n steps decay what enters it by e^{-n w}; its own sums add at the larger exponent
        steps = tl.minimum(T, L - c * T).to(tl.float32)
        e1, e2, p = _weights(p - steps * w, tl.load(p_loc + off, mask=cmask, other=0.0))
        a = e1 * a + e2 * tl.load(a_loc + off, mask=cmask, other=0.0)
        b = e1 * b + e2 * tl.load(b_loc + off, mask=cmask, other=0.0)
    tl.store(a_fin + io, a, mask=cmask)
    tl.store(b_fin + io, b, mask=cmask)
    tl.store(p_fin + io, p, mask=cmask)


@triton.jit
def _walk_bwd(w_ptr, u_ptr, k_ptr, v_ptr, y_ptr, lse_ptr, g_ptr, acc_ptr, dk_ptr, dv_ptr, du_ptr, dw_ptr,
              L, C, n_chunks, T: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr,
              OUT: tl.constexpr):  # fmt: skip
    """One chunk of the reverse sums. acc (5, B, n_chunks, C) = (m, R, RY, R', RY') scaled by e^m.
    OUT: start from the sums entering the chunk (those of the steps after it, relative to its last
    step) and write dk, dv and the chunk's partial du, dw; otherwise start empty and write the
    chunk's own sums, relative to the step before its first, over acc."""
    pid_b, pid_c, pid_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_c * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0)
    s_off = (pid_b * n_chunks + pid_t) * C + cols
    plane = n_chunks * C * tl.num_programs(0)  # one of the five (B, n_chunks, C) planes
    if OUT:
        m = tl.load(acc_ptr + s_off, mask=cmask, other=float("-inf"))
        r = tl.load(acc_ptr + plane + s_off, mask=cmask, other=0.0)
        ry = tl.load(acc_ptr + 2 * plane + s_off, mask=cmask, other=0.0)
        r1 = tl.load(acc_ptr + 3 * plane + s_off, mask=cmask, other=0.0)
        ry1 = tl.load(acc_ptr + 4 * plane + s_off, mask=cmask, other=0.0)
    else:
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        r = tl.zeros([BLOCK], dtype=tl.float32)
        ry, r1, ry1 = r, r, r
    du = tl.zeros([BLOCK], dtype=tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    t0 = pid_t * T
    for i in tl.range(0, T, loop_unroll_factor=UNROLL):
        t = t0 + T - 1 - i
        live = cmask & ((cols * 0 + t) < L)
        off = (pid_b.to(tl.int64) * L + t) * C + cols  # B L C may pass 2^31
        lse = tl.load(lse_ptr + off, mask=live, other=0.0)
        g = tl.load(g_ptr + off, mask=live, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + off, mask=live, other=0.0).to(tl.float32)
        if OUT:
            k = tl.load(k_ptr + off, mask=live, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + off, mask=live, other=0.0).to(tl.float32)
            now = g * tl.exp(u + k - lse)  # e^{u+k-q} gamma
            e_later = tl.exp(k + m)  # <= 1: lse_s >= q_s >= k_t - (s-1-t) w
            dv = now + e_later * r
            dk = now * (v - y) + e_later * (v * r - ry)
            tl.store(dv_ptr + off, dv.to(dv_ptr.dtype.element_ty), mask=live)
            tl.store(dk_ptr + off, dk.to(dk_ptr.dtype.element_ty), mask=live)
            du += tl.where(live, now * (v - y), 0.0)
            dw -= tl.where(live, e_later * (v * r1 - ry1), 0.0)
        # fold step t in: the sums now cover s >= t, relative to step t - 1 (scale e^{max(m - w, -lse_t)})
        keep, add, m_new = _weights(m - w, -lse)
        add = add * g  # e^{-lse_t - m_new} g_t = e^{-q_t - m_new} gamma_t
        r1 = tl.where(live, keep * (r1 + r), r1)
        ry1 = tl.where(live, keep * (ry1 + ry), ry1)
        r = tl.where(live, keep * r + add, r)
        ry = tl.where(live, keep * ry + add * y, ry)
        m = tl.where(live, m_new, m)
    if OUT:
        tl.store(du_ptr + s_off, du, mask=cmask)
        tl.store(dw_ptr + s_off, dw, mask=cmask)
    else:
        tl.store(acc_ptr + s_off, m, mask=cmask)
        tl.store(acc_ptr + plane + s_off, r, mask=cmask)
        tl.store(acc_ptr + 2 * plane + s_off, ry, mask=cmask)
        tl.store(acc_ptr + 3 * plane + s_off, r1, mask=cmask)
        tl.store(acc_ptr + 4 * plane + s_off, ry1, mask=cmask)


@triton.jit
def _carry_bwd(w_ptr, acc_ptr, acc_in, a0_ptr, b0_ptr, p0_ptr, da0_ptr, db0_ptr, dp0_ptr, dw0_ptr, L, C, n_chunks,
               T: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr, INIT: tl.constexpr):  # fmt: skip
    """Phase 2 of the backward: the reverse sums entering each chunk (acc_in, relative to its last
    step) from the chunks' own sums (acc, relative to the step before each chunk), walking the
    chunks from the last; then (INIT) the initial state's gradients from the totals, relative to
    step -1, and its share of dw (dw0, (B, C))."""
    pid_b, pid_c = tl.program_id(0), tl.program_id(1)
    cols = pid_c * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    plane = n_chunks * C * tl.num_programs(0)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    r = tl.zeros([BLOCK], dtype=tl.float32)
    ry, r1, ry1 = r, r, r
    for i in tl.range(0, n_chunks, loop_unroll_factor=UNROLL):
        c = n_chunks - 1 - i
        off = (pid_b * n_chunks + c) * C + cols
        tl.store(acc_in + off, m, mask=cmask)
        tl.store(acc_in + plane + off, r, mask=cmask)
        tl.store(acc_in + 2 * plane + off, ry, mask=cmask)
        tl.store(acc_in + 3 * plane + off, r1, mask=cmask)
        tl.store(acc_in + 4 * plane + off, ry1, mask=cmask)
        # shift the later sums by the chunk's n steps (m -> m - n w, R' -> R' + n R), add the chunk's own
        steps = tl.minimum(T, L - c * T).to(tl.float32)
        e1, e2, m = _weights(m - steps * w, tl.load(acc_ptr + off, mask=cmask, other=0.0))
        r1 = e1 * (r1 + steps * r) + e2 * tl.load(acc_ptr + 3 * plane + off, mask=cmask, other=0.0)
        ry1 = e1 * (ry1 + steps * ry) + e2 * tl.load(acc_ptr + 4 * plane + off, mask=cmask, other=0.0)
        r = e1 * r + e2 * tl.load(acc_ptr + plane + off, mask=cmask, other=0.0)
        ry = e1 * ry + e2 * tl.load(acc_ptr + 2 * plane + off, mask=cmask, other=0.0)
    if INIT:
        # The initial state (sums a0 e^{p0}, b0 e^{p0}) is seen from step s with lag s: the totals,
        # relative to step -1, are exactly its weights.
        io = pid_b * C + cols
        a0 = tl.load(a0_ptr + io, mask=cmask, other=0.0)
        b0 = tl.load(b0_ptr + io, mask=cmask, other=0.0)
        p0 = tl.load(p0_ptr + io, mask=cmask, other=float("-inf"))
        live = p0 > float("-inf")
        e0 = tl.where(live, tl.exp(tl.where(live, p0, 0.0) + m), 0.0)  # <= 1 wherever a0, b0 count
        da0, db0 = e0 * r, -e0 * ry
        tl.store(da0_ptr + io, da0, mask=cmask)
        tl.store(db0_ptr + io, db0, mask=cmask)
        tl.store(dp0_ptr + io, tl.where(live, a0 * da0 + b0 * db0, 0.0), mask=cmask)
        tl.store(dw0_ptr + io, -e0 * (a0 * r1 - b0 * ry1), mask=cmask)


def _grid(B, C, n=None):
    return (B, triton.cdiv(C, BLOCK_C)) if n is None else (B, triton.cdiv(C, BLOCK_C), n)


class WKV4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, u, k, v, a0, b0, p0, T):  # a0, b0, p0: (B, C) float32, or all None
        B, L, C = k.shape
        w32, u32 = w.float().contiguous(), u.float().contiguous()
        k, v = k.contiguous(), v.contiguous()
        n = triton.cdiv(L, T)
        opts = dict(T=T, BLOCK=BLOCK_C, UNROLL=UNROLL, num_warps=NUM_WARPS)
        # 1. each chunk's own summary, from an empty state
        local = [torch.empty(B, n, C, dtype=torch.float32, device=k.device) for _ in range(3)]
        _walk_fwd[_grid(B, C, n)](w32, u32, k, v, *local, *local, k, k, L, C, n, OUT=False, LSE=False, **opts)
        # 2. the states entering each chunk, and the final state
        init = a0 is not None
        state0 = [x.contiguous() for x in (a0, b0, p0)] if init else [w32] * 3
        ins = [torch.empty_like(x) for x in local]
        final = [torch.empty(B, C, dtype=torch.float32, device=k.device) for _ in range(3)]
        _carry_fwd[_grid(B, C)](w32, *local, *state0, *ins, *final, L, C, n, INIT=init, **opts)
        # 3. the outputs from the entering states (and, for the backward, log-denominators)
        grads = any(ctx.needs_input_grad[:7])
        y = torch.empty_like(k)
        lse = torch.empty(B, L, C, dtype=torch.float32, device=k.device) if grads else y
        _walk_fwd[_grid(B, C, n)](w32, u32, k, v, *ins, *ins, y, lse, L, C, n, OUT=True, LSE=grads, **opts)
        ctx.save_for_backward(w32, u32, k, v, y, lse, *(state0 if init else ()))
        ctx.T, ctx.init, ctx.dtypes = T, init, (w.dtype, u.dtype)
        ctx.mark_non_differentiable(*final)
        return (y, *final)

    @staticmethod
    def backward(ctx, g, *_final_grads):
        w, u, k, v, y, lse, *state0 = ctx.saved_tensors
        B, L, C = k.shape
        T = ctx.T
        n = triton.cdiv(L, T)
        g = g.contiguous()
        opts = dict(T=T, BLOCK=BLOCK_C, UNROLL=UNROLL, num_warps=NUM_WARPS)
        # 1. each chunk's own reverse sums
        local = torch.empty(5, B, n, C, dtype=torch.float32, device=k.device)
        _walk_bwd[_grid(B, C, n)](w, u, k, v, y, lse, g, local, k, k, k, k, L, C, n, OUT=False, **opts)
        # 2. the sums entering each chunk from the chunks after it; the initial state's gradients
        ins = torch.empty_like(local)
        d_state0 = [torch.empty(B, C, dtype=torch.float32, device=k.device) for _ in range(4)] if ctx.init else [w] * 4
        _carry_bwd[_grid(B, C)](w, local, ins, *(state0 or [w] * 3), *d_state0, L, C, n, INIT=ctx.init, **opts)
        # 3. dk, dv and per-chunk partial sums of du, dw
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        du, dw = local[0], local[1]  # (B, n, C) each: the chunks' own sums are no longer needed
        _walk_bwd[_grid(B, C, n)](w, u, k, v, y, lse, g, ins, dk, dv, du, dw, L, C, n, OUT=True, **opts)
        du, dw = du.sum((0, 1)), dw.sum((0, 1))
        if ctx.init:
            dw = dw + d_state0[3].sum(0)
        w_dt, u_dt = ctx.dtypes
        return (dw.to(w_dt), du.to(u_dt), dk, dv, *(d_state0[:3] if ctx.init else (None,) * 3), None)


def wkv4(w, u, k, v, initial_state=None, chunk_size=CHUNK):
    """``w, u (C,)``, ``k, v (batch, length, C)``, ``initial_state (a, b, p)`` or None -> ``(wkv, (a, b, p))``.

    The state is float32 (an initial state is converted; its gradients flow back through the
    conversion); the output in the dtype of ``k``."""
    state0 = (None,) * 3 if initial_state is None else tuple(s.float() for s in initial_state)
    y, a, b, p = WKV4.apply(w, u, k, v, *state0, chunk_size)
    return y, (a, b, p)
