r"""Chapter 8's head-to-head experiments: every mixer family of the book in one scaffold, one recipe.

Registered in :mod:`seqbook.experiments`, so that it runs as

    python -m seqbook.experiments mqar_head_to_head --seeds 2

and writes ``chapters/08_head_to_head/results/mqar_head_to_head.json``.

**The scaffold.** Every family is a :class:`seqbook.nn.LanguageModel` of ``n_layers`` residual blocks
around its mixer (:data:`FAMILIES`), its width chosen so that its parameter count is the closest to
``target_params`` (:func:`matched_width`; the counts are recorded). **The recipe.** AdamW, peak
learning rate ``lr``, weight decay 0.1, 5% linear warm-up then cosine, gradient clipping at 1,
``batch`` fresh sequences per step: the same for every family and seed (:func:`seqbook.train.fit`).

**The task.** Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"), from
:func:`seqbook.tasks.associative_recall`: ``n_pairs`` key-value pairs, then every key again, whose
value must be produced. One model per family and seed is trained on a mixture of pair counts (each
batch draws one of ``pair_counts``; Zoology also trains on a mixture), then scored at each pair
count on a fixed test set. The loss and the accuracy count only the query positions (the others
carry the target ``-100``, which cross-entropy ignores).

**The state.** :func:`state_bytes` measures the memory a model carries from one token to the next
while decoding a sequence: it runs :meth:`LanguageModel.step` over the sequence and adds up the
bytes of every tensor of the final state (attention's KV cache grows with the length; every other
state does not). S4D has no step: its state is counted from its definition (``d_model x d_state``
float32 numbers per layer, ``d_state / 2`` complex modes per channel).

Glossary (symbol -> shape)
--------------------------
::

    x       (batch, 3 n_pairs)   token ids: k_1 v_1 ... k_P v_P, then the P keys again
    y       (batch, 3 n_pairs)   int64: the value at each query position, -100 elsewhere
    logits  (batch, 3 n_pairs, vocab)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import attention, linear_attention, tasks, train
from .backend import BACKENDS
from .based import based_factory
from .mamba import Mamba, Mamba2
from .nn import S4D, LanguageModel
from .rwkv import RWKV6, RWKV7

IGNORE = -100  # F.cross_entropy's default ignore_index


def _hybrid(attention_layer: int = 1) -> Callable[[int], nn.Module]:
    """A factory that makes Mamba for every layer but ``attention_layer`` (0-based), where it makes attention.

    :class:`LanguageModel` calls its factory once per layer, in order; the counter says which layer is next.
    """
    calls = {"n": 0}

    def factory(d):
        i = calls["n"]
        calls["n"] += 1
        return attention.MultiHeadAttention(d, 2) if i == attention_layer else Mamba(d, d_state=8)

    return factory


#: family -> (mixer factory maker, ffn_mult, chapter). A *maker* (no argument) returns a fresh factory
#: ``d -> mixer``, so that the hybrid's layer counter starts at 0 for every model built.
#: Families whose mixer is attention-like (no channel mixing of its own) get a feed-forward block
#: (``ffn_mult = 2``, as in chapter 6's MQAR models); Mamba and RWKV carry their own expansion (0).
FAMILIES: dict[str, tuple[Callable[[], Callable[[int], nn.Module]], int, str]] = {
    "softmax attention": (lambda: lambda d: attention.MultiHeadAttention(d, 2), 2, "5"),
    "linear attention": (lambda: lambda d: linear_attention.LinearAttention(d, 2), 2, "6"),
    "scalar-gated linear attention": (lambda: lambda d: linear_attention.LinearAttention(d, 2, decay="gated"), 2, "6"),
    "S4D": (lambda: lambda d: S4D(d, 16), 2, "3"),
    "Mamba": (lambda: lambda d: Mamba(d, d_state=8), 0, "4"),
    "RWKV-6": (lambda: lambda d: RWKV6(d, 2, d_ffn=2 * d), 0, "7"),
    "RWKV-7": (lambda: lambda d: RWKV7(d, 2, d_ffn=2 * d), 0, "7"),
    "hybrid: Mamba + 1 attention": (_hybrid, 0, "4+5"),
    # Mamba-2 (SSD): one scalar decay per head of P = 8 channels, a larger state (N = 32 against Mamba's 8).
    "Mamba-2": (lambda: lambda d: Mamba2(d, d_state=32, headdim=8, chunk_size=16), 0, "4"),
    # Based: a sliding window of 8 tokens (layer 1), then Taylor linear attention with d' = 8 (layer 2).
    "Based": (lambda: based_factory(2, window=8, feature_dim=8), 2, "6+5"),
    # Chapter 6's vector-gated and delta-rule mixers (built on gla() and delta_rule()).
    "GLA": (lambda: lambda d: linear_attention.GatedLinearAttention(d, 2), 2, "6"),
    "DeltaNet": (lambda: lambda d: linear_attention.DeltaNet(d, 2), 2, "6"),
}

#: The short-convolution controls (same entries as :data:`FAMILIES`), for ``--families``, not part of the
#: default run. DeltaNet has a short causal convolution on ``q, k, v`` and GLA has none, so a gap between
#: them on recall mixes the update rule with the convolution; "GLA + conv" and "DeltaNet, no conv" swap it:
#: ``python -m seqbook.experiments mqar_head_to_head --families GLA "GLA + conv" DeltaNet "DeltaNet, no conv"``.
#: The book's Based has no short gated convolutions, the paper's has; "Based + conv" adds them.
CONV_VARIANTS: dict[str, tuple[Callable[[], Callable[[int], nn.Module]], int, str]] = {
    "GLA + conv": (lambda: lambda d: linear_attention.GatedLinearAttention(d, 2, conv_size=4), 2, "6"),
    "DeltaNet, no conv": (lambda: lambda d: linear_attention.DeltaNet(d, 2, conv_size=None), 2, "6"),
    # Based as Arora et al. (2024) build it, with a short gated convolution (3 taps) before each attention
    # layer: conv, window, conv, linear; and its depth control, four layers without the convolutions.
    "Based + conv": (lambda: based_factory(2, window=8, feature_dim=8, conv_size=3), 2, "6+5"),
    "Based, 4 layers": (lambda: based_factory(2, window=8, feature_dim=8), 2, "6+5"),
}

#: Variants whose depth is part of what they are: built with this many layers whatever ``n_layers`` says
#: (their width is still matched to the parameter target; the record notes each family's layers).
VARIANT_LAYERS = {"Based + conv": 4, "Based, 4 layers": 4}


def _entry(family: str):
    """``family``'s (factory maker, ffn_mult, chapter), from :data:`FAMILIES` or :data:`CONV_VARIANTS`."""
    if family in FAMILIES:
        return FAMILIES[family]
    if family in CONV_VARIANTS:
        return CONV_VARIANTS[family]
    raise ValueError(f"family must be one of {list(FAMILIES) + list(CONV_VARIANTS)}, got {family!r}")


