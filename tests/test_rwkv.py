"""Tests for seqbook.rwkv: RWKV-4's WKV (naive, stable recurrent "RNN mode", parallel "GPT mode"),
RWKV-6's and RWKV-7's operators (recurrent against chunked, and against their definitions and
special cases), and the RWKV6 / RWKV7 mixers (causal, step decoding equal to forward, in a
LanguageModel). float64 where forms must agree to rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

from seqbook import linear_attention as la
from seqbook import rwkv
from seqbook.nn import RWKV6, RWKV7, LanguageModel
from compare import assert_near

F64 = torch.float64


def randn(*shape, seed=0, dtype=F64, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen, dtype=F64)).to(dtype)


def rand(*shape, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=gen, dtype=F64).to(dtype)


def wkv4_problem(B, L, C, seed=0, k_scale=1.0, dtype=F64):
    return (rand(C, seed=seed, dtype=dtype), randn(C, seed=seed + 1, dtype=dtype),
            randn(B, L, C, seed=seed + 2, scale=k_scale, dtype=dtype), randn(B, L, C, seed=seed + 3, dtype=dtype))


def wkv4_by_definition(w, u, k, v):
    """The paper's ratio, term by term, in float64 (moderate k only)."""
    B, L, C = k.shape
    out = torch.zeros(B, L, C, dtype=F64)
    for t in range(L):
        num = torch.exp(u + k[:, t]) * v[:, t]
        den = torch.exp(u + k[:, t])
        for i in range(t):
            e = torch.exp(-(t - 1 - i) * w + k[:, i])
            num, den = num + e * v[:, i], den + e
        out[:, t] = num / den
    return out


# --------------------------------------------------------------------------------------
# RWKV-4
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [1, 2, 23])
def test_wkv4_forms_are_the_definition(L):
    w, u, k, v = wkv4_problem(2, L, 5, seed=L)
    want = wkv4_by_definition(w, u, k, v)
    torch.testing.assert_close(rwkv.wkv4_naive(w, u, k, v), want, rtol=1e-12, atol=1e-12)
    rnn, S_rnn = rwkv.wkv4_recurrent(w, u, k, v)
    gpt, S_gpt = rwkv.wkv4_parallel(w, u, k, v)
    torch.testing.assert_close(rnn, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gpt, rnn, rtol=1e-12, atol=1e-12)  # GPT mode == RNN mode
    for name, x, y in zip("abp", S_gpt, S_rnn):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=f"final state {name}")


def test_wkv4_state_continues_the_sequence():
    w, u, k, v = wkv4_problem(2, 30, 4, seed=3, k_scale=5.0)
    whole, S = rwkv.wkv4_recurrent(w, u, k, v)
    _, S1 = rwkv.wkv4_recurrent(w, u, k[:, :13], v[:, :13])
    for form in (rwkv.wkv4_recurrent, rwkv.wkv4_parallel):
        rest, S2 = form(w, u, k[:, 13:], v[:, 13:], S1)
        torch.testing.assert_close(rest, whole[:, 13:], rtol=1e-12, atol=1e-12, msg=form.__name__)
        for x, y in zip(S2, S):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_wkv4_naive_overflows_where_the_stable_form_does_not():
    # Keys of size ~100: e^k is inf in float32, and inf / inf is nan. The stable forms only
    # exponentiate differences to a running maximum.
    w, u, k, v = wkv4_problem(1, 64, 8, seed=4, k_scale=60.0, dtype=torch.float32)
    assert k.max() > 89
    assert torch.isnan(rwkv.wkv4_naive(w, u, k, v)).any()
    want = rwkv.wkv4_recurrent(*(x.double() for x in (w, u, k, v)))[0]
    for out in (rwkv.wkv4_recurrent(w, u, k, v)[0], rwkv.wkv4_parallel(w, u, k, v)[0], rwkv.wkv4(w, u, k, v)):
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    # the output is a weighted average of values: within their range
    assert (want.abs() <= v.double().abs().max() + 1e-12).all()


def test_wkv4_gradients_gpt_equal_rnn():
    inputs = wkv4_problem(1, 12, 3, seed=5)
    def grads(fn):
        leaves = [x.clone().requires_grad_() for x in inputs]
        out, (a, b, p) = fn(*leaves)
        (out.sin().sum() + (a / b).sum()).backward()
        return [x.grad for x in leaves]
    for name, g, h in zip(("w", "u", "k", "v"), grads(rwkv.wkv4_parallel), grads(rwkv.wkv4_recurrent)):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12, msg=name)


