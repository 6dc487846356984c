"""Tests for the Mamba mixer (seqbook.mamba.Mamba) and the selective copying task (seqbook.tasks).

The selective scan and SSD themselves are tested in test_selective_scan.py; here, what the
block adds around the scan: its recurrent mode (``step``) against ``forward`` in float64 and
float32 at odd lengths, with and without the convolution's bias, for ``d_conv`` from 1 to 5;
inside a language model; gradients to every parameter; the initialization the paper
prescribes; and clear errors for bad arguments.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seqbook import mamba, nn as snn, tasks
from seqbook.nn import LanguageModel, Mamba
from compare import assert_near, run_steps

F64 = torch.float64


def perturbed(module, seed):
    """Move every parameter off its initial value, so that no symmetry of the initialization
    (D = 1, equal A rows, zero biases) hides an error in step()."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


@pytest.mark.parametrize("d_conv", [1, 2, 4, 5])
@pytest.mark.parametrize("length", [1, 7, 33])
def test_step_reproduces_forward_float64(d_conv, length):
    torch.manual_seed(d_conv * 100 + length)
    m = perturbed(Mamba(6, d_state=5, d_conv=d_conv, expand=2, dt_rank=3), seed=length).double()
    u = torch.randn(3, length, 6, dtype=F64)
    with torch.no_grad():
        y = m(u)
        y_steps, (conv_state, h) = run_steps(m, u)
    assert y.shape == (3, length, 6)
    assert (y_steps - y).abs().max().item() <= 1e-10 * max(1.0, y.abs().max().item())
    # the state after the sequence: the last d_conv - 1 conv inputs, and the scan's last state
    x_in = m.in_proj(u)[..., : m.d_inner]
    padded = F.pad(x_in.transpose(1, 2), (d_conv - 1, 0))  # zeros before the start, as in init_state
    want_conv = padded[..., padded.shape[-1] - (d_conv - 1) :]
    assert torch.allclose(conv_state, want_conv, rtol=0, atol=1e-12)
    x = F.silu(m.conv1d(x_in.transpose(1, 2))[..., :length].transpose(1, 2))
    delta, B, C = m._select(x)
    _, h_last = mamba.selective_scan_loop(x, delta, m.A, B, C, m.D, None, m.dt_proj.bias, True, True)
    assert (h - h_last).abs().max().item() <= 1e-10 * max(1.0, h_last.abs().max().item())


@pytest.mark.parametrize("length", [5, 31])
@pytest.mark.parametrize("conv_bias", [True, False])
def test_step_reproduces_forward_float32(length, conv_bias):
    torch.manual_seed(length)
    m = perturbed(Mamba(16, conv_bias=conv_bias, bias=True), seed=7)
    assert (m.conv1d.bias is not None) == conv_bias and m.in_proj.bias is not None
    u = torch.randn(2, length, 16)
    with torch.no_grad():
        y = m(u)
        y_steps, _ = run_steps(m, u)
    scale = y.abs().max().item()
    assert (y_steps - y).abs().max().item() <= 1e-5 * scale


def test_step_matches_the_float64_forward_when_run_in_float32():
    # float32 recurrence vs float64 parallel form: the two paths agree to float32 rounding
    torch.manual_seed(3)
    m = perturbed(Mamba(8, d_state=4), seed=3)
    u = torch.randn(2, 19, 8)
    with torch.no_grad():
        y64 = m.double()(u.double())
        y32, _ = run_steps(m.float(), u)
    assert (y32.double() - y64).abs().max().item() <= 1e-5 * y64.abs().max().item()


def test_forward_is_causal():
    torch.manual_seed(0)
    m = perturbed(Mamba(8, d_state=4), seed=0).double()
    u = torch.randn(1, 12, 8, dtype=F64)
    v = u.clone()
    v[:, 7:] = torch.randn(1, 5, 8, dtype=F64)  # change the future only
    with torch.no_grad():
        assert torch.equal(m(u)[:, :7], m(v)[:, :7])
        assert not torch.allclose(m(u)[:, 7:], m(v)[:, 7:])


