"""Chapter 8's head-to-head experiment (seqbook.experiments_h2h), at tiny sizes."""

import seqbook  # noqa: F401  (first: the Triton interpreter switch)
import functools
import json
import math
import unittest.mock

import pytest
import torch

from seqbook import experiments
from seqbook import experiments_h2h as h2h
from seqbook.attention import MultiHeadAttention
from seqbook.mamba import Mamba

VOCAB = 8


def test_registered_on_the_command_line():
    fn, out = experiments.EXPERIMENTS["mqar_head_to_head"]
    assert fn is h2h.mqar_head_to_head
    assert out == "chapters/08_head_to_head/results/mqar_head_to_head.json"


def test_mqar_batch_targets_only_the_queries():
    g = torch.Generator().manual_seed(3)
    x, y = h2h.mqar_batch(5, 3, g, n_keys=4, n_values=4)
    assert x.shape == y.shape == (5, 9)
    assert (y[:, :6] == h2h.IGNORE).all()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        stored = dict(zip(row_x[0:6:2], row_x[1:6:2]))  # k_1 v_1 k_2 v_2 k_3 v_3
        assert [stored[k] for k in row_x[6:]] == row_y[6:]


@pytest.mark.parametrize("family", list(h2h.FAMILIES))
def test_every_family_builds_and_runs(family):
    model = h2h.build(family, 16, VOCAB, n_layers=2, seed=0)
    x = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    assert model(x).shape == (2, 6, VOCAB)
    again = h2h.build(family, 16, VOCAB, n_layers=2, seed=0)
    assert torch.equal(model(x), again(x))  # seeded: the same model twice


def test_hybrid_has_one_attention_layer_in_every_model():
    for _ in range(2):  # a fresh layer counter for each model built
        mixers = [b.mixer for b in h2h.build("hybrid: Mamba + 1 attention", 16, VOCAB, n_layers=3).blocks]
        assert [type(m) for m in mixers] == [Mamba, MultiHeadAttention, Mamba]


def test_state_bytes_exact():
    d, L = 16, 7
    att = h2h.build("softmax attention", d, VOCAB)
    # the KV cache: keys and values, d numbers each per token, per layer, float32
    assert h2h.state_bytes(att, L) == 2 * (2 * L * d * 4)
    assert h2h.state_bytes(att, 0) == 0
    lin = h2h.build("linear attention", d, VOCAB)
    heads, dh = 2, d // 2
    assert h2h.state_bytes(lin, L) == h2h.state_bytes(lin, 1) == 2 * (heads * dh * dh + heads * dh) * 4
    mamba = h2h.build("Mamba", d, VOCAB)
    E, N, conv = 2 * d, 8, 3
    assert h2h.state_bytes(mamba, L) == 2 * (E * N + E * conv) * 4
    s4d = h2h.build("S4D", d, VOCAB)
    assert h2h.state_bytes(s4d, L) == 2 * d * 16 * 4
    hybrid = h2h.build("hybrid: Mamba + 1 attention", d, VOCAB)
    assert h2h.state_bytes(hybrid, L) == (E * N + E * conv) * 4 + 2 * L * d * 4
    with pytest.raises(ValueError, match="length"):
        h2h.state_bytes(att, -1)


