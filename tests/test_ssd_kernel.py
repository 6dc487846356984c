"""The SSD (Mamba-2) Triton kernel, seqbook.kernels.ssd, forward and backward, against the
float64 chunked form (seqbook.mamba.ssd_chunked), in both designs of the forward (fused:
one program walks all chunks; split: chunk states, a pass over them, chunk outputs).

Shapes are small (the interpreter on a CPU): several chunks, a partial last chunk, groups
of heads sharing B and C, P and N that are not powers of two, float32 / bfloat16 / float16.
"""

import pytest
import torch
import torch.nn.functional as F
from compare import assert_near

from seqbook import mamba
from seqbook.backend import kernels

F64 = torch.float64
DESIGNS = ["fused", "split"]

# (batch, length, heads, P, groups, N, chunk): a single step; a length that is not a multiple
# of the chunk with two groups and odd P, N; several chunks with P > BLOCK_P (two P blocks in
# float32, BLOCK_P = 16) and N not a power of two; a length that fills its chunks exactly;
# float32 also walks N in blocks of 16 in the backward: N = 40 takes three, the last partial.
CASES = [(1, 1, 2, 3, 1, 4, 16), (2, 37, 4, 5, 2, 7, 16), (1, 70, 2, 20, 1, 12, 16), (1, 64, 3, 16, 3, 16, 32),
         (1, 40, 2, 8, 1, 40, 16)]


