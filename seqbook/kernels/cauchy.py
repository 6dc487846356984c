r"""Triton kernel: the Cauchy kernel of S4, without the ``(H, N, L)`` tensor.

Computes, for every channel ``h`` and evaluation point ``l``,

.. math::

    k_{h,l} = \sum_{n<N} \frac{v_{h,n}}{z_l - w_{h,n}}

(``z`` shared by all channels, or one row per channel), forward and backward, with
the signature of :func:`seqbook.s4.cauchy_reference`: ``cauchy(v, z, w) -> k``. It is
the :math:`O(HNL)` core of the S4 convolution kernel: the DPLR state matrix's
generating function, evaluated at ``L`` points ``z`` derived from the roots of unity,
reduces to four such sums (Gu et al. 2022, "Efficiently Modeling Long Sequences with
Structured State Spaces", Sec. 3.3, Algorithm 1 and App. C.3).

Glossary (symbol -> shape)
--------------------------
::

    v   (H, N)           numerators (S4: products of B, C, P, Q entries)
    w   (H, N)           poles (S4: the diagonal Lambda of the DPLR matrix)
    z   (L,) or (H, L)   evaluation points (S4: 2/step * (1 - omega) / (1 + omega), omega roots of unity)
    k   (H, L)           the sums
    g   (H, L)           dLoss/dk, arriving at the backward

All complex, computed in float32 on (real, imaginary) pairs (``torch.view_as_real``).

What the kernel does differently from the readable form
-------------------------------------------------------
The readable form builds the ``(H, N, L)`` complex tensor ``v / (z - w)`` and sums it
over ``n``: 8.6 GB at ``H=1024, N=64, L=16384`` in complex64, written to memory and
read back (and under autograd kept for a backward that builds more of the same size).
Yet each term is a few arithmetic operations on four numbers and is consumed by one
addition: it never needs to leave the registers. Here each program owns one channel
``h`` and a tile of ``BLOCK_L`` points, which it keeps in registers while it walks
through the modes in blocks of ``BLOCK_N``: it forms the ``(BLOCK_N, BLOCK_L)`` tile of
terms and adds it into a register accumulator of the same shape, and sums the
accumulator's rows once, after the loop, so the loop body is nothing but arithmetic.

Why tiles: every pair (mode, point) is one term, so the work is fixed; what the tiling
decides is how often the inputs are fetched. A mode's ``(v, w)``, loaded once per step,
serves ``BLOCK_L`` points, and each point serves all ``N`` modes. What stays on chip:
the tile's points, the current block of modes, the terms and the accumulator. What
goes to memory: ``v``, ``w`` and ``z`` read (a few MB, mostly from cache), ``k``
written: ``8 H L`` bytes, 134 MB at the shape above, against the materialized form's
8.6 GB written and read.

The arithmetic per term: with :math:`d = z - w`, a division is a multiplication by
the conjugate over the squared modulus,

.. math::

    e = \frac{1}{d} = \frac{\bar d}{|d|^2}, \qquad
    \frac{v}{d} = v\, e = (v^{re} e^{re} - v^{im} e^{im}) + i\,(v^{re} e^{im} + v^{im} e^{re}),

one reciprocal and ten float32 operations on the FMA pipe: two subtractions
(:math:`d`), a multiply and an FMA (:math:`|d|^2`), two multiplies (:math:`e`) and four
FMAs (the accumulation, one statement each below so that every one is fused). So the
kernel is bound by arithmetic, not memory; ``benchmarks/cauchy.py`` counts the floor.

Padding. ``N`` and ``L`` need not be multiples of the blocks. A padded mode must add
exactly 0: it loads ``v = 0``, but also needs a finite term, since :math:`0 \cdot \infty`
is a NaN. So padded lanes read a real neighbour, the last mode (or point), and get zero
weight (``v = 0``; ``g = 0`` for padded points in the backward): each padded term is as
finite as a real one, and is multiplied by zero.

Backward
--------
PyTorch's gradient of a real loss with respect to a complex input :math:`x` is
:math:`\partial\mathcal L/\partial x^{re} + i\,\partial\mathcal L/\partial x^{im}`; for
a holomorphic :math:`k(x)` it is :math:`\nabla_x = \sum g\, \overline{\partial k/\partial x}`.
Here :math:`\partial k_l/\partial v_n = 1/d_{n,l}` and
:math:`\partial k_l/\partial w_n = v_n/d_{n,l}^2`, so with :math:`s = \bar e = 1/\bar d`

.. math::

    \nabla_{v_n} = \sum_l g_l\, s_{n,l}, \qquad
    \nabla_{w_n} = \overline{v_n} \sum_l g_l\, s_{n,l}^2 .

The backward kernel is the forward turned around: each program owns one channel and a
block of ``BLOCK_N`` modes, keeps their ``w`` in registers and walks along ``l``,
accumulating :math:`u = g s` and :math:`u s` in ``(BLOCK_N, BLOCK_L)`` tiles (sixteen
FMA-pipe operations and one reciprocal per term). When ``H * N / BLOCK_N`` programs
cannot fill the GPU, the points are also cut into ``splits`` ranges whose partial sums
are added afterwards (:func:`choose_splits`).

``z`` is differentiable too, although S4 never trains it (its points are fixed by the
length): :math:`\partial k_l/\partial z_l = -\sum_n v_n/d_{n,l}^2`, the same sum with
the square, so :math:`\nabla_{z_l} = -g_l\,\overline{\sum_n v_n/d_{n,l}^2}`: one more
pass of the forward kernel (``POWER=2``), only when ``z`` requires grad, summed over
channels when ``z`` is shared.

Precision: float32 throughout; compiled, the reciprocal is the GPU's approximate one,
within 1 ulp (:func:`_reciprocal`). Each term is accurate to a few ulp of itself, so the
sum's error is a few ulp of :math:`\sum_n |v_n / d_n|`; entries that cancel to near zero
have a larger relative error, as in any float32 sum. Keep ``|z - w|`` away from zero: at
a pole the sum is infinite, and ``z`` must be finite (at ``omega = -1`` S4's formula gives
``z = inf``: leave that point out, as :func:`seqbook.s4.s4_kernel` does, or take its limit).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import backend as _backend


@triton.jit
def _reciprocal(x, FAST_RCP: tl.constexpr):
    """``1 / x``. Compiled for NVIDIA, one instruction of the special-function unit (PTX
    ``rcp.approx.ftz.f32``, within 1 ulp). The plain ``1.0 / x`` compiles to ``div.full.f32``,
    which wraps that reciprocal in range tests and rescalings: 7 more instructions on the
    FMA pipe per term, 70% on top of the 10 the forward's term needs (counted in the SASS
    of Triton 3.9 for sm_90). The interpreter cannot run PTX: there, the plain division."""
    if FAST_RCP:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return 1.0 / x


@triton.jit
def _cauchy_fwd(
    V,  # (H, N, 2) float32: numerators v
    Z,  # (L, 2) or (H, L, 2) float32: points z (row h at Z + h * z_stride_h * 2)
    W,  # (H, N, 2) float32: poles w
    K,  # (H, L, 2) float32, output: sum_n v / (z - w)^POWER
    N,
    L,
    z_stride_h,  # 0 when z is shared by the channels, L when it has one row per channel
    POWER: tl.constexpr,  # 1: the Cauchy sum; 2: the sum with squared denominators (for dk/dz)
    FAST_RCP: tl.constexpr,  # the reciprocal as one PTX instruction (compiled on NVIDIA only)
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)  # int64: H * L * 2 may pass 2^31
    l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    l_ok = l < L
    # This tile's points stay in registers for the whole walk through the modes. (Padded
    # points read the last real one: their sums, never stored, stay finite.)
    z_offs = (h * z_stride_h + tl.minimum(l, L - 1)) * 2
    z_re = tl.load(Z + z_offs)
    z_im = tl.load(Z + z_offs + 1)
    acc_re = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)
    acc_im = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)
    for n0 in tl.range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < N
        offs = (h * N + n) * 2
        # Padded modes: weight v = 0, and the pole of the last real mode, so that their term is finite.
        w_offs = (h * N + tl.minimum(n, N - 1)) * 2
        v_re = tl.load(V + offs, mask=n_ok, other=0.0)[:, None]
        v_im = tl.load(V + offs + 1, mask=n_ok, other=0.0)[:, None]
        w_re = tl.load(W + w_offs)[:, None]
        w_im = tl.load(W + w_offs + 1)[:, None]
        # e = 1 / (z - w) = conj(d) / |d|^2, a (BLOCK_N, BLOCK_L) tile that never leaves the registers.
        d_re = z_re[None, :] - w_re
        d_im = z_im[None, :] - w_im
        inv = _reciprocal(d_re * d_re + d_im * d_im, FAST_RCP)
        e_re = d_re * inv
        e_im = -d_im * inv
        if POWER == 2:
            e_re, e_im = e_re * e_re - e_im * e_im, 2.0 * e_re * e_im
        # acc += v * e, one multiply-add per statement: each compiles to a single FMA.
        acc_re += v_re * e_re
        acc_re -= v_im * e_im
        acc_im += v_re * e_im
        acc_im += v_im * e_re
    # One reduction over the modes, after the loop: no partial sums cross warps inside it.
    k_re = tl.sum(acc_re, axis=0)
    k_im = tl.sum(acc_im, axis=0)
    tl.store(K + (h * L + l) * 2, k_re, mask=l_ok)
    tl.store(K + (h * L + l) * 2 + 1, k_im, mask=l_ok)


@triton.jit
def _cauchy_bwd(
    V,  # (H, N, 2) float32
    Z,  # (L, 2) or (H, L, 2) float32
    W,  # (H, N, 2) float32
    G,  # (H, L, 2) float32: g = dLoss/dk
    DV,  # (S, H, N, 2) float32, output: this split's part of grad v = sum_l g s
    DW,  # (S, H, N, 2) float32, output: this split's part of grad w = conj(v) sum_l g s^2
    H,
    N,
    L,
    z_stride_h,
    SPLIT_LEN,  # points per split: a multiple of BLOCK_L, or L when there is one split
    FAST_RCP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    n_ok = n < N
    offs = (h * N + n) * 2
    # This block's poles stay in registers for the whole walk along the points. (Padded
    # modes read the last real one: their sums, never stored, stay finite.)
    w_offs = (h * N + tl.minimum(n, N - 1)) * 2
    w_re = tl.load(W + w_offs)[:, None]
    w_im = tl.load(W + w_offs + 1)[:, None]
    l_begin = split * SPLIT_LEN
    l_end = tl.minimum(l_begin + SPLIT_LEN, L)
    # u = g s and u s summed over l, kept per (mode, lane) and reduced once after the loop.
    s1_re = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)
    s1_im = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)
    s2_re = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)
    s2_im = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)
    for l0 in tl.range(l_begin, l_end, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        l_ok = l < l_end
        # Padded points: weight g = 0, and the last real point, so that their term is finite.
        z_offs = (h * z_stride_h + tl.minimum(l, L - 1)) * 2
        z_re = tl.load(Z + z_offs)[None, :]
        z_im = tl.load(Z + z_offs + 1)[None, :]
        g_re = tl.load(G + (h * L + l) * 2, mask=l_ok, other=0.0)[None, :]
        g_im = tl.load(G + (h * L + l) * 2 + 1, mask=l_ok, other=0.0)[None, :]
        # s = conj(1 / (z - w)) = d / |d|^2
        d_re = z_re - w_re
        d_im = z_im - w_im
        inv = _reciprocal(d_re * d_re + d_im * d_im, FAST_RCP)
        s_re = d_re * inv
        s_im = d_im * inv
        # u = g s (a multiply and an FMA per part), then s1 += u and s2 += u s (four FMAs).
        u_re = g_re * s_re - g_im * s_im
        u_im = g_re * s_im + g_im * s_re
        s1_re += u_re
        s1_im += u_im
        s2_re += u_re * s_re
        s2_re -= u_im * s_im
        s2_im += u_re * s_im
        s2_im += u_im * s_re
    t1_re = tl.sum(s1_re, axis=1)
    t1_im = tl.sum(s1_im, axis=1)
    t2_re = tl.sum(s2_re, axis=1)
    t2_im = tl.sum(s2_im, axis=1)
    v_re = tl.load(V + offs, mask=n_ok, other=0.0)
    v_im = tl.load(V + offs + 1, mask=n_ok, other=0.0)
    out = ((split.to(tl.int64) * H + h) * N + n) * 2
    tl.store(DV + out, t1_re, mask=n_ok)
    tl.store(DV + out + 1, t1_im, mask=n_ok)
    # grad w = conj(v) * t2 (linear in t2: the splits' parts add up to the whole)
    tl.store(DW + out, v_re * t2_re + v_im * t2_im, mask=n_ok)
    tl.store(DW + out + 1, v_re * t2_im - v_im * t2_re, mask=n_ok)


# --------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------

#: Block sizes and warps by direction. Triton's default layout spreads a (BLOCK_N, BLOCK_L)
#: tile's threads along its last dimension, the points: each thread holds every row
#: (mode) of a few columns (points). That decides what each direction should make large:
#:
#: - forward: every step loads ``v`` and ``w`` (four floats) for each row a thread holds,
#:   and reuses them across its columns: few modes per step, many points per program
#:   (4 x 1024 with 4 warps: 4 rows x 8 columns per thread, half a load per term);
#: - backward: every step loads ``z`` and ``g`` (four floats) for each column, reused
#:   across the rows: many modes per program, few points per step (16 x 128 with 4
#:   warps: 16 rows x 1 column, a quarter of a load per term; four accumulators of 16
#:   terms stay in registers).
#:
#: Compiled for sm_90 (Triton 3.9, without a GPU), the loops hold exactly the counted
#: arithmetic: 10 FP32 instructions per term forward, 16 backward, plus the reciprocal;
#: 140 and 127 registers, no spills. First choices, not yet timed: ``python -m
#: benchmarks.run --ops cauchy --sweep`` times the neighbours (benchmarks/results/sweeps/).
CONFIGS = {
    "fwd": dict(BLOCK_N=4, BLOCK_L=1024, num_warps=4),
    "bwd": dict(BLOCK_N=16, BLOCK_L=128, num_warps=4),
}


def _fit(config: dict, N: int, L: int) -> dict:
    """Shrink the blocks to the problem: no point computing 256 padded lanes for L = 7.
    (Under the interpreter each padded element costs as much as a real one.)"""
    cfg = dict(config)
    cfg["BLOCK_N"] = max(2, min(cfg["BLOCK_N"], triton.next_power_of_2(max(N, 1))))
    cfg["BLOCK_L"] = max(16, min(cfg["BLOCK_L"], triton.next_power_of_2(max(L, 1))))
    return cfg


def choose_splits(H: int, N: int, L: int, cfg: dict, device: torch.device) -> int:
    """How many ranges of points the backward cuts ``L`` into (1: none).

    The backward has one program per (channel, block of modes); a few channels (S4's
    kernel for a small model) leave most multiprocessors idle. Then split ``L`` into
    enough ranges for about two programs per multiprocessor, each at least 8 tiles long;
    the partial sums cost ``S * H * N`` extra writes, nothing next to the work.
    """
    if device.type != "cuda":
        return 1
    programs = H * triton.cdiv(N, cfg["BLOCK_N"])
    sms = _multiprocessors(device.index)
    if programs >= 2 * sms:
        return 1
    longest = triton.cdiv(L, 8 * cfg["BLOCK_L"])
    return max(1, min(triton.cdiv(2 * sms, programs), longest))


@functools.cache
def _multiprocessors(index: int | None) -> int:
    index = torch.cuda.current_device() if index is None else index
    return torch.cuda.get_device_properties(index).multi_processor_count


def _fast_rcp() -> bool:
    """The PTX reciprocal (:func:`_reciprocal`) where kernels are compiled for NVIDIA GPUs."""
    return not _backend.interpreting() and torch.version.hip is None


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """complex (or real) ``(..., M)`` -> contiguous float32 ``(..., M, 2)``, the layout the kernels read."""
    return torch.view_as_real(x.to(torch.complex64).resolve_conj().contiguous())


def _forward(v2, z2, w2, power: int = 1, config: dict | None = None) -> torch.Tensor:
    """``sum_n v / (z - w)^power`` on float32 pairs: ``(H, N, 2), (L, 2) | (H, L, 2), (H, N, 2) -> (H, L, 2)``."""
    H, N, _ = v2.shape
    L = z2.shape[-2]
    k2 = torch.empty(H, L, 2, dtype=torch.float32, device=v2.device)
    cfg = _fit(config or CONFIGS["fwd"], N, L)
    grid = (H, triton.cdiv(L, cfg["BLOCK_L"]))
    _cauchy_fwd[grid](v2, z2, w2, k2, N, L, 0 if z2.dim() == 2 else L, POWER=power, FAST_RCP=_fast_rcp(), **cfg)
    return k2


def _backward(v2, z2, w2, g2, splits: int | None = None, config: dict | None = None):
    """The gradients of ``v`` and ``w`` on float32 pairs, ``(H, N, 2)`` each."""
    H, N, _ = v2.shape
    L = z2.shape[-2]
    cfg = _fit(config or CONFIGS["bwd"], N, L)
    if splits is None:
        splits = choose_splits(H, N, L, cfg, v2.device)
    # Each split is a whole number of tiles; recount so that none is empty.
    split_len = triton.cdiv(triton.cdiv(L, splits), cfg["BLOCK_L"]) * cfg["BLOCK_L"]
    splits = triton.cdiv(L, split_len)
    dv2 = torch.empty(splits, H, N, 2, dtype=torch.float32, device=v2.device)
    dw2 = torch.empty_like(dv2)
    grid = (H, triton.cdiv(N, cfg["BLOCK_N"]), splits)
    _cauchy_bwd[grid](v2, z2, w2, g2, dv2, dw2, H, N, L, 0 if z2.dim() == 2 else L, split_len,
                      FAST_RCP=_fast_rcp(), **cfg)
    if splits == 1:
        return dv2[0], dw2[0]
    return dv2.sum(0), dw2.sum(0)


def _grad_as(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A complex gradient for an input of ``dtype``: a real input gets its real part (d/d re)."""
    return grad.to(dtype) if dtype.is_complex else grad.real.to(dtype)


