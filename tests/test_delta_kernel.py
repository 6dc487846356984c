"""The delta-rule Triton kernel (seqbook.kernels.delta, chunks of 64 steps) against the float64 recurrence.

Interpreted on CPU (small head dims: the interpreter runs every program in NumPy), compiled on CUDA
(the benchmark's head dims too). Each case draws fresh seeded inputs (unit keys, ``beta`` in
``(0, beta_max)``), runs the kernel through the public entry ``delta_rule(..., backend="triton")``
and :func:`seqbook.linear_attention.delta_rule_recurrent` in float64 on the same rounded inputs,
and compares the output, the final state and the gradient of every input (``q, k, v, beta,
initial_state``) for the loss ``<o, do> + <S_L, dS>``. Lengths of several chunks and lengths that
are not a multiple of the chunk are among the cases (the kernel's inverse doubles diagonal blocks of
2, 4, ..., 32 rows inside a 64-step chunk, so a chunk's rows past 16, 32 and 48 are all exercised).
"""

from __future__ import annotations

import pytest
import torch

from compare import assert_near
from seqbook import linear_attention as la
from seqbook.kernels import delta as delta_kernel

F64 = torch.float64
ON_GPU = torch.cuda.is_available()

# (batch, length, heads, d_k, d_v)
if ON_GPU:
    SHAPES = [(2, 300, 3, 64, 64), (1, 200, 2, 128, 128), (1, 1000, 2, 64, 64), (2, 77, 2, 32, 16)]
else:
    SHAPES = [(1, 150, 1, 16, 16), (2, 70, 1, 16, 32), (1, 129, 2, 32, 16)]
# relative tolerances (compare.assert_near) for the output and final state / for the gradients
TOLERANCE = {torch.float32: (2e-5, 5e-5), torch.float16: (3e-3, 1e-2), torch.bfloat16: (2e-2, 5e-2)}


def problem(shape, seed, dtype, beta_max=1.0, state=True):
    B, L, H, d_k, d_v = shape
    gen = torch.Generator().manual_seed(seed)
    q, v = torch.randn(B, L, H, d_k, generator=gen, dtype=F64), torch.randn(B, L, H, d_v, generator=gen, dtype=F64)
    k = torch.nn.functional.normalize(torch.randn(B, L, H, d_k, generator=gen, dtype=F64), dim=-1)
    beta = beta_max * torch.rand(B, L, H, generator=gen, dtype=F64)
    S0 = torch.randn(B, H, d_k, d_v, generator=gen, dtype=F64) if state else None
    do, dS = torch.randn(B, L, H, d_v, generator=gen, dtype=F64), torch.randn(B, H, d_k, d_v, generator=gen, dtype=F64)
    inputs = [q.to(dtype), k.to(dtype), v.to(dtype), beta.float(), None if S0 is None else S0.float()]
    return inputs, do, dS


def run(fn, inputs, do, dS, device):
    leaves = [None if x is None else x.detach().to(device).clone().requires_grad_() for x in inputs]
    o, S = fn(*leaves)
    ((o.to(F64) * do.to(o.device)).sum() + (S.to(F64) * dS.to(S.device)).sum()).backward()
    names = ["q", "k", "v", "beta", "initial_state"]
    grads = {f"d{n}": x.grad.cpu() for n, x in zip(names, leaves) if x is not None}
    return dict(o=o.detach().cpu(), final_state=S.detach().cpu(), **grads)


def compare(shape, dtype, device, seed, beta_max=1.0, state=True, n_keys=None):
    inputs, do, dS = problem(shape, seed, dtype, beta_max, state)
    if n_keys is not None:  # every key one of n_keys unit vectors
        k = inputs[1]
        inputs[1] = k[:, :n_keys].repeat(1, k.shape[1] // n_keys + 1, 1, 1)[:, : k.shape[1]].contiguous()
    got = run(lambda q, k, v, b, S0: la.delta_rule(q, k, v, b, initial_state=S0, return_final_state=True,
                                                   backend="triton"), inputs, do, dS, device)  # fmt: skip
    want = run(la.delta_rule_recurrent, [None if x is None else x.double() for x in inputs], do, dS, device)
    assert got["o"].dtype == dtype and got["final_state"].dtype == torch.float32
    fwd_tol, grad_tol = TOLERANCE[dtype]
    for name in want:
        tol = fwd_tol if name in ("o", "final_state") else grad_tol
        assert_near(got[name], want[name], tol, f"{name} at {shape}, {dtype}, beta_max={beta_max}, state={state}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("state", [True, False])
def test_kernel_float32(device, shape, state):
    compare(shape, torch.float32, device, seed=shape[1] + state, state=state)


# bfloat16 compiled only: the interpreter has no bfloat16 (NumPy), and the public entry says so
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []))
def test_kernel_16_bit(device, dtype):
    compare(SHAPES[0], dtype, device, seed=3)


def test_kernel_beta_up_to_two(device):
    """beta in (0, 2): the step (I - beta k k^T) reflects instead of projecting; the chunk's
    inverse (I + A)^{-1} has larger entries then."""
    compare(SHAPES[1], torch.float32, device, seed=5, beta_max=2.0)


def test_kernel_repeated_keys(device):
    """Three keys, each repeated every third step, beta in (0, 2): the chunk's A = tril(Diag(beta) K K^T)
    has many equal columns and the entries of its inverse are as large as they get for unit keys."""
    compare(SHAPES[0], torch.float32, device, seed=9, beta_max=2.0, n_keys=3)


def test_chunk_is_64_steps_in_blocks_of_16():
    """The cases above span several chunks and a partial chunk only if the chunk is what they assume."""
    assert delta_kernel.CHUNK == 64 and delta_kernel.SUB == 16
    assert max(s[1] for s in SHAPES) > 2 * delta_kernel.CHUNK
    assert any(s[1] % delta_kernel.CHUNK not in (0, 16, 32, 48) for s in SHAPES)


def test_kernel_value_blocks(device, monkeypatch):
    """The value columns split other ways than the defaults take at the shapes above: one program of 32
    columns in the passes over chunks (``STATE_BLOCK_V``), the outputs by programs of 16 columns
    (``OUT_BLOCK_V``), and the backward's per-chunk kernel summing over value blocks of 16 in more than one
    step (``BWD_BLOCK_V``; at d_k = d_v = 128 its default, 32 columns, takes four)."""
    shape = SHAPES[1]
    assert shape[4] >= 32
    monkeypatch.setattr(delta_kernel, "STATE_BLOCK_V", 32)
    monkeypatch.setattr(delta_kernel, "OUT_BLOCK_V", 16)
    monkeypatch.setattr(delta_kernel, "BWD_BLOCK_V", 16)
    compare(shape, torch.float32, device, seed=7)
