"""Tests for seqbook.experiments: the registry, the command line and its JSON record, the ablation's shape.

The experiment itself is too long for a test; here it runs for a few steps, which checks that every
model in it builds and trains, and that the record holds what the chapter plots.
"""

from __future__ import annotations

import json

import pytest
import torch

from seqbook import experiments


def test_ablation_record_has_every_run():
    record = experiments.selective_copying_ablation(seeds=(0, 1), steps=4, models=("LTI, no conv", "S6 + conv"),
                                                    n_test=16, curve_every=2)  # fmt: skip
    assert [(r["model"], r["seed"]) for r in record["runs"]] == [
        ("LTI, no conv", 0), ("LTI, no conv", 1), ("S6 + conv", 0), ("S6 + conv", 1)]  # fmt: skip
    for run in record["runs"]:
        assert 0 <= run["test_accuracy"] <= 1 and len(run["curve"]) == 2 and run["parameters"] > 0
    for name, s in record["summary"].items():
        accs = [r["test_accuracy"] for r in record["runs"] if r["model"] == name]
        assert s["n"] == 2 and s["min"] == min(accs) and s["max"] == max(accs)
        assert abs(s["mean"] - sum(accs) / 2) < 1e-4
    assert record["config"]["seeds"] == [0, 1] and record["config"]["chance"] == 0.25
    # the S6 and LTI blocks differ in the SSM only (a handful of parameters), not in size class
    params = {r["model"]: r["parameters"] for r in record["runs"]}
    assert abs(params["S6 + conv"] - params["LTI, no conv"]) < 0.1 * params["S6 + conv"]


def test_ablation_is_seeded():
    a, b = (experiments.selective_copying_ablation(seeds=(3,), steps=3, models=("S6, no conv",), n_test=8)
            for _ in range(2))  # fmt: skip
    assert a["runs"][0]["test_accuracy"] == b["runs"][0]["test_accuracy"] and a["runs"][0]["curve"] == b["runs"][0]["curve"]


def test_ablation_bad_arguments():
    with pytest.raises(ValueError, match="models must be among"):
        experiments.selective_copying_ablation(seeds=(0,), steps=2, models=("GRU",))
    with pytest.raises(ValueError, match="at least one seed"):
        experiments.selective_copying_ablation(seeds=(), steps=2)


def test_command_line_writes_the_record(tmp_path, capsys):
    out = tmp_path / "record.json"
    assert experiments.main(["selective_copying_ablation", "--seeds", "1", "--steps", "2", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["experiment"] == "selective_copying_ablation"
    assert record["command"] == f"python -m seqbook.experiments selective_copying_ablation --seeds 1 --steps 2 --out {out}"
    assert record["commit"] != "" and record["wall_seconds"] >= 0 and record["config"]["steps"] == 2
    assert record["complete"] is True and record["processes"] == 1 and record["device"] == "cpu"
    assert {r["model"] for r in record["runs"]} == set(experiments.ABLATION_MIXERS)
    assert experiments.main(["--list"]) == 0
    assert "selective_copying_ablation" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        experiments.main(["no_such_experiment"])
    with pytest.raises(SystemExit):  # this one takes no device: refused, not silently run on the CPU
        experiments.main(["selective_copying_ablation", "--device", "cuda", "--out", str(out)])
    assert "runs on the CPU only" in capsys.readouterr().err


def test_hippo_ablation_zeroes_the_frequencies_and_records_every_run():
    record = experiments.hippo_init_ablation(seeds=(0,), steps=2, length=16, n_test=8)
    assert [r["model"] for r in record["runs"]] == list(experiments.HIPPO_MIXERS)
    assert all(0 <= r["test_accuracy"] <= 1 for r in record["runs"]) and record["config"]["length"] == 16
    s4, s4_zero = (experiments.delayed_recall_model(name, 0).blocks[0].mixer for name in ("S4 (LegS)", "S4, Im Lambda = 0"))
    assert s4.Lambda_imag.abs().max() > 1 and s4_zero.Lambda_imag.abs().max() == 0
    assert torch.equal(s4.log_Lambda_real, s4_zero.log_Lambda_real)  # the same seed: only the frequencies differ
    lin, lin_zero = (experiments.delayed_recall_model(name, 0).blocks[0].mixer for name in ("S4D-Lin", "S4D-Lin, Im A = 0"))
    assert lin.A_imag.abs().max() > 1 and lin_zero.A_imag.abs().max() == 0
    with pytest.raises(ValueError, match="models must be among"):
        experiments.hippo_init_ablation(seeds=(0,), steps=2, models=("LSTM",))
