"""Grading tests for chapter 8's copying page: Exercises 1-3, 10 points.

Run by the grader (``python -m seqbook.grading grade ...``), one process per submission;
``submission`` holds the student's functions, running in a sandbox. The page is the second notebook
of chapters/08_head_to_head/ and says so in its metadata (``seqbook.chapter = "08_copying"``), so that
the grader reads it with these tests and not with the chapter's first page's. Each case earns its
share of the test's points (``credit``); the message names the case and what differs, with a hint
when the answer matches a common mistake. While the exercises run, ``seqbook.experiments_copying``
(whose ``copy_bound_length`` answers Exercise 2) is blocked (FORBIDDEN below).

The exercises are in chapters/08_head_to_head/copying.ipynb ("Exercises"). Contract, with A = n_symbols,
S = 8 * state_bytes bits:
  Exercise 1  copy_accuracy_bound(state_bytes, n, n_symbols) -> float
              the largest fraction of the A^n strings a state of S bits can copy exactly: min(1, 2^S / A^n),
              finite for any sizes (2^S alone overflows a float for S > 1023).
  Exercise 2  max_copy_length(state_bytes, n_symbols) -> int
              the largest n >= 0 with A^n <= 2^S (every string of n symbols fits).
  Exercise 3  copy_verdict(state_bytes, n_symbols, accuracy_by_length, threshold=0.5) -> str
              "impossible" if some length's accuracy exceeds the bound there; else "copies" if no accuracy is
              below threshold; else, at the shortest length whose accuracy is below threshold, "at capacity"
              if the bound there is below threshold, "below capacity" if not.
"""

import math

import pytest

from seqbook.grading.submission import SubmissionError

BLOCKED = ["seqbook.experiments_copying.*"]
FORBIDDEN = {"copy_accuracy_bound": BLOCKED, "max_copy_length": BLOCKED, "copy_verdict": BLOCKED}


def bound(state_bytes, n, A):
    return 2.0 ** min(0.0, 8 * state_bytes - n * math.log2(A))


def longest(state_bytes, A):
    n = 0
    while A ** (n + 1) <= 2 ** (8 * state_bytes):
        n += 1
    return n


def _float_answer(got, want, what, mistakes=None):
    if hasattr(got, "item") and getattr(got, "numel", lambda: 0)() == 1:
        got = got.item()
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        raise AssertionError(f"{what}: expected a float, got {type(got).__name__} {got!r}")
    if not math.isfinite(got) or abs(got - want) > 1e-9 * max(1.0, abs(want)) + 1e-300:
        hint = next((h for h, wrong in (mistakes or {}).items()
                     if math.isfinite(got) and abs(got - wrong) <= 1e-9 * max(1.0, abs(wrong))), None)  # fmt: skip
        raise AssertionError(f"{what}: got {got!r}, expected {want!r}" + (f". Hint: {hint}" if hint else ""))


def _int_answer(got, want, what, mistakes=None):
    if hasattr(got, "item") and getattr(got, "numel", lambda: 0)() == 1:
        got = got.item()
    if isinstance(got, float) and got.is_integer():
        got = int(got)
    if isinstance(got, bool) or not isinstance(got, int):
        raise AssertionError(f"{what}: expected an int, got {type(got).__name__} {got!r}")
    if got != want:
        hint = next((h for h, wrong in (mistakes or {}).items() if got == wrong), None)
        raise AssertionError(f"{what}: got {got}, expected {want}" + (f". Hint: {hint}" if hint else ""))


def _call(fn, *args, what, **kwargs):
    try:
        return fn(*args, **kwargs)
    except SubmissionError as exc:
        if "OverflowError" in str(exc):
            raise AssertionError(f"{what}: {exc}. Hint: 2^S overflows a float for S > 1023 bits; compare exponents "
                                 "(S - n log2 A) instead") from None  # fmt: skip
        raise


