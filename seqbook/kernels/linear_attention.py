r"""Triton kernel: chunked linear attention with an optional scalar decay, forward and backward.

The readable forms, the glossary and the shapes are in :mod:`seqbook.linear_attention`; this
module has the signature ``linear_attention(q, k, v, log_decay, initial_state, scale,
chunk_size) -> (o, final_state)`` behind a :class:`torch.autograd.Function`.
:func:`seqbook.linear_attention.linear_attention_chunked` is the algorithm written in
PyTorch; read it first.

Design: the sequential part apart from the parallel part
---------------------------------------------------------
The chunked form has one sequential piece, the state passing between chunks, and two
pieces that are independent per chunk once the state entering each chunk is known. So the
forward is two kernels:

1. ``_state_pass``: one program per (batch, head, block of ``BLOCK_V`` value columns,
   block of ``BLOCK_K`` key rows) walks the chunks in order with its ``(BLOCK_K, BLOCK_V)``
   tile of the state in registers (float32), writes the state *entering* each chunk to
   ``states (B, H, n_chunks, d_k, d_v)``, and folds the chunk in: :math:`S \leftarrow
   e^{c_\text{last}} S + k^\top (e^{c_\text{last} - c} \circ v)`, one ``(BLOCK_K, C) x (C,
   BLOCK_V)`` product per chunk. The decay is a scalar per step, so neither the rows nor
   the columns of the state ever mix: the walk splits into independent tiles. That split
   is what keeps the GPU busy: the walk is sequential over chunks, so its programs are the
   only parallelism: at B=1, H=16, d=128, tiles of 64 x 32 give 128 programs for 132
   multiprocessors where whole-row tiles of 128 x 64 gave 32, and the forward went from
   0.658 to 0.444 ms on an H200 (benchmarks/NOTES.md).
   The walk is bound by latency, one small product after another, so what matters is that
   nothing stands between memory and the product: ``k`` is loaded already transposed and goes
   to ``tl.dot`` untouched (the chunk's weights multiply ``v`` instead, and without a decay
   nothing is multiplied), so Triton's pipeliner fetches the next chunks through shared memory
   while this one's product runs (``state_stages``, 4 or 6: :data:`SCHEDULES`). On the H200 at
   that shape the walk alone went from 0.248 ms (loads one chunk ahead by hand, through
   registers, then scaled) to 0.168 ms with 3 stages, 0.128 with 4 and 0.106 with 6; with a
   decay from 0.328 to 0.201.
2. ``_chunk_out``: one program per (value block, batch x head, group of chunks) computes the
   chunks' outputs, :math:`o = (s\,q k^\top \circ D)\, v + s\, e^{c} \circ (q S)`, from their
   own inputs and the saved states: every chunk at once, all matrix products. The value block
   is the grid's first axis, so the programs that share a chunk's ``q`` and ``k`` run side by
   side and read them from memory once (0.149 -> 0.129 ms alone at d=128), and value blocks of
   128 halve those reads again (0.117 ms; 32-wide blocks took 0.186).

The two can overlap: where the walk has fewer programs than the GPU has multiprocessors (the
"narrow" plan of :data:`SCHEDULES`), the forward walks in 4 segments on a high-priority stream of
its own, and each segment's outputs run on the caller's stream as soon as its states are written,
beside the walk through the next segment. Such a walk leaves most multiprocessors idle and waits
on latency; the outputs are bound by bandwidth; side by side, ideally only the last segment's
outputs stay on the critical path (measured below: less than that). A stream is not a thread:
the same kernels, in the same order for each chunk, and the same numbers as one walk then all the
outputs; on the CPU the segments run one after another.

The saved states are what the backward needs (``n_chunks * d_k * d_v`` numbers per head: the
keys' count times ``d_v / C``, as many as the keys at ``C = d_v``), so the backward
reads them instead of running the forward scan again; memory for time, and the scan is the
part that parallelizes worst.

Measured on the H200 (bf16, 2026-12-03, ``benchmarks/NOTES.md``): with the states saved in
bfloat16 the forward at B=1, L=16384, H=16, d=128 went from 0.443 to 0.310 ms and the forward
and backward from 1.122 to 0.802 ms; a chunk-parallel walk (every chunk's own share at once,
then a pipelined walk adding them up) took 0.414 / 1.009 ms and was removed. The walk's and
the outputs' changes above are from the A/B in
``benchmarks/results/sweeps/2026-12-03-h200-stop23-linear_attention-walk.json`` (flash-linear-
attention's own two kernels took 0.115 ms, ``chunk_fwd_h``, and 0.118, ``chunk_fwd_o``, there).
Segments alone gained nothing: one-chunk output programs fill every multiprocessor and the
walk's next segment waits behind them; with four chunks per output program they left room. The
"narrow" plan of ``SCHEDULES`` (6 walk stages, 4 segments, 4-chunk outputs) took 0.217 ms at the
target against 0.246 for the "wide" one (one walk with 4 stages, then one-chunk outputs; with 6
stages, 0.227); it is taken only where the walk has fewer programs than multiprocessors: at B=4,
L=4096, H=32, d=64 it lost (0.164 against 0.144). Same run, the suite's rows
(``benchmarks/results/2026-12-03-h200-stop23b-linear_attention.json``): 0.217 ms against
``chunk_linear_attn``'s 0.230 at the target, 0.144 against 0.178 at d=64, decayed 0.328 and
0.193 against ``chunk_simple_gla``'s 0.485 and 0.483; at B=4, L=4096, H=16, d=128 still
behind (0.236 against 0.191).

The backward: the same recurrence, run in reverse
-------------------------------------------------
Write :math:`\bar S` for the gradient of the loss with respect to the state leaving a chunk.
Going back through the chunk, :math:`\bar S` picks up the outputs' gradients and decays:

.. math::

    \bar S_\text{in} = e^{c_\text{last}}\, \bar S_\text{out} + s\,(q \circ e^{c})^\top\, do,

the forward's state passing with time reversed, ``q`` in the place of ``k``, ``do`` in the
place of ``v`` and the weights :math:`e^{c_t}` (decay from the chunk's start to step t) in
place of :math:`e^{c_\text{last} - c_j}`. So ``_state_pass`` runs again with ``REVERSE``
set, starting from the final state's gradient, and saves :math:`\bar S_\text{out}` of every
chunk; what it ends with is the initial state's gradient. Then ``_chunk_grads``, one program
per (batch, head, chunk), has everything to hand: with :math:`D_{tj} = e^{c_t - c_j}`
(:math:`j \le t`), :math:`A = s\,(q k^\top) \circ D` and :math:`dA = s\,(do\, v^\top) \circ D`,

.. math::

    dq = dA\, k + s\, e^{c} \circ (do\, S_\text{in}^\top), \qquad
    dk = dA^\top q + e^{c_\text{last} - c} \circ (v\, \bar S_\text{out}^\top), \qquad
    dv = A^\top do + e^{c_\text{last} - c} \circ (k\, \bar S_\text{out}).

It visits the value columns in blocks of ``BLOCK_V``: each block finishes its columns of
``dv`` and adds its share to the sums over columns that ``dq`` and ``dk`` need
(:math:`do\,v^\top`, :math:`do\,S_\text{in}^\top`, :math:`v\,\bar S_\text{out}^\top`), so that
only a ``(d_k, BLOCK_V)`` slice of each state is on chip at a time. Holding both
whole states at ``d = 128`` needed 256 KB of shared memory, more than a Hopper block has.

The decay's gradient needs no kernel of its own. On paper :math:`q_t` enters only as
:math:`q_t e^{\sum_{r\le t} a_r}` and :math:`k_j` as :math:`k_j e^{-\sum_{r\le j} a_r}`
(and the final state carries one more :math:`e^{\sum_r a_r}`), so the gradient with respect
to the running sum at step t is :math:`q_t\cdot dq_t - k_t\cdot dk_t` (plus
:math:`\langle \bar S_\text{final}, S_\text{final}\rangle` at the last step), and
:math:`da_r` is its sum over :math:`t \ge r`: a reverse cumulative sum, done in PyTorch
(:func:`_log_decay_grad`). The exponentials that would overflow (:math:`e^{-\sum a}`) are
never computed: they cancel in the identity.

Numerics
--------
Every exponent in every kernel is :math:`\le 0`: cumulative log-decays are taken inside
a chunk only (``tl.cumsum`` over at most ``C`` steps), and each factor is a decay from
an earlier step to a later one. Padded steps past the end of the sequence load
``q = k = v = 0`` and ``a = 0`` (an identity step), so they change nothing.

Precision: float32 inputs multiply in true float32 (``ieee``). With float16 or bfloat16
inputs, the products of inputs (:math:`qk^\top`, :math:`do\,v^\top`, the masked scores
times ``v``, and the state updates :math:`k^\top (w \circ v)`, the weighted values rounded to
the input format) feed the tensor cores in that format; products that read a float32 state
take float32 operands at TF32 precision. The states saved per chunk are float32, except
for bfloat16 inputs (``CONFIG["state_16bit"]``): their states are saved in bfloat16, half
the bytes that the walk writes and the output and gradient kernels read, and multiplied in
bfloat16. float16 inputs keep float32 states: float16's range (65504) is too small for a
long undecayed state in general. Everything accumulates in float32; the walk carries its
state in float32 and the final state is float32, rounded only where it is saved per chunk.

Portability: Triton 3.6 (compiled, Hopper) and 3.9 (the interpreter): ``tl.dot``,
``tl.cumsum``; no tensor descriptors. Head dimensions ``d_k, d_v`` in 16..128, chunk ``C``
in 16, 32, 64 (tile sides; at 128, float32 tiles at ``d = 128`` pass the shared-memory
limit). Every configuration in that range was compiled for sm_90 with Triton 3.6 and fits
in shared memory (the largest, ``_chunk_grads`` for float32 at ``d = 128``, ``C = 64``, takes
176 KB of the 227 KB). Inputs are made contiguous ``(B, L, H, d)``.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from .. import backend as _backend


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """``a @ b`` accumulated in float32; ``WIDEN`` (the interpreter) multiplies in float32."""
    if WIDEN:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _chunk_log_decay(A, base, t, live, H, C: tl.constexpr, HAS_DECAY: tl.constexpr):
    """``c`` (C,): the cumulative log-decay inside the chunk at each step (0 without decay)."""
    if HAS_DECAY:
        a = tl.load(A + base + t * H, mask=live, other=0.0).to(tl.float32)
        c = tl.cumsum(a, axis=0)
    else:
        c = tl.zeros((C,), dtype=tl.float32)
    return c


@triton.jit
def _walk_inputs(X, Y, A, b, h, chunk, steps, rows_k, cols, L, H, DK: tl.constexpr, DV: tl.constexpr,
                 HAS_DECAY: tl.constexpr, C: tl.constexpr):  # fmt: skip
    """One chunk's ``x`` transposed ``(BLOCK_K, C)``, ``y (C, BLOCK_V)`` and cumulative log-decays ``c (C,)``."""
    t = chunk * C + steps
    live = t < L
    tok = (b * L + t.to(tl.int64)) * H + h  # (C,) token index into (B, L, H)
    xt = tl.load(X + tok[None, :] * DK + rows_k[:, None], mask=live[None, :], other=0.0)
    y = tl.load(Y + tok[:, None] * DV + cols[None, :], mask=live[:, None], other=0.0)
    return xt, y, _chunk_log_decay(A, b * L * H + h, t.to(tl.int64), live, H, C, HAS_DECAY)


