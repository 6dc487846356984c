r"""Triton kernels: the chunked SSD (Mamba-2), forward and backward.

The readable forms (:func:`seqbook.mamba.ssd_quadratic`, :func:`seqbook.mamba.ssd_chunked`),
the glossary and the shapes are in :mod:`seqbook.mamba`; the public entry is
:func:`seqbook.mamba.ssd`, which calls :func:`ssd_forward` (no gradient needed) or
:class:`SSDFunction` (an autograd function: gradients for ``x, dt, A, B, C`` and the
initial state).

Notation, for one (batch element, head) and one chunk of ``Q`` steps: :math:`c_t` is the
cumulative sum of :math:`\Delta A` inside the chunk (short, so differences of it are
accurate), :math:`c_\text{last}` its total, :math:`S` the ``(P, N)`` state entering the
chunk and :math:`S'` the one leaving it. The chunk computes (Dao and Gu 2024, Sec. 6)

.. math::

    y_t = \sum_{s \le t} \underbrace{(C_t \cdot B_s)\, e^{c_t - c_s} \Delta_s}_{M_{ts}} x_s
          + e^{c_t} S C_t, \qquad
    S' = e^{c_\text{last}} S + \sum_s \underbrace{e^{c_\text{last} - c_s} \Delta_s}_{w_s} x_s B_s^\top .

Two designs of the forward
--------------------------
*Fused* (:func:`_ssd_fwd`): one program per (batch element, head, block of ``BLOCK_P``
channels) holds its block of the state in registers and walks the chunks in order. No
state ever goes to memory, but the parallelism is ``batch * heads * P / BLOCK_P``
programs: 128 at the benchmark shape (about one per SM), only 32 at batch 1.

*Split* (three kernels, as mamba_ssm's): (1) :func:`_chunk_states` computes every chunk's
own contribution :math:`\sum_s w_s x_s B_s^\top` in parallel; (2) :func:`_state_pass` runs
the recurrence :math:`S \leftarrow e^{c_\text{last}} S + (\ldots)` over chunks, elementwise
on ``(P N)``-long rows, writing the state entering each chunk; (3) :func:`_chunk_outputs`
computes every chunk's outputs in parallel. More passes over memory, but
``batch * heads * chunks`` programs. :func:`ssd_forward` takes it when the fused grid
would leave SMs idle.

The backward
------------
Given :math:`\bar y = \partial \ell / \partial y` and the gradient of the final state,
the gradient of the state entering each chunk obeys the same recurrence backwards:
:math:`\bar S_{c} = e^{c_\text{last}} \bar S'_{c} + \sum_t e^{c_t} \bar y_t C_t^\top` (the
second term from the chunk's own outputs), with :math:`\bar S'_c = \bar S_{c+1}`. The
backward needs, per chunk, :math:`S` (the state entering it, which the forward does not keep:
it is recomputed) and :math:`\bar S'`. It runs both recurrences in the forward's design:
after a split forward, with pieces (1) and (2) twice (:func:`_chunk_states` and
:func:`_state_pass` in order on ``x`` and ``B`` for :math:`S`; with the weights
:math:`e^{c_t}` on :math:`\bar y` and :math:`C`, in reverse, for :math:`\bar S`); after a
fused one, with :func:`_state_walks`: a program per tile of a (batch element, head)'s state
walks the chunks forwards for :math:`S`, its twin backwards for :math:`\bar S`. Last,
:func:`_ssd_bwd` differentiates one chunk with :math:`S` and :math:`\bar S'` in hand, in
parallel over chunks (formulas in its comments).

Precision: float32 inputs are multiplied in full float32 (``input_precision="ieee"``, not
TF32). With bfloat16 or float16 inputs, products of inputs (``C B^T``, masked scores times
``x``) feed the tensor cores in that format; states and their gradients stay float32 (in
memory too, unless a configuration's ``state_dtype`` says otherwise), and their products
take float32 operands at TF32 precision. Everything accumulates in float32.

Memory: training keeps the inputs and the initial state for the backward, nothing per chunk
(as mamba_ssm's ``mamba_chunk_scan_combined``). The states entering the chunks, ``batch *
(L / Q) * heads * P * N`` floats (537 MB at the benchmark shape, ``Q = 32``), exist only
inside the backward, beside their gradients (as many again). On the H200 (GPU call B2, B=4,
L=4096, H=32, P=64, N=128 bf16, ``torch.cuda`` memory counters): 0 MB held from the forward
to the backward besides ``y`` (537 MB when the states were kept); a stack of four calls
holds 268 MB after its forwards (2416 MB with the states kept) and peaks at 1980 MB (3580
MB); one fwd+bwd peaks at 1772 MB either way, 1244 MB with ``atomic_dbc``. The option
``keep_states=True`` is the design before: the forward stores the states and the backward
reads them (no recomputation, the memory held from the forward to the backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import interpreting


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """``a @ b`` with float32 accumulation. ``WIDEN`` (set under the interpreter) multiplies
    in float32: Triton 3.9's interpreter gets ``tl.dot`` of bfloat16 operands wrong."""
    if WIDEN:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _heads(H, G):
    """This program's batch element, head and group (axis 0 runs over ``batch * heads``;
    the ``H / G`` heads of a group share its ``B`` and ``C``)."""
    batch = tl.program_id(0) // H
    head = tl.program_id(0) % H
    return batch, head, head // (H // G)


@triton.jit
def _state_tile(batch, chunk, n_chunks, head, H, P, N, p, n):
    """Offsets and mask of the ``(BLOCK_P, BLOCK_N)`` tile at channels ``p``, state indices
    ``n`` of a ``(Bt, chunks, H, P, N)`` tensor of states (``chunk = 0, n_chunks = 1``: of a
    ``(Bt, H, P, N)`` one)."""
    offs = (((batch * n_chunks + chunk).to(tl.int64) * H + head) * P + p[:, None]) * N + n[None, :]
    return offs, (p < P)[:, None] & (n < N)[None, :]


@triton.jit
def _input_weights(c, c_last, dt, live, FROM_START: tl.constexpr):
    """Per step of a chunk: ``w_s = e^{c_last - c_s} dt_s``, the weight of input ``s`` in the
    state leaving the chunk (forward), or ``e^{c_t}``, the decay from the state entering the
    chunk to step ``t`` (``FROM_START``: the weight of ``dy_t C_t^T`` in that state's gradient)."""
    if FROM_START:
        w = tl.where(live, tl.exp(c), 0.0)
    else:
        w = tl.exp(c_last - c) * dt  # (dt = 0 past the end)
    return w


