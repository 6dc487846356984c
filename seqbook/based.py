r"""Based (Arora et al. 2024, "Simple linear attention language models balance the recall-throughput
tradeoff"): linear attention with a Taylor feature map for the global view, sliding-window softmax
attention for the local one.

The paper's argument is chapter 8's question: a recurrent model's recall is bounded by its state,
and Based gives two knobs to buy state cheaply. The **Taylor feature map** approximates the
softmax's exponential by its second-order expansion,

.. math::

    \phi(x) = \Big[\,1,\ \frac{x}{d'^{1/4}},\ \frac{x \otimes x}{\sqrt 2\,\sqrt{d'}}\,\Big]
    \in \mathbb{R}^{1 + d' + d'^2},
    \qquad \phi(q)^\top \phi(k) = 1 + \frac{q^\top k}{\sqrt{d'}} + \frac{(q^\top k)^2}{2 d'}
    \approx e^{q^\top k / \sqrt{d'}},

on a small projection :math:`q, k \in \mathbb{R}^{d'}` (the paper: :math:`d' = 16`): the state
:math:`S = \sum_j \phi(k_j) v_j^\top` then has :math:`(1 + d' + d'^2)\, d_v` numbers per head, a
state that grows with :math:`d'^2` at the cost of :math:`d'` projections. The weights
:math:`1 + t + t^2/2 \ge 1/2` are positive for every :math:`t`, so the output can be normalized,
:math:`o_t = \phi(q_t)^\top S_t / \phi(q_t)^\top z_t` with :math:`z_t = \sum_{j \le t} \phi(k_j)`, a
weighted average of values as in softmax attention. The **sliding window**
(:class:`seqbook.attention.SlidingWindowAttention`) is exact softmax attention over the last
:math:`w` tokens (the paper: 64 to 128), a KV cache of bounded size, for the precise local
comparisons that a low-order feature map blurs.

The paper's models interleave both with **short gated convolutions** (its "BaseConv" layers, from
Zoology), :math:`y = (x W + b) \odot (h * x)`: a depthwise causal convolution :math:`h` of a few taps
(3 here), gated elementwise by a linear projection (:class:`GatedShortConv`). They mix neighbouring
tokens, which the recall tasks need (a value must be bound to the key just before it), at a cost and
a state that do not depend on the length. :func:`based_factory` alternates the two attention layers,
window first, so that a two-layer model has one of each; with ``conv_size`` it puts a gated
convolution layer before each of them (conv, window, conv, linear, ...: four layers hold one of each).
The convolution is off by default: chapter 8's committed Based records were trained without it, and
they stay reproducible (the paper's stack, with it, is ``based_factory(..., conv_size=3)``).

Glossary (symbol -> shape)
--------------------------
::

    x            (batch, length, d_model)        the mixer's input
    q, k         (batch, length, heads, d')      the projections the feature map is applied to; d' = feature_dim
    phi(q), phi(k) (batch, length, heads, D)     D = 1 + d' + d'^2
    v            (batch, length, heads, d)       d = d_model / heads
    S            (batch, heads, D, d)            sum_j phi(k_j) v_j^T
    z            (batch, heads, D)               sum_j phi(k_j), the normalizer
    h            (d_model, conv_size)            the gated convolution's taps, one filter per channel
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .attention import SlidingWindowAttention
from .linear_attention import linear_attention, recurrent_step


def taylor_feature_map(x: torch.Tensor) -> torch.Tensor:
    r"""``x (..., d')`` -> ``(..., 1 + d' + d'^2)``, the second-order Taylor features of :math:`e^{q^\top k/\sqrt{d'}}`
    (module docstring): :math:`\phi(q)^\top\phi(k) = 1 + s + s^2/2` with :math:`s = q^\top k / \sqrt{d'}`."""
    d = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2)  # x_i x_j for every (i, j): (x^T y)^2 = <x x, y y>
    return torch.cat([torch.ones_like(x[..., :1]), x / d**0.25, outer / math.sqrt(2 * d)], dim=-1)