class Cauchy(torch.autograd.Function):
    """``k[h, l] = sum_n v[h, n] / (z[l] - w[h, n])``; see the module docstring."""

    @staticmethod
    def forward(ctx, v, z, w, splits):
        v2, z2, w2 = _pairs(v), _pairs(z), _pairs(w)
        k2 = _forward(v2, z2, w2)
        ctx.save_for_backward(v2, z2, w2)
        ctx.dtypes = (v.dtype, z.dtype, w.dtype)
        ctx.splits = splits
        ctx.set_materialize_grads(False)
        return torch.view_as_complex(k2)

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None, None, None
        v2, z2, w2 = ctx.saved_tensors
        g2 = _pairs(g)
        dv = dz = dw = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            dv2, dw2 = _backward(v2, z2, w2, g2, ctx.splits)
            dv, dw = torch.view_as_complex(dv2), torch.view_as_complex(dw2)
        if ctx.needs_input_grad[1]:
            # dk_l/dz_l = -sum_n v_n / d^2: the forward kernel with squared denominators.
            k_sq = torch.view_as_complex(_forward(v2, z2, w2, power=2))
            dz = -torch.view_as_complex(g2) * k_sq.conj()
            if z2.dim() == 2:  # z shared by the channels: its gradient gathers all of them
                dz = dz.sum(0)
        v_dtype, z_dtype, w_dtype = ctx.dtypes
        return (
            None if dv is None or not ctx.needs_input_grad[0] else _grad_as(dv, v_dtype),
            None if dz is None else _grad_as(dz, z_dtype),
            None if dw is None or not ctx.needs_input_grad[2] else _grad_as(dw, w_dtype),
            None,
        )


