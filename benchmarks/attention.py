r"""Benchmark: softmax attention (``seqbook.attention``), our FlashAttention kernel against PyTorch's.

Ops (rows in the results schema of shared/GPU.md):

- ``attention.fwd``: ``o = attention(q, k, v, causal=True)``, no autograd graph;
- ``attention.fwdbwd``: the same with ``q, k, v`` requiring grad, then ``o.backward(do)``;
- ``attention.decode``: one decoding step, the new token's query against a KV cache of ``L``
  tokens (:func:`seqbook.attention.decode_step`, ``B=1, H=32, d=128``, ``L = 1k ... 128k``),
  against SDPA with a one-row query; memory-bound, so its floor is the cache's bytes over the
  copy bandwidth. Our kernel needs ``Lq == Lk`` and has no row here.

Shapes, bf16, causal, ``(batch, length, heads, d)`` for ours: the target ``B=1, L=16384,
H=16, d=128``; ``B=4, L=4096, H=32, d=64``; and the sweep ``L = 512 ... 32768`` at
``H=16, d=128`` and 16k tokens per batch (``B = 16384 / L``, at least 1).

What is counted (the floor)
---------------------------
Attention is bound by its matrix products. Non-causal, the forward does two per head,
:math:`QK^\top` and :math:`PV`, :math:`4 B H L^2 d` FLOPs; causal, half of that,
:math:`2 B H L^2 d`. The backward is counted as 2.5 times the forward (five products of
the same size: :math:`S` recomputed, :math:`dV, dP, dQ, dK`), so fwd+bwd is 3.5 times the
forward; FlashAttention papers count the same way. (Our backward does seven products, since
``dq`` and ``dk, dv`` are gathered by separate kernels that each recompute :math:`S` and
:math:`dP`: its real rate is 7/5 of the one reported.) At the target shape the forward is
1.13 TFLOP, 1.5 ms at 747 TFLOP/s. Bytes (the floor's other half, never the binding one):
``q, k, v`` read and ``o`` written, forward; plus ``o, do`` read and ``dq, dk, dv``
written, backward.

Implementations
---------------
- ``seqbook.triton``: :mod:`seqbook.kernels.attention` through the public entry, reading
  ``(B, L, H, d)`` in place (on an sm_90 GPU the d = 128 forward is the Gluon kernel of
  :mod:`seqbook.kernels.attention_hopper`, which that entry takes by default; the backward is
  Triton's everywhere);
- ``seqbook.reference``: :func:`seqbook.attention.attention_naive` (materializes the
  ``(B, H, L, L)`` scores), at ``L <= 4096`` only;
- ``anchor:sdpa-cudnn``, ``anchor:sdpa-flash``: ``torch.nn.functional.scaled_dot_product_attention``
  restricted to one backend by ``torch.nn.attention.sdpa_kernel``; they take ``(B, H, L, d)``,
  so their inputs are made contiguous in that layout before timing (outside the timed call).

``python -m benchmarks.run --ops attention [--quick] [--sweep]``; the sweep times the
kernels alone over tile sizes, warps, pipeline stages and TMA loads, to choose ``CONFIGS`` in
:mod:`seqbook.kernels.attention`.
"""

from __future__ import annotations

import functools
import math

import torch

from seqbook import attention as attn
from seqbook.backend import kernels

