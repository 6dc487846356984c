r"""Linear attention: softmax replaced by a feature map, and attention becomes a recurrence.

Causal softmax attention weighs value :math:`v_j` by :math:`e^{q_t\cdot k_j}` and has to keep
every key. Replace the exponential by a product of features, :math:`\phi(q_t)^\top\phi(k_j)`,
and the sum over the past factors (Katharopoulos et al. 2020, "Transformers are RNNs"):

.. math::

    o_t = \sum_{j \le t} (\phi(q_t)^\top \phi(k_j))\, v_j
        = \phi(q_t)^\top \underbrace{\sum_{j \le t} \phi(k_j)\, v_j^\top}_{S_t},
    \qquad S_t = S_{t-1} + \phi(k_t)\, v_t^\top.

The past is now a ``(d_k, d_v)`` matrix :math:`S_t`, whatever the length. With a scalar
decay per step and head, :math:`\gamma_t = e^{a_t} \in (0, 1]` (RetNet's fixed :math:`\gamma`,
Sun et al. 2023; a data-dependent :math:`\gamma_t` as in "simple GLA", the scalar-gate special
case of gated linear attention, and as in Mamba-2, whose decay is :math:`e^{\Delta_t A}` with
:math:`\Delta_t = \mathrm{softplus}(\cdot) > 0` and :math:`A < 0`), the state forgets geometrically.
GLA proper (Yang et al. 2024) gates with a *vector* :math:`\alpha_t \in (0, 1)^{d_k}`, one decay
per key channel, :math:`S_t = \mathrm{diag}(\alpha_t) S_{t-1} + k_t v_t^\top`: that is :func:`gla`
below, not this operation. Here:

.. math::

    S_t = \gamma_t\, S_{t-1} + k_t v_t^\top, \qquad o_t = s\, q_t^\top S_t.

The operation below takes ``q, k`` after the feature map (it is any of them); the mixer
:class:`LinearAttention` applies one.

Glossary (symbol -> shape)
--------------------------
::

    q, k        (batch, length, heads, d_k)   queries and keys (feature map already applied)
    v           (batch, length, heads, d_v)   values
    o           (batch, length, heads, d_v)   outputs
    log_decay   (batch, length, heads)        a_t = log gamma_t <= 0; None: no decay (a_t = 0)
    S           (batch, heads, d_k, d_v)      the state; initial_state S_{-1}, final_state S_{L-1}
    scale       float                         s, default 1/sqrt(d_k)
    chunk_size  int                           C, the chunked form's block of steps
    c_t         (batch, length, heads)        cumulative log-decay sum_{r <= t} a_r (inside a chunk)
    D           (batch, heads, length, length)  the decay mask, D_tj = exp(sum_{r=j+1}^t a_r), j <= t

Three forms of one map, ``(q, k, v, log_decay, initial_state, scale) -> (o, final_state)``:

- :func:`linear_attention_quadratic`: :math:`O = (s\,QK^\top \circ D)\,V`, attention with
  the softmax replaced by the decay mask; :math:`O(L^2 d)` work, parallel.
- :func:`linear_attention_recurrent`: the loop over :math:`t`, :math:`O(L\, d_k d_v)`,
  sequential; the loop is the lesson, so it stays a loop.
- :func:`linear_attention_chunked`: quadratic inside chunks of ``C`` steps, the recurrence
  between them: :math:`O(L C d + L d_k d_v)`, and only :math:`L / C` sequential steps.
- :mod:`seqbook.kernels.linear_attention`: the chunked form as a Triton kernel, forward
  and backward.

The public entry :func:`linear_attention` validates and picks one with ``backend``.

Further down: vector gates (:func:`gla`, GLA) and the delta rule (:func:`delta_rule`, DeltaNet),
each with readable forms and a Triton kernel, and the trainable mixers around the three
operations, :class:`LinearAttention`, :class:`GatedLinearAttention` and :class:`DeltaNet`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from . import backend as _backend
from .mamba import segsum
from .validate import check_range, check_shape

#: dtypes the readable forms accept.
REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: dtypes the Triton kernel accepts; it accumulates in float32 whatever the input.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: head dimensions (d_k and d_v) the Triton kernel accepts: tl.dot needs sides >= 16.
KERNEL_HEAD_DIMS = (16, 32, 64, 128)
#: chunk sizes the Triton kernel accepts (a power of two: a tile side). 128 is left out: with
#: float32 inputs and d = 128 its tiles need more shared memory than an H100/H200 block has.
KERNEL_CHUNK_SIZES = (16, 32, 64)


# --------------------------------------------------------------------------------------
# Feature maps and the decay mask
# --------------------------------------------------------------------------------------


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\phi(x) = \mathrm{elu}(x) + 1`, Katharopoulos et al.'s choice: positive (so that
    :math:`\phi(q)^\top\phi(k) > 0` is a valid unnormalized weight), smooth, and the identity
    plus one for :math:`x > 0`, so gradients flow."""
    return F.elu(x) + 1.0


def default_scale(d_k: int) -> float:
    r""":math:`1/\sqrt{d_k}`, as in softmax attention: keeps :math:`q \cdot k` of order one."""
    return 1.0 / math.sqrt(d_k)


def decay_mask(log_decay: torch.Tensor) -> torch.Tensor:
    r"""The decay mask :math:`D_{tj} = \prod_{r=j+1}^{t} \gamma_r = e^{\sum_{r=j+1}^t a_r}`
    for :math:`j \le t`, 0 above the diagonal: ``(batch, length, heads) -> (batch, heads, length, length)``.

    Each exponent is summed from its own terms (:func:`seqbook.mamba.segsum`), so it is
    :math:`\le 0` and accurate: no entry overflows, and an entry underflows only when the
    true decay is below float's range, where 0 is the right answer.
    """
    return torch.exp(segsum(log_decay.transpose(1, 2)))


def decay_mask_unstable(log_decay: torch.Tensor) -> torch.Tensor:
    r"""The same mask as a ratio of cumulative products, :math:`D_{tj} = P_t / P_j` with
    :math:`P_t = \prod_{r \le t} \gamma_r`: exact on paper. In float32 :math:`P_t` falls below
    :math:`10^{-45}` once :math:`\sum a_r < -103`, and then :math:`0/0` gives ``nan`` for
    every pair of late steps, however close they are."""
    P = torch.exp(torch.cumsum(log_decay.transpose(1, 2), dim=-1))  # (batch, heads, length)
    D = P[..., :, None] / P[..., None, :]
    L = log_decay.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=log_decay.device).tril()
    return D.masked_fill(~causal, 0.0)


# --------------------------------------------------------------------------------------
# Three readable forms
# --------------------------------------------------------------------------------------


def _prepare(q, log_decay, initial_state, scale):
    """Defaults shared by the readable forms: zero log-decays (no decay) and s = 1/sqrt(d_k);
    an initial state of None stays None (each form starts from zeros)."""
    B, L, H, d_k = q.shape
    if log_decay is None:
        log_decay = torch.zeros(B, L, H, dtype=q.dtype, device=q.device)
    scale = default_scale(d_k) if scale is None else scale
    return log_decay.to(q.dtype), initial_state, scale


def linear_attention_quadratic(q, k, v, log_decay=None, initial_state=None, scale=None):
    r"""The attention-like form, :math:`O = (s\,QK^\top \circ D)\,V` plus the initial state's share.

    .. math::

        o_t = s \sum_{j \le t} D_{tj}\, (q_t \cdot k_j)\, v_j
              \;+\; s\, e^{\sum_{r \le t} a_r}\, q_t^\top S_{-1},

    with :math:`D` from :func:`decay_mask` (all ones below the diagonal without decay: then
    this is causal softmax attention with :math:`e^{q\cdot k}` replaced by :math:`q \cdot k`
    and no normalization). Materializes ``(batch, heads, L, L)``: :math:`O(L^2 d)` work.
    Shapes as in the module glossary; returns ``(o, final_state)``.
    """
    log_decay, S0, scale = _prepare(q, log_decay, initial_state, scale)
    D = decay_mask(log_decay)  # (b, h, t, j)
    scores = torch.einsum("bthk,bjhk->bhtj", q, k)
    o = scale * torch.einsum("bhtj,bhtj,bjhv->bthv", scores, D, v)
    # The final state is the last row of the same matrix, before the query: sum_j D_{L-1,j} k_j v_j^T.
    last_row = D[:, :, -1] if q.shape[1] else D.new_zeros(D.shape[:3])  # (an empty sequence: no row)
    S = torch.einsum("bhj,bjhk,bjhv->bhkv", last_row, k, v)
    if S0 is not None:
        total = torch.cumsum(log_decay, dim=1)  # (b, t, h): the decay from before step 0 to step t
        o = o + scale * torch.einsum("bth,bthk,bhkv->bthv", torch.exp(total), q, S0.to(q.dtype))
        S = S + torch.exp(log_decay.sum(dim=1))[..., None, None] * S0.to(q.dtype)
    return o, S


