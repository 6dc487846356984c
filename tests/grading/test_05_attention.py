"""Grading tests for chapter 5 (softmax attention and FlashAttention): Exercises 1-5, 17 points.

Run by the grader (``python -m seqbook.grading grade ...``), one process per
submission; ``submission`` holds the student's functions, running in a
sandbox.  Each test compares a student function with ``seqbook.attention`` on
seeded random float64 (and float32) problems of several sizes: a single
token, lengths that are not powers of two, one or several heads, and scores
large enough that a softmax without the max subtraction overflows.  A test
passes only if every case does; the message names the first case and output
that differ, and how.

The exercises are in chapters/05_attention/attention.ipynb ("Exercises").  Contract:
  Exercise 1  online_softmax_step(m, l, acc, scores, values) -> (m, l, acc)
              == seqbook.attention.online_softmax_update on (m, l) and acc e^{m-m'} + e^{scores-m'} values
  Exercise 2  causal_attention(q, k, v) -> o      == attention.attention_naive(q, k, v, causal=True)
  Exercise 3  kv_cache_step(q_t, k_t, v_t, k_cache, v_cache) -> (y_t, k_cache', v_cache')
              y_t == attention.decode_step(q_t, k_cache', v_cache'), caches one row longer
  Exercise 4  merge_partial_attention(o_a, lse_a, o_b, lse_b) -> (o, lse)   over the union of two key sets
  Exercise 5  attention_backward_one_head(q, k, v, do, lse) -> (dq, dk, dv)   == autograd, without autograd
Shapes: m, l (rows,); acc (rows, d); scores (rows, n); values (n, d);
q, k, v, o (batch, length, heads, d); q_t, k_t, v_t, y_t (batch, heads, d); caches (batch, t, heads, d).
"""

import math

import pytest
import torch

from seqbook import attention
from seqbook.grading.checks import as_tuple, assert_close

F64, F32 = torch.float64, torch.float32

# seqbook's attention (reference, tiled and kernel) and torch's fused attention are blocked while
# the exercises run; torch.softmax stays allowed.
SDPA = ["torch.nn.functional.scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_fused_attention_overrideable"]
ATTENTION = ["seqbook.attention.*", "seqbook.kernels.attention.*", "seqbook.linear_attention.*"] + SDPA
AUTOGRAD = ["torch.autograd.grad", "torch.autograd.backward"]
FORBIDDEN = {"online_softmax_step": ATTENTION, "causal_attention": ATTENTION, "kv_cache_step": ATTENTION,
             "merge_partial_attention": ATTENTION, "attention_backward_one_head": ATTENTION + AUTOGRAD}
FORBIDDEN_WHY = {"attention_backward_one_head": "Exercise 5 asks for the backward pass by hand, without autograd"}


def _randn(*shape, gen, dtype=F64, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen, dtype=F64)).to(dtype)


@pytest.mark.points(3)
def test_online_softmax_step(submission):
    """Exercise 1: m' = max(m, rowmax s); l' = l e^{m-m'} + sum e^{s-m'}; acc' = acc e^{m-m'} + e^{s-m'} V."""
    gen = torch.Generator().manual_seed(501)
    # (rows, n per block, d, blocks, score scale, dtype)
    cases = [(1, 1, 1, 1, 1.0, F64), (4, 5, 3, 3, 1.0, F64), (3, 16, 8, 4, 1000.0, F64), (2, 7, 4, 5, 300.0, F32),
             (6, 1, 2, 9, 5.0, F64)]
    for rows, n, d, blocks, scale, dtype in cases:
        scores = _randn(rows, n * blocks, gen=gen, dtype=dtype, scale=scale)
        values = _randn(n * blocks, d, gen=gen, dtype=dtype)
        m = torch.full((rows,), -math.inf, dtype=dtype)
        l, acc = torch.zeros(rows, dtype=dtype), torch.zeros(rows, d, dtype=dtype)
        case = f"rows={rows}, blocks of {n}, d={d}, scores ~ {scale:g}, {dtype}"
        for b in range(blocks):
            s, v = scores[:, b * n : (b + 1) * n], values[b * n : (b + 1) * n]
            m_ref, l_ref = attention.online_softmax_update(m, l, s)
            acc_ref = acc * torch.exp(m - m_ref)[:, None] + torch.exp(s - m_ref[:, None]) @ v
            m, l, acc = as_tuple(submission.online_softmax_step(m, l, acc, s, v), ("m", "l", "acc"),
                                 "online_softmax_step")  # fmt: skip
            tol = 1e-12 if dtype == F64 else 1e-5
            where = f"({case}, after block {b})"
            assert_close(m, m_ref, f"m {where}", rtol=tol, atol=tol)
            assert_close(l, l_ref, f"l {where}", rtol=tol, atol=tol)
            assert_close(acc, acc_ref, f"acc {where}", rtol=tol, atol=tol)
        # and the end result is the softmax-weighted average
        want = torch.softmax(scores.double(), -1) @ values.double()
        tol = 1e-10 if dtype == F64 else 1e-4
        assert_close((acc / l[:, None]).double(), want, f"acc / l after all blocks ({case})", rtol=tol, atol=tol)


