r"""Chapter 8's copying experiments: copying, selective copying and induction heads, every family head to head.

Registered in :mod:`seqbook.experiments`, so that each runs as

    python -m seqbook.experiments copying_head_to_head --seeds 3
    python -m seqbook.experiments selective_copying_head_to_head --seeds 3
    python -m seqbook.experiments induction_heads_head_to_head --seeds 3

and writes ``chapters/08_head_to_head/results/<name>.json``.

**The scaffold and the recipe** are chapter 8's MQAR run's (:mod:`seqbook.experiments_h2h`): each
family is a :class:`seqbook.nn.LanguageModel` of ``n_layers`` residual blocks around its mixer, its
width matched to ``target_params`` (:func:`~seqbook.experiments_h2h.matched_width`), trained with
:func:`seqbook.train.fit` (AdamW, peak ``lr``, weight decay 0.1, 5% warm-up then cosine, clipping
at 1) on ``batch`` fresh sequences per step. Only the task changes:

- **copying** (Jelassi et al. 2024, "Repeat After Me"; :func:`seqbook.tasks.copying`): a string of
  ``n`` symbols, a separator, the string again. Trained on lengths drawn uniformly from
  ``train_lengths`` (one length per batch), scored at every length of ``test_lengths``, within and
  beyond the training range (length generalization). The score is the fraction of strings copied
  exactly (every token right; the same as greedy decoding from the separator) and the per-token
  accuracy.
- **selective copying** (Gu and Dao 2023, "Mamba", Sec. 4.1.1; :func:`seqbook.tasks.selective_copying_ids`):
  ``n_tokens`` coloured tokens scattered among blanks, to be repeated at the markers.
- **induction heads** (Gu and Dao 2023, Sec. 4.1.2; :func:`seqbook.tasks.induction_heads`): the token
  that followed a trigger, asked for at the end; trained at one length, scored at longer ones.

Every run also records a **learning curve**: accuracy on a small fixed probe set, measured every
``curve_every`` steps (before that step's update) and at the end, against the number of training
sequences seen (``step * batch``): how many examples each family needs.

**The state-size bound.** After the separator, a recurrent model's whole knowledge of the string is
its state; a state of :math:`S` bits takes at most :math:`2^S` values, and :math:`A^n` strings must
lead to :math:`A^n` different copies, so at most a fraction :math:`2^S / A^n` of the strings can be
copied exactly (the counting behind Jelassi et al. 2024's bound on what a fixed state can copy).
:func:`copy_bound_length` is the longest :math:`n` with :math:`n \log_2 A \le S`, with :math:`S` the
measured state bytes times 8.
Attention's state (the KV cache) grows with the string, and has no such bound.

Glossary (symbol -> shape)
--------------------------
::

    x       (batch, length)          token ids
    y       (batch, length)          int64 targets, -100 where nothing is scored
    logits  (batch, length, vocab)
    A       n_symbols                the alphabet's size; a copied string carries n log2 A bits
    S       8 * state_bytes          bits of a fixed-size decoding state
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn

from . import tasks, train
from .experiments_h2h import CONV_VARIANTS, FAMILIES, IGNORE, _entry, build, matched_width, n_parameters, state_bytes

#: The families run by default: softmax attention, the Mamba + attention hybrid, Mamba, linear attention and
#: RWKV-6 (chapters 4-7). The others of :data:`seqbook.experiments_h2h.FAMILIES` run when asked for
#: (``families=...``); the committed runs leave them out, and use batches of 16, to fit a CPU shared by many
#: jobs (about 6 CPU-minutes for the three runs).
DEFAULT_FAMILIES = ("softmax attention", "hybrid: Mamba + 1 attention", "Mamba", "linear attention", "RWKV-6")


@torch.no_grad()
def scored_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(token accuracy, sequence accuracy)`` on the scored positions (``y != -100``): the fraction of
    scored tokens predicted right, and the fraction of rows with every scored token right."""
    was = model.training
    model.eval()
    pred = model(x).argmax(-1)
    model.train(was)
    mask = y != IGNORE
    right = (pred == y) & mask
    token = right.sum().item() / mask.sum().item()
    sequence = (right | ~mask).all(dim=1).float().mean().item()
    return token, sequence


