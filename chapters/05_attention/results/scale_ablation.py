"""Chapter 5, exercise 4: what the 1/sqrt(d) scale does to the small Transformer LM, measured.

Trains the chapter's language model (2 layers, width 64, 1000 AdamW steps on Shakespeare) with the
default scale 1/sqrt(d) and with scale 1, at d = 16 (4 heads) and d = 64 (1 head), and records the
training losses, the validation loss, and the attention scores' spread (std of the finite scores
s q.k) and peakedness (mean largest weight of a row, rows 16..63) at initialization and after
training. Writes ``scale_ablation.json`` beside this file (or ``--out``) with the command, commit,
device, seeds and wall time.

    python chapters/05_attention/results/scale_ablation.py            # about 4 x 1 min on an idle CPU
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from seqbook import attention as attn  # noqa: E402
from seqbook.experiments import git_commit  # noqa: E402
from seqbook import corpus, train  # noqa: E402
from seqbook.nn import LanguageModel  # noqa: E402


class ScaledAttention(attn.MultiHeadAttention):
    """MultiHeadAttention with a chosen score scale (None: 1/sqrt(d)); keeps its last q, k for measuring."""

    def __init__(self, d_model, n_heads, scale):
        super().__init__(d_model, n_heads)
        self.scale = scale

    def forward(self, x):
        q, k, v = self._project(x, torch.arange(x.shape[1], device=x.device))
        self.last_qk = (q.detach(), k.detach())
        return self.out(attn.attention(q, k, v, causal=True, scale=self.scale).flatten(-2))


def score_stats(lm, tokens):
    """Per layer: std of the finite scores s q.k and the mean largest weight of rows 16.. (enough keys to choose from)."""
    out = []
    with torch.no_grad():
        lm(tokens)
        for block in lm.blocks:
            q, k = block.mixer.last_qk
            scale = block.mixer.scale or 1 / math.sqrt(q.shape[-1])
            S = attn.attention_scores(q, k, True, scale)
            out.append({"score_std": S[torch.isfinite(S)].std().item(),
                        "mean_largest_weight": torch.softmax(S, -1).amax(-1)[..., 16:].mean().item()})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("scale_ablation.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    text = corpus.load_text("shakespeare")
    vocab = corpus.CharVocab(text)
    train_tokens, val_tokens = corpus.split(vocab.encode(text))
    val_x, val_y = corpus.lm_batch(val_tokens, 256, 64, generator=torch.Generator().manual_seed(10))
    configs = {"d=16, scale 1/sqrt(d)": (4, None), "d=16, scale 1": (4, 1.0),
               "d=64, scale 1/sqrt(d)": (1, None), "d=64, scale 1": (1, 1.0)}
    runs, start, at_start = [], time.perf_counter(), git_commit("seqbook", __file__)  # the code that runs is the code at the start
    for seed in args.seeds:
        for name, (n_heads, scale) in configs.items():
            torch.manual_seed(seed)
            lm = LanguageModel(lambda d: ScaledAttention(d, n_heads, scale), vocab_size=len(vocab), d_model=64,
                               n_layers=2, ffn_mult=4)
            at_init = score_stats(lm, val_x[:32])
            history = train.fit(lm, lambda g: corpus.lm_batch(train_tokens, 32, 64, generator=g), args.steps,
                                lr=3e-3, warmup=50, seed=seed)
            runs.append({"config": name, "seed": seed, "head_dim": 64 // n_heads, "scale": scale,
                         "at_init": at_init, "trained": score_stats(lm, val_x[:32]),
                         "val_loss": train.evaluate(lm, val_x, val_y)["loss"], "train_loss": history["loss"],
                         "seconds": history["seconds"]})
            print(f"{name}, seed {seed}: validation loss {runs[-1]['val_loss']:.3f}", flush=True)
    result = {"command": " ".join(["python", "chapters/05_attention/results/scale_ablation.py"] + (argv or sys.argv[1:])),
              "commit": at_start, "device": "cpu (1 thread)", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "seeds": args.seeds, "steps": args.steps,
              "wall_seconds": time.perf_counter() - start, "runs": runs}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({result['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
