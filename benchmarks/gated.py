r"""Benchmark: the gated and delta-rule recurrences of chapter 7 (GLA, RWKV-4/6/7, the delta rule) against fla's.

Families (ops ``<family>.fwd`` and ``<family>.fwdbwd``, rows in the schema of shared/GPU.md):

- ``gla``: vector-gated linear attention, :func:`seqbook.linear_attention.gla` (scale
  :math:`1/\sqrt{d_k}`) against fla's ``chunk_gla(q, k, v, g=log_alpha)``;
- ``rwkv6``: the same with RWKV-6's bonus and scale 1, :func:`seqbook.rwkv.wkv6` against
  ``chunk_rwkv6(r, k, v, w=log_w, u)``;
- ``delta_rule``: :func:`seqbook.linear_attention.delta_rule` against ``chunk_delta_rule``
  (keys L2-normalized by the caller, ``beta`` in (0, 1));
- ``rwkv7``: :func:`seqbook.rwkv.wkv7` against ``chunk_rwkv7(r, w=log_w, k, v, a=-kappa_hat,
  b=a * kappa_hat)`` (fla's :math:`S' = \mathrm{Diag}(e^{w}) S + b\,(a^\top S) + k v^\top`
  is ours with those two vectors). Ours is :mod:`seqbook.kernels.rwkv7`'s chunked kernel
  (row ``seqbook.triton``, skipped with a note where ``wkv7(backend="triton")`` has none),
  and the PyTorch chunked form (row ``seqbook.reference``, eager, at ``L <= 4096``);
- ``rwkv4``: RWKV-4's WKV, :func:`seqbook.rwkv.wkv4` (decay rates ``w >= 0``) against
  ``fused_recurrent_rwkv4(log w, u, k, v, state)`` (fla takes the stored ``time_decay`` and
  forms :math:`-e^{w}` itself; its initial state ``(B, 3, 1, C)`` is
  :math:`(a, b, p) = (0, 0, -10^{38})`, the empty sums).

Shapes: the first four at GPU.md's anchor shape ``B=4, L=4096, H=32, d=64`` bf16 (fla's
RWKV-6 and RWKV-7 rows there) and at ``B=1, L=16384, H=16, d=128`` bf16 (issue 13's two
targets; both in ``--quick``), and all four also over lengths (``lengths=True``, run with
``--lengths``: ``B=1, H=16, d=128``, ``L = 1k ... 64k``); ``rwkv4`` at GPU.md's
``B=1, L=16384, C=2048`` float32.

What is counted (the floor): bytes only (each input read once, each output written once;
the backward reads ``do`` and writes one gradient per input). The chunked forms' FLOPs
(:math:`4 d^2` per token and head for the state, as for linear attention) are recorded as
``tflops`` against the bf16 matrix rate where they apply; RWKV-4 is elementwise.

fla's kernels autotune on their first call and compile for minutes under Triton 3.6
(GPU.md): they are timed in a child process (``isolate_s``) after the family's check has
compiled them once into Triton's cache.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from seqbook import linear_attention as la
from seqbook import rwkv
from seqbook.backend import kernels

from .suite import Impl, Op, anchor_module, register, register_check, relative_error

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WIDE = dict(B=4, L=4096, H=32, d=64, dtype="bf16", quick=True)
LONG = dict(B=1, L=16384, H=16, d=128, dtype="bf16", target=True)  # issue 13's second target shape
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
LENGTH_SHAPES = [dict(B=1, L=L, H=16, d=128, dtype="bf16", lengths=True) for L in LENGTHS]
RWKV4_SHAPE = dict(B=1, L=16384, C=2048, dtype="fp32", target=True)
REFERENCE_MAX_L = 4096
ANCHOR_S = 240.0  # seconds for one fla row in its child process (autotuning included)


def shape_name(s: dict) -> str:
    return f"B={s['B']},H={s['H']},L={s['L']},d={s['d']},{s['dtype']}"


def rwkv4_shape_name(s: dict) -> str:
    return f"B={s['B']},L={s['L']},C={s['C']},{s['dtype']}"


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def make_inputs(shape: dict, device: str, seed: int, family: str, grad: bool = False) -> dict:
    """Inputs of one family in ``(B, L, H, d)``, 16-bit where the shape says so.

    ``q, k, v`` (``r`` for ``q`` in RWKV) standard normal; log gates
    ``logsigmoid(u + 4) / 16`` float32 cast to the dtype (gates near 1, as trained models'
    mostly are); the delta rule's and RWKV-7's keys L2-normalized, ``beta`` and ``a``
    sigmoids; RWKV-6's bonus ``(H, d)`` standard normal times 0.1."""
    B, L, H, d, dtype = shape["B"], shape["L"], shape["H"], shape["d"], DTYPES[shape["dtype"]]
    gen = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    q, k, v = rand(B, L, H, d), rand(B, L, H, d), rand(B, L, H, d)
    x = {}
    if family == "gla":
        x = dict(q=q, k=k * d**-0.5, v=v, log_alpha=F.logsigmoid(rand(B, L, H, d) + 4.0) / 16.0)
    elif family == "rwkv6":
        x = dict(q=q * d**-0.5, k=k * d**-0.5, v=v, log_alpha=F.logsigmoid(rand(B, L, H, d) + 4.0) / 16.0,
                 bonus=0.1 * rand(H, d))  # fmt: skip
    elif family == "delta_rule":
        x = dict(q=F.normalize(q, dim=-1), k=F.normalize(k, dim=-1), v=v, beta=torch.sigmoid(rand(B, L, H)))
    elif family == "rwkv7":
        kappa = F.normalize(rand(B, L, H, d), dim=-1)
        x = dict(q=q * d**-0.5, k=k * d**-0.5, v=v, log_alpha=F.logsigmoid(rand(B, L, H, d) + 4.0) / 16.0,
                 kappa_hat=kappa, a=torch.sigmoid(rand(B, L, H, d)))  # fmt: skip
    x = {n: t.to(dtype) for n, t in x.items()}
    if grad:
        leaves = [t for n, t in x.items()]
        for t in leaves:
            t.requires_grad_()
        x["do"] = rand(B, L, H, d).to(dtype)
        x["grads"] = leaves
    return x


