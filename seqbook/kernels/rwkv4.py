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
2. the summaries are combined in order (:func:`_scan_states`, ``L / T`` small steps over
   ``(batch, C)`` tensors) into the state entering each chunk;
3. ``_walk_fwd`` again, now from the entering states, writes the outputs, and, for the
   backward, each step's maximum exponent :math:`q_t` and scaled denominator
   :math:`\tilde D_t = e^{p-q} b + e^{u + k_t - q} \ge 1` (the true denominator is
   :math:`\tilde D_t e^{q_t}`), as FlashAttention keeps its log-sum-exp.

Each program walks ``T`` steps (64 by default), not ``L``: at ``B = 1, C = 2048, L = 16384``
there are ``2048 / 32 * 256 = 16384`` programs instead of 2048 / 32 = 64.

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
maximum), :math:`k_t + m_t \le 0`: every exponential is again :math:`\le 1`. The reverse sums
compose across chunks like the forward ones (a shift by :math:`n` steps: :math:`m \to m - nw`,
:math:`R' \to R' + nR`), so the backward has the forward's three phases, run from the end.
``_walk_bwd`` writes :math:`\partial k, \partial v` and per-chunk partial sums of
:math:`\partial u, \partial w`; the initial state's gradients come from the sums that reach
step :math:`-1`.

Gradients flow from the outputs into ``w, u, k, v`` and the initial state. The final state is
returned for decoding and is not differentiable (its scaling :math:`p` is a choice, not a
function of the inputs with a useful derivative).

Unmeasured: this kernel has been checked under the Triton interpreter against the float64
reference and compiled for sm_90 (``benchmarks.compile_check``); it has not been timed on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: channels per program
BLOCK_C = 32
#: steps per chunk (each program walks one chunk)
CHUNK = 64


@triton.jit
def _walk_fwd(w_ptr, u_ptr, k_ptr, v_ptr, a_in, b_in, p_in, a_out, b_out, p_out, y_ptr, q_ptr, d_ptr,
              L, C, n_chunks, T: tl.constexpr, BLOCK: tl.constexpr, STORE: tl.constexpr):  # fmt: skip
    """One chunk of the stable recurrence for a block of channels, from the given entering state.
    STORE: write outputs, q_t and D~_t; always write the state leaving the chunk."""
    pid_b, pid_c, pid_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_c * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    s_off = (pid_b * n_chunks + pid_t) * C + cols  # (B, n_chunks, C) states
    a = tl.load(a_in + s_off, mask=cmask, other=0.0)
    b = tl.load(b_in + s_off, mask=cmask, other=0.0)
    p = tl.load(p_in + s_off, mask=cmask, other=float("-inf"))
    t0 = pid_t * T
    for i in range(T):
        t = t0 + i
        live = cmask & ((cols * 0 + t) < L)
        off = (pid_b * L + t) * C + cols
        k = tl.load(k_ptr + off, mask=live, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + off, mask=live, other=0.0).to(tl.float32)
        if STORE:
            q = tl.maximum(p, u + k)
            e1, e2 = tl.exp(p - q), tl.exp(u + k - q)
            den = e1 * b + e2
            tl.store(y_ptr + off, ((e1 * a + e2 * v) / den).to(y_ptr.dtype.element_ty), mask=live)
            tl.store(q_ptr + off, q, mask=live)
            tl.store(d_ptr + off, den, mask=live)
        q = tl.maximum(p - w, k)
        e1, e2 = tl.exp(p - w - q), tl.exp(k - q)
        a = tl.where(live, e1 * a + e2 * v, a)
        b = tl.where(live, e1 * b + e2, b)
        p = tl.where(live, q, p)
    tl.store(a_out + s_off, a, mask=cmask)
    tl.store(b_out + s_off, b, mask=cmask)
    tl.store(p_out + s_off, p, mask=cmask)


