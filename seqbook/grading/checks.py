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


def assert_close(actual, expected: torch.Tensor, name: str, *, rtol: float = 1e-8, atol: float = 1e-8) -> None:
    """``actual`` matches ``expected`` in type, shape, dtype and value (NaN where it is NaN);
    real or complex.

    Values must satisfy ``|actual - expected| <= atol + rtol * |expected|``
    entrywise; the message names the worst entry.
    """
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