def rwkv4_inputs(shape: dict, device: str, seed: int, grad: bool = False) -> dict:
    """RWKV-4: ``w = exp(N(0, 1)) / 4`` (decay rates), ``u, k, v`` standard normal, ``(B, L, C)``."""
    B, L, C, dtype = shape["B"], shape["L"], shape["C"], DTYPES[shape["dtype"]]
    gen = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    x = dict(w=torch.exp(rand(C)) / 4, u=rand(C), k=rand(B, L, C).to(dtype), v=rand(B, L, C).to(dtype))
    if grad:
        leaves = [x["w"], x["u"], x["k"], x["v"]]
        for t in leaves:
            t.requires_grad_()
        x["do"] = rand(B, L, C).to(dtype)
        x["grads"] = leaves
    return x


# --------------------------------------------------------------------------------------
# Implementations: ours, fla's
# --------------------------------------------------------------------------------------


def _kernel(family: str):
    """``call(inputs) -> o`` through the Triton kernel modules themselves: the public entries
    check their inputs' values on the host (``log_alpha <= 0``, ``beta`` in [0, 2]), a
    synchronization that a CUDA graph cannot capture; the GPU work is the same."""

    def call(i):
        if family == "gla":
            return kernels("gla").gla(i["q"], i["k"], i["v"], i["log_alpha"])[0]
        if family == "rwkv6":
            return kernels("gla").gla(i["q"], i["k"], i["v"], i["log_alpha"], None, 1.0, i["bonus"])[0]
        if family == "delta_rule":
            return kernels("delta").delta_rule(i["q"], i["k"], i["v"], i["beta"])[0]
        if family == "rwkv4":
            return kernels("rwkv4").wkv4(i["w"], i["u"], i["k"], i["v"])[0]
        if family == "rwkv7":
            return kernels("rwkv7").wkv7(i["q"], i["log_alpha"], i["k"], i["v"], i["kappa_hat"], i["a"])[0]
        raise ValueError(family)

    return call


def _ours(family: str, backend: str):
    """``call(inputs) -> o`` through seqbook's public entries."""

    def call(i):
        if family == "gla":
            return la.gla(i["q"], i["k"], i["v"], i["log_alpha"], backend=backend)
        if family == "rwkv6":
            return rwkv.wkv6(i["q"], i["k"], i["v"], i["log_alpha"], i["bonus"], backend=backend)
        if family == "delta_rule":
            return la.delta_rule(i["q"], i["k"], i["v"], i["beta"], backend=backend)
        if family == "rwkv7":
            return rwkv.wkv7(i["q"], i["log_alpha"], i["k"], i["v"], i["kappa_hat"], i["a"], backend=backend)
        if family == "rwkv4":
            return rwkv.wkv4(i["w"], i["u"], i["k"], i["v"], backend=backend)
        raise ValueError(family)

    return call


