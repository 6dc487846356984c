r"""Chapter 8, beyond recall: language modelling at matched compute, and images read as sequences.

Registered in :mod:`seqbook.experiments`, so that they run as

    python -m seqbook.experiments lm_matched_compute --seeds 2
    python -m seqbook.experiments images_as_sequences --seeds 3

and write ``chapters/08_head_to_head/results/lm_matched_compute.json`` and ``images_as_sequences.json``.

**Language modelling** (:func:`lm_matched_compute`). Every family of
:data:`seqbook.experiments_h2h.FAMILIES` as a character-level :class:`~seqbook.nn.LanguageModel`
on the shipped Shakespeare (:mod:`seqbook.corpus`): its width chosen for ``target_params``
parameters (:func:`~seqbook.experiments_h2h.matched_width`), trained with one recipe for the same
number of steps on batches of the same shape, so that every model sees the same characters
(``steps x batch x length``). What each step costs differs between families, so it is measured:
the seconds per training step, and the floating-point operations of one step (forward and
backward) counted by :func:`count_flops` as the readable code executes them. Scored on the whole
validation text (the last 10%, never trained on) in nats and bits per character; a code of
``bits/char x characters`` bits is what an arithmetic coder driven by the model would write.

**Images** (:func:`images_as_sequences`). The 8x8 digits of :mod:`seqbook.digits`, each read as 16
patches of 2x2 pixels in raster order (with learned positions), classified by a :class:`~seqbook.nn.SequenceModel` (mean-pooled) around a
causal Mamba, a bidirectional Mamba (:class:`Bidirectional`: a forward and a reversed scan, added,
as Vision Mamba does), non-causal softmax attention, and a bidirectional S4D, each at a few
parameter counts; accuracy on a fixed held-out split against parameters and FLOPs.

Glossary (symbol -> shape)
--------------------------
::

    x, y      (batch, length)        character ids and the next characters (language modelling)
    logits    (batch, length, vocab)
    tokens    (batch, 16, 4 + 16)    an image as 16 patches of 2x2 grey levels in [0, 1], plus a one-hot position
    labels    (batch,)               the digit 0..9
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import statistics
import time
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from . import corpus, digits, train
from .attention import MultiHeadAttention
from .experiments_h2h import FAMILIES, build, matched_width, n_parameters
from .mamba import Mamba
from .nn import S4D, SequenceModel

LN2 = math.log(2)

# --------------------------------------------------------------------------------------
# Counting what a training step computes
# --------------------------------------------------------------------------------------

_MATMUL_FORMULAS = FlopCounterMode().flop_registry  # aten matmul/conv/attention op -> 2 m n k style formula
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "logsumexp", "cumsum", "cumprod", "prod", "norm",
               "linalg_vector_norm", "var_mean", "var", "std", "_log_softmax", "_softmax",
               "_log_softmax_backward_data", "_softmax_backward_data", "native_layer_norm",
               "native_layer_norm_backward", "nll_loss_forward", "nll_loss_backward"}  # fmt: skip


class _FlopCount(TorchDispatchMode):
    """Counts, for every ATen operation that runs: matrix products by PyTorch's own formulas (2 FLOPs
    per multiply-add), pointwise operations at one FLOP per output element (4 for complex; ``clone``
    and dtype casts are tagged pointwise by PyTorch, so they count too), reductions and
    normalizations at one FLOP per input element. Views and indexing count 0."""

    def __init__(self):
        super().__init__()
        self.matmul = 0
        self.elementwise = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in _MATMUL_FORMULAS:
            self.matmul += int(_MATMUL_FORMULAS[packet](*args, **kwargs, out_val=out))
        elif torch.Tag.pointwise in func.tags:
            first = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(first, torch.Tensor) and first.is_floating_point() or (
                    isinstance(first, torch.Tensor) and first.is_complex()):  # fmt: skip
                self.elementwise += first.numel() * (4 if first.is_complex() else 1)
        elif packet.__name__.rstrip("_") in _REDUCTIONS:
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if first is not None:
                self.elementwise += first.numel()
        return out


def count_flops(fn: Callable[[], object]) -> dict:
    """Run ``fn()`` once and count its floating-point operations (see :class:`_FlopCount`).

    Returns ``{"matmul": int, "elementwise": int, "total": int}``. The count is of what the readable
    code executes on the CPU (e.g. Mamba's parallel scan does ``O(L log L)`` work where a sequential
    kernel does ``O(L)``), which is what the measured time per step pays for.
    """
    counter = _FlopCount()
    with counter:
        fn()
    return {"matmul": counter.matmul, "elementwise": counter.elementwise,
            "total": counter.matmul + counter.elementwise}  # fmt: skip


def training_step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """FLOPs of one training step's forward and backward (cross-entropy on ``y``; the optimizer's update not counted)."""

    def step():
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        loss.backward()

    flops = count_flops(step)
    model.zero_grad(set_to_none=True)
    return flops


# --------------------------------------------------------------------------------------
# Language modelling at matched parameters and matched training compute
# --------------------------------------------------------------------------------------


def compressor_bits_per_char(text: str, context: str = "") -> dict:
    """Bits per character that gzip, bz2 and lzma (highest settings) need for ``text``, measured now.

    With ``context``, the cost of ``text`` *given* ``context``: ``compressed(context + text) -
    compressed(context)``, the fair comparison with a model trained on ``context`` (the compressor
    may reuse what it has seen, as the model reuses what it learned)."""
    raw, ctx = text.encode("utf-8"), context.encode("utf-8")
    coders = {"gzip": lambda b: gzip.compress(b, 9, mtime=0), "bz2": lambda b: bz2.compress(b, 9),
              "lzma": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME)}  # fmt: skip
    out = {}
    for name, coder in coders.items():
        size = len(coder(ctx + raw)) - (len(coder(ctx)) if ctx else 0)
        out[name] = round(8 * size / len(text), 4)
    return out


@torch.no_grad()
def validation_loss(model: nn.Module, tokens: torch.Tensor, length: int, batch: int = 64) -> dict:
    """Mean cross-entropy (nats per character) of ``model`` on ``tokens`` cut into consecutive windows of ``length``.

    Every window ``tokens[i L : (i+1) L]`` predicts ``tokens[i L + 1 : (i+1) L + 1]``; the first
    character of each window is predicted from no context (the same handicap for every family).
    Returns ``{"nats": float, "bits_per_char": float, "characters": int}``."""
    n = (len(tokens) - 1) // length
    if n < 1:
        raise ValueError(f"validation_loss: need more than length = {length} tokens, got {len(tokens)}")
    x = tokens[: n * length].reshape(n, length)
    y = tokens[1 : n * length + 1].reshape(n, length)
    was = model.training
    model.eval()
    total = 0.0
    for i in range(0, n, batch):
        logits = model(x[i : i + batch])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[i : i + batch].reshape(-1),
                                 reduction="sum").item()  # fmt: skip
    model.train(was)
    nats = total / (n * length)
    return {"nats": nats, "bits_per_char": nats / LN2, "characters": n * length}


def _mean_std(values) -> dict:
    values = [float(v) for v in values]
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4), "n": len(values)}  # fmt: skip


def lm_matched_compute(
    seeds=(0, 1, 2),
    steps: int = 250,
    *,
    families=None,
    target_params: int = 30_000,
    n_layers: int = 2,
    batch: int = 16,
    length: int = 64,
    lr: float = 5e-3,
    weight_decay: float = 0.1,
    prompt: str = "ROMEO:\n",
    sample_length: int = 160,
    temperature: float = 0.8,
    val_limit: int | None = None,
    progress: bool = False,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    r"""Character-level language modelling, every family at matched parameters and matched tokens.

    For each family (default: every key of ``FAMILIES``): the width whose model is closest to
    ``target_params`` parameters; for each seed, build it from ``torch.manual_seed(seed)`` and train
    ``steps`` AdamW steps (:func:`seqbook.train.fit`: peak ``lr``, 5% warm-up then cosine, weight
    decay, clipping at 1) on ``batch`` random windows of ``length`` characters of the training text
    drawn with ``seed``: ``steps x batch x length`` characters for every family. Then score the whole
    validation text (:func:`validation_loss`) and sample ``sample_length`` characters after
    ``prompt`` at ``temperature`` (generator seeded with ``seed``; :meth:`LanguageModel.generate`,
    which steps the recurrence where the family has one). ``val_limit``: score only the first
    ``val_limit`` validation characters (for quick runs; the record says so in its config).

    Returns ``{"config", "families": {family: {"d_model", "parameters", "chapter", "flops_per_step":
    {"matmul", "elementwise", "total"}}}, "runs": [{"family", "seed", "val_nats", "val_bits_per_char",
    "final_train_loss", "seconds", "seconds_per_step", "sample"}], "summary": {family: {"val_nats":
    {mean, std, ...}, "val_bits_per_char": {...}, "seconds_per_step": {...}}}, "compressors":
    {"alone": {...}, "given_training_text": {...}}}``; ``on_run(record)`` after every run.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    families = list(FAMILIES) if families is None else list(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"families must be among {list(FAMILIES)}, got {unknown}")
    text = corpus.load_text("shakespeare")
    vocab = corpus.CharVocab(text)
    tokens = vocab.encode(text)
    train_tokens, val_tokens = corpus.split(tokens, 0.1)
    if val_limit is not None:  # a quick run (tests) scores the first val_limit characters only
        val_tokens = val_tokens[: int(val_limit)]
    val_text = vocab.decode(val_tokens)
    train_text = vocab.decode(train_tokens)
    warmup = max(1, steps // 20)
    config = dict(seeds=seeds, steps=steps, families=families, target_params=target_params, n_layers=n_layers,
                  batch=batch, length=length, lr=lr, weight_decay=weight_decay, warmup=warmup,
                  tokens_seen=steps * batch * length, vocab_size=len(vocab), train_characters=len(train_tokens),
                  val_characters=len(val_tokens), val_limit=val_limit, prompt=prompt, sample_length=sample_length,
                  temperature=temperature)  # fmt: skip
    compressors = {"alone": compressor_bits_per_char(val_text),
                   "given_training_text": compressor_bits_per_char(val_text, train_text)}  # fmt: skip
    fam_info, runs = {}, []

    def record():
        summary = {}
        for fam in dict.fromkeys(r["family"] for r in runs):
            mine = [r for r in runs if r["family"] == fam]
            summary[fam] = {k: _mean_std(r[k] for r in mine) for k in ("val_nats", "val_bits_per_char",
                                                                         "seconds_per_step")}  # fmt: skip
        return {"config": config, "families": fam_info, "runs": runs, "summary": summary,
                "compressors": compressors}  # fmt: skip

    def data(g):
        return corpus.lm_batch(train_tokens, batch, length, generator=g)

    for fam in families:
        d = matched_width(fam, target_params, len(vocab), n_layers)
        probe = build(fam, d, len(vocab), n_layers)
        x0, y0 = data(torch.Generator().manual_seed(0))
        fam_info[fam] = {"d_model": d, "parameters": n_parameters(probe), "chapter": FAMILIES[fam][2],
                         "can_step": probe.can_step, "flops_per_step": training_step_flops(probe, x0, y0)}  # fmt: skip
        for seed in seeds:
            model = build(fam, d, len(vocab), n_layers, seed)
            if progress:
                print(f"{fam} (d_model {d}, {fam_info[fam]['parameters']} parameters), seed {seed}", flush=True)
            history = train.fit(model, data, steps, lr=lr, warmup=warmup, seed=seed, weight_decay=weight_decay,
                                progress=progress, log_every=max(1, steps // 4))  # fmt: skip
            val = validation_loss(model, val_tokens, length)
            prompt_ids = vocab.encode(prompt)[None]
            out = model.generate(prompt_ids, sample_length, temperature=temperature,
                                 generator=torch.Generator().manual_seed(seed))  # fmt: skip
            tail = history["loss"][-max(1, steps // 10):]
            runs.append({"family": fam, "seed": seed, "val_nats": round(val["nats"], 4),
                         "val_bits_per_char": round(val["bits_per_char"], 4),
                         "final_train_loss": round(sum(tail) / len(tail), 4),
                         "seconds": round(history["seconds"], 1),
                         "seconds_per_step": round(history["seconds"] / steps, 4),
                         "sample": vocab.decode(out[0, prompt_ids.shape[1]:])})  # fmt: skip
            if progress:
                print(f"  validation {val['nats']:.3f} nats = {val['bits_per_char']:.3f} bits/char", flush=True)
            if on_run is not None:
                on_run(record())
    return record()


# --------------------------------------------------------------------------------------
# Images as sequences: a bidirectional scan against attention
# --------------------------------------------------------------------------------------


class Bidirectional(nn.Module):
    r"""Two causal mixers, one reading the sequence forwards and one backwards, their outputs added.

    ``y = f(u) + flip(g(flip(u)))``: output ``t`` of ``f`` has seen ``u_0..u_t``, output ``t`` of the
    flipped ``g`` has seen ``u_t..u_{L-1}``, so every position sees the whole sequence (as Vision
    Mamba's forward and backward scans do; Zhu et al. 2024, Sec. 3.2). ``make()`` is called twice:
    the two directions have their own parameters. Shapes ``(batch, length, d) -> (batch, length, d)``.
    """

    def __init__(self, make: Callable[[], nn.Module]):
        super().__init__()
        self.forward_mixer, self.backward_mixer = make(), make()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.forward_mixer(u) + self.backward_mixer(u.flip(1)).flip(1)


#: image family -> (mixer factory ``d -> mixer``, ffn_mult). Attention and S4D get the feed-forward
#: sub-block (no channel mixing of their own beyond one projection), Mamba carries its expansion.
IMAGE_FAMILIES: dict[str, tuple[Callable[[int], nn.Module], int]] = {
    "Mamba, bidirectional": (lambda d: Bidirectional(lambda: Mamba(d, d_state=8)), 0),
    "Mamba, causal": (lambda d: Mamba(d, d_state=8), 0),
    "attention (non-causal)": (lambda d: MultiHeadAttention(d, 2, causal=False), 2),
    "S4D, bidirectional": (lambda d: S4D(d, 16, bidirectional=True), 2),
}


def image_model(family: str, d_model: int, n_layers: int = 2, seed: int = 0, d_input: int = 20) -> SequenceModel:
    """A digit classifier: tokens ``(batch, L, d_input)`` (:func:`seqbook.digits.as_sequences`; by default 16
    patches of 2x2 pixels with their one-hot positions) -> linear encoder -> ``n_layers`` blocks of ``family``
    -> mean over the tokens -> 10 logits."""
    if family not in IMAGE_FAMILIES:
        raise ValueError(f"family must be one of {list(IMAGE_FAMILIES)}, got {family!r}")
    factory, ffn_mult = IMAGE_FAMILIES[family]
    torch.manual_seed(seed)
    return SequenceModel(factory, d_input=d_input, d_model=d_model, n_layers=n_layers, d_output=digits.N_CLASSES,
                         pool="mean", ffn_mult=ffn_mult)  # fmt: skip


def image_width(family: str, target_params: int, n_layers: int = 2, widths=range(8, 97, 4), d_input: int = 20) -> int:
    """The width in ``widths`` whose :func:`image_model` has the parameter count closest to ``target_params``."""
    counts = {d: n_parameters(image_model(family, d, n_layers, d_input=d_input)) for d in widths}
    return min(counts, key=lambda d: abs(counts[d] - target_params))


def images_as_sequences(
    seeds=(0, 1, 2),
    steps: int = 300,
    *,
    families=tuple(IMAGE_FAMILIES),
    target_params=(3_000, 12_000),
    order: str = "row",
    patch: int = 2,
    n_layers: int = 2,
    batch: int = 32,
    lr: float = 5e-3,
    n_test: int = 500,
    progress: bool = False,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    r"""Digit classification from pixel sequences: accuracy against parameters and FLOPs, per family.

    The fixed split of :func:`seqbook.digits.train_test_split` (``n_test`` held-out images; the rest
    to train on), each image cut into ``patch x patch`` squares read in ``order`` over the grid of
    patches (:func:`seqbook.digits.as_sequences`, with one-hot positions: a learned position
    embedding, as in ViT and Vision Mamba; pixel by pixel, ``patch=1``, 300 steps leave attention at
    chance, the sequential-MNIST difficulty that needs far longer training). For each family,
    each parameter target (the width of :func:`image_width`) and each seed: build the model from
    ``torch.manual_seed(seed)``, train ``steps`` AdamW steps on ``batch`` training images drawn with
    ``seed`` (:func:`seqbook.train.fit`, weight decay 0.1, 5% warm-up then cosine), and score it on
    the test images. FLOPs: one image's forward pass (:func:`count_flops`), i.e. the cost of one
    classification.

    Returns ``{"config", "models": [{"family", "target", "d_model", "parameters", "flops_per_image"}],
    "runs": [{"family", "target", "seed", "test_accuracy", "seconds"}], "summary": {family: {target:
    {mean, std, min, max, n}}}}``; ``on_run(record)`` after every run.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    unknown = [f for f in families if f not in IMAGE_FAMILIES]
    if unknown:
        raise ValueError(f"families must be among {list(IMAGE_FAMILIES)}, got {unknown}")
    targets = [int(t) for t in target_params]
    (train_images, train_labels), (test_images, test_labels) = digits.train_test_split(n_test)
    x_train = digits.as_sequences(train_images, order, patch=patch, positions=True)
    x_test = digits.as_sequences(test_images, order, patch=patch, positions=True)
    d_input = x_train.shape[-1]
    warmup = max(1, steps // 20)
    config = dict(seeds=seeds, steps=steps, families=list(families), target_params=targets, order=order,
                  patch=patch, positions="one-hot", n_layers=n_layers, batch=batch, lr=lr, weight_decay=0.1, warmup=warmup, n_train=len(train_labels),
                  n_test=n_test, split_seed=0, length=x_train.shape[1], chance=1 / digits.N_CLASSES)  # fmt: skip
    models, runs = [], []

    def record():
        summary = {}
        for fam in dict.fromkeys(r["family"] for r in runs):
            summary[fam] = {str(t): _mean_std(r["test_accuracy"] for r in runs if r["family"] == fam and r["target"] == t)
                            for t in dict.fromkeys(r["target"] for r in runs if r["family"] == fam)}  # fmt: skip
        return {"config": config, "models": models, "runs": runs, "summary": summary}

    def data(g):
        i = torch.randint(len(train_labels), (batch,), generator=g)
        return x_train[i], train_labels[i]

    for fam in families:
        for target in targets:
            d = image_width(fam, target, n_layers, d_input=d_input)
            probe = image_model(fam, d, n_layers, d_input=d_input)
            with torch.no_grad():
                flops = count_flops(lambda: probe(x_test[:1]))
            models.append({"family": fam, "target": target, "d_model": d, "parameters": n_parameters(probe),
                           "flops_per_image": flops})  # fmt: skip
            for seed in seeds:
                model = image_model(fam, d, n_layers, seed, d_input=d_input)
                if progress:
                    print(f"{fam}, d_model {d} ({models[-1]['parameters']} parameters), seed {seed}", flush=True)
                history = train.fit(model, data, steps, lr=lr, warmup=warmup, seed=seed, weight_decay=0.1,
                                    progress=progress, log_every=max(1, steps // 3))  # fmt: skip
                test = train.evaluate(model, x_test, test_labels)
                runs.append({"family": fam, "target": target, "seed": seed,
                             "test_accuracy": round(test["accuracy"], 4), "test_loss": round(test["loss"], 4),
                             "seconds": round(history["seconds"], 1)})  # fmt: skip
                if progress:
                    print(f"  test accuracy {test['accuracy']:.3f}", flush=True)
                if on_run is not None:
                    on_run(record())
    return record()


def image_orders(
    seeds=(0, 1, 2),
    steps: int = 300,
    *,
    families=("Mamba, causal", "Mamba, bidirectional", "attention (non-causal)"),
    orders=("row", "hilbert", "random"),
    target_params: int = 3_000,
    progress: bool = False,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    r"""Does the order of the patches matter? :func:`images_as_sequences` at one size, once per order.

    The same models, recipe, split and seeds for every order in ``orders`` (names of
    :func:`seqbook.digits.pixel_order`, applied to the 4x4 grid of 2x2 patches; ``"random"`` is one
    fixed permutation). Returns ``{"config", "orders": {order: the record of images_as_sequences},
    "summary": {family: {order: {mean, std, min, max, n}}}}``; ``on_run(record)`` after every run.
    """
    unknown = [o for o in orders if o not in digits.ORDERS]
    if unknown:
        raise ValueError(f"orders must be among {digits.ORDERS}, got {unknown}")
    by_order: dict[str, dict] = {}

    def record():
        summary = {}
        for name, rec in by_order.items():
            for fam, by_target in rec["summary"].items():
                summary.setdefault(fam, {})[name] = by_target[str(target_params)]
        config = dict(seeds=[int(s) for s in seeds], steps=steps, families=list(families), orders=list(orders),
                      target_params=target_params)  # fmt: skip
        return {"config": config, "orders": by_order, "summary": summary}

    for name in orders:
        def keep(partial, name=name):
            by_order[name] = partial
            if on_run is not None:
                on_run(record())

        by_order[name] = images_as_sequences(seeds, steps, families=families, target_params=(target_params,),
                                             order=name, progress=progress, on_run=keep)  # fmt: skip
    return record()
