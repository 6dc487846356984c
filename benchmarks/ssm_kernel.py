r"""Benchmark: the diagonal SSM convolution kernel (``seqbook.ssm.s4d_kernel``), chapter 2.

Ops (rows in the results schema of ``shared/GPU.md``):

- ``ssm_kernel.fwd``: ``K = s4d_kernel(A, B, C, step, L)``, ZOH, complex64 parameters;
- ``ssm_kernel.fwdbwd``: the same, then ``K.backward(dK)`` into ``A, B, C, step``.

- ``vandermonde.fwd`` / ``vandermonde.fwdbwd``: the O(HNL) core alone,
  ``seqbook.ssm.vandermonde_kernel(W, log_A_bar, L)``, from ``W = C * B_bar`` and
  ``log_A_bar = step * A``: the same work without the O(HN) discretization, whose dozen
  small PyTorch launches are most of the gap between the two ops' eager times.

Shape: ``H=1024, N=64, L=16384`` (the target).

Impls: ``seqbook.triton`` (the fused kernel, :mod:`seqbook.kernels.ssm_kernel`), timed
as CUDA-graph replays like every ``seqbook.triton`` row (the suite records the eager
times beside them), and ``seqbook.reference`` (the readable form: materializes the
``(H, N, L)`` complex tensor ``exp(l * step * A)``, 8.6 GB at the target shape, then one
einsum), timed eagerly: its launches take milliseconds each, and a graph would hold a
second copy of its memory. Both go through the public entries, with the same
discretization code in front. (The first results, ``results/2026-11-24-h100-ssm_kernel.json``,
came from this module's earlier standalone form and timed the kernel eagerly too.)

What is counted (the floor)
---------------------------
By definition each ``(h, n, l)`` costs one complex exponential
:math:`e^{l\Lambda_{h,n}}` and one complex multiply-add of which only the real part
is kept. The fused kernel factors the exponential (``l = l0 + a S + b``), evaluating
only ``H N L (S_A + S_B) / (S_A S_B)`` of them (1/32 of ``H N L`` at the target
shape), so the exponentials are not its floor. The work it cannot avoid is the
multiply-adds:

- forward: ``Re(U Y)`` = 2 real FMAs = **4 FLOP per (h, n, l)**;
- backward: ``G_l conj(E_l)`` and ``l G_l conj(E_l)``, each a real times a complex
  = 2 FMAs: **8 FLOP per (h, n, l)**; fwd+bwd = 12.

The floor is those FLOPs at the GPU's fp32 (non-tensor-core) FMA rate, measured in
the same run as an fp32 matrix product with TF32 off (``fp32_mm_TFLOPs``): the kernel
uses ``tl.dot(..., input_precision="ieee")``, i.e. fp32 FMAs. Bytes (``K`` written,
``dK`` read: 64 MiB each at the target shape) are 20x below that.

``python -m benchmarks.run --ops ssm_kernel vandermonde [--sweep]`` (or
``python -m benchmarks.ssm_kernel [--sweep]``, the same): checks the kernel against the
float64 reference on the GPU first (output and every gradient), then times; ``--sweep``
also times the two kernels alone over block sizes and warps, to choose ``fwd_config`` /
``bwd_config`` in :mod:`seqbook.kernels.ssm_kernel`.
"""

from __future__ import annotations

import functools
import math
import sys

import torch

from seqbook import ssm
from seqbook.backend import kernels

from .suite import Impl, Op, register, register_check, register_sweep, relative_error, time_ms

TARGET = dict(H=1024, N=64, L=16384, target=True)
SHAPES = [TARGET]
FLOP_PER_HNL = {"fwd": 4, "fwdbwd": 12}


def shape_name(s: dict) -> str:
    return f"H={s['H']},N={s['N']},L={s['L']},complex64,zoh"


def make_params(H: int, N: int, device, seed: int = 0, dtype=torch.complex64):
    """S4D-Lin initialization (Gu et al. 2022, S4D Sec. 4) with noise: A = -1/2 + i pi n,
    B = 1 + noise, C ~ N(0, 1/2) complex, step log-uniform in [1e-3, 1e-1]."""
    gen = torch.Generator().manual_seed(seed)
    n = torch.arange(N, dtype=torch.float64)
    A = torch.complex(-0.5 + 0.1 * torch.randn(H, N, generator=gen, dtype=torch.float64),
                      math.pi * n + 0.1 * torch.randn(H, N, generator=gen, dtype=torch.float64))
    B = torch.complex(1 + 0.1 * torch.randn(H, N, generator=gen, dtype=torch.float64),
                      0.1 * torch.randn(H, N, generator=gen, dtype=torch.float64))
    C = torch.complex(torch.randn(H, N, generator=gen, dtype=torch.float64),
                      torch.randn(H, N, generator=gen, dtype=torch.float64)) / math.sqrt(2)
    step = torch.exp(torch.empty(H, dtype=torch.float64).uniform_(math.log(1e-3), math.log(1e-1), generator=gen))
    return [A.to(device, dtype), B.to(device, dtype), C.to(device, dtype), step.to(device, dtype.to_real())]  # fmt: skip


