"""Tests for seqbook.attention (softmax attention) and its Triton kernel seqbook.kernels.attention.

The readable forms are checked against each other, against PyTorch's own attention and
against definitions in float64; the kernel (output, log-sum-exp, and the gradients of q,
k and v) against the float64 naive form on the same rounded inputs, through the Triton
interpreter on a machine without a GPU (small sizes: every program runs in Python) and
compiled on CUDA when a GPU is present (the ``device`` fixture of conftest.py), at sizes
that cross many blocks. Lengths are chosen not to be multiples of the blocks.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from seqbook import attention as attn
from seqbook import backend
from seqbook.nn import LanguageModel
from compare import assert_near

F64 = torch.float64
ON_GPU = torch.cuda.is_available()


def randn(*shape, seed=0, dtype=F64, device="cpu", scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen, dtype=F64)).to(device=device, dtype=dtype)


def qkv(B, L, H, d, *, seed=0, **kw):
    return tuple(randn(B, L, H, d, seed=seed + i, **kw) for i in range(3))


def grads_of(fn, q, k, v, do):
    """``fn(q, k, v)`` and the gradients of <fn(q, k, v), do> with respect to q, k, v."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves)
    o.backward(do.to(o.dtype))
    return o.detach(), [x.grad for x in leaves]


# --------------------------------------------------------------------------------------
# Softmax and the online softmax
# --------------------------------------------------------------------------------------


def test_stable_softmax_is_softmax():
    x = randn(4, 33, seed=1, scale=5.0)
    torch.testing.assert_close(attn.softmax_stable(x), torch.softmax(x, -1), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(attn.softmax_unstable(x), torch.softmax(x, -1), rtol=1e-12, atol=1e-15)


def test_unstable_softmax_overflows_where_stable_does_not():
    # float32's exp overflows past 88.7: scores of a few hundred give inf / inf = nan.
    x = torch.tensor([[100.0, 90.0, 0.0], [-200.0, -210.0, -300.0]])
    assert torch.isnan(attn.softmax_unstable(x)).any()
    stable = attn.softmax_stable(x)
    assert torch.isfinite(stable).all()
    torch.testing.assert_close(stable, torch.softmax(x.double(), -1).float())


@pytest.mark.parametrize("block", [1, 3, 16, 100])
def test_online_logsumexp(block):
    x = randn(3, 5, 37, seed=2, scale=50.0)
    torch.testing.assert_close(attn.online_logsumexp(x, block), torch.logsumexp(x, -1), rtol=1e-14, atol=1e-12)


def test_online_logsumexp_large_values_float32():
    x = randn(2, 50, seed=3, scale=1e4, dtype=torch.float32)
    got = attn.online_logsumexp(x, 7)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), torch.logsumexp(x.double(), -1), rtol=1e-6, atol=1e-3)


def test_online_softmax_update_from_empty_state():
    # From (m, l) = (-inf, 0) one update is the plain max and sum of exp(x - max).
    x = randn(4, 9, seed=4, scale=3.0)
    m, l = attn.online_softmax_update(torch.full((4,), -math.inf, dtype=F64), torch.zeros(4, dtype=F64), x)
    torch.testing.assert_close(m, x.amax(-1))
    torch.testing.assert_close(l, torch.exp(x - x.amax(-1, keepdim=True)).sum(-1))


# --------------------------------------------------------------------------------------
# The readable attention forms
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_naive_attention_matches_pytorch_sdpa(causal):
    q, k, v = qkv(2, 19, 3, 8, seed=5)
    want = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=causal).transpose(1, 2)
    torch.testing.assert_close(attn.attention_naive(q, k, v, causal), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attn.attention_naive(q, k, v, causal, 0.3),
                               F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)),
                                                              is_causal=causal, scale=0.3).transpose(1, 2),
                               rtol=1e-12, atol=1e-12)  # fmt: skip


