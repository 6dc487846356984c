"""Grading tests for chapter 8 (head to head): Exercises 1-4, 13 points.

Run by the grader (``python -m seqbook.grading grade ...``), one process per submission;
``submission`` holds the student's functions, running in a sandbox. Each case earns its share of
the test's points (``credit``); the message names the case and what differs, with a hint when the
answer matches a common mistake. While the exercises run, ``seqbook.experiments_h2h`` (which
measures state sizes) and ``seqbook.linear_attention`` are blocked (FORBIDDEN below); torch's
solvers are allowed (Exercise 3 is a linear system).

The exercises are in chapters/08_head_to_head/head_to_head.ipynb ("Exercises").  Contract:
  Exercise 1  decoding_state_bytes(family, length, d_model, n_layers, n_heads=2, d_state=8, expand=2,
                                   d_conv=4, bytes_per_number=4) -> int
              attention: n_layers * 2 * length * d_model numbers; linear attention: n_layers * n_heads *
              (d_model / n_heads)^2; mamba: n_layers * E * (d_state + d_conv - 1), E = expand * d_model;
              times bytes_per_number; another family: ValueError.
  Exercise 2  kv_crossover_length(fixed_bytes, d_model, n_layers, bytes_per_number=4) -> int
              the smallest L >= 0 with 2 * L * d_model * n_layers * bytes_per_number >= fixed_bytes.
  Exercise 3  exact_recall_state(keys (P, d_k), values (P, d_v)) -> S (d_k, d_v) with keys @ S == values
              for P <= d_k linearly independent keys; P > d_k: ValueError. Any exact S is accepted.
  Exercise 4  crossover_length(lengths, t_a, t_b) -> float or None
              the first length where log(t_a / t_b) changes sign, interpolated linearly in (log L, log ratio)
              between the two measured lengths around it (exact for power laws); a measured tie is that length;
              no sign change: None.
"""

import math

import pytest
import torch

from seqbook import experiments_h2h as h2h
from seqbook.grading.checks import assert_close
from seqbook.grading.submission import SubmissionError

F64 = torch.float64

BLOCKED = ["seqbook.experiments_h2h.*", "seqbook.linear_attention.*"]
FORBIDDEN = {"decoding_state_bytes": BLOCKED, "kv_crossover_length": BLOCKED, "exact_recall_state": BLOCKED,
             "crossover_length": BLOCKED}


def _int_answer(got, want, what, mistakes=None):
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    if isinstance(got, float) and got.is_integer():
        got = int(got)
    if isinstance(got, bool) or not isinstance(got, int):
        raise AssertionError(f"{what}: expected an int, got {type(got).__name__} {got!r}")
    if got != want:
        hint = next((h for h, wrong in (mistakes or {}).items() if got == wrong), None)
        raise AssertionError(f"{what}: got {got}, expected {want}" + (f". Hint: {hint}" if hint else ""))


def _raises_value_error(call, what):
    try:
        call()
    except SubmissionError as exc:
        if "ValueError" not in str(exc):
            raise AssertionError(f"{what}: expected a ValueError, got {exc}") from None
        return
    raise AssertionError(f"{what}: expected a ValueError, the function returned")