def test_state_bytes_of_the_newer_families():
    d, L = 16, 20
    m2 = h2h.build("Mamba-2", d, VOCAB)
    E, N, P = 2 * d, 32, 8  # heads of P = 8 channels, each a (P, N) state; conv over x, B, C
    assert h2h.state_bytes(m2, L) == h2h.state_bytes(m2, 1) == 2 * ((E // P) * P * N + (E + 2 * N) * 3) * 4
    based = h2h.build("Based", d, VOCAB)
    window, D, dh = 8, 1 + 8 + 64, d // 2  # sliding window of 8; Taylor features of d' = 8
    sliding = lambda t: 2 * min(t, window) * d * 4 + 8  # noqa: E731  keys and values, and an int64 position
    linear = 2 * D * (dh + 1) * 4  # S (D, d_h) and z (D,) per head
    assert h2h.state_bytes(based, 3) == sliding(3) + linear
    assert h2h.state_bytes(based, L) == h2h.state_bytes(based, 100) == sliding(L) + linear
    gla = h2h.build("GLA", d, VOCAB)
    assert h2h.state_bytes(gla, L) == 2 * 2 * dh * dh * 4
    delta = h2h.build("DeltaNet", d, VOCAB)
    assert h2h.state_bytes(delta, L) == 2 * (2 * dh * dh + 3 * 3 * d) * 4  # S per head, 3 conv taps of q, k, v


def test_matched_width_is_the_closest_count():
    d = h2h.matched_width("linear attention", 5000, VOCAB, widths=range(8, 41, 4))
    counts = {w: h2h.n_parameters(h2h.build("linear attention", w, VOCAB)) for w in range(8, 41, 4)}
    assert abs(counts[d] - 5000) == min(abs(c - 5000) for c in counts.values())


def test_tiny_run_record_and_determinism():
    seen = []
    kw = dict(seeds=(0,), steps=3, families=("linear attention", "S4D"), pair_counts=(1, 2), n_keys=4,
              n_values=4, target_params=3000, batch=4, n_test=8)
    record = h2h.mqar_head_to_head(**kw, on_run=seen.append)
    assert len(seen) == 2 and len(record["runs"]) == 2
    assert set(record["families"]) == {"linear attention", "S4D"}
    for fam, info in record["families"].items():
        assert info["parameters"] == h2h.n_parameters(h2h.build(fam, info["d_model"], 8))
        assert info["state_bytes"] > 0
    for run in record["runs"]:
        assert set(run["test_accuracy"]) == {"1", "2"}
        assert all(0.0 <= a <= 1.0 for a in run["test_accuracy"].values())
    assert record["summary"]["S4D"]["2"]["n"] == 1
    again = h2h.mqar_head_to_head(**kw)
    assert [r["test_accuracy"] for r in again["runs"]] == [r["test_accuracy"] for r in record["runs"]]


def test_state_sweep_tiny_run():
    assert experiments.EXPERIMENTS["mqar_state_sweep"] == (h2h.mqar_state_sweep,
                                                           "chapters/08_head_to_head/results/mqar_state_sweep.json")
    seen = []
    kw = dict(seeds=(0, 1), steps=2, widths={"Mamba": (8, 12), "softmax attention": (8,)}, pair_counts=(1, 2),
              n_keys=4, n_values=4, batch=4, n_test=8)
    record = h2h.mqar_state_sweep(**kw, on_run=seen.append)
    assert len(seen) == len(record["runs"]) == 6
    assert [(p["family"], p["d_model"]) for p in record["points"]] == [("Mamba", 8), ("Mamba", 12),
                                                                     ("softmax attention", 8)]  # fmt: skip
    for p in record["points"]:
        model = h2h.build(p["family"], p["d_model"], 8)
        assert p["parameters"] == h2h.n_parameters(model) and p["state_bytes"] == h2h.state_bytes(model, 6)
    cell = record["summary"]["Mamba"]["12"]
    accs = [r["test_accuracy"]["2"] for r in record["runs"] if r["family"] == "Mamba" and r["d_model"] == 12]
    assert cell["2"]["n"] == 2 and cell["2"]["min"] == min(accs) and cell["2"]["max"] == max(accs)
    assert record["summary"]["Mamba"]["12"]["state_bytes"] > record["summary"]["Mamba"]["8"]["state_bytes"]
    with pytest.raises(ValueError, match="families"):
        h2h.mqar_state_sweep(widths={"nope": (8,)})
    with pytest.raises(ValueError, match="widths"):
        h2h.mqar_state_sweep(widths={"Mamba": ()})
    with pytest.raises(ValueError, match="swept"):
        h2h.mqar_state_sweep(families=("RWKV-7",))
    part = h2h.mqar_state_sweep(**{**kw, "seeds": (1,)}, families=("softmax attention",))
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731  (a timing)
    assert [strip(r) for r in part["runs"]] == [strip(r) for r in record["runs"]
                                                if r["family"] == "softmax attention" and r["seed"] == 1]  # fmt: skip


def test_crossover_length():
    Ls = [1024, 2048, 4096, 8192]
    # power laws: log-log interpolation is exact; L^1 against L^2 / 3000 cross at L = 3000
    assert h2h.crossover_length(Ls, [L for L in Ls], [L * L / 3000 for L in Ls]) == pytest.approx(3000, rel=1e-12)
    assert h2h.crossover_length(Ls, [L * L / 3000 for L in Ls], [L for L in Ls]) == pytest.approx(3000, rel=1e-12)
    assert h2h.crossover_length(Ls, [1, 2, 4, 8], [4, 4, 4, 4]) == 4096.0  # a measured tie
    assert h2h.crossover_length(Ls, [1, 1, 1, 1], [2, 3, 4, 5]) is None  # never crosses: no extrapolation
    assert h2h.crossover_length([1, 2, 4], [1, 3, 1], [2, 2, 2]) == pytest.approx(2 ** (math.log(2) / math.log(3)))
    with pytest.raises(ValueError, match="one entry per length"):
        h2h.crossover_length(Ls, [1, 2], [1, 2])
    with pytest.raises(ValueError, match="positive"):
        h2h.crossover_length(Ls, [1, 2, 0, 1], [1, 1, 1, 1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="family"):
        h2h.build("transformer-xl", 16, VOCAB)
    with pytest.raises(ValueError, match="families"):
        h2h.mqar_head_to_head(families=("nope",))
    with pytest.raises(ValueError, match="pair_counts"):
        h2h.mqar_head_to_head(pair_counts=(4, 99), n_keys=16)
    with pytest.raises(ValueError, match="seeds"):
        h2h.mqar_head_to_head(seeds=())


# --------------------------------------------------------------------------------------
# load_results: one experiment's records (name.json, name_*.json) merged
# --------------------------------------------------------------------------------------


def _write_record(path, families, *, complete=True, lr=3e-3, device=None):
    import json

    rec = {"experiment": "x", "command": f"python -m seqbook.experiments x --families {' '.join(families)}",
           "commit": "abc", "date": "2026-12-02 10:00 UTC", "complete": complete, "wall_seconds": 1.0,
           "config": {"seeds": [0, 1], "families": list(families), "lr": lr, "device": "cpu"},
           "families": {f: {"d_model": 16} for f in families},
           "runs": [{"family": f, "seed": s, "test_accuracy": {"2": 0.5}} for f in families for s in (0, 1)],
           "summary": {f: {"2": {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5, "n": 2}} for f in families}}  # fmt: skip
    if device is not None:
        rec["device"] = device
    path.write_text(json.dumps(rec))


def test_load_results_merges_the_added_records(tmp_path):
    _write_record(tmp_path / "x.json", ["a", "b"])
    _write_record(tmp_path / "x_added.json", ["c"], device="cuda")
    _write_record(tmp_path / "y_x.json", ["d"])  # another experiment's file: not read
    r = h2h.load_results(tmp_path, "x")
    assert r["config"]["families"] == ["a", "b", "c"] and list(r["summary"]) == ["a", "b", "c"]
    assert list(r["families"]) == ["a", "b", "c"]
    assert [(run["family"], run["seed"]) for run in r["runs"]] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]
    assert [(s["file"], s["device"], s["families"]) for s in r["sources"]] == [
        ("x.json", "cpu", ["a", "b"]), ("x_added.json", "cuda", ["c"])]  # fmt: skip


def test_load_results_refuses_what_is_not_one_experiment(tmp_path):
    with pytest.raises(FileNotFoundError, match="no record"):
        h2h.load_results(tmp_path, "x")
    _write_record(tmp_path / "x.json", ["a", "b"])
    _write_record(tmp_path / "x_added.json", ["b"])
    with pytest.raises(ValueError, match=r"\['b'\] are both in x.json and x_added.json"):
        h2h.load_results(tmp_path, "x")
    _write_record(tmp_path / "x_added.json", ["c"], lr=1e-2)
    with pytest.raises(ValueError, match=r"x_added.json differs from x.json in \['lr'\]"):
        h2h.load_results(tmp_path, "x")
    _write_record(tmp_path / "x_added.json", ["c"], complete=False)
    with pytest.raises(ValueError, match="x_added.json is not complete"):
        h2h.load_results(tmp_path, "x")


@pytest.mark.parametrize("name", ["mqar_head_to_head", "copying_head_to_head", "selective_copying_head_to_head",
                                  "induction_heads_head_to_head"])  # fmt: skip
def test_committed_records_hold_every_family_with_three_seeds(name):
    from pathlib import Path

    r = h2h.load_results(Path(__file__).resolve().parent.parent / "chapters/08_head_to_head/results", name)
    assert set(r["summary"]) == set(h2h.FAMILIES)
    for fam in h2h.FAMILIES:
        assert sorted(run["seed"] for run in r["runs"] if run["family"] == fam) == [0, 1, 2], fam
    assert [s["file"] for s in r["sources"]] == [f"{name}.json", f"{name}_added.json"]


def test_build_sets_the_backend_on_every_mixer():
    for fam in ("softmax attention", "DeltaNet", "Based", "hybrid: Mamba + 1 attention"):
        model = h2h.build(fam, 16, VOCAB, backend="reference")
        has = [m for m in model.modules() if hasattr(m, "backend")]
        assert has and all(m.backend == "reference" for m in has), fam
        assert all(m.backend == "auto" for m in h2h.build(fam, 16, VOCAB).modules() if hasattr(m, "backend")), fam
    x = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    a, b = h2h.build("DeltaNet", 16, VOCAB, backend="reference"), h2h.build("DeltaNet", 16, VOCAB)
    assert torch.equal(a(x), b(x))  # on CPU tensors "auto" is the reference: the same model, the same numbers
    with pytest.raises(ValueError, match="backend"):
        h2h.build("DeltaNet", 16, VOCAB, backend="cuda")


def test_gpu_scale_run_tiny_on_the_cpu(tmp_path):
    """``mqar_gpu_scale`` (chapter 8's H200 run) at tiny arguments: the function the GPU runs, through the CLI too."""
    assert h2h.REGISTRY["mqar_gpu_scale"] == (h2h.mqar_gpu_scale,
                                              "chapters/08_head_to_head/results/mqar_gpu_scale.json")  # fmt: skip
    kw = dict(seeds=(0, 1), steps=2, families=("softmax attention", "DeltaNet"), d_model=16, pair_counts=(1, 3),
              n_keys=4, n_values=4, batch=4, n_test=8)  # fmt: skip
    seen = []
    record = h2h.mqar_gpu_scale(**kw, on_run=seen.append)
    config = record["config"]
    assert config["backend"] == "reference" and config["device"] == "cpu" and config["state_length"] == 9
    assert config["widths"] == {"softmax attention": [16], "DeltaNet": [16]}
    assert len(seen) == len(record["runs"]) == 4
    for p in record["points"]:
        model = h2h.build(p["family"], 16, 8)
        assert p["parameters"] == h2h.n_parameters(model) and p["state_bytes"] == h2h.state_bytes(model, 9)
    att = record["summary"]["softmax attention"]["16"]["state_bytes"]
    assert att == 2 * (2 * 9 * 16 * 4)  # the KV cache after 3 max(P) tokens, two layers, float32
    assert record["summary"]["DeltaNet"]["16"]["3"]["n"] == 2
    again = h2h.mqar_gpu_scale(**kw)
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731  (a timing)
    assert [strip(r) for r in again["runs"]] == [strip(r) for r in record["runs"]]  # seeded
    # the command line, as the GPU call runs it (registered here, at tiny arguments, as REGISTRY is registered there)
    out = tmp_path / "gpu_scale.json"
    small = functools.partial(h2h.mqar_gpu_scale, **{k: v for k, v in kw.items() if k not in ("seeds", "families")})
    with unittest.mock.patch.dict(experiments.EXPERIMENTS, {"mqar_gpu_scale": (small, "unused")}):
        assert experiments.main(["mqar_gpu_scale", "--seeds", "1", "--device", "cpu", "--families", "DeltaNet",
                                 "--out", str(out)]) == 0  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["device"] == "cpu" and saved["config"]["widths"] == {"DeltaNet": [16]}
    assert [(r["family"], r["seed"]) for r in saved["runs"]] == [("DeltaNet", 0)]


def test_committed_gpu_scale_records():
    """Chapter 8's section 2e: the merged mqar_gpu_scale records are one experiment, 3 seeds per family, and the
    H200 call's partial record has the same recipe (only the device differs)."""
    from pathlib import Path

    results = Path(__file__).resolve().parent.parent / "chapters/08_head_to_head/results"
    r = h2h.load_results(results, "mqar_gpu_scale")
    assert {"softmax attention", "DeltaNet"} <= set(r["summary"])
    for fam in r["summary"]:
        assert sorted(run["seed"] for run in r["runs"] if run["family"] == fam) == [0, 1, 2], fam
    assert r["config"]["pair_counts"] == [4, 8, 16, 32, 64] and r["config"]["backend"] == "reference"
    gpu = json.loads((results / "callB_h200_mqar_gpu_scale.json").read_text())
    where = ("device", "device_name", "widths")
    assert {k: v for k, v in gpu["config"].items() if k not in where} == {
        k: v for k, v in r["config"].items() if k not in where}  # fmt: skip
    assert gpu["config"]["device_name"] == "NVIDIA H200" and not gpu["complete"]
