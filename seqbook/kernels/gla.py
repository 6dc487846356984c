r"""Triton kernel: gated linear attention with vector gates (and RWKV-6's bonus), chunked, forward and backward.

The readable forms, the glossary and the shapes are in :mod:`seqbook.linear_attention`
(:func:`~seqbook.linear_attention.gla_chunked`); this module has the signature
``gla(q, k, v, log_alpha, initial_state, scale, bonus) -> (o, final_state)`` behind a
:class:`torch.autograd.Function`.

Design
------
Chunks of ``T = 64`` steps. The inputs are padded to a multiple of ``T`` with zeros (a zero key and value add
nothing; a zero log-gate keeps the decay flat). ``c`` is the log-gates' inclusive cumulative sum inside each
chunk, formed by every kernel that needs it from the log-gates with ``tl.cumsum`` (float32, never stored); the
query's exponent is :math:`c^q = c`, or :math:`c - \log\alpha` with the bonus (the query reads the state before
its own step). Every matrix product accumulates in float32 from float32 tiles: exact (``"ieee"``) for float32
inputs, on the tensor cores at tf32 for 16-bit ones (float16's mantissa, float32's range: the states and the
exponentials need no 16-bit rounding); for bfloat16 inputs the forward's products round their operands to
bfloat16 instead (``FWD_BF16``: twice tf32's rate, float32's range) and the states entering the chunks and their
gradients are stored in bfloat16 (``KEEP_16BIT``: half the bytes of the largest tensors the kernels move; every
sum over chunks still runs in float32, only each chunk's stored copy is rounded). float16 inputs keep tf32 and
float32 storage: float16's range (65504, e^11) holds neither a long sequence's state nor the split factors
(up to e^40).

The chunk's weights :math:`A_{tj} = \sum_c q_{tc} k_{jc} e^{c^q_{tc} - c_{jc}}` (``j <= t``; ``j < t`` and the
bonus :math:`q_t\cdot(u\circ k_t)` on the diagonal with it) are one 64-row matrix product (``_weights``): the
exponent is split at a reference ``r``, ``c`` at the chunk's middle step,
:math:`(q\circ e^{c^q - r})(k\circ e^{r - c})^\top`, masked to the causal entries. Both factors lie within
:math:`e^{\pm\mathrm{SPAN}}` (``SPAN = 40``) when neither half of the chunk decays by more than e^-40 in any
channel, so nothing overflows or underflows in float32 where it matters (the masked entries above the diagonal
may overflow; they are dropped). Chunks with stronger gates (``_halves``) take an exact path instead: one key
column at a time, each exponent :math:`c^q_t - c_j \le 0` formed before its exponential. The two paths are two
compiled versions of each chunk kernel (``STEEP``; a kernel carrying both paths held both paths' registers),
launched one after the other over all chunks. The first works every chunk as if none were steep, with no branch
before its stores (its factors capped at e^40, a steep chunk's products are wrong there), and stores only the
chunks that are not; the forward's first launch also records each chunk's kind (one byte per chunk and head),
and the second launches do the steep chunks only. The benchmark's gates, and trained models' (mostly near 1),
leave the second launches nothing to do but read their byte; the test suite runs both. ``A`` is never stored:
the forward forms it next to the output, the backward forms it again for ``dv``, and forms the weights'
gradient ``dA`` next to ``dq, dk``.

Forward:

1. ``_state_pass``: one program per (batch, head, key block, value block) walks the chunks in order with
   its tile of the state in float32, saves the state entering each chunk (and at the end the final state)
   and folds the chunk in,
   :math:`S \leftarrow \mathrm{Diag}(e^{c_\text{last}}) S + (k \circ e^{c_\text{last} - c})^\top v`. Key
   rows decay separately and never mix, so the state splits into independent tiles both ways. Or, in the
   chunk-parallel form (``_tiles(...)["split"]``, the default), ``_chunk_local`` forms every chunk's own share
   :math:`(k \circ e^{c_\text{last} - c})^\top v` at once and ``_combine`` adds them up in a short walk over the
   chunks: more programs, where one walk per tile has too few (few heads, long sequences), for one more write and
   read of the states. The state's gradient (step 3) has the same two forms.
2. ``_chunk_fwd``: per (chunk, value block), :math:`o = s\,((q \circ e^{c^q}) S_\text{in} + A v)`, ``A``
   summed over the key blocks: three 64-row matrix products.

Backward:

3. ``_dstate_pass``: the state's gradient walks the chunks in reverse,
   :math:`\bar S_\text{in} = \mathrm{Diag}(e^{c_\text{last}})\bar S_\text{out} + s\,(q\circ e^{c^q})^\top do`,
   saving :math:`\bar S_\text{out}` per chunk; it ends with the initial state's gradient.
4. ``_chunk_dv``: per (chunk, value block), ``A`` again, and
   :math:`dv = s A^\top do + (k\circ e^{c_\text{last}-c})\bar S_\text{out}`.
5. ``_chunk_dqk``: per (chunk, key block): :math:`dA = s\, do\, v^\top` (causal part), dq and dk through the
   states and through ``dA`` (64-row products with the same split exponents, or column by column), the bonus's
   diagonal terms, and the log-gates' gradient.

The log-gates' gradient: every exponent in the model is a difference :math:`b_x - b_y` of global cumulative
gates (the chunk boundaries cancel), so :math:`\partial\mathcal L/\partial b_x = q_x \odot \partial q_x -
k_x\odot\partial k_x` (the gated parts of dq, dk), and the log-gate's gradient at step ``t`` is the sum of
these over steps ``>= t`` (with the bonus the query's exponent is :math:`b_{t-1}`, so its own step's
:math:`q_t \odot\partial q_t` leaves the sum). The sum over the later chunks needs no pass of its own: at the
chunk's last step the recurrence :math:`S_t = \mathrm{Diag}(e^{g_t}) S_{t-1} + k_t v_t^\top` gives the
gradient directly, :math:`\sum_v (S_\text{out} - k_t v_t^\top) \odot \bar S_t`, where :math:`\bar S_t` is the
state's whole gradient after that step (:math:`\bar S_\text{out}`, plus :math:`s\, q_t\, do_t^\top` without
the bonus, where the query reads that state); step 5 adds the in-chunk sums to it and writes the log-gates'
gradient in their dtype. :math:`S_\text{out}` is not read: with
:math:`S_\text{out} = \mathrm{Diag}(e^{c_\text{last}}) S_\text{in} + (k\circ e^{c_\text{last} - c})^\top v`, its
share :math:`\sum_v S_\text{out}\odot\bar S_\text{out}` is :math:`e^{c_\text{last}}\sum_v S_\text{in}\odot\bar
S_\text{out}` plus :math:`\sum_t k_t \odot \partial k_t` over dk's part through the states, and the last query's
:math:`s\, q_t \odot (S_\text{out}\, do_t)` is :math:`q_t \odot \partial q_t` (without its own step's share):
quantities the kernel has at hand.

Measured on the H200 (GPU call B2 of 2026-12-02, bf16 inputs as in ``benchmarks.gated``, ``triton.testing.do_bench``;
``benchmarks/NOTES.md``, the section of issue 13, has the per-kernel split): at B=4, L=4096, H=32, d=64 GLA forward
0.62 ms, forward+backward 2.69 ms, RWKV-6 0.66 / 2.86 ms (fla's ``chunk_gla`` in call A, on a busy GPU: 0.71 /
3.84 ms; ``chunk_rwkv6`` quiet, earlier: 0.89 / 3.33 ms); at B=1, L=16384, H=16, d=128 GLA 1.16 / 4.26 ms (fla 0.94 /
3.59 ms: the forward is not yet at fla's speed there). Those runs had ``_chunk_dqk`` in key blocks of 32; in key
blocks of 64 (the default now) its profile drops from 1.56 / 2.02 ms to 0.64 / 0.84 ms. The version before this
one (sub-chunks of 16, ``A`` and ``c`` stored; GPU call 3) took 1.30 / 3.32 ms and 2.81 / 6.05 ms. Errors against
float64 at B=1, L=1000, H=16 (bf16 inputs): at most 4.3e-3 of the largest value (the output's bf16 rounding).

GPU call 2 of 2026-12-03 (H200, do_bench medians, interleaved): with ``KEEP_16BIT`` and ``FWD_BF16`` (the
defaults) GLA forward 0.327 / 0.800 ms and forward+backward 1.49 / 2.66 ms at the two shapes, against 0.52 / 1.10
and 1.74 / 3.05 without them; RWKV-6 0.385 / 0.822 and 1.84 / 2.97 ms. The stored-weights output (``_tiles``)
took the d=128 forward to 0.696 ms.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunked_state import pad_to

#: steps per chunk
CHUNK = 64
#: the largest decay (in log space, over half a chunk, any channel) for which the chunk's weights are one matrix
#: product: its factors lie within e^-SPAN .. e^SPAN (float32 keeps e^-87 .. e^88)
SPAN = tl.constexpr(40.0)
#: bfloat16 inputs: the states entering the chunks and their gradients are stored in bfloat16 (True; read back into
#: float32, they are only ever operands of products rounded to tf32 or bf16 anyway), else float32. float16 inputs
#: keep float32 storage: a state can outgrow float16's range (65504) where bfloat16 has float32's.
KEEP_16BIT = True
#: bfloat16 inputs: the forward's matrix products (``_chunk_local``, ``_chunk_fwd``) take bfloat16 operands (True;
#: twice tf32's tensor-core rate and half its registers, float32's range; each operand rounded to 8 bits of
#: mantissa, the output's own rounding), else tf32. The backward's products stay at tf32.
FWD_BF16 = True


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """``a @ b`` of float32 tiles, accumulated in float32: ``"ieee"`` (exact float32, for float32 inputs),
    ``"tf32"`` (tensor cores, 10-bit mantissas like float16's, float32's range: for 16-bit inputs) or ``"bf16"``
    (the operands rounded to bfloat16 first: 8-bit mantissas, float32's range, twice tf32's rate)."""
    if PREC == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _last_row(x, rt, T: tl.constexpr):
    """Row ``T - 1`` of a ``(T, n)`` tile."""
    return tl.sum(tl.where(rt[:, None] == T - 1, x, 0.0), axis=0)


@triton.jit
def _row(x, rt, j):
    """Row ``j`` of a ``(T, n)`` tile (``rt = arange(T)``)."""
    return tl.sum(tl.where(rt[:, None] == j, x, 0.0), axis=0)


@triton.jit
def _load_rows(ptr, rows, cols, D: tl.constexpr):
    """The ``(T, n)`` tile ``x[rows, cols]`` of a ``(B, Lp, H, D)`` tensor (``rows`` index ``B * Lp * H``), float32."""
    return tl.load(ptr + rows[:, None] * D + cols[None, :]).to(tl.float32)


@triton.jit
def _gates(g_ptr, rows, rk, DK: tl.constexpr, BONUS: tl.constexpr):
    r"""``c`` (T, BK), the log-gates' inclusive cumulative sum inside the chunk, and ``cq``, the query's exponent
    (:math:`c - \log\alpha` with the bonus: the query reads the state before its own step)."""
    g = _load_rows(g_ptr, rows, rk, DK)
    c = tl.cumsum(g, axis=0)
    if BONUS:
        cq = c - g
    else:
        cq = c
    return c, cq


@triton.jit
def _causal(rt, BONUS: tl.constexpr):
    """The ``(T, T)`` mask of the weights ``A[t, j]`` inside the chunk: ``j <= t``, or ``j < t`` with the bonus."""
    if BONUS:
        return rt[:, None] > rt[None, :]
    else:
        return rt[:, None] >= rt[None, :]


@triton.jit
def _kept(steep, r, STEEP: tl.constexpr):
    """A mask shaped like ``r`` (an index range), all true if this launch stores the chunk: the chunk is ``steep``
    (a scalar) and this is the ``STEEP`` launch, or neither."""
    s = r * 0 + steep.to(tl.int32)
    if STEEP:
        return s != 0
    else:
        return s == 0


@triton.jit
def _halves(c, rt, T: tl.constexpr):
    r"""The reference ``r`` of the 64-row products, ``c`` at the chunk's middle step, and this block of channels'
    largest decay over either half of the chunk. Where that decay is at most ``SPAN`` in every channel of every
    block, the query's factors :math:`e^{c^q_t - r}` and the key's :math:`e^{r - c_j}` all lie within
    :math:`e^{\pm\mathrm{SPAN}}` (float32 keeps e^-87 .. e^88); else the chunk is steep."""
    ref = _row(c, rt, T // 2 - 1)
    return ref, tl.max(tl.maximum(-ref, ref - _row(c, rt, T - 1)), axis=0)


@triton.jit
def _split_factors(c, cq, ref):
    """The query's and the key's factors of the 64-row products, :math:`e^{c^q - r}` and :math:`e^{r - c}`, each
    within e^SPAN: already so in a chunk that is not steep; capped in a steep one, whose (then wrong, but finite)
    products the first launch forms and does not store."""
    return tl.exp(tl.minimum(cq - ref[None, :], SPAN)), tl.exp(tl.minimum(ref[None, :] - c, SPAN))


@triton.jit
def _weights(q, k, c, cq, ref, rt, T: tl.constexpr, BONUS: tl.constexpr, PREC: tl.constexpr, STEEP: tl.constexpr):
    r"""One block of key channels' share of the chunk's weights, (T, T) float32, zeros where not causal:
    :math:`A_{tj} = \sum_c q_{tc} k_{jc} e^{c^q_{tc} - c_{jc}}` (the bonus's diagonal is added by the caller).

    One 64-row matrix product :math:`(q \circ e^{c^q - r})(k \circ e^{r - c})^\top` with ``r = c`` at the chunk's
    middle step (``_halves``: the entries above the diagonal may overflow there and are masked); or, for a ``STEEP``
    chunk, one key column ``j`` at a time, each exponent :math:`c^q_t - c_j \le 0` formed before the exponential."""
    causal = _causal(rt, BONUS)
    if STEEP:
        A = tl.zeros([T, T], dtype=tl.float32)
        for j in range(T):
            k_j, c_j = _row(k, rt, j), _row(c, rt, j)
            if BONUS:
                later = rt > j
            else:
                later = rt >= j
            col = tl.sum(q * k_j[None, :] * tl.exp(tl.where(later[:, None], cq - c_j[None, :], float("-inf"))), axis=1)
            A = tl.where(rt[None, :] == j, col[:, None], A)
    else:
        to_ref, from_ref = _split_factors(c, cq, ref)
        A = _dot(q * to_ref, tl.trans(k * from_ref), PREC)
        A = tl.where(causal, A, 0.0)
    return A


@triton.jit
def _state_pass(k_ptr, v_ptr, g_ptr, s0_ptr, states_ptr, final_ptr, Lp, H, n_chunks,
                DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                HAS_S0: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """The states entering each chunk (``n_chunks`` per (batch, head), in ``states``' dtype) and the final state
    (float32)."""
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
        tl.store(states_ptr + (bh * n_chunks + ci) * DK * DV + s_off, S.to(states_ptr.dtype.element_ty))
        rows = (b * Lp + ci * T + rt) * H + h  # (T,)
        k = _load_rows(k_ptr, rows, rk, DK)
        v = _load_rows(v_ptr, rows, rv, DV)
        c = tl.cumsum(_load_rows(g_ptr, rows, rk, DK), axis=0)
        c_last = _last_row(c, rt, T)  # (BK,)
        S = tl.exp(c_last)[:, None] * S + _dot(tl.trans(k * tl.exp(c_last[None, :] - c)), v, PREC)
    tl.store(final_ptr + bh * DK * DV + s_off, S)


@triton.jit
def _chunk_local(x_ptr, y_ptr, g_ptr, out_ptr, decay_ptr, scale, Lp, H, n_chunks,
                 DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 GRAD: tl.constexpr, BONUS: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    r"""The chunk-parallel form of the state passes, first half: each chunk's own share of the state, all chunks at
    once, written into the chunk's slot of ``out`` (in its dtype); and (value block 0) the chunk's
    whole decay :math:`c_\text{last}` (batch * heads, chunks, d_k). Forward (``x, y = k, v``):
    :math:`(k\circ e^{c_\text{last} - c})^\top v`; the state's gradient (``GRAD``, ``x, y = q, do``):
    :math:`s\,(q\circ e^{c^q})^\top do`."""
    ci, bh, pkv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pk, pv = pkv // (DV // BV), pkv % (DV // BV)
    b, h = bh // H, bh % H
    rk, rv, rt = pk * BK + tl.arange(0, BK), pv * BV + tl.arange(0, BV), tl.arange(0, T)
    rows = (b * Lp + ci * T + rt) * H + h
    x = _load_rows(x_ptr, rows, rk, DK)
    y = _load_rows(y_ptr, rows, rv, DV)
    c, cq = _gates(g_ptr, rows, rk, DK, BONUS)
    c_last = _last_row(c, rt, T)
    if GRAD:
        local = scale * _dot(tl.trans(x * tl.exp(cq)), y, PREC)
    else:
        local = _dot(tl.trans(x * tl.exp(c_last[None, :] - c)), y, PREC)
    tl.store(out_ptr + (bh * n_chunks + ci) * DK * DV + rk[:, None] * DV + rv[None, :],
             local.to(out_ptr.dtype.element_ty))
    if pv == 0:
        tl.store(decay_ptr + (bh * n_chunks + ci) * DK + rk, c_last)


@triton.jit
def _combine(states_ptr, decay_ptr, first_ptr, last_ptr, n_chunks,
             DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_FIRST: tl.constexpr,
             REVERSE: tl.constexpr):  # fmt: skip
    r"""The chunk-parallel form of the state passes, second half: one (BK, BV) tile of one (batch, head) walks the
    chunks (in reverse for the gradient), :math:`S \leftarrow \mathrm{Diag}(e^{c_\text{last}}) S + \text{local}`,
    in place: each chunk's slot holds its local share on entry and the state entering the chunk (the gradient
    leaving it) on exit, in the slots' dtype (the sum runs in float32). ``first`` is the initial state (the final
    state's gradient), ``last`` receives the final state (the initial state's gradient), float32."""
    bh, pk, pv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rk, rv = pk * BK + tl.arange(0, BK), pv * BV + tl.arange(0, BV)
    s_off = rk[:, None] * DV + rv[None, :]
    if HAS_FIRST:
        S = tl.load(first_ptr + bh * DK * DV + s_off).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    step = -1 if REVERSE else 1
    ci = n_chunks - 1 if REVERSE else 0
    # each chunk's share and decay are loaded one chunk ahead, so that their loads overlap the previous step
    local = tl.load(states_ptr + (bh * n_chunks + ci) * DK * DV + s_off).to(tl.float32)
    decay = tl.load(decay_ptr + (bh * n_chunks + ci) * DK + rk)
    for i in range(n_chunks):
        more = rk * 0 + i + 1 < n_chunks  # (BK,): is there a next chunk
        nxt = ci + step
        local_next = tl.load(states_ptr + (bh * n_chunks + nxt) * DK * DV + s_off, mask=more[:, None],
                             other=0.0).to(tl.float32)
        decay_next = tl.load(decay_ptr + (bh * n_chunks + nxt) * DK + rk, mask=more, other=0.0)
        tl.store(states_ptr + (bh * n_chunks + ci) * DK * DV + s_off, S.to(states_ptr.dtype.element_ty))
        S = tl.exp(decay)[:, None] * S + local
        local, decay, ci = local_next, decay_next, nxt
    tl.store(last_ptr + bh * DK * DV + s_off, S)


@triton.jit
def _chunk_fwd(q_ptr, k_ptr, v_ptr, g_ptr, u_ptr, steep_ptr, states_ptr, o_ptr, scale, Lp, H, n_chunks, BH,
               DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               BONUS: tl.constexpr, PREC: tl.constexpr, STEEP: tl.constexpr, PERSIST: tl.constexpr):  # fmt: skip
    """``o = s ((q e^{c^q}) S_in + A v)`` for one block of value columns of one chunk (grid: chunks, batch * heads,
    value blocks) or, ``PERSIST``, of every ``num_programs``-th chunk (grid: programs, 1, value blocks): a loop over
    chunks whose next chunk's loads Triton's pipeliner can issue during this chunk's products."""
    pv = tl.program_id(2)
    if PERSIST:
        for w in tl.range(tl.program_id(0), n_chunks * BH, tl.num_programs(0), num_stages=2):
            _fwd_chunk(q_ptr, k_ptr, v_ptr, g_ptr, u_ptr, steep_ptr, states_ptr, o_ptr, scale, Lp, H, n_chunks,
                       w % n_chunks, w // n_chunks, pv, DK, DV, T, BK, BV, BONUS, PREC, STEEP)  # fmt: skip
    else:
        _fwd_chunk(q_ptr, k_ptr, v_ptr, g_ptr, u_ptr, steep_ptr, states_ptr, o_ptr, scale, Lp, H, n_chunks,
                   tl.program_id(0), tl.program_id(1), pv, DK, DV, T, BK, BV, BONUS, PREC, STEEP)  # fmt: skip


@triton.jit
def _fwd_chunk(q_ptr, k_ptr, v_ptr, g_ptr, u_ptr, steep_ptr, states_ptr, o_ptr, scale, Lp, H, n_chunks, ci, bh, pv,
               DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               BONUS: tl.constexpr, PREC: tl.constexpr, STEEP: tl.constexpr):  # fmt: skip
    """``_chunk_fwd``'s work on chunk ``ci`` of (batch, head) ``bh``, value block ``pv``: the weights ``A``
    formed here (key blocks in a loop) and not stored."""
    b, h = bh // H, bh % H
    rv, rt = pv * BV + tl.arange(0, BV), tl.arange(0, T)
    rows = (b * Lp + ci * T + rt) * H + h
    flag = steep_ptr + bh * n_chunks + ci
    if STEEP:  # the first launch recorded which chunks are steep: only those here
        go = tl.load(flag) != 0
    else:  # every chunk, as if none were steep: a steep chunk's (capped) products are wrong, and not stored
        go = True
    if go:
        A = tl.zeros([T, T], dtype=tl.float32)
        o = tl.zeros([T, BV], dtype=tl.float32)
        diag = tl.zeros([T], dtype=tl.float32)  # the bonus's weight q_t . (u o k_t)
        decay = 0.0  # the largest decay over either half of the chunk, any channel
        for pk in tl.static_range(DK // BK):
            rk = pk * BK + tl.arange(0, BK)
            q, k = _load_rows(q_ptr, rows, rk, DK), _load_rows(k_ptr, rows, rk, DK)
            c, cq = _gates(g_ptr, rows, rk, DK, BONUS)
            ref, block_decay = _halves(c, rt, T)
            decay = tl.maximum(decay, block_decay)
            A += _weights(q, k, c, cq, ref, rt, T, BONUS, PREC, STEEP)
            S = tl.load(states_ptr + (bh * n_chunks + ci) * DK * DV + rk[:, None] * DV + rv[None, :]).to(tl.float32)
            o += _dot(q * tl.exp(cq), S, PREC)
            if BONUS:
                diag += tl.sum(q * tl.load(u_ptr + h * DK + rk)[None, :] * k, axis=1)
        if BONUS:
            A += tl.where(rt[:, None] == rt[None, :], diag[:, None], 0.0)
        o += _dot(A, _load_rows(v_ptr, rows, rv, DV), PREC)
        if STEEP:
            keep = _kept(go, rt, STEEP)
        else:
            keep = rt * 0.0 + decay <= SPAN  # (T,): all or none
            if pv == 0:
                tl.store(flag, (decay > SPAN).to(tl.int8))
        tl.store(o_ptr + rows[:, None] * DV + rv[None, :], (scale * o).to(o_ptr.dtype.element_ty),
                 mask=keep[:, None])


@triton.jit
def _chunk_weights(q_ptr, k_ptr, g_ptr, u_ptr, steep_ptr, a_ptr, Lp, H, n_chunks,
                   DK: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BONUS: tl.constexpr, PREC: tl.constexpr,
                   STEEP: tl.constexpr):  # fmt: skip
    """The stored-weights form of the output, first half: one chunk's weights ``A`` (T, T), the bonus on its
    diagonal, zeros above it, written in ``a``'s dtype (the STEEP pair as in ``_chunk_fwd``; the first launch
    records each chunk's kind)."""
    ci, bh = tl.program_id(0), tl.program_id(1)
    h = bh % H
    rt = tl.arange(0, T)
    rows = ((bh // H) * Lp + ci * T + rt) * H + h
    flag = steep_ptr + bh * n_chunks + ci
    if STEEP:
        go = tl.load(flag) != 0
    else:
        go = True
    if go:
        A = tl.zeros([T, T], dtype=tl.float32)
        diag = tl.zeros([T], dtype=tl.float32)
        decay = 0.0
        for pk in tl.static_range(DK // BK):
            rk = pk * BK + tl.arange(0, BK)
            q, k = _load_rows(q_ptr, rows, rk, DK), _load_rows(k_ptr, rows, rk, DK)
            c, cq = _gates(g_ptr, rows, rk, DK, BONUS)
            ref, block_decay = _halves(c, rt, T)
            decay = tl.maximum(decay, block_decay)
            A += _weights(q, k, c, cq, ref, rt, T, BONUS, PREC, STEEP)
            if BONUS:
                diag += tl.sum(q * tl.load(u_ptr + h * DK + rk)[None, :] * k, axis=1)
        if BONUS:
            A += tl.where(rt[:, None] == rt[None, :], diag[:, None], 0.0)
        if STEEP:
            keep = _kept(go, rt, STEEP)
        else:
            keep = rt * 0.0 + decay <= SPAN
            tl.store(flag, (decay > SPAN).to(tl.int8))
        tl.store(a_ptr + ((bh * n_chunks + ci) * T + rt[:, None]) * T + rt[None, :], A.to(a_ptr.dtype.element_ty),
                 mask=keep[:, None])


@triton.jit
def _chunk_out(q_ptr, v_ptr, g_ptr, a_ptr, states_ptr, o_ptr, scale, Lp, H, n_chunks,
               DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               BONUS: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """The stored-weights form of the output, second half: ``o = s ((q e^{c^q}) S_in + A v)`` for one chunk and
    one block of value columns, ``A`` read from ``_chunk_weights`` (every exponent here is <= 0: no steep path)."""
    ci, bh, pv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rv, rt = pv * BV + tl.arange(0, BV), tl.arange(0, T)
    rows = ((bh // H) * Lp + ci * T + rt) * H + bh % H
    o = tl.zeros([T, BV], dtype=tl.float32)
    for pk in tl.static_range(DK // BK):
        rk = pk * BK + tl.arange(0, BK)
        c, cq = _gates(g_ptr, rows, rk, DK, BONUS)
        S = tl.load(states_ptr + (bh * n_chunks + ci) * DK * DV + rk[:, None] * DV + rv[None, :]).to(tl.float32)
        o += _dot(_load_rows(q_ptr, rows, rk, DK) * tl.exp(cq), S, PREC)
    A = tl.load(a_ptr + ((bh * n_chunks + ci) * T + rt[:, None]) * T + rt[None, :]).to(tl.float32)
    o += _dot(A, _load_rows(v_ptr, rows, rv, DV), PREC)
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
        tl.store(dstates_ptr + (bh * n_chunks + ci) * DK * DV + s_off, dS.to(dstates_ptr.dtype.element_ty))
        rows = (b * Lp + ci * T + rt) * H + h
        q = _load_rows(q_ptr, rows, rk, DK)
        do = _load_rows(do_ptr, rows, rv, DV)
        c, cq = _gates(g_ptr, rows, rk, DK, BONUS)
        dS = tl.exp(_last_row(c, rt, T))[:, None] * dS + scale * _dot(tl.trans(q * tl.exp(cq)), do, PREC)
    tl.store(ds0_ptr + bh * DK * DV + s_off, dS)


@triton.jit
def _chunk_dv(q_ptr, k_ptr, do_ptr, g_ptr, u_ptr, steep_ptr, dstates_ptr, dv_ptr, scale, Lp, H, n_chunks,
              DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              BONUS: tl.constexpr, PREC: tl.constexpr, STEEP: tl.constexpr):  # fmt: skip
    r"""One chunk and one block of value columns: :math:`dv = s A^\top do + (k \circ e^{c_\text{last} - c})\,
    \bar S_\text{out}`, the weights ``A`` formed again as in the forward (key blocks in a loop)."""
    ci, bh, pv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    rv, rt = pv * BV + tl.arange(0, BV), tl.arange(0, T)
    rows = (b * Lp + ci * T + rt) * H + h
    steep = tl.load(steep_ptr + bh * n_chunks + ci) != 0  # as the forward chose; the other launch does the others
    if STEEP:
        go = steep
    else:  # every chunk, as if none were steep (see _chunk_fwd)
        go = True
    if go:
        A = tl.zeros([T, T], dtype=tl.float32)
        dv = tl.zeros([T, BV], dtype=tl.float32)
        diag = tl.zeros([T], dtype=tl.float32)
        for pk in tl.static_range(DK // BK):
            rk = pk * BK + tl.arange(0, BK)
            q, k = _load_rows(q_ptr, rows, rk, DK), _load_rows(k_ptr, rows, rk, DK)
            c, cq = _gates(g_ptr, rows, rk, DK, BONUS)
            A += _weights(q, k, c, cq, _halves(c, rt, T)[0], rt, T, BONUS, PREC, STEEP)
            dS = tl.load(dstates_ptr + (bh * n_chunks + ci) * DK * DV + rk[:, None] * DV + rv[None, :]).to(tl.float32)
            dv += _dot(k * tl.exp(_last_row(c, rt, T)[None, :] - c), dS, PREC)
            if BONUS:
                diag += tl.sum(q * tl.load(u_ptr + h * DK + rk)[None, :] * k, axis=1)
        if BONUS:
            A += tl.where(rt[:, None] == rt[None, :], diag[:, None], 0.0)
        dv += scale * _dot(tl.trans(A), _load_rows(do_ptr, rows, rv, DV), PREC)
        tl.store(dv_ptr + rows[:, None] * DV + rv[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=_kept(steep, rt, STEEP)[:, None])


@triton.jit
def _chunk_dqk(q_ptr, k_ptr, v_ptr, do_ptr, g_ptr, u_ptr, steep_ptr, states_ptr, dstates_ptr,
               dq_ptr, dk_ptr, dg_ptr, du_ptr, scale, Lp, H, n_chunks,
               DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               BONUS: tl.constexpr, PREC: tl.constexpr, STEEP: tl.constexpr):  # fmt: skip
    """dq, dk and the log-gates' gradient of one chunk and one block of key channels (and the bonus's share of
    its gradient): the weights' gradient ``dA = s do v^T`` is formed here, value blocks in a loop."""
    ci, bh, pk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    rk, rt = pk * BK + tl.arange(0, BK), tl.arange(0, T)
    rows = (b * Lp + ci * T + rt) * H + h
    steep = tl.load(steep_ptr + bh * n_chunks + ci) != 0  # as the forward chose; the other launch does the others
    if STEEP:
        go = steep
    else:  # every chunk, as if none were steep (see _chunk_fwd)
        go = True
    if go:
        st_base = (bh * n_chunks + ci) * DK * DV  # the states and their gradients: n_chunks per (batch, head)
        # 1. through the states, dq = s e^{c^q} (do S_in^T), dk = e^{c_last - c} (v dS_out^T) (the factors are applied
        # below), and the weights' gradient dA = s do v^T
        dq = tl.zeros([T, BK], dtype=tl.float32)
        dk = tl.zeros([T, BK], dtype=tl.float32)
        dA = tl.zeros([T, T], dtype=tl.float32)
        s_ds = tl.zeros([BK], dtype=tl.float32)  # rowsum(S_in o dS_out), for the log-gates below
        for pv in tl.static_range(DV // BV):
            rv = pv * BV + tl.arange(0, BV)
            s_tile = rk[:, None] * DV + rv[None, :]
            do, v = _load_rows(do_ptr, rows, rv, DV), _load_rows(v_ptr, rows, rv, DV)
            s_in = tl.load(states_ptr + st_base + s_tile).to(tl.float32)
            ds_out = tl.load(dstates_ptr + st_base + s_tile).to(tl.float32)
            dq += _dot(do, tl.trans(s_in), PREC)
            dk += _dot(v, tl.trans(ds_out), PREC)
            dA += _dot(do, tl.trans(v), PREC)
            s_ds += tl.sum(s_in * ds_out, axis=1)
        dA = scale * dA
        da_tt = tl.sum(tl.where(rt[:, None] == rt[None, :], dA, 0.0), axis=1)  # dA's diagonal: s do_t . v_t
        dA = tl.where(_causal(rt, BONUS), dA, 0.0)
        # 2. inside the chunk, dq_t = sum_j dA_tj k_j e^{c^q_t - c_j}, dk_j = sum_t dA_tj q_t e^{c^q_t - c_j}: two
        # 64-row products with the exponent split at the reference r (as in _weights; the states' factors are then
        # e^{c^q} = e^{c^q - r} e^r and e^{c_last - c} = e^{r - c} e^{c_last - r}, each factor within e^{+-SPAN}),
        # or in a STEEP chunk key column by key column, each exponent formed before the exponential
        q, k = _load_rows(q_ptr, rows, rk, DK), _load_rows(k_ptr, rows, rk, DK)
        c, cq = _gates(g_ptr, rows, rk, DK, BONUS)
        c_last = _last_row(c, rt, T)
        if STEEP:
            dq *= scale * tl.exp(cq)
            dk_state = dk * tl.exp(c_last[None, :] - c)
            dk = dk_state
            for j in range(T):
                k_j, c_j = _row(k, rt, j), _row(c, rt, j)
                da_j = tl.sum(tl.where(rt[None, :] == j, dA, 0.0), axis=1)  # dA[:, j]
                if BONUS:
                    later = rt > j
                else:
                    later = rt >= j
                E = tl.exp(tl.where(later[:, None], cq - c_j[None, :], float("-inf")))
                dq += da_j[:, None] * k_j[None, :] * E
                dk += tl.where(rt[:, None] == j, tl.sum(da_j[:, None] * q * E, axis=0)[None, :], 0.0)
        else:
            ref = _halves(c, rt, T)[0]
            to_ref, from_ref = _split_factors(c, cq, ref)
            dq = (dq * (scale * tl.exp(ref))[None, :] + _dot(dA, k * from_ref, PREC)) * to_ref
            dk_state = dk * (tl.exp(c_last - ref)[None, :] * from_ref)
            dk = dk_state + _dot(tl.trans(dA), q * to_ref, PREC) * from_ref
        # the log-gate's gradient at the chunk's last step, from the recurrence S_t = Diag(e^{g_t}) S_{t-1} + k_t v_t^T:
        # d/dg_t = rowsum(e^{g_t} S_{t-1} o dS_t) with e^{g_t} S_{t-1} = S_out - k_t v_t^T and dS_t the whole gradient
        # of the state after step t: dS_out, plus s q_t do_t^T where the query reads that state (no bonus). With
        # S_out = Diag(e^{c_last}) S_in + (k o e^{c_last - c})^T v this is e^{c_last} rowsum(S_in o dS_out) plus
        # sum_{t < T-1} k_t o dk_t (dk's part through the states), plus (no bonus) the last query's q o dq less its
        # own step's share q k dA_tt.
        d_last = tl.exp(c_last) * s_ds + tl.sum(tl.where(rt[:, None] < T - 1, k * dk_state, 0.0), axis=0)
        if not BONUS:
            d_last += _last_row(q * (dq - k * da_tt[:, None]), rt, T)
        # 3. the log-gates: b_x appears with + in the queries' exponents, with - in the keys' (module docstring); the
        # gradient at step t is d_last plus the shares of the steps t <= x < T - 1
        db = q * dq - k * dk
        if BONUS:  # the query's exponent is b_{t-1}: its own step's share is not in the sum
            own = q * dq
        else:
            own = tl.zeros([T, BK], dtype=tl.float32)
        suffix = tl.sum(db, axis=0)[None, :] - tl.cumsum(db, axis=0) + db  # over steps >= t
        dg = d_last[None, :] + _last_row(own - db, rt, T)[None, :] + suffix - own
        if BONUS:  # the bonus's diagonal term s (q_t . (u o k_t)) v_t: no gate in it
            u = tl.load(u_ptr + h * DK + rk)
            dq += da_tt[:, None] * u[None, :] * k
            dk += da_tt[:, None] * u[None, :] * q
            tl.store(du_ptr + ((b * n_chunks + ci) * H + h) * DK + rk, tl.sum(da_tt[:, None] * q * k, axis=0),
                     mask=_kept(steep, rk, STEEP))
        kd_off, kd_keep = rows[:, None] * DK + rk[None, :], _kept(steep, rt, STEEP)[:, None]
        tl.store(dq_ptr + kd_off, dq.to(dq_ptr.dtype.element_ty), mask=kd_keep)
        tl.store(dk_ptr + kd_off, dk.to(dk_ptr.dtype.element_ty), mask=kd_keep)
        tl.store(dg_ptr + kd_off, dg.to(dg_ptr.dtype.element_ty), mask=kd_keep)


def _tiles(DK, DV):
    """Tile sizes of each pass (key block, value block) and its warps. ``split``: the state passes in their
    chunk-parallel form (``local``: tiles of ``_chunk_local``, ``combine``: of ``_combine``), else ``state``'s
    tiles walk the chunks in one pass.

    Chosen from GPU call B2 of 2026-12-02 (H200, bf16, ``benchmarks.profile``, GPU us per forward+backward at
    B=4 L=4096 H=32 d=64 / B=1 L=16384 H=16 d=128): the chunk-parallel state passes 456 / 986 (``_chunk_local``
    + ``_combine``, both directions) against one walk per (64, 32) tile 479 / 1318; ``_chunk_dqk`` in key blocks
    of 64 on 4 warps 644 / 840, of 32 on 8 warps 1560 / 2018 (though it spills no registers there and the 64 on 4
    warps does), of 16 on 4 warps 1028 / 1927; ``_chunk_fwd`` and ``_chunk_dv`` in value blocks of 64 on 4 warps
    384 / 654 and 293 / 625, one value block of d_v on 8 warps 581 / 763 and 421 / 691. ``fwd_persist``: 0, or
    ``_chunk_fwd``'s non-steep launch on that many programs per SM, each looping over chunks. ``stored``: the
    output in two kernels instead of ``_chunk_fwd``, ``_chunk_weights`` (``weights``: key block, warps) storing each
    chunk's ``A`` once and ``_chunk_out`` (``fwd``'s tiles) reading it per value block: for d_k > 64 only (GPU call
    2 of 2026-12-03, GLA forward at the two shapes: 0.388 against 0.327 ms at d=64, 0.696 against 0.800 at d=128;
    there two persistent programs per SM took 0.747, tiles of 128 values 0.87, 8 warps 1.06)."""
    return dict(split=True, state=(min(DK, 64), min(DV, 32), 4), local=(min(DK, 64), min(DV, 64), 4),
                combine=(min(DK, 32), min(DV, 64), 4), fwd=(min(DK, 64), min(DV, 64), 4),
                dv=(min(DK, 64), min(DV, 64), 4), dqk=(min(DK, 64), min(DV, 64), 4), fwd_persist=0,
                stored=DK > 64, weights=(min(DK, 64), 4))


def _processors(device):
    """Streaming multiprocessors of a CUDA device (one on CPU, where the interpreter runs: the tests' few chunks
    then take several turns of the persistent loop)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _state_dtype(dtype):
    """The dtype of the per-chunk states and their gradients (``KEEP_16BIT``)."""
    return torch.bfloat16 if KEEP_16BIT and dtype == torch.bfloat16 else torch.float32


def _precisions(dtype):
    """The matrix products' precision in the backward and in the forward (``FWD_BF16``), as ``_dot`` takes it."""
    prec = "ieee" if dtype == torch.float32 else "tf32"
    return prec, "bf16" if FWD_BF16 and dtype == torch.bfloat16 else prec


class GLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_alpha, S0, scale, bonus):
        B, L, H, DK = q.shape
        DV = v.shape[-1]
        T, n = CHUNK, triton.cdiv(L, CHUNK)
        Lp = n * T
        _, prec = _precisions(q.dtype)
        tiles = _tiles(DK, DV)
        qp, kp, vp, g = pad_to(q, Lp), pad_to(k, Lp), pad_to(v, Lp), pad_to(log_alpha, Lp)
        states = torch.empty(B * H, n, DK, DV, dtype=_state_dtype(q.dtype), device=q.device)
        final = torch.empty(B * H, DK, DV, dtype=torch.float32, device=q.device)
        s0 = S0.float().contiguous() if S0 is not None else final
        if tiles["split"]:  # every chunk's own share at once, then a short walk that adds them up
            decay = torch.empty(B * H, n, DK, dtype=torch.float32, device=q.device)
            BK, BV, warps = tiles["local"]
            _chunk_local[(n, B * H, (DK // BK) * (DV // BV))](kp, vp, g, states, decay, 1.0, Lp, H, n, DK=DK, DV=DV,
                                                              T=T, BK=BK, BV=BV, GRAD=False, BONUS=False, PREC=prec,
                                                              num_warps=warps)  # fmt: skip
            BK, BV, warps = tiles["combine"]
            _combine[(B * H, DK // BK, DV // BV)](states, decay, s0, final, n, DK=DK, DV=DV, BK=BK, BV=BV,
                                                  HAS_FIRST=S0 is not None, REVERSE=False, num_warps=warps)  # fmt: skip
        else:
            BK, BV, warps = tiles["state"]
            _state_pass[(B * H, DK // BK, DV // BV)](kp, vp, g, s0, states, final, Lp, H, n, DK=DK, DV=DV, T=T, BK=BK,
                                                     BV=BV, HAS_S0=S0 is not None, PREC=prec,
                                                     num_warps=warps)  # fmt: skip
        u = bonus.float().contiguous() if bonus is not None else final
        o = torch.empty(B, Lp, H, DV, dtype=q.dtype, device=q.device)
        steep = torch.empty(B * H, n, dtype=torch.int8, device=q.device)  # which chunks take the columns
        if tiles["stored"]:  # the weights once per chunk, stored, then the output per value block
            A = torch.empty(B * H, n, T, T, dtype=torch.bfloat16 if prec == "bf16" else torch.float32, device=q.device)
            BK, warps = tiles["weights"]
            for columns in (False, True):
                _chunk_weights[(n, B * H)](qp, kp, g, u, steep, A, Lp, H, n, DK=DK, T=T, BK=BK, BONUS=bonus is not None,
                                           PREC=prec, STEEP=columns, num_warps=warps)  # fmt: skip
            BK, BV, warps = tiles["fwd"]
            _chunk_out[(n, B * H, DV // BV)](qp, vp, g, A, states, o, scale, Lp, H, n, DK=DK, DV=DV, T=T, BK=BK, BV=BV,
                                             BONUS=bonus is not None, PREC=prec, num_warps=warps)  # fmt: skip
        else:
            BK, BV, warps = tiles["fwd"]
            per_sm = tiles["fwd_persist"]
            for columns in (False, True):  # the chunks of 64-row products, then the others (module docstring)
                persist = bool(per_sm) and not columns  # (the steep chunks, rare, one program each)
                if persist:
                    grid = (min(n * B * H, max(1, per_sm * _processors(q.device) // (DV // BV))), 1, DV // BV)
                else:
                    grid = (n, B * H, DV // BV)
                _chunk_fwd[grid](qp, kp, vp, g, u, steep, states, o, scale, Lp, H, n, B * H, DK=DK, DV=DV, T=T, BK=BK,
                                 BV=BV, BONUS=bonus is not None, PREC=prec, STEEP=columns, PERSIST=persist,
                                 num_warps=warps)  # fmt: skip
        ctx.save_for_backward(qp, kp, vp, g, u, steep, states)
        ctx.scale, ctx.L, ctx.has_s0, ctx.has_bonus = scale, L, S0 is not None, bonus is not None
        ctx.dtypes = (log_alpha.dtype, None if S0 is None else S0.dtype, None if bonus is None else bonus.dtype)
        return o[:, :L], final.view(B, H, DK, DV)

    @staticmethod
    def backward(ctx, do, dS_final):
        qp, kp, vp, g, u, steep, states = ctx.saved_tensors
        B, Lp, H, DK = qp.shape
        DV, T, L, scale, bonus = vp.shape[-1], CHUNK, ctx.L, ctx.scale, ctx.has_bonus
        n = Lp // T
        prec, _ = _precisions(qp.dtype)
        tiles = _tiles(DK, DV)
        dop = pad_to(do if do is not None else torch.zeros(B, L, H, DV, dtype=vp.dtype, device=vp.device), Lp)
        dsl = (dS_final if dS_final is not None else torch.zeros(B, H, DK, DV, device=qp.device)).float().contiguous()
        dstates, dS0 = torch.empty(B * H, n, DK, DV, dtype=states.dtype, device=qp.device), torch.empty_like(dsl)
        if tiles["split"]:
            decay = torch.empty(B * H, n, DK, dtype=torch.float32, device=qp.device)
            BK, BV, warps = tiles["local"]
            _chunk_local[(n, B * H, (DK // BK) * (DV // BV))](qp, dop, g, dstates, decay, scale, Lp, H, n, DK=DK,
                                                              DV=DV, T=T, BK=BK, BV=BV, GRAD=True, BONUS=bonus,
                                                              PREC=prec, num_warps=warps)  # fmt: skip
            BK, BV, warps = tiles["combine"]
            _combine[(B * H, DK // BK, DV // BV)](dstates, decay, dsl, dS0, n, DK=DK, DV=DV, BK=BK, BV=BV,
                                                  HAS_FIRST=True, REVERSE=True, num_warps=warps)  # fmt: skip
        else:
            BK, BV, warps = tiles["state"]
            _dstate_pass[(B * H, DK // BK, DV // BV)](qp, dop, g, dsl, dstates, dS0, scale, Lp, H, n, DK=DK, DV=DV,
                                                      T=T, BK=BK, BV=BV, BONUS=bonus, PREC=prec,
                                                      num_warps=warps)  # fmt: skip
        dv = torch.empty_like(vp)
        BK, BV, warps = tiles["dv"]
        for columns in (False, True):
            _chunk_dv[(n, B * H, DV // BV)](qp, kp, dop, g, u, steep, dstates, dv, scale, Lp, H, n, DK=DK, DV=DV, T=T,
                                            BK=BK, BV=BV, BONUS=bonus, PREC=prec, STEEP=columns,
                                            num_warps=warps)  # fmt: skip
        dq, dk = torch.empty_like(qp), torch.empty_like(kp)
        dg = torch.empty_like(g)
        du = torch.empty(B, n, H, DK, dtype=torch.float32, device=qp.device) if bonus else dg
        BK, BV, warps = tiles["dqk"]
        for columns in (False, True):
            _chunk_dqk[(n, B * H, DK // BK)](qp, kp, vp, dop, g, u, steep, states, dstates, dq, dk, dg, du, scale, Lp,
                                             H, n, DK=DK, DV=DV, T=T, BK=BK, BV=BV, BONUS=bonus, PREC=prec,
                                             STEEP=columns, num_warps=warps)  # fmt: skip
        _, s0_dt, u_dt = ctx.dtypes
        return (dq[:, :L], dk[:, :L], dv[:, :L], dg[:, :L], dS0.to(s0_dt) if ctx.has_s0 else None, None,
                du.sum((0, 1)).to(u_dt) if bonus else None)  # fmt: skip


def gla(q, k, v, log_alpha, initial_state=None, scale=None, bonus=None):
    """``(o, final_state)``; shapes as in :func:`seqbook.linear_attention.gla`; d_k, d_v in 16..128, powers of two."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return GLA.apply(q, k, v, log_alpha, initial_state, scale, bonus)
