"""Grading tests for chapter 4 (the selective scan and Mamba): Exercises 1-6, 16 points.

Run by the grader (``python -m seqbook.grading grade ...``), one process per
submission; ``submission`` holds the student's functions, running in a
sandbox.  Each test compares a student function with its counterpart in
``seqbook.mamba`` (or, for Exercise 4, with ``torch.nn.functional.conv1d``) on
seeded random float64 problems of several sizes (size-1 dimensions, odd
lengths); Exercise 3 also asks for the stable form in float32.  A test passes
only if every case does; the message names the first case and output that
differ, and how.

The exercises are in chapters/04_mamba/mamba.ipynb ("Exercises"; the chapter's
first notebook, selective_scan.ipynb, has none).  Contract:
  Exercise 1  selective_discretize(delta, A, B, u) -> (A_bar, Bu)     A_bar = exp(delta A), Bu = delta B u, per step
  Exercise 2  selective_scan_naive(u, delta, A, B, C, D) -> y         == mamba.selective_scan_loop(u, delta, A, B, C, D)
  Exercise 3  segsum(a) -> S                                          == mamba.segsum(a), stable in float32
  Exercise 4  conv_step(conv_state, x_t, weight, bias) -> (y_t, new)  == one step of a causal depthwise conv1d
  Exercise 5  scan_doubling(a, b) -> h                                h_t = a_t h_{t-1} + b_t, h_{-1} = 0
  Exercise 6  ssd_chunk(x, dt, a, B, C, h_in) -> (y, h_out)            == mamba.ssd_chunked, one head, one chunk
Exercises 5 and 6 earn partial credit per case, with hints for the common mistakes.
Shapes (u is the input x of the chapter's text, named as in seqbook.mamba): delta, u (batch, d) in Ex. 1
and (batch, L, d) in Ex. 2; A (d, N); B (batch, N) / (batch, L, N);
C (batch, L, N); D (d,); a (..., T) -> S (..., T, T); conv_state (batch, E, d_conv - 1), x_t (batch, E),
weight (E, d_conv), bias (E,) or None.
"""

import pytest
import torch
import torch.nn.functional as F

from seqbook import mamba
from seqbook.grading.checks import as_tuple, assert_close

F64 = torch.float64

# The selective scan, its kernels and the recurrences and segment sums it is built from are
# blocked while the exercises run (linear attention's decay mask is exp(segsum), so it goes too).
MAMBA = ["seqbook.mamba.*", "seqbook.scan.*", "seqbook.nn.*", "seqbook.linear_attention.*",
         "seqbook.kernels.selective_scan.*", "seqbook.kernels.ssd.*", "seqbook.kernels.scan.*"]
FORBIDDEN = {"selective_discretize": MAMBA, "selective_scan_naive": MAMBA, "segsum": MAMBA, "conv_step": MAMBA,
             "scan_doubling": MAMBA, "ssd_chunk": MAMBA}


@pytest.mark.points(2)
def test_selective_discretize(submission):
    """Exercise 1: A_bar[b, c, n] = exp(delta[b, c] A[c, n]), Bu[b, c, n] = delta[b, c] B[b, n] u[b, c]."""
    gen = torch.Generator().manual_seed(401)
    for batch, d, N in ((1, 1, 1), (2, 3, 5), (4, 7, 16), (3, 1, 8)):
        delta = 2 * torch.rand(batch, d, generator=gen, dtype=F64)
        u = torch.randn(batch, d, generator=gen, dtype=F64)
        A = -0.1 - 3 * torch.rand(d, N, generator=gen, dtype=F64)
        B = torch.randn(batch, N, generator=gen, dtype=F64)
        A_bar, Bu = as_tuple(submission.selective_discretize(delta, A, B, u), ("A_bar", "Bu"), "selective_discretize")
        case = f"batch {batch}, d {d}, N {N}"
        assert_close(A_bar, torch.exp(delta[:, :, None] * A), f"A_bar ({case})", rtol=1e-12, atol=1e-12)
        assert_close(Bu, delta[:, :, None] * u[:, :, None] * B[:, None, :], f"Bu ({case})", rtol=1e-12, atol=1e-12)


@pytest.mark.points(3)
def test_selective_scan_naive(submission):
    """Exercise 2: h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, y_t = C_t . h_t + D u_t."""
    gen = torch.Generator().manual_seed(402)
    for batch, L, d, N in ((1, 1, 1, 1), (2, 9, 3, 4), (1, 33, 5, 7), (3, 20, 2, 16)):
        u = torch.randn(batch, L, d, generator=gen, dtype=F64)
        delta = torch.rand(batch, L, d, generator=gen, dtype=F64)
        A = -0.1 - 3 * torch.rand(d, N, generator=gen, dtype=F64)
        B, C = (torch.randn(batch, L, N, generator=gen, dtype=F64) for _ in range(2))
        D = torch.randn(d, generator=gen, dtype=F64)
        want = mamba.selective_scan_loop(u, delta, A, B, C, D)
        got = submission.selective_scan_naive(u, delta, A, B, C, D)
        assert_close(got, want, f"y (batch {batch}, L {L}, d {d}, N {N})", rtol=1e-11, atol=1e-11)


