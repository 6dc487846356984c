"""Chapter 8's copying page: the task generators (seqbook.tasks) and the experiments (seqbook.experiments_copying)."""

import seqbook  # noqa: F401  (first: the Triton interpreter switch)
import math

import pytest
import torch

from seqbook import experiments, tasks
from seqbook import experiments_copying as ec
from seqbook import experiments_h2h as h2h

IGNORE = tasks.IGNORE


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- task generators


@pytest.mark.parametrize("n, A", [(1, 2), (5, 3), (16, 16)])
def test_copying_layout(n, A):
    x, y = tasks.copying(7, n, n_symbols=A, generator=gen(n))
    assert x.shape == y.shape == (7, 2 * n) and x.dtype == y.dtype == torch.long
    s = x[:, :n]
    assert ((s >= 0) & (s < A)).all()
    assert (x[:, n] == A).all()  # the separator, the one token outside the alphabet
    assert torch.equal(x[:, n + 1 :], s[:, : n - 1])  # the copy, fed back one step behind
    assert (y[:, :n] == IGNORE).all()
    assert torch.equal(y[:, n:], s)  # at the separator: s_1; at each copied token: the next one


def test_copying_is_seeded_and_uses_every_symbol():
    x1, _ = tasks.copying(64, 12, n_symbols=5, generator=gen(3))
    x2, _ = tasks.copying(64, 12, n_symbols=5, generator=gen(3))
    x3, _ = tasks.copying(64, 12, n_symbols=5, generator=gen(4))
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert set(x1[:, :12].unique().tolist()) == set(range(5))


def test_induction_heads_layout():
    L, A, B = 20, 6, 200
    x, y = tasks.induction_heads(B, L, n_symbols=A, generator=gen(1))
    assert x.shape == y.shape == (B, L) and x.dtype == y.dtype == torch.long
    assert (x[:, -1] == A).all()
    assert ((x == A).sum(1) == 2).all()  # the trigger: once inside, once at the end
    first = (x[:, :-1] == A).int().argmax(1)
    assert (first <= L - 3).all()  # the answer is never the final trigger
    assert torch.equal(y[:, -1], x[torch.arange(B), first + 1])
    assert ((y[:, -1] >= 0) & (y[:, -1] < A)).all()
    assert (y[:, :-1] == IGNORE).all()
    assert len(set(first.tolist())) > L // 2  # the position moves
    x2, y2 = tasks.induction_heads(B, L, n_symbols=A, generator=gen(1))
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_selective_copying_ids_are_the_same_sequences():
    x, colors = tasks.selective_copying(9, 30, 5, 6, generator=gen(2))
    ids, y = tasks.selective_copying_ids(9, 30, 5, 6, generator=gen(2))
    assert torch.equal(ids, x.argmax(-1))
    assert (y[:, :-5] == IGNORE).all() and torch.equal(y[:, -5:], colors + 1)
    assert (ids[:, -5:] == 7).all()  # the markers


@pytest.mark.parametrize("call, match", [
    (lambda: tasks.copying(0, 4), "batch"),
    (lambda: tasks.copying(2, 0), "n must"),
    (lambda: tasks.copying(2, 4, n_symbols=1), "n_symbols"),
    (lambda: tasks.copying(2, 4.0), "n must"),
    (lambda: tasks.induction_heads(2, 2), "length"),
    (lambda: tasks.induction_heads(2, 8, n_symbols=True), "n_symbols"),
    (lambda: tasks.selective_copying_ids(2, 5, 3, 4), "length"),
])  # fmt: skip
def test_task_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_tasks_reject_a_non_generator():
    with pytest.raises(TypeError, match="generator"):
        tasks.copying(2, 3, generator=3)


# ---------------------------------------------------------------- scoring and the bound


class Oracle(torch.nn.Module):
    """Logits that put the mass on ``y`` where it is scored (on token 0 elsewhere), with chosen mistakes."""

    def __init__(self, y, vocab, wrong=()):
        super().__init__()
        self.y, self.vocab, self.wrong = y, vocab, wrong

    def forward(self, x):
        target = self.y.clamp(min=0).clone()
        for i, t in self.wrong:
            target[i, t] = (target[i, t] + 1) % self.vocab
        return torch.nn.functional.one_hot(target, self.vocab).float()


def test_scored_accuracy_counts_tokens_and_sequences():
    x, y = tasks.copying(8, 5, n_symbols=4, generator=gen(0))
    assert ec.scored_accuracy(Oracle(y, 5), x, y) == (1.0, 1.0)
    # two wrong tokens in one row, one in another: 3 of 40 tokens, 2 of 8 strings
    token, seq = ec.scored_accuracy(Oracle(y, 5, [(0, 5), (0, 9), (3, 7)]), x, y)
    assert token == pytest.approx(37 / 40) and seq == pytest.approx(6 / 8)
    # a mistake where nothing is scored costs nothing
    assert ec.scored_accuracy(Oracle(y, 5, [(1, 0), (2, 4)]), x, y) == (1.0, 1.0)


@pytest.mark.parametrize("state_bytes, A", [(0, 2), (1, 2), (2, 16), (100, 3), (5632, 16), (5632, 26), (7, 1000)])
def test_copy_bound_length_is_the_longest_string_that_fits(state_bytes, A):
    n = ec.copy_bound_length(state_bytes, A)
    bits = 8 * state_bytes
    assert n * math.log2(A) <= bits + 1e-9 < (n + 1) * math.log2(A)
    # counting: A^n strings fit in 2^bits states, A^(n+1) do not (exact integers)
    assert A**n <= 2**bits < A ** (n + 1)