def make(batch, length, heads, P, groups, N, seed):
    """x, B, C, the initial state: N(0, 1); dt = softplus(N(0, 1) - 1); A in [-2.5, -0.5] (float64)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, P, generator=gen, dtype=F64)
    dt = F.softplus(torch.randn(batch, length, heads, generator=gen, dtype=F64) - 1)
    A = -0.5 - 2 * torch.rand(heads, generator=gen, dtype=F64)
    B = torch.randn(batch, length, groups, N, generator=gen, dtype=F64)
    C = torch.randn(batch, length, groups, N, generator=gen, dtype=F64)
    s0 = torch.randn(batch, heads, P, N, generator=gen, dtype=F64)
    return x, dt, A, B, C, s0


def run_both(inputs, wide, chunk, design, with_s0=True, cfg=None):
    """The kernel's (configuration ``cfg``, default: the kernel's) and the float64 reference's y,
    final state and every gradient, for random output gradients of y and of the final state."""
    k = kernels("ssd")
    leaves = [t.clone().requires_grad_() for t in inputs]
    s0 = leaves[5] if with_s0 else None
    y, final = k.ssd_autograd(*leaves[:5], chunk, s0, cfg, design)
    gen = torch.Generator().manual_seed(99)
    gy = torch.randn(y.shape, generator=gen, dtype=F64)
    gf = torch.randn(final.shape, generator=gen, dtype=F64)
    loss = (y.double() * gy.to(y.device)).sum() + (final.double() * gf.to(y.device)).sum()
    got = torch.autograd.grad(loss, leaves if with_s0 else leaves[:5])
    ref_leaves = [t.clone().requires_grad_() for t in wide]
    y_ref, final_ref = mamba.ssd_chunked(*ref_leaves[:5], 8, ref_leaves[5] if with_s0 else None, True)
    want = torch.autograd.grad((y_ref * gy).sum() + (final_ref * gf).sum(),
                               ref_leaves if with_s0 else ref_leaves[:5])  # fmt: skip
    return (y, final, *got), (y_ref, final_ref, *want)


NAMES = ["y", "final state", "dx", "ddt", "dA", "dB", "dC", "d initial state"]


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B={},L={},H={},P={},G={},N={},Q={}".format(*c))
def test_forward_and_gradients_float32(device, case, design):
    *shape, chunk = case
    wide = make(*shape, seed=shape[1])
    inputs = [t.float().to(device) for t in wide]
    got, want = run_both(inputs, wide, chunk, design)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for name, g, w in zip(NAMES, got, want):
        assert_near(g.cpu(), w, 1e-5, f"{name} ({design})")


@pytest.mark.parametrize("design", DESIGNS)
def test_without_initial_state(device, design):
    wide = make(2, 37, 4, 5, 2, 7, seed=5)
    inputs = [t.float().to(device) for t in wide]
    got, want = run_both(inputs, wide, 16, design, with_s0=False)
    for name, g, w in zip(NAMES, got, want):
        assert_near(g.cpu(), w, 1e-5, f"{name} ({design}, zero initial state)")


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(device, dtype, design):
    # 16-bit x, B, C (dt and A float32, as Mamba-2 keeps them): the products of inputs and the
    # masked scores go through 16 bits, states and their gradients stay float32.
    wide = make(2, 50, 2, 16, 2, 16, seed=3)
    inputs = [t.to(device=device, dtype=dtype if i in (0, 3, 4) else torch.float32) for i, t in enumerate(wide)]
    wide = [t.to(F64) for t in (t.cpu() for t in inputs)]  # the reference sees the rounded inputs
    got, want = run_both(inputs, wide, 16, design)
    assert got[0].dtype == dtype and got[2].dtype == dtype and got[3].dtype == torch.float32
    rel = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for name, g, w in zip(NAMES, got, want):
        assert_near(g.cpu(), w, rel, f"{name} ({dtype}, {design})")


def test_designs_agree_with_the_forward_only_path(device):
    # ssd_forward (no gradient, nothing saved) gives what the autograd function gives, in
    # both designs, and "auto" takes one of them.
    k = kernels("ssd")
    wide = make(1, 45, 2, 8, 1, 8, seed=11)
    x, dt, A, B, C, s0 = (t.float().to(device) for t in wide)
    want_y, want_f = mamba.ssd_chunked(*wide[:5], 8, wide[5], True)
    for design in ("fused", "split", "auto"):
        y, f = k.ssd_forward(x, dt, A, B, C, 16, s0, design=design)
        assert_near(y.cpu(), want_y, 1e-5, f"y ({design})")
        assert_near(f.cpu(), want_f, 1e-5, f"final state ({design})")
    assert k.choose_design(x, B) in ("fused", "split")


def test_public_entry_trains_through_the_kernel(device):
    # ssd(backend="triton") with inputs that need gradients goes through the kernel's backward
    # (not the reference): its gradients match the float64 reference's.
    wide = make(2, 33, 2, 16, 1, 16, seed=12)
    leaves = [t.float().to(device).requires_grad_() for t in wide]
    y, final = mamba.ssd(*leaves[:5], 16, leaves[5], True, backend="triton")
    assert y.grad_fn is not None and "SSDFunction" in type(y.grad_fn).__name__
    (y.sum() + final.sum()).backward()
    ref = [t.clone().requires_grad_() for t in wide]
    y_ref, f_ref = mamba.ssd_chunked(*ref[:5], 8, ref[5], True)
    (y_ref.sum() + f_ref.sum()).backward()
    for name, a, b in zip(NAMES[2:], leaves, ref):
        assert_near(a.grad.cpu(), b.grad, 1e-5, name)


def test_only_y_or_only_the_final_state_needs_a_gradient(device):
    # The backward gets None for an output that was not used.
    wide = make(1, 40, 2, 8, 1, 8, seed=13)
    for use in ("y", "final"):
        leaves = [t.float().to(device).requires_grad_() for t in wide]
        y, final = mamba.ssd(*leaves[:5], 16, leaves[5], True, backend="triton")
        (y if use == "y" else final).square().sum().backward()
        ref = [t.clone().requires_grad_() for t in wide]
        y_ref, f_ref = mamba.ssd_chunked(*ref[:5], 8, ref[5], True)
        (y_ref if use == "y" else f_ref).square().sum().backward()
        for name, a, b in zip(NAMES[2:], leaves, ref):
            want = torch.zeros_like(b) if b.grad is None else b.grad  # C does not reach the final state
            assert_near(a.grad.cpu(), want, 1e-5, f"{name} (loss on {use})")


@pytest.mark.parametrize("design", DESIGNS)
def test_bfloat16_backward_walks_the_state_in_blocks(device, design):
    # N = 80 > the 16-bit backward's block of 64 state indices: two blocks, the last partial.
    wide = make(1, 40, 2, 16, 1, 80, seed=21)
    inputs = [t.to(device=device, dtype=torch.bfloat16 if i in (0, 3, 4) else torch.float32)
              for i, t in enumerate(wide)]  # fmt: skip
    wide = [t.to(F64) for t in (t.cpu() for t in inputs)]
    got, want = run_both(inputs, wide, 16, design)
    for name, g, w in zip(NAMES, got, want):
        assert_near(g.cpu(), w, 2e-2, f"{name} (bfloat16, N = 80, {design})")


def test_the_split_design_is_chosen_when_the_fused_grid_is_small():
    # batch * heads * (P / BLOCK_P) programs against half the SM count (INTERPRETER_SMS = 8
    # without a GPU); float32 takes BLOCK_P = 16
    k = kernels("ssd")
    sms = k._sms(torch.device("cpu"))
    for batch, heads, P in ((1, 2, 8), (2, 4, 40), (1, 1, 16)):
        x, B = torch.zeros(batch, 3, heads, P), torch.zeros(batch, 3, 1, 16)
        programs = batch * heads * -(-P // 16)
        assert k.choose_design(x, B) == ("fused" if 2 * programs >= sms else "split")
    with pytest.raises(ValueError, match="design must be"):
        k.ssd_forward(x, x[..., 0], torch.zeros(1), B, B, design="fast")


def test_bfloat16_forward_only_split_takes_its_longer_chunk(device):
    # Without gradients the split design runs 16-bit inputs in chunks of 128 (SPLIT_FORWARD_CONFIGS):
    # 300 steps are two full chunks and a partial one.
    k = kernels("ssd")
    assert k.SPLIT_FORWARD_CONFIGS[2]["Q"] == 128
    wide = make(1, 300, 2, 16, 1, 16, seed=23)
    inputs = [t.to(device=device, dtype=torch.bfloat16 if i in (0, 3, 4) else torch.float32)
              for i, t in enumerate(wide)]  # fmt: skip
    wide = [t.to(F64) for t in (t.cpu() for t in inputs)]
    y, final = k.ssd_forward(*inputs[:5], None, inputs[5], design="split")
    y_ref, final_ref = mamba.ssd_chunked(*wide[:5], 8, wide[5], True)
    assert_near(y.cpu(), y_ref, 2e-2, "y (bfloat16, split, chunk 128)")
    assert_near(final.cpu(), final_ref, 2e-2, "final state (bfloat16, split, chunk 128)")


def saved_bytes(fn):
    """``fn()``'s result and the bytes autograd saved for the backward while it ran (each
    tensor counted once)."""
    saved = {}

    def pack(t):
        saved[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved.values())


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("keep", [False, True], ids=["recompute", "keep_states"])
def test_training_keeps_no_state_per_chunk(device, design, keep):
    # B = 1 and a long sequence (19 chunks, the last partial): by default the forward saves its
    # inputs and the initial state and nothing per chunk, and the backward recomputes the
    # states entering the chunks; the option keep_states saves those (more than the bound),
    # as the design before did. Both give the float64 gradients.
    k = kernels("ssd")
    batch, L, H, P, G, N, Q = 1, 300, 2, 16, 1, 16, 16
    wide = make(batch, L, H, P, G, N, seed=31)
    leaves = [t.float().to(device).requires_grad_() for t in wide]
    cfg = dict((k.CONFIGS if design == "fused" else k.SPLIT_CONFIGS)[4], keep_states=keep)
    (y, final), nbytes = saved_bytes(lambda: k.ssd_autograd(*leaves[:5], Q, leaves[5], cfg, design))
    inputs = sum(t.numel() * t.element_size() for t in leaves)  # x, dt, A, B, C and the initial state
    per_chunk = batch * -(-L // Q) * H * P * N * 4  # the float32 state entering every chunk
    if keep:  # the inputs but the initial state, and every chunk's state: above the bound
        assert nbytes >= inputs - leaves[5].numel() * 4 + per_chunk > inputs, (nbytes, inputs, per_chunk)
    else:
        assert nbytes <= inputs, (nbytes, inputs, per_chunk)
    gen = torch.Generator().manual_seed(7)
    gy, gf = torch.randn(y.shape, generator=gen, dtype=F64), torch.randn(final.shape, generator=gen, dtype=F64)
    got = torch.autograd.grad((y.double() * gy.to(device)).sum() + (final.double() * gf.to(device)).sum(), leaves)
    ref = [t.clone().requires_grad_() for t in wide]
    y_ref, f_ref = mamba.ssd_chunked(*ref[:5], 8, ref[5], True)
    want = torch.autograd.grad((y_ref * gy).sum() + (f_ref * gf).sum(), ref)
    for name, g, w in zip(NAMES, (y, final, *got), (y_ref, f_ref, *want)):
        assert_near(g.cpu(), w, 1e-5, f"{name} ({design}, keep_states={keep})")


def test_fused_backward_walks_the_state_in_tiles(device):
    # The backward's two state walks (fused design) in tiles of 16 x 16 of a (20, 40) state:
    # two blocks of P and three of N, the last ones partial; a zero initial state.
    k = kernels("ssd")
    cfg = dict(k.CONFIGS[4], WALK_BLOCK_P=16, WALK_BLOCK_N=16)
    wide = make(1, 40, 2, 20, 1, 40, seed=41)
    got, want = run_both([t.float().to(device) for t in wide], wide, 16, "fused", with_s0=False, cfg=cfg)
    for name, g, w in zip(NAMES, got, want):
        assert_near(g.cpu(), w, 1e-5, f"{name} (walks in 16 x 16 tiles)")


@pytest.mark.parametrize("design", DESIGNS)
def test_atomic_sums_of_db_and_dc(device, design):
    # Option atomic_dbc: the backward adds each head's and each block of P's dB, dC into their
    # group's float32 sums (no per-head parts). Groups of two heads; P = 20 takes two blocks.
    k = kernels("ssd")
    cfg = dict((k.CONFIGS if design == "fused" else k.SPLIT_CONFIGS)[4], atomic_dbc=True)
    wide = make(2, 37, 4, 20, 2, 7, seed=43)
    got, want = run_both([t.float().to(device) for t in wide], wide, 16, design, cfg=cfg)
    for name, g, w in zip(NAMES, got, want):
        assert_near(g.cpu(), w, 1e-5, f"{name} (atomic dB, dC, {design})")


def test_bfloat16_forward_and_backward_tiles_differ(device):
    # The 16-bit fused configuration runs the forward in blocks of 32 channels, the backward's
    # per-chunk kernel in blocks of 64 and the state walks in tiles of 32 x 64: P = 40 takes two
    # forward blocks (the second partial) and one backward block; groups of two heads (the
    # atomic sums of dB, dC).
    k = kernels("ssd")
    cfg = k.CONFIGS[2]
    assert (cfg["BLOCK_P"], cfg["BWD_BLOCK_P"], cfg["WALK_BLOCK_P"]) == (32, 64, 32) and cfg["atomic_dbc"]
    wide = make(1, 45, 4, 40, 2, 24, seed=47)
    inputs = [t.to(device=device, dtype=torch.bfloat16 if i in (0, 3, 4) else torch.float32)
              for i, t in enumerate(wide)]  # fmt: skip
    wide = [t.to(F64) for t in (t.cpu() for t in inputs)]
    got, want = run_both(inputs, wide, None, "fused")
    for name, g, w in zip(NAMES, got, want):
        assert_near(g.cpu(), w, 2e-2, f"{name} (bfloat16, P = 40, fused)")
