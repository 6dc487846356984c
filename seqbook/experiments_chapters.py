r"""Chapters 5, 6 and 7's recorded experiments, registered in :mod:`seqbook.experiments`.

Each runs as ``python -m seqbook.experiments NAME [--seeds N] [--steps S]`` and writes its JSON record
(the command, the commit, the date, the wall time, the machine, the seeds and every number) into the
chapter's ``results/`` folder, where the notebook reads it:

- :func:`attention_scale_ablation` (chapter 5, exercise 6): the small Transformer language model trained
  with the score scale :math:`s = 1/\sqrt{d_k}` and with :math:`s = 1`, at two head dimensions; the
  scores' spread and peakedness at initialization and after training, and the validation loss.
  -> ``chapters/05_attention/results/scale_ablation.json``
- :func:`linear_attention_mqar` (chapter 6): softmax attention against linear attention, both trained on
  multi-query associative recall (MQAR; Arora et al. 2023, "Zoology") for each number of stored pairs.
  On a GPU it runs there (several runs side by side in processes).
  -> ``chapters/06_linear_attention/results/mqar.json``
- :func:`lm_comparison` (chapter 7): RWKV-7, RWKV-6, Mamba, gated linear attention and softmax
  attention as character-level language models of about the same parameter count, same data and recipe.
  -> ``chapters/07_rwkv/results/lm_comparison.json``

These were scripts beside their records until they moved here; the records they wrote keep their
format, so the notebooks read old and new records alike.

Glossary (symbol -> shape)
--------------------------
::

    tokens   (batch, length)              int64 character or token ids
    logits   (batch, length, vocab)
    q, k     (batch, length, heads, d_k)  a layer's queries and keys (d_k = d_model / heads)
    S        (batch, heads, length, length)  scores s q_i . k_j, -inf above the diagonal (causal)
"""

from __future__ import annotations

import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

import torch
from torch import nn

from . import attention, corpus, linear_attention, tasks, train
from .mamba import Mamba
from .nn import LanguageModel
from .rwkv import RWKV6, RWKV7


def _cpu_device() -> str:
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads > 1 else ''})"


def _shakespeare() -> tuple[corpus.CharVocab, torch.Tensor, torch.Tensor]:
    """The shipped corpus as (vocabulary, training tokens, validation tokens), split as every chapter splits it."""
    text = corpus.load_text("shakespeare")
    vocab = corpus.CharVocab(text)
    train_tokens, val_tokens = corpus.split(vocab.encode(text))
    return vocab, train_tokens, val_tokens


# --------------------------------------------------------------------------------------
# Chapter 5: what the score scale 1/sqrt(d_k) does to the small Transformer
# --------------------------------------------------------------------------------------


class ScaledAttention(attention.MultiHeadAttention):
    """:class:`~seqbook.attention.MultiHeadAttention` with a chosen score scale ``s`` (``None``: ``1/sqrt(d_k)``);
    it keeps its last ``q, k`` so that the scores can be measured after a forward pass."""

    def __init__(self, d_model: int, n_heads: int, scale: float | None):
        super().__init__(d_model, n_heads)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._project(x, torch.arange(x.shape[1], device=x.device))
        self.last_qk = (q.detach(), k.detach())
        return self.out(attention.attention(q, k, v, causal=True, scale=self.scale).flatten(-2))


def score_stats(lm: LanguageModel, tokens: torch.Tensor) -> list[dict]:
    """Per layer of ``lm`` (whose mixers are :class:`ScaledAttention`), on ``tokens``: the standard deviation of
    the finite scores ``S`` and the mean largest weight of rows 16 onward (rows with enough keys to choose from)."""
    out = []
    with torch.no_grad():
        lm(tokens)
        for block in lm.blocks:
            q, k = block.mixer.last_qk
            scale = block.mixer.scale or 1 / math.sqrt(q.shape[-1])
            S = attention.attention_scores(q, k, True, scale)
            out.append({"score_std": S[torch.isfinite(S)].std().item(),
                        "mean_largest_weight": torch.softmax(S, -1).amax(-1)[..., 16:].mean().item()})  # fmt: skip
    return out


#: config name -> (heads of the width-64 model, score scale; None is 1/sqrt(d_k))
SCALE_CONFIGS: dict[str, tuple[int, float | None]] = {
    "d=16, scale 1/sqrt(d)": (4, None),
    "d=16, scale 1": (4, 1.0),
    "d=64, scale 1/sqrt(d)": (1, None),
    "d=64, scale 1": (1, 1.0),
}


