"""Tests for seqbook.mamba (selective scan, SSD) and the Triton kernel seqbook.kernels.selective_scan.

The readable forms are checked against each other and against closed forms in float64;
the kernel (output, last state, and the gradients of u, delta, A, B, C, D, z and
delta_bias) against the float64 loop, through the Triton interpreter on a machine
without a GPU and compiled on CUDA when a GPU is present (the ``device`` fixture of
conftest.py). Interpreted sizes stay small: there a step of the forward costs a few
milliseconds and the backward's in-tile scans run element by element in Python.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqbook import backend, mamba
from compare import assert_near

F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch, length, d, N, *, seed=0, dtype=torch.float32, device="cpu", D=True, z=True, bias=True,
                softplus=True):  # fmt: skip
    """Random selective-scan inputs, as a dict of NAMES. ``A`` negative in [-3.1, -0.1]
    (S4D-real-like spread); raw deltas around -1 so that softplus(delta + bias) is about
    0.1-0.6 and exp(Delta A) ranges from nearly 1 to about 0.15: states carry for several
    steps, and errors in the carried state show. Without softplus, delta in [0, 0.5]."""
    gen = torch.Generator().manual_seed(seed)
    x = dict(
        u=torch.randn(batch, length, d, generator=gen),
        delta=(torch.randn(batch, length, d, generator=gen) * 0.5 - 1.0) if softplus
        else torch.rand(batch, length, d, generator=gen) * 0.5,
        A=-0.1 - 3 * torch.rand(d, N, generator=gen),
        B=torch.randn(batch, length, N, generator=gen),
        C=torch.randn(batch, length, N, generator=gen),
        D=torch.randn(d, generator=gen) if D else None,
        z=torch.randn(batch, length, d, generator=gen) if z else None,
        delta_bias=0.3 * torch.randn(d, generator=gen) if bias else None,
    )  # fmt: skip
    # Activations in `dtype`; A, D, delta_bias stay float32 (as Mamba keeps them), unless float64.
    params = ("A", "D", "delta_bias")
    cast = {k: (dtype if (k not in params or dtype == F64) else torch.float32) for k in x}
    return {k: None if v is None else v.to(device=device, dtype=cast[k]) for k, v in x.items()}


def run_with_grads(fn, inputs, g, g_last, softplus, **kwargs):
    """Output, last state and every input gradient of ``fn`` for the loss <y, g> + <last, g_last>
    (``g_last=None``: the last state is not used)."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y, last = fn(*(leaves[k] for k in NAMES), delta_softplus=softplus, return_last_state=True, **kwargs)
    loss = (y * g.to(y.dtype)).sum()
    if g_last is not None:
        loss = loss + (last * g_last.to(last.dtype)).sum()
    loss.backward()
    return y.detach(), last.detach(), {k: None if v is None else v.grad for k, v in leaves.items()}