def test_triton_backend_matches_reference():
    # the block through the kernel (interpreted on CPU), forward and every parameter gradient
    torch.manual_seed(1)
    ref = perturbed(Mamba(8, d_state=4, backend="reference"), seed=1)
    ker = Mamba(8, d_state=4, backend="triton")
    ker.load_state_dict(ref.state_dict())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ker = ker.to(device)
    u = torch.randn(2, 11, 8)
    y_ref, y_ker = ref(u), ker(u.to(device))
    assert (y_ker.cpu() - y_ref).abs().max().item() <= 1e-5 * y_ref.abs().max().item()
    y_ref.square().sum().backward()
    y_ker.square().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), ker.parameters()):
        # Relative to each gradient's own size (5e-2 for A_log to 3e2 here); the floor, below
        # all of them, only turns a gradient that cancelled to ~0 into an absolute comparison.
        assert_near(q.grad.cpu(), p.grad, 1e-4, f"grad {name}", floor=1e-2)


def test_language_model_step_reproduces_forward():
    torch.manual_seed(0)
    lm = LanguageModel(lambda d: Mamba(d, d_state=4, d_conv=3), vocab_size=11, d_model=8, n_layers=2).double()
    perturbed(lm, seed=5)
    assert lm.can_step
    tokens = torch.randint(0, 11, (2, 9))
    with torch.no_grad():
        logits = lm(tokens)
        state = lm.init_state(2)
        assert [tuple(s.shape) for s in state[0]] == [(2, 16, 2), (2, 16, 4)]
        stepped = []
        for t in range(tokens.shape[1]):
            out, state = lm.step(tokens[:, t], state)
            stepped.append(out)
    assert logits.shape == (2, 9, 11)
    assert (torch.stack(stepped, dim=1) - logits).abs().max().item() <= 1e-10 * logits.abs().max().item()
    # generation through step() continues the prompt, deterministic given the generator
    prompt = tokens[:, :3]
    a = lm.generate(prompt, 6, generator=torch.Generator().manual_seed(1))
    b = lm.generate(prompt, 6, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 9) and torch.equal(a[:, :3], prompt) and torch.equal(a, b)
    greedy = lm.generate(prompt, 1, temperature=0)
    assert torch.equal(greedy[:, 3], lm(prompt)[:, -1].argmax(-1))


def test_state_size_does_not_grow():
    m = Mamba(8, d_state=4)
    u = torch.randn(1, 50, 8)
    state = m.init_state(1)
    shapes = [tuple(s.shape) for s in state]
    with torch.no_grad():
        for t in range(50):
            _, state = m.step(u[:, t], state)
            assert [tuple(s.shape) for s in state] == shapes


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    lm = LanguageModel(lambda d: Mamba(d, d_state=4), vocab_size=7, d_model=8, n_layers=2)
    tokens = torch.randint(0, 7, (2, 10))
    F.cross_entropy(lm(tokens).reshape(-1, 7), tokens.roll(-1, 1).reshape(-1)).backward()
    names = [n for n, _ in lm.named_parameters()]
    assert any("A_log" in n for n in names) and any("dt_proj.bias" in n for n in names)
    for name, p in lm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, f"{name}: zero gradient"


def test_initialization_follows_the_paper():
    torch.manual_seed(0)
    m = Mamba(32, d_state=16, expand=2, dt_min=1e-3, dt_max=1e-1)
    assert (m.d_inner, m.dt_rank) == (64, 2)
    assert m.in_proj.weight.shape == (128, 32) and m.x_proj.weight.shape == (2 + 32, 64)
    assert m.conv1d.weight.shape == (64, 1, 4) and m.out_proj.weight.shape == (32, 64)
    assert m.in_proj.bias is None and m.out_proj.bias is None
    # S4D-real: A_n = -(n + 1) in every channel; D = 1
    assert torch.allclose(m.A, -torch.arange(1, 17.0).expand(64, 16))
    assert torch.equal(m.D.detach(), torch.ones(64))
    # softplus(dt bias) = the initial steps, log-uniform in [dt_min, dt_max]
    steps = F.softplus(m.dt_proj.bias.detach())
    assert steps.min() >= 1e-3 * (1 - 1e-5) and steps.max() <= 1e-1 * (1 + 1e-5)
    assert steps.log().std() > 0.5  # spread over the two decades, not bunched
    bound = 2**-0.5
    assert m.dt_proj.weight.abs().max() <= bound and m.dt_proj.weight.abs().max() > bound / 2
    assert Mamba(100).dt_rank == math.ceil(100 / 16)
    assert snn.Mamba is mamba.Mamba