def test_causal_output_ignores_the_future():
    q, k, v = qkv(1, 12, 2, 8, seed=6)
    o = attn.attention_naive(q, k, v, causal=True)
    t = 5
    k2, v2 = k.clone(), v.clone()
    k2[:, t + 1 :] += 10.0
    v2[:, t + 1 :] -= 3.0
    o2 = attn.attention_naive(q, k2, v2, causal=True)
    torch.testing.assert_close(o2[:, : t + 1], o[:, : t + 1], rtol=0, atol=0)
    assert (o2[:, t + 1 :] - o[:, t + 1 :]).abs().max() > 0.1
    # and the first token can only copy its own value
    torch.testing.assert_close(o[:, 0], v[:, 0], rtol=1e-14, atol=1e-14)


def test_unstable_attention_overflows_kernel_free_reference_does_not():
    q, k, v = qkv(1, 20, 2, 16, seed=7, dtype=torch.float32)
    assert torch.isnan(attn.attention_naive_unstable(q, k, v, scale=1e4)).any()
    got = attn.attention_naive(q, k, v, scale=1e4)
    want = attn.attention_naive(*(x.double() for x in (q, k, v)), scale=1e4)
    assert_near(got, want, 1e-5, "stable naive attention at scale 1e4")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L,block_m,block_n", [(1, 4, 4), (37, 16, 8), (37, 8, 16), (100, 32, 32), (64, 64, 16)])
