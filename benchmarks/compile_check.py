"""Compile every Triton kernel for a Hopper GPU (sm_90) on a machine without one.

``python -m benchmarks.compile_check [--arch 90]``: each kernel is driven through its real
launcher (the same Python that a GPU run executes, with CPU tensors standing in for the
device's), and Triton compiles it for the target down to a cubin with the ``ptxas`` its
wheel carries; nothing is launched. A kernel that Triton cannot compile for the GPU (a
construct the interpreter accepts and the compiler does not, a block shape it cannot lay
out, a shared-memory budget exceeded) fails here instead of on a lent GPU. What this
cannot see: wrong numbers, and speed. The test suite runs it (tests/test_compile_check.py)
with the installed Triton; running it under another Triton version (the GPU machines have
3.6) checks that version too.

How: a stand-in driver reports the target, and every ``JITFunction.run`` becomes a warm-up
(compile, don't launch). The kernels' outputs are then uninitialized memory, which the
launchers' host code passes on without reading.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: compile, don't interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

COMPILED: list[str] = []  # the kernels compiled, "name[constexprs]"


class _StandInDriver:
    """What ``JITFunction.run`` asks of the driver before a launch, for a GPU that is not here."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


#: The most shared memory one block may use, by compute capability (bytes, CUDA programming
#: guide). A kernel compiled for more would compile here and fail at its first launch on the GPU.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def _install(arch: int) -> None:
    _driver.set_active(_StandInDriver(GPUTarget("cuda", arch, 32)))
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        shared, limit = kernel.metadata.shared, MAX_SHARED.get(arch)
        if limit is not None and shared > limit:
            raise RuntimeError(f"{self.fn.__name__} needs {shared} bytes of shared memory, sm_{arch} allows {limit}")
        COMPILED.append(self.fn.__name__)
        return kernel

    JITFunction.run = compile_only
    import seqbook.backend as backend  # compiled code paths, not the interpreter's

    backend.interpreting = lambda: False


def _grads(*xs):
    return [x.detach().requires_grad_() for x in xs]


