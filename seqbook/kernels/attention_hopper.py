r"""The attention forward for Hopper GPUs, written in Gluon: two warp groups take turns.

:mod:`seqbook.kernels.attention` is the portable kernel (Triton, any GPU, the CPU
interpreter); this module is one more forward behind the same ``_forward``, which takes it
where it applies (:func:`applies`: an sm_90 GPU, 16-bit inputs, ``d`` = 64 or 128, ``L`` a
multiple of 128, Gluon importable) and at the head sizes where it was measured faster
(``attention.HOPPER_HEAD_DIMS``: 128). Same inputs, same outputs, same algorithm (FlashAttention's online
softmax, base-2 exponentials, the log-sum-exp for the backward); read the portable kernel's
docstring first. What differs is who does what, and when.

Why another kernel
------------------
Per 64 x 128 tile of scores, the two products (:math:`q k^\top` and :math:`P v`) keep the
tensor cores busy for about twice as long as the softmax keeps the other units busy (an
``exp2``, a multiply-add, a max and a sum per score). Compiled from Triton, the two run one
after the other: the scores' product is waited for before the softmax, the softmax before
the next product, and the two warp groups of a 128-row program wait for each other at
barriers. The tensor cores idle during every softmax. FlashAttention-3 (Shah et al., 2024)
overlaps them in two ways, and this kernel does both:

- **Within a warp group**, one block ahead: the product :math:`S_j = q K_j^\top` is issued,
  then :math:`P_{j-1} V_{j-1}`, and only then does the group wait for :math:`S_j` and take
  its softmax, while :math:`P_{j-1} V_{j-1}` runs on the tensor cores. The accumulator is
  rescaled by block :math:`j`'s factor after that product completes.
- **Between warp groups**: each 128-row program has two *independent* consumer warp groups
  of 64 rows each, with nothing joining them but the shared key/value buffers; while one
  takes its softmax the other's products run (the warp schedulers interleave them).

A third, one-warp partition only loads: it copies each key and value block into a ring of
shared-memory buffers through the copy engine (TMA) and signals its arrival on a barrier;
each consumer signals back when its product has read a buffer, and the loader refills it
once both have.

The pieces are Gluon's (``triton.experimental.gluon``, Triton's lower-level language, where
layouts, shared memory, barriers and warp partitions are written out instead of inferred):
``warpgroup_mma`` (Hopper's asynchronous ``wgmma``) with ``warpgroup_mma_wait``, ``mbarrier``,
``tma.async_copy_global_to_shared``, ``warp_specialize``. Gluon compiles for the GPU only;
the interpreter cannot run it, so the CPU always takes the portable kernel, and this one is
tested against it and against float64 on a GPU (``tests/test_attention_hopper.py``).

Measured
--------
On an H200 (Triton 3.6, bf16, causal, B=1 L=16384 H=16 d=128), in one run of the benchmark
suite (``benchmarks/results/2026-12-03-h200-stop24-attention.json``, commit 0489b5e): 1.787 ms
(615 TFLOP/s) against SDPA's cuDNN backend 1.953 ms, 1.09 times its speed, where the portable
kernel had taken 2.126 ms against 1.801 (0.85 times; ``stop22b``). Non-causal at the same shape,
3.08-3.20 ms against cuDNN's 3.19-3.39 and the portable kernel's 4.13-4.55. Two key/value
buffers or three made no difference beyond the runs' noise (medians 1.79 and 1.79 ms over ten
rounds, ``results/sweeps/2026-12-03-h200-stop24-attention-gluon.json``); two leave shared memory
to spare. Over lengths (H=16, d=128, B = 16384 / L): 1.29-1.44 times the portable forward's
speed at every L from 512 to 16384, causal or not; against cuDNN from 0.63x at L = 512 (four key
blocks per program: the unhidden prologue and epilogue weigh) to 1.09x at 16384
(``results/sweeps/2026-12-03-h200-stop24-attention-gluon-lengths.json``). At d = 64 it lost to the
portable kernel at B=4 L=4096 H=32 (0.747 against 0.719 ms) and won at L = 16384 (1.27 against
1.36): with half the product work per score there is less to hide the softmax behind, and the
default forward keeps the portable kernel there (``attention.HOPPER_HEAD_DIMS``). The order of
the two warp groups' products is left to the warp schedulers: strict turns (FlashAttention-3's
ping-pong, here with a pair of barriers) lost, 1.80 against 1.75 ms at the shape above and 0.541
against 0.529 at B=4 L=4096 (``results/sweeps/2026-12-03-h200-stop24-attention-gluon-pingpong.json``),
and were not kept. Not done: persistent programs.
"""