FLA = {
    "gla": ("fla.ops.gla", "chunk_gla"),
    "rwkv6": ("fla.ops.rwkv6", "chunk_rwkv6"),
    "delta_rule": ("fla.ops.delta_rule", "chunk_delta_rule"),
    "rwkv7": ("fla.ops.rwkv7", "chunk_rwkv7"),
    "rwkv4": ("fla.ops.rwkv4", "fused_recurrent_rwkv4"),
}


@functools.cache
def _fla(family: str):
    """``(function, None)`` from .anchors/fla, or ``(None, why not)``."""
    module, name = FLA[family]
    mod, why = anchor_module("fla", module)
    if mod is None:
        return None, why
    fn = getattr(mod, name, None)
    return (fn, None) if fn is not None else (None, f"{module} has no {name}")


def _fla_call(family: str):
    def call(i):
        fn = _fla(family)[0]
        if family == "gla":
            o = fn(i["q"], i["k"], i["v"], g=i["log_alpha"], scale=i["q"].shape[-1] ** -0.5)
        elif family == "rwkv6":
            o = fn(i["q"], i["k"], i["v"], i["log_alpha"], i["bonus"], scale=1.0)
        elif family == "delta_rule":
            o = fn(i["q"], i["k"], i["v"], i["beta"], scale=i["q"].shape[-1] ** -0.5)
        elif family == "rwkv7":
            kappa = i["kappa_hat"]
            o = fn(i["q"], i["log_alpha"], i["k"], i["v"], -kappa, i["a"] * kappa, scale=1.0)
        else:  # rwkv4: fla forms -exp(w) from the stored log-rate; empty sums have p = -1e38
            k = i["k"]
            state = torch.zeros(k.shape[0], 3, 1, k.shape[-1], dtype=k.dtype, device=k.device)
            state[:, 2] = -1e38
            o = fn(torch.log(i["w"]), i["u"], k, i["v"], state)
        return o[0] if isinstance(o, tuple) else o

    return call


def _build(call, grad: bool):
    def build(shape, inputs):
        def run():
            if grad:
                call(inputs).backward(inputs["do"])
            else:
                with torch.no_grad():
                    call(inputs)

        return run

    return build


@functools.cache
def _wkv7_kernel_missing() -> str | None:
    """None if ``wkv7(backend="triton")`` runs on this GPU, else why not."""
    try:
        x = make_inputs(dict(B=1, L=20, H=1, d=64, dtype="bf16"), "cuda", 0, "rwkv7")
        _ours("rwkv7", "triton")(x)
        return None
    except NotImplementedError as e:
        return f"no RWKV-7 kernel: {e}"


def _impls(family: str, grad: bool) -> list[Impl]:
    impls = []
    if family == "rwkv7":
        impls.append(Impl("seqbook.triton", _build(_kernel(family), grad), graph=True, available=_wkv7_kernel_missing))
        impls.append(Impl("seqbook.reference", _build(_ours(family, "reference"), grad),
                          when=lambda s: s["L"] <= REFERENCE_MAX_L and not s.get("lengths")))  # fmt: skip
    else:
        impls.append(Impl("seqbook.triton", _build(_kernel(family), grad), graph=True))
    impls.append(Impl(f"anchor:fla.{FLA[family][1]}", _build(_fla_call(family), grad),
                      available=lambda: _fla(family)[1], isolate_s=ANCHOR_S))  # fmt: skip
    return impls


def _token_bytes(s: dict, arrays_d: int, arrays_h: int = 0) -> int:
    """``arrays_d`` arrays of ``(B, L, H, d)`` and ``arrays_h`` of ``(B, L, H)``, in the shape's dtype."""
    e = DTYPES[s["dtype"]].itemsize
    return (arrays_d * s["d"] + arrays_h) * s["B"] * s["L"] * s["H"] * e


def _state_flops(s: dict) -> int:
    return 4 * s["B"] * s["L"] * s["H"] * s["d"] ** 2


# Arrays per token of (B, L, H, d) [and (B, L, H)]: inputs + o (forward); then do + one gradient each.
ARRAYS = {"gla": (5, 0), "rwkv6": (5, 0), "delta_rule": (4, 1), "rwkv7": (7, 0)}