@triton.jit
def _state_pass(
    X, Y,  # (B, L, H, DK), (B, L, H, DV): k and v (forward), q and do (reverse)
    A,  # (B, L, H) log-decays (if HAS_DECAY)
    S0,  # (B, H, DK, DV) float32: the state before the first chunk of the walk (if HAS_S0)
    STATES,  # (B, H, NC, DK, DV) out: the state entering each chunk (in walk order)
    S_END,  # (B, H, DK, DV) float32 out: the state after the walk (may be S0: each program reads its tile first)
    L, H, NC, FIRST, N_STEPS, x_scale,  # the walk visits chunks FIRST, FIRST +- 1, ... (N_STEPS of them)
    DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, REVERSE: tl.constexpr, SCALED: tl.constexpr,
    STAGES: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
):  # fmt: skip
    r"""The walk over chunks for one (batch, head, ``BLOCK_K`` x ``BLOCK_V`` tile of the state). The chunk's
    weights multiply ``y`` (:math:`(x \circ w)^\top y = x^\top (w \circ y)`), so that ``x`` goes from memory
    to the product untouched, through the loop's pipelined loads (``STAGES``); without a decay and with
    ``x_scale = 1`` (``SCALED`` false) nothing is multiplied at all."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rows_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    steps = tl.arange(0, C)
    state_offs = rows_k[:, None] * DV + cols[None, :]  # inside one (DK, DV) state
    if HAS_S0:
        S = tl.load(S0 + bh.to(tl.int64) * DK * DV + state_offs)
    else:
        S = tl.zeros((BLOCK_K, BLOCK_V), dtype=tl.float32)
    for i in tl.range(0, N_STEPS, num_stages=STAGES):
        if REVERSE:
            chunk = FIRST - i
        else:
            chunk = FIRST + i
        xt, y, c = _walk_inputs(X, Y, A, b, h, chunk, steps, rows_k, cols, L, H, DK, DV, HAS_DECAY, C)
        tl.store(STATES + (bh.to(tl.int64) * NC + chunk) * DK * DV + state_offs, S.to(STATES.dtype.element_ty))
        if SCALED:
            if HAS_DECAY:
                c_last = tl.sum(tl.where(steps == C - 1, c, 0.0), axis=0)  # padded steps add 0: the last real one's
                if REVERSE:
                    w = tl.exp(c)  # the decay from the chunk's start to step t: how the entering state reached it
                else:
                    w = tl.exp(c_last - c)  # from step j to the chunk's end
                y = (y.to(tl.float32) * (w * x_scale)[:, None]).to(y.dtype)
                S = tl.exp(c_last) * S
            else:
                y = (y.to(tl.float32) * x_scale).to(y.dtype)
        S += _mm(xt, y, PRECISION, WIDEN)
    tl.store(S_END + bh.to(tl.int64) * DK * DV + state_offs, S)


@triton.jit
def _chunk_out(
    Q, K, V, A, STATES, O,
    L, H, NC, FIRST, END, scale,  # the outputs of chunks FIRST .. END - 1
    DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BLOCK_V: tl.constexpr, GROUP: tl.constexpr,
    STAGES: tl.constexpr, HAS_DECAY: tl.constexpr, PRECISION: tl.constexpr, STATE_PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
):  # fmt: skip
    """The outputs of ``GROUP`` consecutive chunks, one ``BLOCK_V`` block of value columns: the loop's loads are
    pipelined (``STAGES``), so that the next chunk's inputs arrive while this one's products run. The value
    block is the grid's first axis: the blocks of one chunk run side by side and read its q and k from memory once."""
    vb, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    rows_k = tl.arange(0, DK)
    steps = tl.arange(0, C)
    causal = steps[:, None] >= steps[None, :]
    stop = tl.minimum(L, END * C)  # the steps past the last chunk
    for j in tl.range(0, GROUP, num_stages=STAGES):
        chunk = FIRST + tl.program_id(2) * GROUP + j
        t = chunk * C + steps
        live = t < stop  # all false past the end (the last program's group may run over)
        tok = (b * L + t.to(tl.int64)) * H + h
        q = tl.load(Q + tok[:, None] * DK + rows_k[None, :], mask=live[:, None], other=0.0)  # (C, DK)
        k = tl.load(K + tok[:, None] * DK + rows_k[None, :], mask=live[:, None], other=0.0)
        v = tl.load(V + tok[:, None] * DV + cols[None, :], mask=live[:, None], other=0.0)  # (C, BLOCK_V)
        state = bh.to(tl.int64) * NC + tl.minimum(chunk, END - 1)  # past the end: any state, nothing is stored
        S = tl.load(STATES + state * DK * DV + rows_k[:, None] * DV + cols[None, :])
        # 1. intra-chunk: (s q k^T o D) v, D_tj = exp(c_t - c_j) for j <= t
        scores = _mm(q, tl.trans(k), PRECISION, WIDEN)  # (C, C)
        if HAS_DECAY:
            c = _chunk_log_decay(A, b * L * H + h, t.to(tl.int64), live, H, C, HAS_DECAY)
            scores *= tl.exp(tl.where(causal, c[:, None] - c[None, :], float("-inf"))) * scale
        else:
            scores = tl.where(causal, scores * scale, 0.0)
        o = _mm(scores.to(v.dtype), v, PRECISION, WIDEN)
        # 2. inter-chunk: the entering state, decayed to step t
        qS = _mm(q.to(S.dtype), S, STATE_PRECISION, WIDEN)
        if HAS_DECAY:
            o += (tl.exp(c) * scale)[:, None] * qS
        else:
            o += scale * qS
        tl.store(O + tok[:, None] * DV + cols[None, :], o.to(O.dtype.element_ty), mask=live[:, None])


