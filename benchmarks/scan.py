r"""Benchmark: the diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t`` (``seqbook.scan``).

Ops (rows in the results schema of shared/GPU.md):

- ``scan.fwd``: ``h, h_last = linear_recurrence(a, b, h0)``, no autograd graph;
- ``scan.fwdbwd``: the same with ``a, b, h0`` requiring grad, then ``h.backward(g)``.

Shapes: the target ``B=4, L=4096, D=2048`` in float32 and bfloat16, the length sweep
``L = 256 ... 65536`` at ``B=4, D=2048``, float32, and a small grid, ``B=1, L=65536,
D=256`` (too few channel blocks to fill the GPU: the kernel cuts time into segments).

What is counted (the floor)
---------------------------
Two FLOPs per element, so memory bounds it. The fewest bytes: forward reads ``a, b``
and writes ``h`` (``3 B L D`` elements); backward reads ``a, g, h`` and writes
``da, db`` (``5 B L D``); fwd+bwd is ``8 B L D`` (``h0`` and ``h_last``, ``B D`` each,
are counted too). At the target shape in float32: 403 MB, 0.134 ms at 3.0 TB/s, forward;
1.07 GB, 0.358 ms, forward and backward.

Implementations
---------------
- ``seqbook.triton``: :mod:`seqbook.kernels.scan` through the public entry;
- ``seqbook.reference``: the parallel scan in PyTorch (:func:`seqbook.scan.linear_recurrence_parallel`);
- ``anchor:loop``: the readable loop (:func:`seqbook.scan.linear_recurrence_loop`), at
  ``L <= 4096`` (25 to 35 us per step forward on the H100's host, 400 us per step forward
  and backward: 1.7 s at 4096, and each timing takes several runs);
- ``anchor:torch.compile-loop``: ``torch.compile`` of the loop, forward only, at ``L = 256``
  only: Dynamo unrolls the Python loop, so compile time grows with ``L`` (about 0.27 s per
  step on a 2-core CPU: 35 s at ``L = 128``, 135 s at ``L = 512``; 18 minutes at 4096);
- ``anchor:torch.compile-parallel``: ``torch.compile`` of the parallel scan, at ``L = 4096``;
- ``anchor:torch.compile-associative_scan``: PyTorch's own scan operator
  (``torch._higher_order_ops.associative_scan``, a private API) with the same combine,
  compiled, at ``L = 4096``: what the compiler generates for this scan. Its backward did
  not compile within 120 s (Torch 2.11, H100 host): the forward row only, in practice.

The compiled anchors run in a child process with a time limit (``Impl.isolate_s``).

``python -m benchmarks.run --ops scan [--sweep]``; the sweep also times the kernels
alone over tile sizes, warps and pipeline stages, to choose ``CONFIGS`` in
:mod:`seqbook.kernels.scan`.
"""

from __future__ import annotations

import functools

import torch

from seqbook import scan
from seqbook.backend import kernels

from .suite import (Impl, Op, kernel_info, measure_ceilings, register, register_check, register_sweep, relative_error,
                    time_ms)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGET = dict(B=4, L=4096, D=2048, dtype="fp32")
LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
SMALL_GRID = dict(B=1, L=65536, D=256, dtype="fp32")  # 4 column blocks: the kernel cuts time into segments
SHAPES = [dict(TARGET, L=L) for L in LENGTHS] + [dict(TARGET, dtype="bf16"), SMALL_GRID]


def shape_name(s: dict) -> str:
    return f"B={s['B']},L={s['L']},D={s['D']},{s['dtype']}"


def make_inputs(shape: dict, device: str, seed: int, grad: bool = False) -> dict:
    """Decays in [0.8, 1), standard normal b and h0 (and output gradient g for fwd+bwd)."""
    B, L, D, dtype = shape["B"], shape["L"], shape["D"], DTYPES[shape["dtype"]]
    gen = torch.Generator(device=device).manual_seed(seed)
    a = (0.8 + 0.2 * torch.rand(B, L, D, generator=gen, device=device)).to(dtype)
    b = torch.randn(B, L, D, generator=gen, device=device).to(dtype)
    h0 = torch.randn(B, D, generator=gen, device=device).to(dtype)
    inputs = dict(a=a, b=b, h0=h0)
    if grad:
        for x in (a, b, h0):
            x.requires_grad_()
        inputs["g"] = torch.randn(B, L, D, generator=gen, device=device).to(dtype)
        inputs["grads"] = [a, b, h0]
    return inputs


def _bytes(shape: dict, arrays: int) -> int:
    """``arrays`` (B, L, D) tensors plus h0 and h_last, at the shape's element size."""
    B, L, D = shape["B"], shape["L"], shape["D"]
    return (arrays * B * L * D + 2 * B * D) * DTYPES[shape["dtype"]].itemsize


