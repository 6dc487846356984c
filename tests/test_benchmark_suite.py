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
    assert math.isclose(relative_error(got * 1e-6, want * 1e-6), 1e-3, rel_tol=1e-4)  # the same at any scale
    assert math.isnan(relative_error(torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, 1.0], dtype=torch.float64)))
    assert relative_error(torch.zeros(3), torch.zeros(3, dtype=torch.float64)) == 0.0
    assert relative_error(torch.ones(3), torch.zeros(3, dtype=torch.float64)) > 1e20  # zero reference: any error is huge
    c = torch.tensor([1 + 1j, 2 - 2j], dtype=torch.complex128)
    assert math.isclose(relative_error(c.to(torch.complex64) + 0.01j, c), 0.01 / abs(2 - 2j), rel_tol=1e-5)


def test_listing_needs_no_gpu():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--list"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for op in ("scan.fwd", "ssm_kernel.fwd", "cauchy.fwd", "selective_scan.fwdbwd", "ssd.fwd", "attention.fwd",
               "linear_attention.fwd"):  # fmt: skip
        assert op in proc.stdout, f"{op} missing from the registry:\n{proc.stdout[:2000]}"
