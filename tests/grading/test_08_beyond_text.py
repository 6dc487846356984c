"""Grading tests for chapter 8's second page (beyond recall: language modelling and images): Exercises 1-3, 10 points.

Run by the grader (``python -m seqbook.grading grade ...``), one process per submission;
``submission`` holds the student's functions, running in a sandbox. The page's notebook declares
``{"seqbook": {"chapter": "08_beyond_text"}}`` in its metadata, so the grader picks this file for it
(the chapter's first page, head_to_head.ipynb, is graded by test_08_head_to_head.py). Each case earns
its share of the test's points (``credit``); the message names the case and what differs, with a hint
when the answer matches a common mistake. While the exercises run, ``seqbook.experiments_beyond``
(which holds the chapter's versions) is blocked.

The exercises are in chapters/08_head_to_head/beyond_text.ipynb ("Exercises").  Contract:
  Exercise 1  code_length_bits(logits (n, V), targets (n,) int64) -> float
              the bits an arithmetic coder driven by the model spends on ``targets``:
              -sum_i log2 softmax(logits_i)[targets_i]; finite for logits of any size.
  Exercise 2  neighbour_distance(order (side*side,) int64, side) -> (mean, max)
              over every pair of pixels that touch horizontally or vertically, the distance
              |pos[p] - pos[q]| between the steps at which the sequence reads them
              (order[t] = the pixel read at step t, so pos is order's inverse).
  Exercise 3  bidirectional_ema(u (batch, L, d), a (d,)) -> y (batch, L, d)
              y = h(u) + flip(h(flip(u))) with flip along time and h the causal EMA
              h_t = a h_{t-1} + (1 - a) u_t, h_{-1} = 0.
"""

import math

import pytest
import torch
from torch.nn import functional as F

from seqbook import digits
from seqbook.grading.checks import as_tuple, assert_close

F64 = torch.float64

BLOCKED = ["seqbook.experiments_beyond.*"]
FORBIDDEN = {"code_length_bits": BLOCKED, "neighbour_distance": BLOCKED, "bidirectional_ema": BLOCKED}


def _float_answer(got, want, what, mistakes=None, rtol=1e-9, atol=1e-9):
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        raise AssertionError(f"{what}: expected a number, got {type(got).__name__}")
    if not abs(got - want) <= atol + rtol * abs(want):
        hint = next((h for h, wrong in (mistakes or {}).items()
                     if wrong is not None and (abs(got - wrong) <= atol + rtol * abs(wrong)
                                               or (math.isnan(wrong) and math.isnan(got)))), None)  # fmt: skip
        if hint is None and not math.isfinite(got):
            hint = "a probability computed as exp(logit) / sum overflows: work with log-softmax (subtract the max)"
        raise AssertionError(f"{what}: got {got!r}, expected {want!r}" + (f". Hint: {hint}" if hint else ""))


# ---------------------------------------------------------------- Exercise 1


def _bits(logits, targets):
    return F.cross_entropy(logits, targets, reduction="sum").item() / math.log(2)


@pytest.mark.points(3)
def test_code_length_bits(submission, credit):
    """Exercise 1: -sum log2 p(target), stable for large logits."""
    gen = torch.Generator().manual_seed(810)
    with credit.case("uniform predictions over V = 64 symbols: log2 64 = 6 bits each"):
        logits, targets = torch.zeros(10, 64, dtype=F64), torch.randint(64, (10,), generator=gen)
        got = submission.code_length_bits(logits, targets)
        _float_answer(got, 60.0, "10 uniform symbols of 64",
                      {"that is in nats (natural log): divide by ln 2 for bits": 10 * math.log(64),
                       "the code length of a sequence is the SUM over its symbols, not the mean": 6.0})  # fmt: skip
    for n, V in [(1, 2), (37, 5), (200, 62)]:
        with credit.case(f"random logits, {n} symbols of {V}"):
            logits = torch.randn(n, V, generator=gen, dtype=F64) * 3
            targets = torch.randint(V, (n,), generator=gen)
            want = _bits(logits, targets)
            got = submission.code_length_bits(logits, targets)
            _float_answer(got, want, f"{n} symbols of {V}",
                          {"that is in nats (natural log): divide by ln 2 for bits": want * math.log(2),
                           "the code length of a sequence is the SUM over its symbols, not the mean": want / n,
                           "score the TARGET's probability (index the row by targets[i])":
                               _bits(logits, logits.argmax(-1))})  # fmt: skip
    with credit.case("large logits (scale 1000): the answer is finite"):
        logits = torch.randn(20, 10, generator=gen, dtype=F64) * 1000
        targets = torch.randint(10, (20,), generator=gen)
        got = submission.code_length_bits(logits, targets)
        _float_answer(got, _bits(logits, targets), "logits of size ~1000", rtol=1e-9, atol=1e-6)


