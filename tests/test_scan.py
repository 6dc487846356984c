"""Tests for seqbook.scan (the diagonal linear recurrence) and its Triton kernel seqbook.kernels.scan.

The readable forms are checked against each other and against closed forms in float64;
the kernel (outputs, final state, and the gradients of a, b and h0) against the float64
loop, through the Triton interpreter on a machine without a GPU and compiled on CUDA
when a GPU is present (the ``device`` fixture of conftest.py). Interpreted sizes stay
small: there the in-tile scan runs element by element in Python.
"""

from __future__ import annotations

import pytest
import torch

from seqbook import backend, scan
from compare import assert_near

F64 = torch.float64
# The readable code runs on every device present; the kernel runs where conftest's `device` says.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_inputs(batch, length, channels, *, seed=0, dtype=torch.float32, device="cpu", h0=True):
    """Random decays with |a| in [0.8, 1] and random signs (so that states carry far and
    errors in the carried state show), standard normal b and h0."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, length, channels)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.2, -1.0, 1.0)
    a = (0.8 + 0.2 * torch.rand(shape, generator=gen)) * sign
    b = torch.randn(shape, generator=gen)
    init = torch.randn(batch, channels, generator=gen) if h0 else None
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
    return cast(a), cast(b), cast(init)


def grads_of(fn, a, b, h0, g, g_last):
    """Outputs and input gradients of ``fn`` for the loss <h, g> + <h_last, g_last>."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (a, b, h0)]
    h, h_last = fn(*leaves)
    loss = (h * g.to(h.dtype)).sum() + (h_last * g_last.to(h.dtype)).sum()
    loss.backward()
    return h.detach(), h_last.detach(), [x.grad if x is not None else None for x in leaves]