def cauchy(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """The kernel behind :func:`seqbook.s4.cauchy` (``backend="triton"``).

    ``v (H, N)``, ``z (L,)`` or ``(H, L)``, ``w (H, N)``, complex (real accepted), on one
    device, as validated there; non-contiguous or conjugated views are copied. Computes in
    float32 (complex64) and returns ``k (H, L)`` in the inputs' promoted complex dtype
    (complex128 inputs get complex128 output, with float32 accuracy). Differentiable in
    ``v``, ``w`` and ``z``. ``splits`` forces the number of ranges of points the backward
    cuts ``L`` into (tests use it; ``None`` chooses, see :func:`choose_splits`).
    """
    out_dtype = torch.promote_types(torch.promote_types(v.dtype, z.dtype), w.dtype)
    out_dtype = out_dtype if out_dtype.is_complex else out_dtype.to_complex()
    H, N = v.shape
    L = z.shape[-1]
    if H == 0 or N == 0 or L == 0:
        # Nothing to launch: the sum is empty (zeros) or so is the output. The readable
        # form handles it, autograd included.
        zb = z if z.dim() == 2 else z.expand(H, L)
        return (v[:, :, None] / (zb[:, None, :] - w[:, :, None])).sum(1).to(out_dtype)
    k = Cauchy.apply(v, z, w, splits)
    return k.to(out_dtype)
