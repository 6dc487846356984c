"""The GLA / RWKV-6 Triton kernel's two ways of forming a chunk's weights (seqbook.kernels.gla).

A chunk takes 64-row matrix products with the exponent split at the chunk's middle step where neither half of the
chunk decays past e^-SPAN in any channel, and the exact key column by key column path otherwise (two launches of
each kernel, each doing its own chunks). tests/test_gated_delta.py checks the kernel on uniform gates (strength 1:
the products; 4 and 20: the columns); here each test first checks that its inputs take the path it is about, then
compares the output, the final state and every gradient (bonus included) with the float64 recurrence:

- the benchmark's gates (``logsigmoid(N + 4) / 16``, near 1): the product in every chunk;
- gates that are mild except in one chunk, and there only in the second block of 64 key channels (d_k = 128):
  both paths in one call, chosen per chunk over all its key blocks (the programs of one key block, in dq and dk,
  follow the whole chunk's choice).

The state passes have two forms (``_tiles(...)["split"]``): one walk over the chunks per tile of the state, or
every chunk's own share at once followed by a short walk that adds them up; the last test runs the form that is
not the default on the shapes of test_gated_delta, with small tiles (several key and value blocks).

bfloat16 inputs store the per-chunk states in bfloat16 (``KEEP_16BIT``); the interpreter has no bfloat16, so the
last test stores float16 states for float16 inputs to run the same rounding and widening on CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqbook import linear_attention as la
from seqbook.kernels import gla as kernel
from seqbook.kernels.gla import CHUNK, SPAN
from compare import assert_near, unit_roundoff

F64 = torch.float64


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def half_chunk_decay(log_alpha: torch.Tensor) -> torch.Tensor:
    """The largest decay (minus the log-gates' sum) over either half of each chunk, per chunk and channel:
    ``(batch, chunks, heads, d_k)``; the kernel takes the products where this is <= SPAN in every channel."""
    B, L, H, d = log_alpha.shape
    n = -(-L // CHUNK)
    a = F.pad(log_alpha, [0, 0, 0, 0, 0, n * CHUNK - L]).view(B, n, 2, CHUNK // 2, H, d)
    return (-a.sum(3)).amax(2)


def kernel_and_reference(device, q, k, v, a, S0, u, seed):
    """The kernel's (o, final state, grads) and the float64 recurrence's for the loss <o, do> + <S, dS>."""
    do, dS = randn(*v.shape, seed=seed), randn(*S0.shape, seed=seed + 1)
    names = ["q", "k", "v", "log_alpha", "initial_state", "bonus"]

    def run(fn, xs, dtype):
        leaves = [None if x is None else x.to(device=device, dtype=dtype).requires_grad_() for x in xs]
        o, S = fn(*leaves)
        ((o.to(F64) * do.to(device)).sum() + (S.to(F64) * dS.to(device)).sum()).backward()
        return dict(o=o.detach(), final_state=S.detach(),
                    **{f"d{n}": x.grad for n, x in zip(names, leaves) if x is not None})

    got = run(lambda q, k, v, a, S0, u: la.gla(q, k, v, a, initial_state=S0, bonus=u, return_final_state=True,
                                               backend="triton"), (q, k, v, a, S0, u), torch.float32)  # fmt: skip
    want = run(lambda q, k, v, a, S0, u: la.gla_recurrent(q, k, v, a, S0, None, u), (q, k, v, a, S0, u), F64)
    return got, want


@pytest.mark.parametrize("bonus", [False, True])
def test_benchmark_gates_take_the_product(device, bonus):
    B, L, H, d_k, d_v, seed = 2, 150, 2, 32, 16, 21
    q, k = randn(B, L, H, d_k, seed=seed), randn(B, L, H, d_k, seed=seed + 1) * d_k**-0.5
    v = randn(B, L, H, d_v, seed=seed + 2)
    a = F.logsigmoid(randn(B, L, H, d_k, seed=seed + 3) + 4.0) / 16.0
    assert half_chunk_decay(a).max() < 1.0  # far inside the product's range
    S0, u = randn(B, H, d_k, d_v, seed=seed + 4), 0.1 * randn(H, d_k, seed=seed + 5)
    got, want = kernel_and_reference(device, q, k, v, a, S0, u if bonus else None, seed + 6)
    for name in want:
        assert_near(got[name], want[name], 2e-5, f"{name}, benchmark gates, bonus={bonus}")


# the output's forms (``_tiles``): one kernel per (chunk, value block) forming the weights; the same on a fixed
# number of programs looping over chunks (``fwd_persist``); the weights stored once per chunk and read per value
# block (``stored``)
FORMS = {"one kernel": {"stored": False}, "persistent": {"stored": False, "fwd_persist": 2},
         "stored weights": {"stored": True}}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bonus", [False, True])
def test_paths_mix_per_chunk_and_key_block(device, bonus, form, monkeypatch):
    default = kernel._tiles
    monkeypatch.setattr(kernel, "_tiles", lambda DK, DV: {**default(DK, DV), **FORMS[form]})
    B, L, H, d_k, d_v, seed = 1, 3 * CHUNK - 20, 1, 128, 16, 31
    q, k, v = randn(B, L, H, d_k, seed=seed), randn(B, L, H, d_k, seed=seed + 1), randn(B, L, H, d_v, seed=seed + 2)
    gen = torch.Generator().manual_seed(seed + 3)
    a = -0.3 * torch.rand(B, L, H, d_k, generator=gen, dtype=F64)
    a[:, CHUNK : 2 * CHUNK, :, 64:] *= 15.0  # the second chunk's second key block: up to e^-4.5 per step
    decay = half_chunk_decay(a)
    assert decay[:, 1, :, 64:].amax() > SPAN and decay[:, 1, :, :64].amax() < SPAN  # columns in chunk 1 (all blocks)
    assert decay[:, [0, 2]].amax() < SPAN  # the product in the other chunks
    S0, u = randn(B, H, d_k, d_v, seed=seed + 4), randn(H, d_k, seed=seed + 5)
    got, want = kernel_and_reference(device, q, k, v, a, S0, u if bonus else None, seed + 6)
    for name in want:
        assert_near(got[name], want[name], 2e-5, f"{name}, mixed paths, bonus={bonus}, {form}")


@pytest.mark.parametrize("shape", [(2, 150, 2, 32, 32, 1.0), (1, 100, 1, 16, 16, 20.0)])
@pytest.mark.parametrize("bonus", [False, True])
def test_the_other_state_pass_form(device, shape, bonus, monkeypatch):
    default = kernel._tiles
    split = not default(64, 64)["split"]
    monkeypatch.setattr(kernel, "_tiles", lambda DK, DV: {**default(DK, DV), "split": split, "state": (16, 16, 4),
                                                          "local": (16, 16, 4), "combine": (16, 16, 4)})
    B, L, H, d_k, d_v, strength = shape
    seed = 41
    q, k, v = randn(B, L, H, d_k, seed=seed), randn(B, L, H, d_k, seed=seed + 1), randn(B, L, H, d_v, seed=seed + 2)
    a = -strength * torch.rand(B, L, H, d_k, generator=torch.Generator().manual_seed(seed + 3), dtype=F64)
    S0, u = randn(B, H, d_k, d_v, seed=seed + 4), randn(H, d_k, seed=seed + 5)
    got, want = kernel_and_reference(device, q, k, v, a, S0, u if bonus else None, seed + 6)
    # The kernel's exponents are differences of c, the float32 cumulative sum of the log-gates over a chunk: |c|
    # grows to strength * CHUNK / 2 on average, and c_t, c_j each carry a rounding of order u |c| (more with the
    # compiled scan's tree order than with the interpreter's sequential sum, where c_t's error is shared by c_j):
    # an absolute error in every exponent, a relative one in every weight, up to about 2 u strength CHUNK on top
    # of 2e-5 (as in test_linear_attention's strong-decay test). At strength 20 the interpreter's log-gates'
    # gradient is off by 1.8e-5 (9.8e-7 at strength 1; 1.9e-6 at strength 20 with gates on a grid of 2^-10, whose
    # partial sums are exact): the 2e-5 alone failed compiled on the H200 (both state-pass forms alike).
    rel = 2e-5 + 2 * unit_roundoff(torch.float32) * strength * CHUNK
    for name in want:
        assert_near(got[name], want[name], rel, f"{name}, split={split}, {shape}, bonus={bonus}")


def test_16_bit_state_storage(device, monkeypatch):
    """The per-chunk states and their gradients stored in 16 bits (bfloat16 inputs, ``KEEP_16BIT``; the
    interpreter has no bfloat16, so float16 storage of float16 inputs stands in here): written rounded, read back
    into float32; the final state stays float32. float16 tolerances (compare.py)."""
    monkeypatch.setattr(kernel, "_state_dtype", lambda dtype: torch.float16 if dtype == torch.float16 else torch.float32)
    B, L, H, d_k, d_v, seed = 1, 140, 2, 32, 32, 51
    q, k = randn(B, L, H, d_k, seed=seed), randn(B, L, H, d_k, seed=seed + 1) * d_k**-0.5
    v = randn(B, L, H, d_v, seed=seed + 2)
    a = F.logsigmoid(randn(B, L, H, d_k, seed=seed + 3) + 4.0) / 16.0
    S0, u = randn(B, H, d_k, d_v, seed=seed + 4), 0.1 * randn(H, d_k, seed=seed + 5)
    do, dS = randn(*v.shape, seed=seed + 6), randn(*S0.shape, seed=seed + 7)
    names = ["q", "k", "v", "log_alpha", "initial_state", "bonus"]
    inputs = [q.half(), k.half(), v.half(), a.float(), S0.float(), u.float()]

    def run(fn, xs):
        leaves = [x.to(device).detach().requires_grad_() for x in xs]
        o, S = fn(*leaves)
        ((o.to(F64) * do.to(device)).sum() + (S.to(F64) * dS.to(device)).sum()).backward()
        return dict(o=o.detach(), final_state=S.detach(), **{f"d{n}": x.grad for n, x in zip(names, leaves)})

    got = run(lambda q, k, v, a, S0, u: la.gla(q, k, v, a, initial_state=S0, bonus=u, return_final_state=True,
                                               backend="triton"), inputs)  # fmt: skip
    want = run(lambda q, k, v, a, S0, u: la.gla_recurrent(q, k, v, a, S0, None, u), [x.to(F64) for x in inputs])
    assert got["final_state"].dtype == torch.float32
    for name in want:
        assert_near(got[name], want[name], 3e-3 if name in ("o", "final_state") else 1e-2, f"{name}, 16-bit states")