def test_copy_bound_length_bad_input():
    with pytest.raises(ValueError, match="state_bytes"):
        ec.copy_bound_length(-1, 4)
    with pytest.raises(ValueError, match="n_symbols"):
        ec.copy_bound_length(8, 1)


# ---------------------------------------------------------------- the experiments


def test_registered_on_the_command_line():
    for name in ("copying_head_to_head", "selective_copying_head_to_head", "induction_heads_head_to_head"):
        fn, out = experiments.EXPERIMENTS[name]
        assert fn is getattr(ec, name)
        assert out == f"chapters/08_head_to_head/results/{name}.json"


def test_default_families_include_the_required_ones():
    for fam in ("softmax attention", "hybrid: Mamba + 1 attention", "Mamba", "linear attention", "RWKV-6"):
        assert fam in ec.DEFAULT_FAMILIES
    assert set(ec.DEFAULT_FAMILIES) <= set(h2h.FAMILIES) and len(ec.DEFAULT_FAMILIES) == 5


TINY = dict(seeds=(0,), steps=3, families=("softmax attention", "linear attention"), target_params=3000, batch=4,
            n_test=8, n_probe=4, curve_every=2)  # fmt: skip


def test_copying_tiny_run_record_and_determinism():
    seen = []
    kw = dict(TINY, n_symbols=4, train_lengths=(2, 3), test_lengths=(2, 5), curve_length=3)
    record = ec.copying_head_to_head(**kw, on_run=seen.append)
    assert len(seen) == 2 and len(record["runs"]) == 2
    vocab = 5
    for fam, info in record["families"].items():
        model = h2h.build(fam, info["d_model"], vocab)
        assert info["parameters"] == h2h.n_parameters(model)
        for n in (2, 5):  # measured after the string and the separator: n + 1 tokens
            assert info["state_bytes"][str(n)] == h2h.state_bytes(model, n + 1)
    att, lin = record["families"]["softmax attention"], record["families"]["linear attention"]
    assert not att["fixed_state"] and "bound_length" not in att
    assert lin["fixed_state"] and lin["bound_length"] == ec.copy_bound_length(lin["state_bytes"]["2"], 4)
    for run in record["runs"]:
        for m in ec.METRICS:
            assert set(run[m]) == {"2", "5"} and all(0.0 <= a <= 1.0 for a in run[m].values())
            assert run["sequence_accuracy"]["5"] <= run["token_accuracy"]["5"]
        # measured before steps 0 and 2, and at the end: sequences seen 0, 8, 12
        assert [c[0] for c in run["curve"]] == [0, 8, 12] and all(len(c) == 3 for c in run["curve"])
    assert record["summary"]["linear attention"]["sequence_accuracy"]["5"]["n"] == 1
    again = ec.copying_head_to_head(**kw)
    assert [(r["token_accuracy"], r["curve"]) for r in again["runs"]] == [
        (r["token_accuracy"], r["curve"]) for r in record["runs"]]


def test_selective_copying_and_induction_tiny_runs():
    sel = ec.selective_copying_head_to_head(**TINY, length=12, n_tokens=3, n_colors=4)
    assert sel["config"]["test_lengths"] == [12] and sel["config"]["chance"] == 0.25
    assert {r["family"] for r in sel["runs"]} == {"softmax attention", "linear attention"}
    assert "bound_length" not in sel["families"]["linear attention"]
    ind = ec.induction_heads_head_to_head(**TINY, n_symbols=4, train_length=8, test_lengths=(8, 16))
    for run in ind["runs"]:
        # one scored token per sequence: token and sequence accuracy are the same number
        assert run["token_accuracy"] == run["sequence_accuracy"] and set(run["token_accuracy"]) == {"8", "16"}
    # the same seed scores the same at the training length as when run again
    again = ec.induction_heads_head_to_head(**TINY, n_symbols=4, train_length=8, test_lengths=(8,))
    assert [r["token_accuracy"]["8"] for r in again["runs"]] == [r["token_accuracy"]["8"] for r in ind["runs"]]


def test_bad_arguments():
    with pytest.raises(ValueError, match="families"):
        ec.copying_head_to_head(families=("nope",))
    with pytest.raises(ValueError, match="seeds"):
        ec.copying_head_to_head(seeds=())
    with pytest.raises(ValueError, match="n_symbols"):
        ec.copying_head_to_head(n_symbols=1)
    with pytest.raises(ValueError, match="test_lengths"):
        ec.copying_head_to_head(test_lengths=(0, 4))
    with pytest.raises(ValueError, match="length"):
        ec.selective_copying_head_to_head(length=5, n_tokens=4)
    with pytest.raises(ValueError, match="length"):
        ec.induction_heads_head_to_head(test_lengths=(2,))


def test_the_convolution_controls_run_when_asked_for():
    """experiments_h2h.CONV_VARIANTS run through the copying tasks too (not by default), their depth recorded."""
    kw = dict(TINY, families=("DeltaNet, no conv", "Based + conv"))
    rec = ec.copying_head_to_head(**kw, n_symbols=4, train_lengths=(2,), test_lengths=(2,), curve_length=2)
    assert [r["family"] for r in rec["runs"]] == ["DeltaNet, no conv", "Based + conv"]
    assert rec["families"]["DeltaNet, no conv"]["n_layers"] == 2 and rec["families"]["Based + conv"]["n_layers"] == 4
    for fam, info in rec["families"].items():  # the recorded size is the library's model
        assert info["parameters"] == h2h.n_parameters(h2h.build(fam, info["d_model"], 5))
    assert not set(h2h.CONV_VARIANTS) & set(ec.DEFAULT_FAMILIES)