def linear_attention_recurrent(q, k, v, log_decay=None, initial_state=None, scale=None):
    r"""The recurrence, one step at a time: :math:`S_t = \gamma_t S_{t-1} + k_t v_t^\top`,
    :math:`o_t = s\, q_t^\top S_t`.

    :math:`O(d_k d_v)` work and memory per step, whatever the length: what decoding needs.
    :math:`L` sequential steps, though, each a rank-one update too small to keep a GPU busy.
    Shapes as in the module glossary; returns ``(o, final_state)``.
    """
    log_decay, S0, scale = _prepare(q, log_decay, initial_state, scale)
    B, L, H, d_k = q.shape
    S = torch.zeros(B, H, d_k, v.shape[-1], dtype=q.dtype, device=q.device) if S0 is None else S0.to(q.dtype)
    o = []
    for t in range(L):
        o_t, S = recurrent_step(q[:, t], k[:, t], v[:, t], S, log_decay[:, t], scale)
        o.append(o_t)
    o = torch.stack(o, dim=1) if o else v.new_zeros(v.shape)
    return o, S


def recurrent_step(q_t, k_t, v_t, S, log_decay_t=None, scale=None):
    r"""One step: ``q_t, k_t (batch, heads, d_k)``, ``v_t (batch, heads, d_v)``, ``S (batch, heads, d_k, d_v)``,
    ``log_decay_t (batch, heads)`` or None -> ``(o_t (batch, heads, d_v), S')``.

    .. math:: S' = e^{a_t} S + k_t v_t^\top, \qquad o_t = s\, q_t^\top S'.
    """
    scale = default_scale(q_t.shape[-1]) if scale is None else scale
    if log_decay_t is not None:
        S = torch.exp(log_decay_t)[..., None, None] * S
    S = S + torch.einsum("bhk,bhv->bhkv", k_t, v_t)
    return scale * torch.einsum("bhk,bhkv->bhv", q_t, S), S


def linear_attention_chunked(q, k, v, log_decay=None, initial_state=None, scale=None, chunk_size=64):
    r"""The chunked form: quadratic inside chunks of ``C = chunk_size`` steps, recurrent between them.

    For the chunk of steps :math:`t_0 \dots t_0 + C - 1`, with the state :math:`S` that
    enters it and :math:`c_t = \sum_{r=t_0}^{t} a_r` the log-decay accumulated inside the
    chunk (at most ``C`` terms: it stays small and accurate, however long the sequence):

    1. **intra-chunk**, the chunk's own tokens: :math:`(s\,Q K^\top \circ D)\,V` on ``C``
       steps, with :math:`D_{tj} = e^{c_t - c_j}` for :math:`j \le t`;
    2. **inter-chunk**, what the past contributes: :math:`s\, e^{c_t}\, q_t^\top S`;
    3. **state passing**: :math:`S \leftarrow e^{c_{\text{last}}} S + \sum_j e^{c_{\text{last}} - c_j} k_j v_j^\top`.

    Every exponent is :math:`\le 0`. Work :math:`O(L C d)` for step 1 and :math:`O(L d_k d_v)`
    for steps 2 and 3, all matrix products; only the loop over :math:`L / C` chunks is
    sequential. ``C = 1`` is the recurrence, ``C = L`` the quadratic form. Lengths need not
    be multiples of ``C`` (the last chunk is shorter). Returns ``(o, final_state)``.
    """
    log_decay, S0, scale = _prepare(q, log_decay, initial_state, scale)
    B, L, H, d_k = q.shape
    S = torch.zeros(B, H, d_k, v.shape[-1], dtype=q.dtype, device=q.device) if S0 is None else S0.to(q.dtype)
    o = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    for t0 in range(0, L, chunk_size):
        qc, kc, vc = q[:, t0 : t0 + chunk_size], k[:, t0 : t0 + chunk_size], v[:, t0 : t0 + chunk_size]
        c = torch.cumsum(log_decay[:, t0 : t0 + chunk_size], dim=1).transpose(1, 2)  # (b, h, C)
        n = c.shape[-1]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        D = torch.exp((c[..., :, None] - c[..., None, :]).masked_fill(~causal, -math.inf))  # (b, h, t, j)
        # 1. intra-chunk
        scores = torch.einsum("bthk,bjhk->bhtj", qc, kc)
        oc = scale * torch.einsum("bhtj,bhtj,bjhv->bthv", scores, D, vc)
        # 2. inter-chunk: the state entering the chunk, decayed to step t
        oc = oc + scale * torch.einsum("bht,bthk,bhkv->bthv", torch.exp(c), qc, S)
        o[:, t0 : t0 + n] = oc
        # 3. state passing: decay the old state across the chunk, add the chunk's keys and values
        to_end = torch.exp(c[..., -1:] - c)  # (b, h, j): from step j to the chunk's end
        S = torch.exp(c[..., -1])[..., None, None] * S + torch.einsum("bhj,bjhk,bjhv->bhkv", to_end, kc, vc)
    return o, S


def normalizer(q, k, log_decay=None, eps: float = 1e-6):
    r"""The denominator of normalized linear attention, ``(batch, length, heads)``:
    :math:`q_t^\top z_t + \varepsilon` with :math:`z_t = \gamma_t z_{t-1} + k_t`.

    Linear attention with the values replaced by ones (then :math:`S_t = z_t`, one column),
    so it reuses :func:`linear_attention_chunked` with ``scale = 1``. With positive features
    the sum of the weights :math:`\sum_{j\le t} D_{tj}\,\phi(q_t)^\top\phi(k_j)` is positive,
    and dividing by it makes each output a weighted average of values, as the softmax does.
    """
    ones = torch.ones(*k.shape[:-1], 1, dtype=k.dtype, device=k.device)
    z, _ = linear_attention_chunked(q, k, ones, log_decay, None, 1.0)
    return z[..., 0] + eps