def test_tiled_equals_naive(causal, L, block_m, block_n):
    q, k, v = qkv(2, L, 3, 8, seed=L)
    o, lse = attn.attention_tiled(q, k, v, causal, block_m=block_m, block_n=block_n)
    torch.testing.assert_close(o, attn.attention_naive(q, k, v, causal), rtol=1e-12, atol=1e-12)
    S = attn.attention_scores(q, k, causal)
    torch.testing.assert_close(lse, torch.logsumexp(S, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_m,block_n", [(16, 8), (8, 16), (64, 64)])
def test_tiled_backward_equals_autograd(causal, block_m, block_n):
    q, k, v = qkv(2, 45, 2, 8, seed=8)
    do = randn(2, 45, 2, 8, seed=9)
    o, want = grads_of(lambda *t: attn.attention_naive(*t, causal), q, k, v, do)
    _, lse = attn.attention_tiled(q, k, v, causal)
    got = attn.attention_backward_tiled(q, k, v, o, do, lse, causal, block_m=block_m, block_n=block_n)
    for name, x, y in zip("qkv", got, want):
        torch.testing.assert_close(x, y, rtol=1e-11, atol=1e-12, msg=f"d{name}")


def test_decode_step_is_the_last_causal_row():
    q, k, v = qkv(2, 11, 3, 8, seed=10)
    o = attn.attention_naive(q, k, v, causal=True)
    for t in (0, 4, 10):
        y = attn.decode_step(q[:, t], k[:, : t + 1], v[:, : t + 1])
        torch.testing.assert_close(y, o[:, t], rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------


def test_rotary_scores_depend_on_relative_position_only():
    q, k = randn(1, 1, 1, 16, seed=11), randn(1, 1, 1, 16, seed=12)

    def score(m, n):
        qm = attn.rotary(q, torch.tensor([m]))
        kn = attn.rotary(k, torch.tensor([n]))
        return (qm * kn).sum().item()

    for offset in (0, 1, 7, 100):
        reference = score(offset, 0)
        for m in (3, 50, 1000):
            assert abs(score(m + offset, m) - reference) < 1e-10, (m, offset)
    # and it does depend on the offset
    assert abs(score(5, 0) - score(6, 0)) > 1e-3


def test_rotary_is_a_rotation():
    x = randn(2, 30, 3, 16, seed=13)
    y = attn.rotary(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(y[:, 0], x[:, 0], rtol=0, atol=0)  # position 0: the identity
    # the first pair turns by exactly t radians (theta_0 = 1)
    angle = torch.atan2(y[0, :, 0, 1], y[0, :, 0, 0]) - torch.atan2(x[0, :, 0, 1], x[0, :, 0, 0])
    wrapped = torch.remainder(angle - torch.arange(30, dtype=F64) + math.pi, 2 * math.pi) - math.pi
    assert wrapped.abs().max() < 1e-10
    assert attn.rotary(x.float()).dtype == torch.float32


def test_sinusoidal_embedding():
    pe = attn.sinusoidal_embedding(50, 8)
    assert pe.shape == (50, 8) and pe.dtype == torch.float32
    t = torch.arange(50, dtype=F64)
    torch.testing.assert_close(pe[:, 0].double(), torch.sin(t), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pe[:, 1].double(), torch.cos(t), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pe[:, 6].double(), torch.sin(t * 10000 ** (-6 / 8)), rtol=1e-6, atol=1e-6)
    # PE_{t+k} is a fixed rotation of PE_t: each (sin, cos) pair turns by k theta_i
    with pytest.raises(ValueError, match="even"):
        attn.sinusoidal_embedding(4, 5)


# --------------------------------------------------------------------------------------
# The mixer and a language model around it
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rotary", [False, True])
def test_mha_step_reproduces_forward(rotary):
    torch.manual_seed(0)
    mha = attn.MultiHeadAttention(24, 3, rotary=rotary).double()
    x = randn(2, 13, 24, seed=14)
    y = mha(x)
    state = mha.init_state(2, dtype=F64)
    steps = []
    for t in range(13):
        y_t, state = mha.step(x[:, t], state)
        steps.append(y_t)
        assert state[0].shape == (2, t + 1, 3, 8)  # the cache grows by one row per token
    torch.testing.assert_close(torch.stack(steps, 1), y, rtol=1e-12, atol=1e-12)


def test_mha_without_positions_is_blind_to_order():
    # Non-causal, no rotary: permuting the tokens permutes the outputs.
    torch.manual_seed(0)
    x = randn(1, 10, 16, seed=15)
    perm = torch.randperm(10)
    blind = attn.MultiHeadAttention(16, 2, causal=False, rotary=False).double()
    torch.testing.assert_close(blind(x[:, perm]), blind(x)[:, perm], rtol=1e-12, atol=1e-12)
    torch.manual_seed(0)
    seeing = attn.MultiHeadAttention(16, 2, causal=False, rotary=True).double()
    assert (seeing(x[:, perm]) - seeing(x)[:, perm]).abs().max() > 1e-3


def test_language_model_step_equals_forward():
    torch.manual_seed(0)
    model = LanguageModel(lambda d: attn.MultiHeadAttention(d, 2), vocab_size=11, d_model=16, n_layers=2, ffn_mult=4)
    model = model.double().eval()
    tokens = torch.randint(0, 11, (2, 9))
    logits = model(tokens)
    state = model.init_state(2)
    for t in range(9):
        step_logits, state = model.step(tokens[:, t], state)
        torch.testing.assert_close(step_logits, logits[:, t], rtol=1e-11, atol=1e-11)
    out = model.generate(tokens[:, :3], 5, temperature=0)
    assert out.shape == (2, 8) and torch.equal(out[:, :3], tokens[:, :3])


def test_mha_bad_arguments():
    with pytest.raises(ValueError, match="n_heads"):
        attn.MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="even head dimension"):
        attn.MultiHeadAttention(9, 3)
    with pytest.raises(ValueError, match=r"\(batch, length, d_model\)"):
        attn.MultiHeadAttention(8, 2)(torch.zeros(2, 3, 4))
    with pytest.raises(RuntimeError, match="non-causal"):
        m = attn.MultiHeadAttention(8, 2, causal=False)
        m.step(torch.zeros(1, 8), m.init_state(1))


# --------------------------------------------------------------------------------------
# The public entry: dispatch and validation
# --------------------------------------------------------------------------------------


def test_auto_uses_the_reference_on_cpu():
    q, k, v = qkv(1, 9, 2, 16, seed=16, dtype=torch.float32)
    assert torch.equal(attn.attention(q, k, v, causal=True), attn.attention_naive(q, k, v, True))


def test_bad_inputs_raise_clear_errors():
    q, k, v = qkv(2, 10, 2, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"q must be \(batch, length, heads, d\)"):
        attn.attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match=r"k must have the shape of q.*\(2, 10, 2, 16\).*\(2, 9, 2, 16\)"):
        attn.attention(q, k[:, :9], v)
    with pytest.raises(ValueError, match=r"v must have the shape of q"):
        attn.attention(q, k, v[..., :8])
    with pytest.raises(TypeError, match=r"v must have the dtype of q \(torch.float32\)"):
        attn.attention(q, k, v.double())
    with pytest.raises(TypeError, match="k must be a floating tensor"):
        attn.attention(q, k.long(), v)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attn.attention(q.numpy(), k, v)
    with pytest.raises(ValueError, match=r"k must be on the device of q \(cpu\), got meta"):
        attn.attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="scale must be a positive"):
        attn.attention(q, k, v, scale=-1.0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        attn.attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        attn.attention(q, k, v, backend="cuda")


def test_kernel_refuses_what_it_does_not_support(device):
    q, k, v = qkv(1, 8, 1, 24, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match=r"head dims d in \(16, 32, 64, 128\), got d = 24"):
        attn.attention(q, k, v, backend="triton")
    # auto quietly takes the reference for what the kernel lacks
    torch.testing.assert_close(attn.attention(q, k, v), attn.attention_naive(q, k, v))
    q, k, v = qkv(1, 8, 1, 16, dtype=F64, device=device)
    with pytest.raises(TypeError, match="supports dtypes float16, bfloat16, float32.*got torch.float64"):
        attn.attention(q, k, v, backend="triton")
    if device == "cpu":
        with pytest.raises(TypeError, match="interpreter cannot run bfloat16"):
            attn.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="triton")


# --------------------------------------------------------------------------------------
# The Triton kernel against the float64 reference (interpreted on CPU, compiled on CUDA)
# --------------------------------------------------------------------------------------

# (batch, length, heads, d). Interpreted: the forward and dq hold 32 queries and stream 16
# keys, dk/dv hold 32 keys (kernels.attention.INTERPRETER_CONFIG); compiled: 64 to 128.
if ON_GPU:
    SHAPES = [(2, 1000, 3, 64), (1, 257, 2, 128), (2, 129, 2, 16), (1, 300, 3, 32), (1, 1, 1, 64), (3, 64, 2, 64)]
else:
    SHAPES = [(1, 1, 1, 16), (1, 37, 2, 16), (2, 70, 2, 32), (1, 64, 4, 16), (2, 17, 1, 32)]


def check_kernel(device, shape, *, causal, dtype=torch.float32, rel=(1e-5, 1e-5), scale=None, magnitude=1.0, seed=0):
    """Kernel vs. float64 naive attention on the same rounded inputs: o, lse, dq, dk, dv."""
    q, k, v = qkv(*shape, seed=seed, dtype=dtype, device=device, scale=magnitude)
    do = randn(*shape, seed=seed + 3, dtype=dtype, device=device)
    o, grads = grads_of(lambda *t: attn.attention(*t, causal=causal, scale=scale, backend="triton"), q, k, v, do)
    wide = [x.to(F64) for x in (q, k, v)]
    o_ref, grads_ref = grads_of(lambda *t: attn.attention_naive(*t, causal, scale), *wide, do.to(F64))
    out_rel, grad_rel = rel
    # At length 1, P = 1 and dP = delta = do . v, so the exact dq and dk are 0 and the kernel
    # returns the rounding of dP - delta (two d-term float32 dot products of the same products,
    # summed in different orders), times s k: about u sqrt(2d) |do v| s |k| (random-walk
    # rounding), 1.3e-7 at d = 16 on a CPU, 5.2e-7 at d = 64 on an H200. assert_near's floor
    # (1, the size of these terms) compares that with rel * 1 = 1e-5 instead of dividing by 0.
    assert o.dtype == dtype
    assert_near(o, o_ref, out_rel, "o")
    for name, got, want in zip("qkv", grads, grads_ref):
        assert got.dtype == dtype
        assert_near(got, want, grad_rel, f"d{name}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B={},L={},H={},d={}".format(*s))
def test_kernel_matches_reference(device, shape, causal):
    check_kernel(device, shape, causal=causal, seed=shape[1])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kernel_log_sum_exp(device, causal):
    shape = SHAPES[2]
    q, k, v = qkv(*shape, seed=20, dtype=torch.float32, device=device)
    o, lse = backend.kernels("attention").attention_with_lse(q, k, v, causal)
    S = attn.attention_scores(*(x.double() for x in (q, k)), causal)
    assert lse.shape == (shape[0], shape[2], shape[1]) and lse.dtype == torch.float32
    assert_near(lse, torch.logsumexp(S, -1), 1e-5, "lse")


# The interpreter runs on NumPy, which has no bfloat16: that dtype is compiled-only.
HALF = [(torch.float16, (4e-3, 1e-2))] + ([(torch.bfloat16, (2e-2, 5e-2))] if ON_GPU else [])


@pytest.mark.parametrize("dtype,rel", HALF, ids=lambda x: str(x).replace("torch.", "") if isinstance(x, torch.dtype) else "")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kernel_half_precision(device, dtype, rel, causal):
    # Inputs rounded to 8 (bf16) or 11 (fp16) bits, P and dS rounded likewise before their
    # products; every sum in float32.
    shape = (2, 200, 2, 64) if device == "cuda" else (1, 40, 2, 32)
    check_kernel(device, shape, causal=causal, dtype=dtype, rel=rel, seed=21)
    if device == "cuda":
        check_kernel(device, (1, 333, 2, 128), causal=causal, dtype=dtype, rel=rel, seed=22)


def test_kernel_large_logits(device):
    # |q|, |k| ~ 10 sqrt(d): scores of several hundred, past float32's exp range. The
    # unstable form returns nan; the kernel, which subtracts the running max, does not.
    shape = (1, 300, 2, 32) if device == "cuda" else (1, 37, 2, 16)
    q, k, v = qkv(*shape, seed=23, device=device, dtype=torch.float32, scale=10.0)
    assert attn.attention_scores(q, k).abs().max() > 200
    assert torch.isnan(attn.attention_naive_unstable(q, k, v)).any()
    check_kernel(device, shape, causal=True, magnitude=10.0, rel=(1e-4, 1e-4), seed=23)


def test_kernel_huge_scale(device):
    # scale 1e4: every softmax is (almost) one-hot; the output must still equal float64.
    shape = (1, 100, 2, 64) if device == "cuda" else (1, 37, 2, 16)
    q, k, v = qkv(*shape, seed=24, device=device, dtype=torch.float32)
    assert torch.isnan(attn.attention_naive_unstable(q, k, v, scale=1e4)).any()
    for causal in (False, True):
        got = attn.attention(q, k, v, causal=causal, scale=1e4, backend="triton")
        want = attn.attention_naive(*(x.double() for x in (q, k, v)), causal, 1e4)
        assert_near(got, want, 1e-5, f"o, scale 1e4, causal={causal}")


def test_kernel_reads_strided_inputs(device):
    # q, k, v as slices of one (B, L, 3, H, d) projection (how MultiHeadAttention makes them),
    # read in place; and a layout with d not contiguous, copied first. Same answers.
    B, L, H, d = (2, 150, 2, 64) if device == "cuda" else (1, 33, 2, 16)
    packed = randn(B, L, 3, H, d, seed=25, device=device, dtype=torch.float32)
    q, k, v = packed.unbind(2)
    assert not q.is_contiguous()
    want = attn.attention_naive(*(x.double() for x in (q, k, v)), True)
    assert_near(attn.attention(q, k, v, causal=True, backend="triton"), want, 1e-5, "o from strided views")
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)  # the same values, stride(-1) = H
    assert qt.stride(-1) != 1
    assert_near(attn.attention(qt, k, v, causal=True, backend="triton"), want, 1e-5, "o from a d-strided q")
    # a loss whose gradient is an expanded (stride 0) tensor
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    attn.attention(*leaves, causal=True, backend="triton").sum().backward()
    wide = [x.detach().double().requires_grad_() for x in (q, k, v)]
    attn.attention_naive(*wide, True).sum().backward()
    for name, x, y in zip("qkv", leaves, wide):
        assert_near(x.grad, y.grad, 1e-5, f"d{name} from sum()")


