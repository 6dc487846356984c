r"""Triton kernel: the chunked SSD (Mamba-2) forward, with the state kept on chip.

The readable forms (:func:`seqbook.mamba.ssd_quadratic`, :func:`seqbook.mamba.ssd_chunked`),
the glossary and the shapes are in :mod:`seqbook.mamba`; the public entry is
:func:`seqbook.mamba.ssd`. Forward only: there is no backward here (the public entry
uses the readable chunked form when gradients are needed).

Design
------
One program per (batch element, head, block of ``BLOCK_P`` of the head's ``P`` channels)
holds that block's ``(BLOCK_P, N)`` state in registers and walks the chunks of ``Q``
steps in order, doing for each the four steps of :func:`seqbook.mamba.ssd_chunked` (Dao
and Gu 2024, Sec. 6) on tiles:

1. the chunk's own outputs, :math:`y = (L \circ C B^\top)(\Delta x)`: two matrix products
   ``(Q, N) x (N, Q)`` and ``(Q, Q) x (Q, BLOCK_P)`` with the decay mask
   :math:`L_{ts} = e^{c_t - c_s}` (:math:`c` the cumulative sum of :math:`\Delta A` inside
   the chunk: short, so the difference is accurate);
2. plus what the state entering the chunk contributes, :math:`e^{c_t} C_t^\top S`: one
   ``(Q, N) x (N, BLOCK_P)`` product;
3. then the state leaving the chunk, :math:`S \leftarrow e^{c_{Q-1}} S + \sum_s
   e^{c_{Q-1} - c_s} \Delta_s x_s B_s^\top`: one ``(BLOCK_P, Q) x (Q, N)`` product.

The state passing of the readable form (step 3 there, a scan over chunks) is the loop
itself: it runs over ``L / Q`` chunks instead of ``L`` steps, and everything inside a
chunk is a matrix product on the tensor cores. The parallelism is ``batch * heads *
P / BLOCK_P`` programs (128 to 256 at the benchmark shape, about one per SM): each
walks its sequence alone. mamba_ssm's kernels instead split the chunks over programs
and pass states in a separate kernel, more parallelism for more passes over memory.

Precision: float32 inputs are multiplied in full float32 (``input_precision="ieee"``,
not TF32). With bfloat16 or float16 inputs, the products of inputs (``C B^T``, and the
masked scores times ``x``) feed the tensor cores in that format; the state stays float32,
and its two products take float32 operands at TF32 precision (10 bits of mantissa, not
bfloat16's 7). Everything accumulates in float32.
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
def _ssd_fwd(
    X,  # (Bt, L, H, P)
    DT,  # (Bt, L, H)
    A,  # (H,)
    B, C,  # (Bt, L, G, N)
    S0,  # (Bt, H, P, N) float32: the initial state (if HAS_S0)
    Y,  # (Bt, L, H, P) output
    S_END,  # (Bt, H, P, N) float32 output: the final state
    L, H, G, P, N,
    HAS_S0: tl.constexpr, WIDEN: tl.constexpr,  # (see _mm)
    PRECISION: tl.constexpr,  # products of the inputs: "ieee" for float32 inputs (ignored for 16-bit ones)
    STATE_PRECISION: tl.constexpr,  # products with the float32 state: "ieee" (float32 inputs) or "tf32"
    Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    batch = tl.program_id(0) // H
    head = tl.program_id(0) % H
    group = head // (H // G)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, Q)
    p_ok, n_ok = p < P, n < N
    causal = rows[:, None] >= rows[None, :]
    A_h = tl.load(A + head).to(tl.float32)
    state = ((batch * H + head).to(tl.int64) * P + p[:, None]) * N + n[None, :]
    pn_ok = p_ok[:, None] & n_ok[None, :]
    if HAS_S0:
        S = tl.load(S0 + state, mask=pn_ok, other=0.0)
    else:
        S = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)

    for t0 in tl.range(0, L, Q, num_stages=NUM_STAGES):
        t = (t0 + rows).to(tl.int64)
        live = t < L
        x_offs = ((batch * L + t[:, None]) * H + head) * P + p[None, :]
        x = tl.load(X + x_offs, mask=live[:, None] & p_ok[None, :], other=0.0)  # (Q, BLOCK_P)
        dt = tl.load(DT + (batch * L + t) * H + head, mask=live, other=0.0).to(tl.float32)  # 0: identity steps
        bc_offs = ((batch * L + t[:, None]) * G + group) * N + n[None, :]
        Bc = tl.load(B + bc_offs, mask=live[:, None] & n_ok[None, :], other=0.0)  # (Q, BLOCK_N)
        Cc = tl.load(C + bc_offs, mask=live[:, None] & n_ok[None, :], other=0.0)
        c = tl.cumsum(dt * A_h, axis=0)  # log of the decay from the chunk's start to step t
        c_last = tl.sum(dt * A_h, axis=0)  # ... to its end (padded steps add 0)

        # 1. The chunk's own outputs: (L o C B^T)(Delta x), masked to s <= t.
        scores = _mm(Cc, tl.trans(Bc), PRECISION, WIDEN)  # (Q, Q): C_t . B_s
        decay = tl.exp(tl.where(causal, c[:, None] - c[None, :], float("-inf")))
        M = scores * decay * dt[None, :]
        y = _mm(M.to(x.dtype), x, PRECISION, WIDEN)  # (Q, BLOCK_P)
        # 2. What the state entering the chunk contributes at each step.
        # (the state stays float32: TF32 products for 16-bit inputs, not a rounding to 8 bits)
        y += tl.exp(c)[:, None] * _mm(Cc.to(tl.float32), tl.trans(S), STATE_PRECISION, WIDEN)
        tl.store(Y + x_offs, y.to(Y.dtype.element_ty), mask=live[:, None] & p_ok[None, :])
        # 3. The state leaving the chunk: decayed old state plus the chunk's inputs.
        w = tl.exp(c_last - c) * dt  # (Q,): step s's input, decayed to the chunk's end
        xw = x.to(tl.float32) * w[:, None]
        S = tl.exp(c_last) * S + _mm(tl.trans(xw), Bc.to(tl.float32), STATE_PRECISION, WIDEN)  # (BLOCK_P, BLOCK_N)

    tl.store(S_END + state, S, mask=pn_ok)


#: Launch parameters by input element size (bytes): chunk Q, channels per program, warps.
#: From compiling for sm_90 offline (Triton 3.6, ptxas register counts), not yet timed:
#: for 16-bit inputs at P = 64, N = 128, (Q, BLOCK_P) = (32, 64) at 8 warps takes 196
#: registers and no spills (Q = 64 spills: the (Q, N) tiles of B and C, and the state's
#: float32 products, do not fit); float32 inputs multiply with FMAs (exact, no tensor
#: cores) and spill at every size tried: they are for checking, not for speed.
CONFIGS = {
    4: dict(Q=16, BLOCK_P=16, NUM_STAGES=2, num_warps=4),
    2: dict(Q=32, BLOCK_P=64, NUM_STAGES=2, num_warps=8),
}


def ssd_forward(x, dt, A, B, C, chunk_size=None, initial_state=None, config=None):
    """``(y, final_state)`` of SSD, forward only; inputs as validated by
    :func:`seqbook.mamba.ssd` (contiguous copies are made). ``chunk_size`` (a power of two
    >= 16) overrides the configuration's ``Q``; the final state is float32."""
    x, dt, A, B, C = (t.contiguous() for t in (x, dt, A, B, C))
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    cfg = dict(config or CONFIGS[x.dtype.itemsize])
    if chunk_size is not None:
        cfg["Q"] = chunk_size
    cfg["BLOCK_P"] = max(16, min(cfg["BLOCK_P"], triton.next_power_of_2(P)))
    cfg["BLOCK_N"] = max(16, triton.next_power_of_2(N))  # tl.dot needs every side >= 16
    y = torch.empty_like(x)
    s_end = torch.empty(batch, H, P, N, dtype=torch.float32, device=x.device)
    s0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    grid = (batch * H, triton.cdiv(P, cfg["BLOCK_P"]))
    _ssd_fwd[grid](
        x, dt, A, B, C, s_end if s0 is None else s0, y, s_end, L, H, G, P, N,
        HAS_S0=s0 is not None, WIDEN=interpreting(), PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        STATE_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **cfg,
    )  # fmt: skip
    return y, s_end
