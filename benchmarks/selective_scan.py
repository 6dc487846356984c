r"""Benchmark: Mamba's selective scan (``seqbook.mamba.selective_scan``).

Ops (rows in the results schema of shared/GPU.md):

- ``selective_scan.fwd``: ``y = selective_scan(u, delta, A, B, C, D)``, no autograd graph;
- ``selective_scan.fwdbwd``: the same with every input requiring grad, then ``y.backward(g)``.

The call: ``D`` skip, no gate ``z``, no ``delta_bias``, ``delta_softplus=False`` (the step
sizes are drawn already positive, log-uniform in [1e-3, 1e-1] as Mamba initializes them);
``A = -(1, 2, ..., N)`` for every channel (S4D-real), float32 like ``D``; ``u, delta, B,
C`` (and ``g``) random in the shape's dtype.

Shapes: the target ``B=4, L=4096, D=2048, N=16`` in bfloat16 (and float32, to compare with
the float32 anchor figures below), the length sweep ``L = 512 ... 65536`` at
``B=4, D=2048, N=16``, bfloat16, and ``B=1, L=1024`` float32, where the slow loop is timed.

The CUDA anchor
---------------
mamba_ssm's CUDA kernel ``selective_scan_fn`` is a compiled extension (about three minutes
for sm_90 with 16 jobs). When ``selective_scan_cuda`` is importable (built by hand on the
GPU machine and put on ``PYTHONPATH``; the build is not part of this repository) it is
timed at every shape as ``anchor:mamba_ssm.selective_scan_fn``, eagerly, as a user calls
it; otherwise the row is skipped with a note, and the figures measured on the H100 of
shared/GPU.md are the reference: 0.54 ms forward, 3.15 ms forward + backward in bfloat16 at
the target with the ``D`` skip; 1.11 / 4.08 ms in float32 (2026-11-23).

What is counted (the floor)
---------------------------
The work that cannot be avoided is one exponential :math:`e^{\Delta_t A_{dn}}` per
``(batch, t, d, n)``: ``B L D N`` of them forward (0.54 G at the target), and at least
as many again backward, which must recompute them rather than store ``N`` times the
input: ``2 B L D N`` for forward + backward. (Our backward evaluates ``3 B L D N`` in
all, one more per element for the shifted decay; see :mod:`seqbook.kernels.selective_scan`.)
They are held to the exponential rate measured in the same run (``exp_Tps``: a Triton
kernel of dependent ``exp2`` chains over the whole GPU, :func:`measure_exp_rate`); the
rows' ``texps`` field is tera-exponentials per second, and ``tflops`` is None.

Bytes, for the ``tbps`` field and the byte floor: forward reads ``u, delta`` and writes
``y`` (``3 B L D`` elements) and reads ``B, C`` (``2 B L N``); backward reads
``u, delta, g``, writes ``du, ddelta`` (``5 B L D``), reads ``B, C`` and writes
``dB, dC`` (``4 B L N``). The kernel's saved states (float32, ``B (L / 16) D N``) are an
implementation choice and are not counted. At the target in bfloat16 the bytes are
0.20 GB forward (0.07 ms at 3.0 TB/s): the exponentials (about 0.13 ms at the H100's
nominal 16 per SM per clock) bound it, not memory.

Implementations
---------------
- ``seqbook.triton``: :mod:`seqbook.kernels.selective_scan` through the public entry;
- ``seqbook.reference``: :func:`seqbook.mamba.selective_scan_parallel` (materializes
  ``(B, L, D, N)`` float32 tensors, 2 GiB each at the target), at ``L <= 4096``;
- ``anchor:mamba_ssm.selective_scan_ref``: mamba_ssm's PyTorch loop, loaded by file path
  from the git-ignored ``.anchors/mamba/`` (absent: skipped with a note), only at the small
  shape ``B=1, L=1024`` in float32 (one ``einsum`` per step: about half a second per forward at
  the target; 123 ms forward at the small shape on the H100). It takes
  ``(batch, d, length)`` tensors: they are transposed once when the closure is built,
  outside the timing.

The module also registers the family ``ssd`` (Mamba-2's chunked SSD: ``ssd.fwd`` and
``ssd.fwdbwd``, see the section at the end).

``python -m benchmarks.run --ops selective_scan ssd [--quick] [--sweep]``; the sweeps time
the kernels alone over their configurations, to choose ``CONFIGS`` in
:mod:`seqbook.kernels.selective_scan` and :mod:`seqbook.kernels.ssd`.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import types

import torch

from seqbook import mamba  # noqa: I001  (before triton: see seqbook.backend)
from seqbook.backend import kernels

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .suite import ANCHORS, Impl, Op, kernel_info, register, register_ceiling, register_check, register_sweep, relative_error, time_ms

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET = dict(B=4, L=4096, D=2048, N=16, dtype="bf16")
LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
# The slow references' shape (mamba_ssm's PyTorch loop: about 0.5 s a forward at the target),
# GPU.md's H100 figure for that loop; part of --quick runs.
SMALL = dict(B=1, L=1024, D=2048, N=16, dtype="fp32", quick=True)
# Mamba's own call adds a per-channel delta_bias and a softplus on the step sizes (the
# configuration of GPU.md's anchor figures): the target in both dtypes with them.
SOFTPLUS = [dict(TARGET, softplus=True, target=True), dict(TARGET, dtype="fp32", softplus=True, target=True)]
SHAPES = [dict(TARGET, L=L) for L in LENGTHS] + [dict(TARGET, dtype="fp32"), SMALL] + SOFTPLUS
# The book's time-against-length plots (``--lengths``): one sequence of D = 2048 channels
# (attention's 16 heads of 128) at every length.
LENGTH_SHAPES = [dict(B=1, L=L, D=2048, N=16, dtype="bf16", lengths=True)
                 for L in (1024, 2048, 4096, 8192, 16384, 32768, 65536)]  # fmt: skip
SHAPES = SHAPES + LENGTH_SHAPES
REFERENCE_MAX_L = 4096  # the reference's (B, L, D, N) tensors: about 30 GB for fwd+bwd at 4096


def shape_name(s: dict) -> str:
    return f"B={s['B']},L={s['L']},D={s['D']},N={s['N']},{s['dtype']},Dskip" + (",bias,softplus" if s.get("softplus") else "")


def make_inputs(shape: dict, device: str, seed: int, grad: bool = False) -> dict:
    """``u, B, C`` standard normal and ``delta`` log-uniform in [1e-3, 1e-1], in the shape's
    dtype; ``A = -(1..N)`` and ``D`` standard normal in float32 (and ``g`` for fwd+bwd)."""
    B, L, D, N, dtype = shape["B"], shape["L"], shape["D"], shape["N"], DTYPES[shape["dtype"]]
    gen = torch.Generator(device=device).manual_seed(seed)
    log_lo, log_hi = math.log(1e-3), math.log(1e-1)
    x = dict(
        u=torch.randn(B, L, D, generator=gen, device=device).to(dtype),
        delta=torch.exp(log_lo + (log_hi - log_lo) * torch.rand(B, L, D, generator=gen, device=device)).to(dtype),
        A=-torch.arange(1, N + 1, dtype=torch.float32, device=device).repeat(D, 1),
        B=torch.randn(B, L, N, generator=gen, device=device).to(dtype),
        C=torch.randn(B, L, N, generator=gen, device=device).to(dtype),
        D=torch.randn(D, generator=gen, device=device),
    )
    names = ["u", "delta", "A", "B", "C", "D"]
    x["softplus"] = bool(shape.get("softplus"))
    if x["softplus"]:
        # softplus(delta + bias) in [1e-3, 1e-1] as above: delta = log(e^step - 1) - bias
        bias = 0.5 * torch.randn(D, generator=gen, device=device)
        x["delta"] = (torch.log(torch.expm1(x["delta"].float())) - bias).to(dtype)
        x["delta_bias"] = bias
        names.append("delta_bias")
    if grad:
        for k in names:
            x[k].requires_grad_()
        x["grads"] = [x[k] for k in names]
        x["g"] = torch.randn(B, L, D, generator=gen, device=device).to(dtype)
    return x


def _bytes(shape: dict, d_arrays: int, n_arrays: int) -> int:
    """``d_arrays`` (B, L, D) and ``n_arrays`` (B, L, N) tensors at the shape's element size."""
    B, L, D, N = shape["B"], shape["L"], shape["D"], shape["N"]
    return (d_arrays * B * L * D + n_arrays * B * L * N) * DTYPES[shape["dtype"]].itemsize


