r"""Synthetic sequence tasks, generated from a seed: data a laptop can make and a model must remember.

Every task is a function ``task(batch, length, *, generator=None, ...) -> (x, y)`` with
``x (batch, length, d_input)`` float32 and ``y`` the target, drawn only from ``generator``
(a ``torch.Generator``; ``None`` uses a fresh one seeded with 0), so the same seed gives
the same data on every machine. Pass one generator to successive calls for a stream of
new batches (what :func:`seqbook.train.fit` does), or a fixed seed for a fixed test set.

Tasks (chapters 3, 4 and 6):

- :func:`adding_problem`: regression; add the two numbers marked somewhere in the sequence
  (Hochreiter and Schmidhuber 1997, "Long Short-Term Memory", Sec. 5.4).
- :func:`delayed_recall`: classification; which of a few levels was shown at the very
  start, followed by a long stretch of noise. Read at the last step (``pool="last"``),
  the answer is ``length`` steps in the past: the memory is the whole task.
- :func:`selective_copying`: sequence to sequence; a few coloured tokens scattered among
  blanks, to be repeated in order at the end (Gu and Dao 2023, "Mamba", Sec. 3.1): what to
  keep depends on the input, which a time-invariant model cannot decide.
- :func:`associative_recall`: multi-query associative recall (MQAR; Arora et al. 2023,
  "Zoology"); key-value pairs, then keys again, whose values must be recalled. Token ids, for
  a language model: recall with a fixed-size state against attention's growing cache.

Token-id tasks for chapter 8's language models (targets ``-100`` where nothing is scored):

- :func:`copying`: a string, a separator, the string again (Jelassi et al. 2024, "Repeat After
  Me"): what a fixed-size state cannot do beyond its size.
- :func:`induction_heads`: the token that followed a trigger, asked for at the end (Gu and Dao
  2023, Sec. 4.1.2).
- :func:`selective_copying_ids`: :func:`selective_copying` as token ids.

Glossary (symbol -> shape)
--------------------------
::

    x   (batch, length, d_input)   float32 inputs
    y   (batch,)                   float32 targets (regression) or int64 class labels
                                   (selective_copying: (batch, n_tokens) int64, one label per answer)
"""

from __future__ import annotations

import torch


