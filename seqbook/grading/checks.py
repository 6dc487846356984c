"""Helpers for grading tests: comparisons whose failure messages a student can act on.

A grading test's failure message lands in the gradebook as the student's
feedback, so every check says *what* differs (which output, its shape or dtype,
the largest error and where), never just ``assert False``.
"""

from __future__ import annotations

import torch


def as_tuple(result, names: tuple[str, ...], function: str) -> tuple:
    """Check that ``function`` returned a tuple/list of ``len(names)`` items, and return it."""
    if len(names) == 1:
        return (result,)
    if not isinstance(result, (tuple, list)) or len(result) != len(names):
        got = f"a {type(result).__name__}" if not isinstance(result, (tuple, list)) else f"{len(result)} values"
        raise AssertionError(f"{function} should return ({', '.join(names)}), got {got}")
    return tuple(result)


# ATen operators that factor, invert or solve with a matrix: what "without an N x N solve"
# forbids (FORBIDDEN = {"fn": DENSE_SOLVERS}); blocked however they are reached
# (torch.linalg.solve, torch.inverse, Tensor.inverse, matrix_power(-1), torch.ops.aten...).
DENSE_SOLVERS = [
    "aten::_linalg_solve_ex", "aten::linalg_solve_ex", "aten::linalg_solve", "aten::linalg_inv_ex",
    "aten::linalg_inv", "aten::inverse", "aten::linalg_lu_factor_ex", "aten::linalg_lu", "aten::lu_unpack",
    "aten::linalg_lu_solve", "aten::lu_solve", "aten::linalg_cholesky_ex", "aten::cholesky", "aten::cholesky_solve",
    "aten::cholesky_inverse", "aten::linalg_lstsq", "aten::linalg_pinv", "aten::pinverse", "aten::linalg_qr",
    "aten::_linalg_svd", "aten::linalg_svd", "aten::_linalg_eigh", "aten::linalg_eig", "aten::linalg_solve_triangular",
    "aten::triangular_solve", "aten::_linalg_det", "aten::linalg_det", "aten::det", "aten::linalg_tensorsolve",
    "aten::linalg_tensorinv", "aten::geqrf", "aten::ormqr", "aten::linalg_householder_product",
]


def matches(actual, expected: torch.Tensor, *, rtol: float, atol: float) -> bool:
    """True when ``assert_close(actual, expected, ...)`` would pass."""
    try:
        _compare(actual, expected, "value", rtol=rtol, atol=atol)
    except AssertionError:
        return False
    return True


def assert_close(actual, expected: torch.Tensor, name: str, *, rtol: float = 1e-8, atol: float = 1e-8,
                 mistakes: dict | None = None) -> None:
    """``actual`` matches ``expected`` in type, shape, dtype and value (NaN where it is NaN);
    real or complex.

    Values must satisfy ``|actual - expected| <= atol + rtol * |expected|``
    entrywise; the message names the worst entry.  ``mistakes`` maps a hint to
    what a common mistake returns ({"looks like Euler's B-bar (step * B), not ZOH's":
    step * B}); when ``actual`` is wrong but matches one (to the same tolerance), the
    message ends with that hint.
    """
    try:
        _compare(actual, expected, name, rtol=rtol, atol=atol)
    except AssertionError as exc:
        for hint, wrong in (mistakes or {}).items():
            if isinstance(wrong, torch.Tensor) and matches(actual, wrong, rtol=rtol, atol=atol):
                raise AssertionError(f"{exc}. Hint: {hint}") from None
        raise


def _compare(actual, expected: torch.Tensor, name: str, *, rtol: float, atol: float) -> None:
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"{name} should be a torch.Tensor, got {type(actual).__name__}")
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{name} has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{name} has dtype {actual.dtype}, expected {expected.dtype} (keep the inputs' dtype)")
    nan_mismatch = torch.isnan(actual) != torch.isnan(expected)
    if nan_mismatch.any():
        index = tuple(int(i) for i in nan_mismatch.nonzero()[0])
        raise AssertionError(
            f"{name} is NaN where the reference is not (or the other way round), first at index {index}"
        )
    # Complex entries are compared by the modulus of their difference.
    both = ~torch.isnan(expected)
    error = torch.where(both, (actual - expected).abs(), torch.zeros(expected.shape, dtype=expected.abs().dtype))
    bound = atol + rtol * expected.abs()
    bad = error > torch.where(both, bound, torch.ones_like(bound))
    if bad.any():
        flat = int((error - bound).flatten().argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), expected.shape))
        value = complex if expected.is_complex() else float
        raise AssertionError(
            f"{name} differs from the reference at {int(bad.sum())} of {expected.numel()} entries; "
            f"worst at index {index}: got {value(actual[index]):.10g}, expected {value(expected[index]):.10g} "
            f"(tolerance {atol:g} + {rtol:g}*|expected|)"
        )


def random_spd(*batch: int, n: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """A random, well-conditioned symmetric positive definite matrix of shape ``(*batch, n, n)``."""
    A = torch.randn(*batch, n, n, generator=generator, dtype=dtype)
    return A @ A.mT / n + 0.5 * torch.eye(n, dtype=dtype)
