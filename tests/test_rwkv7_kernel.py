"""The RWKV-7 Triton kernels (seqbook.kernels.rwkv7: chunked, and fused recurrent) against the float64 recurrence.

Interpreted on CPU (small shapes: the interpreter runs every program in NumPy), compiled on CUDA
(larger shapes). Each case draws fresh seeded inputs, runs a kernel (the chunked one through the
public entry ``rwkv.wkv7(..., backend="triton")``) and :func:`seqbook.rwkv.wkv7_recurrent` in
float64 on the same rounded inputs, and compares the output, the final state and the gradient of
every input (``r, log_w, k, v, kappa_hat, a, initial_state``) for the loss ``<o, do> + <S_L, dS>``.
Lengths that are not multiples of the chunk (16 steps) or of the recurrent kernel's checkpoint
interval, lengths below them, and decays strong enough that ``w`` underflows to 0 in float32
are among the cases.
"""

from __future__ import annotations

import pytest
import torch

from compare import assert_near
from seqbook import backend
from seqbook import linear_attention as la
from seqbook import rwkv
from seqbook.kernels import rwkv7 as rwkv7_kernel

F64 = torch.float64
ON_GPU = torch.cuda.is_available()

# (batch, length, heads, N, d_v, decay strength): log_w ~ -strength * U(0, 1)
if ON_GPU:
    SHAPES = [(2, 1000, 3, 64, 64, 1.0), (1, 257, 2, 128, 128, 1.0), (2, 129, 2, 16, 32, 30.0), (1, 1, 1, 64, 64, 1.0)]
else:
    SHAPES = [(1, 5, 1, 16, 16, 1.0), (2, 37, 2, 16, 32, 1.0), (1, 50, 1, 32, 16, 30.0)]
# the fused recurrent kernel, with its checkpoint interval
RECURRENT_CASES = [((1, 37, 1, 16, 32, 1.0), 8), (SHAPES[2], 16)] + ([(SHAPES[0], 64)] if ON_GPU else [])


def rel_tolerance(shape, chunk=16):
    """1e-5 for float32 (compare.py), plus the chunked kernel's exponents, differences of float32
    cumulative sums of log w over a chunk (16 steps; 64 in the forward without gradients): off by about
    u * chunk * strength (u = 6e-8; the kernel's docstring), taken twice. 2e-5 at strength 1, 7e-5 at 30
    (chunks of 16); measured 3e-7 and 1.1e-5."""
    return 1e-5 + 2 * 2**-24 * chunk * max(strengths(shape))


def strengths(shape):
    """The decay strength of a case: one number, or one per chunk of 16 steps (a list)."""
    return shape[5] if isinstance(shape[5], list) else [shape[5]]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def wkv7_problem(B, L, H, N, d_v, strength=1.0, seed=0):
    """r, log_w, k~, v, kappa_hat (unit rows), a in [0, 1), S0; float64 on the CPU."""
    r, k, v = randn(B, L, H, N, seed=seed), randn(B, L, H, N, seed=seed + 1), randn(B, L, H, d_v, seed=seed + 2)
    log_w = -strength * rand(B, L, H, N, seed=seed + 3)
    kappa_hat = torch.nn.functional.normalize(randn(B, L, H, N, seed=seed + 4), dim=-1)
    a, S0 = rand(B, L, H, N, seed=seed + 5), randn(B, H, N, d_v, seed=seed + 6)
    return r, log_w, k, v, kappa_hat, a, S0


NAMES = ("r", "log_w", "k", "v", "kappa_hat", "a", "initial_state")