@pytest.mark.parametrize("config", [dict(BLOCK_M=16, BLOCK_N=16), dict(BLOCK_M=64, BLOCK_N=16)])
def test_kernel_other_tiles(device, config):
    # The masks must not depend on the tile shape: held block = streamed block, or four times it.
    shape = (1, 130, 2, 32) if device == "cuda" else (1, 45, 2, 16)
    q, k, v = qkv(*shape, seed=26, device=device, dtype=torch.float32)
    cfg = dict(config, num_warps=4, NUM_STAGES=1)
    for causal in (False, True):
        o, lse = backend.kernels("attention").attention_with_lse(q, k, v, causal, config=cfg)
        assert_near(o, attn.attention_naive(*(x.double() for x in (q, k, v)), causal), 1e-5, f"o {config}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kernel_forward_tma(device, causal):
    # Keys and values fetched by the copy engine through tensor descriptors (TMA) instead of
    # by every thread: the same result. The length is not a multiple of the blocks: the
    # descriptors must give zeros past the end. float16 on the GPU (where TMA is meant
    # for), float32 interpreted.
    shape = (2, 333, 3, 64) if device == "cuda" else (2, 45, 2, 16)
    dtype = torch.float16 if device == "cuda" else torch.float32
    rel = 4e-3 if dtype == torch.float16 else 1e-5
    kernel = backend.kernels("attention")
    cfg = dict(kernel.config_for("fwd", dtype, shape[-1]), TMA=True)
    q, k, v = qkv(*shape, seed=27, device=device, dtype=dtype)
    o, lse = kernel.attention_with_lse(q, k, v, causal, config=cfg)
    wide = [x.double() for x in (q, k, v)]
    assert_near(o, attn.attention_naive(*wide, causal), rel, "o through tensor descriptors")
    lse_want = torch.logsumexp(attn.attention_scores(*wide[:2], causal), -1)
    assert_near(lse, lse_want, 1e-5, "lse through tensor descriptors")
    # A start address off the 16-byte grid, which the copy engine cannot read from: the
    # kernel falls back to ordinary loads, with the same result.
    flat = torch.empty(q.numel() + 1, device=device, dtype=dtype)
    shifted = flat[1:].view(q.shape).copy_(q)
    assert not kernel._tma_ok(shifted)
    o2, _ = kernel.attention_with_lse(shifted, k, v, causal, config=cfg)
    assert_near(o2, attn.attention_naive(*wide, causal), rel, "o, q off the 16-byte grid")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kernel_backward_tma(device, causal):
    # The backward kernels with their streamed tiles (queries and dO for dk/dv, keys and
    # values for dq) fetched through tensor descriptors (the default at d = 128 on the GPU):
    # the same gradients.
    shape = (2, 333, 3, 64) if device == "cuda" else (2, 45, 2, 16)
    dtype = torch.float16 if device == "cuda" else torch.float32
    rel = 1e-2 if dtype == torch.float16 else 1e-5
    kernel = backend.kernels("attention")
    q, k, v = qkv(*shape, seed=28, device=device, dtype=dtype)
    do = randn(*shape, seed=31, device=device, dtype=dtype)
    o, lse = kernel.attention_with_lse(q, k, v, causal)
    configs = {kind: dict(kernel.config_for(kind, dtype, shape[-1]), TMA=True) for kind in ("dkdv", "dq")}
    grads = kernel._backward(q, k, v, o, lse, do, causal, 1 / math.sqrt(shape[-1]), configs)
    _, want = grads_of(lambda *t: attn.attention_naive(*t, causal), *(x.double() for x in (q, k, v)), do.double())
    for name, got, w in zip("qkv", grads, want):
        assert_near(got, w, rel, f"d{name} through tensor descriptors")


def test_kernel_rejects_misaligned_tiles(device):
    q, k, v = qkv(1, 40, 1, 16, device=device, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"held block \(48\) must be a multiple of the streamed one \(32\)"):
        backend.kernels("attention").attention_with_lse(q, k, v, True, config=dict(BLOCK_M=48, BLOCK_N=32, num_warps=4,
                                                                                      NUM_STAGES=1))  # fmt: skip


def test_mha_uses_the_kernel(device):
    # The mixer's forward through backend="triton" equals its reference forward.
    torch.manual_seed(0)
    mha = attn.MultiHeadAttention(64, 4, backend="triton").to(device)
    x = randn(2, 40, 64, seed=27, device=device, dtype=torch.float32)
    got = mha(x)
    mha.backend = "reference"
    assert_near(got, mha(x).double(), 1e-5, "MHA forward")


# The forward's options beside the defaults (kernels.attention: LAZY rescaling, the d = 128
# default on the GPU but not under the interpreter), checked against float64 like the default.
# LAZY is exact arithmetic, so float32 keeps float32's tolerance.
FWD_VARIANTS = [dict(LAZY=1)]


@pytest.mark.parametrize("variant", FWD_VARIANTS, ids=lambda v: "+".join(f"{k}{v[k]}" for k in v))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kernel_forward_variants(device, causal, variant):
    kernel = backend.kernels("attention")
    shape = (2, 333, 2, 128) if device == "cuda" else (2, 45, 2, 16)
    for dtype in [torch.float16, torch.float32]:
        rel = 4e-3 if dtype == torch.float16 else 1e-5
        cfg = dict(kernel.config_for("fwd", dtype, shape[-1]), **variant)
        q, k, v = qkv(*shape, seed=40, dtype=dtype, device=device)
        o, lse = kernel.attention_with_lse(q, k, v, causal, config=cfg)
        wide = [x.double() for x in (q, k, v)]
        assert_near(o, attn.attention_naive(*wide, causal), rel, f"o {variant} {dtype}")
        assert_near(lse, torch.logsumexp(attn.attention_scores(*wide[:2], causal), -1), 1e-5, f"lse {variant}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kernel_lazy_rescaling_when_scores_climb(device, causal):
    # Scores that rise along the keys by far more than the 2^8 slack (keys scaled up with their
    # position, |s| up to several hundred): the reference point must move many times, and
    # every move must rescale the accumulator, or o would be off by powers of two.
    kernel = backend.kernels("attention")
    shape = (1, 300, 2, 32) if device == "cuda" else (1, 45, 2, 16)
    q, k, v = qkv(*shape, seed=41, dtype=torch.float32, device=device)
    k = k * torch.linspace(0.1, 30.0, shape[1], device=device, dtype=k.dtype)[None, :, None, None]
    q = q.abs()
    k = k.abs()  # all scores positive, growing with the key's position
    cfg = dict(kernel.config_for("fwd", torch.float32, shape[-1]), LAZY=1)
    o, lse = kernel.attention_with_lse(q, k, v, causal, config=cfg)
    wide = [x.double() for x in (q, k, v)]
    S = attn.attention_scores(*wide[:2], causal)
    assert (S.amax(-1) - S.masked_fill(S.isinf(), float("inf")).amin(-1)).max() > 100  # far past the slack
    # float32 exponents carry about u |s| of rounding (u = 2^-24, |s| up to several hundred here:
    # 1.1e-5 of max|o| on the H200 with and without LAZY at d = 32, full: 1e-5 failed there), so the
    # tolerance grows with |s| (5e-5 here; a missed rescale is off by powers of two).
    finite = S[S.isfinite()]
    rel = max(1e-5, 4 * 2.0**-24 * finite.abs().max().item())
    assert_near(o, attn.attention_naive(*wide, causal), rel, "o, lazy, climbing scores")
    assert_near(lse, torch.logsumexp(S, -1), 1e-5, "lse, lazy, climbing scores")


def test_kernel_refuses_bad_forward_options(device):
    # LAZY is off (0) or on (1); 2, the variant that lost on the H200, is refused like any other.
    kernel = backend.kernels("attention")
    q, k, v = qkv(1, 20, 1, 16, dtype=torch.float16, device=device)
    for lazy in (2, 3, -1):
        cfg = dict(kernel.config_for("fwd", torch.float16, 16), LAZY=lazy)
        with pytest.raises(ValueError, match="LAZY must be 0"):
            kernel.attention_with_lse(q, k, v, True, config=cfg)
