"""Grading tests for chapter 7 (RWKV 4, 6 and 7): Exercises 1-3, 10 points.

Run by the grader (``python -m seqbook.grading grade ...``), one process per
submission; ``submission`` holds the student's functions, running in a sandbox.
Each test compares a student function with ``seqbook.rwkv`` / ``seqbook.linear_attention``
on seeded random float64 problems (and float32 where the lesson is overflow): one head
or several, ``d_k != d_v``, single steps, chunks of one step. Each case earns its share
of the test's points (``credit``); the message names the case and what differs.
While the exercises run, the library's RWKV, linear-attention (and Mamba/scan)
functions are blocked (FORBIDDEN below): a wrapper around ``seqbook.rwkv.wkv4_step``
earns nothing.

The exercises are in chapters/07_rwkv/rwkv.ipynb ("Exercises").  Contract:
  Exercise 1  wkv4_stable_step(w, u, k_t, v_t, state) -> (wkv_t, state')
              state = (a, b, p), each (batch, C): numerator and denominator scaled by e^-p;
              any p that keeps the exponentials <= 1 is accepted: only outputs are compared,
              over a chain of steps, including keys of size 100 in float32.
  Exercise 2  rwkv6_step(r_t, k_t, v_t, log_w_t, u, S) -> (o_t, S')
              o_t = r_t (S + diag(u) k_t^T v_t), S' = diag(w_t) S + k_t^T v_t   (seqbook.rwkv.wkv6_recurrent)
  Exercise 3  wy_representation(k_c, v_c, beta_c) -> (W, U)
              W = T K, U = T V with T = (I + tril_{-1}(diag(beta) K K^T))^{-1} diag(beta)
              (seqbook.linear_attention.ut_transform); then the chunk's pseudo-values are U - W S.
Shapes: w, u (C,); k_t, v_t (batch, C); r_t, k_t, log_w_t (batch, H, N) in Exercise 2, v_t (batch, H, d_v),
u (H, N), S (batch, H, N, d_v); k_c (batch, C, H, d_k), v_c (batch, C, H, d_v), beta_c (batch, C, H);
W (batch, C, H, d_k), U (batch, C, H, d_v).
"""

import pytest
import torch

from seqbook import linear_attention as la
from seqbook import rwkv
from seqbook.grading.checks import as_tuple, assert_close

F64, F32 = torch.float64, torch.float32

RWKV = ["seqbook.rwkv.*", "seqbook.linear_attention.*", "seqbook.mamba.*", "seqbook.scan.*"]
FORBIDDEN = {"wkv4_stable_step": RWKV, "rwkv6_step": RWKV, "wy_representation": RWKV}


def _randn(*shape, gen, dtype=F64, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen, dtype=F64)).to(dtype)


def _rand(*shape, gen, dtype=F64):
    return torch.rand(*shape, generator=gen, dtype=F64).to(dtype)


def _empty_wkv4_state(B, C, dtype):
    zeros = torch.zeros(B, C, dtype=dtype)
    return zeros, zeros.clone(), torch.full((B, C), -1e38 if dtype == F32 else -1e300, dtype=dtype)


@pytest.mark.points(3)
def test_wkv4_stable_step(submission, credit):
    """Exercise 1: the stable WKV-4 step; chained steps give the paper's ratio, finite for keys of size 100."""
    gen = torch.Generator().manual_seed(701)
    # (B, L, C, key scale, dtype)
    for B, L, C, k_scale, dtype in [(1, 1, 1, 1.0, F64), (2, 12, 5, 1.0, F64), (1, 30, 3, 5.0, F64),
                                    (2, 40, 4, 60.0, F32)]:  # fmt: skip
        case = f"{L} steps, (batch, C) = {(B, C)}, keys ~ N(0, {k_scale:g}^2), {dtype}"
        with credit.case(case):
            w, u = _rand(C, gen=gen, dtype=dtype), _randn(C, gen=gen, dtype=dtype)
            k, v = _randn(B, L, C, gen=gen, dtype=dtype, scale=k_scale), _randn(B, L, C, gen=gen, dtype=dtype)
            state, outputs = _empty_wkv4_state(B, C, dtype), []
            for t in range(L):
                wkv_t, state = as_tuple(submission.wkv4_stable_step(w, u, k[:, t], v[:, t], state), ("wkv_t", "state"),
                                        "wkv4_stable_step")  # fmt: skip
                state = as_tuple(state, ("a", "b", "p"), "wkv4_stable_step's state")
                outputs.append(wkv_t)
            got = torch.stack(outputs, 1)
            want, _ = rwkv.wkv4_recurrent(*(x.double() for x in (w, u, k, v)))
            if dtype == F32:
                assert torch.isfinite(got).all(), (
                    f"wkv {case} has nan or inf: e^k overflows float32 for k > 88; subtract the running maximum "
                    "exponent before exponentiating")
                assert_close(got, want.float(), f"wkv {case}", rtol=1e-4, atol=1e-5)
            else:
                assert_close(got, want, f"wkv {case}", rtol=1e-10, atol=1e-12)