for _family, (_nd, _nh) in ARRAYS.items():
    _shapes = [WIDE, LONG] + LENGTH_SHAPES
    _inputs = functools.partial(make_inputs, family=_family)
    register(Op(f"{_family}.fwd", _shapes, shape_name, _inputs,
                functools.partial(_token_bytes, arrays_d=_nd, arrays_h=_nh), _impls(_family, False),
                flops=_state_flops))  # fmt: skip
    register(Op(f"{_family}.fwdbwd", _shapes, shape_name, functools.partial(_inputs, grad=True),
                functools.partial(_token_bytes, arrays_d=2 * _nd, arrays_h=2 * _nh), _impls(_family, True),
                flops=lambda s: 3 * _state_flops(s)))  # fmt: skip


def _rwkv4_bytes(s: dict, arrays: int) -> int:
    return arrays * s["B"] * s["L"] * s["C"] * DTYPES[s["dtype"]].itemsize


register(Op("rwkv4.fwd", [RWKV4_SHAPE], rwkv4_shape_name, rwkv4_inputs, functools.partial(_rwkv4_bytes, arrays=3),
            _impls("rwkv4", False)))  # fmt: skip
register(Op("rwkv4.fwdbwd", [RWKV4_SHAPE], rwkv4_shape_name, functools.partial(rwkv4_inputs, grad=True),
            functools.partial(_rwkv4_bytes, arrays=6), _impls("rwkv4", True)))  # fmt: skip


# --------------------------------------------------------------------------------------
# Correctness on the GPU, before timing: ours and fla's against our float64 reference
# --------------------------------------------------------------------------------------

CHECK_SHAPE = dict(B=2, L=300, H=2, d=64, dtype="bf16")
RWKV4_CHECK = dict(B=2, L=300, C=64, dtype="fp32")
LIMITS = {"fp32": (1e-5, 1e-5), "fp16": (3e-3, 1e-2), "bf16": (2e-2, 5e-2)}  # (output, gradients)


def _check_family(family: str, device: str, errors: dict, failures: list) -> None:
    shape = RWKV4_CHECK if family == "rwkv4" else CHECK_SHAPE
    make = rwkv4_inputs if family == "rwkv4" else functools.partial(make_inputs, family=family)
    inputs = make(shape, device, 11, grad=True)
    leaves, do = inputs["grads"], inputs["do"]
    names = [n for n in inputs if n not in ("do", "grads")]
    wide = {n: inputs[n].detach().double().requires_grad_() for n in names}
    o_ref = _ours(family, "reference")(wide)
    o_ref.backward(do.double())
    out_limit, grad_limit = LIMITS[shape["dtype"]]
    tried = [("ours", _ours(family, "triton")), ("kernel", _kernel(family))]
    if os.environ.get("BENCH_ANCHOR_CHECKS", "1") != "0" and _fla(family)[0] is not None:
        tried.append(("fla", _fla_call(family)))
    for who, call in tried:
        for t in leaves:
            t.grad = None
        try:
            o = call(inputs)
            o.backward(do)
        except NotImplementedError as e:  # RWKV-7 before its kernel
            errors[f"{family}:{who}"] = float("nan")
            print(f"check {family} {who}: {e}", flush=True)
            continue
        got = dict(o=o, **{f"d{n}": t.grad for n, t in zip(names, leaves)})
        for name, value in got.items():
            want = o_ref if name == "o" else wide[name[1:]].grad
            if value is None:
                errors[f"{family}:{who}:{name}"] = float("nan")
                failures.append(f"{family} {who}: no gradient for {name[1:]}")
                continue
            err = relative_error(value, want)
            errors[f"{family}:{who}:{name}"] = err
            limit = out_limit if name == "o" else grad_limit
            if not err < limit:
                failures.append(f"{family} {who}: {name} relative error {err:.2e} >= {limit:.0e}")
    torch.cuda.empty_cache()


def _check(family: str):
    def check(device: str = "cuda") -> dict:
        """Ours (and fla's, if present and ``BENCH_ANCHOR_CHECKS`` is not ``0``: its first call
        autotunes for minutes) against our float64 reference: ``o`` and every gradient."""
        errors, failures = {}, []
        _check_family(family, device, errors, failures)
        return {"errors": errors, "failures": failures}

    return check


for _family in ("gla", "rwkv6", "delta_rule", "rwkv7", "rwkv4"):
    register_check(_family, _check(_family))
