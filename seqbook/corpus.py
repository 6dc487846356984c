r"""A small text corpus shipped inside the package, and character-level language-model batches.

Chapters 4 and 5 train a Mamba and a Transformer language model on the same text, so that
chapter 8 can put them side by side. Nothing is downloaded: the text is a file in
``seqbook/data/``.

``shakespeare``: the first 300 KB (about 10,000 lines) of the collection of Shakespeare's
plays that Karpathy's *char-rnn* made popular as "tiny Shakespeare". Shakespeare's plays
are in the public domain. 62 distinct characters.

Glossary (symbol -> shape)
--------------------------
::

    tokens   (n,)                 the whole text as integer ids, torch.long
    x, y     (batch, length)      a batch of windows and the same windows shifted by one:
                                  y[:, t] = x[:, t + 1], the next character to predict
"""

from __future__ import annotations

from importlib import resources

import torch

CORPORA = ("shakespeare",)


def load_text(name: str = "shakespeare") -> str:
    """The text of a shipped corpus, as one string."""
    if name not in CORPORA:
        raise ValueError(f"name must be one of {CORPORA}, got {name!r}")
    return resources.files("seqbook").joinpath("data", f"{name}.txt").read_text(encoding="utf-8")


class CharVocab:
    """Characters <-> integer ids, the characters sorted so that the ids do not depend on the text's order.

    ``vocab = CharVocab(text)``; ``vocab.encode("hello")`` -> ``LongTensor (5,)``;
    ``vocab.decode(ids)`` -> ``str``; ``len(vocab)`` is the vocabulary size.
    """

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        unknown = sorted(set(text) - self.index.keys())
        if unknown:
            raise ValueError(f"encode: characters not in the vocabulary: {unknown[:10]}")
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        ids = torch.as_tensor(ids).reshape(-1).tolist()
        bad = [i for i in ids if not 0 <= i < len(self.chars)]
        if bad:
            raise ValueError(f"decode: ids must lie in [0, {len(self.chars)}), got {bad[:10]}")
        return "".join(self.chars[i] for i in ids)


def split(tokens: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``1 - val_fraction`` of the text to train on, the rest (unseen text) to validate on."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    n = int(round(len(tokens) * (1 - val_fraction)))
    return tokens[:n], tokens[n:]


def lm_batch(
    tokens: torch.Tensor, batch: int, length: int, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random windows of ``length`` characters, ``x``, and their next characters, ``y``.

    Returns ``x, y``, both ``(batch, length)`` long, with ``y[:, t] = x[:, t + 1]``
    (``y``'s last column is the character after the window). Seeded by ``generator``.
    """
    if tokens.ndim != 1 or tokens.dtype != torch.long:
        raise ValueError(f"lm_batch: tokens must be a 1-D torch.long tensor, got {tuple(tokens.shape)} {tokens.dtype}")
    if batch < 1 or length < 1:
        raise ValueError(f"lm_batch: batch and length must be >= 1, got batch={batch}, length={length}")
    if len(tokens) < length + 1:
        raise ValueError(f"lm_batch: length + 1 = {length + 1} exceeds the {len(tokens)} tokens")
    starts = torch.randint(0, len(tokens) - length, (batch,), generator=generator)
    windows = torch.stack([tokens[s : s + length + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]