def _exps(shape: dict, per_element: int) -> int:
    return per_element * shape["B"] * shape["L"] * shape["D"] * shape["N"]


# --------------------------------------------------------------------------------------
# The exponential rate (a ceiling measured in the same run)
# --------------------------------------------------------------------------------------


@triton.jit
def _exp2_chains(X, OUT, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    # Each element runs a chain of ITERS dependent exp2; a thread holds BLOCK / (32 warps)
    # independent chains, and the grid fills every SM several times over, so the
    # special-function units, not latency, set the pace. x -> 2^(-x/2) stays in (0.5, 1].
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    for _ in range(ITERS):
        x = tl.exp2(x * -0.5)
    tl.store(OUT + offs, x)


def measure_exp_rate(device: str = "cuda") -> float:
    """Tera-exponentials per second of ``tl.exp2`` on float32, over the whole GPU: the rate
    the selective scan's floor is counted at (``exp_Tps``)."""
    block, iters, programs = 1024, 512, 8192
    x = torch.rand(programs * block, device=device)
    out = torch.empty_like(x)

    def run():
        _exp2_chains[(programs,)](x, out, ITERS=iters, BLOCK=block, num_warps=4)

    run()
    ms = time_ms(run)
    del x, out
    return round(programs * block * iters / (ms * 1e-3) / 1e12, 3)


register_ceiling("exp_Tps", measure_exp_rate)


# --------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------


def _call(fn, inputs):
    if inputs["softplus"]:
        return fn(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"],
                  delta_bias=inputs["delta_bias"], delta_softplus=True)  # fmt: skip
    return fn(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"])


def _forward(fn):
    def build(shape, inputs):
        def run():
            with torch.no_grad():
                _call(fn, inputs)

        return run

    return build


def _forward_backward(fn):
    def build(shape, inputs):
        def run():
            _call(fn, inputs).backward(inputs["g"])

        return run

    return build


@functools.cache
def _mamba_ref():
    """mamba_ssm's ``selective_scan_ref``, imported by file path from .anchors/mamba, or
    ``(None, why not)``. The package ``__init__`` pulls in heavy modules, so an empty
    package is registered and only the submodule is imported (shared/GPU.md)."""
    root = ANCHORS / "mamba" / "mamba_ssm"
    if not root.is_dir():
        return None, ".anchors/mamba/mamba_ssm is absent"
    if "mamba_ssm" not in sys.modules:
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = [str(root)]
        sys.modules["mamba_ssm"] = pkg
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    except Exception as e:  # a partial copy, or a missing dependency (einops)
        return None, f"importing mamba_ssm.ops.selective_scan_interface failed: {type(e).__name__}: {e}"
    return selective_scan_ref, None


@functools.cache
def _mamba_cuda():
    """mamba_ssm's CUDA ``selective_scan_fn``, or ``(None, why not)``. It needs the compiled
    extension ``selective_scan_cuda`` importable (built by hand on the GPU machine from
    .anchors/mamba/csrc for sm_90 and put on ``PYTHONPATH``; neither the build nor a recipe
    for it is part of this repository)."""
    try:
        import selective_scan_cuda  # noqa: F401
    except Exception as e:
        return None, f"mamba_ssm's CUDA extension selective_scan_cuda is not importable: {type(e).__name__}: {e}"
    ref, why = _mamba_ref()  # registers the empty mamba_ssm package
    if ref is None:
        return None, why
    from mamba_ssm.ops import selective_scan_interface as interface

    interface.selective_scan_cuda = selective_scan_cuda
    return interface.selective_scan_fn, None


def _mamba_build(which: str, backward: bool):
    """mamba_ssm's layout is (batch, d, length): transpose once, here, outside the timing."""

    def build(shape, inputs):
        fn = (_mamba_ref if which == "ref" else _mamba_cuda)()[0]
        T = lambda x: x.detach().transpose(1, 2).contiguous()  # noqa: E731
        args = [T(inputs["u"]), T(inputs["delta"]), inputs["A"].detach(), T(inputs["B"]), T(inputs["C"]),
                inputs["D"].detach()]  # fmt: skip
        kwargs = {}
        if inputs["softplus"]:
            args.append(None)  # z
            args.append(inputs["delta_bias"].detach())
            kwargs["delta_softplus"] = True
        if backward:
            for x in args:
                if x is not None:
                    x.requires_grad_()
            inputs["grads"] = [x for x in args if x is not None]  # their leaves are the ones to reset between runs
            g = T(inputs["g"])

            def run():
                fn(*args, **kwargs).backward(g)

        else:

            def run():
                with torch.no_grad():
                    fn(*args, **kwargs)

        return run

    return build


def _is_small(s: dict) -> bool:
    return s["B"] * s["L"] <= SMALL["B"] * SMALL["L"] and not s.get("lengths")


def _impls(wrap, backward: bool) -> list[Impl]:
    return [
        Impl("seqbook.triton", wrap(functools.partial(mamba.selective_scan, backend="triton")), graph=True),
        Impl("seqbook.reference", wrap(functools.partial(mamba.selective_scan, backend="reference")),
             when=lambda s: s["L"] <= REFERENCE_MAX_L and not s.get("lengths"), graph=True),
        Impl("anchor:mamba_ssm.selective_scan_ref", _mamba_build("ref", backward), when=_is_small,
             available=lambda: _mamba_ref()[1]),
        Impl("anchor:mamba_ssm.selective_scan_fn", _mamba_build("cuda", backward),
             available=lambda: _mamba_cuda()[1]),
    ]  # fmt: skip


register(Op("selective_scan.fwd", SHAPES, shape_name, make_inputs, functools.partial(_bytes, d_arrays=3, n_arrays=2),
            _impls(_forward, backward=False), flops=functools.partial(_exps, per_element=1),
            flops_ceiling="exp_Tps", work="exp"))
register(Op("selective_scan.fwdbwd", SHAPES, shape_name, functools.partial(make_inputs, grad=True),
            functools.partial(_bytes, d_arrays=8, n_arrays=6), _impls(_forward_backward, backward=True),
            flops=functools.partial(_exps, per_element=2), flops_ceiling="exp_Tps", work="exp"))  # fmt: skip


# --------------------------------------------------------------------------------------
# Correctness on the GPU, before timing
# --------------------------------------------------------------------------------------

FULL = dict(D=True, z=True, bias=True, softplus=True)
CHECK_CASES = [
    # (label, (batch, length, d, N), dtype, flags, forward config or None)
    ("odd,all inputs", (2, 1000, 300, 16), torch.float32, FULL, None),
    ("odd,bare", (3, 777, 130, 16), torch.float32, dict(D=False, z=False, bias=False, softplus=False), None),
    ("N=5", (1, 257, 64, 5), torch.float32, FULL, None),
    ("chunks fwd", (2, 1000, 300, 16), torch.float32, FULL, dict(METHOD="chunks", CHUNK=16, BLOCK_D=16,
                                                                  NUM_STAGES=1, num_warps=4)),
    ("bf16", (2, 4096, 256, 16), torch.bfloat16, dict(D=True, z=True, bias=True, softplus=True), None),
]  # fmt: skip


def _check_inputs(shape, dtype, flags, device, seed):
    batch, L, d, N = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    x = dict(u=r(batch, L, d), delta=r(batch, L, d) * 0.5 - 1.0 if flags["softplus"] else torch.rand(
        batch, L, d, generator=gen, device=device) * 0.2, A=-0.1 - 3 * torch.rand(d, N, generator=gen, device=device),
        B=r(batch, L, N), C=r(batch, L, N), D=r(d) if flags["D"] else None, z=r(batch, L, d) if flags["z"] else None,
        delta_bias=0.3 * r(d) if flags["bias"] else None)  # fmt: skip
    act = ("u", "delta", "B", "C", "z")
    return {k: None if v is None else (v.to(dtype) if k in act else v) for k, v in x.items()}


def check(device: str = "cuda") -> dict:
    """The kernel against the float64 parallel form on this GPU: y, the last state and the
    gradients of every input for a random loss <y, g> + <last, g_last>; max error relative to
    the largest reference entry. Limits: 1e-4 (float32), 2e-2 (bfloat16). Then, if the
    anchor is present, our reference against mamba_ssm's ``selective_scan_ref`` (the same
    semantics, in its (batch, d, length) layout)."""
    k = kernels("selective_scan")
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    errors, failures = {}, []
    for label, shape, dtype, flags, fwd_cfg in CHECK_CASES:
        x = _check_inputs(shape, dtype, flags, device, seed=11)
        g = torch.randn(shape[0], shape[1], shape[2], device=device).to(dtype)
        g_last = torch.randn(shape[0], shape[2], shape[3], device=device)
        outs = {}
        for which in ("kernel", "reference"):
            leaves = {n: None if v is None else (v.detach().double() if which == "reference" else v.detach().clone())
                      for n, v in x.items()}  # fmt: skip
            for v in leaves.values():
                if v is not None:
                    v.requires_grad_()
            args = [leaves[n] for n in names]
            if which == "kernel":
                y, last = k.selective_scan(*args, delta_softplus=flags["softplus"], return_last_state=True,
                                           fwd_config=fwd_cfg)  # fmt: skip
            else:
                y, last = mamba.selective_scan_parallel(*args, delta_softplus=flags["softplus"], return_last_state=True)
            torch.autograd.backward([y, last], [g.to(y.dtype), g_last.to(last.dtype)])
            outs[which] = dict(y=y.detach(), last=last.detach(),
                               **{f"grad_{n}": v.grad for n, v in leaves.items() if v is not None})  # fmt: skip
        limit = 1e-4 if dtype == torch.float32 else 2e-2
        for name, want in outs["reference"].items():
            got = outs["kernel"][name]
            err = relative_error(got, want)
            errors[f"{label}:{name}"] = err
            if not err < limit:  # NaN fails too
                failures.append(f"{label} {shape} {dtype}: {name} relative error {err:.2e} >= {limit:.0e}")
        del x, g, g_last, outs
        torch.cuda.empty_cache()
    ref, why = _mamba_ref()
    if ref is not None:
        x = _check_inputs((2, 300, 64, 16), torch.float32, FULL, device, seed=12)
        T = lambda t: t.transpose(1, 2)  # noqa: E731
        want = ref(T(x["u"]), T(x["delta"]), x["A"], T(x["B"]), T(x["C"]), x["D"], T(x["z"]), x["delta_bias"], True)
        got = mamba.selective_scan_parallel(*(x[n] for n in names), delta_softplus=True)
        err = relative_error(T(got), want)
        errors["semantics vs mamba_ssm.selective_scan_ref:y"] = err
        if not err < 1e-4:
            failures.append(f"our reference differs from mamba_ssm's selective_scan_ref: relative error {err:.2e}")
    return {"errors": errors, "failures": failures}


register_check("selective_scan", check)


# --------------------------------------------------------------------------------------
# Kernel configurations (to choose seqbook.kernels.selective_scan.CONFIGS)
# --------------------------------------------------------------------------------------

# forward: (METHOD, CHUNK, BLOCK_D, NUM_STAGES, num_warps). The first is the default; the
# "steps" kernel needs NUM_STAGES >= 2 (one row with 1 shows what happens without).
FWD_CONFIGS = [
    ("steps", 16, 32, 3, 4), ("steps", 16, 32, 2, 4), ("steps", 8, 32, 3, 4), ("steps", 32, 32, 3, 4),
    ("steps", 16, 16, 3, 2), ("steps", 16, 16, 3, 4), ("steps", 16, 64, 3, 4), ("steps", 16, 64, 3, 8),
    ("steps", 16, 32, 1, 4),
    ("chunks", 16, 16, 2, 4), ("chunks", 16, 32, 2, 8), ("chunks", 8, 32, 2, 4), ("chunks", 16, 16, 1, 4),
]  # fmt: skip
# backward: (CHUNK, BLOCK_D, NUM_STAGES, num_warps); the first is the default. CHUNK is also the
# interval at which the forward saves states; tiles are capped at 4096 elements (BLOCK_D shrinks).
BWD_CONFIGS = [
    (16, 16, 1, 8), (16, 16, 1, 4), (8, 16, 1, 4), (8, 16, 1, 8), (16, 8, 1, 4), (8, 32, 1, 8), (16, 16, 2, 8),
    (32, 8, 1, 8),
]  # fmt: skip


def sweep(device: str = "cuda") -> list[dict]:
    """Time the forward kernels (no states saved) and the backward kernel alone at the target
    shape, bfloat16 and float32, over :data:`FWD_CONFIGS` and :data:`BWD_CONFIGS` (and one
    backward row without the sums and atomic adds of dB and dC, ``BC_GRADS=False``: what they
    cost, and rows with those sums stored per channel block, ``BC_PARTIAL``); each row carries
    its fraction of the exponential floor (measured rate: ``exp_Tps``). Environment:
    ``SWEEP_KINDS`` (``fwd,bwd``), ``SWEEP_DTYPES`` (``bf16,fp32``), ``SS_BWD_CONFIGS``
    (``"CHUNK,BLOCK_D,STAGES,WARPS;..."``: these backward configurations alone)."""
    k = kernels("selective_scan")
    kinds = os.environ.get("SWEEP_KINDS", "fwd,bwd").split(",")  # e.g. SWEEP_KINDS=bwd: the backward alone
    exp_rate = measure_exp_rate(device) * 1e12
    found = []
    dtypes = os.environ.get("SWEEP_DTYPES", "bf16,fp32").split(",")
    for shape in [dict(TARGET, dtype=t) for t in dtypes]:
        x = make_inputs(shape, device, seed=3)
        u, delta, A, B, C, D = (x[n] for n in ("u", "delta", "A", "B", "C", "D"))
        L, d, N = shape["L"], shape["D"], shape["N"]
        floor = {"fwd": _exps(shape, 1) / exp_rate * 1e3, "bwd": _exps(shape, 1) / exp_rate * 1e3}
        for method, chunk, block_d, stages, warps in FWD_CONFIGS if "fwd" in kinds else ():
            cfg = dict(METHOD=method, CHUNK=chunk, BLOCK_D=block_d, NUM_STAGES=stages, num_warps=warps)
            fn = lambda: k._forward(u, delta, A, B, C, D, None, None, False, False, cfg)  # noqa: E731
            found.append(_time_config("fwd", cfg, fn, shape, floor["fwd"]))
        g = torch.randn_like(u)
        # The last is a probe, not a configuration: the default without dB's and dC's atomic
        # adds (their values are then wrong), timing what those B L N d / BLOCK_D adds cost.
        probe = dict(k.config_for(u.dtype, "bwd"), BC_GRADS=False)
        runs = [dict(CHUNK=c, BLOCK_D=b, NUM_STAGES=s, num_warps=w) for c, b, s, w in BWD_CONFIGS]
        # dB, dC as per-block partial sums (plain stores, summed afterwards) instead of atomic adds;
        # the default, the probe and the default with partial sums first (a time-out keeps them)
        partial = [dict(r, BC_PARTIAL=True) for r in runs[:4]]
        bwd_runs = [runs[0], probe, partial[0]] + partial[1:] + runs[1:] if "bwd" in kinds else []
        if os.environ.get("SS_BWD_CONFIGS") and "bwd" in kinds:  # "CHUNK,BLOCK_D,STAGES,WARPS;...": these alone
            picked = [tuple(int(v) for v in c.split(",")) for c in os.environ["SS_BWD_CONFIGS"].split(";")]
            bwd_runs = [dict(CHUNK=c, BLOCK_D=b, NUM_STAGES=s, num_warps=w) for c, b, s, w in picked]
        for run in bwd_runs:
            cfg = k._fit(run, "bwd", L, d, N)
            try:
                fwd = dict(k.config_for(u.dtype, "fwd"))
                _, _, states = k._forward(u, delta, A, B, C, D, None, None, False, True, fwd, cfg["CHUNK"])
            except Exception as e:
                print("sweep: forward with saved states failed:", type(e).__name__, str(e)[:160], flush=True)
                continue
            fn = lambda: k._backward(u, delta, A, B, C, D, None, None, False, states, g, None, cfg)  # noqa: E731
            found.append(_time_config("bwd", cfg, fn, shape, floor["bwd"]))
            del states
        del x, u, delta, A, B, C, D, g
        torch.cuda.empty_cache()
    return found


def _time_config(kind: str, cfg: dict, fn, shape: dict, floor_ms: float) -> dict:
    info = {}
    try:
        fn()  # compile
        info = kernel_info(kernels("selective_scan").LAST_LAUNCH.get(kind))
        ms = time_ms(fn, warmup=10, rep=40)
    except Exception as e:  # e.g. out of registers or shared memory
        ms = float("nan")
        print("sweep", kind, cfg, "failed:", type(e).__name__, str(e)[:160], flush=True)
    row = dict(cfg, kernel=kind, shape=shape_name(shape), ms=round(ms, 4), floor_fraction=round(floor_ms / ms, 4),
               **info)  # fmt: skip
    print("sweep", row, flush=True)
    return row


register_sweep("selective_scan", sweep)


# --------------------------------------------------------------------------------------
# SSD (Mamba-2): the chunked kernel, forward and backward (family "ssd")
# --------------------------------------------------------------------------------------
#
# ``ssd.fwd``: ``y = ssd(x, dt, A, B, C)`` with no autograd graph; ``ssd.fwdbwd``: the same
# with ``x, dt, A, B, C`` requiring grad, then ``y.backward(g)``; at
# GPU.md's anchor shape ``B=4, L=4096, H=32, P=64, N=128``, one group, ``x, B, C`` in
# bfloat16 and ``dt, A`` in float32 (as Mamba-2 keeps them); also ``L = 1024, 16384``.
# Implementations: ``seqbook.triton`` (:mod:`seqbook.kernels.ssd`, its own chunk),
# ``seqbook.reference`` (:func:`seqbook.mamba.ssd_chunked`, chunk 64, in PyTorch) and
# ``anchor:mamba_ssm.mamba_chunk_scan_combined`` (mamba_ssm's Triton kernels, chunk 256
# as in GPU.md's figure: 0.66 ms forward, 4.07 ms forward + backward on the H100), loaded
# from .anchors/mamba when present.
#
# Floor: the bytes (``x`` read and ``y`` written, ``B, C`` read, ``dt``) and the FLOPs
# every form must do on the state: per token and head, the state update
# :math:`S \mathrel{+}= \Delta x B^\top` and the output :math:`C^\top S`, 2 P N each,
# 4 P N in all (the chunked forms add O(Q) per token for their quadratic blocks), at the
# bf16 matrix rate.

SSD_TARGET = dict(B=4, L=4096, H=32, P=64, G=1, N=128, dtype="bf16")
SSD_SHAPES = [dict(SSD_TARGET, L=L) for L in (1024, 4096, 16384)]
SSD_SHAPES += [dict(SSD_TARGET, B=1, L=L, lengths=True) for L in (1024, 2048, 4096, 8192, 16384, 32768, 65536)]  # --lengths


def ssd_shape_name(s: dict) -> str:
    return f"B={s['B']},L={s['L']},H={s['H']},P={s['P']},G={s['G']},N={s['N']},{s['dtype']}"


def ssd_inputs(shape: dict, device: str, seed: int) -> dict:
    """``x, B, C`` standard normal in the shape's dtype; ``dt`` log-uniform in [1e-3, 1e-1]
    and ``A = -uniform(1, 16)`` in float32 (Mamba-2's initialization ranges)."""
    B_, L, H, P, G, N = (shape[k] for k in ("B", "L", "H", "P", "G", "N"))
    dtype = DTYPES[shape["dtype"]]
    gen = torch.Generator(device=device).manual_seed(seed)
    log_lo, log_hi = math.log(1e-3), math.log(1e-1)
    return dict(
        x=torch.randn(B_, L, H, P, generator=gen, device=device).to(dtype),
        dt=torch.exp(log_lo + (log_hi - log_lo) * torch.rand(B_, L, H, generator=gen, device=device)),
        A=-(1 + 15 * torch.rand(H, generator=gen, device=device)),
        B=torch.randn(B_, L, G, N, generator=gen, device=device).to(dtype),
        C=torch.randn(B_, L, G, N, generator=gen, device=device).to(dtype),
    )


def _ssd_bytes(s: dict) -> int:
    e = DTYPES[s["dtype"]].itemsize
    tokens = s["B"] * s["L"]
    return (2 * tokens * s["H"] * s["P"] + 2 * tokens * s["G"] * s["N"]) * e + 4 * tokens * s["H"]


def _ssd_flops(s: dict) -> int:
    return 4 * s["P"] * s["N"] * s["B"] * s["L"] * s["H"]


@functools.cache
def _mamba_chunk_scan():
    """mamba_ssm's ``mamba_chunk_scan_combined`` from .anchors/mamba, or ``(None, why not)``."""
    _, why = _mamba_ref()  # registers the empty mamba_ssm package
    if why and "absent" in why:
        return None, why
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:
        return None, f"importing mamba_ssm.ops.triton.ssd_combined failed: {type(e).__name__}: {e}"
    return mamba_chunk_scan_combined, None


def _ssd_build(which: str):
    def build(shape, inputs):
        x, dt, A, B, C = (inputs[k] for k in ("x", "dt", "A", "B", "C"))

        def run():
            with torch.no_grad():
                if which == "anchor":
                    _mamba_chunk_scan()[0](x, dt, A, B, C, chunk_size=256)
                else:
                    mamba.ssd(x, dt, A, B, C, backend=which)

        return run

    return build


register(Op("ssd.fwd", SSD_SHAPES, ssd_shape_name, ssd_inputs, _ssd_bytes, [
    Impl("seqbook.triton", _ssd_build("triton"), graph=True),
    Impl("seqbook.reference", _ssd_build("reference"), graph=True, when=lambda s: not s.get("lengths")),
    Impl("anchor:mamba_ssm.mamba_chunk_scan_combined", _ssd_build("anchor"),
         available=lambda: _mamba_chunk_scan()[1]),
], flops=_ssd_flops))  # fmt: skip


def ssd_inputs_grad(shape: dict, device: str, seed: int) -> dict:
    """:func:`ssd_inputs` with ``x, dt, A, B, C`` requiring grad, and ``g``, the gradient of ``y``."""
    inputs = ssd_inputs(shape, device, seed)
    names = ["x", "dt", "A", "B", "C"]
    for k in names:
        inputs[k].requires_grad_()
    inputs["grads"] = [inputs[k] for k in names]
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    inputs["g"] = torch.randn(inputs["x"].shape, generator=gen, device=device).to(inputs["x"].dtype)
    return inputs


def _ssd_bytes_fwdbwd(s: dict) -> int:
    """Forward: x, B, C, dt read, y written; backward: x, dy, B, C, dt read, dx, dB, dC, ddt written."""
    e = DTYPES[s["dtype"]].itemsize
    tokens = s["B"] * s["L"]
    return (5 * tokens * s["H"] * s["P"] + 6 * tokens * s["G"] * s["N"]) * e + 3 * 4 * tokens * s["H"]


def _ssd_build_fwdbwd(which: str):
    def build(shape, inputs):
        x, dt, A, B, C, g = (inputs[k] for k in ("x", "dt", "A", "B", "C", "g"))

        def run():
            if which == "anchor":
                y = _mamba_chunk_scan()[0](x, dt, A, B, C, chunk_size=256)
            else:
                y = mamba.ssd(x, dt, A, B, C, backend=which)
            y.backward(g)

        return run

    return build


register(Op("ssd.fwdbwd", SSD_SHAPES, ssd_shape_name, ssd_inputs_grad, _ssd_bytes_fwdbwd, [
    Impl("seqbook.triton", _ssd_build_fwdbwd("triton")),
    Impl("seqbook.reference", _ssd_build_fwdbwd("reference"), when=lambda s: s["L"] <= 4096 and not s.get("lengths")),
    Impl("anchor:mamba_ssm.mamba_chunk_scan_combined", _ssd_build_fwdbwd("anchor"),
         available=lambda: _mamba_chunk_scan()[1]),
], flops=lambda s: 3 * _ssd_flops(s)))  # fmt: skip


def ssd_check(device: str = "cuda") -> dict:
    """The SSD kernel against the float64 chunked form on this GPU (y and the final state,
    with an initial state, then every gradient in both designs; float32 and bfloat16), then
    mamba_ssm's kernel against our
    float64 form if the anchor is present. Limits: 1e-4 (float32), 3e-2 (bfloat16)."""
    errors, failures = {}, []
    cases = [("fp32", dict(SSD_TARGET, B=1, L=1000, H=4, P=40, N=24, G=2, dtype="fp32")),
             ("bf16", dict(SSD_TARGET, B=2, L=2048, H=8))]  # fmt: skip
    for label, shape in cases:
        x, dt, A, B, C = (ssd_inputs(shape, device, seed=5)[k] for k in ("x", "dt", "A", "B", "C"))
        s0 = torch.randn(shape["B"], shape["H"], shape["P"], shape["N"], device=device)
        y, final = mamba.ssd(x, dt, A, B, C, initial_state=s0, return_final_state=True, backend="triton")
        wide = [t.double() for t in (x, dt, A, B, C)]
        y_ref, final_ref = mamba.ssd_chunked(*wide, chunk_size=64, initial_state=s0.double(), return_final_state=True)
        limit = 1e-4 if shape["dtype"] == "fp32" else 3e-2
        for name, got, want in (("y", y, y_ref), ("final", final, final_ref)):
            err = relative_error(got, want)
            errors[f"{label}:{name}"] = err
            if not err < limit:
                failures.append(f"ssd {label} {ssd_shape_name(shape)}: {name} relative error {err:.2e} >= {limit:.0e}")
        # Every gradient, in both designs of the forward, against the float64 chunked form's.
        leaves = [t.detach().clone().requires_grad_() for t in (x, dt, A, B, C, s0)]
        wide_leaves = [t.detach().double().requires_grad_() for t in leaves]
        y_w, final_w = mamba.ssd_chunked(*wide_leaves[:5], 64, wide_leaves[5], True)
        gy, gf = torch.randn_like(y_w), torch.randn_like(final_w)
        want = torch.autograd.grad((y_w * gy).sum() + (final_w * gf).sum(), wide_leaves)
        for design in ("fused", "split"):
            y_k, final_k = kernels("ssd").ssd_autograd(*leaves[:5], None, leaves[5], None, design)
            got = torch.autograd.grad((y_k.double() * gy).sum() + (final_k.double() * gf).sum(), leaves)
            for name, g, w in zip(("y", "final", "dx", "ddt", "dA", "dB", "dC", "ds0"), (y_k, final_k, *got),
                                  (y_w, final_w, *want)):  # fmt: skip
                err = relative_error(g, w)
                errors[f"{label}:{design}:{name}"] = err
                if not err < limit:
                    failures.append(f"ssd {label} {design} {ssd_shape_name(shape)}: {name} relative error {err:.2e}")
        del leaves, wide_leaves, y_w, final_w, want, got
        anchor, _ = _mamba_chunk_scan()
        if anchor is not None and label == "bf16":
            got = anchor(x, dt, A, B, C, chunk_size=256)  # without the initial state: compare with y from zero
            y0 = mamba.ssd_chunked(*wide, chunk_size=64)
            err = relative_error(got, y0)
            errors["semantics vs mamba_chunk_scan_combined:y"] = err
            if not err < limit:
                failures.append(f"mamba_chunk_scan_combined differs from our float64 SSD: relative error {err:.2e}")
        torch.cuda.empty_cache()
    return {"errors": errors, "failures": failures}


register_check("ssd", ssd_check)

# (Q, BLOCK_P, NUM_STAGES, num_warps); the first is the 16-bit default. Smaller BLOCK_P splits
# a head's P channels over more programs (each recomputes the chunk's C B^T): at B=1 the
# default runs one program per head, 32 in all (the length sweep: 0.14x mamba at 32k-64k).
SSD_CONFIGS = [(32, 64, 2, 8), (32, 32, 2, 4), (32, 16, 2, 4), (32, 32, 2, 8), (32, 64, 3, 8), (64, 64, 2, 8),
               (16, 64, 2, 4), (32, 64, 2, 4), (64, 32, 2, 4)]  # fmt: skip
SSD_SWEEP_SHAPES = [SSD_TARGET, dict(SSD_TARGET, B=1, L=16384)]


def ssd_sweep(device: str = "cuda") -> list[dict]:
    """The SSD kernel's fused forward alone at the target shape and at one sequence of 16k
    steps over :data:`SSD_CONFIGS` (``SSD_SWEEP_N`` of them: the first N)."""
    k = kernels("ssd")
    found = []
    configs = SSD_CONFIGS[: int(os.environ.get("SSD_SWEEP_N", len(SSD_CONFIGS)))]
    for shape in SSD_SWEEP_SHAPES:
        inp = ssd_inputs(shape, device, seed=6)
        x, dt, A, B, C = (inp[n] for n in ("x", "dt", "A", "B", "C"))
        floor = max(_ssd_bytes(shape) / 4.2e12, _ssd_flops(shape) / 690e12) * 1e3  # H200 ceilings
        for q, block_p, stages, warps in configs:
            cfg = dict(Q=q, BLOCK_P=block_p, NUM_STAGES=stages, num_warps=warps)
            try:
                fn = lambda: k.ssd_forward(x, dt, A, B, C, config=cfg, design="fused")  # noqa: E731
                fn()
                ms = time_ms(fn, warmup=10, rep=40)
            except Exception as e:
                ms = float("nan")
                print("sweep ssd", cfg, "failed:", type(e).__name__, str(e)[:160], flush=True)
            found.append(dict(cfg, kernel="ssd.fwd", shape=ssd_shape_name(shape), ms=round(ms, 4),
                              floor_fraction=round(floor / ms, 4)))  # fmt: skip
            print("sweep", found[-1], flush=True)
        del inp, x, dt, A, B, C
        torch.cuda.empty_cache()
    return found


register_sweep("ssd", ssd_sweep)
