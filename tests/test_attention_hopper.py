"""Tests for seqbook.kernels.attention_hopper, the Gluon forward for sm_90 GPUs.

That kernel compiles for the GPU only (the interpreter cannot run Gluon), so its numbers are
checked on an sm_90 GPU: output and log-sum-exp against the float64 naive form on the same
rounded inputs, and the gradients of the whole autograd function (this forward, the Triton
backward reading its log-sum-exp). Elsewhere these tests are skipped, saying why; what runs
everywhere is the dispatch (which kernel a CPU, a float32 input or an odd length gets) and,
in tests/test_compile_check.py, the kernel's compilation for sm_90 with the installed Triton.
"""

from __future__ import annotations

import math

import pytest
import torch

from seqbook import attention as attn
from seqbook import backend
from seqbook.kernels import attention_hopper as hopper
from compare import assert_near

kernel = backend.kernels("attention")

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_sm90 = pytest.mark.skipif(not (SM90 and hopper.HAVE_GLUON), reason="the Gluon kernel runs on an sm_90 GPU only")
F64 = torch.float64
REL = {torch.bfloat16: (2e-2, 5e-2), torch.float16: (4e-3, 1e-2)}  # outputs, gradients (tests/compare.py)


def qkv(B, L, H, d, *, seed, dtype, device):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, L, H, d, generator=gen, dtype=F64).to(device=device, dtype=dtype) for _ in range(3))


def test_not_taken_on_cpu_or_where_it_does_not_apply():
    q, k, v = qkv(1, 128, 2, 128, seed=0, dtype=torch.float16, device="cpu")
    assert not hopper.applies(q, k, v)
    if SM90:
        q, k, v = (x.cuda() for x in (q, k, v))
        assert hopper.applies(q, k, v) == hopper.HAVE_GLUON
        assert not hopper.applies(q[:, :100], k[:, :100], v[:, :100])  # L not a multiple of 128
        assert not hopper.applies(q.float(), k.float(), v.float())
        assert not hopper.applies(q[..., :32].contiguous(), k[..., :32].contiguous(), v[..., :32].contiguous())
        assert not hopper.applies(*(torch.cat([x, x], -1)[..., :128] for x in (q, k, v)))  # not contiguous
        # d = 64: the Gluon kernel applies, but the default forward keeps the Triton one there
        # (kernel.HOPPER_HEAD_DIMS): the same numbers bit for bit as that kernel called directly.
        q, k, v = (x[..., :64].contiguous().bfloat16() for x in (q, k, v))
        assert hopper.applies(q, k, v) == hopper.HAVE_GLUON and 64 not in kernel.HOPPER_HEAD_DIMS
        o, lse = kernel.attention_with_lse(q, k, v, True)
        o_ref, lse_ref = kernel.attention_with_lse(q, k, v, True, config=kernel.config_for("fwd", q.dtype, 64))
        assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)


def test_refuses_what_it_cannot_take():
    # Checked before any launch, so on any machine: a clear error, never a Triton crash.
    q, k, v = qkv(1, 256, 2, 128, seed=0, dtype=torch.bfloat16, device="cpu")
    assert hopper.unsupported(q, k, v) is None
    cases = {
        "d in (64, 128)": (q[..., :32].contiguous(), k[..., :32].contiguous(), v[..., :32].contiguous()),
        "L a multiple of 128": (q[:, :200].contiguous(), k[:, :200].contiguous(), v[:, :200].contiguous()),
        "bfloat16 or all float16": (q.float(), k.float(), v.float()),
        "one shape": (q, k[:, :128], v),
        "contiguous": tuple(torch.cat([x, x], -1)[..., :128] for x in (q, k, v)),  # rows 256 apart
    }
    for message, (a, b, c) in cases.items():
        assert message in hopper.unsupported(a, b, c)
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            hopper.forward(a, b, c, True, 0.1)


@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(1, 128, 1, 128), (2, 384, 3, 128), (1, 1024, 2, 128), (2, 384, 3, 64),
                                   (1, 1024, 2, 64)], ids=lambda s: "B={},L={},H={},d={}".format(*s))  # fmt: skip
@pytest.mark.parametrize("num_buffers", [2, 3])
def test_forward_matches_reference(shape, causal, dtype, num_buffers):
    # L = 128: one key block (causal: only the diagonal); 384: three, so a two-buffer ring
    # wraps; B, H > 1: each (batch, head) reads and writes its own rows and columns.
    q, k, v = qkv(*shape, seed=shape[1] + num_buffers, dtype=dtype, device="cuda")
    scale = 1 / math.sqrt(shape[-1])
    o, lse = hopper.forward(q, k, v, causal, scale, num_buffers=num_buffers)
    q64, k64, v64 = (x.double() for x in (q, k, v))
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert_near(o, attn.attention_naive(q64, k64, v64, causal), REL[dtype][0], "o")
    assert_near(lse, torch.logsumexp(attn.attention_scores(q64, k64, causal), -1), 1e-5, "lse")


@needs_sm90
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_equals_the_triton_kernel(causal, d):
    # Same rounding of the same inputs, different order of float32 sums: close to a few
    # bf16 units of the output; the log-sum-exp (float32 throughout) to float32 rounding.
    q, k, v = qkv(2, 512, 2, d, seed=7, dtype=torch.bfloat16, device="cuda")
    o, lse = hopper.forward(q, k, v, causal, 0.1)
    cfg = kernel.config_for("fwd", q.dtype, d)
    o_ref, lse_ref = kernel.attention_with_lse(q, k, v, causal, 0.1, config=cfg)
    assert_near(o, o_ref.double(), 2e-2, "o")
    assert_near(lse, lse_ref.double(), 1e-5, "lse")


@needs_sm90
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_autograd_through_the_gluon_forward(causal):
    # The default path: FlashAttention.forward takes this kernel, the backward reads its lse.
    assert 128 in kernel.HOPPER_HEAD_DIMS
    shape, dtype = (1, 256, 2, 128), torch.bfloat16
    q, k, v = qkv(*shape, seed=3, dtype=dtype, device="cuda")
    do = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=F64).to("cuda")
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = kernel.attention(*leaves, causal=causal)
    o.backward(do.to(dtype))
    ref = [x.double().detach().requires_grad_() for x in (q, k, v)]
    o_ref = attn.attention_naive(*ref, causal)
    o_ref.backward(do)
    assert_near(o, o_ref.detach(), REL[dtype][0], "o")
    for name, x, r in zip("qkv", leaves, ref):
        assert_near(x.grad, r.grad, REL[dtype][1], f"d{name}")