@pytest.mark.points(3)
def test_decoding_state_bytes(submission, credit):
    """Exercise 1: KV cache, linear attention's matrices, Mamba's SSM and convolution state, in bytes."""
    for d, n_layers in [(32, 2), (20, 3)]:
        with credit.case(f"attention, d_model = {d}, {n_layers} layers, against the library's models stepped"):
            model = h2h.build("softmax attention", d, 8, n_layers)
            for L in (0, 1, 13):
                got = submission.decoding_state_bytes("attention", L, d, n_layers)
                _int_answer(got, h2h.state_bytes(model, L), f"attention after {L} tokens",
                            {"the cache holds a key AND a value per token": L * d * n_layers * 4})
        with credit.case(f"mamba, d_model = {d}, {n_layers} layers, against the library's models stepped"):
            model = h2h.build("Mamba", d, 8, n_layers)
            E = 2 * d
            got = submission.decoding_state_bytes("mamba", 9, d, n_layers)
            _int_answer(got, h2h.state_bytes(model, 9), "mamba after 9 tokens",
                        {"the convolution's last d_conv - 1 inputs are state too": n_layers * E * 8 * 4})
    with credit.case("linear attention, several heads and widths"):
        for d, H, n_layers in [(32, 2, 2), (64, 4, 1), (24, 3, 5)]:
            got = submission.decoding_state_bytes("linear attention", 100, d, n_layers, n_heads=H)
            _int_answer(got, n_layers * H * (d // H) ** 2 * 4, f"linear attention d_model = {d}, {H} heads",
                        {"each head's state is (d_model / n_heads)^2, not d_model^2": n_layers * H * d * d * 4})
    with credit.case("other arguments: d_state, expand, d_conv, bytes_per_number (bfloat16 = 2)"):
        got = submission.decoding_state_bytes("mamba", 5, 16, 1, d_state=4, expand=3, d_conv=2, bytes_per_number=2)
        _int_answer(got, 48 * (4 + 1) * 2, "mamba with d_state 4, expand 3, d_conv 2, bf16")
        got = submission.decoding_state_bytes("attention", 7, 16, 2, bytes_per_number=2)
        _int_answer(got, 2 * 7 * 16 * 2 * 2, "attention, bf16")
    with credit.case("an unknown family raises ValueError"):
        _raises_value_error(lambda: submission.decoding_state_bytes("transformer-xl", 5, 16, 1), "family 'transformer-xl'")


@pytest.mark.points(3)
def test_kv_crossover_length(submission, credit):
    """Exercise 2: the smallest L with 2 L d n_layers bytes >= fixed_bytes (a ceiling, in integers)."""
    cases = [(5632, 32, 2, 4), (4096, 32, 2, 4), (4097, 32, 2, 4), (1, 64, 1, 4), (0, 16, 2, 4),
             (10 ** 12 + 3, 4096, 32, 2)]  # fmt: skip
    for fixed, d, n_layers, b in cases:
        with credit.case(f"fixed_bytes = {fixed}, d_model = {d}, {n_layers} layers, {b} bytes per number"):
            per_token = 2 * d * n_layers * b
            want = -(-fixed // per_token)
            got = submission.kv_crossover_length(fixed, d, n_layers, b)
            _int_answer(got, want, "crossover length",
                        {"the cache holds keys and values: 2 d_model numbers per token per layer":
                             -(-fixed // (d * n_layers * b)),
                         "round up: at the floor the cache is still smaller": fixed // per_token})  # fmt: skip
            assert 2 * got * d * n_layers * b >= fixed, "at the returned L the cache is smaller than the state"


@pytest.mark.points(4)
def test_exact_recall_state(submission, credit):
    """Exercise 3: keys @ S == values for P <= d_k independent keys; P > d_k refused."""
    gen = torch.Generator().manual_seed(808)
    for P, d_k, d_v in [(1, 1, 1), (3, 8, 2), (8, 8, 5), (5, 16, 16)]:
        with credit.case(f"{P} random keys in {d_k} dimensions, values of size {d_v}"):
            K = torch.randn(P, d_k, generator=gen, dtype=F64)
            V = torch.randn(P, d_v, generator=gen, dtype=F64)
            S = submission.exact_recall_state(K, V)
            if not isinstance(S, torch.Tensor) or tuple(S.shape) != (d_k, d_v):
                raise AssertionError(f"S should be a tensor of shape {(d_k, d_v)}, got "
                                     f"{tuple(S.shape) if isinstance(S, torch.Tensor) else type(S).__name__}")  # fmt: skip
            assert_close(K @ S.to(F64), V, f"keys @ S ({P} keys in {d_k} dimensions)", rtol=1e-8, atol=1e-8,
                         mistakes={"that is the additive state sum_i k_i v_i^T: exact only for orthonormal keys; "
                                   "solve keys @ S = values": K @ (K.T @ V)})  # fmt: skip
    with credit.case("orthonormal keys: the state is then K^T V"):
        Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=F64))
        K, V = Q[:4], torch.randn(4, 3, generator=gen, dtype=F64)
        assert_close(K @ submission.exact_recall_state(K, V).to(F64), V, "keys @ S, orthonormal keys", rtol=1e-8,
                     atol=1e-8)  # fmt: skip
    with credit.case("more keys than dimensions raises ValueError"):
        K, V = torch.randn(9, 8, generator=gen, dtype=F64), torch.randn(9, 2, generator=gen, dtype=F64)
        _raises_value_error(lambda: submission.exact_recall_state(K, V), "9 keys in 8 dimensions")


def _float_answer(got, want, what, mistakes=None):
    if want is None:
        if got is not None:
            raise AssertionError(f"{what}: the curves do not cross between the measured lengths; expected None, got {got!r}")
        return
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        raise AssertionError(f"{what}: expected a number, got {type(got).__name__} {got!r}")
    if not abs(got - want) <= 1e-6 * want:
        hint = next((h for h, wrong in (mistakes or {}).items() if wrong and abs(got - wrong) <= 1e-6 * wrong), None)
        raise AssertionError(f"{what}: got {got!r}, expected {want!r}" + (f". Hint: {hint}" if hint else ""))


def _linear_in_L(lengths, t_a, t_b):
    """The common mistake: the crossing interpolated linearly in L and in the time difference."""
    for i in range(len(lengths) - 1):
        d0, d1 = t_a[i] - t_b[i], t_a[i + 1] - t_b[i + 1]
        if d0 * d1 < 0:
            return lengths[i] + d0 / (d0 - d1) * (lengths[i + 1] - lengths[i])
    return None


@pytest.mark.points(3)
def test_crossover_length(submission, credit):
    """Exercise 4: where a linear-cost curve meets a quadratic one, read off measured points in log-log."""
    lengths = [1024, 2048, 4096, 8192, 16384]
    for L_star, p_a, p_b in [(3000.0, 1.0, 2.0), (5000.0, 1.0, 1.8), (1500.0, 0.9, 2.0)]:
        with credit.case(f"power laws L^{p_a} and L^{p_b} meeting at L = {L_star:g} (log-log interpolation is exact)"):
            t_a = [(L / L_star) ** p_a for L in lengths]  # the slower-growing curve, slower at short L
            t_b = [(L / L_star) ** p_b for L in lengths]
            got = submission.crossover_length(lengths, t_a, t_b)
            _float_answer(got, L_star, "crossover length",
                          {"interpolate in log L and log(t_a / t_b): the curves are straight lines on log-log "
                           "axes, not on linear ones": _linear_in_L(lengths, t_a, t_b)})  # fmt: skip
    with credit.case("the curves meet exactly at a measured length; the roles of a and b swapped"):
        t_b = [L / 4096 for L in lengths]
        t_a = [(L / 4096) ** 2 for L in lengths]
        _float_answer(submission.crossover_length(lengths, t_a, t_b), 4096.0, "a tie at L = 4096")
    with credit.case("no crossing inside the measured lengths gives None (no extrapolation)"):
        t_a = [L / 1e5 for L in lengths]
        t_b = [(L / 1e3) ** 2 for L in lengths]
        _float_answer(submission.crossover_length(lengths, t_a, t_b), None, "a always faster than b")
        _float_answer(submission.crossover_length(lengths, t_b, t_a), None, "a always slower than b")
        # two crossings: the first one counts
        t_a, t_b = [1.0, 3.0, 1.0], [2.0, 2.0, 2.0]
        want = math.exp(math.log(100) + math.log(2) / math.log(3) * (math.log(200) - math.log(100)))
        _float_answer(submission.crossover_length([100, 200, 400], t_a, t_b), want, "the first of two crossings")