def kernel_and_reference(device, shape, *, state, dtype=torch.float32, seed=0, checkpoint=None):
    """The kernel's (o, final state, grads) and the float64 recurrence's on the same rounded inputs:
    the chunked kernel, or with ``checkpoint`` the fused recurrent one."""
    B, L, H, N, d_v, strength = shape
    if isinstance(strength, list):  # one strength per chunk of 16 steps
        strength = torch.tensor(strength, dtype=F64).repeat_interleave(16)[:L].view(1, L, 1, 1)
    xs = wkv7_problem(B, L, H, N, d_v, strength, seed)
    xs = [x.to(dtype) for x in xs[:6]] + [xs[6].float() if state else None]
    xs = [None if x is None else x.to(device) for x in xs]
    do = randn(B, L, H, d_v, seed=seed + 7).to(device=device, dtype=dtype)
    dS = randn(B, H, N, d_v, seed=seed + 8).to(device)

    def run(fn, args):
        leaves = [None if x is None else x.detach().clone().requires_grad_() for x in args]
        o, S = fn(*leaves)
        ((o.to(F64) * do.to(F64)).sum() + (S.to(F64) * dS.to(F64)).sum()).backward()
        return dict(o=o.detach(), final_state=S.detach(), **{f"d{n}": x.grad for n, x in zip(NAMES, leaves) if x is not None})

    if checkpoint is None:
        got = run(lambda *t: rwkv.wkv7(*t[:6], initial_state=t[6], return_final_state=True, backend="triton"), xs)
    else:
        got = run(lambda *t: backend.kernels("rwkv7").wkv7_fused_recurrent(*t, checkpoint=checkpoint), xs)
    want = run(rwkv.wkv7_recurrent, [None if x is None else x.double() for x in xs])
    return got, want


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("state", [False, True])
def test_kernel_matches_float64_recurrence(device, shape, state):
    got, want = kernel_and_reference(device, shape, state=state, seed=shape[1])
    assert got["o"].dtype == torch.float32 and got["final_state"].dtype == torch.float32
    assert ("dinitial_state" in got) == state
    for name in want:
        assert_near(got[name], want[name], rel_tolerance(shape), f"{name} at {shape}, state={state}")


# two of SHAPES (fewer compilations on CUDA), a sequence mixing strong and weak decays, and lengths past one
# chunk of 64 that are not multiples of it
NO_GRAD_SHAPES = SHAPES[:2] + [(1, 90, 2, 16, 16, [30.0, 1.0, 7.0, 0.1, 3.0, 60.0]), (1, 150, 1, 32, 16, 1.0)]


@pytest.mark.parametrize("shape", NO_GRAD_SHAPES)
@pytest.mark.parametrize("chunk", [64, 16])
def test_kernel_forward_without_gradients(device, shape, chunk, monkeypatch):
    """Inputs that need no gradient take the kernel's forward that keeps nothing for a backward
    (``INFER_CHUNK`` = 64: ``_infer_prep`` and ``_infer_walk``; 16: ``_infer_pass``): its output and final
    state, with an initial state, against the float64 recurrence."""
    monkeypatch.setattr(rwkv7_kernel, "INFER_CHUNK", chunk)
    B, L, H, N, d_v, strength = shape
    if isinstance(strength, list):
        strength = torch.tensor(strength, dtype=F64).repeat_interleave(16)[:L].view(1, L, 1, 1)
    xs = [x.float().to(device) for x in wkv7_problem(B, L, H, N, d_v, strength, seed=L + 3)]
    assert not any(x.requires_grad for x in xs)
    o, S = rwkv.wkv7(*xs[:6], initial_state=xs[6], return_final_state=True, backend="triton")
    o_ref, S_ref = rwkv.wkv7_recurrent(*(x.double() for x in xs))
    assert_near(o, o_ref, rel_tolerance(shape, chunk), f"o at {shape}, no gradients, chunks of {chunk}")
    assert_near(S, S_ref, rel_tolerance(shape, chunk), f"final state at {shape}, no gradients, chunks of {chunk}")


@pytest.mark.parametrize("strength", [1.0, 40.0])
def test_forward_without_gradients_chunks_of_64(device, strength, monkeypatch):
    """The forward without gradients by chunks of 64 with several value blocks per (batch, head) in its walk
    (``INFER_BLOCK_V`` = 16, d_v = 64 > N = 32), with no initial state and with one: at strength 1 (a chunk's
    cumulated decays spread up to 64, around ``SPLIT_SPREAD``: split and column-wise chunks) and 40 (every
    chunk column-wise; w underflows to 0 in float32 at some steps), lengths 64 + 1 and 2 * 64 - 3."""
    monkeypatch.setattr(rwkv7_kernel, "INFER_CHUNK", 64)
    monkeypatch.setattr(rwkv7_kernel, "INFER_BLOCK_V", 16)
    for L, state in ((65, False), (125, True)):
        shape = (1, L, 1, 32, 64, strength)
        xs = [x.float().to(device) for x in wkv7_problem(*shape, seed=L)]
        s0 = xs[6] if state else None
        with torch.no_grad():
            o, S = rwkv.wkv7(*xs[:6], initial_state=s0, return_final_state=True, backend="triton")
        o_ref, S_ref = rwkv.wkv7_recurrent(*(x.double() for x in xs[:6]), None if s0 is None else s0.double())
        assert_near(o, o_ref, rel_tolerance(shape, 64), f"o at {shape}, state={state}, chunks of 64")
        assert_near(S, S_ref, rel_tolerance(shape, 64), f"final state at {shape}, state={state}, chunks of 64")


