"""Run the GPU benchmark suite: check, measure the ceilings, time, write the result file, print a table.

``python -m benchmarks.run [--ops scan] [--quick] [--sweep] [--out DIR]`` (``make bench``);
``python -m benchmarks.run --list`` prints the registry (ops, shapes, implementations) and
needs no GPU.

1. Every registered family's correctness check against its float64 reference, on the GPU
   (a failure is reported, marked in the JSON and in the exit code; the timings still run).
2. The ceilings, measured in this run: copy bandwidth and bf16 matrix rate.
3. Every (op, shape, implementation) in the registry: median milliseconds, TB/s, TFLOP/s
   where FLOPs bound the op, fraction of the floor.
4. ``<DIR>/<date>-<gpu><tag>.json`` in the schema of shared/GPU.md ("Result files"), with the
   check's errors, notes on skipped anchors, and the eager times of graph-timed rows. It is
   rewritten after every row (``"complete": false`` until the last), so that a run stopped
   from outside keeps what it measured; ``--max-seconds S`` ends a family's timing once it
   has spent S seconds (its remaining rows become notes). With ``--sweep``, the kernel
   sweeps in ``<DIR>/sweeps/<date>-<gpu><tag>-<family>.json``.
5. A short table, last.

To add an operation: a module that registers ``Op``s (see :mod:`benchmarks.suite` and
:mod:`benchmarks.scan`), named in ``OP_MODULES`` below.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib
import json
import os
import subprocess
import sys

import seqbook  # noqa: F401  (first: see seqbook.backend)
import torch

from . import suite

#: The modules that register operations: one line per family.
OP_MODULES = ["benchmarks.scan", "benchmarks.ssm_kernel", "benchmarks.cauchy", "benchmarks.selective_scan",
              "benchmarks.attention", "benchmarks.linear_attention", "benchmarks.gated"]


def _commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=suite.ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=suite.ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        return done.stdout.strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"


def _gpu_tag(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'."""
    return name.replace("NVIDIA ", "").split()[0].lower()


def table(rows: list[dict]) -> str:
    """Every row, with its speed-up over the reference at the same (op, shape)."""
    ref = {(r["op"], r["shape"]): r["ms"] for r in rows if r["impl"] == "seqbook.reference"}
    lines = [f"{'op':<20} {'impl':<38} {'shape':<40} {'ms':>9} {'TB/s':>6} {'floor':>6} {'x ref':>7}"]
    for r in rows:
        speedup = ref.get((r["op"], r["shape"]), float("nan")) / r["ms"]
        tbps = f"{r['tbps']:.2f}" if r["tbps"] is not None else "-"
        lines.append(f"{r['op']:<20} {r['impl']:<38} {r['shape']:<40} {r['ms']:>9.4f} {tbps:>6} "
                     f"{r['floor_fraction']:>6.1%} {speedup:>7.1f}")  # fmt: skip
    return "\n".join(lines)


def short_table(rows: list[dict], eager: list[dict] = ()) -> str:
    """The kernel against the reference, one line per (op, shape), with the kernel's eager time:
    the table printed last."""
    by = {}
    for r in rows:
        by.setdefault((r["op"], r["shape"]), {})[r["impl"]] = r
    eager_ms = {(r["op"], r["shape"]): r["ms"] for r in eager if r["impl"] == "seqbook.triton"}
    lines = [f"{'op':<20} {'shape':<40} {'triton ms':>10} {'TB/s':>6} {'floor':>6} {'eager ms':>9} "
             f"{'ref ms':>9} {'x ref':>7}"]  # fmt: skip
    for (op, shape), impls in by.items():
        k, ref = impls.get("seqbook.triton"), impls.get("seqbook.reference")
        if k is None:
            continue
        ref_ms = ref["ms"] if ref else float("nan")
        lines.append(f"{op:<20} {shape:<40} {k['ms']:>10.4f} {k['tbps']:>6.2f} {k['floor_fraction']:>6.1%} "
                     f"{eager_ms.get((op, shape), float('nan')):>9.4f} {ref_ms:>9.3f} {ref_ms / k['ms']:>7.1f}")  # fmt: skip
    return "\n".join(lines)


def listing(families=None) -> str:
    """The registry as text: per op, its shapes (with the floor's bytes and FLOPs) and
    implementations; then the families with a GPU check and a sweep."""
    lines = []
    for name, op in suite.REGISTRY.items():
        if families and name.split(".")[0] not in families:
            continue
        ceiling = f", {getattr(op, 'work', 'flop')} count held to {op.flops_ceiling}" if op.flops else ""
        lines.append(f"{name}{ceiling}")
        for shape in op.shapes:
            unit = "FLOP" if getattr(op, "work", "flop") == "flop" else op.work
            flops = f", {op.flops(shape) / 1e9:.1f} G{unit}" if op.flops else ""
            impls = [i.name for i in op.impls if i.when(shape)]
            lines.append(f"  {op.shape_name(shape):<40} {op.bytes(shape) / 1e6:10.1f} MB{flops}   {', '.join(impls)}")
    lines.append("checks: " + ", ".join(sorted(suite.CHECKS)))
    lines.append("sweeps: " + ", ".join(sorted(suite.SWEEPS)))
    return "\n".join(lines)


def shape_chosen(shape: dict, lengths: bool = False, quick: bool = False) -> bool:
    """Whether a run times ``shape``: with ``lengths`` only the length-sweep shapes (marked
    ``lengths=True``); otherwise never those, and with ``quick`` only the target shapes
    (``target`` or ``quick``, or ``L`` = 4096 or no length)."""
    if lengths:
        return bool(shape.get("lengths"))
    if shape.get("lengths"):
        return False
    return not quick or bool(shape.get("target") or shape.get("quick") or shape.get("L") in (None, 4096))


