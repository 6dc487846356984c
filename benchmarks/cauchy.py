r"""Benchmark: the Cauchy kernel of S4, ``k[h, l] = sum_n v[h, n] / (z[l] - w[h, n])`` (``seqbook.s4.cauchy``).

Ops (rows in the results schema of shared/GPU.md):

- ``cauchy.fwd``: ``k = cauchy(v, z, w)``, no autograd graph;
- ``cauchy.fwdbwd``: the same with ``v, z, w`` requiring grad, then ``k.backward(g)``.
  ``z`` requires grad as in S4's training, where the points
  ``(2 / step) (1 - omega) / (1 + omega)`` move with the learned step.

Shapes: ``H=1024, N=64``, complex64, ``z`` per channel ``(H, L)`` as S4 calls it, at
``L = 1024 ... 65536`` (the target is ``L = 16384``); at the target also ``z`` shared
``(L,)``; and a small grid, ``H=64`` (the backward cuts ``L`` into splits to fill the GPU).
Inputs as in S4: poles ``w`` in the left half-plane (``Re w`` in ``[-1, -0.5]``, ``Im w``
near ``pi n``), points ``z`` on the imaginary axis, so ``|z - w| >= 1/2``.

Implementations, both through the public entry :func:`seqbook.s4.cauchy`:

- ``seqbook.triton``: :mod:`seqbook.kernels.cauchy`, timed as CUDA-graph replays;
- ``seqbook.reference``: the materialized form, the ``(H, N, L)`` complex tensor
  ``v / (z - w)`` (8.6 GB at the target) summed over ``n``, timed eagerly (each of its
  few launches takes milliseconds; capturing it in a graph would also hold a second
  copy of its memory). Up to ``L = 16384``: at 65536 one such tensor is 34 GB and the
  backward needs several.

What is counted (the floor)
---------------------------
Each term ``(h, n, l)`` is one complex division and one complex addition, and the
fewest float32 instructions for it are (:mod:`seqbook.kernels.cauchy`):

- forward, ``v / d`` with ``d = z - w``: 2 subtractions (``d``), a multiply and an
  FMA (``|d|^2``), a reciprocal, 2 multiplies (``e = conj(d) / |d|^2``), 4 FMAs
  (``acc += v e``): **10 FMA-pipe instructions and 1 reciprocal**;
- backward for ``v`` and ``w``: ``d``, ``|d|^2``, ``s = d / |d|^2`` as above (6), ``u = g s``
  (2 multiplies, 2 FMAs), ``sum u`` (2 adds), ``sum u s`` (4 FMAs): **16 and 1**;
- backward for ``z``: the forward with ``e`` squared (4 more): **14 and 1**.

The reciprocal runs on the special-function unit, beside the FMA pipe, at 1/8 of its
rate on an H100 (16 against 128 lanes per SM and clock): one per 10 or more FMA-pipe
instructions does not bind. So the floor is the FMA pipe's issue time. We count every
FMA-pipe instruction as 2 FLOPs, an FMA's worth (a subtraction occupies the pipe as
long as an FMA does), and hold the count to the fp32 FMA rate, measured in the same run
as an fp32 matrix product with TF32 off (``fp32_mm_TFLOPs``): **20 FLOPs per term
forward, 80 forward and backward** (10 + 16 + 14 instructions). ``tflops`` in the rows
is in these units. At the target that is 21.5 and 85.9 GFLOP: 0.41 ms and 1.65 ms at the
52 TFLOP/s measured on the H100 (benchmarks/results/2026-11-24-h100-ssm_kernel.json).
Bytes (``v, w, z`` read, ``k`` written; ``g`` read and the four gradients written
backward) are 268 MB forward, 0.09 ms at 3.0 TB/s: not the bound.

What the compiled loops issue (SASS of Triton 3.9 for sm_90, compiled without a GPU;
the H100's Triton 3.6 may differ): forward 10.0 FP32 instructions per term, exactly the
count above, and 12.7 in all (the reciprocal, loads and address arithmetic); backward
16.0 and 18.2; 140 and 127 registers, no spills. Every instruction takes an issue slot,
so the forward cannot quite reach the FMA pipe's peak; on the other hand the measured
SGEMM rate is itself below that peak (52 of about 67 TFLOP/s on the H100 SXM), so a
fraction near 100% is possible but not expected: 70-85% would be good.

The reference moves the ``(H, N, L)`` tensor about four times forward (``z - w``
written, read and the quotient written, read by the sum): about 34 GB, some 11 ms at
3.0 TB/s, so 10x the kernel needs the kernel within about 2.5x of its floor.

``python -m benchmarks.run --ops cauchy [--sweep]``; the sweep times the kernels alone
over block sizes and warps, to choose ``CONFIGS`` in :mod:`seqbook.kernels.cauchy`, and
the backward's number of splits at the small grid.
"""