def _prelude(params):
    """W = C * B_bar and log A_bar = step * A (ZOH), as s4d_kernel forms them: the inputs of the core op."""
    A, B, C, step = (p.detach() for p in params)
    _, B_bar = ssm.discretize(A, B, step, "zoh", diagonal=True)
    return [(C * B_bar).contiguous(), (step[:, None] * A).contiguous()]


def make_inputs(shape: dict, device: str, seed: int, entry: str = "ssm_kernel", grad: bool = False) -> dict:
    """The parameters (``ssm_kernel``) or ``W, log_A_bar`` (``vandermonde``) under ``"args"``;
    for fwd+bwd they require grad, and ``dK`` is a standard normal output gradient."""
    params = make_params(shape["H"], shape["N"], device, seed=seed)
    args = params if entry == "ssm_kernel" else _prelude(params)
    inputs = dict(args=args)
    if grad:
        for x in args:
            x.requires_grad_()
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        inputs["dK"] = torch.randn(shape["H"], shape["L"], generator=gen, device=device)
        inputs["grads"] = args
    return inputs


def _bytes(s: dict, entry: str, backward: bool) -> int:
    """complex64 parameters (8 bytes) read, float32 K (4 bytes) written; backward also dK read
    and a gradient written per parameter."""
    H, N, L = s["H"], s["N"], s["L"]
    params = 3 * H * N * 8 + H * 4 if entry == "ssm_kernel" else 2 * H * N * 8
    once = params + H * L * 4
    return once * (2 if backward else 1)


def _flops(s: dict, direction: str) -> int:
    return FLOP_PER_HNL[direction] * s["H"] * s["N"] * s["L"]


def _call(entry: str, backend: str):
    fn = ssm.s4d_kernel if entry == "ssm_kernel" else ssm.vandermonde_kernel
    return functools.partial(fn, backend=backend)


def _forward(entry: str, backend: str):
    def build(shape, inputs):
        fn = _call(entry, backend)

        def run():
            with torch.no_grad():
                fn(*inputs["args"], shape["L"])

        return run

    return build


def _forward_backward(entry: str, backend: str):
    def build(shape, inputs):
        fn = _call(entry, backend)

        def run():
            fn(*inputs["args"], shape["L"]).backward(inputs["dK"])

        return run

    return build


for _entry in ("ssm_kernel", "vandermonde"):
    for _direction, _wrap in (("fwd", _forward), ("fwdbwd", _forward_backward)):
        register(Op(
            f"{_entry}.{_direction}", SHAPES, shape_name,
            functools.partial(make_inputs, entry=_entry, grad=_direction == "fwdbwd"),
            functools.partial(_bytes, entry=_entry, backward=_direction == "fwdbwd"),
            [Impl("seqbook.triton", _wrap(_entry, "triton"), graph=True),
             Impl("seqbook.reference", _wrap(_entry, "reference"))],
            flops=functools.partial(_flops, direction=_direction), flops_ceiling="fp32_mm_TFLOPs",
        ))  # fmt: skip


# --------------------------------------------------------------------------------------
# Correctness on the GPU, before timing
# --------------------------------------------------------------------------------------


def _judged(errors: dict) -> dict:
    """The checks past float32-level error (relative to the largest entry): 1e-5 for K, 1e-4 for gradients."""
    failures = []
    for what, err in errors.items():
        limit = 1e-5 if what.startswith("K") else 1e-4
        if not err < limit:  # NaN fails too
            failures.append(f"{what} relative error {err:.2e} >= {limit:.0e}")
    return {"errors": errors, "failures": failures}


def _wide(p: torch.Tensor) -> torch.Tensor:
    return p.detach().to(torch.complex128 if p.is_complex() else torch.float64).requires_grad_()