from __future__ import annotations

import torch
import triton

try:  # Gluon is experimental: a Triton without it (or with another API) keeps the portable kernel
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # The copy engine's load was renamed after Triton 3.6 (the GPU machines' version).
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

LOG2E = 1.4426950408889634
BLOCK_M = triton.language.constexpr(128)  # query rows per program: two consumer warp groups of 64
BLOCK_N = triton.language.constexpr(128)  # keys per streamed block
HEAD_DIMS = (64, 128)  # a tile holds whole rows of q, k, v; d is read from the descriptors' blocks
#: Key/value buffers in the ring (each 32 KB per tensor at d = 128): 2 or 3 fit in shared memory.
NUM_BUFFERS = 2
#: Registers per thread: the loader's warp group gives its share to the two consumers. The
#: kernel's 12 warps (4 + 4 + 1, rounded up to whole warp groups) share 64K registers:
#: ``MAX_REGISTERS`` each at the start, then 24 for the loader, ``CONSUMER_REGISTERS`` for the
#: second consumer and the rest for the first.
MAX_REGISTERS = 168
CONSUMER_REGISTERS = triton.language.constexpr(240)
LOADER_REGISTERS = triton.language.constexpr(24)


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """What this kernel cannot take in these ``(B, L, H, d)`` tensors (None: nothing)."""
    B, L, H, d = q.shape
    if q.dtype not in (torch.bfloat16, torch.float16) or not k.dtype == v.dtype == q.dtype:
        return f"q, k, v must all be bfloat16 or all float16, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not q.shape == k.shape == v.shape:
        return f"q, k, v must have one shape (B, L, H, d), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if d not in HEAD_DIMS or L % BLOCK_M.value:
        return f"needs d in {HEAD_DIMS} and L a multiple of {BLOCK_M.value}, got (B, L, H, d) = {tuple(q.shape)}"
    if not all(x.is_contiguous() and x.data_ptr() % 16 == 0 for x in (q, k, v)):
        return "q, k, v must be contiguous (B, L, H, d) tensors starting on 16-byte boundaries"
    return None


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether this kernel can take the forward of these ``(B, L, H, d)`` tensors, here."""
    on_sm90 = HAVE_GLUON and q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0)
    return on_sm90 and unsupported(q, k, v) is None


if HAVE_GLUON:

    @gluon.jit
    def _program(L, H, D: gl.constexpr, CAUSAL: gl.constexpr):
        """This program's query block, and where its (batch, head)'s rows start in the 2-D views."""
        if CAUSAL:  # the last query block (the most key blocks) first
            start_m = gl.num_programs(0) - 1 - gl.program_id(0)
        else:
            start_m = gl.program_id(0)
        bh = gl.program_id(1)
        return start_m, (bh // H) * L, (bh % H) * D

    @gluon.jit
    def _num_blocks(start_m, L, CAUSAL: gl.constexpr):
        if CAUSAL:
            return start_m + 1  # BLOCK_M == BLOCK_N: up to and including the diagonal
        else:
            return L // BLOCK_N

    @gluon.jit
    def _loader(q_desc, k_desc, v_desc, bufs, bars, L, H, CAUSAL: gl.constexpr):
        """One warp: the two query halves, then every key and value block into the ring."""
        q_smem, k_bufs, v_bufs = bufs
        q_ready, k_ready, k_free, v_ready, v_free = bars
        NBUF: gl.constexpr = k_bufs.type.shape[0]
        start_m, row0, col = _program(L, H, q_desc.block_type.shape[1], CAUSAL)
        for i in gl.static_range(2):
            mbarrier.expect(q_ready.index(i), q_desc.block_type.nbytes)
            _tma_load(q_desc, [row0 + start_m * BLOCK_M + i * 64, col], q_ready.index(i), q_smem.index(i))
        for j in range(_num_blocks(start_m, L, CAUSAL)):
            slot = j % NBUF
            phase = (j // NBUF) & 1
            # A buffer is free once both consumers' products have read it (the barriers start
            # in the completed phase 1, so the first pass through the ring does not wait).
            mbarrier.wait(k_free.index(slot), phase ^ 1)
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            _tma_load(k_desc, [row0 + j * BLOCK_N, col], k_ready.index(slot), k_bufs.index(slot))
            mbarrier.wait(v_free.index(slot), phase ^ 1)
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            _tma_load(v_desc, [row0 + j * BLOCK_N, col], v_ready.index(slot), v_bufs.index(slot))

    @gluon.jit
    def _softmax(s, m_i, l_i, rows, cols, qk_scale, MASK: gl.constexpr):
        """The online softmax of one tile of raw products ``s = q.k``, base 2: ``(p, m, l, alpha)``."""
        if MASK:  # the diagonal block: key after query -> no weight
            s = gl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _step(j, q, acc, p, m_i, l_i, rows, bufs, bars, qk_scale, s_layout: gl.constexpr,
              o_layout: gl.constexpr, p_layout: gl.constexpr, MASK: gl.constexpr):  # fmt: skip
        """Key block ``j``: its scores' product, the previous block's ``P V`` behind it, then block
        ``j``'s softmax while that product runs."""
        q_smem, k_bufs, v_bufs = bufs
        q_ready, k_ready, k_free, v_ready, v_free = bars
        NBUF: gl.constexpr = k_bufs.type.shape[0]
        slot = j % NBUF
        prev = (j - 1) % NBUF
        mbarrier.wait(k_ready.index(slot), (j // NBUF) & 1)
        s = warpgroup_mma(q, k_bufs.index(slot).permute((1, 0)), gl.zeros([64, BLOCK_N], gl.float32, s_layout),
                          use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // NBUF) & 1)
        acc = warpgroup_mma(p, v_bufs.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s, ))  # products complete in order: S_j is done, P V may run on
        mbarrier.arrive(k_free.index(slot), count=1)
        cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        p_new, m_i, l_i, alpha = _softmax(s, m_i, l_i, rows, cols, qk_scale, MASK)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(v_free.index(prev), count=1)
        # To block j's reference point, before its P V is added (the scores' rows and the
        # accumulator's are held by the same threads: the conversion moves nothing).
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p = gl.convert_layout(p_new.to(q.dtype), p_layout)
        return acc, p, m_i, l_i

    @gluon.jit
    def _consumer(half: gl.constexpr, bufs, bars, O, LSE, L, H, stride_ol, qk_scale, CAUSAL: gl.constexpr):
        """One warp group: 64 query rows against every key block, two products in flight."""
        q_smem, k_bufs, v_bufs = bufs
        q_ready, k_ready, k_free, v_ready, v_free = bars
        NBUF: gl.constexpr = k_bufs.type.shape[0]
        D: gl.constexpr = q_smem.type.shape[2]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        start_m, row0, col = _program(L, H, D, CAUSAL)
        n = _num_blocks(start_m, L, CAUSAL)
        rows = start_m * BLOCK_M + half * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
        q = q_smem.index(half)
        mbarrier.wait(q_ready.index(half), 0)

        # Block 0: scores and softmax, nothing to overlap yet. Causal, it is masked: it is the
        # diagonal of the first query block, and for the others the mask keeps every key.
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q, k_bufs.index(0).permute((1, 0)), gl.zeros([64, BLOCK_N], gl.float32, s_layout),
                          use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        mbarrier.arrive(k_free.index(0), count=1)
        m_i = gl.full([64], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([64], gl.float32, layout=gl.SliceLayout(1, s_layout))
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        p, m_i, l_i, alpha = _softmax(s, m_i, l_i, rows, cols, qk_scale, CAUSAL)
        p = gl.convert_layout(p.to(q.dtype), p_layout)
        acc = gl.zeros([64, D], gl.float32, o_layout)

        if CAUSAL:
            unmasked_end = gl.maximum(n - 1, 1)
        else:
            unmasked_end = n
        for j in range(1, unmasked_end):
            acc, p, m_i, l_i = _step(j, q, acc, p, m_i, l_i, rows, bufs, bars, qk_scale,
                                     s_layout, o_layout, p_layout, False)
        for j in range(unmasked_end, n):  # causal: the diagonal block (none when n == 1)
            acc, p, m_i, l_i = _step(j, q, acc, p, m_i, l_i, rows, bufs, bars, qk_scale,
                                     s_layout, o_layout, p_layout, True)

        last = (n - 1) % NBUF
        mbarrier.wait(v_ready.index(last), ((n - 1) // NBUF) & 1)
        acc = warpgroup_mma(p, v_bufs.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(v_free.index(last), count=1)

        # o = acc / l, and the log-sum-exp in natural units (every row saw its own key: l >= 1).
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        o = (acc / l_o[:, None]).to(O.dtype.element_ty)
        rows_o = start_m * BLOCK_M + half * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, o_layout))
        cols_o = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        offs = (row0 + rows_o).to(gl.int64)[:, None] * stride_ol + (col + cols_o)[None, :]
        gl.store(O + offs, o)
        bh = gl.program_id(1)
        gl.store(LSE + bh.to(gl.int64) * L + rows, (m_i + gl.log2(l_i)) * 0.6931471805599453)

    @gluon.jit
    def _attn_fwd_ws(q_desc, k_desc, v_desc, O, LSE, L, H, stride_ol, qk_scale, CAUSAL: gl.constexpr,
                     NBUF: gl.constexpr):  # fmt: skip
        dtype: gl.constexpr = q_desc.dtype
        D: gl.constexpr = q_desc.block_type.shape[1]
        q_smem = gl.allocate_shared_memory(dtype, [2, 64, D], q_desc.layout)
        k_bufs = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_N, D], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [NBUF, BLOCK_N, D], v_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
        k_free = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
        v_free = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_ready.index(i), count=1)
        for i in gl.static_range(NBUF):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_free.index(i), count=2)  # both consumers
            mbarrier.init(v_free.index(i), count=2)
        fence_async_shared()
        bufs = (q_smem, k_bufs, v_bufs)
        bars = (q_ready, k_ready, k_free, v_ready, v_free)
        gl.warp_specialize([
            (_consumer, (0, bufs, bars, O, LSE, L, H, stride_ol, qk_scale, CAUSAL)),
            (_consumer, (1, bufs, bars, O, LSE, L, H, stride_ol, qk_scale, CAUSAL)),
            (_loader, (q_desc, k_desc, v_desc, bufs, bars, L, H, CAUSAL)),
        ], [4, 1], [CONSUMER_REGISTERS, LOADER_REGISTERS])  # fmt: skip


def forward(q, k, v, causal: bool, scale: float, num_buffers: int = NUM_BUFFERS):
    """``(o, lse)`` as :func:`seqbook.kernels.attention._forward` returns them, on an sm_90 GPU
    (:func:`applies`)."""
    problem = unsupported(q, k, v)
    if problem:
        raise ValueError(f"attention_hopper.forward: {problem}")
    B, L, H, d = q.shape
    gdtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    # Each (batch, head)'s rows are a (L, d) block of the (B L, H d) view: row b L + l, column h d.
    q_layout = gl.NVMMASharedLayout.get_default_for([64, d], gdtype)
    kv_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N.value, d], gdtype)
    q_desc = TensorDescriptor.from_tensor(q.view(B * L, H * d), [64, d], q_layout)
    k_desc = TensorDescriptor.from_tensor(k.view(B * L, H * d), [BLOCK_N.value, d], kv_layout)
    v_desc = TensorDescriptor.from_tensor(v.view(B * L, H * d), [BLOCK_N.value, d], kv_layout)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    grid = (L // BLOCK_M.value, B * H)
    _attn_fwd_ws[grid](
        q_desc, k_desc, v_desc, o, lse, L, H, H * d, scale * LOG2E,
        CAUSAL=causal, NBUF=num_buffers, num_warps=4, maxnreg=MAX_REGISTERS,
    )  # fmt: skip
    return o, lse