# --------------------------------------------------------------------------------------
# The public entry
# --------------------------------------------------------------------------------------


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = 64,
    return_final_state: bool = False,
    backend: str = "auto",
):
    r"""Causal linear attention with optional decay, :math:`S_t = e^{a_t} S_{t-1} + k_t v_t^\top`,
    :math:`o_t = s\, q_t^\top S_t`, per batch element and head.

    Args:
        q, k: ``(batch, length, heads, d_k)``, the features (apply the feature map first).
        v: ``(batch, length, heads, d_v)``; one dtype and device for all.
        log_decay: ``(batch, length, heads)``, :math:`a_t = \log\gamma_t \le 0` (any float
            dtype; used in float32 or better), or None for no decay.
        initial_state: ``(batch, heads, d_k, d_v)``, :math:`S_{-1}`, or None (zeros).
        scale: ``s``, a positive number; default :math:`1/\sqrt{d_k}`.
        chunk_size: ``C`` of the chunked form (a positive int); it changes how the work is
            cut, not the result. The kernel takes powers of two in ``KERNEL_CHUNK_SIZES``.
        return_final_state: also return :math:`S_{L-1}`.
        backend: ``"reference"`` (:func:`linear_attention_chunked`), ``"triton"``
            (:mod:`seqbook.kernels.linear_attention`: float32, float16, bfloat16 on CUDA;
            ``d_k, d_v`` in ``KERNEL_HEAD_DIMS``), or ``"auto"``: the kernel for CUDA
            tensors it supports, the reference otherwise.

    Returns:
        ``o (batch, length, heads, d_v)`` in the inputs' dtype, and with
        ``return_final_state`` the pair ``(o, final_state)``; the final state is float64
        for float64 inputs and float32 otherwise (the accumulator's dtype, in both backends).
        Differentiable in every tensor argument.

    Mismatched shapes, dtypes or devices and bad arguments raise ``ValueError``/``TypeError``
    naming the argument.
    """
    scale = _check_inputs(q, k, v, log_decay, initial_state, scale, chunk_size)
    tensors = [t for t in (q, k, v, log_decay, initial_state) if t is not None]
    chosen = _backend.resolve(backend, *tensors)
    if chosen == "triton":
        refusal = _kernel_refuses(q, v, chunk_size)
        if refusal and backend == "auto":
            chosen = "reference"
        elif refusal:
            error, why = refusal
            raise error(f"linear_attention(backend='triton'): {why}; use backend='reference' for it")
    if chosen == "triton" and (q.numel() == 0 or v.numel() == 0):
        chosen = "reference"  # nothing to launch
    if chosen == "reference":
        # 16-bit inputs are computed in float32, as the kernel accumulates: a float16 state
        # summing thousands of rank-one updates would keep three digits.
        work = torch.promote_types(q.dtype, torch.float32)
        o, S = linear_attention_chunked(q.to(work), k.to(work), v.to(work),
                                        None if log_decay is None else log_decay.to(work),
                                        None if initial_state is None else initial_state.to(work),
                                        scale, chunk_size)  # fmt: skip
        o = o.to(q.dtype)
    else:
        o, S = _backend.kernels("linear_attention").linear_attention(q, k, v, log_decay, initial_state, scale,
                                                                     chunk_size)  # fmt: skip
    return (o, S) if return_final_state else o


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _kernel_refuses(q, v, chunk_size):
    """Why the kernel cannot take these inputs (the exception to raise, and the message), or None."""
    if q.dtype not in KERNEL_DTYPES:
        return TypeError, f"the kernel supports dtypes {_names(KERNEL_DTYPES)} (float32 accumulation), got {q.dtype}"
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        return TypeError, "the Triton interpreter cannot run bfloat16 (NumPy has no such type): use float32 or float16 on CPU"
    for name, d in (("d_k", q.shape[-1]), ("d_v", v.shape[-1])):
        if d not in KERNEL_HEAD_DIMS:
            return ValueError, f"the kernel supports head dims {name} in {KERNEL_HEAD_DIMS}, got {name} = {d}"
    if chunk_size not in KERNEL_CHUNK_SIZES:
        return ValueError, f"the kernel supports chunk_size in {KERNEL_CHUNK_SIZES}, got {chunk_size}"
    return None


def _check_inputs(q, k, v, log_decay, initial_state, scale, chunk_size) -> float:
    """Validate the public entry's arguments; return the scale to use."""
    where = "linear_attention"
    B, L, H = q.shape[:3] if isinstance(q, torch.Tensor) and q.dim() == 4 else (None,) * 3
    scale = _check_qkv(where, q, k, v, [("log_decay", log_decay, (B, L, H), "(batch, length, heads)")],
                       initial_state, scale, chunk_size)  # fmt: skip
    if log_decay is not None:
        check_range(where, "log_decay", log_decay, None, 0, "a decay gamma = exp(log_decay) in (0, 1]")
    return scale


# --------------------------------------------------------------------------------------
# The mixer
# --------------------------------------------------------------------------------------

FEATURE_MAPS = {"elu": elu_feature_map, "identity": lambda x: x}
DECAYS = (None, "fixed", "gated")


def retnet_decays(n_heads: int) -> torch.Tensor:
    r"""Fixed decays, one per head, ``(n_heads,)`` float64, spanning RetNet's range.

    Sun et al. (2023, Sec. 2.2) give head :math:`h` of 8 the decay :math:`\gamma_h = 1 - 2^{-5-h}`:
    from :math:`1 - 2^{-5} \approx 0.97` (a memory of about 32 tokens) to :math:`1 - 2^{-12}`
    (about 4096), so that the heads see different spans. Here the same range is spread over
    any number of heads, :math:`\gamma_h = 1 - 2^{-5 - 7h/(H-1)}` (RetNet's exactly for 8).
    """
    h = torch.arange(n_heads, dtype=torch.float64)
    return 1.0 - 2.0 ** (-5.0 - 7.0 * h / max(n_heads - 1, 1))


