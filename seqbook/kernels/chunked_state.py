"""Pieces shared by the chunked kernels that pass a ``(d_k, d_v)`` state from chunk to chunk
(:mod:`seqbook.kernels.gla`, :mod:`seqbook.kernels.delta`, :mod:`seqbook.kernels.rwkv7`): padding the length to
whole chunks (all three), and the prologue of a program that owns one (batch, head) and one block of value
columns of the state (RWKV-7's passes; GLA's state passes also split the key rows and have their own)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def pad_to(x: torch.Tensor, Lp: int) -> torch.Tensor:
    """``x (batch, L, ...)`` padded with zeros to ``Lp`` steps (a whole number of chunks), contiguous."""
    L = x.shape[1]
    if L == Lp:
        return x.contiguous()
    return torch.nn.functional.pad(x, [0, 0] * (x.dim() - 2) + [0, Lp - L]).contiguous()


@triton.jit
def state_tile(s_ptr, H, DK: tl.constexpr, DV: tl.constexpr, T: tl.constexpr, BV: tl.constexpr, LOAD: tl.constexpr):
    """For a program on the grid ``(batch * heads, value blocks)``: its ``bh, b, h``; the index ranges ``rk (DK,)``,
    ``rv (BV,)`` (this block's value columns), ``rt (T,)``; ``vmask`` (columns past ``DV`` are padding);
    ``s_off (DK, BV)``, the tile's offsets inside one ``(DK, DV)`` state; and the tile itself, loaded in float32
    from the state ``s_ptr`` of this (batch, head) if ``LOAD``, zeros otherwise."""
    bh, pid_v = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rk, rv, rt = tl.arange(0, DK), pid_v * BV + tl.arange(0, BV), tl.arange(0, T)
    vmask = rv < DV
    s_off = rk[:, None] * DV + rv[None, :]
    if LOAD:
        S = tl.load(s_ptr + bh * DK * DV + s_off, mask=vmask[None, :], other=0.0).to(tl.float32)
    else:
        S = tl.zeros([DK, BV], dtype=tl.float32)
    return bh, b, h, rk, rv, rt, vmask, s_off, S