def _generator(generator) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _check_sizes(batch, length, min_length=1):
    for name, v, low in (("batch", batch, 1), ("length", length, min_length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")


def adding_problem(batch: int, length: int, *, generator: torch.Generator | None = None):
    r"""The adding problem: ``x (batch, length, 2)``, ``y (batch,)``.

    Channel 0 holds numbers uniform in :math:`[0, 1]`; channel 1 is 0 except for two
    markers (1.0): one at a uniformly random step of the first half, one in the second half.
    The target is the sum of the two marked numbers (Hochreiter and Schmidhuber 1997, Sec. 5.4,
    whose markers sit in the first ten steps and the first half; one marker per half is the
    common later variant, and makes the span to remember at least a quarter of ``length``
    on average).
    Predicting the mean, 1, scores a mean squared error of :math:`2 \cdot \tfrac1{12} = 1/6`:
    the baseline a model must beat.
    """
    _check_sizes(batch, length, min_length=2)
    gen = _generator(generator)
    values = torch.rand(batch, length, generator=gen)
    half = length // 2
    first = torch.randint(0, half, (batch,), generator=gen)
    second = torch.randint(half, length, (batch,), generator=gen)
    markers = torch.zeros(batch, length)
    rows = torch.arange(batch)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    y = values[rows, first] + values[rows, second]
    return torch.stack([values, markers], dim=-1), y


def levels(n_classes: int) -> torch.Tensor:
    """The ``(n_classes,)`` levels of :func:`delayed_recall`, evenly spaced in ``[-1, 1]``."""
    return torch.linspace(-1.0, 1.0, n_classes)


def delayed_recall(
    batch: int,
    length: int,
    *,
    n_classes: int = 4,
    pattern_length: int = 8,
    noise: float = 0.1,
    generator: torch.Generator | None = None,
):
    r"""Which level came first? ``x (batch, length, 1)``, ``y (batch,)`` int64 in ``[0, n_classes)``.

    The first ``pattern_length`` steps hold one of ``n_classes`` levels evenly spaced in
    :math:`[-1, 1]` (:func:`levels`), the same value at each of those steps; every step
    after them holds Gaussian noise with standard deviation ``noise``, which carries no
    information. The label is the level's index. Read at the last step (``pool="last"``),
    the model must carry the level across ``length - pattern_length`` noisy steps. A linear
    SSM can: one slow mode (small :math:`\Delta`) integrates the start and keeps it, and
    the kernel is learned by gradient descent with no recurrence to backpropagate through.
    An LSTM must keep its cell state through as many multiplications by a forget gate
    below 1, and its gradient vanishes on the way (Hochreiter and Schmidhuber 1997,
    Sec. 3): at ``length = 1024`` it stays at chance, ``1 / n_classes``, where S4D
    learns the task in a few hundred steps.
    """
    _check_sizes(batch, length, min_length=1)
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
    if isinstance(pattern_length, bool) or not isinstance(pattern_length, int) or not 1 <= pattern_length <= length:
        raise ValueError(f"pattern_length must be an int in [1, length = {length}], got {pattern_length!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    gen = _generator(generator)
    y = torch.randint(0, n_classes, (batch,), generator=gen)
    x = noise * torch.randn(batch, length, generator=gen)
    x[:, :pattern_length] = levels(n_classes)[y, None]
    return x[..., None], y


#: The blank's token id in :func:`selective_copying` (the colours are ``1 .. n_colors``, the marker ``n_colors + 1``).
BLANK = 0


def selective_copying(
    batch: int,
    length: int,
    n_tokens: int = 4,
    n_colors: int = 4,
    *,
    selective: bool = True,
    generator: torch.Generator | None = None,
):
    r"""Selective copying: ``x (batch, length, n_colors + 2)`` one-hot, ``y (batch, n_tokens)`` int64.

    A sequence of ``length`` tokens: the first ``length - n_tokens`` are blanks (id 0), except
    ``n_tokens`` of them, at positions drawn uniformly without replacement, that hold a colour
    (ids ``1 .. n_colors``, uniform, repeats allowed); the last ``n_tokens`` steps hold the
    marker (id ``n_colors + 1``), which asks for the answer. The target is the colours in the
    order they appeared, as labels in ``[0, n_colors)`` (id minus one): read the model's
    output at the ``n_tokens`` marker steps, ``out[:, -n_tokens:]``. Chance is ``1 / n_colors``
    per answer.

    ``x`` is the tokens one-hot encoded, channel ``k`` for id ``k``: ``x.argmax(-1)`` gives the ids
    back. ``selective=False`` puts the colours in the first ``n_tokens`` steps instead, the plain
    *copying* task: then where to look is fixed, and a time-invariant model (a convolution with a
    fixed kernel, a delay) can solve it. With the positions random, what to keep depends on
    what each token is, the point of Mamba's selection (Gu and Dao 2023, Sec. 3.1 and Fig. 2).
    Needs ``length >= 2 * n_tokens``.
    """
    _check_sizes(batch, length, min_length=1)
    for name, v in (("n_tokens", n_tokens), ("n_colors", n_colors)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if length < 2 * n_tokens:
        raise ValueError(
            f"length must be >= 2 * n_tokens = {2 * n_tokens} (room for the tokens and their answers), got {length}"
        )
    if not isinstance(selective, bool):
        raise TypeError(f"selective must be a bool, got {type(selective).__name__}")
    gen = _generator(generator)
    span = length - n_tokens  # where the coloured tokens may sit
    colors = torch.randint(0, n_colors, (batch, n_tokens), generator=gen)
    if selective:  # n_tokens distinct positions per row, in increasing order
        positions = torch.rand(batch, span, generator=gen).argsort(dim=1)[:, :n_tokens].sort(dim=1).values
    else:
        positions = torch.arange(n_tokens).expand(batch, n_tokens)
    ids = torch.full((batch, length), BLANK, dtype=torch.long)
    ids.scatter_(1, positions, colors + 1)
    ids[:, span:] = n_colors + 1  # the markers
    x = torch.nn.functional.one_hot(ids, n_colors + 2).float()
    return x, colors


def associative_recall(
    batch: int,
    n_pairs: int,
    n_queries: int | None = None,
    *,
    n_keys: int = 64,
    n_values: int = 64,
    generator: torch.Generator | None = None,
):
    r"""Multi-query associative recall (MQAR): ``x (batch, 2 n_pairs + n_queries)`` int64 token ids, ``y (batch, n_queries)`` int64.

    Each sequence stores ``n_pairs`` key-value pairs, written ``k_1 v_1 k_2 v_2 ...``, then asks
    for ``n_queries`` of the keys again; at each query the answer is the value stored under that
    key (Arora et al. 2023, "Zoology", Sec. 3: the task on which the gap between attention and
    fixed-state recurrent models shows up first). Keys are the token ids ``0 .. n_keys - 1``,
    values ``n_keys .. n_keys + n_values - 1``, so a language model over ``n_keys + n_values``
    tokens reads it; the keys of one sequence are distinct, the values drawn uniformly with
    repeats, and the queried keys distinct when ``n_queries <= n_pairs`` (default: every key,
    in a random order). Read the model's output at the query positions, ``out[:, -n_queries:]``,
    as for :func:`selective_copying`; ``y`` holds the answers as token ids. Chance is
    ``1 / n_values`` per answer.

    Unlike the other tasks, ``x`` is token ids, not features: it is meant for
    :class:`seqbook.nn.LanguageModel`. Zoology spreads the queries over the rest of the sequence
    with filler tokens in between; here they follow the pairs directly, so the answer
    positions are fixed.
    """
    for name, v, low in (("batch", batch, 1), ("n_pairs", n_pairs, 1), ("n_keys", n_keys, 1), ("n_values", n_values, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    n_queries = n_pairs if n_queries is None else n_queries
    if isinstance(n_queries, bool) or not isinstance(n_queries, int) or n_queries < 1:
        raise ValueError(f"n_queries must be an int >= 1 or None, got {n_queries!r}")
    if n_pairs > n_keys:
        raise ValueError(f"n_pairs must be <= n_keys = {n_keys} (the keys of a sequence are distinct), got {n_pairs}")
    gen = _generator(generator)
    keys = torch.rand(batch, n_keys, generator=gen).argsort(dim=1)[:, :n_pairs]  # distinct keys per row
    values = n_keys + torch.randint(0, n_values, (batch, n_pairs), generator=gen)
    if n_queries <= n_pairs:
        which = torch.rand(batch, n_pairs, generator=gen).argsort(dim=1)[:, :n_queries]
    else:
        which = torch.randint(0, n_pairs, (batch, n_queries), generator=gen)
    pairs = torch.stack([keys, values], dim=-1).flatten(1)  # k_1 v_1 k_2 v_2 ...
    x = torch.cat([pairs, keys.gather(1, which)], dim=1)
    return x, values.gather(1, which)


# --------------------------------------------------------------------------------------
# Chapter 8: copying and induction heads, as token ids for a language model
# --------------------------------------------------------------------------------------

#: Targets a language model must not be scored on (F.cross_entropy's default ``ignore_index``).
IGNORE = -100


def _check_ids(**sizes):
    for name, (v, low) in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")


def copying(batch: int, n: int, *, n_symbols: int = 16, generator: torch.Generator | None = None):
    r"""Copy a string: ``x (batch, 2 n)`` int64 token ids, ``y (batch, 2 n)`` int64 targets.

    Each row is a string :math:`s_1 \dots s_n` of symbols drawn uniformly (with repeats) from
    ``0 .. n_symbols - 1``, then the separator (id ``n_symbols``), then the string again
    (Jelassi et al. 2024, "Repeat After Me", Sec. 3). Read as a language model reads it, with
    the true previous tokens fed in (teacher forcing)::

        x:  s_1 ... s_n  SEP  s_1 ... s_{n-1}
        y:  -100 ... -100  s_1  s_2 ... s_n

    the prediction at the separator is :math:`s_1`, and at each copied token the next one; the
    ``n`` positions of the string itself carry the target ``-100`` (:data:`IGNORE`), which
    cross-entropy skips. A row is copied exactly when all ``n`` predictions are right, which is
    also when greedy decoding from the separator reproduces the string. The vocabulary has
    ``n_symbols + 1`` tokens; a string carries :math:`n \log_2(\text{n\_symbols})` bits.
    """
    _check_ids(batch=(batch, 1), n=(n, 1), n_symbols=(n_symbols, 2))
    gen = _generator(generator)
    s = torch.randint(0, n_symbols, (batch, n), generator=gen)
    sep = torch.full((batch, 1), n_symbols, dtype=torch.long)
    x = torch.cat([s, sep, s[:, :-1]], dim=1)
    y = torch.cat([torch.full((batch, n), IGNORE, dtype=torch.long), s], dim=1)
    return x, y


def induction_heads(batch: int, length: int, *, n_symbols: int = 16, generator: torch.Generator | None = None):
    r"""Induction heads: ``x (batch, length)`` int64 token ids, ``y (batch, length)`` int64 targets.

    A random string over ``0 .. n_symbols - 1`` in which a trigger token (id ``n_symbols``)
    appears once, at a uniformly random position among the first ``length - 2``, followed by
    an answer token; the trigger appears again at the last position, where the model must
    produce the token that followed it the first time (Gu and Dao 2023, "Mamba", Sec. 4.1.2;
    Olsson et al. 2022 named the two-layer attention circuit that does it an *induction head*).
    ``y`` is ``-100`` (:data:`IGNORE`) everywhere but the last position, which holds the
    answer. Chance is ``1 / n_symbols``; the vocabulary has ``n_symbols + 1`` tokens.
    Needs ``length >= 3``.
    """
    _check_ids(batch=(batch, 1), length=(length, 3), n_symbols=(n_symbols, 2))
    gen = _generator(generator)
    x = torch.randint(0, n_symbols, (batch, length), generator=gen)
    where = torch.randint(0, length - 2, (batch,), generator=gen)
    rows = torch.arange(batch)
    x[rows, where] = n_symbols
    x[:, -1] = n_symbols
    y = torch.full((batch, length), IGNORE, dtype=torch.long)
    y[:, -1] = x[rows, where + 1]
    return x, y


def selective_copying_ids(batch: int, length: int, n_tokens: int = 4, n_colors: int = 4, *,
                          generator: torch.Generator | None = None):  # fmt: skip
    r""":func:`selective_copying` as token ids for a language model: ``x (batch, length)``, ``y (batch, length)`` int64.

    The same sequences (blank 0, colours ``1 .. n_colors``, marker ``n_colors + 1``; the same draws
    from ``generator``), with ``y`` holding the colour *ids* at the ``n_tokens`` marker positions and
    ``-100`` (:data:`IGNORE`) elsewhere. The vocabulary has ``n_colors + 2`` tokens.
    """
    x, colors = selective_copying(batch, length, n_tokens, n_colors, generator=generator)
    ids = x.argmax(-1)
    y = torch.full_like(ids, IGNORE)
    y[:, -n_tokens:] = colors + 1
    return ids, y