@pytest.mark.points(2)
def test_segsum(submission):
    """Exercise 3: S[t, s] = a[s+1] + ... + a[t] for t >= s, -inf above the diagonal; stable in float32."""
    gen = torch.Generator().manual_seed(403)
    for shape in ((1,), (2,), (9,), (3, 16), (2, 2, 31)):
        a = -torch.rand(shape, generator=gen, dtype=F64)
        want = mamba.segsum(a)
        got = submission.segsum(a)
        assert isinstance(got, torch.Tensor) and got.shape == want.shape, f"S: shape {getattr(got, 'shape', None)}"
        assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"S {shape}: -inf must be exactly at t < s"
        finite = ~torch.isneginf(want)
        assert_close(got[finite], want[finite], f"S {shape} (entries t >= s)", rtol=1e-12, atol=1e-12)
    a = -2 * torch.rand(1500, generator=gen)  # float32: differences of one cumulative sum lose ~1e-4 here
    exact = mamba.segsum(a.double())
    got = submission.segsum(a)
    assert got.dtype == torch.float32, f"S: float32 in, float32 out; got {got.dtype}"
    finite = ~torch.isneginf(exact)
    error = ((got.double() - exact).abs() / (exact.abs() + 1))[finite].max().item()
    assert error < 1e-6, f"float32, T = 1500: error {error:.1e} relative to |S| + 1 (needs < 1e-6: the stable form)"


@pytest.mark.points(3)
def test_conv_step(submission):
    """Exercise 4: a causal depthwise convolution one step at a time, against conv1d over the whole sequence."""
    gen = torch.Generator().manual_seed(404)
    for batch, E, K, L, with_bias in ((1, 1, 1, 4, True), (2, 3, 4, 11, True), (1, 6, 2, 5, False), (3, 2, 5, 3, True)):
        x = torch.randn(batch, L, E, generator=gen, dtype=F64)
        weight = torch.randn(E, K, generator=gen, dtype=F64)
        bias = torch.randn(E, generator=gen, dtype=F64) if with_bias else None
        want = F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), weight[:, None], bias, groups=E)  # (batch, E, L)
        state = torch.zeros(batch, E, K - 1, dtype=F64)
        for t in range(L):
            y_t, state = as_tuple(submission.conv_step(state, x[:, t], weight, bias), ("y_t", "new_state"), "conv_step")
            case = f"batch {batch}, E {E}, K {K}, bias {with_bias}, t = {t}"
            assert_close(y_t, want[:, :, t], f"y_t ({case})", rtol=1e-12, atol=1e-12)
            assert tuple(state.shape) == (batch, E, K - 1), f"new_state ({case}): shape {tuple(state.shape)}"


def _recurrence(a, b, h0=None):
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


@pytest.mark.points(3)
def test_scan_doubling(submission, credit):
    """Exercise 5: the linear recurrence by rounds of the associative combine (a1 a2, a2 b1 + b2)."""
    gen = torch.Generator().manual_seed(405)
    for batch, L, d in ((1, 1, 1), (2, 2, 3), (1, 13, 4), (3, 64, 2), (2, 100, 5)):
        a = torch.rand(batch, L, d, generator=gen, dtype=F64)
        b = torch.randn(batch, L, d, generator=gen, dtype=F64)
        want = _recurrence(a, b)
        mistakes = {"looks like the cumulative sum of b (the decays a were ignored)": b.cumsum(1)}
        if L > 1:
            # the combine in the wrong order, (a1 a2, a1 b2 + b1), applies the later step first:
            # h_t = sum_{j <= t} (a_0 ... a_{j-1}) b_j
            before = torch.cat([torch.ones_like(a[:, :1]), a[:, :-1].cumprod(1)], dim=1)
            mistakes["looks like the combine in the wrong order, (a1 a2, a1 b2 + b1): the earlier step's map must "
                     "be applied first, h -> a2 (a1 h + b1) + b2"] = (before * b).cumsum(1)
        case = f"batch {batch}, L {L}, d {d}"
        with credit.case(case):
            got = submission.scan_doubling(a, b)
            assert_close(got, want, f"h ({case})", rtol=1e-11, atol=1e-11, mistakes=mistakes)


@pytest.mark.points(3)
def test_ssd_chunk(submission, credit):
    """Exercise 6: one chunk of SSD: its quadratic form, the incoming state's share, the outgoing state."""
    gen = torch.Generator().manual_seed(406)
    for Q, P, N in ((1, 1, 1), (4, 2, 3), (9, 5, 4), (32, 8, 16)):
        x = torch.randn(Q, P, generator=gen, dtype=F64)
        dt = F.softplus(torch.randn(Q, generator=gen, dtype=F64))
        a = -0.1 - torch.rand((), generator=gen, dtype=F64)
        B, C = (torch.randn(Q, N, generator=gen, dtype=F64) for _ in range(2))
        h_in = torch.randn(P, N, generator=gen, dtype=F64)
        y_want, h_want = mamba.ssd_chunked(x[None, :, None], dt[None, :, None], a[None], B[None, :, None],
                                           C[None, :, None], chunk_size=Q, initial_state=h_in[None, None],
                                           return_final_state=True)  # fmt: skip
        y_want, h_want = y_want[0, :, 0], h_want[0, 0]
        y_no_state = mamba.ssd_chunked(x[None, :, None], dt[None, :, None], a[None], B[None, :, None],
                                       C[None, :, None], chunk_size=Q)[0, :, 0]  # fmt: skip
        case = f"Q {Q}, P {P}, N {N}"
        with credit.case(case):
            y, h_out = as_tuple(submission.ssd_chunk(x, dt, a, B, C, h_in), ("y", "h_out"), "ssd_chunk")
            assert_close(y, y_want, f"y ({case})", rtol=1e-10, atol=1e-11,
                         mistakes={"leaves out the incoming state: add exp(cumsum(dt a))_t C_t h_in^T": y_no_state})
            assert_close(h_out, h_want, f"h_out ({case})", rtol=1e-10, atol=1e-11,
                         mistakes={"does not decay the incoming state over the chunk: exp(sum(dt a)) h_in": h_want
                                   - h_in * (torch.exp((dt * a).sum()) - 1)})