def copy_bound_length(state_bytes: int, n_symbols: int) -> int:
    r"""The longest string of ``n_symbols`` symbols a state of ``state_bytes`` bytes can hold:
    :math:`\lfloor 8\,\text{state\_bytes} / \log_2 A \rfloor`. Longer strings cannot all be copied."""
    if isinstance(state_bytes, bool) or not isinstance(state_bytes, int) or state_bytes < 0:
        raise ValueError(f"state_bytes must be an int >= 0, got {state_bytes!r}")
    if isinstance(n_symbols, bool) or not isinstance(n_symbols, int) or n_symbols < 2:
        raise ValueError(f"n_symbols must be an int >= 2, got {n_symbols!r}")
    bits = 8 * state_bytes
    n = math.floor(bits / math.log2(n_symbols))
    # the float quotient can land one off an exact integer; settle it by counting: A^n <= 2^bits < A^(n+1)
    while n_symbols ** (n + 1) <= 2**bits:
        n += 1
    while n > 0 and n_symbols**n > 2**bits:
        n -= 1
    return n


def _stats(values: list[float]) -> dict:
    a = torch.tensor(values, dtype=torch.float64)
    return {"mean": round(a.mean().item(), 4), "std": round(a.std().item(), 4) if len(a) > 1 else 0.0,
            "min": round(a.min().item(), 4), "max": round(a.max().item(), 4), "n": len(a)}  # fmt: skip


METRICS = ("token_accuracy", "sequence_accuracy")


def _summary(runs: list[dict], metrics: tuple[str, ...] = METRICS) -> dict:
    """family -> metric -> length -> mean, std (over seeds), min, max, n."""
    out = {}
    for fam in dict.fromkeys(r["family"] for r in runs):
        mine = [r for r in runs if r["family"] == fam]
        out[fam] = {m: {L: _stats([r[m][L] for r in mine]) for L in mine[0][m]} for m in metrics}
    return out