@triton.jit
def _weighted_outer(u, v, w, WIDEN: tl.constexpr, STATE_PRECISION: tl.constexpr):
    """``sum_s w_s u_s v_s^T`` ``(BLOCK_P, BLOCK_N)``, float32, for ``u`` ``(Q, BLOCK_P)`` (x or
    dy) and ``v`` ``(Q, BLOCK_N)`` (B or C): a chunk's own part of a state (or its gradient)."""
    uw = u.to(tl.float32) * w[:, None]
    return _mm(tl.trans(uw), v.to(tl.float32), STATE_PRECISION, WIDEN)


@triton.jit
def _state_step(S, u, v, w, c_last, WIDEN: tl.constexpr, STATE_PRECISION: tl.constexpr):
    """One chunk of the state recurrence: ``e^{c_last} S + sum_s w_s u_s v_s^T``."""
    return tl.exp(c_last) * S + _weighted_outer(u, v, w, WIDEN, STATE_PRECISION)


@triton.jit
def _x_tile(batch, t, live, head, L, H, P, p):
    """Offsets and mask of the ``(Q, BLOCK_P)`` tile at steps ``t``, channels ``p`` of a
    ``(Bt, L, H, P)`` tensor (x, y, their gradients)."""
    return ((batch * L + t[:, None]) * H + head) * P + p[None, :], live[:, None] & (p < P)[None, :]


@triton.jit
def _bc_tile(batch, t, live, group, L, G, N, n):
    """Offsets and mask of the ``(Q, BLOCK_N)`` tile at steps ``t``, state indices ``n`` of a
    ``(Bt, L, G, N)`` tensor (B, C)."""
    return ((batch * L + t[:, None]) * G + group) * N + n[None, :], live[:, None] & (n < N)[None, :]


@triton.jit
def _load_chunk(X, DT, A, B, C, batch, head, group, t0, p, n, L, H, G, P, N, Q: tl.constexpr):
    """One chunk's tiles: ``x`` ``(Q, BLOCK_P)``, ``B``, ``C`` ``(Q, BLOCK_N)``, ``dt``, the
    cumulative log-decay ``c`` ``(Q,)`` and its total, the offsets of ``x`` and the masks.
    Steps past the end load ``dt = 0``: decay 1 and no input, so they change nothing."""
    t = (t0 + tl.arange(0, Q)).to(tl.int64)
    live = t < L
    x_offs, x_ok = _x_tile(batch, t, live, head, L, H, P, p)
    x = tl.load(X + x_offs, mask=x_ok, other=0.0)
    dt = tl.load(DT + (batch * L + t) * H + head, mask=live, other=0.0).to(tl.float32)
    bc_offs, bc_ok = _bc_tile(batch, t, live, group, L, G, N, n)
    Bc = tl.load(B + bc_offs, mask=bc_ok, other=0.0)
    Cc = tl.load(C + bc_offs, mask=bc_ok, other=0.0)
    a = dt * tl.load(A + head).to(tl.float32)
    c = tl.cumsum(a, axis=0)  # log of the decay from the chunk's start to step t
    c_last = tl.sum(a, axis=0)  # ... to its end
    return t, live, x_offs, x_ok, x, dt, bc_offs, bc_ok, Bc, Cc, c, c_last


@triton.jit
def _chunk_y(x, dt, Bc, Cc, c, S, PRECISION: tl.constexpr, STATE_PRECISION: tl.constexpr,
             WIDEN: tl.constexpr, Q: tl.constexpr):  # fmt: skip
    """A chunk's outputs ``(Q, BLOCK_P)`` from its inputs and the state ``S`` entering it."""
    rows = tl.arange(0, Q)
    causal = rows[:, None] >= rows[None, :]
    # 1. The chunk's own outputs: (L o C B^T)(Delta x), masked to s <= t.
    scores = _mm(Cc, tl.trans(Bc), PRECISION, WIDEN)  # (Q, Q): C_t . B_s
    decay = tl.exp(tl.where(causal, c[:, None] - c[None, :], float("-inf")))
    M = scores * decay * dt[None, :]
    y = _mm(M.to(x.dtype), x, PRECISION, WIDEN)
    # 2. What the state entering the chunk contributes at each step.
    # (the state stays float32: TF32 products for 16-bit inputs, not a rounding to 8 bits)
    y += tl.exp(c)[:, None] * _mm(Cc.to(tl.float32), tl.trans(S), STATE_PRECISION, WIDEN)
    return y


