r"""Benchmark: causal linear attention (``seqbook.linear_attention``), our chunked kernel against fla's.

Ops (rows in the results schema of shared/GPU.md):

- ``linear_attention.fwd``: ``o = linear_attention(q, k, v)``, no decay, no autograd graph;
- ``linear_attention.fwdbwd``: the same with ``q, k, v`` requiring grad, then ``o.backward(do)``;
- ``linear_attention.decay_fwd``: with a data-dependent scalar decay per head and step,
  ``log_decay (B, L, H)`` float32 (gated linear attention's head-wise form, Mamba-2's);
- ``linear_attention.decay_fwdbwd``: the same, backward included (``log_decay`` too).

Shapes, bf16, ``(batch, length, heads, d)`` with ``d_k = d_v = d`` for all: GPU.md's anchor
shape ``B=4, L=4096, H=32, d=64`` (fla: 0.20 ms forward, 1.43 ms fwd+bwd; the recurrent
kernel 9.31 ms; ``chunk_simple_gla`` 0.48 ms), the target ``B=1, L=16384, H=16, d=128``
(fla: 0.30 / 1.42 ms), and the sweep ``L = 1024 ... 32768`` at ``H=16, d=128`` and 16k
tokens per batch (``B = 16384 / L``).

What is counted (the floor)
---------------------------
Per token and head, every form must update the state (:math:`S \mathrel{+}= k v^\top`,
:math:`2 d_k d_v` FLOPs) and read it (:math:`q^\top S`, :math:`2 d_k d_v`): :math:`4 d^2`,
held to the bf16 matrix rate. The chunked forms add their intra-chunk products,
:math:`O(C d)` per token, which are not counted, so the fraction of the floor understates
the real rate by a factor of about :math:`1 + C / d` (2 at ``C = d = 64``). The backward
is counted as twice the forward (fwd+bwd: 3 times). Bytes: ``q, k, v`` read and ``o``
written (forward), plus ``do`` read and ``dq, dk, dv`` written (backward); plus
``log_decay`` (float32) and its gradient for the decayed ops.

Implementations
---------------
- ``seqbook.triton``: :mod:`seqbook.kernels.linear_attention` through the public entry
  (chunk 64);
- ``seqbook.reference``: :func:`seqbook.linear_attention.linear_attention_chunked` in
  PyTorch (chunk 64, float32 compute), at ``L <= 4096``;
- ``anchor:fla.chunk_linear_attn`` (forward and fwd+bwd) and
  ``anchor:fla.fused_recurrent_linear_attn`` (forward), from the git-ignored
  ``.anchors/fla`` (absent: skipped with a note). Both take ``(B, T, H, K)`` like ours;
  they are called with ``normalize=False``, the same map as ours (``chunk_linear_attn``
  normalizes by default);
- ``anchor:fla.chunk_simple_gla`` for the decayed forward, with ``g = log_decay``
  (fla's log-space head-wise gate, ``(B, T, H)``). Forward only: on Hopper with Triton 3.6
  its backward refuses gated inputs (GPU.md).

``python -m benchmarks.run --ops linear_attention [--quick] [--sweep]``; the sweep times the
forward's two kernels apart (the walk over chunks and the per-chunk outputs, each with and
without a decay), the whole forward over its walk segments and output groups (graph replays),
and the backward, over the tiles, warps and stages of
:data:`seqbook.kernels.linear_attention.CONFIG`; :data:`~seqbook.kernels.linear_attention.SCHEDULES`
were chosen from it (``results/sweeps/2026-12-03-h200-stop23-*``).
"""

from __future__ import annotations

import functools

import torch

from seqbook import linear_attention as la

from seqbook.backend import kernels

