"""Tests for the Triton Cauchy kernel of S4, seqbook.kernels.cauchy.

k[h, l] = sum_n v[h, n] / (z[l] - w[h, n]), with z shared (L,) or per channel (H, L).
The kernel (output, and the gradients of v, w and z) is checked against a float64
materialized reference written here, whose gradients are torch autograd's (the ground
truth for PyTorch's complex-gradient convention); through the Triton interpreter on a
machine without a GPU and compiled on CUDA when a GPU is present (conftest's ``device``).
Sizes stay small: the interpreter runs every program in Python.
"""

from __future__ import annotations

import math

import pytest
import torch

from seqbook import backend
from compare import assert_near

F64, C64, C128 = torch.float64, torch.complex64, torch.complex128


def cauchy_reference(v, z, w):
    """The readable form, in the inputs' dtype: the (H, N, L) tensor of terms, summed over n."""
    H, L = v.shape[0], z.shape[-1]
    z = z if z.dim() == 2 else z.expand(H, L)
    return (v[:, :, None] / (z[:, None, :] - w[:, :, None])).sum(1)


def randn(shape, gen):
    return torch.randn(shape, generator=gen, dtype=F64)


def rand(shape, gen):
    return torch.rand(shape, generator=gen, dtype=F64)


def crandn(shape, gen):
    return torch.complex(randn(shape, gen), randn(shape, gen))


def make_inputs(H, N, L, *, per_head, geometry="halfplane", seed=0):
    """Random complex inputs (complex64) with |z - w| >= 1/2 everywhere.

    - ``"halfplane"``: as in S4, poles w in the left half-plane (Re w in [-1.5, -0.5],
      spread along the imaginary axis) and points z just right of the axis (Re z in
      [0, 0.5]), so Re(z - w) >= 1/2;
    - ``"disk"``: points z on the unit circle, poles w inside the disk of radius 1/2.
    """
    gen = torch.Generator().manual_seed(seed)
    zshape = (H, L) if per_head else (L,)
    v = crandn((H, N), gen)
    if geometry == "halfplane":
        w = torch.complex(-0.5 - rand((H, N), gen), 4 * randn((H, N), gen))
        z = torch.complex(0.5 * rand(zshape, gen), 4 * randn(zshape, gen))
    else:
        w = torch.polar(0.5 * rand((H, N), gen), 2 * math.pi * rand((H, N), gen))
        z = torch.polar(torch.ones(zshape, dtype=F64), 2 * math.pi * rand(zshape, gen))
    g = crandn((H, L), gen)
    return v.to(C64), z.to(C64), w.to(C64), g.to(C64)


def run(fn, v, z, w, g, grad=(True, True, True)):
    """k = fn(v, z, w) and the gradients of the real loss Re <k, g> = Re sum k conj(g)
    (whose gradient at k is g), for the inputs flagged in ``grad``."""
    leaves = [x.detach().clone().requires_grad_(flag) for x, flag in zip((v, z, w), grad)]
    k = fn(*leaves)
    (k * g.to(k.dtype).conj()).real.sum().backward()
    return k.detach(), [x.grad for x in leaves]


def check_kernel(device, H, N, L, *, per_head, geometry="halfplane", splits=None, seed=0, rel=(5e-6, 5e-6)):
    """Kernel (complex64) vs float64 reference on the same rounded inputs: k and every gradient."""
    v, z, w, g = (x.to(device) for x in make_inputs(H, N, L, per_head=per_head, geometry=geometry, seed=seed))
    kern = backend.kernels("cauchy")
    k, grads = run(lambda *t: kern.cauchy(*t, splits=splits), v, z, w, g)
    k_ref, grads_ref = run(cauchy_reference, v.to(C128), z.to(C128), w.to(C128), g.to(C128))
    assert k.dtype == C64 and k.device.type == torch.device(device).type
    out_rel, grad_rel = rel
    assert_near(k, k_ref, out_rel, "k")
    for name, got, want in zip(("v", "z", "w"), grads, grads_ref):
        assert got.dtype == C64 and got.shape == want.shape
        assert_near(got, want, grad_rel, f"grad {name}")