def test_inverse_softplus():
    y = torch.tensor([1e-4, 1e-2, 0.5, 3.0, 20.0], dtype=F64)
    assert torch.allclose(F.softplus(mamba.inverse_softplus(y)), y, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=0), "d_model must be an int >= 1"),
        (dict(d_model=4.0), "d_model must be an int >= 1"),
        (dict(d_model=4, d_state=0), "d_state"),
        (dict(d_model=4, d_conv=0), "d_conv"),
        (dict(d_model=4, expand=True), "expand"),
        (dict(d_model=4, dt_rank="full"), "dt_rank"),
        (dict(d_model=4, dt_min=0.1, dt_max=0.01), "dt_min <= dt_max"),
        (dict(d_model=4, dt_init_floor=0.0), "dt_init_floor"),
        (dict(d_model=4, backend="cuda"), "backend must be one of"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba(**kwargs)


def test_bad_inputs_raise():
    m = Mamba(4, d_state=3)
    with pytest.raises(ValueError, match=r"u must be \(batch, length, d_model\) with d_model = 4"):
        m(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r"u must be \(batch, length, d_model\)"):
        m(torch.randn(5, 4))
    state = m.init_state(2)
    with pytest.raises(ValueError, match=r"u_t must be \(batch, d_model\)"):
        m.step(torch.randn(2, 1, 4), state)
    with pytest.raises(ValueError, match=r"the conv state must be \(3, 8, 3\)"):
        m.step(torch.randn(3, 4), state)  # a state for another batch size
    with pytest.raises(ValueError, match="the ssm state must be"):
        m.step(torch.randn(2, 4), (state[0], torch.zeros(2, 8, 4)))
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        m.init_state(0)


# ---------------------------------------------------------------- the time-invariant block (selective=False)


@pytest.mark.parametrize("d_conv", [1, 4])
@pytest.mark.parametrize("length", [1, 7, 33])
def test_lti_step_reproduces_forward(d_conv, length):
    torch.manual_seed(d_conv * 10 + length)
    m = perturbed(Mamba(6, d_state=5, d_conv=d_conv, selective=False), seed=length).double()
    u = torch.randn(3, length, 6, dtype=F64)
    with torch.no_grad():
        y = m(u)  # by one FFT convolution
        y_steps, (_, h) = run_steps(m, u)  # by the recurrence
    assert (y_steps - y).abs().max().item() <= 1e-10 * max(1.0, y.abs().max().item())
    assert h.shape == (3, m.d_inner, 5)


def test_lti_kernel_is_the_powers_of_a_fixed_system():
    torch.manual_seed(3)
    m = perturbed(Mamba(4, d_state=3, selective=False), seed=4).double()
    with torch.no_grad():
        K = m.lti_kernel(20)  # (E, 20)
        Delta = F.softplus(m.dt_bias)
        A_bar, B_bar = torch.exp(Delta[:, None] * m.A), Delta[:, None] * m.B  # one (A_bar, B_bar) for every step
        want = torch.stack([(m.C * A_bar**l * B_bar).sum(-1) for l in range(20)], dim=-1)
    assert K.shape == (8, 20)
    assert torch.allclose(K, want, rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match="only a time-invariant block"):
        Mamba(4).lti_kernel(5)


def test_lti_block_has_no_selection_and_is_time_invariant():
    torch.manual_seed(0)
    lti, s6 = Mamba(8, d_state=4, selective=False), Mamba(8, d_state=4)
    names = {n for n, _ in lti.named_parameters()}
    assert {"dt_bias", "B", "C"} <= names and not any(n.startswith(("x_proj", "dt_proj")) for n in names)
    assert lti.B.shape == lti.C.shape == (16, 4) and torch.equal(lti.B.detach(), torch.ones(16, 4))
    # the same block otherwise: same projections, convolution, A and D; initial steps in [dt_min, dt_max]
    for name in ("in_proj.weight", "conv1d.weight", "out_proj.weight", "A_log", "D"):
        assert dict(lti.named_parameters())[name].shape == dict(s6.named_parameters())[name].shape
    steps = F.softplus(lti.dt_bias.detach())
    assert steps.min() >= 1e-3 * (1 - 1e-5) and steps.max() <= 1e-1 * (1 + 1e-5)
    # the SSM is linear and time-invariant: with d_conv = 1 and no convolution bias, the block's output
    # at step t for an input that is zero before step k is the same as for the input shifted to the start
    m = perturbed(Mamba(5, d_state=3, d_conv=1, conv_bias=False, selective=False), seed=1).double()
    u = torch.randn(2, 12, 5, dtype=F64)
    shifted = torch.cat([torch.zeros(2, 4, 5, dtype=F64), u], dim=1)
    with torch.no_grad():
        assert torch.allclose(m(shifted)[:, 4:], m(u), rtol=1e-10, atol=1e-12)


def test_lti_gradients_reach_every_parameter():
    torch.manual_seed(1)
    m = Mamba(6, d_state=4, selective=False)
    m(torch.randn(2, 9, 6)).pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


def test_selective_must_be_a_bool():
    with pytest.raises(TypeError, match="selective must be a bool"):
        Mamba(4, selective=1)


# ---------------------------------------------------------------- selective copying


def test_selective_copying_layout():
    x, y = tasks.selective_copying(64, 40, 5, 3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (64, 40, 5) and x.dtype == torch.float32
    assert y.shape == (64, 5) and y.dtype == torch.int64
    assert torch.equal(x.sum(-1), torch.ones(64, 40))  # one-hot
    ids = x.argmax(-1)
    assert (ids[:, 35:] == 4).all()  # the markers at the end
    body = ids[:, :35]
    assert ((body >= 0) & (body <= 3)).all()
    colored = body > 0
    assert (colored.sum(1) == 5).all()  # exactly n_tokens coloured tokens
    for row in range(64):  # the target: the colours in order of appearance
        assert torch.equal(body[row][colored[row]] - 1, y[row])
    assert y.min() >= 0 and y.max() < 3
    # the positions vary from row to row (selective), and cover the span
    first = colored.float().argmax(1)
    assert len(set(first.tolist())) > 5
    assert colored.any(0).sum() > 30


def test_plain_copying_puts_tokens_first():
    x, y = tasks.selective_copying(8, 12, 3, 4, selective=False, generator=torch.Generator().manual_seed(2))
    ids = x.argmax(-1)
    assert torch.equal(ids[:, :3] - 1, y)
    assert (ids[:, 3:9] == 0).all() and (ids[:, 9:] == 5).all()


def test_selective_copying_is_seeded():
    a = tasks.selective_copying(4, 20, 3, 5, generator=torch.Generator().manual_seed(11))
    b = tasks.selective_copying(4, 20, 3, 5, generator=torch.Generator().manual_seed(11))
    c = tasks.selective_copying(4, 20, 3, 5, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    d, e = tasks.selective_copying(4, 20, 3, 5), tasks.selective_copying(4, 20, 3, 5)  # None: seed 0
    assert torch.equal(d[0], e[0])
    # one generator gives a stream of new batches
    gen = torch.Generator().manual_seed(11)
    first, second = tasks.selective_copying(4, 20, 3, 5, generator=gen), tasks.selective_copying(4, 20, 3, 5, generator=gen)
    assert torch.equal(first[0], a[0]) and not torch.equal(second[0], a[0])


def test_selective_copying_tight_length():
    x, y = tasks.selective_copying(3, 6, 3, 2, generator=torch.Generator().manual_seed(0))
    ids = x.argmax(-1)
    assert (ids[:, :3] > 0).all() and torch.equal(ids[:, :3] - 1, y)  # every slot taken


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((0, 10), {}, ValueError, "batch must be an int >= 1"),
        ((2, 7, 4), {}, ValueError, r"length must be >= 2 \* n_tokens = 8"),
        ((2, 10, 0), {}, ValueError, "n_tokens must be an int >= 1"),
        ((2, 10, 2, 0), {}, ValueError, "n_colors must be an int >= 1"),
        ((2, 10, 2.0), {}, ValueError, "n_tokens must be an int"),
        ((2, 10), {"selective": 1}, TypeError, "selective must be a bool"),
        ((2, 10), {"generator": 3}, TypeError, "generator must be a torch.Generator"),
    ],
)
def test_selective_copying_bad_inputs(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        tasks.selective_copying(*args, **kwargs)