# --------------------------------------------------------------------------------------
# The readable forms
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("length", [1, 2, 3, 7, 128, 1000])
def test_parallel_scan_equals_loop(device, length):
    a, b, h0 = make_inputs(3, length, 5, seed=length, dtype=F64, device=device)
    for init in (h0, None):
        h_loop, last_loop = scan.linear_recurrence_loop(a, b, init)
        h_par, last_par = scan.linear_recurrence_parallel(a, b, init)
        torch.testing.assert_close(h_par, h_loop, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(last_par, last_loop, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(last_loop, h_loop[:, -1], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_parallel_scan_gradients_equal_loop(device):
    a, b, h0 = make_inputs(2, 37, 4, seed=1, dtype=F64, device=device)
    gen = torch.Generator().manual_seed(2)
    g, g_last = torch.randn(2, 37, 4, generator=gen, dtype=F64), torch.randn(2, 4, generator=gen, dtype=F64)
    _, _, want = grads_of(scan.linear_recurrence_loop, a, b, h0, g.to(device), g_last.to(device))
    _, _, got = grads_of(scan.linear_recurrence_parallel, a, b, h0, g.to(device), g_last.to(device))
    for name, x, y in zip(("a", "b", "h0"), got, want):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=f"grad {name}")


def test_parallel_scan_gradcheck():
    a, b, h0 = (x.requires_grad_() for x in make_inputs(2, 11, 3, seed=3, dtype=F64))
    assert torch.autograd.gradcheck(lambda *t: scan.linear_recurrence_parallel(*t), (a, b, h0))


def test_closed_forms():
    # a = 1: a running sum; b = 0: a running product of the decays times h0.
    a, b, h0 = make_inputs(2, 50, 3, seed=4, dtype=F64)
    h, h_last = scan.linear_recurrence_parallel(torch.ones_like(a), b, h0)
    torch.testing.assert_close(h, h0[:, None] + torch.cumsum(b, dim=1), rtol=1e-12, atol=1e-12)
    h, _ = scan.linear_recurrence_parallel(a, torch.zeros_like(b), h0)
    torch.testing.assert_close(h, torch.cumprod(a, dim=1) * h0[:, None], rtol=1e-12, atol=1e-15)


def test_complex_states():
    # A diagonal SSM with complex eigenvalues (S4D) runs the same recurrence on complex numbers.
    gen = torch.Generator().manual_seed(5)
    shape = (2, 40, 3)
    a = torch.polar(0.95 * torch.ones(shape, dtype=F64), torch.rand(shape, generator=gen, dtype=F64) * 6)
    b = torch.complex(torch.randn(shape, generator=gen, dtype=F64), torch.randn(shape, generator=gen, dtype=F64))
    h_loop, _ = scan.linear_recurrence_loop(a, b)
    h, _ = scan.linear_recurrence(a, b, backend="reference")
    torch.testing.assert_close(h, h_loop, rtol=1e-12, atol=1e-12)


def test_zero_length():
    a, b, h0 = make_inputs(2, 0, 3)
    h, h_last = scan.linear_recurrence(a, b, h0)
    assert h.shape == (2, 0, 3)
    torch.testing.assert_close(h_last, h0)
    h, h_last = scan.linear_recurrence(a, b)
    assert h.shape == (2, 0, 3) and torch.equal(h_last, torch.zeros(2, 3))


def test_auto_uses_the_reference_on_cpu():
    a, b, h0 = make_inputs(2, 30, 4, seed=6)
    got = scan.linear_recurrence(a, b, h0)
    want = scan.linear_recurrence_parallel(a, b, h0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --------------------------------------------------------------------------------------
# The Triton kernel against the float64 reference (interpreted on CPU, compiled on CUDA)
# --------------------------------------------------------------------------------------

# (batch, length, channels): lengths 1, 7, 128, 1000; channel counts that are not a
# multiple of the block (blocks are powers of 2 of at most 32 channels).
SHAPES = [(2, 1, 3), (2, 7, 5), (1, 128, 40), (1, 1000, 3)]


def check_kernel(device, shape, *, dtype=torch.float32, with_h0=True, segments=None, rel=(2e-6, 2e-6), seed=0):
    """Kernel vs. float64 loop on the same (rounded) inputs: h, h_last, and every gradient."""
    a, b, h0 = make_inputs(*shape, seed=seed, dtype=dtype, device=device, h0=with_h0)
    gen = torch.Generator().manual_seed(seed + 100)
    g = torch.randn(shape, generator=gen).to(device)
    g_last = torch.randn(shape[0], shape[2], generator=gen).to(device)
    kernels = backend.kernels("scan")

    def kernel(*t):
        return kernels.linear_recurrence(*t, segments=segments)

    h, h_last, grads = grads_of(kernel, a, b, h0, g.to(dtype), g_last.to(dtype))
    wide = [None if x is None else x.to(F64) for x in (a, b, h0)]
    # the reference sees the gradients the kernel saw (rounded to the input dtype)
    h_ref, last_ref, grads_ref = grads_of(
        scan.linear_recurrence_loop, *wide, g.to(dtype).to(F64), g_last.to(dtype).to(F64)
    )
    assert h.dtype == dtype and h_last.dtype == dtype
    out_rel, grad_rel = rel
    assert_near(h, h_ref, out_rel, "h")
    assert_near(h_last, last_ref, out_rel, "h_last")
    for name, got, want in zip(("a", "b", "h0"), grads, grads_ref):
        if want is None:
            assert got is None
        else:
            assert got.dtype == dtype
            assert_near(got, want, grad_rel, f"grad {name}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B={},L={},D={}".format(*s))
def test_kernel_matches_reference(device, shape):
    check_kernel(device, shape)


def test_kernel_without_h0(device):
    check_kernel(device, (2, 100, 6), with_h0=False, seed=1)


@pytest.mark.parametrize("shape,segments", [((1, 1000, 3), 3), ((2, 130, 5), 2)])
def test_kernel_time_segments(device, shape, segments):
    # The three-pass path for small grids: per-segment maps, chained, then rescanned.
    check_kernel(device, shape, segments=segments, seed=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_precision_inputs(device, dtype):
    # Inputs and outputs rounded to 8 (bf16) or 11 (fp16) bits; the scan itself runs in
    # float32, so the error is that of one rounding of each output, not L of them.
    check_kernel(device, (2, 100, 6), dtype=dtype, rel=(1e-2, 1e-2), seed=3)


def test_kernel_one_output_used(device):
    # Only h_last, or only h, reaches the loss: the other output's gradient is None.
    a, b, h0 = make_inputs(2, 20, 5, seed=7, device=device)
    kernels = backend.kernels("scan")
    for use in ("h", "h_last"):
        leaves = [x.clone().requires_grad_() for x in (a, b, h0)]
        wide = [x.to(F64).requires_grad_() for x in (a, b, h0)]
        out = kernels.linear_recurrence(*leaves)
        ref = scan.linear_recurrence_loop(*wide)
        pick = 0 if use == "h" else 1
        (out[pick] ** 2).sum().backward()
        (ref[pick] ** 2).sum().backward()
        for name, x, y in zip(("a", "b", "h0"), leaves, wide):
            assert_near(x.grad, y.grad, 2e-6, f"{use}: grad {name}")


def test_kernel_running_sum(device):
    # a = 1 turns the recurrence into a running sum: an answer that needs no reference.
    _, b, h0 = make_inputs(1, 300, 7, seed=8, device=device)
    h, h_last = scan.linear_recurrence(torch.ones_like(b), b, h0, backend="triton")
    want = h0.to(F64)[:, None] + torch.cumsum(b.to(F64), dim=1)
    assert_near(h, want, 1e-6, "h")
    assert_near(h_last, want[:, -1], 1e-6, "h_last")


def test_kernel_accepts_non_contiguous_inputs(device):
    a, b, h0 = make_inputs(1, 20, 6, seed=9, device=device)
    # the same values, laid out (channels, length) in memory: a transposed view
    a_t, b_t = a.transpose(1, 2).contiguous().transpose(1, 2), b.transpose(1, 2).contiguous().transpose(1, 2)
    h0_t = torch.stack([h0, h0], dim=-1)[..., 0]
    assert not a_t.is_contiguous() and not h0_t.is_contiguous()
    h, h_last = scan.linear_recurrence(a_t, b_t, h0_t, backend="triton")
    h_ref, last_ref = scan.linear_recurrence_loop(a.to(F64), b.to(F64), h0.to(F64))
    assert_near(h, h_ref, 2e-6, "h")
    assert_near(h_last, last_ref, 2e-6, "h_last")


def test_auto_backend_by_device(device):
    a, b, h0 = make_inputs(1, 40, 5, seed=10, device=device)
    h, _ = scan.linear_recurrence(a, b, h0)  # auto: the kernel on CUDA, the reference on CPU
    h_ref, _ = scan.linear_recurrence_loop(a.to(F64), b.to(F64), h0.to(F64))
    assert_near(h, h_ref, 2e-6, "h")
    # float64 has no kernel: auto falls back to the reference, an explicit "triton" refuses.
    h64, _ = scan.linear_recurrence(a.to(F64), b.to(F64), h0.to(F64))
    torch.testing.assert_close(h64, h_ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="backend='reference'"):
        scan.linear_recurrence(a.to(F64), b.to(F64), backend="triton")


@pytest.mark.parametrize("key", sorted(backend.kernels("scan").CONFIGS))
def test_time_segments_only_for_small_grids(monkeypatch, key):
    # The rule alone, on a pretend GPU of 132 multiprocessors (no GPU needed).
    kernels = backend.kernels("scan")
    monkeypatch.setattr(kernels, "_multiprocessors", lambda index: 132)
    cuda, cfg = torch.device("cuda", 0), kernels.CONFIGS[key]
    assert kernels.choose_segments(4, 4096, 2048, cfg, cuda) == 1  # enough channel blocks: one pass
    assert kernels.choose_segments(1, 65536, 256, cfg, torch.device("cpu")) == 1  # the interpreter: one pass
    S = kernels.choose_segments(1, 65536, 256, cfg, cuda)
    warps = 256 // cfg["BLOCK_D"] * cfg["num_warps"]
    assert S > 1 and S * warps >= 2 * 132, (S, warps)  # a few channels: enough warps with segments
    assert 65536 // S >= 8 * cfg["CHUNK"], S  # each segment at least 8 tiles long


def test_time_segments_count_warps(monkeypatch):
    # Programs of one warp over 16 channels split time at the same channel counts as
    # programs of four warps over 64: the rule counts warps, not programs.
    kernels = backend.kernels("scan")
    monkeypatch.setattr(kernels, "_multiprocessors", lambda index: 132)
    cuda = torch.device("cuda", 0)
    narrow = dict(CHUNK=32, BLOCK_D=16, NUM_STAGES=4, num_warps=1)
    wide = dict(CHUNK=32, BLOCK_D=64, NUM_STAGES=4, num_warps=4)
    for channels in range(64, 8192 + 1, 64):
        assert kernels.choose_segments(1, 8192, channels, narrow, cuda) == kernels.choose_segments(
            1, 8192, channels, wide, cuda
        ), channels
    assert kernels.choose_segments(1, 8192, 64 * 49, wide, cuda) > 1  # 196 warps: under 1.5 per multiprocessor
    assert kernels.choose_segments(1, 8192, 64 * 50, wide, cuda) == 1  # 200 warps: over

# --------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# --------------------------------------------------------------------------------------

GOOD = make_inputs(2, 5, 3)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((GOOD[0][0], GOOD[1][0]), {}, ValueError, r"a must be \(batch, length, channels\)"),
        ((GOOD[0], GOOD[1][:, :4]), {}, ValueError, r"b must have the shape of a"),
        ((GOOD[0], GOOD[1], GOOD[2][:, :2]), {}, ValueError, r"h0 must be \(batch, channels\) = \(2, 3\)"),
        ((GOOD[0].int(), GOOD[1]), {}, TypeError, r"a must be a floating"),
        ((GOOD[0], GOOD[1].double()), {}, TypeError, r"b must have the dtype of a"),
        ((GOOD[0], GOOD[1], GOOD[2].half()), {}, TypeError, r"h0 must have the dtype of a"),
        ((GOOD[0], GOOD[1].tolist()), {}, TypeError, r"b must be a torch.Tensor"),
        ((GOOD[0], GOOD[1], GOOD[2].to("meta")), {}, ValueError, r"h0 must be on the device of a"),
        ((GOOD[0], GOOD[1]), {"backend": "cuda"}, ValueError, r"backend must be one of"),
    ],
    ids=["a-2d", "b-shape", "h0-shape", "a-int", "b-dtype", "h0-dtype", "b-list", "h0-device", "backend-name"],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        scan.linear_recurrence(*args, **kwargs)
