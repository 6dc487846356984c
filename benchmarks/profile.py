"""Where the time goes: one registered (op, implementation, shape) under ``torch.profiler``,
its GPU time split by kernel.

    python -m benchmarks.profile gla.fwdbwd                       # our kernel, the op's first quick shape
    python -m benchmarks.profile ssd.fwd --impl anchor:mamba_ssm.mamba_chunk_scan_combined
    python -m benchmarks.profile rwkv7.fwd --shape '{"B": 1, "L": 16384, "H": 16, "d": 128, "dtype": "bf16"}'

Prints one line per kernel: calls per run, microseconds per run, share of the GPU time.
The run is the suite's closure for that row (the same inputs and the same call), after two
warm-up calls so that compilation and autotuning are not profiled.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections import defaultdict

import seqbook  # noqa: F401  (first: see seqbook.backend)
import torch

from . import suite
from .run import OP_MODULES, shape_chosen


def profile(op_name: str, impl_name: str = "seqbook.triton", shape: dict | None = None, runs: int = 10) -> list[tuple]:
    """``[(kernel name, calls per run, us per run, share)]``, largest first."""
    op = suite.REGISTRY[op_name]
    impl = next((i for i in op.impls if i.name == impl_name), None)
    if impl is None:
        raise SystemExit(f"{op_name} has no implementation {impl_name!r}: {[i.name for i in op.impls]}")
    if shape is None:
        shape = next(s for s in op.shapes if shape_chosen(s, quick=True))
    inputs = op.make_inputs(shape, "cuda", 0)
    fn = impl.build(shape, inputs)

    def once():
        for x in inputs.get("grads") or ():
            x.grad = None
        fn()

    for _ in range(2):
        once()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            once()
        torch.cuda.synchronize()
    total_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total_us[event.name] += event.device_time
            calls[event.name] += 1
    whole = sum(total_us.values()) or 1.0
    table = [(name, calls[name] / runs, us / runs, us / whole) for name, us in total_us.items()]
    return sorted(table, key=lambda row: -row[2])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("op", help="a registered op, e.g. gla.fwdbwd (python -m benchmarks.run --list)")
    parser.add_argument("--impl", default="seqbook.triton")
    parser.add_argument("--shape", default=None, help="the shape as JSON (default: the op's first quick shape)")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    for name in OP_MODULES:
        importlib.import_module(name)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.profile needs a CUDA device")
    shape = json.loads(args.shape) if args.shape else None
    table = profile(args.op, args.impl, shape, args.runs)
    total = sum(row[2] for row in table)
    print(f"{args.op} {args.impl} {json.dumps(shape) if shape else '(first quick shape)'}: {total:.1f} us of GPU time per run")
    for name, n, us, share in table:
        print(f"  {us:9.1f} us {share:6.1%} {n:5.1f}x  {name[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
