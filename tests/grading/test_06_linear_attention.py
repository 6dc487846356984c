"""Grading tests for chapter 6 (linear attention, recurrent and chunked): Exercises 1-5, 17 points.

Run by the grader (``python -m seqbook.grading grade ...``), one process per
submission; ``submission`` holds the student's functions, running in a
sandbox.  Each test compares a student function with ``seqbook.linear_attention``
on seeded random float64 (and float32) problems of several sizes: one head or
several, ``d_k != d_v``, a single step, chunks of one step, and decays strong
enough that a form exponentiating long sums (or their negatives) overflows or
underflows in float32.  A test passes only if every case does; the message
names the first case and output that differ, and how.

The exercises are in chapters/06_linear_attention/linear_attention.ipynb ("Exercises").  Contract:
  Exercise 1  linear_attention_step(q_t, k_t, v_t, S, log_decay_t) -> (o_t, S')
              S' = exp(a_t) S + k_t v_t^T, o_t = q_t^T S' / sqrt(d_k)  (seqbook.linear_attention.recurrent_step)
  Exercise 2  stable_decay_mask(log_decay) -> L     == seqbook.linear_attention.decay_mask, finite in float32
  Exercise 3  chunk_state_update(S, k_c, v_c, log_decay_c) -> S'
              the state after the chunk: linear_attention_recurrent(..., initial_state=S)'s final state
  Exercise 4  join_states(S_a, S_b, log_decay_b) -> S   the state after A then B from each one's own (zero start)
  Exercise 5  initial_state_grad(q, do, log_decay, d_final) -> dS_0   == autograd, without autograd
Shapes: q_t, k_t (batch, heads, d_k); v_t (batch, heads, d_v); S (batch, heads, d_k, d_v);
log_decay_t (batch, heads); log_decay (batch, length, heads); the decay mask L (batch, heads, length, length);
k_c (batch, C, heads, d_k); v_c (batch, C, heads, d_v); log_decay_c (batch, C, heads).
"""

import pytest
import torch

from seqbook import linear_attention as la
from seqbook.grading.checks import as_tuple, assert_close

F64, F32 = torch.float64, torch.float32

# Linear attention in every form, and Mamba's segment sums and SSD (the same decay mask), are
# blocked while the exercises run.
LINEAR = ["seqbook.linear_attention.*", "seqbook.kernels.linear_attention.*", "seqbook.mamba.*", "seqbook.scan.*",
          "seqbook.kernels.ssd.*"]
AUTOGRAD = ["torch.autograd.grad", "torch.autograd.backward"]
FORBIDDEN = {"linear_attention_step": LINEAR, "stable_decay_mask": LINEAR, "chunk_state_update": LINEAR,
             "join_states": LINEAR, "initial_state_grad": LINEAR + AUTOGRAD}
FORBIDDEN_WHY = {"initial_state_grad": "Exercise 5 asks for the gradient derived by hand, without autograd"}


def _randn(*shape, gen, dtype=F64, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen, dtype=F64)).to(dtype)


def _log_decay(*shape, gen, strength=1.0, dtype=F64):
    return (-strength * torch.rand(*shape, generator=gen, dtype=F64)).to(dtype)


@pytest.mark.points(3)
def test_linear_attention_step(submission):
    """Exercise 1: S' = exp(a_t) S + k_t v_t^T; o_t = q_t^T S' / sqrt(d_k); steps chain into the recurrence."""
    gen = torch.Generator().manual_seed(601)
    for B, H, d_k, d_v in [(1, 1, 1, 1), (2, 3, 4, 5), (1, 2, 16, 8)]:
        q_t, k_t = _randn(B, H, d_k, gen=gen), _randn(B, H, d_k, gen=gen)
        v_t, S = _randn(B, H, d_v, gen=gen), _randn(B, H, d_k, d_v, gen=gen)
        a_t = _log_decay(B, H, gen=gen)
        o, S_new = as_tuple(submission.linear_attention_step(q_t, k_t, v_t, S, a_t), ("o_t", "S"),
                            "linear_attention_step")  # fmt: skip
        o_ref, S_ref = la.recurrent_step(q_t, k_t, v_t, S, a_t)
        case = f"(B, H, d_k, d_v) = {(B, H, d_k, d_v)}"
        assert_close(S_new, S_ref, f"S' {case}", rtol=1e-12, atol=1e-12)
        assert_close(o, o_ref, f"o_t {case}", rtol=1e-12, atol=1e-12)
    # a whole sequence, step by step, from a zero state
    B, L, H, d_k, d_v = 2, 15, 2, 4, 3
    q, k, v = _randn(B, L, H, d_k, gen=gen), _randn(B, L, H, d_k, gen=gen), _randn(B, L, H, d_v, gen=gen)
    a = _log_decay(B, L, H, gen=gen)
    S = torch.zeros(B, H, d_k, d_v, dtype=F64)
    outputs = []
    for t in range(L):
        o, S = as_tuple(submission.linear_attention_step(q[:, t], k[:, t], v[:, t], S, a[:, t]), ("o_t", "S"),
                        "linear_attention_step")  # fmt: skip
        outputs.append(o)
    o_ref, S_ref = la.linear_attention_quadratic(q, k, v, a)
    assert_close(torch.stack(outputs, 1), o_ref, f"outputs of {L} steps vs the quadratic form", rtol=1e-11, atol=1e-11)
    assert_close(S, S_ref, f"state after {L} steps", rtol=1e-11, atol=1e-11)