@triton.jit
def _ssd_fwd(
    X,  # (Bt, L, H, P)
    DT,  # (Bt, L, H)
    A,  # (H,)
    B, C,  # (Bt, L, G, N)
    S0,  # (Bt, H, P, N) float32: the initial state (if HAS_S0)
    Y,  # (Bt, L, H, P) output
    S_END,  # (Bt, H, P, N) float32 output: the final state
    STATES,  # (Bt, chunks, H, P, N) output: the state entering each chunk (if STORE_STATES)
    L, H, G, P, N,
    HAS_S0: tl.constexpr, STORE_STATES: tl.constexpr, WIDEN: tl.constexpr,  # (see _mm)
    PRECISION: tl.constexpr,  # products of the inputs: "ieee" for float32 inputs (ignored for 16-bit ones)
    STATE_PRECISION: tl.constexpr,  # products with the float32 state: "ieee" (float32 inputs) or "tf32"
    Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """The fused forward: one program per (batch, head, block of P) walks all chunks."""
    batch, head, group = _heads(H, G)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    state, pn_ok = _state_tile(batch, 0, 1, head, H, P, N, p, n)
    if HAS_S0:
        S = tl.load(S0 + state, mask=pn_ok, other=0.0)
    else:
        S = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)

    for t0 in tl.range(0, L, Q, num_stages=NUM_STAGES):
        if STORE_STATES:  # for the backward (the option "keep_states")
            offs, _ = _state_tile(batch, t0 // Q, tl.cdiv(L, Q), head, H, P, N, p, n)
            tl.store(STATES + offs, S.to(STATES.dtype.element_ty), mask=pn_ok)
        t, live, x_offs, x_ok, x, dt, bc_offs, bc_ok, Bc, Cc, c, c_last = _load_chunk(
            X, DT, A, B, C, batch, head, group, t0, p, n, L, H, G, P, N, Q)
        y = _chunk_y(x, dt, Bc, Cc, c, S, PRECISION, STATE_PRECISION, WIDEN, Q)
        tl.store(Y + x_offs, y.to(Y.dtype.element_ty), mask=x_ok)
        # 3. The state leaving the chunk: decayed old state plus the chunk's inputs.
        S = _state_step(S, x, Bc, _input_weights(c, c_last, dt, live, False), c_last, WIDEN, STATE_PRECISION)

    tl.store(S_END + state, S, mask=pn_ok)


@triton.jit
def _chunk_states(
    U,  # (Bt, L, H, P): x (forward) or the output gradient (backward)
    DT, A,
    V,  # (Bt, L, G, N): B (forward) or C (backward)
    OUT,  # (Bt, chunks, H, P, N) float32: sum_t weight_t U_t V_t^T per chunk
    L, H, G, P, N,
    FROM_START: tl.constexpr,  # weights e^{c_t} (backward) instead of e^{c_last - c_t} dt_t (forward)
    WIDEN: tl.constexpr, STATE_PRECISION: tl.constexpr,
    Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Per (batch * head, chunk, block of P): the chunk's own contribution to the state
    leaving it (forward), or to the gradient of the state entering it (backward)."""
    batch, head, group = _heads(H, G)
    chunk = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    t, live, x_offs, x_ok, u, dt, bc_offs, bc_ok, v, _, c, c_last = _load_chunk(
        U, DT, A, V, V, batch, head, group, chunk * Q, p, n, L, H, G, P, N, Q)
    out = _weighted_outer(u, v, _input_weights(c, c_last, dt, live, FROM_START), WIDEN, STATE_PRECISION)
    offs, pn_ok = _state_tile(batch, chunk, tl.num_programs(1), head, H, P, N, p, n)
    tl.store(OUT + offs, out, mask=pn_ok)


@triton.jit
def _walk(
    U, V, DT, A, INIT, OUT, END, batch, head, group, L, H, G, P, N,
    FROM_START: tl.constexpr, REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, STORE_END: tl.constexpr,
    WIDEN: tl.constexpr, STATE_PRECISION: tl.constexpr, Q: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, N_TILES: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """One state recurrence walked over all chunks by one program, its ``(BLOCK_P, BLOCK_N)``
    block of the state in registers: ``S <- e^{c_last} S + sum_s w_s u_s v_s^T``, storing
    ``S`` in ``OUT`` before each chunk's update (and the last one in ``END`` if ``STORE_END``).
    Forward (x, B, from the first chunk): the state entering each chunk. Backward (dy, C,
    ``FROM_START`` weights, from the last chunk): the gradient of the state leaving it. The
    entries of a state never mix (the decay is one number per step), so any tile of it walks
    alone: axis 1 runs over its ``(P / BLOCK_P) x (N / BLOCK_N)`` tiles (``BLOCK_N >= N``:
    ``N_TILES`` False, one tile of N)."""
    if N_TILES:
        n_blocks = tl.cdiv(N, BLOCK_N)
        p = tl.program_id(1) // n_blocks * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.program_id(1) % n_blocks * BLOCK_N + tl.arange(0, BLOCK_N)
    else:
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
    state, pn_ok = _state_tile(batch, 0, 1, head, H, P, N, p, n)
    if HAS_INIT:
        S = tl.load(INIT + state, mask=pn_ok, other=0.0)
    else:
        S = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    n_chunks = tl.cdiv(L, Q)
    for i in tl.range(0, n_chunks, num_stages=NUM_STAGES):
        if REVERSE:
            chunk = n_chunks - 1 - i
        else:
            chunk = i
        offs, _ = _state_tile(batch, chunk, n_chunks, head, H, P, N, p, n)
        tl.store(OUT + offs, S.to(OUT.dtype.element_ty), mask=pn_ok)
        t, live, x_offs, x_ok, u, dt, bc_offs, bc_ok, v, _, c, c_last = _load_chunk(
            U, DT, A, V, V, batch, head, group, chunk * Q, p, n, L, H, G, P, N, Q)
        S = _state_step(S, u, v, _input_weights(c, c_last, dt, live, FROM_START), c_last, WIDEN, STATE_PRECISION)
    if STORE_END:
        tl.store(END + state, S, mask=pn_ok)


@triton.jit
def _state_walks(
    X, B,  # the forward's inputs (Bt, L, H, P), (Bt, L, G, N)
    S0,  # (Bt, H, P, N) float32: the initial state (if HAS_S0)
    STATES,  # (Bt, chunks, H, P, N) output: the state entering each chunk
    DY, C,  # the output gradient (Bt, L, H, P), and C (Bt, L, G, N)
    DS_END,  # (Bt, H, P, N) float32: the gradient of the final state (if HAS_DS_END)
    DSTATES,  # (Bt, chunks, H, P, N) output: the gradient of the state leaving each chunk
    DS0,  # (Bt, H, P, N) float32 output: the gradient of the initial state
    DT, A, L, H, G, P, N,
    HAS_S0: tl.constexpr, HAS_DS_END: tl.constexpr, WIDEN: tl.constexpr, STATE_PRECISION: tl.constexpr,
    Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, N_TILES: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    r"""The backward's state walks after a fused forward, one program per (batch, head, tile of
    the state) and per walk along axis 2. The last along axis 2 walks the chunks from the
    last, holding :math:`\bar S` in registers: :math:`\bar S \leftarrow e^{c_\text{last}}
    \bar S + \sum_t e^{c_t} \bar y_t C_t^\top`. With two along axis 2, the first recomputes
    the states entering the chunks (the forward's recurrence; the forward does not keep
    them): the two walks are independent and run side by side."""
    batch, head, group = _heads(H, G)
    if tl.program_id(2) == tl.num_programs(2) - 1:
        _walk(DY, C, DT, A, DS_END, DSTATES, DS0, batch, head, group, L, H, G, P, N,
              FROM_START=True, REVERSE=True, HAS_INIT=HAS_DS_END, STORE_END=True, WIDEN=WIDEN,
              STATE_PRECISION=STATE_PRECISION, Q=Q, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, N_TILES=N_TILES,
              NUM_STAGES=NUM_STAGES)  # fmt: skip
    else:
        _walk(X, B, DT, A, S0, STATES, DS0, batch, head, group, L, H, G, P, N,
              FROM_START=False, REVERSE=False, HAS_INIT=HAS_S0, STORE_END=False, WIDEN=WIDEN,
              STATE_PRECISION=STATE_PRECISION, Q=Q, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, N_TILES=N_TILES,
              NUM_STAGES=NUM_STAGES)  # fmt: skip


@triton.jit
def _pass(INC, DECAY, S0, OUT, S_END, n_chunks, H, PN,
          HAS_S0: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """:func:`_state_pass`'s recurrence, for one (batch, head) and ``BLOCK`` elements."""
    bh = tl.program_id(0)
    batch, head = bh // H, bh % H
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = e < PN
    if HAS_S0:
        S = tl.load(S0 + bh.to(tl.int64) * PN + e, mask=ok, other=0.0)
    else:
        S = tl.zeros((BLOCK,), dtype=tl.float32)
    # Each step waits only on S; the next chunk's loads are issued a step ahead, so that their
    # latency overlaps the current update instead of adding to it.
    first = n_chunks - 1 if REVERSE else 0
    row = (batch * n_chunks + first).to(tl.int64) * H + head
    inc, decay = tl.load(INC + row * PN + e, mask=ok, other=0.0), tl.load(DECAY + row)
    for i in range(n_chunks):
        j = tl.minimum(i + 1, n_chunks - 1)  # the next chunk (the last one again at the end: harmless)
        chunk_next = n_chunks - 1 - j if REVERSE else j
        row_next = (batch * n_chunks + chunk_next).to(tl.int64) * H + head
        inc_next, decay_next = tl.load(INC + row_next * PN + e, mask=ok, other=0.0), tl.load(DECAY + row_next)
        tl.store(OUT + row * PN + e, S.to(OUT.dtype.element_ty), mask=ok)  # (after this chunk's INC was read)
        S = tl.exp(decay) * S + inc
        row, inc, decay = row_next, inc_next, decay_next
    tl.store(S_END + bh.to(tl.int64) * PN + e, S, mask=ok)


@triton.jit
def _state_pass(
    INC,  # (Bt, chunks, H, P*N) float32: each chunk's own contribution
    S0,  # (Bt, H, P*N) float32: the state before the first chunk taken (if HAS_S0)
    OUT,  # (Bt, chunks, H, P*N): the state before each chunk's update (may be INC, if float32)
    S_END,  # (Bt, H, P*N) float32: the state after the last update
    INC2, S0_2, OUT2, S_END2,  # the same for a second recurrence (if two programs along axis 2)
    DECAY,  # (Bt, chunks, H) float32: each chunk's total log-decay c_last (both recurrences')
    n_chunks, H, PN,
    HAS_S0: tl.constexpr, REVERSE: tl.constexpr, HAS_S0_2: tl.constexpr, REVERSE2: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """``S <- e^{c_last} S + INC[chunk]`` over the chunks, in order (forward: states) or in
    reverse (backward: their gradients), ``BLOCK`` elements of one (batch, head) per program.
    With two programs along axis 2, the second runs the second recurrence (the backward
    after a split forward: the states and their gradients, side by side)."""
    if tl.program_id(2) == 0:
        _pass(INC, DECAY, S0, OUT, S_END, n_chunks, H, PN, HAS_S0, REVERSE, BLOCK)
    else:
        _pass(INC2, DECAY, S0_2, OUT2, S_END2, n_chunks, H, PN, HAS_S0_2, REVERSE2, BLOCK)


@triton.jit
def _chunk_outputs(
    X, DT, A, B, C,
    STATES,  # (Bt, chunks, H, P, N): the state entering each chunk
    Y,  # (Bt, L, H, P)
    L, H, G, P, N,
    WIDEN: tl.constexpr, PRECISION: tl.constexpr, STATE_PRECISION: tl.constexpr,
    Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The split forward's last step: per (batch * head, chunk, block of P), the chunk's outputs."""
    batch, head, group = _heads(H, G)
    chunk = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    offs, pn_ok = _state_tile(batch, chunk, tl.num_programs(1), head, H, P, N, p, n)
    S = tl.load(STATES + offs, mask=pn_ok, other=0.0).to(tl.float32)
    t, live, x_offs, x_ok, x, dt, bc_offs, bc_ok, Bc, Cc, c, c_last = _load_chunk(
        X, DT, A, B, C, batch, head, group, chunk * Q, p, n, L, H, G, P, N, Q)
    y = _chunk_y(x, dt, Bc, Cc, c, S, PRECISION, STATE_PRECISION, WIDEN, Q)
    tl.store(Y + x_offs, y.to(Y.dtype.element_ty), mask=x_ok)


@triton.jit
def _ssd_bwd(
    X, DT, A, B, C,
    DY,  # (Bt, L, H, P): the output gradient
    STATES,  # (Bt, chunks, H, P, N): S, the state entering each chunk
    DSTATES,  # (Bt, chunks, H, P, N): the gradient of the state leaving each chunk
    DX,  # (Bt, L, H, P), x's dtype
    DB, DC,  # (P blocks, Bt, L, H, N): per head and block of P (summed by the caller); ATOMIC: (Bt, L, G, N) float32
    DDT,  # (P blocks, Bt, L, H) float32
    DA,  # (P blocks, Bt, chunks, H) float32
    L, H, G, P, N,
    WIDEN: tl.constexpr, PRECISION: tl.constexpr, STATE_PRECISION: tl.constexpr,
    Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    ATOMIC: tl.constexpr,  # add dB, dC into their group's float32 sums (zeroed by the caller) instead of storing parts
):  # fmt: skip
    """Every gradient of one chunk, per (batch * head, chunk, block of P). The state index
    ``n`` is walked in blocks of ``BLOCK_N`` twice (first the sums over it, then ``dB`` and
    ``dC``, which are per ``n``), so that only one block of ``B, C, S, dS`` is live at a time."""
    batch, head, group = _heads(H, G)
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    pblock = tl.program_id(2)
    bt = tl.num_programs(0) // H  # the batch size
    p = pblock * BLOCK_P + tl.arange(0, BLOCK_P)
    rows = tl.arange(0, Q)
    t = (chunk * Q + rows).to(tl.int64)
    live = t < L
    x_offs, x_ok = _x_tile(batch, t, live, head, L, H, P, p)
    x = tl.load(X + x_offs, mask=x_ok, other=0.0)
    dy = tl.load(DY + x_offs, mask=x_ok, other=0.0)
    dt = tl.load(DT + (batch * L + t) * H + head, mask=live, other=0.0).to(tl.float32)  # 0 past the end
    A_h = tl.load(A + head).to(tl.float32)
    c = tl.cumsum(dt * A_h, axis=0)  # log of the decay from the chunk's start to step t
    c_last = tl.sum(dt * A_h, axis=0)
    state_base = ((batch * n_chunks + chunk).to(tl.int64) * H + head) * P
    bc_base = (batch * L + t[:, None]) * G + group

    # Pass 1 over n: the sums over the state index.
    scores = tl.zeros((Q, Q), dtype=tl.float32)  # C_t . B_s
    Bg = tl.zeros((Q, BLOCK_P), dtype=tl.float32)  # dS B_s, per step s
    CS = tl.zeros((Q, BLOCK_P), dtype=tl.float32)  # S C_t, per step t
    gS = tl.zeros((BLOCK_P,), dtype=tl.float32)  # <dS, S>, per channel
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        bc_ok = live[:, None] & (n < N)[None, :]
        Bc = tl.load(B + bc_base * N + n[None, :], mask=bc_ok, other=0.0)
        Cc = tl.load(C + bc_base * N + n[None, :], mask=bc_ok, other=0.0)
        pn_offs = (state_base + p[:, None]) * N + n[None, :]
        pn_ok = (p < P)[:, None] & (n < N)[None, :]
        S = tl.load(STATES + pn_offs, mask=pn_ok, other=0.0).to(tl.float32)  # entering the chunk
        dS = tl.load(DSTATES + pn_offs, mask=pn_ok, other=0.0).to(tl.float32)  # d loss / d (leaving state)
        scores += _mm(Cc, tl.trans(Bc), PRECISION, WIDEN)
        Bg += _mm(Bc.to(tl.float32), tl.trans(dS), STATE_PRECISION, WIDEN)
        CS += _mm(Cc.to(tl.float32), tl.trans(S), STATE_PRECISION, WIDEN)
        gS += tl.sum(dS * S, axis=1)

    causal = rows[:, None] >= rows[None, :]
    decay = tl.exp(tl.where(causal, c[:, None] - c[None, :], float("-inf")))  # e^{c_t - c_s}, s <= t
    dyx = _mm(dy, tl.trans(x), PRECISION, WIDEN)  # dy_t . x_s
    w = tl.exp(c_last - c) * dt  # w_s: step s's input weight in the state leaving the chunk

    # dx_s = sum_t M_ts dy_t + w_s dS B_s, with M_ts = (C_t . B_s) e^{c_t - c_s} dt_s
    M = scores * decay * dt[None, :]
    dx = _mm(tl.trans(M).to(dy.dtype), dy, PRECISION, WIDEN) + w[:, None] * Bg
    tl.store(DX + x_offs, dx.to(DX.dtype.element_ty), mask=x_ok)

    # dt enters directly (the dt_s in M and w) and through the log-decays a_r = dt_r A, which
    # every c_t with t >= r sums. First the gradient of each c_t (as if independent) ...
    xf = x.to(tl.float32)
    xBg = tl.sum(xf * Bg, axis=1)  # x_s . (dS B_s)
    state_in = w * xBg  # K_s: input s's part of the leaving state, as it enters the loss
    P_ts = M * dyx  # the terms of y's own-chunk part, as they enter the loss
    dc = tl.sum(P_ts, axis=1) - tl.sum(P_ts, axis=0) - state_in
    dc += tl.exp(c) * tl.sum(dy.to(tl.float32) * CS, axis=1)  # the state's part of y_t: e^{c_t} S C_t
    dc_last = tl.sum(state_in, axis=0) + tl.exp(c_last) * tl.sum(gS, axis=0)
    # ... then da_r = sum_{t >= r} dc_t + dc_last (c_last sums every a_r of the chunk).
    da = tl.sum(dc, axis=0) - tl.cumsum(dc, axis=0) + dc + dc_last
    ddt = tl.sum(scores * decay * dyx, axis=0) + tl.exp(c_last - c) * xBg + da * A_h
    tl.store(DDT + ((pblock * bt + batch).to(tl.int64) * L + t) * H + head, ddt, mask=live)
    tl.store(DA + ((pblock * bt + batch).to(tl.int64) * n_chunks + chunk) * H + head,
             tl.sum(tl.where(live, da * dt, 0.0), axis=0))  # fmt: skip

    # Pass 2 over n: dC_t = sum_s D_ts B_s + e^{c_t} dy_t S and dB_s = sum_t D_ts C_t + w_s x_s dS,
    # with D_ts = (dy_t . x_s) e^{c_t - c_s} dt_s.
    D = dyx * decay * dt[None, :]
    dyf = dy.to(tl.float32)
    part_base = (((pblock * bt + batch).to(tl.int64) * L + t[:, None]) * H + head) * N
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        bc_ok = live[:, None] & (n < N)[None, :]
        Bc = tl.load(B + bc_base * N + n[None, :], mask=bc_ok, other=0.0)
        Cc = tl.load(C + bc_base * N + n[None, :], mask=bc_ok, other=0.0)
        pn_offs = (state_base + p[:, None]) * N + n[None, :]
        pn_ok = (p < P)[:, None] & (n < N)[None, :]
        S = tl.load(STATES + pn_offs, mask=pn_ok, other=0.0).to(tl.float32)
        dS = tl.load(DSTATES + pn_offs, mask=pn_ok, other=0.0).to(tl.float32)
        dC = _mm(D.to(Bc.dtype), Bc, PRECISION, WIDEN)
        dC += tl.exp(c)[:, None] * _mm(dyf, S, STATE_PRECISION, WIDEN)
        dB = _mm(tl.trans(D).to(Cc.dtype), Cc, PRECISION, WIDEN)
        dB += w[:, None] * _mm(xf, dS, STATE_PRECISION, WIDEN)
        if ATOMIC:  # (the order of the heads' additions varies: not bitwise reproducible)
            tl.atomic_add(DB + bc_base * N + n[None, :], dB, mask=bc_ok, sem="relaxed")
            tl.atomic_add(DC + bc_base * N + n[None, :], dC, mask=bc_ok, sem="relaxed")
        else:
            tl.store(DB + part_base + n[None, :], dB.to(DB.dtype.element_ty), mask=bc_ok)
            tl.store(DC + part_base + n[None, :], dC.to(DC.dtype.element_ty), mask=bc_ok)


#: Launch parameters by input element size (bytes): chunk Q, channels per program, warps.
#: float32 inputs multiply with FMAs (exact, no tensor cores) and spill at every size tried:
#: they are for checking, not for speed. For 16-bit inputs, timed on the H200 at the
#: benchmark shape (B=4, L=4096, H=32, P=64, N=128 bf16, do_bench, GPU call B2 of
#: 2026-12-02, one process):
#:
#: - the fused forward at (Q, BLOCK_P, warps) = (32, 32, 4): 0.404 ms, against 0.584 ms at
#:   (32, 64, 8) (the setting before: 128 programs, one per SM; now 256, two per SM), 0.664
#:   at (32, 16, 4), and 0.567 at (32, 64, 8) with 3 stages. mamba_ssm's
#:   ``mamba_chunk_scan_combined``: 0.516 ms (GPU call A, same shape);
#: - the backward's per-chunk kernel keeps its tile (``BWD_BLOCK_P`` 64, ``BWD_WARPS`` 8,
#:   ``BWD_BLOCK_N`` 64): 1.396 ms (profile, calls 3 and B2);
#: - the backward's state walks (:func:`_state_walks`, both at once: ``WALK_BLOCK_P``,
#:   ``WALK_BLOCK_N``, ``WALK_WARPS``, ``WALK_MAXNREG``): fwd+bwd 2.651 ms with tiles of
#:   32 x 64 at 4 warps, 2.721 at 64 x 32, 2.852 at 32 x 32, 2.795 at 64 x 128 with 8 warps
#:   capped at 128 registers, 2.893 uncapped (150 registers: one program per SM);
#: - ``atomic_dbc``: fwd+bwd 2.651 ms against 2.795 (walks 64 x 128 in both), and a peak
#:   1244 MB instead of 1772 MB for one fwd+bwd (the per-head parts of dB and dC, 537 MB
#:   of float32, are never allocated); the float64 check at B=2, L=1000 gave the same
#:   errors with and without it (dB 2.8e-3, dC 3.0e-3). Not bitwise reproducible from run
#:   to run (the order of the atomic additions varies), as mamba_ssm's backward is not.
#:
#: Those three changes together were not timed in one run (each was timed against the
#: setting before); they touch different kernels.
CONFIGS = {
    4: dict(Q=16, BLOCK_P=16, NUM_STAGES=2, num_warps=4, BWD_BLOCK_N=16),
    2: dict(Q=32, BLOCK_P=32, NUM_STAGES=2, num_warps=4, BWD_BLOCK_P=64, BWD_WARPS=8, BWD_BLOCK_N=64,
            WALK_BLOCK_P=32, WALK_BLOCK_N=64, WALK_WARPS=4, atomic_dbc=True),
}

#: Options any configuration may carry:
#:
#: - ``keep_states`` (False): the forward stores the state entering every chunk for the
#:   backward instead of the backward recomputing them (the design before 2026-12-02). At
#:   the benchmark shape that is 537 MB held from the forward to the backward; GPU call B2:
#:   fused fwd+bwd 2.710 ms kept against 2.795 ms recomputed (the tiles of then), split at
#:   B=1, L=32768: 5.83 ms kept against 6.49 ms recomputed.
#: - ``atomic_dbc`` (False): above.
#: - ``BWD_BLOCK_P``, ``BWD_WARPS``, ``BWD_BLOCK_N``: the backward's per-chunk kernel's block
#:   of P, warps, and the block of state indices it walks N in (the forward's ``BLOCK_P``,
#:   warps and the whole N otherwise).
#: - ``WALK_BLOCK_P``, ``WALK_BLOCK_N``, ``WALK_WARPS``, ``WALK_MAXNREG``: the fused
#:   backward's state walks' tile (the forward's ``BLOCK_P``, warps, whole N otherwise).
#: - ``state_dtype``: the dtype the per-chunk states and their gradients are stored in, and
#:   ``partial_dtype``: that of the per-head parts of dB and dC before their sum over a
#:   group's heads (float32 by default). bfloat16 states (as mamba_ssm's backward keeps
#:   them) halve their traffic but cost accuracy where a gradient sums many terms that
#:   cancel: on the interpreter, bf16 inputs at (1, 70, 2, 16, 1, 16), dA's relative error
#:   went from 4e-3 to 3e-2. On the H200 (call 3, target shape) fwd+bwd took 2.71 ms with
#:   float32 states, 2.47 ms with bfloat16 ones and 2.39 ms with bfloat16 dB/dC parts too
#:   (their accuracy there unchecked).
#:
#: The split design's (and so the backward's, after a split forward) chunk, channels per
#: program and warps. A longer chunk than the fused one: the states go through memory once
#: per chunk, and the pass over them takes one sequential step per chunk. Register counts
#: from the sm_90 compile (Triton 3.9 here, cuobjdump): the backward at (Q, BLOCK_P,
#: BWD_BLOCK_N) = (32, 64, 64) takes 191 registers, (64, 64, 32) 255, neither spills; at
#: (64, 64, 64) it spills 24 bytes, at Q = 128 more than 1 KB. ``atomic_dbc`` is not set
#: here: untimed in this design (at B=1, L=32768 the sum of the per-head parts took 0.29 of
#: 6.49 ms fwd+bwd, GPU call B2).
SPLIT_CONFIGS = {
    4: dict(Q=16, BLOCK_P=16, num_warps=4, BWD_BLOCK_N=16),
    2: dict(Q=64, BLOCK_P=64, num_warps=8, BWD_BLOCK_N=32),
}

#: The split design's configuration when no gradient is needed (:func:`ssd_forward`): a longer
#: chunk, so half the sequential steps of the state pass and half the states in memory. At
#: B=1, L=32768, H=32, P=64, N=128 bf16 on the H200 (GPU call 3), the split forward took
#: 1.087 ms at Q = 128 against 1.557 ms at Q = 64 (the fused forward: 4.52 ms, call 1). Not
#: used for training: the backward's per-chunk kernel spills at Q = 128.
SPLIT_FORWARD_CONFIGS = {
    4: SPLIT_CONFIGS[4],
    2: dict(Q=128, BLOCK_P=64, num_warps=8, BWD_BLOCK_N=32),
}

#: The design that training (:class:`SSDFunction`) takes under ``design="auto"``: "auto"
#: (the forward's rule, :func:`choose_design`), or one of them always.
TRAINING_DESIGN = "auto"

#: Streaming multiprocessors assumed under the interpreter (no device to ask).
INTERPRETER_SMS = 8


def _setup(x, B, config, chunk_size, design="fused", forward_only=False):
    """The launch configuration of ``design`` for these inputs (``Q``, ``BLOCK_P``, ``BLOCK_N``, warps)."""
    P, N = x.shape[3], B.shape[3]
    split = SPLIT_FORWARD_CONFIGS if forward_only else SPLIT_CONFIGS
    cfg = dict(config or (CONFIGS if design == "fused" else split)[x.dtype.itemsize])
    if chunk_size is not None:
        cfg["Q"] = chunk_size
    cfg["BLOCK_P"] = max(16, min(cfg["BLOCK_P"], triton.next_power_of_2(P)))
    cfg["BLOCK_N"] = max(16, triton.next_power_of_2(N))  # tl.dot needs every side >= 16
    return cfg


def _precisions(x):
    ieee = x.dtype == torch.float32
    return dict(PRECISION="ieee" if ieee else "tf32", STATE_PRECISION="ieee" if ieee else "tf32", WIDEN=interpreting())


def _sms(device) -> int:
    if interpreting() or device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_design(x, B, config=None, chunk_size=None) -> str:
    """``"fused"`` when its ``batch * heads * P / BLOCK_P`` programs keep at least half the SMs
    busy, else ``"split"``. Half, not all: the split design pays for its parallelism with
    four passes over ``L / Q`` states of ``P N`` floats per head. Measured on the H200 (B=4,
    L=4096, H=32, P=64, N=128 bf16): forward 0.580 ms fused (then 128 programs of 64
    channels) vs 0.766 ms split (GPU call 3), 0.404 ms fused in blocks of 32 channels (256
    programs, call B2); forward + backward 2.71 ms fused vs 2.91 ms split (call 3, states
    kept), 2.80 vs 3.27 ms (call B2, states recomputed). At B=1, L=32768 the split forward
    takes 1.09 ms, the fused one 4.52 ms (64 channels, call 1)."""
    batch, _, H, P = x.shape
    cfg = _setup(x, B, config, chunk_size, "fused")
    return "fused" if 2 * batch * H * triton.cdiv(P, cfg["BLOCK_P"]) >= _sms(x.device) else "split"


def _configure(x, B, config, chunk_size, design, forward_only=False):
    """``(design, its configuration)``; ``design`` "auto" is :func:`choose_design`'s."""
    design = choose_design(x, B, config, chunk_size) if design == "auto" else design
    if design not in ("fused", "split"):
        raise ValueError(f"ssd: design must be 'fused', 'split' or 'auto', got {design!r}")
    return design, _setup(x, B, config, chunk_size, design, forward_only)


def _chunk_decays(dt, A, Q):
    """``(batch, chunks, heads)`` float32: each chunk's total log-decay (padding adds 0)."""
    batch, L, H = dt.shape
    a = dt.float() * A.float()
    a = torch.nn.functional.pad(a, (0, 0, 0, (-L) % Q))
    return a.view(batch, -1, Q, H).sum(2).contiguous()


def _split_states(recurrences, dt, A, Q, cfg, state_dtype):
    """Pieces (1) and (2) of the split design for one or two recurrences ``(U, V, s0,
    backward)``: ``(x, B, initial state, False)`` gives the states entering the chunks,
    ``(dy, C, final state's gradient, True)`` the gradients of the states leaving them
    (weights :math:`e^{c_t}`, in reverse). The per-chunk contributions of ``U V^T`` are passed
    through the chunk recurrence, both recurrences' passes in one launch. Returns, per
    recurrence, (the state before each chunk's update, in ``state_dtype``; the last state, float32)."""
    U0, V0 = recurrences[0][:2]
    batch, L, H, P = U0.shape
    G, N = V0.shape[2], V0.shape[3]
    n_chunks = triton.cdiv(L, Q)
    prec = _precisions(U0)
    # Enough programs to keep the memory system busy (about four per SM), at most 1024 elements each.
    block = triton.next_power_of_2(max(1, batch * H * P * N // (4 * _sms(U0.device)))) // 2
    block = max(128, min(1024, block, triton.next_power_of_2(P * N)))
    args = []  # per recurrence: INC, S0, OUT, S_END
    for U, V, s0, backward in recurrences:
        inc = torch.empty(batch, n_chunks, H, P, N, dtype=torch.float32, device=U.device)
        _chunk_states[(batch * H, n_chunks, triton.cdiv(P, cfg["BLOCK_P"]))](
            U, dt, A, V, inc, L, H, G, P, N, FROM_START=backward, WIDEN=prec["WIDEN"],
            STATE_PRECISION=prec["STATE_PRECISION"], Q=Q, BLOCK_P=cfg["BLOCK_P"], BLOCK_N=cfg["BLOCK_N"],
            num_warps=4,
        )  # fmt: skip
        s_end = torch.empty(batch, H, P, N, dtype=torch.float32, device=U.device)
        out = inc if state_dtype == torch.float32 else torch.empty_like(inc, dtype=state_dtype)
        args.append((inc, s_end if s0 is None else s0, out, s_end))
    first, second = recurrences[0], recurrences[-1]  # (one recurrence: the second's arguments are not read)
    _state_pass[(batch * H, triton.cdiv(P * N, block), len(recurrences))](
        *args[0], *args[-1], _chunk_decays(dt, A, Q), n_chunks, H, P * N, HAS_S0=first[2] is not None,
        REVERSE=first[3], HAS_S0_2=second[2] is not None, REVERSE2=second[3], BLOCK=block, num_warps=4,
    )  # fmt: skip
    return [(out, s_end) for _, _, out, s_end in args]


def _forward(x, dt, A, B, C, initial_state, cfg, design, store_states):
    """``(y, final state, entering states or None)``; inputs contiguous."""
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    Q = cfg["Q"]
    state_dtype = cfg.get("state_dtype", torch.float32)
    y = torch.empty_like(x)
    s0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    prec = _precisions(x)
    if design == "fused":
        s_end = torch.empty(batch, H, P, N, dtype=torch.float32, device=x.device)
        states = (torch.empty(batch, triton.cdiv(L, Q), H, P, N, dtype=state_dtype, device=x.device)
                  if store_states else s_end)  # fmt: skip
        _ssd_fwd[(batch * H, triton.cdiv(P, cfg["BLOCK_P"]))](
            x, dt, A, B, C, s_end if s0 is None else s0, y, s_end, states, L, H, G, P, N,
            HAS_S0=s0 is not None, STORE_STATES=store_states, **prec,
            **{k: cfg[k] for k in ("Q", "BLOCK_P", "BLOCK_N", "NUM_STAGES", "num_warps")},
        )  # fmt: skip
        return y, s_end, states if store_states else None
    [(states, s_end)] = _split_states([(x, B, s0, False)], dt, A, Q, cfg, state_dtype)
    _chunk_outputs[(batch * H, triton.cdiv(L, Q), triton.cdiv(P, cfg["BLOCK_P"]))](
        x, dt, A, B, C, states, y, L, H, G, P, N, **prec, Q=Q, BLOCK_P=cfg["BLOCK_P"], BLOCK_N=cfg["BLOCK_N"],
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    return y, s_end, states


def ssd_forward(x, dt, A, B, C, chunk_size=None, initial_state=None, config=None, design="auto"):
    """``(y, final_state)`` of SSD, forward only; inputs as validated by
    :func:`seqbook.mamba.ssd` (contiguous copies are made). ``chunk_size`` (a power of two
    >= 16) overrides the configuration's ``Q``; the final state is float32. ``design``:
    ``"fused"``, ``"split"`` or ``"auto"`` (:func:`choose_design`)."""
    x, dt, A, B, C = (t.contiguous() for t in (x, dt, A, B, C))
    design, cfg = _configure(x, B, config, chunk_size, design, forward_only=True)
    y, s_end, _ = _forward(x, dt, A, B, C, initial_state, cfg, design, store_states=False)
    return y, s_end


class SSDFunction(torch.autograd.Function):
    """SSD with its backward: ``apply(x, dt, A, B, C, initial_state or None, chunk_size or
    None, config or None, design)`` -> ``(y, final_state)``.

    What it keeps for the backward: the inputs and the initial state, nothing per chunk. The
    backward recomputes the state entering each chunk (the forward's recurrence once more,
    without its outputs), as mamba_ssm's does. The configuration option ``keep_states=True``
    keeps them instead (the forward stores them, ``batch * (L / Q) * heads * P * N`` floats)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, initial_state, chunk_size, config, design):
        x, dt, A, B, C = (t.contiguous() for t in (x, dt, A, B, C))
        design = TRAINING_DESIGN if design == "auto" else design
        design, cfg = _configure(x, B, config, chunk_size, design)
        keep = cfg.get("keep_states", False)
        y, s_end, states = _forward(x, dt, A, B, C, initial_state, cfg, design, store_states=keep)
        s0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
        ctx.save_for_backward(x, dt, A, B, C, states if keep else s0)
        ctx.cfg, ctx.design, ctx.keep = cfg, design, keep
        ctx.s0_dtype = None if initial_state is None else initial_state.dtype
        ctx.dtypes = (dt.dtype, A.dtype)
        return y, s_end

    @staticmethod
    def backward(ctx, dy, d_final):
        x, dt, A, B, C, kept = ctx.saved_tensors
        cfg = ctx.cfg
        batch, L, H, P = x.shape
        Q = cfg["Q"]
        # _ssd_bwd's tile: its own block of P and warps if the configuration gives them; it walks n in blocks
        BLOCK_P = max(16, min(cfg.get("BWD_BLOCK_P", cfg["BLOCK_P"]), triton.next_power_of_2(P)))
        BLOCK_N = max(16, min(cfg.get("BWD_BLOCK_N", cfg["BLOCK_N"]), cfg["BLOCK_N"]))
        G, N = B.shape[2], B.shape[3]
        n_chunks, p_blocks = triton.cdiv(L, Q), triton.cdiv(P, BLOCK_P)
        state_dtype = cfg.get("state_dtype", torch.float32)
        dy = torch.zeros_like(x) if dy is None else dy.to(x.dtype).contiguous()
        d_final = None if d_final is None else d_final.float().contiguous()
        s0 = None if ctx.keep else kept
        # The states entering the chunks (kept, or recomputed), and the gradient of the state
        # leaving each chunk: the forward's recurrence, backwards.
        if ctx.design == "fused":  # per (batch, head, tile of the state), twice when recomputing: both walks at once
            d_states = torch.empty(batch, n_chunks, H, P, N, dtype=state_dtype, device=x.device)
            states = kept if ctx.keep else torch.empty_like(d_states)
            d_s0 = torch.empty(batch, H, P, N, dtype=torch.float32, device=x.device)
            walk_p = max(16, min(cfg.get("WALK_BLOCK_P", cfg["BLOCK_P"]), triton.next_power_of_2(P)))
            walk_n = max(16, min(cfg.get("WALK_BLOCK_N", cfg["BLOCK_N"]), cfg["BLOCK_N"]))
            _state_walks[(batch * H, triton.cdiv(P, walk_p) * triton.cdiv(N, walk_n), 1 if ctx.keep else 2)](
                x, B, d_s0 if s0 is None else s0, states, dy, C, d_s0 if d_final is None else d_final, d_states,
                d_s0, dt, A, L, H, G, P, N, HAS_S0=s0 is not None, HAS_DS_END=d_final is not None,
                WIDEN=interpreting(), STATE_PRECISION=_precisions(x)["STATE_PRECISION"], Q=Q, BLOCK_P=walk_p,
                BLOCK_N=walk_n, N_TILES=walk_n < N, NUM_STAGES=cfg["NUM_STAGES"],
                num_warps=cfg.get("WALK_WARPS", cfg["num_warps"]),
                **({"maxnreg": cfg["WALK_MAXNREG"]} if "WALK_MAXNREG" in cfg else {}),
            )  # fmt: skip
        else:
            both = [(dy, C, d_final, True)] if ctx.keep else [(dy, C, d_final, True), (x, B, s0, False)]
            (d_states, d_s0), *recomputed = _split_states(both, dt, A, Q, cfg, state_dtype)
            states = kept if ctx.keep else recomputed[0][0]
        dx = torch.empty_like(x)
        # dB and dC: per-head parts (float32, or option "partial_dtype" 16 bits) summed here in float32, or
        # (option "atomic_dbc") added by the kernel into float32 sums per group
        direct = G == H and p_blocks == 1
        atomic = cfg.get("atomic_dbc", False) and not direct
        part = torch.float32 if direct else cfg.get("partial_dtype", torch.float32)
        if atomic:
            dB = torch.zeros(batch, L, G, N, dtype=torch.float32, device=x.device)
        else:
            dB = torch.empty(p_blocks, batch, L, H, N, dtype=part, device=x.device)
        dC = torch.zeros_like(dB) if atomic else torch.empty_like(dB)
        ddt = torch.empty(p_blocks, batch, L, H, dtype=torch.float32, device=x.device)
        dA = torch.empty(p_blocks, batch, n_chunks, H, dtype=torch.float32, device=x.device)
        _ssd_bwd[(batch * H, n_chunks, p_blocks)](
            x, dt, A, B, C, dy, states, d_states, dx, dB, dC, ddt, dA, L, H, G, P, N, **_precisions(x),
            Q=Q, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, ATOMIC=atomic, num_warps=cfg.get("BWD_WARPS", cfg["num_warps"]),
        )  # fmt: skip

        def blocks(d):  # the sum over the blocks of P (no copy when there is one)
            return d[0] if p_blocks == 1 else d.sum(0, dtype=torch.float32)

        def per_group(d):  # heads share their group's B and C: sum the group's heads
            if atomic:
                return d.to(B.dtype)
            d = blocks(d)
            return (d if G == H else d.view(batch, L, G, H // G, N).sum(3, dtype=torch.float32)).to(B.dtype)

        d_s0 = None if ctx.s0_dtype is None else d_s0.to(ctx.s0_dtype)
        return (dx, blocks(ddt).to(ctx.dtypes[0]), dA.sum((0, 1, 2)).to(ctx.dtypes[1]), per_group(dB), per_group(dC),
                d_s0, None, None, None)  # fmt: skip


def ssd_autograd(x, dt, A, B, C, chunk_size=None, initial_state=None, config=None, design="auto"):
    """``(y, final_state)`` through :class:`SSDFunction` (differentiable)."""
    return SSDFunction.apply(x, dt, A, B, C, initial_state, chunk_size, config, design)
