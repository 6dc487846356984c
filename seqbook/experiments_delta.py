r"""Chapter 6's delta-rule experiment: does the delta rule recall better than additive updates, once trained?

Registered in :mod:`seqbook.experiments`, so that it runs as

    python -m seqbook.experiments delta_recall --seeds 3

and writes ``chapters/06_linear_attention/results/delta_recall.json``.

**The models.** Two-layer :class:`seqbook.nn.LanguageModel` s (a feed-forward block after each mixer)
that differ only in the mixer (:data:`FAMILIES`): softmax attention (chapter 5), linear attention
(elu + 1 features, additive), gated linear attention (vector gates, additive), DeltaNet (the delta
rule), and DeltaNet's own layer with the delta correction removed (``rule="additive"``), the control
that isolates the update rule. Each family's width is the one whose parameter count is the closest to
``target_params``; every linear model has two heads, so its state per head is ``d_k x d_v`` with
``d_k = d_model / 2``: smaller than the largest pair counts, so that the state cannot hold every pair
and how it is *overwritten* decides what is recalled.

**The task and the recipe** are chapter 8's (:mod:`seqbook.experiments_h2h`): multi-query associative
recall (``n_pairs`` key-value pairs, then every key again), one model per family and seed trained on
a mixture of ``pair_counts`` with AdamW, warm-up and cosine (:func:`seqbook.train.fit`), scored at each
pair count on a fixed test set, counting only the query positions.

Glossary (symbol -> shape)
--------------------------
::

    x       (batch, 3 n_pairs)   token ids: k_1 v_1 ... k_P v_P, then the P keys again
    y       (batch, 3 n_pairs)   int64: the value at each query position, -100 elsewhere
    P       int                  n_pairs, the number of stored pairs
    d_k     int                  d_model / n_heads, a linear model's key (and value) size per head
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

import torch
from torch import nn

from . import experiments_h2h, train
from .attention import MultiHeadAttention
from .experiments_h2h import IGNORE, _summary, mqar_batch, n_parameters, recall_accuracy
from .linear_attention import DeltaNet, GatedLinearAttention, LinearAttention
from .nn import LanguageModel

N_HEADS = 2

#: family -> mixer factory ``d_model -> mixer``; every family gets the same feed-forward block.
FAMILIES: dict[str, Callable[[int], nn.Module]] = {
    "softmax attention": lambda d: MultiHeadAttention(d, N_HEADS),
    "linear attention": lambda d: LinearAttention(d, N_HEADS),
    "GLA": lambda d: GatedLinearAttention(d, N_HEADS),
    "DeltaNet": lambda d: DeltaNet(d, N_HEADS),
    "DeltaNet layer, additive update": lambda d: DeltaNet(d, N_HEADS, rule="additive"),
}


def mqar_rewrite_batch(batch: int, n_pairs: int, generator: torch.Generator, *, n_keys: int, n_values: int,
                       n_rewrites: int):  # fmt: skip
    """MQAR where ``n_rewrites`` of the stored keys are written again with a new value before the queries:
    ``x (batch, 3 P + 2 R)`` = ``k_1 v_1 ... k_P v_P``, then ``R`` pairs ``k_i v'_i`` (``v'_i != v_i``), then the ``P``
    keys in a random order; ``y`` holds the *latest* value of each queried key (token ids) and -100 elsewhere."""
    P, R, g = n_pairs, n_rewrites, generator
    if not 0 <= R <= P:
        raise ValueError(f"n_rewrites must be an int in [0, n_pairs = {P}], got {R!r}")
    keys = torch.argsort(torch.rand(batch, n_keys, generator=g), dim=1)[:, :P]  # distinct keys per sequence
    values = torch.randint(n_values, (batch, P), generator=g)
    which = torch.argsort(torch.rand(batch, P, generator=g), dim=1)[:, :R]  # the pairs rewritten
    new = (values.gather(1, which) + torch.randint(1, n_values, (batch, R), generator=g)) % n_values  # != the old
    latest = values.scatter(1, which, new)
    asked = torch.argsort(torch.rand(batch, P, generator=g), dim=1)
    pairs = lambda k, v: torch.stack([k, v + n_keys], dim=2).flatten(1)  # noqa: E731  (values after the keys' ids)
    x = torch.cat([pairs(keys, values), pairs(keys.gather(1, which), new), keys.gather(1, asked)], dim=1)
    y = torch.full_like(x, IGNORE)
    y[:, -P:] = latest.gather(1, asked) + n_keys
    return x, y


def build(family: str, d_model: int, vocab_size: int, n_layers: int = 2, seed: int = 0) -> LanguageModel:
    """The :class:`LanguageModel` of ``family`` (a key of :data:`FAMILIES`), initialized from ``torch.manual_seed(seed)``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    torch.manual_seed(seed)
    return LanguageModel(FAMILIES[family], vocab_size, d_model, n_layers, ffn_mult=2)