@pytest.mark.points(3)
def test_stable_decay_mask(submission):
    """Exercise 2: D_ts = exp(sum_{r=s+1}^t a_r) for s <= t, 0 above the diagonal; no nan or inf in float32."""
    gen = torch.Generator().manual_seed(602)
    # (B, L, H, strength, dtype)
    for B, L, H, strength, dtype in [(1, 1, 1, 1.0, F64), (2, 9, 3, 1.0, F64), (1, 33, 2, 0.1, F64),
                                     (1, 300, 2, 2.0, F32), (2, 200, 1, 5.0, F32)]:  # fmt: skip
        a = _log_decay(B, L, H, gen=gen, strength=strength, dtype=dtype)
        got = submission.stable_decay_mask(a)
        case = f"(log_decay of shape {(B, L, H)}, a ~ -U(0, {strength:g}), {dtype})"
        if dtype == F32:
            assert isinstance(got, torch.Tensor) and torch.isfinite(got).all(), (
                f"the mask L {case} has nan or inf: the cumulative product prod_r gamma_r underflows in float32; "
                "sum the logs of each segment instead")
            want = la.decay_mask(a.double()).float()
            assert_close(got, want, f"the mask L {case}", rtol=1e-4, atol=1e-7)
        else:
            assert_close(got, la.decay_mask(a), f"the mask L {case}", rtol=1e-12, atol=1e-14)


@pytest.mark.points(4)
def test_chunk_state_update(submission):
    """Exercise 3: S' = exp(c_last) S + sum_s exp(c_last - c_s) k_s v_s^T with c the cumulative log-decay
    inside the chunk; stable where exp(-c_s) would overflow."""
    gen = torch.Generator().manual_seed(603)
    # (B, C, H, d_k, d_v, strength, dtype)
    for B, C, H, d_k, d_v, strength, dtype in [(1, 1, 1, 2, 3, 1.0, F64), (2, 7, 3, 4, 5, 1.0, F64),
                                                (1, 16, 2, 8, 8, 0.2, F64), (1, 64, 2, 4, 4, 4.0, F32)]:  # fmt: skip
        S = _randn(B, H, d_k, d_v, gen=gen, dtype=dtype)
        k_c, v_c = _randn(B, C, H, d_k, gen=gen, dtype=dtype), _randn(B, C, H, d_v, gen=gen, dtype=dtype)
        a = _log_decay(B, C, H, gen=gen, strength=strength, dtype=dtype)
        got = submission.chunk_state_update(S, k_c, v_c, a)
        q_any = torch.zeros(B, C, H, d_k, dtype=F64)  # the final state does not depend on the queries
        _, want = la.linear_attention_recurrent(q_any, k_c.double(), v_c.double(), a.double(), S.double())
        case = f"(chunk of {C} steps, (B, H, d_k, d_v) = {(B, H, d_k, d_v)}, a ~ -U(0, {strength:g}), {dtype})"
        tol = 1e-12 if dtype == F64 else 1e-5
        if dtype == F32:
            assert isinstance(got, torch.Tensor) and torch.isfinite(got).all(), (
                f"S' {case} has nan or inf: exp(-c_s) overflows in float32 once the chunk's decay passes e^-88; "
                "combine the exponents first, exp(c_last - c_s)")
        assert_close(got, want.to(dtype), f"S' {case}", rtol=tol, atol=tol)