@pytest.mark.parametrize("chunk", [64, 16])
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []))
def test_forward_without_gradients_16_bit(device, dtype, chunk, monkeypatch):
    """16-bit inputs through the forward without gradients by chunks of 64 and of 16 (for bfloat16: rows kept in
    bfloat16 and the products after the inverse and the walk's on bfloat16 operands, ``INFER_16BIT``,
    ``INFER_PREP_16BIT``): the 16-bit tolerance for o and the state."""
    monkeypatch.setattr(rwkv7_kernel, "INFER_CHUNK", chunk)
    xs = wkv7_problem(1, 100, 2, 16, 32, 1.0, seed=13)
    xs = [x.to(device=device, dtype=dtype) for x in xs[:6]] + [xs[6].float().to(device)]
    with torch.no_grad():
        o, S = rwkv.wkv7(*xs[:6], initial_state=xs[6], return_final_state=True, backend="triton")
    o_ref, S_ref = rwkv.wkv7_recurrent(*(x.double() for x in xs))
    assert o.dtype == dtype
    assert_near(o, o_ref, HALF[dtype][0], f"o, {dtype}, no gradients")
    assert_near(S, S_ref, HALF[dtype][0], f"final state, {dtype}, no gradients")


def test_kernel_split_and_column_chunks(device):
    """A chunk whose cumulated log-decays spread less than ``SPLIT_SPREAD`` builds its (T, T) matrices
    (and their gradients) as matrix products of split exponentials; a chunk with a wider spread, one
    column at a time. Strengths per chunk 30, 1, 7, 0.1, 3, 60 (spreads about 8 times the strength:
    both sides of 60, and one chunk near it) in one sequence: both ways, and chunks of either way
    following each other, against the float64 recurrence."""
    assert rwkv7_kernel.CHUNK == 16 and rwkv7_kernel.SPLIT_SPREAD.value == 60.0
    shape = (1, 90, 2, 16, 16, [30.0, 1.0, 7.0, 0.1, 3.0, 60.0])
    got, want = kernel_and_reference(device, shape, state=True, seed=4)
    for name in want:
        assert_near(got[name], want[name], rel_tolerance(shape), f"{name} at {shape}")


def test_kernel_several_value_blocks(device, monkeypatch):
    """``BLOCK_V`` = ``OUT_BLOCK_V`` = 16 with d_v = 64: the walks over chunks and the output kernel run
    several programs per (batch, head) and the backward's per-chunk kernel sums its gradients over several
    value blocks in its loop (at the other cases' sizes one block holds every column). d_v = 64 > N = 16,
    with an initial state."""
    monkeypatch.setattr(rwkv7_kernel, "BLOCK_V", 16)
    monkeypatch.setattr(rwkv7_kernel, "OUT_BLOCK_V", 16)
    shape = (1, 35, 1, 16, 64, 2.0)
    got, want = kernel_and_reference(device, shape, state=True, seed=11)
    for name in want:
        assert_near(got[name], want[name], rel_tolerance(shape), f"{name} at {shape}, BLOCK_V 16")


@pytest.mark.parametrize("shape,checkpoint", RECURRENT_CASES)
def test_fused_recurrent_kernel_matches_float64_recurrence(device, shape, checkpoint):
    got, want = kernel_and_reference(device, shape, state=True, seed=shape[1] + 1, checkpoint=checkpoint)
    assert got["final_state"].dtype == torch.float32
    for name in want:
        # float32 throughout, step by step (no cumulative sums): 1e-5 (compare.py); measured about 2e-7
        assert_near(got[name], want[name], 1e-5, f"{name} at {shape}, checkpoint {checkpoint}")


# 16-bit inputs: (rel for o and the state, rel for the gradients), compare.py; bfloat16 on CUDA only
# (the interpreter runs NumPy, which has no bfloat16)
HALF = {torch.float16: (4e-3, 1e-2), torch.bfloat16: (2e-2, 5e-2)}


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []))
def test_kernel_16_bit(device, dtype):
    got, want = kernel_and_reference(device, (1, 40, 2, 16, 16, 1.0), state=True, dtype=dtype, seed=9)
    assert got["o"].dtype == dtype and got["dlog_w"].dtype == dtype
    for name in want:
        # the inputs rounded to 16 bits are the reference's inputs too; o and the gradients are
        # rounded to 16 bits once at the end
        rel = HALF[dtype][0] if name in ("o", "final_state") else HALF[dtype][1]
        assert_near(got[name], want[name], rel, f"{name}, {dtype}")