from .suite import Impl, Op, register, register_check, register_sweep, relative_error, time_ms

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGET = dict(B=1, L=16384, H=16, d=128, dtype="bf16", causal=True, target=True)
WIDE = dict(B=4, L=4096, H=32, d=64, dtype="bf16", causal=True)
SWEEP_LENGTHS = [512, 1024, 2048, 4096, 8192, 32768]  # 16384 is the target itself
SHAPES = [TARGET, WIDE] + [dict(B=max(1, 16384 // L), L=L, H=16, d=128, dtype="bf16", causal=True)
                           for L in SWEEP_LENGTHS]  # fmt: skip
# The book's time-against-length plots (``python -m benchmarks.run --lengths``): one batch of
# 16 heads at every length, so that the time grows as the work does (L^2 here, L for the
# recurrent families, which use the same B, H and d).
LENGTH_SHAPES = [dict(B=1, L=L, H=16, d=128, dtype="bf16", causal=True, lengths=True)
                 for L in (1024, 2048, 4096, 8192, 16384, 32768, 65536)]  # fmt: skip
SHAPES = SHAPES + LENGTH_SHAPES
REFERENCE_MAX_L = 4096  # the naive form's (B, H, L, L) scores and their gradients must fit


def shape_name(s: dict) -> str:
    return f"B={s['B']},H={s['H']},L={s['L']},d={s['d']},{s['dtype']},{'causal' if s['causal'] else 'full'}"


def make_inputs(shape: dict, device: str, seed: int, grad: bool = False) -> dict:
    """Standard normal q, k, v in (B, L, H, d), and contiguous (B, H, L, d) copies for SDPA
    (and the output gradient do, in both layouts, for fwd+bwd)."""
    B, L, H, d, dtype = shape["B"], shape["L"], shape["H"], shape["d"], DTYPES[shape["dtype"]]
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, L, H, d, generator=gen, device=device).to(dtype) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    inputs = dict(q=q, k=k, v=v, qt=qt, kt=kt, vt=vt)
    if grad:
        for x in (q, k, v, qt, kt, vt):
            x.requires_grad_()
        inputs["do"] = torch.randn(B, L, H, d, generator=gen, device=device).to(dtype)
        inputs["dot"] = inputs["do"].transpose(1, 2).contiguous()
        inputs["grads"] = [q, k, v, qt, kt, vt]
    return inputs


def forward_flops(s: dict) -> int:
    full = 4 * s["B"] * s["H"] * s["L"] ** 2 * s["d"]
    return full // 2 if s["causal"] else full


def _bytes(s: dict, arrays: int) -> int:
    return arrays * s["B"] * s["L"] * s["H"] * s["d"] * DTYPES[s["dtype"]].itemsize


def _ours(fn):
    """(fwd, fwd+bwd) builders for an implementation taking (B, L, H, d)."""

    def fwd(shape, inputs):
        def run():
            with torch.no_grad():
                fn(inputs["q"], inputs["k"], inputs["v"], causal=shape["causal"])

        return run

    def fwdbwd(shape, inputs):
        def run():
            fn(inputs["q"], inputs["k"], inputs["v"], causal=shape["causal"]).backward(inputs["do"])

        return run

    return fwd, fwdbwd


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]


