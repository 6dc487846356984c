r"""Benchmark: the diagonal SSM convolution kernel (``seqbook.ssm.s4d_kernel``), chapter 2.

Ops (rows in the results schema of ``shared/GPU.md``):

- ``ssm_kernel.fwd``: ``K = s4d_kernel(A, B, C, step, L)``, ZOH, complex64 parameters;
- ``ssm_kernel.fwdbwd``: the same, then ``K.backward(dK)`` into ``A, B, C, step``.

- ``vandermonde.fwd`` / ``vandermonde.fwdbwd``: the O(HNL) core alone,
  ``seqbook.ssm.vandermonde_kernel(W, log_A_bar, L)``, from ``W = C * B_bar`` and
  ``log_A_bar = step * A``: the same work without the O(HN) discretization, whose dozen
  small PyTorch launches are most of the gap between the two ops' times.

Impls: ``seqbook.triton`` (the fused kernel, :mod:`seqbook.kernels.ssm_kernel`) and
``seqbook.reference`` (the readable form: materializes the ``(H, N, L)`` complex
tensor ``exp(l * step * A)``, 8.6 GB at the target shape, then one einsum). Both go
through the public entries, with the same discretization code in front.

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

Run on a CUDA machine: ``python -m benchmarks.ssm_kernel [--out DIR] [--sweep]``. It
checks the kernel against the float64 reference on the GPU first (output and every
gradient), then times, prints a table, and writes ``<DIR>/<date>-<gpu>-ssm_kernel.json``
(the rows, plus the check's errors, the fp32 ceiling measured, and with ``--sweep`` the
kernels' times over block sizes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys

import torch

from seqbook import ssm

OP = "ssm_kernel"
SHAPES = [dict(H=1024, N=64, L=16384)]
FLOP_PER_HNL = {"fwd": 4, "fwdbwd": 12}
IMPLS = {"seqbook.triton": "triton", "seqbook.reference": "reference"}


def shape_name(H: int, N: int, L: int) -> str:
    return f"H={H},N={N},L={L},complex64,zoh"


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
    return [A.to(device, dtype), B.to(device, dtype), C.to(device, dtype), step.to(device, dtype.to_real())]


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.to(want.dtype) - want).abs().max() / want.abs().max()).item()


def check(device="cuda", H=128, N=64, L=16384, chunk=32) -> dict:
    """The fused kernel against the float64 reference on this device: K at the full target
    shape (reference computed in chunks of channels to bound memory), K and all gradients at
    ``H`` channels. Returns the relative errors; :func:`failures` judges them."""
    errors = {}
    params = make_params(SHAPES[0]["H"], SHAPES[0]["N"], device)
    Lf = SHAPES[0]["L"]
    K = ssm.s4d_kernel(*params, Lf, backend="triton")
    worst = 0.0
    for h0 in range(0, params[0].shape[0], chunk):
        sl = [p[h0 : h0 + chunk].to(torch.complex128 if p.is_complex() else torch.float64) for p in params]
        K_ref = ssm.s4d_kernel(*sl, Lf, backend="reference")
        worst = max(worst, _rel_err(K[h0 : h0 + chunk], K_ref))
    errors["K_full_shape"] = worst

    params = [p.requires_grad_() for p in make_params(H, N, device, seed=1)]
    ref = [p.detach().to(torch.complex128 if p.is_complex() else torch.float64).requires_grad_() for p in params]
    dK = torch.randn(H, L, device=device, dtype=torch.float64)
    K = ssm.s4d_kernel(*params, L, backend="triton")
    K_ref = ssm.s4d_kernel(*ref, L, backend="reference")
    errors["K"] = _rel_err(K, K_ref)
    (K * dK.float()).sum().backward()
    (K_ref * dK).sum().backward()
    for name, p, r in zip(("A", "B", "C", "step"), params, ref):
        errors[f"grad_{name}"] = _rel_err(p.grad, r.grad)
    return errors


def failures(errors: dict) -> list[str]:
    """The checks past float32-level error (relative to the largest entry): 1e-5 for K, 1e-4 for gradients."""
    bad = []
    for what, err in errors.items():
        limit = 1e-5 if what.startswith("K") else 1e-4
        if not err < limit:
            bad.append(f"{what} relative error {err:.2e} >= {limit:.0e}")
    return bad


def fp32_fma_tflops(device="cuda", n=8192) -> float:
    """The fp32 FMA ceiling, measured: an n^3 fp32 matrix product with TF32 off (cuBLAS SGEMM)."""
    from triton.testing import do_bench

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a, b = (torch.randn(n, n, device=device) for _ in range(2))
        ms = do_bench(lambda: a @ b, warmup=50, rep=300)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _prelude(params, L):
    """W = C * B_bar and log A_bar = step * A (ZOH), as s4d_kernel forms them: the inputs of the core op."""
    A, B, C, step = (p.detach() for p in params)
    _, B_bar = ssm.discretize(A, B, step, "zoh", diagonal=True)
    return [(C * B_bar).contiguous(), (step[:, None] * A).contiguous()]


def _bench_fn(entry: str, backend: str, inputs: list, L: int, dK):
    """A closure for do_bench: the forward (no graph) when ``dK`` is None, else forward + backward."""
    call = ssm.s4d_kernel if entry == "ssm_kernel" else ssm.vandermonde_kernel

    if dK is None:
        def fn():
            with torch.no_grad():
                call(*inputs, L, backend=backend)
    else:
        def fn():
            call(*inputs, L, backend=backend).backward(dK)
    return fn


def rows(ceilings: dict, device="cuda", shapes=SHAPES) -> list[dict]:
    """Time every (op, impl, shape); one row each in the results schema.

    ``ssm_kernel.*`` times the public entry (discretization + kernel); ``vandermonde.*``
    the O(HNL) core alone, from ``W`` and ``log A_bar``.
    """
    from triton.testing import do_bench

    out = []
    for shp in shapes:
        H, N, L = shp["H"], shp["N"], shp["L"]
        for entry in ("ssm_kernel", "vandermonde"):
            for direction in ("fwd", "fwdbwd"):
                for impl, backend in IMPLS.items():
                    params = make_params(H, N, device, seed=2)
                    inputs = params if entry == "ssm_kernel" else _prelude(params, L)
                    dK = None
                    if direction == "fwdbwd":
                        inputs = [x.requires_grad_() for x in inputs]
                        dK = torch.randn(H, L, device=device)
                    fn = _bench_fn(entry, backend, inputs, L, dK)
                    torch.cuda.synchronize()
                    ms = do_bench(fn, warmup=25, rep=200 if backend == "triton" else 100,
                                  grad_to_none=inputs if dK is not None else None)
                    flops = FLOP_PER_HNL[direction] * H * N * L
                    floor_ms = flops / (ceilings["fp32_mm_TFLOPs"] * 1e12) * 1e3
                    out.append(dict(op=f"{entry}.{direction}", impl=impl, shape=shape_name(H, N, L),
                                    ms=round(ms, 4), tflops=round(flops / (ms * 1e-3) / 1e12, 3), tbps=None,
                                    floor_fraction=round(floor_ms / ms, 4)))
                    print(out[-1], flush=True)
                    del params, inputs, fn, dK
                    torch.cuda.empty_cache()
    return out


# (BLOCK_N, S_A, S_B, num_warps) tried by sweep(): the defaults and their neighbours.
SWEEP_FWD = [(16, 64, 64, 8), (16, 64, 64, 4), (16, 128, 32, 8), (16, 32, 128, 8), (32, 64, 64, 8), (16, 32, 32, 4)]
SWEEP_BWD = [(16, 32, 32, 4), (16, 32, 32, 8), (16, 64, 16, 4), (16, 16, 64, 4), (32, 32, 16, 4), (16, 64, 64, 8)]


def sweep(device="cuda", H=1024, N=64, L=16384) -> list[dict]:
    """Time the forward and backward Triton kernels alone over block sizes and warps, to choose
    ``fwd_config`` / ``bwd_config`` in :mod:`seqbook.kernels.ssm_kernel` (kept in the JSON under "sweep")."""
    import triton
    from triton.testing import do_bench

    from seqbook.backend import kernels

    k = kernels("ssm_kernel")
    W, lam = _prelude(make_params(H, N, device, seed=3), L)
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
                ms = do_bench(fn, warmup=10, rep=50)
            except Exception as e:  # e.g. out of shared memory for a large tile
                ms = float("nan")
                print("sweep", kind, cfg, "failed:", type(e).__name__, str(e)[:120])
            found.append(dict(cfg, kernel=kind, ms=round(ms, 4)))
            print("sweep", found[-1], flush=True)
    return found


def _table(rows_: list[dict]) -> str:
    lines = [f"{'op':<22} {'impl':<18} {'ms':>9} {'TFLOP/s':>8} {'floor':>6} {'x ref':>6}"]
    ref = {(r["op"], r["shape"]): r["ms"] for r in rows_ if r["impl"] == "seqbook.reference"}
    for r in rows_:
        speedup = ref.get((r["op"], r["shape"]), float("nan")) / r["ms"]
        lines.append(f"{r['op']:<22} {r['impl']:<18} {r['ms']:>9.3f} {r['tflops']:>8.2f} "
                     f"{r['floor_fraction']:>6.1%} {speedup:>6.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="folder for the JSON")
    parser.add_argument("--sweep", action="store_true", help="also time the kernels over block sizes")
    parser.add_argument("--commit", default=None, help="git sha of the code measured (default: git rev-parse HEAD)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.ssm_kernel needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    errors = check()
    bad = failures(errors)
    print("check against float64:", ", ".join(f"{k} {v:.1e}" for k, v in errors.items()), "FAILED" if bad else "ok")
    for line in bad:  # timed anyway, and marked in the JSON: a wrong kernel's speed is still worth seeing
        print("  FAILED:", line)
    ceilings = {"copy_TBps": 3.0, "bf16_mm_TFLOPs": 747, "fp32_mm_TFLOPs": round(fp32_fma_tflops(), 1)}
    print("ceilings:", ceilings, flush=True)
    result_rows = rows(ceilings)
    swept = sweep() if args.sweep else None
    commit = args.commit
    if commit is None:
        try:
            git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
            commit = git.stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    name = torch.cuda.get_device_name()
    result = {"device": name, "date": datetime.date.today().isoformat(), "commit": commit,
              "torch": torch.__version__, "triton": triton.__version__, "ceilings": ceilings,
              "check": {"errors": errors, "failures": bad}, "rows": result_rows}
    if swept is not None:
        result["sweep"] = swept
    os.makedirs(args.out, exist_ok=True)
    gpu = name.replace("NVIDIA ", "").split()[0].lower()
    path = os.path.join(args.out, f"{result['date']}-{gpu}-{OP}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(_table(result_rows))
    print("wrote", path)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
