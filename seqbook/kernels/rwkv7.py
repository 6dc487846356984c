r"""Triton kernels: RWKV-7's generalized delta rule, by chunks (WY / DPLR form) and fused recurrent.

The readable forms, the glossary and the shapes are in :mod:`seqbook.rwkv`
(:func:`~seqbook.rwkv.wkv7_step`, :func:`~seqbook.rwkv.wkv7_recurrent`,
:func:`~seqbook.rwkv.wkv7_chunked`, whose derivation this follows). Both kernels have the signature
``(r, log_w, k, v, kappa_hat, a, initial_state) -> (o, final_state)`` behind a
:class:`torch.autograd.Function`: :func:`wkv7` (chunked, what ``rwkv.wkv7(backend="triton")``
runs) and :func:`wkv7_fused_recurrent` (step by step, the baseline). The state is keys by values,
``(N, d_v)``, and one step is

.. math::

    x_t = \hat\kappa_t^\top S_{t-1}, \qquad
    S_t = \mathrm{Diag}(w_t)\, S_{t-1} - b_t\, x_t + \tilde k_t v_t^\top, \quad b_t = a_t \odot \hat\kappa_t,
    \qquad o_t = r_t^\top S_t ,

a diagonal-plus-low-rank transition :math:`\mathrm{Diag}(w_t) - b_t \hat\kappa_t^\top`.

The chunked kernel (:func:`wkv7`)
---------------------------------
Chunks of ``T = 16`` steps; inputs padded with identity steps (:math:`\log w = 0`,
:math:`\tilde k = \hat\kappa = a = r = v = 0`). Inside a chunk entered with :math:`S`, with
:math:`g_t = \sum_{r \le t} \log w_r` (cumulated from the chunk's start, float32, by each kernel
that needs it: ``tl.cumsum`` of the chunk's 16 rows) and
:math:`g^-_t = g_t - \log w_t`, the recalled rows :math:`X` (one :math:`x_t` per row) solve a unit
lower-triangular system, and everything else is a product:

.. math::

    (I + A)\, X = K_g S + B_m V, \qquad
    o = R_g S + P_k V - P_a X, \qquad
    S \leftarrow \mathrm{Diag}(e^{g_T}) S + K_d^\top V - B_d^\top X,

with :math:`K_g = \hat\kappa \odot e^{g^-}`, :math:`R_g = r \odot e^{g}`,
:math:`K_d = \tilde k \odot e^{g_T - g}`, :math:`B_d = b \odot e^{g_T - g}` and the ``(T, T)`` matrices
:math:`A_{tj} = \sum_c \hat\kappa_{tc} e^{g^-_{tc} - g_{jc}} b_{jc}` and :math:`B_{m,tj}` (the same with
:math:`\tilde k_j`) for :math:`j < t`, :math:`P_{k,tj} = \sum_c r_{tc} e^{g_{tc} - g_{jc}} \tilde k_{jc}` and
:math:`P_{a,tj}` (with :math:`b_j`) for :math:`j \le t`. Two ways to build them:

- as four matrix products (tensor cores), splitting :math:`e^{x - y} = e^{x - m}\, e^{m - y}` around
  :math:`m`, the chunk's middle step's :math:`g`: e.g. :math:`A = (\hat\kappa \odot e^{g^- - m})
  (b \odot e^{m - g})^\top`. Every factor lies within :math:`e^{\pm s}`, :math:`s` the chunk's spread
  (the largest minus the smallest of its :math:`g, g^-`), so this is taken where
  :math:`s <` ``SPLIT_SPREAD`` = 60 (float32 and bfloat16 reach :math:`e^{88}`). RWKV-7's own decays,
  :math:`\log w \ge -e^{-1/2}`, spread at most 9.7 over 16 steps: always this way. Operands are
  bfloat16 for bfloat16 inputs (as flash-linear-attention's ``chunk_rwkv7``, which also splits at the
  chunk's middle), exact float32 otherwise;
- one column :math:`j` at a time, exponent first (every exponent :math:`\le 0`), for chunks whose
  decays are stronger (the split would overflow).

1. ``_chunk_matrices``, one program per (batch, head, chunk), all chunks at once: :math:`(I+A)^{-1}`
   (forward substitution on the identity), :math:`B_m, P_k, P_a`, each chunk whichever way it allows,
   and :math:`(I+A)^{-1} B_m`; and the ``(T, N)`` rows :math:`W = (I+A)^{-1} K_g`, :math:`Q = R_g - P_a W`,
   :math:`B_d, K_d`, with which :math:`X = W S + (I+A)^{-1} B_m V` and :math:`o = Q S + (P_k - P_a (I+A)^{-1} B_m) V`.
2. ``_fwd_states``, one program per (batch, head, ``BLOCK_V`` value columns: the transition acts on
   rows, value columns never mix) walks the chunks in order with its state block in float32, saves
   the state entering each chunk and :math:`X` (four small products, two of them on the sequential
   path: :math:`W S`, then :math:`B_d^\top X`). ``_fwd_out``, one program per (batch, head, chunk,
   ``OUT_BLOCK_V`` value columns), all at once: :math:`o = R_g S + P_k V - P_a X`.
3. ``_bwd_states`` walks the chunks in reverse with :math:`\bar S`, the gradient of the state leaving
   the chunk, and saves it for each chunk. Through the three lines,
   :math:`\bar S \leftarrow \mathrm{Diag}(e^{g_T})\bar S + R_g^\top do + K_g^\top (I+A)^{-\top}\partial X`
   with :math:`\partial X = -P_a^\top do - B_d \bar S`, that is

   .. math::

       \bar S \leftarrow \mathrm{Diag}(e^{g_T})\,\bar S + Q^\top do - W^\top (B_d \bar S):

   three products per chunk on the sequential path, everything else is step 4's.
4. ``_bwd_chunk``, one program per (batch, head, chunk), all chunks at once: from the saved state
   entering the chunk, :math:`X` and :math:`\bar S` leaving it, by the chain rule
   (:math:`\partial X` as above, :math:`\partial\mathrm{rhs} = (I+A)^{-\top}\partial X`) writes
   :math:`\partial v` and sums over the value columns, ``BLOCK_V`` at a time in registers, the direct
   terms of :math:`\partial r, \partial\tilde k, \partial b, \partial\hat\kappa` and
   :math:`\partial A = -\partial\mathrm{rhs}\, X^\top` (strictly lower), :math:`\partial B_m, \partial P_k, \partial P_a`;
   then takes the ``(T, T)`` gradients back to :math:`r, \tilde k, b, \hat\kappa` (products or columns,
   as in 1), :math:`\partial a = \hat\kappa \odot \partial b`, :math:`\partial\hat\kappa \mathrel{+}= a \odot \partial b`
   and the decays' gradient below within the chunk; PyTorch adds the sum over later chunks (a
   cumulative sum over ``(batch, H, N, chunks)``). One program owns every value column, so nothing
   is written per value block (the previous design wrote each block's partial gradients, 4 bytes
   times ``4 N d_v / BLOCK_V`` per step, and summed them in a second kernel).

Without gradients (:func:`wkv7` with grad mode off or no input requiring one) nothing is kept for a
backward, and the chunks need not be the backward's: the forward can take chunks of ``T`` = 64
steps, four times fewer sequential steps. Of the lines above only :math:`W S` and :math:`B_d^\top X`
depend on the state entering the chunk, so everything else is done for all chunks at once first:

.. math::

    X = W S + U, \qquad o = Q S + O_V, \qquad
    S \leftarrow \mathrm{Diag}(e^{g_T}) S + K_d^\top V - B_d^\top X,
    \qquad U = (I+A)^{-1} B_m V, \quad O_V = P_k V - P_a U .

- ``_infer_prep``, one program per (batch, head, chunk of 64): the ``(64, 64)`` matrices as in 1 (split
  products where the chunk's spread is below ``SPLIT_SPREAD``, else one column at a time), :math:`(I+A)^{-1}`
  by blocks of 16 rows (the delta kernel's ``_unit_lower_inverse``: the four diagonal blocks by forward
  substitution at once, then block rows by products), and the rows :math:`W, Q, B_d, K_d` (``(64, N)``)
  and :math:`U, O_V` (``(64, d_v)``), in bfloat16 for bfloat16 inputs (``INFER_16BIT``).
- ``_infer_walk``, one program per (batch, head, value block): per chunk the four products above, two of
  them on the sequential path (with bfloat16 operands for bfloat16 inputs: the state is rounded only as an
  operand, it is carried in float32).

Over 64 steps the cumulated decays spread further: RWKV-7's own (:math:`\log w \ge -e^{-1/2}`) up to 38.8,
still below ``SPLIT_SPREAD``; stronger decays take the column-wise build (slower, exact exponents
:math:`\le 0`), chunk by chunk. The cumulative sums' rounding grows with the chunk (:math:`u \cdot 64\,|\log w|`).
``INFER_CHUNK = 16`` keeps the previous design's walk, ``_infer_pass``: per chunk of 16 the three lines from
the inputs and the first four matrices of 1 (eight small products, outputs included), 1.53 / 6.11 ms at the
two benchmark shapes below (H200, bf16; GPU call C). On the H200 (bf16, call 2 of 2026-12-03, do_bench
medians) the chunks of 64 take 2.37 ms against 6.09 at B1 L16384 H16 d128 (``_infer_prep`` 1.75 ms,
``_infer_walk`` 0.64) but 1.70 against 1.53 at B4 L4096 H32 d64, where the per-chunk work dominates and the
walk was short anyway; ``INFER_CHUNK = None`` takes each where it won.

The decays' gradient needs no kernel. Scaling channel :math:`c` of the state by :math:`e^\epsilon` from
step :math:`t` on is the same as scaling :math:`w_{t,c}`, which gives (checked against autograd on
the float64 recurrence, and by the tests)

.. math::

    \partial\log w_t = \sum_{\tau \ge t} r_\tau \odot \partial r_\tau + \sum_{\tau > t} e_\tau
    + \textstyle\sum_v S_L \odot \bar S_L - a_t \odot \partial a_t - \tilde k_t \odot \partial\tilde k_t,
    \qquad e_\tau = \hat\kappa_\tau \odot \partial\hat\kappa_\tau - 2\, a_\tau \odot \partial a_\tau - \tilde k_\tau \odot \partial\tilde k_\tau ,

a reverse cumulative sum over the sequence, formed from the other gradients (inside each chunk by
``_bwd_chunk``, across chunks in PyTorch).

Precision: float32 inside for float32 and float16 inputs; for bfloat16 inputs the (T, T) matrices'
products take bfloat16 operands and the passes TF32 products (accumulating in float32). The
exponents are differences of float32 cumulative sums, off by about :math:`u\,|g|`
(:math:`u = 6\cdot 10^{-8}`): for RWKV-7's decays (:math:`\log w \ge -e^{-1/2}`, :math:`|g| < 10` in a chunk) that is
below :math:`10^{-6}`; for :math:`\log w` near :math:`-30` it reaches :math:`3\cdot 10^{-5}`
relative (the tests fit their tolerance to it). The fused recurrent kernel multiplies step by step
and has no such term.

The fused recurrent kernel (:func:`wkv7_fused_recurrent`)
--------------------------------------------------------
One program per (batch, head, ``RECURRENT_BLOCK_V`` value columns) walks time one step after
another with its state block in registers, saving the state entering every ``checkpoint`` steps.
The backward walks time in reverse with :math:`G = \partial\mathcal L/\partial S_t`; entering an
interval it recomputes the interval's states from the checkpoint into a scratch buffer (global
memory, ``checkpoint * N * RECURRENT_BLOCK_V`` floats per program). Per step, after
:math:`G \mathrel{+}= r_t\, do_t^\top`:

.. math::

    \partial r_t = S_t\, do_t, \quad \partial\tilde k_t = G v_t, \quad \partial v_t = G^\top \tilde k_t, \quad
    \partial w_t = \textstyle\sum_v G \odot S_{t-1}, \quad \partial b_t = -G x_t^\top, \quad
    \partial x_t = -G^\top b_t,

    \partial\hat\kappa_t = S_{t-1}\, \partial x_t + a_t \odot \partial b_t, \quad
    \partial a_t = \hat\kappa_t \odot \partial b_t, \quad
    \partial \log w_t = w_t \odot \partial w_t, \quad
    G \leftarrow \mathrm{Diag}(w_t)\, G + \hat\kappa_t\, \partial x_t^\top .

Cost and status
---------------
Both do :math:`O(L\,N\,d_v)` work per (batch, head) in the state updates. The fused recurrent
kernel takes ``L`` dependent steps of a few vector operations (its speed is set by one step's
latency); the chunked kernel takes ``L / 16`` dependent steps of small matrix products (TF32 for
bfloat16 inputs, exact float32 otherwise), and its ``(T, T)`` matrices are built for all chunks in
parallel. Only the walks over chunks are sequential, per (batch, head, value block), with two
dependent products per chunk each way. What training keeps besides the inputs: the state entering
each chunk (``N d_v / 16`` numbers per step and head) and X (``d_v``), in bfloat16 for bfloat16 inputs
(``KEEP_16BIT``) and float32 otherwise; W, Q, B_d, K_d (``4 N``) and the chunks' matrices in float32.
The backward writes and reads the states' gradients in the states' dtype.

Measured (H200, bf16, ``triton.testing.do_bench`` medians; ``benchmarks/NOTES.md`` has the history and
the commands). The committed version in the session's final run (GPU call C of 2026-12-02, fla's
``chunk_rwkv7`` in the same run): B=4, L=4096, H=32, d=64 forward 1.53 ms (fla 2.02), forward+backward
5.93 ms (fla 7.34); B=1, L=16384, H=16, d=128 forward 6.11 ms (fla 4.25), forward+backward 12.09 ms
(fla 13.47). This design, GPU call B2 of 2026-12-02 (commit a7112ed: before the walks' look-ahead
loads, the forward without gradients by ``_infer_pass`` and the PyTorch tail's layout, none of which
is timed yet): B=4, L=4096, H=32, d=64 forward (then always steps 1-2 and ``_fwd_out``) 2.20 ms,
forward+backward 6.84 ms; B=1, L=16384, H=16, d=128 forward 7.53 ms, forward+backward 17.8 ms (per kernel at d=128:
``_fwd_states`` 5.6, ``_bwd_states`` 5.2, ``_bwd_chunk`` 4.6, ``_chunk_matrices`` 1.5, ``_fwd_out`` 0.4,
PyTorch 0.4). The previous design (a forward walk of eight products per chunk computing the outputs
too; a backward walk per (batch, head, 32 value columns) doing all of step 4's work inside it and
writing each value block's partial gradients, 2.1 GB at d=128, summed by another kernel): 1.53 /
10.08 ms and 6.11 / 57.7 ms. At d=128 that backward walk had 64 programs for 132 SMs, about 20
dependent products per chunk, and spilled (CUDA 13.4's ptxas for sm_90: 255 registers and a 3.4 kB
stack). fla's ``chunk_rwkv7`` at d=64: 1.92 / 7.04 ms (an earlier run). Errors on the H200 (same
call, RWKV-7-like decays, against :func:`seqbook.rwkv.wkv7_recurrent` in float64 on the same
rounded inputs, largest error over the largest value): 3.3e-3 (d=64) and 4.4e-3 (d=128) on the
output, 7e-4 on the final state, 2.3e-3 to 4.2e-3 on every gradient, log w's included.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunked_state import pad_to, state_tile
from .delta import _unit_lower_inverse

#: steps per chunk (the chunked kernel)
CHUNK = 16
#: value columns per program in the chunked kernel's walks over chunks (16 where 32 leaves too few programs),
#: and per loop step of its backward's per-chunk kernel
BLOCK_V = 32
#: steps per chunk of the forward without gradients: 64 (``_infer_prep`` and ``_infer_walk``) or 16
#: (``_infer_pass``); None chooses by what the H200 measured (GPU call 2 of 2026-12-03, bf16): 64 for
#: bfloat16 inputs with N > 64 (2.37 against 6.09 ms at B1 L16384 H16 d128), 16 elsewhere (1.53 against 1.70 ms
#: at B4 L4096 H32 d64, and float32 rows at N = 128, see ``INFER_STAGES``)
INFER_CHUNK = None
#: value columns per program of the walk without gradients (chunks of 64); None: as ``_state_block_v``
INFER_BLOCK_V = None
#: warps of that walk; None: as ``_warps``
INFER_WARPS = None
#: software pipelining stages of that walk's loop over chunks with bfloat16 rows (3: 2.18 against 2.37 ms with
#: 2 at d128). Float32 rows take 2 at N <= 64 and 1 above (two stages of their tiles exceed the H200's shared
#: memory per block); one stage crashed with an illegal address on the H200 (bf16, d128, call 2, not
#: understood), so the default choice never takes it on a GPU
INFER_STAGES = 3
#: warps of the per-chunk kernel before that walk (``_infer_prep``); None: as ``_warps``
INFER_PREP_WARPS = None
#: with ``INFER_16BIT``, ``_infer_prep``'s products after the inverse (W, Q, U, O_V) take bfloat16 operands too
#: (True: 2.25 against 2.37 ms at d128, errors 5.5e-3 against 4.0e-3 of max|o| for bf16 inputs), else TF32
INFER_PREP_16BIT = True
#: for bfloat16 inputs the rows the walk without gradients reads are kept in bfloat16 and its products take
#: bfloat16 operands (True), else float32 rows and TF32 products
INFER_16BIT = True
#: value columns per program of the chunked kernel's output kernel
OUT_BLOCK_V = 64
#: the chunked kernel keeps the states entering the chunks, X and the states' gradients in bfloat16 for
#: bfloat16 inputs (True; only ever operands of TF32 products there, as flash-linear-attention keeps its
#: per-chunk states in the inputs' dtype), else float32
KEEP_16BIT = True
#: value columns per program in the fused recurrent kernel (more programs, shorter steps)
RECURRENT_BLOCK_V = 16
#: steps between the states the fused recurrent forward saves for its backward, by default
CHECKPOINT = 16
#: largest spread of a chunk's cumulated log-decays (max - min over its steps and channels) for which
#: the chunk's matrices are built as products, e^{x - y} = e^{x - m} e^{m - y} (m: the middle step's g):
#: every factor stays within e^{+-60} (float32 and bfloat16 reach e^{88})
SPLIT_SPREAD = tl.constexpr(60.0)


@triton.jit
def _mm(a, b, LOW: tl.constexpr):
    """``a @ b`` accumulated in float32: bfloat16 operands on tensor cores if ``LOW``, else exact float32."""
    if LOW:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _dot(a, b, LOW: tl.constexpr, PREC: tl.constexpr):
    """``a @ b`` accumulated in float32: bfloat16 operands on tensor cores if ``LOW``, else ``PREC``."""
    if LOW:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _chunk_g(lw_ptr, offs):
    """A chunk's log-decays cumulated from its start, g (T, N) in float32, and g^- = g - log w."""
    lw = tl.load(lw_ptr + offs).to(tl.float32)
    g = tl.cumsum(lw, axis=0)
    return g, g - lw


