"""The shared comparison of tests/compare.py: what it accepts and what it must refuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compare import assert_near, relative_error, unit_roundoff

F32 = torch.float32


def test_unit_roundoff():
    assert unit_roundoff(F32) == 2.0**-24
    assert unit_roundoff(torch.float64) == 2.0**-53
    assert unit_roundoff(torch.float16) == 2.0**-11
    assert unit_roundoff(torch.bfloat16) == 2.0**-8
    assert unit_roundoff(torch.complex64) == 2.0**-24


@pytest.mark.parametrize("ulps", [0, 1, 4, 30, 150])
def test_an_exact_zero_reference_accepts_rounding(ulps):
    # Attention's dq at length 1 is 0 exactly; a kernel returns the rounding of terms of
    # order 1, i.e. a multiple of u. Any such value, of either sign, up to 150 u, passes at
    # float32's 1e-5 (about 170 u); it used to be divided by 1e-30.
    want = torch.zeros(1, 1, 1, 64, dtype=torch.float64)
    got = torch.full((1, 1, 1, 64), ulps * unit_roundoff(F32), dtype=F32)
    got[..., ::2] *= -1
    assert_near(got, want, 1e-5, "dq at length 1")


def test_an_exact_zero_reference_refuses_a_real_error():
    want = torch.zeros(3, 4, dtype=torch.float64)
    got = torch.zeros(3, 4, dtype=F32)
    got[1, 2] = 1e-3
    with pytest.raises(AssertionError, match=r"error 1.00e-03 > 1.0e-05"):
        assert_near(got, want, 1e-5, "x")


def test_the_error_is_normwise_and_the_floor_only_matters_below_it():
    want = torch.tensor([100.0, 1e-9], dtype=torch.float64)
    # an entry that cancels to ~0 may carry the rounding of the large one: 1e-4 on 100 is 1e-6
    got = torch.tensor([100.0, 1e-4], dtype=F32)
    assert relative_error(got, want) == pytest.approx(1e-6, rel=1e-3)
    assert_near(got, want, 1e-5, "x")
    # references above the floor are held to rel of their own size, not of the floor
    small = torch.tensor([0.5], dtype=torch.float64)
    assert relative_error(small + 1e-6, small, floor=0.01) == pytest.approx(2e-6, rel=1e-3)
    assert relative_error(small + 1e-6, small) == pytest.approx(1e-6, rel=1e-3)  # floor 1 > 0.5


def test_refuses_nan_inf_wrong_shape_and_missing():
    want = torch.ones(2, 3, dtype=torch.float64)
    for bad in (float("nan"), float("inf")):
        got = torch.ones(2, 3)
        got[0, 1] = bad
        with pytest.raises(AssertionError, match="not finite"):
            assert_near(got, want, 1e-5, "x")
    with pytest.raises(AssertionError, match=r"shape \(3, 2\) != \(2, 3\)"):
        assert_near(torch.ones(3, 2), want, 1e-5, "x")
    with pytest.raises(AssertionError, match="no result"):
        assert_near(None, want, 1e-5, "x")


def test_complex_and_empty():
    want = torch.tensor([1 + 1j, 0j], dtype=torch.complex128)
    assert_near(want.to(torch.complex64), want, 1e-6, "k")
    with pytest.raises(AssertionError):
        assert_near((want + 1e-3j).to(torch.complex64), want, 1e-5, "k")
    assert_near(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.float64), 1e-5, "empty")


def test_no_test_divides_by_a_clamped_maximum():
    # The old helpers' formula, max|got - want| / max|want|.clamp_min(1e-30), turned a
    # rounding-sized value next to an exact zero into a "relative error" of 1e23. New tests
    # use assert_near (its floor) instead of a copy of that formula.
    here = Path(__file__).parent
    offenders = [p.name for p in sorted(here.glob("**/*.py")) if p.name != Path(__file__).name
                 and "clamp_min(1e-30)" in p.read_text()]  # fmt: skip
    assert not offenders, f"divide by max|want| clamped to 1e-30 (use compare.assert_near): {offenders}"