def _forward(fn):
    def build(shape, inputs):
        def run():
            with torch.no_grad():
                fn(inputs["a"], inputs["b"], inputs["h0"])

        return run

    return build


def _forward_backward(fn):
    def build(shape, inputs):
        def run():
            h, _ = fn(inputs["a"], inputs["b"], inputs["h0"])
            h.backward(inputs["g"])

        return run

    return build


@functools.cache
def _compiled(name: str):
    """The anchors' compiled functions, compiled once per process (on first call)."""
    if name == "loop":
        return torch.compile(scan.linear_recurrence_loop, dynamic=False)
    if name == "parallel":
        return torch.compile(scan.linear_recurrence_parallel, dynamic=False)
    from torch._higher_order_ops.associative_scan import associative_scan

    def combine(x, y):
        (a1, b1), (a2, b2) = x, y
        return a1 * a2, a2 * b1 + b2

    def torch_scan(a, b, h0):
        A, B = associative_scan(combine, (a, b), dim=1, combine_mode="pointwise")
        h = A * h0[:, None] + B
        return h, h[:, -1]

    return torch.compile(torch_scan, dynamic=False)


def _lazy(name: str):
    return lambda *args: _compiled(name)(*args)


def _is(**want):
    return lambda s: all(s[k] == v for k, v in want.items())


def _impls(wrap, backward: bool) -> list[Impl]:
    # torch.compile of the loop with backward (Dynamo and AOTAutograd over 256 unrolled steps)
    # did not compile within 94 s on the H100's host: only the forward is timed.
    return [
        Impl("seqbook.triton", wrap(functools.partial(scan.linear_recurrence, backend="triton")), graph=True),
        Impl("seqbook.reference", wrap(functools.partial(scan.linear_recurrence, backend="reference")), graph=True),
        # The loop's fwd+bwd takes 1.3 s a call at L=4096 (H100): only the shorter lengths.
        Impl("anchor:loop", wrap(scan.linear_recurrence_loop), when=lambda s: s["L"] <= (1024 if backward else 4096)),
        Impl("anchor:torch.compile-parallel", wrap(_lazy("parallel")), when=_is(**TARGET), isolate_s=150),
        Impl("anchor:torch.compile-associative_scan", wrap(_lazy("assoc")), when=_is(**TARGET), isolate_s=120),
    ] + ([] if backward else [
        Impl("anchor:torch.compile-loop", wrap(_lazy("loop")), when=_is(L=256, dtype="fp32"), isolate_s=150),
    ])  # fmt: skip


register(Op("scan.fwd", SHAPES, shape_name, make_inputs, functools.partial(_bytes, arrays=3),
            _impls(_forward, backward=False)))
register(Op("scan.fwdbwd", SHAPES, shape_name, functools.partial(make_inputs, grad=True),
            functools.partial(_bytes, arrays=8), _impls(_forward_backward, backward=True)))  # fmt: skip


# --------------------------------------------------------------------------------------
# Correctness on the GPU, before timing
# --------------------------------------------------------------------------------------

CHECK_CASES = [
    # (label, shape, forced segments or None)
    ("target", TARGET, None),
    ("odd", dict(B=3, L=1000, D=1000, dtype="fp32"), None),
    ("odd,3 segments", dict(B=3, L=1000, D=1000, dtype="fp32"), 3),
    ("small grid", SMALL_GRID, None),  # auto: time segments
    ("target bf16", dict(TARGET, dtype="bf16"), None),
]


def check(device: str = "cuda") -> dict:
    """The kernel against the float64 parallel scan on this GPU: h, h_last and the gradients
    of a, b, h0 for a random loss <h, g> + <h_last, g_last>; max error relative to the
    largest reference entry. Limits: 1e-5 (float32), 1e-2 (bfloat16)."""
    k = kernels("scan")
    errors, failures = {}, []
    for label, shape, segments in CHECK_CASES:
        inputs = make_inputs(shape, device, seed=7, grad=True)
        a, b, h0, g = inputs["a"], inputs["b"], inputs["h0"], inputs["g"]
        g_last = torch.randn_like(h0)
        h, h_last = k.linear_recurrence(a, b, h0, segments=segments)
        torch.autograd.backward([h, h_last], [g, g_last])
        got = dict(h=h, h_last=h_last, grad_a=a.grad, grad_b=b.grad, grad_h0=h0.grad)
        wide = [x.detach().double().requires_grad_() for x in (a, b, h0)]
        h_ref, last_ref = scan.linear_recurrence_parallel(*wide)
        torch.autograd.backward([h_ref, last_ref], [g.double(), g_last.double()])
        want = dict(h=h_ref, h_last=last_ref, grad_a=wide[0].grad, grad_b=wide[1].grad, grad_h0=wide[2].grad)
        limit = 1e-5 if shape["dtype"] == "fp32" else 1e-2
        for name in got:
            err = relative_error(got[name], want[name])
            errors[f"{label}:{name}"] = err
            if not err < limit:  # NaN fails too
                failures.append(f"{label} {shape_name(shape)}: {name} relative error {err:.2e} >= {limit:.0e}")
        del inputs, a, b, h0, g, h, h_last, got, wide, want, h_ref, last_ref
        torch.cuda.empty_cache()
    return {"errors": errors, "failures": failures}