@triton.jit
def _walk_bwd(w_ptr, u_ptr, k_ptr, v_ptr, y_ptr, q_ptr, d_ptr, g_ptr,
              acc_in, acc_out, dk_ptr, dv_ptr, du_ptr, dw_ptr,
              L, C, n_chunks, T: tl.constexpr, BLOCK: tl.constexpr, STORE: tl.constexpr):  # fmt: skip
    """One chunk of the reverse sums, from the given entering sums (those of the steps after the
    chunk). acc (5, B, n_chunks, C) = (m, R, RY, R', RY') scaled by e^m, relative to the step
    before the chunk's first (out) or to the chunk's last step (in). STORE: write dk, dv and the
    chunk's partial du, dw."""
    pid_b, pid_c, pid_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_c * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    s_off = (pid_b * n_chunks + pid_t) * C + cols
    plane = n_chunks * C * tl.num_programs(0)  # one of the five (B, n_chunks, C) planes
    m = tl.load(acc_in + s_off, mask=cmask, other=float("-inf"))
    r = tl.load(acc_in + plane + s_off, mask=cmask, other=0.0)
    ry = tl.load(acc_in + 2 * plane + s_off, mask=cmask, other=0.0)
    r1 = tl.load(acc_in + 3 * plane + s_off, mask=cmask, other=0.0)
    ry1 = tl.load(acc_in + 4 * plane + s_off, mask=cmask, other=0.0)
    du = tl.zeros([BLOCK], dtype=tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    t0 = pid_t * T
    for i in range(T):
        t = t0 + T - 1 - i
        live = cmask & ((cols * 0 + t) < L)
        off = (pid_b * L + t) * C + cols
        k = tl.load(k_ptr + off, mask=live, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + off, mask=live, other=0.0)
        if STORE:
            v = tl.load(v_ptr + off, mask=live, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + off, mask=live, other=0.0).to(tl.float32)
            gamma = tl.load(g_ptr + off, mask=live, other=0.0).to(tl.float32) / tl.load(d_ptr + off, mask=live, other=1.0)
            e_now = tl.exp(u + k - q)
            e_later = tl.exp(k + m)  # <= 1: q_s >= k_t - (s-1-t) w
            dv = e_now * gamma + e_later * r
            dk = e_now * (v - y) * gamma + e_later * (v * r - ry)
            tl.store(dv_ptr + off, dv, mask=live)
            tl.store(dk_ptr + off, dk, mask=live)
            du += tl.where(live, e_now * (v - y) * gamma, 0.0)
            dw -= tl.where(live, e_later * (v * r1 - ry1), 0.0)
        else:
            y = tl.load(y_ptr + off, mask=live, other=0.0).to(tl.float32)
            gamma = tl.load(g_ptr + off, mask=live, other=0.0).to(tl.float32) / tl.load(d_ptr + off, mask=live, other=1.0)
        # fold step t in: the sums now cover s >= t, relative to step t - 1
        m_new = tl.where(live, tl.maximum(m - w, -q), 0.0)  # 0 on dead lanes: no -inf - (-inf) below
        keep = tl.where(live, tl.exp(m - w - m_new), 1.0)
        add = tl.where(live, tl.exp(-q - m_new), 0.0)
        m_new = tl.where(live, m_new, m)
        r1 = tl.where(live, keep * (r1 + r), r1)
        ry1 = tl.where(live, keep * (ry1 + ry), ry1)
        r = keep * r + add * gamma
        ry = keep * ry + add * gamma * y
        m = m_new
    tl.store(acc_out + s_off, m, mask=cmask)
    tl.store(acc_out + plane + s_off, r, mask=cmask)
    tl.store(acc_out + 2 * plane + s_off, ry, mask=cmask)
    tl.store(acc_out + 3 * plane + s_off, r1, mask=cmask)
    tl.store(acc_out + 4 * plane + s_off, ry1, mask=cmask)
    if STORE:
        tl.store(du_ptr + s_off, du, mask=cmask)
        tl.store(dw_ptr + s_off, dw, mask=cmask)


def _add_scaled(x1, e1, x2, e2):
    """x1 e^{e1} + x2 e^{e2} as (x, e) at e = max(e1, e2); -inf exponents are empty sums."""
    e = torch.maximum(e1, e2)
    safe = torch.where(torch.isinf(e), torch.zeros_like(e), e)
    f1 = torch.where(torch.isinf(e1), torch.zeros_like(e1), torch.exp(e1 - safe))
    f2 = torch.where(torch.isinf(e2), torch.zeros_like(e2), torch.exp(e2 - safe))
    return [f1 * a + f2 * b for a, b in zip(x1, x2)] if isinstance(x1, list) else f1 * x1 + f2 * x2, e


def _scan_states(w, local, initial, lengths):
    """Forward states entering each chunk from the chunks' own summaries: ``local`` = (a, b, p) each
    (B, n, C); returns entering (a, b, p) each (B, n, C) and the final state."""
    a, b, p = initial
    ins = [[], [], []]
    for c in range(local[0].shape[1]):
        for lst, x in zip(ins, (a, b, p)):
            lst.append(x)
        p_dec = p - lengths[c] * w
        (a, b), p = _add_scaled([a, b], p_dec, [local[0][:, c], local[1][:, c]], local[2][:, c])
    return [torch.stack(x, 1) for x in ins], (a, b, p)


def _scan_reverse(w, local, lengths):
    """Reverse sums entering each chunk (from the steps after it, relative to its last step) from the
    chunks' own sums ``local`` (5, B, n, C) relative to the step before each chunk; also the total
    relative to step -1."""
    n = local.shape[2]
    m = torch.full_like(local[0, :, 0], float("-inf"))
    r, ry, r1, ry1 = (torch.zeros_like(m) for _ in range(4))
    ins = [None] * n
    for c in reversed(range(n)):
        ins[c] = torch.stack([m, r, ry, r1, ry1])
        # shift the later sums from "relative to this chunk's last step" to "relative to the step before it"
        n_c = lengths[c]
        m_shift = m - n_c * w
        r1, ry1 = r1 + n_c * r, ry1 + n_c * ry
        (r, ry, r1, ry1), m = _add_scaled([r, ry, r1, ry1], m_shift, list(local[1:, :, c]), local[0, :, c])
    return torch.stack(ins, 2), (m, r, ry, r1, ry1)


def _launch_fwd(w, u, k, v, a_in, b_in, p_in, store, T):
    B, L, C = k.shape
    n = a_in.shape[1]
    outs = [torch.empty_like(a_in) for _ in range(3)]
    y = torch.empty_like(k) if store else k
    q = torch.empty(B, L, C, dtype=torch.float32, device=k.device) if store else a_in
    d = torch.empty_like(q) if store else a_in
    grid = (B, triton.cdiv(C, BLOCK_C), n)
    _walk_fwd[grid](w, u, k, v, a_in, b_in, p_in, *outs, y, q, d, L, C, n, T=T, BLOCK=BLOCK_C, STORE=store)
    return outs, y, q, d


class WKV4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, u, k, v, a0, b0, p0, T):
        B, L, C = k.shape
        w32, u32 = w.float().contiguous(), u.float().contiguous()
        k, v = k.contiguous(), v.contiguous()
        n = triton.cdiv(L, T)
        lengths = [min(T, L - c * T) for c in range(n)]
        empty = torch.zeros(B, n, C, dtype=torch.float32, device=k.device)
        local, _, _, _ = _launch_fwd(w32, u32, k, v, empty, empty, torch.full_like(empty, float("-inf")), False, T)
        ins, final = _scan_states(w32, local, (a0.float(), b0.float(), p0.float()), lengths)
        ins = [x.contiguous() for x in ins]
        _, y, q, d = _launch_fwd(w32, u32, k, v, *ins, True, T)
        ctx.save_for_backward(w32, u32, k, v, y, q, d, a0.float(), b0.float(), p0.float())
        ctx.T, ctx.lengths, ctx.dtypes = T, lengths, (w.dtype, u.dtype, a0.dtype)
        ctx.mark_non_differentiable(*final)
        return (y, *final)

    @staticmethod
    def backward(ctx, g, *_final_grads):
        w, u, k, v, y, q, d, a0, b0, p0 = ctx.saved_tensors
        B, L, C = k.shape
        T, lengths = ctx.T, ctx.lengths
        n = len(lengths)
        g = g.contiguous()
        grid = (B, triton.cdiv(C, BLOCK_C), n)
        empty = torch.zeros(5, B, n, C, dtype=torch.float32, device=k.device)
        empty[0] = float("-inf")
        local = torch.empty_like(empty)
        _walk_bwd[grid](w, u, k, v, y, q, d, g, empty, local, k, k, k, k, L, C, n, T=T, BLOCK=BLOCK_C, STORE=False)
        ins, (m, r, ry, r1, ry1) = _scan_reverse(w, local, lengths)
        dk = torch.empty(B, L, C, dtype=torch.float32, device=k.device)
        dv, du, dw = torch.empty_like(dk), torch.empty(B, n, C, device=k.device), torch.empty(B, n, C, device=k.device)
        _walk_bwd[grid](w, u, k, v, y, q, d, g, ins.contiguous(), local, dk, dv, du, dw, L, C, n, T=T, BLOCK=BLOCK_C,
                        STORE=True)  # fmt: skip
        du, dw = du.sum((0, 1)), dw.sum((0, 1))
        # The initial state (sums a0 e^{p0}, b0 e^{p0}) is seen from step s with lag s: the totals above,
        # relative to step -1, are exactly its weights.
        live = ~torch.isinf(p0)
        e0 = torch.where(live, torch.exp(torch.where(live, p0, 0.0) + m), 0.0)  # <= 1 wherever a0, b0 count
        da0, db0 = e0 * r, -e0 * ry
        dw = dw - (e0 * (a0 * r1 - b0 * ry1)).sum(0)
        dp0 = torch.where(live, a0 * da0 + b0 * db0, 0.0)
        w_dt, u_dt, s_dt = ctx.dtypes
        return (dw.to(w_dt), du.to(u_dt), dk.to(k.dtype), dv.to(v.dtype), da0.to(s_dt), db0.to(s_dt), dp0.to(s_dt),
                None)  # fmt: skip


def wkv4(w, u, k, v, initial_state=None, chunk_size=CHUNK):
    """``w, u (C,)``, ``k, v (batch, length, C)``, ``initial_state (a, b, p)`` or None -> ``(wkv, (a, b, p))``.

    The state is float32; the output in the dtype of ``k``."""
    B, L, C = k.shape
    if initial_state is None:
        zeros = torch.zeros(B, C, dtype=torch.float32, device=k.device)
        initial_state = (zeros, zeros.clone(), torch.full_like(zeros, float("-inf")))
    y, a, b, p = WKV4.apply(w, u, k, v, *initial_state, chunk_size)
    return y, (a, b, p)