class LinearAttention(nn.Module):
    r"""Multi-head causal linear attention, ``(batch, length, d_model) -> (batch, length, d_model)``.

    .. math::

        [q\ k\ v] = x\, W_{qkv}, \quad q, k \leftarrow \phi(q), \phi(k), \quad
        o = \mathrm{linear\_attention}(q, k, v, a), \quad y = \mathrm{norm}(o)\, W_o,

    with ``n_heads`` heads of ``d = d_model / n_heads`` and :math:`\phi` the feature map.

    Args:
        d_model, n_heads: the width and the number of heads (dividing it).
        feature_map: ``"elu"`` (:func:`elu_feature_map`) or ``"identity"``.
        decay: None (the sum never forgets), ``"fixed"`` (RetNet's per-head :math:`\gamma_h`,
            :func:`retnet_decays`) or ``"gated"`` (data-dependent, :math:`a_t =
            \log\sigma(x_t w_h + b_h) / 16`, one *scalar* per head and token: "simple GLA",
            the scalar-gate special case of gated linear attention, whose full form gates with
            a vector :math:`\alpha_t \in (0, 1)^{d_k}` per head (:func:`gla`); the division by
            16 keeps :math:`\gamma_t` near 1 at initialization).
        normalize: divide by :math:`\phi(q_t)^\top z_t` (:func:`normalizer`, always the
            readable form: it is for the lesson, not for speed), Katharopoulos et al.'s
            denominator; otherwise (the default, as in GLA and Mamba-2) each head's output
            is RMS-normalized instead: a denominator that can approach zero is unstable to
            train, and a norm fixes the output's scale. (RetNet keeps a guarded normalizer in
            its parallel form, dividing each row of scores by :math:`\max(|\sum_j R_{tj}|, 1)`,
            and a GroupNorm after it.)
        backend: for :func:`linear_attention` in :meth:`forward`.

    **Decoding.** The state is ``(S, z)``: ``S (batch, n_heads, d, d)`` and the
    normalizer's running sum ``z (batch, n_heads, d)`` (kept at zero without ``normalize``).
    Its size does not grow with the context, unlike a KV cache: :meth:`step` costs the same at
    token 10 and at token 10 million, and reproduces :meth:`forward`.
    """

    def __init__(self, d_model: int, n_heads: int, *, feature_map: str = "elu", decay: str | None = None,
                 normalize: bool = False, backend: str = "auto"):  # fmt: skip
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"LinearAttention: d_model must be a positive int, got {d_model!r}")
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1 or d_model % n_heads:
            raise ValueError(f"LinearAttention: n_heads must be a positive int dividing d_model = {d_model}, "
                             f"got {n_heads!r}")  # fmt: skip
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"LinearAttention: feature_map must be one of {tuple(FEATURE_MAPS)}, got {feature_map!r}")
        if decay not in DECAYS:
            raise ValueError(f"LinearAttention: decay must be one of {DECAYS}, got {decay!r}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.feature_map, self.decay, self.normalize, self.backend = feature_map, decay, normalize, backend
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        if decay == "fixed":
            self.register_buffer("log_gamma", torch.log(retnet_decays(n_heads)).float())
        elif decay == "gated":
            self.gate = nn.Linear(d_model, n_heads)
            nn.init.constant_(self.gate.bias, 4.0)  # sigma(4) = 0.98: start by remembering
        if not normalize:
            self.norm_weight = nn.Parameter(torch.ones(self.head_dim))

    def _project(self, x):
        """``x (batch, length, d_model)`` -> ``q, k, v (batch, length, n_heads, d)``, ``log_decay`` or None."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, self.head_dim)).unbind(dim=2)
        phi = FEATURE_MAPS[self.feature_map]
        q, k = phi(q), phi(k)
        if self.decay == "fixed":
            log_decay = self.log_gamma.to(x.dtype).expand(*x.shape[:-1], self.n_heads)
        elif self.decay == "gated":
            log_decay = F.logsigmoid(self.gate(x)) / 16.0
        else:
            log_decay = None
        return q, k, v, log_decay

    def _finish(self, o, z):
        """Normalize each head's output (by ``z`` or by its RMS) and project: ``(..., n_heads, d) -> (..., d_model)``."""
        if self.normalize:
            o = o / (z[..., None] * default_scale(self.head_dim))  # the op scaled o by s; the denominator was not
        else:
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_weight
        return self.out(o.flatten(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"LinearAttention: x must be (batch, length, d_model) with d_model = {self.d_model}, "
                             f"got shape {tuple(x.shape)}")  # fmt: skip
        q, k, v, log_decay = self._project(x)
        o = linear_attention(q, k, v, log_decay=log_decay, backend=self.backend)
        z = normalizer(q, k, log_decay) if self.normalize else None
        return self._finish(o, z)

    def init_state(self, batch: int, device=None, dtype=torch.float32):
        """The empty state ``(S, z)``: zeros ``(batch, n_heads, d, d)`` and ``(batch, n_heads, d)``."""
        d = self.head_dim
        return (torch.zeros(batch, self.n_heads, d, d, device=device, dtype=dtype),
                torch.zeros(batch, self.n_heads, d, device=device, dtype=dtype))  # fmt: skip

    def step(self, x_t: torch.Tensor, state):
        """One token: ``x_t (batch, d_model)``, ``state = (S, z)`` -> ``(y_t (batch, d_model), (S', z'))``."""
        S, z = state
        q, k, v, log_decay = self._project(x_t[:, None])
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        a = None if log_decay is None else log_decay[:, 0]
        o, S = recurrent_step(q, k, v, S, a)
        if self.normalize:
            z = (z if a is None else torch.exp(a)[..., None] * z) + k
            return self._finish(o, (q * z).sum(-1) + 1e-6), (S, z)
        return self._finish(o, None), (S, z)


# --------------------------------------------------------------------------------------
# Vector gates (GLA) and the delta rule (DeltaNet): chapter 6's stepping stones to RWKV
# --------------------------------------------------------------------------------------
#
# Glossary (symbol -> shape), in addition to the module's:
#
#     log_alpha   (batch, length, heads, d_k)   log alpha_t <= 0: one decay per key channel (GLA)
#     bonus       (heads, d_k)                  u, RWKV-6's weight for the current token (optional)
#     b_t         (batch, length, heads, d_k)   cumulative log-gate sum_{r <= t} log alpha_r
#     beta        (batch, length, heads)        beta_t, the delta rule's writing strength (in (0, 1] usually)
#     W, U        (batch, C, heads, d_k / d_v)  the WY representation of one chunk (delta rule)
#     T           (batch, heads, C, C)          the UT transform, (I + tril_{-1}(diag(beta) K K^T))^{-1} diag(beta)


def _gla_defaults(q, log_alpha, scale):
    scale = default_scale(q.shape[-1]) if scale is None else scale
    return log_alpha.to(q.dtype), scale


def gla_recurrent(q, k, v, log_alpha, initial_state=None, scale=None, bonus=None):
    r"""Gated linear attention with a vector gate, one step at a time (Yang et al. 2024, "GLA", Eq. 3).

    .. math::

        S_t = \mathrm{Diag}(\alpha_t)\, S_{t-1} + k_t v_t^\top, \qquad o_t = s\, q_t^\top S_t,

    with :math:`\alpha_t = e^{\text{log\_alpha}_t} \in (0, 1]^{d_k}`: each *key channel* (row
    of the state) forgets at its own data-dependent rate, where :func:`linear_attention`
    had one scalar per head. With ``bonus = u`` (RWKV-6, Peng et al. 2024, Eq. 17-18) the
    output reads the state *before* this step's decay and update, plus the current token
    weighted by :math:`u`:

    .. math:: o_t = s\, q_t^\top \big(S_{t-1} + \mathrm{Diag}(u)\, k_t v_t^\top\big).

    Shapes: ``q, k, log_alpha (batch, length, heads, d_k)``, ``v (batch, length, heads, d_v)``,
    ``initial_state (batch, heads, d_k, d_v)`` or None, ``bonus (heads, d_k)`` or None.
    Returns ``(o, final_state)``.
    """
    log_alpha, scale = _gla_defaults(q, log_alpha, scale)
    B, L, H, d_k = q.shape
    S = torch.zeros(B, H, d_k, v.shape[-1], dtype=q.dtype, device=q.device) if initial_state is None \
        else initial_state.to(q.dtype)  # fmt: skip
    o = []
    for t in range(L):
        kv = torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        if bonus is not None:  # read first, then write
            o.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S + bonus.to(q.dtype)[..., None] * kv))
        S = torch.exp(log_alpha[:, t])[..., None] * S + kv
        if bonus is None:
            o.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(o, dim=1) if o else v.new_zeros(v.shape)
    return o, S


def gla_quadratic(q, k, v, log_alpha, initial_state=None, scale=None, bonus=None):
    r"""The attention-like form of :func:`gla_recurrent`: ``(batch, heads, L, L, d_k)`` decays, materialized.

    With :math:`b_t = \sum_{r \le t} \log\alpha_r` (a vector), the weight of value :math:`j`
    in output :math:`t` is :math:`s \sum_c q_{tc}\, k_{jc}\, e^{b_{tc} - b_{jc}}`: a decay
    *per channel*, so unlike the scalar case it cannot be pulled out of the dot product as
    one mask :math:`D \circ (QK^\top)`; it is a dot product with a different decay in each
    term. Every exponent :math:`b_t - b_j` (:math:`j \le t`) is :math:`\le 0`: summed from
    its own terms, it never overflows. With ``bonus`` the past is decayed to step
    :math:`t - 1` (:math:`b_{t-1} - b_j`, :math:`j < t`) and the diagonal weighted by :math:`u`.
    :math:`O(L^2 d_k)` memory: for checking and teaching, not for long sequences.
    """
    log_alpha, scale = _gla_defaults(q, log_alpha, scale)
    B, L, H, d_k = q.shape
    b = torch.cumsum(log_alpha, dim=1)  # (b, t, h, k)
    bq = b if bonus is None else b - log_alpha  # the query reads the state at t (or t - 1 with the bonus)
    t_idx = torch.arange(L, device=q.device)
    keep = (t_idx[:, None] >= t_idx[None, :]) if bonus is None else (t_idx[:, None] > t_idx[None, :])
    expo = (bq[:, :, None] - b[:, None, :]).masked_fill(~keep[None, :, :, None, None], -math.inf)  # (b, t, j, h, k)
    A = torch.einsum("bthk,bjhk,btjhk->bhtj", q, k, torch.exp(expo))
    if bonus is not None:
        A = A + torch.diag_embed(torch.einsum("bthk,hk,bthk->bht", q, bonus.to(q.dtype), k))
    o = scale * torch.einsum("bhtj,bjhv->bthv", A, v)
    to_end = torch.exp(b[:, -1:] - b) if L else b  # (b, j, h, k): decay from step j to the end
    S = torch.einsum("bjhk,bjhk,bjhv->bhkv", to_end, k, v)
    if initial_state is not None:
        S0 = initial_state.to(q.dtype)
        o = o + scale * torch.einsum("bthk,bhkv->bthv", q * torch.exp(bq), S0)
        S = S + torch.exp(b[:, -1])[..., None] * S0 if L else S0.clone()
    return o, S


