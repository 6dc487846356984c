r"""Triton kernel: Mamba's selective scan, forward and backward, with the state kept on chip.

The readable forms, the glossary and the shapes are in :mod:`seqbook.mamba`; this module
has the same signature, ``selective_scan(u, delta, A, B, C, D, z, delta_bias,
delta_softplus, return_last_state)``, behind a :class:`torch.autograd.Function`.

The ladder
----------
The kernel is the top rung of a ladder that the chapter climbs one rung at a time, each
rung a loop over time that changes one line of the one before (:func:`_ladder_kernel`
holds the first three, runnable through :func:`ladder`):

1. running sum, :math:`h_t = h_{t-1} + x_t`;
2. exponential moving average, :math:`h_t = \alpha h_{t-1} + (1 - \alpha) x_t`: a fixed decay;
3. diagonal linear recurrence, :math:`h_t = a_t h_{t-1} + b_t`: the decay changes with
   time (the production kernel for it is :mod:`seqbook.kernels.scan`);
4. selective scan (:func:`_selective_scan_fwd`): rung 3 on a ``(BLOCK_D, N)`` state, with
   :math:`a_t = e^{\Delta_t A}` and :math:`b_t = \Delta_t B_t u_t` computed on chip from
   ``(batch, length, d)`` inputs, and the output :math:`y_t = C_t^\top h_t` contracted on chip.

What stays on chip, and why
---------------------------
The state has ``N`` entries per channel (16 in Mamba): ``(batch, length, d, N)`` states
are 16 times the input. :func:`seqbook.mamba.selective_scan_parallel` writes them all to
memory (2 GiB per tensor at ``B=4, L=4096, d=2048``). The kernel never does: one program
owns a block of ``BLOCK_D`` channels of one batch element, holds their ``(BLOCK_D, N)``
state in registers, and walks along time, discretizing each step on the spot. Memory
sees only the inputs and ``y``: ``u, delta`` (and ``z``) read once, ``y`` written once,
and the rows :math:`B_t, C_t`, which every channel block of a batch element reads (they
are served from L2).

What bounds it is then the arithmetic, mostly the exponentials: one :math:`e^{\Delta A}`
per ``(batch, t, d, n)``, ``B L d N`` of them, 0.54 G at the benchmark shape, which the
GPU's special-function units evaluate at a quarter of the rate of its multiply-adds or
less. So the kernel folds :math:`\log_2 e` into ``A`` once per program and calls
``exp2`` (the hardware's native exponential), and does little else per ``(t, d, n)``:
one exponential, one multiply for :math:`\Delta u \cdot B`, one multiply-add for the
state, one for :math:`C^\top h`.

Forward: two ways to walk time
------------------------------
- ``"steps"`` (:func:`_selective_scan_fwd`): one step at a time, as in the loop. Time is
  cut into chunks of ``CHUNK`` steps. Per chunk, ``u`` and ``delta`` are loaded as
  ``(BLOCK_D, CHUNK)`` tiles and discretized as tiles (the softplus once per element);
  then the ``CHUNK`` steps run unrolled, each taking its column of the tiles, and the
  chunk's outputs are gathered in a tile and stored at its end, with the skip and the
  gate applied. Why tiles and not a row per step: a step's row is one bfloat16 per
  thread, too narrow for an asynchronous copy, so each step would wait on memory (the
  plain loop of shared/GPU.md reaches 8% of the bandwidth that way); whole tiles are
  prefetched a chunk or two ahead by the compiler's pipelining (``NUM_STAGES >= 2``).
  :math:`B_t, C_t` are read by hand two steps ahead of their use.
- ``"chunks"`` (:func:`_selective_scan_fwd_chunked`): as the scan kernel does, a tile of
  ``CHUNK`` steps is combined by ``tl.associative_scan`` with the combine
  :math:`(a_1, b_1) \circ (a_2, b_2) = (a_1 a_2,\ a_2 b_1 + b_2)` and applied to the
  carried state: ``(CHUNK, BLOCK_D, N)`` tiles, more arithmetic per element (the
  combines, and reductions over ``N`` spread across threads), no sequential chain
  inside a chunk. The backward needs this form anyway (below); which forward is faster
  is measured (``benchmarks/selective_scan.py --sweep``), not guessed.

Backward: a reverse recurrence, by recomputation
------------------------------------------------
Let :math:`g_t = \partial\mathcal L / \partial y_t` and
:math:`\bar g_t = g_t\,\mathrm{silu}(z_t)` the gradient reaching :math:`C_t^\top h_t`.
The state :math:`h_t` reaches the loss through :math:`y_t` and through every later state,
via :math:`h_{t+1} = a_{t+1} h_t + b_{t+1}`, so its total gradient
:math:`\lambda_t = d\mathcal L / d h_t` obeys

.. math::

    \lambda_t = \bar g_t C_t + a_{t+1} \lambda_{t+1}, \qquad \lambda_{L-1} = \bar g_{L-1} C_{L-1} + g_{\text{last}},

the recurrence of the forward run backwards in time (decays shifted by one step,
:math:`a_L := 1`). With :math:`x_t = a_t h_{t-1}` (the decayed previous state), every
gradient is then local in time:

.. math::

    \frac{\partial\mathcal L}{\partial \Delta_t} = \sum_n \lambda_t (A x_t + u_t B_t), \quad
    \frac{\partial\mathcal L}{\partial u_t} = \Delta_t \sum_n \lambda_t B_t + \bar g_t D, \quad
    \frac{\partial\mathcal L}{\partial A} = \sum_{b,t} \lambda_t x_t \Delta_t,

    \frac{\partial\mathcal L}{\partial B_t} = \sum_d \lambda_t \Delta_t u_t, \quad
    \frac{\partial\mathcal L}{\partial C_t} = \sum_d \bar g_t h_t, \quad
    \frac{\partial\mathcal L}{\partial D} = \sum_{b,t} \bar g_t u_t, \quad
    \frac{\partial\mathcal L}{\partial z_t} = g_t y_t\, \sigma(z_t)(1 + z_t(1 - \sigma(z_t))),

and :math:`\partial\mathcal L/\partial\delta = \partial\mathcal L/\partial\Delta \cdot \sigma(\delta + \text{bias})`
through the softplus (summed over batch and time for ``delta_bias``).

The backward needs :math:`h_t` in reverse time order, and the forward kept none of them.
Storing them would cost ``N`` times the input; recomputing them from the start for each
step would cost :math:`O(L^2)`. So the forward, when gradients are needed, saves the state
entering every ``CHUNK``-th step (``N / CHUNK`` times the input, in float32; the forward
keeps its own, longer tiles and stores a state every ``SAVE_EVERY = CHUNK`` steps inside
them), and the backward walks the chunks from last to first. In each chunk it

1. recomputes the chunk's states from the saved one, one step at a time, keeping each
   step's :math:`x_t = a_t h_{t-1}` and :math:`h_t` as a row of a ``(CHUNK, ...)`` tile;
2. runs the reverse recurrence for :math:`\lambda` one step at a time from the last row to
   the first, entering with :math:`\lambda` carried from the chunk after it;
3. forms the local gradients above, writes those of ``u, delta, z``, adds those of
   ``B, C`` (sums over channels: the other channel blocks add theirs, with atomic adds),
   and accumulates those of ``A, D, delta_bias`` in registers.

Why steps, when tiles are the GPU's way: the time axis of every tile lies within one
thread (below), so "row ``i`` of a tile" is a set of registers known when the kernel is
compiled; the loops are unrolled (``tl.static_range``), the row selections (:func:`_row`:
a masked sum whose other terms add ``-0.0``) fold away, and a step costs what the loop's
line says: one multiply-add for the state, one for :math:`\lambda`. A
``tl.associative_scan`` over the same tile costs three operations per element, and
Triton lowered its ``reverse=True`` form with warp shuffles (128 per thread per chunk
at an 8-step, 8-channel tile; Triton 3.9 for sm_90, offline).

Two numerical consequences. :math:`x_t = a_t h_{t-1}` is computed as that product, not
recovered from :math:`h_t` (dividing by :math:`a_t`, which underflows for large
:math:`\Delta|A|`, would be unstable; subtracting :math:`b_t` loses digits where
:math:`x_t \ll b_t`). And the reverse recurrence's :math:`a_{t+1}` is the decay of the
row after (of the next chunk's first row at a chunk's end, carried in registers from the
chunk processed before; :math:`a_L := 1`): one exponential per ``(t, d, n)`` in the
backward, as in the forward.

Layout. Every backward tile is ``(CHUNK, DH, N, DL)``: time, then the channels split as
``d = dh DL + dl``, the state index ``n`` between them. Triton gives the last axis the
lanes of a warp first and the others what is left, so ``DL`` channels (and ``32 / DL``
groups of ``n``) share a warp's lanes, and time, the ``DH`` channel groups and the rest of
``n`` sit in each thread's registers. The two sums over ``n`` (:math:`\sum_n \lambda B`
and :math:`\sum_n \lambda A x`) and the two over channels (``dB``, ``dC``) are then part
in-thread, part warp shuffles; ``DL`` trades one against the other, and ``DH > 1`` puts
more of the channel sums in-thread.

Precision: inputs are float32, bfloat16 or float16; every load is widened to float32 and
all arithmetic is float32; ``y``, ``du``, ``ddelta``, ``dz`` are stored in the inputs'
dtype, ``dB``, ``dC`` are accumulated in float32 and rounded once, ``dA``, ``dD``,
``ddelta_bias`` are summed in float32 per batch element and then over the batch. The
atomic additions make ``dB`` and ``dC`` vary in their last bits from run to run.

Portability: only Triton features present in 3.6 (the H100's) and 3.9 (the CPU
interpreter's); the interpreter runs the unrolled steps element by element in Python, so
tests there keep tiles small. Both versions compile every kernel here for sm_90 (checked
offline, without a GPU, with the ptxas that ships with Triton).

Measured (H200, bf16, ``B=4, L=4096, d=2048, N=16``, the backward kernel alone): 1.17 ms at
the default tile, against 2.88 ms for the kernel with ``(CHUNK, BLOCK_D, N)`` tiles and
associative scans that this one replaced (per-tile timings at :data:`CONFIGS`).

Known limits: the sums over channels for ``dB`` and ``dC`` cross warp lanes (``log2 DL``
rounds of shuffles per partial sum) and are then added over channel blocks with atomic
adds, ``B L N d / BLOCK_D`` of them; Triton 3.6 offers no reduce-scatter, so each round
moves every partial sum. Without them one tile ran a quarter faster (wrong ``dB``, ``dC``:
a probe). A thread walks its chunk's steps in order, so a program's latency is covered
only by the other programs on its SM: the tile is a trade between registers (programs an
SM) and the in-thread share of the sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # e^x = 2^(x log2 e); constexpr: kernels may read it


# --------------------------------------------------------------------------------------
# The ladder (rungs 1-3), forward only: for the chapter
# --------------------------------------------------------------------------------------


@triton.jit
def _ladder_kernel(X, ALPHA, H, L, D, RUNG: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (batch element, block of channels), one step per iteration."""
    n_dblocks = tl.cdiv(D, BLOCK_D)
    batch = tl.program_id(0) // n_dblocks
    d = (tl.program_id(0) % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    row = batch.to(tl.int64) * L * D + d  # offsets of (batch, t, d) for t = 0, moved one row per step
    h = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if RUNG == 2:
        alpha = tl.load(ALPHA + d, mask=d_ok, other=0.0).to(tl.float32)  # one decay per channel
    for _ in range(L):
        x = tl.load(X + row, mask=d_ok, other=0.0).to(tl.float32)
        if RUNG == 1:
            h = h + x  # running sum
        elif RUNG == 2:
            h = alpha * h + (1.0 - alpha) * x  # exponential moving average
        else:
            a = tl.load(ALPHA + row, mask=d_ok, other=0.0).to(tl.float32)
            h = a * h + x  # diagonal linear recurrence: the decay a_t changes with time
        tl.store(H + row, h.to(H.dtype.element_ty), mask=d_ok)
        row += D


def ladder(rung: int, x: torch.Tensor, alpha: torch.Tensor | None = None, block_d: int = 32) -> torch.Tensor:
    """Rungs 1-3 of the ladder on ``x`` ``(batch, length, channels)``; returns every state.

    ``rung=1``: running sum; ``rung=2``: moving average with ``alpha`` ``(channels,)``;
    ``rung=3``: ``h_t = alpha_t h_{t-1} + x_t`` with ``alpha`` ``(batch, length, channels)``.
    For teaching: no validation, no backward, one step per iteration.
    """
    x = x.contiguous()
    batch, L, D = x.shape
    if rung not in (1, 2, 3):
        raise ValueError(f"ladder: rung must be 1, 2 or 3, got {rung!r}")
    if rung > 1 and alpha is None:
        raise ValueError(f"ladder: rung {rung} needs alpha")
    h = torch.empty_like(x)
    block_d = min(block_d, triton.next_power_of_2(max(D, 1)))
    alpha = x if alpha is None else alpha.contiguous()
    _ladder_kernel[(batch * triton.cdiv(D, block_d),)](x, alpha, h, L, D, RUNG=rung, BLOCK_D=block_d)
    return h


# --------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------


@triton.jit
def _combine(a_left, b_left, a_right, b_right):
    # Step(s) "left" and then step(s) "right": h -> a_right * (a_left * h + b_left) + b_right.
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def _softplus(x):
    # log(1 + e^x) without overflow: max(x, 0) + log(1 + e^-|x|).
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _step_size(delta, bias, SOFTPLUS: tl.constexpr):
    """Delta from the raw delta (+ bias), in float32."""
    v = delta + bias
    if SOFTPLUS:
        v = _softplus(v)
    return v


@triton.jit
def _col(x, i, CHUNK: tl.constexpr):
    """Column ``i`` of a ``(BLOCK, CHUNK)`` tile: select it and sum over columns (adding zeros is exact)."""
    cols = tl.arange(0, CHUNK)
    return tl.sum(tl.where(cols[None, :] == i, x, 0.0), axis=1)


@triton.jit
def _row_n(P, base_n, t, n, L, N: tl.constexpr):
    """Row ``t`` of a ``(Bt, L, N)`` tensor (``B`` or ``C``), in float32; zeros past the end."""
    ok = (n < N) & (t + tl.zeros_like(n) < L)  # (t as a vector: the interpreter's loop counters are ints)
    return tl.load(P + base_n + t * N + n, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _row(x, i, CHUNK: tl.constexpr):
    """Row ``i`` of a ``(CHUNK, ...)`` tile: select it and sum over rows. The other rows add
    -0.0, which is exact (x + -0.0 = x even for x = -0.0), so the compiler, which knows each
    register's row when rows are in-thread, drops the additions altogether."""
    rows = tl.arange(0, CHUNK)
    return tl.sum(tl.where((rows == i)[:, None, None], x, -0.0), axis=0)


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


@triton.jit
def _selective_scan_fwd(
    U, DELTA, A, B, C, D_SKIP, Z, DELTA_BIAS,  # (Bt, L, d) x2, (d, N), (Bt, L, N) x2, (d,), (Bt, L, d), (d,)
    Y,  # (Bt, L, d) output
    H_LAST,  # (Bt, d, N) float32 output: the state after the last step
    H_SAVED,  # (Bt, cdiv(L, SAVE_EVERY), d, N) float32 output: the state entering every
    # SAVE_EVERY-th step (if SAVE_STATES), for the backward
    L, D, N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_STATES: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
    SAVE_EVERY: tl.constexpr = 1,  # a power of two; CHUNK is a multiple of it
):  # fmt: skip
    """The "steps" forward: rung 4 of the ladder. One program per (batch element, channel block)."""
    n_dblocks = tl.cdiv(D, BLOCK_D)
    batch = tl.program_id(0) // n_dblocks
    d = (tl.program_id(0) % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, CHUNK)
    d_ok, n_ok = d < D, n < N
    dn_ok = d_ok[:, None] & n_ok[None, :]
    # Padded channels and states get A = 0 (a decay of 1) and no input: they stay 0.
    A2 = tl.load(A + d[:, None] * N + n[None, :], mask=dn_ok, other=0.0).to(tl.float32) * LOG2E
    zero = tl.zeros((BLOCK_D,), tl.float32)
    bias = tl.load(DELTA_BIAS + d, mask=d_ok, other=0.0).to(tl.float32) if HAS_BIAS else zero
    skip = tl.load(D_SKIP + d, mask=d_ok, other=0.0).to(tl.float32) if HAS_D else zero
    base_d = batch.to(tl.int64) * L * D
    base_n = batch.to(tl.int64) * L * N
    saved = batch.to(tl.int64) * tl.cdiv(L, SAVE_EVERY) * D * N + d[:, None] * N + n[None, :]
    # B_t and C_t are read two steps ahead of their use (see the loop).
    B_1, C_1 = _row_n(B, base_n, 0, n, L, N), _row_n(C, base_n, 0, n, L, N)
    B_2, C_2 = _row_n(B, base_n, 1, n, L, N), _row_n(C, base_n, 1, n, L, N)

    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # the state: registers only
    for t0 in tl.range(0, L, CHUNK, num_stages=NUM_STAGES):
        # The chunk's u and Delta as (BLOCK_D, CHUNK) tiles, time along dim 1: whole tiles
        # can be fetched ahead (NUM_STAGES > 1 prefetches the next chunks' tiles while this
        # one runs); a row per step could not (2 bytes per thread in bfloat16 is too narrow
        # for an asynchronous copy), and would wait on memory at every step. The softplus
        # runs once per element here, not once per state index.
        t = t0 + cols
        offs = base_d + t.to(tl.int64)[None, :] * D + d[:, None]
        m = d_ok[:, None] & (t < L)[None, :]
        u_c = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
        dt_c = _step_size(tl.load(DELTA + offs, mask=m, other=0.0).to(tl.float32), bias[:, None], SOFTPLUS)
        dt_c = tl.where(m, dt_c, 0.0)  # steps past the end: Delta = 0, the identity step
        dtu_c = dt_c * u_c
        y_c = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)  # the chunk's outputs, stored at its end
        for i in tl.static_range(CHUNK):  # unrolled: the steps' exponentials overlap
            if SAVE_STATES and i % SAVE_EVERY == 0:  # the state entering step t0 + i, for the backward
                live = (t0 + i + tl.zeros((BLOCK_D,), tl.int32)) < L
                tl.store(H_SAVED + saved, h, mask=dn_ok & live[:, None])
                saved += D * N
            dt, dtu = _col(dt_c, i, CHUNK), _col(dtu_c, i, CHUNK)  # Delta_t and Delta_t u_t
            # B_t, C_t come from L2 (every channel block of this batch element reads them):
            # reading them two steps ahead covers its latency.
            B_t, C_t = B_1, C_1
            B_1, C_1 = B_2, C_2
            B_2, C_2 = _row_n(B, base_n, t0 + i + 2, n, L, N), _row_n(C, base_n, t0 + i + 2, n, L, N)
            a = tl.exp2(dt[:, None] * A2)  # A_bar = e^{Delta A}  (ZOH)
            b = dtu[:, None] * B_t[None, :]  # B_bar u = Delta B u  (Euler)
            h = a * h + b  # (2a): rung 3's step
            y = tl.sum(h * C_t[None, :], axis=1)  # (2b)
            y_c = tl.where(cols[None, :] == i, y[:, None], y_c)
        if HAS_D:
            y_c += skip[:, None] * u_c
        if HAS_Z:
            z = tl.load(Z + offs, mask=m, other=0.0).to(tl.float32)
            y_c = y_c * z * tl.sigmoid(z)
        tl.store(Y + offs, y_c.to(Y.dtype.element_ty), mask=m)
    tl.store(H_LAST + (batch.to(tl.int64) * D + d[:, None]) * N + n[None, :], h, mask=dn_ok)


@triton.jit
def _selective_scan_fwd_chunked(
    U, DELTA, A, B, C, D_SKIP, Z, DELTA_BIAS, Y, H_LAST, H_SAVED,
    L, D, N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_STATES: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """The "chunks" forward: tiles of CHUNK steps combined by an associative scan. Same arguments."""
    n_dblocks = tl.cdiv(D, BLOCK_D)
    batch = tl.program_id(0) // n_dblocks
    d = (tl.program_id(0) % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, CHUNK)
    d_ok, n_ok = d < D, n < N
    dn_ok = d_ok[:, None] & n_ok[None, :]
    A2 = tl.load(A + d[:, None] * N + n[None, :], mask=dn_ok, other=0.0).to(tl.float32) * LOG2E
    zero = tl.zeros((BLOCK_D,), tl.float32)
    bias = tl.load(DELTA_BIAS + d, mask=d_ok, other=0.0).to(tl.float32) if HAS_BIAS else zero
    skip = tl.load(D_SKIP + d, mask=d_ok, other=0.0).to(tl.float32) if HAS_D else zero
    base_d = batch.to(tl.int64) * L * D
    base_n = batch.to(tl.int64) * L * N
    saved = batch.to(tl.int64) * tl.cdiv(L, CHUNK) * D * N + d[:, None] * N + n[None, :]

    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for t0 in tl.range(0, L, CHUNK, num_stages=NUM_STAGES):
        if SAVE_STATES:
            tl.store(H_SAVED + saved, h, mask=dn_ok)
            saved += D * N
        t = t0 + rows
        m_d = (t < L)[:, None] & d_ok[None, :]
        m_n = (t < L)[:, None] & n_ok[None, :]
        td = base_d + t.to(tl.int64)[:, None] * D + d[None, :]
        tn = base_n + t.to(tl.int64)[:, None] * N + n[None, :]
        u = tl.load(U + td, mask=m_d, other=0.0).to(tl.float32)
        dt = _step_size(tl.load(DELTA + td, mask=m_d, other=0.0).to(tl.float32), bias[None, :], SOFTPLUS)
        dt = tl.where(m_d, dt, 0.0)
        B_t = tl.load(B + tn, mask=m_n, other=0.0).to(tl.float32)
        C_t = tl.load(C + tn, mask=m_n, other=0.0).to(tl.float32)
        a = tl.exp2(dt[:, :, None] * A2[None, :, :])  # (CHUNK, BLOCK_D, BLOCK_N)
        b = (dt * u)[:, :, None] * B_t[:, None, :]
        a_cum, b_cum = tl.associative_scan((a, b), axis=0, combine_fn=_combine)
        h_t = a_cum * h[None, :, :] + b_cum  # every state of the tile from the one entering it
        y = tl.sum(h_t * C_t[:, None, :], axis=2)
        if HAS_D:
            y += skip[None, :] * u
        if HAS_Z:
            z = tl.load(Z + td, mask=m_d, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(Y + td, y.to(Y.dtype.element_ty), mask=m_d)
        h = _row(h_t, CHUNK - 1, CHUNK)  # padded rows are identity steps: the last row is the last state
    tl.store(H_LAST + (batch.to(tl.int64) * D + d[:, None]) * N + n[None, :], h, mask=dn_ok)


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------


@triton.jit
def _row4(x, i, CHUNK: tl.constexpr):
    """Row ``i`` of a ``(CHUNK, ...)`` 4-d tile, as :func:`_row` (the other rows add -0.0)."""
    rows = tl.arange(0, CHUNK)
    return tl.sum(tl.where((rows == i)[:, None, None, None], x, -0.0), axis=0)


@triton.jit
def _selective_scan_bwd(
    U, DELTA, A, B, C, D_SKIP, Z, DELTA_BIAS,  # the forward's inputs
    H_SAVED,  # (Bt, n_chunks, d, N) float32: the state entering each chunk
    G,  # (Bt, L, d): dLoss/dy
    G_LAST,  # (Bt, d, N): dLoss/d(last state) (if HAS_G_LAST)
    DU, DDELTA, DZ,  # (Bt, L, d) outputs, in the inputs' dtype
    DB, DC,  # (Bt, L, N) float32, zeroed: every channel block adds its sum over its channels;
    # with BC_PARTIAL, (n_dblocks, Bt, L, N): each channel block stores its own sum, summed after
    DA_PART,  # (Bt, d, N) float32: dLoss/dA summed over time, per batch element
    DD_PART, DBIAS_PART,  # (Bt, d) float32: the same for D and delta_bias
    L, D, N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_G_LAST: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
    DL: tl.constexpr,  # channels along a warp's lanes; BLOCK_D = DH * DL (module docstring, "Layout")
    BC_GRADS: tl.constexpr = True,  # False only to time what dB, dC's sums and atomic adds cost (the sweep)
    BC_PARTIAL: tl.constexpr = False,
):  # fmt: skip
    """One program per (batch element, block of BLOCK_D channels), chunks from last to first.
    Tiles are (CHUNK, DH, N, DL), (channel) vectors (DH, DL), per-step rows (CHUNK, DH, DL)."""
    DH: tl.constexpr = BLOCK_D // DL
    n_dblocks = tl.cdiv(D, BLOCK_D)
    batch = tl.program_id(0) // n_dblocks
    d = (tl.program_id(0) % n_dblocks) * BLOCK_D + tl.arange(0, DH)[:, None] * DL + tl.arange(0, DL)[None, :]
    n = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, CHUNK)
    d_ok, n_ok = d < D, n < N
    dn_ok = d_ok[:, None, :] & n_ok[None, :, None]  # (DH, N, DL)
    dn = d[:, None, :] * N + n[None, :, None]  # offsets of (d, n) in (d, N) tensors
    A_ = tl.load(A + dn, mask=dn_ok, other=0.0).to(tl.float32)
    A2 = A_ * LOG2E
    zero = tl.zeros((DH, DL), tl.float32)
    bias = tl.load(DELTA_BIAS + d, mask=d_ok, other=0.0).to(tl.float32) if HAS_BIAS else zero
    skip = tl.load(D_SKIP + d, mask=d_ok, other=0.0).to(tl.float32) if HAS_D else zero
    base_d = batch.to(tl.int64) * L * D
    base_n = batch.to(tl.int64) * L * N
    n_chunks = tl.cdiv(L, CHUNK)

    # lambda entering from the right of the last chunk: the gradient of the last state.
    if HAS_G_LAST:
        lam = tl.load(G_LAST + batch.to(tl.int64) * D * N + dn, mask=dn_ok, other=0.0).to(tl.float32)
    else:
        lam = tl.zeros((DH, BLOCK_N, DL), dtype=tl.float32)
    a_after = tl.full((DH, BLOCK_N, DL), 1.0, dtype=tl.float32)  # a_{t+1} of a chunk's last step; a_L := 1
    dA = tl.zeros((DH, BLOCK_N, DL), dtype=tl.float32)
    dD = tl.zeros((DH, DL), dtype=tl.float32)
    dbias = tl.zeros((DH, DL), dtype=tl.float32)

    for k in tl.range(0, n_chunks, num_stages=NUM_STAGES):
        c = n_chunks - 1 - k  # chunks from last to first
        t = c * CHUNK + rows
        live = t < L
        m_d = live[:, None, None] & d_ok[None, :, :]
        m_n = live[:, None] & n_ok[None, :]
        td = base_d + t.to(tl.int64)[:, None, None] * D + d[None, :, :]  # (CHUNK, DH, DL)
        tn = base_n + t.to(tl.int64)[:, None] * N + n[None, :]  # (CHUNK, N)
        u = tl.load(U + td, mask=m_d, other=0.0).to(tl.float32)
        v = tl.load(DELTA + td, mask=m_d, other=0.0).to(tl.float32) + bias[None, :, :]  # softplus' argument
        dt = tl.where(m_d, _step_size(v, 0.0, SOFTPLUS), 0.0)  # padded steps: Delta = 0, a = 1
        dtu = dt * u
        B_t = tl.load(B + tn, mask=m_n, other=0.0).to(tl.float32)[:, None, :, None]
        C_t = tl.load(C + tn, mask=m_n, other=0.0).to(tl.float32)[:, None, :, None]
        g = tl.load(G + td, mask=m_d, other=0.0).to(tl.float32)

        # 1. The chunk's states, recomputed step by step from the one the forward saved:
        #    x_t = a_t h_{t-1}, h_t = x_t + b_t, each kept as row i of its tile.
        a = tl.exp2(dt[:, :, None, :] * A2[None, :, :, :])  # the chunk's decays, used twice
        b = dtu[:, :, None, :] * B_t
        h_step = tl.load(H_SAVED + (batch.to(tl.int64) * n_chunks + c) * D * N + dn, mask=dn_ok, other=0.0)
        h, x = b, b  # (every row is overwritten)
        for i in tl.static_range(CHUNK):
            x_step = _row4(a, i, CHUNK) * h_step
            h_step = x_step + _row4(b, i, CHUNK)
            x = tl.where((rows == i)[:, None, None, None], x_step[None, :, :, :], x)
            h = tl.where((rows == i)[:, None, None, None], h_step[None, :, :, :], h)

        # 2. Through the gate and the skip: g_bar = g silu(z), the gradient reaching C^T h.
        if HAS_Z:
            z = tl.load(Z + td, mask=m_d, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            y = tl.sum(h * C_t, axis=2) + skip[None, :, :] * u  # y before the gate, recomputed
            tl.store(DZ + td, (g * y * sig * (1.0 + z * (1.0 - sig))).to(DZ.dtype.element_ty), mask=m_d)
            g_bar = g * z * sig
        else:
            g_bar = g
        if BC_GRADS:  # dC = sum_d g_bar h: the in-thread channel groups first, then the lanes
            dC_t = tl.sum(tl.sum(h * g_bar[:, :, None, :], axis=1), axis=2)

        # 3. The reverse recurrence lambda_t = g_bar_t C_t + a_{t+1} lambda_{t+1}, last step
        #    first, entering with lambda of the chunk after this one; lambda and the decay of
        #    the chunk's first step are carried to the chunk before.
        q = g_bar[:, :, None, :] * C_t
        lam_t = q
        for i in tl.static_range(CHUNK - 1, -1, -1):
            lam = _row4(q, i, CHUNK) + a_after * lam
            a_after = _row4(a, i, CHUNK)
            lam_t = tl.where((rows == i)[:, None, None, None], lam[None, :, :, :], lam_t)

        # 4. Local gradients (module docstring), sums over n on axis 2.
        lam_B = tl.sum(lam_t * B_t, axis=2)  # sum_n lambda B
        lam_x = lam_t * x
        ddt = tl.sum(lam_x * A_[None, :, :, :], axis=2) + u * lam_B  # dLoss/dDelta
        du = dt * lam_B + g_bar * skip[None, :, :]
        dv = ddt * tl.sigmoid(v) if SOFTPLUS else ddt  # through the softplus
        dv = tl.where(m_d, dv, 0.0)  # padded rows carry lambda but are not steps
        tl.store(DU + td, du.to(DU.dtype.element_ty), mask=m_d)
        tl.store(DDELTA + td, dv.to(DDELTA.dtype.element_ty), mask=m_d)
        dA += tl.sum(lam_x * dt[:, :, None, :], axis=0)
        dD += tl.sum(g_bar * u, axis=0)
        dbias += tl.sum(dv, axis=0)
        # Sums over channels: this block's share; the other channel blocks add theirs.
        if BC_GRADS:
            dB_t = tl.sum(tl.sum(lam_t * dtu[:, :, None, :], axis=1), axis=2)
            if BC_PARTIAL:  # plain stores into this block's own slice: no contention
                part = (tl.program_id(0) % n_dblocks).to(tl.int64) * (L * N) * (tl.num_programs(0) // n_dblocks)
                tl.store(DB + part + tn, dB_t, mask=m_n)
                tl.store(DC + part + tn, dC_t, mask=m_n)
            else:
                tl.atomic_add(DB + tn, dB_t, mask=m_n, sem="relaxed")
                tl.atomic_add(DC + tn, dC_t, mask=m_n, sem="relaxed")

    tl.store(DA_PART + batch.to(tl.int64) * D * N + dn, dA, mask=dn_ok)
    tl.store(DD_PART + batch.to(tl.int64) * D + d, dD, mask=d_ok)
    tl.store(DBIAS_PART + batch.to(tl.int64) * D + d, dbias, mask=d_ok)


# --------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------

#: Launch parameters by direction and input element size (bytes). First choices for the
#: H100, from compiling for sm_90 offline with Triton 3.6 and 3.9 (ptxas register counts,
#: SASS), not yet timed (benchmarks/selective_scan.py --sweep times the alternatives):
#:
#: - forward "steps": a (BLOCK_D, N) = (32, 16) state is 4 registers per thread at 4 warps
#:   (Triton lays it out 4 states x 1 channel per thread, so C^T h costs 2 shuffles a step),
#:   72-80 registers, no spills, B * d / BLOCK_D = 256 programs at the benchmark shape. It
#:   needs NUM_STAGES >= 2: with the loads pipelined the chunk's tiles reach the step loop
#:   from shared memory in the state's layout; with NUM_STAGES = 1 the compiler converts
#:   layouts at every step (about 100 barriers per chunk instead of 3).
#: - backward (the step-loop kernel of this version): (CHUNK, DH, N, DL) tiles at one warp,
#:   CHUNK also the interval at which the forward saves states. The kernel it replaced, with
#:   (CHUNK, BLOCK_D, N) tiles and two associative scans, took 2.88-2.95 ms on the H200 at
#:   (CHUNK, BLOCK_D) = (8, 8), 1 warp (bf16, B=4, L=4096, d=2048, N=16, the backward alone).
#:   This kernel, same shape, timed on the H200 (GPU call 3 of 2026-12-02, triton.testing.
#:   do_bench, D skip, states from the forward; every row's gradients compared with those of
#:   the first row, which was checked against the float64 loop on the GPU in fp32 and bf16):
#:
#:   ========================================  ========  =========  ==========
#:   (CHUNK, BLOCK_D, DL, NUM_STAGES), 1 warp  bf16 ms   fp32 ms    registers
#:   ========================================  ========  =========  ==========
#:   (8, 4, 4, 2), maxnreg 128                 1.593     1.532      128
#:   (8, 4, 4, 1), maxnreg 128                 1.875                128
#:   (8, 4, 4, 1)                              3.178                163
#:   (8, 8, 8, 1)                              1.826     1.477      232 / 245
#:   (8, 8, 8, 2)                              1.283                218
#:   **(8, 8, 4, 2)**                          **1.166**            199
#:   (4, 8, 4, 2)                              2.128                160
#:   ========================================  ========  =========  ==========
#:
#:   Fetching the next chunk's tiles during this one (NUM_STAGES=2) is worth 30-40%; two
#:   channel groups per thread (DL=4 of BLOCK_D=8) put half of the sums over channels
#:   in-thread. Without the sums over channels for dB and dC (BC_GRADS=False, wrong dB, dC)
#:   the first row takes 1.190 ms: they are a quarter of it. Both dtypes use the bf16 winner;
#:   float32 was not timed at that tile (its two rows above: 1.48-1.53 ms). The forward that
#:   saves the states every 8 steps took 0.615 ms (bf16) and 0.563 ms (fp32) in the same call.
CONFIGS = {
    ("fwd", 4): dict(METHOD="steps", CHUNK=16, BLOCK_D=32, NUM_STAGES=3, num_warps=4),
    ("fwd", 2): dict(METHOD="steps", CHUNK=16, BLOCK_D=32, NUM_STAGES=3, num_warps=4),
    ("bwd", 4): dict(CHUNK=8, BLOCK_D=8, DL=4, NUM_STAGES=2, num_warps=1),
    ("bwd", 2): dict(CHUNK=8, BLOCK_D=8, DL=4, NUM_STAGES=2, num_warps=1),
}
#: Register budget: at most this many float32 per (BLOCK_D, N) state forward, and per
#: (CHUNK, DH, N, DL) tile backward; BLOCK_D shrinks for larger N.
MAX_STATE = {"fwd": 2048, "bwd": 4096}


#: The compiled kernel of the last launch, by kind ("fwd", "bwd"): the benchmark sweep reads
#: its registers and spills from it.
LAST_LAUNCH: dict = {}


def config_for(dtype: torch.dtype, kind: str) -> dict:
    """The launch configuration of the ``kind`` ("fwd" or "bwd") kernel for inputs of ``dtype``."""
    return dict(CONFIGS[(kind, dtype.itemsize)])


def _fit(config: dict, kind: str, L: int, D: int, N: int) -> dict:
    """Shrink the tiles to the problem: no 16-step chunks for L = 7, no 32 channels for
    d = 5 (under the interpreter every padded element costs as much as a real one); and
    keep the state within the register budget."""
    cfg = dict(config)
    cfg["BLOCK_N"] = triton.next_power_of_2(max(N, 1))
    cfg["CHUNK"] = max(2, min(cfg["CHUNK"], triton.next_power_of_2(max(L, 1))))
    per_channel = cfg["BLOCK_N"] * (cfg["CHUNK"] if kind == "bwd" else 1)
    cap = max(1, MAX_STATE[kind] // per_channel)
    cfg["BLOCK_D"] = max(1, min(cfg["BLOCK_D"], cap, triton.next_power_of_2(max(D, 1))))
    if kind == "bwd":  # channels along lanes: all of the block unless the configuration says fewer
        cfg["DL"] = min(cfg.get("DL", cfg["BLOCK_D"]), cfg["BLOCK_D"])
    return cfg


# --------------------------------------------------------------------------------------
# Launchers and the autograd Function
# --------------------------------------------------------------------------------------


def _wide_rows(x):
    """``B`` or ``C`` ``(batch, L, N)`` in float32 for the kernels (exact: they widen every load).

    The kernels read one row of ``N`` entries per step. In float32 Triton fetches those rows
    ahead with asynchronous copies, pipelined over the loop; in a 16-bit format each thread's
    share is 2 bytes, too narrow for one, and the rows become plain loads that the step waits
    on (Triton 3.9 for sm_90: 6 asynchronous copies in the bfloat16 forward against 90 in the
    float32 one, 90 again once B and C are widened; on an H200 the bfloat16 forward at
    B=4, L=4096, d=2048, N=16 went from 0.955 to 0.488 ms). The copy costs ``2 B L N``
    elements, about 1% of the forward's bytes at ``d = 2048, N = 16``."""
    return x.float() if x.dtype != torch.float32 else x


def _forward(u, delta, A, B, C, D, z, delta_bias, softplus, save_states, config=None, checkpoint=None):
    """``y``, the last state, and (if ``save_states``) the states entering each chunk of
    ``checkpoint`` steps; inputs contiguous."""
    batch, L, d = u.shape
    N = A.shape[1]
    cfg = _fit(config or config_for(u.dtype, "fwd"), "fwd", L, d, N)
    method = cfg.pop("METHOD")
    if save_states and method == "steps":  # states every `checkpoint` steps, inside chunks at least as long
        cfg["CHUNK"], cfg["SAVE_EVERY"] = max(cfg["CHUNK"], checkpoint), checkpoint
    elif save_states:  # the chunked forward saves the state entering each of its chunks
        cfg["CHUNK"] = checkpoint
    B, C = _wide_rows(B), _wide_rows(C)
    y = torch.empty_like(u)
    h_last = torch.empty(batch, d, N, dtype=torch.float32, device=u.device)
    n_chunks = triton.cdiv(L, checkpoint) if save_states else 0
    states = torch.empty(batch, n_chunks, d, N, dtype=torch.float32, device=u.device) if save_states else None
    kernel = _selective_scan_fwd if method == "steps" else _selective_scan_fwd_chunked
    LAST_LAUNCH["fwd"] = kernel[(batch * triton.cdiv(d, cfg["BLOCK_D"]),)](
        u, delta, A, B, C, u if D is None else D, u if z is None else z, u if delta_bias is None else delta_bias,
        y, h_last, h_last if states is None else states,
        L, d, N,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
        SAVE_STATES=save_states, **cfg,
    )  # fmt: skip
    return y, h_last, states


def _backward(u, delta, A, B, C, D, z, delta_bias, softplus, states, g, g_last, cfg):
    """Every input's gradient from ``g = dLoss/dy`` and ``g_last`` (or None); ``cfg`` fitted,
    with the CHUNK the states were saved at."""
    batch, L, d = u.shape
    N = A.shape[1]
    f32 = dict(dtype=torch.float32, device=u.device)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    n_dblocks = triton.cdiv(d, cfg["BLOCK_D"])
    if cfg.get("BC_PARTIAL"):  # one (batch, L, N) slice per channel block, summed below
        dB, dC = torch.empty(n_dblocks, batch, L, N, **f32), torch.empty(n_dblocks, batch, L, N, **f32)
    else:
        dB, dC = torch.zeros(batch, L, N, **f32), torch.zeros(batch, L, N, **f32)
    dA_part = torch.empty(batch, d, N, **f32)
    dD_part, dbias_part = torch.empty(batch, d, **f32), torch.empty(batch, d, **f32)
    LAST_LAUNCH["bwd"] = _selective_scan_bwd[(batch * n_dblocks,)](
        u, delta, A, _wide_rows(B), _wide_rows(C), u if D is None else D, u if z is None else z, u if delta_bias is None else delta_bias,
        states, g, dA_part if g_last is None else g_last,
        du, ddelta, du if dz is None else dz, dB, dC, dA_part, dD_part, dbias_part,
        L, d, N,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
        HAS_G_LAST=g_last is not None, **cfg,
    )  # fmt: skip
    if cfg.get("BC_PARTIAL"):
        dB, dC = dB.sum(0), dC.sum(0)
    return (
        du, ddelta, dA_part.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
        None if D is None else dD_part.sum(0).to(D.dtype), dz,
        None if delta_bias is None else dbias_part.sum(0).to(delta_bias.dtype),
    )  # fmt: skip


class SelectiveScan(torch.autograd.Function):
    """``(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> (y, last_state)``;
    see the module docstring for the forward and backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, configs):
        fwd_cfg, bwd_cfg = configs
        batch, L, d = u.shape
        bwd = _fit(bwd_cfg or config_for(u.dtype, "bwd"), "bwd", L, d, A.shape[1])
        save = any(ctx.needs_input_grad[:8])
        y, h_last, states = _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save, fwd_cfg, bwd["CHUNK"])
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
            ctx.softplus, ctx.bwd = delta_softplus, bwd
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return y, h_last

    @staticmethod
    def backward(ctx, g, g_last):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        if g is None and g_last is None:
            return (None,) * 10
        g = torch.zeros_like(u) if g is None else g.contiguous()
        g_last = None if g_last is None else g_last.contiguous()
        grads = _backward(u, delta, A, B, C, D, z, delta_bias, ctx.softplus, states, g, g_last, ctx.bwd)
        return (*grads, None, None)


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    fwd_config: dict | None = None, bwd_config: dict | None = None,
):  # fmt: skip
    """The kernel behind :func:`seqbook.mamba.selective_scan` (``backend="triton"``).

    Inputs as validated there; non-contiguous ones are copied. ``fwd_config`` and
    ``bwd_config`` replace :data:`CONFIGS` (the tests and the benchmark sweep use them).
    """
    u, delta, A, B, C = (x.contiguous() for x in (u, delta, A, B, C))
    D, z, delta_bias = (None if x is None else x.contiguous() for x in (D, z, delta_bias))
    y, h_last = SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, (fwd_config, bwd_config))
    return (y, h_last) if return_last_state else y
