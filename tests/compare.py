"""One comparison for every numerical test: a result against its float64 reference.

``assert_near(got, want, rel, what, floor=1.0)`` passes when ``got`` has ``want``'s shape,
is finite, and

    max |got - want|  <=  rel * max(max |want|, floor).

**rel**, normwise. The error is measured against the largest reference entry, not entry by
entry: a kernel's rounding errors are of the size of the terms it adds up, so an entry that
cancels to near zero carries the rounding of the large ones, and an entrywise relative test
would fail on it for no fault. ``rel`` is fitted at each call site to the dtype the result
was computed in and to the reductions behind it, in units of the unit roundoff
``u = eps / 2`` (:func:`unit_roundoff`; float32: 6.0e-8, float16: 4.9e-4, bfloat16: 3.9e-3):

- float32 kernels, ``rel = 1e-5``, about 170 u. A sum of ``n`` terms of random sign, rounded
  in float32, is off by about ``u sqrt(n)`` times the terms' size (rounding errors add up as
  a random walk; Higham and Mary 2019), and its value is itself about ``sqrt(n)`` times that
  size: the normwise error stays a few u whatever ``n``. The kernels add in blocks (16 to 128
  terms, then across blocks), which only shortens the walks. What remains is the recurrences
  (scans, decayed states) that carry an error from step to step: 170 u leaves room for tens
  of steps of carried rounding, with a margin of more than ten over what the kernels show.
  Where a test's problem adds a known error on top (a float32 cumulative sum subtracted from
  another, in a long strongly decaying sequence), the call site adds it and says why.
- 16-bit inputs: a few times their own rounding (``(4e-3, 1e-2)`` for float16, about 8 and
  20 u, outputs and gradients; ``(2e-2, 5e-2)`` for bfloat16): the inputs, and the
  probabilities or products rounded back to 16 bits before a float32 product, dominate.

**floor**: an absolute floor, the magnitude of the terms the exact result is a sum of.
Where the exact result is zero or far below its terms (attention's ``dq`` at length 1,
where ``P = 1`` and ``dP - delta`` cancels exactly), the kernel returns the rounding of those
terms, of order ``u`` times their size, and dividing by ``max |want|`` (once clamped to
1e-30) turned a rounding-sized value into a "relative error" of 1e23, failing on one
machine and passing on another. The floor makes that case an absolute comparison with
``rel * floor``. Every kernel test draws its inputs from N(0, 1) (or bounded by 1), so the
terms are of order 1 and the default ``floor=1.0`` is that scale (with ``rel = 1e-5`` that is
an absolute 1e-5, PyTorch's own default ``atol`` for float32 in ``torch.testing``); a test
with larger inputs gets larger results, above the floor. A quantity that is small by
construction (a gradient that reaches the initial state through a strong decay) has small
terms too: its call site passes their size as the floor, so that its comparison stays
relative to its own scale.
"""

from __future__ import annotations

import torch

F64 = torch.float64


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps / 2``: the largest relative error of one rounding to ``dtype`` (complex: its parts')."""
    real = torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype
    return torch.finfo(real).eps / 2


def relative_error(got: torch.Tensor, want: torch.Tensor, floor: float = 1.0) -> float:
    """``max |got - want| / max(max |want|, floor)``, in ``want``'s precision (float64 or complex128)."""
    wide = torch.complex128 if (got.is_complex() or want.is_complex()) else F64
    diff = (got.to(wide) - want.to(wide)).abs()
    scale = max(want.to(wide).abs().max().item() if want.numel() else 0.0, floor)
    return (diff.max().item() if diff.numel() else 0.0) / scale


def assert_near(got, want: torch.Tensor, rel: float, what: str, *, floor: float = 1.0) -> None:
    """``got`` matches the reference ``want``: same shape, finite, and
    ``max |got - want| <= rel * max(max |want|, floor)`` (see the module docstring)."""
    assert floor > 0, "the floor must be positive"
    assert got is not None, f"{what}: no result (a gradient that was not computed?)"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: not finite"
    err = relative_error(got, want, floor)
    assert err <= rel, f"{what}: error {err:.2e} > {rel:.1e} (relative to max(max|want|, {floor:g}))"


def run_steps(module, u: torch.Tensor):
    """``module.step`` over ``u (batch, length, d)`` from its empty state (``module.init_state``): the
    outputs stacked ``(batch, length, d)`` and the last state."""
    state = module.init_state(u.shape[0], device=u.device, dtype=u.dtype)
    outs = []
    for t in range(u.shape[1]):
        y_t, state = module.step(u[:, t], state)
        outs.append(y_t)
    return torch.stack(outs, dim=1), state


def assert_steps_equal_forward(module, x: torch.Tensor, dy: torch.Tensor, what: str, *, rel: float = 1e-11,
                               every_parameter: bool = True) -> None:
    """Decoding one token at a time (:func:`run_steps`) is the same function as ``module(x)``: the
    outputs, the input's gradient and every parameter's gradient of ``(y * dy).sum()`` agree within
    ``rel`` (float64 modules: 1e-11; the parameters' gradients with a floor of 1e-3, the size below
    which a gradient is a sum of cancelling terms). ``every_parameter``: also assert that a gradient
    reaches every parameter (it is not zero), so that the comparison is not of two zeros."""
    results = []
    for run in (lambda u: module(u), lambda u: run_steps(module, u)[0]):
        module.zero_grad()
        xx = x.clone().requires_grad_()
        y = run(xx)
        (y * dy).sum().backward()
        results.append((y.detach(), xx.grad, {n: p.grad.clone() for n, p in module.named_parameters()}))
    (y_f, dx_f, g_f), (y_s, dx_s, g_s) = results
    assert_near(y_s, y_f, rel, f"{what}: step vs forward")
    assert_near(dx_s, dx_f, rel, f"{what}: dx")
    for n in g_f:
        assert_near(g_s[n], g_f[n], rel, f"{what}: d{n}", floor=1e-3)
        if every_parameter:
            assert g_f[n].abs().max() > 0, f"{what}: no gradient reaches {n}"