def gla_chunked(q, k, v, log_alpha, initial_state=None, scale=None, bonus=None, chunk_size=64,
                sub_chunk_size=16):  # fmt: skip
    r"""The chunked form of :func:`gla_recurrent`, with log-space cumulative gates and secondary chunking.

    Inside a chunk, with :math:`c_t = \sum_{r=t_0}^t \log\alpha_r` (a vector per step), the
    scalar-decay trick would write the intra-chunk weights as one matrix product,
    :math:`(Q \circ e^{c})(K \circ e^{-c})^\top`. With vector gates that product is the
    only way to use matrix units, but :math:`e^{-c_j}` grows without bound: after 64 steps of
    :math:`\alpha = e^{-2}` it is :math:`e^{128}`, past float32's :math:`3\cdot10^{38}`. Hence:

    1. **secondary chunking** (GLA, Sec. 4.2): cut the chunk into sub-chunks of
       ``sub_chunk_size`` steps. For a query sub-chunk :math:`I` and an earlier key
       sub-chunk :math:`J`, rebase both sides on :math:`c_r`, the gate at :math:`J`'s last
       step: :math:`(q_t \circ e^{c_t - c_r}) \cdot (k_j \circ e^{c_r - c_j})`, each
       exponent :math:`\le 0`, one matrix product per pair; :math:`j \le r < t`.
    2. **the diagonal sub-blocks** (:math:`I = J`) are computed with the exponent
       :math:`c_t - c_j` formed first, per channel: ``(sub, sub, d_k)`` numbers, exact;
    3. **between chunks**, as in :func:`linear_attention_chunked`: the state enters decayed
       by :math:`e^{c_t}`, and leaves as :math:`\mathrm{Diag}(e^{c_{\text{last}}}) S +
       \sum_j (k_j \circ e^{c_{\text{last}} - c_j})\, v_j^\top`.

    Every exponential in this function has a non-positive exponent. With ``bonus`` the
    query side uses :math:`c_{t-1}` (the state before step :math:`t`'s decay), pairs are
    strictly causal, and the diagonal gets :math:`s\,(q_t \circ u \cdot k_t)\, v_t`.
    Returns ``(o, final_state)``; equal to :func:`gla_recurrent` and :func:`gla_quadratic`.
    """
    log_alpha, scale = _gla_defaults(q, log_alpha, scale)
    B, L, H, d_k = q.shape
    S = torch.zeros(B, H, d_k, v.shape[-1], dtype=q.dtype, device=q.device) if initial_state is None \
        else initial_state.to(q.dtype)  # fmt: skip
    o = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    for t0 in range(0, L, chunk_size):
        qc, kc, vc = q[:, t0 : t0 + chunk_size], k[:, t0 : t0 + chunk_size], v[:, t0 : t0 + chunk_size]
        ac = log_alpha[:, t0 : t0 + chunk_size]
        n = qc.shape[1]
        c = torch.cumsum(ac, dim=1)  # (b, n, h, k): inclusive, within the chunk
        cq = c if bonus is None else c - ac  # what the query side reads
        oc = scale * torch.einsum("bthk,bhkv->bthv", qc * torch.exp(cq), S)  # inter-chunk
        for i0 in range(0, n, sub_chunk_size):
            I = slice(i0, min(i0 + sub_chunk_size, n))
            # 1. earlier sub-chunks J: both sides rebased on c at J's last step r
            for j0 in range(0, i0, sub_chunk_size):
                J = slice(j0, j0 + sub_chunk_size)
                r = c[:, J.stop - 1 : J.stop]  # (b, 1, h, k)
                qs = qc[:, I] * torch.exp(cq[:, I] - r)  # cq_t >= ... : t > r, so cq_t - c_r <= 0
                ks = kc[:, J] * torch.exp(r - c[:, J])
                oc[:, I] += scale * torch.einsum("bthk,bjhk,bjhv->bthv", qs, ks, vc[:, J])
            # 2. the diagonal sub-block: exponents formed per channel, then exponentiated
            m = I.stop - I.start
            idx = torch.arange(m, device=q.device)
            keep = (idx[:, None] >= idx[None, :]) if bonus is None else (idx[:, None] > idx[None, :])
            expo = (cq[:, I, None] - c[:, None, I]).masked_fill(~keep[None, :, :, None, None], -math.inf)
            A = torch.einsum("bthk,bjhk,btjhk->bhtj", qc[:, I], kc[:, I], torch.exp(expo))
            if bonus is not None:
                A = A + torch.diag_embed(torch.einsum("bthk,hk,bthk->bht", qc[:, I], bonus.to(q.dtype), kc[:, I]))
            oc[:, I] += scale * torch.einsum("bhtj,bjhv->bthv", A, vc[:, I])
        o[:, t0 : t0 + n] = oc
        # 3. state passing
        S = torch.exp(c[:, -1])[..., None] * S + torch.einsum("bjhk,bjhv->bhkv", kc * torch.exp(c[:, -1:] - c), vc)
    return o, S


def delta_rule_recurrent(q, k, v, beta, initial_state=None, scale=None):
    r"""The delta rule, one step at a time (Schlag et al. 2021; DeltaNet, Yang et al. 2024b).

    .. math::

        S_t = (I - \beta_t k_t k_t^\top)\, S_{t-1} + \beta_t k_t v_t^\top
            = S_{t-1} + \beta_t\, k_t \big(v_t - S_{t-1}^\top k_t\big)^\top,
        \qquad o_t = s\, q_t^\top S_t.

    Read as online regression: :math:`S^\top k` predicts :math:`v`; each step takes one
    gradient step of size :math:`\beta_t` on :math:`\tfrac12\lVert S^\top k_t - v_t\rVert^2`.
    With :math:`\lVert k_t\rVert = 1` and :math:`\beta_t = 1` the state's answer for key
    :math:`k_t` is *replaced* by :math:`v_t`, where additive linear attention would add
    :math:`v_t` on top of whatever was stored there. (State convention here: ``(d_k, d_v)``,
    the transpose of the papers' :math:`S \in \mathbb R^{d_v \times d_k}`.)

    Shapes: ``q, k (batch, length, heads, d_k)`` (normalize the keys: the step is a
    contraction only for :math:`0 \le \beta_t \lVert k_t\rVert^2 \le 2`), ``v (batch, length,
    heads, d_v)``, ``beta (batch, length, heads)``. Returns ``(o, final_state)``.
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    B, L, H, d_k = q.shape
    S = torch.zeros(B, H, d_k, v.shape[-1], dtype=q.dtype, device=q.device) if initial_state is None \
        else initial_state.to(q.dtype)  # fmt: skip
    beta = beta.to(q.dtype)
    o = []
    for t in range(L):
        k_t = k[:, t]
        error = v[:, t] - torch.einsum("bhk,bhkv->bhv", k_t, S)  # what S gets wrong about k_t
        S = S + torch.einsum("bh,bhk,bhv->bhkv", beta[:, t], k_t, error)
        o.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(o, dim=1) if o else v.new_zeros(v.shape)
    return o, S


def ut_transform(k, beta):
    r"""The UT transform of one chunk: :math:`T = (I + \mathrm{tril}_{-1}(\mathrm{Diag}(\beta) K K^\top))^{-1}\mathrm{Diag}(\beta)`.

    ``k (batch, C, heads, d_k)``, ``beta (batch, C, heads)`` -> ``T (batch, heads, C, C)``,
    lower triangular. The matrix inverted is unit lower triangular, so the inverse is
    forward substitution (:math:`C^2/2` dot products), exact and always defined.
    """
    K = k.transpose(1, 2)  # (b, h, C, d_k)
    bet = beta.transpose(1, 2).to(k.dtype)  # (b, h, C)
    A = (bet[..., :, None] * (K @ K.transpose(-1, -2))).tril(-1)
    eye = torch.eye(K.shape[-2], dtype=k.dtype, device=k.device)
    return torch.linalg.solve_triangular(eye + A, torch.diag_embed(bet), upper=False, unitriangular=True)


def delta_rule_chunked(q, k, v, beta, initial_state=None, scale=None, chunk_size=64):
    r"""The delta rule by chunks, through the WY representation (Yang et al. 2024b, Sec. 3).

    Inside a chunk entered with state :math:`S_0`, write each step's change as
    :math:`S_t = S_0 + \sum_{j \le t} k_j u_j^\top` with the *pseudo-values*
    :math:`u_t = \beta_t (v_t - S_{t-1}^\top k_t)`. Substituting :math:`S_{t-1}` gives a
    triangular system, all steps at once (rows are steps):

    .. math::

        \big(I + \mathrm{tril}_{-1}(\mathrm{Diag}(\beta) K K^\top)\big)\, U = \mathrm{Diag}(\beta)\,(V - K S_0)
        \;\Longrightarrow\; U = T V - (T K)\, S_0 = \tilde U - W S_0,

    with :math:`T` from :func:`ut_transform`. :math:`W = TK` and :math:`\tilde U = TV` do
    not depend on the state (the WY form of the product of Householder-like factors
    :math:`\prod_t (I - \beta_t k_t k_t^\top)`), so they are computed for every chunk in
    parallel; only :math:`S_0` flows from chunk to chunk:

    .. math::

        O = s\big(Q S_0 + \mathrm{tril}(Q K^\top)\, U\big), \qquad S_{\text{end}} = S_0 + K^\top U.

    Returns ``(o, final_state)``, equal to :func:`delta_rule_recurrent`.
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    B, L, H, d_k = q.shape
    S = torch.zeros(B, H, d_k, v.shape[-1], dtype=q.dtype, device=q.device) if initial_state is None \
        else initial_state.to(q.dtype)  # fmt: skip
    o = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    for t0 in range(0, L, chunk_size):
        qc, kc, vc = (x[:, t0 : t0 + chunk_size].transpose(1, 2) for x in (q, k, v))  # (b, h, n, d)
        T = ut_transform(k[:, t0 : t0 + chunk_size], beta[:, t0 : t0 + chunk_size])
        W, U_tilde = T @ kc, T @ vc  # the WY representation: independent of S
        U = U_tilde - W @ S  # the pseudo-values, now that the entering state is known
        o[:, t0 : t0 + chunk_size] = (scale * (qc @ S + (qc @ kc.transpose(-1, -2)).tril() @ U)).transpose(1, 2)
        S = S + kc.transpose(-1, -2) @ U
    return o, S