@pytest.mark.points(3)
def test_causal_attention(submission):
    """Exercise 2: softmax(q k^T / sqrt(d) + M) v, M = -inf where key j > query i; stable."""
    gen = torch.Generator().manual_seed(502)
    # (B, L, H, d, magnitude, dtype)
    cases = [(1, 1, 1, 4, 1.0, F64), (2, 13, 3, 8, 1.0, F64), (1, 40, 2, 16, 1.0, F64), (2, 9, 1, 5, 1.0, F64),
             (1, 20, 2, 8, 15.0, F32)]
    for B, L, H, d, magnitude, dtype in cases:
        q, k, v = (_randn(B, L, H, d, gen=gen, dtype=dtype, scale=s) for s in (magnitude, magnitude, 1.0))
        want = attention.attention_naive(q, k, v, causal=True)
        got = submission.causal_attention(q, k, v)
        tol = 1e-12 if dtype == F64 else 1e-5
        assert_close(got, want, f"o (q of shape {(B, L, H, d)}, |q|, |k| ~ {magnitude:g}, {dtype})", rtol=tol, atol=tol)


@pytest.mark.points(4)
def test_kv_cache_step(submission):
    """Exercise 3: the caches grow by one row; y_t = softmax(q_t . k_cache / sqrt(d)) v_cache; a
    whole sequence decoded step by step equals causal attention."""
    gen = torch.Generator().manual_seed(503)
    # one step from caches of t rows: (B, t, H, d)
    for B, t, H, d in [(1, 0, 1, 4), (2, 5, 3, 8), (1, 31, 2, 16)]:
        q_t, k_t, v_t = (_randn(B, H, d, gen=gen) for _ in range(3))
        k_cache, v_cache = _randn(B, t, H, d, gen=gen), _randn(B, t, H, d, gen=gen)
        y, k_new, v_new = as_tuple(submission.kv_cache_step(q_t, k_t, v_t, k_cache, v_cache),
                                   ("y_t", "k_cache", "v_cache"), "kv_cache_step")  # fmt: skip
        k_ref, v_ref = torch.cat([k_cache, k_t[:, None]], 1), torch.cat([v_cache, v_t[:, None]], 1)
        case = f"(caches of shape {(B, t, H, d)})"
        assert_close(k_new, k_ref, f"k_cache {case}", rtol=0, atol=0)
        assert_close(v_new, v_ref, f"v_cache {case}", rtol=0, atol=0)
        assert_close(y, attention.decode_step(q_t, k_ref, v_ref), f"y_t {case}", rtol=1e-12, atol=1e-12)
    # a whole sequence, from empty caches, with large scores
    B, L, H, d = 2, 12, 2, 8
    q, k, v = (_randn(B, L, H, d, gen=gen, scale=s) for s in (10.0, 10.0, 1.0))
    k_cache, v_cache = torch.zeros(B, 0, H, d, dtype=F64), torch.zeros(B, 0, H, d, dtype=F64)
    outputs = []
    for step in range(L):
        y, k_cache, v_cache = as_tuple(submission.kv_cache_step(q[:, step], k[:, step], v[:, step], k_cache, v_cache),
                                       ("y_t", "k_cache", "v_cache"), "kv_cache_step")  # fmt: skip
        outputs.append(y)
    assert_close(torch.stack(outputs, 1), attention.attention_naive(q, k, v, causal=True),
                 f"outputs of {L} decoding steps vs causal attention (|q|, |k| ~ 10)", rtol=1e-11, atol=1e-11)