register_check("scan", check)


# --------------------------------------------------------------------------------------
# Kernel configurations (to choose seqbook.kernels.scan.CONFIGS)
# --------------------------------------------------------------------------------------

# (CHUNK, BLOCK_D), each with 1, 2 and 4 warps and 3 and 4 pipeline stages: around the
# choices of 2026-12-03 (CONFIGS' comment), and the 64x64 tiles of four warps before them.
TILES = [(32, 16), (64, 16), (32, 32), (64, 32), (128, 32), (64, 64)]
WARPS, STAGES = (1, 2, 4), (3, 4)


def sweep(device: str = "cuda") -> list[dict]:
    """Time the forward and backward kernels alone, single pass, at the target shape in
    float32 and bfloat16 over tile sizes, warps and pipeline stages; then the number of
    time segments, at the target and at a small grid (B * D / BLOCK_D = 4 programs)."""
    k = kernels("scan")
    found = []
    copy = measure_ceilings(device)["copy_TBps"] * 1e12  # bytes/s, this GPU, this run
    for shape in (TARGET, dict(TARGET, dtype="bf16")):
        inp = make_inputs(shape, device, seed=3)
        a, b, h0 = inp["a"], inp["b"], inp["h0"]
        h, _ = k._forward(a, b, h0, a.dtype, segments=1)
        g = torch.randn_like(h)
        B, L, D = a.shape
        h_last, delta = torch.empty_like(h0), torch.empty(B, 1, D, device=device)
        da, db = torch.empty_like(a), torch.empty_like(a)
        floors = {"fwd": _bytes(shape, 3) / copy * 1e3, "bwd": _bytes(shape, 5) / copy * 1e3}
        for chunk, block_d in TILES:
            for warps in WARPS:
                for stages in STAGES:
                    cfg = dict(CHUNK=chunk, BLOCK_D=block_d, NUM_STAGES=stages, num_warps=warps)
                    for kind in ("fwd", "bwd"):
                        if kind == "fwd":
                            fn = lambda: k._launch_fwd(a, b, h0, h, h_last, None, L, 1, cfg)  # noqa: E731
                        else:
                            fn = lambda: k._launch_bwd(a, h, h0, g, None, da, db, delta, None, L, 1, cfg)  # noqa: E731
                        info = {}
                        try:
                            info = kernel_info(fn())
                            ms = time_ms(fn, warmup=10, rep=40)
                        except Exception as e:  # e.g. out of shared memory
                            ms = float("nan")
                            print("sweep", kind, cfg, "failed:", type(e).__name__, str(e)[:160], flush=True)
                        found.append(dict(cfg, kernel=kind, shape=shape_name(shape), segments=1, ms=round(ms, 4),
                                          floor_fraction=round(floors[kind] / ms, 4), **info))  # fmt: skip
                        print("sweep", found[-1], flush=True)
        del inp, a, b, h0, h, g, da, db
        torch.cuda.empty_cache()
    # Time segments with the default configuration: at the target (should not pay) and at a
    # small grid (should).
    for shape in (TARGET, SMALL_GRID):
        inp = make_inputs(shape, device, seed=4)
        a, b, h0 = inp["a"], inp["b"], inp["h0"]
        floor = _bytes(shape, 3) / copy * 1e3
        auto = k.choose_segments(shape["B"], shape["L"], shape["D"], k._fit(k.config_for(a.dtype, "fwd"), shape["L"], shape["D"]), a.device)
        for segments in sorted({1, 2, 4, 8, 16, 32, 64, auto}):
            ms = time_ms(lambda: k._forward(a, b, h0, a.dtype, segments=segments), warmup=10, rep=40)
            found.append(dict(kernel="fwd", shape=shape_name(shape), segments=segments, auto=segments == auto,
                              ms=round(ms, 4), floor_fraction=round(floor / ms, 4)))  # fmt: skip
            print("sweep", found[-1], flush=True)
        del inp, a, b, h0
        torch.cuda.empty_cache()
    return found


register_sweep("scan", sweep)