def _one(op_name: str, impl_name: str, shape_json: str) -> int:
    """Child-process mode for isolated implementations: time one row, print ``RESULT <ms>``."""
    op = suite.REGISTRY[op_name]
    impl = next(i for i in op.impls if i.name == impl_name)
    ms = suite.time_one(op, impl, json.loads(shape_json))
    print("RESULT", ms, flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="*", default=None, help="families to run (default: all), e.g. scan")
    parser.add_argument("--quick", action="store_true",
                        help="only the target shapes (marked target=True or quick=True, or at L=4096): no length sweep")
    parser.add_argument("--lengths", action="store_true",
                        help="only the length-sweep shapes (marked lengths=True: fixed batch and heads, L = 1k ... 64k), "
                             "for the book's time-against-length plots; without it they are left out")
    parser.add_argument("--no-checks", action="store_true",
                        help="skip the correctness checks (a second run in the same session, e.g. --lengths)")
    parser.add_argument("--list", action="store_true", help="print the registered ops, shapes and implementations, "
                        "with the floor's bytes and FLOPs, and exit (no GPU needed)")
    parser.add_argument("--sweep", action="store_true", help="also sweep the kernels' configurations")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(suite.ROOT / "benchmarks" / "results"))
    parser.add_argument("--isolate-budget", type=float, default=300.0,
                        help="seconds, in all, for anchors timed in a child process (compilers)")  # fmt: skip
    parser.add_argument("--commit", default=None, help="git sha of the code measured (default: from git)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="per family: once a family has spent this long timing, its remaining rows are skipped "
                             "(with a note)")  # fmt: skip
    parser.add_argument("--in-process", action="store_true",
                        help="time every row in this process, also those marked for a child process (anchors whose "
                             "autotuning is already cached)")
    parser.add_argument("--impls", nargs="*", default=None,
                        help="time only the implementations whose names start with one of these, e.g. seqbook.triton")
    parser.add_argument("--tag", default="", help="suffix of the result file's name: <date>-<gpu><tag>.json")
    parser.add_argument("--one", nargs=3, metavar=("OP", "IMPL", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in OP_MODULES:
        importlib.import_module(name)
    if args.one:
        return _one(*args.one)
    if args.list:
        print(listing(args.ops))
        return 0
    if not torch.cuda.is_available():
        print("benchmarks.run needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    families = args.ops or sorted({name.split(".")[0] for name in suite.REGISTRY})
    # in the order of --ops: a run stopped by its time-out keeps the families named first
    ops = [op for family in families for name, op in suite.REGISTRY.items() if name.split(".")[0] == family]
    if args.in_process:
        ops = [dataclasses.replace(op, impls=[dataclasses.replace(i, isolate_s=None) for i in op.impls]) for op in ops]
    if args.impls:
        ops = [dataclasses.replace(op, impls=[i for i in op.impls if i.name.startswith(tuple(args.impls))]) for op in ops]

    name = torch.cuda.get_device_name()
    result = {"device": name, "date": datetime.date.today().isoformat(), "commit": args.commit or _commit(),
              "torch": torch.__version__, "triton": triton.__version__, "ceilings": {}, "rows": [],
              "check": {}, "notes": [],
              "timing": "median of triton.testing.do_bench; seqbook.* rows: CUDA-graph replays (GPU time); "
                        "anchors: eager calls; 'eager' holds the seqbook.* rows timed eagerly",
              "eager": [], "complete": False}  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    stem = f"{result['date']}-{_gpu_tag(name)}{args.tag}"
    path = os.path.join(args.out, f"{stem}.json")

    def write():
        # Rewritten whole after every row (then renamed over the old file, so that a run
        # killed mid-write leaves the previous version): a family that overruns its time-out
        # loses only the rows it had not measured yet.
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)

    checks = result["check"]
    for family in families:
        if family in suite.CHECKS and not args.no_checks:
            try:
                checks[family] = suite.CHECKS[family]()
            except Exception as e:  # an anchor that breaks its check must not stop the timings
                checks[family] = {"errors": {}, "failures": [f"the check raised {type(e).__name__}: {str(e)[:300]}"]}
            bad = checks[family]["failures"]
            worst = max(checks[family]["errors"].values(), default=float("nan"))
            print(f"check {family}: largest relative error {worst:.1e}", "FAILED" if bad else "ok", flush=True)
            for line in bad:
                print("  FAILED:", line)
            write()
    ceilings = suite.measure_ceilings()
    result["ceilings"] = ceilings
    print("ceilings:", ceilings, flush=True)
    write()
    notes, rows, eager = result["notes"], result["rows"], result["eager"]
    chosen = functools.partial(shape_chosen, lengths=args.lengths, quick=args.quick)
    suite.run_ops(ops, ceilings, notes, isolate_budget_s=args.isolate_budget, shape_filter=chosen, eager=eager,
                  max_seconds=args.max_seconds, on_row=write, rows=rows)  # fmt: skip
    result["complete"] = True
    write()
    sweeps = {}
    for family in families:
        if args.sweep and family in suite.SWEEPS:
            sweeps[family] = suite.SWEEPS[family]()
            # Sweeps go beside, in sweeps/: the book's page reads only the result files.
            os.makedirs(os.path.join(args.out, "sweeps"), exist_ok=True)
            meta = {k: result[k] for k in ("device", "date", "commit", "torch", "triton")}
            with open(os.path.join(args.out, "sweeps", f"{stem}-{family}.json"), "w") as f:
                json.dump(dict(meta, family=family, sweep=sweeps[family]), f, indent=1)
    print(table(rows))
    for note in notes:
        print("note:", note)
    print("wrote", path)
    print(short_table(rows, eager))
    failed = any(c["failures"] for c in checks.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