@triton.jit
def _chunk_grads(
    Q, K, V, A, DO, STATES, DSTATES, DQ, DK_, DV_,
    L, H, NC, scale,
    DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_DECAY: tl.constexpr, PRECISION: tl.constexpr, STATE_PRECISION: tl.constexpr, WIDEN: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows_k = tl.arange(0, DK)
    steps = tl.arange(0, C)
    t = chunk * C + steps
    live = t < L
    tok = (b * L + t.to(tl.int64)) * H + h
    q = tl.load(Q + tok[:, None] * DK + rows_k[None, :], mask=live[:, None], other=0.0)  # (C, DK)
    k = tl.load(K + tok[:, None] * DK + rows_k[None, :], mask=live[:, None], other=0.0)
    c = _chunk_log_decay(A, b * L * H + h, t.to(tl.int64), live, H, C, HAS_DECAY)
    c_last = tl.sum(tl.where(steps == C - 1, c, 0.0), axis=0)
    causal = steps[:, None] >= steps[None, :]
    D = tl.exp(tl.where(causal, c[:, None] - c[None, :], float("-inf"))) * scale  # s D, (C, C)
    A_T = tl.trans(_mm(q, tl.trans(k), PRECISION, WIDEN) * D).to(q.dtype)  # the forward's masked scores, transposed
    to_end = tl.exp(c_last - c)  # (C,): from step j to the chunk's end
    # The value columns are visited in blocks of BLOCK_V, so that only a (DK, BLOCK_V) slice of
    # the two float32 states is on chip at a time: dv is finished block by block, and the
    # sums over the value columns that dq and dk need are accumulated.
    dA = tl.zeros((C, C), dtype=tl.float32)  # do v^T
    dq_state = tl.zeros((C, DK), dtype=tl.float32)  # do S_in^T
    dk_state = tl.zeros((C, DK), dtype=tl.float32)  # v dS_out^T
    state_base = (bh.to(tl.int64) * NC + chunk) * DK * DV
    for v0 in range(0, DV, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        v = tl.load(V + tok[:, None] * DV + cols[None, :], mask=live[:, None], other=0.0)  # (C, BLOCK_V)
        do = tl.load(DO + tok[:, None] * DV + cols[None, :], mask=live[:, None], other=0.0)
        state = state_base + rows_k[:, None] * DV + cols[None, :]
        S_in = tl.load(STATES + state)  # (DK, BLOCK_V) float32: the state entering the chunk
        dS_out = tl.load(DSTATES + state)  # ... and the gradient of the one leaving it
        dA += _mm(do, tl.trans(v), PRECISION, WIDEN)
        dq_state += _mm(do.to(S_in.dtype), tl.trans(S_in), STATE_PRECISION, WIDEN)
        dk_state += _mm(v.to(dS_out.dtype), tl.trans(dS_out), STATE_PRECISION, WIDEN)
        # dv: through the intra-chunk scores, and through the state the chunk leaves behind
        dv = _mm(A_T, do, PRECISION, WIDEN) + to_end[:, None] * _mm(k.to(dS_out.dtype), dS_out, STATE_PRECISION, WIDEN)
        tl.store(DV_ + tok[:, None] * DV + cols[None, :], dv.to(DV_.dtype.element_ty), mask=live[:, None])
    dA = dA * D  # masked like the scores
    # dq: through the intra-chunk scores, and through the entering state
    dq = _mm(dA.to(k.dtype), k, PRECISION, WIDEN) + (tl.exp(c) * scale)[:, None] * dq_state
    # dk: through the intra-chunk scores, and through the state the chunk leaves behind
    dk = _mm(tl.trans(dA).to(q.dtype), q, PRECISION, WIDEN) + to_end[:, None] * dk_state
    tl.store(DQ + tok[:, None] * DK + rows_k[None, :], dq.to(DQ.dtype.element_ty), mask=live[:, None])
    tl.store(DK_ + tok[:, None] * DK + rows_k[None, :], dk.to(DK_.dtype.element_ty), mask=live[:, None])


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

#: Warps by kernel, the value block of the output kernel, the state tile of the state-passing walk
#: (``state_block_k x state_block_v``) and its pipeline stages, the forward's walk segments and the
#: chunks per output program (with their stages). From the H200 sweeps of 2026-12-03
#: (``benchmarks/NOTES.md``); ``None``: chosen by :func:`_schedule`. ``state_16bit``: the input dtypes
#: whose per-chunk states are saved in that dtype (module docstring, Precision).
CONFIG = dict(BLOCK_V=128, grad_block_v=32, state_block_k=64, state_block_v=32, state_warps=4, state_stages=None,
              out_warps=4, out_group=None, out_stages=None, segments=None, grad_warps=8,
              state_16bit=(torch.bfloat16,))  # fmt: skip

#: :func:`_schedule`'s two plans: a walk with at least one program per multiprocessor hides its latency across
#: programs; a walk with fewer leaves the GPU to the outputs, so it takes deeper pipelining and runs in segments
#: beside the outputs, which come in fewer, longer programs so as not to crowd it out. "narrow" is taken with
#: 16-bit saved states only (the sweeps' case; float32 tiles in 2 output stages would pass shared memory).
SCHEDULES = {"wide": dict(state_stages=4, segments=1, out_group=1, out_stages=1),
             "narrow": dict(state_stages=6, segments=4, out_group=4, out_stages=2)}  # fmt: skip


def _schedule(x, y):
    """The walk's stages, the forward's segments and the output programs' chunks for keys ``x`` and values
    ``y``: :data:`SCHEDULES` by the walk's program count against the multiprocessors, and CONFIG where set."""
    B, _, H, DK = x.shape
    grid, _, _ = _state_grid_blocks(B, H, DK, y.shape[-1])
    narrow = x.is_cuda and _state_dtype(x.dtype).itemsize == 2 and math.prod(grid) < _multiprocessors(x.device)
    plan = dict(SCHEDULES["narrow" if narrow else "wide"])
    plan.update({key: CONFIG[key] for key in plan if CONFIG[key] is not None})
    return plan


@functools.cache
def _multiprocessors(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def _state_dtype(dtype):
    """The dtype of the per-chunk states saved for inputs of ``dtype``."""
    return dtype if dtype in CONFIG["state_16bit"] else torch.float32


def _state_grid_blocks(B, H, DK, DV):
    """``(grid, BLOCK_K, BLOCK_V)`` of ``_state_pass``."""
    block_k, block_v = min(CONFIG["state_block_k"], DK), min(CONFIG["state_block_v"], DV)
    return (B * H, triton.cdiv(DV, block_v), triton.cdiv(DK, block_k)), block_k, block_v


def _precisions(dtype):
    """(products of inputs, products with the float32 state)."""
    return ("ieee", "ieee") if dtype == torch.float32 else ("tf32", "tf32")


def _walk(x, y, log_decay, s0, states, s_end, x_scale, C, reverse, chunks=None):
    """The state-passing walk: forward ``x, y = k, v``; reverse ``x, y = q, do`` (module docstring).
    Fills ``states`` (the state entering each chunk, in walk order) and ``s_end``. ``chunks = (first, end)``:
    the forward walk over those chunks only, from the state ``s0`` entering ``first``."""
    B, L, H, DK = x.shape
    DV = y.shape[-1]
    NC = states.shape[2]
    first, end = chunks or (0, NC)
    has_decay, widen = log_decay is not None, _backend.interpreting()
    a = log_decay if has_decay else x
    grid, block_k, block_v = _state_grid_blocks(B, H, DK, DV)
    _state_pass[grid](
        x, y, a, s0 if s0 is not None else s_end, states, s_end,
        L, H, NC, NC - 1 if reverse else first, end - first, x_scale,
        DK=DK, DV=DV, C=C, BLOCK_K=block_k, BLOCK_V=block_v, HAS_DECAY=has_decay, HAS_S0=s0 is not None,
        REVERSE=reverse, SCALED=has_decay or x_scale != 1.0, STAGES=_schedule(x, y)["state_stages"],
        PRECISION=_precisions(x.dtype)[1], WIDEN=widen, num_warps=CONFIG["state_warps"],
    )  # fmt: skip


def _outputs(q, k, v, log_decay, states, scale, C, o=None, chunks=None):
    """Launch ``_chunk_out``: the outputs of every chunk (or of ``chunks = (first, end)``, into ``o``) from
    its inputs and its entering state."""
    B, L, H, DK = q.shape
    DV = v.shape[-1]
    NC = states.shape[2]
    first, end = chunks or (0, NC)
    BLOCK_V = min(CONFIG["BLOCK_V"], DV)
    precision, state_precision = _precisions(q.dtype)
    o = torch.empty_like(v) if o is None else o
    plan = _schedule(k, v)
    group = plan["out_group"]
    _chunk_out[(triton.cdiv(DV, BLOCK_V), B * H, triton.cdiv(end - first, group))](
        q, k, v, log_decay if log_decay is not None else q, states, o, L, H, NC, first, end, scale, DK=DK, DV=DV, C=C,
        BLOCK_V=BLOCK_V, GROUP=group, STAGES=plan["out_stages"], HAS_DECAY=log_decay is not None, PRECISION=precision,
        STATE_PRECISION=state_precision, WIDEN=_backend.interpreting(), num_warps=CONFIG["out_warps"],
    )  # fmt: skip
    return o


def _forward(q, k, v, log_decay, initial_state, scale, C):
    """``(o, final_state, states)``; inputs contiguous; ``states (B, H, n_chunks, d_k, d_v)`` in
    :func:`_state_dtype`, the final state float32."""
    B, L, H, DK = q.shape
    DV = v.shape[-1]
    NC = triton.cdiv(L, C)
    states = torch.empty(B, H, NC, DK, DV, dtype=_state_dtype(q.dtype), device=q.device)
    final = torch.empty(B, H, DK, DV, dtype=torch.float32, device=q.device)
    segments = min(_schedule(k, v)["segments"], NC)
    if segments <= 1:
        _walk(k, v, log_decay, initial_state, states, final, 1.0, C, reverse=False)
        return _outputs(q, k, v, log_decay, states, scale, C), final, states
    # The walk in segments, on a stream of its own on a GPU, and each segment's outputs on the caller's
    # stream as soon as its states are written: they run beside the walk through the next segment.
    o = torch.empty_like(v)
    here, walker = (torch.cuda.current_stream(q.device), _walk_stream(q.device)) if q.is_cuda else (None, None)
    if walker is not None:
        walker.wait_stream(here)
    bounds = [NC * j // segments for j in range(segments + 1)]
    s_in = initial_state
    for first, end in zip(bounds, bounds[1:]):
        with torch.cuda.stream(walker) if walker is not None else contextlib.nullcontext():
            _walk(k, v, log_decay, s_in, states, final, 1.0, C, reverse=False, chunks=(first, end))
        if walker is not None:
            walked = torch.cuda.Event()
            walked.record(walker)
            here.wait_event(walked)  # the last segment's event joins the walker back
        _outputs(q, k, v, log_decay, states, scale, C, o=o, chunks=(first, end))
        s_in = final  # the state leaving this segment enters the next (each program reads its tile first)
    return o, final, states


@functools.cache
def _walk_stream(device):
    """The stream the segmented forward walks on, at the highest priority: its programs are the sequential
    path, so they should go first when the outputs' programs compete with them for a multiprocessor."""
    return torch.cuda.Stream(device, priority=-1024)  # beyond the device's range: its highest


def _backward(q, k, v, log_decay, states, do, d_final, scale, C, float32_dqdk=False):
    """``(dq, dk, dv, d_initial_state)``, the last float32; ``dq, dk`` too with ``float32_dqdk``."""
    B, L, H, DK = q.shape
    DV = v.shape[-1]
    NC = triton.cdiv(L, C)
    precision, state_precision = _precisions(q.dtype)
    widen = _backend.interpreting()
    dstates = torch.empty_like(states)
    d_initial = torch.empty(B, H, DK, DV, dtype=torch.float32, device=q.device)
    a = log_decay if log_decay is not None else q
    _walk(q, do, log_decay, d_final, dstates, d_initial, scale, C, reverse=True)
    # The reverse walk stored, at each chunk, the gradient arriving from the chunks after it:
    # exactly the gradient of the state that chunk leaves behind.
    dq_dtype = torch.float32 if float32_dqdk else q.dtype
    dq, dk, dv = torch.empty_like(q, dtype=dq_dtype), torch.empty_like(k, dtype=dq_dtype), torch.empty_like(v)
    _chunk_grads[(B * H, NC)](
        q, k, v, a, do, states, dstates, dq, dk, dv, L, H, NC, scale, DK=DK, DV=DV, C=C,
        BLOCK_V=min(CONFIG["grad_block_v"], DV),
        HAS_DECAY=log_decay is not None, PRECISION=precision, STATE_PRECISION=state_precision, WIDEN=widen,
        num_warps=CONFIG["grad_warps"],
    )  # fmt: skip
    return dq, dk, dv, d_initial


def _log_decay_grad(q, k, dq, dk, final, d_final):
    r"""``d log_decay (B, L, H)`` float32: the reverse cumulative sum of
    :math:`q_t\cdot dq_t - k_t\cdot dk_t`, plus :math:`\langle \bar S_\text{final}, S_\text{final}\rangle`
    at the last step (module docstring)."""
    g = (q.float() * dq.float()).sum(-1) - (k.float() * dk.float()).sum(-1)  # (B, L, H)
    if d_final is not None:
        g[:, -1] += (d_final.float() * final).sum((-2, -1))
    return _reverse_cumsum(g)


def _reverse_cumsum(g, C=64):
    """``out[:, t] = sum over r >= t of g[:, r]`` for ``g (B, L, H)``, in two levels: inside blocks of ``C`` steps,
    then over the blocks' totals. One cumulative sum along L has only ``B * H`` independent columns (16 at
    B=1, H=16) and took 2.77 ms on the H200 at L=16384; the two levels, 0.083 ms (NOTES, session 23)."""
    B, L, H = g.shape
    n = triton.cdiv(L, C)
    blocks = torch.nn.functional.pad(g, (0, 0, 0, n * C - L)).view(B, n, C, H)  # zeros add nothing
    inside = blocks.flip(2).cumsum(2).flip(2)  # (B, n, C, H): from each step to its block's end
    totals = inside[:, :, 0]  # (B, n, H)
    after = totals.flip(1).cumsum(1).flip(1) - totals  # the blocks after each block
    return (inside + after[:, :, None]).view(B, n * C, H)[:, :L]


class ChunkedLinearAttention(torch.autograd.Function):
    """``(o, final_state)``; saves the inputs and the state entering each chunk."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, scale, chunk_size):
        q, k, v = (x.contiguous() for x in (q, k, v))
        a = None if log_decay is None else log_decay.float().contiguous()
        s0 = None if initial_state is None else initial_state.float().contiguous()
        o, final, states = _forward(q, k, v, a, s0, scale, chunk_size)
        ctx.save_for_backward(q, k, v, a, states, final)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        ctx.log_decay_dtype = None if log_decay is None else log_decay.dtype
        ctx.initial_state_dtype = None if initial_state is None else initial_state.dtype
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, a, states, final = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
        d_final = None if d_final is None else d_final.float().contiguous()
        # The decay's gradient is a difference q.dq - k.dk whose terms may nearly cancel: it is
        # taken from dq and dk in float32, before they are rounded to a 16-bit input dtype.
        wants_decay = a is not None and ctx.needs_input_grad[3]
        dq, dk, dv, d_initial = _backward(q, k, v, a, states, do, d_final, ctx.scale, ctx.chunk_size, wants_decay)
        d_log_decay = None
        if wants_decay:
            d_log_decay = _log_decay_grad(q, k, dq, dk, final, d_final).to(ctx.log_decay_dtype)
            dq, dk = dq.to(q.dtype), dk.to(k.dtype)
        d_s0 = d_initial.to(ctx.initial_state_dtype) if ctx.initial_state_dtype is not None else None
        return dq, dk, dv, d_log_decay, d_s0, None, None


def linear_attention(q, k, v, log_decay=None, initial_state=None, scale=None, chunk_size=64):
    """The kernel behind :func:`seqbook.linear_attention.linear_attention` (no validation
    here: call that). Returns ``(o, final_state)``, the final state float32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return ChunkedLinearAttention.apply(q, k, v, log_decay, initial_state, scale, chunk_size)