# ---------------------------------------------------------------- Exercise 2


def _neighbour_distance(order: torch.Tensor, side: int):
    pos = torch.empty_like(order)
    pos[order] = torch.arange(len(order))
    grid = pos.reshape(side, side)
    d = torch.cat([(grid[:, 1:] - grid[:, :-1]).abs().reshape(-1), (grid[1:] - grid[:-1]).abs().reshape(-1)])
    return d.double().mean().item(), int(d.max())


def _with_diagonals(order, side):
    pos = torch.empty_like(order)
    pos[order] = torch.arange(len(order))
    g = pos.reshape(side, side)
    parts = [g[:, 1:] - g[:, :-1], g[1:] - g[:-1], g[1:, 1:] - g[:-1, :-1], g[1:, :-1] - g[:-1, 1:]]
    d = torch.cat([p.abs().reshape(-1) for p in parts])
    return d.double().mean().item(), int(d.max())


@pytest.mark.points(4)
def test_neighbour_distance(submission, credit):
    """Exercise 2: how far apart a pixel order puts pixels that touch in the image."""
    cases = [("row", 8), ("row", 3), ("column", 8), ("snake", 8), ("hilbert", 8), ("random", 8), ("hilbert", 4)]
    for name, side in cases:
        with credit.case(f"the {name} order of a {side}x{side} image"):
            order = digits.pixel_order(name, side)
            want_mean, want_max = _neighbour_distance(order, side)
            got_mean, got_max = as_tuple(submission.neighbour_distance(order, side), ("mean", "max"),
                                         "neighbour_distance")  # fmt: skip
            wrong_inverse = _neighbour_distance(torch.argsort(order), side)  # what reading order as the steps gives
            _float_answer(got_mean, want_mean, f"{name} {side}x{side}: mean distance",
                          {"order[t] is the pixel read at step t; the step of pixel p is the INVERSE "
                           "permutation (pos[order[t]] = t)": wrong_inverse[0] if name in ("hilbert", "random")
                           else None,
                           "only pixels that share an edge count (no diagonals)": _with_diagonals(order, side)[0]})  # fmt: skip
            _float_answer(got_max, want_max, f"{name} {side}x{side}: largest distance")


# ---------------------------------------------------------------- Exercise 3


def _ema(u, a):
    h, out = torch.zeros_like(u[:, 0]), []
    for t in range(u.shape[1]):
        h = a * h + (1 - a) * u[:, t]
        out.append(h)
    return torch.stack(out, 1)


@pytest.mark.points(3)
def test_bidirectional_ema(submission, credit):
    """Exercise 3: a forward scan plus a backward scan, the backward one flipped back into place."""
    gen = torch.Generator().manual_seed(830)
    for batch, L, d in [(1, 1, 1), (2, 7, 3), (3, 64, 5)]:
        with credit.case(f"u of shape {(batch, L, d)}"):
            u = torch.randn(batch, L, d, generator=gen, dtype=F64)
            a = torch.rand(d, generator=gen, dtype=F64) * 0.9 + 0.05
            want = _ema(u, a) + _ema(u.flip(1), a).flip(1)
            got = submission.bidirectional_ema(u, a)
            assert_close(got, want, f"y for u {(batch, L, d)}", rtol=1e-9, atol=1e-12,
                         mistakes={"flip the backward scan's output back into place (y_t must pair with u_t)":
                                       _ema(u, a) + _ema(u.flip(1), a),
                                   "flip along time (dim 1), not along the channels":
                                       _ema(u, a) + _ema(u.flip(2), a.flip(0)).flip(2),
                                   "the backward scan is missing: add h(flip(u)) flipped back": _ema(u, a)})  # fmt: skip