def test_wkv4_public_entry_and_errors():
    w, u, k, v = wkv4_problem(2, 9, 3, seed=6)
    out, S = rwkv.wkv4(w, u, k, v, return_final_state=True)
    torch.testing.assert_close(out, rwkv.wkv4_parallel(w, u, k, v)[0], rtol=1e-12, atol=1e-12)
    assert rwkv.wkv4(w.half(), u.half(), k.half(), v.half()).dtype == torch.float16
    with pytest.raises(ValueError, match=r"k must be \(batch, length, C\)"):
        rwkv.wkv4(w, u, k[0], v[0])
    with pytest.raises(ValueError, match=r"w must be \(C,\) = \(3,\)"):
        rwkv.wkv4(w[:2], u, k, v)
    with pytest.raises(ValueError, match="w must be >= 0"):
        rwkv.wkv4(-w, u, k, v)
    with pytest.raises(ValueError, match="v must have the shape of k"):
        rwkv.wkv4(w, u, k, v[:, :3])
    with pytest.raises(TypeError, match="u must be a torch.Tensor"):
        rwkv.wkv4(w, u.tolist(), k, v)
    with pytest.raises(ValueError, match=r"initial_state must be a tuple \(a, b, p\)"):
        rwkv.wkv4(w, u, k, v, initial_state=S[:2])
    with pytest.raises(ValueError, match="backend must be one of"):
        rwkv.wkv4(w, u, k, v, backend="cuda")


# --------------------------------------------------------------------------------------
# RWKV-6 and RWKV-7
# --------------------------------------------------------------------------------------


def heads_problem(B, L, H, N, seed=0):
    r, k, v = randn(B, L, H, N, seed=seed), randn(B, L, H, N, seed=seed + 1), randn(B, L, H, N, seed=seed + 2)
    log_w = -rand(B, L, H, N, seed=seed + 3)
    S0 = randn(B, H, N, N, seed=seed + 4)
    return r, k, v, log_w, S0


