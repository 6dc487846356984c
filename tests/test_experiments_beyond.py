"""Chapter 8, beyond recall: the digits data, the FLOP counter, the code-length pieces, the bidirectional
wrapper, both experiments on tiny runs, and the committed records' internal consistency."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from seqbook import digits
from seqbook import experiments_beyond as eb
from seqbook.mamba import Mamba

RESULTS = Path(__file__).resolve().parent.parent / "chapters" / "08_head_to_head" / "results"


# ---------------------------------------------------------------- the digits


def test_digits_ship_and_load():
    images, labels = digits.load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    counts = torch.bincount(labels, minlength=10)
    assert counts.sum() == 1797 and int(counts.min()) >= 170  # every digit about 180 times
    assert torch.equal((images * 16).round(), images * 16)  # counts 0..16, exactly representable


def test_split_is_fixed_and_disjoint():
    (a, la), (b, lb) = digits.train_test_split()
    (a2, _), (b2, _) = digits.train_test_split()
    assert a.shape == (1297, 8, 8) and b.shape == (500, 8, 8)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    images, _ = digits.load_digits()
    flat = {tuple(x.flatten().tolist()) for x in images}
    assert len(flat) > 1700  # almost no duplicate images, so the check below means something
    train = {tuple(x.flatten().tolist()) for x in a}
    overlap = sum(tuple(x.flatten().tolist()) in train for x in b)
    assert overlap <= len(images) - len(flat)  # only exact duplicates in the data can appear on both sides
    with pytest.raises(ValueError, match="n_test"):
        digits.train_test_split(n_test=0)


@pytest.mark.parametrize("name", digits.ORDERS)
@pytest.mark.parametrize("side", [2, 4, 8])
def test_pixel_orders_are_permutations(name, side):
    order = digits.pixel_order(name, side)
    assert sorted(order.tolist()) == list(range(side * side))
    if name in ("snake", "hilbert", "column"):
        r, c = order // side, order % side
        steps = (r[1:] - r[:-1]).abs() + (c[1:] - c[:-1]).abs()
        if name == "column":
            assert int((steps == 1).sum()) == side * (side - 1)  # each column walked by unit steps
        else:
            assert torch.all(steps == 1), f"{name}: every step must move to a touching pixel"


def test_as_sequences_patches_and_positions():
    images, _ = digits.load_digits()
    x = digits.as_sequences(images[:5])
    assert x.shape == (5, 64, 1) and torch.equal(x[..., 0], images[:5].reshape(5, -1))
    x = digits.as_sequences(images[:5], "column")
    assert torch.equal(x[..., 0], images[:5].transpose(1, 2).reshape(5, -1))
    x = digits.as_sequences(images[:5], "row", patch=2, positions=True)
    assert x.shape == (5, 16, 4 + 16)
    assert torch.equal(x[2, 5, :4], images[2, 2:4, 2:4].reshape(-1))  # patch (1, 1), row-major inside
    assert torch.equal(x[0, :, 4:], torch.eye(16))
    for bad in [dict(patch=3), dict(patch=0), dict(order="spiral"), dict(order=torch.zeros(64, dtype=torch.long))]:
        with pytest.raises(ValueError):
            digits.as_sequences(images[:2], **bad)
    with pytest.raises(ValueError, match="images"):
        digits.as_sequences(images[0])


# ---------------------------------------------------------------- counting FLOPs


def test_count_flops_matmul_and_pointwise():
    a, b = torch.randn(7, 5), torch.randn(5, 3)
    assert eb.count_flops(lambda: a @ b) == {"matmul": 2 * 7 * 5 * 3, "elementwise": 0, "total": 210}
    assert eb.count_flops(lambda: a.exp() + 1.0)["elementwise"] == 2 * 35
    assert eb.count_flops(lambda: a.sum())["elementwise"] == 35
    assert eb.count_flops(lambda: a.reshape(35)[3:].t())["total"] == 0  # views compute nothing
    assert eb.count_flops(lambda: a.clone())["elementwise"] == 35  # PyTorch tags clone pointwise: counted
    lin = torch.nn.Linear(5, 4)
    counted = eb.count_flops(lambda: lin(a))
    assert counted["matmul"] == 2 * 7 * 5 * 4  # addmm: the bias add is inside the product's count


def test_training_step_flops_counts_backward():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10, bias=False))
    x, y = torch.randint(10, (2, 6)), torch.randint(10, (2, 6))
    flops = eb.training_step_flops(model, x, y)
    forward = 2 * 12 * 8 * 10
    assert flops["matmul"] == 3 * forward  # backward: the gradients of the weight and of the embedded input
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- code length


def test_compressors_and_context():
    text = "".join(chr(97 + (i * 7919) % 26) for i in range(5000))
    alone = eb.compressor_bits_per_char(text)
    given = eb.compressor_bits_per_char(text, context=text)
    assert set(alone) == {"gzip", "bz2", "lzma"}
    for name in alone:
        assert 0 < given[name] < 0.5 * alone[name], name  # a text seen before is almost free
    assert eb.compressor_bits_per_char(text) == alone  # deterministic


class _Uniform(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, x):
        return torch.zeros(*x.shape, self.vocab)


def test_validation_loss_uniform_and_manual():
    tokens = torch.randint(20, (1001,), generator=torch.Generator().manual_seed(0))
    out = eb.validation_loss(_Uniform(20), tokens, length=64)
    assert out["characters"] == 15 * 64
    assert out["nats"] == pytest.approx(math.log(20), rel=1e-6)
    assert out["bits_per_char"] == pytest.approx(math.log2(20), rel=1e-6)
    torch.manual_seed(0)
    emb = torch.nn.Sequential(torch.nn.Embedding(20, 20))
    got = eb.validation_loss(emb, tokens, length=100, batch=3)["nats"]
    x, y = tokens[:1000].reshape(10, 100), tokens[1:1001].reshape(10, 100)
    want = F.cross_entropy(emb(x).reshape(-1, 20), y.reshape(-1)).item()
    assert got == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="length"):
        eb.validation_loss(emb, tokens[:10], length=64)


# ---------------------------------------------------------------- the bidirectional wrapper


def test_bidirectional_sees_both_ways():
    torch.manual_seed(0)
    bi = eb.Bidirectional(lambda: Mamba(8, d_state=4))
    u = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    bi = bi.double()
    want = bi.forward_mixer(u) + bi.backward_mixer(u.flip(1)).flip(1)
    assert torch.allclose(bi(u), want, rtol=0, atol=0)
    bi(u)[0, 0].sum().backward()  # the first output depends on the last input (a causal scan's would not)
    assert u.grad[0, -1].abs().sum() > 1e-8
    u.grad = None
    bi.forward_mixer(u)[0, 0].sum().backward()
    assert u.grad[0, 1:].abs().sum() == 0


# ---------------------------------------------------------------- the experiments, tiny


def test_lm_matched_compute_tiny_is_deterministic():
    kw = dict(seeds=(0,), steps=2, families=["softmax attention", "Mamba"], target_params=6000, sample_length=8,
              val_limit=641)
    a, b = eb.lm_matched_compute(**kw), eb.lm_matched_compute(**kw)
    for ra, rb in zip(a["runs"], b["runs"]):
        assert {k: v for k, v in ra.items() if "seconds" not in k} == {k: v for k, v in rb.items() if "seconds" not in k}
    assert a["config"]["tokens_seen"] == 2 * 16 * 64
    for fam, info in a["families"].items():
        assert abs(info["parameters"] - 6000) < 0.35 * 6000, fam
        assert info["flops_per_step"]["total"] == info["flops_per_step"]["matmul"] + info["flops_per_step"]["elementwise"]
    assert all(len(r["sample"]) == 8 for r in a["runs"])
    assert a["compressors"]["given_training_text"]["lzma"] < a["compressors"]["alone"]["lzma"]
    with pytest.raises(ValueError, match="families"):
        eb.lm_matched_compute(seeds=(0,), steps=1, families=["LSTM"])


def test_images_as_sequences_tiny():
    kw = dict(seeds=(0,), steps=2, families=["attention (non-causal)", "Mamba, bidirectional"], target_params=(3000,))
    a, b = eb.images_as_sequences(**kw), eb.images_as_sequences(**kw)
    assert [r["test_accuracy"] for r in a["runs"]] == [r["test_accuracy"] for r in b["runs"]]
    assert a["config"]["length"] == 16 and a["config"]["n_test"] == 500
    for m in a["models"]:
        assert m["flops_per_image"]["total"] > m["parameters"]  # every weight is used at least once per image
    with pytest.raises(ValueError, match="family"):
        eb.image_model("LSTM", 8)
    with pytest.raises(ValueError, match="families"):
        eb.images_as_sequences(seeds=(0,), steps=1, families=["LSTM"])


# ---------------------------------------------------------------- the committed records


def _load(name):
    path = RESULTS / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run python -m seqbook.experiments {name[:-5]} --seeds 3")
    return json.loads(path.read_text())


def test_lm_record_is_consistent():
    rec = _load("lm_matched_compute.json")
    config = rec["config"]
    n_seeds = len(config["seeds"])
    assert rec["complete"] and n_seeds >= 2
    assert set(rec["summary"]) == set(rec["families"]) == set(config["families"])  # every family, every seed
    params = [f["parameters"] for f in rec["families"].values()]
    assert max(params) / min(params) < 1.25  # matched parameters
    for fam, s in rec["summary"].items():
        runs = [r for r in rec["runs"] if r["family"] == fam]
        assert s["val_nats"]["n"] == len(runs) == n_seeds
        mean = sum(r["val_nats"] for r in runs) / len(runs)
        assert s["val_nats"]["mean"] == pytest.approx(mean, abs=1e-4)
        for r in runs:
            assert r["val_bits_per_char"] == pytest.approx(r["val_nats"] / math.log(2), abs=2e-4)
            assert 0 < r["val_nats"] < math.log(config["vocab_size"])  # better than uniform


def test_images_record_is_consistent():
    rec = _load("images_as_sequences.json")
    assert rec["complete"] and len(rec["config"]["seeds"]) >= 3
    for fam, by_target in rec["summary"].items():
        for target, s in by_target.items():
            accs = [r["test_accuracy"] for r in rec["runs"] if r["family"] == fam and str(r["target"]) == target]
            assert s["n"] == len(accs) and s["mean"] == pytest.approx(sum(accs) / len(accs), abs=1e-4)
            assert s["mean"] > 2 * rec["config"]["chance"], (fam, target)  # every model learned something


def test_image_orders_tiny_and_bad_order():
    rec = eb.image_orders(seeds=(0,), steps=2, families=("attention (non-causal)",), orders=("row", "random"))
    assert set(rec["summary"]["attention (non-causal)"]) == {"row", "random"}
    assert rec["orders"]["random"]["config"]["order"] == "random"
    with pytest.raises(ValueError, match="orders"):
        eb.image_orders(seeds=(0,), steps=1, orders=("spiral",))


def test_image_orders_record_reproduces_the_row_runs():
    rec, main = _load("image_orders.json"), _load("images_as_sequences.json")
    assert rec["complete"] and len(rec["config"]["seeds"]) >= 3
    target = rec["config"]["target_params"]
    for r in rec["orders"]["row"]["runs"]:  # the same runs as the main record's: the code is deterministic
        twin = next(m for m in main["runs"] if (m["family"], m["target"], m["seed"]) == (r["family"], target, r["seed"]))
        assert r["test_accuracy"] == twin["test_accuracy"], r
