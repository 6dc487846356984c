"""The parts of the benchmark suite that need no GPU: the registry listing, and the error
measure every GPU check uses (a wrong measure would pass a wrong kernel on the GPU)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.suite import relative_error

ROOT = Path(__file__).resolve().parents[1]


def test_relative_error_is_scale_aware_and_fails_nan():
    want = torch.tensor([1000.0, -2000.0, 4000.0], dtype=torch.float64)
    got = (want + torch.tensor([0.0, 4.0, 0.0], dtype=torch.float64)).float()  # float32 against float64
    assert math.isclose(relative_error(got, want), 1e-3, rel_tol=1e-6)
    # the same at any scale above the floor; below it, absolute (floor 1 by default, as tests/compare.py)
    assert math.isclose(relative_error(got * 1e-6, want * 1e-6, floor=1e-9), 1e-3, rel_tol=1e-4)
    assert math.isclose(relative_error(got * 1e-6, want * 1e-6), 4e-6, rel_tol=1e-4)
    assert math.isnan(relative_error(torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, 1.0], dtype=torch.float64)))
    assert relative_error(torch.zeros(3), torch.zeros(3, dtype=torch.float64)) == 0.0
    # a zero reference: rounding-sized values pass as absolute errors, an error of order 1 still fails
    assert relative_error(torch.full((3,), 1e-7), torch.zeros(3, dtype=torch.float64)) < 1e-6
    assert relative_error(torch.ones(3), torch.zeros(3, dtype=torch.float64)) == 1.0
    c = torch.tensor([1 + 1j, 2 - 2j], dtype=torch.complex128)
    assert math.isclose(relative_error(c.to(torch.complex64) + 0.01j, c), 0.01 / abs(2 - 2j), rel_tol=1e-5)


def test_listing_needs_no_gpu():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--list"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for op in ("scan.fwd", "ssm_kernel.fwd", "cauchy.fwd", "selective_scan.fwdbwd", "ssd.fwd", "attention.fwd",
               "linear_attention.fwd", "gla.fwdbwd", "rwkv6.fwd", "delta_rule.fwdbwd", "rwkv7.fwd", "rwkv4.fwdbwd"):  # fmt: skip
        assert op in proc.stdout, f"{op} missing from the registry:\n{proc.stdout[:2000]}"


def test_run_ops_kernel_rows_first_and_a_family_stops_past_its_time(monkeypatch):
    """``run_ops`` without a GPU: fake ops whose timing advances a fake clock by 1 s. Within a
    family our kernel's rows come first, then anchors, then references; a family past
    ``max_seconds`` starts no further row (a note each) and the next family starts afresh;
    ``on_row`` runs after every row."""
    import time as _time

    from benchmarks import suite

    clock = [0.0]

    def fake_time_one(op, impl, shape, device="cuda", seed=0, eager=False):
        clock[0] += 1.0
        return 0.5

    monkeypatch.setattr(suite, "time_one", fake_time_one)
    monkeypatch.setattr(_time, "monotonic", lambda: clock[0])

    def op(name):
        impls = [suite.Impl(n, build=lambda s, i: None) for n in ("anchor:x", "seqbook.reference", "seqbook.triton")]
        return suite.Op(name, [dict(L=1), dict(L=2)], lambda s: f"L={s['L']}", lambda s, d, seed: {},
                        lambda s: 1000, impls)  # fmt: skip

    calls, notes = [], []
    rows = suite.run_ops([op("a.fwd"), op("b.fwd")], {"copy_TBps": 1.0}, notes, max_seconds=2.5,
                         on_row=lambda: calls.append(1))  # fmt: skip
    got = [(r["op"], r["impl"], r["shape"]) for r in rows]
    assert got[:3] == [("a.fwd", "seqbook.triton", "L=1"), ("a.fwd", "seqbook.triton", "L=2"),
                       ("a.fwd", "anchor:x", "L=1")]  # fmt: skip
    assert [g for g in got if g[0] == "b.fwd"] == [("b.fwd", "seqbook.triton", "L=1"),
                                                  ("b.fwd", "seqbook.triton", "L=2"), ("b.fwd", "anchor:x", "L=1")]  # fmt: skip
    assert len(rows) == 6 and len(calls) == 6
    skipped = [n for n in notes if "skipped, the family" in n]
    assert len(skipped) == 6 and all("seqbook.triton" not in n for n in skipped)


def test_length_sweep_shapes_only_with_lengths():
    """``--lengths`` times the length-sweep shapes alone; ``--quick`` and full runs leave them out,
    and ``--quick`` keeps only the targets."""
    from benchmarks.run import shape_chosen

    sweep = dict(B=1, L=8192, H=16, d=128, lengths=True)
    target, other, at_4096 = dict(L=16384, target=True), dict(L=8192), dict(L=4096)
    assert shape_chosen(sweep, lengths=True) and not shape_chosen(target, lengths=True)
    assert not shape_chosen(sweep) and not shape_chosen(sweep, quick=True)
    assert shape_chosen(other) and not shape_chosen(other, quick=True)
    assert shape_chosen(target, quick=True) and shape_chosen(at_4096, quick=True)
    assert not shape_chosen(dict(sweep, L=4096), quick=True)  # a sweep shape at 4096 is not a quick one


def test_gated_checks_pass_a_right_kernel_and_fail_a_wrong_one(monkeypatch):
    """benchmarks.gated's GPU checks at a tiny float32 shape (fla left out), compiled on a GPU and
    through the interpreter on a CPU: every family's kernel passes against the float64 reference,
    and an output off by 1% fails the check that would otherwise pass it."""
    import benchmarks.gated as g

    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(g, "CHECK_SHAPE", dict(B=1, L=20, H=1, d=16, dtype="fp32"))
    monkeypatch.setattr(g, "RWKV4_CHECK", dict(B=1, L=20, C=16, dtype="fp32"))
    monkeypatch.setattr(g, "_fla", lambda family: (None, "left out on the CPU"))
    for family in ("gla", "rwkv6", "delta_rule", "rwkv7", "rwkv4"):
        result = g._check(family)(device)
        assert not result["failures"], (family, result["failures"])
        assert result["errors"] and max(result["errors"].values()) < 1e-5, (family, result["errors"])
    right = g._kernel
    monkeypatch.setattr(g, "_kernel", lambda family: (lambda i: 1.01 * right(family)(i)))
    result = g._check("gla")(device)
    assert any("kernel: o relative error" in f for f in result["failures"]), result["failures"]
