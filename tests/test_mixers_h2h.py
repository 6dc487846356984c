"""Chapter 8's extra mixers: Mamba-2 (seqbook.mamba.Mamba2), sliding-window attention
(seqbook.attention.SlidingWindowAttention) and Based (seqbook.based)."""

import seqbook  # noqa: F401  (first: the Triton interpreter switch)
import math

import pytest
import torch

from seqbook import attention as att
from seqbook.based import TaylorLinearAttention, based_factory, taylor_feature_map
from seqbook.mamba import Mamba2, ssd_quadratic
from seqbook.nn import LanguageModel

F64 = torch.float64


def _stepped(mixer, x):
    """Feed ``x (batch, length, d)`` through ``mixer.step`` one token at a time."""
    state = mixer.init_state(x.shape[0], dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        y, state = mixer.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def _mixers():
    return {
        "Mamba2": lambda: Mamba2(16, d_state=8, headdim=8, chunk_size=4),
        "Mamba2 one head": lambda: Mamba2(8, d_state=4, headdim=16, d_conv=2),
        "SlidingWindowAttention w=3": lambda: att.SlidingWindowAttention(16, 2, 3),
        "SlidingWindowAttention w=1": lambda: att.SlidingWindowAttention(16, 4, 1),
        "TaylorLinearAttention": lambda: TaylorLinearAttention(16, 2, 4),
    }


@pytest.mark.parametrize("name", list(_mixers()))
@pytest.mark.parametrize("length", [1, 7, 13])
def test_step_equals_forward_float64(name, length):
    torch.manual_seed(0)
    mixer = _mixers()[name]().to(F64)
    x = torch.randn(2, length, mixer.d_model, dtype=F64, generator=torch.Generator().manual_seed(length))
    y = mixer(x)
    y_step, _ = _stepped(mixer, x)
    assert y.shape == x.shape
    torch.testing.assert_close(y_step, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(_mixers()))
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(1)
    mixer = _mixers()[name]()
    x = torch.randn(2, 9, mixer.d_model, requires_grad=True)
    mixer(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_mamba2_is_ssd_with_scalar_decays():
    """Mamba2.forward equals its pieces computed by hand with SSD's quadratic (attention-like) form."""
    torch.manual_seed(2)
    m = Mamba2(16, d_state=8, headdim=8).to(F64)
    u = torch.randn(3, 10, 16, dtype=F64)
    z, xBC, dt = m._split(m.in_proj(u))
    xBC = torch.nn.functional.silu(m.conv1d(xBC.transpose(1, 2))[..., :10].transpose(1, 2))
    x, B, C = torch.split(xBC, [m.d_inner, m.d_state, m.d_state], dim=-1)
    x = x.unflatten(-1, (m.n_heads, m.headdim))
    Delta = torch.nn.functional.softplus(dt + m.dt_bias)
    y = ssd_quadratic(x, Delta, m.A, B[:, :, None], C[:, :, None])
    torch.testing.assert_close(m(u), m._finish(y, x, z), rtol=1e-10, atol=1e-12)
    assert m.A.shape == (m.n_heads,) and (m.A < 0).all()
    assert [t.shape for t in m.init_state(3)] == [(3, 32 + 16, 3), (3, 4, 8, 8)]


def test_sliding_window_attention_against_a_loop():
    """Each output row is the softmax over the last w keys only, computed one query at a time."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 9, 3, 4, dtype=F64, generator=g) for _ in range(3))
    for w in (1, 2, 5, 9, 20):
        o = att.sliding_window_attention(q, k, v, w)
        for i in range(9):
            j0 = max(0, i - w + 1)
            s = torch.einsum("bhd,bjhd->bhj", q[:, i], k[:, j0 : i + 1]) / math.sqrt(4)
            want = torch.einsum("bhj,bjhd->bhd", torch.softmax(s, dim=-1), v[:, j0 : i + 1])
            torch.testing.assert_close(o[:, i], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(att.sliding_window_attention(q, k, v, 9), att.attention_naive(q, k, v, causal=True))


def test_sliding_window_cache_stops_growing():
    torch.manual_seed(4)
    m = att.SlidingWindowAttention(8, 2, 4)
    _, (k_cache, v_cache, position) = _stepped(m, torch.randn(1, 11, 8))
    assert k_cache.shape == v_cache.shape == (1, 4, 2, 4) and position.item() == 11


def test_taylor_feature_map_inner_product():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 5, dtype=F64, generator=g), torch.randn(6, 5, dtype=F64, generator=g)
    s = (x * y).sum(-1) / math.sqrt(5)
    phi_x, phi_y = taylor_feature_map(x), taylor_feature_map(y)
    assert phi_x.shape == (6, 1 + 5 + 25)
    torch.testing.assert_close((phi_x * phi_y).sum(-1), 1 + s + s**2 / 2, rtol=1e-12, atol=1e-12)
    assert ((phi_x * phi_y).sum(-1) >= 0.5 - 1e-12).all()  # 1 + s + s^2/2 >= 1/2: a positive weight


def test_taylor_linear_attention_is_a_weighted_average():
    """o_t = sum_j w_tj v_j / sum_j w_tj with w_tj = 1 + s + s^2/2, written out as a quadratic form."""
    torch.manual_seed(6)
    m = TaylorLinearAttention(8, 2, 3).to(F64)
    x = torch.randn(2, 7, 8, dtype=F64)
    q, k = m.qk(x).unflatten(-1, (2, 2, 3)).unbind(dim=-3)
    v = m.v(x).unflatten(-1, (2, 4))
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(3)
    w = (1 + s + s**2 / 2) * att.causal_mask(7)
    o = torch.einsum("bhij,bjhd->bihd", w / w.sum(-1, keepdim=True), v)
    torch.testing.assert_close(m(x), m.out(o.flatten(-2)), rtol=1e-10, atol=1e-12)


def test_based_factory_alternates_and_language_model_steps():
    for _ in range(2):  # a fresh counter per factory
        model = LanguageModel(based_factory(2, window=3, feature_dim=4), 10, 16, 3)
        assert [type(b.mixer) for b in model.blocks] == [att.SlidingWindowAttention, TaylorLinearAttention,
                                                         att.SlidingWindowAttention]  # fmt: skip
    model = model.to(F64)
    tokens = torch.randint(0, 10, (2, 8), generator=torch.Generator().manual_seed(7))
    state = model.init_state(2)
    logits = []
    for t in range(8):
        out, state = model.step(tokens[:, t], state)
        logits.append(out)
    torch.testing.assert_close(torch.stack(logits, 1), model(tokens), rtol=1e-10, atol=1e-12)


def test_bad_input():
    with pytest.raises(ValueError, match="headdim must divide"):
        Mamba2(16, headdim=12)
    with pytest.raises(ValueError, match="d_state"):
        Mamba2(16, d_state=0)
    with pytest.raises(ValueError, match="backend"):
        Mamba2(16, headdim=8, backend="cuda")
    m = Mamba2(16, d_state=4, headdim=8)
    with pytest.raises(ValueError, match=r"u must be \(batch, length, d_model\)"):
        m(torch.randn(2, 5, 8))
    with pytest.raises(TypeError, match="u must be a torch.Tensor"):
        m([[0.0] * 16])
    with pytest.raises(ValueError, match=r"u_t must be \(batch, d_model\)"):
        m.step(torch.randn(2, 1, 16), m.init_state(2))
    with pytest.raises(ValueError, match="the ssm state must be"):
        m.step(torch.randn(2, 16), (m.init_state(2)[0], torch.zeros(2, 4, 8, 8)))
    with pytest.raises(ValueError, match="window must be a positive int"):
        att.SlidingWindowAttention(16, 2, 0)
    with pytest.raises(ValueError, match="window must be a positive int"):
        att.sliding_window_attention(*(torch.randn(1, 3, 1, 4) for _ in range(3)), window=True)
    with pytest.raises(ValueError, match="k"):
        att.sliding_window_attention(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 5), torch.randn(1, 3, 1, 4), 2)
    with pytest.raises(ValueError, match=r"x must be \(batch, length, d_model\)"):
        att.SlidingWindowAttention(16, 2, 4)(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="feature_dim"):
        TaylorLinearAttention(16, 2, 0)
    with pytest.raises(ValueError, match="n_heads must divide"):
        TaylorLinearAttention(16, 3)
    t = TaylorLinearAttention(16, 2, 2)
    with pytest.raises(ValueError, match=r"x must be \(batch, length, d_model\)"):
        t(torch.randn(2, 16))
    with pytest.raises(ValueError, match=r"x_t must be \(batch, d_model\)"):
        t.step(torch.randn(2, 3, 16), t.init_state(2))


def test_mamba2_runs_the_ssd_kernel_forward_and_backward():
    """backend="triton" (compiled on a GPU, the Triton interpreter on a CPU) gives the readable form's
    output, float32, and, since the SSD kernel has a backward, the same parameter gradients."""
    torch.manual_seed(8)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = Mamba2(16, d_state=8, headdim=8, chunk_size=16).to(device)
    u = torch.randn(2, 21, 16, device=device)  # 21: not a multiple of the chunk
    with torch.no_grad():
        ref = m(u)
        m.backend = "triton"
        got = m(u)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    grads = {}
    for backend in ("reference", "triton"):
        m.backend = backend
        m.zero_grad()
        m(u).square().sum().backward()
        grads[backend] = {name: p.grad.clone() for name, p in m.named_parameters()}
    for name, want in grads["reference"].items():
        torch.testing.assert_close(grads["triton"][name], want, rtol=1e-4, atol=1e-5, msg=lambda s: f"{name}: {s}")