@pytest.mark.points(3)
def test_rwkv6_step(submission, credit):
    """Exercise 2: o_t = r_t (S + diag(u) k_t^T v_t) reads the state before the update; S' = diag(w_t) S + k_t^T v_t."""
    gen = torch.Generator().manual_seed(702)
    for B, H, N, d_v in [(1, 1, 1, 1), (2, 3, 4, 5), (1, 2, 8, 8)]:
        case = f"(batch, H, N, d_v) = {(B, H, N, d_v)}"
        with credit.case(case):
            r, k, v = _randn(B, 1, H, N, gen=gen), _randn(B, 1, H, N, gen=gen), _randn(B, 1, H, d_v, gen=gen)
            log_w, u, S = -_rand(B, 1, H, N, gen=gen), _randn(H, N, gen=gen), _randn(B, H, N, d_v, gen=gen)
            o, S_new = as_tuple(submission.rwkv6_step(r[:, 0], k[:, 0], v[:, 0], log_w[:, 0], u, S), ("o_t", "S"),
                                "rwkv6_step")  # fmt: skip
            o_ref, S_ref = rwkv.wkv6_recurrent(r, k, v, log_w, u, S)
            after = torch.einsum("bhk,bhkv->bhv", r[:, 0], S_ref)  # a common slip: reading the updated state
            assert_close(S_new, S_ref, f"S' {case}", rtol=1e-12, atol=1e-12)
            assert_close(o, o_ref[:, 0], f"o_t {case}", rtol=1e-12, atol=1e-12,
                         mistakes={"o_t reads the updated state: RWKV-6 reads S_{t-1} and adds the bonus term": after})
    with credit.case("20 chained steps against the chunked form"):
        B, L, H, N = 2, 20, 2, 4
        r, k, v = _randn(B, L, H, N, gen=gen), _randn(B, L, H, N, gen=gen), _randn(B, L, H, N, gen=gen)
        log_w, u = -_rand(B, L, H, N, gen=gen), _randn(H, N, gen=gen)
        S, outputs = torch.zeros(B, H, N, N, dtype=F64), []
        for t in range(L):
            o, S = as_tuple(submission.rwkv6_step(r[:, t], k[:, t], v[:, t], log_w[:, t], u, S), ("o_t", "S"),
                            "rwkv6_step")  # fmt: skip
            outputs.append(o)
        o_ref, S_ref = rwkv.wkv6_chunked(r, k, v, log_w, u, chunk_size=8)
        assert_close(torch.stack(outputs, 1), o_ref, f"outputs of {L} steps", rtol=1e-11, atol=1e-11)
        assert_close(S, S_ref, f"state after {L} steps", rtol=1e-11, atol=1e-11)


@pytest.mark.points(4)
def test_wy_representation(submission, credit):
    """Exercise 3: W = T K and U = T V for one chunk; U - W S are the delta rule's pseudo-values."""
    gen = torch.Generator().manual_seed(703)
    for B, C, H, d_k, d_v in [(1, 1, 1, 2, 3), (2, 7, 3, 4, 5), (1, 16, 2, 8, 8)]:
        case = f"chunk of {C} steps, (batch, H, d_k, d_v) = {(B, H, d_k, d_v)}"
        with credit.case(case):
            k = torch.nn.functional.normalize(_randn(B, C, H, d_k, gen=gen), dim=-1)
            v, beta = _randn(B, C, H, d_v, gen=gen), _rand(B, C, H, gen=gen)
            W, U = as_tuple(submission.wy_representation(k, v, beta), ("W", "U"), "wy_representation")
            T = la.ut_transform(k, beta)  # (B, H, C, C)
            W_ref = (T @ k.transpose(1, 2)).transpose(1, 2)
            U_ref = (T @ v.transpose(1, 2)).transpose(1, 2)
            no_solve = (beta.transpose(1, 2)[..., None] * v.transpose(1, 2)).transpose(1, 2)
            assert_close(W, W_ref, f"W {case}", rtol=1e-10, atol=1e-12)
            assert_close(U, U_ref, f"U {case}", rtol=1e-10, atol=1e-12,
                         mistakes={"U is diag(beta) V: the triangular system (I + tril_{-1}(diag(beta) K K^T)) was "
                                   "not solved": no_solve})  # fmt: skip
    with credit.case("a whole sequence, chunk by chunk, against the recurrence"):
        B, L, H, d, Cs = 1, 21, 2, 4, 6
        q, v = _randn(B, L, H, d, gen=gen), _randn(B, L, H, d, gen=gen)
        k = torch.nn.functional.normalize(_randn(B, L, H, d, gen=gen), dim=-1)
        beta = _rand(B, L, H, gen=gen)
        S, outputs = torch.zeros(B, H, d, d, dtype=F64), []
        for t0 in range(0, L, Cs):
            sl = slice(t0, t0 + Cs)
            W, U = as_tuple(submission.wy_representation(k[:, sl], v[:, sl], beta[:, sl]), ("W", "U"),
                            "wy_representation")  # fmt: skip
            pseudo = U.transpose(1, 2) - W.transpose(1, 2) @ S  # (B, H, C, d_v)
            qc, kc = q[:, sl].transpose(1, 2), k[:, sl].transpose(1, 2)
            outputs.append((qc @ S + (qc @ kc.mT).tril() @ pseudo).transpose(1, 2))
            S = S + kc.mT @ pseudo
        o_ref, S_ref = la.delta_rule_recurrent(q, k, v, beta, scale=1.0)
        assert_close(torch.cat(outputs, 1), o_ref, "outputs of the chunked delta rule built on your W, U",
                     rtol=1e-10, atol=1e-10)  # fmt: skip
        assert_close(S, S_ref, "final state of the chunked delta rule built on your W, U", rtol=1e-10, atol=1e-10)