def check_kernel(device, shape, *, dtype=torch.float32, rel=1e-5, seed=0, use_last=True, fwd_config=None,
                 bwd_config=None, **flags):  # fmt: skip
    """Kernel vs. the float64 loop on the same (rounded) inputs: y, last state, every gradient."""
    softplus = flags.pop("softplus", True)
    inputs = make_inputs(*shape, seed=seed, dtype=dtype, device=device, softplus=softplus, **flags)
    batch, length, d, N = shape
    gen = torch.Generator().manual_seed(seed + 100)
    # the output gradients, rounded to the kernel's dtype so that the reference sees the same ones
    g = torch.randn(batch, length, d, generator=gen).to(dtype).to(device)
    g_last = torch.randn(batch, d, N, generator=gen).to(device) if use_last else None
    k = backend.kernels("selective_scan")
    y, last, grads = run_with_grads(k.selective_scan, inputs, g, g_last, softplus,
                                    fwd_config=fwd_config, bwd_config=bwd_config)  # fmt: skip
    wide = {n: None if v is None else v.to(F64) for n, v in inputs.items()}
    y_ref, last_ref, grads_ref = run_with_grads(mamba.selective_scan_loop, wide, g.to(F64),
                                                None if g_last is None else g_last.to(F64), softplus)  # fmt: skip
    assert y.dtype == dtype and last.dtype == torch.float32
    assert_near(y, y_ref, rel, "y")
    assert_near(last, last_ref, rel, "last_state")
    for name in NAMES:
        if inputs[name] is None:
            assert grads[name] is None
            continue
        assert grads[name].dtype == inputs[name].dtype, f"grad {name}: dtype {grads[name].dtype}"
        if length == 1 and name == "A":
            # h_{-1} = 0, so dA = 0 exactly in float64, and in the kernel (x_0 = a_0 h_{-1}):
            # checked against the scale of lambda * Delta * b, as an exact zero has no relative error.
            scale = grads_ref["B"].abs().max() * inputs["B"].abs().max().to(F64)
            assert grads[name].abs().max() <= rel * scale, f"grad A at length 1: {grads[name].abs().max():.2e}"
            continue
        assert_near(grads[name], grads_ref[name], rel, f"grad {name}")


# --------------------------------------------------------------------------------------
# The readable forms (float64)
# --------------------------------------------------------------------------------------