def attention_scale_ablation(
    seeds=(0, 1),
    steps: int = 1000,
    *,
    configs=tuple(SCALE_CONFIGS),
    progress: bool = False,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    r"""Chapter 5's language model trained with the score scale 1/sqrt(d_k) and with scale 1, at d_k = 16 and 64.

    The chapter's model (2 layers of width 64, feed-forward 4x, context 64), for each seed and each
    config of :data:`SCALE_CONFIGS` (``d`` is the head dimension :math:`d_k`): initialized from
    ``torch.manual_seed(seed)``, trained ``steps`` AdamW steps at 3e-3 (50 warm-up steps, cosine) on
    batches of 32 drawn with ``seed``. Measured on the first 32 of 256 validation sequences (seed 10),
    at initialization and after training: the scores' spread and the mean largest weight per layer
    (:func:`score_stats`); and the validation loss on all 256.

    Returns ``{"device", "torch", "seeds", "steps", "runs": [{"config", "seed", "head_dim", "scale",
    "at_init", "trained", "val_loss", "train_loss", "seconds"}, ...]}``; ``on_run`` gets that record
    after every run.
    """
    seeds = [int(s) for s in seeds]
    unknown = [c for c in configs if c not in SCALE_CONFIGS]
    if unknown:
        raise ValueError(f"configs must be among {list(SCALE_CONFIGS)}, got {unknown}")
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    vocab, train_tokens, val_tokens = _shakespeare()
    val_x, val_y = corpus.lm_batch(val_tokens, 256, 64, generator=torch.Generator().manual_seed(10))
    record = {"device": _cpu_device(), "torch": torch.__version__, "seeds": seeds, "steps": steps, "runs": []}
    for seed in seeds:
        for name in configs:
            n_heads, scale = SCALE_CONFIGS[name]
            torch.manual_seed(seed)
            lm = LanguageModel(lambda d: ScaledAttention(d, n_heads, scale), vocab_size=len(vocab), d_model=64,
                               n_layers=2, ffn_mult=4)  # fmt: skip
            at_init = score_stats(lm, val_x[:32])
            history = train.fit(lm, lambda g: corpus.lm_batch(train_tokens, 32, 64, generator=g), steps,
                                lr=3e-3, warmup=50, seed=seed)  # fmt: skip
            record["runs"].append({"config": name, "seed": seed, "head_dim": 64 // n_heads, "scale": scale,
                                   "at_init": at_init, "trained": score_stats(lm, val_x[:32]),
                                   "val_loss": train.evaluate(lm, val_x, val_y)["loss"],
                                   "train_loss": history["loss"], "seconds": history["seconds"]})  # fmt: skip
            if progress:
                print(f"{name}, seed {seed}: validation loss {record['runs'][-1]['val_loss']:.3f}", flush=True)
            if on_run is not None:
                on_run(record)
    return record


# --------------------------------------------------------------------------------------
# Chapter 6: softmax against linear attention on multi-query associative recall
# --------------------------------------------------------------------------------------

#: mixer name -> factory (d_model, heads) -> mixer
MQAR_MIXERS: dict[str, Callable[[int, int], nn.Module]] = {
    "softmax attention": lambda d, h: attention.MultiHeadAttention(d, h),
    "linear attention": lambda d, h: linear_attention.LinearAttention(d, h),
}


class AtQueries(nn.Module):
    """The language model's logits at the last ``n_queries`` positions, where the answers are asked for."""

    def __init__(self, lm: nn.Module, n_queries: int):
        super().__init__()
        self.lm, self.n_queries = lm, n_queries

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm(tokens)[:, -self.n_queries :]


def mqar_run(mixer: str, n_pairs: int, seed: int, *, d_model: int, n_heads: int, steps: int, batch: int, lr: float,
             n_keys: int, n_values: int, device: str) -> dict:  # fmt: skip
    """One MQAR run: a 2-layer :class:`LanguageModel` around ``mixer`` (feed-forward 2x) initialized from
    ``torch.manual_seed(seed)``, trained ``steps`` AdamW steps (5% warm-up, cosine, weight decay 0.1) on fresh
    batches of ``n_pairs`` pairs drawn with ``seed``, scored on 1000 test sequences (seed 10000 + seed)."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    lm = LanguageModel(lambda d: MQAR_MIXERS[mixer](d, n_heads), vocab_size=n_keys + n_values, d_model=d_model,
                       n_layers=2, ffn_mult=2).to(device)  # fmt: skip
    model = AtQueries(lm, n_pairs)

    def data(g):
        x, y = tasks.associative_recall(batch, n_pairs, n_keys=n_keys, n_values=n_values, generator=g)
        return x.to(device), y.to(device)

    history = train.fit(model, data, steps, lr=lr, warmup=steps // 20, seed=seed, weight_decay=0.1)
    test_x, test_y = tasks.associative_recall(1000, n_pairs, n_keys=n_keys, n_values=n_values,
                                              generator=torch.Generator().manual_seed(10_000 + seed))  # fmt: skip
    score = train.evaluate(model, test_x.to(device), test_y.to(device))
    every = max(1, steps // 50)
    acc = history["accuracy"]
    return {"mixer": mixer, "n_pairs": n_pairs, "seed": seed, "test_accuracy": score["accuracy"],
            "test_loss": score["loss"], "seconds": history["seconds"],
            "train_accuracy": [sum(acc[i : i + every]) / len(acc[i : i + every]) for i in range(0, steps, every)],
            # the decoding state of one layer: linear attention's heads x d_k x d_v matrix; attention's KV cache
            # (keys and values, d_model each) over the 3 n_pairs tokens of a sequence
            "state_numbers_per_layer": (n_heads * (d_model // n_heads) ** 2 if mixer == "linear attention"
                                        else 2 * d_model * (3 * n_pairs))}  # fmt: skip


def _mqar_case(case):
    (mixer, n_pairs, seed), settings = case
    return mqar_run(mixer, n_pairs, seed, **settings)


def linear_attention_mqar(
    seeds=(0, 1, 2),
    steps: int = 4000,
    *,
    pairs=(4, 8, 16, 32, 64),
    d_model: int = 64,
    n_heads: int = 4,
    batch: int = 64,
    lr: float = 3e-3,
    n_keys: int = 64,
    n_values: int = 64,
    device: str = "auto",
    jobs: int | None = None,
    progress: bool = False,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    r"""Softmax attention against linear attention on MQAR, both trained, for each number of pairs and seed.

    Two-layer language models that differ only in the mixer (:data:`MQAR_MIXERS`), each trained on
    ``n_pairs`` key-value pairs followed by the ``n_pairs`` keys as queries (:func:`mqar_run`). ``device``
    ``"auto"`` is CUDA when there is a GPU, else the CPU; ``jobs`` runs (default: 1 on the CPU, up to 10 on
    a GPU) train side by side in processes, each one thread. The result does not depend on ``jobs``.

    Returns ``{"device", "torch", "seeds", "settings", "runs": [{"mixer", "n_pairs", "seed",
    "test_accuracy", "test_loss", "seconds", "train_accuracy": means over blocks of steps // 50,
    "state_numbers_per_layer"}, ...]}``; ``on_run`` gets that record after every run.
    """
    seeds, pairs = [int(s) for s in seeds], [int(n) for n in pairs]
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    if not pairs or min(pairs) < 1 or max(pairs) > min(n_keys, n_values):
        raise ValueError(f"pairs must be between 1 and min(n_keys, n_values) = {min(n_keys, n_values)}, got {pairs}")
    if d_model % n_heads:
        raise ValueError(f"d_model must be a multiple of n_heads, got d_model={d_model}, n_heads={n_heads}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if jobs is None:
        jobs = 1 if device == "cpu" else min(10, os.cpu_count() or 1)
    settings = dict(d_model=d_model, n_heads=n_heads, steps=steps, batch=batch, lr=lr, n_keys=n_keys,
                    n_values=n_values, device=device)  # fmt: skip
    cases = [(m, n, s) for n in pairs for s in seeds for m in MQAR_MIXERS]
    record = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else _cpu_device(),
              "torch": torch.__version__, "seeds": seeds, "settings": settings, "runs": []}  # fmt: skip
    threads = torch.get_num_threads()

    def collect(runs):
        for run in runs:
            record["runs"].append(run)
            if progress:
                print(f"{run['mixer']:>17}, {run['n_pairs']:3d} pairs, seed {run['seed']}: "
                      f"test accuracy {run['test_accuracy']:.3f} ({run['seconds']:.0f} s)", flush=True)  # fmt: skip
            if on_run is not None:
                on_run(record)

    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
            collect(pool.map(_mqar_case, [(c, settings) for c in cases]))
    else:
        try:
            collect(_mqar_case((c, settings)) for c in cases)
        finally:
            torch.set_num_threads(threads)  # mqar_run sets one thread
    return record


# --------------------------------------------------------------------------------------
# Chapter 7: five families as small character language models
# --------------------------------------------------------------------------------------

#: model name -> (mixer factory d -> mixer, ffn_mult): attention-like mixers get a feed-forward block,
#: Mamba and RWKV carry their own channel mixing.
LM_MODELS: dict[str, tuple[Callable[[int], nn.Module], int]] = {
    "RWKV-7 (ch. 7)": (lambda d: RWKV7(d, 2, d_ffn=2 * d), 0),
    "RWKV-6 (ch. 7)": (lambda d: RWKV6(d, 2, d_ffn=2 * d), 0),
    "Mamba (ch. 4)": (lambda d: Mamba(d, d_state=8), 0),
    "gated linear attention (ch. 6)": (lambda d: linear_attention.LinearAttention(d, 2, decay="gated"), 2),
    "softmax attention (ch. 5)": (lambda d: attention.MultiHeadAttention(d, 2), 2),
}

#: the recipe every model of :func:`lm_comparison` shares
LM_SETUP = dict(n_layers=2, batch=16, length=96, lr=5e-3, warmup=20, val_batch=64, val_seed=1)


def lm_comparison(
    seeds=(0,),
    steps: int = 300,
    *,
    target_params: int = 60_000,
    models=tuple(LM_MODELS),
    progress: bool = False,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    """Chapter 7's five mixers as character-level language models on the shipped Shakespeare corpus.

    Each model of :data:`LM_MODELS` gets the width (a multiple of 8 from 16 to 128) whose parameter count is
    the closest to ``target_params``, then for each seed: initialized from ``torch.manual_seed(seed)``,
    trained ``steps`` AdamW steps (:data:`LM_SETUP`: batch 16 of 96 characters, peak 5e-3, 20 warm-up
    steps, cosine) on batches drawn with ``seed``, and scored on 64 validation sequences (seed 1).

    Returns ``{"setup", "target_params", "device", "torch", "models": {name: {"d_model", "parameters",
    "train_loss", "val_loss", "val_accuracy", "seconds", "val_loss_std", "seeds", "runs"}}}``: the top-level
    numbers of a model are means over the seeds (the training-loss curve step by step; with one seed, that
    seed's numbers exactly), ``runs`` holds each seed's. ``on_run`` gets the record after every run.
    """
    seeds = [int(s) for s in seeds]
    unknown = [m for m in models if m not in LM_MODELS]
    if unknown:
        raise ValueError(f"models must be among {list(LM_MODELS)}, got {unknown}")
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    vocab, train_tokens, val_tokens = _shakespeare()
    x_val, y_val = corpus.lm_batch(val_tokens, LM_SETUP["val_batch"], LM_SETUP["length"],
                                   generator=torch.Generator().manual_seed(LM_SETUP["val_seed"]))  # fmt: skip

    def build(name, d, seed):
        factory, ffn_mult = LM_MODELS[name]
        torch.manual_seed(seed)
        return LanguageModel(factory, len(vocab), d, LM_SETUP["n_layers"], ffn_mult=ffn_mult)

    setup = dict(LM_SETUP, steps=steps, seed=seeds[0], seeds=seeds)
    record = {"setup": setup, "target_params": target_params, "device": _cpu_device(), "torch": torch.__version__,
              "models": {}}  # fmt: skip
    for name in models:
        counts = {d: sum(p.numel() for p in build(name, d, seeds[0]).parameters()) for d in range(16, 129, 8)}
        d = min(counts, key=lambda d: abs(counts[d] - target_params))
        runs = []
        for seed in seeds:
            lm = build(name, d, seed)
            start = time.perf_counter()
            history = train.fit(lm, lambda g: corpus.lm_batch(train_tokens, LM_SETUP["batch"], LM_SETUP["length"],
                                                              generator=g),
                                steps, lr=LM_SETUP["lr"], warmup=LM_SETUP["warmup"], seed=seed)  # fmt: skip
            val = train.evaluate(lm, x_val, y_val)
            runs.append(dict(seed=seed, train_loss=history["loss"], val_loss=val["loss"], val_accuracy=val["accuracy"],
                             seconds=time.perf_counter() - start))  # fmt: skip
            record["models"][name] = _mean_over_seeds(d, counts[d], runs)
            if progress:
                print(f"{name}, seed {seed}: d_model {d}, {counts[d]} parameters, validation loss {val['loss']:.3f}",
                      flush=True)  # fmt: skip
            if on_run is not None:
                on_run(record)
    return record


def _mean_over_seeds(d: int, parameters: int, runs: list[dict]) -> dict:
    """One model's entry of :func:`lm_comparison`'s record: means over ``runs`` (exact for one run), and the runs."""
    mean = {key: statistics.fmean(r[key] for r in runs) for key in ("val_loss", "val_accuracy", "seconds")}
    curve = [statistics.fmean(step) for step in zip(*(r["train_loss"] for r in runs))]
    std = statistics.stdev(r["val_loss"] for r in runs) if len(runs) > 1 else 0.0
    return dict(d_model=d, parameters=parameters, train_loss=curve, **mean, val_loss_std=std,
                seeds=[r["seed"] for r in runs], runs=runs)  # fmt: skip


#: name -> (function, default record path relative to the repository root); :mod:`seqbook.experiments` adds these
#: to its registry.
REGISTRY: dict[str, tuple[Callable, str]] = {
    "attention_scale_ablation": (attention_scale_ablation, "chapters/05_attention/results/scale_ablation.json"),
    "linear_attention_mqar": (linear_attention_mqar, "chapters/06_linear_attention/results/mqar.json"),
    "lm_comparison": (lm_comparison, "chapters/07_rwkv/results/lm_comparison.json"),
}