def _gated_backend(where, backend, q, k, v) -> str:
    """``"triton"`` or ``"reference"`` for :func:`gla` and :func:`delta_rule`, whose kernels take the same
    dtypes and head dims: ``"auto"`` falls back to the reference where the kernel cannot run, ``"triton"``
    says why it cannot; an empty input launches nothing."""
    chosen = _backend.resolve(backend, q, k, v)
    if chosen == "triton":
        refusal = _gla_kernel_refuses(q, v)
        if refusal and backend == "auto":
            chosen = "reference"
        elif refusal:
            raise refusal[0](f"{where}(backend='triton'): {refusal[1]}; use backend='reference' for it")
    if chosen == "triton" and (q.numel() == 0 or v.numel() == 0):
        chosen = "reference"  # nothing to launch
    return chosen


def _check_qkv(where, q, k, v, extra, initial_state, scale, chunk_size):
    """Validation shared by :func:`linear_attention`, :func:`gla` and :func:`delta_rule`: q, k, v,
    the initial state, the scale and the chunk size, plus each optional tensor of ``extra``,
    ``[(name, tensor or None, shape, symbols)]``. Returns the scale to use."""
    for name, x in (("q", q), ("k", k), ("v", v), *[(n, t) for n, t, _, _ in extra], ("initial_state", initial_state)):
        if x is None and name not in ("q", "k", "v"):
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in REFERENCE_DTYPES:
            raise TypeError(f"{where}: {name} must be a floating tensor, one of {_names(REFERENCE_DTYPES)}; got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{where}: {name} must be on the device of q ({q.device}), got {x.device}")
    if q.dim() != 4:
        raise ValueError(f"{where}: q must be (batch, length, heads, d_k), got shape {tuple(q.shape)}")
    B, L, H, d_k = q.shape
    if k.shape != q.shape:
        raise ValueError(f"{where}: k must have the shape of q, (batch, length, heads, d_k) = {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")  # fmt: skip
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{where}: v must be (batch, length, heads, d_v) with (batch, length, heads) = {(B, L, H)} "
                         f"as in q, got {tuple(v.shape)}")  # fmt: skip
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{where}: {name} must have the dtype of q ({q.dtype}), got {x.dtype}")
    for name, x, shape, symbols in extra:
        check_shape(where, name, x, shape, symbols)
    if initial_state is not None and initial_state.shape != (B, H, d_k, v.shape[-1]):
        raise ValueError(f"{where}: initial_state must be (batch, heads, d_k, d_v) = {(B, H, d_k, v.shape[-1])}, "
                         f"got {tuple(initial_state.shape)}")  # fmt: skip
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{where}: chunk_size must be a positive int, got {chunk_size!r}")
    if scale is None:
        return default_scale(d_k)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{where}: scale must be a positive finite number or None (1/sqrt(d_k)), got {scale!r}")
    return float(scale)


def gla(q, k, v, log_alpha, *, initial_state=None, scale=None, bonus=None, chunk_size=64, sub_chunk_size=16,
        return_final_state=False, backend="auto"):  # fmt: skip
    r"""Gated linear attention with vector gates, :math:`S_t = \mathrm{Diag}(\alpha_t) S_{t-1} + k_t v_t^\top`,
    :math:`o_t = s\, q_t^\top S_t` (or, with ``bonus``, RWKV-6's :math:`o_t = s\, q_t^\top(S_{t-1} + \mathrm{Diag}(u) k_t v_t^\top)`).

    Args:
        q, k: ``(batch, length, heads, d_k)``; v: ``(batch, length, heads, d_v)``.
        log_alpha: ``(batch, length, heads, d_k)``, :math:`\log\alpha_t \le 0`.
        initial_state: ``(batch, heads, d_k, d_v)`` or None; scale: ``s`` (default :math:`1/\sqrt{d_k}`).
        bonus: ``(heads, d_k)`` or None. chunk_size, sub_chunk_size: of :func:`gla_chunked`.
        backend: ``"reference"`` (:func:`gla_chunked`), ``"triton"`` (:mod:`seqbook.kernels.gla`:
            chunks of 64, each chunk's weights one 64-row product, exact columns where the gates
            decay steeply; forward and backward; float32, float16, bfloat16 on CUDA; ``d_k, d_v``
            in ``KERNEL_HEAD_DIMS``), or ``"auto"``: the kernel for CUDA tensors it supports.

    Returns ``o`` in the inputs' dtype (computed in float32 or better), and with
    ``return_final_state`` also the final state (float32, or float64 for float64 inputs).
    """
    where = "gla"
    B, L, H = q.shape[:3] if isinstance(q, torch.Tensor) and q.dim() == 4 else (None,) * 3
    d_k = q.shape[-1] if isinstance(q, torch.Tensor) else None
    extra = [("log_alpha", log_alpha, (B, L, H, d_k), "(batch, length, heads, d_k)"),
             ("bonus", bonus, (H, d_k), "(heads, d_k)")]
    scale = _check_qkv(where, q, k, v, extra, initial_state, scale, chunk_size)
    check_range(where, "log_alpha", log_alpha, None, 0, "gates alpha = exp(log_alpha) in (0, 1]")
    if _gated_backend(where, backend, q, k, v) == "triton":
        o, S = _backend.kernels("gla").gla(q, k, v, log_alpha, initial_state, scale, bonus)
        return (o, S) if return_final_state else o
    work = torch.promote_types(q.dtype, torch.float32)
    cast = lambda x: None if x is None else x.to(work)  # noqa: E731
    o, S = gla_chunked(cast(q), cast(k), cast(v), cast(log_alpha), cast(initial_state), scale, cast(bonus),
                       chunk_size, sub_chunk_size)  # fmt: skip
    o = o.to(q.dtype)
    return (o, S) if return_final_state else o


def _gla_kernel_refuses(q, v):
    """Why the GLA kernel cannot take these inputs (the exception, the message), or None."""
    if q.dtype not in KERNEL_DTYPES:
        return TypeError, f"the kernel supports dtypes {_names(KERNEL_DTYPES)} (float32 accumulation), got {q.dtype}"
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        return TypeError, "the Triton interpreter cannot run bfloat16 (NumPy has no such type): use float32 or float16 on CPU"
    for name, d in (("d_k", q.shape[-1]), ("d_v", v.shape[-1])):
        if d not in KERNEL_HEAD_DIMS:
            return ValueError, f"the kernel supports head dims {name} in {KERNEL_HEAD_DIMS}, got {name} = {d}"
    return None


