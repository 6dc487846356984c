"""Tests for seqbook.corpus (the shipped text, characters <-> ids, LM batches) and
seqbook.nn.LanguageModel (a causal model around any mixer, and its token-by-token step).

The step test compares two routes that share only the parameters: the whole sequence at
once through ``forward`` and one token at a time through ``step`` with the mixers'
states; a mixer that leaks the future (a non-causal one) is caught by the causality test.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seqbook import corpus, train
from seqbook import nn as snn


@pytest.fixture(scope="module")
def text():
    return corpus.load_text()


def test_corpus_is_shipped_and_round_trips(text):
    assert 250_000 < len(text) < 400_000
    assert text.startswith("First Citizen:")
    vocab = corpus.CharVocab(text)
    assert len(vocab) == len(set(text)) and vocab.chars == sorted(vocab.chars)
    ids = vocab.encode(text[:5000])
    assert ids.dtype == torch.long and ids.min() >= 0 and ids.max() < len(vocab)
    assert vocab.decode(ids) == text[:5000]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        vocab.encode("~")
    with pytest.raises(ValueError, match="ids must lie"):
        vocab.decode([len(vocab)])
    with pytest.raises(ValueError, match="name must be one of"):
        corpus.load_text("war_and_peace")


def test_lm_batch_windows_are_shifted_by_one(text):
    tokens = corpus.CharVocab(text).encode(text[:20000])
    x, y = corpus.lm_batch(tokens, 8, 33, generator=torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (8, 33)
    assert torch.equal(x[:, 1:], y[:, :-1])
    text_ids = tokens.tolist()
    for row in x.tolist():  # every window is a piece of the text
        s = text_ids.index(row[0])
        while text_ids[s : s + 33] != row:
            s = text_ids.index(row[0], s + 1)
    x2, _ = corpus.lm_batch(tokens, 8, 33, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x, x2)
    train_ids, val_ids = corpus.split(tokens, 0.1)
    assert len(train_ids) + len(val_ids) == len(tokens) and abs(len(val_ids) - 2000) <= 1
    with pytest.raises(ValueError, match="exceeds"):
        corpus.lm_batch(tokens[:10], 1, 10)
    with pytest.raises(ValueError, match="1-D torch.long"):
        corpus.lm_batch(tokens.float(), 1, 5)


def make_lm(dtype=torch.float64):
    torch.manual_seed(0)
    return snn.LanguageModel(lambda d: snn.LSTMMixer(d, 2), 11, 16, 2, ffn_mult=2).to(dtype).eval()


def test_language_model_step_equals_forward():
    model = make_lm()
    tokens = torch.randint(0, 11, (3, 23), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    assert full.shape == (3, 23, 11)
    state, steps = model.init_state(3), []
    for t in range(23):
        logits, state = model.step(tokens[:, t], state)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-12, atol=1e-12)


def test_language_model_is_causal_and_learns():
    model = make_lm(torch.float32)
    tokens = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(2))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 11
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])  # the past does not see the future
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4  # ... and the future sees the change
    # a repeating sequence is learnable: the loss falls well below log(11)
    period = torch.arange(12) % 4
    data = lambda g: (period.repeat(8, 1)[:, :-1], period.repeat(8, 1)[:, 1:])  # noqa: E731
    history = train.fit(model, data, 60, lr=1e-2, seed=0)
    assert history["loss"][-1] < 0.2 < 2.0 < history["loss"][0]


def test_generate_with_and_without_a_state_agree():
    model = make_lm(torch.float32)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    greedy = model.generate(prompt, 10, temperature=0)
    assert greedy.shape == (2, 13) and torch.equal(greedy[:, :3], prompt)

    class NoStep(nn.Module):  # the same mixer, hiding its step: generate re-runs the prefix
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, u):
            return self.inner(u)

    for block in model.blocks:
        block.mixer = NoStep(block.mixer)
    assert not model.can_step
    assert torch.equal(model.generate(prompt, 10, temperature=0), greedy)
    sampled = [model.generate(prompt, 10, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(sampled[0], sampled[1]) and sampled[0].shape == (2, 13)
    assert not torch.equal(sampled[0], sampled[2])  # the seed matters
    with pytest.raises(TypeError, match="init_state"):
        model.init_state(2)


def test_language_model_validation():
    model = make_lm(torch.float32)
    with pytest.raises(ValueError, match=r"tokens must be a torch.long tensor of shape \(batch, length\)"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"must lie in \[0, 11\)"):
        model(torch.full((1, 4), 11))
    with pytest.raises(ValueError, match=r"token must be a torch.long tensor of shape \(batch,\)"):
        model.step(torch.zeros(2, 1, dtype=torch.long), model.init_state(2))
