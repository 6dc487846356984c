"""Tests for seqbook.nn, seqbook.tasks and seqbook.train (chapter 3).

The SSM layers are checked in float64 against routes that share none of their code: S4D
against the diagonal recurrence of seqbook.ssm run step by step, S4 against the explicit
powers of its dense matrix; every parameter gets a gradient. The tasks are deterministic
given a seed and their targets are checked against the inputs; a short seeded training run
reduces the loss, twice identically.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seqbook import nn as snn
from seqbook import s4, ssm, tasks, train

F64 = torch.float64


def layer_tail(layer, y, u):
    """What follows the convolution in both layers: + D u, GELU, (dropout), output linear."""
    return layer.output_linear(torch.nn.functional.gelu(y + layer.D * u))


@pytest.mark.parametrize("init", ["lin", "inv", "legs"])
def test_s4d_layer_equals_the_recurrence(init):
    torch.manual_seed(0)
    layer = snn.S4D(3, 8, init=init).double()
    u = torch.randn(2, 17, 3, dtype=F64)
    step = layer.log_step.exp()
    C = torch.view_as_complex(layer.C)
    # its kernel is ssm.s4d_kernel of its parameters (2 C: one mode per conjugate pair)
    K = layer.kernel(17)
    torch.testing.assert_close(K, ssm.s4d_kernel(layer.A, layer.B, 2 * C, step, 17, method="zoh"))
    # and its output is the recurrence x_k = A_bar x_{k-1} + B_bar u_k, y_k = Re(2 C x_k), run as a loop
    A_bar, B_bar = ssm.discretize(layer.A, layer.B.to(torch.complex128), step, "zoh", diagonal=True)
    y_rec = ssm.ssm_recurrent(A_bar, B_bar, 2 * C, None, u, diagonal=True)
    torch.testing.assert_close(layer(u), layer_tail(layer, y_rec, u), rtol=1e-10, atol=1e-10)


def test_s4d_bidirectional_adds_the_reversed_pass():
    torch.manual_seed(1)
    layer = snn.S4D(2, 4, bidirectional=True).double()
    u = torch.randn(3, 10, 2, dtype=F64)
    K = layer.kernel(10)
    assert K.shape == (4, 10)
    y = ssm.ssm_convolve_direct(u, K[:2]) + ssm.ssm_convolve_direct(u.flip(1), K[2:]).flip(1)
    torch.testing.assert_close(layer(u), layer_tail(layer, y, u), rtol=1e-10, atol=1e-10)
    # the output at step 0 depends on the last input (anti-causal part), unlike the causal layer
    u2 = u.clone()
    u2[:, -1] += 1.0
    assert (layer(u2)[:, 0] - layer(u)[:, 0]).abs().max() > 1e-6
    causal = snn.S4D(2, 4).double()
    torch.testing.assert_close(causal(u2)[:, 0], causal(u)[:, 0], rtol=0, atol=0)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_s4_layer_equals_explicit_powers(bidirectional):
    torch.manual_seed(2)
    layer = snn.S4(2, 6, bidirectional=bidirectional).double()
    L = 13
    u = torch.randn(2, L, 2, dtype=F64)
    full = lambda x: torch.cat([x, x.conj()], dim=-1)  # noqa: E731
    P, B, C = (torch.view_as_complex(p) for p in (layer.P, layer.B, layer.C_tilde))
    c = 2 if bidirectional else 1
    K_ref = s4.s4_kernel_explicit(
        full(layer.Lambda), full(P), full(B), full(C), layer.log_step.repeat(c), L, C_is_truncated=True
    )
    K = layer.kernel(L)
    assert K.shape == (2 * c, L)
    torch.testing.assert_close(K, K_ref, rtol=1e-9, atol=1e-9)
    y = ssm.ssm_convolve_direct(u, K_ref[:2])
    if bidirectional:
        y = y + ssm.ssm_convolve_direct(u.flip(1), K_ref[2:]).flip(1)
    torch.testing.assert_close(layer(u), layer_tail(layer, y, u), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "make", [lambda: snn.S4D(4, 8), lambda: snn.S4D(4, 8, bidirectional=True), lambda: snn.S4(4, 8)]
)
def test_every_parameter_gets_a_gradient(make):
    torch.manual_seed(3)
    layer = make()
    u = torch.randn(2, 32, 4)
    (layer(u) * torch.randn(2, 32, 4)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    tagged = {name for name, p in layer.named_parameters() if getattr(p, "_ssm", False)}
    assert "log_step" in tagged and "D" not in tagged


def test_layer_gradcheck_small():
    torch.manual_seed(4)
    for layer in (snn.S4D(2, 4).double(), snn.S4(2, 4).double()):
        u = torch.randn(1, 6, 2, dtype=F64, requires_grad=True)
        assert torch.autograd.gradcheck(layer, (u,))


def test_residual_block_and_sequence_model():
    torch.manual_seed(5)
    mixer = nn.Linear(4, 4)  # any (B, L, D) -> (B, L, D) module is a mixer
    x = torch.randn(2, 5, 4)
    pre = snn.ResidualBlock(mixer, 4)
    torch.testing.assert_close(pre(x), x + mixer(pre.norm(x)))
    post = snn.ResidualBlock(mixer, 4, prenorm=False)
    torch.testing.assert_close(post(x), post.norm(x + mixer(x)))
    ffn = snn.ResidualBlock(mixer, 4, ffn_mult=2)
    h = x + mixer(ffn.norm(x))
    torch.testing.assert_close(ffn(x), h + ffn.ffn(ffn.ffn_norm(h)))
    with pytest.raises(TypeError, match="mixer must be a torch.nn.Module"):
        snn.ResidualBlock(lambda t: t, 4)

    for factory in (lambda d: snn.S4D(d, 8), lambda d: snn.S4(d, 8), snn.LSTMMixer):
        x = torch.randn(3, 20, 2)
        assert snn.SequenceClassifier(factory, 2, 8, 2, 5)(x).shape == (3, 5)
        assert snn.SequenceModel(factory, 2, 8, 1, 1, pool="last")(x).shape == (3, 1)
        assert snn.SequenceModel(factory, 2, 8, 1, 3, pool=None)(x).shape == (3, 20, 3)
    # pool="last" with causal mixers: the output ignores nothing, pool="mean" averages all steps
    model = snn.SequenceModel(lambda d: snn.S4D(d, 8), 2, 8, 1, 3, pool="last")
    model.eval()
    x = torch.randn(1, 20, 2)
    full = snn.SequenceModel.forward(model, x)
    model.pool = None
    torch.testing.assert_close(model(x)[:, -1], full)


def test_layer_validation():
    with pytest.raises(ValueError, match="d_state must be an even int"):
        snn.S4D(4, 7)
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        snn.S4(0)
    with pytest.raises(ValueError, match="step_min <= step_max"):
        snn.S4D(4, 8, step_min=0.1, step_max=0.01)
    with pytest.raises(ValueError, match="kind must be one of"):
        snn.S4D(4, 8, init="hippo")
    with pytest.raises(ValueError, match=r"u must be \(batch, length, d_model\) with d_model = 4"):
        snn.S4D(4, 8)(torch.randn(2, 10, 3))
    with pytest.raises(ValueError, match="pool must be one of"):
        snn.SequenceModel(snn.LSTMMixer, 1, 4, 1, 2, pool="max")
    with pytest.raises(ValueError, match=r"x must be \(batch, length, d_input\) with d_input = 1"):
        snn.SequenceModel(snn.LSTMMixer, 1, 4, 1, 2)(torch.randn(2, 5, 3))


# --------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------


def test_adding_problem():
    x, y = tasks.adding_problem(64, 50, generator=torch.Generator().manual_seed(0))
    assert x.shape == (64, 50, 2) and y.shape == (64,) and x.dtype == torch.float32
    markers = x[..., 1]
    assert torch.all(markers.sum(1) == 2)
    assert torch.all(markers[:, :25].sum(1) == 1) and torch.all(markers[:, 25:].sum(1) == 1)
    torch.testing.assert_close(y, (x[..., 0] * markers).sum(1))
    x2, y2 = tasks.adding_problem(64, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = tasks.adding_problem(64, 50, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(x, x3)
    with pytest.raises(ValueError, match="length must be an int >= 2"):
        tasks.adding_problem(4, 1)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        tasks.adding_problem(4, 10, generator=0)


def test_delayed_recall():
    kw = dict(n_classes=5, pattern_length=6, noise=0.3)
    x, y = tasks.delayed_recall(200, 100, **kw, generator=torch.Generator().manual_seed(0))
    assert x.shape == (200, 100, 1) and y.shape == (200,) and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(5))
    levels = tasks.levels(5)
    torch.testing.assert_close(x[:, :6, 0], levels[y, None].expand(200, 6))
    rest = x[:, 6:, 0]
    assert abs(rest.std().item() - 0.3) < 0.02 and abs(rest.mean().item()) < 0.02
    x2, y2 = tasks.delayed_recall(200, 100, **kw, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="pattern_length must be an int in"):
        tasks.delayed_recall(2, 5, pattern_length=6)
    with pytest.raises(ValueError, match="n_classes must be an int >= 2"):
        tasks.delayed_recall(2, 10, n_classes=1)
    with pytest.raises(ValueError, match="noise must be >= 0"):
        tasks.delayed_recall(2, 10, noise=-1.0)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def _tiny_run(seed=0):
    torch.manual_seed(seed)
    model = snn.SequenceRegressor(lambda d: snn.S4D(d, 8), 2, 16, 1, 1, pool="last")
    data = lambda g: tasks.adding_problem(32, 40, generator=g)  # noqa: E731
    return model, train.fit(model, data, 60, lr=1e-2, seed=seed)


def test_fit_reduces_the_loss_deterministically():
    model, history = _tiny_run()
    assert len(history["loss"]) == 60 and "accuracy" not in history
    first, last = sum(history["loss"][:10]) / 10, sum(history["loss"][-10:]) / 10
    assert last < 0.7 * first, (first, last)
    x, y = tasks.adding_problem(500, 40, generator=torch.Generator().manual_seed(99))
    assert train.evaluate(model, x, y)["loss"] < 1 / 6  # beats predicting the mean
    _, again = _tiny_run()
    assert again["loss"] == history["loss"]


def test_fit_classification_and_validation():
    torch.manual_seed(0)
    model = snn.SequenceClassifier(lambda d: snn.S4D(d, 8), 1, 8, 1, 2, pool="last")
    data = lambda g: tasks.delayed_recall(16, 30, n_classes=2, generator=g)  # noqa: E731
    history = train.fit(model, data, 5, lr=1e-2)
    assert len(history["accuracy"]) == 5 and all(0 <= a <= 1 for a in history["accuracy"])
    x, y = data(torch.Generator().manual_seed(1))
    assert set(train.evaluate(model, x, y)) == {"loss", "accuracy"}
    with pytest.raises(ValueError, match="loss must be one of"):
        train.fit(model, data, 5, loss="l1")
    with pytest.raises(ValueError, match="steps must be a positive int"):
        train.fit(model, data, 0)