def test_kernel_keeps_16_bit(device, monkeypatch):
    """What the chunked kernel saves per chunk (states, X, the states' gradients) in 16 bits, as it does
    for bfloat16 inputs on the GPU (``KEEP_16BIT``; the interpreter has no bfloat16, so float16 stands in
    here): the 16-bit tolerances still hold."""
    monkeypatch.setattr(rwkv7_kernel, "_kept_dtype", lambda dtype: torch.float16 if dtype == torch.float16 else torch.float32)
    got, want = kernel_and_reference(device, (1, 40, 2, 16, 16, 1.0), state=True, dtype=torch.float16, seed=12)
    for name in want:
        rel = HALF[torch.float16][0] if name in ("o", "final_state") else HALF[torch.float16][1]
        assert_near(got[name], want[name], rel, f"{name}, float16 inputs, 16-bit states")


def test_kernel_output_only_and_special_case_delta_rule(device):
    # Without return_final_state the output alone carries the gradients; with w = 1, a = beta,
    # kappa_hat = k and k~ = beta k the operator is the delta rule (scale 1): the kernel agrees
    # with the delta rule's float64 recurrence, through a transition I - beta k k^T that is
    # singular where beta = 1.
    B, L, H, N = 1, 21, 2, 16
    q, k = randn(B, L, H, N, seed=1), torch.nn.functional.normalize(randn(B, L, H, N, seed=2), dim=-1)
    v, beta = randn(B, L, H, N, seed=3), rand(B, L, H, seed=4)
    beta[0, 5] = 1.0
    ones = torch.ones_like(k)
    args = [q, 0 * k, beta[..., None] * k, v, k, beta[..., None] * ones]
    args = [x.float().to(device).requires_grad_() for x in args]
    o = rwkv.wkv7(*args, backend="triton")
    assert o.shape == (B, L, H, N)
    do = randn(B, L, H, N, seed=5).to(device)
    (o.double() * do.double()).sum().backward()
    # the float64 reference on the kernel's device: assert_near subtracts, and CUDA - CPU raises
    leaves = [x.double().detach().to(device).requires_grad_() for x in (q, k, v, beta)]
    o_ref, _ = la.delta_rule_recurrent(*leaves, None, scale=1.0)
    (o_ref * do.double()).sum().backward()
    assert_near(o, o_ref, 1e-5, "o, delta rule special case")
    with torch.no_grad():  # a forward without gradients saves no states for a backward
        assert_near(rwkv.wkv7(*args, backend="triton"), o_ref, 1e-5, "o, delta rule special case, no_grad")
    assert_near(args[0].grad, leaves[0].grad, 1e-5, "dr = dq, delta rule special case")
    assert_near(args[3].grad, leaves[2].grad, 1e-5, "dv, delta rule special case")
    # k enters three times (k~ = beta k, kappa_hat = k, a through beta): the chain rule adds them
    dk = args[2].grad * beta.to(device)[..., None] + args[4].grad
    assert_near(dk, leaves[1].grad, 1e-5, "dk, delta rule special case")


def test_kernel_refusals(device):
    r, log_w, k, v, kh, a, S0 = (x.float().to(device) for x in wkv7_problem(1, 8, 1, 16, 24, seed=10))
    with pytest.raises(ValueError, match=r"wkv7\(backend='triton'\).*head dims d_v in \(16, 32, 64, 128\), got d_v = 24"):
        rwkv.wkv7(r, log_w, k, v, kh, a, backend="triton")
    v = v[..., :16]
    with pytest.raises(TypeError, match=r"wkv7\(backend='triton'\).*dtypes float16, bfloat16, float32.*float64"):
        rwkv.wkv7(*(x.double() for x in (r, log_w, k, v, kh, a)), backend="triton")
    if not ON_GPU:
        with pytest.raises(TypeError, match="interpreter cannot run bfloat16"):
            rwkv.wkv7(*(x.bfloat16() for x in (r, log_w, k, v, kh, a)), backend="triton")
    # "auto" falls back to the reference where the kernel cannot run (float64 here)
    xs = [x.double() for x in (r, log_w, k, v, kh, a)]
    o = rwkv.wkv7(*xs, backend="auto")
    assert o.dtype == F64
    assert_near(o, rwkv.wkv7_recurrent(*xs)[0], 1e-12, "auto, float64")
