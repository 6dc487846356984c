"""The benchmark suite's machinery: operations, implementations, ceilings, timing, result rows.

An :class:`Op` is one operation in one direction (``scan.fwd``, ``scan.fwdbwd``): the
shapes to time it at, how to make random inputs for a shape, the fewest bytes it must
move (and FLOPs it must do, if those bound it), and its implementations. An
:class:`Impl` turns (shape, inputs) into a closure that runs the operation once; it
may decline a shape (``when``), be absent on this machine (``available``: anchors
loaded from the git-ignored ``.anchors/`` folder), or be timed in a child process
under a time limit (``isolate_s``: for compilers whose compile time is unknown).

Every time is the median of ``triton.testing.do_bench`` (events on the GPU, L2 flushed
before each run), on fresh seeded random inputs. Implementations marked ``graph`` (ours)
are captured once in a CUDA graph and its replays are timed: that is the GPU's time for
the work. Eagerly, a fwd+bwd through ``torch.autograd`` costs about 0.4 ms of Python and
autograd-engine time on the H100's host, as much as the kernels themselves at the target
shape, and the GPU would wait on it; :func:`run_ops` records the eager times of those
implementations too (``eager`` in the result file). Anchors run eagerly, as a user runs
them: the readable loop's launch-by-launch cost is its lesson. The floor of a row is the larger of
its bytes over the measured copy bandwidth and its FLOPs over the measured matrix rate (bf16,
or fp32 for kernels bound by float32 arithmetic: ``Op.flops_ceiling``); ``floor_fraction`` =
floor / time.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
ANCHORS = ROOT / ".anchors"  # third-party sources (fla, mamba): git-ignored, never committed


@dataclasses.dataclass
class Impl:
    name: str  # "seqbook.triton", "seqbook.reference" or "anchor:<name>"
    build: Callable[[dict, dict], Callable[[], Any]]  # (shape, inputs) -> a closure running the op once
    when: Callable[[dict], bool] = lambda shape: True  # which shapes it is timed at
    available: Callable[[], str | None] = lambda: None  # None, or why it cannot run here
    isolate_s: float | None = None  # time it in a child process killed after this many seconds
    graph: bool = False  # time replays of a CUDA graph of it (GPU time, without Python's launch gaps)


@dataclasses.dataclass
class Op:
    name: str  # "<family>.<direction>", e.g. "scan.fwd"
    shapes: list[dict]
    shape_name: Callable[[dict], str]  # the row's "shape" string; rows that compare share it
    make_inputs: Callable[[dict, str, int], dict]  # (shape, device, seed) -> inputs; "grads": tensors to reset
    bytes: Callable[[dict], int]  # the fewest bytes: each input read once, each output written once
    impls: list[Impl]
    flops: Callable[[dict], int] | None = None  # None: bound by memory, FLOPs not counted
    flops_ceiling: str = "bf16_mm_TFLOPs"  # which measured rate the FLOPs are held to
    work: str = "flop"  # what `flops` counts: "flop", or e.g. "exp" (row key "texps", T exp/s, for exp-bound ops)


REGISTRY: dict[str, Op] = {}
CHECKS: dict[str, Callable[[], dict]] = {}  # family -> correctness check on the GPU
SWEEPS: dict[str, Callable[[], list]] = {}  # family -> kernel-configuration sweep
CEILING_PROBES: dict[str, Callable[[], float]] = {}  # extra ceilings, name -> measurement (e.g. "exp_Tps")


def register(op: Op) -> Op:
    REGISTRY[op.name] = op
    return op


def register_check(family: str, check: Callable[[], dict]) -> None:
    """``check()`` returns ``{"errors": {name: relative error}, "failures": [message, ...]}``."""
    CHECKS[family] = check


def register_sweep(family: str, sweep: Callable[[], list]) -> None:
    SWEEPS[family] = sweep


def register_ceiling(name: str, probe: Callable[[], float]) -> None:
    """An extra ceiling, measured by ``probe()`` in :func:`measure_ceilings`; an op names it in ``flops_ceiling``."""
    CEILING_PROBES[name] = probe


# --------------------------------------------------------------------------------------
# Anchors from .anchors/
# --------------------------------------------------------------------------------------


def anchor_module(folder: str, module: str):
    """Import ``module`` from ``.anchors/<folder>``, or return ``(None, why not)``.

    Anchors are third-party code brought by hand onto the GPU machine; the committed
    suite only imports those that are present and skips the others with a note.
    """
    path = ANCHORS / folder
    if not path.is_dir():
        return None, f".anchors/{folder} is absent"
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    try:
        return importlib.import_module(module), None
    except Exception as e:  # a broken or partial copy is skipped, not fatal
        return None, f"importing {module} from .anchors/{folder} failed: {type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------
# Timing and ceilings
# --------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], Any], grads: list | None = None, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` by ``triton.testing.do_bench`` (warm-up and repeat in ms)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grads, return_mode="median")


def measure_ceilings(device: str = "cuda") -> dict:
    """The ceilings, measured in this run: device-to-device copy (bytes read + written)
    of 1 GiB, a bf16 8192^3 matrix product, and an fp32 one with TF32 off (cuBLAS SGEMM:
    the FMA rate, for kernels bound by float32 arithmetic on the CUDA cores)."""
    src = torch.randn(256 * 2**20, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    copy = 2 * src.nbytes / (ms * 1e-3) / 1e12
    del src, dst
    n = 8192
    x, y = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms = time_ms(lambda: x @ y)
    mm = 2 * n**3 / (ms * 1e-3) / 1e12
    del x, y
    x, y = (torch.randn(n, n, device=device) for _ in range(2))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ms = time_ms(lambda: x @ y)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    fp32 = 2 * n**3 / (ms * 1e-3) / 1e12
    del x, y
    torch.cuda.empty_cache()
    extra = {name: probe() for name, probe in CEILING_PROBES.items()}
    return {"copy_TBps": round(copy, 3), "bf16_mm_TFLOPs": round(mm, 1), "fp32_mm_TFLOPs": round(fp32, 1), **extra}


def make_row(op: Op, impl: Impl, shape: dict, ms: float, ceilings: dict) -> dict:
    nbytes = op.bytes(shape)
    flops = op.flops(shape) if op.flops else None
    floor_ms = nbytes / (ceilings["copy_TBps"] * 1e12) * 1e3
    if flops:
        floor_ms = max(floor_ms, flops / (ceilings[op.flops_ceiling] * 1e12) * 1e3)
    rate = round(flops / (ms * 1e-3) / 1e12, 3) if flops else None
    row = {
        "op": op.name, "impl": impl.name, "shape": op.shape_name(shape), "ms": round(ms, 4),
        "tflops": rate if op.work == "flop" else None,
        "tbps": round(nbytes / (ms * 1e-3) / 1e12, 3),
        "floor_fraction": round(floor_ms / ms, 4),
    }  # fmt: skip
    if op.work != "flop":  # e.g. "texps": tera-exponentials per second
        row[f"t{op.work}s"] = rate
    return row


def relative_error(got: torch.Tensor, want: torch.Tensor, floor: float = 1.0) -> float:
    """The GPU checks' measure: max |got - want| over max(max |want|, ``floor``), in ``want``'s (wide) dtype.

    Relative to the largest reference entry, so one limit serves outputs and gradients of
    any magnitude above the floor; NaN in ``got`` gives NaN, which fails every ``err < limit``.
    ``floor`` is the absolute scale below which the comparison turns absolute, as in
    tests/compare.py: the checks draw their inputs of order 1, so a result whose exact value
    is zero or far below its terms (a gradient that cancels) carries rounding of order
    ``u * 1``, and dividing that by a tiny ``max |want|`` would report a huge "relative"
    error for no fault. A quantity small by construction passes its own scale as ``floor``."""
    if want.numel() == 0:
        return 0.0
    scale = max(want.abs().max().item(), floor)
    return ((got.to(want.dtype) - want).abs().max() / scale).item()


def kernel_info(handle) -> dict:
    """Registers per thread and spilled bytes of a compiled Triton kernel (the handle a
    launch returns), where Triton reports them: the sweeps record them beside the times."""
    info = {}
    for key in ("n_regs", "n_spills"):
        value = getattr(handle, key, None)
        if isinstance(value, int):
            info[key] = value
    return info


def graphed(fn: Callable[[], Any], grads: list | None = None) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (after a warm-up on a side stream, as PyTorch requires);
    returns its replay. Gradients are reset first, so the graph assigns them rather than
    accumulating."""

    def reset():
        for x in grads or ():
            x.grad = None

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            reset()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def time_one(op: Op, impl: Impl, shape: dict, device: str = "cuda", seed: int = 0, eager: bool = False) -> float:
    """Milliseconds of one (op, impl, shape), in this process: graph replays if ``impl.graph``
    (and not ``eager``), else the eager calls."""
    inputs = op.make_inputs(shape, device, seed)
    fn = impl.build(shape, inputs)
    torch.cuda.synchronize()
    if impl.graph and not eager:
        replay = graphed(fn, inputs.get("grads"))
        ms = time_ms(replay)
        del replay
    else:
        ms = time_ms(fn, grads=inputs.get("grads"))
    del inputs, fn
    torch.cuda.empty_cache()
    return ms


