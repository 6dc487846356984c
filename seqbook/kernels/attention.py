r"""Triton kernel: FlashAttention, forward and backward, reading ``(batch, length, heads, d)`` tensors.

The readable forms are in :mod:`seqbook.attention` (glossary and shapes there); this
module has the same signature, ``attention(q, k, v, causal, scale) -> o``, behind a
:class:`torch.autograd.Function`. :func:`seqbook.attention.attention_tiled` and
:func:`seqbook.attention.attention_backward_tiled` are this kernel's algorithm written
in PyTorch, loop for loop; read them first.

What bounds it
--------------
Naive attention writes the ``(L, L)`` scores to memory and reads them back, several
times (scores, softmax, the product with ``V``): :math:`O(L^2)` bytes, so it is bound
by memory long before the arithmetic matters. Here a program keeps one block of
``BLOCK_M`` queries on chip, in registers, and streams the keys and values past it in
blocks of ``BLOCK_N``; the scores of one tile live only in registers. Memory traffic is
``q, k, v`` read and ``o`` written (plus ``K, V`` re-read once per query block, mostly
from L2), and the kernel is bound by its two matrix products per tile,
:math:`4 L^2 d` FLOPs per head (half that when causal), and by the exponentials.

The forward, per program (one query block of one (batch, head))
----------------------------------------------------------------
1. Load the query block; set the running max :math:`m = -\infty`, normalizer
   :math:`l = 0`, accumulator :math:`\mathrm{acc} = 0` (float32).
2. For each key block: scores :math:`S = s\,q k^\top`, then the online softmax update
   (:func:`seqbook.attention.online_softmax_update`) with the accumulator rescaled by the
   same factor :math:`e^{m - m'}`, and :math:`\mathrm{acc} \mathrel{+}= e^{S - m'} v`.
3. Write :math:`o = \mathrm{acc}/l` and the log-sum-exp :math:`m + \log l` of each row:
   ``(batch, heads, length)`` float32, all that the backward keeps of the softmax.

Exponentials are taken base 2 (``exp2`` is the GPU's native instruction; ``exp`` is
``exp2`` after a multiply): :math:`e^{x} = 2^{x \log_2 e}`, and :math:`\log_2 e` is folded
into the scale once. The running max is kept in those base-2 units; since the scale is
positive, the max of the scaled scores is the scale times the max of the raw products
:math:`q \cdot k`, so the kernel takes the max of the raw tile and a score then costs one
fused multiply-add (:math:`s\,\log_2 e\; q\cdot k - m`) and one ``exp2``. Besides the
tensor cores' two products, these per-score instructions (multiply-add, max, sum, ``exp2``,
conversion to 16 bits) are the forward's whole cost, so each one saved counts (a multiply
then a subtraction took 2.24 ms at B=1 H=16 L=16384 d=128 bf16 causal on an H200, the fused
form 2.17 ms, same run). The stored log-sum-exp is converted back to base ``e``.

Causal: a key block entirely after the query block contributes nothing and is never
loaded; blocks entirely before it need no mask; only the blocks on the diagonal are
masked (``BLOCK_M / BLOCK_N`` of them per query block). Sequence lengths that are not a
multiple of the block are masked at the edge: rows past the end are loaded as zeros and
never stored, keys past the end get score :math:`-\infty`. Since query blocks near the end
have the most key blocks to visit, programs are numbered from the last query block down,
so that the longest start first and the short ones fill in at the end.

The backward: recompute, do not store
-------------------------------------
With :math:`\delta_i = dO_i \cdot O_i` (a preprocess kernel, one dot product per row) and
:math:`P_{ij} = e^{S_{ij} - \mathrm{lse}_i}` recomputed tile by tile from the saved
log-sum-exp, the gradients (derived in :func:`seqbook.attention.attention_backward_tiled`)
are :math:`dV = P^\top dO`, :math:`dS = P \circ (dO\,V^\top - \delta)`,
:math:`dQ = s\, dS\, K`, :math:`dK = s\, dS^\top Q`. Two kernels, neither writing to
memory another program writes (no atomics, so the result does not depend on scheduling):

- ``_attn_bwd_dkdv``: one program per key block; it holds ``k, v`` and accumulates
  ``dk, dv`` over the query blocks that see it (causal: from the diagonal on);
- ``_attn_bwd_dq``: one program per query block; it holds ``q, dO``, accumulates ``dq``.

Each recomputes the tile's scores and :math:`dP = dO\,V^\top`: seven tile products in
all against five if one kernel gathered ``dq`` with atomic additions (FlashAttention-2's
choice), a price paid for determinism and simplicity.

Precision: products accumulate in float32; ``P`` and ``dS`` are rounded to the input
dtype before their products with ``V``, ``dO``, ``Q``, ``K`` (as every fast attention kernel
does; bf16 keeps 8 bits). Float32 inputs use true float32 products (``ieee``), not TF32.

Launch option ``TMA`` (a key of a configuration; on in the d = 128 defaults, where it was
timed faster, off elsewhere): the streamed tiles (keys and values in the forward and
``dq``; queries and ``dO`` in ``dk, dv``) are fetched by Hopper's copy engine through a
tensor descriptor of each (batch, head)'s ``(L, d)`` rows (``tl.make_tensor_descriptor``,
made inside the kernel; rows past ``L`` arrive as zeros), instead of by every thread
computing addresses: fewer registers (dk/dv at d = 128: 136 bytes of spill down to 56; dq:
243 registers down to 177). It needs 16-byte aligned rows; inputs that are not fall back to
ordinary loads, and it needs a Triton allocator for the descriptors, which the launch sets
(``triton.set_allocator``, torch's memory).

On an sm_90 GPU, 16-bit inputs with ``d = 128`` and ``L`` a multiple of 128 take another forward
by default, :mod:`seqbook.kernels.attention_hopper` (Gluon; two warp groups per program overlap
their softmax with the tensor cores' products, which this kernel's compiled loop cannot; 1.09x
cuDNN's speed at B=1 L=16384 H=16 where this kernel reaches 0.85x): same outputs, the same
backward. :data:`HOPPER_HEAD_DIMS` says at which head sizes; a configuration passed to
:func:`_forward` selects this kernel.

Portability: Triton 3.6 (compiled, Hopper) and 3.9 (the CPU interpreter): ``tl.dot``,
``tl.range``, ``tl.exp2``, ``tl.make_tensor_descriptor``. Head dimension a power of two in
16..128 (a tile holds whole rows). ``Lq == Lk``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import backend as _backend
from . import attention_hopper as _hopper

LOG2E = 1.4426950408889634  # log2(e): e^x = 2^(x log2 e)
LN2 = 0.6931471805599453  # ln(2): ln x = log2(x) ln 2


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


#: Lazy rescaling (``LAZY`` in a forward configuration): the reference point of a row's
#: exponentials moves only when a key block's max passes it by more than this many powers
#: of two, so every P stays <= 2^8 (float32 and bf16 hold that with room to spare).
#: Two other ways of saving softmax work, exponentials by a cubic on the FMA units and
#: ``LAZY = 2`` (exponentials against the standing reference point before the block's max),
#: were timed on the H200 on 2026-12-03 and lost at both head sizes, so they were removed.
LAZY_SLACK = tl.constexpr(8.0)

@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, k_src, v_src, stride_kl, stride_vl, offs_m, lo, hi, L, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr, TMA: tl.constexpr, LAZY: tl.constexpr,
):  # fmt: skip
    """Fold key blocks [lo, hi) into (acc, l, m); MASKED: blocks on the diagonal or at the end.

    ``k_src, v_src``: the (batch, head)'s first key and value (pointers), or, with ``TMA``,
    tensor descriptors of its ``(L, d)`` keys and values (the copy engine fills rows past
    ``L`` with zeros). ``LAZY``: see :data:`LAZY_SLACK`."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if TMA:
            k = k_src.load([start_n, 0])
        elif MASKED:
            k = tl.load(k_src + offs_n[:, None] * stride_kl + offs_d[None, :], mask=(offs_n < L)[:, None], other=0.0)
        else:
            k = tl.load(k_src + offs_n[:, None] * stride_kl + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # q.k, unscaled
        if MASKED:
            keep = offs_n[None, :] < L
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            qk = tl.where(keep, qk, float("-inf"))
        # The online softmax in base-2 units, scores s = qk_scale * q.k with qk_scale = s log2(e) > 0:
        # move the reference point to the new max, rescale what was summed. Since the scale is
        # positive, max(s) = qk_scale * max(q.k), and s - m' is one fused multiply-add per score.
        m_blk = tl.max(qk, 1) * qk_scale
        if LAZY:
            # Any reference point gives the same o = acc / l, as long as acc and l share it and
            # 2^(s - m) stays in range: move it only when the block passes it by > LAZY_SLACK.
            # (From m = -inf every row moves.) Rows that keep theirs get alpha = 2^0 = 1 exactly.
            m_new = tl.where(m_blk - m_i > LAZY_SLACK, m_blk, m_i)
            # One decision for the whole tile (a branch all threads take alike), taken here so that
            # its exchange between warps overlaps the exponentials below.
            moved = tl.max(m_new - m_i, 0) > 0.0
        else:
            m_new = tl.maximum(m_i, m_blk)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            v = v_src.load([start_n, 0])
        elif MASKED:
            v = tl.load(v_src + offs_n[:, None] * stride_vl + offs_d[None, :], mask=(offs_n < L)[:, None], other=0.0)
        else:
            v = tl.load(v_src + offs_n[:, None] * stride_vl + offs_d[None, :])
        if LAZY:
            # Rescale the (BLOCK_M, d) accumulator only when some row moved: after the first
            # block, rarely.
            if moved:
                acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE,  # q, k, v, o: (B, L, H, d) with unit stride along d; LSE: (B, H, L) float32
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh, stride_ob, stride_ol, stride_oh,
    H, L, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr, TMA: tl.constexpr = False, LAZY: tl.constexpr = False,
):  # fmt: skip
    # Program (query block, batch x head); causal: the last query block (the most work) first.
    start_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # int64: B * L * H * d may pass 2^31
    q_base = Q + b * stride_qb + h * stride_qh
    k_src = K + b * stride_kb + h * stride_kh
    v_src = V + b * stride_vb + h * stride_vh
    if TMA:
        k_src = tl.make_tensor_descriptor(k_src, shape=[L, HEAD_DIM], strides=[stride_kl, 1],
                                          block_shape=[BLOCK_N, HEAD_DIM])
        v_src = tl.make_tensor_descriptor(v_src, shape=[L, HEAD_DIM], strides=[stride_vl, 1],
                                          block_shape=[BLOCK_N, HEAD_DIM])  # fmt: skip
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        # Keys before the block: all visible, no mask. Then the diagonal: masked.
        diagonal = start_m * BLOCK_M
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, stride_kl, stride_vl, offs_m, 0, diagonal, L,
                                   qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION, NUM_STAGES, TMA, LAZY)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, stride_kl, stride_vl, offs_m, diagonal,
                                   tl.minimum(diagonal + BLOCK_M, L), L, qk_scale, True, CAUSAL, HEAD_DIM,
                                   BLOCK_N, PRECISION, NUM_STAGES, TMA, LAZY)  # fmt: skip
    else:
        # Whole key blocks without a mask, then the partial block at the end (if any) with one.
        whole = (L // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, stride_kl, stride_vl, offs_m, 0, whole, L,
                                   qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION, NUM_STAGES, TMA, LAZY)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, stride_kl, stride_vl, offs_m, whole, L, L,
                                   qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION, NUM_STAGES, TMA,
                                   LAZY)  # fmt: skip

    # Every row saw at least its own key (or key 0), so l >= 1: no division by zero.
    o = acc / l_i[:, None]
    o_base = O + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ol + offs_d[None, :], o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * L + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_ok)


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_delta(
    O, DO, DELTA, stride_ob, stride_ol, stride_oh, stride_db, stride_dl, stride_dh, H, L,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta_i = dO_i . O_i, (B, H, L) float32: the row sums sum_j P_ij dP_ij, one dot product each."""
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dl + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)  # fmt: skip
    tl.store(DELTA + bh.to(tl.int64) * L + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, q_src, do_src, lse_base, delta_base, stride_ql, stride_dl, offs_n, lo, hi, L, qk_scale,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Accumulate dk, dv of one key block over query blocks [lo, hi); MASKED: the causal diagonal.
    Tiles are transposed (keys along rows), so that dk and dv come out as plain products.
    ``q_src, do_src``: pointers, or with ``TMA`` tensor descriptors (as in :func:`_fwd_tiles`)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in tl.range(lo, hi, BLOCK_M, num_stages=NUM_STAGES):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < L
        if TMA:
            q = q_src.load([start_m, 0])
        else:
            q = tl.load(q_src + offs_m[:, None] * stride_ql + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        # Queries past the end get lse = +inf, so P = 2^(s - inf) = 0: they contribute nothing.
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        if MASKED:  # a score of -inf gives P = 0 (masking P after the exp2 could overflow first)
            sT = tl.where(offs_m[None, :] >= offs_n[:, None], sT, float("-inf"))
        pT = tl.exp2(sT - lse[None, :])
        if TMA:
            do = do_src.load([start_m, 0])
        else:
            do = tl.load(do_src + offs_m[:, None] * stride_dl + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_db, stride_dl, stride_dh, stride_dkb, stride_dkl, stride_dkh, stride_dvb, stride_dvl, stride_dvh,
    H, L, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr, TMA: tl.constexpr = False,
):  # fmt: skip
    # Program (key block, batch x head); causal: the first key blocks have the most queries, and run first.
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = (offs_n < L)[:, None]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :], mask=key_ok, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :], mask=key_ok, other=0.0)
    q_src = Q + b * stride_qb + h * stride_qh
    do_src = DO + b * stride_db + h * stride_dh
    if TMA:
        q_src = tl.make_tensor_descriptor(q_src, shape=[L, HEAD_DIM], strides=[stride_ql, 1],
                                          block_shape=[BLOCK_M, HEAD_DIM])
        do_src = tl.make_tensor_descriptor(do_src, shape=[L, HEAD_DIM], strides=[stride_dl, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])  # fmt: skip
    lse_base = LSE + bh.to(tl.int64) * L
    delta_base = DELTA + bh.to(tl.int64) * L

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        # Queries on the diagonal (masked), then every later query (none masked).
        diagonal = start_n * BLOCK_N
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_src, do_src, lse_base, delta_base, stride_ql, stride_dl, offs_n,
                             diagonal, tl.minimum(diagonal + BLOCK_N, L), L, qk_scale, True, HEAD_DIM, BLOCK_M,
                             PRECISION, NUM_STAGES, TMA)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_src, do_src, lse_base, delta_base, stride_ql, stride_dl, offs_n,
                             diagonal + BLOCK_N, L, L, qk_scale, False, HEAD_DIM, BLOCK_M, PRECISION, NUM_STAGES,
                             TMA)
    else:
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_src, do_src, lse_base, delta_base, stride_ql, stride_dl, offs_n,
                             0, L, L, qk_scale, False, HEAD_DIM, BLOCK_M, PRECISION, NUM_STAGES, TMA)  # fmt: skip
    dk = dk * sm_scale  # dK = s dS^T Q: the scale s of the scores, in natural units
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkl + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=key_ok)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvl + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=key_ok)  # fmt: skip


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, k_src, v_src, stride_kl, stride_vl, offs_m, lo, hi, L, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Accumulate dq of one query block over key blocks [lo, hi); MASKED: the diagonal or the end.
    ``k_src, v_src``: pointers, or with ``TMA`` tensor descriptors (as in :func:`_fwd_tiles`)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if TMA:
            k = k_src.load([start_n, 0])
            v = v_src.load([start_n, 0])
        elif MASKED:
            k = tl.load(k_src + offs_n[:, None] * stride_kl + offs_d[None, :], mask=(offs_n < L)[:, None], other=0.0)
            v = tl.load(v_src + offs_n[:, None] * stride_vl + offs_d[None, :], mask=(offs_n < L)[:, None], other=0.0)
        else:
            k = tl.load(k_src + offs_n[:, None] * stride_kl + offs_d[None, :])
            v = tl.load(v_src + offs_n[:, None] * stride_vl + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            keep = offs_n[None, :] < L
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_db, stride_dl, stride_dh, stride_dqb, stride_dql, stride_dqh,
    H, L, qk_scale, sm_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr, TMA: tl.constexpr = False,
):  # fmt: skip
    start_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dl + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)  # fmt: skip
    lse = tl.load(LSE + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)
    k_src = K + b * stride_kb + h * stride_kh
    v_src = V + b * stride_vb + h * stride_vh
    if TMA:
        k_src = tl.make_tensor_descriptor(k_src, shape=[L, HEAD_DIM], strides=[stride_kl, 1],
                                          block_shape=[BLOCK_N, HEAD_DIM])
        v_src = tl.make_tensor_descriptor(v_src, shape=[L, HEAD_DIM], strides=[stride_vl, 1],
                                          block_shape=[BLOCK_N, HEAD_DIM])  # fmt: skip

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        diagonal = start_m * BLOCK_M
        dq = _dq_tiles(dq, q, do, lse, delta, k_src, v_src, stride_kl, stride_vl, offs_m, 0, diagonal, L,
                       qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION, NUM_STAGES, TMA)
        dq = _dq_tiles(dq, q, do, lse, delta, k_src, v_src, stride_kl, stride_vl, offs_m, diagonal,
                       tl.minimum(diagonal + BLOCK_M, L), L, qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_N,
                       PRECISION, NUM_STAGES, TMA)  # fmt: skip
    else:
        whole = (L // BLOCK_N) * BLOCK_N
        dq = _dq_tiles(dq, q, do, lse, delta, k_src, v_src, stride_kl, stride_vl, offs_m, 0, whole, L,
                       qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION, NUM_STAGES, TMA)
        dq = _dq_tiles(dq, q, do, lse, delta, k_src, v_src, stride_kl, stride_vl, offs_m, whole, L, L,
                       qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_N, PRECISION, NUM_STAGES, TMA)  # fmt: skip
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dql + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip


# --------------------------------------------------------------------------------------
# Configurations and launches
# --------------------------------------------------------------------------------------

#: (kernel, element bytes, head dim) -> tile sizes, warps, pipeline stages, for compiled
#: kernels (Hopper). "dkdv" tiles are (BLOCK_M queries streamed, BLOCK_N keys held); the
#: forward and "dq" hold BLOCK_M queries and stream BLOCK_N keys. Causal masking needs
#: the held block to be a multiple of the streamed one.
#:
#: d = 128 and d = 64 are chosen from timings on an H200 (Triton 3.6, bf16, causal;
#: ``python -m benchmarks.run --quick --sweep --ops attention``, recorded in
#: benchmarks/results/sweeps/2026-12-02-h200-attention-attention.json; each row varies one
#: kernel with the others at the previous defaults). At d = 128, L = 16384 the whole backward
#: took 15.5 ms with dk/dv tiles of (32 queries streamed, 64 keys held) and 7.55 ms with
#: (64, 128), although that tile compiles to 255 registers with a small spill: each step then
#: does twice the wgmma work per load; "dq" with 3 stages 14.5 instead of 15.5. At d = 64
#: (B=4, H=32, L=4096) the smaller tiles won: forward (64, 64, 4 warps) 0.70 ms against 0.85,
#: dk/dv (32, 64, 4 warps) 2.75 against 3.08, dq (64, 64, 4 warps) 2.44 against 3.04. d = 32
#: and 16 are still chosen from sm_90 compiles alone (registers, spills, wgmma), not timed.
#:
#: GPU call B2 of 2026-12-02 (H200, Triton 3.6, bf16, causal, B=1 H=16 L=16384 d=128, one
#: process, ``triton.testing.do_bench`` medians; benchmarks/NOTES.md has the whole table):
#: the backward (delta, dk/dv, dq) took 6.83 ms with dk/dv (64, 128, 8 warps, 2 stages) and
#: dq (128, 64, 8 warps, 3 stages) on ordinary loads, 6.61 ms with TMA and 6.56 ms with TMA
#: and one more stage each, now the d = 128 default. The forward:
#: (128, 64, 8, 3) with ordinary loads 2.17 ms; with TMA 2.36; (128, 128, 8, 3) with TMA
#: 2.18 ms, timed one second later, while the GPU slowed by about 4% per second (the
#: default kernel itself took 2.27 ms 1.1 s after its first 2.17; SDPA cuDNN 1.72 then
#: 1.87 ms 2 s later): about 2.09 ms on equal terms, the fastest forward of that run, so it
#: is now the d = 128 default. Re-time it against (128, 64, 8, 3) alternately to confirm.
#:
#: GPU call 2 of 2026-12-03 (H200, bf16, causal, four rounds interleaved with SDPA cuDNN, order
#: reversed every other round, do_bench medians): at d = 128 (B1 H16 L16384) lazy rescaling
#: (``LAZY = 1``) beat the plain forward in every round (2.155 / 2.211 / 2.257 / 2.233 ms against
#: 2.255 / 2.235 / 2.330 / 2.298; cuDNN 1.742 / 2.000 / 1.982 / 2.056), so it is the d = 128
#: default; at d = 64 (B4 H32 L4096) it lost in every round (0.79-0.83 against 0.73-0.78 ms).
#: Exponentials by a cubic on the FMA units (POLY 2 or 4) and LAZY = 2 lost at both sizes.
CONFIGS = {
    ("fwd", 2, 128): dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, NUM_STAGES=3, TMA=True, LAZY=1),
    ("fwd", 2, 64): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, NUM_STAGES=3),
    ("fwd", 2, 32): dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, NUM_STAGES=3),
    ("fwd", 2, 16): dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, NUM_STAGES=3),
    ("dkdv", 2, 128): dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, NUM_STAGES=3, TMA=True),
    ("dkdv", 2, 64): dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, NUM_STAGES=2),
    ("dkdv", 2, 32): dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, NUM_STAGES=2),
    ("dkdv", 2, 16): dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, NUM_STAGES=2),
    ("dq", 2, 128): dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, NUM_STAGES=4, TMA=True),
    ("dq", 2, 64): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, NUM_STAGES=2),
    ("dq", 2, 32): dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, NUM_STAGES=2),
    ("dq", 2, 16): dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, NUM_STAGES=2),
}
#: float32 inputs use true float32 products, which Hopper's tensor cores do not have: the
#: products run on the FMA units, and larger tiles spill kilobytes per thread. Small tiles;
#: float32 on a GPU is for checking, bf16 and fp16 for speed.
FP32_CONFIG = {
    "fwd": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, NUM_STAGES=1),
    "dkdv": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, NUM_STAGES=1),
    "dq": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, NUM_STAGES=1),
}
#: Under the interpreter every program runs in Python: small tiles, so tests at L < 70 still
#: cross block edges and the diagonal (held blocks twice the streamed ones, as on the GPU).
INTERPRETER_CONFIG = {
    "fwd": dict(BLOCK_M=32, BLOCK_N=16, num_warps=1, NUM_STAGES=1),
    "dkdv": dict(BLOCK_M=16, BLOCK_N=32, num_warps=1, NUM_STAGES=1),
    "dq": dict(BLOCK_M=32, BLOCK_N=16, num_warps=1, NUM_STAGES=1),
}


def config_for(kind: str, dtype: torch.dtype, head_dim: int) -> dict:
    """The launch configuration of kernel ``kind`` ("fwd", "dkdv" or "dq")."""
    if _backend.interpreting():
        return dict(INTERPRETER_CONFIG[kind])
    if dtype == torch.float32:
        return dict(FP32_CONFIG[kind])
    return dict(CONFIGS[(kind, 2, head_dim)])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit inputs


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """The kernels read rows of d contiguous elements; any other layout is copied once."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _check_tiles(kind: str, cfg: dict) -> None:
    """The held block must be a whole number of streamed blocks: the causal loops split at
    the held block's first row, which must fall on a streamed block's edge."""
    held, streamed = (cfg["BLOCK_N"], cfg["BLOCK_M"]) if kind == "dkdv" else (cfg["BLOCK_M"], cfg["BLOCK_N"])
    if held % streamed:
        raise ValueError(f"attention kernel {kind}: the held block ({held}) must be a multiple of the streamed "
                         f"one ({streamed}), got {cfg}")  # fmt: skip


def _tma_ok(*xs: torch.Tensor) -> bool:
    """Whether the copy engine (TMA) can read the ``(L, d)`` rows of every (batch, head) of
    these ``(B, L, H, d)`` tensors: start addresses and the row stride must be multiples of
    16 bytes, and rows must not overlap (a row stride of 0 would)."""
    return all(
        x.data_ptr() % 16 == 0 and x.stride(1) > 0 and all(s * x.element_size() % 16 == 0 for s in x.stride()[:3])
        for x in xs
    )


def _set_allocator(device: torch.device) -> None:
    """Tensor descriptors made inside a kernel (``tl.make_tensor_descriptor``) live in a small
    global-memory scratch buffer that Triton asks the host for at each launch: give it torch's,
    on the inputs' device."""

    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)

    triton.set_allocator(alloc)