class TaylorLinearAttention(nn.Module):
    r"""Based's linear attention: ``(batch, length, d_model) -> (batch, length, d_model)``.

    .. math::

        q, k = x W_q, x W_k \in \mathbb{R}^{H \times d'}, \quad v = x W_v, \quad
        o_t = \frac{\phi(q_t)^\top \sum_{j \le t} \phi(k_j) v_j^\top}{\phi(q_t)^\top \sum_{j \le t} \phi(k_j)},
        \quad y = o\, W_o,

    with :func:`taylor_feature_map` :math:`\phi`. The numerator and the denominator are one call of
    :func:`seqbook.linear_attention.linear_attention` (scale 1): the values get a column of ones,
    whose output is the denominator.

    Args:
        d_model, n_heads: the width and the number of heads (dividing it).
        feature_dim: :math:`d'`, the size of each head's query and key before the feature map.
        backend: for :func:`linear_attention` (the kernel takes feature sizes in its list only, so
            ``"auto"`` falls back to the readable form for most :math:`d'`).

    **Decoding.** The state is ``(S, z)``, ``(batch, heads, D, d)`` and ``(batch, heads, D)`` with
    :math:`D = 1 + d' + d'^2`: fixed, whatever the length; :meth:`step` reproduces :meth:`forward`.
    """

    def __init__(self, d_model: int, n_heads: int, feature_dim: int = 16, *, backend: str = "auto"):
        super().__init__()
        for name, value in (("d_model", d_model), ("n_heads", n_heads), ("feature_dim", feature_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TaylorLinearAttention: {name} must be a positive int, got {value!r}")
        if d_model % n_heads:
            raise ValueError(f"TaylorLinearAttention: n_heads must divide d_model = {d_model}, got {n_heads}")
        self.d_model, self.n_heads, self.head_dim, self.feature_dim = d_model, n_heads, d_model // n_heads, feature_dim
        self.state_dim = 1 + feature_dim + feature_dim**2  # D
        self.backend = backend
        self.qk = nn.Linear(d_model, 2 * n_heads * feature_dim, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def _project(self, x: torch.Tensor):
        """``x (..., d_model)`` -> ``phi(q), phi(k) (..., heads, D)`` and ``v (..., heads, d + 1)`` (a ones column last)."""
        q, k = self.qk(x).unflatten(-1, (2, self.n_heads, self.feature_dim)).unbind(dim=-3)
        v = self.v(x).unflatten(-1, (self.n_heads, self.head_dim))
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        return taylor_feature_map(q), taylor_feature_map(k), v1

    def _finish(self, o1: torch.Tensor) -> torch.Tensor:
        """``o1 (..., heads, d + 1)``: numerators and the denominator -> ``(..., d_model)``."""
        return self.out((o1[..., :-1] / o1[..., -1:]).flatten(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"TaylorLinearAttention: x must be (batch, length, d_model) with d_model = "
                             f"{self.d_model}, got {got}")  # fmt: skip
        fq, fk, v1 = self._project(x)
        return self._finish(linear_attention(fq, fk, v1, scale=1.0, backend=self.backend))

    def init_state(self, batch: int, device=None, dtype=torch.float32):
        """Zeros: ``(S (batch, heads, D, d), z (batch, heads, D))``."""
        S = torch.zeros(batch, self.n_heads, self.state_dim, self.head_dim, device=device, dtype=dtype)
        return S, torch.zeros(batch, self.n_heads, self.state_dim, device=device, dtype=dtype)

    def step(self, x_t: torch.Tensor, state):
        """One token: ``x_t (batch, d_model)``, ``state = (S, z)`` -> ``(y_t (batch, d_model), (S', z'))``."""
        if not isinstance(x_t, torch.Tensor) or x_t.ndim != 2 or x_t.shape[-1] != self.d_model:
            got = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise ValueError(f"TaylorLinearAttention.step: x_t must be (batch, d_model) with d_model = "
                             f"{self.d_model}, got {got}")  # fmt: skip
        S, z = state
        fq, fk, v1 = self._project(x_t)
        # S and z are the two blocks of one (D, d + 1) state: stepped together, kept apart for reading
        o1, S1 = recurrent_step(fq, fk, v1, torch.cat([S, z[..., None]], dim=-1), scale=1.0)
        return self._finish(o1), (S1[..., :-1], S1[..., -1])


class GatedShortConv(nn.Module):
    r"""Based's short gated convolution (the paper's BaseConv with a short filter), ``(batch, length, d_model)
    -> (batch, length, d_model)``:

    .. math::

        y_t = (x_t W + b) \odot \Big(c + \sum_{i=0}^{K-1} h_i \odot x_{t-i}\Big),

    a depthwise causal convolution of ``conv_size`` :math:`= K` taps per channel (inputs before the
    sequence are 0) gated elementwise by a linear projection. The convolution moves information
    between neighbouring tokens only; the gate makes the product of two views of the input, which a
    convolution alone (linear in :math:`x`) cannot form.

    **Decoding.** The state is the last ``conv_size - 1`` inputs, ``(batch, conv_size - 1, d_model)``;
    :meth:`step` reproduces :meth:`forward`.
    """

    def __init__(self, d_model: int, conv_size: int = 3):
        super().__init__()
        for name, value in (("d_model", d_model), ("conv_size", conv_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GatedShortConv: {name} must be a positive int, got {value!r}")
        self.d_model, self.conv_size = d_model, conv_size
        self.gate = nn.Linear(d_model, d_model)  # W, b
        self.conv = nn.Conv1d(d_model, d_model, conv_size, groups=d_model, padding=conv_size - 1)  # h, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"GatedShortConv: x must be (batch, length, d_model) with d_model = {self.d_model}, "
                             f"got {got}")  # fmt: skip
        # the conv pads K - 1 zeros on both sides; the first L outputs are the causal ones
        conv = self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        return self.gate(x) * conv

    def init_state(self, batch: int, device=None, dtype=torch.float32):
        """Zeros ``(batch, conv_size - 1, d_model)``: the inputs before the sequence."""
        return torch.zeros(batch, self.conv_size - 1, self.d_model, device=device, dtype=dtype)

    def step(self, x_t: torch.Tensor, state):
        """One token: ``x_t (batch, d_model)``, ``state`` the last inputs -> ``(y_t (batch, d_model), state')``."""
        if not isinstance(x_t, torch.Tensor) or x_t.ndim != 2 or x_t.shape[-1] != self.d_model:
            got = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise ValueError(f"GatedShortConv.step: x_t must be (batch, d_model) with d_model = {self.d_model}, "
                             f"got {got}")  # fmt: skip
        window = torch.cat([state, x_t[:, None]], dim=1)  # (batch, K, d_model), oldest first: x_{t-K+1} .. x_t
        # Conv1d's weight[:, 0, j] multiplies the input j - (K - 1) steps back, so it lines up with window[:, j]
        conv = torch.einsum("bjc,cj->bc", window, self.conv.weight[:, 0]) + self.conv.bias
        return self.gate(x_t) * conv, window[:, 1:]


def based_factory(n_heads: int = 2, window: int = 64, feature_dim: int = 16,
                  conv_size: int | None = None) -> Callable[[int], nn.Module]:  # fmt: skip
    """A mixer factory for :class:`seqbook.nn.LanguageModel`.

    Without ``conv_size`` (the default): even layers (0, 2, ...) sliding-window attention over ``window``
    tokens, odd layers :class:`TaylorLinearAttention` with ``feature_dim``. With ``conv_size`` (the paper
    uses short filters; 3 here): a :class:`GatedShortConv` layer before each of those, so the layers
    run conv, window, conv, linear, ... (four layers hold one of each).

    :class:`~seqbook.nn.LanguageModel` calls a factory once per layer, in order; each factory returned
    here counts its own calls, so build every model from a fresh one.
    """
    if conv_size is not None and (isinstance(conv_size, bool) or not isinstance(conv_size, int) or conv_size < 1):
        raise ValueError(f"based_factory: conv_size must be a positive int or None, got {conv_size!r}")
    calls = {"n": 0}

    def factory(d_model: int) -> nn.Module:
        i = calls["n"]
        calls["n"] += 1
        if conv_size is not None:
            if i % 2 == 0:
                return GatedShortConv(d_model, conv_size)
            i //= 2  # the i-th attention layer
        if i % 2 == 0:
            return SlidingWindowAttention(d_model, n_heads, window)
        return TaylorLinearAttention(d_model, n_heads, feature_dim)

    return factory