def _head_to_head(
    config: dict,
    batch_fn: Callable[[int, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]],
    vocab: int,
    *,
    state_length: Callable[[int], int],
    progress: bool,
    on_run: Callable[[dict], None] | None,
) -> dict:
    """Train and score every family and seed of ``config`` on ``batch_fn(batch, L, generator) -> (x, y)``.

    Training batches take ``L`` uniformly from ``config["train_lengths"]``; the test set at each ``L``
    of ``config["test_lengths"]`` has ``n_test`` rows (seed ``test_seed + L``), the probe set for the
    curve ``n_probe`` rows at ``curve_length`` (seed ``test_seed - 1``). ``state_length(L)`` is the
    number of tokens a model has read when it must start answering at task length ``L`` (where its
    state is measured). Every run records both :data:`METRICS` at every test length and on its curve."""
    seeds, families, device = config["seeds"], config["families"], config["device"]
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    unknown = [f for f in families if f not in FAMILIES and f not in CONV_VARIANTS]  # the controls run when asked for
    if unknown:
        raise ValueError(f"families must be among {list(FAMILIES) + list(CONV_VARIANTS)}, got {unknown}")
    train_lengths, test_lengths = list(config["train_lengths"]), list(config["test_lengths"])
    tests = {L: batch_fn(config["n_test"], L, torch.Generator().manual_seed(config["test_seed"] + L))
             for L in test_lengths}  # fmt: skip
    probe = batch_fn(config["n_probe"], config["curve_length"], torch.Generator().manual_seed(config["test_seed"] - 1))
    probe = tuple(t.to(device) for t in probe)
    n_layers, steps, batch, every = config["n_layers"], config["steps"], config["batch"], config["curve_every"]
    fam_info, runs = {}, []

    def record():
        return {"config": config, "families": fam_info, "runs": runs, "summary": _summary(runs)}

    for fam in families:
        d = matched_width(fam, config["target_params"], vocab, n_layers)
        model = build(fam, d, vocab, n_layers)
        by_length = {str(L): state_bytes(model, state_length(L)) for L in test_lengths}
        fixed = len(set(by_length.values())) == 1
        info = {"d_model": d, "parameters": n_parameters(model), "chapter": _entry(fam)[2], "n_layers": len(model.blocks),
                "state_bytes": by_length, "fixed_state": fixed}  # fmt: skip
        if fixed and config["task"] == "copying":
            info["bound_length"] = copy_bound_length(by_length[str(test_lengths[0])], config["n_symbols"])
        fam_info[fam] = info
        for seed in seeds:
            model = build(fam, d, vocab, n_layers, seed).to(device)
            if progress:
                print(f"{fam} (d_model {d}, {info['parameters']} parameters), seed {seed}", flush=True)
            curve = []
            calls = {"n": 0}

            def data(g):
                # the learning curve, measured before every curve_every-th update (fit calls this once per step)
                if calls["n"] % every == 0:
                    curve.append([calls["n"] * batch, *(round(a, 4) for a in scored_accuracy(model, *probe))])
                calls["n"] += 1
                L = train_lengths[int(torch.randint(len(train_lengths), (1,), generator=g))]
                x, y = batch_fn(batch, L, g)
                return x.to(device), y.to(device)

            start = time.perf_counter()
            history = train.fit(model, data, steps, lr=config["lr"], warmup=max(1, steps // 20), seed=seed,
                                weight_decay=0.1, progress=progress, log_every=max(1, steps // 4))  # fmt: skip
            curve.append([steps * batch, *(round(a, 4) for a in scored_accuracy(model, *probe))])
            scores = {L: scored_accuracy(model, x.to(device), y.to(device)) for L, (x, y) in tests.items()}
            run = {"family": fam, "seed": seed}
            for i, m in enumerate(METRICS):
                run[m] = {str(L): round(s[i], 4) for L, s in scores.items()}
            tail = history["loss"][-max(1, steps // 10):]
            run.update(final_train_loss=round(sum(tail) / len(tail), 4), curve=curve,
                       seconds=round(time.perf_counter() - start, 1))  # fmt: skip
            runs.append(run)
            if progress:
                print(f"  token accuracy by length: {run['token_accuracy']}", flush=True)
            if on_run is not None:
                on_run(record())
    return record()


def _config(**kw) -> dict:
    seeds = [int(s) for s in kw.pop("seeds")]
    families = list(kw.pop("families"))
    steps = kw["steps"]
    return dict(seeds=seeds, families=families, **kw, weight_decay=0.1, warmup=max(1, steps // 20))


def copying_head_to_head(
    seeds=(0, 1, 2),
    steps: int = 400,
    *,
    families=DEFAULT_FAMILIES,
    n_symbols: int = 16,
    train_lengths=tuple(range(2, 11)),
    test_lengths=(4, 8, 10, 12, 16, 24),
    target_params: int = 20_000,
    n_layers: int = 2,
    batch: int = 16,
    lr: float = 3e-3,
    n_test: int = 128,
    n_probe: int = 64,
    curve_every: int = 40,
    curve_length: int = 10,
    test_seed: int = 4321,
    device: str = "cpu",
    progress: bool = False,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    r"""Copying (Jelassi et al. 2024) for every family at matched parameters: trained on strings of
    ``train_lengths`` symbols, scored at ``test_lengths`` (string accuracy and token accuracy), with a
    learning curve at ``curve_length`` and each fixed-state model's bound (:func:`copy_bound_length`).

    Returns ``{"config", "families": {family: {"d_model", "parameters", "chapter", "state_bytes": {n: bytes
    after n + 1 tokens}, "fixed_state", "bound_length" (fixed states only)}}, "runs": [{"family", "seed",
    "token_accuracy": {n: acc}, "sequence_accuracy": {n: fraction of strings copied exactly},
    "final_train_loss", "curve": [[sequences seen, token accuracy, sequence accuracy] on the probe set at
    curve_length, ...], "seconds"}], "summary": {family: {metric: {n: {"mean", "std",
    "min", "max", "n"}}}}}``; ``on_run(record)`` after every run.
    """
    if isinstance(n_symbols, bool) or not isinstance(n_symbols, int) or n_symbols < 2:
        raise ValueError(f"n_symbols must be an int >= 2, got {n_symbols!r}")
    lengths = list(train_lengths) + list(test_lengths) + [curve_length]
    if not train_lengths or not test_lengths or min(lengths) < 1:
        raise ValueError(f"train_lengths, test_lengths and curve_length must be lengths >= 1, got "
                         f"{list(train_lengths)}, {list(test_lengths)}, {curve_length}")  # fmt: skip
    config = _config(seeds=seeds, families=families, task="copying", steps=steps, n_symbols=n_symbols,
                     train_lengths=[int(n) for n in train_lengths], test_lengths=[int(n) for n in test_lengths],
                     target_params=target_params, n_layers=n_layers, batch=batch, lr=lr, n_test=n_test,
                     n_probe=n_probe, curve_every=curve_every, curve_length=curve_length, test_seed=test_seed,
                     device=device, state_dtype="float32", bits_per_symbol=math.log2(n_symbols))  # fmt: skip
    return _head_to_head(config, lambda b, n, g: tasks.copying(b, n, n_symbols=n_symbols, generator=g), n_symbols + 1,
                         state_length=lambda n: n + 1,
                         progress=progress, on_run=on_run)  # fmt: skip


def selective_copying_head_to_head(
    seeds=(0, 1, 2),
    steps: int = 400,
    *,
    families=DEFAULT_FAMILIES,
    length: int = 32,
    n_tokens: int = 4,
    n_colors: int = 8,
    target_params: int = 20_000,
    n_layers: int = 2,
    batch: int = 16,
    lr: float = 3e-3,
    n_test: int = 128,
    n_probe: int = 64,
    curve_every: int = 40,
    test_seed: int = 4321,
    device: str = "cpu",
    progress: bool = False,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    r"""Selective copying (Gu and Dao 2023, Sec. 4.1.1) for every family at matched parameters, at one
    sequence ``length`` with ``n_tokens`` tokens of ``n_colors`` colours: accuracy per token at the
    markers (chance ``1 / n_colors``) and the fraction of sequences with every token right. The record
    is :func:`copying_head_to_head`'s, its lengths the one ``length``."""
    tasks.selective_copying_ids(1, length, n_tokens, n_colors)  # checks the sizes
    config = _config(seeds=seeds, families=families, task="selective_copying", steps=steps, length=length,
                     n_tokens=n_tokens, n_colors=n_colors, train_lengths=[length], test_lengths=[length],
                     target_params=target_params, n_layers=n_layers, batch=batch, lr=lr, n_test=n_test,
                     n_probe=n_probe, curve_every=curve_every, curve_length=length, test_seed=test_seed,
                     device=device, chance=1 / n_colors)  # fmt: skip
    return _head_to_head(config, lambda b, L, g: tasks.selective_copying_ids(b, L, n_tokens, n_colors, generator=g),
                         n_colors + 2, state_length=lambda L: L - n_tokens + 1,
                         progress=progress, on_run=on_run)  # fmt: skip


def induction_heads_head_to_head(
    seeds=(0, 1, 2),
    steps: int = 400,
    *,
    families=DEFAULT_FAMILIES,
    n_symbols: int = 16,
    train_length: int = 32,
    test_lengths=(32, 64, 128, 256),
    target_params: int = 20_000,
    n_layers: int = 2,
    batch: int = 16,
    lr: float = 3e-3,
    n_test: int = 128,
    n_probe: int = 64,
    curve_every: int = 40,
    test_seed: int = 4321,
    device: str = "cpu",
    progress: bool = False,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    r"""Induction heads (Gu and Dao 2023, Sec. 4.1.2) for every family at matched parameters: trained at
    ``train_length``, scored at every length of ``test_lengths`` (accuracy at the last position, chance
    ``1 / n_symbols``; one token is scored, so both metrics agree). The record is :func:`copying_head_to_head`'s."""
    tasks.induction_heads(1, train_length, n_symbols=n_symbols)  # checks the sizes
    for L in test_lengths:
        tasks.induction_heads(1, L, n_symbols=n_symbols)
    config = _config(seeds=seeds, families=families, task="induction_heads", steps=steps, n_symbols=n_symbols,
                     train_lengths=[train_length], test_lengths=[int(L) for L in test_lengths],
                     target_params=target_params, n_layers=n_layers, batch=batch, lr=lr, n_test=n_test,
                     n_probe=n_probe, curve_every=curve_every, curve_length=train_length, test_seed=test_seed,
                     device=device, chance=1 / n_symbols)  # fmt: skip
    return _head_to_head(config, lambda b, L, g: tasks.induction_heads(b, L, n_symbols=n_symbols, generator=g),
                         n_symbols + 1, state_length=lambda L: L, progress=progress,
                         on_run=on_run)  # fmt: skip