def build(family: str, d_model: int, vocab_size: int, n_layers: int = 2, seed: int = 0,
          backend: str | None = None) -> LanguageModel:  # fmt: skip
    """The :class:`LanguageModel` of ``family`` (a key of :data:`FAMILIES` or :data:`CONV_VARIANTS`), initialized
    from ``torch.manual_seed(seed)``; ``n_layers`` blocks, or :data:`VARIANT_LAYERS`'s count for those variants.

    ``backend`` (``"auto"``, ``"reference"``, ``"triton"``), if given, is set on every sub-module that has one
    (the mixers pass it to their operation); None leaves each mixer's default, ``"auto"``."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    maker, ffn_mult, _ = _entry(family)
    n_layers = VARIANT_LAYERS.get(family, n_layers)
    torch.manual_seed(seed)
    model = LanguageModel(maker(), vocab_size, d_model, n_layers, ffn_mult=ffn_mult)
    if backend is not None:
        for m in model.modules():
            if hasattr(m, "backend"):
                m.backend = backend
    return model


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_width(family: str, target_params: int, vocab_size: int, n_layers: int = 2,
                  widths=range(16, 129, 4), *, build=build) -> int:  # fmt: skip
    """The width in ``widths`` whose model (made by ``build``, default this module's) has the parameter
    count closest to ``target_params``."""
    counts = {d: n_parameters(build(family, d, vocab_size, n_layers)) for d in widths}
    return min(counts, key=lambda d: abs(counts[d] - target_params))


#: config keys that name what a record ran (and so differ between the records of one experiment)
_PER_RECORD = ("families", "widths")


def load_results(results_dir, name: str) -> dict:
    """Every committed record of experiment ``name`` in ``results_dir``, merged into one.

    An experiment's families are sometimes run as several processes, or added later with ``--families
    ... --out``: ``name.json`` and then ``name_*.json`` (``_added``, ``_b``, ...). This reads them all
    (sorted by file name, ``name.json`` first) and checks that they are one experiment: every record
    complete, the same config except the families (or widths) it ran, no family in two records. It
    returns the first record's ``config`` with the families (widths) of all, ``families`` and
    ``summary`` (dicts by family) joined, ``runs`` (and ``points``) concatenated, and ``sources``: one
    entry per file with its ``file``, ``command``, ``commit``, ``date``, ``wall_seconds``, ``device``,
    ``machine`` and ``families``, so that a page can say where each number came from. (Records made
    before ``--device`` existed have no ``device``: their experiments took none and ran on the CPU.)
    """
    results_dir = Path(results_dir)
    paths = sorted(results_dir.glob(f"{name}_*.json"))
    main = results_dir / f"{name}.json"
    if not main.exists():
        raise FileNotFoundError(f"load_results: no record {main}")
    merged, seen = None, {}
    for path in [main, *paths]:
        rec = json.loads(path.read_text())
        if not rec.get("complete"):
            raise ValueError(f"load_results: {path.name} is not complete (the run stopped before its end)")
        config = rec["config"]
        fams = list(config.get("families") or config.get("widths") or rec.get("families") or [])
        twice = [f for f in fams if f in seen]
        if twice:
            raise ValueError(f"load_results: {twice} are both in {seen[twice[0]]} and {path.name}")
        seen.update(dict.fromkeys(fams, path.name))
        source = {"file": path.name, "command": rec["command"], "commit": rec["commit"], "date": rec["date"],
                  "wall_seconds": rec["wall_seconds"], "device": rec.get("device", config.get("device", "cpu")),
                  "machine": rec.get("machine"), "families": fams}  # fmt: skip
        if merged is None:
            merged = {k: v for k, v in rec.items() if k not in ("experiment", "command", "commit", "date", "complete",
                                                                "wall_seconds", "threads", "processes", "device",
                                                                "machine")}  # fmt: skip
            merged["config"] = dict(config)
            merged["sources"] = [source]
            continue
        first = merged["config"]
        differ = sorted(k for k in set(first) | set(config) if k not in _PER_RECORD and first.get(k) != config.get(k))
        if differ:
            raise ValueError(f"load_results: {path.name} differs from {main.name} in {differ}: not one experiment")
        for key in _PER_RECORD:
            if isinstance(first.get(key), list):
                first[key] = first[key] + list(config[key])
            elif isinstance(first.get(key), dict):
                first[key] = {**first[key], **config[key]}
        for key, value in rec.items():
            if key in ("families", "summary") or (isinstance(value, dict) and key in merged and key != "config"):
                merged[key] = {**merged.get(key, {}), **value}
            elif key in ("runs", "points"):
                merged[key] = merged.get(key, []) + value
        merged["sources"].append(source)
    return merged


def _tensor_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    return sum(_tensor_bytes(s) for s in state)


@torch.no_grad()
def state_bytes(model: LanguageModel, length: int) -> int:
    """Bytes of the decoding state of ``model`` for one sequence after ``length`` tokens (see the module docstring)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0, got {length!r}")
    total = 0
    steppers = []
    for block in model.blocks:
        m = block.mixer
        if isinstance(m, S4D):  # a diagonal SSM: d_state real numbers per channel (d_state/2 complex modes)
            total += m.d_model * m.d_state * 4
        elif hasattr(m, "step"):
            steppers.append(block)
        else:
            raise TypeError(f"state_bytes: no state known for {type(m).__name__}")
    p = model.embedding.weight
    d = p.shape[1]
    for block in steppers:  # each block stepped alone: the size of a state does not depend on its inputs
        state = block.mixer.init_state(1, device=p.device, dtype=p.dtype)
        x = torch.zeros(1, d, dtype=p.dtype, device=p.device)
        for _ in range(length):
            _, state = block.mixer.step(x, state)
        total += _tensor_bytes(state)
    return total


def crossover_length(lengths, t_a, t_b) -> float | None:
    r"""The length at which curve ``a`` and curve ``b`` (times measured at the same ``lengths``) cross:
    the first sign change of :math:`\log(t_a / t_b)` between two consecutive measured lengths, interpolated
    linearly in :math:`(\log L, \log t_a/t_b)`, which is exact when both curves are power laws (straight
    lines on log-log axes) between the two points. A measured tie is that length; no sign change: None (the
    curves are not extrapolated past what was measured).

    Chapter 8 reads the length where a linear-time kernel overtakes attention off measured H200 times.
    """
    if len(lengths) != len(t_a) or len(lengths) != len(t_b):
        raise ValueError(f"lengths, t_a and t_b must have one entry per length, got {len(lengths)}, {len(t_a)}, {len(t_b)}")
    if any(t <= 0 for t in list(t_a) + list(t_b)) or any(L <= 0 for L in lengths):
        raise ValueError("lengths and times must be positive (they are compared on log axes)")
    r = [math.log(a / b) for a, b in zip(t_a, t_b)]
    for i, ri in enumerate(r):
        if ri == 0:
            return float(lengths[i])
        if i + 1 < len(r) and ri * r[i + 1] < 0:
            f = ri / (ri - r[i + 1])
            return math.exp(math.log(lengths[i]) + f * (math.log(lengths[i + 1]) - math.log(lengths[i])))
    return None


def mqar_batch(batch: int, n_pairs: int, generator: torch.Generator, *, n_keys: int, n_values: int):
    """An MQAR batch for a full-length language model: ``x (batch, 3 P)``, ``y (batch, 3 P)`` with -100 off the queries."""
    x, answers = tasks.associative_recall(batch, n_pairs, n_keys=n_keys, n_values=n_values, generator=generator)
    y = torch.full_like(x, IGNORE)
    y[:, -n_pairs:] = answers
    return x, y


@torch.no_grad()
def recall_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of query positions (``y != -100``) whose most likely token is the stored value."""
    was = model.training
    model.eval()
    pred = model(x).argmax(-1)
    model.train(was)
    mask = y != IGNORE
    return (pred[mask] == y[mask]).float().mean().item()


def _summary(runs: list[dict], pair_counts) -> dict:
    """family -> pair count -> mean, std (over seeds), min, max, n of the test accuracy."""
    out = {}
    for fam in dict.fromkeys(r["family"] for r in runs):
        out[fam] = {}
        for P in pair_counts:
            a = torch.tensor([r["test_accuracy"][str(P)] for r in runs if r["family"] == fam], dtype=torch.float64)
            out[fam][str(P)] = {"mean": round(a.mean().item(), 4),
                                "std": round(a.std().item(), 4) if len(a) > 1 else 0.0,
                                "min": round(a.min().item(), 4), "max": round(a.max().item(), 4), "n": len(a)}  # fmt: skip
    return out


def _check_mqar_args(seeds, families, pair_counts, n_keys):
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    unknown = [f for f in families if f not in FAMILIES and f not in CONV_VARIANTS]
    if unknown:
        raise ValueError(f"families must be among {list(FAMILIES) + list(CONV_VARIANTS)}, got {unknown}")
    pair_counts = [int(P) for P in pair_counts]
    if not pair_counts or min(pair_counts) < 1 or max(pair_counts) > n_keys:
        raise ValueError(f"pair_counts must be ints in [1, n_keys = {n_keys}], got {pair_counts}")
    return seeds, pair_counts


def _train_and_score(fam: str, d: int, seed: int, tests: dict, *, pair_counts, n_keys, n_values, n_layers, steps,
                     batch, lr, device, progress, backend=None) -> dict:  # fmt: skip
    """Train ``build(fam, d, ..., seed, backend)`` on the MQAR mixture of ``pair_counts`` with the chapter's recipe
    and score it on ``tests`` (``P -> (x, y)``); returns the run's record (without family and seed)."""
    model = build(fam, d, n_keys + n_values, n_layers, seed, backend=backend).to(device)

    def data(g):
        P = pair_counts[int(torch.randint(len(pair_counts), (1,), generator=g))]
        x, y = mqar_batch(batch, P, g, n_keys=n_keys, n_values=n_values)
        return x.to(device), y.to(device)

    start = time.perf_counter()
    history = train.fit(model, data, steps, lr=lr, warmup=max(1, steps // 20), seed=seed, weight_decay=0.1,
                        progress=progress, log_every=max(1, steps // 4))  # fmt: skip
    acc = {str(P): round(recall_accuracy(model, x.to(device), y.to(device)), 4) for P, (x, y) in tests.items()}
    tail = history["loss"][-max(1, steps // 10):]
    if progress:
        print(f"  test accuracy by pairs: {acc}", flush=True)
    return {"test_accuracy": acc, "final_train_loss": round(sum(tail) / len(tail), 4),
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def _test_sets(pair_counts, n_test, test_seed, n_keys, n_values) -> dict:
    return {P: mqar_batch(n_test, P, torch.Generator().manual_seed(test_seed + P), n_keys=n_keys, n_values=n_values)
            for P in pair_counts}  # fmt: skip


def mqar_head_to_head(
    seeds=(0, 1),
    steps: int = 400,
    *,
    families=tuple(FAMILIES),
    pair_counts=(2, 4, 8, 16),
    n_keys: int = 16,
    n_values: int = 16,
    target_params: int = 20_000,
    n_layers: int = 2,
    batch: int = 32,
    lr: float = 3e-3,
    n_test: int = 256,
    test_seed: int = 1234,
    device: str = "cpu",
    progress: bool = False,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    r"""MQAR accuracy against the number of key-value pairs, for every family at matched parameters.

    For each family: the width closest to ``target_params`` (:func:`matched_width`); for each seed:
    build the model from ``torch.manual_seed(seed)``, train it ``steps`` steps on batches whose pair
    count is drawn from ``pair_counts`` (data generator seeded with ``seed``), then score it on a
    fixed test set of ``n_test`` sequences per pair count (seed ``test_seed + P``). The state size
    (:func:`state_bytes`) is measured at the longest test length, ``3 max(pair_counts)`` tokens.

    Returns ``{"config", "families": {family: {"d_model", "parameters", "state_bytes", "chapter"}},
    "runs": [{"family", "seed", "test_accuracy": {P: acc}, "final_train_loss", "seconds"}],
    "summary": {family: {P: {"mean", "std", "min", "max", "n"}}}}``; ``on_run(record)`` after every run.
    """
    seeds, pair_counts = _check_mqar_args(seeds, families, pair_counts, n_keys)
    vocab = n_keys + n_values
    tests = _test_sets(pair_counts, n_test, test_seed, n_keys, n_values)
    config = dict(seeds=seeds, steps=steps, families=list(families), pair_counts=pair_counts, n_keys=n_keys,
                  n_values=n_values, target_params=target_params, n_layers=n_layers, batch=batch, lr=lr,
                  weight_decay=0.1, warmup=max(1, steps // 20), n_test=n_test, test_seed=test_seed, device=device,
                  chance=1 / n_values, state_dtype="float32",
                  state_length=3 * max(pair_counts))  # fmt: skip
    fam_info, runs = {}, []

    def record():
        return {"config": config, "families": fam_info, "runs": runs, "summary": _summary(runs, pair_counts)}

    for fam in families:
        d = matched_width(fam, target_params, vocab, n_layers)
        probe = build(fam, d, vocab, n_layers)
        fam_info[fam] = {"d_model": d, "parameters": n_parameters(probe), "chapter": _entry(fam)[2],
                         "n_layers": len(probe.blocks),
                         "state_bytes": state_bytes(probe, 3 * max(pair_counts)),
                         "state_bytes_per_length": {str(3 * P): state_bytes(probe, 3 * P) for P in pair_counts}}  # fmt: skip
        for seed in seeds:
            if progress:
                print(f"{fam} (d_model {d}, {fam_info[fam]['parameters']} parameters), seed {seed}", flush=True)
            run = _train_and_score(fam, d, seed, tests, pair_counts=pair_counts, n_keys=n_keys, n_values=n_values,
                                   n_layers=n_layers, steps=steps, batch=batch, lr=lr, device=device,
                                   progress=progress)  # fmt: skip
            runs.append({"family": fam, "seed": seed, **run})
            if on_run is not None:
                on_run(record())
    return record()


#: The recall-memory sweep's families and widths: three widths, so that a state spans a factor of 4
#: (attention's cache grows with d) to 16 (the matrix states, with d^2); Mamba at two (its readable
#: scan is the slowest to train here: about 0.7 s a step at d = 64 on this loaded CPU).
SWEEP_WIDTHS = {
    "softmax attention": (16, 32, 64),
    "Mamba": (16, 32),
    "GLA": (16, 32, 64),
    "DeltaNet": (16, 32, 64),
    "Based": (16, 32, 64),
}


def mqar_state_sweep(
    seeds=(0, 1, 2),
    steps: int = 400,
    *,
    widths: dict | None = None,
    families=None,
    pair_counts=(2, 4, 8, 16),
    n_keys: int = 16,
    n_values: int = 16,
    n_layers: int = 2,
    batch: int = 32,
    lr: float = 3e-3,
    n_test: int = 256,
    test_seed: int = 1234,
    device: str = "cpu",
    backend: str | None = None,
    progress: bool = False,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    r"""Recall against the decoding state's size (Arora et al. 2024, Fig. 2): each family at several widths.

    For each family and width in ``widths`` (default :data:`SWEEP_WIDTHS`; only ``families`` of it if
    given) and each seed: the recipe
    and task of :func:`mqar_head_to_head` (trained on the mixture of ``pair_counts``, scored at each
    of them); the model's decoding state in bytes (:func:`state_bytes`) at the longest test length
    ``3 max(pair_counts)``. The figure puts that state on the x-axis and the accuracy at the hardest
    pair count on the y-axis: one curve per family, the trade-off between memory and recall.
    ``backend``: for :func:`build` (None: the mixers' default); recorded in the config when given.

    Returns ``{"config", "points": [{"family", "d_model", "parameters", "state_bytes"}],
    "runs": [{"family", "d_model", "seed", "test_accuracy", ...}], "summary": {family: {d_model: {"parameters",
    "state_bytes", P: {"mean", "std", "min", "max", "n"}}}}}``; ``on_run(record)`` after every run.
    """
    widths = {f: tuple(int(d) for d in ds) for f, ds in (SWEEP_WIDTHS if widths is None else widths).items()}
    if families is not None:  # a subset, e.g. to run the sweep as several processes (--families)
        missing = [f for f in families if f not in widths]
        if missing:
            raise ValueError(f"families must be among the swept {list(widths)}, got {missing}")
        widths = {f: widths[f] for f in families}
    seeds, pair_counts = _check_mqar_args(seeds, tuple(widths), pair_counts, n_keys)
    if any(not ds or min(ds) < 1 for ds in widths.values()):
        raise ValueError(f"widths must map each family to positive ints, got {widths}")
    vocab = n_keys + n_values
    tests = _test_sets(pair_counts, n_test, test_seed, n_keys, n_values)
    config = dict(seeds=seeds, steps=steps, widths={f: list(ds) for f, ds in widths.items()}, pair_counts=pair_counts,
                  n_keys=n_keys, n_values=n_values, n_layers=n_layers, batch=batch, lr=lr, weight_decay=0.1,
                  warmup=max(1, steps // 20), n_test=n_test, test_seed=test_seed, device=device, chance=1 / n_values,
                  state_dtype="float32", state_length=3 * max(pair_counts))  # fmt: skip
    if backend is not None:  # only when given, so that the records made before this option stay one experiment
        config["backend"] = backend
    if str(device).startswith("cuda"):  # which GPU (the record's machine describes the host only)
        config["device_name"] = torch.cuda.get_device_name(device)
    points, runs = [], []

    def record():
        summary = {}
        for pt in points:
            these = [r for r in runs if r["family"] == pt["family"] and r["d_model"] == pt["d_model"]]
            if these:
                by_p = _summary([{**r, "family": "x"} for r in these], pair_counts)["x"]
                summary.setdefault(pt["family"], {})[str(pt["d_model"])] = {
                    "parameters": pt["parameters"], "state_bytes": pt["state_bytes"], **by_p}  # fmt: skip
        return {"config": config, "points": points, "runs": runs, "summary": summary}

    for fam, ds in widths.items():
        for d in ds:
            probe = build(fam, d, vocab, n_layers)
            points.append({"family": fam, "d_model": d, "parameters": n_parameters(probe),
                           "state_bytes": state_bytes(probe, 3 * max(pair_counts))})  # fmt: skip
            for seed in seeds:
                if progress:
                    print(f"{fam} (d_model {d}, {points[-1]['parameters']} parameters, "
                          f"{points[-1]['state_bytes']} B state), seed {seed}", flush=True)  # fmt: skip
                run = _train_and_score(fam, d, seed, tests, pair_counts=pair_counts, n_keys=n_keys,
                                       n_values=n_values, n_layers=n_layers, steps=steps, batch=batch, lr=lr,
                                       device=device, progress=progress, backend=backend)  # fmt: skip
                runs.append({"family": fam, "d_model": d, "seed": seed, **run})
                if on_run is not None:
                    on_run(record())
    return record()


#: The GPU-scale run's default families (one width each): attention, the best fixed-state recaller of section 2
#: (DeltaNet) and Mamba; others join with ``--families`` (e.g. the Mamba hybrid), each group its own record.
SCALE_FAMILIES = ("softmax attention", "DeltaNet", "Mamba")


def mqar_gpu_scale(
    seeds=(0, 1, 2),
    steps: int = 600,
    *,
    families=SCALE_FAMILIES,
    d_model: int = 64,
    pair_counts=(4, 8, 16, 32, 64),
    n_keys: int = 64,
    n_values: int = 64,
    n_layers: int = 2,
    batch: int = 64,
    lr: float = 3e-3,
    n_test: int = 256,
    test_seed: int = 1234,
    device: str = "cpu",
    backend: str | None = "reference",
    progress: bool = False,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    r"""MQAR at 4 times the pairs, keys and parameters of chapter 8's section 2, made for a GPU.

    :func:`mqar_state_sweep` with every family of ``families`` at one width ``d_model`` (default 64: 76k to
    85k parameters, against section 2's 20k; the Mamba hybrid has 63k), trained ``steps`` steps of
    ``batch`` sequences on the mixture of ``pair_counts`` (up to 64 pairs over 64 keys: sequences of up
    to 192 tokens) and scored at each pair count; the decoding state in bytes at the longest test
    length. At 64 pairs a fixed state is at its limit: a head reading keys of ``d_k = 32`` numbers
    linearly stores at most 32 pairs exactly (Exercise 3; two heads per layer at this width), while
    attention's cache holds all of them. Made for a GPU
    (``device="cuda"``: a training step is 500 to 1300 small launches). Measured on the H200 only under
    contention (GPU call B of 2026-12-02, six other processes on the GPU): attention's run of 600 steps
    took 20 s (33 ms a step); on a quiet GPU the defaults are estimated at about a minute, not measured.
    On this book's loaded CPU a run took 1.5 to 6 minutes (attention, DeltaNet) and 13 (Mamba). The same
    function runs on the CPU at small arguments (the tests). The recipe was set by single-seed CPU runs
    of attention (the family slowest to start recalling): trained on 8 to 64 pairs it was still near
    chance after 600 steps; with 4 pairs added it recalled every pair (1.00 at each P), while 400
    steps of batch 128 left it at 0.43 (P = 4) to 0.08 (P = 64).

    ``backend="reference"``: the readable PyTorch forms of every mixer, also on CUDA. At these sizes a
    training step is a few hundred small launches whatever runs them, and the readable forms need no
    compiling (the kernels are checked against them elsewhere). Returns :func:`mqar_state_sweep`'s record.
    """
    return mqar_state_sweep(seeds, steps, widths={f: (d_model,) for f in families}, pair_counts=pair_counts,
                            n_keys=n_keys, n_values=n_values, n_layers=n_layers, batch=batch, lr=lr, n_test=n_test,
                            test_seed=test_seed, device=device, backend=backend, progress=progress,
                            on_run=on_run)  # fmt: skip


#: Experiments of this module that :mod:`seqbook.experiments` registers with one ``EXPERIMENTS.update``:
#: name -> (function, default output path relative to the repository root).
REGISTRY: dict[str, tuple[Callable, str]] = {
    "mqar_gpu_scale": (mqar_gpu_scale, "chapters/08_head_to_head/results/mqar_gpu_scale.json"),
}
