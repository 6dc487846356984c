"""Tests for seqbook.experiments_chapters: chapters 5-7's experiments in the registry, on tiny settings.

The experiments take from minutes (a GPU) to half an hour (a CPU); here each runs a few steps, which checks
that every model builds and trains, that the record holds what the chapter's notebook reads (the same keys
as the records already committed), and that the command line writes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seqbook import experiments
from seqbook import experiments_chapters as ec

ROOT = Path(__file__).resolve().parent.parent


def test_registered_with_their_chapters_records():
    for name, (fn, out) in ec.REGISTRY.items():
        assert experiments.EXPERIMENTS[name] == (fn, out)
        assert (ROOT / out).is_file(), f"{name}: the committed record {out} is missing"


def test_scale_ablation_record():
    record = ec.attention_scale_ablation(seeds=(0,), steps=3, configs=("d=16, scale 1", "d=64, scale 1/sqrt(d)"))
    assert [(r["config"], r["seed"], r["head_dim"], r["scale"]) for r in record["runs"]] == [
        ("d=16, scale 1", 0, 16, 1.0), ("d=64, scale 1/sqrt(d)", 0, 64, None)]  # fmt: skip
    committed = json.loads((ROOT / ec.REGISTRY["attention_scale_ablation"][1]).read_text())
    assert set(record) <= set(committed) and set(record["runs"][0]) == set(committed["runs"][0])
    for run in record["runs"]:
        assert len(run["train_loss"]) == 3 and len(run["at_init"]) == len(run["trained"]) == 2  # two layers
        for layer in run["at_init"] + run["trained"]:
            assert layer["score_std"] > 0 and 1 / 64 <= layer["mean_largest_weight"] <= 1
    # at initialization the unscaled scores (d_k = 16) spread wider than 1, the scaled ones (d_k = 64) narrower
    assert record["runs"][0]["at_init"][0]["score_std"] > 1 > record["runs"][1]["at_init"][0]["score_std"]
    with pytest.raises(ValueError, match="configs must be among"):
        ec.attention_scale_ablation(seeds=(0,), steps=1, configs=("d=8",))
    with pytest.raises(ValueError, match="at least one seed"):
        ec.attention_scale_ablation(seeds=(), steps=1)


def test_mqar_record_and_state_sizes():
    record = ec.linear_attention_mqar(seeds=(0, 1), steps=4, pairs=(2, 5), device="cpu")
    assert [(r["mixer"], r["n_pairs"], r["seed"]) for r in record["runs"]] == [
        (m, n, s) for n in (2, 5) for s in (0, 1) for m in ("softmax attention", "linear attention")]  # fmt: skip
    committed = json.loads((ROOT / ec.REGISTRY["linear_attention_mqar"][1]).read_text())
    assert set(record) <= set(committed) and set(record["runs"][0]) == set(committed["runs"][0])
    assert record["settings"].keys() == committed["settings"].keys() and record["settings"]["device"] == "cpu"
    for run in record["runs"]:
        assert 0 <= run["test_accuracy"] <= 1 and len(run["train_accuracy"]) == 4
        # linear attention: 4 heads of a 16 x 16 state; attention: keys and values of 3 P tokens, 64 numbers each
        want = 4 * 16 * 16 if run["mixer"] == "linear attention" else 2 * 64 * 3 * run["n_pairs"]
        assert run["state_numbers_per_layer"] == want
    again = ec.linear_attention_mqar(seeds=(1,), steps=4, pairs=(5,), device="cpu")
    assert again["runs"] == [dict(r, seconds=again["runs"][i]["seconds"]) for i, r in enumerate(
        r for r in record["runs"] if r["seed"] == 1 and r["n_pairs"] == 5)]  # seeded: the same numbers  # fmt: skip
    with pytest.raises(ValueError, match="pairs must be between"):
        ec.linear_attention_mqar(seeds=(0,), steps=1, pairs=(65,))
    with pytest.raises(ValueError, match="multiple of n_heads"):
        ec.linear_attention_mqar(seeds=(0,), steps=1, d_model=30, n_heads=4)


def test_lm_comparison_record_means_over_seeds():
    models = ("Mamba (ch. 4)", "softmax attention (ch. 5)")
    one = ec.lm_comparison(seeds=(0,), steps=2, models=models)
    two = ec.lm_comparison(seeds=(0, 1), steps=2, models=models)
    committed = json.loads((ROOT / ec.REGISTRY["lm_comparison"][1]).read_text())
    assert set(committed["setup"]) <= set(one["setup"]) and one["setup"]["steps"] == 2
    for name in models:
        a, b = one["models"][name], two["models"][name]
        assert set(committed["models"][name]) <= set(a)  # everything chapter 7 reads
        assert abs(a["parameters"] - 60_000) < 0.2 * 60_000 and a["d_model"] % 8 == 0
        assert a["val_loss"] == a["runs"][0]["val_loss"] and a["train_loss"] == a["runs"][0]["train_loss"]
        assert b["runs"][0]["val_loss"] == a["val_loss"]  # seed 0 does not depend on the other seeds
        losses = [r["val_loss"] for r in b["runs"]]
        assert b["val_loss"] == pytest.approx(sum(losses) / 2, rel=1e-12) and b["seeds"] == [0, 1]
        assert b["val_loss_std"] == pytest.approx(abs(losses[0] - losses[1]) / 2**0.5, rel=1e-9)
        assert b["train_loss"][1] == pytest.approx((b["runs"][0]["train_loss"][1] + b["runs"][1]["train_loss"][1]) / 2)
    with pytest.raises(ValueError, match="models must be among"):
        ec.lm_comparison(seeds=(0,), steps=1, models=("LSTM",))


def expected_device() -> str:
    """What a record names as its device when the run chose the default one: the GPU where there is one."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("name", list(ec.REGISTRY))
def test_command_line_writes_each_record(name, tmp_path):
    out = tmp_path / "record.json"
    fn, _ = ec.REGISTRY[name]
    small = {"attention_scale_ablation": {"configs": ("d=64, scale 1",)},
             "linear_attention_mqar": {"pairs": (3,)}, "lm_comparison": {"models": ("softmax attention (ch. 5)",)}}
    experiments.EXPERIMENTS[name] = (lambda **kw: fn(**kw, **small[name]), "unused")  # a small case of the same entry
    try:
        assert experiments.main([name, "--seeds", "1", "--steps", "2", "--out", str(out)]) == 0
    finally:
        experiments.EXPERIMENTS[name] = ec.REGISTRY[name]
    record = json.loads(out.read_text())
    assert record["experiment"] == name and record["complete"] is True
    assert record["command"] == f"python -m seqbook.experiments {name} --seeds 1 --steps 2 --out {out}"
    assert record["commit"] != "" and record["wall_seconds"] >= 0 and expected_device() in record["device"]