def delta_recall(
    seeds=(0, 1, 2),
    steps: int = 1000,
    *,
    families=tuple(FAMILIES),
    pair_counts=(4, 8, 16, 32),
    n_keys: int = 32,
    n_values: int = 32,
    rewrite_fraction: float = 0.0,
    target_params: int = 13_000,
    n_layers: int = 2,
    batch: int = 32,
    lr: float = 1e-2,
    n_test: int = 256,
    test_seed: int = 1234,
    device: str = "cpu",
    jobs: int = 3,
    progress: bool = False,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    r"""MQAR accuracy against the number of pairs: the delta rule against additive updates and attention.

    For each family: the width closest to ``target_params``
    (:func:`seqbook.experiments_h2h.matched_width` with this module's :func:`build`); for each seed: build from ``torch.manual_seed(seed)``, train ``steps`` steps on batches whose pair count is drawn
    from ``pair_counts`` (data generator seeded with ``seed``), score on ``n_test`` fixed sequences per
    pair count (seed ``test_seed + P``). ``jobs`` processes train runs side by side (one thread each; the
    numbers do not depend on it).

    Returns ``{"config", "families": {family: {"d_model", "d_k", "parameters", "state_numbers_per_layer"}},
    "runs": [{"family", "seed", "test_accuracy": {P: acc}, "final_train_loss", "loss_curve", "seconds"}],
    "summary": {family: {P: {"mean", "std", "min", "max", "n"}}}}``; ``on_run(record)`` after every run.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"families must be among {list(FAMILIES)}, got {unknown}")
    pair_counts = [int(P) for P in pair_counts]
    if not pair_counts or min(pair_counts) < 1 or max(pair_counts) > n_keys:
        raise ValueError(f"pair_counts must be ints in [1, n_keys = {n_keys}], got {pair_counts}")
    vocab = n_keys + n_values
    config = dict(seeds=seeds, steps=steps, families=list(families), pair_counts=pair_counts, n_keys=n_keys,
                  n_values=n_values, rewrite_fraction=rewrite_fraction, target_params=target_params, n_layers=n_layers, n_heads=N_HEADS, batch=batch,
                  lr=lr, weight_decay=0.1, warmup=max(1, steps // 20), n_test=n_test, test_seed=test_seed,
                  device=device, chance=1 / n_values)  # fmt: skip
    fam_info, runs = {}, []

    def record():
        return {"config": config, "families": fam_info, "runs": runs, "summary": _summary(runs, pair_counts)}

    for fam in families:
        d = experiments_h2h.matched_width(fam, target_params, vocab, n_layers, build=build)
        d_k = d // N_HEADS
        fam_info[fam] = {"d_model": d, "d_k": d_k, "parameters": n_parameters(build(fam, d, vocab, n_layers)),
                         "state_numbers_per_layer": (None if fam == "softmax attention" else N_HEADS * d_k * d_k)}
    cases = [(fam, fam_info[fam]["d_model"], seed, config) for fam in families for seed in seeds]
    order = {(fam, seed): i for i, (fam, _, seed, _) in enumerate(cases)}

    def done(run):
        runs.append(run)
        runs.sort(key=lambda r: order[(r["family"], r["seed"])])  # the record's order does not depend on jobs
        if progress:
            print(f"{run['family']}, seed {run['seed']}: test accuracy by pairs {run['test_accuracy']} "
                  f"({run['seconds']} s)", flush=True)  # fmt: skip
        if on_run is not None:
            on_run(record())

    if jobs > 1:  # each run is seeded and single-threaded: the same numbers in any process
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for run in pool.map(_train_one, cases):  # in order; a finished run is recorded when its turn comes
                done(run)
    else:
        for case in cases:
            done(_train_one(case))
    return record()


def _train_one(case) -> dict:
    """Train and score one (family, width, seed) under ``config``: the run's record."""
    fam, d, seed, config = case
    torch.set_num_threads(1)
    n_keys, n_values, steps, device = config["n_keys"], config["n_values"], config["steps"], config["device"]
    model = build(fam, d, n_keys + n_values, config["n_layers"], seed).to(device)
    pair_counts = config["pair_counts"]

    def batch(size, P, g):
        if config["rewrite_fraction"] == 0:
            return mqar_batch(size, P, g, n_keys=n_keys, n_values=n_values)
        return mqar_rewrite_batch(size, P, g, n_keys=n_keys, n_values=n_values,
                                  n_rewrites=round(config["rewrite_fraction"] * P))  # fmt: skip

    def data(g):
        P = pair_counts[int(torch.randint(len(pair_counts), (1,), generator=g))]
        x, y = batch(config["batch"], P, g)
        return x.to(device), y.to(device)

    start = time.perf_counter()
    history = train.fit(model, data, steps, lr=config["lr"], warmup=config["warmup"], seed=seed,
                        weight_decay=config["weight_decay"])  # fmt: skip
    acc = {}
    for P in pair_counts:
        x, y = batch(config["n_test"], P, torch.Generator().manual_seed(config["test_seed"] + P))
        acc[str(P)] = round(recall_accuracy(model, x.to(device), y.to(device)), 4)
    tail = history["loss"][-max(1, steps // 10):]
    every = max(1, steps // 20)  # the training loss averaged over 20 windows: the learning curve
    curve = [sum(history["loss"][i : i + every]) / len(history["loss"][i : i + every]) for i in range(0, steps, every)]
    return {"family": fam, "seed": seed, "test_accuracy": acc, "final_train_loss": round(sum(tail) / len(tail), 4),
            "loss_curve": {"every": every, "loss": [round(x, 4) for x in curve]},
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def delta_recall_rewrites(seeds=(0, 1, 2), steps: int = 1000, *, families=("DeltaNet", "DeltaNet layer, additive update"),
                          rewrite_fraction: float = 0.5, **kwargs) -> dict:  # fmt: skip
    """MQAR with rewrites: half the stored keys get a new value before the queries; the delta rule against its control.

    :func:`delta_recall` with ``rewrite_fraction = 0.5`` (:func:`mqar_rewrite_batch`, ``round(0.5 P)`` keys
    rewritten): the task on which overwriting, the delta rule's defining difference, is needed.
    """
    return delta_recall(seeds, steps, families=families, rewrite_fraction=rewrite_fraction, **kwargs)