@pytest.mark.points(3)
def test_join_states(submission, credit):
    """Exercise 4: S = exp(sum of B's log-decays) S_A + S_B."""
    gen = torch.Generator().manual_seed(604)
    # (B, L_a, L_b, H, d_k, d_v, decay strength, dtype, what)
    cases = [(1, 5, 3, 1, 4, 4, 1.0, F64, "one head"), (2, 9, 14, 3, 4, 6, 1.0, F64, "several heads, d_k != d_v"),
             (1, 4, 1, 2, 3, 3, 1.0, F64, "B of one step"), (2, 7, 200, 2, 8, 8, 30.0, F32, "float32, B decays by e^-3000")]
    for B, La, Lb, H, dk, dv, strength, dtype, what in cases:
        with credit.case(what):
            q, k = _randn(B, La + Lb, H, dk, gen=gen, dtype=dtype), _randn(B, La + Lb, H, dk, gen=gen, dtype=dtype)
            v = _randn(B, La + Lb, H, dv, gen=gen, dtype=dtype)
            a = _log_decay(B, La + Lb, H, gen=gen, strength=strength, dtype=dtype)
            _, S_all = la.linear_attention_recurrent(q, k, v, a)
            _, S_a = la.linear_attention_recurrent(q[:, :La], k[:, :La], v[:, :La], a[:, :La])
            _, S_b = la.linear_attention_recurrent(q[:, La:], k[:, La:], v[:, La:], a[:, La:])
            got = submission.join_states(S_a, S_b, a[:, La:])
            tol = 1e-12 if dtype == F64 else 1e-5
            last_step_only = torch.exp(a[:, -1])[..., None, None] * S_a + S_b
            assert_close(got, S_all, f"joined state ({what})", rtol=tol, atol=tol,
                         mistakes={"S_A decays through every step of B: sum B's log-decays, not only its last": last_step_only,
                                   "S_A must decay through B (exp of the sum of B's log-decays)": S_a + S_b})


@pytest.mark.points(4)
def test_initial_state_grad(submission, credit):
    """Exercise 5: dS_0 = s sum_t e^{c_t} q_t dO_t^T + e^{c_{L-1}} dS_final, c_t = sum_{r <= t} a_r."""
    gen = torch.Generator().manual_seed(605)
    # (B, L, H, d_k, d_v, decay strength, dtype, what)
    cases = [(1, 1, 1, 4, 4, 1.0, F64, "a single step"), (2, 13, 3, 4, 6, 1.0, F64, "several heads, d_k != d_v"),
             (1, 40, 2, 8, 8, 0.1, F64, "weak decay"), (1, 60, 1, 8, 8, 5.0, F32, "float32, strong decay")]
    for B, L, H, dk, dv, strength, dtype, what in cases:
        with credit.case(what):
            q, k = _randn(B, L, H, dk, gen=gen, dtype=dtype), _randn(B, L, H, dk, gen=gen, dtype=dtype)
            v, do = _randn(B, L, H, dv, gen=gen, dtype=dtype), _randn(B, L, H, dv, gen=gen, dtype=dtype)
            a = _log_decay(B, L, H, gen=gen, strength=strength, dtype=dtype)
            d_final = _randn(B, H, dk, dv, gen=gen, dtype=dtype)
            S0 = _randn(B, H, dk, dv, gen=gen).requires_grad_()
            o, S = la.linear_attention_quadratic(q.double(), k.double(), v.double(), a.double(), S0)
            ((o * do.double()).sum() + (S * d_final.double()).sum()).backward()
            got = submission.initial_state_grad(q, do, a, d_final)
            want = S0.grad.to(dtype)
            c = torch.cumsum(a.double(), 1)
            outputs_only = (torch.einsum("blh,blhk,blhv->bhkv", torch.exp(c), q.double(), do.double())
                            / dk**0.5).to(dtype)
            tol = 1e-10 if dtype == F64 else 1e-4
            assert_close(got, want, f"dS_0 ({what})", rtol=tol, atol=tol * max(1.0, want.abs().max().item()),
                         mistakes={"S_final = e^{c_{L-1}} S_0 + ...: its gradient reaches S_0 too": outputs_only})