def time_isolated(op: Op, impl: Impl, shape: dict, limit_s: float) -> tuple[float | None, str | None]:
    """Time in a child process (``python -m benchmarks.run --one ...``), killed after ``limit_s``."""
    cmd = [sys.executable, "-m", "benchmarks.run", "--one", op.name, impl.name, json.dumps(shape)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return None, f"did not finish within {limit_s:.0f} s (compiling), skipped"
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return float(line.split()[1]), None
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return None, f"failed: {tail[0][:200]}"


def _time_in_process(op: Op, impl: Impl, shape: dict, notes: list, where: str, ceilings: dict,
                     eager: list | None) -> float:
    """:func:`time_one` for :func:`run_ops`: graph replays where the implementation asks for
    them (eagerly, with a note, if the capture is refused), and its eager time into ``eager``."""
    if not impl.graph:
        return time_one(op, impl, shape)
    try:
        ms = time_one(op, impl, shape)
    except Exception as e:  # capture refused: fall back to eager, and say so
        notes.append(f"{where}: CUDA graph capture failed ({type(e).__name__}: {e}); timed eagerly")
        ms = time_one(op, impl, shape, eager=True)
    if eager is not None:
        eager.append(make_row(op, impl, shape, time_one(op, impl, shape, eager=True), ceilings))
        print("eager", json.dumps(eager[-1]), flush=True)
    return ms


def run_ops(ops: list[Op], ceilings: dict, notes: list[str], isolate_budget_s: float = 300.0,
            shape_filter: Callable[[dict], bool] = lambda s: True, eager: list | None = None,
            max_seconds: float | None = None, on_row: Callable[[], None] = lambda: None,
            rows: list | None = None) -> list[dict]:
    """Time every (op, shape, impl) that applies; one result row each, a note for each skip.
    Graph-timed implementations are also timed eagerly into ``eager`` (rows of the same schema).

    ``max_seconds``: a family (``scan`` of ``scan.fwd``) that has spent this long starts no
    further rows (a note names each skipped row). ``on_row()`` is called after every row,
    so that the caller can write the result file as it grows: a run stopped from outside
    keeps every row measured before; the rows are appended to ``rows`` if given. Within a
    family the rows run in the order: our kernel, the anchors, the readable references."""
    import time

    rows = [] if rows is None else rows
    budget = isolate_budget_s
    started: dict[str, float] = {}
    # Within a family, our kernel's rows first, then the anchors, then the readable references:
    # an anchor that compiles for minutes (fla's autotuning) or a slow reference then costs
    # only the rows after it, never the kernel's own.
    rank = {"seqbook.triton": 0, "seqbook.reference": 2}
    tasks = [(op, shape, impl) for op in ops for shape in op.shapes if shape_filter(shape)
             for impl in op.impls if impl.when(shape)]  # fmt: skip
    families = list(dict.fromkeys(op.name.split(".")[0] for op in ops))
    tasks.sort(key=lambda t: (families.index(t[0].name.split(".")[0]), rank.get(t[2].name, 1)))  # stable
    for op, shape, impl in tasks:
        family = op.name.split(".")[0]
        started.setdefault(family, time.monotonic())
        where = f"{op.name} {impl.name} {op.shape_name(shape)}"
        spent = time.monotonic() - started[family]
        if max_seconds is not None and spent > max_seconds:
            notes.append(f"{where}: skipped, the family {family} spent its {max_seconds:.0f} s")
            print("skipped:", where, f"(family past {max_seconds:.0f} s)", flush=True)
            continue
        why = impl.available()
        if why:
            notes.append(f"{where}: {why}")
            continue
        if impl.isolate_s:
            if budget <= 0:
                notes.append(f"{where}: skipped, the time budget for isolated runs is spent")
                continue
            start = time.monotonic()
            ms, why = time_isolated(op, impl, shape, min(impl.isolate_s, budget))
            budget -= time.monotonic() - start
            if ms is None:
                notes.append(f"{where}: {why}")
                print("skipped:", where, why, flush=True)
                continue
        else:
            try:
                ms = _time_in_process(op, impl, shape, notes, where, ceilings, eager)
            except Exception as e:  # out of memory at a long length, an anchor's error: a note, not the end
                notes.append(f"{where}: failed, {type(e).__name__}: {str(e)[:300]}")
                print("failed:", where, type(e).__name__, str(e)[:300], flush=True)
                torch.cuda.empty_cache()
                continue
        rows.append(make_row(op, impl, shape, ms, ceilings))
        print(json.dumps(rows[-1]), flush=True)
        on_row()
    return rows
