"""Tests for chapter 6's vector gates (GLA) and delta rule in seqbook.linear_attention.

The recurrent, quadratic and chunked forms of gated linear attention (with and without
RWKV-6's bonus) are checked against each other and against a term-by-term definition in
float64; the chunked form against the recurrence in float32 under gates strong enough that
the one-product form (Q e^c)(K e^-c)^T overflows; gradients of the chunked form against the
quadratic form's. The delta rule's chunked (WY / UT transform) form is checked against its
recurrence, and the recurrence against its regression reading.
"""

from __future__ import annotations

import math

import pytest
import torch

from seqbook import linear_attention as la
from compare import assert_near, assert_steps_equal_forward

F64 = torch.float64


def randn(*shape, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def gates(*shape, seed=0, strength=1.0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return (-strength * torch.rand(*shape, generator=gen, dtype=F64)).to(dtype)


def gla_problem(B, L, H, d_k, d_v, seed=0, strength=1.0, dtype=F64):
    return (randn(B, L, H, d_k, seed=seed, dtype=dtype), randn(B, L, H, d_k, seed=seed + 1, dtype=dtype),
            randn(B, L, H, d_v, seed=seed + 2, dtype=dtype), gates(B, L, H, d_k, seed=seed + 3, strength=strength,
                                                                  dtype=dtype),
            randn(B, H, d_k, d_v, seed=seed + 4, dtype=dtype), randn(H, d_k, seed=seed + 5, dtype=dtype))  # fmt: skip


def gla_by_definition(q, k, v, log_alpha, S0, scale, bonus):
    """o_t term by term: sum_j s sum_c q_tc k_jc prod_{r=j+1}^{t} alpha_rc v_j (+ the state's share); tiny sizes."""
    B, L, H, d_k = q.shape
    alpha = torch.exp(log_alpha)
    o = torch.zeros(v.shape, dtype=F64)
    for t in range(L):
        last = t if bonus is None else t - 1  # the bonus form reads the state before step t
        for j in range(last + 1):
            decay = torch.prod(alpha[:, j + 1 : last + 1], dim=1)  # (B, H, d_k)
            o[:, t] += scale * (q[:, t] * k[:, j] * decay).sum(-1)[..., None] * v[:, j]
        if bonus is not None:
            o[:, t] += scale * (q[:, t] * bonus * k[:, t]).sum(-1)[..., None] * v[:, t]
        if S0 is not None:
            decay = torch.prod(alpha[:, : last + 1], dim=1)
            o[:, t] += scale * torch.einsum("bhk,bhkv->bhv", q[:, t] * decay, S0)
    return o


@pytest.mark.parametrize("with_bonus", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_gla_quadratic_is_the_definition(with_bonus, with_state):
    q, k, v, a, S0, u = gla_problem(2, 8, 2, 3, 4, seed=1)
    S0, u = (S0 if with_state else None), (u if with_bonus else None)
    o, _ = la.gla_quadratic(q, k, v, a, S0, 0.7, u)
    torch.testing.assert_close(o, gla_by_definition(q, k, v, a, S0, 0.7, u), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_bonus", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("L", [1, 29, 64])
def test_gla_three_forms_agree(L, with_state, with_bonus):
    q, k, v, a, S0, u = gla_problem(2, L, 3, 5, 4, seed=L)
    S0, u = (S0 if with_state else None), (u if with_bonus else None)
    o_rec, S_rec = la.gla_recurrent(q, k, v, a, S0, None, u)
    o_quad, S_quad = la.gla_quadratic(q, k, v, a, S0, None, u)
    torch.testing.assert_close(o_quad, o_rec, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S_quad, S_rec, rtol=1e-12, atol=1e-12)
    for C, c in ((1, 1), (7, 3), (16, 16), (16, 5), (100, 16)):  # neither divides 29; 100 > L
        o, S = la.gla_chunked(q, k, v, a, S0, None, u, chunk_size=C, sub_chunk_size=c)
        torch.testing.assert_close(o, o_rec, rtol=1e-12, atol=1e-12, msg=f"chunk {C}, sub-chunk {c}")
        torch.testing.assert_close(S, S_rec, rtol=1e-12, atol=1e-12, msg=f"chunk {C}, sub-chunk {c}")


def test_gla_with_equal_gates_is_scalar_decay_linear_attention():
    q, k, v, _, S0, _ = gla_problem(1, 21, 2, 4, 3, seed=5)
    a = gates(1, 21, 2, seed=6)
    o, S = la.gla_chunked(q, k, v, a[..., None].expand(-1, -1, -1, 4), S0, chunk_size=8)
    o_ref, S_ref = la.linear_attention_quadratic(q, k, v, a, S0)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, S_ref, rtol=1e-12, atol=1e-12)


def test_gla_strong_gates_float32_need_secondary_chunking():
    # 64 steps of alpha ~ e^-3 per channel: e^{-c} reaches e^{~100}, past float32's range, so the
    # one-product intra-chunk form (Q e^c)(K e^-c)^T is inf * 0 = nan; the sub-chunked form is fine.
    q, k, v, a, S0, u = gla_problem(1, 64, 1, 4, 4, seed=7, strength=6.0, dtype=torch.float32)
    c = torch.cumsum(a, dim=1)
    one_product = torch.einsum("bthk,bjhk->bhtj", q * torch.exp(c), k * torch.exp(-c)).tril()
    assert not torch.isfinite(one_product).all()
    o_ref, S_ref = la.gla_recurrent(*(x.double() for x in (q, k, v, a, S0)))
    for bonus in (None, u):
        o, S = la.gla_chunked(q, k, v, a, S0, bonus=bonus, chunk_size=64, sub_chunk_size=16)
        assert torch.isfinite(o).all() and torch.isfinite(S).all()
        if bonus is None:
            assert_near(o, o_ref, 1e-5, "o, float32, strong gates")
            torch.testing.assert_close(S.double(), S_ref, rtol=1e-5, atol=1e-5)


def test_gla_chunked_gradients_equal_recurrent_gradients():
    inputs = gla_problem(1, 19, 2, 3, 4, seed=8)
    def grads(fn, **kw):
        leaves = [x.clone().requires_grad_() for x in inputs]
        q, k, v, a, S0, u = leaves
        o, S = fn(q, k, v, a, S0, None, u, **kw)
        (o.sin().sum() + S.cos().sum()).backward()
        return [x.grad for x in leaves]
    want = grads(la.gla_recurrent)
    for name, g, w in zip(("q", "k", "v", "log_alpha", "initial_state", "bonus"),
                          grads(la.gla_chunked, chunk_size=8, sub_chunk_size=3), want):  # fmt: skip
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


def test_delta_rule_chunked_equals_recurrent():
    for L, C in ((1, 4), (23, 1), (23, 5), (23, 8), (64, 64), (50, 100)):
        q, k, v = randn(2, L, 3, 6, seed=L), randn(2, L, 3, 6, seed=L + 1), randn(2, L, 3, 5, seed=L + 2)
        k = torch.nn.functional.normalize(k, dim=-1)
        beta = torch.rand(2, L, 3, generator=torch.Generator().manual_seed(L), dtype=F64)
        S0 = randn(2, 3, 6, 5, seed=L + 3)
        for state in (None, S0):
            o_rec, S_rec = la.delta_rule_recurrent(q, k, v, beta, state)
            o, S = la.delta_rule_chunked(q, k, v, beta, state, chunk_size=C)
            torch.testing.assert_close(o, o_rec, rtol=1e-12, atol=1e-12, msg=f"L={L}, C={C}")
            torch.testing.assert_close(S, S_rec, rtol=1e-12, atol=1e-12, msg=f"L={L}, C={C}")


def test_delta_rule_replaces_what_linear_attention_adds():
    # A unit key written twice with beta = 1: the delta rule's state answers the second value,
    # additive linear attention the sum of both.
    k = torch.nn.functional.normalize(randn(1, 2, 1, 8, seed=9), dim=-1)
    k[:, 1] = k[:, 0]
    v = randn(1, 2, 1, 4, seed=10)
    _, S = la.delta_rule_recurrent(k, k, v, torch.ones(1, 2, 1, dtype=F64))
    torch.testing.assert_close(torch.einsum("k,kv->v", k[0, 0, 0], S[0, 0]), v[0, 1, 0], rtol=1e-12, atol=1e-12)
    _, S_add = la.linear_attention_recurrent(k, k, v)
    torch.testing.assert_close(torch.einsum("k,kv->v", k[0, 0, 0], S_add[0, 0]), v[0, 0, 0] + v[0, 1, 0])


def test_delta_rule_step_is_a_gradient_step():
    # S_t = S_{t-1} - beta grad_S (1/2)|S^T k - v|^2
    q, k, v = randn(1, 1, 1, 5, seed=11), randn(1, 1, 1, 5, seed=12), randn(1, 1, 1, 3, seed=13)
    S0 = randn(1, 1, 5, 3, seed=14).requires_grad_()
    loss = 0.5 * ((torch.einsum("k,kv->v", k[0, 0, 0], S0[0, 0]) - v[0, 0, 0]) ** 2).sum()
    (g,) = torch.autograd.grad(loss, S0)
    beta = torch.full((1, 1, 1), 0.3, dtype=F64)
    _, S = la.delta_rule_recurrent(q, k, v, beta, S0.detach())
    torch.testing.assert_close(S, S0.detach() - 0.3 * g, rtol=1e-12, atol=1e-12)


def test_ut_transform_is_forward_substitution():
    k, beta = randn(2, 9, 3, 4, seed=15), torch.rand(2, 9, 3, generator=torch.Generator().manual_seed(16), dtype=F64)
    T = la.ut_transform(k, beta)
    K = k.transpose(1, 2)
    A = torch.eye(9, dtype=F64) + (beta.transpose(1, 2)[..., None] * (K @ K.mT)).tril(-1)
    torch.testing.assert_close(A @ T, torch.diag_embed(beta.transpose(1, 2)), rtol=1e-12, atol=1e-12)
    assert torch.equal(T, T.tril())


def test_public_entries_and_errors():
    q, k, v, a, S0, u = gla_problem(2, 13, 2, 4, 3, seed=17)
    o, S = la.gla(q, k, v, a, initial_state=S0, bonus=u, chunk_size=5, return_final_state=True)
    o_ref, S_ref = la.gla_recurrent(q, k, v, a, S0, None, u)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, S_ref, rtol=1e-12, atol=1e-12)
    o16 = la.gla(q.half(), k.half(), v.half(), a)
    assert o16.dtype == torch.float16
    kn = torch.nn.functional.normalize(k, dim=-1)
    beta = torch.rand(2, 13, 2, dtype=F64)
    torch.testing.assert_close(la.delta_rule(q, kn, v, beta, chunk_size=4), la.delta_rule_recurrent(q, kn, v, beta)[0],
                               rtol=1e-12, atol=1e-12)  # fmt: skip
    with pytest.raises(ValueError, match=r"log_alpha must be \(batch, length, heads, d_k\) = \(2, 13, 2, 4\)"):
        la.gla(q, k, v, a[..., 0])
    with pytest.raises(ValueError, match="log_alpha must be <= 0"):
        la.gla(q, k, v, -a)
    with pytest.raises(ValueError, match=r"bonus must be \(heads, d_k\) = \(2, 4\)"):
        la.gla(q, k, v, a, bonus=u[0])
    with pytest.raises(ValueError, match=r"v must be \(batch, length, heads, d_v\)"):
        la.gla(q, k, v[:, :3], a)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        la.delta_rule(q, kn.float(), v, beta)
    with pytest.raises(ValueError, match=r"beta must be \(batch, length, heads\) = \(2, 13, 2\)"):
        la.delta_rule(q, kn, v, beta[..., 0])
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 2\]"):
        la.delta_rule(q, kn, v, 3 * beta)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        la.delta_rule(q, kn, v, beta, chunk_size=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        la.gla(q, k, v, a, backend="fast")


# --------------------------------------------------------------------------------------
# The GLA Triton kernel against the float64 reference (interpreted on CPU, compiled on CUDA)
# --------------------------------------------------------------------------------------

ON_GPU = torch.cuda.is_available()
# (batch, length, heads, d_k, d_v, gate strength): lengths that are not whole chunks of 64, several chunks (the
# state passed on), strong gates (exponents far below float32's range across a chunk), and on the GPU the
# benchmark's head dims (d = 128: two key blocks, two value blocks)
if ON_GPU:
    GLA_SHAPES = [(2, 1000, 3, 64, 64, 1.0), (1, 257, 2, 128, 128, 1.0), (2, 129, 2, 16, 32, 4.0), (1, 1, 1, 64, 64, 1.0),
                  (1, 300, 2, 64, 128, 20.0)]  # fmt: skip
else:
    GLA_SHAPES = [(1, 5, 1, 16, 16, 1.0), (2, 150, 2, 16, 32, 1.0), (1, 130, 1, 32, 16, 4.0), (1, 100, 1, 16, 16, 20.0)]


def gla_kernel_and_reference(device, shape, *, bonus, state, dtype=torch.float32, seed=0):
    """The kernel's (o, final state, grads) and the float64 recurrence's on the same rounded inputs,
    for the loss <o, do> + <final state, dS>."""
    B, L, H, d_k, d_v, strength = shape
    q, k, v, a, S0, u = gla_problem(B, L, H, d_k, d_v, seed=seed, strength=strength)
    inputs = [q.to(dtype), k.to(dtype), v.to(dtype), a.float(), S0.float() if state else None, u.float() if bonus else None]
    inputs = [None if x is None else x.to(device) for x in inputs]
    do = randn(B, L, H, d_v, seed=seed + 7).to(device=device, dtype=dtype)
    dS = randn(B, H, d_k, d_v, seed=seed + 8).to(device)
    names = ["q", "k", "v", "log_alpha", "initial_state", "bonus"]

    def run(fn, xs):
        leaves = [None if x is None else x.detach().clone().requires_grad_() for x in xs]
        o, S = fn(*leaves)
        ((o.to(F64) * do.to(F64)).sum() + (S.to(F64) * dS.to(F64)).sum()).backward()
        return dict(o=o.detach(), final_state=S.detach(), **{f"d{n}": x.grad for n, x in zip(names, leaves) if x is not None})

    got = run(lambda q, k, v, a, S0, u: la.gla(q, k, v, a, initial_state=S0, bonus=u, return_final_state=True,
                                               backend="triton"), inputs)  # fmt: skip
    want = run(lambda q, k, v, a, S0, u: la.gla_recurrent(q, k, v, a, S0, None, u),
               [None if x is None else x.double() for x in inputs])  # fmt: skip
    return got, want


@pytest.mark.parametrize("shape", GLA_SHAPES)
@pytest.mark.parametrize("bonus,state", [(False, False), (True, True), (False, True), (True, False)])
def test_gla_kernel_matches_reference(device, shape, bonus, state):
    got, want = gla_kernel_and_reference(device, shape, bonus=bonus, state=state, seed=shape[1])
    assert got["final_state"].dtype == torch.float32
    for name in want:
        assert_near(got[name], want[name], 2e-5, f"{name} at {shape}, bonus={bonus}, state={state}")


def test_gla_kernel_head_dim_128(device):
    """d_k = 128 runs in two blocks of key channels (the state passes, dq, dk), d_v = 128 in two or four of
    value columns: every block against the reference."""
    got, want = gla_kernel_and_reference(device, (1, 70, 1, 128, 128, 1.0), bonus=True, state=True, seed=11)
    for name in want:
        assert_near(got[name], want[name], 2e-5, f"{name} at d = 128")


# 16-bit inputs: the kernel's matrix products run on tensor cores at tf32 on the GPU (float32 in the interpreter)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16] if ON_GPU else [torch.float16])
def test_gla_kernel_16_bit(device, dtype):
    got, want = gla_kernel_and_reference(device, (1, 140, 2, 16, 32, 1.0), bonus=True, state=True, dtype=dtype, seed=9)
    assert got["o"].dtype == dtype
    for name in want:
        assert_near(got[name], want[name], 3e-3 if name in ("o", "final_state") else 1e-2, f"{name}, {dtype}")


def test_gla_kernel_refusals_and_rwkv6(device):
    q, k, v, a, S0, u = (x.float().to(device) for x in gla_problem(1, 20, 2, 16, 24, seed=10))
    with pytest.raises(ValueError, match=r"head dims d_v in \(16, 32, 64, 128\), got d_v = 24"):
        la.gla(q, k, v, a, backend="triton")
    with pytest.raises(TypeError, match="supports dtypes float16, bfloat16, float32.*got torch.float64"):
        la.gla(q.double(), k.double(), v.double(), a, backend="triton")
    # RWKV-6's operator reaches the kernel through gla (scale 1, bonus u)
    from seqbook import rwkv

    r, k2, v2, lw = (x[..., :16] for x in (q, k, v, a))
    o = rwkv.wkv6(r, k2, v2, lw, u, backend="triton")
    o_ref, _ = rwkv.wkv6_recurrent(*(x.double() for x in (r, k2, v2, lw, u)))
    assert_near(o, o_ref, 2e-5, "wkv6 through the kernel")


# --------------------------------------------------------------------------------------
# The delta-rule Triton kernel (WY form) against the float64 recurrence
# --------------------------------------------------------------------------------------

# (batch, length, heads, d_k, d_v)
DELTA_SHAPES = ([(2, 1000, 3, 64, 64), (1, 257, 2, 128, 128), (2, 129, 2, 16, 32), (1, 1, 1, 64, 64)] if ON_GPU
                else [(1, 5, 1, 16, 16), (2, 37, 2, 16, 32), (1, 50, 1, 32, 16)])  # fmt: skip


def rand(*shape, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=gen, dtype=F64).to(dtype)


def delta_kernel_and_reference(device, shape, *, state, dtype=torch.float32, seed=0):
    B, L, H, d_k, d_v = shape
    q, v = randn(B, L, H, d_k, seed=seed), randn(B, L, H, d_v, seed=seed + 1)
    k = torch.nn.functional.normalize(randn(B, L, H, d_k, seed=seed + 2), dim=-1)
    beta, S0 = rand(B, L, H, seed=seed + 3), randn(B, H, d_k, d_v, seed=seed + 4)
    inputs = [q.to(dtype), k.to(dtype), v.to(dtype), beta.float(), S0.float() if state else None]
    inputs = [None if x is None else x.to(device) for x in inputs]
    do = randn(B, L, H, d_v, seed=seed + 5).to(device=device, dtype=dtype)
    dS = randn(B, H, d_k, d_v, seed=seed + 6).to(device)
    names = ["q", "k", "v", "beta", "initial_state"]

    def run(fn, xs):
        leaves = [None if x is None else x.detach().clone().requires_grad_() for x in xs]
        o, S = fn(*leaves)
        ((o.to(F64) * do.to(F64)).sum() + (S.to(F64) * dS.to(F64)).sum()).backward()
        return dict(o=o.detach(), final_state=S.detach(), **{f"d{n}": x.grad for n, x in zip(names, leaves) if x is not None})

    got = run(lambda q, k, v, b, S0: la.delta_rule(q, k, v, b, initial_state=S0, return_final_state=True,
                                                   backend="triton"), inputs)  # fmt: skip
    want = run(la.delta_rule_recurrent, [None if x is None else x.double() for x in inputs])
    return got, want


@pytest.mark.parametrize("shape", DELTA_SHAPES)
@pytest.mark.parametrize("state", [False, True])
def test_delta_kernel_matches_reference(device, shape, state):
    got, want = delta_kernel_and_reference(device, shape, state=state, seed=shape[1])
    assert got["final_state"].dtype == torch.float32
    for name in want:
        assert_near(got[name], want[name], 2e-5, f"{name} at {shape}, state={state}")


def test_delta_kernel_float16_and_refusals(device):
    got, want = delta_kernel_and_reference(device, (1, 40, 2, 16, 16), state=True, dtype=torch.float16, seed=11)
    assert got["o"].dtype == torch.float16
    for name in want:
        assert_near(got[name], want[name], 3e-3 if name in ("o", "final_state") else 1e-2, f"{name}, float16")
    q = randn(1, 8, 1, 16, dtype=torch.float32).to(device)
    with pytest.raises(ValueError, match=r"head dims d_v in \(16, 32, 64, 128\), got d_v = 8"):
        la.delta_rule(q, q, q[..., :8], rand(1, 8, 1, dtype=torch.float32).to(device), backend="triton")


# --------------------------------------------------------------------------------------
# The mixers: GatedLinearAttention and DeltaNet
# --------------------------------------------------------------------------------------

MIXERS = {
    "gla": lambda d, h: la.GatedLinearAttention(d, h),
    "gla rank 4": lambda d, h: la.GatedLinearAttention(d, h, gate_rank=4, gate_temperature=4.0),
    "deltanet": lambda d, h: la.DeltaNet(d, h),
    "deltanet beta in (0, 2), no conv": lambda d, h: la.DeltaNet(d, h, beta_max=2, conv_size=None),
    "deltanet conv 2": lambda d, h: la.DeltaNet(d, h, conv_size=2),
    "deltanet, additive control": lambda d, h: la.DeltaNet(d, h, rule="additive"),
}


def mixer(name, d_model=12, n_heads=2, seed=0, dtype=F64, backend="reference"):
    torch.manual_seed(seed)
    m = MIXERS[name](d_model, n_heads).to(dtype)
    m.backend = backend
    with torch.no_grad():  # move the biases off their initial values so that every path is exercised
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, dtype=dtype))
    return m


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("L", [1, 70])  # 70 crosses a chunk boundary of the forward's chunked form
def test_mixer_step_equals_forward_with_gradients(name, L):
    """Decoding one token at a time is the same function as the chunked forward, in float64: outputs and
    the gradient of every parameter and of the input (the step runs the plain recurrence)."""
    m = mixer(name)
    x = randn(2, L, 12, seed=L)
    dy = randn(2, L, 12, seed=L + 1)
    # at L > 1 every parameter takes part: its gradient is not zero
    assert_steps_equal_forward(m, x, dy, name, every_parameter=L > 1)


