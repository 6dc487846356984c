r"""Triton kernel: the diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t``, forward and backward.

The readable forms are in :mod:`seqbook.scan` (glossary and shapes there); this module
has the same signature, ``linear_recurrence(a, b, h0=None) -> (h, h_last)``, behind a
:class:`torch.autograd.Function`.

What bounds it
--------------
Two FLOPs per element against twelve bytes (float32: read ``a_t`` and ``b_t``, write
``h_t``): the scan is bound by memory. At ``B=4, L=4096, D=2048`` the forward must move
403 MB, 0.134 ms at the H100's 3.0 TB/s; that time is the floor, and the kernel is
judged by the fraction of it that it reaches. Measured there (Triton 3.6, CUDA-graph
replays, benchmarks/results/, with the 64x64 tiles of four warps used then): forward
0.145 ms, 92% of the floor; forward and backward 0.394 ms, 91% of theirs (1.07 GB). On the
H200 (4.23 TB/s) those tiles stayed at the same speed, 70% and 67%; the smaller tiles of
:data:`CONFIGS` reach 0.109 ms, 88%, and 0.277 ms, 92%
(2026-12-03-h200-stop25-scan.json).

Where the parallelism comes from
--------------------------------
Channels are independent, and the ``B * D`` channel columns are split into blocks of
``BLOCK_D``, one block per program. Along time, a program walks its column block in
tiles of ``CHUNK`` steps, and inside a tile the steps are combined by a parallel scan
over the threads, ``tl.associative_scan`` with the combine of
:func:`seqbook.scan.linear_recurrence_parallel`:

.. math::

    (a_1, b_1) \circ (a_2, b_2) = (a_1 a_2,\ a_2 b_1 + b_2).

The scan of a tile gives, for each step ``t`` in it, the composite map of the tile's
steps up to ``t``, :math:`h \mapsto A_t h + B_t`; applied to the state that entered
the tile it gives every state at once, :math:`h_t = A_t h_{in} + B_t`, and the tile's
last state enters the next tile. So a program does ``L / CHUNK`` dependent rounds
instead of ``L``, and each round loads a whole ``CHUNK x BLOCK_D`` tile: many bytes
in flight, which is what a memory-bound kernel needs. (A kernel that steps through
time one row at a time, with one program per column block, keeps only one row in
flight per program and reaches 8% of the bandwidth: shared/GPU.md.)

This reads each input once and writes each output once, the floor's bytes, as long as
there are enough column blocks to fill the GPU. When there are not (a small batch and
few channels: the ``B * D / BLOCK_D`` programs bring fewer than 1.5 warps per
multiprocessor), time is cut into ``S`` *segments* too, in three passes (the classic way
to scan more elements than there are processors; Blelloch 1990):

1. each segment is scanned from a zero state, keeping only its composite map
   ``(A_seg, B_seg)`` (the product of its decays and its final state from zero);
2. the segments' maps are chained: the state after segment ``k`` is
   :math:`S_k = A_{seg,k} S_{k-1} + B_{seg,k}`, itself a linear recurrence, of
   length ``S``: this very kernel, called once more;
3. each segment is scanned again from its true entering state :math:`S_{k-1}`,
   writing ``h``.

Passes 1 and 3 both read ``a`` and ``b``: 5/3 of the floor's bytes, worth it only
when the GPU would otherwise be mostly idle.

Backward: a reverse linear recurrence
-------------------------------------
Let :math:`g_t = \partial\mathcal L/\partial h_t` be the gradient arriving at the output
``h`` (and :math:`g_{last}` the one at ``h_last = h_{L-1}``). The state :math:`h_t`
influences the loss directly, through :math:`g_t`, and through every later state via
:math:`h_{t+1} = a_{t+1} h_t + b_{t+1}`, so its total gradient
:math:`\delta_t = d\mathcal L/dh_t` obeys

.. math::

    \delta_t = g_t + a_{t+1}\, \delta_{t+1}, \qquad \delta_{L-1} = g_{L-1} + g_{last},

the same recurrence run backwards in time, with the decays shifted by one step
(:math:`a_{t+1}`, and :math:`a_L := 1`). From :math:`\delta` the parameter gradients
are local:

.. math::

    \frac{\partial\mathcal L}{\partial b_t} = \delta_t, \qquad
    \frac{\partial\mathcal L}{\partial a_t} = \delta_t\, h_{t-1}, \qquad
    \frac{\partial\mathcal L}{\partial h_0} = a_0\, \delta_0

(with :math:`h_{-1} = h_0`; counting steps from 1 instead, with :math:`h_0` the initial
state, the last one reads :math:`dh_0 = a_1\, dh_1`). So the
backward kernel is the forward kernel read backwards: it loads each tile with its rows
in reverse time order, so that the same forward ``tl.associative_scan`` runs from the
end of the sequence to the start. It reads ``a`` (shifted), ``g`` and ``h`` (saved by
the forward; shifted) and writes ``da`` and ``db``: five arrays, against the forward's
three.

Precision: every load is converted to float32 and the scan runs in float32; outputs are
stored in the input dtype (float32, bfloat16 or float16).

Portability: only Triton features present in 3.6 (the H100's) and 3.9 (the CPU
interpreter's) are used; ``tl.associative_scan`` with a two-tensor combine, ``tl.range``.
Under the interpreter the scan runs element by element in Python, so tests there keep
tiles small.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _combine(a_left, b_left, a_right, b_right):
    # Step(s) "left" and then step(s) "right": h -> a_right * (a_left * h + b_left) + b_right.
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def _last_row(x, CHUNK: tl.constexpr):
    """Row ``CHUNK - 1`` of a ``(CHUNK, BLOCK_D)`` tile. Triton has no indexing into a
    tile, so select that row and sum over rows: adding zeros is exact."""
    rows = tl.arange(0, CHUNK)
    return tl.sum(tl.where((rows == CHUNK - 1)[:, None], x, 0.0), axis=0)


@triton.jit
def _scan_fwd(
    A,  # (B, L, D) decays a_t
    X,  # (B, L, D) inputs b_t (named X so that B keeps meaning the batch size)
    H0,  # (B, S, D) state entering each segment (read if HAS_H0)
    H,  # (B, L, D) output: the states h_t (written if WRITE_H)
    H_END,  # (B, S, D) output: the state at the end of each segment
    A_END,  # (B, S, D) output: the product of the segment's decays (written if WRITE_A_END)
    L,
    D,
    SEG_LEN,  # steps per segment (a multiple of CHUNK, or L when S = 1)
    HAS_H0: tl.constexpr,
    WRITE_H: tl.constexpr,
    WRITE_A_END: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # Program (column block, segment): the channels d of batch element `batch`,
    # for the steps t_begin <= t < t_end.
    n_dblocks = tl.cdiv(D, BLOCK_D)
    batch = tl.program_id(0) // n_dblocks
    d = (tl.program_id(0) % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    seg = tl.program_id(1)
    t_begin = seg * SEG_LEN
    t_end = tl.minimum(t_begin + SEG_LEN, L)
    rows = tl.arange(0, CHUNK)
    base = batch.to(tl.int64) * L * D  # int64: B * L * D may pass 2^31
    seg_offs = (batch.to(tl.int64) * tl.num_programs(1) + seg) * D + d

    # The state entering the segment, in float32 whatever the input dtype.
    if HAS_H0:
        h = tl.load(H0 + seg_offs, mask=d_ok, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D,), dtype=tl.float32)
    a_prod = tl.full((BLOCK_D,), 1.0, dtype=tl.float32)

    # num_stages > 1 asks Triton to prefetch the next tiles while this one is scanned.
    for t0 in tl.range(t_begin, t_end, CHUNK, num_stages=NUM_STAGES):
        t = t0 + rows
        offs = base + t.to(tl.int64)[:, None] * D + d[None, :]
        mask = (t < t_end)[:, None] & d_ok[None, :]
        # Rows past the end load the identity step (a, b) = (1, 0): they leave the
        # carried state unchanged, so the tile's last row is the state after its last real step.
        a = tl.load(A + offs, mask=mask, other=1.0).to(tl.float32)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        # (A_t, B_t): the tile's steps up to t composed, for every t at once.
        a_cum, x_cum = tl.associative_scan((a, x), axis=0, combine_fn=_combine)
        h_t = a_cum * h[None, :] + x_cum
        if WRITE_H:
            tl.store(H + offs, h_t.to(H.dtype.element_ty), mask=mask)
        h = _last_row(h_t, CHUNK)
        if WRITE_A_END:
            a_prod *= _last_row(a_cum, CHUNK)

    tl.store(H_END + seg_offs, h.to(H_END.dtype.element_ty), mask=d_ok)
    if WRITE_A_END:
        tl.store(A_END + seg_offs, a_prod, mask=d_ok)


@triton.jit
def _scan_bwd(
    A,  # (B, L, D) decays a_t
    H,  # (B, L, D) the forward's states h_t (read if WRITE_GRADS)
    H0,  # (B, D) the initial state h_{-1} (read if HAS_H0 and WRITE_GRADS)
    G,  # (B, L, D) g_t = dLoss/dh_t
    C_IN,  # (B, S, D) gradient entering each segment from its right, delta_{t_end} (read if HAS_C_IN)
    DA,  # (B, L, D) output: dLoss/da_t = delta_t h_{t-1} (written if WRITE_GRADS)
    DX,  # (B, L, D) output: dLoss/db_t = delta_t (written if WRITE_GRADS)
    DELTA_START,  # (B, S, D) output: delta at the first step of each segment
    P_OUT,  # (B, S, D) output: the product of the segment's shifted decays (written if WRITE_P)
    DH0,  # (B, D) output: dLoss/dh0 = a_0 delta_0, by the program holding t = 0 (written if WRITE_DH0)
    L,
    D,
    SEG_LEN,
    HAS_H0: tl.constexpr,
    HAS_C_IN: tl.constexpr,
    WRITE_GRADS: tl.constexpr,
    WRITE_P: tl.constexpr,
    WRITE_DH0: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    n_dblocks = tl.cdiv(D, BLOCK_D)
    batch = tl.program_id(0) // n_dblocks
    d = (tl.program_id(0) % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    seg = tl.program_id(1)
    t_begin = seg * SEG_LEN
    t_end = tl.minimum(t_begin + SEG_LEN, L)
    rows = tl.arange(0, CHUNK)
    base = batch.to(tl.int64) * L * D
    seg_offs = (batch.to(tl.int64) * tl.num_programs(1) + seg) * D + d

    # delta_{t_end}: what flows into the segment from the steps after it (g_last for the last one).
    if HAS_C_IN:
        delta = tl.load(C_IN + seg_offs, mask=d_ok, other=0.0).to(tl.float32)
    else:
        delta = tl.zeros((BLOCK_D,), dtype=tl.float32)
    p_prod = tl.full((BLOCK_D,), 1.0, dtype=tl.float32)
    if HAS_H0 and WRITE_GRADS:
        h_init = tl.load(H0 + batch.to(tl.int64) * D + d, mask=d_ok, other=0.0).to(tl.float32)

    for k in tl.range(0, tl.cdiv(t_end - t_begin, CHUNK), num_stages=NUM_STAGES):
        # Row i of the tile is step t = (last step of the tile) - i: time runs backwards down
        # the tile, so a forward scan over the rows is the reverse recurrence.
        t = t_end - 1 - k * CHUNK - rows
        valid = (t >= t_begin)[:, None] & d_ok[None, :]
        offs = base + t.to(tl.int64)[:, None] * D + d[None, :]
        # a_{t+1} carries delta_{t+1} back to delta_t; past the last step there is nothing
        # (a_L := 1), and rows before the segment are identity steps (1, 0).
        a_next = tl.load(A + offs + D, mask=valid & (t + 1 < L)[:, None], other=1.0).to(tl.float32)
        g = tl.load(G + offs, mask=valid, other=0.0).to(tl.float32)
        a_cum, g_cum = tl.associative_scan((a_next, g), axis=0, combine_fn=_combine)
        delta_t = a_cum * delta[None, :] + g_cum
        if WRITE_GRADS:
            # h_{t-1}, the state that a_t multiplied; h_{-1} = h0 (zeros when not given).
            h_prev = tl.load(H + offs - D, mask=valid & (t >= 1)[:, None], other=0.0).to(tl.float32)
            if HAS_H0:
                h_prev = tl.where((t == 0)[:, None], h_init[None, :], h_prev)
            tl.store(DX + offs, delta_t.to(DX.dtype.element_ty), mask=valid)
            tl.store(DA + offs, (delta_t * h_prev).to(DA.dtype.element_ty), mask=valid)
        delta = _last_row(delta_t, CHUNK)
        if WRITE_P:
            p_prod *= _last_row(a_cum, CHUNK)

    tl.store(DELTA_START + seg_offs, delta, mask=d_ok)
    if WRITE_P:
        tl.store(P_OUT + seg_offs, p_prod, mask=d_ok)
    if WRITE_DH0:
        if seg == 0:  # delta is now delta_0, and h0 met the sequence through a_0
            a_0 = tl.load(A + base + d, mask=d_ok, other=0.0).to(tl.float32)
            tl.store(DH0 + batch.to(tl.int64) * D + d, (a_0 * delta).to(DH0.dtype.element_ty), mask=d_ok)


# --------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------

#: Tile and launch parameters of the compiled kernels, by direction and input element size
#: (bytes). Chosen on the H200 (Triton 3.6) at B=4, L=4096, D=2048 from a sweep of 168
#: configurations per kernel and dtype, then checked against the runners-up at seven shapes
#: (benchmarks/results/sweeps/2026-12-03-h200-stop25-scan-*.json). The float32 forward alone
#: takes 0.108 ms there, 88% of the floor at the copy bandwidth measured in the same run
#: (4.25 TB/s; the earlier 64x64 tiles of four warps: 0.136 ms, 70%), the backward 0.175 ms,
#: 91% (0.201 ms); bfloat16 0.099 and 0.122 ms (0.110 and 0.139). Where they lose: at L = 32768
#: the 128x32 tiles of four warps are 8 to 10% faster on the forward (3% slower at the target),
#: and at B=2, L=2048, D=512 the float32 backward takes 1.22 times as long (eight short
#: segments). Our reading: with the 64x64 tiles each multiprocessor held one program (128
#: programs for 132), which stalls as a whole at every barrier of the in-tile scan; eight warps
#: per program made it slower (0.205 ms), more programs per multiprocessor faster (64x32 tiles,
#: four warps, two programs: 0.122 ms), and programs of one warp, which scan a tile with warp
#: shuffles alone and no barrier, fastest (four per multiprocessor). NUM_STAGES > 1 lets the
#: compiler load the next tiles while this one is scanned (asynchronous copies into shared
#: memory).
CONFIGS = {
    ("fwd", 4): dict(CHUNK=32, BLOCK_D=16, NUM_STAGES=4, num_warps=1),
    ("bwd", 4): dict(CHUNK=32, BLOCK_D=32, NUM_STAGES=4, num_warps=2),
    ("fwd", 2): dict(CHUNK=64, BLOCK_D=16, NUM_STAGES=4, num_warps=1),
    ("bwd", 2): dict(CHUNK=128, BLOCK_D=32, NUM_STAGES=3, num_warps=4),
}


def config_for(dtype: torch.dtype, kind: str) -> dict:
    """The launch configuration of the ``kind`` ("fwd" or "bwd") kernel for inputs of ``dtype``."""
    return CONFIGS[(kind, dtype.itemsize)]


def _fit(config: dict, L: int, D: int) -> dict:
    """Shrink the tile to the problem: no point scanning 64 steps of padding for L = 7.
    (Under the interpreter each padded element costs as much as a real one.)"""
    cfg = dict(config)
    cfg["CHUNK"] = max(16, min(cfg["CHUNK"], triton.next_power_of_2(max(L, 1))))
    cfg["BLOCK_D"] = max(4, min(cfg["BLOCK_D"], triton.next_power_of_2(max(D, 1))))
    return cfg


def choose_segments(batch: int, L: int, D: int, cfg: dict, device: torch.device) -> int:
    """How many segments to cut time into (1 = a single pass; see the module docstring).

    A single pass moves the fewest bytes; three passes move 5/3 of them but give
    ``S`` times more programs. Split only when the column blocks alone would give the
    GPU fewer than 1.5 warps per multiprocessor, into enough segments for about eight
    (two programs of four warps, or eight of one), each segment at least 8 tiles long.
    Counted in warps, not programs, because the configurations differ in warps per program.
    On 132 multiprocessors, with :data:`CONFIGS`, that splits when ``B * D < 3168``
    (``1584`` for the bfloat16 backward). Measured on the H200 at B=1 (eager calls,
    benchmarks/results/sweeps/2026-12-03-h200-stop25-scan-segments.json), float32: at
    D=4096 (1.9 warps per multiprocessor) one pass beat every split forward, 0.164 against
    0.20 ms or more at L=8192 and 0.635 against 0.79 or more at L=32768; at D=2048 (one warp
    per multiprocessor) five segments won, 0.111 against 0.159 ms. At B=1, L=65536, D=256 the
    rule gives 66 segments: 0.224 ms against 1.22 in one pass.
    """
    if device.type != "cuda":
        return 1
    warps = batch * triton.cdiv(D, cfg["BLOCK_D"]) * cfg["num_warps"]
    sms = _multiprocessors(device.index)
    if 2 * warps >= 3 * sms:
        return 1
    longest = triton.cdiv(L, 8 * cfg["CHUNK"])
    return max(1, min(triton.cdiv(8 * sms, warps), longest))


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _segment_length(L: int, segments: int, chunk: int) -> int:
    """Steps per segment: a whole number of tiles, so that no tile straddles two segments."""
    return triton.cdiv(triton.cdiv(L, segments), chunk) * chunk


def _launch_fwd(a, x, h0, h, h_end, a_end, seg_len, segments, cfg, write_h=True):
    batch, L, D = a.shape
    grid = (batch * triton.cdiv(D, cfg["BLOCK_D"]), segments)
    return _scan_fwd[grid](
        a, x, h0 if h0 is not None else a, h if h is not None else a, h_end, a_end if a_end is not None else h_end,
        L, D, seg_len,
        HAS_H0=h0 is not None, WRITE_H=write_h, WRITE_A_END=a_end is not None, **cfg,
    )  # fmt: skip


def _forward(a, x, h0, out_dtype, segments=None, config=None):
    """States and final state of the recurrence on contiguous ``(B, L, D)`` inputs."""
    batch, L, D = a.shape
    cfg = _fit(config or config_for(a.dtype, "fwd"), L, D)
    S = segments or choose_segments(batch, L, D, cfg, a.device)
    S = min(S, triton.cdiv(L, cfg["CHUNK"]))  # no empty segments
    h = torch.empty(batch, L, D, dtype=out_dtype, device=a.device)
    if S == 1:
        h_last = torch.empty(batch, D, dtype=out_dtype, device=a.device)
        _launch_fwd(a, x, h0, h, h_last, None, L, 1, cfg)
        return h, h_last
    seg_len = _segment_length(L, S, cfg["CHUNK"])
    S = triton.cdiv(L, seg_len)
    f32 = dict(dtype=torch.float32, device=a.device)
    # 1. Each segment's map from a zero state: (A_seg, B_seg).
    A_seg, B_seg = torch.empty(batch, S, D, **f32), torch.empty(batch, S, D, **f32)
    _launch_fwd(a, x, None, None, B_seg, A_seg, seg_len, S, cfg, write_h=False)
    # 2. Chain them: S_k = A_seg,k S_{k-1} + B_seg,k, a recurrence of length S (one pass).
    ends, h_last = _forward(A_seg, B_seg, h0, torch.float32, segments=1, config=config)
    # 3. Rescan each segment from the state that really enters it.
    first = h0.to(torch.float32)[:, None] if h0 is not None else torch.zeros(batch, 1, D, **f32)
    entering = torch.cat([first, ends[:, :-1]], dim=1).contiguous()
    _launch_fwd(a, x, entering, h, B_seg, None, seg_len, S, cfg)
    return h, h_last.to(out_dtype)


def _launch_bwd(a, h, h0, g, c_in, da, dx, delta_start, p_out, seg_len, segments, cfg, write_grads=True, dh0=None):
    batch, L, D = a.shape
    grid = (batch * triton.cdiv(D, cfg["BLOCK_D"]), segments)
    return _scan_bwd[grid](
        a, h, h0 if h0 is not None else a, g, c_in if c_in is not None else a,
        da if da is not None else a, dx if dx is not None else a, delta_start,
        p_out if p_out is not None else delta_start, dh0 if dh0 is not None else delta_start,
        L, D, seg_len,
        HAS_H0=h0 is not None, HAS_C_IN=c_in is not None, WRITE_GRADS=write_grads, WRITE_P=p_out is not None,
        WRITE_DH0=dh0 is not None, **cfg,
    )  # fmt: skip


def _backward(a, h, h0, g, g_last, want_dh0=False, segments=None, config=None):
    """``(da, db, dh0)`` from the output gradients ``g`` (and ``g_last``, or None);
    ``dh0`` is None unless ``want_dh0`` (and ``h0`` was given)."""
    batch, L, D = a.shape
    cfg = _fit(config or config_for(a.dtype, "bwd"), L, D)
    S = segments or choose_segments(batch, L, D, cfg, a.device)
    S = min(S, triton.cdiv(L, cfg["CHUNK"]))
    da = torch.empty_like(a)
    db = torch.empty_like(a)
    dh0 = torch.empty_like(h0) if want_dh0 and h0 is not None else None
    f32 = dict(dtype=torch.float32, device=a.device)
    if S == 1:
        delta_start = torch.empty(batch, 1, D, **f32)
        _launch_bwd(a, h, h0, g, g_last, da, db, delta_start, None, L, 1, cfg, dh0=dh0)
        return da, db, dh0
    seg_len = _segment_length(L, S, cfg["CHUNK"])
    S = triton.cdiv(L, seg_len)
    # 1. Each segment from a zero gradient at its end: delta at its start, and the
    #    product of its shifted decays.
    local, P = torch.empty(batch, S, D, **f32), torch.empty(batch, S, D, **f32)
    _launch_bwd(a, h, h0, g, None, None, None, local, P, seg_len, S, cfg, write_grads=False)
    # 2. Chain them backwards: delta_start,k = P_k c_k + local_k with c_k = delta_start,k+1
    #    and c_{S-1} = g_last: a forward recurrence over the segments in reverse order.
    c_last = g_last if g_last is not None else torch.zeros(batch, D, **f32)
    rev, _ = _forward(P.flip(1).contiguous(), local.flip(1).contiguous(), c_last, torch.float32, segments=1)
    starts = rev.flip(1)
    # 3. Rescan each segment with the gradient that really enters it from the right.
    c_in = torch.cat([starts[:, 1:], c_last.to(torch.float32)[:, None]], dim=1).contiguous()
    _launch_bwd(a, h, h0, g, c_in, da, db, local, None, seg_len, S, cfg, dh0=dh0)
    return da, db, dh0


class LinearRecurrence(torch.autograd.Function):
    """``(a, b, h0) -> (h, h_last)``; see the module docstring for the forward and backward."""

    @staticmethod
    def forward(ctx, a, b, h0, segments):
        h, h_last = _forward(a, b, h0, a.dtype, segments)
        ctx.save_for_backward(a, h, h0)
        ctx.segments = segments
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to read
        return h, h_last

    @staticmethod
    def backward(ctx, g, g_last):
        a, h, h0 = ctx.saved_tensors
        if g is None and g_last is None:
            return None, None, None, None
        g = torch.zeros_like(h) if g is None else g.contiguous()
        g_last = None if g_last is None else g_last.contiguous()
        da, db, dh0 = _backward(a, h, h0, g, g_last, want_dh0=ctx.needs_input_grad[2], segments=ctx.segments)
        return da, db, dh0, None


def linear_recurrence(a, b, h0=None, segments: int | None = None):
    """The kernel behind :func:`seqbook.scan.linear_recurrence` (``backend="triton"``).

    Inputs as validated there (float32, bfloat16 or float16, one device); non-contiguous
    ones are copied. ``segments`` forces the number of time segments (tests use it to
    run the three-pass path on small inputs); ``None`` chooses (:func:`choose_segments`).
    """
    a, b = a.contiguous(), b.contiguous()
    h0 = None if h0 is None else h0.contiguous()
    return LinearRecurrence.apply(a, b, h0, segments)