@functools.cache
def _sdpa_available(name: str) -> str | None:
    """None if SDPA's ``name`` backend runs a small causal bf16 call with its backward here."""
    try:
        from torch.nn.attention import sdpa_kernel

        q = torch.randn(1, 2, 256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        with sdpa_kernel(_sdpa_backend(name)):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
        torch.cuda.synchronize()
        return None
    except Exception as e:  # not built in, or refused on this GPU
        return f"SDPA's {name} backend is not available: {type(e).__name__}: {str(e)[:160]}"


def _sdpa(name: str):
    def call(shape, inputs, grad):
        from torch.nn.attention import sdpa_kernel

        sdpa = torch.nn.functional.scaled_dot_product_attention
        backend = _sdpa_backend(name)

        def run():
            with sdpa_kernel(backend):
                if grad:
                    sdpa(inputs["qt"], inputs["kt"], inputs["vt"], is_causal=shape["causal"]).backward(inputs["dot"])
                else:
                    with torch.no_grad():
                        sdpa(inputs["qt"], inputs["kt"], inputs["vt"], is_causal=shape["causal"])

        return run

    return (lambda shape, inputs: call(shape, inputs, False)), (lambda shape, inputs: call(shape, inputs, True))


def _impls(kind: int) -> list[Impl]:
    """kind 0: forward builders, 1: forward+backward."""
    triton = _ours(functools.partial(attn.attention, backend="triton"))
    naive = _ours(lambda q, k, v, causal: attn.attention_naive(q, k, v, causal))
    cudnn, flash = _sdpa("cudnn"), _sdpa("flash")
    return [
        Impl("seqbook.triton", triton[kind], graph=True),
        Impl("seqbook.reference", naive[kind], when=lambda s: s["L"] <= REFERENCE_MAX_L and not s.get("lengths")),
        Impl("anchor:sdpa-cudnn", cudnn[kind], available=lambda: _sdpa_available("cudnn")),
        Impl("anchor:sdpa-flash", flash[kind], available=lambda: _sdpa_available("flash")),
    ]


register(Op("attention.fwd", SHAPES, shape_name, make_inputs, functools.partial(_bytes, arrays=4), _impls(0),
            flops=forward_flops))
register(Op("attention.fwdbwd", SHAPES, shape_name, functools.partial(make_inputs, grad=True),
            functools.partial(_bytes, arrays=12), _impls(1), flops=lambda s: int(3.5 * forward_flops(s))))  # fmt: skip


# --------------------------------------------------------------------------------------
# Decoding: one new token against a KV cache
# --------------------------------------------------------------------------------------

DECODE_SHAPES = [dict(B=1, L=L, H=32, d=128, dtype="bf16") for L in (1024, 4096, 16384, 65536, 131072)]


def decode_shape_name(s: dict) -> str:
    return f"B={s['B']},H={s['H']},L={s['L']},d={s['d']},{s['dtype']},decode"


def decode_inputs(shape: dict, device: str, seed: int) -> dict:
    """The new token's query ``(B, H, d)`` and caches of ``L`` tokens ``(B, L, H, d)``; the same
    in SDPA's layout, ``(B, H, 1, d)`` and ``(B, H, L, d)``, contiguous."""
    B, L, H, d, dtype = shape["B"], shape["L"], shape["H"], shape["d"], DTYPES[shape["dtype"]]
    gen = torch.Generator(device=device).manual_seed(seed)
    q_t = torch.randn(B, H, d, generator=gen, device=device).to(dtype)
    k, v = (torch.randn(B, L, H, d, generator=gen, device=device).to(dtype) for _ in range(2))
    return dict(q_t=q_t, k=k, v=v, qt=q_t[:, :, None].contiguous(), kt=k.transpose(1, 2).contiguous(),
                vt=v.transpose(1, 2).contiguous())


def _decode_reference(shape, inputs):
    def run():
        attn.decode_step(inputs["q_t"], inputs["k"], inputs["v"])

    return run


def _decode_sdpa(name: str):
    def build(shape, inputs):
        from torch.nn.attention import sdpa_kernel

        sdpa = torch.nn.functional.scaled_dot_product_attention
        backend = _sdpa_backend(name)

        def run():
            with sdpa_kernel(backend), torch.no_grad():
                sdpa(inputs["qt"], inputs["kt"], inputs["vt"])

        return run

    return build


# A decoding step reads the whole cache once and does 4 L d FLOPs per head on it: bound by
# memory, its floor is the cache's bytes over the copy bandwidth.
register(Op("attention.decode", DECODE_SHAPES, decode_shape_name, decode_inputs,
            lambda s: 2 * s["B"] * s["L"] * s["H"] * s["d"] * DTYPES[s["dtype"]].itemsize,
            [Impl("seqbook.reference", _decode_reference, graph=True),
             Impl("anchor:sdpa-flash", _decode_sdpa("flash"), available=lambda: _sdpa_available("flash")),
             Impl("anchor:sdpa-cudnn", _decode_sdpa("cudnn"), available=lambda: _sdpa_available("cudnn"))]))  # fmt: skip


# --------------------------------------------------------------------------------------
# Correctness on the GPU, before timing
# --------------------------------------------------------------------------------------

CHECK_CASES = [
    # (label, shape); lengths that are not multiples of the blocks
    ("target d=128 bf16", dict(B=1, L=2000, H=4, d=128, dtype="bf16", causal=True)),
    ("d=64 bf16 full", dict(B=2, L=777, H=3, d=64, dtype="bf16", causal=False)),
    ("d=64 fp16 causal", dict(B=2, L=1031, H=2, d=64, dtype="fp16", causal=True)),
    ("d=32 fp32 causal", dict(B=1, L=513, H=2, d=32, dtype="fp32", causal=True)),
    ("d=16 fp32 full", dict(B=1, L=300, H=2, d=16, dtype="fp32", causal=False)),
]
LIMITS = {"fp32": (1e-5, 1e-5), "fp16": (4e-3, 1e-2), "bf16": (2e-2, 5e-2)}  # (output, gradients)


def check(device: str = "cuda") -> dict:
    """The kernel against float64 naive attention on this GPU, on the same rounded inputs:
    ``o`` and the gradients of ``q, k, v`` for a random ``do``; max error relative to the
    largest reference entry."""
    errors, failures = {}, []
    for label, shape in CHECK_CASES:
        inputs = make_inputs(shape, device, seed=7, grad=True)
        q, k, v, do = inputs["q"], inputs["k"], inputs["v"], inputs["do"]
        o = attn.attention(q, k, v, causal=shape["causal"], backend="triton")
        o.backward(do)
        got = dict(o=o, dq=q.grad, dk=k.grad, dv=v.grad)
        wide = [x.detach().double().requires_grad_() for x in (q, k, v)]
        o_ref = attn.attention_naive(*wide, shape["causal"])
        o_ref.backward(do.double())
        want = dict(o=o_ref, dq=wide[0].grad, dk=wide[1].grad, dv=wide[2].grad)
        out_limit, grad_limit = LIMITS[shape["dtype"]]
        for name in got:
            limit = out_limit if name == "o" else grad_limit
            err = relative_error(got[name], want[name])
            errors[f"{label}:{name}"] = err
            if not err < limit:  # NaN fails too
                failures.append(f"{label} {shape_name(shape)}: {name} relative error {err:.2e} >= {limit:.0e}")
        del inputs, q, k, v, do, o, got, wide, want, o_ref
        torch.cuda.empty_cache()
    return {"errors": errors, "failures": failures}


register_check("attention", check)


# --------------------------------------------------------------------------------------
# Kernel configurations (to choose seqbook.kernels.attention.CONFIGS)
# --------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, NUM_STAGES[, launch options]); the option is TMA (tensor-
# descriptor loads, seqbook.kernels.attention's docstring). The first row of each d = 128 list
# is the default; GPU call B2 of 2026-12-02 (benchmarks/NOTES.md) timed most of the others.
TMA = {"TMA": True}
FWD_TILES = {
    128: [(128, 128, 8, 3, TMA), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 3, TMA), (128, 64, 8, 4),
          (64, 64, 4, 3)],
    64: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3, TMA), (64, 64, 4, 2)],
}
DKDV_TILES = {  # BLOCK_M queries streamed past BLOCK_N keys held
    128: [(64, 128, 8, 3, TMA), (64, 128, 8, 2, TMA), (64, 128, 8, 2), (32, 128, 8, 2, TMA), (64, 64, 8, 2, TMA)],
    64: [(32, 64, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2, TMA)],
}
DQ_TILES = {
    128: [(128, 64, 8, 4, TMA), (128, 64, 8, 3, TMA), (128, 64, 8, 3), (64, 64, 4, 2, TMA)],
    64: [(64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2, TMA)],
}