from __future__ import annotations

import functools
import math

import torch

from seqbook.backend import kernels

from .suite import Impl, Op, kernel_info, register, register_check, register_sweep, relative_error, time_ms

TARGET = dict(H=1024, N=64, L=16384, z="per-head", target=True)
LENGTHS = [1024, 4096, 16384, 65536]
SMALL_GRID = dict(H=64, N=64, L=16384, z="per-head")  # 64 x 4 backward programs: fewer than 2 per SM
SHAPES = [dict(TARGET, L=L, target=L == TARGET["L"]) for L in LENGTHS] + [dict(TARGET, z="shared"), SMALL_GRID]
REFERENCE_MAX_L = 16384

#: FMA-pipe instructions per term (h, n, l), by pass; see the module docstring.
INSTRUCTIONS = {"fwd": 10, "bwd_vw": 16, "bwd_z": 14}


def shape_name(s: dict) -> str:
    z = "z=(H,L)" if s["z"] == "per-head" else "z=(L,)"
    return f"H={s['H']},N={s['N']},L={s['L']},complex64,{z}"


def _complex(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    return torch.complex(re, im).to(torch.complex64)


def make_inputs(shape: dict, device: str, seed: int, grad: bool = False) -> dict:
    """S4-like inputs (module docstring): v complex normal, w = -(0.5 + U/2) + i (pi n + noise),
    z = i y with y uniform over the poles' imaginary range; g complex normal for fwd+bwd."""
    H, N, L = shape["H"], shape["N"], shape["L"]
    gen = torch.Generator(device=device).manual_seed(seed)
    f32 = dict(generator=gen, device=device)
    n = torch.arange(N, device=device, dtype=torch.float32)
    v = _complex(torch.randn(H, N, **f32), torch.randn(H, N, **f32)) / math.sqrt(2)
    w = _complex(-0.5 - 0.5 * torch.rand(H, N, **f32), math.pi * n + 0.1 * torch.randn(H, N, **f32))
    zshape = (H, L) if shape["z"] == "per-head" else (L,)
    y = (torch.rand(zshape, **f32) * 2 - 1) * math.pi * N
    z = _complex(torch.zeros_like(y), y)
    inputs = dict(v=v, z=z, w=w)
    if grad:
        for x in (v, z, w):
            x.requires_grad_()
        inputs["g"] = _complex(torch.randn(H, L, **f32), torch.randn(H, L, **f32))
        inputs["grads"] = [v, z, w]
    return inputs


def _terms(s: dict) -> int:
    return s["H"] * s["N"] * s["L"]


def _bytes(s: dict, backward: bool) -> int:
    """complex64 (8 bytes): v, w, z read and k written; backward also g read and dv, dw, dz written."""
    H, N, L = s["H"], s["N"], s["L"]
    z = H * L if s["z"] == "per-head" else L
    once = 2 * H * N + z + H * L
    return 8 * once * (2 if backward else 1)


def _flops(s: dict, backward: bool) -> int:
    """2 FLOPs per FMA-pipe instruction (module docstring): 20 per term forward, 80 with the backward."""
    per_term = INSTRUCTIONS["fwd"] + (INSTRUCTIONS["bwd_vw"] + INSTRUCTIONS["bwd_z"] if backward else 0)
    return 2 * per_term * _terms(s)


def _entry(backend: str):
    """``seqbook.s4.cauchy`` with this backend (imported on first use)."""
    from seqbook import s4

    return functools.partial(s4.cauchy, backend=backend)


def _forward(backend: str):
    def build(shape, inputs):
        fn = _entry(backend)

        def run():
            with torch.no_grad():
                fn(inputs["v"], inputs["z"], inputs["w"])

        return run

    return build


def _forward_backward(backend: str):
    def build(shape, inputs):
        fn = _entry(backend)

        def run():
            fn(inputs["v"], inputs["z"], inputs["w"]).backward(inputs["g"])

        return run

    return build


def _impls(wrap) -> list[Impl]:
    return [
        Impl("seqbook.triton", wrap("triton"), graph=True),
        Impl("seqbook.reference", wrap("reference"), when=lambda s: s["L"] <= REFERENCE_MAX_L),
    ]


register(Op("cauchy.fwd", SHAPES, shape_name, make_inputs, functools.partial(_bytes, backward=False),
            _impls(_forward), flops=functools.partial(_flops, backward=False), flops_ceiling="fp32_mm_TFLOPs"))
register(Op("cauchy.fwdbwd", SHAPES, shape_name, functools.partial(make_inputs, grad=True),
            functools.partial(_bytes, backward=True), _impls(_forward_backward),
            flops=functools.partial(_flops, backward=True), flops_ceiling="fp32_mm_TFLOPs"))  # fmt: skip


# --------------------------------------------------------------------------------------
# Correctness on the GPU, before timing
# --------------------------------------------------------------------------------------


def _reference64(v, z, w):
    """The materialized sum in complex128 (inputs upcast from the kernel's rounded complex64)."""
    v, z, w = (x.to(torch.complex128) for x in (v, z, w))
    z = z if z.dim() == 2 else z.expand(v.shape[0], -1)
    return (v[:, :, None] / (z[:, None, :] - w[:, :, None])).sum(1)


def check(device: str = "cuda") -> dict:
    """The kernel against the float64 reference on this GPU, relative to the largest entry:

    - ``k`` at the target shape (the reference computed 32 channels at a time);
    - ``k`` and the gradients of ``v, z, w`` at ``H=64`` (the backward in splits), z per
      channel, and at an odd shape (``N, L`` not multiples of the blocks), z shared.

    Limits: 1e-5 for ``k``, 1e-4 for the gradients (sums of up to 16384 float32 terms)."""
    k_mod = kernels("cauchy")
    errors, failures = {}, []

    def judge(name, err, limit):
        errors[name] = err
        if not err < limit:  # NaN fails too
            failures.append(f"{name}: relative error {err:.2e} >= {limit:.0e}")

    inp = make_inputs(TARGET, device, seed=11)
    k = k_mod.cauchy(inp["v"], inp["z"], inp["w"])
    worst = 0.0
    for h0 in range(0, TARGET["H"], 32):
        sl = slice(h0, h0 + 32)
        worst = max(worst, relative_error(k[sl], _reference64(inp["v"][sl], inp["z"][sl], inp["w"][sl])))
    judge("target:k", worst, 1e-5)
    del inp, k
    torch.cuda.empty_cache()

    for label, shape in (("H=64", SMALL_GRID), ("odd", dict(H=3, N=37, L=1000, z="shared"))):
        inp = make_inputs(shape, device, seed=12, grad=True)
        k = k_mod.cauchy(inp["v"], inp["z"], inp["w"])
        k.backward(inp["g"])
        wide = [x.detach().to(torch.complex128).requires_grad_() for x in (inp["v"], inp["z"], inp["w"])]
        k_ref = _reference64(*wide)
        k_ref.backward(inp["g"].to(torch.complex128))
        judge(f"{label}:k", relative_error(k, k_ref.detach()), 1e-5)
        for name, x, r in zip(("v", "z", "w"), inp["grads"], wide):
            judge(f"{label}:grad_{name}", relative_error(x.grad, r.grad), 1e-4)
        del inp, k, wide, k_ref
        torch.cuda.empty_cache()
    return {"errors": errors, "failures": failures}


register_check("cauchy", check)


# --------------------------------------------------------------------------------------
# Kernel configurations (to choose seqbook.kernels.cauchy.CONFIGS)
# --------------------------------------------------------------------------------------

# (BLOCK_N, BLOCK_L, num_warps[, num_stages]): the defaults first, then their neighbours.
# Forward: few modes x many points per thread; backward: many modes x few points (CONFIGS' comment).
SWEEP_FWD = [(4, 1024, 4), (2, 2048, 4), (8, 512, 4), (16, 256, 4), (4, 512, 4), (4, 2048, 8), (8, 1024, 8),
             (16, 1024, 8), (4, 1024, 4, 1)]
SWEEP_BWD = [(16, 128, 4), (32, 128, 4), (8, 128, 4), (16, 256, 4), (32, 256, 8), (16, 64, 4), (64, 128, 8),
             (16, 128, 8), (16, 128, 4, 1)]  # fmt: skip


def _config(entry: tuple) -> dict:
    cfg = dict(BLOCK_N=entry[0], BLOCK_L=entry[1], num_warps=entry[2])
    if len(entry) > 3:
        cfg["num_stages"] = entry[3]
    return cfg


def sweep(device: str = "cuda") -> list[dict]:
    """Time the forward (``POWER=1`` and ``2``) and backward kernels alone at the target shape
    over the configurations above; then the backward's number of splits at the small grid.
    ``tflops`` counts as the floor does (module docstring)."""
    import triton

    k = kernels("cauchy")
    found = []

    def record(entry: dict, fn, instructions: int, shape: dict):
        info = {}
        try:
            info = kernel_info(fn())  # the first call compiles; a kernel launch returns its handle
            ms = time_ms(fn, warmup=10, rep=40)
        except Exception as e:  # e.g. out of registers or shared memory
            ms = float("nan")
            print("sweep", entry, "failed:", type(e).__name__, str(e)[:160], flush=True)
        tflops = 2 * instructions * _terms(shape) / (ms * 1e-3) / 1e12
        found.append(dict(entry, shape=shape_name(shape), ms=round(ms, 4), tflops=round(tflops, 2), **info))
        print("sweep", found[-1], flush=True)

    inp = make_inputs(TARGET, device, seed=13)
    v2, z2, w2 = (k._pairs(inp[x]) for x in ("v", "z", "w"))
    g2 = k._pairs(make_inputs(TARGET, device, seed=14, grad=True)["g"])
    H, N, L = TARGET["H"], TARGET["N"], TARGET["L"]
    out = torch.empty(H, L, 2, device=device)
    # The first configuration also with the plain division (FAST_RCP=False), to see what the
    # PTX reciprocal buys (seqbook.kernels.cauchy._reciprocal).
    fast_rcp = k._fast_rcp()  # True on an NVIDIA GPU
    for i, entry in enumerate(SWEEP_FWD):
        cfg = k._fit(_config(entry), N, L)
        grid = (H, triton.cdiv(L, cfg["BLOCK_L"]))
        for power, fast in [(1, fast_rcp), (2, fast_rcp)] + ([(1, False)] if i == 0 and fast_rcp else []):
            def fn(cfg=cfg, grid=grid, power=power, fast=fast):
                return k._cauchy_fwd[grid](v2, z2, w2, out, N, L, L, POWER=power, FAST_RCP=fast, **cfg)

            record(dict(cfg, kernel=f"fwd POWER={power}", FAST_RCP=fast), fn,
                   INSTRUCTIONS["fwd" if power == 1 else "bwd_z"], TARGET)
    for entry in SWEEP_BWD:
        cfg = _config(entry)
        record(dict(cfg, kernel="bwd", splits=1), lambda cfg=cfg: k._backward(v2, z2, w2, g2, splits=1, config=cfg),
               INSTRUCTIONS["bwd_vw"], TARGET)  # fmt: skip
    del inp, v2, z2, w2, g2, out
    torch.cuda.empty_cache()

    inp = make_inputs(SMALL_GRID, device, seed=15)
    v2, z2, w2 = (k._pairs(inp[x]) for x in ("v", "z", "w"))
    g2 = k._pairs(make_inputs(SMALL_GRID, device, seed=16, grad=True)["g"])
    cfg = k._fit(k.CONFIGS["bwd"], SMALL_GRID["N"], SMALL_GRID["L"])
    auto = k.choose_splits(SMALL_GRID["H"], SMALL_GRID["N"], SMALL_GRID["L"], cfg, v2.device)
    for splits in sorted({1, 2, 4, 8, 16, auto}):
        fn = lambda splits=splits: k._backward(v2, z2, w2, g2, splits=splits)  # noqa: E731
        record(dict(cfg, kernel="bwd", splits=splits, auto=splits == auto), fn, INSTRUCTIONS["bwd_vw"], SMALL_GRID)
    return found


register_sweep("cauchy", sweep)
