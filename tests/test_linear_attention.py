"""Tests for seqbook.linear_attention and its Triton kernel seqbook.kernels.linear_attention.

The three readable forms (quadratic, recurrent, chunked) are checked against each other
and against definitions written out here, in float64; the decayed form against chapter
4's SSD; the stable decay mask against the cumulative-product one where the latter fails.
The kernel (output, final state, and the gradients of q, k, v, log_decay and the initial
state) is checked against autograd through the float64 quadratic form on the same rounded
inputs: interpreted on a machine without a GPU (tiny sizes), compiled on CUDA when one is
present (the ``device`` fixture of conftest.py). Lengths are not multiples of the chunk.
"""

from __future__ import annotations

import math

import pytest
import torch

from seqbook import linear_attention as la
from seqbook import mamba
from seqbook.nn import LanguageModel
from compare import assert_near, unit_roundoff

F64 = torch.float64
ON_GPU = torch.cuda.is_available()


def randn(*shape, seed=0, dtype=F64, device="cpu", scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen, dtype=F64)).to(device=device, dtype=dtype)


def log_decays(B, L, H, *, seed=0, strength=1.0, dtype=F64, device="cpu"):
    """Random a_t <= 0: -strength * U(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    return (-strength * torch.rand(B, L, H, generator=gen, dtype=F64)).to(device=device, dtype=dtype)


def problem(B, L, H, d_k, d_v, *, seed=0, decay=True, state=True, dtype=F64, device="cpu"):
    """``(q, k, v, log_decay or None, initial_state or None)``."""
    q = randn(B, L, H, d_k, seed=seed, dtype=dtype, device=device)
    k = randn(B, L, H, d_k, seed=seed + 1, dtype=dtype, device=device)
    v = randn(B, L, H, d_v, seed=seed + 2, dtype=dtype, device=device)
    a = log_decays(B, L, H, seed=seed + 3, dtype=dtype, device=device) if decay else None
    S0 = randn(B, H, d_k, d_v, seed=seed + 4, dtype=dtype, device=device) if state else None
    return q, k, v, a, S0


def by_definition(q, k, v, a=None, S0=None, scale=None):
    """o_t = s sum_{s<=t} (prod_{r=s+1}^t gamma_r) (q_t . k_s) v_s + s (prod_{r<=t} gamma_r) q_t^T S0,
    summed term by term in float64 (tiny sizes only)."""
    B, L, H, d_k = q.shape
    scale = 1 / math.sqrt(d_k) if scale is None else scale
    gamma = torch.ones(B, L, H, dtype=F64) if a is None else torch.exp(a)
    o = torch.zeros(v.shape, dtype=F64)
    for t in range(L):
        for s in range(t + 1):
            decay = torch.prod(gamma[:, s + 1 : t + 1], dim=1)  # (B, H); empty product 1
            o[:, t] += scale * (decay * (q[:, t] * k[:, s]).sum(-1))[..., None] * v[:, s]
        if S0 is not None:
            o[:, t] += scale * torch.prod(gamma[:, : t + 1], dim=1)[..., None] * torch.einsum("bhk,bhkv->bhv", q[:, t], S0)
    return o


# --------------------------------------------------------------------------------------
# The readable forms
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay,state", [(False, False), (True, False), (True, True), (False, True)])
def test_quadratic_form_is_the_definition(decay, state):
    q, k, v, a, S0 = problem(2, 9, 2, 3, 4, seed=1, decay=decay, state=state)
    o, _ = la.linear_attention_quadratic(q, k, v, a, S0)
    torch.testing.assert_close(o, by_definition(q, k, v, a, S0), rtol=1e-12, atol=1e-12)
    o, _ = la.linear_attention_quadratic(q, k, v, a, S0, scale=0.3)
    torch.testing.assert_close(o, by_definition(q, k, v, a, S0, scale=0.3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("decay,state", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("L", [1, 37, 64])
def test_three_forms_agree(L, decay, state):
    q, k, v, a, S0 = problem(2, L, 3, 5, 4, seed=L, decay=decay, state=state)
    o_quad, S_quad = la.linear_attention_quadratic(q, k, v, a, S0)
    o_rec, S_rec = la.linear_attention_recurrent(q, k, v, a, S0)
    torch.testing.assert_close(o_rec, o_quad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S_rec, S_quad, rtol=1e-12, atol=1e-12)
    for C in (1, 5, 16, 100):  # 5 and 16 divide none of the lengths > 1; 100 > L: one chunk
        o_chunk, S_chunk = la.linear_attention_chunked(q, k, v, a, S0, chunk_size=C)
        torch.testing.assert_close(o_chunk, o_quad, rtol=1e-12, atol=1e-12, msg=f"chunk {C}")
        torch.testing.assert_close(S_chunk, S_quad, rtol=1e-12, atol=1e-12, msg=f"chunk {C}")


def test_final_state_continues_the_sequence():
    # Running two halves with the first half's final state as the second's initial state
    # is running the whole: the state is all that the past leaves.
    q, k, v, a, _ = problem(1, 30, 2, 4, 3, seed=2, state=False)
    o, S = la.linear_attention_chunked(q, k, v, a, chunk_size=7)
    o1, S1 = la.linear_attention_chunked(q[:, :13], k[:, :13], v[:, :13], a[:, :13], chunk_size=7)
    o2, S2 = la.linear_attention_chunked(q[:, 13:], k[:, 13:], v[:, 13:], a[:, 13:], S1, chunk_size=7)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S2, S, rtol=1e-12, atol=1e-12)


def test_empty_sequence_keeps_the_initial_state(device):
    q, k, v, a, S0 = problem(1, 0, 2, 16, 16, seed=24, dtype=torch.float32, device=device)
    for form in (la.linear_attention_quadratic, la.linear_attention_recurrent, la.linear_attention_chunked):
        o, S = form(q, k, v, a, S0)
        assert o.shape == (1, 0, 2, 16) and torch.equal(S, S0), form.__name__
    for backend in ("reference", "triton"):
        o, S = la.linear_attention(q, k, v, log_decay=a, initial_state=S0, return_final_state=True, backend=backend)
        assert o.shape == (1, 0, 2, 16) and torch.equal(S, S0), backend


def test_recurrent_step_is_one_update():
    q, k, v, a, S0 = problem(2, 1, 3, 4, 5, seed=3)
    o_t, S = la.recurrent_step(q[:, 0], k[:, 0], v[:, 0], S0, a[:, 0], scale=0.5)
    want_S = torch.exp(a[:, 0])[..., None, None] * S0 + k[:, 0, ..., :, None] * v[:, 0, ..., None, :]
    torch.testing.assert_close(S, want_S, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(o_t, 0.5 * (q[:, 0, ..., :, None] * want_S).sum(-2), rtol=1e-14, atol=1e-14)


def test_without_decay_is_unnormalized_causal_attention():
    # (Q K^T o M) V with M the causal 0/1 mask: softmax attention's formula with exp removed.
    q, k, v, _, _ = problem(1, 12, 2, 8, 8, seed=4, decay=False, state=False)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(8)
    scores = scores * torch.ones(12, 12, dtype=F64).tril()
    o, _ = la.linear_attention_recurrent(q, k, v)
    torch.testing.assert_close(o, torch.einsum("bhij,bjhd->bihd", scores, v), rtol=1e-12, atol=1e-12)


def test_chunked_gradients_equal_quadratic_gradients():
    q, k, v, a, S0 = problem(1, 19, 2, 3, 4, seed=5)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, a, S0)]
    o, S = la.linear_attention_chunked(*leaves, chunk_size=6)
    (o.sin().sum() + S.cos().sum()).backward()
    grads = [x.grad for x in leaves]
    leaves = [x.clone().requires_grad_() for x in (q, k, v, a, S0)]
    o, S = la.linear_attention_quadratic(*leaves)
    (o.sin().sum() + S.cos().sum()).backward()
    for name, got, leaf in zip(("q", "k", "v", "log_decay", "initial_state"), grads, leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_normalizer_is_the_sum_of_weights():
    q, k, _, a, _ = problem(2, 11, 2, 4, 4, seed=6, state=False)
    q, k = la.elu_feature_map(q), la.elu_feature_map(k)
    D = la.decay_mask(a)  # (b, h, t, s)
    want = torch.einsum("bhts,bthk,bshk->bth", D, q, k)
    torch.testing.assert_close(la.normalizer(q, k, a, eps=0.0), want, rtol=1e-12, atol=1e-12)
    assert (la.normalizer(q, k, a) > 0).all()  # positive features: a positive denominator


def test_elu_feature_map_is_positive_and_smooth():
    x = torch.linspace(-30, 30, 601, dtype=F64)
    phi = la.elu_feature_map(x)
    assert (phi > 0).all()
    torch.testing.assert_close(phi[x > 0], x[x > 0] + 1)
    torch.testing.assert_close(phi[x <= 0], torch.exp(x[x <= 0]))


# --------------------------------------------------------------------------------------
# Decay: the link to SSD, and numerics
# --------------------------------------------------------------------------------------


def test_decayed_linear_attention_is_ssd():
    # SSD's y_t = sum_s (C_t . B_s) exp(sum_{r=s+1}^t dt_r A) dt_s x_s, with one group per
    # head, is linear attention with q = C, k = B, v = dt x, a_t = dt_t A and scale 1.
    B, L, H, N, P = 2, 23, 3, 4, 5
    q, k, v, _, _ = problem(B, L, H, N, P, seed=7, decay=False, state=False)
    dt = 0.1 + torch.rand(B, L, H, generator=torch.Generator().manual_seed(8), dtype=F64)
    A = -torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    o, S = la.linear_attention_chunked(q, k, v, dt * A, scale=1.0, chunk_size=8)
    x = v / dt[..., None]
    torch.testing.assert_close(mamba.ssd_quadratic(x, dt, A, k, q), o, rtol=1e-12, atol=1e-12)
    y, S_ssd = mamba.ssd_chunked(x, dt, A, k, q, chunk_size=8, return_final_state=True)
    torch.testing.assert_close(y, o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S_ssd, S.transpose(-1, -2), rtol=1e-12, atol=1e-12)  # SSD keeps (P, N)


def test_decay_mask_is_the_product_of_decays():
    a = log_decays(1, 6, 2, seed=9)
    D = la.decay_mask(a)
    for t in range(6):
        for s in range(6):
            want = torch.exp(a[0, s + 1 : t + 1].sum(0)) if s <= t else torch.zeros(2, dtype=F64)
            torch.testing.assert_close(D[0, :, t, s], want, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(la.decay_mask_unstable(a), D, rtol=1e-13, atol=1e-15)


def test_cumulative_product_mask_fails_where_the_stable_one_does_not():
    # a_t = -1 for 200 steps: prod gamma falls below float32's smallest number near t = 103,
    # and P_t / P_s becomes 0 / 0 for late pairs, though the true D_ts = e^{-(t-s)} is fine.
    a = torch.full((1, 200, 1), -1.0)
    assert torch.isnan(la.decay_mask_unstable(a)).any()
    D = la.decay_mask(a)
    assert torch.isfinite(D).all()
    torch.testing.assert_close(D[0, 0, 199, 190], torch.tensor(math.exp(-9.0)), rtol=1e-5, atol=0)
    assert_near(D, la.decay_mask(a.double()), 1e-5, "stable decay mask, float32")


def test_long_strongly_decayed_sequence_in_float32():
    # 2000 steps with decays down to e^-3 a step: sum a ~ -3000, far past float32's range;
    # the chunked form only ever exponentiates sums over one chunk.
    q, k, v, _, _ = problem(1, 2000, 2, 4, 4, seed=10, decay=False, state=False, dtype=torch.float32)
    a = log_decays(1, 2000, 2, seed=11, strength=3.0, dtype=torch.float32)
    o, S = la.linear_attention_chunked(q, k, v, a, chunk_size=64)
    o_ref, S_ref = la.linear_attention_chunked(*(x.double() for x in (q, k, v, a)), chunk_size=64)
    assert_near(o, o_ref, 1e-5, "o, float32 chunked")
    assert_near(S, S_ref, 1e-5, "final state, float32 chunked")


# --------------------------------------------------------------------------------------
# The public entry and the mixer
# --------------------------------------------------------------------------------------


def test_public_entry_reference():
    q, k, v, a, S0 = problem(2, 21, 2, 4, 6, seed=12)
    o, S = la.linear_attention(q, k, v, log_decay=a, initial_state=S0, chunk_size=8, return_final_state=True)
    o_ref, S_ref = la.linear_attention_quadratic(q, k, v, a, S0)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S, S_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(la.linear_attention(q, k, v, chunk_size=8), la.linear_attention_chunked(q, k, v, chunk_size=8)[0])
    # 16-bit inputs: computed in float32, returned in float16, final state float32
    o16, S16 = la.linear_attention(q.half(), k.half(), v.half(), log_decay=a, return_final_state=True)
    assert o16.dtype == torch.float16 and S16.dtype == torch.float32
    want = la.linear_attention_quadratic(*(x.half().double() for x in (q, k, v)), a)[0]
    assert_near(o16, want, 2e-3, "float16 reference")


def test_bad_inputs_raise_clear_errors():
    q, k, v, a, S0 = problem(2, 10, 2, 16, 8, seed=13, dtype=torch.float32)
    f = la.linear_attention
    with pytest.raises(ValueError, match=r"q must be \(batch, length, heads, d_k\)"):
        f(q[0], k[0], v[0])
    with pytest.raises(ValueError, match=r"k must have the shape of q.*\(2, 10, 2, 16\).*\(2, 9, 2, 16\)"):
        f(q, k[:, :9], v)
    with pytest.raises(ValueError, match=r"v must be \(batch, length, heads, d_v\).*\(2, 10, 2\)"):
        f(q, k, v[:, :9])
    with pytest.raises(TypeError, match=r"v must have the dtype of q \(torch.float32\)"):
        f(q, k, v.double())
    with pytest.raises(TypeError, match="k must be a floating tensor"):
        f(q, k.long(), v)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        f(q.numpy(), k, v)
    with pytest.raises(ValueError, match=r"v must be on the device of q \(cpu\), got meta"):
        f(q, k, v.to("meta"))
    with pytest.raises(ValueError, match=r"log_decay must be \(batch, length, heads\) = \(2, 10, 2\)"):
        f(q, k, v, log_decay=a[..., 0])
    with pytest.raises(ValueError, match=r"log_decay must be <= 0"):
        f(q, k, v, log_decay=-a)
    with pytest.raises(ValueError, match=r"initial_state must be \(batch, heads, d_k, d_v\) = \(2, 2, 16, 8\)"):
        f(q, k, v, initial_state=S0.transpose(-1, -2))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        f(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="scale must be a positive"):
        f(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="backend must be one of"):
        f(q, k, v, backend="cuda")


def test_kernel_refuses_what_it_does_not_support(device):
    q, k, v, _, _ = problem(1, 8, 1, 16, 24, seed=14, dtype=torch.float32, device=device, decay=False, state=False)
    with pytest.raises(ValueError, match=r"head dims d_v in \(16, 32, 64, 128\), got d_v = 24"):
        la.linear_attention(q, k, v, backend="triton")
    # auto quietly takes the reference for what the kernel lacks
    torch.testing.assert_close(la.linear_attention(q, k, v), la.linear_attention_chunked(q, k, v)[0])
    q, k, v, _, _ = problem(1, 8, 1, 16, 16, seed=15, dtype=F64, device=device, decay=False, state=False)
    with pytest.raises(TypeError, match="supports dtypes float16, bfloat16, float32.*got torch.float64"):
        la.linear_attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match=r"chunk_size in \(16, 32, 64\), got 128"):
        la.linear_attention(q.float(), k.float(), v.float(), chunk_size=128, backend="triton")
    if device == "cpu":
        with pytest.raises(TypeError, match="interpreter cannot run bfloat16"):
            la.linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="triton")


@pytest.mark.parametrize("decay", la.DECAYS)
@pytest.mark.parametrize("normalize", [False, True])
def test_mixer_step_reproduces_forward(decay, normalize):
    torch.manual_seed(0)
    mixer = la.LinearAttention(24, 3, decay=decay, normalize=normalize).double()
    x = randn(2, 13, 24, seed=16)
    y = mixer(x)
    state = mixer.init_state(2, dtype=F64)
    steps = []
    for t in range(13):
        y_t, state = mixer.step(x[:, t], state)
        steps.append(y_t)
        assert state[0].shape == (2, 3, 8, 8)  # the state does not grow
    torch.testing.assert_close(torch.stack(steps, 1), y, rtol=1e-10, atol=1e-10)


def test_mixer_is_causal_and_forgets_with_decay():
    torch.manual_seed(0)
    mixer = la.LinearAttention(16, 2, decay="fixed").double()
    x = randn(1, 20, 16, seed=17)
    x2 = x.clone()
    x2[:, 10:] += 1.0
    y, y2 = mixer(x), mixer(x2)
    torch.testing.assert_close(y2[:, :10], y[:, :10], rtol=0, atol=0)
    assert (y2[:, 10:] - y[:, 10:]).abs().max() > 1e-3
    gammas = la.retnet_decays(8)  # RetNet's eight: 1 - 2^(-5-h)
    torch.testing.assert_close(gammas, 1 - 2.0 ** (-5.0 - torch.arange(8, dtype=F64)), rtol=0, atol=1e-15)
    assert la.retnet_decays(1).tolist() == [1 - 2**-5] and (la.retnet_decays(5).diff() > 0).all()


def test_language_model_step_equals_forward():
    torch.manual_seed(0)
    model = LanguageModel(lambda d: la.LinearAttention(d, 2, decay="gated"), vocab_size=11, d_model=32, n_layers=2,
                          ffn_mult=4).double().eval()  # fmt: skip
    tokens = torch.randint(0, 11, (2, 9))
    logits = model(tokens)
    state = model.init_state(2)
    for t in range(9):
        step_logits, state = model.step(tokens[:, t], state)
        torch.testing.assert_close(step_logits, logits[:, t], rtol=1e-10, atol=1e-10)


def test_mixer_bad_arguments():
    with pytest.raises(ValueError, match="n_heads"):
        la.LinearAttention(10, 3)
    with pytest.raises(ValueError, match="feature_map"):
        la.LinearAttention(8, 2, feature_map="relu2")
    with pytest.raises(ValueError, match="decay must be one of"):
        la.LinearAttention(8, 2, decay="learned")
    with pytest.raises(ValueError, match=r"\(batch, length, d_model\)"):
        la.LinearAttention(8, 2)(torch.zeros(2, 3, 4))


# --------------------------------------------------------------------------------------
# The Triton kernel against the float64 reference (interpreted on CPU, compiled on CUDA)
# --------------------------------------------------------------------------------------

# (batch, length, heads, d_k, d_v, chunk)
if ON_GPU:
    SHAPES = [(2, 1000, 3, 64, 64, 64), (1, 257, 2, 128, 128, 64), (2, 129, 2, 16, 32, 16), (1, 300, 3, 32, 128, 32),
              (1, 1, 1, 64, 64, 64), (3, 64, 2, 64, 16, 32)]  # fmt: skip
else:
    SHAPES = [(1, 1, 1, 16, 16, 16), (1, 37, 2, 16, 16, 16), (2, 21, 1, 16, 32, 16), (1, 50, 1, 32, 16, 32)]


def kernel_and_reference(device, shape, *, decay, state, dtype=torch.float32, seed=0, strength=1.0):
    """The kernel's (o, final state, grads) and the float64 quadratic form's on the same rounded
    inputs, for the loss <o, do> + <final state, dS>."""
    B, L, H, d_k, d_v, C = shape
    q, k, v, a, S0 = problem(B, L, H, d_k, d_v, seed=seed, decay=decay, state=state, dtype=dtype, device=device)
    if decay:
        a = log_decays(B, L, H, seed=seed + 3, strength=strength, device=device)  # float64 -> used in float32
    do = randn(B, L, H, d_v, seed=seed + 5, dtype=dtype, device=device)
    dS = randn(B, H, d_k, d_v, seed=seed + 6, device=device)
    names = [n for n, x in zip(("q", "k", "v", "log_decay", "initial_state"), (q, k, v, a, S0)) if x is not None]

    def run(fn, inputs):
        leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs]
        o, S = fn(*leaves)
        ((o.to(F64) * do.to(F64)).sum() + (S.to(F64) * dS).sum()).backward()
        return dict(o=o.detach(), final_state=S.detach(), **{f"d{n}": x.grad for n, x in zip(names, [x for x in leaves if x is not None])})

    got = run(lambda *t: la.linear_attention(t[0], t[1], t[2], log_decay=t[3], initial_state=t[4], chunk_size=C,
                                             return_final_state=True, backend="triton"), (q, k, v, a, S0))  # fmt: skip
    wide = [None if x is None else x.to(F64) for x in (q, k, v, a, S0)]
    want = run(la.linear_attention_quadratic, wide)
    return got, want


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("decay,state", [(False, False), (True, True)])
def test_kernel_matches_reference(device, shape, decay, state):
    got, want = kernel_and_reference(device, shape, decay=decay, state=state, seed=shape[1])
    assert got["final_state"].dtype == torch.float32
    for name in want:
        assert_near(got[name], want[name], 1e-5, f"{name} at {shape}, decay={decay}, state={state}")


def test_kernel_decay_without_state_and_state_without_decay(device):
    shape = (1, 45, 2, 16, 16, 16) if device == "cpu" else (2, 333, 2, 64, 64, 64)
    for decay, state in ((True, False), (False, True)):
        got, want = kernel_and_reference(device, shape, decay=decay, state=state, seed=18)
        for name in want:
            assert_near(got[name], want[name], 1e-5, f"{name}, decay={decay}, state={state}")


def test_kernel_strong_decay_long_sequence(device):
    # sum a ~ -1000 over the sequence: the naive cumulative products would be 0 / 0.
    strength = 6.0
    shape = (1, 333, 1, 16, 16, 32) if device == "cpu" else (1, 4000, 2, 64, 64, 64)
    got, want = kernel_and_reference(device, shape, decay=True, state=True, seed=19, strength=strength)
    # The kernel's decays inside a chunk are exp(c_t - c_j), c the float32 cumulative sum of
    # a over the chunk: |c| grows to strength * C at most (a >= -strength; half that on
    # average), and c_t, c_j each carry a rounding of order u |c|, an absolute error in the
    # exponent, so a relative one in every decay and every output made of them: up to about
    # 2 u strength C (GPU: C = 64, 4.6e-5; CPU: C = 32, 2.3e-5), on top of the ordinary
    # float32 tolerance (tests/compare.py). The 1e-5 alone failed on an H200 (o: 1.04e-5).
    carried = 2 * unit_roundoff(torch.float32) * strength * shape[-1]
    # The initial state reaches everything through the first step's decay e^{a_0} at most,
    # so its gradient's terms are that small: that is their floor, not 1.
    a = log_decays(*shape[:3], seed=19 + 3, strength=strength)
    floors = dict(dinitial_state=torch.exp(a[:, 0]).max().item())
    for name in want:
        rel = (1e-5 if name != "dlog_decay" else 1e-4) + carried
        assert_near(got[name], want[name], rel, f"{name}, strong decay", floor=floors.get(name, 1.0))


HALF = [(torch.float16, (3e-3, 1e-2))] + ([(torch.bfloat16, (2e-2, 5e-2))] if ON_GPU else [])


@pytest.mark.parametrize("dtype,rel", HALF)
def test_kernel_half_precision(device, dtype, rel):
    # 16-bit inputs, float32 accumulation: errors of the order of the inputs' rounding.
    shape = (1, 40, 2, 32, 32, 16) if device == "cpu" else (2, 500, 2, 64, 64, 64)
    got, want = kernel_and_reference(device, shape, decay=True, state=True, dtype=dtype, seed=20)
    assert got["o"].dtype == dtype and got["final_state"].dtype == torch.float32
    for name in want:
        assert_near(got[name], want[name], rel[0] if name in ("o", "final_state") else rel[1], f"{name}, {dtype}")


# The per-chunk states saved in 16 bits (bfloat16's default) or in float32, each run through the
# whole training path (the walk runs forward and in reverse there). float16 stands in for bfloat16
# where the interpreter runs (NumPy has no bfloat16).
WALKS = [dict(state_16bit=(torch.float16, torch.bfloat16)), dict(state_16bit=())]


@pytest.mark.parametrize("config", WALKS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_kernel_walk_forms(device, config, monkeypatch):
    from seqbook.kernels import linear_attention as kernel

    monkeypatch.setattr(kernel, "CONFIG", dict(kernel.CONFIG, **config))
    half = bool(config.get("state_16bit"))
    dtype = (torch.bfloat16 if ON_GPU else torch.float16) if half else torch.float32
    shapes = [(2, 37, 2, 32, 16, 16), (1, 50, 1, 16, 32, 16)] if device == "cpu" else [(1, 1000, 2, 128, 128, 64),
                                                                                          (2, 333, 3, 64, 32, 32)]
    for shape in shapes:
        for decay, state in ((True, True), (False, False)):
            got, want = kernel_and_reference(device, shape, decay=decay, state=state, dtype=dtype, seed=shape[1])
            assert got["final_state"].dtype == torch.float32
            for name in want:
                # 16-bit saved states: one more rounding to the inputs' format, of the size of theirs
                rel = (HALF_REL[dtype][0] if name in ("o", "final_state") else HALF_REL[dtype][1]) if half else 1e-5
                assert_near(got[name], want[name], rel, f"{name} at {shape}, decay={decay}, {config}")


# The forward's walk in segments (each segment's outputs beside the next segment's walk on a GPU), and
# output programs that take several chunks each: a group may run past its segment's end (or the
# sequence's), and those chunks must store nothing. 5 chunks on the CPU, 16 on the GPU.
SEGMENTS = [dict(segments=1), dict(segments=3, out_group=2, out_stages=2), dict(segments=5, out_group=3)]


@pytest.mark.parametrize("config", SEGMENTS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_kernel_segments_and_output_groups(device, config, monkeypatch):
    from seqbook.kernels import linear_attention as kernel

    monkeypatch.setattr(kernel, "CONFIG", dict(kernel.CONFIG, **config))
    shape = (1, 70, 2, 16, 32, 16) if device == "cpu" else (2, 1000, 2, 128, 128, 64)
    for decay, state in ((False, False), (True, True)):
        got, want = kernel_and_reference(device, shape, decay=decay, state=state, seed=config["segments"])
        for name in want:
            assert_near(got[name], want[name], 1e-5, f"{name} with {config}, decay={decay}, state={state}")


@pytest.mark.parametrize("L", [1, 63, 64, 65, 200])
def test_reverse_cumsum_in_two_levels(L):
    # The decay's gradient sums from each step to the end in blocks of 64, then over the blocks: the same
    # float64 sums in another order, so they differ by roundings of partial sums of at most 200 standard
    # normals (~200 u |sum| ~ 1e-13 of the floor 1); 1e-12 leaves room and still catches a misplaced block.
    from seqbook.kernels.linear_attention import _reverse_cumsum

    g = randn(2, L, 3, seed=L)
    assert_near(_reverse_cumsum(g), g.flip(1).cumsum(1).flip(1), 1e-12, f"reverse cumulative sum at L={L}")


HALF_REL = {dtype: rel for dtype, rel in [(torch.float16, (3e-3, 1e-2)), (torch.bfloat16, (2e-2, 5e-2))]}


def test_kernel_only_output_gradient(device):
    # A loss on o alone: the final state's gradient arrives as None and counts as zero.
    B, L, H, d, C = 1, 20, 1, 16, 16
    q, k, v, a, S0 = problem(B, L, H, d, d, seed=21, dtype=torch.float32, device=device)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, a, S0)]
    la.linear_attention(*leaves[:3], log_decay=leaves[3], initial_state=leaves[4], chunk_size=C,
                        backend="triton").sum().backward()  # fmt: skip
    wide = [x.double().requires_grad_() for x in (q, k, v, a, S0)]
    la.linear_attention_quadratic(*wide)[0].sum().backward()
    for x, w in zip(leaves, wide):
        assert_near(x.grad, w.grad, 1e-5, "gradient from o alone")


def test_mixer_uses_the_kernel(device):
    torch.manual_seed(0)
    mixer = la.LinearAttention(32, 2, decay="gated", backend="triton").to(device)
    x = randn(2, 40, 32, seed=22, device=device, dtype=torch.float32)
    y = mixer(x)
    mixer.backend = "reference"
    torch.testing.assert_close(y, mixer(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# The associative-recall task (chapter 6's MQAR experiment)
# --------------------------------------------------------------------------------------


def test_associative_recall_answers_are_the_stored_values():
    from seqbook import tasks

    x, y = tasks.associative_recall(16, 6, n_keys=10, n_values=7, generator=torch.Generator().manual_seed(0))
    assert x.shape == (16, 18) and y.shape == (16, 6) and x.dtype == y.dtype == torch.long
    keys, values, queries = x[:, 0:12:2], x[:, 1:12:2], x[:, 12:]
    assert (keys < 10).all() and (values >= 10).all() and (values < 17).all()
    for row in range(16):
        assert len(set(keys[row].tolist())) == 6  # distinct keys in a sequence
        assert len(set(queries[row].tolist())) == 6  # every key asked once
        stored = dict(zip(keys[row].tolist(), values[row].tolist()))
        assert [stored[k] for k in queries[row].tolist()] == y[row].tolist()
    again, _ = tasks.associative_recall(16, 6, n_keys=10, n_values=7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again)  # seeded: the same data on every machine
    x2, y2 = tasks.associative_recall(3, 2, 5, generator=torch.Generator().manual_seed(1))  # more queries than pairs
    assert x2.shape == (3, 9) and y2.shape == (3, 5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch=0, n_pairs=2), "batch"), (dict(batch=2, n_pairs=0), "n_pairs"),
    (dict(batch=2, n_pairs=9, n_keys=8), "n_pairs"), (dict(batch=2, n_pairs=2, n_queries=0), "n_queries"),
    (dict(batch=2, n_pairs=2, n_values=True), "n_values"),
])  # fmt: skip
def test_associative_recall_rejects_bad_sizes(kwargs, match):
    from seqbook import tasks

    with pytest.raises(ValueError, match=match):
        tasks.associative_recall(**kwargs)