def _part(scores, values):
    """(output, lse) of attention over some keys: softmax(scores) @ values and logsumexp(scores); empty -> (0, -inf)."""
    if scores.shape[-1] == 0:
        return torch.zeros(scores.shape[0], values.shape[-1], dtype=scores.dtype), torch.full(scores.shape[:1], -math.inf,
                                                                                            dtype=scores.dtype)
    return torch.softmax(scores, -1) @ values, torch.logsumexp(scores, -1)


@pytest.mark.points(3)
def test_merge_partial_attention(submission, credit):
    """Exercise 4: o = (e^{lse_a} o_a + e^{lse_b} o_b) / (e^{lse_a} + e^{lse_b}), computed relative to lse = logaddexp."""
    gen = torch.Generator().manual_seed(504)
    # (rows, keys, split, d, score scale, dtype, what)
    cases = [(4, 10, 3, 5, 1.0, F64, "small scores"), (3, 33, 20, 8, 1000.0, F64, "scores in the thousands"),
             (2, 16, 1, 4, 300.0, F32, "float32, scores of hundreds"), (5, 12, 0, 3, 5.0, F64, "the first part empty"),
             (3, 9, 9, 2, 5.0, F64, "the second part empty")]
    for rows, n, split, d, scale, dtype, what in cases:
        with credit.case(what):
            scores = _randn(rows, n, gen=gen, dtype=dtype, scale=scale)
            values = _randn(n, d, gen=gen, dtype=dtype)
            o_a, lse_a = _part(scores[:, :split], values[:split])
            o_b, lse_b = _part(scores[:, split:], values[split:])
            o, lse = as_tuple(submission.merge_partial_attention(o_a, lse_a, o_b, lse_b), ("o", "lse"),
                              "merge_partial_attention")
            want_o, want_lse = _part(scores.double(), values.double())
            tol = 1e-10 if dtype == F64 else 1e-4
            naive = (torch.exp(lse_a)[:, None] * o_a + torch.exp(lse_b)[:, None] * o_b) / (torch.exp(lse_a) + torch.exp(lse_b))[:, None]
            assert_close(lse, want_lse.to(dtype), f"lse ({what})", rtol=tol, atol=tol * max(scale, 1.0))
            assert_close(o, want_o.to(dtype), f"o ({what})", rtol=tol, atol=tol,
                         mistakes={"exp(lse) overflows: weight each part by exp(lse_part - lse) instead": naive})


@pytest.mark.points(4)
def test_attention_backward_one_head(submission, credit):
    """Exercise 5: P = exp(S - lse), dV = P^T dO, dP = dO V^T, dS = P (dP - delta), delta = rowsum(dO o O), dQ = s dS K, dK = s dS^T Q."""
    gen = torch.Generator().manual_seed(505)
    # (L, d, magnitude of q and k, dtype)
    for L, d, magnitude, dtype in [(1, 4, 1.0, F64), (9, 8, 1.0, F64), (31, 16, 10.0, F64), (20, 8, 30.0, F64),
                                   (17, 16, 5.0, F32)]:
        what = f"L = {L}, d = {d}, |q|, |k| ~ {magnitude:g}, {dtype}"
        with credit.case(what):
            q, k = (_randn(L, d, gen=gen, dtype=dtype, scale=magnitude) for _ in range(2))
            v, do = (_randn(L, d, gen=gen, dtype=dtype) for _ in range(2))
            scale = 1 / math.sqrt(d)
            lse = torch.logsumexp(scale * q @ k.T, -1)
            dq, dk, dv = as_tuple(submission.attention_backward_one_head(q, k, v, do, lse), ("dq", "dk", "dv"),
                                  "attention_backward_one_head")
            leaves = [x.double().clone().requires_grad_() for x in (q, k, v)]
            attention.attention_naive(*(x[None, :, None] for x in leaves))[0, :, 0].backward(do.double())
            P = torch.softmax(scale * q.double() @ k.double().T, -1)
            no_delta = scale * (P * (do.double() @ v.double().T)) @ k.double()  # dS without the - delta term
            tol = 1e-8 if dtype == F64 else 2e-3
            for name, got, leaf in (("dv", dv, leaves[2]), ("dk", dk, leaves[1]), ("dq", dq, leaves[0])):
                want = leaf.grad.to(dtype)
                assert_close(got, want, f"{name} ({what})", rtol=tol, atol=tol * max(1.0, want.abs().max().item()),
                             mistakes={"dS is missing the - delta_i term (delta_i = rowsum(dO * O))": no_delta.to(dtype)}
                             if name == "dq" else None)