@pytest.mark.parametrize("name", ["gla", "deltanet"])
def test_mixer_in_a_language_model_decodes_like_forward(name):
    from seqbook.nn import LanguageModel

    torch.manual_seed(3)
    lm = LanguageModel(lambda d: MIXERS[name](d, 2), vocab_size=11, d_model=16, n_layers=2, ffn_mult=2).double()
    tokens = torch.randint(0, 11, (3, 25), generator=torch.Generator().manual_seed(4))
    logits = lm(tokens)
    state = lm.init_state(3)
    steps = []
    for t in range(25):
        out, state = lm.step(tokens[:, t], state)
        steps.append(out)
    assert_near(torch.stack(steps, 1), logits, 1e-11, f"{name} language model: step vs forward")


def test_deltanet_beta_ranges_and_unit_keys():
    """beta_max bounds beta; q and k reach the delta rule with unit norm (the step is then a contraction)."""
    x = randn(2, 9, 12, seed=5) * 10  # large inputs: sigmoid near its ends
    for beta_max in (1, 2):
        m = la.DeltaNet(12, 3, beta_max=beta_max).double()
        with torch.no_grad():
            u = m.conv(m.qkv(x).transpose(1, 2))[..., :9].transpose(1, 2)
            q, k, v, beta = m._heads(u, x)
        assert beta.shape == (2, 9, 3) and float(beta.min()) >= 0 and float(beta.max()) <= beta_max
        assert float(beta.max()) > 0.9 * beta_max  # the range is used, not only its lower half
        torch.testing.assert_close(k.norm(dim=-1), torch.ones(2, 9, 3, dtype=F64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(q.norm(dim=-1), torch.ones(2, 9, 3, dtype=F64), rtol=1e-12, atol=1e-12)


def test_gla_mixer_gates_in_log_space():
    """log alpha = logsigmoid(.)/tau: <= 0, and near 0 at initialization (alpha ~ 0.5^(1/16) ~ 0.96)."""
    m = la.GatedLinearAttention(16, 2).double()
    with torch.no_grad():
        _, _, _, log_alpha = m._project(randn(2, 7, 16, seed=6))
    assert log_alpha.shape == (2, 7, 2, 8) and float(log_alpha.max()) <= 0
    alpha = torch.exp(log_alpha)
    assert 0.9 < float(alpha.min()) and float(alpha.max()) < 1


@pytest.mark.parametrize("name", ["gla", "deltanet"])
def test_mixer_kernel_backend_matches_reference(device, name):
    """With d_k = 16 the mixer's forward goes through the Triton kernel (interpreted on CPU):
    output and every parameter gradient equal to the reference backend's, in float32."""
    results = []
    for backend in ("triton", "reference"):
        m = mixer(name, d_model=32, n_heads=2, seed=7, dtype=torch.float32, backend=backend).to(device)
        x = randn(2, 20, 32, seed=8, dtype=torch.float32).to(device)
        y = m(x)
        (y * randn(2, 20, 32, seed=9, dtype=torch.float32).to(device)).sum().backward()
        results.append((y.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (y_k, g_k), (y_r, g_r) = results
    assert_near(y_k, y_r, 1e-4, f"{name}: kernel vs reference")
    for n in g_r:
        assert_near(g_k[n], g_r[n], 1e-4, f"{name}: d{n}, kernel vs reference")


def test_mixer_bad_input():
    for cls in (la.GatedLinearAttention, la.DeltaNet):
        with pytest.raises(ValueError, match="n_heads must be a positive int dividing d_model = 12"):
            cls(12, 5)
        with pytest.raises(ValueError, match="d_model must be a positive int"):
            cls(0, 1)
        m = cls(12, 2)
        with pytest.raises(ValueError, match=r"x must be \(batch, length, d_model\) with d_model = 12, got shape \(2, 5, 8\)"):
            m(torch.zeros(2, 5, 8))
        with pytest.raises(TypeError, match=r"x must be a floating tensor"):
            m(torch.zeros(2, 5, 12, dtype=torch.long))
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            m([[0.0] * 12])
        with pytest.raises(ValueError, match=r"x must be \(batch, d_model\) with d_model = 12, got shape \(2, 1, 12\)"):
            m.step(torch.zeros(2, 1, 12), m.init_state(2))
    with pytest.raises(ValueError, match="beta_max must be 1"):
        la.DeltaNet(12, 2, beta_max=3)
    with pytest.raises(ValueError, match="rule must be 'delta' or 'additive'"):
        la.DeltaNet(12, 2, rule="hebb")
    with pytest.raises(ValueError, match="conv_size must be a positive int or None"):
        la.DeltaNet(12, 2, conv_size=0)
    with pytest.raises(ValueError, match="gate_rank must be a positive int"):
        la.GatedLinearAttention(12, 2, gate_rank=0)


def test_deltanet_additive_control_differs_only_in_the_update():
    """Same weights: from an empty state the first step writes beta_1 k_1 v_1^T under both rules (equal outputs);
    from the second step on the delta rule subtracts beta_t k_t (S^T k_t)^T, so the outputs differ."""
    delta = mixer("deltanet")
    additive = la.DeltaNet(12, 2, rule="additive").double()
    additive.load_state_dict(delta.state_dict())
    x = randn(2, 6, 12, seed=12)
    with torch.no_grad():
        y_d, y_a = delta(x), additive(x)
    torch.testing.assert_close(y_a[:, 0], y_d[:, 0], rtol=1e-12, atol=1e-12)
    assert (y_a[:, 1:] - y_d[:, 1:]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------
# The recall experiment (seqbook.experiments_delta), at tiny sizes
# --------------------------------------------------------------------------------------


def test_delta_recall_registered():
    from seqbook import experiments
    from seqbook import experiments_delta as ed

    assert experiments.EXPERIMENTS["delta_recall"] == (ed.delta_recall, "chapters/06_linear_attention/results/delta_recall.json")
    fn, out = experiments.EXPERIMENTS["delta_recall_rewrites"]
    assert fn is ed.delta_recall_rewrites and out.endswith("06_linear_attention/results/delta_recall_rewrites.json")


def test_mqar_rewrite_batch_asks_for_the_latest_value():
    from seqbook import experiments_delta as ed

    P, R, n_keys = 6, 3, 8
    x, y = ed.mqar_rewrite_batch(50, P, torch.Generator().manual_seed(0), n_keys=n_keys, n_values=5, n_rewrites=R)
    assert x.shape == y.shape == (50, 3 * P + 2 * R)
    assert (y[:, : 2 * (P + R)] == -100).all()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        first = dict(zip(row_x[0 : 2 * P : 2], row_x[1 : 2 * P : 2]))
        again = dict(zip(row_x[2 * P : 2 * (P + R) : 2], row_x[2 * P + 1 : 2 * (P + R) : 2]))
        assert len(first) == P and len(again) == R and set(again) <= set(first)  # distinct keys, rewrites of stored ones
        assert all(again[k] != first[k] for k in again)  # a rewrite changes the answer
        assert sorted(row_x[-P:]) == sorted(first) and all(k < n_keys for k in row_x[-P:])
        assert [{**first, **again}[k] for k in row_x[-P:]] == row_y[-P:]
    with pytest.raises(ValueError, match=r"n_rewrites must be an int in \[0, n_pairs = 6\]"):
        ed.mqar_rewrite_batch(2, P, torch.Generator(), n_keys=n_keys, n_values=5, n_rewrites=7)


def test_delta_recall_tiny_record():
    from seqbook import experiments_delta as ed

    r = ed.delta_recall(seeds=(0, 1), steps=3, families=("DeltaNet", "DeltaNet layer, additive update"), pair_counts=(2, 3),
                        n_keys=4, n_values=4, target_params=3000, jobs=1, rewrite_fraction=0.5)  # fmt: skip
    assert [(run["family"], run["seed"]) for run in r["runs"]] == [("DeltaNet", 0), ("DeltaNet", 1),
                                                                   ("DeltaNet layer, additive update", 0),
                                                                   ("DeltaNet layer, additive update", 1)]  # fmt: skip
    info = r["families"]["DeltaNet"]
    assert info["state_numbers_per_layer"] == 2 * info["d_k"] ** 2 and info["d_model"] == 2 * info["d_k"]
    assert r["families"]["DeltaNet"]["parameters"] == r["families"]["DeltaNet layer, additive update"]["parameters"]
    for run in r["runs"]:
        assert set(run["test_accuracy"]) == {"2", "3"} and all(0 <= a <= 1 for a in run["test_accuracy"].values())
        assert len(run["loss_curve"]["loss"]) == 3
    assert r["summary"]["DeltaNet"]["2"]["n"] == 2
    with pytest.raises(ValueError, match="families must be among"):
        ed.delta_recall(seeds=(0,), steps=1, families=("DeltaNet 2",))
