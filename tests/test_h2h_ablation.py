"""Chapter 8's short-convolution control: GLA with a short convolution, DeltaNet without one, and Based with
its short gated convolutions; each mixer's decoding (step) against its forward, in float64, gradients included."""

import seqbook  # noqa: F401  (first: the Triton interpreter switch)

import pytest
import torch

from compare import assert_near, assert_steps_equal_forward, run_steps
from seqbook import experiments_h2h as h2h
from seqbook import linear_attention as la
from seqbook.nn import LanguageModel

F64 = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def perturbed(m, seed=0):
    """``m`` in float64 with every parameter moved off its initial value (biases start at 0: move them)."""
    m = m.to(F64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=F64))
    return m


@pytest.mark.parametrize("conv_size", [2, 4])
@pytest.mark.parametrize("L", [1, 3, 70])  # shorter than the window, and across a chunk boundary
def test_gla_with_conv_step_equals_forward(conv_size, L):
    torch.manual_seed(0)
    m = perturbed(la.GatedLinearAttention(12, 2, conv_size=conv_size, backend="reference"), seed=L)
    x, dy = randn(2, L, 12, seed=L), randn(2, L, 12, seed=L + 1)
    if L == 1:  # one token: the taps for older inputs see only zeros and get no gradient; compare outputs
        y, _ = run_steps(m, x)
        assert_near(y, m(x), 1e-11, "GLA + conv, one token")
        return
    assert_steps_equal_forward(m, x, dy, f"GLA + conv {conv_size}")


def test_gla_conv_is_causal_and_short():
    """Output t of the convolved projection depends on inputs t - conv_size + 1 .. t only."""
    torch.manual_seed(1)
    m = perturbed(la.GatedLinearAttention(8, 2, conv_size=3, backend="reference"))
    x = randn(1, 10, 8, seed=2).requires_grad_()
    u = la._short_conv_forward(m.conv, m.qkv(x))
    u[0, 6].sum().backward()
    touched = (x.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert touched == [4, 5, 6]


def test_gla_without_conv_is_unchanged():
    """The default has no convolution: the same parameters (names and values) and the plain S state as before."""
    torch.manual_seed(0)
    m = la.GatedLinearAttention(12, 2)
    assert m.conv_size is None and not hasattr(m, "conv")
    assert isinstance(m.init_state(2), torch.Tensor) and m.init_state(2).shape == (2, 2, 6, 6)
    names = sorted(n for n, _ in m.named_parameters())
    assert names == sorted(["qkv.weight", "gate_down.weight", "gate_up.weight", "gate_up.bias", "output_gate.weight",
                            "out.weight", "norm_weight"])  # fmt: skip
    with_conv = la.GatedLinearAttention(12, 2, conv_size=4)
    window, S = with_conv.init_state(2)
    assert window.shape == (2, 3, 36) and S.shape == (2, 2, 6, 6)
    # the convolution adds 3 d_model (conv_size + 1) parameters: the taps and a bias per channel
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(with_conv) - n(m) == 36 * 5


def test_conv_size_bad_input():
    for cls in (la.GatedLinearAttention, la.DeltaNet):
        for bad in (0, -1, 2.0, True, "4"):
            with pytest.raises(ValueError, match="conv_size must be a positive int or None"):
                cls(12, 2, conv_size=bad)


@pytest.mark.parametrize("family", list(h2h.CONV_VARIANTS))
def test_conv_variants_build_and_decode_like_forward(family):
    """The experiment's variants: built seeded, and their language models decode like their forward."""
    from seqbook.attention import SlidingWindowAttention
    from seqbook.based import GatedShortConv, TaylorLinearAttention

    model = h2h.build(family, 16, 11, n_layers=2, seed=3).double()
    expected = {"GLA + conv": [4, 4], "DeltaNet, no conv": [None, None],
                "Based + conv": [GatedShortConv, SlidingWindowAttention, GatedShortConv, TaylorLinearAttention],
                "Based, 4 layers": [SlidingWindowAttention, TaylorLinearAttention] * 2}[family]  # fmt: skip
    if family.startswith("Based"):  # deeper by design: VARIANT_LAYERS overrides n_layers
        assert [type(b.mixer) for b in model.blocks] == expected
    else:
        assert [b.mixer.conv_size for b in model.blocks] == expected
    tokens = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(4))
    logits = model(tokens)
    state = model.init_state(2)
    outs = []
    for t in range(9):
        out, state = model.step(tokens[:, t], state)
        outs.append(out)
    assert_near(torch.stack(outs, 1), logits, 1e-11, f"{family}: step vs forward")
    assert torch.equal(h2h.build(family, 16, 11, n_layers=2, seed=3).double()(tokens), logits)