# --------------------------------------------------------------------------------------
# The gradient convention, in float64 (no kernel): what the backward kernel must compute
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_head", [False, True], ids=["z shared", "z per head"])
def test_gradient_formulas_match_autograd(per_head):
    # PyTorch's complex gradient of a real loss is dL/d(re) + i dL/d(im), which for a
    # holomorphic map is g * conj(dk/dx) summed over what x touches:
    #   grad v = sum_l g conj(1/d),  grad w = conj(v) sum_l g conj(1/d^2),  grad z = -g conj(sum_n v/d^2).
    v, z, w, g = (x.to(C128) for x in make_inputs(2, 5, 9, per_head=per_head, seed=1))
    _, (gv, gz, gw) = run(cauchy_reference, v, z, w, g)
    zb = z if per_head else z.expand(2, 9)
    d = zb[:, None, :] - w[:, :, None]  # (H, N, L)
    torch.testing.assert_close(gv, (g[:, None, :] * (1 / d).conj()).sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, v.conj() * (g[:, None, :] * (1 / d**2).conj()).sum(-1), rtol=1e-12, atol=1e-12)
    dz = -g * (v[:, :, None] / d**2).sum(1).conj()
    torch.testing.assert_close(gz, dz if per_head else dz.sum(0), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# The kernel against the float64 reference (interpreted on CPU, compiled on CUDA)
# --------------------------------------------------------------------------------------

# (H, N, L, z per head, geometry). Blocks (shrunk to the problem): forward 4 modes x 1024
# points, backward 16 modes x 128 points. N = 37 is whole blocks and a part in both;
# L = 300 is two backward tiles and a part, L = 1100 two forward tiles; H = 1; exact
# multiples; a single mode and a single point.
CASES = [
    (1, 1, 1, False, "halfplane"),
    (1, 5, 7, True, "disk"),
    (3, 37, 300, False, "halfplane"),
    (3, 37, 300, True, "disk"),
    (2, 32, 256, True, "halfplane"),
    (2, 64, 100, False, "disk"),
    (2, 9, 1100, True, "halfplane"),
    (1, 20, 2048, False, "disk"),
]


@pytest.mark.parametrize("H,N,L,per_head,geometry", CASES, ids=lambda x: str(x))
def test_kernel_matches_reference(device, H, N, L, per_head, geometry):
    check_kernel(device, H, N, L, per_head=per_head, geometry=geometry, seed=H + N + L)


@pytest.mark.parametrize("per_head", [False, True], ids=["z shared", "z per head"])
def test_kernel_backward_in_splits(device, per_head):
    # The backward's partial sums over ranges of points (used when few channels leave the GPU idle).
    check_kernel(device, 2, 20, 700, per_head=per_head, splits=3, seed=5)


def test_kernel_roots_of_unity_closed_form(device):
    # Poles at the N-th roots of unity, v = 1: the sum is p'(z) / p(z) for p(z) = z^N - 1,
    # i.e. N z^(N-1) / (z^N - 1): an answer that needs no reference. Points on a circle of
    # radius 1.5 keep |z - w| >= 1/2.
    N, L = 24, 50
    w = torch.polar(torch.ones(1, N, dtype=F64), 2 * math.pi * torch.arange(N, dtype=F64) / N)
    z = torch.polar(torch.full((L,), 1.5, dtype=F64), 2 * math.pi * rand(L, torch.Generator().manual_seed(6)))
    want = (N * z ** (N - 1) / (z**N - 1))[None, :]
    v = torch.ones(1, N, dtype=C64, device=device)
    got = backend.kernels("cauchy").cauchy(v, z.to(C64).to(device), w.to(C64).to(device))
    assert_near(got.cpu(), want, 5e-6, "k")


def test_kernel_gradients_only_where_asked(device):
    # S4 passes fixed points z: no gradient for them, and the backward skips their pass.
    v, z, w, g = (x.to(device) for x in make_inputs(2, 9, 40, per_head=False, seed=7))
    kern = backend.kernels("cauchy")
    _, grads_ref = run(cauchy_reference, v.to(C128), z.to(C128), w.to(C128), g.to(C128))
    for flags in [(True, False, False), (False, False, True), (False, True, False)]:
        _, grads = run(kern.cauchy, v, z, w, g, grad=flags)
        for name, flag, got, want in zip(("v", "z", "w"), flags, grads, grads_ref):
            if flag:
                assert_near(got, want, 5e-6, f"grad {name}")
            else:
                assert got is None


def test_kernel_dtypes(device):
    # complex128 in -> complex128 out (float32 accuracy); a real input gets a real gradient.
    v, z, w, g = (x.to(device) for x in make_inputs(2, 6, 20, per_head=True, seed=8))
    kern = backend.kernels("cauchy")
    k, grads = run(kern.cauchy, v.to(C128), z.to(C128), w.to(C128), g.to(C128))
    k_ref, grads_ref = run(cauchy_reference, v.to(C128), z.to(C128), w.to(C128), g.to(C128))
    assert k.dtype == C128 and all(x.dtype == C128 for x in grads)
    assert_near(k, k_ref, 5e-6, "k")
    v_real = v.real.contiguous()
    k, grads = run(kern.cauchy, v_real, z, w, g)
    k_ref, grads_ref = run(cauchy_reference, v_real.to(F64), z.to(C128), w.to(C128), g.to(C128))
    assert k.dtype == C64 and grads[0].dtype == torch.float32
    for name, got, want in zip(("v", "z", "w"), grads, grads_ref):
        assert_near(got, want, 5e-6, f"grad {name} (real v)")


def test_kernel_accepts_views(device):
    # Transposed and conjugated views (conj() is lazy in PyTorch) are resolved and copied.
    v, z, w, g = (x.to(device) for x in make_inputs(3, 10, 30, per_head=True, seed=9))
    v_t = v.t().contiguous().t()
    z_c = z.conj().resolve_conj().conj()  # the same values as z, held as a lazy conjugate
    assert not v_t.is_contiguous() and z_c.is_conj()
    kern = backend.kernels("cauchy")
    assert_near(kern.cauchy(v_t, z_c, w), cauchy_reference(v.to(C128), z.to(C128), w.to(C128)), 5e-6, "k")


def test_kernel_points_at_zero_and_padding(device):
    # S4's points include z = 0 (omega = 1). Padded modes and points must add exactly
    # nothing, without 0 * inf: N = 5 and L = 19 leave padded lanes in every block.
    v, z, w, g = (x.to(device) for x in make_inputs(2, 5, 19, per_head=False, seed=10))
    z[3] = 0
    kern = backend.kernels("cauchy")
    k, grads = run(kern.cauchy, v, z, w, g)
    k_ref, grads_ref = run(cauchy_reference, v.to(C128), z.to(C128), w.to(C128), g.to(C128))
    assert_near(k, k_ref, 5e-6, "k")
    for name, got, want in zip(("v", "z", "w"), grads, grads_ref):
        assert_near(got, want, 5e-6, f"grad {name}")


def test_kernel_empty_sizes(device):
    kern = backend.kernels("cauchy")
    v, z, w, _ = (x.to(device) for x in make_inputs(2, 3, 4, per_head=False))
    k = kern.cauchy(v[:, :0], z, w[:, :0])  # no modes: the empty sum
    assert k.shape == (2, 4) and torch.equal(k, torch.zeros_like(k))
    assert kern.cauchy(v, z[:0], w).shape == (2, 0)