FLAG_SETS = {
    "all": dict(),
    "bare": dict(D=False, z=False, bias=False, softplus=False),
    "skip-only": dict(z=False, bias=False),
    "gate,no-softplus": dict(D=False, bias=True, softplus=False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("length", [0, 1, 7, 100])
@pytest.mark.parametrize("flags", list(FLAG_SETS), ids=str)
def test_parallel_equals_loop(device, length, flags):
    flag = dict(FLAG_SETS[flags])
    softplus = flag.pop("softplus", True)
    x = make_inputs(2, length, 5, 4, seed=length, dtype=F64, device=device, softplus=softplus, **flag)
    args = [x[k] for k in NAMES]
    y_loop, last_loop = mamba.selective_scan_loop(*args, delta_softplus=softplus, return_last_state=True)
    y_par, last_par = mamba.selective_scan_parallel(*args, delta_softplus=softplus, return_last_state=True)
    assert y_loop.shape == (2, length, 5) and last_loop.shape == (2, 5, 4)
    torch.testing.assert_close(y_par, y_loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last_par, last_loop, rtol=1e-12, atol=1e-12)
    # the public entry on CPU (auto -> reference) returns y alone unless asked
    y = mamba.selective_scan(*args, delta_softplus=softplus)
    torch.testing.assert_close(y, y_loop, rtol=1e-12, atol=1e-12)


def test_parallel_gradients_equal_loop():
    x = make_inputs(2, 23, 3, 4, seed=1, dtype=F64)
    gen = torch.Generator().manual_seed(2)
    g, g_last = torch.randn(2, 23, 3, generator=gen, dtype=F64), torch.randn(2, 3, 4, generator=gen, dtype=F64)
    _, _, want = run_with_grads(mamba.selective_scan_loop, x, g, g_last, True)
    _, _, got = run_with_grads(mamba.selective_scan_parallel, x, g, g_last, True)
    for name in NAMES:
        torch.testing.assert_close(got[name], want[name], rtol=1e-11, atol=1e-11, msg=f"grad {name}")


def test_loop_gradcheck():
    x = make_inputs(1, 6, 2, 3, seed=3, dtype=F64)
    leaves = [x[k].requires_grad_() for k in NAMES]

    def fn(*args):
        return mamba.selective_scan_loop(*args, delta_softplus=True, return_last_state=True)

    assert torch.autograd.gradcheck(fn, leaves)


def test_closed_forms():
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(2, 30, 3, generator=gen, dtype=F64)
    ones = torch.ones(2, 30, 1, dtype=F64)
    # A = 0, Delta = 1, B = C = 1: no decay, so y is the running sum of u.
    y = mamba.selective_scan_loop(u, torch.ones_like(u), torch.zeros(3, 1, dtype=F64), ones, ones)
    torch.testing.assert_close(y, torch.cumsum(u, dim=1), rtol=1e-12, atol=1e-12)
    # B = 0: the state stays 0, and y is the skip D u gated by silu(z).
    D, z = torch.randn(3, generator=gen, dtype=F64), torch.randn(2, 30, 3, generator=gen, dtype=F64)
    y = mamba.selective_scan_parallel(u, u.exp(), -torch.ones(3, 1, dtype=F64), 0 * ones, ones, D, z)
    torch.testing.assert_close(y, D * u * F.silu(z), rtol=1e-12, atol=1e-12)
    # One step: h_0 = Delta_0 B_0 u_0, whatever A is (e^{Delta A} multiplies h_{-1} = 0).
    _, last = mamba.selective_scan_loop(u[:, :1], 0.5 * ones[:, :1].expand(2, 1, 3), -5 * torch.ones(3, 1, dtype=F64),
                                        2 * ones[:, :1], ones[:, :1], return_last_state=True)  # fmt: skip
    torch.testing.assert_close(last[..., 0], u[:, 0], rtol=1e-12, atol=1e-12)


def test_half_inputs_are_widened():
    # The readable forms compute in float32 and return y in the input dtype, as mamba_ssm does.
    x = make_inputs(2, 20, 4, 3, seed=5, dtype=torch.bfloat16)
    y, last = mamba.selective_scan_parallel(*(x[k] for k in NAMES), delta_softplus=True, return_last_state=True)
    assert y.dtype == torch.bfloat16 and last.dtype == torch.float32
    ref = mamba.selective_scan_loop(*(None if x[k] is None else x[k].to(F64) for k in NAMES), delta_softplus=True)
    assert_near(y, ref, 1e-2, "y (bf16)")


# --------------------------------------------------------------------------------------
# SSD (Mamba-2): quadratic == chunked == selective scan with one decay per head
# --------------------------------------------------------------------------------------


def make_ssd(batch, length, heads, P, groups, N, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, P, generator=gen, dtype=dtype)
    dt = F.softplus(torch.randn(batch, length, heads, generator=gen, dtype=dtype) - 1)
    A = -0.5 - 2 * torch.rand(heads, generator=gen, dtype=dtype)
    B = torch.randn(batch, length, groups, N, generator=gen, dtype=dtype)
    C = torch.randn(batch, length, groups, N, generator=gen, dtype=dtype)
    return x, dt, A, B, C


@pytest.mark.parametrize("length,chunk", [(1, 4), (37, 1), (37, 8), (37, 64), (64, 16)])
@pytest.mark.parametrize("groups", [1, 2])
def test_ssd_chunked_equals_quadratic(length, chunk, groups):
    x, dt, A, B, C = make_ssd(2, length, 4, 3, groups, 5, seed=length + chunk)
    y_quad = mamba.ssd_quadratic(x, dt, A, B, C)
    y_chunk = mamba.ssd_chunked(x, dt, A, B, C, chunk_size=chunk)
    assert y_quad.shape == (2, length, 4, 3)
    torch.testing.assert_close(y_chunk, y_quad, rtol=1e-11, atol=1e-11)


def test_ssd_equals_selective_scan_with_scalar_decay():
    # SSD with one group is the selective scan on d = heads * P channels whose A is the
    # head's decay repeated over its P channels and N states, and whose Delta is the head's.
    batch, length, heads, P, N = 2, 45, 3, 4, 6
    x, dt, A, B, C = make_ssd(batch, length, heads, P, 1, N, seed=7)
    y_quad = mamba.ssd_quadratic(x, dt, A, B, C)
    y_chunk, final = mamba.ssd_chunked(x, dt, A, B, C, chunk_size=16, return_final_state=True)
    u = x.reshape(batch, length, heads * P)
    delta = dt[..., None].expand(batch, length, heads, P).reshape(batch, length, heads * P)
    A_ss = A[:, None, None].expand(heads, P, N).reshape(heads * P, N)
    y_ss, last = mamba.selective_scan(u, delta, A_ss, B[:, :, 0], C[:, :, 0], return_last_state=True)
    torch.testing.assert_close(y_quad, y_ss.reshape(batch, length, heads, P), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(y_chunk, y_quad, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(final, last.reshape(batch, heads, P, N), rtol=1e-11, atol=1e-11)


def test_ssd_initial_state_continues_a_sequence():
    # Two halves with the state handed over == the whole sequence.
    x, dt, A, B, C = make_ssd(1, 50, 2, 3, 2, 4, seed=8)
    y_all, s_all = mamba.ssd_chunked(x, dt, A, B, C, chunk_size=8, return_final_state=True)
    y1, s1 = mamba.ssd_chunked(x[:, :21], dt[:, :21], A, B[:, :21], C[:, :21], chunk_size=8, return_final_state=True)
    y2, s2 = mamba.ssd_chunked(x[:, 21:], dt[:, 21:], A, B[:, 21:], C[:, 21:], chunk_size=8, initial_state=s1,
                               return_final_state=True)  # fmt: skip
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y_all, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(s2, s_all, rtol=1e-11, atol=1e-11)


def test_ssd_gradients_agree():
    x, dt, A, B, C = make_ssd(1, 19, 2, 3, 1, 4, seed=9)
    g = torch.randn(1, 19, 2, 3, dtype=F64)
    grads = []
    for fn in (mamba.ssd_quadratic, lambda *a: mamba.ssd_chunked(*a, chunk_size=4)):
        leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]
        (fn(*leaves) * g).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, a, b in zip(("x", "dt", "A", "B", "C"), *grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"grad {name}")


def test_segsum_stable_where_the_naive_one_is_not():
    # 2048 log-decays of about -1: the running sum reaches -2150, and in float32 the
    # difference of two such sums keeps about 4 decimal digits.
    gen = torch.Generator().manual_seed(10)
    a = -1.0 - 0.1 * torch.rand(2048, generator=gen, dtype=F64)
    exact = torch.exp(mamba.segsum(a))[-8:, -8:]  # near the diagonal: decays over < 8 steps
    stable = torch.exp(mamba.segsum(a.float()))[-8:, -8:]
    naive = torch.exp(mamba.segsum_unstable(a.float()))[-8:, -8:]
    assert_near(stable, exact, 1e-6, "segsum")
    err = ((naive.to(F64) - exact).abs().max() / exact.abs().max()).item()
    assert err > 1e-5, f"the naive segment sum should lose digits here, error {err:.1e}"
    # in float64 the two agree
    torch.testing.assert_close(mamba.segsum(a), mamba.segsum_unstable(a), rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------
# The kernel against the float64 reference (interpreted on CPU, compiled on CUDA)
# --------------------------------------------------------------------------------------

# (batch, length, d, N): lengths 1, 7, 100; d = 20 spans two 16-channel blocks (the
# backward's atomics for dB, dC); N = 3 pads the state to 4.
SHAPES = [(2, 1, 3, 2), (2, 7, 5, 4), (1, 100, 5, 4), (1, 40, 20, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B={},L={},d={},N={}".format(*s))
def test_kernel_matches_reference(device, shape):
    check_kernel(device, shape)


@pytest.mark.parametrize("flags", [k for k in FLAG_SETS if k != "all"], ids=str)
def test_kernel_optional_inputs(device, flags):
    check_kernel(device, (2, 19, 5, 4), seed=1, **FLAG_SETS[flags])


def test_kernel_softplus_without_bias(device):
    check_kernel(device, (1, 19, 5, 4), seed=2, bias=False)


@pytest.mark.parametrize("fwd_chunk", [4, 8])
def test_kernel_many_chunks_and_blocks(device, fwd_chunk):
    # Backward chunks of 4 steps and blocks of 2 channels: the states saved every 4 steps (by a
    # forward stepping in chunks of 4, or of 8 with a save in the middle of each), lambda and
    # the decay a_{t+1} carried across 6 chunks, dB and dC summed over 3 channel blocks.
    check_kernel(device, (2, 23, 5, 4), seed=3, fwd_config=dict(METHOD="steps", CHUNK=fwd_chunk, BLOCK_D=2,
                 NUM_STAGES=1, num_warps=4), bwd_config=dict(CHUNK=4, BLOCK_D=2, NUM_STAGES=1, num_warps=4))  # fmt: skip


@pytest.mark.parametrize("block_d,lanes", [(4, 2), (8, 2), (4, 1)], ids=lambda v: str(v))
def test_kernel_channel_groups(device, block_d, lanes):
    # Backward tiles (CHUNK, DH, N, DL) with DH = block_d / lanes > 1 channel groups per
    # thread: the channel index d = dh DL + dl, the sums over channels split between the
    # two axes; d = 11 leaves padded channels in the last block.
    check_kernel(device, (2, 13, 11, 4), seed=10, bwd_config=dict(CHUNK=4, BLOCK_D=block_d, DL=lanes, NUM_STAGES=1,
                 num_warps=1))  # fmt: skip
    check_kernel(device, (1, 9, 11, 3), seed=11, use_last=False, bwd_config=dict(CHUNK=2, BLOCK_D=block_d, DL=lanes,
                 NUM_STAGES=1, num_warps=1), **FLAG_SETS["bare"])  # fmt: skip


@pytest.mark.parametrize("block_d", [2, 4])
def test_kernel_partial_sums_of_dB_dC(device, block_d):
    # BC_PARTIAL: each channel block stores its share of dB, dC in its own slice (no atomic
    # adds), summed afterwards; 3 and 2 channel blocks over 2 batch elements and 6 chunks.
    check_kernel(device, (2, 23, 5, 4), seed=4, fwd_config=dict(METHOD="steps", CHUNK=4, BLOCK_D=2, NUM_STAGES=1,
                 num_warps=4), bwd_config=dict(CHUNK=4, BLOCK_D=block_d, NUM_STAGES=1, num_warps=4, BC_PARTIAL=True))  # fmt: skip


def test_kernel_chunked_forward(device):
    # The "chunks" forward (tiles combined by an associative scan), with and without grad.
    cfg = dict(METHOD="chunks", CHUNK=8, BLOCK_D=4, NUM_STAGES=1, num_warps=4)
    check_kernel(device, (2, 21, 5, 4), seed=4, fwd_config=cfg)
    x = make_inputs(2, 21, 5, 4, seed=4, device=device, **FLAG_SETS["bare"])
    k = backend.kernels("selective_scan")
    y, last = k.selective_scan(*(x[n] for n in NAMES), return_last_state=True, fwd_config=cfg)
    y_ref, last_ref = mamba.selective_scan_loop(*(None if x[n] is None else x[n].to(F64) for n in NAMES),
                                                return_last_state=True)  # fmt: skip
    assert_near(y, y_ref, 1e-5, "y (no grad)")
    assert_near(last, last_ref, 1e-5, "last_state (no grad)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_precision_inputs(device, dtype):
    # Inputs, y and the activation gradients rounded to 8 (bf16) or 11 (fp16) bits; the scan
    # runs in float32, so errors stay those of a rounding or two (2^-8 = 3.9e-3 each).
    check_kernel(device, (2, 30, 6, 4), dtype=dtype, rel=1e-2, seed=5)


def test_kernel_last_state_unused(device):
    # Only y reaches the loss: the last state's gradient is None inside the backward.
    check_kernel(device, (2, 12, 3, 4), seed=6, use_last=False)


def test_kernel_only_last_state_used(device):
    x = make_inputs(1, 10, 3, 4, seed=7, device=device)
    k = backend.kernels("selective_scan")
    gen = torch.Generator().manual_seed(8)
    g_last = torch.randn(1, 3, 4, generator=gen).to(device)
    leaves = {n: x[n].clone().requires_grad_() for n in NAMES}
    wide = {n: x[n].to(F64).requires_grad_() for n in NAMES}
    _, last = k.selective_scan(*(leaves[n] for n in NAMES), delta_softplus=True, return_last_state=True)
    _, last_ref = mamba.selective_scan_loop(*(wide[n] for n in NAMES), delta_softplus=True, return_last_state=True)
    (last * g_last).sum().backward()
    (last_ref * g_last.to(F64)).sum().backward()
    for n in NAMES:
        if wide[n].grad is None:  # C, D and z act on y only: they cannot reach the last state
            assert n in ("C", "D", "z") and torch.all(leaves[n].grad == 0), f"grad {n}"
            continue
        assert_near(leaves[n].grad, wide[n].grad, 1e-5, f"grad {n}")


def test_kernel_public_entry(device):
    # auto: the kernel on CUDA, the reference on CPU; non-contiguous inputs are accepted;
    # float64 falls back to the reference under auto and is refused by an explicit "triton".
    x = make_inputs(1, 15, 6, 4, seed=9, device=device)
    u_t = x["u"].transpose(1, 2).contiguous().transpose(1, 2)  # same values, (d, length) in memory
    assert not u_t.is_contiguous()
    args = [u_t] + [x[n] for n in NAMES[1:]]
    ref = mamba.selective_scan_loop(*(None if a is None else a.to(F64) for a in args), delta_softplus=True)
    for which in ("auto", "triton"):
        assert_near(mamba.selective_scan(*args, delta_softplus=True, backend=which), ref, 1e-5, f"y ({which})")
    wide = [None if a is None else a.to(F64) for a in args]
    torch.testing.assert_close(mamba.selective_scan(*wide, delta_softplus=True), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="backend='reference'"):
        mamba.selective_scan(*wide, backend="triton")


def test_ladder(device):
    # Rungs 1-3: running sum, moving average, diagonal recurrence, one step per iteration.
    k = backend.kernels("selective_scan")
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 25, 5, generator=gen).to(device)
    torch.testing.assert_close(k.ladder(1, x, block_d=4), torch.cumsum(x, dim=1), rtol=1e-5, atol=1e-5)
    alpha = torch.rand(5, generator=gen).to(device)
    ema, h = [], torch.zeros(2, 5, device=device)
    for t in range(25):
        h = alpha * h + (1 - alpha) * x[:, t]
        ema.append(h)
    torch.testing.assert_close(k.ladder(2, x, alpha, block_d=4), torch.stack(ema, 1), rtol=1e-5, atol=1e-5)
    a = torch.rand(2, 25, 5, generator=gen).to(device)
    from seqbook.scan import linear_recurrence_loop

    torch.testing.assert_close(k.ladder(3, x, a, block_d=4), linear_recurrence_loop(a, x)[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# The SSD forward kernel against the float64 quadratic form
# --------------------------------------------------------------------------------------

# (batch, length, heads, P, groups, N, chunk_size): P and N padded to 16 for tl.dot; a
# length of 1, one not a multiple of the chunk, and several chunks of 16 and 32.
SSD_CASES = [(1, 1, 2, 3, 1, 4, None), (2, 37, 4, 5, 2, 7, 16), (1, 100, 2, 20, 1, 16, 32)]


@pytest.mark.parametrize("case", SSD_CASES, ids=lambda c: "B={},L={},H={},P={},G={},N={},Q={}".format(*c))
def test_ssd_kernel_matches_reference(device, case):
    batch, length, heads, P, groups, N, chunk = case
    x, dt, A, B, C = (t.float().to(device) for t in make_ssd(batch, length, heads, P, groups, N, seed=length))
    s0 = torch.randn(batch, heads, P, N, generator=torch.Generator().manual_seed(1)).to(device)
    y, final = mamba.ssd(x, dt, A, B, C, chunk, initial_state=s0, return_final_state=True, backend="triton")
    wide = [t.to(F64) for t in (x, dt, A, B, C)]
    y_ref, final_ref = mamba.ssd_chunked(*wide, chunk_size=8, initial_state=s0.to(F64), return_final_state=True)
    quad, chunked = mamba.ssd_quadratic(*wide), mamba.ssd_chunked(*wide, chunk_size=8)
    torch.testing.assert_close(quad, chunked, rtol=1e-11, atol=1e-11)
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    assert_near(y, y_ref, 1e-5, "y")
    assert_near(final, final_ref, 1e-5, "final state")
    y0 = mamba.ssd(x, dt, A, B, C, chunk, backend="triton")  # no initial state, no final state
    assert_near(y0, mamba.ssd_quadratic(*wide), 1e-5, "y (zero initial state)")


def test_ssd_kernel_half_precision(device):
    # bfloat16 inputs: the scores times x go through bfloat16 (one rounding of the masked
    # scores, 2^-8), the state stays float32.
    x, dt, A, B, C = (t.to(device=device, dtype=torch.bfloat16) for t in make_ssd(2, 64, 2, 16, 2, 16, seed=3))
    dt, A = dt.float(), A.float()  # as Mamba-2 keeps them
    y, final = mamba.ssd(x, dt, A, B, C, 16, return_final_state=True, backend="triton")
    wide = [t.to(F64) for t in (x, dt, A, B, C)]
    y_ref, final_ref = mamba.ssd_chunked(*wide, chunk_size=16, return_final_state=True)
    assert y.dtype == torch.bfloat16
    assert_near(y, y_ref, 2e-2, "y (bf16)")
    assert_near(final, final_ref, 2e-2, "final state (bf16)")


def test_ssd_public_entry(device):
    x, dt, A, B, C = (t.float().to(device) for t in make_ssd(1, 20, 2, 16, 1, 16, seed=4))
    want = mamba.ssd_quadratic(*(t.to(F64) for t in (x, dt, A, B, C)))
    assert_near(mamba.ssd(x, dt, A, B, C), want, 1e-5, "y (auto)")
    # an input that needs a gradient trains through the kernel's backward ("auto" takes it on CUDA,
    # the reference on a CPU; "triton" takes it everywhere): the float64 gradient either way ...
    x64 = x.to(F64).requires_grad_()
    mamba.ssd_quadratic(x64, *(t.to(F64) for t in (dt, A, B, C))).sum().backward()
    xg = x.clone().requires_grad_()
    for backend in ("auto", "triton"):
        xg.grad = None
        mamba.ssd(xg, dt, A, B, C, backend=backend).sum().backward()
        assert_near(xg.grad, x64.grad, 1e-5, f"dx ({backend})")
    # ... and a chunk the kernel cannot use is refused by an explicit "triton"
    with pytest.raises(ValueError, match="power of two >= 16"):
        mamba.ssd(x, dt, A, B, C, chunk_size=24, backend="triton")
    assert_near(mamba.ssd(x, dt, A, B, C, chunk_size=24), want, 1e-5, "y (chunk 24, reference)")


# --------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# --------------------------------------------------------------------------------------

GOOD = make_inputs(2, 5, 3, 4)


def _with(**changes):
    args = dict(GOOD, **changes)
    return [args[n] for n in NAMES]


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        (_with(u=GOOD["u"][0]), {}, ValueError, r"u must be \(batch, length, d\)"),
        (_with(delta=GOOD["delta"][:, :4]), {}, ValueError, r"delta must be \(batch, length, d\) = \(2, 5, 3\)"),
        (_with(A=GOOD["A"][:2]), {}, ValueError, r"A must be \(d, N\) with d = 3"),
        (_with(B=GOOD["B"][..., :3]), {}, ValueError, r"B must be \(batch, length, N\) = \(2, 5, 4\)"),
        (_with(C=GOOD["C"][:1]), {}, ValueError, r"C must be \(batch, length, N\)"),
        (_with(D=GOOD["D"][:2]), {}, ValueError, r"D must be \(d,\) = \(3,\)"),
        (_with(z=GOOD["z"][..., :2]), {}, ValueError, r"z must be \(batch, length, d\)"),
        (_with(delta_bias=GOOD["delta_bias"][None]), {}, ValueError, r"delta_bias must be \(d,\)"),
        (_with(u=GOOD["u"].int()), {}, TypeError, r"u must be a real floating tensor"),
        (_with(A=GOOD["A"].to(torch.complex64)), {}, TypeError, r"A must be a real floating tensor"),
        (_with(B=GOOD["B"].double()), {}, TypeError, r"B must have the dtype of u"),
        (_with(z=GOOD["z"].half()), {}, TypeError, r"z must have the dtype of u"),
        (_with(C=GOOD["C"].tolist()), {}, TypeError, r"C must be a torch.Tensor"),
        (_with(D=GOOD["D"].to("meta")), {}, ValueError, r"D must be on the device of u"),
        (_with(), {"delta_softplus": 1}, TypeError, r"delta_softplus must be a bool"),
        (_with(), {"backend": "cuda"}, ValueError, r"backend must be one of"),
    ],
    ids=["u-2d", "delta-shape", "A-shape", "B-shape", "C-shape", "D-shape", "z-shape", "bias-shape", "u-int",
         "A-complex", "B-dtype", "z-dtype", "C-list", "D-device", "softplus-int", "backend-name"],  # fmt: skip
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        mamba.selective_scan(*args, **kwargs)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(x=torch.zeros(2, 5, 4)), r"x must be \(batch, length, heads, P\)"),
        (dict(dt=torch.zeros(2, 5, 3)), r"dt must be \(batch, length, heads\) = \(2, 5, 4\)"),
        (dict(A=torch.zeros(2)), r"A must be \(heads,\) = \(4,\)"),
        (dict(B=torch.zeros(2, 5, 3, 6)), r"B must be \(batch, length, groups, N\).*dividing heads = 4"),
        (dict(C=torch.zeros(2, 5, 2, 5)), r"C must have the shape of B"),
        (dict(B=torch.zeros(2, 5, 2, 6, dtype=F64)), r"B must have the dtype of x"),
        (dict(A=torch.zeros(4, dtype=torch.int64)), r"A must be a real floating tensor"),
    ],
    ids=["x-3d", "dt-shape", "A-shape", "B-groups", "C-shape", "B-dtype", "A-int"],
)
def test_ssd_bad_input(change, match):
    args = dict(x=torch.zeros(2, 5, 4, 3), dt=torch.zeros(2, 5, 4), A=torch.zeros(4), B=torch.zeros(2, 5, 2, 6),
                C=torch.zeros(2, 5, 2, 6))  # fmt: skip
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        mamba.ssd_quadratic(**args)


def test_ssd_chunked_bad_arguments():
    x, dt, A, B, C = make_ssd(2, 5, 4, 3, 2, 6)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        mamba.ssd_chunked(x, dt, A, B, C, chunk_size=0)
    with pytest.raises(ValueError, match=r"initial_state must be \(batch, heads, P, N\) = \(2, 4, 3, 6\)"):
        mamba.ssd_chunked(x, dt, A, B, C, initial_state=torch.zeros(2, 4, 3, 5, dtype=F64))