def delta_rule(q, k, v, beta, *, initial_state=None, scale=None, chunk_size=64, return_final_state=False,
               backend="auto"):  # fmt: skip
    r"""The delta rule, :math:`S_t = (I - \beta_t k_t k_t^\top) S_{t-1} + \beta_t k_t v_t^\top`, :math:`o_t = s\, q_t^\top S_t`.

    Args:
        q, k: ``(batch, length, heads, d_k)`` (keys L2-normalized, for a stable recurrence);
        v: ``(batch, length, heads, d_v)``; beta: ``(batch, length, heads)``, in ``[0, 2]``.
        initial_state, scale, chunk_size, return_final_state: as in :func:`gla`.
        backend: ``"reference"`` (:func:`delta_rule_chunked`), ``"triton"`` (:mod:`seqbook.kernels.delta`:
            the WY form in chunks of 64, forward and backward; float32, float16, bfloat16 on CUDA;
            ``d_k, d_v`` in ``KERNEL_HEAD_DIMS``), or ``"auto"``: the kernel for CUDA tensors it supports.
    """
    where = "delta_rule"
    B, L, H = q.shape[:3] if isinstance(q, torch.Tensor) and q.dim() == 4 else (None,) * 3
    extra = [("beta", beta, (B, L, H), "(batch, length, heads)")]
    scale = _check_qkv(where, q, k, v, extra, initial_state, scale, chunk_size)
    check_range(where, "beta", beta, 0, 2, "the step is a contraction only there, for unit keys")
    if _gated_backend(where, backend, q, k, v) == "triton":
        o, S = _backend.kernels("delta").delta_rule(q, k, v, beta, initial_state, scale)
        return (o, S) if return_final_state else o
    work = torch.promote_types(q.dtype, torch.float32)
    cast = lambda x: None if x is None else x.to(work)  # noqa: E731
    o, S = delta_rule_chunked(cast(q), cast(k), cast(v), cast(beta), cast(initial_state), scale, chunk_size)
    o = o.to(q.dtype)
    return (o, S) if return_final_state else o


# --------------------------------------------------------------------------------------
# GLA and DeltaNet as mixers (trainable layers with the interface of LinearAttention)
# --------------------------------------------------------------------------------------


def _check_mixer_dims(where: str, d_model, n_heads):
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
        raise ValueError(f"{where}: d_model must be a positive int, got {d_model!r}")
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1 or d_model % n_heads:
        raise ValueError(f"{where}: n_heads must be a positive int dividing d_model = {d_model}, got {n_heads!r}")


def _check_x(where: str, x, d_model: int, ndim: int):
    what = "(batch, length, d_model)" if ndim == 3 else "(batch, d_model)"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: x must be a torch.Tensor {what}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: x must be a floating tensor {what}, got {x.dtype}")
    if x.ndim != ndim or x.shape[-1] != d_model:
        raise ValueError(f"{where}: x must be {what} with d_model = {d_model}, got shape {tuple(x.shape)}")


def _check_conv_size(where: str, conv_size):
    if conv_size is not None and (isinstance(conv_size, bool) or not isinstance(conv_size, int) or conv_size < 1):
        raise ValueError(f"{where}: conv_size must be a positive int or None, got {conv_size!r}")


def _short_conv(channels: int, conv_size: int) -> nn.Conv1d:
    """A depthwise convolution of ``conv_size`` taps per channel (one filter per channel, no mixing across them)."""
    return nn.Conv1d(channels, channels, conv_size, groups=channels, padding=conv_size - 1)


def _short_conv_forward(conv: nn.Conv1d, u: torch.Tensor) -> torch.Tensor:
    """The causal short convolution over a sequence, ``u (batch, length, channels)`` -> the same shape:
    the conv pads ``conv_size - 1`` zeros on both sides; keeping the first ``length`` outputs makes
    output ``t`` depend on ``u_{t - conv_size + 1} .. u_t`` only."""
    return conv(u.transpose(1, 2))[..., : u.shape[1]].transpose(1, 2)


def _short_conv_step(conv: nn.Conv1d, window: torch.Tensor, u_t: torch.Tensor):
    """One step of :func:`_short_conv_forward`: ``window (batch, conv_size - 1, channels)`` holds the last
    inputs, oldest first; ``u_t (batch, channels)`` -> ``(output (batch, channels), window')``."""
    window = torch.cat([window, u_t[:, None]], dim=1)  # (batch, conv_size, channels), oldest first
    out = torch.einsum("btc,ct->bc", window, conv.weight[:, 0]) + conv.bias
    return out, window[:, 1:]