def test_conv_variants_run_through_the_experiment():
    r = h2h.mqar_head_to_head(seeds=(0,), steps=2, families=("GLA", "GLA + conv"), pair_counts=(2,), n_keys=4,
                              n_values=4, target_params=2000, n_test=8)  # fmt: skip
    assert [run["family"] for run in r["runs"]] == ["GLA", "GLA + conv"]
    assert r["families"]["GLA + conv"]["parameters"] > r["families"]["GLA"]["parameters"] - 500
    with pytest.raises(ValueError, match="families must be among"):
        h2h.mqar_head_to_head(seeds=(0,), steps=1, families=("GLA + conv 2",))
    assert not set(h2h.CONV_VARIANTS) & set(h2h.FAMILIES)  # the default run and the summary table keep their twelve
    r = h2h.mqar_head_to_head(seeds=(0,), steps=2, families=("Based", "Based + conv"), pair_counts=(2,), n_keys=4,
                              n_values=4, target_params=4000, n_test=8)  # fmt: skip
    assert r["families"]["Based"]["n_layers"] == 2 and r["families"]["Based + conv"]["n_layers"] == 4


# --------------------------------------------------------------------------------------
# Based's short gated convolution (seqbook.based.GatedShortConv, based_factory(conv_size=...))
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv_size", [1, 3, 4])
def test_gated_short_conv_step_equals_forward(conv_size):
    from seqbook.based import GatedShortConv

    torch.manual_seed(0)
    m = perturbed(GatedShortConv(10, conv_size), seed=conv_size)
    x, dy = randn(3, 13, 10, seed=1), randn(3, 13, 10, seed=2)
    assert_steps_equal_forward(m, x, dy, f"GatedShortConv({conv_size})")


def test_gated_short_conv_is_the_formula():
    """y_t = (x_t W + b) * (c + sum_i h_i x_{t-i}), written out with a loop over taps, zeros before the start."""
    from seqbook.based import GatedShortConv

    torch.manual_seed(1)
    m = perturbed(GatedShortConv(6, 3))
    x = randn(2, 8, 6, seed=3)
    h, c = m.conv.weight[:, 0], m.conv.bias  # (d_model, K): h[:, K - 1] is the current input's tap
    conv = torch.zeros_like(x) + c
    for i in range(3):  # x_{t-i}, shifted in from zeros
        shifted = torch.cat([torch.zeros_like(x[:, :i]), x[:, : x.shape[1] - i]], dim=1)
        conv = conv + h[:, 2 - i] * shifted
    assert_near(m(x), (x @ m.gate.weight.T + m.gate.bias) * conv, 1e-12, "GatedShortConv formula")


def test_based_stack_with_convolutions_decodes_like_forward():
    from seqbook.attention import SlidingWindowAttention
    from seqbook.based import GatedShortConv, TaylorLinearAttention, based_factory

    torch.manual_seed(5)
    lm = LanguageModel(based_factory(2, window=3, feature_dim=4, conv_size=3), 11, 16, 4, ffn_mult=2)
    assert [type(b.mixer) for b in lm.blocks] == [GatedShortConv, SlidingWindowAttention, GatedShortConv,
                                                  TaylorLinearAttention]  # fmt: skip
    lm = perturbed(lm, seed=6)
    tokens = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(7))
    logits = lm(tokens)
    state = lm.init_state(2)
    outs = []
    for t in range(12):
        out, state = lm.step(tokens[:, t], state)
        outs.append(out)
    assert_near(torch.stack(outs, 1), logits, 1e-10, "Based with convolutions: step vs forward")
    assert h2h.state_bytes(lm.float(), 12) == h2h.state_bytes(lm.float(), 40)  # window full: the state is fixed


def test_based_default_is_unchanged_and_bad_conv_size():
    from seqbook.attention import SlidingWindowAttention
    from seqbook.based import GatedShortConv, TaylorLinearAttention, based_factory

    lm = LanguageModel(based_factory(2, window=8, feature_dim=8), 11, 16, 2, ffn_mult=2)
    assert [type(b.mixer) for b in lm.blocks] == [SlidingWindowAttention, TaylorLinearAttention]
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="conv_size must be a positive int or None"):
            based_factory(conv_size=bad)
    with pytest.raises(ValueError, match=r"GatedShortConv: x must be \(batch, length, d_model\) with d_model = 6"):
        GatedShortConv(6, 3)(torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match=r"x_t must be \(batch, d_model\) with d_model = 6"):
        GatedShortConv(6, 3).step(torch.zeros(2, 5, 6), torch.zeros(2, 2, 6))