@pytest.mark.parametrize("L", [1, 30])
def test_wkv6_recurrent_chunked_and_gla_agree(L):
    r, k, v, log_w, S0 = heads_problem(2, L, 3, 4, seed=L)
    u = randn(3, 4, seed=7)
    for state in (None, S0):
        o, S = rwkv.wkv6_recurrent(r, k, v, log_w, u, state)
        for C in (1, 7, 64):
            o_c, S_c = rwkv.wkv6_chunked(r, k, v, log_w, u, state, chunk_size=C)
            torch.testing.assert_close(o_c, o, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(S_c, S, rtol=1e-12, atol=1e-12)
        o_q, _ = la.gla_quadratic(r, k, v, log_w, state, 1.0, u)
        torch.testing.assert_close(o_q, o, rtol=1e-12, atol=1e-12)
        o_e, S_e = rwkv.wkv6(r, k, v, log_w, u, initial_state=state, chunk_size=8, return_final_state=True)
        torch.testing.assert_close(o_e, o, rtol=1e-12, atol=1e-12)


def test_wkv6_one_update_by_hand():
    # o = r (S + diag(u) k^T v), S' = diag(w) S + k^T v, with explicit outer products
    r, k, v, log_w, S0 = heads_problem(1, 1, 1, 3, seed=8)
    u = randn(1, 3, seed=9)
    o, S = rwkv.wkv6_recurrent(r, k, v, log_w, u, S0)
    kv = torch.outer(k[0, 0, 0], v[0, 0, 0])
    torch.testing.assert_close(o[0, 0, 0], r[0, 0, 0] @ (S0[0, 0] + torch.diag(u[0]) @ kv), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(S[0, 0], torch.diag(torch.exp(log_w[0, 0, 0])) @ S0[0, 0] + kv, rtol=1e-14, atol=1e-14)


def wkv7_problem(B, L, H, N, seed=0):
    r, k, v, log_w, S0 = heads_problem(B, L, H, N, seed=seed)
    kappa_hat = torch.nn.functional.normalize(randn(B, L, H, N, seed=seed + 5), dim=-1)
    a = rand(B, L, H, N, seed=seed + 6)
    return r, log_w, k, v, kappa_hat, a, S0


@pytest.mark.parametrize("L", [1, 23, 40])
def test_wkv7_chunked_equals_recurrent(L):
    r, log_w, k, v, kh, a, S0 = wkv7_problem(2, L, 2, 4, seed=L)
    for state in (None, S0):
        o, S = rwkv.wkv7_recurrent(r, log_w, k, v, kh, a, state)
        for C in (1, 5, 16, 64):
            o_c, S_c = rwkv.wkv7_chunked(r, log_w, k, v, kh, a, state, chunk_size=C)
            torch.testing.assert_close(o_c, o, rtol=1e-11, atol=1e-11, msg=f"L={L}, C={C}")
            torch.testing.assert_close(S_c, S, rtol=1e-11, atol=1e-11, msg=f"L={L}, C={C}")


def test_wkv7_paper_form_one_step():
    # The paper's S (d_v x d_k): S_t = S_{t-1} (diag(w) - kappa^T (a * kappa)) + v^T k~, o = S r^T.
    r, log_w, k, v, kh, a, S0 = wkv7_problem(1, 1, 1, 5, seed=10)
    SP = S0[0, 0].T
    G = torch.diag(torch.exp(log_w[0, 0, 0])) - torch.outer(kh[0, 0, 0], a[0, 0, 0] * kh[0, 0, 0])
    SP_new = SP @ G + torch.outer(v[0, 0, 0], k[0, 0, 0])
    o, S = rwkv.wkv7_recurrent(r, log_w, k, v, kh, a, S0)
    torch.testing.assert_close(S[0, 0], SP_new.T, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(o[0, 0, 0], SP_new @ r[0, 0, 0], rtol=1e-14, atol=1e-14)


def test_wkv7_special_cases_delta_rule_and_gla():
    r, log_w, k, v, _, _, S0 = wkv7_problem(2, 19, 2, 4, seed=11)
    k = torch.nn.functional.normalize(k, dim=-1)
    beta = rand(2, 19, 2, seed=12)
    ones = torch.ones_like(k)
    # w = 1, a = beta, kappa_hat = k, k~ = beta k: the delta rule (scale 1)
    o, S = rwkv.wkv7_chunked(r, 0 * log_w, beta[..., None] * k, v, k, beta[..., None] * ones, S0, chunk_size=8)
    o_d, S_d = la.delta_rule_recurrent(r, k, v, beta, S0, scale=1.0)
    torch.testing.assert_close(o, o_d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, S_d, rtol=1e-12, atol=1e-12)
    # a = 0: gated linear attention without bonus
    o, S = rwkv.wkv7_recurrent(r, log_w, k, v, k, 0 * ones, S0)
    o_g, S_g = la.gla_recurrent(r, k, v, log_w, S0, scale=1.0)
    torch.testing.assert_close(o, o_g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, S_g, rtol=1e-12, atol=1e-12)


def test_wkv7_gradients_chunked_equal_recurrent():
    inputs = wkv7_problem(1, 13, 2, 3, seed=13)
    def grads(fn, **kw):
        leaves = [x.clone().requires_grad_() for x in inputs]
        o, S = fn(*leaves, **kw)
        (o.sin().sum() + S.cos().sum()).backward()
        return [x.grad for x in leaves]
    names = ("r", "log_w", "k", "v", "kappa_hat", "a", "initial_state")
    for name, g, h in zip(names, grads(rwkv.wkv7_chunked, chunk_size=5), grads(rwkv.wkv7_recurrent)):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12, msg=name)


def test_wkv7_public_entry_and_errors():
    r, log_w, k, v, kh, a, S0 = wkv7_problem(2, 9, 2, 4, seed=14)
    o, S = rwkv.wkv7(r, log_w, k, v, kh, a, initial_state=S0, return_final_state=True)
    o_r, S_r = rwkv.wkv7_recurrent(r, log_w, k, v, kh, a, S0)
    torch.testing.assert_close(o, o_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, S_r, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"log_w must be <= 0"):
        rwkv.wkv7(r, -log_w, k, v, kh, a)
    with pytest.raises(ValueError, match=r"a must lie in \[0, 1\]"):
        rwkv.wkv7(r, log_w, k, v, kh, 2 * a)
    with pytest.raises(ValueError, match="kappa_hat must have the shape of r"):
        rwkv.wkv7(r, log_w, k, v, kh[:, :3], a)
    with pytest.raises(ValueError, match=r"r must be \(batch, length, H, N\)"):
        rwkv.wkv7(r[0], log_w[0], k[0], v[0], kh[0], a[0])
    with pytest.raises(ValueError, match=r"initial_state must be \(batch, H, N, d_v\)"):
        rwkv.wkv7(r, log_w, k, v, kh, a, initial_state=S0[0])
    for i, name in ((2, "k"), (3, "v"), (4, "kappa_hat"), (5, "a")):  # mixed dtypes: an error, not a kernel crash
        args = [r, log_w, k, v, kh, a]
        args[i] = args[i].float()
        with pytest.raises(TypeError, match=f"wkv7: {name} must have the dtype of r"):
            rwkv.wkv7(*args, backend="reference")
    with pytest.raises(ValueError, match="wkv6: log_w must be <= 0"):
        rwkv.wkv6(r, k, v, -log_w, randn(2, 4))
    with pytest.raises(ValueError, match=r"wkv6: u must be \(heads, d_k\) = \(2, 4\)"):
        rwkv.wkv6(r, k, v, log_w, randn(4))


# --------------------------------------------------------------------------------------
# Mixers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("Mixer", [RWKV6, RWKV7])
def test_mixer_step_reproduces_forward(Mixer):
    torch.manual_seed(0)
    mixer = Mixer(24, 3).double()
    for p in mixer.parameters():  # move off the initialization (zero low-rank B's, equal mu's)
        p.data += 0.1 * torch.randn_like(p)
    x = randn(2, 13, 24, seed=15)
    y = mixer(x)
    state = mixer.init_state(2, dtype=F64)
    steps = []
    for t in range(13):
        y_t, state = mixer.step(x[:, t], state)
        steps.append(y_t)
        assert state[1].shape == (2, 3, 8, 8)  # constant size
    torch.testing.assert_close(torch.stack(steps, 1), y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("Mixer", [RWKV6, RWKV7])
def test_mixer_is_causal_and_trains(Mixer):
    torch.manual_seed(0)
    mixer = Mixer(16, 2).double()
    x = randn(1, 20, 16, seed=16)
    x2 = x.clone()
    x2[:, 10:] += 1.0
    torch.testing.assert_close(mixer(x2)[:, :10], mixer(x)[:, :10], rtol=0, atol=0)
    mixer(x).square().sum().backward()
    no_grad = [n for n, p in mixer.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    with pytest.raises(ValueError, match="n_heads"):
        Mixer(10, 3)
    with pytest.raises(ValueError, match=r"\(batch, length, d_model\)"):
        mixer(torch.zeros(1, 3, 8, dtype=F64))


@pytest.mark.parametrize("Mixer", [RWKV6, RWKV7])
def test_language_model_step_equals_forward(Mixer):
    torch.manual_seed(0)
    model = LanguageModel(lambda d: Mixer(d, 2), vocab_size=11, d_model=16, n_layers=2).double().eval()
    tokens = torch.randint(0, 11, (2, 9))
    logits = model(tokens)
    state = model.init_state(2)
    for t in range(9):
        step_logits, state = model.step(tokens[:, t], state)
        torch.testing.assert_close(step_logits, logits[:, t], rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------
# The WKV-4 Triton kernel against the float64 reference (interpreted on CPU, compiled on CUDA)
# --------------------------------------------------------------------------------------

ON_GPU = torch.cuda.is_available()
# (batch, length, C, chunk, key scale)
if ON_GPU:
    WKV4_SHAPES = [(2, 1000, 96, 64, 1.0), (1, 4097, 2048, 64, 3.0), (3, 77, 40, 32, 30.0), (1, 1, 5, 64, 1.0)]
else:
    WKV4_SHAPES = [(1, 1, 3, 4, 1.0), (2, 37, 40, 8, 3.0), (1, 70, 5, 16, 30.0), (1, 45, 33, 64, 1.0)]


def wkv4_kernel_and_reference(device, shape, *, state, dtype=torch.float32, seed=0):
    """The kernel's (wkv, final state, grads) and the float64 recurrence's on the same rounded inputs,
    for the loss <wkv, g>."""
    B, L, C, T, k_scale = shape
    w, u, k, v = wkv4_problem(B, L, C, seed=seed, k_scale=k_scale, dtype=dtype)
    inputs = [x.to(device) for x in (w, u, k, v)]
    if state:
        _, S0 = rwkv.wkv4_recurrent(*(x.double() for x in (w, u)), randn(B, 6, C, seed=seed + 9, scale=k_scale),
                                    randn(B, 6, C, seed=seed + 10))  # fmt: skip
        inputs += [x.float().to(device) for x in S0]
    g = randn(B, L, C, seed=seed + 11).to(device=device, dtype=dtype)
    names = ["w", "u", "k", "v"] + (["a0", "b0", "p0"] if state else [])

    def run(fn, xs):
        leaves = [x.detach().clone().requires_grad_() for x in xs]
        out, final = fn(leaves)
        (out.to(F64) * g.to(F64)).sum().backward()
        # an input that reaches only the final state (w at length 1) gets no gradient from the reference: zero
        grads = {f"d{n}": torch.zeros_like(x) if x.grad is None else x.grad for n, x in zip(names, leaves)}
        return dict(wkv=out.detach(), final=[f.detach() for f in final], **grads)

    got = run(lambda t: rwkv.wkv4(*t[:4], initial_state=tuple(t[4:]) if state else None, chunk_size=T,
                                  return_final_state=True, backend="triton"), inputs)  # fmt: skip
    want = run(lambda t: rwkv.wkv4_recurrent(*t[:4], tuple(t[4:]) if state else None), [x.double() for x in inputs])
    return got, want


@pytest.mark.parametrize("shape", WKV4_SHAPES)
@pytest.mark.parametrize("state", [False, True])
def test_wkv4_kernel_matches_reference(device, shape, state):
    got, want = wkv4_kernel_and_reference(device, shape, state=state, seed=shape[1])
    assert_near(got["wkv"], want["wkv"], 1e-5, f"wkv at {shape}")
    # the final state's scaling p may differ; the sums a e^p, b e^p may not (float32 exponentials of
    # differences up to ~100: a relative error of ~100 eps)
    (a, b, p), (a_r, b_r, p_r) = got["final"], want["final"]
    assert_near(a * torch.exp(p.double() - p_r), a_r, 1e-4, "final a e^p")
    assert_near(b * torch.exp(p.double() - p_r), b_r, 1e-4, "final b e^p")
    for name in [n for n in want if n.startswith("d")]:
        # dp0 = a0 da0 + b0 db0 cancels: a looser bound, still far below any wrong formula. With keys of
        # size 30 the exponentials of differences up to ~100 carry ~100 eps each, as the final state's do
        # (compiled on an H200, dw at (3, 77, 40, 32, 30) came out 2.2e-5): the final state's 1e-4 there.
        tol = 2e-4 if name == "dp0" else (1e-4 if shape[4] > 10 else 2e-5)
        assert_near(got[name], want[name], tol, f"{name} at {shape}, state={state}")


def test_wkv4_kernel_forward_without_gradients(device):
    # without gradients the kernel writes no log-denominators: the same outputs and final state
    B, L, C, T = 2, 37, 40, 8
    w, u, k, v = (x.float().to(device) for x in wkv4_problem(B, L, C, seed=12, k_scale=3.0))
    S0 = tuple(x.float().to(device) for x in (randn(B, C, seed=13), rand(B, C, seed=14) + 0.5, randn(B, C, seed=15)))
    with torch.no_grad():
        got, (a, b, p) = rwkv.wkv4(w, u, k, v, initial_state=S0, chunk_size=T, return_final_state=True,
                                   backend="triton")  # fmt: skip
    want, (a_r, b_r, p_r) = rwkv.wkv4_recurrent(*(x.double() for x in (w, u, k, v)), tuple(x.double() for x in S0))
    assert_near(got, want, 1e-5, "wkv without gradients")
    assert_near(a * torch.exp(p.double() - p_r), a_r, 1e-4, "final a e^p without gradients")
    assert_near(b * torch.exp(p.double() - p_r), b_r, 1e-4, "final b e^p without gradients")


def test_wkv4_kernel_huge_keys_float16(device):
    # keys of size ~100 in float16 inputs: e^k overflows float16 at 11 and float32 at 88; the kernel
    # works in float32 on differences to a running maximum.
    shape = (1, 50, 8, 16, 60.0)
    got, want = wkv4_kernel_and_reference(device, shape, state=False, dtype=torch.float16, seed=3)
    assert got["wkv"].dtype == torch.float16
    assert_near(got["wkv"], want["wkv"], 3e-3, "wkv, float16")
    for name in ("dk", "dv", "du", "dw"):
        assert_near(got[name], want[name], 1e-2, f"{name}, float16")


def test_wkv4_kernel_refusals_and_auto(device):
    w, u, k, v = wkv4_problem(1, 8, 4, seed=4)
    with pytest.raises(TypeError, match="supports dtypes float16, bfloat16, float32.*got torch.float64"):
        rwkv.wkv4(*(x.to(device) for x in (w, u, k, v)), backend="triton")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        rwkv.wkv4(*(x.float().to(device) for x in (w, u, k, v)), chunk_size=0, backend="triton")
    # auto on CPU tensors: the reference; on CUDA float64: the reference too
    torch.testing.assert_close(rwkv.wkv4(*(x.to(device) for x in (w, u, k, v))).cpu(),
                               rwkv.wkv4_recurrent(w, u, k, v)[0], rtol=1e-12, atol=1e-12)  # fmt: skip