from .suite import Impl, Op, anchor_module, graphed, register, register_check, register_sweep, relative_error, time_ms

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WIDE = dict(B=4, L=4096, H=32, d=64, dtype="bf16")
TARGET = dict(B=1, L=16384, H=16, d=128, dtype="bf16", target=True)
SWEEP_LENGTHS = [1024, 2048, 4096, 8192, 32768]  # 16384 is the target itself
SHAPES = [WIDE, TARGET] + [dict(B=max(1, 16384 // L), L=L, H=16, d=128, dtype="bf16") for L in SWEEP_LENGTHS]
# The book's time-against-length plots (``--lengths``): attention's B, H, d (benchmarks.attention).
LENGTH_SHAPES = [dict(B=1, L=L, H=16, d=128, dtype="bf16", lengths=True)
                 for L in (1024, 2048, 4096, 8192, 16384, 32768, 65536)]  # fmt: skip
REFERENCE_MAX_L = 4096  # the PyTorch chunked form: 64 Python iterations per 4096 tokens
CHUNK = 64


def shape_name(s: dict) -> str:
    return f"B={s['B']},H={s['H']},L={s['L']},d={s['d']},{s['dtype']}"


def make_inputs(shape: dict, device: str, seed: int, grad: bool = False, decay: bool = False) -> dict:
    """``q, k, v`` in ``(B, L, H, d)``: ``q, k`` positive features (:func:`la.elu_feature_map`
    of standard normals, as a model feeds them), ``v`` standard normal; with ``decay``,
    ``log_decay = log sigmoid(u + 4) / 16`` float32, gates near 1 as a trained model's
    mostly are. With ``grad``, the output gradient ``do`` too."""
    B, L, H, d, dtype = shape["B"], shape["L"], shape["H"], shape["d"], DTYPES[shape["dtype"]]
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k = (la.elu_feature_map(torch.randn(B, L, H, d, generator=gen, device=device)).to(dtype) for _ in range(2))
    v = torch.randn(B, L, H, d, generator=gen, device=device).to(dtype)
    inputs = dict(q=q, k=k, v=v, log_decay=None)
    if decay:
        u = torch.randn(B, L, H, generator=gen, device=device)
        inputs["log_decay"] = torch.nn.functional.logsigmoid(u + 4.0) / 16.0
    if grad:
        leaves = [q, k, v] + ([inputs["log_decay"]] if decay else [])
        for x in leaves:
            x.requires_grad_()
        inputs["do"] = torch.randn(B, L, H, d, generator=gen, device=device).to(dtype)
        inputs["grads"] = leaves
    return inputs


def forward_flops(s: dict) -> int:
    return 4 * s["B"] * s["L"] * s["H"] * s["d"] ** 2


def _bytes(s: dict, arrays: int, decay_arrays: int = 0) -> int:
    tokens = s["B"] * s["L"] * s["H"]
    return arrays * tokens * s["d"] * DTYPES[s["dtype"]].itemsize + decay_arrays * tokens * 4


def _build(call, grad: bool):
    """An Impl builder from ``call(inputs) -> o``: forward under no_grad, or forward and backward."""

    def build(shape, inputs):
        def run():
            if grad:
                call(inputs).backward(inputs["do"])
            else:
                with torch.no_grad():
                    call(inputs)

        return run

    return build


def _ours(backend: str):
    return lambda i: la.linear_attention(i["q"], i["k"], i["v"], log_decay=i["log_decay"], chunk_size=CHUNK,
                                         backend=backend)  # fmt: skip


def _reference(i):
    """The readable chunked form in float32 (the public entry would also validate the inputs)."""
    a = None if i["log_decay"] is None else i["log_decay"]
    o, _ = la.linear_attention_chunked(i["q"].float(), i["k"].float(), i["v"].float(), a, chunk_size=CHUNK)
    return o.to(i["q"].dtype)


@functools.cache
def _fla(module: str, name: str):
    """``(function, None)`` from .anchors/fla, or ``(None, why not)``."""
    mod, why = anchor_module("fla", module)
    if mod is None:
        return None, why
    fn = getattr(mod, name, None)
    return (fn, None) if fn is not None else (None, f"{module} has no {name}")


def _fla_call(module: str, name: str, **kwargs):
    def call(i):
        fn = _fla(module, name)[0]
        out = fn(i["q"], i["k"], i["v"], **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return call


def _fla_gla(i):
    o, _ = _fla("fla.ops.simple_gla", "chunk_simple_gla")[0](i["q"], i["k"], i["v"], g=i["log_decay"])
    return o


def _available(module: str, name: str):
    return lambda: _fla(module, name)[1]


def _impls(grad: bool, decay: bool) -> list[Impl]:
    small = lambda s: s["L"] <= REFERENCE_MAX_L and not s.get("lengths")  # noqa: E731
    impls = [Impl("seqbook.triton", _build(_ours("triton"), grad), graph=True),
             Impl("seqbook.reference", _build(_reference, grad), when=small)]  # fmt: skip
    if decay:
        if not grad:
            impls.append(Impl("anchor:fla.chunk_simple_gla", _build(_fla_gla, False),
                              available=_available("fla.ops.simple_gla", "chunk_simple_gla")))  # fmt: skip
        return impls
    impls.append(Impl("anchor:fla.chunk_linear_attn",
                      _build(_fla_call("fla.ops.linear_attn", "chunk_linear_attn", normalize=False), grad),
                      available=_available("fla.ops.linear_attn", "chunk_linear_attn")))  # fmt: skip
    if not grad:
        impls.append(Impl("anchor:fla.fused_recurrent_linear_attn",
                          _build(_fla_call("fla.ops.linear_attn", "fused_recurrent_linear_attn"), False),
                          when=lambda s: not s.get("lengths"),
                          available=_available("fla.ops.linear_attn", "fused_recurrent_linear_attn")))  # fmt: skip
    return impls


register(Op("linear_attention.fwd", SHAPES + LENGTH_SHAPES, shape_name, make_inputs, functools.partial(_bytes, arrays=4),
            _impls(grad=False, decay=False), flops=forward_flops))
register(Op("linear_attention.fwdbwd", SHAPES + LENGTH_SHAPES, shape_name, functools.partial(make_inputs, grad=True),
            functools.partial(_bytes, arrays=11), _impls(grad=True, decay=False),
            flops=lambda s: 3 * forward_flops(s)))
register(Op("linear_attention.decay_fwd", SHAPES, shape_name, functools.partial(make_inputs, decay=True),
            functools.partial(_bytes, arrays=4, decay_arrays=1), _impls(grad=False, decay=True),
            flops=forward_flops))
register(Op("linear_attention.decay_fwdbwd", SHAPES, shape_name, functools.partial(make_inputs, grad=True, decay=True),
            functools.partial(_bytes, arrays=11, decay_arrays=2), _impls(grad=True, decay=True),
            flops=lambda s: 3 * forward_flops(s)))  # fmt: skip


# --------------------------------------------------------------------------------------
# Correctness on the GPU, before timing
# --------------------------------------------------------------------------------------

CHECK_CASES = [
    # (label, shape, decay); lengths that are not multiples of the chunk
    ("d=64 bf16", dict(B=2, L=1000, H=4, d=64, dtype="bf16"), False),
    ("d=128 bf16 decay", dict(B=1, L=2001, H=2, d=128, dtype="bf16"), True),
    ("d=64 fp16 decay", dict(B=2, L=777, H=2, d=64, dtype="fp16"), True),
    ("d=32 fp32 decay", dict(B=1, L=513, H=2, d=32, dtype="fp32"), True),
]
LIMITS = {"fp32": (1e-5, 1e-5), "fp16": (3e-3, 1e-2), "bf16": (2e-2, 5e-2)}  # (output, gradients)


def check(device: str = "cuda") -> dict:
    """The kernel against the float64 chunked form on this GPU, on the same rounded inputs:
    ``o`` and the gradients of ``q, k, v`` (and ``log_decay``) for a random ``do``; max error
    relative to the largest reference entry. Then, if the anchor is present, fla's
    ``chunk_linear_attn(normalize=False)`` against the same float64 output (same map)."""
    errors, failures = {}, []
    for label, shape, decay in CHECK_CASES:
        inputs = make_inputs(shape, device, seed=7, grad=True, decay=decay)
        leaves, do = inputs["grads"], inputs["do"]
        o = _ours("triton")(inputs)
        o.backward(do)
        got = dict(o=o, **{f"d{n}": x.grad for n, x in zip(("q", "k", "v", "log_decay"), leaves)})
        wide = [x.detach().double().requires_grad_() for x in leaves]
        o_ref, _ = la.linear_attention_chunked(wide[0], wide[1], wide[2], wide[3] if decay else None, chunk_size=CHUNK)
        o_ref.backward(do.double())
        want = dict(o=o_ref, **{f"d{n}": x.grad for n, x in zip(("q", "k", "v", "log_decay"), wide)})
        out_limit, grad_limit = LIMITS[shape["dtype"]]
        for name in got:
            limit = out_limit if name == "o" else grad_limit
            err = relative_error(got[name], want[name])
            errors[f"{label}:{name}"] = err
            if not err < limit:  # NaN fails too
                failures.append(f"{label} {shape_name(shape)}: {name} relative error {err:.2e} >= {limit:.0e}")
        fla_fn, _ = _fla("fla.ops.linear_attn", "chunk_linear_attn")
        if fla_fn is not None and not decay and shape["dtype"] != "fp32":
            with torch.no_grad():
                o_fla = fla_fn(inputs["q"], inputs["k"], inputs["v"], normalize=False)[0]
            err = relative_error(o_fla, o_ref.detach())
            errors[f"{label}:fla chunk_linear_attn o"] = err
            if not err < out_limit:
                failures.append(f"fla chunk_linear_attn differs from our float64 form at {label}: {err:.2e}")
        del inputs, leaves, do, o, got, wide, want, o_ref
        torch.cuda.empty_cache()
    return {"errors": errors, "failures": failures}


register_check("linear_attention", check)


# --------------------------------------------------------------------------------------
# Kernel configurations (to choose seqbook.kernels.linear_attention.CONFIG)
# --------------------------------------------------------------------------------------

# The walk (_state_pass): (state_block_k, state_block_v, state_warps, state_stages).
WALK_TILES = [(64, 32, 4, 3), (64, 32, 4, 4), (64, 32, 4, 5), (64, 32, 4, 6), (64, 32, 2, 4), (64, 64, 8, 4),
              (64, 64, 4, 4), (64, 64, 8, 5), (32, 32, 2, 4), (32, 32, 1, 4), (32, 64, 2, 4), (128, 32, 4, 4),
              (64, 16, 2, 4)]  # fmt: skip
# The outputs (_chunk_out): (BLOCK_V, out_warps, out_group, out_stages).
OUT_TILES = [(64, 4, 1, 1), (128, 4, 1, 1), (128, 8, 1, 1), (128, 4, 2, 2), (128, 4, 4, 2), (128, 4, 4, 3),
             (64, 4, 4, 2), (64, 4, 4, 3), (128, 8, 4, 2), (64, 4, 8, 3)]  # fmt: skip
# The whole forward (graph replays): (segments, out_group, out_stages), the walk and outputs at their defaults.
FORWARDS = [(1, 1, 1), (2, 1, 1), (4, 1, 1), (8, 1, 1), (16, 1, 1), (4, 4, 2), (8, 2, 2)]
# The backward's per-chunk gradients (_chunk_grads): (grad_block_v, grad_warps).
GRAD_TILES = [(32, 8), (16, 8), (32, 4), (64, 8)]


def sweep(device: str = "cuda") -> list[dict]:
    """At the target and at ``B=4, L=4096, H=32, d=64`` (bf16, chunk 64): the walk alone over
    :data:`WALK_TILES` and the output kernel alone over :data:`OUT_TILES`, each without and with
    a decay, the whole forward over :data:`FORWARDS` (the walk's segments), and the
    whole backward (reverse walk + gradients) over :data:`GRAD_TILES`, each with the other
    settings at their defaults. Rows carry the kernel's bytes over its time (the walk:
    ``k, v`` read and the states written; the outputs: ``q, k, v`` and the states read, ``o``
    written)."""
    k = kernels("linear_attention")
    default = dict(k.CONFIG)
    found = []
    for shape in (TARGET, WIDE):
        x = make_inputs(shape, device, seed=3, decay=True)
        q, kk, v, a = x["q"], x["k"], x["v"], x["log_decay"]
        B, L, H, d = (shape[n] for n in ("B", "L", "H", "d"))
        scale = d**-0.5
        states = torch.empty(B, H, -(-L // CHUNK), d, d, dtype=k._state_dtype(q.dtype), device=device)
        final = torch.empty(B, H, d, d, dtype=torch.float32, device=device)
        token_bytes = B * L * H * d * q.element_size()
        walk_bytes, out_bytes = 2 * token_bytes + states.nbytes, 4 * token_bytes + states.nbytes
        do = torch.randn_like(v)
        walk = lambda: k._walk(kk, v, None, None, states, final, 1.0, CHUNK, reverse=False)  # noqa: E731
        walk_decay = lambda: k._walk(kk, v, a, None, states, final, 1.0, CHUNK, reverse=False)  # noqa: E731
        out = lambda: k._outputs(q, kk, v, None, states, scale, CHUNK)  # noqa: E731
        out_decay = lambda: k._outputs(q, kk, v, a, states, scale, CHUNK)  # noqa: E731
        runs = [(kind, dict(state_block_k=bk, state_block_v=bv, state_warps=w, state_stages=st), walk_bytes, fn)
                for bk, bv, w, st in WALK_TILES
                for kind, fn in (("walk", walk), ("walk decay", walk_decay))]  # fmt: skip
        runs += [(kind, dict(BLOCK_V=bv, out_warps=w, out_group=g, out_stages=st), out_bytes, fn)
                 for bv, w, g, st in OUT_TILES
                 for kind, fn in (("out", out), ("out decay", out_decay))]  # fmt: skip
        fwd = lambda: k._forward(q, kk, v, None, None, scale, CHUNK)  # noqa: E731
        fwd_decay = lambda: k._forward(q, kk, v, a, None, scale, CHUNK)  # noqa: E731
        runs += [(kind, dict(segments=sg, out_group=g, out_stages=st), None, fn)
                 for sg, g, st in FORWARDS
                 for kind, fn in (("fwd", fwd), ("fwd decay", fwd_decay))]  # fmt: skip
        runs += [("bwd", dict(grad_block_v=bv, grad_warps=w), None,
                  lambda: k._backward(q, kk, v, None, states, do, None, scale, CHUNK)) for bv, w in GRAD_TILES]  # fmt: skip
        for kind, cfg, nbytes, fn in runs:
            k.CONFIG.update(cfg)
            try:
                fn()  # compile
                # whole forwards as graph replays: Python's launch gaps between segments are not the GPU's
                ms = time_ms(graphed(fn) if kind.startswith("fwd") else fn, warmup=10, rep=40)
            except Exception as e:  # e.g. out of shared memory or registers
                ms = float("nan")
                print("sweep linear_attention", kind, cfg, "failed:", type(e).__name__, str(e)[:160], flush=True)
            finally:
                k.CONFIG.clear()
                k.CONFIG.update(default)
            row = dict(cfg, kernel=kind, shape=shape_name(shape), ms=round(ms, 4))
            if nbytes:
                row["tbps"] = round(nbytes / (ms * 1e-3) / 1e12, 3)
            found.append(row)
            print("sweep", row, flush=True)
        del x, q, kk, v, a, states, final, do
        torch.cuda.empty_cache()
    return found


register_sweep("linear_attention", sweep)
