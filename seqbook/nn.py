r"""Layers and small models: SSM mixers (S4D, S4), a residual block, a sequence model.

Every model in the book is ``y = mixer(x)`` over a sequence, stacked in residual blocks.
A *mixer* is any module mapping ``(batch, length, d_model)`` to the same shape; this
module has the chapter-3 mixers (:class:`S4D`, :class:`S4`), an :class:`LSTMMixer` to
compare with, and the pieces to build a model around any mixer
(:class:`ResidualBlock`, :class:`SequenceModel`). Later chapters plug Mamba and
attention into the same block.

One SSM layer (S4, Gu, Goel and Ré 2022, Sec. 3.4; S4D, Gu, Gupta, Goel and Ré 2022, Sec. 3)::

    u (batch, L, H) --> depthwise SSM convolution y = K * u + D u  (one kernel K_h per channel)
                    --> GELU --> dropout --> Linear(H, H)           (the only place channels mix)

The convolution is causal; with ``bidirectional=True`` a second kernel runs over the
reversed sequence and the two are added (S4's bidirectional variant), so every output
sees the whole sequence.

Glossary (symbol -> shape)
--------------------------
::

    u, y        (batch, length, H)    H = d_model channels, each its own SISO SSM
    N           d_state               the real state size per channel; N/2 complex modes are kept
    A           (c*H, N/2) complex    S4D: diagonal; c = 2 directions if bidirectional else 1
    Lambda, P   (c*H, N/2) complex    S4: A = diag(Lambda) - P P^* (each with its conjugate half)
    B, C        (c*H, N/2) complex    (S4 learns C~ = C (I - A_bar^L), see seqbook.s4)
    D           (H,)                  skip connection
    log_step    (H,)                  log Delta, initialized log-uniform in [step_min, step_max]
    K           (c*H, length)         the convolution kernels

Parameters of the SSM proper (``A``/``Lambda``, ``P``, ``B``, ``log_step``) are tagged
``_ssm = True``; :func:`seqbook.train.fit` gives them a smaller learning rate and no
weight decay, as S4 and S4D do (their dynamics are sensitive; weight decay would pull
:math:`\mathrm{Re}\,A` towards 0, i.e. towards instability).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from . import s4 as _s4
from . import ssm as _ssm

POOLS = ("mean", "last", None)


def _ssm_param(x: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(x)
    p._ssm = True  # read by seqbook.train.fit: small learning rate, no weight decay
    return p


def _complex_param(x: torch.Tensor, *, ssm: bool) -> nn.Parameter:
    """A complex tensor stored as its real view ``(..., 2)``: every optimizer handles real tensors."""
    data = torch.view_as_real(x.to(torch.complex64)).clone()
    return _ssm_param(data) if ssm else nn.Parameter(data)


def _log_steps(H: int, step_min: float, step_max: float) -> torch.Tensor:
    """log Delta, uniform in [log step_min, log step_max]: timescales from 1/step_max to 1/step_min steps."""
    if not 0 < step_min <= step_max:
        raise ValueError(f"need 0 < step_min <= step_max, got step_min={step_min}, step_max={step_max}")
    return torch.rand(H) * (math.log(step_max) - math.log(step_min)) + math.log(step_min)


def _check_dims(d_model, d_state):
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
        raise ValueError(f"d_model must be a positive int, got {d_model!r}")
    if isinstance(d_state, bool) or not isinstance(d_state, int) or d_state < 2 or d_state % 2:
        raise ValueError(f"d_state must be an even int >= 2 (conjugate pairs), got {d_state!r}")


class _SSMLayer(nn.Module):
    """What S4D and S4 share: the convolution, D, GELU, dropout, the output linear layer."""

    def __init__(self, d_model, d_state, bidirectional, dropout, step_min, step_max):
        super().__init__()
        _check_dims(d_model, d_state)
        self.d_model, self.d_state, self.bidirectional = d_model, d_state, bidirectional
        self.channels = d_model * (2 if bidirectional else 1)  # one kernel per channel and direction
        self.log_step = _ssm_param(_log_steps(d_model, step_min, step_max))
        self.D = nn.Parameter(torch.randn(d_model))
        self.dropout = nn.Dropout(dropout)
        self.output_linear = nn.Linear(d_model, d_model)

    def kernel(self, L: int) -> torch.Tensor:  # pragma: no cover - each subclass defines it
        raise NotImplementedError

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if u.ndim != 3 or u.shape[-1] != self.d_model:
            raise ValueError(
                f"{type(self).__name__}: u must be (batch, length, d_model) with d_model = {self.d_model}, "
                f"got shape {tuple(u.shape)}"
            )
        L = u.shape[1]
        K = self.kernel(L).to(u.dtype)  # (channels, L)
        H = self.d_model
        y = _ssm.ssm_convolve(u, K[:H])  # causal: y_k = sum_{j <= k} K_j u_{k-j}
        if self.bidirectional:  # anti-causal: the same convolution run backwards in time
            y = y + _ssm.ssm_convolve(u.flip(1), K[H:]).flip(1)
        y = y + self.D * u
        return self.output_linear(self.dropout(F.gelu(y)))


class S4D(_SSMLayer):
    r"""The S4D layer: a diagonal SSM per channel, kernel by :func:`seqbook.ssm.s4d_kernel` (ZOH).

    Args:
        d_model: H, the channels (input and output width).
        d_state: N, the real state size per channel; ``N/2`` complex modes are kept, one
            per conjugate pair, and the kernel is :math:`2\,\mathrm{Re}` of their sum
            (S4D, Sec. 3).
        bidirectional: add an anti-causal kernel (see the module docstring).
        dropout: after the GELU.
        init: ``"lin"``, ``"inv"`` or ``"legs"`` (:func:`seqbook.s4.s4d_init`).
        step_min, step_max: the range of :math:`\Delta` at initialization (log-uniform).

    Parameters: :math:`A = -e^{\text{log\_A\_real}} + i\,\text{A\_imag}` (the real part kept
    negative by construction: the SSM stays stable whatever the optimizer does),
    ``B = 1`` (fixed: S4D folds it into ``C``), ``C`` complex normal, ``D``, ``log_step``.
    Shapes ``u (batch, length, d_model) -> y (batch, length, d_model)``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        *,
        bidirectional: bool = False,
        dropout: float = 0.0,
        init: str = "lin",
        step_min: float = 1e-3,
        step_max: float = 1e-1,
    ):
        super().__init__(d_model, d_state, bidirectional, dropout, step_min, step_max)
        modes = d_state // 2
        A = _s4.s4d_init(self.channels, modes, init, dtype=torch.complex128)
        self.log_A_real = _ssm_param(torch.log(-A.real).float())
        self.A_imag = _ssm_param(A.imag.float())
        self.register_buffer("B", torch.ones(self.channels, modes, dtype=torch.complex64))
        self.C = _complex_param(torch.randn(self.channels, modes, dtype=torch.complex64), ssm=False)

    @property
    def A(self) -> torch.Tensor:
        return torch.complex(-torch.exp(self.log_A_real), self.A_imag)

    def kernel(self, L: int) -> torch.Tensor:
        r"""The kernels ``(c*H, L)``, causal first: :math:`K_l = 2\,\mathrm{Re}\sum_n C_n \bar B_n \bar A_n^l`."""
        step = self.log_step.exp().repeat(self.channels // self.d_model)
        C = torch.view_as_complex(self.C)
        return _ssm.s4d_kernel(self.A, self.B, 2 * C, step, L, method="zoh")


class S4(_SSMLayer):
    r"""The S4 layer: a DPLR SSM per channel initialized at HiPPO-LegS, kernel by :func:`seqbook.s4.s4_kernel`.

    Same arguments as :class:`S4D` (no ``init``: S4 starts from LegS, Gu et al. 2022,
    Sec. 3.2). Parameters, ``N/2`` modes per channel: :math:`\Lambda = -e^{\text{log\_Lambda\_real}}
    + i\,\text{Lambda\_imag}`, ``P``, ``B`` (all from :func:`seqbook.s4.legs_half`), and
    :math:`\tilde C`, the truncated output vector S4 learns in place of ``C`` (S4, Sec.
    3.3), random normal. The kernel is computed on the full system, each mode with its
    conjugate, so that it is real. :math:`\tilde C` belongs to the length it was trained
    at: at another length the same parameters describe a slightly different ``C``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        *,
        bidirectional: bool = False,
        dropout: float = 0.0,
        step_min: float = 1e-3,
        step_max: float = 1e-1,
    ):
        super().__init__(d_model, d_state, bidirectional, dropout, step_min, step_max)
        modes = d_state // 2
        Lambda, P, B = (x.expand(self.channels, modes) for x in _s4.legs_half(modes))
        self.log_Lambda_real = _ssm_param(torch.log(-Lambda.real).float())
        self.Lambda_imag = _ssm_param(Lambda.imag.float())
        self.P = _complex_param(P, ssm=True)
        self.B = _complex_param(B, ssm=True)
        C = torch.randn(self.channels, modes, dtype=torch.complex64)
        self.C_tilde = _complex_param(C, ssm=False)

    @property
    def Lambda(self) -> torch.Tensor:
        return torch.complex(-torch.exp(self.log_Lambda_real), self.Lambda_imag)

    def kernel(self, L: int) -> torch.Tensor:
        """The kernels ``(c*H, L)``, causal ones first, from the full (conjugate-closed) DPLR systems."""

        def full(x):  # each kept mode and its conjugate: a real system of state size d_state
            return torch.cat([x, x.conj()], dim=-1)

        P, B, C = (torch.view_as_complex(p) for p in (self.P, self.B, self.C_tilde))
        log_step = self.log_step.repeat(self.channels // self.d_model)
        return _s4.s4_kernel(full(self.Lambda), full(P), full(B), full(C), log_step, L, C_is_truncated=True)


class LSTMMixer(nn.Module):
    """An LSTM as a mixer, ``(batch, length, d_model) -> (batch, length, d_model)``: the baseline to compare with."""

    def __init__(self, d_model: int, n_layers: int = 1):
        super().__init__()
        self.lstm = nn.LSTM(d_model, d_model, num_layers=n_layers, batch_first=True)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.lstm(u)[0]

    def init_state(self, batch: int, device=None, dtype=torch.float32):
        """The LSTM's ``(h, c)``, zeros, each ``(n_layers, batch, d_model)``."""
        shape = (self.lstm.num_layers, batch, self.lstm.hidden_size)
        return (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def step(self, u_t: torch.Tensor, state):
        """One time step: ``u_t (batch, d_model)`` -> ``(y_t (batch, d_model), new state)``."""
        y, state = self.lstm(u_t[:, None], state)
        return y[:, 0], state


class ResidualBlock(nn.Module):
    r"""``x + dropout(mixer(norm(x)))`` (pre-norm), or ``norm(x + dropout(mixer(x)))`` (post-norm).

    Args:
        mixer: any module ``(batch, length, d_model) -> (batch, length, d_model)``.
        d_model: the width, for the LayerNorm(s).
        dropout: on the mixer's (and the feed-forward's) output, before the residual sum.
        prenorm: normalize the input of each sub-block (pre-norm; trains more easily in
            deep stacks) rather than the output (post-norm).
        ffn_mult: if > 0, a second residual sub-block follows, a position-wise
            feed-forward network ``Linear(d, m d) -> GELU -> Linear(m d, d)``, as in a
            Transformer block. The SSM layers already end in a linear layer, so chapter 3
            uses 0 (S4's own models have no separate feed-forward).
    """

    def __init__(
        self, mixer: nn.Module, d_model: int, *, dropout: float = 0.0, prenorm: bool = True, ffn_mult: int = 0
    ):
        super().__init__()
        if not isinstance(mixer, nn.Module):
            raise TypeError(f"mixer must be a torch.nn.Module, got {type(mixer).__name__}")
        self.mixer, self.prenorm = mixer, prenorm
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.ffn = None
        if ffn_mult > 0:
            self.ffn = nn.Sequential(
                nn.Linear(d_model, ffn_mult * d_model), nn.GELU(), nn.Linear(ffn_mult * d_model, d_model)
            )
            self.ffn_norm = nn.LayerNorm(d_model)

    def _sub(self, x, f, norm):
        if self.prenorm:
            return x + self.dropout(f(norm(x)))
        return norm(x + self.dropout(f(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._sub(x, self.mixer, self.norm)
        if self.ffn is not None:
            x = self._sub(x, self.ffn, self.ffn_norm)
        return x

    def step(self, x_t: torch.Tensor, state):
        """One time step of the block, ``x_t (batch, d_model)``, through the mixer's own ``step``
        (the feed-forward and the norms act on each position alone). Returns ``(y_t, new state)``."""
        mixer_step = lambda v: self.mixer.step(v, state)  # noqa: E731
        if self.prenorm:
            y, state = mixer_step(self.norm(x_t))
            x_t = x_t + self.dropout(y)
        else:
            y, state = mixer_step(x_t)
            x_t = self.norm(x_t + self.dropout(y))
        if self.ffn is not None:
            x_t = self._sub(x_t, self.ffn, self.ffn_norm)
        return x_t, state


class SequenceModel(nn.Module):
    r"""Encoder -> ``n_layers`` residual blocks of one kind of mixer -> pooling -> decoder.

    Args:
        mixer_factory: called once per layer as ``mixer_factory(d_model)``, returns a mixer,
            e.g. ``lambda d: S4D(d, 64)`` or ``LSTMMixer``.
        d_input: features per step of the input.
        d_model: the width inside.
        n_layers: residual blocks.
        d_output: outputs: classes for classification (logits), 1 for a scalar regression.
        pool: ``"mean"`` over time, ``"last"`` (the last step: all the model knows at the
            end, the one to use when the task is to remember), or ``None`` for an output at
            every step.
        dropout, prenorm, ffn_mult: for each :class:`ResidualBlock`.

    Shapes: ``x (batch, length, d_input)`` -> ``(batch, d_output)``, or
    ``(batch, length, d_output)`` with ``pool=None``.
    """

    def __init__(
        self,
        mixer_factory: Callable[[int], nn.Module],
        d_input: int,
        d_model: int,
        n_layers: int,
        d_output: int,
        *,
        pool: str | None = "mean",
        dropout: float = 0.0,
        prenorm: bool = True,
        ffn_mult: int = 0,
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.d_input, self.pool, self.prenorm = d_input, pool, prenorm
        self.encoder = nn.Linear(d_input, d_model)
        self.blocks = nn.ModuleList(
            ResidualBlock(mixer_factory(d_model), d_model, dropout=dropout, prenorm=prenorm, ffn_mult=ffn_mult)
            for _ in range(n_layers)
        )
        # Pre-norm leaves the residual stream unnormalized: one last LayerNorm before the readout.
        self.norm = nn.LayerNorm(d_model) if prenorm else nn.Identity()
        self.decoder = nn.Linear(d_model, d_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.d_input:
            raise ValueError(
                f"SequenceModel: x must be (batch, length, d_input) with d_input = {self.d_input}, "
                f"got shape {tuple(x.shape)}"
            )
        h = self.encoder(x)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        if self.pool == "mean":
            h = h.mean(dim=1)
        elif self.pool == "last":
            h = h[:, -1]
        return self.decoder(h)


#: The same model read as a classifier:
#: ``SequenceClassifier(mixer_factory, d_input, d_model, n_layers, n_classes)``.
SequenceClassifier = SequenceModel
#: ... and as a regressor (``d_output = 1`` for a scalar target).
SequenceRegressor = SequenceModel


class LanguageModel(nn.Module):
    r"""A causal language model around any mixer: embedding -> residual blocks -> norm -> logits.

    Args:
        mixer_factory: ``mixer_factory(d_model)`` -> a causal mixer (``(batch, length, d_model)``
            to the same shape, position ``t`` seeing only positions ``<= t``).
        vocab_size: the number of tokens (e.g. ``len(seqbook.corpus.CharVocab(text))``).
        d_model, n_layers: the width and the number of :class:`ResidualBlock` s.
        ffn_mult, dropout: for each block (a Transformer uses ``ffn_mult=4``; Mamba 0).

    ``forward(tokens (batch, length) long)`` -> logits ``(batch, length, vocab_size)``: the
    prediction at ``t`` is for token ``t + 1``.

    **Decoding one token at a time.** A mixer that can run as a recurrence has
    ``init_state(batch, device, dtype)`` and ``step(x_t, state) -> (y_t, state)`` with
    ``x_t, y_t (batch, d_model)``: Mamba's state is a fixed-size ``(d, N)`` matrix (and
    the short convolution's last inputs); attention's "state" is the KV cache, which grows
    by one row per token. :meth:`step` chains the blocks' steps; :meth:`generate` samples
    with it, or, for a mixer without ``step``, by re-running the whole prefix (correct, but
    quadratic in the length).
    """

    def __init__(
        self,
        mixer_factory: Callable[[int], nn.Module],
        vocab_size: int,
        d_model: int,
        n_layers: int,
        *,
        ffn_mult: int = 0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(
            ResidualBlock(mixer_factory(d_model), d_model, dropout=dropout, ffn_mult=ffn_mult) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.readout = nn.Linear(d_model, vocab_size)

    def _check_tokens(self, tokens: torch.Tensor, ndim: int, what: str) -> None:
        if tokens.ndim != ndim or tokens.dtype != torch.long:
            raise ValueError(f"LanguageModel: {what} must be a torch.long tensor of shape "
                             f"{'(batch, length)' if ndim == 2 else '(batch,)'}, got {tuple(tokens.shape)} {tokens.dtype}")  # fmt: skip
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"LanguageModel: {what} must lie in [0, {self.vocab_size}), "
                             f"got values in [{tokens.min().item()}, {tokens.max().item()}]")  # fmt: skip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self._check_tokens(tokens, 2, "tokens")
        h = self.embedding(tokens)
        for block in self.blocks:
            h = block(h)
        return self.readout(self.norm(h))

    @property
    def can_step(self) -> bool:
        """Whether every mixer has ``step`` and ``init_state`` (constant work per token)."""
        return all(hasattr(b.mixer, "step") and hasattr(b.mixer, "init_state") for b in self.blocks)

    def init_state(self, batch: int) -> list:
        """One state per block, from each mixer's ``init_state``."""
        if not self.can_step:
            raise TypeError("LanguageModel.init_state: every mixer must have init_state() and step()")
        p = self.embedding.weight
        return [b.mixer.init_state(batch, device=p.device, dtype=p.dtype) for b in self.blocks]

    def step(self, token: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """One token per sequence, ``token (batch,)`` long -> ``(logits (batch, vocab_size), new state)``.

        Feeding a sequence one token at a time gives the same logits as :meth:`forward` on the whole of it.
        """
        self._check_tokens(token, 1, "token")
        h = self.embedding(token)
        new_state = []
        for block, s in zip(self.blocks, state):
            h, s = block.step(h, s)
            new_state.append(s)
        return self.readout(self.norm(h)), new_state

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        n_new: int,
        *,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``n_new`` tokens after ``prompt (batch, length)``; returns ``(batch, length + n_new)``.

        ``temperature`` scales the logits (0: greedy, the most likely token each time).
        Uses :meth:`step` when every mixer can step, else re-runs :meth:`forward` on the prefix.
        """
        self._check_tokens(prompt, 2, "prompt")
        if prompt.shape[1] < 1:
            raise ValueError("LanguageModel.generate: prompt needs at least one token")
        was_training = self.training
        self.eval()

        def sample(logits):
            if temperature == 0:
                return logits.argmax(-1)
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)

        out = [prompt]
        if self.can_step:
            state = self.init_state(prompt.shape[0])
            for t in range(prompt.shape[1]):
                logits, state = self.step(prompt[:, t], state)
            for _ in range(n_new):
                token = sample(logits)
                out.append(token[:, None])
                logits, state = self.step(token, state)
        else:
            seq = prompt
            for _ in range(n_new):
                token = sample(self(seq)[:, -1])
                seq = torch.cat([seq, token[:, None]], dim=1)
                out.append(token[:, None])
        self.train(was_training)
        return torch.cat(out, dim=1)


from .mamba import Mamba  # noqa: E402  (chapter 4's mixer, exported here beside the other mixers)
from .rwkv import RWKV6, RWKV7  # noqa: E402  (chapter 7's mixers)