#: Head sizes at which the default forward goes to :mod:`.attention_hopper` (the Gluon kernel
#: with two warp groups taking turns) where that kernel applies (an sm_90 GPU, 16-bit inputs,
#: L a multiple of 128); empty: never. At d = 128 it beat this module's kernel at every length
#: timed on an H200 (1.29-1.44x, L = 512 ... 16384, causal and not); at d = 64 it lost at
#: B4 L4096 H32 (0.747 against 0.719 ms) and won at B1 L16384 (1.27 against 1.36), so d = 64
#: stays here (``results/sweeps/2026-12-03-h200-stop24-attention-gluon-*.json``). A
#: configuration passed to :func:`_forward` always selects this module's Triton kernel.
HOPPER_HEAD_DIMS = (128,)


def _forward(q, k, v, causal: bool, scale: float, config: dict | None = None):
    """``(o, lse)``: ``o`` like ``q``; ``lse (B, H, L)`` float32, natural log."""
    B, L, H, d = q.shape
    if config is None and d in HOPPER_HEAD_DIMS and not _backend.interpreting() and _hopper.applies(q, k, v):
        return _hopper.forward(q, k, v, causal, scale)
    cfg = dict(config or config_for("fwd", q.dtype, d))
    _check_tiles("fwd", cfg)
    if cfg.get("LAZY", 0) not in (0, 1):
        raise ValueError(f"attention kernel fwd: LAZY must be 0 (off) or 1 (lazy rescaling), got {cfg['LAZY']!r}")
    if cfg.get("TMA") and not _tma_ok(q, k, v):
        cfg["TMA"] = False
    if cfg.get("TMA"):
        _set_allocator(q.device)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(L, cfg["BLOCK_M"]), B * H)
    _attn_fwd[grid](
        q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o), H, L, scale * LOG2E,
        CAUSAL=causal, HEAD_DIM=d, PRECISION=_precision(q.dtype), **cfg,
    )  # fmt: skip
    return o, lse