def _head_rms_norm(o: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each head's output RMS-normalized, ``(..., heads, d) -> (..., heads, d)``: the output's scale no
    longer depends on how much the state has accumulated (GLA's and DeltaNet's head-wise norm)."""
    return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


class GatedLinearAttention(nn.Module):
    r"""Multi-head gated linear attention with vector gates (GLA, Yang et al. 2024), ``(batch, length,
    d_model) -> (batch, length, d_model)``.

    .. math::

        q_t, k_t, v_t = x_t W_q, x_t W_k, x_t W_v, \qquad
        \alpha_t = \sigma(x_t W_\alpha^1 W_\alpha^2 + b_\alpha)^{1/\tau} \in (0, 1)^{d_k},

        S_t = \mathrm{Diag}(\alpha_t) S_{t-1} + k_t v_t^\top, \quad o_t = s\, q_t^\top S_t \quad(\text{:func:`gla`}),
        \qquad y_t = \big(\mathrm{SiLU}(x_t W_r) \odot \mathrm{norm}(o_t)\big) W_o,

    per head (the paper's Eq. 4-5 and its layer in Sec. 4.4). The gate comes from a low-rank
    projection (``gate_rank``, 16 in the paper: a full ``d_model x d_model`` gate would cost as
    much as a projection for one vector of decays) and is formed in log space,
    :math:`\log\alpha_t = \mathrm{logsigmoid}(\cdot)/\tau`, which is what :func:`gla` takes; the
    temperature :math:`\tau = 16` keeps :math:`\alpha_t` near 1 (about 0.96 at initialization), so
    the state starts by remembering. :math:`q, k` have no feature map (the paper's choice: the gate,
    not positivity, keeps the state bounded), and ``norm`` is a per-head RMS norm.

    ``conv_size`` (default None: none) puts a short causal depthwise convolution on the projections,
    :math:`q, k, v = \mathrm{conv}(x W_q, x W_k, x W_v)`, the one :class:`DeltaNet` has (fla's GLA layer
    has it as an option, ``use_short_conv``). Here it adds the convolution and nothing else (no
    activation after it), so that GLA with and without it differ by the convolution alone; chapter 8
    uses the pair to tell what the convolution does for recall from what the gates do.

    Args:
        d_model, n_heads: the width and the number of heads (dividing it); ``d_k = d_v = d_model / n_heads``.
        gate_rank: the rank of the gate's projection :math:`W_\alpha^1 W_\alpha^2`.
        gate_temperature: :math:`\tau`.
        conv_size: taps of the short convolution on ``q, k, v``, or None (the default: no convolution).
        backend: for :func:`gla` in :meth:`forward` (``"auto"``: the Triton kernel on CUDA when
            ``d_k`` is one of ``KERNEL_HEAD_DIMS``).

    **Decoding.** The state is ``S (batch, n_heads, d_k, d_v)``, and with the convolution
    ``(window, S)``, ``window (batch, conv_size - 1, 3 d_model)`` the last projected inputs;
    :meth:`step` applies one step of :func:`gla_recurrent` and reproduces :meth:`forward`.
    """

    def __init__(self, d_model: int, n_heads: int, *, gate_rank: int = 16, gate_temperature: float = 16.0,
                 conv_size: int | None = None, backend: str = "auto"):  # fmt: skip
        super().__init__()
        _check_mixer_dims("GatedLinearAttention", d_model, n_heads)
        if isinstance(gate_rank, bool) or not isinstance(gate_rank, int) or gate_rank < 1:
            raise ValueError(f"GatedLinearAttention: gate_rank must be a positive int, got {gate_rank!r}")
        if not isinstance(gate_temperature, (int, float)) or not gate_temperature > 0:
            raise ValueError(f"GatedLinearAttention: gate_temperature must be a positive number, got {gate_temperature!r}")
        _check_conv_size("GatedLinearAttention", conv_size)
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.gate_temperature, self.conv_size, self.backend = float(gate_temperature), conv_size, backend
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        if conv_size is not None:
            self.conv = _short_conv(3 * d_model, conv_size)
        self.gate_down = nn.Linear(d_model, gate_rank, bias=False)  # W_alpha^1
        self.gate_up = nn.Linear(gate_rank, d_model)  # W_alpha^2, b_alpha
        self.output_gate = nn.Linear(d_model, d_model, bias=False)  # W_r
        self.out = nn.Linear(d_model, d_model, bias=False)  # W_o
        self.norm_weight = nn.Parameter(torch.ones(self.head_dim))

    def _project(self, x, u=None):
        """``x (..., d_model)`` and its (convolved) projection ``u (..., 3 d_model)``, by default ``x W_qkv``
        -> ``q, k, v, log_alpha (..., n_heads, d)``."""
        heads = (self.n_heads, self.head_dim)
        u = self.qkv(x) if u is None else u
        q, k, v = u.unflatten(-1, (3, *heads)).unbind(dim=-3)
        log_alpha = F.logsigmoid(self.gate_up(self.gate_down(x))) / self.gate_temperature
        return q, k, v, log_alpha.unflatten(-1, heads)

    def _finish(self, o, x):
        o = _head_rms_norm(o, self.norm_weight).flatten(-2)
        return self.out(F.silu(self.output_gate(x)) * o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_x("GatedLinearAttention", x, self.d_model, 3)
        u = self.qkv(x)
        if self.conv_size is not None:
            u = _short_conv_forward(self.conv, u)
        q, k, v, log_alpha = self._project(x, u)
        return self._finish(gla(q, k, v, log_alpha, backend=self.backend), x)

    def init_state(self, batch: int, device=None, dtype=torch.float32):
        """The empty state: ``S``, zeros ``(batch, n_heads, d_k, d_v)``; with the convolution ``(window, S)``,
        ``window`` zeros ``(batch, conv_size - 1, 3 d_model)``."""
        S = torch.zeros(batch, self.n_heads, self.head_dim, self.head_dim, device=device, dtype=dtype)
        if self.conv_size is None:
            return S
        return torch.zeros(batch, self.conv_size - 1, 3 * self.d_model, device=device, dtype=dtype), S

    def step(self, x_t: torch.Tensor, state):
        """One token: ``x_t (batch, d_model)``, ``state = S`` (or ``(window, S)``) -> ``(y_t (batch, d_model), state')``."""
        _check_x("GatedLinearAttention.step", x_t, self.d_model, 2)
        u = self.qkv(x_t)
        if self.conv_size is not None:
            window, state = state
            u, window = _short_conv_step(self.conv, window, u)
        q, k, v, log_alpha = (t[:, None] for t in self._project(x_t, u))
        o, S = gla_recurrent(q, k, v, log_alpha, initial_state=state)
        y = self._finish(o[:, 0], x_t)
        return (y, S) if self.conv_size is None else (y, (window, S))


class DeltaNet(nn.Module):
    r"""Multi-head DeltaNet (Schlag et al. 2021; Yang et al. 2024b), ``(batch, length, d_model) -> (batch, length, d_model)``.

    .. math::

        q_t, k_t, v_t = \mathrm{SiLU}(\mathrm{conv}(x W_q, x W_k, x W_v))_t, \qquad
        q_t, k_t \leftarrow \frac{q_t}{\lVert q_t\rVert}, \frac{k_t}{\lVert k_t\rVert}, \qquad
        \beta_t = \beta_{\max}\, \sigma(x_t w_\beta + b_\beta),

        S_t = (I - \beta_t k_t k_t^\top) S_{t-1} + \beta_t k_t v_t^\top, \quad o_t = s\, q_t^\top S_t
        \quad(\text{:func:`delta_rule`}), \qquad y_t = \mathrm{norm}(o_t)\, W_o,

    per head, with one :math:`\beta_t` per head and token. The keys are L2-normalized because the
    step :math:`I - \beta_t k_t k_t^\top` is a contraction only for :math:`0 \le \beta_t\lVert k_t\rVert^2
    \le 2`: with unit keys any :math:`\beta_t \in (0, 2)` keeps the state bounded. ``beta_max = 1``
    (DeltaNet's sigmoid) gives each step eigenvalues in :math:`[0, 1]`; ``beta_max = 2`` (Grazzi et al.
    2025) allows the reflection :math:`\beta = 2`, eigenvalue :math:`-1`, which is what parity needs
    (chapter 7, section 5). The short causal convolution (``conv_size`` taps per channel, depthwise,
    as in Yang et al. 2024b and Mamba) lets a key see its predecessor, which the recall tasks use;
    ``conv_size=None`` leaves it out (then the activation is SiLU of the projection alone).

    ``rule="additive"`` is the control for experiments: the same layer (projections, convolution,
    unit keys, :math:`\beta_t`, norm) with the delta rule's correction removed,
    :math:`S_t = S_{t-1} + \beta_t k_t v_t^\top` (:func:`linear_attention` with keys
    :math:`\beta_t k_t`), so that a difference in recall is the update rule's and nothing else's.

    Args:
        d_model, n_heads: the width and the number of heads (dividing it); ``d_k = d_v = d_model / n_heads``.
        beta_max: 1 (:math:`\beta_t \in (0, 1)`) or 2 (:math:`\beta_t \in (0, 2)`).
        conv_size: taps of the short convolution, or None.
        rule: ``"delta"`` or ``"additive"``.
        backend: for :func:`delta_rule` (or :func:`linear_attention`) in :meth:`forward`.

    **Decoding.** The state is ``(window, S)``: the last ``conv_size - 1`` projected inputs
    ``(batch, conv_size - 1, 3 d_model)`` (empty without the convolution) and ``S (batch, n_heads, d_k,
    d_v)``; :meth:`step` applies one step of :func:`delta_rule_recurrent` and reproduces :meth:`forward`.
    """

    def __init__(self, d_model: int, n_heads: int, *, beta_max: float = 1.0, conv_size: int | None = 4,
                 rule: str = "delta", backend: str = "auto"):  # fmt: skip
        super().__init__()
        _check_mixer_dims("DeltaNet", d_model, n_heads)
        if rule not in ("delta", "additive"):
            raise ValueError(f"DeltaNet: rule must be 'delta' or 'additive', got {rule!r}")
        if beta_max not in (1, 2):
            raise ValueError(f"DeltaNet: beta_max must be 1 (beta in (0, 1)) or 2 (beta in (0, 2)), got {beta_max!r}")
        _check_conv_size("DeltaNet", conv_size)
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.beta_max, self.conv_size, self.rule, self.backend = float(beta_max), conv_size, rule, backend
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        if conv_size is not None:
            self.conv = _short_conv(3 * d_model, conv_size)
        self.beta = nn.Linear(d_model, n_heads)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(self.head_dim))

    def _heads(self, u, x):
        """Activated projections ``u (..., 3 d_model)`` and the input ``x`` -> ``q, k, v (..., n_heads, d)``, ``beta (..., n_heads)``."""
        q, k, v = F.silu(u).unflatten(-1, (3, self.n_heads, self.head_dim)).unbind(dim=-3)
        beta = self.beta_max * torch.sigmoid(self.beta(x))
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, beta

    def _finish(self, o):
        return self.out(_head_rms_norm(o, self.norm_weight).flatten(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_x("DeltaNet", x, self.d_model, 3)
        u = self.qkv(x)
        if self.conv_size is not None:
            u = _short_conv_forward(self.conv, u)
        q, k, v, beta = self._heads(u, x)
        if self.rule == "additive":
            return self._finish(linear_attention(q, beta[..., None] * k, v, backend=self.backend))
        return self._finish(delta_rule(q, k, v, beta, backend=self.backend))

    def init_state(self, batch: int, device=None, dtype=torch.float32):
        """The empty state ``(window, S)``: zeros ``(batch, conv_size - 1, 3 d_model)`` and ``(batch, n_heads, d, d)``."""
        taps = 0 if self.conv_size is None else self.conv_size - 1
        return (torch.zeros(batch, taps, 3 * self.d_model, device=device, dtype=dtype),
                torch.zeros(batch, self.n_heads, self.head_dim, self.head_dim, device=device, dtype=dtype))  # fmt: skip

    def step(self, x_t: torch.Tensor, state):
        """One token: ``x_t (batch, d_model)``, ``state = (window, S)`` -> ``(y_t (batch, d_model), (window', S'))``."""
        _check_x("DeltaNet.step", x_t, self.d_model, 2)
        window, S = state
        u = self.qkv(x_t)
        if self.conv_size is not None:
            u, window = _short_conv_step(self.conv, window, u)
        q, k, v, beta = self._heads(u, x_t)
        if self.rule == "additive":
            o, S = recurrent_step(q, beta[..., None] * k, v, S)
            return self._finish(o), (window, S)
        o, S = delta_rule_recurrent(q[:, None], k[:, None], v[:, None], beta[:, None], initial_state=S)
        return self._finish(o[:, 0]), (window, S)