def cases():
    """(name, thunk) for every kernel and the variants that compile differently."""
    import importlib

    k = {m: importlib.import_module(f"seqbook.kernels.{m}") for m in
         ("scan", "ssm_kernel", "cauchy", "selective_scan", "ssd", "attention", "linear_attention", "rwkv4", "gla", "delta", "rwkv7")}  # fmt: skip
    for m in k.values():  # modules that took `interpreting` by name
        if hasattr(m, "interpreting"):
            m.interpreting = lambda: False
    r = torch.randn

    def scan(dtype, segments):
        a, b, h0 = _grads(r(2, 300, 96).to(dtype), r(2, 300, 96).to(dtype), r(2, 96))
        h, last = k["scan"].linear_recurrence(a, b, h0, segments=segments)
        (h.float().sum() + last.sum()).backward()

    def vandermonde():
        W, log_A = _grads(torch.randn(8, 16, dtype=torch.complex64), -torch.rand(8, 16, dtype=torch.complex64))
        k["ssm_kernel"].vandermonde_kernel(W, log_A, 300).sum().backward()

    def cauchy(splits):
        v, w = _grads(torch.randn(8, 16, dtype=torch.complex64), torch.randn(8, 16, dtype=torch.complex64))
        z = torch.randn(300, dtype=torch.complex64)
        k["cauchy"].cauchy(v, z, w, splits=splits).abs().sum().backward()

    def selective_scan(dtype, method):
        u, delta, B, C, z = (x.to(dtype) for x in (r(2, 100, 40), r(2, 100, 40), r(2, 100, 16), r(2, 100, 16),
                                                     r(2, 100, 40)))  # fmt: skip
        A, D, bias = -torch.rand(40, 16), r(40), r(40)
        fwd = dict(k["selective_scan"].config_for(dtype, "fwd"), METHOD=method)
        args = _grads(u, delta, A, B, C, D, z, bias)
        y, last = k["selective_scan"].selective_scan(*args, delta_softplus=True, return_last_state=True,
                                                     fwd_config=fwd)  # fmt: skip
        (y.float().sum() + last.sum()).backward()

    def ladder(rung):
        x = r(2, 50, 40)
        alpha = r(40) if rung == 2 else (r(2, 50, 40) if rung == 3 else None)
        k["selective_scan"].ladder(rung, x, alpha)

    def ssd(dtype, with_state):
        x, dt = r(2, 300, 4, 64).to(dtype), torch.rand(2, 300, 4)
        B, C = r(2, 300, 1, 128).to(dtype), r(2, 300, 1, 128).to(dtype)
        s0 = r(2, 4, 64, 128) if with_state else None
        k["ssd"].ssd_forward(x, dt, -torch.rand(4), B, C, initial_state=s0)

    def ssd_backward(dtype, design):
        x, B, C = _grads(r(2, 300, 4, 64).to(dtype), r(2, 300, 1, 128).to(dtype), r(2, 300, 1, 128).to(dtype))
        dt, A, s0 = _grads(torch.rand(2, 300, 4), -torch.rand(4), r(2, 4, 64, 128))
        y, last = k["ssd"].ssd_autograd(x, dt, A, B, C, initial_state=s0, design=design)
        (y.float().sum() + last.sum()).backward()

    def attention(dtype, d, causal):
        q, kk, v = _grads(*(r(1, 300, 2, d).to(dtype) for _ in range(3)))
        k["attention"].attention(q, kk, v, causal).float().sum().backward()

    def attention_hopper(d, causal):
        # the Gluon forward, which the launcher takes where it applies
        q, kk, v = (r(2, 256, 2, d).to(torch.bfloat16) for _ in range(3))
        importlib.import_module("seqbook.kernels.attention_hopper").forward(q, kk, v, causal, 0.088)

    def linear_attention(dtype, d, decay, chunk=64):
        q, kk, v = _grads(*(r(1, 300, 2, d).to(dtype) for _ in range(3)))
        a, s0 = _grads(-torch.rand(1, 300, 2), r(1, 2, d, d)) if decay else (None, None)
        o, last = k["linear_attention"].linear_attention(q, kk, v, a, s0, None, chunk)
        (o.float().sum() + last.sum()).backward()

    out = [(f"scan {dt}, {s} segment(s)", lambda dt=dt, s=s: scan(dt, s))
           for dt in (torch.float32, torch.bfloat16) for s in (1, 3)]
    out += [("ssm_kernel (Vandermonde)", vandermonde)]
    out += [(f"cauchy, {s} split(s)", lambda s=s: cauchy(s)) for s in (1, 3)]
    out += [(f"selective_scan {dt}, forward '{m}'", lambda dt=dt, m=m: selective_scan(dt, m))
            for dt in (torch.float32, torch.bfloat16) for m in ("steps", "chunks")]
    out += [(f"selective_scan ladder, rung {n}", lambda n=n: ladder(n)) for n in (1, 2, 3)]
    out += [(f"ssd {dt}{', initial state' if s else ''}", lambda dt=dt, s=s: ssd(dt, s))
            for dt in (torch.float32, torch.bfloat16) for s in (False, True)]
    out += [(f"ssd {dt} forward + backward, {d} design", lambda dt=dt, d=d: ssd_backward(dt, d))
            for dt in (torch.float32, torch.bfloat16) for d in ("fused", "split")]
    out += [(f"attention {dt}, d={d}, {'causal' if c else 'full'}", lambda dt=dt, d=d, c=c: attention(dt, d, c))
            for dt in (torch.bfloat16, torch.float16) for d in (64, 128) for c in (True, False)]
    out += [(f"attention float32, d={d}", lambda d=d: attention(torch.float32, d, True)) for d in (32, 64)]
    if _driver.active.get_current_target().arch == 90:  # a Hopper-only kernel
        out += [(f"attention bfloat16, d={d}, {'causal' if c else 'full'}, Gluon forward",
                 lambda d=d, c=c: attention_hopper(d, c)) for d in (64, 128) for c in (True, False)]
    out += [(f"linear_attention {dt}, d={d}, {'decay + state' if g else 'no decay'}",
             lambda dt=dt, d=d, g=g: linear_attention(dt, d, g))
            for dt in (torch.bfloat16, torch.float16) for d in (64, 128) for g in (False, True)]
    out += [("linear_attention torch.float32, d=32, decay + state", lambda: linear_attention(torch.float32, 32, True)),
            ("linear_attention torch.float32, d=128, decay + state", lambda: linear_attention(torch.float32, 128, True)),
            ("linear_attention torch.bfloat16, d=16, chunk 16", lambda: linear_attention(torch.bfloat16, 16, True, 16))]

    def linear_attention_narrow(d, chunk):
        # the plan a GPU takes for bf16 when the walk has fewer programs than multiprocessors
        la = k["linear_attention"]
        saved = dict(la.CONFIG)
        la.CONFIG.update(la.SCHEDULES["narrow"])
        try:
            linear_attention(torch.bfloat16, d, True, chunk)
        finally:
            la.CONFIG.clear()
            la.CONFIG.update(saved)

    out += [(f"linear_attention torch.bfloat16, d={d}, chunk {c}, narrow schedule",
             lambda d=d, c=c: linear_attention_narrow(d, c)) for d, c in ((128, 64), (64, 64), (128, 32))]

    def wkv4(dtype, with_state):
        w, u = _grads(torch.rand(2048), r(2048))
        kk, v = _grads(r(1, 300, 2048).to(dtype), r(1, 300, 2048).to(dtype))
        s0 = (torch.zeros(1, 2048), torch.ones(1, 2048), r(1, 2048)) if with_state else None
        y, _ = k["rwkv4"].wkv4(w, u, kk, v, s0)
        y.float().sum().backward()

    out += [(f"rwkv4 wkv {dt}{', initial state' if s else ''}", lambda dt=dt, s=s: wkv4(dt, s))
            for dt in (torch.float32, torch.bfloat16) for s in (False, True)]

    def gla(dtype, d, bonus):
        q, kk, v = _grads(*(r(1, 300, 2, d).to(dtype) for _ in range(3)))
        a, s0 = _grads(-torch.rand(1, 300, 2, d), r(1, 2, d, d))
        u = _grads(r(2, d))[0] if bonus else None
        o, last = k["gla"].gla(q, kk, v, a, s0, None, u)
        (o.float().sum() + last.sum()).backward()

    out += [(f"gla {dt}, d={d}{', bonus' if b else ''}", lambda dt=dt, d=d, b=b: gla(dt, d, b))
            for dt, d, b in ((torch.float32, 64, False), (torch.float32, 128, True), (torch.bfloat16, 64, True),
                             (torch.bfloat16, 128, False))]

    def delta(dtype, d):
        q, kk, v = _grads(*(r(1, 300, 2, d).to(dtype) for _ in range(3)))
        beta, s0 = _grads(torch.rand(1, 300, 2), r(1, 2, d, d))
        o, last = k["delta"].delta_rule(q, kk, v, beta, s0)
        (o.float().sum() + last.sum()).backward()

    out += [(f"delta_rule {dt}, d={d}", lambda dt=dt, d=d: delta(dt, d))
            for dt, d in ((torch.float32, 64), (torch.bfloat16, 128))]

    def wkv7(dtype, d, with_state, form, grad=True):
        rr, lw, kk, v, kh, a = _grads(r(1, 300, 2, d).to(dtype), -torch.rand(1, 300, 2, d).to(dtype),
                                      *(r(1, 300, 2, d).to(dtype) for _ in range(3)), torch.rand(1, 300, 2, d).to(dtype))
        s0 = _grads(r(1, 2, d, d))[0] if with_state else None
        with torch.set_grad_enabled(grad):  # without gradients the chunked forward saves no states
            o, last = getattr(k["rwkv7"], form)(rr, lw, kk, v, kh, a, s0)
        if grad:
            (o.float().sum() + last.sum()).backward()

    out += [(f"rwkv7 {f} {dt}, d={d}{', initial state' if s else ''}{'' if g else ', forward only'}",
             lambda dt=dt, d=d, s=s, f=f, g=g: wkv7(dt, d, s, f, g))
            for dt, d, s, f, g in ((torch.float32, 64, True, "wkv7", True), (torch.bfloat16, 128, False, "wkv7", True),
                                   (torch.bfloat16, 64, False, "wkv7", False),
                                   (torch.float32, 64, True, "wkv7_fused_recurrent", True))]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: Hopper)")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    args = parser.parse_args(argv)
    _install(args.arch)
    print(f"triton {triton.__version__}, target sm_{args.arch}", flush=True)
    failures = 0
    for name, thunk in cases():
        if args.only not in name:
            continue
        start, before = time.perf_counter(), len(COMPILED)
        try:
            thunk()
            kernels = sorted(set(COMPILED[before:]))
            status = f"ok   {time.perf_counter() - start:5.1f} s  {', '.join(kernels)}"
            if not kernels:
                status, failures = "FAIL no kernel was compiled", failures + 1
        except Exception as e:  # report every case, then fail
            failures += 1
            status = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(f"{name:<44} {status}", flush=True)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