def _backward(q, k, v, o, lse, do, causal: bool, scale: float, configs: dict | None = None):
    """``(dq, dk, dv)``, each like its input."""
    B, L, H, d = q.shape
    configs = configs or {}
    delta = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    block = 64 if not _backend.interpreting() else 16
    _attn_bwd_delta[(triton.cdiv(L, block), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, L, HEAD_DIM=d, BLOCK_M=block
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    precision = _precision(q.dtype)
    tma_ok = _tma_ok(q, k, v, do)
    cfg = dict(configs.get("dkdv") or config_for("dkdv", q.dtype, d))
    _check_tiles("dkdv", cfg)
    cfg["TMA"] = cfg.get("TMA", False) and tma_ok
    if cfg["TMA"]:
        _set_allocator(q.device)
    _attn_bwd_dkdv[(triton.cdiv(L, cfg["BLOCK_N"]), B * H)](
        q, k, v, do, dk, dv, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        *_strides(dk), *_strides(dv), H, L, scale * LOG2E, scale,
        CAUSAL=causal, HEAD_DIM=d, PRECISION=precision, **cfg,
    )  # fmt: skip
    cfg = dict(configs.get("dq") or config_for("dq", q.dtype, d))
    _check_tiles("dq", cfg)
    cfg["TMA"] = cfg.get("TMA", False) and tma_ok
    if cfg["TMA"]:
        _set_allocator(q.device)
    _attn_bwd_dq[(triton.cdiv(L, cfg["BLOCK_M"]), B * H)](
        q, k, v, do, dq, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        H, L, scale * LOG2E, scale, CAUSAL=causal, HEAD_DIM=d, PRECISION=precision, **cfg,
    )  # fmt: skip
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    """``o = attention(q, k, v)``; saves ``q, k, v, o`` and the log-sum-exp (not the probabilities)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        q, k, v = (_unit_stride(x) for x in (q, k, v))
        o, lse = _forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, _unit_stride(do), ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def attention(q, k, v, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """The kernel behind :func:`seqbook.attention.attention` (no validation here: call that)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return FlashAttention.apply(q, k, v, causal, scale)


def attention_with_lse(q, k, v, causal: bool = False, scale: float | None = None, config: dict | None = None):
    """The forward kernel alone: ``(o, lse)``, no autograd (for tests and the notebook)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q, k, v = (_unit_stride(x) for x in (q, k, v))
    return _forward(q, k, v, causal, scale, config)