@pytest.mark.points(3)
def test_copy_accuracy_bound(submission, credit):
    """Exercise 1: min(1, 2^S / A^n) with S = 8 * state_bytes bits."""
    for state_bytes, n, A in [(1, 4, 4), (1, 2, 16), (2, 5, 16), (0, 3, 2), (3, 1, 5), (4, 0, 7)]:
        with credit.case(f"small sizes: state_bytes = {state_bytes}, n = {n}, A = {A}"):
            got = _call(submission.copy_accuracy_bound, state_bytes, n, A, what="copy_accuracy_bound")
            _float_answer(got, bound(state_bytes, n, A), f"bound for {state_bytes} bytes, n = {n}, A = {A}",
                          {"a state of S bytes holds 8 S bits": min(1.0, 2.0**state_bytes / A**n),
                           "a fraction cannot exceed 1: cap 2^S / A^n at 1": 2.0 ** (8 * state_bytes) / A**n,
                           "log2, not the natural log: a symbol carries log2 A bits":
                               min(1.0, math.exp(8 * state_bytes * math.log(2) - n * math.log(2) * math.log(A)))})  # fmt: skip
    for state_bytes, n, A in [(5632, 11265, 16), (5632, 11000, 16), (5632, 12000, 26), (4096, 40000, 3)]:
        with credit.case(f"a model's state: state_bytes = {state_bytes}, n = {n}, A = {A} (no overflow)"):
            got = _call(submission.copy_accuracy_bound, state_bytes, n, A, what="copy_accuracy_bound")
            _float_answer(got, bound(state_bytes, n, A), f"bound for {state_bytes} bytes, n = {n}, A = {A}")


@pytest.mark.points(3)
def test_max_copy_length(submission, credit):
    """Exercise 2: the largest n with A^n <= 2^(8 state_bytes), exactly."""
    cases = [(1, 2), (2, 16), (1, 3), (3, 10), (0, 5), (1, 256), (1, 257), (5632, 16), (5632, 26), (7, 1000)]
    for state_bytes, A in cases:
        with credit.case(f"state_bytes = {state_bytes}, A = {A}"):
            got = _call(submission.max_copy_length, state_bytes, A, what="max_copy_length")
            bits = 8 * state_bytes
            _int_answer(got, longest(state_bytes, A), f"longest copyable length, {state_bytes} bytes, A = {A}",
                        {"a state of S bytes holds 8 S bits, not S": math.floor(state_bytes / math.log2(A)),
                         "a symbol carries log2 A bits, not ln A": math.floor(bits / math.log(A)),
                         "round down: at the ceiling some strings no longer fit":
                             math.ceil(bits / math.log2(A)) if bits % math.log2(A) else None})  # fmt: skip


VERDICTS = ("copies", "at capacity", "below capacity", "impossible")


@pytest.mark.points(4)
def test_copy_verdict(submission, credit):
    """Exercise 3: impossible / copies / at capacity / below capacity, decided from the bound."""
    cases = [  # (what, state_bytes, A, accuracies, threshold, verdict, hint for a wrong answer)
        ("a large state, every length copied", 100, 16, {4: 1.0, 8: 0.99, 16: 0.97}, 0.5, "copies",
         "no accuracy is below the threshold and none beats the bound"),
        ("a 4-byte state failing just past its 8 symbols", 4, 16, {4: 1.0, 8: 0.97, 9: 0.06, 12: 0.0}, 0.5,
         "at capacity", "at n = 9 at most 2^32 / 16^9 = 1/16 of the strings fit: the state is too small there"),
        ("a 5632-byte state failing at 8 symbols", 5632, 16, {4: 0.9, 8: 0.3, 12: 0.0}, 0.5, "below capacity",
         "at n = 8 the bound is 1: the state could hold the string, and the model fails for another reason"),
        ("a 4-byte state copying 16 symbols", 4, 16, {4: 1.0, 8: 1.0, 16: 0.9}, 0.5, "impossible",
         "at n = 16 at most 2^32 / 16^16 of the strings fit in 4 bytes; 0.9 is more than that"),
        ("lengths given out of order", 5632, 16, {16: 0.0, 4: 1.0, 8: 0.2}, 0.5, "below capacity",
         "the failure point is the shortest failing length: sort the lengths"),
        ("a stricter threshold", 100, 16, {4: 1.0, 8: 0.8}, 0.9, "below capacity",
         "use the threshold passed in: 0.8 < 0.9 is a failure"),
        ("an accuracy exactly at the threshold is not a failure", 100, 16, {4: 1.0, 8: 0.5}, 0.5, "copies",
         "a failure is an accuracy strictly below the threshold"),
        ("impossible is checked before anything else", 1, 2, {2: 1.0, 12: 0.4}, 0.5, "impossible",
         "0.4 at n = 12 beats the bound 2^8 / 2^12 = 1/16, even though it is also a failure"),
    ]  # fmt: skip
    for what, state_bytes, A, accs, threshold, want, hint in cases:
        with credit.case(what):
            got = submission.copy_verdict(state_bytes, A, dict(accs), threshold=threshold)
            if got not in VERDICTS:
                raise AssertionError(f"{what}: expected one of {VERDICTS}, got {got!r}")
            if got != want:
                raise AssertionError(f"{what}: got {got!r}, expected {want!r}. Hint: {hint}")