@triton.jit
def _chunk_decays(lw_ptr, offs, rt, T: tl.constexpr):
    """A chunk's g, g^- (T, N), whether their spread is small enough for the split
    e^{x - y} = e^{x - m} e^{m - y} in float32 (module docstring), and m, g at the chunk's middle step."""
    g, gp = _chunk_g(lw_ptr, offs)
    spread = tl.maximum(tl.max(tl.max(g, axis=1), axis=0), tl.max(tl.max(gp, axis=1), axis=0)) \
        - tl.minimum(tl.min(tl.min(g, axis=1), axis=0), tl.min(tl.min(gp, axis=1), axis=0))  # fmt: skip
    m = tl.sum(tl.where(rt[:, None] == T // 2, g, 0.0), axis=0)
    return g, gp, spread < SPLIT_SPREAD, m


@triton.jit
def _tt_products(Kgm, Rgm, Km, Bm_rows, rt, LOW: tl.constexpr):
    """A, Bm, Pk, Pa (T, T) from the split factors (T, N): the rows' K_g, R_g times e^{-m} and the columns'
    k~, b times e^{m - g}."""
    Kj, Bj = tl.trans(Km), tl.trans(Bm_rows)
    strict, causal = rt[:, None] > rt[None, :], rt[:, None] >= rt[None, :]
    A = tl.where(strict, _mm(Kgm, Bj, LOW), 0.0)
    Bm = tl.where(strict, _mm(Kgm, Kj, LOW), 0.0)
    Pk = tl.where(causal, _mm(Rgm, Kj, LOW), 0.0)
    Pa = tl.where(causal, _mm(Rgm, Bj, LOW), 0.0)
    return A, Bm, Pk, Pa


@triton.jit
def _tt_matrices(r, g, gp, k, kh, bb, split, m, rt, T: tl.constexpr, LOW: tl.constexpr):
    """A chunk's (T, T) matrices A, Bm (strictly lower), Pk, Pa (lower) from its rows (T, N) in float32: four
    matrix products where the decays' spread allows the split at ``m``, else one column at a time."""
    if split:  # e^{g_t - g_j} = e^{g_t - m} e^{m - g_j}: products on tensor cores
        up = tl.exp(m[None, :] - g)
        A, Bm, Pk, Pa = _tt_products(kh * tl.exp(gp - m[None, :]), r * tl.exp(g - m[None, :]), k * up, bb * up, rt, LOW)
    else:
        A = tl.zeros([T, T], dtype=tl.float32)
        Bm = tl.zeros([T, T], dtype=tl.float32)
        Pk = tl.zeros([T, T], dtype=tl.float32)
        Pa = tl.zeros([T, T], dtype=tl.float32)
        for j in range(T):
            one = (rt == j).to(tl.float32)
            g_j = tl.sum(g * one[:, None], axis=0)
            k_j = tl.sum(k * one[:, None], axis=0)
            b_j = tl.sum(bb * one[:, None], axis=0)
            # decays from after step j to the start (E) and the end (F) of step t; exponents <= 0
            E = tl.exp(tl.where(rt[:, None] > j, gp - g_j[None, :], float("-inf")))
            F = tl.exp(tl.where(rt[:, None] >= j, g - g_j[None, :], float("-inf")))
            A += one[None, :] * tl.sum(kh * E * b_j[None, :], axis=1)[:, None]
            Bm += one[None, :] * tl.sum(kh * E * k_j[None, :], axis=1)[:, None]
            Pk += one[None, :] * tl.sum(r * F * k_j[None, :], axis=1)[:, None]
            Pa += one[None, :] * tl.sum(r * F * b_j[None, :], axis=1)[:, None]
    return A, Bm, Pk, Pa


@triton.jit
def _chunk_matrices(r_ptr, lw_ptr, k_ptr, kh_ptr, a_ptr, mat_ptr, wy_ptr, dec_ptr, Lp, H, n_chunks,
                    DK: tl.constexpr, T: tl.constexpr, LOW: tl.constexpr, PREC: tl.constexpr,
                    GRAD: tl.constexpr):  # fmt: skip
    """Per chunk (all in parallel): (I + A)^{-1}, Bm, Pk, Pa, each (T, T): four matrix products where the
    decays' spread allows the split, else one column at a time; and (I + A)^{-1} Bm in ``mat_ptr``
    (batch * H, chunks, 5, T, T). In ``wy_ptr`` (4, batch, Lp, H, N) what the walks over chunks need
    (module docstring): W = (I + A)^{-1} K_g, Q = R_g - P_a W, B_d and K_d; in ``dec_ptr`` (batch * H, chunks, N)
    the chunk's decays e^{g_T}. Without ``GRAD`` (the forward without gradients: ``_infer_pass``) only the
    first four matrices."""
    bh, ci = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rk, rt = tl.arange(0, DK), tl.arange(0, T)
    rows = (b * Lp + ci * T + rt) * H + h
    offs = rows[:, None] * DK + rk[None, :]
    r = tl.load(r_ptr + offs).to(tl.float32)
    g, gp, split, m = _chunk_decays(lw_ptr, offs, rt, T)
    k = tl.load(k_ptr + offs).to(tl.float32)
    kh = tl.load(kh_ptr + offs).to(tl.float32)
    bb = tl.load(a_ptr + offs).to(tl.float32) * kh
    A, Bm, Pk, Pa = _tt_matrices(r, g, gp, k, kh, bb, split, m, rt, T, LOW)
    # (I + A)^{-1} by forward substitution, one row at a time
    Tinv = tl.zeros([T, T], dtype=tl.float32)
    for i in range(T):
        one = (rt == i).to(tl.float32)
        a_i = tl.sum(A * one[:, None], axis=0)
        x_i = one - tl.sum(a_i[:, None] * Tinv, axis=0)
        Tinv += one[:, None] * x_i[None, :]
    m_off = (bh * n_chunks + ci) * 5 * T * T + rt[:, None] * T + rt[None, :]
    tl.store(mat_ptr + m_off, Tinv)
    tl.store(mat_ptr + m_off + T * T, Bm)
    tl.store(mat_ptr + m_off + 2 * T * T, Pk)
    tl.store(mat_ptr + m_off + 3 * T * T, Pa)
    if GRAD:
        tl.store(mat_ptr + m_off + 4 * T * T, tl.dot(Tinv, Bm, input_precision=PREC))
        g_last = tl.sum(tl.where(rt[:, None] == T - 1, g, 0.0), axis=0)
        tl.store(dec_ptr + (bh * n_chunks + ci) * DK + rk, tl.exp(g_last))
        to_end = tl.exp(g_last[None, :] - g)
        W = tl.dot(Tinv, kh * tl.exp(gp), input_precision=PREC)  # X = W S + (I + A)^{-1} Bm V
        one_wy = tl.num_programs(0) * Lp * DK  # (batch * H) * Lp * N
        tl.store(wy_ptr + offs, W)
        tl.store(wy_ptr + one_wy + offs, r * tl.exp(g) - tl.dot(Pa, W, input_precision=PREC))  # Q
        tl.store(wy_ptr + 2 * one_wy + offs, bb * to_end)  # B_d
        tl.store(wy_ptr + 3 * one_wy + offs, k * to_end)  # K_d


@triton.jit
def _chunk_inputs(r_ptr, lw_ptr, k_ptr, kh_ptr, a_ptr, v_ptr, mat_ptr, b, h, bh, ci, Lp, H, n_chunks,
                  rk, rv, rt, vmask, DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr):  # fmt: skip
    """Chunk ``ci``'s rows, its decayed inputs K_g, R_g, K_d, B_d (module docstring), values and matrices."""
    rows = (b * Lp + ci * T + rt) * H + h
    offs = rows[:, None] * DK + rk[None, :]
    g, gp = _chunk_g(lw_ptr, offs)
    g_last = tl.sum(tl.where(rt[:, None] == T - 1, g, 0.0), axis=0)
    kh = tl.load(kh_ptr + offs).to(tl.float32)
    to_end = tl.exp(g_last[None, :] - g)
    Kg = kh * tl.exp(gp)
    Rg = tl.load(r_ptr + offs).to(tl.float32) * tl.exp(g)
    Kd = tl.load(k_ptr + offs).to(tl.float32) * to_end
    Bd = tl.load(a_ptr + offs).to(tl.float32) * kh * to_end
    v = tl.load(v_ptr + rows[:, None] * DV + rv[None, :], mask=vmask[None, :], other=0.0).to(tl.float32)
    m_off = (bh * n_chunks + ci) * 5 * T * T + rt[:, None] * T + rt[None, :]
    Tinv = tl.load(mat_ptr + m_off)
    Bm = tl.load(mat_ptr + m_off + T * T)
    Pk = tl.load(mat_ptr + m_off + 2 * T * T)
    Pa = tl.load(mat_ptr + m_off + 3 * T * T)
    return rows, g, gp, g_last, Kg, Rg, Kd, Bd, v, Tinv, Bm, Pk, Pa


@triton.jit
def _infer_pass(r_ptr, lw_ptr, k_ptr, kh_ptr, a_ptr, v_ptr, mat_ptr, s0_ptr, o_ptr, final_ptr, Lp, H, n_chunks,
                DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr,
                PREC: tl.constexpr):  # fmt: skip
    """The forward without gradients in one walk per (batch, head, ``BV`` value columns), saving nothing:
    per chunk X = (I + A)^{-1} (K_g S + B_m V), o = R_g S + P_k V - P_a X, S <- e^{g_T} S + K_d^T V - B_d^T X
    (eight products, from the inputs and the four matrices of ``_chunk_matrices``)."""
    bh, b, h, rk, rv, rt, vmask, s_off, S = state_tile(s0_ptr, H, DK, DV, T, BV, HAS_S0)
    for ci in range(n_chunks):
        rows, g, gp, g_last, Kg, Rg, Kd, Bd, v, Tinv, Bm, Pk, Pa = _chunk_inputs(
            r_ptr, lw_ptr, k_ptr, kh_ptr, a_ptr, v_ptr, mat_ptr, b, h, bh, ci, Lp, H, n_chunks, rk, rv, rt,
            vmask, DK, DV, T)  # fmt: skip
        rhs = tl.dot(Kg, S, input_precision=PREC) + tl.dot(Bm, v, input_precision=PREC)
        X = tl.dot(Tinv, rhs, input_precision=PREC)  # the recalled rows x_t = kappa_hat_t^T S_{t-1}
        o = tl.dot(Rg, S, input_precision=PREC) + tl.dot(Pk, v, input_precision=PREC) \
            - tl.dot(Pa, X, input_precision=PREC)  # fmt: skip
        tl.store(o_ptr + rows[:, None] * DV + rv[None, :], o.to(o_ptr.dtype.element_ty), mask=vmask[None, :])
        S = tl.exp(g_last)[:, None] * S + tl.dot(tl.trans(Kd), v, input_precision=PREC) \
            - tl.dot(tl.trans(Bd), X, input_precision=PREC)  # fmt: skip
    tl.store(final_ptr + bh * DK * DV + s_off, S, mask=vmask[None, :])


@triton.jit
def _decayed_rows(r_ptr, k_ptr, kh_ptr, a_ptr, offs, g, gp, g_last):
    """A chunk's K_g = kappa_hat e^{g^-}, R_g = r e^{g}, K_d = k~ e^{g_T - g}, B_d = b e^{g_T - g} (T, N), float32."""
    to_end = tl.exp(g_last[None, :] - g)
    kh = tl.load(kh_ptr + offs).to(tl.float32)
    Kg = kh * tl.exp(gp)
    Rg = tl.load(r_ptr + offs).to(tl.float32) * tl.exp(g)
    Kd = tl.load(k_ptr + offs).to(tl.float32) * to_end
    Bd = tl.load(a_ptr + offs).to(tl.float32) * kh * to_end
    return Kg, Rg, Kd, Bd


@triton.jit
def _infer_prep(r_ptr, lw_ptr, k_ptr, kh_ptr, a_ptr, v_ptr, wy_ptr, uo_ptr, dec_ptr, Lp, H, n_chunks,
                DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BV: tl.constexpr, LOW: tl.constexpr,
                PREC: tl.constexpr, LOW_ROWS: tl.constexpr):  # fmt: skip
    """The forward without gradients by chunks of ``INFER_CHUNK`` steps, step 1 (per chunk, all in parallel):
    everything of a chunk that does not depend on the state entering it, so that the walk is left with
    X = W S + U, o = Q S + O_V and S <- Diag(e^{g_T}) S + K_d^T V - B_d^T X. With (I + A)^{-1} by blocks of 16
    rows (``delta._unit_lower_inverse``): W = (I + A)^{-1} K_g, Q = R_g - P_a W, B_d, K_d in ``wy_ptr``
    (4, batch, Lp, H, N); U = (I + A)^{-1} B_m V and O_V = P_k V - P_a U in ``uo_ptr`` (2, batch, Lp, H, d_v);
    e^{g_T} in ``dec_ptr`` (batch * H, chunks, N). ``LOW_ROWS``: the products after the inverse take bfloat16
    operands (what they make is stored in bfloat16), else ``PREC``."""
    bh, ci = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rk, rt = tl.arange(0, DK), tl.arange(0, T)
    rows = (b * Lp + ci * T + rt) * H + h
    offs = rows[:, None] * DK + rk[None, :]
    g, gp, split, m = _chunk_decays(lw_ptr, offs, rt, T)
    g_last = tl.sum(tl.where(rt[:, None] == T - 1, g, 0.0), axis=0)
    tl.store(dec_ptr + (bh * n_chunks + ci) * DK + rk, tl.exp(g_last))
    if split:  # e^{g_t - m} = e^{g_t} e^{-m}, e^{m - g_j} = e^{g_T - g_j} e^{m - g_T}: all within e^{+-spread}
        Kg, Rg, Kd, Bd = _decayed_rows(r_ptr, k_ptr, kh_ptr, a_ptr, offs, g, gp, g_last)
        to_m, from_m = tl.exp(-m)[None, :], tl.exp(m - g_last)[None, :]
        A, Bm, Pk, Pa = _tt_products(Kg * to_m, Rg * to_m, Kd * from_m, Bd * from_m, rt, LOW)
    else:  # one column at a time
        k = tl.load(k_ptr + offs).to(tl.float32)
        kh = tl.load(kh_ptr + offs).to(tl.float32)
        A, Bm, Pk, Pa = _tt_matrices(tl.load(r_ptr + offs).to(tl.float32), g, gp, k, kh,
                                     tl.load(a_ptr + offs).to(tl.float32) * kh, split, m, rt, T, LOW)  # fmt: skip
    # the rows again rather than live through either branch (registers: (T, N) tiles at N = 128 are large)
    Kg, Rg, Kd, Bd = _decayed_rows(r_ptr, k_ptr, kh_ptr, a_ptr, offs, g, gp, g_last)
    Tinv = _unit_lower_inverse(A, rt, T, 16, PREC)
    W = _dot(Tinv, Kg, LOW_ROWS, PREC)
    one_wy = tl.num_programs(0) * Lp * DK  # (batch * H) * Lp * N
    dt = wy_ptr.dtype.element_ty
    tl.store(wy_ptr + offs, W.to(dt))
    tl.store(wy_ptr + one_wy + offs, (Rg - _dot(Pa, W, LOW_ROWS, PREC)).to(dt))  # Q
    tl.store(wy_ptr + 2 * one_wy + offs, Bd.to(dt))
    tl.store(wy_ptr + 3 * one_wy + offs, Kd.to(dt))
    one_uo = tl.num_programs(0) * Lp * DV
    for v0 in range(0, DV, BV):
        v_off = rows[:, None] * DV + (v0 + tl.arange(0, BV))[None, :]
        v = tl.load(v_ptr + v_off).to(tl.float32)
        U = _dot(Tinv, _dot(Bm, v, LOW_ROWS, PREC), LOW_ROWS, PREC)
        tl.store(uo_ptr + v_off, U.to(dt))
        tl.store(uo_ptr + one_uo + v_off, (_dot(Pk, v, LOW_ROWS, PREC) - _dot(Pa, U, LOW_ROWS, PREC)).to(dt))


@triton.jit
def _infer_walk(wy_ptr, uo_ptr, dec_ptr, v_ptr, s0_ptr, o_ptr, final_ptr, Lp, H, n_chunks, DK: tl.constexpr,
                DV: tl.constexpr, T: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr, PREC: tl.constexpr,
                LOW: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """The forward without gradients, step 2: one walk per (batch, head, ``BV`` value columns) over chunks of
    ``INFER_CHUNK`` steps, from ``_infer_prep``'s rows: X = W S + U, o = Q S + O_V,
    S <- Diag(e^{g_T}) S + K_d^T V - B_d^T X (four products, two on the sequential path). ``LOW``: the
    products take bfloat16 operands (the state rounded to 16 bits as an operand only; it is kept in float32),
    else ``PREC``."""
    bh, b, h, rk, rv, rt, vmask, s_off, S = state_tile(s0_ptr, H, DK, DV, T, BV, HAS_S0)
    one_wy = tl.num_programs(0) * Lp * DK
    one_uo = tl.num_programs(0) * Lp * DV
    for ci in tl.range(0, n_chunks, num_stages=STAGES):
        rows = (b * Lp + ci * T + rt) * H + h
        offs = rows[:, None] * DK + rk[None, :]
        v_off = rows[:, None] * DV + rv[None, :]
        W = tl.load(wy_ptr + offs)
        Q = tl.load(wy_ptr + one_wy + offs)
        Bd = tl.load(wy_ptr + 2 * one_wy + offs)
        Kd = tl.load(wy_ptr + 3 * one_wy + offs)
        U = tl.load(uo_ptr + v_off, mask=vmask[None, :], other=0.0).to(tl.float32)
        Ov = tl.load(uo_ptr + one_uo + v_off, mask=vmask[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + v_off, mask=vmask[None, :], other=0.0)
        decay = tl.load(dec_ptr + (bh * n_chunks + ci) * DK + rk)
        if LOW:
            Sl = S.to(tl.bfloat16)
            X = tl.dot(W, Sl) + U
            o = tl.dot(Q, Sl) + Ov
            S = decay[:, None] * S + tl.dot(tl.trans(Kd), v.to(tl.bfloat16)) - tl.dot(tl.trans(Bd), X.to(tl.bfloat16))
        else:
            X = tl.dot(W, S, input_precision=PREC) + U
            o = tl.dot(Q, S, input_precision=PREC) + Ov
            S = decay[:, None] * S + tl.dot(tl.trans(Kd), v.to(tl.float32), input_precision=PREC) \
                - tl.dot(tl.trans(Bd), X, input_precision=PREC)  # fmt: skip
        tl.store(o_ptr + v_off, o.to(o_ptr.dtype.element_ty), mask=vmask[None, :])
    tl.store(final_ptr + bh * DK * DV + s_off, S, mask=vmask[None, :])


@triton.jit
def _fwd_states(wy_ptr, dec_ptr, v_ptr, mat_ptr, s0_ptr, states_ptr, x_ptr, final_ptr, Lp, H, n_chunks,
                DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr,
                PREC: tl.constexpr):  # fmt: skip
    """The forward's walk over chunks, per (batch, head, ``BV`` value columns): saves the state entering
    each chunk and the recalled rows X = W S + (I + A)^{-1} B_m V, then S <- Diag(e^{g_T}) S + K_d^T V - B_d^T X
    (four products, two of them on the sequential path). The outputs are ``_fwd_out``'s. The next chunk's
    values and decays are loaded one step ahead (Triton's pipelining prefetches W, B_d, K_d, whose loads
    feed products directly, but not loads that are cast or reduced first)."""
    bh, b, h, rk, rv, rt, vmask, s_off, S = state_tile(s0_ptr, H, DK, DV, T, BV, HAS_S0)
    one_wy = tl.num_programs(0) * Lp * DK
    v_next = tl.load(v_ptr + ((b * Lp + rt) * H + h)[:, None] * DV + rv[None, :], mask=vmask[None, :], other=0.0)
    decay_next = tl.load(dec_ptr + bh * n_chunks * DK + rk)
    for ci in range(n_chunks):
        v, decay = v_next.to(tl.float32), decay_next  # decay: e^{g_T}, (N,)
        ahead = tl.minimum(ci + 1, n_chunks - 1)  # the last chunk loads itself again
        v_next = tl.load(v_ptr + ((b * Lp + ahead * T + rt) * H + h)[:, None] * DV + rv[None, :],
                         mask=vmask[None, :], other=0.0)  # fmt: skip
        decay_next = tl.load(dec_ptr + (bh * n_chunks + ahead) * DK + rk)
        tl.store(states_ptr + (bh * n_chunks + ci) * DK * DV + s_off, S.to(states_ptr.dtype.element_ty), mask=vmask[None, :])
        rows = (b * Lp + ci * T + rt) * H + h
        offs = rows[:, None] * DK + rk[None, :]
        W = tl.load(wy_ptr + offs)
        Bd = tl.load(wy_ptr + 2 * one_wy + offs)
        Kd = tl.load(wy_ptr + 3 * one_wy + offs)
        TBm = tl.load(mat_ptr + (bh * n_chunks + ci) * 5 * T * T + 4 * T * T + rt[:, None] * T + rt[None, :])
        X = tl.dot(W, S, input_precision=PREC) + tl.dot(TBm, v, input_precision=PREC)
        tl.store(x_ptr + rows[:, None] * DV + rv[None, :], X.to(x_ptr.dtype.element_ty), mask=vmask[None, :])
        S = decay[:, None] * S + tl.dot(tl.trans(Kd), v, input_precision=PREC) \
            - tl.dot(tl.trans(Bd), X, input_precision=PREC)  # fmt: skip
    tl.store(final_ptr + bh * DK * DV + s_off, S, mask=vmask[None, :])


@triton.jit
def _fwd_out(r_ptr, lw_ptr, v_ptr, mat_ptr, states_ptr, x_ptr, o_ptr, Lp, H, n_chunks, DK: tl.constexpr,
             DV: tl.constexpr, T: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """The outputs, per (batch, head, chunk, ``BV`` value columns), all at once: o = R_g S + P_k V - P_a X."""
    bh, ci, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    rk, rt, rv = tl.arange(0, DK), tl.arange(0, T), pid_v * BV + tl.arange(0, BV)
    rows = (b * Lp + ci * T + rt) * H + h
    offs = rows[:, None] * DK + rk[None, :]
    v_off = rows[:, None] * DV + rv[None, :]
    g, gp = _chunk_g(lw_ptr, offs)
    Rg = tl.load(r_ptr + offs).to(tl.float32) * tl.exp(g)
    m_off = (bh * n_chunks + ci) * 5 * T * T + rt[:, None] * T + rt[None, :]
    Pk = tl.load(mat_ptr + m_off + 2 * T * T)
    Pa = tl.load(mat_ptr + m_off + 3 * T * T)
    S = tl.load(states_ptr + (bh * n_chunks + ci) * DK * DV + rk[:, None] * DV + rv[None, :]).to(tl.float32)
    v = tl.load(v_ptr + v_off).to(tl.float32)
    X = tl.load(x_ptr + v_off).to(tl.float32)
    o = tl.dot(Rg, S, input_precision=PREC) + tl.dot(Pk, v, input_precision=PREC) - tl.dot(Pa, X, input_precision=PREC)
    tl.store(o_ptr + v_off, o.to(o_ptr.dtype.element_ty))


@triton.jit
def _bwd_states(wy_ptr, dec_ptr, do_ptr, dsl_ptr, dstates_ptr, ds0_ptr, Lp, H, n_chunks, DK: tl.constexpr,
                DV: tl.constexpr, T: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """The backward's walk over chunks, in reverse, per (batch, head, ``BV`` value columns): saves the
    gradient of the state leaving each chunk, then steps it back through the chunk with three products,
    dS <- Diag(e^{g_T}) dS + Q^T do - W^T (B_d dS) (module docstring); do and the decays loaded one chunk
    ahead, as in ``_fwd_states``. The rest is ``_bwd_chunk``'s."""
    bh, b, h, rk, rv, rt, vmask, s_off, dS = state_tile(dsl_ptr, H, DK, DV, T, BV, True)
    one_wy = tl.num_programs(0) * Lp * DK
    last = n_chunks - 1
    do_next = tl.load(do_ptr + ((b * Lp + last * T + rt) * H + h)[:, None] * DV + rv[None, :], mask=vmask[None, :],
                      other=0.0)  # fmt: skip
    decay_next = tl.load(dec_ptr + (bh * n_chunks + last) * DK + rk)
    for cr in range(n_chunks):
        ci = last - cr
        do, decay = do_next.to(tl.float32), decay_next
        ahead = tl.maximum(ci - 1, 0)  # the first chunk loads itself again
        do_next = tl.load(do_ptr + ((b * Lp + ahead * T + rt) * H + h)[:, None] * DV + rv[None, :],
                          mask=vmask[None, :], other=0.0)  # fmt: skip
        decay_next = tl.load(dec_ptr + (bh * n_chunks + ahead) * DK + rk)
        tl.store(dstates_ptr + (bh * n_chunks + ci) * DK * DV + s_off, dS.to(dstates_ptr.dtype.element_ty), mask=vmask[None, :])
        offs = ((b * Lp + ci * T + rt) * H + h)[:, None] * DK + rk[None, :]
        W = tl.load(wy_ptr + offs)
        Q = tl.load(wy_ptr + one_wy + offs)
        Bd = tl.load(wy_ptr + 2 * one_wy + offs)
        BdS = tl.dot(Bd, dS, input_precision=PREC)
        dS = decay[:, None] * dS + tl.dot(tl.trans(Q), do, input_precision=PREC) \
            - tl.dot(tl.trans(W), BdS, input_precision=PREC)  # fmt: skip
    tl.store(ds0_ptr + bh * DK * DV + s_off, dS, mask=vmask[None, :])


@triton.jit
def _bwd_chunk(r_ptr, lw_ptr, k_ptr, kh_ptr, a_ptr, v_ptr, mat_ptr, x_ptr, do_ptr, states_ptr, dstates_ptr,
               dr_ptr, dk_ptr, dkh_ptr, da_ptr, dv_ptr, dlw_ptr, tot_ptr, Lp, H, n_chunks, DK: tl.constexpr,
               DV: tl.constexpr, T: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, LOW: tl.constexpr):  # fmt: skip
    """Per chunk (all in parallel), one program for all the value columns, ``BV`` at a time: from the state
    entering the chunk, the forward's X and the gradient of the state leaving the chunk, by the chain rule through
    X = (I + A)^{-1} (K_g S + B_m V), o = R_g S + P_k V - P_a X and S' = Diag(e^{g_T}) S + K_d^T V - B_d^T X:
    dv, and the sums over value columns (the direct terms of dr, dk~, db, dkappa_hat and the (T, T)
    matrices' gradients) kept in registers; then the matrices' gradients back to r, k~, b = a kappa_hat,
    kappa_hat (products or columns, as in ``_chunk_matrices``), the final dr, dk~, dkappa_hat, da, and
    log w's gradient up to the chunks after this one (module docstring): ``dlw_ptr`` gets the sums over
    this chunk's later steps, ``tot_ptr`` (batch, head, N, chunk) the chunk's whole sum, for the sum over
    later chunks that the caller adds."""
    bh, ci = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rk, rt = tl.arange(0, DK), tl.arange(0, T)
    rows = (b * Lp + ci * T + rt) * H + h
    offs = rows[:, None] * DK + rk[None, :]
    # only what the loop over value columns needs is formed before it (registers: N = 128 tiles are large)
    g, gp = _chunk_g(lw_ptr, offs)
    to_end = tl.exp(tl.sum(tl.where(rt[:, None] == T - 1, g, 0.0), axis=0)[None, :] - g)
    Kd = tl.load(k_ptr + offs).to(tl.float32) * to_end
    Bd = tl.load(a_ptr + offs).to(tl.float32) * tl.load(kh_ptr + offs).to(tl.float32) * to_end
    m_off = (bh * n_chunks + ci) * 5 * T * T + rt[:, None] * T + rt[None, :]
    Tinv = tl.load(mat_ptr + m_off)
    Bm = tl.load(mat_ptr + m_off + T * T)
    Pk = tl.load(mat_ptr + m_off + 2 * T * T)
    Pa = tl.load(mat_ptr + m_off + 3 * T * T)
    # the sums over value columns: do S^T, V dS^T, -X dS^T, dR S^T and the (T, T) matrices' gradients
    dr = tl.zeros([T, DK], dtype=tl.float32)
    dk = tl.zeros([T, DK], dtype=tl.float32)
    db = tl.zeros([T, DK], dtype=tl.float32)
    dkh = tl.zeros([T, DK], dtype=tl.float32)
    dA = tl.zeros([T, T], dtype=tl.float32)
    dBm = tl.zeros([T, T], dtype=tl.float32)
    dPk = tl.zeros([T, T], dtype=tl.float32)
    dPa = tl.zeros([T, T], dtype=tl.float32)
    s_base = (bh * n_chunks + ci) * DK * DV
    for v0 in range(0, DV, BV):
        rv = v0 + tl.arange(0, BV)
        v_off = rows[:, None] * DV + rv[None, :]
        s_off = s_base + rk[:, None] * DV + rv[None, :]
        S = tl.load(states_ptr + s_off).to(tl.float32)  # entering the chunk
        dS = tl.load(dstates_ptr + s_off).to(tl.float32)  # the gradient of the state leaving it
        v = tl.load(v_ptr + v_off).to(tl.float32)
        do = tl.load(do_ptr + v_off).to(tl.float32)
        X = tl.load(x_ptr + v_off).to(tl.float32)  # the forward's recalled rows
        dX = -tl.dot(tl.trans(Pa), do, input_precision=PREC) - tl.dot(Bd, dS, input_precision=PREC)
        dR = tl.dot(tl.trans(Tinv), dX, input_precision=PREC)  # the gradient of K_g S + B_m V
        dv = tl.dot(tl.trans(Pk), do, input_precision=PREC) + tl.dot(Kd, dS, input_precision=PREC) \
            + tl.dot(tl.trans(Bm), dR, input_precision=PREC)  # fmt: skip
        tl.store(dv_ptr + v_off, dv.to(dv_ptr.dtype.element_ty))
        dr += tl.dot(do, tl.trans(S), input_precision=PREC)
        dk += tl.dot(v, tl.trans(dS), input_precision=PREC)
        db -= tl.dot(X, tl.trans(dS), input_precision=PREC)
        dkh += tl.dot(dR, tl.trans(S), input_precision=PREC)
        # the (T, T) ones as broadcast sums: as tl.dot accumulators in this loop they made ptxas (CUDA 13.4,
        # sm_90) fall back to 32 registers and a 10 kB stack
        dA -= tl.sum(dR[:, None, :] * X[None, :, :], axis=2)
        dBm += tl.sum(dR[:, None, :] * v[None, :, :], axis=2)
        dPk += tl.sum(do[:, None, :] * v[None, :, :], axis=2)
        dPa -= tl.sum(do[:, None, :] * X[None, :, :], axis=2)
    # the direct terms, through R_g = r e^{g}, K_d = k~ e^{g_T - g}, B_d = b e^{g_T - g}, K_g = kappa_hat e^{g^-}
    g, gp, split, m = _chunk_decays(lw_ptr, offs, rt, T)
    to_end = tl.exp(tl.sum(tl.where(rt[:, None] == T - 1, g, 0.0), axis=0)[None, :] - g)
    dr = dr * tl.exp(g)
    dk = dk * to_end
    db = db * to_end
    dkh = dkh * tl.exp(gp)
    r = tl.load(r_ptr + offs).to(tl.float32)
    k = tl.load(k_ptr + offs).to(tl.float32)
    kh = tl.load(kh_ptr + offs).to(tl.float32)
    bb = tl.load(a_ptr + offs).to(tl.float32) * kh
    strict, causal = rt[:, None] > rt[None, :], rt[:, None] >= rt[None, :]
    dA = tl.where(strict, dA, 0.0)
    dBm = tl.where(strict, dBm, 0.0)
    dPk = tl.where(causal, dPk, 0.0)
    dPa = tl.where(causal, dPa, 0.0)
    if split:  # the four products of _chunk_matrices, differentiated
        gp_m, g_m = tl.exp(gp - m[None, :]), tl.exp(g - m[None, :])
        up = tl.exp(m[None, :] - g)
        Kgm, Rgm, Kj, Bj = kh * gp_m, r * g_m, k * up, bb * up
        dkh += (_mm(dA, Bj, LOW) + _mm(dBm, Kj, LOW)) * gp_m
        dr += (_mm(dPk, Kj, LOW) + _mm(dPa, Bj, LOW)) * g_m
        db += (_mm(tl.trans(dA), Kgm, LOW) + _mm(tl.trans(dPa), Rgm, LOW)) * up
        dk += (_mm(tl.trans(dBm), Kgm, LOW) + _mm(tl.trans(dPk), Rgm, LOW)) * up
    else:
        for j in range(T):
            one = (rt == j).to(tl.float32)
            g_j = tl.sum(g * one[:, None], axis=0)
            k_j = tl.sum(k * one[:, None], axis=0)
            b_j = tl.sum(bb * one[:, None], axis=0)
            E = tl.exp(tl.where(rt[:, None] > j, gp - g_j[None, :], float("-inf")))
            F = tl.exp(tl.where(rt[:, None] >= j, g - g_j[None, :], float("-inf")))
            dA_j = tl.sum(dA * one[None, :], axis=1)[:, None]  # column j, over t
            dBm_j = tl.sum(dBm * one[None, :], axis=1)[:, None]
            dPk_j = tl.sum(dPk * one[None, :], axis=1)[:, None]
            dPa_j = tl.sum(dPa * one[None, :], axis=1)[:, None]
            # A_tj = sum_c kh_tc E_tjc b_jc, Bm with k_j; Pk_tj = sum_c r_tc F_tjc k_jc, Pa with b_j
            dkh += (dA_j * b_j[None, :] + dBm_j * k_j[None, :]) * E
            dr += (dPk_j * k_j[None, :] + dPa_j * b_j[None, :]) * F
            db_j = tl.sum(dA_j * E * kh, axis=0) + tl.sum(dPa_j * F * r, axis=0)
            dk_j = tl.sum(dBm_j * E * kh, axis=0) + tl.sum(dPk_j * F * r, axis=0)
            db += one[:, None] * db_j[None, :]
            dk += one[:, None] * dk_j[None, :]
    a = tl.load(a_ptr + offs).to(tl.float32)
    da = kh * db  # b = a kappa_hat
    dkh += a * db
    # log w (module docstring): sum_{tau >= t} r dr + sum_{tau > t} e, inside the chunk
    e = kh * dkh - 2 * a * da - k * dk
    z = r * dr + e
    tl.store(dlw_ptr + offs, tl.cumsum(z, axis=0, reverse=True) - e - a * da - k * dk)
    tl.store(tot_ptr + ((b * H + h) * DK + rk) * n_chunks + ci, tl.sum(z, axis=0))
    tl.store(dr_ptr + offs, dr.to(dr_ptr.dtype.element_ty))
    tl.store(dk_ptr + offs, dk.to(dk_ptr.dtype.element_ty))
    tl.store(dkh_ptr + offs, dkh.to(dkh_ptr.dtype.element_ty))
    tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty))


def _state_block_v(BH, DV):
    """Value columns per program of the walks over chunks (forward and backward): ``BLOCK_V``, or 16 where
    that leaves fewer than two programs per SM of the H200's 132 (B=1, H=16, d_v=128: 64 programs of 32
    columns, 128 of 16)."""
    return min(DV, BLOCK_V if BH * triton.cdiv(DV, BLOCK_V) >= 256 else 16)


def _kept_dtype(dtype):
    """The dtype of what the chunked kernel saves per chunk and step (the states, X, the states' gradients)."""
    return torch.bfloat16 if KEEP_16BIT and dtype == torch.bfloat16 else torch.float32


def _precision(dtype):
    """The passes' products: TF32 for bfloat16 inputs (their outputs round to 8 bits anyway), else exact float32."""
    return "tf32" if dtype == torch.bfloat16 else "ieee"


def _warps(DK):
    """Warps for the kernels that hold (T, N) tiles: 4 up to N = 64, 8 at N = 128 (fewer registers per thread)."""
    return 4 if DK <= 64 else 8


def _bwd_chunk_warps(DK):
    """Warps of ``_bwd_chunk`` (sm_90, Triton 3.9: 4 warps at N = 64 use 255 registers and a 24-byte stack,
    8 warps 188 registers; at N = 128, 8 warps use 255 and no stack)."""
    return _warps(DK)


class WKV7Chunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, log_w, k, v, kappa_hat, a, S0):
        B, L, H, DK = r.shape
        DV = v.shape[-1]
        T = CHUNK
        n = triton.cdiv(L, T)
        Lp = n * T
        # padded steps are the identity: log w = 0, every other input 0
        rp, wp, kp, vp, khp, ap = (pad_to(x, Lp) for x in (r, log_w, k, v, kappa_hat, a))
        dev = r.device
        f32 = dict(dtype=torch.float32, device=dev)
        prec = _precision(r.dtype)
        # 1. every chunk's matrices, and W, Q, B_d, K_d and the decays
        mats, wy = torch.empty(B * H, n, 5, T, T, **f32), torch.empty(4, B, Lp, H, DK, **f32)
        decays = torch.empty(B * H, n, DK, **f32)  # e^{g_T} per chunk
        _chunk_matrices[(B * H, n)](rp, wp, kp, khp, ap, mats, wy, decays, Lp, H, n, DK=DK, T=T, LOW=r.dtype == torch.bfloat16,
                                    PREC=prec, GRAD=True, num_warps=_warps(DK))  # fmt: skip
        final = torch.empty(B, H, DK, DV, **f32)
        s0 = S0.float().contiguous() if S0 is not None else final
        bv = _state_block_v(B * H, DV)
        # 2. the walk over chunks: the state entering each chunk and the recalled rows X
        kept = dict(dtype=_kept_dtype(r.dtype), device=dev)
        states, X = torch.empty(B * H, n, DK, DV, **kept), torch.empty(B, Lp, H, DV, **kept)
        _fwd_states[(B * H, triton.cdiv(DV, bv))](wy, decays, vp, mats, s0, states, X, final, Lp, H, n, DK=DK, DV=DV,
                                                  T=T, BV=bv, HAS_S0=S0 is not None, PREC=prec,
                                                  num_warps=_warps(DK))  # fmt: skip
        # 3. the outputs, every chunk at once
        o = torch.empty(B, Lp, H, DV, dtype=r.dtype, device=dev)
        bvo = min(DV, OUT_BLOCK_V)
        _fwd_out[(B * H, n, triton.cdiv(DV, bvo))](rp, wp, vp, mats, states, X, o, Lp, H, n, DK=DK, DV=DV, T=T,
                                                   BV=bvo, PREC=prec, num_warps=_warps(DK))  # fmt: skip
        ctx.save_for_backward(rp, wp, kp, vp, khp, ap, mats, wy, decays, X, states, final)
        ctx.L = L
        ctx.dtypes = [x.dtype for x in (r, log_w, k, v, kappa_hat, a)] + [None if S0 is None else S0.dtype]
        return o[:, :L], final

    @staticmethod
    def backward(ctx, do, dS_final):
        rp, wp, kp, vp, khp, ap, mats, wy, decays, X, states, final = ctx.saved_tensors
        B, Lp, H, DK = rp.shape
        DV, T, L = vp.shape[-1], CHUNK, ctx.L
        n = Lp // T
        dev = rp.device
        prec = _precision(rp.dtype)
        dop = pad_to(do if do is not None else torch.zeros(B, L, H, DV, dtype=vp.dtype, device=dev), Lp)
        dsl = (dS_final if dS_final is not None else torch.zeros(B, H, DK, DV, device=dev)).float().contiguous()
        f32 = dict(dtype=torch.float32, device=dev)
        # 3. the walk over chunks in reverse: the gradient of the state leaving each chunk
        dstates, dS0 = torch.empty_like(states), torch.empty_like(dsl)
        bv = _state_block_v(B * H, DV)
        _bwd_states[(B * H, triton.cdiv(DV, bv))](wy, decays, dop, dsl, dstates, dS0, Lp, H, n, DK=DK, DV=DV, T=T, BV=bv,
                                                  PREC=prec, num_warps=_warps(DK))  # fmt: skip
        # 4. every chunk at once: all the gradients but the decays' sum over later chunks
        d_r, d_w, d_k, d_v, d_kh, d_a, d_s0 = ctx.dtypes
        dr, dk, dkh, da = (torch.empty(B, Lp, H, DK, dtype=d, device=dev) for d in (d_r, d_k, d_kh, d_a))
        dv = torch.empty(B, Lp, H, DV, dtype=d_v, device=dev)
        dlw, tot = torch.empty(B, Lp, H, DK, **f32), torch.empty(B, H, DK, n, **f32)  # tot: chunks last, for the scan
        _bwd_chunk[(B * H, n)](rp, wp, kp, khp, ap, vp, mats, X, dop, states, dstates, dr, dk, dkh, da, dv, dlw, tot,
                               Lp, H, n, DK=DK, DV=DV, T=T, BV=min(DV, BLOCK_V), PREC=prec,
                               LOW=rp.dtype == torch.bfloat16, num_warps=_bwd_chunk_warps(DK))  # fmt: skip
        # log w's gradient: add the sums over the later chunks and the final state's term (module docstring)
        later = tot.flip(-1).cumsum(-1).flip(-1) - tot + (final * dsl).sum(-1)[..., None]  # (B, H, N, chunks)
        dlw_out = torch.empty(B, n, T, H, DK, dtype=d_w, device=dev)
        torch.add(dlw.view(B, n, T, H, DK), later.permute(0, 3, 1, 2)[:, :, None], out=dlw_out)
        dlw = dlw_out.view(B, Lp, H, DK)
        return (dr[:, :L], dlw[:, :L], dk[:, :L], dv[:, :L], dkh[:, :L], da[:, :L],
                None if d_s0 is None else dS0.to(d_s0))  # fmt: skip


def _wkv7_inference(r, log_w, k, v, kappa_hat, a, S0):
    """The forward without gradients, keeping nothing for a backward: by chunks of 64 steps (``INFER_CHUNK``),
    everything that does not depend on the state in parallel (``_infer_prep``), then one walk per (batch, head,
    value block) with two products per chunk on its sequential path (``_infer_walk``); or by chunks of 16
    the four matrices of every chunk, then one walk that computes the outputs too (``_infer_pass``, eight
    products per chunk)."""
    B, L, H, DK = r.shape
    low = INFER_16BIT and r.dtype == torch.bfloat16
    stages = INFER_STAGES if low else 2 if DK <= 64 else 1
    chunk = INFER_CHUNK or (64 if low and DK > 64 else 16)
    if chunk == 16 or (stages == 1 and r.is_cuda):
        return _wkv7_inference16(r, log_w, k, v, kappa_hat, a, S0)
    DV, T = v.shape[-1], chunk
    n = triton.cdiv(L, T)
    Lp = n * T
    rp, wp, kp, vp, khp, ap = (pad_to(x, Lp) for x in (r, log_w, k, v, kappa_hat, a))
    dev = r.device
    rows_dtype = torch.bfloat16 if low else torch.float32
    wy = torch.empty(4, B, Lp, H, DK, dtype=rows_dtype, device=dev)
    uo = torch.empty(2, B, Lp, H, DV, dtype=rows_dtype, device=dev)
    decays = torch.empty(B * H, n, DK, dtype=torch.float32, device=dev)
    prec = _precision(r.dtype)
    _infer_prep[(B * H, n)](rp, wp, kp, khp, ap, vp, wy, uo, decays, Lp, H, n, DK=DK, DV=DV, T=T, BV=min(DV, 64),
                            LOW=r.dtype == torch.bfloat16, PREC=prec, LOW_ROWS=low and INFER_PREP_16BIT,
                            num_warps=INFER_PREP_WARPS or _warps(DK))  # fmt: skip
    final = torch.empty(B, H, DK, DV, dtype=torch.float32, device=dev)
    o = torch.empty(B, Lp, H, DV, dtype=r.dtype, device=dev)
    s0 = S0.float().contiguous() if S0 is not None else final
    bv = min(DV, INFER_BLOCK_V) if INFER_BLOCK_V is not None else _state_block_v(B * H, DV)
    _infer_walk[(B * H, triton.cdiv(DV, bv))](wy, uo, decays, vp, s0, o, final, Lp, H, n, DK=DK, DV=DV, T=T, BV=bv,
                                              HAS_S0=S0 is not None, PREC=prec, LOW=low, STAGES=stages,
                                              num_warps=INFER_WARPS or _warps(DK))  # fmt: skip
    return o[:, :L], final


def _wkv7_inference16(r, log_w, k, v, kappa_hat, a, S0):
    """The forward without gradients by chunks of 16: the four matrices of every chunk, then one walk that
    computes the outputs too and saves nothing (``_infer_pass``)."""
    B, L, H, DK = r.shape
    DV, T = v.shape[-1], CHUNK
    n = triton.cdiv(L, T)
    Lp = n * T
    rp, wp, kp, vp, khp, ap = (pad_to(x, Lp) for x in (r, log_w, k, v, kappa_hat, a))
    mats = torch.empty(B * H, n, 5, T, T, dtype=torch.float32, device=r.device)
    _chunk_matrices[(B * H, n)](rp, wp, kp, khp, ap, mats, mats, mats, Lp, H, n, DK=DK, T=T,
                                LOW=r.dtype == torch.bfloat16, PREC=_precision(r.dtype), GRAD=False,
                                num_warps=_warps(DK))  # fmt: skip
    final = torch.empty(B, H, DK, DV, dtype=torch.float32, device=r.device)
    o = torch.empty(B, Lp, H, DV, dtype=r.dtype, device=r.device)
    s0 = S0.float().contiguous() if S0 is not None else final
    bv = _state_block_v(B * H, DV)
    _infer_pass[(B * H, triton.cdiv(DV, bv))](rp, wp, kp, khp, ap, vp, mats, s0, o, final, Lp, H, n, DK=DK, DV=DV,
                                              T=T, BV=bv, HAS_S0=S0 is not None, PREC=_precision(r.dtype),
                                              num_warps=_warps(DK))  # fmt: skip
    return o[:, :L], final


def wkv7(r, log_w, k, v, kappa_hat, a, initial_state=None):
    """``(o, final_state)`` by chunks of 16 steps; shapes as in :func:`seqbook.rwkv.wkv7`; N, d_v in 16..128
    (powers of two). ``final_state`` is float32 and differentiable, like ``o``. Without gradients (grad mode
    off, or no input requiring one) the forward keeps nothing for a backward and takes chunks of 64 steps
    where that was measured faster (``INFER_CHUNK``)."""
    inputs = (r, log_w, k, v, kappa_hat, a, initial_state)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        return WKV7Chunked.apply(*inputs)
    return _wkv7_inference(*inputs)


# --------------------------------------------------------------------------------------
# The fused recurrent kernel: the step-by-step baseline
# --------------------------------------------------------------------------------------


@triton.jit
def _load_step(r_ptr, w_ptr, k_ptr, kh_ptr, a_ptr, v_ptr, row, rk, rv, vmask, DK: tl.constexpr, DV: tl.constexpr):
    """One step's vectors, in float32: r, w = e^{log w}, k~, kappa_hat, a (N,) and v (RECURRENT_BLOCK_V,)."""
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


class WKV7Recurrent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, log_w, k, v, kappa_hat, a, S0, checkpoint):
        B, L, H, DK = r.shape
        DV = v.shape[-1]
        T = checkpoint
        n = triton.cdiv(L, T)
        Lp = n * T
        # padded steps: log w = 0 and k~ = kappa_hat = a = 0, the identity
        rp, wp, kp, vp, khp, ap = (pad_to(x, Lp) for x in (r, log_w, k, v, kappa_hat, a))
        ckpt = torch.empty(B * H, n, DK, DV, dtype=torch.float32, device=r.device)
        final = torch.empty(B, H, DK, DV, dtype=torch.float32, device=r.device)
        o = torch.empty(B, Lp, H, DV, dtype=r.dtype, device=r.device)
        s0 = S0.float().contiguous() if S0 is not None else final
        _wkv7_fwd[(B * H, triton.cdiv(DV, RECURRENT_BLOCK_V))](rp, wp, kp, vp, khp, ap, s0, ckpt, o, final, Lp, H, n, T, DK=DK,
                                                      DV=DV, BV=RECURRENT_BLOCK_V, HAS_S0=S0 is not None)  # fmt: skip
        ctx.save_for_backward(rp, wp, kp, vp, khp, ap, ckpt)
        ctx.L, ctx.T = L, T
        ctx.dtypes = [x.dtype for x in (r, log_w, k, v, kappa_hat, a)] + [None if S0 is None else S0.dtype]
        return o[:, :L], final

    @staticmethod
    def backward(ctx, do, dS_final):
        rp, wp, kp, vp, khp, ap, ckpt = ctx.saved_tensors
        B, Lp, H, DK = rp.shape
        DV, T, L = vp.shape[-1], ctx.T, ctx.L
        n, nv = Lp // T, triton.cdiv(DV, RECURRENT_BLOCK_V)
        dev = rp.device
        dop = pad_to(do if do is not None else torch.zeros(B, L, H, DV, dtype=vp.dtype, device=dev), Lp)
        dsl = (dS_final if dS_final is not None else torch.zeros(B, H, DK, DV, device=dev)).float().contiguous()
        shares = [torch.empty(nv, B, Lp, H, DK, dtype=torch.float32, device=dev) for _ in range(5)]  # r, log_w, k, kh, a
        dv = torch.empty(B, Lp, H, DV, dtype=torch.float32, device=dev)
        dS0 = torch.empty_like(dsl)
        scratch = torch.empty(B * H, nv, T, DK, RECURRENT_BLOCK_V, dtype=torch.float32, device=dev)
        dr, dw, dk, dkh, da = shares
        _wkv7_bwd[(B * H, nv)](rp, wp, kp, vp, khp, ap, dop, ckpt, scratch, dsl, dr, dw, dk, dv, dkh, da, dS0, B, Lp, H,
                               n, T, DK=DK, DV=DV, BV=RECURRENT_BLOCK_V)  # fmt: skip
        dr, dw, dk, dkh, da = (x.sum(0)[:, :L] for x in shares)
        d_r, d_w, d_k, d_v, d_kh, d_a, d_s0 = ctx.dtypes
        return (dr.to(d_r), dw.to(d_w), dk.to(d_k), dv[:, :L].to(d_v), dkh.to(d_kh), da.to(d_a),
                None if d_s0 is None else dS0.to(d_s0), None)  # fmt: skip


def wkv7_fused_recurrent(r, log_w, k, v, kappa_hat, a, initial_state=None, checkpoint=CHECKPOINT):
    """The fused recurrent kernel (module docstring): ``(o, final_state)`` as :func:`wkv7`.

    ``checkpoint``: steps between the states saved for the backward (memory ``L / checkpoint``
    states per (batch, head); the backward recomputes the others)."""
    return WKV7Recurrent.apply(r, log_w, k, v, kappa_hat, a, initial_state, checkpoint)