#: Rounds of the sweep: every configuration of a list is timed once per round, in the list's
#: order in even rounds and in reverse in odd ones, and its time is the mean over rounds. The
#: H200 slowed by about 4% per second of sustained load in GPU call B2 of 2026-12-02 (SDPA
#: cuDNN 1.72 ms, then 1.87 ms two seconds later): timed once each, in a fixed order, later
#: rows look slower. Alternating the order makes a steady drift add the same to every row.
SWEEP_ROUNDS = 4


def sweep(device: str = "cuda") -> list[dict]:
    """Time the forward kernel, and the backward with one of its two kernels' tiles varied,
    at the target (d=128) and at ``B=4, L=4096, H=32, d=64``, bf16, causal; each list of
    configurations in ``SWEEP_ROUNDS`` interleaved rounds (see there)."""
    k = kernels("attention")
    found = []
    for shape in (TARGET, WIDE):
        d = shape["d"]
        inp = make_inputs(shape, device, seed=3)
        q, kk, v = inp["q"], inp["k"], inp["v"]
        scale = 1.0 / math.sqrt(d)
        o, lse = k._forward(q, kk, v, True, scale)
        do = torch.randn_like(o)
        fwd_tflop = forward_flops(shape) / 1e12
        lists = [
            ("fwd", FWD_TILES[d], lambda c: k._forward(q, kk, v, True, scale, c)),
            ("dkdv", DKDV_TILES[d], lambda c: k._backward(q, kk, v, o, lse, do, True, scale, {"dkdv": c})),
            ("dq", DQ_TILES[d], lambda c: k._backward(q, kk, v, o, lse, do, True, scale, {"dq": c})),
        ]
        for kind, tiles, fn in lists:
            configs = []
            for bm, bn, warps, stages, *options in tiles:
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, NUM_STAGES=stages)
                cfg.update(options[0] if options else {})
                try:
                    fn(cfg)  # compile (and fail here, not in a round, if it cannot)
                    configs.append(cfg)
                except Exception as e:  # e.g. out of shared memory or registers
                    print("sweep", kind, cfg, "failed:", type(e).__name__, str(e)[:160], flush=True)
                    found.append(dict(cfg, kernel=kind, shape=shape_name(shape), ms=float("nan")))
            times = {i: [] for i in range(len(configs))}
            for r in range(SWEEP_ROUNDS):
                order = range(len(configs)) if r % 2 == 0 else reversed(range(len(configs)))
                for i in order:
                    times[i].append(time_ms(lambda: fn(configs[i]), warmup=5, rep=10))
            work = fwd_tflop * (1.0 if kind == "fwd" else 2.5)
            for i, cfg in enumerate(configs):
                ms = sum(times[i]) / len(times[i])
                found.append(dict(cfg, kernel=kind, shape=shape_name(shape), ms=round(ms, 4),
                                  ms_rounds=[round(t, 4) for t in times[i]], tflops=round(work / (ms * 1e-3), 1)))
                print("sweep", found[-1], flush=True)
        del inp, q, kk, v, o, lse, do
        torch.cuda.empty_cache()
    return found


register_sweep("attention", sweep)