def check(device="cuda", H=128, N=64, L=16384, chunk=32) -> dict:
    """The fused kernel against the float64 reference on this device, through ``s4d_kernel``:
    K at the full target shape (reference computed in chunks of channels to bound memory),
    K and all gradients (A, B, C, step) at ``H`` channels."""
    errors = {}
    params = make_params(TARGET["H"], TARGET["N"], device)
    Lf = TARGET["L"]
    K = ssm.s4d_kernel(*params, Lf, backend="triton")
    worst = 0.0
    for h0 in range(0, params[0].shape[0], chunk):
        sl = [p[h0 : h0 + chunk].to(torch.complex128 if p.is_complex() else torch.float64) for p in params]
        worst = max(worst, relative_error(K[h0 : h0 + chunk], ssm.s4d_kernel(*sl, Lf, backend="reference")))
    errors["K_full_shape"] = worst
    del params, K
    torch.cuda.empty_cache()

    params = [p.requires_grad_() for p in make_params(H, N, device, seed=1)]
    ref = [_wide(p) for p in params]
    dK = torch.randn(H, L, device=device, dtype=torch.float64)
    K = ssm.s4d_kernel(*params, L, backend="triton")
    K_ref = ssm.s4d_kernel(*ref, L, backend="reference")
    errors["K"] = relative_error(K, K_ref)
    (K * dK.float()).sum().backward()
    (K_ref * dK).sum().backward()
    for name, p, r in zip(("A", "B", "C", "step"), params, ref):
        errors[f"grad_{name}"] = relative_error(p.grad, r.grad)
    return _judged(errors)


def check_core(device="cuda", H=128, N=64, L=16384) -> dict:
    """``vandermonde_kernel`` alone against its float64 reference: K and the gradients of W, log_A_bar."""
    args = [p.requires_grad_() for p in _prelude(make_params(H, N, device, seed=2))]
    ref = [_wide(p) for p in args]
    dK = torch.randn(H, L, device=device, dtype=torch.float64)
    K = ssm.vandermonde_kernel(*args, L, backend="triton")
    K_ref = ssm.vandermonde_kernel(*ref, L, backend="reference")
    errors = {"K": relative_error(K, K_ref)}
    (K * dK.float()).sum().backward()
    (K_ref * dK).sum().backward()
    for name, p, r in zip(("W", "log_A_bar"), args, ref):
        errors[f"grad_{name}"] = relative_error(p.grad, r.grad)
    return _judged(errors)


register_check("ssm_kernel", check)
register_check("vandermonde", check_core)


# --------------------------------------------------------------------------------------
# Kernel configurations (to choose fwd_config / bwd_config in seqbook.kernels.ssm_kernel)
# --------------------------------------------------------------------------------------

# (BLOCK_N, S_A, S_B, num_warps) tried by sweep(): the defaults and their neighbours.
SWEEP_FWD = [(16, 64, 64, 8), (16, 64, 64, 4), (16, 128, 32, 8), (16, 32, 128, 8), (32, 64, 64, 8), (16, 32, 32, 4)]
SWEEP_BWD = [(16, 32, 32, 4), (16, 32, 32, 8), (16, 64, 16, 4), (16, 16, 64, 4), (32, 32, 16, 4), (16, 64, 64, 8)]


def sweep(device="cuda", H=1024, N=64, L=16384) -> list[dict]:
    """Time the forward and backward Triton kernels alone over block sizes and warps."""
    import triton

    k = kernels("ssm_kernel")
    W, lam = _prelude(make_params(H, N, device, seed=3))
    w, lm = k._as_real_pairs(W), k._as_real_pairs(lam)
    K = torch.empty(H, L, device=device)
    dK = torch.randn(H, L, device=device)
    dw, dlm = torch.empty_like(w), torch.empty_like(lm)
    found = []
    for kind, configs in (("fwd", SWEEP_FWD), ("bwd", SWEEP_BWD)):
        for block_n, s_a, s_b, warps in configs:
            cfg = dict(BLOCK_N=block_n, S_A=s_a, S_B=s_b, num_warps=warps)
            if kind == "fwd":
                grid = (H, triton.cdiv(L, s_a * s_b))
                fn = lambda: k._vandermonde_fwd[grid](w, lm, K, N, L, **cfg)  # noqa: E731
            else:
                grid = (H, triton.cdiv(N, block_n))
                fn = lambda: k._vandermonde_bwd[grid](w, lm, dK, dw, dlm, N, L, **cfg)  # noqa: E731
            try:
                ms = time_ms(fn, warmup=10, rep=50)
            except Exception as e:  # e.g. out of shared memory for a large tile
                ms = float("nan")
                print("sweep", kind, cfg, "failed:", type(e).__name__, str(e)[:120], flush=True)
            found.append(dict(cfg, kernel=kind, ms=round(ms, 4)))
            print("sweep", found[-1], flush=True)
    return found


register_sweep("ssm_kernel", sweep)


if __name__ == "__main__":
    from . import run

    sys.exit(run.main(["--ops", "ssm_kernel", "vandermonde", *sys.argv[1:]]))
