"""Chapter 7's language-model comparison, precomputed: too long for the notebook's 3-minute budget on a CPU.

Trains RWKV-6, RWKV-7, Mamba (chapter 4), gated linear attention (chapter 6) and softmax
attention (chapter 5) as character-level language models on the shipped Shakespeare corpus,
each at about the same parameter count (``TARGET_PARAMS``: the width is the multiple of 8
whose count is closest), with the same data, steps, batch, length and learning-rate schedule,
and writes ``results/lm_comparison.json`` (loss curves, validation loss, parameters, seconds).
The notebook plots the file and reruns a few steps live to check the direction.

Run from the repository root: ``.venv/bin/python chapters/07_rwkv/train_lms.py`` (about 10-20
minutes on one CPU core).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import seqbook  # noqa: F401  (first: the Triton interpreter switch)
import torch

from seqbook import attention as attn
from seqbook import corpus, train
from seqbook import linear_attention as la
from seqbook.nn import LanguageModel, Mamba, RWKV6, RWKV7

TARGET_PARAMS = 60_000
SETUP = dict(n_layers=2, batch=16, length=96, steps=300, lr=5e-3, warmup=20, seed=0, val_batch=64, val_seed=1)

MODELS = {
    "RWKV-7 (ch. 7)": (lambda d: RWKV7(d, 2, d_ffn=2 * d), 0),
    "RWKV-6 (ch. 7)": (lambda d: RWKV6(d, 2, d_ffn=2 * d), 0),
    "Mamba (ch. 4)": (lambda d: Mamba(d, d_state=8), 0),
    "gated linear attention (ch. 6)": (lambda d: la.LinearAttention(d, 2, decay="gated"), 2),
    "softmax attention (ch. 5)": (lambda d: attn.MultiHeadAttention(d, 2), 2),
}


def build(factory, ffn_mult, d, vocab_size):
    torch.manual_seed(SETUP["seed"])
    return LanguageModel(factory, vocab_size, d, SETUP["n_layers"], ffn_mult=ffn_mult)


def main(out=Path(__file__).parent / "results" / "lm_comparison.json"):
    torch.set_num_threads(1)
    text = corpus.load_text("shakespeare")
    vocab = corpus.CharVocab(text)
    train_tokens, val_tokens = corpus.split(vocab.encode(text))
    x_val, y_val = corpus.lm_batch(val_tokens, SETUP["val_batch"], SETUP["length"],
                                   generator=torch.Generator().manual_seed(SETUP["val_seed"]))  # fmt: skip
    results = {}
    for name, (factory, ffn_mult) in MODELS.items():
        counts = {d: sum(p.numel() for p in build(factory, ffn_mult, d, len(vocab)).parameters()) for d in range(16, 129, 8)}
        d = min(counts, key=lambda d: abs(counts[d] - TARGET_PARAMS))
        lm = build(factory, ffn_mult, d, len(vocab))
        start = time.perf_counter()
        history = train.fit(lm, lambda g: corpus.lm_batch(train_tokens, SETUP["batch"], SETUP["length"], generator=g),
                            SETUP["steps"], lr=SETUP["lr"], warmup=SETUP["warmup"], seed=SETUP["seed"])  # fmt: skip
        val = train.evaluate(lm, x_val, y_val)
        results[name] = dict(d_model=d, parameters=counts[d], train_loss=history["loss"], val_loss=val["loss"],
                             val_accuracy=val["accuracy"], seconds=time.perf_counter() - start)  # fmt: skip
        print(f"{name}: d_model {d}, {counts[d]} parameters, validation loss {val['loss']:.3f}", flush=True)
    out.write_text(json.dumps(dict(setup=SETUP, target_params=TARGET_PARAMS, torch=torch.__version__,
                                   python=sys.version.split()[0], machine=platform.machine(), models=results),
                              indent=1))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
