r"""Triton kernel: the diagonal SSM convolution kernel, without the ``(H, N, L)`` tensor.

Computes, for every channel ``h`` and lag ``l``,

.. math::

    K_{h,l} = \mathrm{Re} \sum_{n<N} W_{h,n}\, e^{l \Lambda_{h,n}}, \qquad
    W = C \odot \bar B,\quad \Lambda = \log \bar A\ (= \Delta A \text{ under ZOH}),

the S4D/DSS kernel (Gu et al. 2022, S4D Sec. 3; Gupta et al. 2022, DSS Sec. 3),
forward and backward, with the signature of
:func:`seqbook.ssm.vandermonde_kernel_reference`: ``(W, log_A_bar, length) -> K``.

What the kernel does differently from the readable form
-------------------------------------------------------
The reference materializes :math:`e^{l\Lambda}` as an ``(H, N, L)`` complex tensor
(8.6 GB at H=1024, N=64, L=16384 in complex64) and reads it back for the einsum.
Here each program owns one channel ``h`` and one tile of ``S_A * S_B`` consecutive
lags and keeps everything in registers; only ``K`` is written. Two ideas:

1. **Split the lag.** Write :math:`l = l_0 + aS_B + b` with :math:`0 \le a < S_A`,
   :math:`0 \le b < S_B`. Then

   .. math::

       e^{l\Lambda_n} = \underbrace{e^{(l_0 + aS_B)\Lambda_n}}_{X_{n,a}}\;
                        \underbrace{e^{b\Lambda_n}}_{Y_{n,b}},

   so a tile of ``S_A * S_B`` lags needs only ``S_A + S_B`` complex exponentials per
   mode instead of ``S_A * S_B`` (64 + 64 instead of 4096). Each factor is still one
   exponential of its exponent, computed directly: no power is built by a chain of
   multiplications, so the error does not grow with ``l`` beyond the rounding of
   ``l * Lambda`` itself, and stable modes decay to zero instead of overflowing.

2. **The sum over modes is a matrix product.** With :math:`U_{a,n} = W_n X_{n,a}`,

   .. math::

       K_{l_0 + aS_B + b} = \mathrm{Re}\sum_n U_{a,n} Y_{n,b}
       = \big(U^{re} Y^{re} - U^{im} Y^{im}\big)_{a,b},

   two real ``(S_A, BLOCK_N) @ (BLOCK_N, S_B)`` products per block of modes,
   accumulated in float32 (``tl.dot`` with ``input_precision="ieee"``: TF32 would
   cost three decimal digits).

Backward
--------
For a real loss with gradient :math:`G_{h,l} = \partial\mathcal L/\partial K_{h,l}`,
write :math:`E_{n,l} = e^{l\Lambda_n}`. Since :math:`K = \mathrm{Re}(W E)`,

- :math:`\partial K_l/\partial W^{re} = E^{re}_l`, :math:`\partial K_l/\partial W^{im} = -E^{im}_l`, so
  PyTorch's complex gradient (:math:`\partial/\partial re + i\,\partial/\partial im`) is
  :math:`\nabla_W = \sum_l G_l\,\overline{E_l} =: S_0`;
- :math:`\partial E_l/\partial\Lambda = l E_l` (holomorphic), so in the same way
  :math:`\nabla_\Lambda = \sum_l G_l\,\overline{l W E_l} = \overline W\, S_1`,
  :math:`S_1 := \sum_l l\, G_l\,\overline{E_l}`.

Both sums over ``l`` split like the forward: with the same :math:`X, Y`,

.. math::

    S_0 = \sum_a \overline{X_{a}}\; T_a,\quad T_{n,a} = \sum_b \overline{Y_{n,b}}\, G_{a,b},
    \qquad
    S_1 = \sum_a \overline{X_{a}}\,\big((l_0 + aS_B)\,T_a + T'_a\big),\quad
    T'_{n,a} = \sum_b b\,\overline{Y_{n,b}}\, G_{a,b},

four real matrix products per tile. Each backward program owns one channel and one
block of modes and walks along ``l``; ``Y`` does not depend on the tile, so it is
computed once per program. The gradients reach ``A``, ``B``, ``C`` and the step
through the :math:`O(HN)` PyTorch code that formed ``W`` and ``Lambda``
(:func:`seqbook.ssm.s4d_kernel`).

Precision: float32 throughout. The phase :math:`l\,\mathrm{Im}\Lambda` is rounded to
float32, so its absolute error grows like :math:`2^{-24} l |\mathrm{Im}\Lambda|`; the
materialized float32 reference has the same limit. Phases are reduced to
:math:`[-\pi, \pi]` before ``sin``/``cos`` (:func:`_exp_complex`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _exp_complex(re, im):
    """``e^{re + i im}`` as ``(real part, imaginary part)``.

    The phase is first brought into [-pi, pi] by subtracting the nearest multiple
    ``k 2 pi``, with 2 pi split into 6.28125 (8 significant bits, so ``k * 6.28125`` is
    exact for ``|k| < 2^16``) plus the small rest (Cody and Waite's reduction). The
    reduction adds no error beyond the rounding already in ``im``, and it keeps
    ``sin``/``cos`` on their fast path: libdevice switches to a slow exact reduction
    (Payne-Hanek) past ``|x| ~ 1e5``, which ``l * Im(Lambda)`` reaches at long lengths.
    """
    k = tl.floor(im * 0.15915494309189535 + 0.5)  # nearest integer to im / (2 pi)
    im = im - k * 6.28125 - k * 0.0019353071795864769
    mag = tl.exp(re)
    return mag * tl.cos(im), mag * tl.sin(im)


@triton.jit
def _vandermonde_fwd(
    W,  # (H, N, 2) float32: real and imaginary parts of W = C * B_bar
    LAM,  # (H, N, 2) float32: Lambda = log A_bar
    K,  # (H, L) float32, output
    N,
    L,
    BLOCK_N: tl.constexpr,
    S_A: tl.constexpr,
    S_B: tl.constexpr,
):
    h = tl.program_id(0)
    l0 = tl.program_id(1) * (S_A * S_B)  # first lag of this program's tile
    a = tl.arange(0, S_A)
    b = tl.arange(0, S_B)
    t_a = (l0 + a * S_B).to(tl.float32)  # exponents of the coarse factor X, (S_A,)
    t_b = b.to(tl.float32)  # exponents of the fine factor Y, (S_B,)
    acc = tl.zeros((S_A, S_B), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = n < N
        # Modes past N load W = 0 and Lambda = 0: they add 0 * e^0 = 0, with no inf or nan.
        w_re = tl.load(W + (h * N + n) * 2, mask=mask, other=0.0)
        w_im = tl.load(W + (h * N + n) * 2 + 1, mask=mask, other=0.0)
        lam_re = tl.load(LAM + (h * N + n) * 2, mask=mask, other=0.0)
        lam_im = tl.load(LAM + (h * N + n) * 2 + 1, mask=mask, other=0.0)
        # Y[n, b] = exp(b * Lambda_n), (BLOCK_N, S_B)
        y_re, y_im = _exp_complex(lam_re[:, None] * t_b[None, :], lam_im[:, None] * t_b[None, :])
        # U[a, n] = W_n * exp((l0 + a S_B) * Lambda_n), (S_A, BLOCK_N)
        x_re, x_im = _exp_complex(t_a[:, None] * lam_re[None, :], t_a[:, None] * lam_im[None, :])
        u_re = w_re[None, :] * x_re - w_im[None, :] * x_im
        u_im = w_re[None, :] * x_im + w_im[None, :] * x_re
        # K[a, b] += Re sum_n U[a, n] Y[n, b] = (U_re @ Y_re - U_im @ Y_im)[a, b]
        acc = tl.dot(u_re, y_re, acc, input_precision="ieee")
        acc = tl.dot(-u_im, y_im, acc, input_precision="ieee")
    lag = l0 + a[:, None] * S_B + b[None, :]  # row-major: the tile is S_A * S_B consecutive lags
    tl.store(K + h * L + lag, acc, mask=lag < L)


@triton.jit
def _vandermonde_bwd(
    W,  # (H, N, 2) float32
    LAM,  # (H, N, 2) float32
    DK,  # (H, L) float32: dLoss/dK
    DW,  # (H, N, 2) float32, output: complex gradient of W
    DLAM,  # (H, N, 2) float32, output: complex gradient of Lambda
    N,
    L,
    BLOCK_N: tl.constexpr,
    S_A: tl.constexpr,
    S_B: tl.constexpr,
):
    h = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = n < N
    w_re = tl.load(W + (h * N + n) * 2, mask=mask, other=0.0)
    w_im = tl.load(W + (h * N + n) * 2 + 1, mask=mask, other=0.0)
    lam_re = tl.load(LAM + (h * N + n) * 2, mask=mask, other=0.0)
    lam_im = tl.load(LAM + (h * N + n) * 2 + 1, mask=mask, other=0.0)
    a = tl.arange(0, S_A)
    b = tl.arange(0, S_B)
    t_b = b.to(tl.float32)
    # Y[n, b] = exp(b Lambda_n) is the same for every tile: computed once. (BLOCK_N, S_B)
    y_re, y_im = _exp_complex(lam_re[:, None] * t_b[None, :], lam_im[:, None] * t_b[None, :])
    by_re = y_re * t_b[None, :]  # b * Y, for the factor l in S_1
    by_im = y_im * t_b[None, :]
    s0_re = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s0_im = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s1_re = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s1_im = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for l0 in range(0, L, S_A * S_B):
        # G^T[b, a] = dK[h, l0 + a S_B + b], loaded transposed for the products below. (S_B, S_A)
        lag = l0 + a[None, :] * S_B + b[:, None]
        g_t = tl.load(DK + h * L + lag, mask=lag < L, other=0.0)
        # T[n, a] = sum_b conj(Y[n, b]) G[a, b];  T'[n, a] = sum_b b conj(Y[n, b]) G[a, b]. (BLOCK_N, S_A)
        t_re = tl.dot(y_re, g_t, input_precision="ieee")
        t_im = -tl.dot(y_im, g_t, input_precision="ieee")
        tp_re = tl.dot(by_re, g_t, input_precision="ieee")
        tp_im = -tl.dot(by_im, g_t, input_precision="ieee")
        # X[n, a] = exp((l0 + a S_B) Lambda_n). (BLOCK_N, S_A)
        t_a = (l0 + a * S_B).to(tl.float32)
        x_re, x_im = _exp_complex(lam_re[:, None] * t_a[None, :], lam_im[:, None] * t_a[None, :])
        # R = (l0 + a S_B) T + T', so that sum_a conj(X) R = sum_l l G_l conj(E_l) over this tile.
        r_re = t_a[None, :] * t_re + tp_re
        r_im = t_a[None, :] * t_im + tp_im
        # conj(X) * T = (x_re T_re + x_im T_im) + i (x_re T_im - x_im T_re), summed over a
        s0_re += tl.sum(x_re * t_re + x_im * t_im, axis=1)
        s0_im += tl.sum(x_re * t_im - x_im * t_re, axis=1)
        s1_re += tl.sum(x_re * r_re + x_im * r_im, axis=1)
        s1_im += tl.sum(x_re * r_im - x_im * r_re, axis=1)
    # grad W = S_0;  grad Lambda = conj(W) * S_1
    tl.store(DW + (h * N + n) * 2, s0_re, mask=mask)
    tl.store(DW + (h * N + n) * 2 + 1, s0_im, mask=mask)
    tl.store(DLAM + (h * N + n) * 2, w_re * s1_re + w_im * s1_im, mask=mask)
    tl.store(DLAM + (h * N + n) * 2 + 1, w_re * s1_im - w_im * s1_re, mask=mask)


def _side(L: int, largest: int) -> int:
    """The power of 2 <= sqrt(L), clamped to [16, largest]: tl.dot needs every dimension >= 16."""
    return max(16, min(largest, 1 << (math.isqrt(L).bit_length() - 1)))


def fwd_config(N: int, L: int) -> dict:
    """Block sizes and warps of the forward kernel.

    The lag tile ``S_A * S_B`` grows to 64 * 64 = 4096 lags for long kernels, so the
    exponentials, ``(S_A + S_B) / (S_A S_B)`` per (mode, lag), cost little next to the
    products. Sixteen modes per step keep the tiles in registers. Chosen on an H100
    (Triton 3.6) at H=1024, N=64, L=16384 from the sweep in ``benchmarks/ssm_kernel.py``:
    0.21 ms, against 0.44 ms with 32 modes and 4 warps.
    """
    side = _side(L, 64)
    return dict(BLOCK_N=16, S_A=side, S_B=side, num_warps=8 if side == 64 else 4)


def bwd_config(N: int, L: int) -> dict:
    """Block sizes and warps of the backward kernel. It holds more tiles at once (Y, bY,
    dK, four products, X), so larger blocks spill registers: at the benchmark shape 32
    modes and 64 x 64 lags with 4 warps took 10.7 ms, 16 modes and 32 x 32 lags 0.88 ms
    (a later sweep found 0.76 ms with S_A=64, S_B=16: not adopted yet, so that the
    committed benchmark rows match this code)."""
    side = _side(L, 32)
    return dict(BLOCK_N=16, S_A=side, S_B=side, num_warps=4)


def _as_real_pairs(x: torch.Tensor) -> torch.Tensor:
    """complex (H, N) -> contiguous float32 (H, N, 2), the layout the kernels read."""
    return torch.view_as_real(x.to(torch.complex64).contiguous()).contiguous()


class VandermondeKernel(torch.autograd.Function):
    """``K = Re sum_n W[h, n] exp(l * log_A_bar[h, n])`` for ``l < length``; see the module docstring."""

    @staticmethod
    def forward(ctx, W: torch.Tensor, log_A_bar: torch.Tensor, length: int) -> torch.Tensor:
        H, N = W.shape
        w = _as_real_pairs(W)
        lam = _as_real_pairs(log_A_bar)
        K = torch.empty(H, length, dtype=torch.float32, device=W.device)
        cfg = fwd_config(N, length)
        grid = (H, triton.cdiv(length, cfg["S_A"] * cfg["S_B"]))
        _vandermonde_fwd[grid](w, lam, K, N, length, **cfg)
        ctx.save_for_backward(w, lam)
        ctx.length = length
        ctx.dtypes = (W.dtype, log_A_bar.dtype)
        return K

    @staticmethod
    def backward(ctx, dK: torch.Tensor):
        w, lam = ctx.saved_tensors
        H, N, _ = w.shape
        dK = dK.to(torch.float32).contiguous()
        dw = torch.empty_like(w)
        dlam = torch.empty_like(lam)
        cfg = bwd_config(N, ctx.length)
        grid = (H, triton.cdiv(N, cfg["BLOCK_N"]))
        _vandermonde_bwd[grid](w, lam, dK, dw, dlam, N, ctx.length, **cfg)
        dW, dLam = torch.view_as_complex(dw), torch.view_as_complex(dlam)
        # A real input gets the real part of its complex gradient (d/d re).
        W_dtype, L_dtype = ctx.dtypes
        dW = dW.to(W_dtype) if W_dtype.is_complex else dW.real.to(W_dtype)
        dLam = dLam.to(L_dtype) if L_dtype.is_complex else dLam.real.to(L_dtype)
        return dW, dLam, None


def vandermonde_kernel(W: torch.Tensor, log_A_bar: torch.Tensor, length: int) -> torch.Tensor:
    """The kernel behind :func:`seqbook.ssm.vandermonde_kernel` (``backend="triton"``).

    ``W (H, N)``, ``log_A_bar (H, N)`` (complex or real, any float dtype: the kernel
    computes in float32) -> ``K (H, length)`` in the real dtype matching the inputs
    (float32 for complex64, float64 for complex128); differentiable in both inputs.
    """
    out_dtype = torch.promote_types(W.dtype, log_A_bar.dtype)
    out_dtype = out_dtype.to_real() if out_dtype.is_complex else out_dtype
    K = VandermondeKernel.apply(W, log_A_bar, length)
    return K.to(out_dtype)
